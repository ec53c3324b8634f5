"""Baselines on tiny synthetic entities, and the plots (written, valid PNG)."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import numpy as np
import pytest

from stream_detector.baselines import (
    BASELINES,
    ewma,
    is_telemetry,
    pca_scores,
    random_scores,
    ridge_scores,
    run_baselines,
)
from stream_detector.datasets.base import Entity
from stream_detector.plots import plot_bars, plot_entity

SPIKE_ROW = 150


def _entity(spike: bool = True, telemetry: bool = False) -> Entity:
    """Three correlated sinusoids plus a constant column; one spike in test on feature 1."""
    rng = np.random.default_rng(0)

    def make(n: int, t0: int) -> np.ndarray:
        t = np.arange(t0, t0 + n) / 10.0
        base = np.sin(t)
        cols = [
            base + 0.02 * rng.normal(size=n),
            0.5 * base + 0.02 * rng.normal(size=n),
            np.cos(t) + 0.02 * rng.normal(size=n),
            np.zeros(n),  # constant in train: the std floor must cope
        ]
        return np.stack(cols, axis=1).astype(np.float32)

    train = make(600, 0)
    test = make(300, 600)
    labels = np.zeros(300, dtype=np.int8)
    if spike:
        test[SPIKE_ROW, 1] += 3.0
        labels[SPIKE_ROW] = 1
    if telemetry:
        test[SPIKE_ROW, 0] += 3.0
        features: tuple[str, ...] = ("value", "cmd_1", "cmd_2", "cmd_3")
    else:
        features = ("a", "b", "c", "d")
    return Entity("synthetic-0", train, test, labels, features)


def test_registry_shapes_and_finite() -> None:
    e = _entity()
    assert set(BASELINES) == {"random", "pca", "iforest", "ridge", "ridge_matched"}
    out = run_baselines(e, seed=0)
    assert list(out) == list(BASELINES)
    for name, s in out.items():
        assert s.shape == (len(e.test),), name
        assert np.isfinite(s).all(), name
    with pytest.raises(KeyError):
        run_baselines(e, ["nope"])


def test_functions_never_take_labels() -> None:
    for name, fn in BASELINES.items():
        params = inspect.signature(fn).parameters
        assert not any("label" in p for p in params), name
        assert list(params)[:2] == ["entity", "seed"], name
    # and their output does not change with the labels
    e = _entity()
    other = dataclasses.replace(e, labels=1 - e.labels)
    for name, fn in BASELINES.items():
        np.testing.assert_array_equal(fn(e, 3), fn(other, 3), err_msg=name)


def test_deterministic_per_seed() -> None:
    e = _entity()
    np.testing.assert_array_equal(random_scores(e, 1), random_scores(e, 1))
    assert not np.array_equal(random_scores(e, 1), random_scores(e, 2))
    for name in ("pca", "iforest", "ridge", "ridge_matched"):
        np.testing.assert_array_equal(BASELINES[name](e, 7), BASELINES[name](e, 7), err_msg=name)


def test_ridge_matched_is_the_trailing_mean_of_the_ridge_errors() -> None:
    """The like-for-like ridge: the same per-row errors as the reference ridge, averaged over
    the last k rows (fewer at the start, as the model's score) instead of the EWMA."""
    from stream_detector.baselines import ridge_matched_scores

    e = _entity()
    err = ridge_scores(e, ewma_alpha=1.0)  # an EWMA with factor 1 is the errors themselves
    np.testing.assert_allclose(ridge_matched_scores(e, smoothing=1), err, rtol=1e-12)
    s = ridge_matched_scores(e, smoothing=3)
    assert s[0] == pytest.approx(err[0])
    assert s[1] == pytest.approx((err[0] + err[1]) / 2)
    assert s[7] == pytest.approx(err[5:8].mean())
    # default k is the trainer's default smoothing; it differs from the EWMA reference
    np.testing.assert_allclose(ridge_matched_scores(e), ridge_matched_scores(e, smoothing=4))
    assert not np.allclose(ridge_matched_scores(e), ridge_scores(e))
    with pytest.raises(ValueError, match="smoothing"):
        ridge_matched_scores(e, smoothing=0)


def test_spike_ranks_top_for_pca() -> None:
    s = pca_scores(_entity())
    assert int(np.argmax(s)) == SPIKE_ROW


def test_spike_ranks_top_for_iforest() -> None:
    for seed in (0, 3):
        assert int(np.argmax(BASELINES["iforest"](_entity(), seed))) == SPIKE_ROW


def test_spike_ranks_top_for_ridge() -> None:
    s = ridge_scores(_entity())
    # The EWMA keeps the spike's error for a few rows (the spike is in the next lag windows).
    assert SPIKE_ROW <= int(np.argmax(s)) <= SPIKE_ROW + 8
    assert s[SPIKE_ROW] > s[:SPIKE_ROW].max()


def test_ridge_telemetry_mode() -> None:
    e = _entity(telemetry=True)
    assert is_telemetry(e) and not is_telemetry(_entity())
    s = ridge_scores(e)
    assert s.shape == (len(e.test),)
    assert SPIKE_ROW <= int(np.argmax(s)) <= SPIKE_ROW + 16
    # a spike in a command flag only: the telemetry forecaster (value column) does not see it,
    # the all-columns forecaster of the same rows does
    test = e.test.copy()
    test[SPIKE_ROW, 0] -= 3.0
    flag_only = dataclasses.replace(e, test=test)
    window = slice(SPIKE_ROW, SPIKE_ROW + 16)

    def stands_out(scores: np.ndarray) -> bool:
        rest = np.delete(scores, np.arange(window.start, window.stop))
        return bool(scores[window].max() > rest.max())

    assert not stands_out(ridge_scores(flag_only))
    assert stands_out(ridge_scores(dataclasses.replace(flag_only, features=("a", "b", "c", "d"))))


def test_ridge_context() -> None:
    e = _entity()
    default = ridge_scores(e)
    np.testing.assert_allclose(ridge_scores(e, context=e.train[-8:]), default)
    np.testing.assert_allclose(ridge_scores(e, context=e.train), default)
    # no history: still one finite score per row
    s = ridge_scores(e, context=np.zeros((0, 4), dtype=np.float32))
    assert s.shape == (len(e.test),) and np.isfinite(s).all()
    # a chunk scored with the preceding rows as context equals the same rows of the full run
    chunk = dataclasses.replace(e, test=e.test[100:], labels=e.labels[100:])
    part = ridge_scores(chunk, context=e.test[:100], ewma_alpha=1.0)
    np.testing.assert_allclose(part, ridge_scores(e, ewma_alpha=1.0)[100:])
    # the point-wise baselines accept a context and ignore it
    np.testing.assert_array_equal(pca_scores(e, context=e.train[-5:]), pca_scores(e))


def test_pca_all_constant_train() -> None:
    e = _entity()
    flat = dataclasses.replace(e, train=np.ones_like(e.train))
    s = pca_scores(flat)
    assert s.shape == (len(e.test),) and np.isfinite(s).all()


def test_ewma() -> None:
    np.testing.assert_allclose(ewma(np.array([1.0, 0.0, 0.0]), 0.5), [1.0, 0.5, 0.25])
    np.testing.assert_allclose(ewma(np.array([2.0, 4.0]), 1.0), [2.0, 4.0])
    assert ewma(np.zeros(0), 0.1).shape == (0,)
    with pytest.raises(ValueError):
        ewma(np.ones(3), 0.0)


def _is_png(path: Path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_entity_writes_png(tmp_path: Path) -> None:
    e = _entity()
    scores = ridge_scores(e)
    base = {"pca": pca_scores(e), "random": random_scores(e, 0)}
    out = plot_entity(
        tmp_path / "sub" / "entity.png",
        e.name,
        scores,
        e.labels,
        threshold=float(np.quantile(scores, 0.99)),
        signal=e.test,
        feature_names=e.features,
        alerts=[(SPIKE_ROW, SPIKE_ROW + 5), 20],
        baselines=base,
        title="synthetic",
    )
    assert out == tmp_path / "sub" / "entity.png"
    assert _is_png(out)
    # minimal form: no signal, no baselines, no threshold
    assert _is_png(plot_entity(tmp_path / "min.png", "x", scores, None, None))


def test_plot_bars_writes_png(tmp_path: Path) -> None:
    rows = [
        {"dataset": d, "method": m, "best_f1": v}
        for d, vals in {"SMD": (0.08, 0.40, 0.51), "SMAP": (0.2, 0.34, float("nan"))}.items()
        for m, v in zip(("random", "pca", "ridge"), vals, strict=True)
    ]
    out = plot_bars(tmp_path / "bars.png", rows, "best_f1", "best F1 without point adjustment")
    assert _is_png(out)


def test_ridge_scaling_choice() -> None:
    e = _entity()
    # data in [0, 1] (like SMD) is used raw by default; other data standardised
    lo, hi = e.train.min(), e.train.max()
    scaled = dataclasses.replace(
        e, train=(e.train - lo) / (hi - lo), test=(e.test - lo) / (hi - lo)
    )
    np.testing.assert_allclose(ridge_scores(scaled), ridge_scores(scaled, scaling="raw"))
    np.testing.assert_allclose(ridge_scores(e), ridge_scores(e, scaling="standard"))
    with pytest.raises(ValueError):
        ridge_scores(e, scaling="minmax")


def test_pca_univariate_is_squared_zscore() -> None:
    e = _entity()
    uni = dataclasses.replace(e, train=e.train[:, :1], test=e.test[:, :1], features=("a",))
    z = (e.test[:, 0].astype(np.float64) - e.train[:, 0].mean()) / e.train[:, 0].std()
    np.testing.assert_allclose(pca_scores(uni), z**2, rtol=1e-5)


def test_plot_entity_scale_shows_the_threshold(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores 100 times the threshold on 5 % of the rows (long anomalies: no axis cut applies)
    left the threshold on the bottom line of a linear axis; it is shown on a symmetric-log axis,
    linear up to the threshold. Ordinary scores keep the linear axis."""
    import stream_detector.plots as plots

    scales: list[str] = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (
        scales.append(fig.axes[-1].get_yscale()), real_save(fig, path))[1])
    rng = np.random.default_rng(0)
    scores = rng.uniform(0.5, 1.5, 2000)
    labels = np.zeros(2000, dtype=np.int8)
    labels[500:600] = 1
    assert _is_png(plot_entity(tmp_path / "calm.png", "x", scores, labels, 2.0))
    scores[500:600] = 200.0
    assert _is_png(plot_entity(tmp_path / "wide.png", "x", scores, labels, 2.0))
    assert scales == ["linear", "symlog"]
    scores[550] = np.inf  # an infinite score: plotted (no log axis to infinity), not a crash
    assert _is_png(plot_entity(tmp_path / "inf.png", "x", scores, labels, 2.0))
