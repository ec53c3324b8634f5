"""How a window's per-feature errors are combined: mean (the product) or maximum (2026-11-27).

Written down at 13:32 UTC, before any figure of the variant was computed:

    Variant "feature max": a window's score is the largest per-feature contribution
    ``w_rec * rec_f / rec_scale_f + w_fc * fc_f / fc_scale_f`` over the scored features (those
    with a weight > 0 where the artifact has feature weights: SMAP/MSL score the telemetry
    column only, NAB has one feature, so only SMD and the synthetic data can change) instead
    of their mean. The artifact's network, error scales and smoothing (mean of the last 4
    window scores) are kept; thresholds are refitted as the trainer fits them, on validation
    windows only (the 99.5 % quantile of each sensor's smoothed validation scores; sensors with
    fewer than 100 validation windows get the quantile of all sensors' scores). Motivation: an
    SMD incident usually moves a few of the 38 metrics, and the mean divides their errors by
    38. For information only (not adoptable by this study): the mean of the 3 largest.
    Rule (that of the earlier studies): make it the default only if the mean best-F1 and the
    mean AUC-PR over the five datasets both rise and no dataset loses more than 0.02 best-F1.
    Check first: the thresholds refitted for the default mean must equal the artifact's.

Scores each dataset's test data with the default artifacts that `make backtest` writes
(``artifacts/<dataset>``); test labels are used only for the metrics. Usage:

    python scripts/feature_max_study.py [ARTIFACTS_DIR] [DATA_ROOT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_term_study import scored_windows, studies  # noqa: E402

from stream_detector.datasets import load_dataset  # noqa: E402
from stream_detector.metrics import entity_metrics, summarize  # noqa: E402
from stream_detector.model.runtime import TorchScorer  # noqa: E402
from stream_detector.scoring import fit_threshold, smooth  # noqa: E402
from stream_detector.train import TrainConfig  # noqa: E402

VARIANTS = ("mean", "max", "top3")
KEYS = ("best_f1", "auc_pr", "f1_at_threshold")


def contributions(sc: TorchScorer, name: str, rows: np.ndarray) -> np.ndarray:
    """Per-feature contributions ``w_rec rec_n_f + w_fc fc_n_f`` (weighted features only) of the
    windows ending at rows[W-1:]; shape (windows, scored features)."""
    out = scored_windows(sc, name, rows)
    w = np.asarray(sc.manifest.score.feature_weights, dtype=np.float64)
    if w.size:  # contributions carry the normalised weights: undo them on the scored features
        keep = w > 0
        return out.contributions[:, keep] / (w[keep] / w.sum())
    # contributions are divided by the feature count
    return out.contributions * out.contributions.shape[1]


def combine(c: np.ndarray, how: str) -> np.ndarray:
    if how == "mean":
        return c.mean(axis=1)
    if how == "max":
        return c.max(axis=1)
    k = min(3, c.shape[1])
    return np.sort(c, axis=1)[:, -k:].mean(axis=1)


def study(ds: str, data_dir: Path | None, art: Path) -> dict[str, dict[str, float]]:
    sc = TorchScorer.load(art)
    man = sc.manifest
    w, k = man.window, man.score.smoothing
    # the artifact's own training settings (validation split, threshold rule, per-sensor minimum)
    cfg = TrainConfig(**{key: v for key, v in man.training.get("config", {}).items()
                         if key in TrainConfig.__dataclass_fields__})
    ents = load_dataset(ds, data_dir)
    val_s: dict[str, dict[str, np.ndarray]] = {v: {} for v in VARIANTS}
    test_s: dict[str, dict[str, np.ndarray]] = {v: {} for v in VARIANTS}
    for e in ents:
        cut = int(round(len(e.train) * (1 - cfg.val_fraction)))
        c_val = contributions(sc, e.name, e.train[cut:])  # the trainer's validation windows
        c_test = contributions(sc, e.name, np.concatenate([e.train[-(w - 1):], e.test]))
        for v in VARIANTS:
            val_s[v][e.name] = smooth(combine(c_val, v), k)
            test_s[v][e.name] = smooth(combine(c_test, v), k)
    out = {}
    worst = 0.0
    for v in VARIANTS:
        def fit(x: np.ndarray) -> float:
            return fit_threshold(x, cfg.threshold_method, cfg.threshold_q, cfg.threshold_margin)

        pooled = fit(np.concatenate(list(val_s[v].values())))
        rows = []
        for e in ents:
            s = val_s[v][e.name]
            thr = fit(s) if s.size >= cfg.min_sensor_windows else pooled
            if v == "mean":
                want = man.thresholds.for_sensor(e.name)
                worst = max(worst, abs(thr - want) / want)
            rows.append(entity_metrics(test_s[v][e.name], e.labels, thr))
        m = summarize(rows)
        out[v] = {key: round(float(m[key]), 4) for key in KEYS}
    print(f"  {ds}: refitted thresholds of the mean vs the artifact's: largest relative "
          f"difference {worst:.2e}", flush=True)
    return out


if __name__ == "__main__":
    res = {}
    for ds, r in studies(study):
        res[ds] = r
        print(f"| {ds} | " + " | ".join(
            f"{r[v]['best_f1']:.3f} / {r[v]['auc_pr']:.3f} / {r[v]['f1_at_threshold']:.3f}"
            for v in VARIANTS) + " |", flush=True)
    for v in VARIANTS:
        print(f"mean of five, {v}: best-F1 {np.mean([res[d][v]['best_f1'] for d in res]):.4f} "
              f"AUC-PR {np.mean([res[d][v]['auc_pr'] for d in res]):.4f} "
              f"F1@thr {np.mean([res[d][v]['f1_at_threshold'] for d in res]):.4f}")
