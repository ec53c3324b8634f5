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
    """Anything that maps raw windows ``(B, W, F)`` to per-feature errors ``(B, F)`` x 2."""

    def errors(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


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
    __slots__ = ("smoother", "tracker", "threshold")

    def __init__(self, k: int, threshold: float) -> None:
        self.smoother = Smoother(k)
        self.tracker = EpisodeTracker()
        self.threshold = threshold


class Detector:
    """Readings in, :class:`Result` objects out.

    ``submit`` returns the reading's :class:`~stream_detector.windows.Status`: ``READY`` means a
    window is queued and its result will come out of a later ``poll``/``flush`` call; ``WARMING``
    means the reading was absorbed (no window yet); ``LATE``/``FULL`` mean it was rejected.
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
        self._wall_ms = wall_clock_ms
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
        return status

    # -- output ------------------------------------------------------------------------
    def poll(self) -> list[Result]:
        """Score full batches and the pending batch if its deadline passed; never blocks."""
        due = self._batcher.poll()
        if due is not None:
            self._ready.append(due)
        return self._drain()

    def flush(self) -> list[Result]:
        """Score everything pending now (shutdown, revocation, end of replay)."""
        rest = self._batcher.flush()
        if rest is not None:
            self._ready.append(rest)
        return self._drain()

    def next_deadline(self) -> float | None:
        return self._batcher.deadline()

    @property
    def pending(self) -> int:
        return len(self._batcher) + sum(len(b) for b in self._ready)

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

    def _sensor(self, sensor: str) -> _SensorState:
        st = self._state.get(sensor)
        if st is None:
            st = _SensorState(
                self.manifest.score.smoothing, self.manifest.thresholds.for_sensor(sensor)
            )
            self._state[sensor] = st
        return st

    def _score(self, batch: Batch) -> list[Result]:
        t0 = time.perf_counter()
        rec_err, fc_err = self._scorer.errors(batch.windows)
        if self.on_batch is not None:
            self.on_batch(len(batch), time.perf_counter() - t0)
        self.batch_sizes.append(len(batch))
        if len(self.batch_sizes) > 10_000:
            del self.batch_sizes[:5_000]
        scored = self._score_fn(rec_err, fc_err)
        now_ms = self._wall_ms()
        version = self.manifest.model_version
        results = []
        raw = scored.score.tolist()
        recs = scored.reconstruction.tolist()
        fcs = scored.forecast.tolist()
        states = self._state
        hyst = self._hyst
        for j, item in enumerate(batch.items):
            st = states.get(item.sensor)
            if st is None:
                st = self._sensor(item.sensor)
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


