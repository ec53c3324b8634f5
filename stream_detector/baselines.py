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
18 SMD machines: reproduced to three decimals; over the SMAP and MSL channels the forecaster
differs because it gets the train rows before the first test row as lag context, as the model
does: 0.517 / 0.503 best-F1 against the reference 0.541 / 0.514; without context it gives 0.549
/ 0.514): standardisation with train mean and std (std
floored at :data:`STD_FLOOR`), PCA keeping :data:`PCA_VARIANCE` of the train variance,
IsolationForest with scikit-learn defaults, ridge (``alpha`` :data:`RIDGE_ALPHA`) forecasters
whose absolute error is smoothed by an EWMA with factor :data:`EWMA_ALPHA`. The ridge forecaster
uses multivariate data that is already min-max scaled (SMD) as is, as the reference did (see
:func:`ridge_scores`). ``ridge_matched`` is the same forecaster with the model's smoothing (a
trailing mean of the last few errors) instead of the EWMA: not a reference figure, a like-for-like
one (:func:`ridge_matched_scores`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # attributes only: keep importing this module free of the dataset loaders
    from stream_detector.datasets.base import Entity

#: Floor on a feature's train std: constant train columns (common on SMD) must not divide by 0.
STD_FLOOR = 1e-6
#: Fraction of the (standardised) train variance the PCA baseline keeps.
PCA_VARIANCE = 0.95
#: Ridge regularisation of the forecaster baseline (scikit-learn ``Ridge(alpha=...)``).
RIDGE_ALPHA = 1.0
#: Smoothing factor of the EWMA of the forecaster's absolute error (span 39).
EWMA_ALPHA = 0.05
#: Lags of the forecaster: multivariate data predicts all columns from the last 8 steps, NASA
#: telemetry (SMAP/MSL) predicts column 0 (the telemetry value) from the last 16 steps.
MULTIVARIATE_LAGS = 8
TELEMETRY_LAGS = 16
#: Smoothing of ``ridge_matched`` when no artifact gives one: the trainer's default.
MATCHED_SMOOTHING = 4


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


def random_scores(
    entity: Entity, seed: int = 0, *, context: np.ndarray | None = None
) -> np.ndarray:
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
    ``variance`` of the train variance (at least one, at most ``F - 1``: univariate data
    scores the squared z-score).
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
        k = min(len(var), int(np.searchsorted(cum, variance - 1e-12)) + 1)
    # Keep at least one dimension out of the projection: with every component kept (always the
    # case for univariate data) the error would be identically 0. Univariate data thus scores
    # the squared z-score.
    k = min(k, tr.shape[1] - 1)
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


def ewma(x: np.ndarray, alpha: float) -> np.ndarray:
    """Exponentially weighted moving average ``m_t = alpha x_t + (1 - alpha) m_{t-1}``,
    ``m_0 = x_0`` (``alpha = 2 / (span + 1)`` in pandas' terms)."""
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    if x.size == 0:
        return out
    a = float(alpha)
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


def is_prescaled(train: np.ndarray) -> bool:
    """Whether every train value lies in [0, 1]: data shipped min-max scaled, such as SMD."""
    x = np.asarray(train)
    return x.size > 0 and bool(np.isfinite(x).all()) and x.min() >= 0.0 and x.max() <= 1.0


def ridge_scores(
    entity: Entity,
    seed: int = 0,
    *,
    lags: int | None = None,
    ewma_alpha: float = EWMA_ALPHA,
    alpha: float = RIDGE_ALPHA,
    targets: Iterable[int] | None = None,
    scaling: str | None = None,
    context: np.ndarray | None = None,
    smoothing: int | None = None,
) -> np.ndarray:
    """Ridge forecaster: EWMA of the mean absolute one-step forecast error.

    Inputs are the last ``lags`` rows of all features; outputs are ``targets``, fitted on train
    with ``Ridge(alpha)``. Defaults: for NASA telemetry (:func:`is_telemetry`) column 0 from the
    last 16 steps, otherwise every column from the last 8 steps. The per-row mean absolute error
    over the targets is smoothed by :func:`ewma` with ``ewma_alpha``.

    ``scaling`` is ``"standard"`` (fit and error on values standardised with the train
    mean/std) or ``"raw"`` (the values as given). None picks ``"raw"`` for multivariate data
    already min-max scaled to [0, 1] (:func:`is_prescaled` and not telemetry: SMD), which is what
    the reference measured, and ``"standard"`` otherwise. On SMD ``"standard"`` gives best-F1
    0.515 / AUC-PR 0.435 instead of 0.512 / 0.472: the ridge penalty then no longer damps
    low-variance inputs, and columns constant in train that move in test dominate the mean error.
    ``context`` defaults to the last ``lags`` train rows. ``smoothing`` (k >= 1) replaces the
    EWMA by the trailing mean of the last k errors, started at test row 0 as the model's score
    is (:func:`stream_detector.scoring.smooth`).
    """
    del seed  # closed-form fit: nothing random
    from sklearn.linear_model import Ridge

    train = _f64(entity.train)
    test = _f64(entity.test)
    telemetry = is_telemetry(entity)
    if lags is None:
        lags = TELEMETRY_LAGS if telemetry else MULTIVARIATE_LAGS
    if lags < 1:
        raise ValueError(f"lags must be >= 1, got {lags}")
    cols = ([0] if telemetry else list(range(test.shape[1]))) if targets is None else list(targets)
    if len(train) <= lags:
        raise ValueError(f"{entity.name}: {len(train)} train rows, need more than lags={lags}")
    if len(test) == 0:
        return np.zeros(0)
    if scaling is None:
        scaling = "raw" if is_prescaled(train) and not telemetry else "standard"
    if scaling == "standard":
        mean, std = standardizer(train)
    elif scaling == "raw":
        mean, std = np.zeros(train.shape[1]), np.ones(train.shape[1])
    else:
        raise ValueError(f"scaling must be 'standard', 'raw' or None, got {scaling!r}")
    tr = (train - mean) / std
    te = (test - mean) / std
    ctx = tr[-lags:] if context is None else ((_f64(context) - mean) / std)[-lags:]
    # Inputs constant in train carry nothing the fit could use; scaled by the floored std they
    # would turn any test movement into a huge input, so they are left out.
    inputs = np.flatnonzero(train.std(axis=0) > STD_FLOOR)
    if inputs.size == 0:
        inputs = np.arange(train.shape[1])
    model = Ridge(alpha=alpha).fit(_lag_matrix(tr[:, inputs], lags), tr[lags:, cols])
    hist = np.concatenate([ctx.reshape(-1, te.shape[1]), te], axis=0)
    pad = lags - (len(hist) - len(te))
    if pad > 0:  # short or empty context: repeat the first test row
        hist = np.concatenate([np.repeat(te[:1], pad, axis=0), hist], axis=0)
    # ``hist`` holds exactly ``lags`` rows before test row 0: one lag window per test row.
    pred = model.predict(_lag_matrix(hist[:, inputs], lags)).reshape(len(te), len(cols))
    err = np.abs(te[:, cols] - pred).mean(axis=1)
    if smoothing is not None:
        from stream_detector.scoring import smooth

        if smoothing < 1:
            raise ValueError(f"smoothing must be >= 1, got {smoothing}")
        return smooth(err, smoothing)
    return ewma(err, ewma_alpha)


def ridge_matched_scores(entity: Entity, seed: int = 0, *, smoothing: int = MATCHED_SMOOTHING,
                         context: np.ndarray | None = None) -> np.ndarray:
    """The ridge forecaster with the model's smoothing instead of its EWMA: the trailing mean of
    the last ``smoothing`` absolute errors (``evaluate`` passes the artifact's
    ``score.smoothing``). Beside :func:`ridge_scores` it separates what the forecaster gains
    from forecasting from what it gains from averaging over about 39 rows."""
    return ridge_scores(entity, seed, context=context, smoothing=smoothing)


BaselineFn = Callable[..., np.ndarray]

#: Name -> ``fn(entity, seed=0) -> scores`` (one per test row, higher = more anomalous).
BASELINES: dict[str, BaselineFn] = {
    "random": random_scores,
    "pca": pca_scores,
    "iforest": iforest_scores,
    "ridge": ridge_scores,
    "ridge_matched": ridge_matched_scores,
}

#: Human-readable names for reports.
BASELINE_TITLES: dict[str, str] = {
    "random": "random scores",
    "pca": "PCA reconstruction error",
    "iforest": "IsolationForest",
    "ridge": "ridge forecaster, EWMA of abs error",
    "ridge_matched": "ridge forecaster, abs error smoothed as the model's score",
}

#: Baselines that take the artifact's score smoothing (``evaluate`` passes ``smoothing``).
SMOOTHED_LIKE_MODEL = frozenset({"ridge_matched"})


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
