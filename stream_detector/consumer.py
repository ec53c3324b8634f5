"""The Kafka driver: consume -> decode -> Detector -> publish -> store offsets.

Delivery guarantee: **at least once.**

* ``enable.auto.offset.store=false``: an input offset is stored (and then committed by the
  background auto-commit, or synchronously on revoke and shutdown) only when everything derived
  from that reading is done: the reading was rejected to the dead-letter topic and the broker
  acknowledged that record, or it only warmed a window, or its window was scored and every
  record produced from it (alert, score) was acknowledged by the broker (delivery callback).
  Offsets are stored in order per partition: one unfinished reading holds back the later ones.
  They are tracked a chunk at a time (the readings of one partition in one ``consume()``
  batch), so a chunk's offsets are stored together once every reading in it is done.
* The producer is idempotent (``enable.idempotence=true``, ``acks=all``), so its own retries
  neither duplicate nor reorder alerts. A delivery that finally fails stops the service without
  storing the offset; the restarted consumer re-reads from the last committed offset.
* Re-processing after a crash or rebalance can re-publish alerts. Every alert carries a
  deterministic ``alert_id`` (sensor, episode start, model version) and ``event_id``; subscribers
  deduplicate on ``event_id``.

State after restart or rebalance: when a partition is assigned and it has a committed offset
``C``, the consumer seeks to ``max(low watermark, C - rebuild_lookback)`` and feeds the records
before ``C`` through the detector *silently* (no alert, no score record, no offset store), so
ring buffers, score smoothing and alert hysteresis are rebuilt as an uninterrupted consumer had
them. Before the first live record the rebuild is checked (:meth:`DetectorService._end_rebuilds`):
while a sensor it found is *inexact* (:meth:`Detector.inexact`: its open episode may have
begun before the look-back, or an earlier one may still be open) or has no full window though
one would fit in the maximum, those sensors are forgotten and rebuilt with twice the look-back,
up to ``SD_SERVICE__REBUILD_MAX_LOOKBACK`` or the log's start. An episode that began beyond that
goes on under a new ``alert_id`` and the old one gets no resolve (docs/messages.md tells
subscribers how to read that). Cost: re-reading and scoring the look-back per assigned
partition (less than three times the final one fetched, when it deepens). On revocation the
detector is flushed, results are delivered, offsets are committed synchronously, and the
partition's sensors (those whose latest reading came from it) are forgotten. If that drain has
to give records up (the producer's queue stayed full for its whole budget, half the grace
period) while other partitions stay assigned, the service stops with a fatal error: those
partitions' unpublished records would hold their offsets back for good, and a restart reads
them again from the committed offsets. Any other error in the loop (a failing model task, a
bug) stops it the same way: the consumer is closed (what was delivered is committed, the group
is left at once) and the exit code is 2.
"""

from __future__ import annotations

import contextlib
import gc
import math
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, cast

