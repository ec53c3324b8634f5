"""The pure core: readings in, scores and alerts out. No Kafka, no torch.

Both drivers use it unchanged: the Kafka consumer (:mod:`stream_detector.consumer`) and the
backtest replay (:mod:`stream_detector.replay`), so a backtest runs the production code path.

Flow, a batch of readings at a time: ring buffers (:class:`~stream_detector.windows.WindowStore`)
-> the windows completed -> micro-batcher -> one model call per batch through a :class:`Scorer`
-> score terms (:class:`~stream_detector.scoring.ScoreFunction`) -> per-sensor smoothing and
long-term level (:class:`~stream_detector.manifest.LongTermSpec`) -> threshold and hysteresis
(:class:`~stream_detector.scoring.EpisodeTracker`, only for windows that can change an alert
state) -> :class:`ScoredBatch` / :class:`Result`. The per-reading work
is numpy over the whole batch; Python runs per *alerting* window, not per reading.

Results come out in the order the windows went in, so per sensor they are in time order.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, Protocol

import numpy as np

from stream_detector.batching import Batch, MicroBatcher
from stream_detector.config import DetectorSettings
from stream_detector.manifest import LongTermSpec, Manifest
from stream_detector.records import F32_MAX, Alert, Reading, ScoreRecord, alert_id, score_json
from stream_detector.scoring import (
    EpisodeTracker,
    EventKind,
    Hysteresis,
    Level,
    ScoreFunction,
    long_term_gain,
    long_term_units,
)
from stream_detector.windows import (
    FULL,
    LATE,
    STATUSES,
    WARMING,
    Status,
    WindowStore,
    group_ranks,
)


class Scorer(Protocol):
    """Anything that maps raw windows ``(B, W, F)`` to per-feature errors ``(B, F)`` x 2.

    A scorer may also offer ``errors_async(windows, sizes)`` returning a handle with ``done()``
    and ``result()`` (the same pair ``errors`` returns, computed in consecutive model calls of
    ``sizes`` windows: one per queued micro-batch); the detector then keeps the model busy
    while it takes in the next readings (see :class:`Detector`).

    For a manifest with per-sensor input scalers (``Manifest.scaler_per_sensor``) the detector
    passes ``rows`` as well (``errors(windows, rows)``, ``errors_async(windows, sizes, rows)``):
    ``rows[i]`` is :meth:`Manifest.scaler_row` of window ``i``'s sensor. Without them it never
    does, so a scorer of a globally scaled artifact need not take the argument.
    """

    def errors(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


#: :func:`converged_after` for a term that never gets within the tolerance (rounding alone
#: exceeds it, or ``alpha`` is so small that the count would not fit)
NEVER_EXACT = 2 ** 40


def converged_after(alpha: float, start: float, threshold: float, gain: float,
                    tolerance: float) -> int:
    """Windows after which a sensor's long-term term, started at ``start`` here, is within
    ``tolerance * threshold`` of the term of a consumer that has seen the sensor from any
    earlier point: both levels lie in ``[0, max(start, threshold)]`` (averages of scores
    clipped at the threshold), each window shrinks their difference by ``1 - alpha``, and the
    term is the level times ``gain`` (:func:`~stream_detector.scoring.long_term_gain`)."""
    # rounding: two levels that agree to a few units in the last place can stay that far
    # apart (alpha times their difference rounds away), which the gain scales up
    slack = gain * max(start, threshold) * 2.0 ** -52 * (1 / alpha + 2)
    room = tolerance * threshold - slack
    if room <= 0:
        return NEVER_EXACT
    spread = max(start, threshold) * gain
    if spread <= room:
        return 0
    if alpha >= 1:
        return 1
    return min(NEVER_EXACT, math.ceil(math.log(room / spread) / math.log1p(-alpha)))


def long_term_windows(spec: LongTermSpec, sensor: str, threshold: float,
                      tolerance: float) -> int:
    """:func:`converged_after` for ``sensor`` of an artifact's long-term term."""
    start, level = spec.for_sensor(sensor)
    return converged_after(spec.alpha, start, threshold,
                           long_term_gain(threshold, level, start), tolerance)


class _InFlight:
    __slots__ = ("batches", "handle", "t0")

    def __init__(self, batches: list[Batch], handle: Any, t0: float) -> None:
        self.batches = batches
        self.handle = handle
        self.t0 = t0


