"""Replay: recorded data -> Kafka -> the production consumer -> metrics, parity and a report.

``replay --dataset smd --data-dir ../shared/data/smd`` (or smap, msl, nab, synthetic):

1. Loads the dataset's test data and the artifact (trains it first with ``--train-if-missing``).
2. Starts the embedded broker and the *production* consumer (:class:`DetectorService`, in this
   process, with the score topic on), or, with ``--bootstrap-servers``, talks to an already
   running deployment whose topics come from the ``SD_*`` settings (its score topic must be on).
3. Produces every sensor's stream (``W - 1`` train rows of context, then the test rows) keyed by
   sensor, interleaved across sensors in time order, as fast as possible or at ``--rate``.
4. Collects every score record and alert until each test row has its score (duplicates from
   at-least-once delivery are dropped by ``(sensor, window_end)`` / ``event_id``).
5. Checks parity: the streamed scores against the offline batch scores of the same artifact
   (max absolute difference must be <= ``--max-parity-error``, default 1e-4).
6. Computes the ``evaluate`` metrics on the *streamed* scores next to a random-score baseline
   (each entity's random scores are those of ``evaluate``'s random baseline: they depend only on
   the seed and the entity, not on which other entities are replayed),
   the root-cause HitRate@100%/150% where the dataset knows the responsible features, and
   throughput and reading-to-score latency; writes ``report.md``, ``report.json`` and plots.

Timestamps: every dataset is replayed on a regular clock (row ``i`` of a stream at
``T0 + i`` seconds). NAB's wall-clock timestamps are not monotonic (daylight-saving repeats), and
the consumer's late-reading policy would rightly reject those rows. With the embedded broker (a
fresh consumer) ``T0`` is the fixed :data:`T0_MS`. A running deployment keeps each sensor's last
timestamp and rejects readings at or before it, so there every run starts after the latest
reading of its sensors found on the input topic (and no earlier than now): see
:func:`first_timestamp`. Sensors keep their names (the artifact's per-sensor thresholds and error
scales are looked up by name).
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import structlog
from tqdm.auto import tqdm

from stream_detector.config import FETCH_QUEUE_BACKOFF_MS
from stream_detector.datasets.base import Entity
from stream_detector.errors import StreamDetectorError
from stream_detector.evaluation import (
    SELECTION_NOTE,
    counted,
    plot_file_name,
    prepare_out_dir,
)
from stream_detector.logs import kafka_logger
from stream_detector.scoring import long_term_words

log = structlog.get_logger(__name__)

T0_MS = 1_700_000_000_000
STEP_MS = 1000
#: ``--rate`` pacing: a reading ahead of its schedule by less than this is sent without sleeping
MIN_SLEEP_S = 1e-4
#: before a replay into a running deployment: the last records of each input partition that
#: are searched for earlier readings of the replayed sensors
SCAN_RECORDS = 200_000
#: the replay's own consumer must have its partitions within this long (a join takes ~3 s)
JOIN_TIMEOUT_S = 120.0
#: the replay's consumer on the embedded broker (see where it is used)
REPLAY_FETCH_WAIT_MS = 10


class ReplayError(StreamDetectorError):
    """The replay could not complete (missing scores, parity failure is reported, not raised)."""


@dataclass
class ReplayOptions:
    dataset: str = "synthetic"
    data_dir: Path | None = None
    entities: list[str] | None = None
    artifact_dir: Path | None = None
    out_dir: Path | None = None
    bootstrap_servers: str | None = None
    rate: float = 0.0
    max_parity_error: float = 1e-4
    plots: bool = True
    train_if_missing: bool = False
    partitions: int = 4
    #: topics of a running deployment (with bootstrap_servers); default: from SD_* settings
    settings: Any = None
    idle_timeout_s: float = 120.0
    progress: bool = True
    seed: int = 0


@dataclass
class ReplayReport:
    out_dir: Path
    markdown: str
    parity_ok: bool
    max_parity_error: float
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)


# -- the stream ------------------------------------------------------------------------------
def interleave(streams: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(entity index, row) pairs of all streams in time order, sensors interleaved per step."""
    lengths = np.array([len(r) for r in streams.values()])
    steps = int(lengths.max()) if len(lengths) else 0
    grid_e, grid_t = np.meshgrid(np.arange(len(lengths)), np.arange(steps))
    e, t = grid_e.ravel(), grid_t.ravel()
    keep = t < lengths[e]
    return e[keep], t[keep]


def _pace(i: int, rate: float, elapsed_s: float, sleep: Callable[[float], None]) -> bool:
    """``--rate``: after sending reading ``i`` (0-based), sleep until reading ``i + 1`` is due.

    Reading ``i`` is due ``i / rate`` seconds after the first. Behind schedule (a producer slower
    than ``rate``), or less than :data:`MIN_SLEEP_S` ahead, the next reading goes at once: no
    busy-waiting and no sleep calls for next to nothing. Returns whether it slept.
    """
    if rate <= 0:
        return False
    ahead = (i + 1) / rate - elapsed_s
    if ahead < MIN_SLEEP_S:
        return False
    sleep(ahead)
    return True


