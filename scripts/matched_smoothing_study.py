"""The model and the ridge forecaster under the same smoothing (2026-11-27, docs/evaluation.md).

The ridge baseline averages its absolute error with an EWMA (0.05, about 39 rows), the model's
score is the mean of its last 4 window scores. This scores each dataset's test data with the
default artifacts that `make backtest` writes (``artifacts/<dataset>``) and prints the mean
best-F1 / AUC-PR over entities of four scores, so that smoothing and modelling can be told apart:

- ``model, mean of 4``: the product's score (the artifact's smoothing);
- ``model, EWMA 0.05``: the model's window scores smoothed as the ridge's errors are;
- ``ridge, EWMA 0.05``: the reference baseline (``ridge``);
- ``ridge, mean of 4``: its errors smoothed as the model's score (``ridge_matched``).

Both EWMAs start at their first test value (``baselines.ewma``), both means with fewer values at
the start (``scoring.smooth``). Nothing here chooses anything: best-F1 and AUC-PR do not depend
on a threshold, and the test labels are used only for them. Usage:

    python scripts/matched_smoothing_study.py [ARTIFACTS_DIR] [DATA_ROOT]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from long_term_study import raw_scores, studies  # noqa: E402

from stream_detector.baselines import EWMA_ALPHA, ewma, ridge_matched_scores, ridge_scores  # noqa: E402
from stream_detector.datasets import load_dataset  # noqa: E402
from stream_detector.metrics import entity_metrics, summarize  # noqa: E402
from stream_detector.model.runtime import TorchScorer  # noqa: E402
from stream_detector.scoring import smooth  # noqa: E402

VARIANTS = ("model, mean of k", "model, EWMA", "ridge, EWMA", "ridge, mean of k")


def study(ds: str, data_dir: Path | None, art: Path) -> dict[str, tuple[float, float]]:
    sc = TorchScorer.load(art)
    w, k = sc.manifest.window, sc.manifest.score.smoothing
    rows: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for e in load_dataset(ds, data_dir):
        raw = raw_scores(sc, e.name, np.concatenate([e.train[-(w - 1):], e.test]))
        scores = {
            "model, mean of k": smooth(raw, k),
            "model, EWMA": ewma(raw, EWMA_ALPHA),
            "ridge, EWMA": ridge_scores(e),
            "ridge, mean of k": ridge_matched_scores(e, smoothing=k),
        }
        for v, s in scores.items():
            rows[v].append(entity_metrics(s, e.labels))
    return {v: (summarize(r)["best_f1"], summarize(r)["auc_pr"]) for v, r in rows.items()}


if __name__ == "__main__":
    print("| dataset | " + " | ".join(VARIANTS) + " |")
    print("|---|" + "---|" * len(VARIANTS))
    out = {}
    for ds, res in studies(study):
        out[ds] = res
        print(f"| {ds} | " + " | ".join(f"{res[v][0]:.3f} / {res[v][1]:.3f}" for v in VARIANTS)
              + " |", flush=True)
    print("| mean of five | " + " | ".join(
        f"{np.mean([out[d][v][0] for d in out]):.3f} / {np.mean([out[d][v][1] for d in out]):.3f}"
        for v in VARIANTS) + " |")