import numpy as np
import orjson
import structlog
from confluent_kafka import (
    OFFSET_BEGINNING,
    OFFSET_INVALID,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from stream_detector import __version__
from stream_detector.config import Settings
from stream_detector.detector import Detector, ScoredBatch, Scorer
from stream_detector.errors import ConfigError, StreamDetectorError
from stream_detector.logs import flush_kafka_log, kafka_logger
from stream_detector.manifest import Manifest
from stream_detector.observability import HealthServer, HealthState, Metrics
from stream_detector.records import Alert, DecodedBatch, ReadingDecoder, dead_letter
from stream_detector.windows import FULL, LATE, READY, WARMING

log = structlog.get_logger(__name__)

TP = tuple[str, int]

GIL_SWITCH_INTERVAL_S = 0.0005
#: Most bytes of an input record a dead letter carries (base64: 4/3 as many): a whole record
#: near the broker's size limit would make the dead letter too large for the producer
#: (``message.max.bytes``, 1,000,000 by default), and the record could then never be passed on.
DEAD_LETTER_MAX_ORIGINAL_BYTES = 512 * 1024
#: How often the rebuild plan asks for a partition's end before it believes that the committed
#: offset lies beyond it, and how long it waits between the questions.
WATERMARK_ASKS = 3
WATERMARK_RETRY_S = 0.2

_gc_lock = threading.Lock()
_gc_users = 0
_gc_saved: tuple[int, int, int] | None = None
_gc_froze = False


@contextlib.contextmanager
def tuned_gc(threshold: int, freeze: bool) -> Iterator[None]:
    """Python's cycle collector tuned for the consumer loop for the block.

    ``threshold`` (0 = leave as is) replaces the young-generation threshold; ``freeze`` collects
    once and moves every live object to the permanent generation (``gc.freeze``), so later full
    collections skip torch, the model and everything else built at start-up. Nested or
    concurrent uses (several services in one process, as in tests) share one tuning: the first
    applies it, the last restores the thresholds and unfreezes.
    """
    global _gc_users, _gc_saved, _gc_froze
    with _gc_lock:
        _gc_users += 1
        if _gc_users == 1:
            _gc_saved = gc.get_threshold()
            if threshold:
                gc.set_threshold(threshold, _gc_saved[1], _gc_saved[2])
            _gc_froze = freeze
            if freeze:
                gc.collect()
                gc.freeze()
    try:
        yield
    finally:
        with _gc_lock:
            _gc_users -= 1
            if _gc_users == 0 and _gc_saved is not None:
                gc.set_threshold(*_gc_saved)
                if _gc_froze:
                    gc.unfreeze()
                _gc_saved, _gc_froze = None, False


_chunk_of = itemgetter(0)


class Chunk:
    """The readings of one partition from one ``consume()`` batch, tracked as one unit: their
    offsets are stored together once every hold on every one of them is released.

    ``end`` is the offset to store when the chunk is done (its last offset + 1); ``pending``
    the holds left (one per reading from :meth:`OffsetTracker.begin`, one more per record in
    flight); ``gen`` the partition's generation when the readings were read; ``born`` when
    they were consumed (the caller's clock, for the processing-time metric)."""

    __slots__ = ("tp", "gen", "end", "size", "pending", "born")

    def __init__(self, tp: TP, gen: object, end: int, size: int, born: float = 0.0) -> None:
        self.tp = tp
        self.gen = gen
        self.end = end
        self.size = size
        self.pending = size
        self.born = born


class OffsetTracker:
    """In-order completion tracking per partition (pure; no Kafka), a chunk of readings at a
    time: the Python cost is per partition and batch, not per reading.

    ``begin(tp, end, n, born)`` registers ``n`` readings of ``tp`` whose last offset is
    ``end - 1``, each with one pending hold, and returns their :class:`Chunk`; ``hold`` adds
    holds, ``release`` removes them. ``advance`` returns, per partition, the next offset to
    store: the ``end`` of the longest prefix of finished chunks. ``take_settled`` returns the
    chunks finished since its last call (each once), for the processing-time metric.

    A partition dropped (revoked or lost) and assigned again gets a new *generation*, so a hold
    or release on a chunk of the old one (a scored window or a delivery report of a reading
    read before the partition was lost) is ignored instead of touching the new assignment's
    offsets, even when the same offsets are read again. So is a release after the chunk's
    offsets were stored (a duplicate callback).
    """

    def __init__(self) -> None:
        self._chunks: dict[TP, deque[Chunk]] = {}
        self._gen: dict[TP, object] = {}
        self._dirty: set[TP] = set()
        self._settled: list[Chunk] = []

    def begin(self, tp: TP, end: int, n: int = 1, born: float = 0.0) -> Chunk:
        if n < 1:
            raise ValueError(f"a chunk holds at least one reading, got {n}")
        q = self._chunks.get(tp)
        if q is None:  # first chunk of this partition (both maps gain and lose tp together)
            q = self._chunks[tp] = deque()
            self._gen[tp] = object()
        chunk = Chunk(tp, self._gen[tp], end, n, born)
        q.append(chunk)
        return chunk

    def current(self, chunk: Chunk) -> bool:
        """Whether the chunk belongs to its partition's current assignment."""
        return self._gen.get(chunk.tp) is chunk.gen

    def hold(self, chunk: Chunk, k: int = 1) -> None:
        if self._gen.get(chunk.tp) is chunk.gen and chunk.pending > 0:
            chunk.pending += k

    def release(self, chunk: Chunk, k: int = 1) -> None:
        if self._gen.get(chunk.tp) is not chunk.gen or chunk.pending <= 0:
            return  # partition revoked or lost meanwhile, or the chunk is already done
        chunk.pending -= k
        if chunk.pending <= 0:
            self._dirty.add(chunk.tp)
            self._settled.append(chunk)

    def take_settled(self) -> list[Chunk]:
        settled, self._settled = self._settled, []
        return settled

    def advance(self) -> dict[TP, int]:
        out: dict[TP, int] = {}
        for tp in self._dirty:
            q = self._chunks.get(tp)
            end = None
            while q and q[0].pending <= 0:
                end = q.popleft().end
            if end is not None:
                out[tp] = end
        self._dirty.clear()
        return out

    def in_flight(self, tp: TP | None = None) -> int:
        """Readings whose offsets are not stored yet (of ``tp``, or of every partition)."""
        if tp is not None:
            return sum(c.size for c in self._chunks.get(tp, ()))
        return sum(c.size for q in self._chunks.values() for c in q)

    def drop(self, tp: TP) -> None:
        self._chunks.pop(tp, None)
        self._gen.pop(tp, None)
        self._dirty.discard(tp)


@dataclass(frozen=True, slots=True)
class _Rebuild:
    """A partition's rebuild in progress: records ``start`` to ``committed - 1`` are read
    silently; ``low`` is the log's start when it was planned. A deepened rebuild reads only
    the records of the sensors it forgot, not those keyed by a sensor in ``keep``."""

    committed: int
    low: int
    start: int
    lookback: int
    keep: frozenset[bytes] = frozenset()  # keys of the sensors whose rebuilt state is kept
    recent: frozenset[str] | None = None  # the sensors of the first pass (None: this is it)


#: The driver's token of a reading, handed to the Detector and back: its chunk (None for a
#: silent rebuild reading) and its Kafka timestamp (for the reading -> alert latency metric).
Ref = tuple[Chunk | None, int]


class FatalError(StreamDetectorError):
    """The service cannot keep its delivery guarantee and must stop (and be restarted)."""


class _Abandoned(Exception):
    """Stopping while the producer's local queue is full: the records not yet handed to the
    producer are given up (their readings' offsets are not stored, so they are read again)."""


def wait_s(limit_s: float, deadline: float | None, now: float) -> float:
    """How long the loop may block in ``consume()``: until ``deadline`` (the detector's next
    one; None: none), at most ``limit_s``, rounded *up* to whole milliseconds. librdkafka takes
    whole milliseconds and the client truncates (a 0.9 ms timeout is 0: a call that returns at
    once), so without the rounding the loop spun without pause while a model task was in
    flight (its deadline is 1 ms ahead) and burnt a core at any input rate."""
    t = limit_s if deadline is None else min(limit_s, deadline - now)
    if t <= 0:
        return 0.0
    return math.ceil(t * 1000.0 - 1e-9) / 1000.0


def check_client_settings(settings: Settings) -> None:
    """Build (and close) the service's consumer and producer from ``settings``: librdkafka
    checks every property then, the per-client extras included (ConfigError if refused).
    Nothing is consumed or produced."""
    consumer = _client(Consumer, settings.kafka.consumer_config())
    consumer.close()
    producer = _client(Producer, settings.kafka.producer_config())
    producer.flush(0)
    del producer


def _client(cls: Any, conf: dict[str, Any]) -> Any:
    """A librdkafka client with its log lines as structured log events; a configuration that
    librdkafka refuses (a mistyped SD_KAFKA__EXTRA property, a bad value) is a ConfigError."""
    conf = {**conf, "logger": kafka_logger()}
    try:
        return cls(conf)
    except (KafkaException, ValueError, TypeError) as exc:
        raise ConfigError(f"librdkafka refused the client settings (check SD_KAFKA__EXTRA, "
                          f"SD_KAFKA__CONSUMER_EXTRA, SD_KAFKA__PRODUCER_EXTRA and the other "
                          f"SD_KAFKA__* values): {exc}") from None


def _score_named(msg: Message | None) -> str:
    """A score record named in an error, from the message the delivery report carries."""
    value = (msg.value() if msg is not None else None) or b""
    try:
        doc = orjson.loads(value)
        what = f"score of sensor {doc['sensor']} {doc['window_end']}"
    except Exception:  # noqa: BLE001 - only naming the record; never fail here
        what = "score record"
    return f"{what} ({len(value)} bytes)"


def _describe(context: tuple[Any, ...], value: bytes | None) -> str:
    """A produced record, named in an error: what it is (``context``) and its size."""
    return " ".join(map(str, (*context, f"({len(value)} bytes)" if value is not None
                              else "(size unknown)")))


def wait_for_broker(settings: Settings, sleep: Callable[[float], None] = time.sleep,
                    *, beat: Callable[[], None] | None = None,
                    stop: threading.Event | None = None) -> bool:
    """Retry the metadata request with exponential backoff; raise FatalError when out of tries.

    ``beat`` is called on every attempt (the liveness heartbeat: a pod waiting for its broker is
    alive, not stuck); with ``stop``, the waits end early when it is set (SIGTERM) and False is
    returned. True once the broker answered.
    """
    svc = settings.service
    admin = _client(AdminClient, settings.kafka.common())
    delay = svc.startup_backoff_s
    for attempt in range(svc.startup_retries + 1):
        if beat is not None:
            beat()
        if stop is not None and stop.is_set():
            return False
        try:
            md = admin.list_topics(timeout=5)
            if settings.kafka.input_topic not in md.topics:
                log.warning("input topic not found yet", topic=settings.kafka.input_topic)
            return True
        except KafkaException as exc:
            if attempt == svc.startup_retries:
                break
            log.warning("broker unreachable, retrying", attempt=attempt + 1,
                        retry_in_s=delay, error=str(exc.args[0]))
            if stop is not None:
                # in steps of at most 1 s, each with a heartbeat: a wait of up to 30 s must
                # not read as a stuck loop to the liveness probe (its limit is 30 s)
                left = delay
                while left > 0:
                    step = min(left, 1.0)
                    if stop.wait(step):
                        return False
                    left -= step
                    if beat is not None:
                        beat()
            else:
                sleep(delay)
            delay = min(delay * 2, 30.0)
    raise FatalError(
        f"broker {settings.kafka.bootstrap_servers} unreachable after "
        f"{svc.startup_retries + 1} attempts"
    )


class DetectorService:
    """Runs the consumer loop. Build with settings, a manifest and a scorer; call :meth:`run`.

    The constructor does no I/O; Kafka clients are created in :meth:`run`.
    """

    def __init__(
        self,
        settings: Settings,
        manifest: Manifest,
        scorer: Scorer,
        *,
        rebuild_lookback: int | None = None,
        metrics: Metrics | None = None,
        serve_http: bool = True,
    ) -> None:
        self.settings = settings
        self.manifest = manifest
        self.scorer = scorer
        self.rebuild_lookback = (settings.service.rebuild_lookback if rebuild_lookback is None
                                 else rebuild_lookback)
        # never below the look-back itself (an explicit --rebuild-lookback above it: no deepening)
        self.rebuild_max_lookback = max(settings.service.rebuild_max_lookback,
                                        self.rebuild_lookback)
        self.metrics = metrics or Metrics()
        self.health = HealthState()
        self.serve_http = serve_http
        self.http: HealthServer | None = None
        self._stop = threading.Event()
        self._fatal: str | None = None
        self.detector: Detector | None = None
        self.tracker = OffsetTracker()
        self._silent_until: dict[TP, int] = {}
        self._rebuilds: dict[TP, _Rebuild] = {}  # rebuilds whose exactness is checked at the end
        # partitions sent to an absolute offset inside the log to rebuild, until their first
        # record: its committed offset (see _catch_jumps)
        self._jump_watch: dict[TP, int] = {}
        self._sensor_tp: dict[str, TP] = {}
        self._owned: set[TP] = set()  # partitions assigned to this instance now
        self._touched: set[TP] = set()  # partitions a rebalance callback changed (see _loop)
        #: shutdown: the broker did not confirm the final commit and the group leave within
        #: the grace period; the client is still waiting (serve exits without it)
        self.close_abandoned = False
        self._drain_deadline: float | None = None  # shutdown: when the grace period ends
        self._wait_until: float | None = None  # a drain's end: the queue wait gives up there
        self._abandoned = False  # records given up in a full queue (exit code 1, not 0)
        self._drain_abandoned = False  # the latest _drain_all gave records up
        # dead letters to send again without their payload: a delivery callback must not
        # produce (nor poll, as a full queue would make it), so they wait for the loop
        self._resend: list[tuple[Any, ...]] = []
        self._max_future_ms = settings.detector.max_future_s * 1000.0
        self._limit_warn_at, self._limit_refused = 0.0, 0  # sensor-limit warnings
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self.iterations = 0  # of the consume loop (each blocks in consume() or has work)

    # -- lifecycle -----------------------------------------------------------------------
    def stop(self, *_: Any) -> None:
        """Ask the loop to drain and exit (signal-safe)."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    @property
    def failure(self) -> str | None:
        """Why the service is stopping with an error (a failed delivery, a fatal consumer
        error), or None while it is healthy; set from librdkafka's callbacks."""
        return self._fatal

    def run(self) -> int:
        """Run until stopped. Returns the process exit code (0 = clean drain)."""
        # The model runs on torch's own thread, without the GIL: its task gets copies of the
        # windows so that it never drops a tensor that has a Python object (model/runtime.py).
        # Before that, each task waited for the GIL, up to Python's default 5 ms switch
        # interval while this thread decoded, and 0.5 ms was the remedy. It stays as a bound
        # for any other thread that needs the GIL (the HTTP server, a task that drops its
        # results after the loop took them): the loop gives the GIL up within 0.5 ms. With the
        # copies, 0.5 ms and 5 ms gave the same end-to-end rate (4 runs each, 2026-11-27).
        # Restored when the loop ends.
        switch = sys.getswitchinterval()
        sys.setswitchinterval(min(switch, GIL_SWITCH_INTERVAL_S))
        try:
            return self._run()
        finally:
            sys.setswitchinterval(switch)

    def _run(self) -> int:
        s = self.settings
        if self.serve_http:
            self.http = HealthServer(s.service.http_host, s.service.http_port,
                                     self.metrics, self.health)
            self.http.start()
        try:
            # librdkafka's own check of every property (the per-client extras included) before
            # the broker wait: with the broker away, a mistyped consumer property was named
            # only after the retries (about 4 minutes), as "broker unreachable" (review)
            check_client_settings(s)
            if not wait_for_broker(s, beat=self.health.beat, stop=self._stop):
                log.info("stopped while waiting for the broker")
                return 0
            self.detector = Detector(self.manifest, self.scorer, s.detector)
            self.detector.on_batch = self._observe_batch
            self._producer = _client(Producer, s.kafka.producer_config())
            conf = s.kafka.consumer_config()
            conf["statistics.interval.ms"] = 5000
            conf["stats_cb"] = self._on_stats
            self._consumer = _client(Consumer, conf)
            self._consumer.subscribe(
                [s.kafka.input_topic], on_assign=self._on_assign,
                on_revoke=self._on_revoke, on_lost=self._on_lost,
            )
            log.info("consumer started", topic=s.kafka.input_topic, group=s.kafka.group_id,
                     model_version=self.manifest.model_version, version=__version__,
                     http=self.http.address if self.http is not None else None)
            # after start-up: the model, torch and the clients are built and will not die
            gc_timer = self.metrics.gc_callback()
            gc.callbacks.append(gc_timer)
            try:
                try:
                    # _Abandoned: stopped while the producer's queue was full
                    with tuned_gc(s.service.gc_threshold, s.service.gc_freeze), \
                            contextlib.suppress(_Abandoned):
                        self._loop()
                finally:
                    gc.callbacks.remove(gc_timer)
                return self._shutdown()
            except FatalError:
                raise
            except Exception as exc:
                # a failing model task (torch raises RuntimeError), a bug, in the loop or in
                # the shutdown's drain: stop as for a fatal error, so that the consumer is
                # closed (what was delivered is committed, the group is left now rather than
                # after a session timeout), with the traceback logged
                log.exception("unexpected error in the consumer loop")
                raise FatalError(f"unexpected error: {type(exc).__name__}: {exc}"[:500]) from exc
        except FatalError as exc:
            log.error("fatal", error=str(exc))
            self._close_after_fatal()
            return 2
        finally:
            if self.http is not None:
                self.http.stop()
            self._release_clients()
            flush_kafka_log()  # held-back repeats (after a fatal error, waiting for the broker)

    # -- the hot loop ------------------------------------------------------------------
    def _loop(self) -> None:
        assert self._consumer is not None and self._producer is not None
        k = self.settings.kafka
        decoder = ReadingDecoder(self.manifest.features, self.settings.service.max_message_bytes)
        consumer, producer, detector = self._consumer, self._producer, self.detector
        assert detector is not None
        while not self._stop.is_set():
            if self._fatal:
                raise FatalError(self._fatal)
            self.health.beat()
            self.iterations += 1
            # What is already buffered, without waiting for a full batch; only when nothing is
            # there, block until the first message arrives (or the timeout). A single
            # consume(consume_batch, timeout) would hold buffered readings back until the batch
            # is full or the timeout expires, adding up to consume_timeout_s of latency.
            messages = consumer.consume(k.consume_batch, 0)
            if not messages:
                # The local queue is drained. The last consume() may have been full and emptied
                # it: before blocking, the model may take what waits (idle dispatch).
                self._publish(detector.poll_batches(idle=True))
                timeout = wait_s(k.consume_timeout_s, detector.next_deadline(), time.monotonic())
                messages = consumer.consume(1, timeout) if timeout > 0 else []
                if messages and k.consume_batch > 1:
                    self._touched.clear()
                    more = consumer.consume(k.consume_batch - 1, 0)
                    if self._touched:
                        # a rebalance callback ran inside that call: the message(s) of the
                        # previous call from a partition it revoked, lost or reassigned are
                        # outdated (librdkafka drops those only within one call). Not ingested
                        # and not stored: the partition's owner reads them again.
                        touched = self._touched
                        messages = [m for m in messages if m.error() is not None
                                    or (m.topic(), m.partition()) not in touched]
                    messages.extend(more)
            if messages:
                self._ingest(messages, decoder, detector)
            # a short consume(): the local queue is drained, so the model may take what waits
            self._publish(detector.poll_batches(idle=len(messages) < k.consume_batch))
            producer.poll(0)
            if self._resend:
                self._send_resends()
            self._store_offsets()

    def _ingest(self, messages: list[Message], decoder: ReadingDecoder,
                detector: Detector) -> None:
        """Decode and submit one ``consume()`` batch, in order. A partition whose checked
        rebuild reaches its committed offset in this batch is checked before its first live
        reading goes in (:meth:`_end_rebuilds`): either its live readings follow, or the rebuild
        starts again from further back and they are read again after it."""
        ended: dict[TP, list[Message]] = {}
        if self._jump_watch:
            messages = self._catch_jumps(messages)
        if self._rebuilds:
            messages, ended = self._split_rebuild_ends(messages)
        self._ingest_batch(messages, decoder, detector)
        if ended:
            done = self._end_rebuilds(list(ended), detector)
            live = [m for tp in done for m in ended[tp]]
            if live:
                self._ingest_batch(live, decoder, detector)

    def _catch_jumps(self, messages: list[Message]) -> list[Message]:
        """A rebuild that starts inside the log is an absolute offset: if retention deletes it
        between the watermark request and the fetch, the fetch is out of range and
        ``auto.offset.reset=latest`` moves it to the log's end, past the committed offset, and
        every record in between would never be scored (the offsets after them stored). The
        first record of such a partition after the committed offset shows it: the partition
        is read again from its (new) start, silently up to the committed offset, and this
        batch's records of it are dropped (read again after the seek)."""
        watch = self._jump_watch
        kept, jumped = [], set()
        for msg in messages:
            if msg.error() is None:
                tp = cast("TP", (msg.topic(), msg.partition()))
                if tp in jumped:
                    continue
                committed = watch.pop(tp, None)
                if committed is not None and cast(int, msg.offset()) > committed:
                    jumped.add(tp)
                    assert self._consumer is not None
                    log.warning("the rebuild's fetch went past the committed offset (retention "
                                "removed its start, and auto.offset.reset moved it); reading "
                                "the partition again from its start", topic=tp[0],
                                partition=tp[1], committed=committed, fetched=msg.offset())
                    self._consumer.seek(TopicPartition(tp[0], tp[1], OFFSET_BEGINNING))
                    continue
            kept.append(msg)
        return kept

    def _split_rebuild_ends(self, messages: list[Message]
                            ) -> tuple[list[Message], dict[TP, list[Message]]]:
        """The batch without the live records (at or after the committed offset) of the
        partitions whose checked rebuild has read its last record here, and those records.
        A deepened rebuild's records of sensors whose state was kept (exact) are left out too:
        keyed by their sensor id, they would only be late readings of those sensors."""
        rebuilds = self._rebuilds
        ended: dict[TP, list[Message]] = {}
        kept = []
        skipped = 0
        for msg in messages:
            if msg.error() is None:
                tp = cast("TP", (msg.topic(), msg.partition()))
                rb = rebuilds.get(tp)
                if rb is not None:
                    offset = cast(int, msg.offset())
                    if offset >= rb.committed - 1 and tp not in ended:
                        ended[tp] = []
                    if offset >= rb.committed:
                        ended[tp].append(msg)
                        continue
                    if rb.keep and msg.key() in rb.keep:
                        skipped += 1
                        continue
            kept.append(msg)
        if skipped:
            self.metrics.rebuilt.inc(skipped)
        return kept, ended

    def _end_rebuilds(self, tps: list[TP], detector: Detector) -> list[TP]:
        """Check the rebuilt state of partitions whose rebuild read its last record. A
        partition is read again with twice the look-back (at most the maximum) while one of
        its sensors is inexact (:meth:`Detector.inexact`: an episode may have begun before the
        look-back, or one would still be open), or has no full window yet though its share of
        the records read says one would fit within the maximum look-back (a sensor too rare
        for that starts cold, and does not make every rebalance read to the maximum), until
        the look-back reaches its maximum or the log's start. Only those sensors start over;
        the others keep their state. Every sensor the rebuild found is checked, also one first
        found in a deeper pass (a sensor a short first look-back missed is as active as the
        others; one silent in an open episode keeps the deepening going only while its last
        readings lie within the maximum look-back). Returns the partitions done."""
        self._publish(detector.flush_batches())  # the rebuild's readings are all scored now
        done = []
        window = detector.manifest.window
        for tp in tps:
            rb = self._rebuilds.pop(tp, None)
            if rb is None:
                continue
            sensors = self._sensors_on({tp})
            inexact = detector.inexact(sensors)
            cold = detector.unscored(sensors)
            # n readings in `covered` records: a window needs about covered * W / n of them
            covered = max(1, rb.committed - rb.start)
            hopeful = [s for s in cold if covered * window
                       <= self.rebuild_max_lookback * detector.readings_of(s)]
            first = rb.recent if rb.recent is not None else frozenset(sensors)
            where = {"topic": tp[0], "partition": tp[1], "lookback": rb.lookback,
                     "from_offset": rb.start, "committed": rb.committed,
                     "sensors": len(sensors), "without_window": len(cold),
                     "not_in_first_lookback": len(sensors) - len(first.intersection(sensors))}
            if not inexact and not hopeful:
                log.info("rebuilt exactly" if not cold else
                         "rebuilt exactly; sensors too rare for a window in the maximum "
                         "look-back start cold", **where)
                done.append(tp)
                continue
            low = rb.low
            if rb.start > low and rb.lookback < self.rebuild_max_lookback:
                low = max(low, self._log_start(tp))  # retention may have moved it meanwhile
            if rb.start <= low or rb.lookback >= self.rebuild_max_lookback:
                # as far back as this partition's log or the setting allows
                if not inexact or (rb.start <= low and low == 0):
                    log.info("rebuilt as far back as allowed", log_start=low, **where)
                else:
                    log.warning(
                        "rebuild look-back exhausted: these sensors' alert state may differ "
                        "from an uninterrupted consumer's (an open episode continues under a "
                        "new alert_id, or one is not resolved)",
                        limit=("log start (retention deleted the older records)"
                               if rb.start <= low else
                               "SD_SERVICE__REBUILD_MAX_LOOKBACK (raise it to reach further)"),
                        inexact=len(inexact), examples=inexact[:5], log_start=low,
                        # a sensor with no reading in the first look-back may have gone silent
                        # (a failed sensor in an open episode): only its next reading, if any,
                        # would show the difference
                        inexact_not_in_first_lookback=len(set(inexact) - first), **where)
                    self.metrics.rebuild_inexact.inc(len(inexact))
                done.append(tp)
                continue
            lookback = min(self.rebuild_max_lookback, 2 * rb.lookback)
            start = max(low, rb.committed - lookback)
            assert self._consumer is not None
            try:
                # from the log's start: the logical offset, so that a retention run between
                # the watermark request and the fetch cannot make it out of range (and
                # auto.offset.reset=latest jump past the committed offset)
                self._consumer.seek(TopicPartition(tp[0], tp[1],
                                                   OFFSET_BEGINNING if start <= low else start))
                if start > low:
                    self._jump_watch[tp] = rb.committed
            except KafkaException as exc:  # best effort, like the rebuild itself
                log.warning("cannot deepen the rebuild; going on with this one",
                            error=str(exc)[:300], **where)
                done.append(tp)
                continue
            log.info("deepening the rebuild", inexact=len(inexact), examples=inexact[:5],
                     next_lookback=lookback, next_from_offset=start, **where)
            # only the inexact and the windowless sensors start over; the others keep their
            # state (their older readings would be late: skipped by key, or by the
            # detector as late if a record's key is not its sensor)
            redo = set(inexact).union(cold)
            for s in redo:
                del self._sensor_tp[s]
            detector.forget(redo)
            keep = rb.keep.union(s.encode() for s in sensors if s not in redo)
            self._rebuilds[tp] = _Rebuild(rb.committed, low, start, lookback, keep, first)
            self.metrics.rebuild_deepened.inc()
        return done

    def _sensors_on(self, tps: set[TP]) -> list[str]:
        """The sensors with state here whose readings come from partitions ``tps``."""
        return [s for s, tp in self._sensor_tp.items() if tp in tps]

    def _log_start(self, tp: TP) -> int:
        """The partition's low watermark now: librdkafka's figure from its latest fetch
        response for the partition (no round trip: it is being fetched), else asked of the
        broker; 0 when neither answers (the rebuild's own figure stands)."""
        assert self._consumer is not None
        part = TopicPartition(tp[0], tp[1])
        try:
            low, _ = self._consumer.get_watermark_offsets(part, cached=True)
            if low is None or low < 0:
                low, _ = self._consumer.get_watermark_offsets(part, timeout=10, cached=False)
            return int(low)
        except KafkaException as exc:
            log.warning("cannot read the partition's start", topic=tp[0], partition=tp[1],
                        error=str(exc)[:300])
            return 0

    def _ingest_batch(self, messages: list[Message], decoder: ReadingDecoder,
                      detector: Detector) -> None:
        """Decode and submit messages in order. The Kafka bookkeeping is one chunk per
        partition (:class:`OffsetTracker`); decoding and the ring buffers work on the whole
        batch."""
        tracker = self.tracker
        if any(msg.error() is not None for msg in messages):
            kept = []
            for msg in messages:
                err = msg.error()
                if err is None:
                    kept.append(msg)
                elif err.fatal():
                    raise FatalError(f"consumer error: {err}")
                else:
                    log.warning("consumer error", error=str(err))
            messages = kept
        if not messages:
            return
        # error events are filtered out above: every message has a topic, partition and offset
        tps = cast("list[TP]", list(zip(map(Message.topic, messages),
                                         map(Message.partition, messages), strict=True)))
        offsets = cast("list[int]", list(map(Message.offset, messages)))
        stamps = [msg.timestamp()[1] for msg in messages]
        last = dict(zip(tps, offsets, strict=True))  # per partition its last offset here
        silent_until = self._silent_until
        silent: list[bool] | None = None
        if silent_until and not silent_until.keys().isdisjoint(last):
            silent = [o < silent_until.get(tp, -1) for tp, o in zip(tps, offsets, strict=True)]
            for tp, o in last.items():  # a partition's rebuild is over once past its mark
                if o >= silent_until.get(tp, o + 1):
                    del silent_until[tp]
            counts = Counter(tp for tp, s in zip(tps, silent, strict=True) if not s)
        else:
            counts = Counter(tps)
        now = time.monotonic()
        chunks = {tp: tracker.begin(tp, last[tp] + 1, n, now) for tp, n in counts.items()}
        if silent is None:
            refs: list[Ref] = list(zip(map(chunks.__getitem__, tps), stamps, strict=True))
        else:
            refs = [(None if s else chunks[tp], ts)
                    for tp, ts, s in zip(tps, stamps, silent, strict=True)]
        m = self.metrics
        n_readings = sum(counts.values())
        if n_readings:
            m.readings.inc(n_readings)
        if n_readings < len(messages):
            m.rebuilt.inc(len(messages) - n_readings)
        batch = decoder.decode_many(list(map(Message.value, messages)))
        for i, bad in batch.bad:
            if bad.reason == "internal_error":
                log.error("unexpected decode failure", detail=bad.detail, topic=tps[i][0],
                          partition=tps[i][1], offset=offsets[i])
            chunk = refs[i][0]
            if chunk is not None:
                self._dead_letter(bad.reason, bad.detail, messages[i], chunk)
        if batch.index and self._max_future_ms:
            now_ms = time.time() * 1000.0
            if max(batch.ts_ms) > now_ms + self._max_future_ms:
                batch = self._drop_future(batch, messages, refs, now_ms)
        if not batch.index:
            return
        index = batch.index
        codes = detector.submit_many(batch.sensors, batch.ts_ms, batch.values,
                                     [refs[i] for i in index])
        # each sensor's partition, that of its latest reading, to forget its state when that
        # partition is revoked (a sensor whose key moved to another partition, after the
        # topic's partition count was raised, goes with its new one); not for a reading
        # refused because the detector holds max_sensors already
        sensor_tp = self._sensor_tp
        if (codes == FULL).any():
            sensor_tp.update((sensor, tps[index[j]]) for j, sensor in enumerate(batch.sensors)
                             if codes[j] != FULL)
        else:
            sensor_tp.update(zip(batch.sensors, map(tps.__getitem__, index), strict=True))
        n_warming = n_dropped = 0
        dead_letter_late = self.settings.detector.late_policy == "dead_letter"
        for j in np.flatnonzero(codes != READY).tolist():
            i = index[j]
            chunk = refs[i][0]
            if chunk is None:  # a silent rebuild reading
                continue
            code = codes[j]
            if code == WARMING:
                n_warming += 1
                tracker.release(chunk)
            elif code == LATE:
                if dead_letter_late:
                    self._dead_letter("late_or_duplicate",
                                      f"ts {batch.ts_ms[j]} not after the sensor's last reading",
                                      messages[i], chunk)
                else:
                    n_dropped += 1
                    tracker.release(chunk)
            else:  # FULL: this replica holds SD_DETECTOR__MAX_SENSORS sensors already
                self._dead_letter("sensor_limit", f"sensor {batch.sensors[j]!r} is new and this "
                                  f"replica holds {detector.settings.max_sensors} sensors "
                                  "(SD_DETECTOR__MAX_SENSORS)", messages[i], chunk)
                self._warn_sensor_limit(batch.sensors[j], detector.settings.max_sensors)
        if n_warming:
            m.warming.inc(n_warming)
        if n_dropped:
            m.dropped.labels("late_or_duplicate").inc(n_dropped)

    def _drop_future(self, batch: DecodedBatch, messages: list[Message],
                     refs: list[Ref], now_ms: float) -> DecodedBatch:
        """Dead-letter readings stamped too far ahead of this consumer's clock (a timestamp in
        micro- or nanoseconds): accepted, one would make every later reading of its sensor late.
        Rare, so this is off the per-batch fast path (one max() over the batch)."""
        limit = now_ms + self._max_future_ms
        keep = []
        for j, ts in enumerate(batch.ts_ms):
            if ts <= limit:
                keep.append(j)
                continue
            i = batch.index[j]
            chunk = refs[i][0]
            if chunk is not None:  # None: a rebuild re-read; dead-lettered when first read
                self._dead_letter(
                    "bad_timestamp",
                    f"ts {ts} is {(ts - now_ms) / 86_400_000:.0f} days ahead of this "
                    f"consumer's clock (limit SD_DETECTOR__MAX_FUTURE_S); epoch "
                    f"milliseconds expected", messages[i], chunk)
        return DecodedBatch([batch.index[j] for j in keep], [batch.sensors[j] for j in keep],
                            [batch.ts_ms[j] for j in keep], batch.values[keep], batch.bad)

    def _warn_sensor_limit(self, sensor: str, cap: int) -> None:
        """A warning at the first refused sensor and then at most once a minute: the replica is
        full (more partitions or replicas, or a higher cap), not a producer sending bad ids."""
        now = time.monotonic()
        self._limit_refused += 1
        if now >= self._limit_warn_at:
            log.warning("sensor limit reached; readings of new sensors go to the dead-letter "
                        "topic (reason sensor_limit)", sensor=sensor, max_sensors=cap,
                        refused_since_last_warning=self._limit_refused)
            self._limit_warn_at, self._limit_refused = now + 60.0, 0

    def _dead_letter(self, reason: str, detail: str, msg: Message, chunk: Chunk) -> None:
        assert self._producer is not None
        self.metrics.dead_letters.labels(reason).inc()
        raw = msg.value()
        if raw is not None and len(raw) > DEAD_LETTER_MAX_ORIGINAL_BYTES:
            detail = (f"{detail}; original_b64 holds the first {DEAD_LETTER_MAX_ORIGINAL_BYTES} "
                      f"of {len(raw)} bytes (read the record itself at topic/partition/offset)")
            raw = raw[:DEAD_LETTER_MAX_ORIGINAL_BYTES]
        where = (cast(str, msg.topic()), cast(int, msg.partition()), cast(int, msg.offset()))
        ts_type, ts = msg.timestamp()
        stamp = ts if ts_type != TIMESTAMP_NOT_AVAILABLE else None
        try:
            headers = cast("list[tuple[str, bytes | None]] | None", msg.headers())
        except Exception:  # noqa: BLE001 - confluent-kafka decodes header keys as UTF-8 and
            # raises (SystemError) on any other: the record's dead letter failed, a fatal
            # error, and the restart met it again (found in review)
            headers = None
            detail = f"{detail}; original_headers left out: a header key is not valid UTF-8"
        payload = dead_letter(reason, detail, raw, *where, stamp, headers)
        # a dead-letter topic whose max.message.bytes is below the copy: the same dead letter
        # without original_b64 and original_headers (topic/partition/offset still point at
        # the record)
        def bare() -> bytes:  # built only when needed
            return dead_letter(reason, f"{detail}; original_b64 and original_headers left "
                               "out: the dead letter with them was too large for the "
                               "dead-letter topic", None, *where, stamp)

        self._produce(self.settings.kafka.dead_letter_topic, msg.key(), payload, chunk, None,
                      ("dead letter of input record", *where), bare)

    def _publish(self, batches: list[ScoredBatch]) -> None:
        k = self.settings.kafka
        score_topic = k.score_topic
        tracker = self.tracker
        current, release = tracker.current, tracker.release
        n = 0
        try:
            for b in batches:
                alerts = b.alerts
                if not score_topic:  # the common case: alerts at most
                    # Each alert holds its chunk until the broker has it, taken before the
                    # windows' own holds (from begin()) are released below, so a chunk cannot
                    # settle in between. Alerts go out in window order.
                    for j in sorted(alerts):
                        chunk, kafka_ts = b.refs[j]
                        if chunk is not None and current(chunk):
                            self._send_alert(b.sensors[j].encode(), alerts[j], chunk, kafka_ts)
                    # one release per chunk for all its windows here (not one per window: a
                    # batch with one alert is as cheap as one without). A None chunk: a silent
                    # rebuild reading. A stale generation: read before its partition was lost;
                    # the partition's new owner scores it again from the committed offset, so
                    # nothing is published here
                    for chunk, count in Counter(map(_chunk_of, b.refs)).items():
                        if chunk is not None and current(chunk):
                            n += count
                            release(chunk, count)  # the holds taken by begin()
                    continue
                # A record per window. Its score record takes the window's own hold over (from
                # begin(): released when the broker has the record); an alert takes one more
                # before it is produced. Delivery callbacks run only inside a poll, after the
                # holds of the batch's later windows are already there, so no chunk settles
                # early. One callback per chunk, not one per record.
                acks: dict[Chunk, Callable[[KafkaError | None, Message], None]] = {}
                for j, (chunk, kafka_ts) in enumerate(b.refs):
                    if chunk is None or not current(chunk):
                        continue
                    n += 1
                    key = b.sensors[j].encode()
                    ack = acks.get(chunk)
                    if ack is None:
                        ack = acks[chunk] = self._score_ack(score_topic, chunk)
                    self._produce(score_topic, key, b.score_json(j), chunk, None, ack=ack)
                    alert = alerts.get(j)
                    if alert is not None:
                        self._send_alert(key, alert, chunk, kafka_ts)
        finally:
            if n:
                self.metrics.windows.inc(n)

    def _send_alert(self, key: bytes, alert: Alert, chunk: Chunk,
                    kafka_ts: int | None) -> None:
        """Produce one alert event; it holds ``chunk`` until the broker acknowledges it (the
        caller releases the window's own hold)."""
        self.tracker.hold(chunk)
        self.metrics.alerts.labels(alert.event, alert.level).inc()
        self._produce(self.settings.kafka.alert_topic, key, alert.to_json(), chunk, kafka_ts,
                      ("alert event", alert.event_id))

    def _score_ack(self, topic: str, chunk: Chunk
                   ) -> Callable[[KafkaError | None, Message], None]:
        """The delivery callback of a chunk's score records: each releases one hold of
        ``chunk``; a failed delivery is fatal, as for every record."""
        release = self.tracker.release

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                self._fatal = f"delivery to {topic} failed: {err}; record: {_score_named(msg)}"
                return
            release(chunk)

        return on_delivery

    def _produce(self, topic: str, key: bytes | None, value: bytes, chunk: Chunk,
                 latency_from_ms: int | None, context: tuple[Any, ...] = (),
                 smaller: Callable[[], bytes] | None = None,
                 ack: Callable[[KafkaError | None, Message], None] | None = None) -> None:
        """Hand one record to the producer; ``chunk`` is released when the broker acknowledged
        it. ``context`` names the record in errors (formatted only then); ``smaller()`` is sent
        instead when the record is too large for the topic or the producer. ``ack``: a
        delivery callback to use instead (shared by records, :meth:`_score_ack`)."""
        assert self._producer is not None

        # the callback names the record from the delivery report, never from ``value``: a
        # reference here would keep every queued payload alive in Python beside librdkafka's
        # own copy, twice the producer queue's memory while the broker is slow (review)
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                sent = msg.value() if msg is not None else None
                if smaller is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    log.warning("record too large for its topic; sending it without the "
                                "original payload", topic=topic, record=_describe(context, sent))
                    # sent by _send_resends, outside this callback (its chunk stays held)
                    self._resend.append((topic, key, smaller(), chunk, latency_from_ms, context))
                    return
                self._fatal = (f"delivery to {topic} failed: {err}; record: "
                               f"{_describe(context, sent)}")
                return
            if latency_from_ms is not None and latency_from_ms > 0:
                self.metrics.reading_to_alert.observe(
                    max(0.0, time.time() - latency_from_ms / 1000.0))
            self.tracker.release(chunk)

        callback = on_delivery if ack is None else ack
        waiting_since, warned = 0.0, False
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, on_delivery=callback)
                if warned:
                    log.info("producer queue has room again",
                             waited_s=round(time.monotonic() - waiting_since, 1))
                return
            except BufferError:
                # the local queue is full: the broker is slow or away. Serve callbacks and
                # retry; the loop is waiting, not stuck (heartbeat), and a stop request ends
                # the wait (at once while running, at the drain deadline while shutting down).
                # Short waits are ordinary back-pressure; one of a second or more is logged.
                now = time.monotonic()
                waiting_since = waiting_since or now
                if not warned and now - waiting_since >= 1.0:
                    warned = True
                    log.warning("producer queue full; waiting for the broker", topic=topic,
                                queued=len(self._producer))
                self.health.beat()
                if self._fatal:
                    raise FatalError(self._fatal) from None
                if (self._stop.is_set() and (self._drain_deadline is None
                                             or now >= self._drain_deadline)) or (
                        self._wait_until is not None and now >= self._wait_until):
                    self._abandoned = True
                    raise _Abandoned from None
                self._producer.poll(0.05)
            except KafkaException as exc:  # refused at once (too large, unknown topic, ...)
                err = exc.args[0]
                if smaller is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE:
                    value, smaller = smaller(), None
                    continue
                raise FatalError(f"cannot produce to {topic}: {exc}; record: "
                                 f"{_describe(context, value)}") from None

    def _store_offsets(self) -> None:
        assert self._consumer is not None
        settled = self.tracker.take_settled()
        if settled:
            now, observe = time.monotonic(), self.metrics.processing.observe
            for chunk in settled:
                observe(now - chunk.born)
        ready = self.tracker.advance()
        if ready:
            try:
                self._consumer.store_offsets(
                    offsets=[TopicPartition(t, p, o) for (t, p), o in ready.items()]
                )
            except KafkaException as exc:  # partition no longer assigned: harmless
                log.debug("store_offsets failed", error=str(exc))

    def _send_resends(self) -> None:
        """Send the dead letters that delivery callbacks queued to go again without payload."""
        todo, self._resend = self._resend, []
        for topic, key, value, chunk, latency_from_ms, context in todo:
            self._produce(topic, key, value, chunk, latency_from_ms, context)

    def _drain_all(self, timeout_s: float) -> int:
        """Score what is pending, deliver everything, store offsets, all within ``timeout_s``
        (and the shutdown deadline). Returns how many records are still undelivered (their
        readings' offsets are not stored)."""
        assert self._producer is not None and self.detector is not None
        end = time.monotonic() + timeout_s
        if self._drain_deadline is not None:  # shutting down: within what is left of the grace
            end = min(end, self._drain_deadline)
        # the wait for room in a full queue ends with the budget too (a revoke's drain waited
        # without limit; the shutdown's only once SIGTERM had come)
        self._wait_until = end
        self._drain_abandoned = False
        try:
            self._publish(self.detector.flush_batches())
            # what publishing took counts: each flush gets what is left, not the budget again
            remaining = self._producer.flush(max(0.0, end - time.monotonic()))
            while self._resend and time.monotonic() < end:
                self._send_resends()
                remaining = self._producer.flush(max(0.0, end - time.monotonic()))
        except _Abandoned:
            log.error("producer queue still full at the end of the drain; the readings not "
                      "handed to it are read again from the committed offsets")
            self._drain_abandoned = True
            remaining = len(self._producer)
        finally:
            self._wait_until = None
        remaining += len(self._resend)
        if remaining:
            log.error("producer could not deliver everything", remaining=remaining)
        if self._fatal:
            log.error("delivery failed; offsets of undelivered readings not stored",
                      error=self._fatal)
        self._store_offsets()
        return remaining

    def _shutdown(self) -> int:
        """Drain within ``grace_period_s`` in all (the revoke callback that ``close()`` runs
        gets only what is left). Exit code 0 only when everything was delivered; 1 when
        records were left undelivered (their readings are read again after a restart)."""
        assert self._consumer is not None
        grace = self.settings.service.grace_period_s
        t0 = time.monotonic()
        self._drain_deadline = t0 + grace * 0.9  # the rest: commit and close
        log.info("draining", pending=self.detector.pending if self.detector else 0)
        remaining = self._drain_all(grace * 0.8)
        code = 2 if self._fatal else 1 if remaining or self._abandoned else 0
        # the final commit and the group leave wait for the broker, without a timeout of their
        # own (a broker that stopped answering held them for its socket timeout, 60 s, past
        # any grace period): they run beside this thread, which waits until the grace ends
        consumer = self._consumer
        done = threading.Event()

        def finish() -> None:
            try:
                consumer.commit(asynchronous=False)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError._NO_OFFSET:
                    log.warning("final commit failed", error=str(exc))
            try:
                consumer.close()
            finally:
                done.set()

        threading.Thread(target=finish, name="sd-close", daemon=True).start()
        if not done.wait(max(0.0, t0 + grace - time.monotonic())):
            self.close_abandoned = True
            code = max(code, 1)
            log.error("the broker did not confirm the final commit and the group leave within "
                      "the grace period; readings after the last committed offsets are read "
                      "again after a restart", grace_period_s=grace)
        if self._fatal:  # a delivery that failed in close()'s own revoke drain
            log.error("delivery failed while closing", error=self._fatal)
            code = 2
        flush_kafka_log()  # librdkafka's held-back repeats, before the last line
        log.info("stopped", seconds=round(time.monotonic() - t0, 3), exit_code=code)
        return code

    def _release_clients(self) -> None:
        """The clients are done: let them go now. A Producer lives (and keeps reconnecting to
        its broker, logging every failure) as long as it is referenced, and an embedding
        process (replay, bench, tests) keeps this object after run() returns. Not while an
        abandoned close still runs: its revoke callback drains through them (serve exits the
        process; an embedder's close thread finishes when the broker answers)."""
        if not self.close_abandoned:
            self._producer = None
            self._consumer = None

    def _close_after_fatal(self) -> None:
        """Leave the group after a fatal error, so the partitions move to another replica now
        rather than after a session timeout. close() runs the revoke callback: what was
        delivered has its offsets committed (never more), within half the grace period."""
        if self._consumer is None:
            return
        self._drain_deadline = time.monotonic() + self.settings.service.grace_period_s / 2
        try:
            self._consumer.close()
        except Exception as exc:  # noqa: BLE001 - already failing; the exit code says so
            log.warning("close after fatal error failed", error=str(exc)[:300])

    # -- rebalance callbacks -----------------------------------------------------------
    def _plan_rebuild(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Point each assigned partition ``rebuild_lookback`` records before its committed
        offset; the records up to it only refill the windows (silent: not scored again)."""
        committed = consumer.committed(partitions, timeout=10)
        plan = [(p, c) for p, c in zip(partitions, committed, strict=True)
                if not (c.offset is None or c.offset < 0 or c.offset == OFFSET_INVALID)]
        ends = {i: consumer.get_watermark_offsets(p, timeout=10, cached=False)
                for i, (p, _) in enumerate(plan)}
        asked = 1
        while asked < WATERMARK_ASKS:
            # a broker can answer a request with a stale high watermark (seen on Tansu: 3,571
            # for a log of 5,000): ask again, for every such partition together (one pause a
            # round, not one per partition), before giving their rebuild up
            stale = [i for i, (_, c) in enumerate(plan) if c.offset > ends[i][1]]
            if not stale:
                break
            time.sleep(WATERMARK_RETRY_S)
            for i in stale:
                ends[i] = consumer.get_watermark_offsets(plan[i][0], timeout=10, cached=False)
            asked += 1
        for i, (p, c) in enumerate(plan):
            low, high = ends[i]
            if c.offset > high:
                # the log ends before the committed offset (truncated, or the topic was
                # recreated): no rebuild, and auto.offset.reset decides where to start.
                # A rebuild from here would read every new record silently up to the
                # committed offset.
                log.warning("committed offset beyond the end of the partition; not "
                            "rebuilding", topic=p.topic, partition=p.partition,
                            committed=c.offset, end=high, asked=asked)
                continue
            start = max(low, c.offset - self.rebuild_lookback)
            tp = (p.topic, p.partition)
            self._rebuilds.pop(tp, None)
            if start < c.offset:
                self._silent_until[tp] = c.offset
                # checked at its end (and deepened) unless it reads the whole log already
                if ((start > low or low > 0)
                        and self.rebuild_max_lookback > self.rebuild_lookback):
                    self._rebuilds[tp] = _Rebuild(c.offset, low, start, self.rebuild_lookback)
            # from the log's start: the logical offset, so that a retention run between the
            # watermark request and the fetch cannot make it out of range (and
            # auto.offset.reset=latest jump past the committed offset), as when deepening
            p.offset = OFFSET_BEGINNING if start <= low else start
            if p.offset == start and start < c.offset:
                self._jump_watch[tp] = c.offset
            log.info("rebuilding windows", topic=p.topic, partition=p.partition,
                     from_offset=start, committed=c.offset)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        assigned = {(p.topic, p.partition) for p in partitions}
        self._owned |= assigned
        self._touched |= assigned
        if self.settings.service.rebuild_windows and partitions:
            try:
                self._plan_rebuild(consumer, partitions)
            except KafkaException as exc:
                # best effort: without it the windows warm up from the committed offsets
                # (window - 1 readings per sensor unscored), which beats failing the assignment
                log.warning("cannot rebuild windows; starting from the committed offsets",
                            error=str(exc)[:300])
                for p in partitions:
                    p.offset = OFFSET_INVALID
                    self._silent_until.pop((p.topic, p.partition), None)
                    self._rebuilds.pop((p.topic, p.partition), None)
                    self._jump_watch.pop((p.topic, p.partition), None)
        if self.settings.kafka.partition_assignment_strategy == "cooperative-sticky":
            consumer.incremental_assign(partitions)
        else:
            consumer.assign(partitions)
        self.metrics.assigned.set(len(consumer.assignment()))
        self.health.ready = True
        log.info("assigned", partitions=[(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("revoking", partitions=[(p.topic, p.partition) for p in partitions])
        if self.detector is not None and self._producer is not None:
            self._drain_all(self.settings.service.grace_period_s / 2)
            try:
                consumer.commit(asynchronous=False)
            except KafkaException as exc:
                log.debug("commit on revoke", error=str(exc))
            kept = self._owned - {(p.topic, p.partition) for p in partitions}
            if self._drain_abandoned and kept and not self._fatal:
                # The drain flushed every partition's windows, and the records it could not
                # hand to the producer are gone: the kept partitions' chunks would never
                # settle, their offsets never advance. Stop; a restart reads them again.
                self._fatal = (
                    "a rebalance's drain could not hand every record to the producer within "
                    f"{self.settings.service.grace_period_s / 2:g} s (its queue stayed full: "
                    f"the broker is slow or away); the {len(kept)} partition(s) kept here "
                    "would stall, so the service stops and their readings are read again "
                    "from the committed offsets")
        self._forget(partitions)
        if self.settings.kafka.partition_assignment_strategy == "cooperative-sticky":
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("partitions lost", partitions=[(p.topic, p.partition) for p in partitions])
        self._forget(partitions)

    def _forget(self, partitions: list[TopicPartition]) -> None:
        gone = {(p.topic, p.partition) for p in partitions}
        self._owned -= gone
        self._touched |= gone
        self.metrics.assigned.set(len(self._owned))  # was only set on assignment
        for tp in gone:
            self.tracker.drop(tp)
            self._silent_until.pop(tp, None)
            self._rebuilds.pop(tp, None)
            self._jump_watch.pop(tp, None)
            with contextlib.suppress(KeyError):  # its lag is its new owner's to report
                self.metrics.lag.remove(tp[0], str(tp[1]))
        sensors = self._sensors_on(gone)
        for s in sensors:
            del self._sensor_tp[s]
        if self.detector is not None:
            self.detector.forget(sensors)
            self._observe_sensors(self.detector)

    # -- observability -----------------------------------------------------------------
    def _observe_batch(self, size: int, seconds: float) -> None:
        self.metrics.batch_size.observe(size)
        self.metrics.inference.observe(seconds)

    def _observe_sensors(self, detector: Detector) -> None:
        self.metrics.sensors.set(len(detector.sensors()))
        self.metrics.sensors_untrained.set(detector.untrained())

    def _on_stats(self, stats_json: str) -> None:
        stats = orjson.loads(stats_json)
        owned = self._owned
        for topic, t in stats.get("topics", {}).items():
            for pid, p in t.get("partitions", {}).items():
                lag = p.get("consumer_lag", -1)
                # librdkafka keeps reporting revoked partitions (fetch_state "stopped") with
                # a lag from their last position: only the owner reports a partition's lag
                if (pid != "-1" and lag is not None and lag >= 0
                        and (topic, int(pid)) in owned):
                    self.metrics.lag.labels(topic, pid).set(lag)
        if self.detector is not None:
            self._observe_sensors(self.detector)
