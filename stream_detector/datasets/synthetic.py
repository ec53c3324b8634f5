"""A seeded multi-sensor generator with labelled, attributed anomalies (numpy only).

Each sensor (entity ``sensor-000``, ``sensor-001``, ...) has ``n_features`` correlated features
built from a few latent signals:

- latent ``k`` = two sines with sensor-specific periods (60-300 rows, plus a harmonic) and
  phases, plus a slow AR(1) wander, so the series is periodic but not exactly predictable;
- the first ``min(3, n_features)`` features are the latents themselves; every further feature
  is a random linear mix of them, a small product term and a lag of 0-3 rows, so a model can
  reconstruct a feature from the others;
- every feature gets its own Gaussian noise, scale and offset (values are *not* normalised).

The sensors form a *fleet* of one device type: how features derive from the latents, the noise
levels and the units are shared (drawn from the dataset seed), while each sensor has its own
periods, phases, noise draws and a few per cent of calibration spread. That is the setting in
which one model serves every sensor of a topic (see docs/evaluation.md).

The train part is clean. The test part (which continues the same process) carries 6-10
anomalies per sensor by default, non-overlapping, after a 50-row warm-up, of these kinds
(``sigma`` = the feature's train standard deviation):

- ``spike``: 3-10 rows, each row +/- 4-8 sigma on 1-3 features;
- ``level_shift``: +/- 2-4 sigma on 1-3 features for 10-60 rows;
- ``drift``: a ramp from 0 to +/- 3-6 sigma over 10-60 rows, then back to normal;
- ``stuck``: 1-3 features frozen at their last value for 20-60 rows (a flat line);
- ``correlation_break``: 1-2 derived features mirrored around their train mean for 10-60 rows
  (their marginal range stays plausible; only their relation to the others breaks).

``labels`` are 1 on every anomalous row; ``interpretation`` holds, per anomaly, its range
(end exclusive) and the disturbed feature indices; ``meta["anomalies"]`` the same as JSON with
the kind. Everything derives from ``numpy.random.default_rng([seed, sensor_index])``, so a
seed gives bit-identical arrays and any one sensor can be generated alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from stream_detector.datasets.base import Entity, Interpretation
from stream_detector.errors import DatasetError

NAME = "synthetic"
ANOMALY_KINDS: tuple[str, ...] = ("spike", "level_shift", "drift", "stuck", "correlation_break")
BASE_FEATURE_NAMES: tuple[str, ...] = (
    "temperature", "pressure", "vibration", "current", "voltage", "flow", "rpm", "humidity",
)
WARMUP_ROWS = 50
MIN_GAP = 20


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator parameters (the defaults train a small model in well under a minute)."""

    n_sensors: int = 8
    n_features: int = 8
    train_rows: int = 3000
    test_rows: int = 2000
    seed: int = 0
    min_anomalies: int = 6
    max_anomalies: int = 10
    noise: float = 0.2

    def validate(self) -> SyntheticConfig:
        if self.n_sensors < 1 or self.n_features < 1:
            raise DatasetError("synthetic: n_sensors and n_features must be >= 1")
        if self.train_rows < 10 or self.test_rows < 200:
            raise DatasetError("synthetic: need train_rows >= 10 and test_rows >= 200")
        if self.seed < 0:
            raise DatasetError(f"synthetic: seed must be >= 0, got {self.seed}")
        if not 0 <= self.min_anomalies <= self.max_anomalies:
            raise DatasetError("synthetic: need 0 <= min_anomalies <= max_anomalies")
        if self.noise < 0:
            raise DatasetError("synthetic: noise must be >= 0")
        return self


def feature_names(n: int) -> tuple[str, ...]:
    """Readable names for the first eight features, ``feature_NN`` beyond."""
    return tuple(BASE_FEATURE_NAMES[j] if j < len(BASE_FEATURE_NAMES) else f"feature_{j:02d}"
                 for j in range(n))


def sensor_name(index: int) -> str:
    return f"sensor-{index:03d}"


