"""The pure core: readings in, scores and alerts out. No Kafka, no torch.

Both drivers use it unchanged: the Kafka consumer (:mod:`stream_detector.consumer`) and the
backtest replay (:mod:`stream_detector.replay`), so a backtest runs the production code path.

Flow per reading: ring buffer (:class:`~stream_detector.windows.WindowStore`) -> when a window is
complete, micro-batcher -> one model call per batch through a :class:`Scorer` -> score terms
(:class:`~stream_detector.scoring.ScoreFunction`) -> per-sensor smoothing -> threshold and
hysteresis (:class:`~stream_detector.scoring.EpisodeTracker`) -> :class:`Result`.

Results come out in the order the windows went in, so per sensor they are in time order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from stream_detector.batching import Batch, MicroBatcher
from stream_detector.config import DetectorSettings
from stream_detector.manifest import Manifest
from stream_detector.records import Alert, Reading, ScoreRecord, alert_id
from stream_detector.scoring import (
    EpisodeTracker,
    EventKind,
    Hysteresis,
    Level,
    ScoreFunction,
    Smoother,
)
from stream_detector.windows import Status, WindowStore


class Scorer(Protocol):
    """Anything that maps raw windows ``(B, W, F)`` to per-feature errors ``(B, F)`` x 2.

    A scorer may also offer ``errors_async(windows)`` returning a handle with ``done()`` and
    ``result()`` (the same pair ``errors`` returns); the detector then keeps one batch in
    inference while it takes in the next readings (see :class:`Detector`).
    """

    def errors(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class _InFlight:
    __slots__ = ("batch", "handle", "t0")

    def __init__(self, batch: Batch, handle: Any, t0: float) -> None:
        self.batch = batch
        self.handle = handle
        self.t0 = t0


@dataclass(frozen=True, slots=True)
class Result:
    """One scored window; ``alert`` is set when the window opened/updated/resolved an episode."""

    score: ScoreRecord
    alert: Alert | None
    ref: Any
    reading_ts_ms: int


class _Pending:
    """A queued window's metadata (a plain slots class: built once per window, on the hot path)."""

    __slots__ = ("sensor", "start_ms", "end_ms", "ref")

    def __init__(self, sensor: str, start_ms: int, end_ms: int, ref: Any) -> None:
        self.sensor = sensor
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.ref = ref


_READY = Status.READY
_LABELS = {level: level.label for level in Level}


class _SensorState:
    __slots__ = ("smoother", "tracker", "threshold", "row")

    def __init__(self, k: int, threshold: float, row: int) -> None:
        self.smoother = Smoother(k)
        self.tracker = EpisodeTracker()
        self.threshold = threshold
        self.row = row  # the sensor's error scales in the ScoreFunction (0 = global)