def _producer_loop(bootstrap: str, topic: str, names: list[str], streams: list[np.ndarray],
                   order_e: np.ndarray, order_t: np.ndarray, rate: float,
                   sent_at: list[np.ndarray], progress: bool, error: list[str],
                   t0_ms: int = T0_MS, clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep,
                   go: threading.Event | None = None,
                   conf: dict[str, Any] | None = None,
                   stop: threading.Event | None = None) -> None:
    """Produce the readings (``rate`` per second, 0: as fast as possible). With ``go``: connect
    first (metadata; the idempotent producer gets its id meanwhile), then wait for it, so the
    producer's own start-up is not counted in the readings' latency. ``stop``: end early, what
    is queued given 5 s (a failed or interrupted replay kept producing at ``rate`` into a
    deployment's input topic; review)."""
    from confluent_kafka import Producer

    producer = Producer({
        **(conf or {"bootstrap.servers": bootstrap}),
        "enable.idempotence": True, "linger.ms": 5,
        "batch.num.messages": 10_000, "queue.buffering.max.messages": 500_000,
        "compression.type": "lz4",
    })
    if go is not None:
        try:
            producer.list_topics(topic, timeout=30)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            error.append(f"producer cannot reach the broker: {exc}")
            return
        while not go.wait(0.1):
            producer.poll(0)
        if error or (stop is not None and stop.is_set()):  # gave up before the start
            return
    keys = [n.encode() for n in names]
    prefix = [b'{"schema_version":1,"sensor":' + orjson.dumps(n) + b',"ts":' for n in names]
    t_start = last_poll = clock()
    bar = tqdm(total=len(order_e), desc="produce", unit="rd", disable=not progress,
               mininterval=0.5, leave=False)
    shown = 0
    try:
        for i in range(len(order_e)):
            if stop is not None and stop.is_set():
                producer.flush(5)
                return
            e, t = int(order_e[i]), int(order_t[i])
            value = (prefix[e] + str(t0_ms + t * STEP_MS).encode() + b',"values":'
                     + orjson.dumps(streams[e][t], option=orjson.OPT_SERIALIZE_NUMPY) + b"}")
            while True:
                try:
                    producer.produce(topic, key=keys[e], value=value)
                    break
                except BufferError:
                    producer.poll(0.05)
            sent_at[e][t] = time.time() * 1000.0
            # serve delivery reports and the progress bar every 1000 readings, and at least
            # twice a second when --rate paces slower than that
            if i % 1000 == 999 or (rate > 0 and clock() - last_poll >= 0.5):
                producer.poll(0)
                bar.update(i + 1 - shown)
                shown, last_poll = i + 1, clock()
            if rate > 0:
                _pace(i, rate, clock() - t_start, sleep)
        if producer.flush(120) != 0:
            error.append("producer could not deliver every reading within 120 s")
        bar.update(len(order_e) - shown)
    except Exception as exc:  # noqa: BLE001 - reported by the main thread
        error.append(f"producer failed: {exc}")
    finally:
        bar.close()


def _start_offsets(consumer: Any, topics: list[str]) -> list[Any]:
    """Current end offsets of ``topics``: we read only what this replay causes."""
    from confluent_kafka import TopicPartition

    parts = []
    for topic in topics:
        md = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            raise ReplayError(f"topic {topic!r} does not exist on the broker")
        for p in md.partitions:
            _, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            parts.append(TopicPartition(topic, p, high))
    return parts