def _latent(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    period = rng.uniform(60.0, 300.0)
    harmonic = period / rng.uniform(2.0, 4.0)
    phase1, phase2 = rng.uniform(0.0, 2 * np.pi, size=2)
    sig = np.sin(2 * np.pi * t / period + phase1)
    sig += rng.uniform(0.3, 0.6) * np.sin(2 * np.pi * t / harmonic + phase2)
    wander = np.empty(len(t))
    shocks = rng.normal(0.0, 0.03, size=len(t))
    level = 0.0
    for i, s in enumerate(shocks):  # AR(1), phi 0.99: stationary sd ~0.2
        level = 0.99 * level + s
        wander[i] = level
    return sig + wander


def _fleet(cfg: SyntheticConfig) -> dict[str, np.ndarray]:
    """What every sensor of the fleet shares: the same kind of device, the same physics.

    How derived features mix the latents (weights, lags, product terms), the noise levels and
    the units (scale, offset) come from the dataset seed alone; each sensor then has its own
    latent periods and phases, noise and a few per cent of calibration spread.
    """
    rng = np.random.default_rng([cfg.seed, 1_000_003])
    n_latent = min(3, cfg.n_features)
    n_derived = cfg.n_features - n_latent
    w = rng.normal(size=(max(n_derived, 0), n_latent))
    w /= np.linalg.norm(w, axis=1, keepdims=True) + 1e-12
    return {
        "w": w,
        "lag": rng.integers(0, 4, size=n_derived),
        "pair": rng.integers(0, n_latent, size=(n_derived, 2)),
        "product": rng.uniform(0.0, 0.3, size=n_derived),
        "noise": cfg.noise * rng.uniform(0.5, 1.5, size=cfg.n_features),
        "scale": np.exp(rng.uniform(np.log(0.5), np.log(20.0), size=cfg.n_features)),
        "offset": rng.uniform(-5.0, 50.0, size=cfg.n_features),
    }


def _clean_signal(rng: np.random.Generator, cfg: SyntheticConfig) -> np.ndarray:
    rows = cfg.train_rows + cfg.test_rows
    lag_max = 3
    fleet = _fleet(cfg)
    t = np.arange(rows + lag_max, dtype=np.float64)
    n_latent = min(3, cfg.n_features)
    latents = np.stack([_latent(rng, t) for _ in range(n_latent)], axis=1)
    x = np.empty((rows, cfg.n_features))
    x[:, :n_latent] = latents[lag_max:]
    for i, j in enumerate(range(n_latent, cfg.n_features)):
        lag = int(fleet["lag"][i])
        src = latents[lag_max - lag : lag_max - lag + rows]
        a, b = fleet["pair"][i]
        x[:, j] = src @ fleet["w"][i] + fleet["product"][i] * src[:, a] * src[:, b]
    x += rng.normal(size=x.shape) * fleet["noise"]
    scale = fleet["scale"] * rng.uniform(0.95, 1.05, size=cfg.n_features)
    offset = fleet["offset"] + rng.uniform(-0.2, 0.2, size=cfg.n_features) * fleet["scale"]
    return x * scale + offset


def _place(rng: np.random.Generator, lengths: list[int], lo: int, hi: int) -> list[int]:
    """Random non-overlapping starts in [lo, hi) for ranges of ``lengths`` (in order)."""
    free = hi - lo - sum(lengths) - MIN_GAP * len(lengths)
    cuts = np.sort(rng.integers(0, free + 1, size=len(lengths)))
    starts, used = [], 0
    for length, cut in zip(lengths, cuts, strict=True):
        starts.append(lo + int(cut) + used)
        used += length + MIN_GAP
    return starts


@dataclass(frozen=True)
class InjectedAnomaly:
    """One injected anomaly: test rows ``start:end`` and the disturbed feature indices."""

    kind: str
    start: int
    end: int
    features: tuple[int, ...]


def _inject(
    rng: np.random.Generator, test: np.ndarray, train: np.ndarray, cfg: SyntheticConfig
) -> list[InjectedAnomaly]:
    n_feat = cfg.n_features
    sigma = train.std(axis=0)
    mean = train.mean(axis=0)
    n = int(rng.integers(cfg.min_anomalies, cfg.max_anomalies + 1))
    kinds = [ANOMALY_KINDS[i % len(ANOMALY_KINDS)] for i in range(n)]
    kinds = [kinds[i] for i in rng.permutation(n)]
    lengths = [
        int(rng.integers(3, 11)) if k == "spike"
        else int(rng.integers(20, 61)) if k == "stuck"
        else int(rng.integers(10, 61))
        for k in kinds
    ]
    # Fewer anomalies when the test part is too short to hold them all.
    while kinds and sum(lengths) + MIN_GAP * len(lengths) > cfg.test_rows - WARMUP_ROWS - 1:
        kinds.pop()
        lengths.pop()
    starts = _place(rng, lengths, WARMUP_ROWS, cfg.test_rows)
    derived = list(range(min(3, n_feat), n_feat)) or list(range(n_feat))

    out: list[InjectedAnomaly] = []
    for kind, start, length in zip(kinds, starts, lengths, strict=True):
        end = start + length
        if kind == "correlation_break":
            k = int(rng.integers(1, min(2, len(derived)) + 1))
            feats = sorted(int(f) for f in rng.choice(derived, size=k, replace=False))
        else:
            k = int(rng.integers(1, min(3, n_feat) + 1))
            feats = sorted(int(f) for f in rng.choice(n_feat, size=k, replace=False))
        seg = slice(start, end)
        for f in feats:
            sign = 1.0 if rng.random() < 0.5 else -1.0
            if kind == "spike":
                mags = rng.uniform(4.0, 8.0, size=length)
                signs = np.where(rng.random(length) < 0.5, -1.0, 1.0)
                test[seg, f] += mags * signs * sigma[f]
            elif kind == "level_shift":
                test[seg, f] += sign * rng.uniform(2.0, 4.0) * sigma[f]
            elif kind == "drift":
                top = rng.uniform(3.0, 6.0)
                test[seg, f] += sign * np.linspace(top / length, top, length) * sigma[f]
            elif kind == "stuck":
                test[seg, f] = test[start - 1, f]
            else:  # correlation_break
                test[seg, f] = 2.0 * mean[f] - test[seg, f]
        out.append(InjectedAnomaly(kind, start, end, tuple(feats)))
    return out


def generate_sensor(index: int, config: SyntheticConfig | None = None) -> Entity:
    """Sensor ``index`` of the dataset described by ``config`` (defaults when None)."""
    cfg = (config or SyntheticConfig()).validate()
    if not 0 <= index < cfg.n_sensors:
        raise DatasetError(f"synthetic: sensor index {index} outside 0..{cfg.n_sensors - 1}")
    rng = np.random.default_rng([cfg.seed, index])
    series = _clean_signal(rng, cfg)
    train = series[: cfg.train_rows].copy()
    test = series[cfg.train_rows :].copy()
    anomalies = _inject(rng, test, train, cfg)
    labels = np.zeros(cfg.test_rows, dtype=np.int8)
    for a in anomalies:
        labels[a.start : a.end] = 1
    return Entity(
        name=sensor_name(index),
        train=train.astype(np.float32),
        test=test.astype(np.float32),
        labels=labels,
        features=feature_names(cfg.n_features),
        interpretation=tuple(Interpretation(a.start, a.end, a.features) for a in anomalies),
        meta={
            "dataset": NAME,
            "seed": str(cfg.seed),
            "config": json.dumps(asdict(cfg), sort_keys=True),
            "anomalies": json.dumps([asdict(a) for a in anomalies]),
        },
    )


def generate(
    n_sensors: int = 8,
    n_features: int = 8,
    train_rows: int = 3000,
    test_rows: int = 2000,
    seed: int = 0,
    **options: Any,
) -> list[Entity]:
    """The whole synthetic dataset; ``options`` are further :class:`SyntheticConfig` fields."""
    try:
        cfg = SyntheticConfig(n_sensors, n_features, train_rows, test_rows, seed, **options)
    except TypeError as exc:
        raise DatasetError(f"synthetic: {exc}") from None
    cfg.validate()
    return [generate_sensor(i, cfg) for i in range(cfg.n_sensors)]


class SyntheticLoader:
    """Loader for the generated dataset; needs no data directory.

    ``data_dir`` is ignored unless it names an existing ``.json`` file, whose object overrides
    :class:`SyntheticConfig` fields (e.g. ``{"seed": 3, "n_sensors": 4}``).
    """

    name = NAME
    needs_data_dir = False

    def __init__(self, config: SyntheticConfig | None = None) -> None:
        self.config = (config or SyntheticConfig()).validate()

    def _config(self, data_dir: Path | None) -> SyntheticConfig:
        if data_dir is None:
            return self.config
        path = Path(data_dir)
        if not (path.suffix == ".json" and path.is_file()):
            return self.config
        try:
            overrides = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(overrides, dict):
                raise ValueError("expected a JSON object")
            return replace(self.config, **overrides).validate()
        except (OSError, ValueError, TypeError) as exc:
            raise DatasetError(f"synthetic: bad parameter file {path}: {exc}") from None

    def list_entities(self, data_dir: Path | None) -> list[str]:
        return [sensor_name(i) for i in range(self._config(data_dir).n_sensors)]

    def load_entity(self, data_dir: Path | None, entity: str) -> Entity:
        cfg = self._config(data_dir)
        names = [sensor_name(i) for i in range(cfg.n_sensors)]
        if entity not in names:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            raise DatasetError(
                f"unknown synthetic sensor {entity!r}; known ({len(names)}): {shown}"
            )
        return generate_sensor(names.index(entity), cfg)