class Detector:
    """Readings in, :class:`Result` objects out.

    ``submit`` returns the reading's :class:`~stream_detector.windows.Status`: ``READY`` means a
    window is queued and its result will come out of a later ``poll``/``flush`` call; ``WARMING``
    means the reading was absorbed (no window yet); ``LATE``/``FULL`` mean it was rejected.

    When the scorer has ``errors_async`` (the TorchScript scorer runs the model on torch's own
    thread pool, without the GIL), a full batch starts scoring at once and ``submit``/``poll``
    keep the model busy with the next one while the caller decodes more readings; at most one
    batch is in inference and ``poll`` waits for the model when more than one full batch is
    queued behind it (back-pressure). Results, their order and their values are the same as
    with ``errors``; only the call that hands them out may be a later one.
    """

    def __init__(
        self,
        manifest: Manifest,
        scorer: Scorer,
        settings: DetectorSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ) -> None:
        s = settings or DetectorSettings()
        self.manifest = manifest
        self.settings = s
        self._scorer = scorer
        self._score_fn = ScoreFunction(manifest.score)
        self._features = manifest.features
        self._hyst = Hysteresis(
            s.warning_ratio,
            s.critical_ratio,
            s.clear_ratio,
            s.clear_after,
            int(s.update_interval_s * 1000),
        )
        self._store = WindowStore(manifest.window, manifest.n_features, s.max_sensors)
        self._batcher = MicroBatcher(
            s.max_batch, s.max_wait_ms / 1000.0, manifest.window, manifest.n_features, clock
        )
        self._state: dict[str, _SensorState] = {}
        self._ready: list[Batch] = []
        self._start = getattr(scorer, "errors_async", None)
        self._inflight: _InFlight | None = None
        self._out: list[Result] = []  # finished asynchronously, handed out by poll/flush
        self._wall_ms = wall_clock_ms
        self._clock = clock
        self._top = min(s.top_features, manifest.n_features)
        self.counters = {"readings": 0, "warming": 0, "late": 0, "full": 0, "windows": 0}
        self.batch_sizes: list[int] = []
        self.on_batch: Callable[[int, float], None] | None = None

    # -- input -------------------------------------------------------------------------
    def submit(self, reading: Reading) -> Status:
        counters = self.counters
        counters["readings"] += 1
        sensor, ts_ms = reading.sensor, reading.ts_ms
        status, window, start_ms = self._store.append(sensor, ts_ms, reading.values)
        if status is _READY:
            full = self._batcher.add(window, _Pending(sensor, start_ms, ts_ms, reading.ref))
            if full is not None:
                self._ready.append(full)
        else:
            counters[status.value] += 1
        if self._start is not None and self._ready and (
            self._inflight is None or self._inflight.handle.done()
        ):
            self._advance()  # the model is free: give it the next batch now
        return status

    # -- output ------------------------------------------------------------------------
    def poll(self) -> list[Result]:
        """Score full batches and the pending batch if its deadline passed; never waits for a
        deadline. With an async scorer: hand out what finished, and wait for the model only
        while more than one full batch is queued behind the one in inference."""
        due = self._batcher.poll()
        if due is not None:
            self._ready.append(due)
        if self._start is None:
            return self._drain()
        self._advance()
        while len(self._ready) > 1:
            self._advance(wait=True)
        return self._take()

    def flush(self) -> list[Result]:
        """Score everything pending now (shutdown, revocation, end of replay)."""
        rest = self._batcher.flush()
        if rest is not None:
            self._ready.append(rest)
        if self._start is None:
            return self._drain()
        while self._inflight is not None or self._ready:
            self._advance(wait=True)
        return self._take()

    def next_deadline(self) -> float | None:
        """Clock time by which ``poll`` should be called: the pending batch's deadline, or
        soon while a batch is in inference (its result is handed out by ``poll``)."""
        deadline = self._batcher.deadline()
        if self._inflight is not None:
            soon = self._clock() + 0.001
            return soon if deadline is None else min(deadline, soon)
        return deadline

    @property
    def pending(self) -> int:
        inflight = len(self._inflight.batch) if self._inflight is not None else 0
        return len(self._batcher) + sum(len(b) for b in self._ready) + inflight + len(self._out)

    # -- state -------------------------------------------------------------------------
    def forget(self, sensors: Iterable[str]) -> None:
        """Drop the state of ``sensors`` (their partition was revoked)."""
        for s in sensors:
            self._store.remove(s)
            self._state.pop(s, None)

    def sensors(self) -> list[str]:
        return self._store.sensors()

    def state_bytes(self) -> int:
        return self._store.nbytes

    # -- internals ---------------------------------------------------------------------
    def _drain(self) -> list[Result]:
        out: list[Result] = []
        while self._ready:
            out.extend(self._score(self._ready.pop(0)))
        return out

    def _advance(self, wait: bool = False) -> None:
        """Async scorer: collect the batch in inference if done (or ``wait``), start the next."""
        fl = self._inflight
        if fl is not None:
            if not (wait or fl.handle.done()):
                return
            self._inflight = None
            rec_err, fc_err = fl.handle.result()
            seconds = time.perf_counter() - fl.t0
        if self._ready:  # start the next batch first: the model works while we finish this one
            batch = self._ready.pop(0)
            assert self._start is not None
            self._inflight = _InFlight(batch, self._start(batch.windows), time.perf_counter())
        if fl is not None:
            self._out.extend(self._finish(fl.batch, rec_err, fc_err, seconds))

    def _take(self) -> list[Result]:
        out, self._out = self._out, []
        return out

    def _sensor(self, sensor: str) -> _SensorState:
        st = self._state.get(sensor)
        if st is None:
            st = _SensorState(
                self.manifest.score.smoothing, self.manifest.thresholds.for_sensor(sensor),
                self._score_fn.row(sensor),
            )
            self._state[sensor] = st
        return st

    def _score(self, batch: Batch) -> list[Result]:
        t0 = time.perf_counter()
        rec_err, fc_err = self._scorer.errors(batch.windows)
        return self._finish(batch, rec_err, fc_err, time.perf_counter() - t0)

    def _finish(self, batch: Batch, rec_err: np.ndarray, fc_err: np.ndarray,
                seconds: float) -> list[Result]:
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds)
        self.batch_sizes.append(len(batch))
        if len(self.batch_sizes) > 10_000:
            del self.batch_sizes[:5_000]
        states = self._state
        sensor_state = self._sensor
        sts = [states.get(item.sensor) or sensor_state(item.sensor) for item in batch.items]
        scored = self._score_fn(rec_err, fc_err, [st.row for st in sts])
        now_ms = self._wall_ms()
        version = self.manifest.model_version
        results = []
        raw = scored.score.tolist()
        recs = scored.reconstruction.tolist()
        fcs = scored.forecast.tolist()
        hyst = self._hyst
        for j, item in enumerate(batch.items):
            st = sts[j]
            score = st.smoother.push(raw[j])
            tracker = st.tracker
            event = tracker.step(item.end_ms, score, st.threshold, hyst)
            if event is None:
                label = _LABELS[tracker.level]
            else:
                label = _LABELS[tracker.level if event.kind != EventKind.RESOLVE else Level.NORMAL]
            record = ScoreRecord(
                item.sensor, item.start_ms, item.end_ms, score, recs[j], fcs[j],
                st.threshold, label, version,
            )
            alert = None
            if event is not None:
                alert = Alert(
                    alert_id=alert_id(item.sensor, event.episode_start_ms, version),
                    event=event.kind.value,
                    sensor=item.sensor,
                    level=event.level.label,
                    score=score,
                    peak_score=event.peak_score,
                    threshold=st.threshold,
                    reconstruction_error=recs[j],
                    forecast_error=fcs[j],
                    top_features=self._top_features(scored.contributions[j]),
                    episode_start_ms=event.episode_start_ms,
                    window_start_ms=item.start_ms,
                    window_end_ms=item.end_ms,
                    model_version=version,
                    detected_at_ms=now_ms,
                )
            results.append(Result(record, alert, item.ref, item.end_ms))
        self.counters["windows"] += len(batch)
        return results

    def _top_features(self, contrib: np.ndarray) -> tuple[tuple[str, float], ...]:
        k = self._top
        idx = np.argpartition(-contrib, k - 1)[:k] if k < len(contrib) else np.arange(len(contrib))
        idx = idx[np.argsort(-contrib[idx])]
        return tuple((self._features[i], round(float(contrib[i]), 6)) for i in idx)


