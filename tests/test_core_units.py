"""Unit tests for the pure streaming core: ring buffers, micro-batcher, scoring, hysteresis."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stream_detector.batching import MicroBatcher
from stream_detector.config import DetectorSettings
from stream_detector.detector import Detector
from stream_detector.manifest import ScoreSpec
from stream_detector.records import Reading
from stream_detector.scoring import (
    EpisodeTracker,
    EventKind,
    Hysteresis,
    Level,
    ScoreFunction,
    fit_threshold,
    smooth,
)
from stream_detector.testing import FakeClock, NumpyScorer, make_manifest
from stream_detector.windows import Status, WindowStore


def test_ring_buffer_warms_up_then_yields_latest_window() -> None:
    store = WindowStore(window=4, n_features=2, initial=1)
    statuses = []
    for t in range(10):
        status, win, start = store.append("s", t, np.array([t, -t], np.float32))
        statuses.append(status)
        if status is Status.READY:
            np.testing.assert_array_equal(win[:, 0], np.arange(t - 3, t + 1))
            assert start == t - 3
    assert statuses[:3] == [Status.WARMING] * 3
    assert all(s is Status.READY for s in statuses[3:])


def test_ring_buffer_many_sensors_grow_and_are_independent() -> None:
    store = WindowStore(window=3, n_features=1, initial=2)
    for t in range(5):
        for s in range(50):
            store.append(f"s{s}", t, np.array([s * 100 + t], np.float32))
    assert len(store) == 50
    _, win, _ = store.append("s7", 5, np.array([705], np.float32))
    np.testing.assert_array_equal(win[:, 0], [703, 704, 705])


def test_ring_buffer_rejects_late_and_duplicate_and_caps_sensors() -> None:
    store = WindowStore(window=3, n_features=1, max_sensors=2)
    assert store.append("a", 10, np.zeros(1))[0] is Status.WARMING
    assert store.append("a", 10, np.zeros(1))[0] is Status.LATE
    assert store.append("a", 9, np.zeros(1))[0] is Status.LATE
    store.append("b", 1, np.zeros(1))
    assert store.append("c", 1, np.zeros(1))[0] is Status.FULL
    store.remove("a")
    assert store.append("c", 1, np.zeros(1))[0] is Status.WARMING


def _messy_stream(seed: int, n: int = 3000, sensors: int = 9):
    """Readings of several sensors, interleaved at random, with late and duplicate ones
    (timestamps stay >= 0, as the decoder guarantees)."""
    rng = np.random.default_rng(seed)
    last = [5] * sensors
    out = []
    for _ in range(n):
        s = int(rng.integers(sensors)) if rng.random() < 0.8 else 0  # runs of one sensor too
        if rng.random() < 0.06:
            ts = last[s] - int(rng.integers(0, 3))  # late or duplicate
        else:
            ts = last[s] = last[s] + int(rng.integers(1, 4))
        v = rng.normal(0, 0.1, 3).astype(np.float32)
        if rng.random() < 0.01:
            v[int(rng.integers(3))] += float(rng.choice([5.0, 30.0]))
        out.append((f"s{s}", ts, v))
    return out


@pytest.mark.parametrize("seed", range(3))
def test_ring_buffer_batches_match_a_plain_reference(seed) -> None:
    """append_many over random batch splits against the documented policy written plainly:
    per sensor a list of accepted readings; LATE unless ts is after the last accepted one;
    FULL for a new sensor beyond max_sensors; a window once there are W readings."""
    w, cap = 4, 7
    stream = _messy_stream(seed)
    store = WindowStore(window=w, n_features=3, max_sensors=cap, initial=2)
    ref: dict[str, list] = {}
    rng = np.random.default_rng(seed + 100)
    i = 0
    while i < len(stream):
        part = stream[i : i + int(rng.integers(1, 80))]
        i += len(part)
        if rng.random() < 0.1 and ref:  # a revoked sensor frees its slot
            gone = sorted(ref)[int(rng.integers(len(ref)))]
            store.remove(gone)
            del ref[gone]
        out = store.append_many([p[0] for p in part], [p[1] for p in part],
                                np.stack([p[2] for p in part]))
        want_status, want_windows, want_start = [], [], []
        for sensor, ts, v in part:
            rows = ref.get(sensor)
            if rows is None:
                if len(ref) >= cap:
                    want_status.append(3)
                    continue
                rows = ref[sensor] = []
            if rows and ts <= rows[-1][0]:
                want_status.append(2)
                continue
            rows.append((ts, v))
            if len(rows) >= w:
                want_status.append(1)
                want_windows.append(np.stack([r[1] for r in rows[-w:]]))
                want_start.append(rows[-w][0])
            else:
                want_status.append(0)
        assert out.status.tolist() == want_status
        assert out.ready.tolist() == [k for k, x in enumerate(want_status) if x == 1]
        np.testing.assert_array_equal(out.windows, np.reshape(want_windows, (-1, w, 3)))
        assert out.start_ms.tolist() == want_start
    assert sorted(store.sensors()) == sorted(ref)
    assert all(store.count(s) == len(rows) for s, rows in ref.items())


@pytest.mark.parametrize("smoothing", [1, 4, 9])
def test_detector_results_do_not_depend_on_how_readings_are_batched(smoothing) -> None:
    """Submitting a messy stream one reading at a time or in batches of any size (what the
    consumer does) gives the same statuses, scores, levels and alerts, in the same order."""

    def run(chunk: int):
        clock = FakeClock()
        manifest = make_manifest(window=5, threshold=0.5, smoothing=smoothing,
                                 per_sensor={"s3": 0.2})
        det = Detector(manifest, NumpyScorer(),
                       DetectorSettings(max_batch=16, max_wait_ms=50, clear_after=2,
                                        max_sensors=7),
                       clock=clock, wall_clock_ms=lambda: 7)
        stream = _messy_stream(5)
        statuses, results = [], []
        cuts = [(a, min(a + chunk, seg + 600)) for seg in range(0, len(stream), 600)
                for a in range(seg, seg + 600, chunk)]
        for i, end in cuts:
            part = stream[i:end]
            if i and i % 600 == 0:  # a revocation: flush, then forget two sensors
                results += det.flush()
                det.forget(["s1", "s2"])
            codes = det.submit_many([p[0] for p in part], [p[1] for p in part],
                                    np.stack([p[2] for p in part]),
                                    list(range(i, i + len(part))))
            statuses += codes.tolist()
            clock.advance(0.01)
            results += det.poll()
        results += det.flush()
        rows = [(r.ref, r.reading_ts_ms, r.score, r.alert) for r in results]
        return statuses, rows

    one = run(1)
    assert len(one[1]) > 1000 and sum(r[3] is not None for r in one[1]) > 10
    assert set(one[0]) == {0, 1, 2, 3}  # warming, ready, late and full all happen
    for chunk in (3, 50, 1000):
        got = run(chunk)
        assert got[0] == one[0]
        assert got[1] == one[1]


def test_batcher_flushes_on_size() -> None:
    clock = FakeClock()
    b = MicroBatcher(max_batch=3, max_wait_s=1.0, window=2, n_features=1, clock=clock)
    assert b.add(np.zeros((2, 1)), 1) is None
    assert b.add(np.ones((2, 1)), 2) is None
    batch = b.add(np.full((2, 1), 2.0), 3)
    assert batch is not None and batch.items == (1, 2, 3)
    assert batch.windows[:, 0, 0].tolist() == [0.0, 1.0, 2.0]
    assert len(b) == 0


def test_batcher_flushes_on_deadline_with_fake_clock() -> None:
    clock = FakeClock(100.0)
    b = MicroBatcher(max_batch=10, max_wait_s=0.02, window=2, n_features=1, clock=clock)
    b.add(np.zeros((2, 1)), "x")
    assert b.poll() is None
    clock.advance(0.019)
    assert b.poll() is None
    clock.advance(0.002)
    batch = b.poll()
    assert batch is not None and batch.items == ("x",)
    assert b.deadline() is None


def test_batches_are_immutable_snapshots() -> None:
    clock = FakeClock()
    b = MicroBatcher(max_batch=1, max_wait_s=1.0, window=2, n_features=1, clock=clock)
    w = np.zeros((2, 1), np.float32)
    first = b.add(w, 1)
    w[:] = 5.0
    second = b.add(w, 2)
    assert first is not None and second is not None
    assert first.windows.max() == 0.0 and second.windows.max() == 5.0


def test_score_function_weighted_sum_and_contributions() -> None:
    spec = ScoreSpec(0.25, 0.75, (1.0, 2.0), (4.0, 1.0))
    out = ScoreFunction(spec)(np.array([[2.0, 4.0]]), np.array([[4.0, 3.0]]))
    rec = (2.0 / 1 + 4.0 / 2) / 2
    fc = (4.0 / 4 + 3.0 / 1) / 2
    assert out.reconstruction[0] == pytest.approx(rec)
    assert out.forecast[0] == pytest.approx(fc)
    assert out.score[0] == pytest.approx(0.25 * rec + 0.75 * fc)
    assert out.contributions.sum() == pytest.approx(out.score[0])


def test_score_function_per_sensor_scales_and_feature_weights() -> None:
    spec = ScoreSpec(
        0.5, 0.5, (1.0, 1.0), (1.0, 1.0),
        per_sensor={"a": {"rec": (2.0, 4.0), "fc": (1.0, 0.5)}},
        feature_weights=(3.0, 1.0),
    )
    fn = ScoreFunction(spec)
    assert fn.row("a") == 1 and fn.row("never-trained") == 0
    rec, fc = np.array([[2.0, 4.0], [2.0, 4.0]]), np.array([[1.0, 1.0], [1.0, 1.0]])
    out = fn(rec, fc, [fn.row("a"), fn.row("never-trained")])
    # sensor a: its own scales; weights 3:1 -> 0.75 / 0.25
    rec_a = 0.75 * (2.0 / 2.0) + 0.25 * (4.0 / 4.0)
    fc_a = 0.75 * (1.0 / 1.0) + 0.25 * (1.0 / 0.5)
    assert out.reconstruction[0] == pytest.approx(rec_a)
    assert out.forecast[0] == pytest.approx(fc_a)
    assert out.score[0] == pytest.approx(0.5 * rec_a + 0.5 * fc_a)
    # an unseen sensor: the global scales
    assert out.reconstruction[1] == pytest.approx(0.75 * 2.0 + 0.25 * 4.0)
    np.testing.assert_allclose(out.contributions.sum(axis=1), out.score)
    # without rows every window gets the global scales
    np.testing.assert_allclose(fn(rec, fc).score, out.score[[1, 1]])
    # one row for the whole batch (offline scoring of one sensor) = that row per window
    np.testing.assert_array_equal(fn(rec, fc, fn.row("a")).score, fn(rec, fc, [1, 1]).score)


def test_zero_weight_feature_never_moves_the_score() -> None:
    spec = ScoreSpec(0.5, 0.5, (1.0, 1.0), (1.0, 1.0), feature_weights=(1.0, 0.0))
    fn = ScoreFunction(spec)
    quiet = fn(np.array([[1.0, 0.0]]), np.array([[1.0, 0.0]]))
    loud = fn(np.array([[1.0, 1e6]]), np.array([[1.0, 1e6]]))
    assert loud.score[0] == quiet.score[0] == pytest.approx(1.0)
    assert loud.contributions[0, 1] == 0.0


@pytest.mark.parametrize("k", [1, 4, 9])
def test_online_smoothing_equals_offline_smooth_per_sensor(k) -> None:
    """The detector smooths a batch of windows of many sensors at once (in batches of any
    composition); per sensor that must be the offline trailing mean of its raw scores."""
    rng = np.random.default_rng(k)
    det = Detector(make_manifest(smoothing=k), NumpyScorer())
    owners = rng.integers(0, 5, 400)
    raw = rng.random(400)
    names = [f"s{o}" for o in range(5)]
    det._init_slots(det._store.append_many(names, [1] * 5, np.zeros((5, 3))).new)
    slots = np.array([det._store.slot(names[o]) for o in owners])
    online = np.concatenate([det._scores(raw[a:b], slots[a:b], det._thr[slots[a:b]])[0]
                             for a, b in zip([0, 1, 40, 41, 300], [1, 40, 41, 300, 400],
                                             strict=True)])
    for o in range(5):
        mine = owners == o
        # exactly: both sum each window oldest to newest (the ring was summed in ring order)
        np.testing.assert_array_equal(online[mine], smooth(raw[mine], k))


def test_offline_smooth_keeps_equal_scores_equal_as_online() -> None:
    """Long constant stretches (SMAP channels: 70-80 % of the rows) must stay exact ties after
    smoothing, offline as online: the running-sum form made them differ by ~1e-13, and best-F1,
    AUC-PR and PA-F1 (which treat equal floats as ties) then differed between evaluate and
    replay (D-2: best-F1 0.798 against 0.793)."""
    rng = np.random.default_rng(3)
    raw = np.concatenate([rng.random(300) * 1e3, np.full(500, 0.1)])
    det = Detector(make_manifest(smoothing=4), NumpyScorer())
    det._init_slots(det._store.append_many(["s"], [1], np.zeros((1, 3))).new)
    sl = np.zeros(raw.size, dtype=np.intp) + det._store.slot("s")
    online = det._scores(raw, sl, det._thr[sl])[0]
    offline = smooth(raw, 4)
    assert np.unique(offline[303:]).size == 1 and offline[-1] == pytest.approx(0.1)
    np.testing.assert_array_equal(offline[303:], online[303:])
    np.testing.assert_allclose(offline, online, rtol=1e-12)
    np.testing.assert_allclose(smooth(raw[:2], 4), [raw[0], raw[:2].mean()])


def test_fit_threshold_quantile_and_pot_above_bulk() -> None:
    s = np.random.default_rng(1).exponential(size=20_000)
    q = fit_threshold(s, "quantile", 0.99)
    assert q == pytest.approx(np.quantile(s, 0.99))
    pot = fit_threshold(s, "pot", 0.999)
    assert np.quantile(s, 0.99) < pot < s.max() * 2
    # far in the tail the fitted Pareto extrapolates beyond the sample, as an exponential does:
    # the 1 - 1e-5 quantile of Exp(1) is ln(1e5) = 11.5, while the sample's maximum is 9.9
    far = fit_threshold(s, "pot", 0.99999)
    assert far > s.max() and far == pytest.approx(np.log(1e5), rel=0.1)
    with pytest.raises(ValueError, match="unknown threshold method"):
        fit_threshold(s, "magic")


def test_hysteresis_one_open_one_resolve_per_episode() -> None:
    h = Hysteresis(warning_ratio=1.0, critical_ratio=2.0, clear_ratio=0.8, clear_after=3,
                   update_interval_ms=1000)
    tr = EpisodeTracker()
    scores = [0.1, 1.2, 0.9, 1.1, 0.95, 0.5, 0.5, 0.5, 0.2, 1.5]
    events = [tr.step(i * 10, s, 1.0, h) for i, s in enumerate(scores)]
    kinds = [(i, e.kind) for i, e in enumerate(events) if e is not None]
    # flapping around the threshold (0.9, 1.1, 0.95 stay above clear_ratio) gives no new alert
    assert kinds == [(1, EventKind.OPEN), (7, EventKind.RESOLVE), (9, EventKind.OPEN)]


def test_hysteresis_escalation_and_rate_limited_updates() -> None:
    h = Hysteresis(1.0, 2.0, 0.8, 2, update_interval_ms=100)
    tr = EpisodeTracker()
    e = tr.step(0, 1.5, 1.0, h)
    assert e is not None and e.level is Level.WARNING
    e = tr.step(10, 2.5, 1.0, h)
    assert e is not None and e.kind is EventKind.UPDATE and e.level is Level.CRITICAL
    assert tr.step(20, 3.0, 1.0, h) is None  # peak rose, but within the update interval
    e = tr.step(120, 2.9, 1.0, h)
    assert e is not None and e.kind is EventKind.UPDATE and e.peak_score == 3.0
    assert tr.step(130, 2.9, 1.0, h) is None


def _detector(max_batch: int = 4, window: int = 5, **kw: object) -> tuple[Detector, FakeClock]:
    clock = FakeClock()
    settings = DetectorSettings(max_batch=max_batch, max_wait_ms=50, clear_after=2, **kw)
    det = Detector(make_manifest(window=window, threshold=1.0), NumpyScorer(), settings,
                   clock=clock, wall_clock_ms=lambda: 0)
    return det, clock


def test_detector_micro_batches_across_sensors_and_keeps_order() -> None:
    det, clock = _detector(max_batch=4, window=3)
    results = []
    for t in range(6):
        for s in ("a", "b", "c"):
            det.submit(Reading(s, t, np.full(3, t, np.float32), ref=(s, t)))
        results += det.poll()
    results += det.flush()
    assert det._scorer.calls[:3] == [4, 4, 4]  # type: ignore[attr-defined]
    assert [r.ref for r in results] == [(s, t) for t in range(2, 6) for s in ("a", "b", "c")]


def test_detector_raises_one_alert_per_spike_episode_naming_the_feature() -> None:
    det, clock = _detector(max_batch=1, window=5)
    rng = np.random.default_rng(0)
    alerts = []
    for t in range(60):
        v = rng.normal(0, 0.01, 3).astype(np.float32)
        if 30 <= t < 33:
            v[1] += 20.0
        det.submit(Reading("s", t, v))
        alerts += [r.alert for r in det.poll() if r.alert is not None]
    assert [a.event for a in alerts] == ["open", "resolve"]
    opened = alerts[0]
    assert opened.top_features[0][0] == "b"
    assert opened.window_end_ms == 30 and opened.level == "critical"
    assert opened.alert_id == alerts[1].alert_id
    # only the episode's windows, open to resolve, went through the tracker
    assert det.counters["tracked"] == alerts[1].window_end_ms - opened.window_end_ms + 1
    assert det.counters["tracked"] < det.counters["windows"]


def test_alerts_name_only_features_that_contribute() -> None:
    """SMAP/MSL artifacts score only the telemetry value (the command flags have weight 0): an
    alert must not fill ``top_features`` with flags that contribute nothing."""
    base = make_manifest(features=("value", "cmd1", "cmd2", "cmd3"), window=5, threshold=1.0)
    manifest = dataclasses.replace(
        base, score=dataclasses.replace(base.score, feature_weights=(1.0, 0.0, 0.0, 0.0)))
    det = Detector(manifest, NumpyScorer(), DetectorSettings(max_batch=1, top_features=3),
                   clock=FakeClock(), wall_clock_ms=lambda: 0)
    alerts = []
    for t in range(12):
        v = np.zeros(4, np.float32)
        v[0] = 50.0 if t == 8 else 0.0
        v[1:] = 0.5 * (t % 2)  # the flags move too: their errors are non-zero, weight is 0
        det.submit(Reading("ch", t, v))
        alerts += [r.alert for r in det.poll() if r.alert is not None]
    assert alerts and alerts[0].event == "open"
    assert [f for f, _ in alerts[0].top_features] == ["value"]


def test_detector_deadline_flush_and_forget() -> None:
    det, clock = _detector(max_batch=100, window=2)
    det.submit(Reading("a", 0, np.zeros(3, np.float32)))
    det.submit(Reading("a", 1, np.zeros(3, np.float32)))
    assert det.poll() == [] and det.pending == 1
    clock.advance(0.051)
    assert len(det.poll()) == 1
    det.forget(["a"])
    assert det.sensors() == []
    assert det.submit(Reading("a", 0, np.zeros(3, np.float32))) is Status.WARMING


class _HeldScorer(NumpyScorer):
    """An async scorer whose tasks finish only when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks: list[_HeldTask] = []

    def errors_async(self, windows: np.ndarray, chunk: int = 0) -> _HeldTask:
        task = _HeldTask(self.errors(windows))
        self.tasks.append(task)
        return task


