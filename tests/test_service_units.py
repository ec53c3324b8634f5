"""Service pieces that need no broker: offset tracking, broker wait, health/metrics server."""

from __future__ import annotations

import os
import socket
import time
from http.client import HTTPConnection
from pathlib import Path

import numpy as np
import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

import stream_detector.consumer as consumer_mod
from stream_detector.config import Settings, load_settings
from stream_detector.consumer import FatalError, OffsetTracker, wait_for_broker, wait_s
from stream_detector.errors import ConfigError, StreamDetectorError
from stream_detector.observability import HealthServer, HealthState, Metrics

A = ("readings", 0)
B = ("readings", 1)


# ----------------------------------------------------------------------------- the loop's wait


def test_consume_wait_is_rounded_up_to_whole_milliseconds() -> None:
    """librdkafka takes whole milliseconds and the client truncates: a wait under 1 ms would
    return at once and the loop would spin while a model task is in flight."""
    assert wait_s(0.05, None, 100.0) == 0.05  # no deadline: the configured timeout
    assert wait_s(0.05, 100.0009, 100.0) == 0.001  # 0.9 ms ahead: 1 ms, not 0
    assert wait_s(0.05, 100.0 + 0.0031, 100.0) == 0.004
    assert wait_s(0.05, 100.002, 100.0) == pytest.approx(0.002)  # float noise: not 3 ms
    assert wait_s(0.05, 101.0, 100.0) == 0.05  # capped by the timeout
    assert wait_s(0.05, 99.9, 100.0) == 0.0 and wait_s(0.05, 100.0, 100.0) == 0.0  # due now
    assert wait_s(0.0004, None, 0.0) == 0.001  # a sub-millisecond setting would spin too
    # what the client hands librdkafka, int(timeout * 1000), is never 0 for a wait ahead
    for ahead in [i * 1e-5 for i in range(1, 5001)]:
        assert int(wait_s(0.05, 100.0 + ahead, 100.0) * 1000) >= 1


# ----------------------------------------------------------------------------- OffsetTracker


def test_offsets_are_stored_in_order() -> None:
    t = OffsetTracker()
    c10, c11, c12 = (t.begin(A, off + 1) for off in (10, 11, 12))
    assert t.advance() == {}  # nothing finished yet
    t.release(c10)
    assert t.advance() == {A: 11}  # next offset to store = one past the finished prefix
    assert t.advance() == {}  # reported once
    t.release(c11)
    t.release(c12)
    assert t.advance() == {A: 13}
    assert t.in_flight() == 0


def test_unfinished_chunk_holds_back_later_ones() -> None:
    t = OffsetTracker()
    chunks = [t.begin(A, off + 1) for off in range(5)]
    for c in chunks[1:]:
        t.release(c)
    assert t.advance() == {}  # offset 0 is still pending
    assert t.in_flight(A) == 5
    t.release(chunks[0])
    assert t.advance() == {A: 5}
    assert t.in_flight(A) == 0


def test_a_chunk_is_stored_when_every_reading_in_it_is_done() -> None:
    t = OffsetTracker()
    first = t.begin(A, 100, 40)  # offsets 60..99 of one consume() batch: one hold each
    second = t.begin(A, 130, 30)
    assert t.in_flight(A) == 70
    t.release(first, 39)  # 39 windows scored, nothing to publish
    t.release(second, 30)
    assert t.advance() == {}  # one reading of the first chunk is still open
    t.hold(first)  # its alert goes out
    t.release(first)  # the reading's own hold
    assert t.advance() == {}
    t.release(first)  # the alert is acknowledged
    assert t.advance() == {A: 130}  # both chunks at once
    assert t.in_flight() == 0


def test_settled_chunks_are_reported_once_when_done_even_out_of_order() -> None:
    t = OffsetTracker()
    first, second = t.begin(A, 10, 2, born=1.0), t.begin(A, 20, 1, born=2.0)
    t.release(second)  # done, though its offsets wait for the first chunk
    t.release(first)  # the first chunk still has a reading open
    assert [c.born for c in t.take_settled()] == [2.0]
    t.release(first)
    assert [c.born for c in t.take_settled()] == [1.0]
    assert t.take_settled() == []
    assert t.advance() == {A: 20}
    t.release(first)  # a duplicate callback after the chunk was stored
    t.drop(A)
    stale = t.begin(A, 30, 1)
    t.drop(A)
    t.release(stale)  # the partition was lost meanwhile: not processed here
    assert t.take_settled() == []


def test_store_offsets_times_the_settled_chunks() -> None:
    from stream_detector.consumer import DetectorService

    class FakeConsumer:
        def __init__(self) -> None:
            self.stored: list = []

        def store_offsets(self, offsets) -> None:
            self.stored.extend((o.topic, o.partition, o.offset) for o in offsets)

    service = DetectorService(Settings(), None, None, serve_http=False)  # type: ignore[arg-type]
    service._consumer = FakeConsumer()  # type: ignore[assignment]
    now = time.monotonic()
    a, b = service.tracker.begin(A, 5, 1, now - 0.030), service.tracker.begin(B, 9, 1, now - 3.0)
    service.tracker.release(a)
    service.tracker.release(b)
    service._store_offsets()
    # one offset per partition; their order follows a set's, which varies between processes
    assert sorted(service._consumer.stored) == [("readings", 0, 5), ("readings", 1, 9)]
    sample = service.metrics.registry.get_sample_value
    assert sample("sd_processing_seconds_count") == 2
    assert sample("sd_processing_seconds_bucket", {"le": "0.03"}) == 0
    assert sample("sd_processing_seconds_bucket", {"le": "0.04"}) == 1
    assert sample("sd_processing_seconds_bucket", {"le": "5.0"}) == 2


def test_holds_are_counted() -> None:
    t = OffsetTracker()
    c = t.begin(A, 8)  # one hold from begin
    t.hold(c)  # e.g. a score record in flight
    t.hold(c)  # e.g. an alert in flight
    t.release(c)  # begin's hold
    assert t.advance() == {}
    t.release(c)
    assert t.advance() == {}
    t.release(c)  # last delivery acknowledged
    assert t.advance() == {A: 8}


def test_gaps_in_offsets_and_partitions_are_independent() -> None:
    t = OffsetTracker()
    a1 = t.begin(A, 101)
    a2 = t.begin(A, 104)  # compacted topic / transaction markers: offsets need not be contiguous
    b1 = t.begin(B, 6)
    t.release(a2)
    t.release(b1)
    assert t.advance() == {B: 6}
    t.release(a1)
    assert t.advance() == {A: 104}
    assert t.in_flight() == 0


def test_drop_forgets_a_partition_and_late_callbacks_are_harmless() -> None:
    t = OffsetTracker()
    a1, b1 = t.begin(A, 2), t.begin(B, 2)
    a2, b2 = t.begin(A, 3), t.begin(B, 3)
    t.release(a1)
    t.drop(A)  # revoked / lost before advance()
    assert t.in_flight(A) == 0
    assert t.in_flight() == 2
    assert t.advance() == {}  # a dropped partition is never stored
    # deliveries and scored windows of the dropped partition may still come back
    t.hold(a2)
    t.release(a2)
    assert t.advance() == {}
    t.release(b1)
    assert t.advance() == {B: 2}
    # after re-assignment the partition starts afresh
    t.release(t.begin(A, 51))
    assert t.advance() == {A: 51}
    t.drop(("never", 0))  # unknown partition: no error
    t.release(b2)
    assert t.advance() == {B: 3}


def test_a_lost_and_reassigned_partition_ignores_its_old_generation() -> None:
    """Lost, assigned again and the same offsets read again: a stale release (a window scored
    or a delivery report from before the loss) must not free the new readings' holds."""
    t = OffsetTracker()
    old = t.begin(A, 8, 3)
    t.hold(old)  # e.g. an alert in flight
    assert t.current(old)
    t.drop(A)  # partitions lost
    new = t.begin(A, 8, 3)  # re-assigned, the same offsets are read again
    assert t.current(new) and not t.current(old)  # a new generation
    t.release(old, 4)
    t.hold(old)
    assert t.advance() == {}  # the new readings are still unfinished
    t.release(new, 3)
    assert t.advance() == {A: 8}


def test_publish_skips_results_read_before_their_partition_was_lost() -> None:
    from stream_detector.consumer import DetectorService
    from stream_detector.detector import ScoredBatch

    def batch(*refs) -> ScoredBatch:
        n = len(refs)
        return ScoredBatch(("s1",) * n, refs, [0] * n, [1] * n, [0.5] * n, [0.1] * n,
                           [0.2] * n, [1.0] * n, ["normal"] * n, {}, "m")

    for scores in ("scores", ""):
        settings = Settings(kafka={"score_topic": scores})
        service = DetectorService(settings, None, None, serve_http=False)  # type: ignore[arg-type]
        service._producer = _RecordingProducer()  # type: ignore[assignment]
        stale = service.tracker.begin(A, 8)
        service.tracker.drop(A)  # what _on_lost does
        fresh = service.tracker.begin(A, 8, 2)
        silent = None  # a rebuild reading
        service._publish([batch((stale, 0), (fresh, 0), (silent, 0))])
        if scores:
            # only the fresh reading's score goes out; its chunk waits for the other reading
            assert [topic for topic, _ in service._producer.sent] == ["scores"]
            service._producer.callbacks[0](None, None)
        else:
            assert service._producer.sent == []
        assert service.tracker.advance() == {}  # one reading of the fresh chunk is open
        service._publish([batch((fresh, 0))])
        if scores:
            assert service.tracker.advance() == {}  # its score record is not delivered yet
            service._producer.callbacks[1](None, None)
        assert service.tracker.advance() == {A: 8}
        assert service.metrics.windows._value.get() == 2


def test_publish_alerts_hold_their_chunk_and_go_out_in_window_order() -> None:
    """Score topic off: a batch's alerts are produced in window order, each holding its chunk
    until the broker acknowledges it, while the windows' own holds are released together;
    an alert of a partition lost meanwhile is not produced."""
    from stream_detector.consumer import DetectorService
    from stream_detector.detector import ScoredBatch
    from stream_detector.records import Alert

    def alert(sensor: str, end: int) -> Alert:
        return Alert(alert_id=f"a-{sensor}", event="open", sensor=sensor, level="warning",
                     score=2.0, peak_score=2.0, threshold=1.0, reconstruction_error=0.1,
                     forecast_error=0.2, top_features=(("x", 1.0),), episode_start_ms=end,
                     window_start_ms=end - 1, window_end_ms=end, model_version="m",
                     detected_at_ms=end)

    service = DetectorService(Settings(kafka={"score_topic": ""}), None, None,  # type: ignore[arg-type]
                              serve_http=False)
    service._producer = _RecordingProducer()  # type: ignore[assignment]
    tracker = service.tracker
    stale = tracker.begin(B, 3)
    tracker.drop(B)
    chunk = tracker.begin(A, 8, 4)
    refs = ((chunk, 101), (chunk, 102), (stale, 103), (chunk, 104), (chunk, 105))
    sensors = ("s0", "s1", "s2", "s3", "s4")
    # built out of window order: the alerts must still leave in window order
    alerts = {3: alert("s3", 4), 1: alert("s1", 2), 2: alert("s2", 3)}
    n = len(refs)
    batch = ScoredBatch(sensors, refs, [0] * n, list(range(1, n + 1)), [0.5] * n, [0.1] * n,
                        [0.2] * n, [1.0] * n, ["normal"] * n, alerts, "m")
    service._publish([batch])
    sent = service._producer.sent
    assert [orjson.loads(value)["sensor"] for _, value in sent] == ["s1", "s3"]  # s2: stale
    assert tracker.advance() == {}  # both alerts in flight hold the chunk
    service._producer.callbacks[0](None, None)
    assert tracker.advance() == {}
    service._producer.callbacks[1](None, None)
    assert tracker.advance() == {A: 8}
    assert service.metrics.windows._value.get() == 4

    # a batch over two chunks (two partitions) and a silent rebuild reading: each chunk
    # settles when its own alert is acknowledged; the rebuild reading's alert is not produced
    service._producer = _RecordingProducer()  # type: ignore[assignment]
    first, second = tracker.begin(A, 10, 2), tracker.begin(B, 20, 1)
    refs = ((first, 1), (None, 2), (first, 3), (second, 4))
    alerts = {1: alert("s1", 2), 2: alert("s2", 3), 3: alert("s3", 4)}
    n = len(refs)
    batch = ScoredBatch(("s0", "s1", "s2", "s3"), refs, [0] * n, list(range(1, n + 1)),
                        [0.5] * n, [0.1] * n, [0.2] * n, [1.0] * n, ["normal"] * n, alerts, "m")
    service._publish([batch])
    assert [orjson.loads(v)["sensor"] for _, v in service._producer.sent] == ["s2", "s3"]
    assert tracker.advance() == {}
    service._producer.callbacks[1](None, None)  # s3's alert: partition B's chunk
    assert tracker.advance() == {B: 20}
    service._producer.callbacks[0](None, None)
    assert tracker.advance() == {A: 10}


