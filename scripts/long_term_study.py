"""The long-term score studies of 2026-11-27 (docs/evaluation.md, "What we tried").

Scores each dataset's test data with the default artifacts that `make backtest` writes
(``artifacts/<dataset>``) three ways and prints the mean metrics over entities:

- ``default``: the product's score (mean of the last 4 window scores, the artifact's thresholds);
- ``ewma``: max(S, L * q_S / q_L), L an EWMA (alpha 0.05) of the window scores clipped at the
  sensor's threshold q_S, running warm from the validation rows into the test rows, q_L the
  99.5 % quantile of L on the validation rows after 60 windows of burn-in (pooled over
  sensors where fewer than 100 remain);
- ``finite``: the same with L the trailing mean of the last 39 clipped scores, defined once a
  sensor has 39 of them, started cold at the test rows as the consumer would (q_L from the
  validation rows scored the same way);
- ``product``: the EWMA started cold as a consumer would, at the sensor's mean clipped
  validation score (the mean over all sensors for those with fewer than 100 validation
  windows), validation and test each started that way, q_L without burn-in.

Validation rows are the last ``val_fraction`` of each entity's train rows, as in training.
Test labels are used only for the metrics. Usage:

    python scripts/long_term_study.py [ARTIFACTS_DIR] [DATA_ROOT]   (artifacts, ../shared/data)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from stream_detector.datasets import load_dataset
from stream_detector.metrics import entity_metrics, summarize
from stream_detector.model.runtime import TorchScorer
from stream_detector.scoring import ScoredWindows, ScoreFunction, smooth
from stream_detector.train import TrainConfig

Q, ALPHA, BURN, N, MIN_VAL = 0.995, 0.05, 60, 39, 100
DATASETS = {"synthetic": None, "smd": "smd", "smap": "smap_msl", "msl": "smap_msl", "nab": "nab"}
KEYS = ("best_f1", "auc_pr", "f1_at_threshold", "pa_best_f1")


def raw_scores(scorer: TorchScorer, name: str, rows: np.ndarray) -> np.ndarray:
    """Unsmoothed window scores of the windows ending at rows[W-1:]."""
    return scored_windows(scorer, name, rows).score


def scored_windows(scorer: TorchScorer, name: str, rows: np.ndarray) -> ScoredWindows:
    """The artifact's scoring of the windows ending at rows[W-1:] (terms, score and
    per-feature contributions), with ``name``'s scalers."""
    man = scorer.manifest
    win = sliding_window_view(rows.astype(np.float32), man.window, axis=0).transpose(0, 2, 1)
    srow = man.scaler_row(name)
    recs, fcs = [], []
    for i in range(0, len(win), 4096):
        ch = np.ascontiguousarray(win[i : i + 4096])
        r, f = (scorer.errors(ch, np.full(len(ch), srow)) if man.scaler_per_sensor  # type: ignore[call-arg]
                else scorer.errors(ch))
        recs.append(r)
        fcs.append(f)
    sf = ScoreFunction(man.score)
    return sf(np.concatenate(recs), np.concatenate(fcs), sf.row(name))


def ewma(x: np.ndarray, alpha: float, start: float | None = None) -> np.ndarray:
    """EWMA of ``x``; ``start``: the level before the first value (None: the first value)."""
    out = np.empty_like(x)
    m = x[0] if start is None else start
    for i, v in enumerate(x):
        m = m + alpha * (v - m)
        out[i] = m
    return out


def trailing(x: np.ndarray, n: int) -> np.ndarray:
    out = np.full(len(x), np.nan)
    if len(x) >= n:
        out[n - 1 :] = sliding_window_view(x, n).mean(axis=1)
    return out