class _HeldTask:
    def __init__(self, result: tuple[np.ndarray, np.ndarray]) -> None:
        self._result, self.finished = result, False

    def done(self) -> bool:
        return self.finished

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self._result


def _two_windows(det: Detector, t0: int) -> None:
    for s in ("a", "b"):
        det.submit(Reading(s, t0, np.full(3, t0, np.float32), ref=(s, t0)))


def test_idle_poll_dispatches_pending_windows_only_when_the_model_is_free() -> None:
    """Continuous batching: with ``idle`` (the consumer read everything buffered) a pending
    batch goes to a free model before its deadline; while the model is busy it keeps filling;
    without ``idle`` or with dispatch_when_idle off it waits for size or deadline."""
    clock = FakeClock()
    scorer = _HeldScorer()
    det = Detector(make_manifest(window=2, threshold=1.0), scorer,
                   DetectorSettings(max_batch=100, max_wait_ms=50, clear_after=2),
                   clock=clock, wall_clock_ms=lambda: 0)
    _two_windows(det, 0)  # warming: no windows yet
    _two_windows(det, 1)
    assert det.poll_batches() == [] and scorer.tasks == []  # not idle: waits for the deadline
    assert det.poll_batches(idle=True) == [] and len(scorer.tasks) == 1  # dispatched at once
    assert scorer.calls == [2]
    _two_windows(det, 2)
    _two_windows(det, 3)
    assert det.poll_batches(idle=True) == [] and len(scorer.tasks) == 1  # model busy: fills
    scorer.tasks[0].finished = True
    out = det.poll_batches(idle=True)  # the first task's results; the 4 waiting windows go
    assert [r.ref for b in out for r in b.results()] == [("a", 1), ("b", 1)]
    assert scorer.calls == [2, 4]
    scorer.tasks[1].finished = True
    assert [r.ref for b in det.poll_batches() for r in b.results()] == [
        ("a", 2), ("b", 2), ("a", 3), ("b", 3)]  # the clock never moved: no deadline passed

    # a scorer without a model thread is always free: idle scores the pending batch inline
    sync = Detector(make_manifest(window=2, threshold=1.0), NumpyScorer(),
                    DetectorSettings(max_batch=100, max_wait_ms=50), clock=clock,
                    wall_clock_ms=lambda: 0)
    _two_windows(sync, 0)
    _two_windows(sync, 1)
    assert sync.poll_batches() == [] and sync.pending == 2
    assert [r.ref for b in sync.poll_batches(idle=True) for r in b.results()] == [
        ("a", 1), ("b", 1)]

    off = Detector(make_manifest(window=2, threshold=1.0), NumpyScorer(),
                   DetectorSettings(max_batch=100, max_wait_ms=50, dispatch_when_idle=False),
                   clock=clock, wall_clock_ms=lambda: 0)
    _two_windows(off, 0)
    _two_windows(off, 1)
    assert off.poll_batches(idle=True) == [] and off.pending == 2
    clock.advance(0.051)
    assert len(off.poll()) == 2