def test_publish_with_scores_settles_a_chunk_only_when_every_record_of_it_is_delivered() -> None:
    """Score topic on: each window's score record takes over its window's hold (one shared
    delivery callback per chunk), an alert holds once more; the chunk settles only when every
    record of every window in it is acknowledged, in any order. Records go out in window
    order, each alert after its window's score; a failed score delivery is fatal and names
    the record."""
    from confluent_kafka import Message

    from stream_detector.consumer import DetectorService
    from stream_detector.detector import ScoredBatch
    from stream_detector.records import Alert

    alert = Alert(alert_id="a-s1", event="open", sensor="s1", level="warning", score=2.0,
                  peak_score=2.0, threshold=1.0, reconstruction_error=0.1, forecast_error=0.2,
                  top_features=(("x", 1.0),), episode_start_ms=2, window_start_ms=1,
                  window_end_ms=2, model_version="m", detected_at_ms=2)
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        service = DetectorService(Settings(kafka={"score_topic": "scores"}), None,  # type: ignore[arg-type]
                                  None, serve_http=False)
        service._producer = _RecordingProducer()  # type: ignore[assignment]
        tracker = service.tracker
        chunk, other = tracker.begin(A, 8, 3), tracker.begin(B, 5, 1)
        refs = ((chunk, 1), (chunk, 2), (other, 3))
        batch = ScoredBatch(("s0", "s1", "s2"), refs, [0, 1, 2], [1, 2, 3], [0.5, 2.0, 0.5],
                            [0.1] * 3, [0.2] * 3, [1.0] * 3, ["normal", "warning", "normal"],
                            {1: alert}, "m")
        service._publish([batch])
        sent = [(t, orjson.loads(v)) for t, v in service._producer.sent]
        assert [(t, d.get("type", "alert"), d["sensor"]) for t, d in sent] == [
            ("scores", "score", "s0"), ("scores", "score", "s1"),
            ("sensor-alerts", "alert", "s1"), ("scores", "score", "s2")]
        assert sent[1][1]["window_end"] == 2 and sent[1][1]["score"] == 2.0
        assert tracker.advance() == {}  # chunk A: 1 reading open; everything in flight
        tracker.release(chunk)  # the third reading of chunk A (say, it only warmed a window)
        callbacks = service._producer.callbacks
        done: dict = {}
        left = {A: {0, 1, 2}, B: {3}}  # records 0-2 are of chunk A, record 3 of chunk B
        for k in order:
            callbacks[k](None, None)
            done.update(tracker.advance())
            for tp in left:
                left[tp].discard(k)
                # a chunk settles with its last record, not before
                assert (tp in done) == (not left[tp]), (order, k, done)
        assert done == {A: 8, B: 5}

    # a failed score delivery stops the service; the chunk stays held
    service._producer = _RecordingProducer()  # type: ignore[assignment]
    chunk = service.tracker.begin(A, 20, 1)
    batch = ScoredBatch(("s9",), ((chunk, 1),), [0], [7], [0.5], [0.1], [0.2], [1.0],
                        ["normal"], {}, "m")
    service._publish([batch])
    topic, value = service._producer.sent[0]
    msg = Message(topic=topic, partition=0, offset=0, key=b"s9", value=value, timestamp=(1, 1))
    service._producer.callbacks[0](KafkaError(KafkaError._MSG_TIMED_OUT), msg)
    assert service._fatal is not None and "delivery to scores failed" in service._fatal
    assert f"score of sensor s9 7 ({len(value)} bytes)" in service._fatal
    assert service.tracker.advance() == {}


def test_delivery_callbacks_keep_no_payload_alive() -> None:
    """A callback that referred to the record's bytes kept every queued payload alive in
    Python beside librdkafka's copy: twice the queue's memory while the broker was slow
    (review: 2.1 GB resident with dead letters of ~700 KB). The callbacks of alerts, dead
    letters and score records hold no bytes; a failure still names the record's size (from
    the delivery report)."""
    from confluent_kafka import Message

    from stream_detector.records import ReadingDecoder

    def held(cb) -> list:  # byte strings the callback keeps, but the key (needed to resend)
        cells = [c.cell_contents for c in (getattr(cb, "__closure__", None) or ())]
        return [c for c in cells if isinstance(c, bytes | bytearray) and len(c) > 64]

    service = _service()
    decoder = ReadingDecoder(service.manifest.features, 65536)
    service._ingest([_msg(0, b"{nope" + b" " * 10_000)], decoder, service.detector)
    [(topic, value)] = service._producer.sent
    [cb] = service._producer.callbacks
    assert held(cb) == []
    msg = Message(topic=topic, partition=0, offset=0, key=b"s", value=value, timestamp=(1, 1))
    cb(KafkaError(KafkaError._MSG_TIMED_OUT), msg)
    assert service._fatal is not None and f"({len(value)} bytes)" in service._fatal


def test_ingest_tracks_a_chunk_per_partition_and_stores_after_everything_is_done() -> None:
    """One consume() batch over two partitions: silent rebuild readings of partition 0 are
    not tracked, a bad record goes to the dead-letter topic and holds its chunk until
    acknowledged, warming readings finish at once, and offsets are stored per partition only
    when every reading of the chunk is done."""
    from confluent_kafka import Message

    from stream_detector.records import ReadingDecoder, encode_reading

    service = _service()
    manifest, settings = service.manifest, service.settings
    service._silent_until[A] = 3  # partition 0 was assigned with committed offset 3
    msgs = []
    for off in range(6):  # partition 0: offsets 0-2 silent, 3-5 live; sensor "p0"
        msgs.append(Message(topic="readings", partition=0, offset=off, key=b"p0",
                            value=encode_reading("p0", 1000 + off, [0.0, 1.0, 2.0]),
                            timestamp=(1, 5000 + off)))
    for off in range(10, 14):  # partition 1: sensor "p1", offset 12 is not JSON
        value = b"{nope" if off == 12 else encode_reading("p1", 2000 + off, [1.0, 1.0, 1.0])
        msgs.append(Message(topic="readings", partition=1, offset=off, key=b"p1",
                            value=value, timestamp=(1, 6000 + off)))
    decoder = ReadingDecoder(manifest.features, settings.service.max_message_bytes)
    service._ingest(msgs, decoder, service.detector)
    tracker = service.tracker
    assert A not in service._silent_until  # partition 0's rebuild ends in this batch
    assert tracker.in_flight(A) == 3 and tracker.in_flight(B) == 4
    assert [topic for topic, _ in service._producer.sent] == [settings.kafka.dead_letter_topic]
    assert service.metrics.readings._value.get() == 7
    assert service.metrics.rebuilt._value.get() == 3
    assert service._sensor_tp == {"p0": A, "p1": B}
    service._publish(service.detector.flush_batches())
    # partition 0: 3 live readings, all with full windows (the silent ones warmed them)
    # partition 1: 2 warming, 1 scored, 1 dead-lettered and not yet acknowledged
    assert tracker.advance() == {A: 6}
    service._producer.callbacks[0](None, None)
    assert tracker.advance() == {B: 14}
    assert service.metrics.windows._value.get() == 4


def test_tuned_gc_applies_once_and_restores_everything(monkeypatch) -> None:
    import gc

    from stream_detector.consumer import tuned_gc

    # the freeze/unfreeze calls are counted, not the frozen objects: threads left by earlier
    # tests may free a frozen object at any moment (the count then drops by one or two), so
    # comparing counts was racy (452,212 vs 452,214 in one CI run)
    calls: list[str] = []
    real_freeze, real_unfreeze = gc.freeze, gc.unfreeze
    monkeypatch.setattr(gc, "freeze", lambda: (calls.append("freeze"), real_freeze())[1])
    monkeypatch.setattr(gc, "unfreeze", lambda: (calls.append("unfreeze"), real_unfreeze())[1])
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with tuned_gc(50_000, True):
        assert gc.get_threshold() == (50_000, *before[1:])
        assert gc.get_freeze_count() > 0  # everything alive at start-up is out of reach
        assert calls == ["freeze"]
        with tuned_gc(123, False):  # a second service in the same process shares the tuning
            assert gc.get_threshold()[0] == 50_000
        assert gc.get_threshold()[0] == 50_000 and gc.get_freeze_count() > 0
        assert calls == ["freeze"]  # the inner block neither froze again nor unfroze
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    assert calls == ["freeze", "unfreeze"]
    with tuned_gc(0, False):  # both off: nothing changes
        assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    assert gc.get_threshold() == before


def test_metrics_time_collector_pauses_and_carry_the_process_series() -> None:
    import gc

    from prometheus_client import generate_latest

    m = Metrics()
    timer = m.gc_callback()
    gc.callbacks.append(timer)
    try:
        gc.collect()  # a full collection
    finally:
        gc.callbacks.remove(timer)
    text = generate_latest(m.registry).decode()
    assert 'sd_gc_pause_seconds_count{generation="2"} 1.0' in text
    assert 'sd_gc_pause_seconds_count{generation="0"} 0.0' in text
    for series in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                   "python_gc_collections_total", "python_info"):
        assert series in text, series
    Metrics()  # each Metrics has its own registry: a second one does not clash


def test_every_sd_metric_is_documented_in_the_deploy_readme() -> None:
    readme = (Path(__file__).resolve().parents[1] / "deploy" / "README.md").read_text()
    names = [f.name + ("_total" if f.type == "counter" else "")
             for f in Metrics().registry.collect() if f.name.startswith("sd_")]
    assert len(names) >= 13
    assert [n for n in names if f"| `{n}` |" not in readme] == []


def test_release_after_advance_is_ignored() -> None:
    t = OffsetTracker()
    c = t.begin(A, 2)
    t.release(c)
    assert t.advance() == {A: 2}
    t.release(c)  # a duplicate callback
    t.hold(c)
    later = t.begin(A, 3)
    t.release(c)  # must not count against the next chunk
    assert t.advance() == {}
    t.release(later)
    assert t.advance() == {A: 3}
    with pytest.raises(ValueError, match="at least one reading"):
        t.begin(A, 4, 0)


# ----------------------------------------------------------------------------- wait_for_broker


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in list(os.environ):
        if key.upper().startswith("SD_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # no repository .env
    return tmp_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(bootstrap: str, retries: int, backoff: float) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": bootstrap},
        service={"startup_retries": retries, "startup_backoff_s": backoff},
    )


def test_wait_for_broker_gives_up_on_a_closed_port(clean_env, monkeypatch) -> None:
    """A real librdkafka client against a port nothing listens on. The metadata timeout of
    wait_for_broker (5 s per attempt) is shortened so the test stays fast."""
    calls: list[float] = []

    class QuickAdmin(AdminClient):
        def list_topics(self, *args, **kwargs):
            calls.append(kwargs.get("timeout", -1))
            kwargs["timeout"] = 0.3
            return super().list_topics(*args, **kwargs)

    monkeypatch.setattr(consumer_mod, "AdminClient", QuickAdmin)
    port = _free_port()
    delays: list[float] = []
    settings = _settings(f"127.0.0.1:{port}", retries=2, backoff=0.01)
    with pytest.raises(FatalError, match=rf"broker 127.0.0.1:{port} unreachable after 3 attempts"):
        wait_for_broker(settings, sleep=delays.append)
    assert len(calls) == 3 and all(c > 0 for c in calls)
    assert delays == [0.01, 0.02]  # backoff doubles between attempts, none after the last
    assert issubclass(FatalError, StreamDetectorError)


class _FakeAdmin:
    """Fails ``fail`` times, then answers with ``topics``."""

    instances: list[_FakeAdmin] = []
    fail = 0
    topics: dict[str, object] = {}

    def __init__(self, conf: dict) -> None:
        self.conf = conf
        self.calls = 0
        _FakeAdmin.instances.append(self)

    def list_topics(self, timeout: float = -1):
        self.calls += 1
        if self.calls <= _FakeAdmin.fail:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "connection refused"))
        return type("Metadata", (), {"topics": _FakeAdmin.topics})()


