"""Fakes shipped with the package, so tests, replay dry-runs and benchmarks can drive the
:class:`~stream_detector.detector.Detector` without a broker or torch."""

from __future__ import annotations

import numpy as np

from stream_detector.manifest import SCHEMA_VERSION, Manifest, ScoreSpec, ThresholdSpec


class FakeClock:
    """A monotonic clock moved by hand (seconds)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class NumpyScorer:
    """A deterministic torch-free scorer with the model's contract.

    Reconstruction error: squared deviation of the context from its mean, per feature.
    Forecast error: squared difference between the newest value and the last context value.
    Spikes and level shifts therefore give large errors, like the real model.
    """

    def __init__(self) -> None:
        self.calls: list[int] = []

    def errors(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w = np.asarray(windows, dtype=np.float64)
        self.calls.append(len(w))
        ctx = w[:, :-1, :]
        rec = ((ctx - ctx.mean(axis=1, keepdims=True)) ** 2).mean(axis=1)
        fc = (w[:, -1, :] - ctx[:, -1, :]) ** 2
        return rec, fc


def make_manifest(
    features: tuple[str, ...] = ("a", "b", "c"),
    window: int = 8,
    threshold: float = 1.0,
    per_sensor: dict[str, float] | None = None,
    smoothing: int = 1,
    model_version: str = "test-model",
) -> Manifest:
    """A valid manifest for tests (identity scaler, unit error scales)."""
    n = len(features)
    return Manifest(
        schema_version=SCHEMA_VERSION,
        model_version=model_version,
        dataset="test",
        features=features,
        window=window,
        network={"encoder": "none"},
        scaler_mean=(0.0,) * n,
        scaler_std=(1.0,) * n,
        clip=1e6,
        score=ScoreSpec(0.5, 0.5, (1.0,) * n, (1.0,) * n, smoothing),
        thresholds=ThresholdSpec("fixed", threshold, per_sensor or {}),
        sha256="0" * 64,
    )