# ------------------------------------------------------------------ rebuilt state: exactness


def _bursty_stream(seed: int, n: int = 260) -> np.ndarray:
    """Readings of one sensor (3 features): calm stretches and oscillating bursts of random
    lengths (the NumpyScorer scores oscillation high), some of them long."""
    rng = np.random.default_rng(seed)
    values = np.ones((n, 3))
    t = 0
    while t < n:
        t += int(rng.integers(5, 40))  # calm
        length = int(rng.integers(3, 60))
        amp = float(rng.uniform(0.5, 3.0))  # some bursts stay between clear and warning
        values[t : t + length, 0] += amp * (np.arange(len(values[t : t + length])) % 2)
        t += length
    return values


@pytest.mark.parametrize("smoothing", [1, 3])
def test_a_detector_started_late_matches_the_uninterrupted_one_once_exact(smoothing) -> None:
    """What the consumer's rebuild relies on: a detector that sees a stream from reading
    ``start`` on gives, from the first moment no sensor is ``inexact()`` on, exactly the
    alerts (ids, events, levels) that a detector which saw the whole stream gives. Before that
    moment it may not (an episode open since before ``start`` gets another id)."""
    manifest = make_manifest(window=4, smoothing=smoothing)
    settings = DetectorSettings(max_batch=1, clear_after=5, update_interval_s=0.0)

    def run(values: np.ndarray, first: int) -> dict[int, tuple]:
        det = Detector(manifest, NumpyScorer(), settings, wall_clock_ms=lambda: 0)
        alerts, exact_from = {}, None
        for t in range(first, len(values)):
            det.submit(Reading("s", 1000 * t, values[t], ref=t))
            for r in det.flush():
                # the smoothed score exactly, not within rounding: the ring is summed oldest
                # to newest whatever count it started from (found in review: 4,872 of 24,765
                # scores differed in the last bits)
                alerts[("score", r.ref)] = r.score.score
                if r.alert is not None:
                    a = r.alert
                    alerts[r.ref] = (a.alert_id, a.event, a.level, a.episode_start_ms, a.score,
                                     a.peak_score)
            if (exact_from is None and det.sensors() and not det.unscored(["s"])
                    and not det.inexact(["s"])):
                exact_from = t
        return alerts, exact_from

    differed = checked = 0
    for seed in range(5):  # 5 x 21 late starts (8 seeds: the same outcome, 42 s of the suite)
        values = _bursty_stream(seed)
        reference, _ = run(values, 0)
        for first in range(10, 200, 9):
            late, exact_from = run(values, first)
            if exact_from is None:
                continue
            checked += 1
            def since(d: dict, t0: int) -> dict:
                return {k: v for k, v in d.items() if (k[1] if isinstance(k, tuple) else k) > t0}

            assert since(late, exact_from) == since(reference, exact_from), (seed, first)
            if since(late, first - 1) != since(reference, first - 1):
                differed += 1
    assert checked > 50
    assert differed > 0  # the late starts do lose ids before they become exact