@pytest.fixture
def fake_admin(monkeypatch):
    _FakeAdmin.instances = []
    monkeypatch.setattr(consumer_mod, "AdminClient", _FakeAdmin)
    return _FakeAdmin


def test_backoff_doubles_up_to_30_seconds(clean_env, fake_admin) -> None:
    fake_admin.fail = 100
    delays: list[float] = []
    with pytest.raises(FatalError, match="unreachable after 8 attempts"):
        wait_for_broker(_settings("b:9092", retries=7, backoff=8.0), sleep=delays.append)
    assert delays == [8.0, 16.0, 30.0, 30.0, 30.0, 30.0, 30.0]
    assert fake_admin.instances[0].calls == 8


def test_wait_for_broker_returns_once_the_broker_answers(clean_env, fake_admin) -> None:
    fake_admin.fail = 2
    fake_admin.topics = {}  # input topic missing: only a warning
    delays: list[float] = []
    settings = Settings(
        kafka={"bootstrap_servers": "b:9092", "security_protocol": "SASL_SSL",
               "sasl_mechanism": "PLAIN", "sasl_password": "pw"},
        service={"startup_retries": 3, "startup_backoff_s": 0.5},
    )
    wait_for_broker(settings, sleep=delays.append)
    assert delays == [0.5, 1.0]
    admin = fake_admin.instances[0]
    assert admin.calls == 3
    # same security settings as the clients (and the log bridge every client gets)
    assert {k: v for k, v in admin.conf.items() if k != "logger"} == settings.kafka.common()
    assert admin.conf["sasl.password"] == "pw"


def test_zero_retries_means_one_attempt(clean_env, fake_admin) -> None:
    fake_admin.fail = 1
    delays: list[float] = []
    with pytest.raises(FatalError, match="after 1 attempts"):
        wait_for_broker(_settings("b:9092", retries=0, backoff=1.0), sleep=delays.append)
    assert delays == []


def test_waiting_for_the_broker_beats_the_heartbeat_and_stops_on_sigterm(clean_env,
                                                                       fake_admin) -> None:
    """The pod is alive while it retries (before, liveness killed it at ~90 s, during the
    documented minutes of retries), and SIGTERM ends the wait at once instead of after it."""
    import threading

    fake_admin.fail = 100
    beats: list[int] = []
    stop = threading.Event()
    settings = _settings("b:9092", retries=5, backoff=0.01)
    with pytest.raises(FatalError):
        wait_for_broker(settings, beat=lambda: beats.append(1), stop=stop)
    assert len(beats) == 11  # every attempt, and every wait between them
    stop.set()
    assert wait_for_broker(settings, beat=lambda: beats.append(1), stop=stop) is False
    fake_admin.fail = 0
    assert wait_for_broker(settings, stop=threading.Event()) is True


def test_a_long_backoff_keeps_beating_the_heartbeat(clean_env, fake_admin) -> None:
    """Waits between attempts reach 30 s, the liveness probe's stall limit: the heartbeat beat
    once per attempt only, so /healthz went 503 during each long wait."""
    import threading

    fake_admin.fail = 100
    stamps: list[float] = []
    with pytest.raises(FatalError):
        wait_for_broker(_settings("b:9092", retries=1, backoff=1.5),
                        beat=lambda: stamps.append(time.monotonic()), stop=threading.Event())
    assert len(stamps) == 4  # attempt, 1 s into the wait, at its end (1.5 s), attempt


def test_check_broker_answers_once_and_fails_with_1(clean_env, fake_admin, capsys) -> None:
    """`check --broker` is a probe: one attempt and exit 1 on failure (it used the service's
    start-up retries, about 4 minutes, and exited 2 as if the input were bad)."""
    from stream_detector.cli import check_broker

    fake_admin.fail = 100
    assert check_broker(_settings("b:9092", retries=10, backoff=30.0)) == 1
    assert "FAIL broker" in capsys.readouterr().out
    assert fake_admin.instances[0].calls == 1
    fake_admin.fail = 0
    assert check_broker(_settings("b:9092", retries=10, backoff=30.0)) == 0


def test_check_broker_checks_the_per_client_librdkafka_properties(clean_env, fake_admin,
                                                                   monkeypatch) -> None:
    """The broker check built only an admin client from the common properties: a property
    librdkafka refuses in SD_KAFKA__CONSUMER_EXTRA / _PRODUCER_EXTRA passed it, then serve
    exited 2 on it."""
    from stream_detector.cli import check_broker

    for var in ("SD_KAFKA__CONSUMER_EXTRA", "SD_KAFKA__PRODUCER_EXTRA"):
        monkeypatch.setenv(var, '{"no.such.prop": 1}')
        with pytest.raises(ConfigError, match="No such configuration property.*no.such.prop"):
            check_broker(load_settings(kafka={"bootstrap_servers": "b:9092"}))
        monkeypatch.setenv(var, "{}")
    assert fake_admin.instances == []  # refused before any broker request


def test_serve_names_a_refused_client_property_before_waiting_for_the_broker(
        clean_env, fake_admin, monkeypatch) -> None:
    """A consumer-only property librdkafka refuses, with the broker away: serve retried the
    broker for minutes and then said only "unreachable" (review). Now the settings are
    checked first: a ConfigError, and no broker request made."""
    from stream_detector.consumer import DetectorService
    from stream_detector.testing import NumpyScorer, make_manifest

    fake_admin.fail = 100
    monkeypatch.setenv("SD_KAFKA__CONSUMER_EXTRA", '{"fetch.max.bytes": "abc"}')
    settings = load_settings(kafka={"bootstrap_servers": "127.0.0.1:1"},
                             service={"startup_retries": 100, "startup_backoff_s": 30.0})
    service = DetectorService(settings, make_manifest(window=3), NumpyScorer(), serve_http=False)
    with pytest.raises(ConfigError, match="fetch.max.bytes"):
        service.run()
    assert fake_admin.instances == []


@pytest.mark.parametrize(("value", "normalised"), [
    (" cooperative-sticky", "cooperative-sticky"), ("range, roundrobin", "range,roundrobin")])
def test_the_assignment_strategy_is_normalised(clean_env, value, normalised) -> None:
    """librdkafka took " cooperative-sticky" (cooperative) while the service compared the raw
    string and assigned eagerly: a fatal "Erroneous state" at the first assignment (review)."""
    k = load_settings(kafka={"partition_assignment_strategy": value}).kafka
    assert k.partition_assignment_strategy == normalised
    assert k.consumer_config()["partition.assignment.strategy"] == normalised


@pytest.mark.parametrize(("value", "says"), [
    ("cooperative_sticky", "one or more of cooperative-sticky, range, roundrobin"),
    ("", "one or more of"),
    ("cooperative-sticky,range", "cannot be combined")])
def test_a_wrong_assignment_strategy_is_refused_naming_the_variable(clean_env, monkeypatch,
                                                                   value, says) -> None:
    monkeypatch.setenv("SD_KAFKA__PARTITION_ASSIGNMENT_STRATEGY", value)
    with pytest.raises(ConfigError, match="SD_KAFKA__PARTITION_ASSIGNMENT_STRATEGY") as info:
        load_settings()
    assert says in str(info.value)


# ----------------------------------------------------------------------------- HealthServer


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    conn = HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


@pytest.fixture
def server():
    metrics, health = Metrics(), HealthState(stall_s=30.0)
    srv = HealthServer("127.0.0.1", 0, metrics, health)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_probes(server) -> None:
    assert server.port > 0
    assert _get(server.port, "/healthz")[0::2] == (200, b"ok")
    assert _get(server.port, "/readyz")[0::2] == (503, b"no")
    server.health.ready = True
    assert _get(server.port, "/readyz")[0::2] == (200, b"ready")
    assert _get(server.port, "/nope")[0] == 404


def test_probes_take_head_and_query_strings_and_idle_connections_are_closed(
        server, monkeypatch) -> None:
    """HEAD answered 501 and "/healthz?probe=1" 404 (some HTTP checkers send either); a
    connection that sent nothing held a server thread until its client closed it (review)."""
    conn = HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("HEAD", "/healthz")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Length") == "2"
        assert resp.read() == b""
    finally:
        conn.close()
    assert _get(server.port, "/healthz?probe=1")[0::2] == (200, b"ok")
    assert _get(server.port, "/metrics?x=1")[0] == 200

    import stream_detector.observability as obs

    monkeypatch.setattr(obs, "HTTP_IDLE_TIMEOUT_S", 0.3)
    srv = HealthServer("127.0.0.1", 0, Metrics(), HealthState())
    srv.start()
    try:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as idle:
            idle.sendall(b"GET /hea")  # and then nothing
            t0 = time.monotonic()
            assert idle.recv(100) == b""  # the server closed it
            assert time.monotonic() - t0 < 4
    finally:
        srv.stop()


def test_liveness_fails_when_the_loop_stalls() -> None:
    health = HealthState(stall_s=0.0)
    srv = HealthServer("127.0.0.1", 0, Metrics(), health)
    srv.start()
    try:
        assert _get(srv.port, "/healthz")[0::2] == (503, b"stalled")
        health.stall_s = 60.0
        health.beat()
        assert _get(srv.port, "/healthz")[0] == 200
    finally:
        srv.stop()