def study(ds: str, data_dir: Path | None, art: Path) -> dict[str, dict[str, float]]:
    ents = load_dataset(ds, data_dir)
    sc = TorchScorer.load(art)
    w, k = sc.manifest.window, sc.manifest.score.smoothing
    vf = TrainConfig().val_fraction
    per = []
    for e in ents:
        cut = int(round(len(e.train) * (1 - vf)))
        fit, val = e.train[:cut], e.train[cut:]
        q_s = sc.manifest.thresholds.for_sensor(e.name)
        # ewma: one stream, fit-row context, validation rows, test rows
        r_all = raw_scores(sc, e.name, np.concatenate([fit[-(w - 1) :], val, e.test]))
        l_all = ewma(np.minimum(r_all, q_s), ALPHA)
        # finite: validation and test each started cold, as a consumer starts a sensor
        r_val = raw_scores(sc, e.name, np.concatenate([fit[-(w - 1) :], val]))
        r_test = raw_scores(sc, e.name, np.concatenate([e.train[-(w - 1) :], e.test]))
        l_val, l_test = trailing(np.minimum(r_val, q_s), N), trailing(np.minimum(r_test, q_s), N)
        c_val, c_test = np.minimum(r_val, q_s), np.minimum(r_test, q_s)
        per.append({"e": e, "q_s": q_s, "s": smooth(r_test, k), "c_val": c_val, "c_test": c_test,
                    "s_warm": smooth(r_all, k)[len(val):],
                    "ewma_val": l_all[BURN : len(val)], "ewma_test": l_all[len(val):],
                    "fin_val": l_val[~np.isnan(l_val)], "fin_test": l_test})
    all_c = np.concatenate([p["c_val"] for p in per])
    for p in per:  # product: cold start at the sensor's mean clipped validation score
        m_s = p["c_val"].mean() if len(p["c_val"]) >= MIN_VAL else all_c.mean()
        p["prod_val"] = ewma(p["c_val"], ALPHA, m_s)
        p["prod_test"] = ewma(p["c_test"], ALPHA, m_s)
    pooled = {v: np.quantile(np.concatenate([p[f"{v}_val"] for p in per]), Q)
              for v in ("ewma", "fin", "prod")}
    rows: dict[str, list[dict]] = {"default": [], "ewma": [], "finite": [], "product": []}
    for p in per:
        e, q_s = p["e"], p["q_s"]
        q_l = {v: np.quantile(p[f"{v}_val"], Q) if len(p[f"{v}_val"]) >= MIN_VAL else pooled[v]
               for v in ("ewma", "fin", "prod")}
        scores = {
            "default": p["s"],
            "ewma": np.maximum(p["s_warm"], p["ewma_test"] * q_s / q_l["ewma"]),
            "finite": np.maximum(p["s"], np.nan_to_num(p["fin_test"] * q_s / q_l["fin"],
                                                       nan=-np.inf)),
            "product": np.maximum(p["s"], p["prod_test"] * q_s / q_l["prod"]),
        }
        for v, s in scores.items():
            rows[v].append({"entity": e.name, **entity_metrics(s, e.labels, q_s)})
    return {v: {k: round(float(summarize(r)[k]), 4) for k in KEYS} for v, r in rows.items()}


def studies(study_fn):
    """Run ``study_fn(dataset, data_dir, artifact)`` on every dataset; yields (dataset, result).
    Arguments: [ARTIFACTS_DIR] [DATA_ROOT] (artifacts, ../shared/data)."""
    arts = Path(sys.argv[1] if len(sys.argv) > 1 else "artifacts")
    root = Path(sys.argv[2] if len(sys.argv) > 2 else "../shared/data")
    for ds, sub in DATASETS.items():
        yield ds, study_fn(ds, root / sub if sub else None, arts / ds)


if __name__ == "__main__":
    out = {}
    for ds, result in studies(study):
        out[ds] = result
        for v, m in out[ds].items():
            print(f"{ds:10s} {v:8s} {json.dumps(m)}", flush=True)
    for v in ("default", "ewma", "finite", "product"):
        print(f"{'mean':10s} {v:8s} best-F1 {np.mean([out[d][v]['best_f1'] for d in out]):.4f}"
              f"  AUC-PR {np.mean([out[d][v]['auc_pr'] for d in out]):.4f}")
