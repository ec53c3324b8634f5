"""The adaptive-threshold study of 2026-11-27 (docs/evaluation.md, "What we tried").

Pre-registered at 09:36 UTC, before any labelled figure of it was computed. The score is
unchanged (so best-F1, AUC-PR and PA best-F1 are too); the alert decision becomes
``smoothed s_t >= q_S * m_t`` with ``m_t = max(1, med_N(r)_t / med_S)``: r the sensor's
unsmoothed window scores, med_N the median of its last N of them (defined once the sensor has
N windows since it started, cold at the test rows as a consumer starts a sensor; m_t = 1
before), med_S the median of its validation window scores (of all sensors' for sensors with
fewer than 100). N = 1024 was the one adoptable candidate (a level lasting longer than N/2
windows is the new normal); 256 and 4096 were computed for sensitivity only. Rule: adopt if
the mean over the five datasets of the mean F1 at the label-free threshold rises and no
dataset's falls by more than 0.02.

Scores each dataset's test data with the default artifacts that ``make backtest`` writes
(``artifacts/<dataset>``). Test labels are used only for the metrics. Usage:

    python scripts/adaptive_threshold_study.py [ARTIFACTS_DIR] [DATA_ROOT]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from long_term_study import raw_scores, studies
from numpy.lib.stride_tricks import sliding_window_view

from stream_detector.datasets import load_dataset
from stream_detector.metrics import entity_metrics, summarize
from stream_detector.model.runtime import TorchScorer
from stream_detector.scoring import smooth
from stream_detector.train import TrainConfig

MIN_VAL, SIZES = 100, (256, 1024, 4096)


def rolling_median(r: np.ndarray, n: int) -> np.ndarray:
    """Median of the last ``n`` values at each position (NaN before ``n`` values)."""
    out = np.full(len(r), np.nan)
    if len(r) >= n:
        v = sliding_window_view(r, n)
        for i in range(0, len(v), 1024):
            out[n - 1 + i : n - 1 + i + len(v[i : i + 1024])] = np.median(v[i : i + 1024], axis=1)
    return out


def study(ds: str, data_dir: Path | None, art: Path) -> dict[object, dict[str, float]]:
    sc = TorchScorer.load(art)
    w, k = sc.manifest.window, sc.manifest.score.smoothing
    vf = TrainConfig().val_fraction
    per = []
    for e in load_dataset(ds, data_dir):
        cut = int(round(len(e.train) * (1 - vf)))
        val = np.concatenate([e.train[cut - (w - 1) : cut], e.train[cut:]])
        r_val = raw_scores(sc, e.name, val)
        r_test = raw_scores(sc, e.name, np.concatenate([e.train[-(w - 1) :], e.test]))
        per.append((e, sc.manifest.thresholds.for_sensor(e.name), r_val, r_test))
    pooled = float(np.median(np.concatenate([p[2] for p in per])))
    rows: dict[object, list[dict[str, float]]] = {v: [] for v in ("default", *SIZES)}
    for e, q, r_val, r_test in per:
        s = smooth(r_test, k)
        med_s = float(np.median(r_val)) if len(r_val) >= MIN_VAL else pooled
        rows["default"].append(entity_metrics(s, e.labels, q))
        for n in SIZES:
            mm = rolling_median(r_test, n)
            m = np.where(np.isnan(mm), 1.0, np.maximum(1.0, mm / med_s))
            rows[n].append(entity_metrics(s, e.labels, q, threshold_scores=s / m))
    return {v: summarize(r) for v, r in rows.items()}


if __name__ == "__main__":
    res = {}
    for ds, result in studies(study):
        res[ds] = result
        for v, m in res[ds].items():
            print(f"{ds:10s} N={v!s:8s} F1@thr {m['f1_at_threshold']:.4f}  precision "
                  f"{m['precision_at_threshold']:.3f}  recall {m['recall_at_threshold']:.3f}",
                  flush=True)
    for v in ("default", *SIZES):
        print(f"{'mean':10s} N={v!s:8s} F1@thr "
              f"{np.mean([res[d][v]['f1_at_threshold'] for d in res]):.4f}")
