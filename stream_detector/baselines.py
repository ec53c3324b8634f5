"""Reference baselines: simple detectors every model result is compared against.

Every baseline fits on ``entity.train`` only, scores ``entity.test`` (one float per test row,
higher = more anomalous) and never sees the test labels: the functions take no labels at all.
They are deterministic for a given ``seed``.

``context`` (keyword, optional) is the history just before the first test row, ``(rows, F)``:
by default the last rows of ``entity.train``, so the lag window of a forecaster is defined at
test row 0. Pass an explicit array when ``entity.test`` is a chunk of a longer stream, or an empty
``(0, F)`` array for "no history" (the first rows then repeat the first test row as padding).
Point-wise baselines (random, PCA, IsolationForest) accept it and ignore it.

The registry :data:`BASELINES` gives all of them the uniform signature
``fn(entity, seed=0) -> np.ndarray``; :func:`run_baselines` runs several.

Settings chosen to reproduce the reference numbers of ``shared/data/README.md`` (mean over the
18 SMD machines, over the SMAP and MSL channels): standardisation with train mean and std (std
floored at :data:`STD_FLOOR`), PCA keeping :data:`PCA_VARIANCE` of the train variance,
IsolationForest with scikit-learn defaults, ridge (``alpha`` :data:`RIDGE_ALPHA`) forecasters
smoothed with an EWMA of span :data:`EWMA_SPAN`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # attributes only: keep importing this module free of the dataset loaders
    from stream_detector.datasets.base import Entity

#: Floor on a feature's train std: constant train columns (common on SMD) must not divide by 0.
STD_FLOOR = 1e-3
#: Fraction of the (standardised) train variance the PCA baseline keeps.
PCA_VARIANCE = 0.9
#: Ridge regularisation of the forecaster baseline.
RIDGE_ALPHA = 1.0
#: EWMA span of the forecaster's absolute error (``alpha = 2 / (span + 1)``).
EWMA_SPAN = 8
#: Lags of the forecaster: multivariate data predicts all columns from the last 8 steps, NASA
#: telemetry (SMAP/MSL) predicts column 0 (the telemetry value) from the last 16 steps.
MULTIVARIATE_LAGS = 8
TELEMETRY_LAGS = 16


def _f64(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(-1, 1) if a.ndim == 1 else a


def standardizer(train: np.ndarray, floor: float = STD_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """Train mean and std per feature, std floored at ``floor``."""
    x = _f64(train)
    mean = x.mean(axis=0)
    std = np.maximum(x.std(axis=0), floor)
    return mean, std


def _standardized(entity: Entity) -> tuple[np.ndarray, np.ndarray]:
    mean, std = standardizer(entity.train)
    return (_f64(entity.train) - mean) / std, (_f64(entity.test) - mean) / std


def random_scores(entity: Entity, seed: int = 0, *, context: np.ndarray | None = None) -> np.ndarray:
    """Uniform random scores in [0, 1): the chance level of every metric."""
    del context
    return np.random.default_rng(seed).random(len(entity.test))


def pca_scores(
    entity: Entity,
    seed: int = 0,
    *,
    variance: float = PCA_VARIANCE,
    context: np.ndarray | None = None,
) -> np.ndarray:
    """PCA reconstruction error: squared error summed over the standardised features.

    PCA is fitted on the standardised train rows, keeping the fewest components that explain
    ``variance`` of the train variance (at least one).
    """
    del context, seed  # exact SVD: nothing random
    tr, te = _standardized(entity)
    mu = tr.mean(axis=0)
    _, sv, vt = np.linalg.svd(tr - mu, full_matrices=False)
    var = sv**2
    total = float(var.sum())
    if total <= 0.0:  # every train column constant: nothing to project on
        k = 0
    else:
        cum = np.cumsum(var) / total
        k = int(min(len(var), np.searchsorted(cum, variance - 1e-12) + 1))
    comps = vt[:k]
    centred = te - mu
    resid = centred - (centred @ comps.T) @ comps
    return np.sum(resid**2, axis=1)


def iforest_scores(
    entity: Entity,
    seed: int = 0,
    *,
    n_estimators: int = 100,
    context: np.ndarray | None = None,
) -> np.ndarray:
    """IsolationForest (scikit-learn defaults, ``random_state=seed``, one job) on standardised
    rows; score = ``-score_samples`` so higher is more anomalous."""
    del context
    from sklearn.ensemble import IsolationForest

    tr, te = _standardized(entity)
    forest = IsolationForest(n_estimators=n_estimators, random_state=seed, n_jobs=1).fit(tr)
    return -forest.score_samples(te)


def is_telemetry(entity: Entity) -> bool:
    """NASA telemetry layout (SMAP/MSL): feature 0 named ``value``, the others ``cmd...`` flags."""
    f = entity.features
    return len(f) > 1 and f[0] == "value" and all(str(n).startswith("cmd") for n in f[1:])


def ewma(x: np.ndarray, span: float) -> np.ndarray:
    """Exponentially weighted moving average, ``alpha = 2 / (span + 1)``, started at ``x[0]``."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    if x.size == 0:
        return out
    a = 2.0 / (span + 1.0)
    acc = float(x[0])
    b = 1.0 - a
    for i, v in enumerate(x.tolist()):
        acc = a * v + b * acc
        out[i] = acc
    return out