def first_timestamp(last_seen: dict[str, int], now_ms: int) -> int:
    """``T0`` of a replay into a running consumer (``--bootstrap-servers``).

    The consumer keeps every sensor's last timestamp and rejects readings at or before it (late
    or duplicate), so a second replay of the same sensors on the same clock would be rejected
    whole. The run starts one step after the latest earlier reading of its sensors
    (``last_seen``, from :func:`_latest_readings`) and no earlier than ``now_ms`` (whole
    seconds), which also covers earlier runs whose readings the input topic no longer holds.
    """
    t0 = max(T0_MS, now_ms // STEP_MS * STEP_MS)
    if last_seen:
        t0 = max(t0, max(last_seen.values()) + STEP_MS)
    return t0


def _latest_readings(bootstrap: str, topic: str, sensors: list[str],
                     max_records: int = SCAN_RECORDS,
                     conf: dict[str, Any] | None = None) -> dict[str, int]:
    """Latest ``ts`` of each of ``sensors`` among the last ``max_records`` records of every
    partition of ``topic`` (records keyed by sensor, as replay produces them). Sensors not seen
    there are left out."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    keys = {s.encode(): s for s in sensors}
    found: dict[str, int] = {}
    consumer = Consumer({**(conf or {"bootstrap.servers": bootstrap}),
                         "group.id": f"replay-scan-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False, "enable.partition.eof": True,
                         "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS})
    try:
        md = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            return found
        parts = []
        for p in sorted(md.partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            parts.append(TopicPartition(topic, p, max(low, high - max_records)))
        # read forward to the end each fetch reports (not to the listed high watermark: a
        # partition of the embedded broker can list less than it holds)
        consumer.assign(parts)
        left = {tp.partition for tp in parts}
        idle_until = time.monotonic() + 5.0
        while left and time.monotonic() < idle_until:
            msgs = consumer.consume(10_000, 0.5)
            if msgs:
                idle_until = time.monotonic() + 5.0
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        left.discard(m.partition())
                    continue
                s, value = keys.get(m.key() or b""), m.value()
                if s is None or not value:
                    continue
                with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                    rec = orjson.loads(value)
                    ts = rec.get("ts")
                    if rec.get("sensor") == s and type(ts) is int:
                        found[s] = max(found.get(s, ts), ts)
    finally:
        consumer.close()
    return found


def _check_options(opts: ReplayOptions) -> None:
    """Refuse option values that make no sense (a ReplayError: the CLI exits 2)."""
    if not (math.isfinite(opts.rate) and opts.rate >= 0):
        raise ReplayError(f"--rate must be a number of readings per second >= 0 (0 = as fast "
                          f"as possible), got {opts.rate}")
    if not opts.max_parity_error >= 0:  # also refuses NaN
        raise ReplayError(f"--max-parity-error must be >= 0, got {opts.max_parity_error}")


# -- main entry ------------------------------------------------------------------------------
def run_replay(opts: ReplayOptions) -> ReplayReport:
    from stream_detector.datasets import load_dataset

    _check_options(opts)
    t_begin = time.time()
    artifact = Path(opts.artifact_dir or Path("artifacts") / opts.dataset)
    out_dir = prepare_out_dir(Path(opts.out_dir or Path("reports") / f"replay-{opts.dataset}"))
    entities = load_dataset(opts.dataset, opts.data_dir, opts.entities)  # never empty
    _ensure_artifact(opts, artifact)

    from stream_detector.model.runtime import TorchScorer
    from stream_detector.offline import batch_score, stream_rows

    scorer = TorchScorer.load(artifact)
    manifest = scorer.manifest
    features = tuple(entities[0].features)
    if features != tuple(manifest.features):
        raise ReplayError(
            f"dataset {opts.dataset} has features {list(features)[:5]}... ({len(features)}), "
            f"the artifact expects {list(manifest.features)[:5]}... ({manifest.n_features}); "
            f"train one on this dataset (stream-detector train --dataset {opts.dataset} "
            f"--out DIR, with the same --data-dir) and pass --artifact DIR, or pass "
            "--train-if-missing with an --artifact path that holds no artifact yet"
        )
    W = manifest.window
    names = [e.name for e in entities]
    streams, n_ctx = [], []
    for e in entities:
        values, c = stream_rows(e, W)
        streams.append(values)
        n_ctx.append(c)
    n_readings = int(sum(len(r) for r in streams))
    expected = int(sum(len(e.test) for e in entities))
    log.info("replay", dataset=opts.dataset, entities=len(entities), readings=n_readings,
             windows=expected, artifact=str(artifact), model_version=manifest.model_version)

    from confluent_kafka import KafkaException

    try:
        stream_result = _stream(opts, manifest, scorer, names, streams, expected, n_ctx)
    except KafkaException as exc:  # an unreachable or refusing broker: not a parity failure
        where = opts.bootstrap_servers or "the embedded broker"
        raise ReplayError(f"Kafka error talking to {where}: {exc}") from None
    t0 = stream_result["t0_ms"]

    # offline reference and parity
    rows: list[dict[str, Any]] = []
    data: dict[str, Any] = {}
    max_err = 0.0
    from stream_detector.baselines import run_baselines
    from stream_detector.metrics import entity_metrics, episode_metrics

    for i, e in enumerate(entities):
        ref = batch_score(scorer, manifest, e)
        got = stream_result["scores"][i]
        rec = stream_result["rec"][i]
        fc = stream_result["fc"][i]
        off = n_ctx[i]
        s_stream = got[off:]
        missing = int(np.isnan(s_stream).sum())
        if missing:
            raise ReplayError(f"{e.name}: {missing} test rows never got a score")
        # a sensor the running consumer already knew (an earlier replay): its first scores
        # also depend on windows before this run (k - 1 smoothed ones; more with a long-term
        # term), which the offline reference cannot know; both error terms are still compared
        # on every row
        skip = (_carried_over(manifest, e.name, opts.max_parity_error)
                if stream_result["earlier_state"][i] else 0)
        err = parity_error((s_stream[skip:], ref.score[skip:]),
                           (rec[off:], ref.reconstruction), (fc[off:], ref.forecast))
        max_err = max(max_err, err)
        # F1 where the consumer opens episodes: the threshold times SD_DETECTOR__WARNING_RATIO
        # (1 by default; a deployment reached with --bootstrap-servers may set another)
        m = entity_metrics(s_stream, e.labels, ref.threshold * stream_result["warning_ratio"])
        # the random baseline of `evaluate` for this entity and seed (its best-F1 figures do
        # not depend on a threshold)
        rnd = entity_metrics(run_baselines(e, ["random"], opts.seed)["random"], e.labels,
                             float("inf"))
        alerts = [a for a in stream_result["alerts"] if a["sensor"] == e.name]
        opens = [a for a in alerts if a["event"] == "open"]
        hits = _root_cause(e, alerts, ref.contributions, off, t0)
        episodes = alert_ranges(alerts, off, len(e.labels), t0)
        events = episode_metrics(episodes, e.labels, seed=opts.seed)
        row = {
            "entity": e.name,
            "rows": len(e.test),
            "anomaly_rows": int(e.labels.sum()),
            **m,
            "random_best_f1": rnd["best_f1"],
            "random_pa_best_f1": rnd["pa_best_f1"],
            "alerts": len(opens),
            "alerts_in_anomaly": sum(
                1 for a in opens if 0 <= _row_of(a["window_end"], off, t0) < len(e.labels)
                and e.labels[_row_of(a["window_end"], off, t0)] == 1),
            "parity_max_abs": err,
            **hits,
            **events,
        }
        rows.append(row)
        data[e.name] = {"score": s_stream, "ref": ref, "alerts": alerts, "episodes": episodes,
                        "entity": e, "n_ctx": off, "t0_ms": t0}

    parity_ok = max_err <= opts.max_parity_error
    summary = _summary(rows, stream_result, n_readings, expected, max_err, parity_ok, opts,
                       manifest, time.time() - t_begin)
    md = _markdown(opts, rows, summary, manifest, out_dir)
    _remove_earlier_plots(out_dir)
    if opts.plots:  # first: a report is never written with links to plots not (yet) there
        _plots(out_dir, data, summary["warning_ratio"], opts.progress)
    (out_dir / "report.md").write_text(md)
    (out_dir / "report.json").write_bytes(orjson.dumps(
        {"summary": summary, "entities": rows},
        option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
    log.info("replay done", parity_max_abs=max_err, parity_ok=parity_ok,
             report=str(out_dir / "report.md"))
    return ReplayReport(out_dir, md, parity_ok, max_err, rows, summary, data)


def _row_of(window_end_ms: int, n_ctx: int, t0_ms: int = T0_MS) -> int:
    """Test row index of a window ending at ``window_end_ms`` (stream row 0 at ``t0_ms``)."""
    return (window_end_ms - t0_ms) // STEP_MS - n_ctx


def _ensure_artifact(opts: ReplayOptions, artifact: Path) -> None:
    if (artifact / "manifest.json").exists():
        return
    if not opts.train_if_missing:
        same = "".join(f" {flag} {value}" for flag, value in (
            ("--data-dir", opts.data_dir), ("--entities", ",".join(opts.entities or []))) if value)
        raise ReplayError(
            f"no artifact at {artifact}: train one with `stream-detector train --dataset "
            f"{opts.dataset}{same} --out {artifact}` or pass --train-if-missing"
        )
    from stream_detector.datasets import load_dataset
    from stream_detector.train_config import TrainConfig

    prepare_out_dir(artifact, "--artifact", what="artifact")  # before training, not after
    entities = load_dataset(opts.dataset, opts.data_dir, opts.entities)
    from stream_detector.train import train  # torch's import: after the cheap checks

    log.info("training the artifact first", dataset=opts.dataset, out=str(artifact))
    train(entities, TrainConfig(progress=opts.progress), artifact, dataset=opts.dataset)


def _carried_over(manifest: Any, sensor: str, limit: float) -> int:
    """Test rows whose score, for a sensor the running consumer already knew, can differ from
    a fresh start's by more than ``limit``: the first ``smoothing - 1`` (their mean reaches
    back), or with a long-term term those before its earlier level has faded below ``limit``
    (:func:`~stream_detector.detector.converged_after`)."""
    from stream_detector.detector import long_term_windows

    rows = max(1, int(manifest.score.smoothing)) - 1
    lt = manifest.score.long_term
    if lt is None:
        return rows
    thr = manifest.thresholds.for_sensor(sensor)
    # NEVER_EXACT (every row left out) for a limit below what rounding lets the term reach,
    # e.g. 0
    return max(rows, long_term_windows(lt, sensor, thr, limit / thr))


def _stream(opts: ReplayOptions, manifest: Any, scorer: Any, names: list[str],
            streams: list[np.ndarray], expected: int, n_ctx: list[int]) -> dict[str, Any]:
    """Produce, drive the consumer, collect. Returns per-entity arrays indexed by stream row.

    Only records of this run's test rows count: a window ending at stream row ``t`` belongs to
    it when ``n_ctx <= t < len(stream)`` on this run's clock. ``earlier_state``: the consumer
    already held the sensor's state (the input topic has earlier readings of it, or a context
    row got a score: a fresh consumer is still warming up there).
    """
    from confluent_kafka import Consumer

    from stream_detector.config import Settings, load_settings
    from stream_detector.consumer import DetectorService
    from stream_detector.devbroker import broker_or_existing, create_topics

    run = uuid.uuid4().hex[:8]
    index = {n: i for i, n in enumerate(names)}
    scores = [np.full(len(s), np.nan) for s in streams]
    recs = [np.full(len(s), np.nan) for s in streams]
    fcs = [np.full(len(s), np.nan) for s in streams]
    sent_at = [np.zeros(len(s)) for s in streams]
    latency_ms = [np.full(len(s), np.nan) for s in streams]
    alerts: dict[str, dict[str, Any]] = {}
    earlier_state = [False] * len(streams)
    duplicates = 0
    order_e, order_t = interleave(dict(zip(names, streams, strict=True)))
    t0_ms = T0_MS  # this run's clock: stream row t at t0_ms + t * STEP_MS

    with broker_or_existing(opts.bootstrap_servers) as bootstrap:
        service = None
        thread = None
        conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": kafka_logger()}
        if opts.bootstrap_servers:
            settings = opts.settings or load_settings()
            k = settings.kafka
            if not k.score_topic:
                raise ReplayError("the deployment's SD_KAFKA__SCORE_TOPIC is empty: replay needs "
                                  "the score topic for parity; enable it for the backtest")
            topics = {"input": k.input_topic, "alerts": k.alert_topic, "scores": k.score_topic}
            # the deployment's security settings (SASL, SSL, SD_KAFKA__EXTRA) for the replay's
            # own clients too, with its --bootstrap-servers address
            conf = {**k.common(), "bootstrap.servers": bootstrap, "logger": kafka_logger()}
            last_seen = _latest_readings(bootstrap, topics["input"], names, conf=conf)
            t0_ms = first_timestamp(last_seen, int(time.time() * 1000))
            earlier_state = [n in last_seen for n in names]
            log.info("replay clock", t0_ms=t0_ms, sensors_seen_before=len(last_seen))
        else:
            topics = {"input": f"replay-{run}-readings", "alerts": f"replay-{run}-alerts",
                      "scores": f"replay-{run}-scores", "dlq": f"replay-{run}-dlq"}
            create_topics(bootstrap, [topics["input"]], partitions=opts.partitions)
            create_topics(bootstrap, [topics["alerts"], topics["scores"], topics["dlq"]], 1)
            settings = Settings(
                artifact_dir=Path(opts.artifact_dir or "."),
                kafka={"bootstrap_servers": bootstrap, "input_topic": topics["input"],
                       "alert_topic": topics["alerts"], "score_topic": topics["scores"],
                       "dead_letter_topic": topics["dlq"], "group_id": f"replay-{run}",
                       "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000,
                       # the embedded broker answers a fetch when fetch.wait.max.ms expires,
                       # not when data arrives: librdkafka's 500 ms would be most of the
                       # latency a paced replay reports (the benchmark's latency runs do the same)
                       "consumer_extra": {"fetch.wait.max.ms": REPLAY_FETCH_WAIT_MS}},
                # every rise of an episode's peak is an update event, each one a root-cause
                # sample for HitRate (docs/backtesting.md: long episodes weigh more)
                detector={"update_interval_s": 0},
                service={"http_port": 0},
            )
            service = DetectorService(settings, manifest, scorer, serve_http=False)
            thread = threading.Thread(target=service.run, name="replay-consumer", daemon=True)
            thread.start()

        reader = Consumer({**conf, "group.id": f"replay-reader-{run}",
                           "enable.auto.commit": False, "auto.offset.reset": "earliest",
                           "fetch.queue.backoff.ms": FETCH_QUEUE_BACKOFF_MS})
        reader.assign(_start_offsets(reader, [topics["scores"], topics["alerts"]]))
        errors: list[str] = []
        go, stop = threading.Event(), threading.Event()
        producer = threading.Thread(
            target=_producer_loop, name="replay-producer",
            args=(bootstrap, topics["input"], names, streams, order_e, order_t, opts.rate,
                  sent_at, opts.progress, errors, t0_ms),
            kwargs={"go": go, "conf": conf, "stop": stop}, daemon=True)
        producer.start()  # connects while the consumer joins its group
        bar = tqdm(total=expected, desc="scored", unit="win", disable=not opts.progress,
                   mininterval=0.5)
        # silence allowed between scores: with --rate, a sensor's first score needs its W-1
        # context readings first (a slow rate failed as "is the consumer running?"; review)
        idle_s = opts.idle_timeout_s
        if opts.rate > 0:
            idle_s = max(idle_s, 2 * len(names) * manifest.window / opts.rate)

        def test_row(rec: dict[str, Any], is_score: bool) -> tuple[int, int] | None:
            """(entity, stream row) of a record of one of this run's test rows, else None."""
            i = index.get(str(rec.get("sensor")))
            if i is None:
                return None
            t = (rec["window_end"] - t0_ms) // STEP_MS
            if not n_ctx[i] <= t < len(scores[i]):
                if is_score and 0 <= t < n_ctx[i]:
                    earlier_state[i] = True  # a context window was scored
                return None
            return i, t

        # from here on every way out stops the producer and the replay's consumer (a failed
        # join, a producer that could not connect, Ctrl-C during the join left both running)
        try:
            if service is not None and thread is not None:
                _wait_for_assignment(service, thread, JOIN_TIMEOUT_S)
            if errors:
                raise ReplayError(errors[0])
            t0 = time.time()
            go.set()
            got = 0
            last_progress = time.monotonic()
            t_last_score = t0
            while got < expected:
                msgs = reader.consume(2000, 0.2)
                for m in msgs:
                    value = m.value()
                    if m.error() is not None or not value:  # an error event or a tombstone
                        continue
                    rec = orjson.loads(value)
                    is_score = m.topic() == topics["scores"]
                    it = test_row(rec, is_score)
                    if it is None:
                        continue
                    i, t = it
                    if is_score and rec.get("model_version") != manifest.model_version:
                        # another artifact's scores read as a parity failure (exit 1) and
                        # reported as this one's metrics (review)
                        raise ReplayError(
                            f"the consumer scores with model {rec.get('model_version')!r}, "
                            f"this replay's artifact is {manifest.model_version!r}: replay "
                            "with the artifact the deployment serves")
                    last_progress = time.monotonic()  # a record of this run (other traffic
                    # on a deployment's topics kept an idle replay waiting for ever; review)
                    if is_score:
                        if not np.isnan(scores[i][t]):
                            duplicates += 1
                            continue
                        scores[i][t] = _num(rec["score"])
                        recs[i][t] = _num(rec["reconstruction_error"])
                        fcs[i][t] = _num(rec["forecast_error"])
                        ts_ms = m.timestamp()[1]
                        latency_ms[i][t] = ts_ms - sent_at[i][t]
                        t_last_score = max(t_last_score, ts_ms / 1000.0)
                        got += 1
                        bar.update(1)
                    else:
                        alerts.setdefault(rec["event_id"], rec)
                if errors:
                    raise ReplayError(errors[0])
                if service is not None and service.failure:
                    raise ReplayError(f"consumer failed: {service.failure}")
                if time.monotonic() - last_progress > idle_s:
                    raise ReplayError(
                        f"no scores for {idle_s:.0f} s with {expected - got} of "
                        f"{expected} windows missing; is the consumer running and its score "
                        "topic on?" + ("" if service is not None else
                                       " Readings at or before a sensor's last reading are "
                                       "rejected as late (see the consumer's dead-letter topic "
                                       "and its sd_dead_letters_total metric).")
                    )
            # alerts are produced alongside the scores; give stragglers a moment
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                for m in reader.consume(2000, 0.2):
                    value = m.value()
                    if m.error() is None and m.topic() == topics["alerts"] and value:
                        rec = orjson.loads(value)
                        if test_row(rec, False) is not None:
                            alerts.setdefault(rec["event_id"], rec)
        finally:
            bar.close()
            stop.set()
            go.set()  # a producer still waiting for the start
            producer.join(10)
            reader.close()
            if service is not None:
                service.stop()
                if thread is not None:
                    thread.join(60)
        metrics_snapshot = _service_metrics(service)
    elapsed = max(1e-9, t_last_score - t0)
    lat = np.concatenate([x[~np.isnan(x)] for x in latency_ms]) if latency_ms else np.array([])
    return {
        "scores": scores, "rec": recs, "fc": fcs, "latency_ms": lat,
        "alerts": sorted(alerts.values(), key=lambda a: (a["sensor"], a["window_end"])),
        "duplicates": duplicates, "elapsed_s": elapsed, "service": metrics_snapshot,
        "t0_ms": t0_ms, "earlier_state": earlier_state,
        # an episode opens at score >= threshold x warning ratio: the deployed operating point
        "warning_ratio": float(settings.detector.warning_ratio),
    }