def test_metrics_endpoint(server) -> None:
    m = server.metrics
    m.readings.inc(3)
    m.alerts.labels("open", "critical").inc()
    m.dead_letters.labels("malformed_json").inc()
    m.batch_size.observe(17)
    status, ctype, body = _get(server.port, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain") and "version=" in ctype
    text = body.decode()
    for name in ("sd_readings_total 3.0", 'sd_alerts_total{event="open",level="critical"} 1.0',
                 'sd_dead_letters_total{reason="malformed_json"} 1.0', "sd_batch_size_bucket",
                 "sd_inference_seconds", "sd_reading_to_alert_seconds", "sd_consumer_lag",
                 "sd_sensors", "sd_assigned_partitions", "sd_windows_scored_total",
                 "sd_readings_rebuilt_total", "sd_readings_warming_total"):
        assert name in text, name
    # every metric of the package carries the sd_ prefix; the rest are the standard
    # process, collector and interpreter series
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    ours = [f for f in families if f.startswith("sd_")]
    assert ours and all(f.startswith(("sd_", "process_", "python_")) for f in families), families


def test_metrics_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()  # two services in one process: no duplicate-name error
    a.readings.inc()
    assert b.readings._value.get() == 0


def test_stop_frees_the_port() -> None:
    srv = HealthServer("127.0.0.1", 0, Metrics(), HealthState())
    srv.start()
    port = srv.port
    assert _get(port, "/healthz")[0] == 200
    srv.stop()
    assert srv.port == 0  # back to the configured port: no server
    with pytest.raises(ConnectionRefusedError):
        _get(port, "/healthz")
    # nothing listens any more: the port can be bound again (and a new server can use it)
    again = HealthServer("127.0.0.1", port, Metrics(), HealthState())
    again.start()
    try:
        assert again.port == port
        assert _get(port, "/healthz")[0] == 200
    finally:
        again.stop()
    srv.stop()  # stopping twice is harmless


def test_the_health_server_refuses_a_bad_address_with_a_config_error() -> None:
    """An address in use or a host that does not resolve: a ConfigError naming the settings
    (exit code 2 at the CLI), not an OSError traceback (exit code 1 means undelivered records)."""
    first = HealthServer("127.0.0.1", 0, Metrics(), HealthState())
    first.start()
    try:
        with pytest.raises(ConfigError, match="SD_SERVICE__HTTP_PORT.*in use"):
            HealthServer("127.0.0.1", first.port, Metrics(), HealthState()).start()
    finally:
        first.stop()
    with pytest.raises(ConfigError, match="SD_SERVICE__HTTP_HOST"):
        HealthServer("no-such-host.invalid", 0, Metrics(), HealthState()).start()


def test_the_health_server_serves_ipv6() -> None:
    """An IPv6 host binds an IPv6 socket (IPv6-only clusters probe the pod's IPv6 address)."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    srv = HealthServer("::1", 0, Metrics(), HealthState())
    try:
        srv.start()
    except ConfigError as exc:
        pytest.skip(f"::1 cannot be bound here: {exc}")
    try:
        assert srv.address == f"[::1]:{srv.port}"
        with socket.create_connection(("::1", srv.port), timeout=5) as c:
            c.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
            assert c.recv(64).startswith(b"HTTP/1.0 200")
    finally:
        srv.stop()


# ----------------------------------------------------------------------------- consumer edges


class _RecordingProducer:
    """Producer stand-in: records what is produced; flush() can take time and leave records."""

    def __init__(self, refuse: Exception | None = None, flush_left: int = 0) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.callbacks: list = []
        self.flush_timeouts: list[float] = []
        self.refuse, self.flush_left = refuse, flush_left

    def produce(self, topic, value, key, on_delivery) -> None:
        if self.refuse is not None:
            raise self.refuse
        self.sent.append((topic, value))
        self.callbacks.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        return 0

    def flush(self, timeout: float = 0) -> int:
        self.flush_timeouts.append(timeout)
        if self.flush_left:
            time.sleep(timeout)  # the broker does not answer: flush uses its whole budget
        return self.flush_left


class _ScriptedConsumer:
    """Consumer stand-in for DetectorService._loop: each consume() call takes the next step of
    a script; rebalance steps run the service's callbacks inside the call, as librdkafka does."""

    def __init__(self, service, script, committed: int | None = None,
                 watermarks: tuple[int, int] = (0, 100)) -> None:
        self.svc, self.script = service, list(script)
        self.assigned: set = set()
        self.committed_offset, self.watermarks = committed, watermarks
        self.stored: dict = {}

    def consume(self, num_messages: int = 1, timeout: float = -1):
        step = self.script.pop(0) if self.script else ("stop",)
        if step[0] == "stop":
            self.svc.stop()
            return []
        if step[0] == "revoke":
            self.svc._on_revoke(self, [TopicPartition("readings", 0)])
            return list(step[1]) if len(step) > 1 else []
        if step[0] == "assign":
            self.svc._on_assign(self, [TopicPartition("readings", 0)])
            return []
        if step[0] == "probe":  # look at the service from inside this call
            step[1](num_messages, timeout)
            return []
        return list(step[1])

    def committed(self, partitions, timeout=None):
        off = self.committed_offset if self.committed_offset is not None else -1001
        return [TopicPartition(p.topic, p.partition, off) for p in partitions]

    def get_watermark_offsets(self, partition, timeout=None, cached=False):
        return self.watermarks

    def assign(self, partitions) -> None:
        self.assigned = {(p.topic, p.partition) for p in partitions}
        self.positions = {(p.topic, p.partition): p.offset for p in partitions}

    incremental_assign = assign

    def unassign(self, *partitions) -> None:
        self.assigned = set()

    incremental_unassign = unassign

    def assignment(self):
        return [TopicPartition(t, p) for t, p in self.assigned]

    def store_offsets(self, offsets) -> None:
        for o in offsets:
            if (o.topic, o.partition) not in self.assigned:
                raise KafkaException(KafkaError(KafkaError._STATE))
            self.stored[(o.topic, o.partition)] = o.offset

    def commit(self, asynchronous: bool = True) -> None:
        if A in self.stored:
            self.committed_offset = self.stored[A]

    def close(self) -> None:
        self.closed = True
        if self.assigned:
            self.svc._on_revoke(self, [TopicPartition(t, p) for t, p in self.assigned])


def _service(producer=None, max_future_s: float | None = None, **kafka):
    from stream_detector.consumer import DetectorService
    from stream_detector.detector import Detector
    from stream_detector.testing import NumpyScorer, make_manifest

    manifest = make_manifest(window=3)
    detector: dict = {"max_batch": 1000}
    if max_future_s is not None:
        detector["max_future_s"] = max_future_s
    settings = Settings(kafka={"input_topic": "readings", "score_topic": "", **kafka},
                        detector=detector, service={"grace_period_s": 1.0})
    service = DetectorService(settings, manifest, NumpyScorer(), serve_http=False)
    service.detector = Detector(manifest, NumpyScorer(), settings.detector)
    service._producer = producer if producer is not None else _RecordingProducer()
    return service


def _msg(offset: int, value: bytes | None = None, partition: int = 0):
    from confluent_kafka import Message

    from stream_detector.records import encode_reading

    if value is None:
        value = encode_reading("s", 1000 + offset, [float(offset % 3), 1.0, 2.0])
    return Message(topic="readings", partition=partition, offset=offset, key=b"s", value=value,
                   timestamp=(1, 1))


def test_an_oversized_record_is_dead_lettered_with_a_prefix_not_a_crash() -> None:
    """A record near the broker's limit, base64-encoded whole, made a dead letter the producer
    refused at once (MSG_SIZE_TOO_LARGE): the service died on it at every restart."""
    import base64

    import orjson

    from stream_detector.consumer import DEAD_LETTER_MAX_ORIGINAL_BYTES
    from stream_detector.records import ReadingDecoder

    service = _service()
    big = b'{"sensor": "x", "ts": 1, "values": [' + b"1," * 400_000 + b"1]}"
    decoder = ReadingDecoder(service.manifest.features, 65536)
    service._ingest([_msg(0), _msg(1, big), _msg(2)], decoder, service.detector)
    [(topic, payload)] = service._producer.sent
    dead = orjson.loads(payload)
    assert topic == service.settings.kafka.dead_letter_topic and dead["reason"] == "oversized"
    kept = base64.b64decode(dead["original_b64"])
    assert kept == big[:DEAD_LETTER_MAX_ORIGINAL_BYTES] and len(payload) < 1_000_000
    assert f"first {DEAD_LETTER_MAX_ORIGINAL_BYTES} of {len(big)} bytes" in dead["detail"]
    assert dead["offset"] == 1
    # small bad records are still carried whole
    service._ingest([_msg(3, b"{nope")], decoder, service.detector)
    assert base64.b64decode(orjson.loads(service._producer.sent[1][1])["original_b64"]) == b"{nope"


def test_a_record_the_producer_refuses_at_once_stops_the_service_cleanly() -> None:
    refused = KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
    service = _service(_RecordingProducer(refuse=refused))
    from stream_detector.records import ReadingDecoder

    decoder = ReadingDecoder(service.manifest.features, 65536)
    # the error names the record, so on-call can find it (it named the output topic only)
    with pytest.raises(FatalError, match="cannot produce to sensor-readings-dlq: .*record: dead "
                       r"letter of input record readings 0 0 \(\d+ bytes\)"):
        service._ingest([_msg(0, b"{nope")], decoder, service.detector)


class _SizeLimitedProducer(_RecordingProducer):
    """Refuses records over ``limit`` bytes at once, as librdkafka does over
    message.max.bytes; with ``broker_limit``, accepts them and fails their delivery later, as
    a topic with a smaller max.message.bytes does."""

    def __init__(self, limit: int = 10**9, broker_limit: int = 10**9) -> None:
        super().__init__()
        self.limit, self.broker_limit = limit, broker_limit

    def produce(self, topic, value, key, on_delivery) -> None:
        if len(value) > self.limit:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
        super().produce(topic, value, key, on_delivery)

    def deliver(self) -> None:
        """Acknowledge (or fail) every record not yet reported, as poll()/flush() do; a
        callback must not produce (librdkafka's own rule, enforced here)."""
        start = getattr(self, "reported", 0)
        end = self.reported = len(self.sent)
        for i in range(start, end):
            too_large = len(self.sent[i][1]) > self.broker_limit
            self.callbacks[i](KafkaError(KafkaError.MSG_SIZE_TOO_LARGE) if too_large else None,
                              None)
        assert len(self.sent) == end, "a delivery callback produced"


@pytest.mark.parametrize("where", ["producer", "broker"])
def test_a_dead_letter_too_large_for_its_topic_goes_without_the_payload(where) -> None:
    """A dead-letter topic with a smaller max.message.bytes than the copy of the record: the
    service stopped (exit 2) on the same record at every restart, a crash loop. Now the dead
    letter goes without original_b64, and the reading's offset is stored once it is
    acknowledged."""
    import base64

    from stream_detector.records import ReadingDecoder

    big = b"x" * 3000  # not JSON: a dead letter with a 4,000-byte copy
    limits = {"limit": 1500} if where == "producer" else {"broker_limit": 1500}
    producer = _SizeLimitedProducer(**limits)
    service = _service(producer)
    service._consumer = _ScriptedConsumer(service, [])
    service._consumer.assigned = {A}
    decoder = ReadingDecoder(service.manifest.features, 65536)
    service._ingest([_msg(0, big)], decoder, service.detector)
    producer.deliver()
    if where == "broker":
        # refused by the broker: the delivery callback only queues the bare copy (producing,
        # or polling a full queue, from inside a callback aborted the process), and the loop
        # sends it
        assert len(service._resend) == 1 and len(producer.sent) == 1
        service._send_resends()
        producer.deliver()
    assert service._fatal is None and not service._resend
    letters = [orjson.loads(v) for topic, v in producer.sent if topic == "sensor-readings-dlq"]
    last = letters[-1]
    assert (last["topic"], last["partition"], last["offset"]) == ("readings", 0, 0)
    assert last["original_b64"] == "" and last["original_headers"] == []
    assert "original_b64 and original_headers left out" in last["detail"]
    if where == "broker":  # the full copy was tried first
        assert base64.b64decode(letters[0]["original_b64"]) == big
    service._store_offsets()
    assert service._consumer.stored == {A: 1}


def test_a_full_replica_dead_letters_new_sensors_as_sensor_limit_and_says_so(capsys) -> None:
    """Readings of new sensors beyond SD_DETECTOR__MAX_SENSORS went to the dead-letter topic as
    bad_sensor, the reason of a malformed sensor id, with no log line: "this replica is full"
    read as "producers send bad ids" and could not be alerted on."""
    from stream_detector.config import DetectorSettings
    from stream_detector.detector import Detector
    from stream_detector.records import ReadingDecoder, encode_reading
    from stream_detector.testing import NumpyScorer

    service = _service()
    service.detector = Detector(service.manifest, NumpyScorer(),
                                DetectorSettings(max_batch=1000, max_sensors=2))
    decoder = ReadingDecoder(service.manifest.features, 65536)
    msgs = [_msg(o, encode_reading(f"s{o % 4}", 1000 + o, [1.0, 2.0, 3.0])) for o in range(12)]
    service._ingest(msgs, decoder, service.detector)
    letters = [orjson.loads(v) for topic, v in service._producer.sent
               if topic == "sensor-readings-dlq"]
    assert [d["offset"] for d in letters] == [2, 3, 6, 7, 10, 11]  # sensors s2 and s3
    assert {d["reason"] for d in letters} == {"sensor_limit"}
    assert "SD_DETECTOR__MAX_SENSORS" in letters[0]["detail"]
    metric = service.metrics.dead_letters.labels("sensor_limit")._value.get()
    assert metric == 6
    captured = capsys.readouterr()  # stdout or stderr, depending on the logging set up so far
    logged = [ln for ln in (captured.out + captured.err).splitlines()
              if "sensor limit reached" in ln]
    assert len(logged) == 1  # once, not once per reading


class _FullQueueProducer(_RecordingProducer):
    """The local queue stays full (broker away): every produce() raises BufferError."""

    def __init__(self, on_poll=None) -> None:
        super().__init__()
        self.polls, self.on_poll = 0, on_poll

    def produce(self, topic, value, key, on_delivery) -> None:
        raise BufferError("Local: Queue full")

    def poll(self, timeout: float = 0) -> int:
        self.polls += 1
        if self.on_poll is not None:
            self.on_poll(self.polls)
        return 0

    def __len__(self) -> int:
        return 100_000


def test_a_full_producer_queue_keeps_the_heartbeat_and_yields_to_sigterm() -> None:
    """The wait for room in the producer's queue looped forever: no heartbeat (liveness
    killed the pod), SIGTERM ignored until SIGKILL, no log line."""
    from stream_detector.consumer import _Abandoned
    from stream_detector.records import ReadingDecoder

    def on_poll(n: int) -> None:
        service.health._beat -= 100  # the heartbeat must be renewed while waiting
        if n == 5:
            service._stop.set()  # SIGTERM

    producer = _FullQueueProducer(on_poll)
    service = _service(producer)
    decoder = ReadingDecoder(service.manifest.features, 65536)
    with pytest.raises(_Abandoned):
        service._ingest([_msg(0, b"{nope")], decoder, service.detector)
    assert producer.polls == 5 and service.health.alive
    # shutting down: it waits for room until the drain deadline, then gives up
    service._stop.clear()
    producer.on_poll = None
    service._drain_deadline = time.monotonic() + 0.3
    service._stop.set()
    t0 = time.monotonic()
    with pytest.raises(_Abandoned):
        service._ingest([_msg(1, b"{nope")], decoder, service.detector)
    assert producer.polls > 5 and time.monotonic() - t0 >= 0.3
    # the drain at shutdown: the wait for room uses up the grace period, and the flush after it
    # gets what is left of it (it got the whole budget again: a 10 s grace period took 17 s)
    service._consumer = _ScriptedConsumer(service, [])
    service._publish = lambda batches: time.sleep(0.3)  # as long as the wait for room
    service._drain_deadline = time.monotonic() + 0.2
    assert service._drain_all(5.0) == 0
    assert producer.flush_timeouts[-1] == 0.0
    service._drain_deadline = None  # a revoke's drain: its own budget, the wait included
    service._drain_all(0.5)
    assert producer.flush_timeouts[-1] < 0.25
    # a delivery failure reported meanwhile stops it as fatal
    service._stop.clear()
    service._drain_deadline = None
    service._fatal = "delivery to sensor-alerts failed: broker down"
    with pytest.raises(FatalError, match="broker down"):
        service._ingest([_msg(2, b"{nope")], decoder, service.detector)


def test_a_revoke_drain_gives_up_on_a_full_queue_at_the_end_of_its_budget() -> None:
    """A revoke's drain (no SIGTERM) whose publishing met a full queue waited without limit;
    it now ends with its budget, the readings not handed over are not stored (read again by
    the partition's next owner), and shutdown would report exit code 1, not a clean 0."""
    producer = _FullQueueProducer()
    service = _service(producer, score_topic="sensor-scores")
    service._consumer = _ScriptedConsumer(service, [])
    service._consumer.assigned = {A}
    chunk = service.tracker.begin(A, 103, 3, time.monotonic())
    service.detector.submit_many(["q"] * 3, [1, 2, 3], np.ones((3, 3)), [(chunk, 0)] * 3)
    t0 = time.monotonic()
    assert service._drain_all(0.3) > 0
    assert 0.3 <= time.monotonic() - t0 < 5
    assert service._abandoned and service._wait_until is None
    assert service._consumer.stored == {}  # nothing stored for the windows not published


def test_librdkafka_refusing_the_client_settings_is_a_config_error() -> None:
    """A mistyped SD_KAFKA__EXTRA property ended serve with a KafkaException traceback and
    exit 1 (documented as 'records left undelivered')."""
    from confluent_kafka import Producer

    from stream_detector.consumer import _client
    from stream_detector.errors import ConfigError

    with pytest.raises(ConfigError, match="SD_KAFKA__EXTRA.*no.such.property"):
        _client(Producer, {"bootstrap.servers": "127.0.0.1:1", "no.such.property": "x"})
    with pytest.raises(ConfigError, match="SD_KAFKA__EXTRA"):
        _client(Producer, {"bootstrap.servers": "127.0.0.1:1", "linger.ms": "soon"})


def test_librdkafka_log_lines_are_structured(capsys) -> None:
    """librdkafka printed its own plain-text lines on stderr, outside the JSON log (hundreds a
    minute while a broker was unreachable)."""
    from confluent_kafka import Producer

    from stream_detector.consumer import _client
    from stream_detector.logs import configure_logging

    configure_logging("json", "INFO")
    try:
        p = _client(Producer, {"bootstrap.servers": "127.0.0.1:1", "fetch.max.bytes": 52428800})
        p.poll(0)
    finally:
        configure_logging("console", "INFO")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert lines and all(ln.startswith("{") for ln in lines), lines
    event = orjson.loads(next(ln for ln in lines if "CONFWARN" in ln))
    assert event["level"] == "warning" and "fetch.max.bytes" in event["event"]


def test_repeated_librdkafka_lines_are_counted_not_written(capsys) -> None:
    """While a broker was unreachable the service wrote about 21 librdkafka error lines a
    second (one per reconnection attempt; 1,260 a minute per replica). A text is now written
    once per window, the next one carrying how many were held back."""
    import logging

    from stream_detector.logs import _ToStructlog, configure_logging

    now = [0.0]
    handler = _ToStructlog(window_s=60.0, clock=lambda: now[0])
    logger = logging.getLogger("librdkafka-test")
    logger.handlers[:] = [handler]
    logger.propagate, logger.level = False, logging.DEBUG
    refused = ("FAIL [c#consumer-1] [thrd:h:9092/bootstrap]: Connect to ipv4#h:9092 failed: "
               "Connection refused (after {}ms in state CONNECT{})")
    configure_logging("json", "INFO")
    try:
        for i in range(50):  # 50 attempts in 25 s; the elapsed time in the text varies
            now[0] = i * 0.5
            logger.error(refused.format(i % 3, ", 4 identical error(s) suppressed" if i else ""))
        logger.error("FAIL [c#consumer-1] [thrd:h:9093/2]: Connect to ipv4#h:9093 failed")
        logger.warning(refused.format(0, ""))  # another level: its own line
        now[0] = 61.0
        logger.error(refused.format(7, ""))
        now[0] = 62.0
        logger.error(refused.format(1, ""))
        now[0] = 63.0
        logger.error(refused.format(2, ""))
        handler.flush()  # the service stops: the held-back repeats are written with their count
        handler.flush()  # and forgotten
    finally:
        configure_logging("console", "INFO")
    events = [orjson.loads(ln) for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert [(e["level"], "9093" in e["event"], e.get("repeated")) for e in events] == [
        ("error", False, None), ("error", True, None), ("warning", False, None),
        ("error", False, 49),  # 61 s after the first: written, with the 49 held back
        ("error", False, 1),  # the two after it: the last written when the service stops
    ]
    assert "after 7ms" in events[-2]["event"] and "after 2ms" in events[-1]["event"]
    import calendar

    last = calendar.timegm(time.strptime(events[-1]["last_at"], "%Y-%m-%dT%H:%M:%S"))
    assert abs(last - time.time()) < 60  # when that last one happened (UTC)


def test_messages_outdated_by_a_rebalance_between_consume_calls_are_not_ingested() -> None:
    """The loop's third consume() call can run the revoke callback after the second returned
    a message of that partition. Ingested after the revoke, that reading gave its sensor fresh
    state; when the partition came back, the rebuild's readings were all late and the valid
    reading was dead-lettered as a duplicate."""
    service = _service(partition_assignment_strategy="range")
    script = [
        ("assign",), ("msgs", []), ("msgs", [_msg(o) for o in range(10)]),  # turn 1
        ("msgs", []), ("msgs", [_msg(10)]), ("revoke",),  # turn 2: call 3 revokes
        ("assign",), ("msgs", [_msg(o) for o in range(12)]),  # rebuild re-reads 0..11
        ("msgs", []), ("msgs", []), ("stop",),
    ]
    fake = _ScriptedConsumer(service, script)
    service._consumer = fake
    service._loop()
    service._publish(service.detector.flush_batches())  # what the drain at shutdown does
    service._store_offsets()
    assert service._producer.sent == []  # no dead letter
    m = service.metrics
    assert m.windows._value.get() == 8 + 2  # offsets 2..9, then 10 and 11 once each
    assert m.rebuilt._value.get() == 10  # offsets 0..9 re-read silently
    assert fake.stored == {A: 12}


def test_idle_dispatch_runs_before_the_loop_blocks_after_a_full_consume() -> None:
    """With consume_batch 1 every consume() that returns a record is full, so the last record
    empties the local queue without a short consume(). The waiting windows must go to the model
    before the loop blocks for the next record (the old loop scored them only after that
    consume() timed out: consume_timeout_s later, 50 ms by default, up to 10 s)."""
    from stream_detector.detector import Detector

    service = _service(consume_batch=1, consume_timeout_s=10)
    service.detector = Detector(service.manifest, service.scorer,
                                service.settings.detector.model_copy(
                                    update={"max_wait_ms": 60_000}))
    seen: list[tuple[float, float]] = []

    def probe(num: int, timeout: float) -> None:
        seen.append((timeout, service.metrics.windows._value.get()))

    script = [("assign",), ("msgs", []),
              *[("msgs", [_msg(o)]) for o in range(5)],  # 3 windows (window 3), each call full
              ("msgs", []), ("probe", probe), ("stop",)]
    service._consumer = _ScriptedConsumer(service, script)
    service._loop()
    # the blocking call (a timeout > 0) came after all 3 windows were scored
    assert len(seen) == 1 and seen[0][0] > 0 and seen[0][1] == 3, seen


def test_a_committed_offset_beyond_the_log_end_does_not_start_a_silent_rebuild() -> None:
    """Truncated log or recreated topic: a rebuild from max(low, committed - lookback) would
    read every new record silently until the old committed offset."""
    service = _service()
    fake = _ScriptedConsumer(service, [], committed=1000, watermarks=(0, 50))
    service._on_assign(fake, [TopicPartition("readings", 0)])
    assert service._silent_until == {}
    assert fake.positions[A] < 0  # left to the committed offset / auto.offset.reset
    fake = _ScriptedConsumer(service, [], committed=40, watermarks=(0, 50))
    service._on_assign(fake, [TopicPartition("readings", 0)])
    # from the log's start (0): the logical offset, safe from a retention run before the fetch
    assert service._silent_until == {A: 40} and fake.positions[A] == OFFSET_BEGINNING


def test_a_stale_log_end_is_asked_again_before_the_rebuild_is_given_up(monkeypatch) -> None:
    """Tansu answered one watermark request with a stale high watermark (3,571 for a log of
    5,000): the committed offset looked beyond the end and the rebuild was skipped, so the new
    owner warmed every window up again. The plan asks again (WATERMARK_ASKS in all)."""
    import stream_detector.consumer as consumer_mod

    monkeypatch.setattr(consumer_mod, "WATERMARK_RETRY_S", 0.0)

    class Stale(_ScriptedConsumer):
        def __init__(self, *args, answers, **kw) -> None:
            super().__init__(*args, **kw)
            self.answers, self.asked = list(answers), 0

        def get_watermark_offsets(self, partition, timeout=None, cached=False):
            self.asked += 1
            return self.answers.pop(0) if self.answers else self.watermarks

    service = _service()
    fake = Stale(service, [], committed=40, watermarks=(0, 50), answers=[(0, 30), (0, 35)])
    service._on_assign(fake, [TopicPartition("readings", 0)])
    assert fake.asked == 3
    # from the log's start (0): the logical offset, safe from a retention run before the fetch
    assert service._silent_until == {A: 40} and fake.positions[A] == OFFSET_BEGINNING
    # a log that really ends before the committed offset: asked WATERMARK_ASKS times, no more
    service = _service()
    fake = Stale(service, [], committed=40, watermarks=(0, 30), answers=[])
    service._on_assign(fake, [TopicPartition("readings", 0)])
    assert fake.asked == consumer_mod.WATERMARK_ASKS == 3
    assert service._silent_until == {} and fake.positions[A] < 0
    # several such partitions (a recreated topic) are asked again together: one pause a
    # round, not one per partition, inside the assign callback
    pauses: list[float] = []
    monkeypatch.setattr(consumer_mod.time, "sleep", pauses.append)
    service = _service()
    fake = Stale(service, [], committed=40, watermarks=(0, 30), answers=[])
    service._on_assign(fake, [TopicPartition("readings", i) for i in range(8)])
    assert fake.asked == 8 * 3 and len(pauses) == 2
    assert service._silent_until == {}


def test_rebuild_lookback_comes_from_the_settings_unless_given() -> None:
    """SD_SERVICE__REBUILD_LOOKBACK sizes the rebuild (it was a command-line flag only, which a
    Kubernetes ConfigMap cannot set); an explicit value (serve --rebuild-lookback) wins."""
    from stream_detector.consumer import DetectorService

    settings = Settings(kafka={"input_topic": "readings"}, service={"rebuild_lookback": 7})
    for given, start in [(None, 33), (25, 15)]:
        service = DetectorService(settings, None, None, serve_http=False,  # type: ignore[arg-type]
                                  rebuild_lookback=given)
        fake = _ScriptedConsumer(service, [], committed=40, watermarks=(0, 50))
        service._on_assign(fake, [TopicPartition("readings", 0)])
        assert fake.positions[A] == start and service._silent_until == {A: 40}


def test_consumer_lag_is_reported_only_for_partitions_this_instance_owns() -> None:
    import json

    service = _service()
    fake = _ScriptedConsumer(service, [])
    service._consumer = fake
    service._on_assign(fake, [TopicPartition("readings", 0)])
    stats = {"topics": {"readings": {"partitions": {
        "0": {"consumer_lag": 5, "fetch_state": "active"},
        "1": {"consumer_lag": 230, "fetch_state": "stopped"},  # revoked earlier
        "-1": {"consumer_lag": 0}}}}}
    service._on_stats(json.dumps(stats))

    def lag() -> dict[str, float]:
        return {s.labels["partition"]: s.value for s in service.metrics.lag.collect()[0].samples}

    assert lag() == {"0": 5.0}
    assert service.metrics.assigned._value.get() == 1
    service._on_revoke(fake, [TopicPartition("readings", 0)])
    assert lag() == {}  # the series goes with the partition
    assert service.metrics.assigned._value.get() == 0  # sd_assigned_partitions too
    service._on_stats(json.dumps(stats))
    assert lag() == {}


def test_shutdown_drains_within_the_grace_period_and_reports_undelivered_records() -> None:
    """The close() after the drain runs the revoke callback, which drained again for half the
    grace period: 1.3x the grace in all, and exit code 0 although records were undelivered."""
    service = _service(_RecordingProducer(flush_left=3))
    fake = _ScriptedConsumer(service, [])
    service._consumer = fake
    service._on_assign(fake, [TopicPartition("readings", 0)])
    grace = service.settings.service.grace_period_s
    assert service._shutdown() == 1
    timeouts = service._producer.flush_timeouts
    assert len(timeouts) == 2 and sum(timeouts) <= 0.95 * grace, timeouts
    ok = _service()
    fake = _ScriptedConsumer(ok, [])
    ok._consumer = fake
    assert ok._shutdown() == 0


def test_after_a_fatal_error_the_service_leaves_the_group_committing_only_what_was_done() -> None:
    """Before, a fatal error returned without closing the consumer: its partitions waited a
    session timeout for another replica, and offsets stored in the last second were lost."""
    from stream_detector.records import ReadingDecoder

    producer = _RecordingProducer()
    service = _service(producer, score_topic="scores")
    fake = _ScriptedConsumer(service, [])
    service._consumer = fake
    service._on_assign(fake, [TopicPartition("readings", 0)])
    decoder = ReadingDecoder(service.manifest.features, 65536)
    for batch in ((0, 1, 2, 3), (4, 5)):  # two consume() batches: two chunks
        service._ingest([_msg(o) for o in batch], decoder, service.detector)
        service._publish(service.detector.flush_batches())
    for callback in producer.callbacks[:2]:  # the score records of offsets 2 and 3 delivered
        callback(None, None)
    producer.callbacks[2](KafkaError(KafkaError._MSG_TIMED_OUT), None)  # offset 4's failed
    assert service.failure is not None
    service._close_after_fatal()
    assert fake.closed and fake.assigned == set()
    assert fake.committed_offset == 4  # offsets 0-3 done; 4 and 5 are read again
    assert service.metrics.lag.collect()[0].samples == []

    class Broken(_ScriptedConsumer):
        def close(self) -> None:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT))

    service._consumer = Broken(service, [])
    service._close_after_fatal()  # logged, not raised: the exit code already says it failed