def test_inexact_and_unscored_sensors() -> None:
    manifest = make_manifest(window=3, smoothing=4)
    det = Detector(manifest, NumpyScorer(), DetectorSettings(max_batch=1000, clear_after=10))
    ones = np.ones((1, 3))
    for t in range(30):
        det.submit_many(["calm", "busy"], [t, t],
                        np.array([[1.0, 1, 1], [0.0 if t % 2 else 5.0, 1, 1]]))
    for t in range(12):  # 10 windows, the first 3 of them smoothed over fewer than 4 scores
        det.submit_many(["short"], [t], ones)
    det.submit_many(["new", "new"], [0, 1], np.ones((2, 3)))  # no full window
    det.flush()
    names = ["calm", "busy", "short", "new", "unknown"]
    assert det.inexact(names) == ["busy", "short"]
    assert det.unscored(names) == ["new"]
    for t in range(12, 15):
        det.submit_many(["short"], [t], ones)
    det.flush()
    assert det.inexact(names) == ["busy"]  # 10 calm windows now
    det.forget(["calm"])
    det.submit_many(["calm"], [100], ones)  # its slot starts over
    det.flush()
    assert det.unscored(names) == ["calm", "new"] and det.inexact(["calm"]) == []


class _SizedCalls(NumpyScorer):
    """An async scorer that scores as the TorchScript one does: one model call per size it is
    given (``calls`` records them, as NumpyScorer's ``errors`` does); the task stays in flight
    until the detector waits for it."""

    def errors_async(self, windows: np.ndarray, sizes=0) -> _HeldTask:
        from stream_detector.model.runtime import call_sizes

        parts, at = [], 0
        for size in call_sizes(len(windows), sizes):
            parts.append(self.errors(windows[at : at + size]))
            at += size
        return _HeldTask((np.concatenate([p[0] for p in parts]),
                          np.concatenate([p[1] for p in parts])))


