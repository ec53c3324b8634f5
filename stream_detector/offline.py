"""Offline batch scoring of an entity, the reference the stream must match (parity).

The stream of a sensor is taken to start with the last ``W - 1`` train rows (context), followed
by the test rows, so every test row closes one window and gets one score. The replay tool
produces exactly these rows, which is why the streamed and the batch scores agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from stream_detector.datasets.base import Entity
from stream_detector.detector import Scorer
from stream_detector.errors import DatasetError
from stream_detector.manifest import Manifest
from stream_detector.scoring import ScoreFunction, smooth, with_long_term


@dataclass(frozen=True)
class EntityScores:
    """Per test row: the score (smoothed, or the long-term term where higher), both error
    terms, per-feature contributions (of the window's own score), threshold."""

    entity: str
    score: np.ndarray
    reconstruction: np.ndarray
    forecast: np.ndarray
    contributions: np.ndarray
    threshold: float


def stream_rows(entity: Entity, window: int) -> tuple[np.ndarray, int]:
    """Rows a replay sends for ``entity``: ``W - 1`` train rows of context, then the test rows.

    Raises DatasetError when the entity has fewer than ``W - 1`` train rows: its first test rows
    could not complete a window, so scores and labels would not line up.
    """
    if len(entity.train) < window - 1:
        raise DatasetError(
            f"entity {entity.name} has {len(entity.train)} train rows; scoring its test rows "
            f"needs at least {window - 1} (window {window} - 1) as context"
        )
    ctx = entity.train[len(entity.train) - (window - 1) :]
    return np.concatenate([ctx, entity.test]).astype(np.float32), len(ctx)


def batch_score(scorer: Scorer, manifest: Manifest, entity: Entity) -> EntityScores:
    rows, n_ctx = stream_rows(entity, manifest.window)
    windows = sliding_window_view(rows, manifest.window, axis=0).transpose(0, 2, 1)
    recs, fcs = [], []
    scaler_row = manifest.scaler_row(entity.name)  # as the detector does (a global: none)
    for i in range(0, len(windows), 4096):
        chunk = np.ascontiguousarray(windows[i : i + 4096])
        if manifest.scaler_per_sensor:
            r, f = scorer.errors(chunk, np.full(len(chunk), scaler_row))  # type: ignore[call-arg]
        else:
            r, f = scorer.errors(chunk)
        recs.append(r)
        fcs.append(f)
    score_fn = ScoreFunction(manifest.score)
    scored = score_fn(np.concatenate(recs), np.concatenate(fcs), score_fn.row(entity.name))
    # windows[0] ends at row W-1 = the first test row when the full context is there
    skip = len(windows) - len(entity.test)
    threshold = manifest.thresholds.for_sensor(entity.name)
    # the long-term level starts with the stream's first window, as the detector's does
    score = with_long_term(smooth(scored.score, manifest.score.smoothing), scored.score,
                           threshold, manifest.score.long_term, entity.name)[skip:]
    return EntityScores(
        entity=entity.name,
        score=score,
        reconstruction=scored.reconstruction[skip:],
        forecast=scored.forecast[skip:],
        contributions=scored.contributions[skip:],
        threshold=threshold,
    )