def test_readings_stamped_far_in_the_future_are_dead_lettered_not_kept() -> None:
    """A timestamp in microseconds was accepted, and every later (millisecond) reading of the
    sensor was then late: the sensor was lost until the consumer restarted without it."""
    import orjson

    from stream_detector.records import ReadingDecoder, encode_reading

    now_ms = int(time.time() * 1000)

    def reading(offset: int, ts: int):
        return _msg(offset, encode_reading("s", ts, [float(offset % 3), 1.0, 2.0]))

    service = _service()
    decoder = ReadingDecoder(service.manifest.features, 65536)
    msgs = [reading(0, now_ms), reading(1, now_ms * 1000), reading(2, now_ms + 1000),
            reading(3, now_ms + 2000)]
    service._ingest(msgs, decoder, service.detector)
    [(topic, payload)] = service._producer.sent
    dead = orjson.loads(payload)
    assert (dead["reason"], dead["offset"]) == ("bad_timestamp", 1)
    assert "days ahead of this consumer's clock" in dead["detail"]
    service._publish(service.detector.flush_batches())
    assert service.metrics.windows._value.get() == 1  # offsets 0, 2, 3: one full window
    # a day ahead is fine by default (clock skew, replays), and 0 turns the check off
    service = _service()
    service._ingest([reading(0, now_ms + 86_400_000)], decoder, service.detector)
    assert service._producer.sent == []
    off = _service(max_future_s=0.0)
    off._ingest([reading(5, now_ms * 1000)], decoder, off.detector)
    assert off._producer.sent == []