# an async scorer gets every queued batch in one call (scored a batch at a time, in order);
# ``poll`` waits for the model while more than this many batches are queued (back-pressure)
MAX_QUEUED_BATCHES = 8


@dataclass(frozen=True, slots=True)
class Result:
    """One scored window; ``alert`` is set when the window opened/updated/resolved an episode."""

    score: ScoreRecord
    alert: Alert | None
    ref: Any
    reading_ts_ms: int


class ScoredBatch:
    """The results of one model batch, by column (the consumer reads these directly: building
    a :class:`Result` per window costs more than the rest of the window's Python).

    Window ``j``: ``sensors[j]``, ``refs[j]`` (the driver's token of the reading that completed
    it), ``start_ms[j]``/``end_ms[j]``, the smoothed ``score[j]`` and its two terms, the sensor's
    ``threshold[j]``, the alert ``levels[j]`` label, and ``alerts.get(j)``.
    """

    __slots__ = ("sensors", "refs", "start_ms", "end_ms", "score", "reconstruction", "forecast",
                 "threshold", "levels", "alerts", "model_version")

    def __init__(self, sensors: tuple[str, ...], refs: tuple[Any, ...], start_ms: list[int],
                 end_ms: list[int], score: list[float], reconstruction: list[float],
                 forecast: list[float], threshold: list[float], levels: list[str],
                 alerts: dict[int, Alert], model_version: str) -> None:
        self.sensors = sensors
        self.refs = refs
        self.start_ms = start_ms
        self.end_ms = end_ms
        self.score = score
        self.reconstruction = reconstruction
        self.forecast = forecast
        self.threshold = threshold
        self.levels = levels
        self.alerts = alerts
        self.model_version = model_version

    def __len__(self) -> int:
        return len(self.refs)

    def record(self, j: int) -> ScoreRecord:
        return ScoreRecord(self.sensors[j], self.start_ms[j], self.end_ms[j], self.score[j],
                           self.reconstruction[j], self.forecast[j], self.threshold[j],
                           self.levels[j], self.model_version)

    def score_json(self, j: int) -> bytes:
        """``record(j).to_json()`` without building the record."""
        return score_json(self.sensors[j], self.start_ms[j], self.end_ms[j], self.score[j],
                          self.reconstruction[j], self.forecast[j], self.threshold[j],
                          self.levels[j], self.model_version)

    def results(self) -> list[Result]:
        alerts = self.alerts
        return [Result(self.record(j), alerts.get(j), self.refs[j], self.end_ms[j])
                for j in range(len(self.refs))]


_NORMAL_LABEL = Level.NORMAL.label
_LABELS = {level: level.label for level in Level}