def _num(x: Any) -> float:
    return float("nan") if x is None else float(x)


def _service_metrics(service: Any) -> dict[str, Any]:
    if service is None:
        return {}
    m = service.metrics
    with contextlib.suppress(Exception):
        return {"dead_letters": sum(s.value for s in m.dead_letters.collect()[0].samples
                                    if s.name.endswith("_total"))}
    return {}


def _root_cause(e: Entity, alerts: list[dict[str, Any]], contributions: np.ndarray,
                n_ctx: int, t0_ms: int = T0_MS) -> dict[str, Any]:
    """HitRate@100/150% (OmniAnomaly) over alert events inside interpretable anomaly ranges.

    The ranking is the full per-feature contribution of the alert's window (the same numbers
    the consumer ranks for ``top_features``; parity guarantees they are the stream's numbers).
    """
    from stream_detector.metrics import hit_rate

    if not e.interpretation:
        return {"hitrate_100": float("nan"), "hitrate_150": float("nan"), "rc_alerts": 0}
    h100, h150 = [], []
    for a in alerts:
        if a["event"] == "resolve":
            continue
        r = _row_of(a["window_end"], n_ctx, t0_ms)
        if not 0 <= r < len(contributions):
            continue
        for it in e.interpretation:
            if it.start <= r < it.end and it.features:
                ranked = [int(j) for j in np.argsort(-contributions[r], kind="stable")]
                truth = set(it.features)
                h100.append(hit_rate(ranked, truth, 1.0))
                h150.append(hit_rate(ranked, truth, 1.5))
                break
    return {
        "hitrate_100": float(np.mean(h100)) if h100 else float("nan"),
        "hitrate_150": float(np.mean(h150)) if h150 else float("nan"),
        "rc_alerts": len(h100),
    }