def test_async_scoring_makes_the_model_calls_the_sync_path_makes() -> None:
    """A deadline's short batch queued ahead of full ones was merged into one task that the
    model then cut every max_batch windows: calls [4, 4, 4, 1] against the sync path's
    [4, 1, 4, 4]. The TorchScript model's float32 results can differ in the last bits with the
    size of the call, so the async path scored some windows differently (found in review).
    Each queued batch is now a call of its own."""
    def drive(scorer: NumpyScorer) -> tuple[list[int], list[float]]:
        clock = FakeClock()
        d = Detector(make_manifest(window=3), scorer,
                     DetectorSettings(max_batch=4, max_wait_ms=10), clock=clock)
        t = 0
        scores: list[float] = []

        def feed(n: int) -> None:
            nonlocal t
            for _ in range(n):
                t += 1
                d.submit_many(["a"], [t], np.full((1, 3), float(t % 5), np.float32))

        feed(2 + 4)
        scores += [s for b in d.poll_batches() for s in b.score]  # a full batch: in flight
        feed(1)
        clock.advance(0.02)
        scores += [s for b in d.poll_batches() for s in b.score]  # deadline: a batch of 1
        feed(8)
        scores += [s for b in d.poll_batches() for s in b.score]  # two full batches behind
        scores += [s for b in d.flush_batches() for s in b.score]
        return scorer.calls, scores

    sync_calls, sync_scores = drive(NumpyScorer())
    async_calls, async_scores = drive(_SizedCalls())
    assert sync_calls == [4, 1, 4, 4]
    assert async_calls == sync_calls
    assert async_scores == sync_scores