class Detector:
    """Readings in, scored windows and alerts out.

    ``submit_many`` takes a batch of readings (what one ``consume()`` call gave) and returns one
    status code per reading (:data:`~stream_detector.windows.READY` means a window is queued
    and its result comes out of a later ``poll``/``flush`` call; ``WARMING``: absorbed, no
    window yet; ``LATE``/``FULL``: rejected). ``submit`` is the same for one reading. The
    detector's own work does not depend on how readings are split into batches: a reading's
    window, smoothing and alert logic are those of submitting the stream one reading at a time,
    and so are the scores when the scorer gives a window the same errors in any model call.
    ``NumpyScorer`` does; the TorchScript scorer does on the CPU we measured, because it pads
    every model call to a multiple of :data:`~stream_detector.model.runtime.CALL_MULTIPLE`
    windows (torch picks its kernels by the call's size, a few 1e-6 apart). On a CPU whose
    kernels differed beyond that, a score could differ in its last float32 bits between two
    batchings (a live run and its replay, a consumer and one rebuilt after a rebalance), and a
    score within that of a level could open or resolve an episode one window apart.

    When the scorer has ``errors_async`` (the TorchScript scorer runs the model on torch's own
    thread pool, without the GIL), full batches start scoring at once, all queued batches in one
    task that runs them one after the other, each in a model call of its own (as without
    ``errors_async``, so the two agree bit for bit), while the caller decodes
    more readings. One such task is in inference at a time; ``poll`` waits for the model while
    more than :data:`MAX_QUEUED_BATCHES` full batches are queued behind it (back-pressure).
    Results, their order and their values are the same as with ``errors``; only the call that
    hands them out may be a later one.

    ``poll``/``flush`` hand out :class:`Result` objects; ``poll_batches``/``flush_batches``
    the same results by column (:class:`ScoredBatch`), which is what the consumer uses.
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
        # per-slot state (slots of the window store): threshold, row of error scales, the
        # ring of the last k raw scores for smoothing, and whether an episode is open
        self._k = max(1, manifest.score.smoothing)
        # long-term term (None: the artifact has none): per slot the level L, the gain that
        # puts it in score units, and the windows after which a rebuilt L is within
        # long_term_tolerance of an uninterrupted one (see inexact())
        self._lt_spec = manifest.score.long_term
        self._alpha = self._lt_spec.alpha if self._lt_spec is not None else 0.0
        cap = self._store.capacity
        n_lt = cap if self._lt_spec is not None else 0  # no per-sensor cost without the term
        self._lt = np.zeros(n_lt)
        self._lt_start = np.zeros(n_lt)
        self._lt_gain = np.zeros(n_lt)
        # windows a sensor needs before its state can count as exact: k (fully smoothed), or
        # more while the long-term level still carries its start
        self._need = np.full(n_lt, self._k, dtype=np.int64)
        self._thr = np.zeros(cap)
        self._row = np.zeros(cap, dtype=np.intp)
        self._sm_ring = np.zeros((cap, self._k))
        self._sm_n = np.zeros(cap, dtype=np.int64)
        self._open = np.zeros(cap, dtype=bool)
        # consecutive fully smoothed windows below the clear level, up to clear_after (-1: no
        # window scored yet): a sensor that reached clear_after has the state any earlier
        # start would have given it (see inexact())
        self._calm = np.full(cap, -1, dtype=np.int32)
        # row of the manifest's input scaler table per slot; None: one global scaler
        self._srow = np.zeros(cap, dtype=np.intp) if manifest.scaler_per_sensor else None
        self._trackers: dict[str, EpisodeTracker] = {}
        self._ready: list[Batch] = []
        self._start = getattr(scorer, "errors_async", None)
        self._inflight: _InFlight | None = None
        self._out: list[ScoredBatch] = []  # finished, handed out by poll/flush
        self._wall_ms = wall_clock_ms
        self._clock = clock
        self._top = min(s.top_features, manifest.n_features)
        # tracked: windows that went through a sensor's episode tracker (in or near an alert)
        self.counters = {"readings": 0, "warming": 0, "late": 0, "full": 0, "windows": 0,
                         "tracked": 0}
        self.batch_sizes: list[int] = []
        self.on_batch: Callable[[int, float], None] | None = None

    # -- input -------------------------------------------------------------------------
    def submit(self, reading: Reading) -> Status:
        values = np.asarray(reading.values).reshape(1, -1)
        codes = self.submit_many([reading.sensor], [reading.ts_ms], values, [reading.ref])
        return STATUSES[int(codes[0])]

    def submit_many(
        self,
        sensors: Sequence[str],
        ts_ms: Sequence[int] | np.ndarray,
        values: np.ndarray,
        refs: Sequence[Any] | None = None,
    ) -> np.ndarray:
        """Readings ``(sensors[i], ts_ms[i], values[i])`` in stream order; ``refs[i]`` comes back
        with reading ``i``'s result. Returns the status codes (uint8, one per reading).

        Values must be finite (the Kafka driver's decoder dead-letters others as
        ``non_finite``): a NaN would stay in the sensor's window, smoothing and long-term term
        and could keep an episode open for good, so a batch holding one is refused with a
        ValueError before any of it is taken in."""
        n = len(sensors)
        if n == 0:
            return np.zeros(0, dtype=np.uint8)
        values = np.asarray(values)
        if values.shape != (n, self.manifest.n_features) or len(ts_ms) != n:
            raise ValueError(f"a batch of {n} readings needs values of shape ({n}, "
                             f"{self.manifest.n_features}) and {n} timestamps, got "
                             f"{values.shape} and {len(ts_ms)}")
        # a value the float32 window cannot hold would become inf there
        finite = (np.isfinite(values) if values.dtype == np.float32
                  else np.isfinite(values) & (np.abs(values) <= F32_MAX))
        if not finite.all():
            bad = int(np.flatnonzero(~finite.all(axis=1))[0])
            raise ValueError(f"reading {bad} of the batch (sensor {sensors[bad]!r}, ts "
                             f"{ts_ms[bad]}) holds a NaN or infinite value (or one beyond "
                             "float32's range); the detector takes finite values only")
        if refs is None:
            refs = [None] * n
        out = self._store.append_many(sensors, ts_ms, values)
        if out.new:
            self._init_slots(out.new)
        counts = np.bincount(out.status, minlength=4).tolist()
        c = self.counters
        c["readings"] += n
        c["warming"] += counts[WARMING]
        c["late"] += counts[LATE]
        c["full"] += counts[FULL]
        if len(out.ready):
            ready = out.ready.tolist()
            ts = np.asarray(ts_ms, dtype=np.int64)[out.ready].tolist()
            items = list(zip([sensors[i] for i in ready], out.slots.tolist(),
                             out.start_ms.tolist(), ts, [refs[i] for i in ready], strict=True))
            self._ready.extend(self._batcher.add_many(out.windows, items))
        if self._start is not None and self._ready and (
            self._inflight is None or self._inflight.handle.done()
        ):
            self._advance()  # the model is free: give it the next batch now
        return out.status

    # -- output ------------------------------------------------------------------------
    def poll(self) -> list[Result]:
        """:meth:`poll_batches`, one :class:`Result` per window."""
        return [r for b in self.poll_batches() for r in b.results()]

    def flush(self) -> list[Result]:
        """:meth:`flush_batches`, one :class:`Result` per window."""
        return [r for b in self.flush_batches() for r in b.results()]

    def poll_batches(self, idle: bool = False) -> list[ScoredBatch]:
        """Score full batches and the pending batch if its deadline passed; never waits for a
        deadline. With an async scorer: hand out what finished, and wait for the model only
        while more than one full batch is queued behind the one in inference.

        ``idle``: the caller has nothing more to submit for now (a consumer whose ``consume()``
        came back short). With ``dispatch_when_idle`` the pending batch is then scored at once
        if the model is free, not at its deadline: a batch holds what arrived while the model
        was busy, so at low rates a window does not wait ``max_wait_ms``, and under load (the
        model busy, or every ``consume()`` full) batches still fill."""
        due = self._batcher.poll()
        if (due is None and idle and self.settings.dispatch_when_idle and len(self._batcher)
                and not self._ready and self._model_free()):
            due = self._batcher.flush()
        if due is not None:
            self._ready.append(due)
        if self._start is None:
            self._drain()
            return self._take()
        self._advance()
        while len(self._ready) > MAX_QUEUED_BATCHES:
            self._advance(wait=True)
        return self._take()

    def flush_batches(self) -> list[ScoredBatch]:
        """Score everything pending now (shutdown, revocation, end of replay)."""
        self._complete()
        return self._take()

    def _model_free(self) -> bool:
        fl = self._inflight
        return self._start is None or fl is None or fl.handle.done()

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
        fl = self._inflight
        inflight = sum(len(b) for b in fl.batches) if fl is not None else 0
        return (len(self._batcher) + sum(len(b) for b in self._ready) + inflight
                + sum(len(b) for b in self._out))

    # -- state -------------------------------------------------------------------------
    def forget(self, sensors: Iterable[str]) -> None:
        """Drop the state of ``sensors`` (their partition was revoked or lost). Windows still
        queued are scored first (their results come out of the next ``poll``), so no result
        is computed against a slot that a new sensor took over meanwhile."""
        if self._batcher or self._ready or self._inflight is not None:
            self._complete()
        for s in sensors:
            self._store.remove(s)
            self._trackers.pop(s, None)

    def sensors(self) -> list[str]:
        return self._store.sensors()

    def untrained(self) -> int:
        """How many sensors with state here the artifact has no input scaler of its own for
        (not in its training data, or with fewer than ``min_sensor_windows`` fit rows there;
        they get the global one); 0 when the artifact scales every sensor globally."""
        if self._srow is None:
            return 0
        return int(np.count_nonzero(self._srow[self._store.used_slots()] == 0))

    def inexact(self, sensors: Iterable[str]) -> list[str]:
        """Those of ``sensors`` whose alert state may differ from the state they would have
        had with more history before their first reading here.

        A sensor's state (its window, score smoothing and episode) depends on readings before
        the ones this detector saw only until it has had ``clear_after`` consecutive fully
        smoothed windows below the clear level: any episode an earlier start would have opened
        has resolved by then, and from there on both evolve identically (a closed episode
        tracker keeps nothing). With a long-term term (an average over all the sensor's
        windows), windows count towards that run only once the term's start has faded to
        ``long_term_tolerance`` of the threshold (:func:`converged_after`): from there on the
        scores differ by at most that, and the state is exact to that tolerance. A sensor with
        at least one scored window that has not had such a run is *inexact*: its open episode
        may have begun earlier (another ``alert_id``), or an episode an earlier start would
        have kept open is closed here. Sensors without a full window yet are not listed
        (nothing of theirs was scored), nor unknown ones. The Kafka driver deepens its rebuild
        while a partition has inexact sensors."""
        slot_of, need = self._store.slot, self._hyst.clear_after
        out = []
        for s in sensors:
            slot = slot_of(s)
            if slot is not None and 0 <= self._calm[slot] < need:
                out.append(s)
        return out

    def readings_of(self, sensor: str) -> int:
        """Readings the sensor's window has taken in (0 for an unknown sensor)."""
        return self._store.count(sensor)

    def unscored(self, sensors: Iterable[str]) -> list[str]:
        """Those of ``sensors`` with state here but no window scored yet (still warming)."""
        slot_of = self._store.slot
        return [s for s in sensors if (slot := slot_of(s)) is not None and self._calm[slot] < 0]

    def state_bytes(self) -> int:
        per_slot = (self._thr.nbytes + self._row.nbytes + self._sm_ring.nbytes
                    + self._sm_n.nbytes + self._open.nbytes + self._calm.nbytes
                    + self._lt.nbytes + self._lt_start.nbytes + self._lt_gain.nbytes
                    + self._need.nbytes
                    + (self._srow.nbytes if self._srow is not None else 0))
        return self._store.nbytes + per_slot

    # -- internals ---------------------------------------------------------------------
    def _init_slots(self, new: list[tuple[str, int]]) -> None:
        cap = self._store.capacity
        if cap > len(self._thr):
            extra = cap - len(self._thr)
            self._thr = np.concatenate([self._thr, np.zeros(extra)])
            self._row = np.concatenate([self._row, np.zeros(extra, dtype=np.intp)])
            self._sm_ring = np.concatenate([self._sm_ring, np.zeros((extra, self._k))])
            self._sm_n = np.concatenate([self._sm_n, np.zeros(extra, dtype=np.int64)])
            self._open = np.concatenate([self._open, np.zeros(extra, dtype=bool)])
            self._calm = np.concatenate([self._calm, np.full(extra, -1, dtype=np.int32)])
            if self._lt_spec is not None:
                self._lt = np.concatenate([self._lt, np.zeros(extra)])
                self._lt_start = np.concatenate([self._lt_start, np.zeros(extra)])
                self._lt_gain = np.concatenate([self._lt_gain, np.zeros(extra)])
                self._need = np.concatenate([self._need,
                                             np.full(extra, self._k, dtype=np.int64)])
            if self._srow is not None:
                self._srow = np.concatenate([self._srow, np.zeros(extra, dtype=np.intp)])
        thresholds, row = self.manifest.thresholds, self._score_fn.row
        if self._srow is not None:
            scaler_row = self.manifest.scaler_row
            for sensor, slot in new:
                self._srow[slot] = scaler_row(sensor)
        for sensor, slot in new:
            self._thr[slot] = thresholds.for_sensor(sensor)
            self._row[slot] = row(sensor)
            self._sm_ring[slot] = 0.0
            self._sm_n[slot] = 0
            self._open[slot] = False
            self._calm[slot] = -1
            self._trackers.pop(sensor, None)
        lt = self._lt_spec
        if lt is not None:
            tol = self.settings.long_term_tolerance
            for sensor, slot in new:
                start, level = lt.for_sensor(sensor)
                thr = float(self._thr[slot])
                self._lt[slot] = self._lt_start[slot] = start
                self._lt_gain[slot] = long_term_gain(thr, level, start)
                self._need[slot] = max(self._k, long_term_windows(lt, sensor, thr, tol))

    def _complete(self) -> None:
        rest = self._batcher.flush()
        if rest is not None:
            self._ready.append(rest)
        if self._start is None:
            self._drain()
            return
        while self._inflight is not None or self._ready:
            self._advance(wait=True)

    def _drain(self) -> None:
        while self._ready:
            batch = self._ready.pop(0)
            t0 = time.perf_counter()
            if self._srow is None:
                rec_err, fc_err = self._scorer.errors(batch.windows)
            else:
                rec_err, fc_err = self._scorer.errors(  # type: ignore[call-arg]
                    batch.windows, self._scaler_rows([batch]))
            self._out.append(self._finish(batch, rec_err, fc_err, time.perf_counter() - t0))

    def _advance(self, wait: bool = False) -> None:
        """Async scorer: collect the task in inference if done (or ``wait``); start the next one
        with every queued batch."""
        fl = self._inflight
        if fl is not None:
            if not (wait or fl.handle.done()):
                return
            self._inflight = None
            rec_err, fc_err = fl.handle.result()
            seconds = time.perf_counter() - fl.t0
        if self._ready:  # start the next task first: the model works while we finish this one
            batches, self._ready = self._ready, []
            windows = (batches[0].windows if len(batches) == 1
                       else np.concatenate([b.windows for b in batches]))
            assert self._start is not None
            # each batch in a model call of its own, as _drain scores it (a deadline's short
            # batch ahead of full ones is not merged into their calls)
            sizes = [len(b) for b in batches]
            if self._srow is None:
                handle = self._start(windows, sizes)
            else:
                handle = self._start(windows, sizes, self._scaler_rows(batches))
            self._inflight = _InFlight(batches, handle, time.perf_counter())
        if fl is not None:
            per_batch = seconds / len(fl.batches)
            at = 0
            for b in fl.batches:
                n = len(b)
                self._out.append(self._finish(b, rec_err[at : at + n], fc_err[at : at + n],
                                              per_batch))
                at += n

    def _scaler_rows(self, batches: list[Batch]) -> np.ndarray:
        """Each window's row of the input scaler table, from the slots its items carry."""
        assert self._srow is not None
        slot = itemgetter(1)
        slots = np.fromiter((slot(it) for b in batches for it in b.items), dtype=np.intp,
                            count=sum(len(b) for b in batches))
        return self._srow[slots]

    def _take(self) -> list[ScoredBatch]:
        out, self._out = self._out, []
        return out

    def _scores(self, raw: np.ndarray, sl: np.ndarray, thr: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The reported scores of a batch's windows (``raw``: their window scores; ``sl``,
        ``thr``: their slots and thresholds): smoothed, or the long-term term where higher;
        whether each window counts towards exactness (see :meth:`inexact`); and the long-term
        terms (None without one). Advances each sensor's smoothing ring, long-term level and
        window count."""
        m = len(sl)
        if self._k == 1 and self._lt_spec is None:
            return raw, np.ones(m, dtype=bool), None
        order, gstarts, rank = group_ranks(sl)
        sls = sl[order]
        c0 = self._sm_n[sls]
        c = c0 + rank  # windows of the sensor before this one
        smoothed = raw if self._k == 1 else self._smooth(raw, order, gstarts, sls, c0, c)
        long_term = None
        if self._lt_spec is not None:
            long_term = self._long_term(raw, thr, order, gstarts, sls, rank)
            smoothed = np.maximum(smoothed, long_term)
        full = np.empty(m, dtype=bool)
        full[order] = c + 1 >= (self._need[sls] if long_term is not None else self._k)
        self._sm_n[sls[gstarts]] += np.diff(np.append(gstarts, m))
        return smoothed, full, long_term

    def _smooth(self, raw: np.ndarray, order: np.ndarray, starts: np.ndarray, sls: np.ndarray,
                c0: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Per sensor, the mean of its last ``k`` raw scores (this one included), in window
        order, as :func:`~stream_detector.scoring.smooth` computes offline (``k`` > 1).
        The grouping of the batch by slot: ``order``/``starts`` (:func:`group_ranks`), ``sls``
        the slots in that order, ``c0`` their window counts before the batch and ``c`` before
        each window.

        The sensor keeps its last ``k`` raw scores in a ring (slot row ``_sm_ring``). Each
        window's row is that ring as it is after the window's own score went in (position
        ``p`` holds the newest count ``= p mod k``; zeros before the ring is full), so the
        sum is taken in the same order whatever the batch holds."""
        k = self._k
        rs = raw[order]
        rank = c - c0
        q = c[:, None] - (c[:, None] - np.arange(k)) % k  # count held at ring position p
        ring = self._sm_ring[sls]  # (m, k): the ring before this batch
        fresh = q >= c0[:, None]
        if fresh.any():
            gstart = np.repeat(starts, np.diff(np.append(starts, len(sls))))
            rows = gstart[:, None] + (q - c0[:, None])
            ring[fresh] = rs[rows[fresh]]
        ring[q < 0] = 0.0
        # summed oldest to newest (count x sits at position x mod k), as the offline smoothing
        # sums each window: the same scores whatever count a sensor's ring started from (a
        # rebuild from another offset), and offline's exactly
        chrono = np.take_along_axis(ring, (c[:, None] + 1 + np.arange(k)) % k, axis=1)
        smoothed = np.empty_like(raw)
        smoothed[order] = chrono.sum(axis=1) / np.minimum(c + 1, k)
        sizes = np.diff(np.append(starts, len(sls)))
        keep = (np.repeat(sizes, sizes) - rank) <= k
        self._sm_ring[sls[keep], c[keep] % k] = rs[keep]
        return smoothed

    def _long_term(self, raw: np.ndarray, thr: np.ndarray, order: np.ndarray,
                   starts: np.ndarray, sls: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """Each window's long-term term in score units, from ``L`` after the window's own
        clipped score went in (:func:`~stream_detector.scoring.long_term_term`). Updates each
        sensor's ``L`` in window order with the operations
        :func:`~stream_detector.scoring.long_term` does offline: the two agree bit for bit
        whatever the batch holds."""
        a = self._alpha
        x = np.minimum(raw[order], thr[order])
        lt = self._lt
        out = np.empty(len(x))
        rounds = int(rank.max()) + 1
        if rounds <= 8:  # a few windows per sensor: one vector step per rank
            for r in range(rounds):
                at = np.flatnonzero(rank == r) if rounds > 1 else slice(None)
                s_r = sls[at]
                cur = lt[s_r]
                cur = cur + a * (x[at] - cur)
                lt[s_r] = cur
                out[at] = cur
        else:  # long runs of one sensor: a scalar loop (the same double operations)
            xs, slots, levels, ranks = x.tolist(), sls.tolist(), out.tolist(), rank.tolist()
            ends = set((np.append(starts[1:], len(xs)) - 1).tolist())
            cur = 0.0
            for i, v in enumerate(xs):
                if ranks[i] == 0:
                    cur = float(lt[slots[i]])
                cur = cur + a * (v - cur)
                levels[i] = cur
                if i in ends:
                    lt[slots[i]] = cur
            out = np.asarray(levels)
        res = np.empty_like(out)
        res[order] = long_term_units(out, self._lt_start[sls], self._lt_gain[sls])
        return res

    def _finish(self, batch: Batch, rec_err: np.ndarray, fc_err: np.ndarray,
                seconds: float) -> ScoredBatch:
        if self.on_batch is not None:
            self.on_batch(len(batch), seconds)
        self.batch_sizes.append(len(batch))
        if len(self.batch_sizes) > 10_000:
            del self.batch_sizes[:5_000]
        sensors, slot_list, starts, ends, refs = zip(*batch.items, strict=True)
        sl = np.array(slot_list, dtype=np.intp)
        scored = self._score_fn(rec_err, fc_err, self._row[sl])
        raw = scored.score
        thr = self._thr[sl]
        m = len(sl)
        smoothed, full, long_term = self._scores(raw, sl, thr)
        inexact = np.flatnonzero(self._calm[sl] < self._hyst.clear_after)
        if len(inexact):  # windows of sensors not yet exact (none once all are)
            self._count_calm(sl[inexact], smoothed[inexact], thr[inexact], full[inexact])
        levels = [_NORMAL_LABEL] * m
        alerts: dict[int, Alert] = {}
        # Only windows that can change an alert state go through the per-sensor state machine:
        # from a sensor's first window that reaches the warning level (or from its first window
        # when an episode is already open) on. The others are "normal" and leave it untouched.
        with np.errstate(divide="ignore", invalid="ignore"):
            cand = (thr <= 0) | (smoothed / thr >= self._hyst.warning_ratio) | self._open[sl]
        if cand.any():
            idx = np.flatnonzero(cand)
            uniq, first = np.unique(sl[idx], return_index=True)
            at = np.minimum(np.searchsorted(uniq, sl), len(uniq) - 1)
            from_j = np.where(uniq[at] == sl, idx[first][at], m)
            todo = np.flatnonzero(np.arange(m) >= from_j).tolist()
            self.counters["tracked"] += len(todo)
            self._track(todo, sensors, sl, starts, ends, smoothed, thr, scored, long_term,
                        levels, alerts)
        self.counters["windows"] += m
        return ScoredBatch(sensors, refs, list(starts), list(ends), smoothed.tolist(),
                           scored.reconstruction.tolist(), scored.forecast.tolist(),
                           thr.tolist(), levels, alerts, self.manifest.model_version)

    def _count_calm(self, sl: np.ndarray, smoothed: np.ndarray, thr: np.ndarray,
                    full: np.ndarray) -> None:
        """Advance each inexact sensor's run of calm windows (see :meth:`inexact`): fully
        smoothed and, with a long-term term, past its convergence count (``full``, from
        :meth:`_scores`), and below ``clear_ratio * threshold``.
        The arguments hold every window of this batch of those sensors, in order."""
        need, calm = self._hyst.clear_after, self._calm
        with np.errstate(divide="ignore", invalid="ignore"):
            quiet = ((thr > 0) & (smoothed / thr < self._hyst.clear_ratio) & full).tolist()
        for slot, ok in zip(sl.tolist(), quiet, strict=True):
            run = int(calm[slot])
            if run < need:
                calm[slot] = max(run, 0) + 1 if ok else 0

    def _track(self, todo: list[int], sensors: tuple[str, ...], sl: np.ndarray,
               starts: tuple[int, ...], ends: tuple[int, ...], smoothed: np.ndarray,
               thr: np.ndarray, scored: Any, long_term: np.ndarray | None, levels: list[str],
               alerts: dict[int, Alert]) -> None:
        hyst, trackers = self._hyst, self._trackers
        version = self.manifest.model_version
        now_ms = self._wall_ms()
        score_l, thr_l = smoothed.tolist(), thr.tolist()
        resolve, normal = EventKind.RESOLVE, Level.NORMAL
        touched = {}
        for j in todo:
            sensor = sensors[j]
            tracker = trackers.get(sensor)
            if tracker is None:
                tracker = trackers[sensor] = EpisodeTracker()
            touched[sl[j]] = tracker
            score, threshold, end_ms = score_l[j], thr_l[j], ends[j]
            event = tracker.step(end_ms, score, threshold, hyst)
            if event is None:
                levels[j] = _LABELS[tracker.level]
                continue
            levels[j] = _LABELS[tracker.level if event.kind != resolve else normal]
            alerts[j] = Alert(
                alert_id=alert_id(sensor, event.episode_start_ms, version),
                event=event.kind.value,
                sensor=sensor,
                level=event.level.label,
                score=score,
                peak_score=event.peak_score,
                threshold=threshold,
                reconstruction_error=float(scored.reconstruction[j]),
                forecast_error=float(scored.forecast[j]),
                top_features=self._top_features(scored.contributions[j]),
                episode_start_ms=event.episode_start_ms,
                window_start_ms=starts[j],
                window_end_ms=end_ms,
                model_version=version,
                detected_at_ms=now_ms,
                long_term_score=None if long_term is None else float(long_term[j]),
            )
        for slot, tracker in touched.items():
            self._open[slot] = tracker.open

    def _top_features(self, contrib: np.ndarray) -> tuple[tuple[str, float], ...]:
        """The ``top_features`` largest contributions, largest first; features that contribute
        nothing (weight 0 in the artifact, e.g. SMAP/MSL command flags) are never named."""
        k = self._top
        idx = np.argpartition(-contrib, k - 1)[:k] if k < len(contrib) else np.arange(len(contrib))
        idx = idx[np.argsort(-contrib[idx], kind="stable")]
        top = ((self._features[i], round(float(contrib[i]), 6)) for i in idx)
        return tuple(t for t in top if t[1] > 0)  # as rounded: never a listed 0.0