def parity_error(*pairs: tuple[np.ndarray, np.ndarray]) -> float:
    """The largest ``|streamed - offline|`` over ``(streamed, offline)`` pairs; infinity when
    any difference is NaN (a null field, a NaN in the reference): a failed parity, which
    Python's ``max()`` of NaN and numbers would have passed over."""
    diffs = np.array([np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
                             ).max(initial=0.0) for a, b in pairs])
    return float(diffs.max(initial=0.0)) if np.isfinite(diffs).all() else math.inf


def _summary(rows: list[dict[str, Any]], st: dict[str, Any], n_readings: int, expected: int,
             max_err: float, parity_ok: bool, opts: ReplayOptions, manifest: Any,
             seconds: float) -> dict[str, Any]:
    from stream_detector.metrics import summarize

    lat = st["latency_ms"]
    pct = {f"p{q}": float(np.percentile(lat, q)) if len(lat) else float("nan")
           for q in (50, 95, 99)}
    return {
        "dataset": opts.dataset,
        "entities": len(rows),
        "model_version": manifest.model_version,
        "readings": n_readings,
        "windows_scored": expected,
        "duplicate_scores_dropped": st["duplicates"],
        "alerts": sum(r["alerts"] for r in rows),
        "throughput_readings_per_s": n_readings / st["elapsed_s"],
        "stream_seconds": st["elapsed_s"],
        "total_seconds": seconds,
        "latency_ms": pct,
        "parity_max_abs": max_err,
        "parity_limit": opts.max_parity_error,
        "parity_ok": parity_ok,
        "mean": summarize(rows),
        "embedded_broker": not bool(opts.bootstrap_servers),
        "rate": opts.rate,
        "t0_ms": st["t0_ms"],
        "sensors_with_earlier_state": int(sum(st["earlier_state"])),
        # f1_at_threshold is measured at threshold x this (SD_DETECTOR__WARNING_RATIO)
        "warning_ratio": st["warning_ratio"],
        **st["service"],
    }


