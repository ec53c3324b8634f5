"""The score's long-term term (manifest ``score.long_term``): calibration, offline and online
scores bit for bit, what it catches, and how a rebuilt sensor's state converges."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import orjson
import pytest

from stream_detector.config import DetectorSettings
from stream_detector.detector import NEVER_EXACT, Detector, converged_after
from stream_detector.errors import ArtifactError
from stream_detector.manifest import LongTermSpec, Manifest
from stream_detector.scoring import (
    fit_long_term,
    long_term,
    long_term_gain,
    long_term_term,
    smooth,
    with_long_term,
)
from stream_detector.testing import NumpyScorer, make_manifest


def _lt_manifest(smoothing: int = 1, threshold: float = 1.0, **lt) -> Manifest:
    base = make_manifest(smoothing=smoothing, threshold=threshold,
                         per_sensor={"s0": 2.0, "s1": 0.5})
    spec = LongTermSpec(**{"alpha": 0.05, "quantile": 0.995, "start": 0.3, "level": 0.6,
                           "per_sensor": {"s0": {"start": 0.9, "level": 1.2},
                                          "s2": {"start": 0.05, "level": 0.1}}, **lt})
    return dataclasses.replace(base, score=dataclasses.replace(base.score, long_term=spec))


class ConstantScorer:
    """Every feature's two errors are ``value``: with unit scales and equal weights the raw
    window score is ``value`` (0.5 x value + 0.5 x value)."""

    def __init__(self, value: float) -> None:
        self.value = value

    def errors(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        err = np.full((len(windows), windows.shape[2]), self.value)
        return err, err.copy()


def test_long_term_is_the_ewma_of_clipped_scores_from_its_start() -> None:
    raw = np.array([0.2, 3.0, 0.4])
    got = long_term(raw, threshold=1.0, alpha=0.5, start=0.6)
    # 0.6 -> 0.4 (x 0.2) -> 0.7 (x clipped to 1.0) -> 0.55 (x 0.4)
    np.testing.assert_allclose(got, [0.4, 0.7, 0.55], rtol=1e-15)
    assert long_term_gain(2.0, 0.5, 0.25) == 8.0
    spec = LongTermSpec(0.5, 0.99, start=0.3, level=0.8)
    # L from 0.3: 0.25, 0.625, 0.5125; in score units (L - 0.3) x 1 / (0.8 - 0.3), floored at
    # 0: 0, 0.65, 0.425
    np.testing.assert_allclose(long_term_term(long_term(raw, 1.0, 0.5, 0.3), 1.0, 0.3, 0.8),
                               [0.0, 0.65, 0.425])
    short = np.array([0.1, 1.5, 0.1])
    np.testing.assert_allclose(with_long_term(short, raw, 1.0, spec, "any"), [0.1, 1.5, 0.425])
    assert with_long_term(short, raw, 1.0, None, "any") is short


def test_fit_long_term_by_hand() -> None:
    a = np.array([0.5, 3.0, 0.5, 0.5])  # clipped at 1: mean 0.625
    b = np.array([2.0, 2.0])  # too few windows for its own figures
    spec = fit_long_term({"a": a, "b": b}, {"a": 1.0, "b": 4.0}, alpha=0.5, q=0.75,
                         min_windows=3, default_threshold=0.2)
    assert spec.start == pytest.approx((0.5 + 1 + 0.5 + 0.5 + 2 + 2) / 6)  # 1.0833
    assert list(spec.per_sensor) == ["a"]
    own = spec.per_sensor["a"]
    assert own["start"] == pytest.approx(0.625)
    la = long_term(a, 1.0, 0.5, 0.625)  # 0.5625, 0.78125, 0.640625, 0.5703125
    np.testing.assert_allclose(la, [0.5625, 0.78125, 0.640625, 0.5703125])
    # the 0.75 quantile, 0.67578125, is below start + alpha x threshold = 1.125: the floor
    assert np.quantile(la, 0.75) == pytest.approx(0.67578125)
    assert own["level"] == pytest.approx(1.125)
    lb = long_term(b, 4.0, 0.5, spec.start)  # b starts at the pooled start: 1.5417, 1.7708
    pooled = np.quantile(np.concatenate([la, lb]), 0.75)  # 1.3516, above 1.0833 + 0.5 x 0.2
    assert pooled > spec.start + 0.1 and spec.level == pytest.approx(pooled)
    assert spec.for_sensor("a") == (own["start"], own["level"])
    assert spec.for_sensor("b") == spec.for_sensor("never-seen") == (spec.start, spec.level)
    # scores that never varied: the level is the floor, so the term stays finite and one
    # window cannot reach the threshold from the usual level
    flat = fit_long_term({"c": np.full(5, 0.5)}, {"c": 1.0}, alpha=0.05, q=0.75,
                         min_windows=3, default_threshold=1.0)
    assert flat.per_sensor["c"] == {"start": 0.5, "level": pytest.approx(0.55)}
    one = long_term(np.array([1e9]), 1.0, 0.05, 0.5)  # one window at the clip
    assert long_term_term(one, 1.0, 0.5, 0.55)[0] < 1.0
    with pytest.raises(ValueError, match="zero sensors"):
        fit_long_term({}, {}, 0.5, 0.5, 3, 1.0)


@pytest.mark.parametrize("k", [1, 4])
def test_online_long_term_equals_offline_bit_for_bit(k) -> None:
    """Batches of any composition: a sensor once or a few times (one vector step per rank) or
    many times (the scalar loop); sensors with their own figures and without."""
    rng = np.random.default_rng(k)
    manifest = _lt_manifest(smoothing=k)
    det = Detector(manifest, NumpyScorer())
    names = ["s0", "s1", "s2", "s3"]
    det._init_slots(det._store.append_many(names, [1] * 4, np.zeros((4, 3))).new)
    owners = np.concatenate([rng.integers(0, 4, 300), np.zeros(40, dtype=int),
                             rng.integers(0, 4, 60)])
    raw = rng.exponential(size=len(owners))
    slots = np.array([det._store.slot(names[o]) for o in owners])
    cuts = [0, 1, 5, 50, 300, 340, 341, 400]
    outs = [det._scores(raw[a:b], slots[a:b], det._thr[slots[a:b]])
            for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    assert max(np.bincount(owners[300:340])) > 8 and max(np.bincount(owners[1:5])) <= 8
    online = np.concatenate([o[0] for o in outs])
    terms = np.concatenate([o[2] for o in outs])
    spec = manifest.score.long_term
    for o, name in enumerate(names):
        mine = owners == o
        thr = manifest.thresholds.for_sensor(name)
        start, level = spec.for_sensor(name)
        r = raw[mine]
        np.testing.assert_array_equal(terms[mine], long_term_term(long_term(r, thr, 0.05, start),
                                                                  thr, start, level))
        np.testing.assert_array_equal(online[mine],
                                      with_long_term(smooth(r, k), r, thr, spec, name))
    assert (terms == online).any() and (terms < online).any()  # both terms drive somewhere


def test_a_sustained_moderate_error_opens_an_episode_only_with_the_long_term_term() -> None:
    """Every window scores 0.8 of the threshold: the short-term score never alerts. The
    long-term level climbs from its start 0.1 towards 0.8 and, in score units ((L - 0.1) x 1 /
    (0.5 - 0.1)), reaches the threshold when it passes 0.5: L_n = 0.8 - 0.7 x 0.95^n >= 0.5
    from n = 17."""
    spec = LongTermSpec(0.05, 0.995, start=0.1, level=0.5)
    base = make_manifest(window=4)
    with_lt = dataclasses.replace(base, score=dataclasses.replace(base.score, long_term=spec))
    n_open = math.ceil(math.log(0.3 / 0.7) / math.log(0.95))
    assert n_open == 17
    for manifest, expect in ((with_lt, n_open), (base, None)):
        det = Detector(manifest, ConstantScorer(0.8), DetectorSettings(max_batch=7))
        ts = np.arange(40) * 1000
        det.submit_many(["m"] * 40, ts, np.zeros((40, 3)))
        results = det.flush()
        assert len(results) == 37
        opened = [j for j, r in enumerate(results) if r.alert is not None]
        if expect is None:
            assert opened == [] and max(r.score.score for r in results) == pytest.approx(0.8)
            continue
        assert opened == [expect - 1]
        alert = results[expect - 1].alert
        assert alert.event == "open" and alert.score == alert.long_term_score
        assert alert.score == pytest.approx((0.8 - 0.7 * 0.95 ** n_open - 0.1) / 0.4)
        assert orjson.loads(alert.to_json())["long_term_score"] == alert.long_term_score


def test_converged_after_by_hand() -> None:
    # |difference| <= max(start, thr) x gain x 0.95^n <= 1e-4 x thr: n >= ln(5e-5) / ln(0.95)
    assert converged_after(0.05, 0.1, 1.0, 2.0, 1e-4) == math.ceil(
        math.log(5e-5) / math.log(0.95)) == 194
    assert converged_after(0.05, 3.0, 1.0, 2.0, 1e-4) == math.ceil(
        math.log(1e-4 / 6.0) / math.log(0.95))  # a start above the threshold
    assert converged_after(1.0, 0.1, 1.0, 2.0, 1e-4) == 1
    assert converged_after(0.05, 0.1, 1.0, 1e-5, 1e-4) == 0
    # a tolerance below what rounding allows (0), or an alpha too small to count: never
    assert converged_after(0.05, 0.1, 1.0, 2.0, 0.0) == NEVER_EXACT
    assert converged_after(1e-30, 0.1, 1.0, 2.0, 1e-4) == NEVER_EXACT


def test_a_later_start_converges_to_the_uninterrupted_scores_within_the_tolerance() -> None:
    """Two detectors on one stream, one from its first reading and one from reading 300 on
    (a rebuild that reached only that far): the later one is inexact until its long-term level
    has forgotten its start (converged_after windows) and then clear_after calm windows more;
    from its first window on its scores approach the other's, within tolerance x threshold
    once converged."""
    rng = np.random.default_rng(5)
    manifest = _lt_manifest(smoothing=4)
    tol = 1e-4
    settings = DetectorSettings(max_batch=64, long_term_tolerance=tol, clear_after=3)
    values = rng.normal(size=(1200, 3)) * 0.3
    values[100:160] += 3.0  # an episode in the history only the first detector sees
    ts = np.arange(len(values)) * 1000

    def run(first: int) -> tuple[Detector, np.ndarray, list[bool]]:
        det = Detector(manifest, NumpyScorer(), settings)
        scores, inexact = [], []
        for i in range(first, len(values)):
            det.submit_many(["s1"], ts[i : i + 1], values[i : i + 1])
            scores += [r.score.score for r in det.flush()]
            inexact.append(bool(det.inexact(["s1"])))
        return det, np.array(scores), inexact

    _, full, _ = run(0)
    det, late, inexact = run(300)
    thr = manifest.thresholds.for_sensor("s1")
    start, level = manifest.score.long_term.for_sensor("s1")
    need = converged_after(0.05, start, thr, long_term_gain(thr, level, start), tol)
    assert need > 4
    w = manifest.window
    ahead = full[len(full) - len(late):]  # the same windows, scored by the first detector
    diff = np.abs(late - ahead)
    assert diff[0] > tol * thr  # the starts differ
    assert diff[need - 1:].max() <= tol * thr
    # inexact from the first window until need + clear_after - 1 windows (all calm here)
    first_window = w - 1
    assert not any(inexact[:first_window])
    exact_from = first_window + need + settings.clear_after - 2
    assert all(inexact[first_window:exact_from]) and not any(inexact[exact_from:])


def _manifest_json(**long_term) -> dict:
    raw = orjson.loads(_lt_manifest().to_json())
    raw["score"]["long_term"].update(long_term)
    return raw


def test_manifest_round_trip_and_refusals() -> None:
    m = _lt_manifest()
    again = Manifest.from_dict(orjson.loads(m.to_json()))
    assert again.score.long_term == m.score.long_term
    again.validate()
    older = dataclasses.replace(m, schema_version=3)
    with pytest.raises(ArtifactError, match="long_term needs schema_version 4"):
        older.validate()
    cases = [
        ({"alpha": 0.0}, r"long_term.alpha must be in \(0, 1\]"),
        ({"alpha": 1.5}, r"long_term.alpha must be in \(0, 1\]"),
        ({"quantile": 1.0}, r"long_term.quantile must be in \(0, 1\)"),
        ({"start": -1.0}, "long_term.start must be finite and >= 0, got -1.0"),
        ({"level": 0.3}, r"long_term.level must be finite and above score.long_term.start"),
        ({"level": float("nan")}, "long_term.level must be finite and above"),
        ({"per_sensor": {"x": {"start": 0.1, "level": 0.05}}},
         r"long_term.per_sensor\['x'\].level must be finite and above"),
        ({"per_sensor": {"x": {"start": 0.1}}}, r"long_term.per_sensor\['x'\] has no 'level'"),
        ({"level": "high"}, "long_term.level must be a number"),
        ({"beta": 1}, r"long_term has unknown fields \['beta'\]"),
        ({"per_sensor": {"x": {"start": 0.1, "level": 0.5, "lvl": 2}}},
         r"long_term.per_sensor\['x'\] has unknown fields \['lvl'\]"),
        ({"start": float("inf")}, r"long_term.start must be finite and >= 0, got inf"),
    ]
    for change, message in cases:
        with pytest.raises(ArtifactError, match=message):
            Manifest.from_dict(_manifest_json(**change)).validate()
    raw = _manifest_json()
    del raw["score"]["long_term"]["level"]
    with pytest.raises(ArtifactError, match="long_term has no 'level'"):
        Manifest.from_dict(raw)
    raw["score"]["long_term"] = None  # no long-term term
    plain = Manifest.from_dict(raw)
    assert plain.score.long_term is None
    # written without the key, and without empty per-sensor scalers: builds that predate
    # them read such an artifact (they refuse unknown fields)
    out = orjson.loads(plain.to_json())
    assert "long_term" not in out["score"] and "scaler_per_sensor" not in out
    assert Manifest.from_dict(out) == plain
    assert "long_term" in orjson.loads(m.to_json())["score"]


def test_replay_parity_leaves_out_the_carried_over_rows_of_a_known_sensor() -> None:
    from stream_detector.replay import _carried_over

    manifest = _lt_manifest(smoothing=4)
    thr = manifest.thresholds.for_sensor("s1")
    start, level = manifest.score.long_term.for_sensor("s1")
    expect = converged_after(0.05, start, thr, long_term_gain(thr, level, start), 1e-4 / thr)
    assert _carried_over(manifest, "s1", 1e-4) == expect > 3
    assert _carried_over(manifest, "s1", 0.0) == NEVER_EXACT  # every row left out
    plain = dataclasses.replace(manifest, score=dataclasses.replace(manifest.score,
                                                                    long_term=None))
    assert _carried_over(plain, "s1", 0.0) == 3  # smoothing 4: k - 1 rows