def test_a_failing_rebuild_lookup_does_not_fail_the_assignment() -> None:
    """committed() or the watermark lookup timing out inside the assign callback came out of
    consume() as an exception and crashed the service; the rebuild is best effort."""

    class Slow(_ScriptedConsumer):
        def get_watermark_offsets(self, partition, timeout=None, cached=False):
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))

    service = _service()
    fake = Slow(service, [], committed=40)
    service._on_assign(fake, [TopicPartition("readings", 0), TopicPartition("readings", 1)])
    assert fake.assigned == {A, B} and service.health.ready
    assert service._silent_until == {}
    assert set(fake.positions.values()) == {-1001}  # the committed offsets


# ------------------------------------------------------------- rebuild: deepened until exact


class _AckingProducer(_RecordingProducer):
    """Acknowledges what was produced at the next poll(), as a healthy broker does."""

    def poll(self, timeout: float = 0) -> int:
        pending, self.callbacks = self.callbacks, []
        for cb in pending:
            cb(None, None)
        return len(pending)


class _LogConsumer:
    """One partition's log: consume() returns up to ``batch`` records from the position, seek()
    moves the position; the assignment starts where _on_assign's plan puts it."""

    def __init__(self, service, records, committed: int, low: int = 0, batch: int = 7) -> None:
        self.svc, self.records, self.committed_offset = service, records, committed
        self.low, self.batch = low, batch
        self.assigned: set = set()
        self.pos, self.idle = -1, 0
        self.seeks: list[int] = []
        self.stored: dict = {}

    def consume(self, num_messages: int = 1, timeout: float = -1):
        if not self.assigned:
            self.svc._on_assign(self, [TopicPartition("readings", 0)])
            return []
        out = [m for m in self.records if m.offset() >= self.pos][: min(num_messages, self.batch)]
        if not out:
            self.idle += 1
            if self.idle > 3:
                self.svc.stop()
            return []
        self.pos = out[-1].offset() + 1
        return out

    def committed(self, partitions, timeout=None):
        return [TopicPartition(p.topic, p.partition, self.committed_offset) for p in partitions]

    def get_watermark_offsets(self, partition, timeout=None, cached=False):
        return self.low, self.records[-1].offset() + 1

    def assign(self, partitions) -> None:
        self.assigned = {(p.topic, p.partition) for p in partitions}
        off = partitions[0].offset
        self.assigned_at = off
        self.pos = (self.low if off == OFFSET_BEGINNING else off if off >= 0
                    else self.committed_offset)

    incremental_assign = assign

    def seek(self, partition) -> None:
        self.seeks.append(partition.offset)
        self.pos = self.low if partition.offset == OFFSET_BEGINNING else partition.offset

    def assignment(self):
        return [TopicPartition(t, p) for t, p in self.assigned]

    def store_offsets(self, offsets) -> None:
        for o in offsets:
            self.stored[(o.topic, o.partition)] = o.offset


def _episode_log(low: int = 0):
    """Three sensors in turn on partition 0: "a" calm; "b" calm for 100 readings, then an
    episode of 90 readings (oscillating, scored high), then calm; "c" calm but for a burst
    at its readings 175-185. Record offset = low + 3 x reading + sensor index."""
    from confluent_kafka import Message

    from stream_detector.records import encode_reading

    records = []
    for t in range(220):
        for i, sensor in enumerate("abc"):
            hot = (sensor == "b" and 100 <= t < 190) or (sensor == "c" and 175 <= t < 185)
            values = [5.0 * (t % 2) if hot else 1.0, 1.0, 1.0]
            off = low + 3 * t + i
            records.append(Message(topic="readings", partition=0, offset=off, key=sensor.encode(),
                                   value=encode_reading(sensor, 1000 * t, values),
                                   timestamp=(1, 1)))
    return records


def _reference_alerts(records, manifest, settings, committed: int) -> dict[str, tuple]:
    """The alerts an uninterrupted consumer publishes for the records from ``committed`` on."""
    from stream_detector.detector import Detector
    from stream_detector.records import ReadingDecoder
    from stream_detector.testing import NumpyScorer

    det = Detector(manifest, NumpyScorer(), settings.detector)
    batch = ReadingDecoder(manifest.features, 65536).decode_many([m.value() for m in records])
    det.submit_many(batch.sensors, batch.ts_ms, batch.values,
                    [records[i].offset() for i in batch.index])
    out = {}
    for res in det.flush():
        if res.alert is not None and res.ref >= committed:
            out[res.alert.event_id] = (res.alert.alert_id, res.alert.event, res.alert.sensor)
    return out


def _rebuild_run(records, committed: int, lookback: int, max_lookback: int, low: int = 0,
                 consumer_cls=None):
    from stream_detector.consumer import DetectorService
    from stream_detector.detector import Detector
    from stream_detector.testing import NumpyScorer, make_manifest

    manifest = make_manifest(window=3, smoothing=2)
    settings = Settings(kafka={"input_topic": "readings", "score_topic": ""},
                        detector={"max_batch": 1000, "clear_after": 5},
                        service={"grace_period_s": 1.0, "rebuild_lookback": lookback,
                                 "rebuild_max_lookback": max_lookback})
    service = DetectorService(settings, manifest, NumpyScorer(), serve_http=False)
    service.detector = Detector(manifest, NumpyScorer(), settings.detector)
    service._producer = _AckingProducer()
    fake = (consumer_cls or _LogConsumer)(service, records, committed, low=low)
    service._consumer = fake
    service._loop()
    service._publish(service.detector.flush_batches())
    service._producer.poll(0)
    service._store_offsets()
    sent = {}
    for topic, payload in service._producer.sent:
        assert topic == settings.kafka.alert_topic
        a = orjson.loads(payload)
        sent[a["event_id"]] = (a["alert_id"], a["event"], a["sensor"])
    return service, fake, sent, _reference_alerts(records, manifest, settings, committed)


def test_a_rebuild_deepens_until_an_episode_open_since_before_the_look_back_is_found() -> None:
    """A partition assigned in the middle of sensor b's long episode: the 12-record look-back
    rebuilt b with the episode open from its first window, so b's episode went on under a new
    alert_id and its real one was never resolved. The rebuild now doubles the look-back until
    every sensor's state is exact: the published events are the uninterrupted consumer's."""
    records = _episode_log()
    committed = 3 * 160  # b's reading 160: its episode has been open for 60 readings
    service, fake, sent, reference = _rebuild_run(records, committed, 12, 10_000)
    assert any(e == "resolve" and s == "b" for _, e, s in reference.values())
    assert sent == reference
    # 12 -> 24 -> 48 -> 96 -> 192 -> 384 records: from offset 96 (b's reading 32) b has had
    # its calm windows before the episode began
    assert fake.seeks == [committed - 24, committed - 48, committed - 96, committed - 192,
                          committed - 384]
    m = service.metrics
    assert m.rebuild_deepened._value.get() == 5 and m.rebuild_inexact._value.get() == 0
    assert fake.stored == {A: len(records)}  # every live record done and stored
    assert m.windows._value.get() == len(records) - committed
    # each deeper pass re-reads the records of the sensors still inexact only: 12 and 24 of
    # all three (4, then 8 readings each: a and c are exact from there on), then b's third of
    # 48, 96, 192, 384; the rest are skipped by key (12 + 24 + 16 + 32 + 64 + 128 = 276)
    live = len(records) - committed
    assert service.detector.counters["readings"] == 276 + live
    assert m.rebuilt._value.get() == 12 + 24 + 48 + 96 + 192 + 384


def test_a_rebuild_stops_deepening_at_its_maximum_and_counts_the_inexact_sensors() -> None:
    records = _episode_log()
    committed = 3 * 160
    service, fake, sent, reference = _rebuild_run(records, committed, 12, 48)
    assert fake.seeks == [committed - 24, committed - 48]
    assert service.metrics.rebuild_inexact._value.get() == 1  # b
    # a and c as uninterrupted; b's episode under another id (documented in docs/messages.md)
    assert {k: v for k, v in sent.items() if v[2] != "b"} == {
        k: v for k, v in reference.items() if v[2] != "b"}
    assert {v[0] for v in sent.values() if v[2] == "b"}.isdisjoint(
        v[0] for v in reference.values() if v[2] == "b")
    assert fake.stored == {A: len(records)}