COLUMNS = ["best_f1", "f1_at_threshold", "auc_pr", "pa_best_f1", "random_best_f1",
           "random_pa_best_f1", "alerts", "hitrate_100", "hitrate_150", "rc_alerts",
           "parity_max_abs"]
EVENT_COLUMNS = ["alerts", "incidents", "incident_recall", "episode_precision", "event_f1",
                 "random_event_f1", "false_episodes_per_10k", "alert_share", "delay_p50"]


def _wait_for_assignment(service: Any, thread: threading.Thread, timeout_s: float) -> None:
    """Block until the replay's own consumer has its partitions: readings produced before
    would wait out the group join (about 3 s) and count it as latency and stream time."""
    deadline = time.monotonic() + timeout_s
    while not service.health.ready:
        if service.failure:
            raise ReplayError(f"consumer failed: {service.failure}")
        if not thread.is_alive():
            raise ReplayError("the replay's consumer stopped before it was assigned its "
                              "partitions (see the log above)")
        if time.monotonic() > deadline:
            raise ReplayError(f"the replay's consumer was not assigned its partitions within "
                              f"{timeout_s:.0f} s")
        time.sleep(0.02)


def _markdown(opts: ReplayOptions, rows: list[dict[str, Any]], s: dict[str, Any],
              manifest: Any, out_dir: Path) -> str:
    from stream_detector.metrics import markdown_table

    lat = s["latency_ms"]
    where = ("embedded broker, production consumer in this process" if s["embedded_broker"]
             else f"running consumer group via {opts.bootstrap_servers}")
    lines = [
        f"# Replay report: {opts.dataset}",
        "",
        f"- model version: `{manifest.model_version}`, window {manifest.window}, "
        f"{counted(manifest.n_features, 'feature')}, {long_term_words(manifest)}",
        f"- {counted(s['entities'], 'entity', 'entities')}, "
        f"{counted(s['readings'], 'reading')}, {s['windows_scored']:,} "
        f"windows scored through Kafka ({where})",
        f"- throughput {s['throughput_readings_per_s']:,.0f} readings/s over "
        f"{s['stream_seconds']:.1f} s"
        + (" (from the consumer's partition assignment)" if s["embedded_broker"] else "")
        + "; "
        f"reading-to-score latency p50 {lat['p50']:.1f} ms, "
        f"p95 {lat['p95']:.1f} ms, p99 {lat['p99']:.1f} ms"
        + (" (as fast as possible: latency includes queueing)" if not opts.rate else ""),
        f"- parity (stream vs offline batch scores): max |diff| = {s['parity_max_abs']:.2e} "
        f"(limit {s['parity_limit']:.0e}) -> **{'OK' if s['parity_ok'] else 'FAILED'}**",
        f"- duplicate score records dropped: {s['duplicate_scores_dropped']}",
        f"- {SELECTION_NOTE}",
    ]
    if s["sensors_with_earlier_state"]:
        k = max(1, int(manifest.score.smoothing))
        lines.append(
            f"- {s['sensors_with_earlier_state']} sensors already had state in the running "
            "consumer (an earlier replay)"
            + (": their first scores also depend on earlier windows and are left out of the "
               "score parity (" + (f"{k - 1} smoothed ones" if manifest.score.long_term is None
                                   else "until the long-term term's earlier level has faded "
                                        "below the limit")
               + "; both error terms are compared on every row)"
               if k > 1 or manifest.score.long_term is not None else ""))
    lines += [
        "",
        "Metrics are computed on the streamed scores. best-F1 and AUC-PR use no point "
        "adjustment; `f1_at_threshold` uses the deployed, label-free threshold"
        + ("" if s["warning_ratio"] == 1.0 else
           f" times {s['warning_ratio']:g} (SD_DETECTOR__WARNING_RATIO), where this consumer "
           "opens episodes (`evaluate` measures it at the threshold itself, so the two differ)")
        + "; point-adjusted "
        "best-F1 (`pa_best_f1`) is shown only next to the same figure for random scores "
        "(`random_pa_best_f1`), which shows how much point adjustment inflates any detector. "
        "HitRate (where the dataset names the responsible features) averages over the `open` "
        "and every `update` event inside an interpretable anomaly range ("
        + ("this replay's consumer sends an update at each rise of the peak: long episodes "
           "weigh more" if s["embedded_broker"] else "the deployment's consumer sends "
           "updates at its own SD_DETECTOR__UPDATE_INTERVAL_S") + "). "
        "`alerts`: alert episodes opened; `rc_alerts`: the `open` and `update` events HitRate "
        "averages over; `parity_max_abs`: the entity's largest streamed-vs-offline difference.",
        "",
        markdown_table(rows, ["entity", *COLUMNS], title=None,
                       formats={"parity_max_abs": ".1e"}),
        "",
        "## Alert episodes",
        "",
        "What the consumer raised, an episode being an alert's `open` to its `resolve`, against "
        "the labelled incidents (runs of anomalous rows). `incident_recall`: incidents during "
        "which an episode was open; `episode_precision`: episodes that overlap an incident; "
        "`event_f1`: their harmonic mean. Any overlap counts, which favours long episodes, so "
        "`random_event_f1` is the same for episodes of the same lengths placed at random "
        f"(mean of 100 placements, seed {opts.seed}). `false_episodes_per_10k`: episodes that "
        "overlap no incident per 10,000 readings; `alert_share`: the share of readings with an "
        "episode open; `delay_p50`: median readings from an incident's start to its first "
        "reading under an open episode.",
        "",
        markdown_table(rows, ["entity", *EVENT_COLUMNS], title=None,
                       formats={"incidents": ".1f", "false_episodes_per_10k": ".1f",
                                "delay_p50": ".1f"}),
        "",
    ]
    if opts.plots:
        lines += ["Plots: " + ", ".join(f"[{r['entity']}]({plot_file_name(r['entity'])})"
                                        for r in rows[:50]), ""]
    return "\n".join(lines)