def test_a_weighted_score_does_not_depend_on_the_micro_batch() -> None:
    """With feature weights the mean over features was a matrix product, whose rounding
    depends on the number of rows: a window's score differed in its last bits between
    micro-batches of 1 and 256 (and from the offline reference; found in review)."""
    import dataclasses

    base = make_manifest(features=tuple("abcdefgh"), window=4, threshold=50.0)
    manifest = dataclasses.replace(base, score=dataclasses.replace(
        base.score, feature_weights=(1.0, 1, 1, 1, 1, 1, 0, 0)))
    rng = np.random.default_rng(3)
    values = rng.normal(size=(500, 8)).astype(np.float32)

    def scores(max_batch: int) -> list[float]:
        det = Detector(manifest, NumpyScorer(), DetectorSettings(max_batch=max_batch))
        out = []
        for i in range(0, 500, 50):
            det.submit_many(["s"] * 50, list(range(i, i + 50)), values[i:i + 50])
            out += det.poll()
        out += det.flush()
        return [r.score.score for r in sorted(out, key=lambda r: r.reading_ts_ms)]

    one, many = scores(1), scores(256)
    assert len(one) == 497 and one == many


@pytest.mark.parametrize(("sensors", "ts", "width", "says"), [
    (["a", "b"], [1, 2**63], 3, "timestamps must be n integers"),
    (["a", "b"], [1, -5], 3, "timestamps must be >= 0"),
    (["a", "b"], [1, 2], 2, r"shape \(2, 3\)"),
    (["a", "\ud800"], [1, 2], 3, "not valid Unicode"),
])
def test_a_batch_that_cannot_be_taken_in_leaves_no_sensor_behind(sensors, ts, width,
                                                                 says) -> None:
    """A batch that raised half-way (a timestamp past int64, the wrong number of values, a
    name that is not Unicode) left its new sensors with a slot but no state: threshold 0, an
    episode opened at score 0 that never resolved, or IndexError on every later batch once
    the pool had grown (found in review). It is refused whole now."""
    det = Detector(make_manifest(window=3, threshold=1.0), NumpyScorer(),
                   DetectorSettings(max_batch=4, clear_after=2))
    with pytest.raises(ValueError, match=says):
        det.submit_many(sensors, ts, np.zeros((2, width), np.float32))
    assert det.sensors() == [] and det.counters["readings"] == 0
    det.submit_many(["a"] * 4, [1, 2, 3, 4], np.zeros((4, 3), np.float32))
    results = det.flush()
    assert [r.score.threshold for r in results] == [1.0, 1.0]
    assert all(r.alert is None for r in results)