def test_a_rebuild_deepens_while_most_sensors_have_no_window_and_not_past_the_log_start() -> None:
    """A look-back shorter than a window per sensor rebuilt nobody (every sensor's first live
    readings only warmed it up again); the log's start (retention) ends the deepening."""
    records = _episode_log(low=500)
    committed = 500 + 3 * 60  # all calm here
    service, fake, sent, reference = _rebuild_run(records, committed, 4, 10_000, low=500)
    # 4 records: no sensor has a window (3 readings); 8: two have one, not yet exact (too few
    # calm windows); 16 and 32: enough calm windows for all three
    assert fake.seeks[0] == committed - 8 and len(fake.seeks) >= 2
    assert sent == reference
    m = service.metrics
    assert m.windows._value.get() == len(records) - (committed - 500)  # no live reading warms
    service, fake, sent, _ = _rebuild_run(records, committed, 4, 10_000, low=committed - 10)
    # the log starts there: the logical offset, which retention cannot make out of range
    assert fake.seeks == [committed - 8, OFFSET_BEGINNING]
    assert service.metrics.rebuild_inexact._value.get() == 3  # a retention-truncated log


def test_a_seek_the_consumer_refuses_ends_the_deepening_not_the_service() -> None:
    records = _episode_log()
    committed = 3 * 160

    def refuse(partition) -> None:
        raise KafkaException(KafkaError(KafkaError._STATE))

    original = _LogConsumer.seek
    _LogConsumer.seek = lambda self, partition: refuse(partition)  # type: ignore[method-assign]
    try:
        service, fake, sent, reference = _rebuild_run(records, committed, 12, 10_000)
    finally:
        _LogConsumer.seek = original  # type: ignore[method-assign]
    assert service.metrics.rebuild_deepened._value.get() == 0
    assert fake.stored == {A: len(records)}  # the live records were processed all the same
    assert {k: v for k, v in sent.items() if v[2] != "b"} == {
        k: v for k, v in reference.items() if v[2] != "b"}


class _RetentionLog(_LogConsumer):
    """Retention deletes the log's first 100 records once the rebuild began; a fetch below the
    log's start resets to its end, as librdkafka does with auto.offset.reset=latest."""

    def consume(self, num_messages: int = 1, timeout: float = -1):
        out = super().consume(num_messages, timeout)
        if out and not getattr(self, "expired", False):
            self.expired = True
            self.low += 100
            self.records = [m for m in self.records if m.offset() >= self.low]
        return out

    def seek(self, partition) -> None:
        self.seeks.append(partition.offset)
        if partition.offset == OFFSET_BEGINNING:
            self.pos = self.low
        elif partition.offset < self.low:  # out of range: reset to the end
            self.pos = self.records[-1].offset() + 1
        else:
            self.pos = partition.offset


def test_a_deeper_rebuild_past_a_log_start_that_retention_moved_loses_no_record() -> None:
    """The deepening sought max(log start at assignment, committed - look-back): after
    retention moved the log's start past that, the fetch was out of range, the consumer jumped
    to the end of the log (auto.offset.reset=latest), and every record from the committed
    offset to there was never scored, its offset stored all the same (found in review)."""
    records = _episode_log(low=500)
    committed = 500 + 3 * 160  # mid-episode of b: the rebuild deepens
    service, fake, sent, reference = _rebuild_run(records, committed, 12, 10_000, low=500,
                                                  consumer_cls=_RetentionLog)
    live = len(records) - (committed - 500)
    assert service.metrics.windows._value.get() == live  # every live record scored
    assert fake.stored == {A: records[-1].offset() + 1}
    assert fake.low == 600 and fake.seeks[-1] == OFFSET_BEGINNING  # the start as it is now
    assert all(s == OFFSET_BEGINNING or s >= 600 for s in fake.seeks)
    assert {k: v for k, v in sent.items() if v[2] != "b"} == {
        k: v for k, v in reference.items() if v[2] != "b"}


def _with_a_dead_sensor():
    """_episode_log's a, b, c plus sensor d: calm, then in an episode from its 20th reading,
    then silent for good (a failing sensor) from reading 40 of the others, long before the
    committed offset."""
    from confluent_kafka import Message

    from stream_detector.records import encode_reading

    rows = []
    for t in range(220):
        for s in "abc":
            hot = (s == "b" and 100 <= t < 190) or (s == "c" and 175 <= t < 185)
            rows.append((s, t, [5.0 * (t % 2) if hot else 1.0, 1.0, 1.0]))
        if 10 <= t < 40:
            rows.append(("d", t, [5.0 * (t % 2) if t >= 30 else 1.0, 1.0, 1.0]))
    return [Message(topic="readings", partition=0, offset=i, key=s.encode(),
                    value=encode_reading(s, 1000 * t, v), timestamp=(1, 1))
            for i, (s, t, v) in enumerate(rows)]


def test_a_sensor_silent_mid_episode_is_counted_only_when_the_maximum_is_reached() -> None:
    """d went silent in an episode long before the committed offset. It is checked like every
    sensor (a sensor a short first look-back missed is as active as the others, see the next
    test), so it keeps the deepening going while its last readings lie within the maximum: to
    the log's start here (everything exact, nothing counted), or to a maximum of 384 records,
    where it is the one sensor counted."""
    records = _with_a_dead_sensor()
    committed = next(m.offset() for m in records if m.key() == b"a"
                     and orjson.loads(m.value())["ts"] == 160_000)
    service, fake, sent, reference = _rebuild_run(records, committed, 12, 10_000)
    assert sent == reference and service.metrics.rebuild_inexact._value.get() == 0
    service, fake, sent, reference = _rebuild_run(records, committed, 12, 384)
    assert service.metrics.rebuild_inexact._value.get() == 1
    assert service.detector.inexact(["a", "b", "c", "d"]) == ["d"]  # the one counted
    # b was exact at 384 already: the last doublings were d's, up to the maximum
    assert fake.seeks[-1] == committed - 384
    assert sent == reference  # d sends nothing more: no event differs


def test_a_sensor_the_first_look_back_missed_is_rebuilt_and_checked_too() -> None:
    """Only sensors with a reading in the first look-back were checked: b, in an episode but
    not among the first 2 records, was kept with the one reading a deeper pass gave it (its
    older records then skipped by key), so its episode went on under a new alert_id and its
    next readings only warmed its window again (found in an end-to-end review: 48 of 24,000
    windows lost, alert ids changed, nothing counted)."""
    records = _episode_log()
    committed = 3 * 160 + 1  # the 2 records before it: c and a, not b
    service, fake, sent, reference = _rebuild_run(records, committed, 2, 10_000)
    assert sent == reference
    assert service.metrics.windows._value.get() == len(records) - committed


def test_the_log_start_comes_from_the_fetch_responses_else_from_the_broker() -> None:
    """A round trip per deeper pass cost 0.1-0.5 s on the embedded broker (whose answer also
    had a wrong high watermark); librdkafka keeps the log start of a partition it fetches."""
    service = _service()
    asked: list[bool] = []

    class Watermarks:
        def __init__(self, cached_low: int) -> None:
            self.cached_low = cached_low

        def get_watermark_offsets(self, partition, timeout=None, cached=False):
            asked.append(cached)
            return (self.cached_low, 99) if cached else (42, 99)

    service._consumer = Watermarks(7)  # type: ignore[assignment]
    assert service._log_start(A) == 7 and asked == [True]
    service._consumer = Watermarks(-1001)  # type: ignore[assignment]  # not fetched yet
    assert service._log_start(A) == 42 and asked == [True, True, False]


def _log_of(rows) -> list:
    from confluent_kafka import Message

    from stream_detector.records import encode_reading

    return [Message(topic="readings", partition=0, offset=i, key=s.encode(),
                    value=encode_reading(s, 1000 * t, v), timestamp=(1, 1))
            for i, (s, t, v) in enumerate(rows)]


def test_a_rarer_sensor_without_a_window_is_rebuilt_when_one_fits_in_the_maximum() -> None:
    """c reports once per 8 readings of a and b and is in an episode at the committed offset.
    The 40-record look-back gave it no window; the rebuild stopped (at most half of the
    sensors were windowless) and c's episode went on under a new alert_id (found in review).
    Now a windowless sensor deepens the rebuild while a window of it fits in the maximum."""
    rows = []
    for t in range(400):
        rows += [(s, t, [1.0, 1.0, 1.0]) for s in "ab"]
        if t % 8 == 0:  # c's reading u = t / 8; in an episode from u = 20
            u = t // 8
            rows.append(("c", t, [5.0 * (u % 2) if u >= 20 else 1.0, 1.0, 1.0]))
    records = _log_of(rows)
    committed = next(i for i, r in enumerate(rows) if r[0] == "a" and r[1] == 300)
    service, fake, sent, reference = _rebuild_run(records, committed, 40, 10_000)
    # the uninterrupted consumer sends nothing for c here (its episode goes on quietly); a
    # rebuild that left c cold opened a second episode for it
    assert sent == reference
    assert service.metrics.rebuild_deepened._value.get() >= 1
    assert service.metrics.windows._value.get() == len(records) - committed


def test_a_sensor_too_rare_for_a_window_does_not_make_the_rebuild_read_to_the_maximum() -> None:
    """r sent one reading: at its rate a window (3 readings) needs 3x the records read so
    far. The rebuild deepens while that fits in the maximum (2,000 here), then stops: r starts
    cold, nothing is counted, and a stray reading does not cost every rebalance the maximum."""
    rows = []
    for t in range(1500):
        rows += [(s, t, [1.0, 1.0, 1.0]) for s in "ab"]
        if t == 1490:  # within the first look-back
            rows.append(("r", t, [1.0, 1.0, 1.0]))
    records = _log_of(rows)
    committed = len(records) - 10
    service, fake, sent, reference = _rebuild_run(records, committed, 40, 2_000)
    # 40 -> 80 -> ... -> 1,280 records: 1,280 x 3 > 2,000, so no further
    assert fake.seeks == [committed - n for n in (80, 160, 320, 640, 1280)]
    assert service.metrics.rebuild_inexact._value.get() == 0
    assert service.detector.unscored(["a", "b", "r"]) == ["r"]
    assert sent == reference


@pytest.mark.parametrize("policy", ["dead_letter", "drop"])
def test_late_readings_are_counted_under_either_policy(policy: str) -> None:
    """With SD_DETECTOR__LATE_POLICY=drop the docs say late readings are "counted and
    skipped", but nothing counted them: sd_readings_dropped_total{reason} does now."""
    from stream_detector.config import DetectorSettings
    from stream_detector.detector import Detector
    from stream_detector.records import ReadingDecoder, encode_reading
    from stream_detector.testing import NumpyScorer

    service = _service()
    detector = DetectorSettings(max_batch=1000, late_policy=policy)
    service.settings = service.settings.model_copy(update={"detector": detector})
    service.detector = Detector(service.manifest, NumpyScorer(), detector)
    decoder = ReadingDecoder(service.manifest.features, 65536)
    # ts 1000..1004, then 1002 and 1004 again (duplicates) and 900 (out of order)
    stamps = [1000, 1001, 1002, 1003, 1004, 1002, 1004, 900]
    msgs = [_msg(o, encode_reading("s", ts, [1.0, 2.0, 3.0])) for o, ts in enumerate(stamps)]
    service._ingest(msgs, decoder, service.detector)
    letters = [v for topic, v in service._producer.sent if topic == "sensor-readings-dlq"]
    dropped = service.metrics.dropped.labels("late_or_duplicate")._value.get()
    dead = service.metrics.dead_letters.labels("late_or_duplicate")._value.get()
    if policy == "drop":
        assert (dropped, dead, len(letters)) == (3, 0, 0)
    else:
        assert (dropped, dead, len(letters)) == (0, 3, 3)


def test_metrics_expose_no_created_timestamps() -> None:
    """prometheus_client added a `<name>_created` gauge beside every counter and histogram (58
    series the deploy README's list of every series did not name)."""
    from prometheus_client import generate_latest

    text = generate_latest(Metrics().registry).decode()
    assert "sd_readings_total" in text
    assert [ln for ln in text.splitlines() if "_created" in ln] == []