def _lag_matrix(x: np.ndarray, lags: int) -> np.ndarray:
    """Rows ``t = lags .. len(x)-1`` of the flattened windows ``x[t-lags:t]``."""
    from numpy.lib.stride_tricks import sliding_window_view

    win = sliding_window_view(x[:-1], lags, axis=0)  # (n - lags, F, lags)
    return win.transpose(0, 2, 1).reshape(win.shape[0], -1)


def ridge_scores(
    entity: Entity,
    seed: int = 0,
    *,
    lags: int | None = None,
    targets: Iterable[int] | None = None,
    alpha: float = RIDGE_ALPHA,
    span: float = EWMA_SPAN,
    context: np.ndarray | None = None,
) -> np.ndarray:
    """Ridge forecaster: EWMA of the mean absolute one-step forecast error (standardised units).

    Inputs are the last ``lags`` rows of all features; outputs are ``targets``. Defaults: for
    NASA telemetry (:func:`is_telemetry`) column 0 from the last 16 steps, otherwise every
    column from the last 8 steps. ``context`` defaults to the last ``lags`` train rows.
    """
    del seed  # closed-form fit: nothing random
    from sklearn.linear_model import Ridge

    telemetry = is_telemetry(entity)
    if lags is None:
        lags = TELEMETRY_LAGS if telemetry else MULTIVARIATE_LAGS
    if targets is None:
        cols = [0] if telemetry else list(range(_f64(entity.test).shape[1]))
    else:
        cols = [int(c) for c in targets]
    mean, std = standardizer(entity.train)
    tr = (_f64(entity.train) - mean) / std
    te = (_f64(entity.test) - mean) / std
    if len(te) == 0:
        return np.zeros(0)
    if context is None:
        ctx = tr[-lags:]
    else:
        ctx = (_f64(context) - mean) / std
        ctx = ctx[-lags:] if len(ctx) else ctx.reshape(0, te.shape[1])
    if len(tr) <= lags:
        raise ValueError(f"{entity.name}: {len(tr)} train rows, need more than lags={lags}")
    model = Ridge(alpha=alpha).fit(_lag_matrix(tr, lags), tr[lags:, cols])
    hist = np.concatenate([ctx, te], axis=0)
    pad = lags - len(ctx)
    if pad > 0:
        hist = np.concatenate([np.repeat(te[:1], pad, axis=0), hist], axis=0)
    # ``hist`` holds exactly ``lags`` rows before test row 0: one lag window per test row.
    x_te = _lag_matrix(hist, lags)
    pred = model.predict(x_te).reshape(len(te), len(cols))
    err = np.abs(te[:, cols] - pred).mean(axis=1)
    return ewma(err, span)


BaselineFn = Callable[..., np.ndarray]

#: Name -> ``fn(entity, seed=0) -> scores`` (one per test row, higher = more anomalous).
BASELINES: dict[str, BaselineFn] = {
    "random": random_scores,
    "pca": pca_scores,
    "iforest": iforest_scores,
    "ridge": ridge_scores,
}

#: Human-readable names for reports.
BASELINE_TITLES: dict[str, str] = {
    "random": "random scores",
    "pca": "PCA reconstruction error",
    "iforest": "IsolationForest",
    "ridge": "ridge forecaster, EWMA of abs error",
}


def run_baselines(
    entity: Entity, names: Iterable[str] | None = None, seed: int = 0, **kwargs: Any
) -> dict[str, np.ndarray]:
    """Scores of the baselines ``names`` (all when None) on ``entity``; ``kwargs`` (e.g.
    ``context``) are passed to each."""
    chosen = list(BASELINES) if names is None else list(names)
    unknown = [n for n in chosen if n not in BASELINES]
    if unknown:
        raise KeyError(f"unknown baseline(s) {unknown}; known: {sorted(BASELINES)}")
    return {n: BASELINES[n](entity, seed, **kwargs) for n in chosen}