def test_a_float64_value_beyond_float32_is_refused() -> None:
    """1e39 is finite as float64 and inf in the float32 window: every later score NaN and the
    episode critical for good (found in review)."""
    det = Detector(make_manifest(window=3), NumpyScorer(), DetectorSettings(max_batch=4))
    with pytest.raises(ValueError, match="beyond float32's range"):
        det.submit_many(["a"], [1], np.array([[1.0, 1e39, 2.0]]))
    assert det.sensors() == []


def test_top_features_never_lists_a_contribution_that_rounds_to_zero() -> None:
    det = Detector(make_manifest(window=3), NumpyScorer(), DetectorSettings(max_batch=4))
    assert det._top_features(np.array([4.1666667, 0.0, 1e-8])) == (("a", 4.166667),)


def test_a_batch_with_a_nan_reading_is_refused_before_any_of_it_is_taken_in() -> None:
    """The core took NaN readings in: with the long-term term one NaN made every later score
    NaN and the sensor's episode never resolved (found in review; the Kafka decoder already
    dead-letters such readings, other callers of the core did not)."""
    det = Detector(make_manifest(window=3), NumpyScorer(), DetectorSettings(max_batch=4))
    values = np.ones((3, 3), np.float32)
    values[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"reading 1 of the batch \(sensor 'b', ts 2\)"):
        det.submit_many(["a", "b", "c"], [1, 2, 3], values)
    assert det.counters["readings"] == 0 and det.sensors() == []
    values[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        det.submit(Reading("b", 2, values[1]))
    assert det.submit_many(["a"], [1], np.ones((1, 3), np.float32)).tolist() == [0]  # warming