def alert_ranges(alerts: list[dict[str, Any]], n_ctx: int, n_rows: int,
                 t0_ms: int = T0_MS) -> list[tuple[int, int]]:
    """Alert episodes as ``(start, end_exclusive)`` test-row ranges, for the plots.

    An episode runs from its ``open`` to its ``resolve`` (same ``alert_id``), the resolving
    window included; one still open at the end runs to the last row. A resolve without its
    open (the episode began before this run's rows) starts at the episode's start, clipped.
    """
    def row(ms: int) -> int:
        return min(max(_row_of(ms, n_ctx, t0_ms), 0), n_rows)

    starts: dict[str, int] = {}
    out: list[tuple[int, int]] = []
    for a in sorted(alerts, key=lambda a: (a["window_end"], a["event"] != "open")):
        aid = a["alert_id"]
        if a["event"] == "open":
            starts.setdefault(aid, row(a["window_end"]))
        elif a["event"] == "resolve":
            start = starts.pop(aid, row(a["episode_start"]))
            out.append((start, max(start, row(a["window_end"] + STEP_MS))))
    out += [(start, n_rows) for start in starts.values()]
    return sorted(r for r in out if r[1] > r[0])


def _plots(out_dir: Path, data: dict[str, Any], warning_ratio: float, progress: bool) -> None:
    from stream_detector.plots import plot_entity

    for name, d in tqdm(data.items(), desc="plots", disable=not progress, leave=False):
        e: Entity = d["entity"]
        # the line where episodes open, the level f1_at_threshold is measured at
        plot_entity(out_dir / plot_file_name(name), name, d["score"], e.labels,
                    d["ref"].threshold * warning_ratio,
                    signal=e.test, feature_names=list(e.features), alerts=d["episodes"],
                    title=f"{name}: streamed score, threshold, labelled anomalies, alerts")


def _remove_earlier_plots(out_dir: Path) -> None:
    """The plots of an earlier replay into this folder (the entities its report.json names):
    beside this report they would read as its own, perhaps of another artifact."""
    try:
        earlier = load_report(out_dir).get("entities") or []
    except (OSError, ValueError, AttributeError):  # none, or not a replay's report
        return
    for row in earlier:
        name = row.get("entity") if isinstance(row, dict) else None
        if isinstance(name, str):
            (out_dir / plot_file_name(name)).unlink(missing_ok=True)


def load_report(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "report.json").read_text())