def test_an_abandoned_close_keeps_the_clients_its_revoke_drain_uses() -> None:
    """SIGTERM with a broker that answers only after the grace period: _shutdown gives up
    (exit 1) while the close thread still waits; when the broker answers, close() runs the
    revoke callback, which drains through the producer and stores offsets through the
    consumer. Releasing the clients meanwhile (run()'s cleanup, for embedders that keep the
    service) made that thread fail on None clients."""
    import threading

    answer = threading.Event()
    errors: list[BaseException] = []
    revoked = threading.Event()

    class SlowConsumer:
        def commit(self, asynchronous: bool = True) -> None:
            answer.wait(10)  # the broker answers after the grace period

        def close(self) -> None:
            try:
                service._on_revoke(self, [])
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                errors.append(exc)
            finally:
                revoked.set()

        def unassign(self) -> None:
            pass

        def incremental_unassign(self, partitions) -> None:
            pass

        def store_offsets(self, offsets=None) -> None:
            pass

    service = _service()  # grace period 1 s
    service._consumer = SlowConsumer()
    assert service._shutdown() == 1 and service.close_abandoned
    service._release_clients()  # what run() does next
    answer.set()
    assert revoked.wait(10)
    assert errors == []
    assert service._producer is not None and service._consumer is not None


class _RetentionAtAssign(_LogConsumer):
    """Retention deletes the log's first 50 records between the watermark request and the
    first fetch; a fetch below the log's start resets to its end (auto.offset.reset=latest)."""

    def assign(self, partitions) -> None:
        super().assign(partitions)
        self.low += 50
        self.records = [m for m in self.records if m.offset() >= self.low]
        if self.assigned_at != OFFSET_BEGINNING and self.pos < self.low:  # out of range
            self.pos = self.records[-1].offset() + 1

    incremental_assign = assign


def test_a_first_rebuild_from_the_log_start_survives_retention_before_its_fetch() -> None:
    """The first rebuild plan assigned the log's start as an absolute offset: if retention
    moved the start before the first fetch, the fetch was out of range and
    auto.offset.reset=latest jumped past the committed offset, so no live record was scored
    (found in review; the deepening already used the logical offset)."""
    records = _episode_log(low=500)
    committed = 500 + 3 * 60
    service, fake, _, _ = _rebuild_run(records, committed, 10_000, 10_000, low=500,
                                       consumer_cls=_RetentionAtAssign)
    assert fake.assigned_at == OFFSET_BEGINNING
    live = len(records) - (committed - 500)
    assert service.metrics.windows._value.get() == live  # every live record scored
    assert fake.stored == {A: records[-1].offset() + 1}


class _RetentionPastStart(_LogConsumer):
    """The rebuild starts inside the log (an absolute offset); retention deletes the log's first
    100 records, past that offset, before the first fetch, which is then out of range: with
    auto.offset.reset=latest it moves to the log's end. The last 30 records are produced after
    that (a live stream), so the fetch returns them first."""

    def __init__(self, service, records, committed: int, low: int = 0, batch: int = 7) -> None:
        super().__init__(service, records[:-30], committed, low, batch)
        self.later = records[-30:]

    def assign(self, partitions) -> None:
        super().assign(partitions)
        if self.later:
            self.low += 100
            self.records = [m for m in self.records if m.offset() >= self.low]
            if self.pos < self.low:  # out of range: to the end
                self.pos = self.records[-1].offset() + 1
            self.records, self.later = self.records + self.later, []

    incremental_assign = assign


def test_a_rebuild_from_inside_the_log_survives_retention_before_its_fetch() -> None:
    """The case the log-start fix left (consumer review): low 500 < rebuild start 590 <
    committed 680, retention moves the start to 600, the fetch jumps to the end: the 150
    records from the committed offset on were never scored and offsets past them stored.
    Now the first record past the committed offset shows the jump; the partition is read
    again from its start, silently up to the committed offset."""
    records = _episode_log(low=500)
    committed = 500 + 3 * 60
    service, fake, _, _ = _rebuild_run(records, committed, 90, 90, low=500,
                                       consumer_cls=_RetentionPastStart)
    assert fake.assigned_at == committed - 90 and fake.low == 600
    assert fake.seeks == [OFFSET_BEGINNING]
    live = len(records) - (committed - 500)
    assert service.metrics.windows._value.get() == live  # every live record scored once
    assert fake.stored == {A: records[-1].offset() + 1}
    assert service._jump_watch == {}
    # without the jump, the watch ends at the first record and never seeks
    service, fake, _, _ = _rebuild_run(records, committed, 90, 90, low=500)
    assert fake.seeks == [] and service._jump_watch == {}
    assert service.metrics.windows._value.get() == live


class _SwitchProducer(_RecordingProducer):
    """Queue full while ``full``; otherwise every record is acknowledged at the next poll()."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    def produce(self, topic, value, key, on_delivery) -> None:
        if self.full:
            raise BufferError("Local: Queue full")
        super().produce(topic, value, key, on_delivery)

    def poll(self, timeout: float = 0) -> int:
        pending, self.callbacks = self.callbacks, []
        for cb in pending:
            cb(None, None)
        if self.full:
            time.sleep(min(timeout, 0.01))
        return len(pending)

    def flush(self, timeout: float = 0) -> int:
        self.poll(0)
        return 0

    def __len__(self) -> int:
        return len(self.callbacks)


class _CoopConsumer(_ScriptedConsumer):
    """Revokes only the partitions named (incremental unassign); commits nothing."""

    def incremental_unassign(self, partitions) -> None:
        self.assigned -= {(p.topic, p.partition) for p in partitions}

    def commit(self, asynchronous: bool = True) -> None:
        pass


def _two_partition_service(producer, **kafka):
    service = _service(producer, partition_assignment_strategy="cooperative-sticky", **kafka)
    fake = _CoopConsumer(service, [])
    fake.assigned = {A, B}
    service._owned = {A, B}
    service._consumer = fake
    return service, fake


def _reading(partition: int, offset: int, sensor: str, t: int | None = None):
    from confluent_kafka import Message

    from stream_detector.records import encode_reading

    t = offset if t is None else t
    return Message(topic="readings", partition=partition, offset=offset, key=sensor.encode(),
                   value=encode_reading(sensor, 1000 + 1000 * t, [float(t % 3), 1.0, 2.0]),
                   timestamp=(1, 1))


@pytest.mark.parametrize("strategy", ["cooperative-sticky", "range"])
def test_a_revoke_drain_that_gives_records_up_stops_the_service_if_partitions_stay(
        strategy) -> None:
    """A cooperative revoke's drain flushes every partition's windows; when the producer's
    queue stayed full for its whole budget, the records it could not hand over were dropped,
    and the holds of the partitions kept here were never released: their offsets stopped for
    good (found in review). Now the service stops with a fatal error (a restart reads them
    again); with an eager revoke every partition goes, nothing is kept, nothing stalls."""
    from stream_detector.records import ReadingDecoder

    producer = _SwitchProducer()
    service, fake = _two_partition_service(producer, score_topic="scores")
    service.settings.kafka.__dict__["partition_assignment_strategy"] = strategy
    decoder = ReadingDecoder(service.manifest.features, 65536)
    service._ingest([_reading(0, o, "s") for o in range(5)]
                    + [_reading(1, o, "t") for o in range(5)], decoder, service.detector)
    producer.full = True
    service.settings.service.__dict__["grace_period_s"] = 0.2
    gone = [TopicPartition("readings", 0)] if strategy == "cooperative-sticky" else [
        TopicPartition("readings", 0), TopicPartition("readings", 1)]
    service._on_revoke(fake, gone)
    assert service._drain_abandoned
    if strategy == "cooperative-sticky":
        assert service._fatal and "1 partition(s) kept here would stall" in service._fatal
        with pytest.raises(FatalError, match="rebalance's drain"):
            service._loop()
        assert fake.stored == {}  # nothing of B stored past what was delivered
    else:
        assert not service._fatal and service._owned == set()


def test_a_revoke_drain_that_delivers_everything_keeps_the_other_partitions_going() -> None:
    """The same cooperative revoke with the broker answering: B carries on and its offsets
    advance (the control for the test above)."""
    from stream_detector.records import ReadingDecoder

    producer = _SwitchProducer()
    service, fake = _two_partition_service(producer, score_topic="scores")
    decoder = ReadingDecoder(service.manifest.features, 65536)
    service._ingest([_reading(0, o, "s") for o in range(5)]
                    + [_reading(1, o, "t") for o in range(5)], decoder, service.detector)
    service._on_revoke(fake, [TopicPartition("readings", 0)])
    assert not service._drain_abandoned and not service._fatal
    for start in (5, 10, 15):
        service._ingest([_reading(1, o, "t") for o in range(start, start + 5)], decoder,
                        service.detector)
        service._publish(service.detector.flush_batches())
        producer.poll(0)
        service._store_offsets()
    assert fake.stored == {A: 5, B: 20}


def test_a_sensor_goes_with_the_partition_of_its_latest_reading() -> None:
    """A sensor whose key moved to another partition (the topic's partition count raised)
    stayed tied to the first one: revoking that one dropped its state although its live
    partition stayed here, and revoking the live one left its state behind (found in review)."""
    from stream_detector.records import ReadingDecoder

    producer = _SwitchProducer()
    service, fake = _two_partition_service(producer)
    decoder = ReadingDecoder(service.manifest.features, 65536)
    service._ingest([_reading(0, o, "s") for o in range(5)], decoder, service.detector)
    service._ingest([_reading(1, o, "s", t=5 + o) for o in range(5)], decoder,
                    service.detector)
    service._publish(service.detector.flush_batches())
    before = service.metrics.windows._value.get()
    assert before == 8  # windows ending at t 2..9
    service._on_revoke(fake, [TopicPartition("readings", 0)])  # s's old partition
    assert service.detector.sensors() == ["s"]
    service._ingest([_reading(1, o, "s", t=5 + o) for o in range(5, 8)], decoder,
                    service.detector)
    service._publish(service.detector.flush_batches())
    assert service.metrics.windows._value.get() - before == 3  # as an uninterrupted consumer
    service._on_revoke(fake, [TopicPartition("readings", 1)])  # s's live partition
    assert service.detector.sensors() == [] and service._sensor_tp == {}


def test_a_failing_model_task_closes_the_consumer_and_exits_2(monkeypatch) -> None:
    """A model task that raised (torch's RuntimeError) left run() with a traceback: the
    consumer was never closed, so no final commit and no group leave until the session timed
    out (found in review). Now it stops as a fatal error does."""
    from stream_detector.testing import NumpyScorer

    class Failing:
        def done(self) -> bool:
            return True

        def result(self):
            raise RuntimeError("The following operation failed in the TorchScript interpreter")

    class FailingAsync(NumpyScorer):
        def errors_async(self, windows, chunk=0, rows=None):
            return Failing()

    service = _service()
    service.scorer = FailingAsync()
    fake = _ScriptedConsumer(service, [("assign",), ("msgs", [_msg(o) for o in range(5)])])
    fake.subscribe = lambda topics, **cbs: None
    fake.closed = False
    monkeypatch.setattr(consumer_mod, "wait_for_broker", lambda *a, **k: True)
    monkeypatch.setattr(consumer_mod, "_client",
                        lambda cls, conf: fake if cls is consumer_mod.Consumer
                        else _SwitchProducer())
    assert service.run() == 2
    assert fake.closed


def test_a_delivery_that_fails_in_the_final_close_makes_the_exit_code_2() -> None:
    """The exit code was chosen before close() ran its revoke drain: a delivery that failed
    there (a fatal error, offsets not stored) still exited 0 (found in review)."""
    from confluent_kafka import KafkaError as KE

    class FailsOnSecondFlush(_RecordingProducer):
        flushes = 0

        def flush(self, timeout: float = 0) -> int:
            self.flushes += 1
            if self.flushes == 2:  # close()'s drain: the broker refuses what is pending
                for cb in self.callbacks:
                    cb(KafkaError(KE._MSG_TIMED_OUT), None)
                self.callbacks = []
            return 0

    producer = FailsOnSecondFlush()
    service = _service(producer)
    fake = _ScriptedConsumer(service, [])
    service._consumer = fake
    service._on_assign(fake, [TopicPartition("readings", 0)])
    # an alert still in the producer's queue when SIGTERM comes; its delivery fails in close()
    chunk = service.tracker.begin(A, 8, 1, time.monotonic())
    service._produce("sensor-alerts", b"s", b"{}", chunk, None, ("alert event", "e1"))
    assert service._shutdown() == 2
    assert "delivery to sensor-alerts failed" in service._fatal
    assert fake.closed
