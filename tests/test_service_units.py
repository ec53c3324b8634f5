"""Service pieces that need no broker: offset tracking, broker wait, health/metrics server."""

from __future__ import annotations

import os
import socket
from http.client import HTTPConnection
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

import stream_detector.consumer as consumer_mod
from stream_detector.config import Settings
from stream_detector.consumer import FatalError, OffsetTracker, wait_for_broker
from stream_detector.errors import StreamDetectorError
from stream_detector.observability import HealthServer, HealthState, Metrics

A = ("readings", 0)
B = ("readings", 1)


# ----------------------------------------------------------------------------- OffsetTracker


def test_offsets_are_stored_in_order() -> None:
    t = OffsetTracker()
    for off in (10, 11, 12):
        t.begin(A, off)
    assert t.advance() == {}  # nothing finished yet
    t.release(A, 10)
    assert t.advance() == {A: 11}  # next offset to store = one past the finished prefix
    assert t.advance() == {}  # reported once
    t.release(A, 11)
    t.release(A, 12)
    assert t.advance() == {A: 13}
    assert t.in_flight() == 0


def test_unfinished_offset_holds_back_later_ones() -> None:
    t = OffsetTracker()
    for off in range(5):
        t.begin(A, off)
    for off in (1, 2, 3, 4):
        t.release(A, off)
    assert t.advance() == {}  # offset 0 is still pending
    assert t.in_flight(A) == 5
    t.release(A, 0)
    assert t.advance() == {A: 5}
    assert t.in_flight(A) == 0


def test_holds_are_counted() -> None:
    t = OffsetTracker()
    t.begin(A, 7)  # one hold from begin
    t.hold(A, 7)  # e.g. a score record in flight
    t.hold(A, 7)  # e.g. an alert in flight
    t.release(A, 7)  # begin's hold
    assert t.advance() == {}
    t.release(A, 7)
    assert t.advance() == {}
    t.release(A, 7)  # last delivery acknowledged
    assert t.advance() == {A: 8}


def test_gaps_in_offsets_and_partitions_are_independent() -> None:
    t = OffsetTracker()
    t.begin(A, 100)
    t.begin(A, 103)  # compacted topic / transaction markers: offsets need not be contiguous
    t.begin(B, 5)
    t.release(A, 103)
    t.release(B, 5)
    assert t.advance() == {B: 6}
    t.release(A, 100)
    assert t.advance() == {A: 104}
    assert t.in_flight() == 0


def test_drop_forgets_a_partition_and_late_callbacks_are_harmless() -> None:
    t = OffsetTracker()
    for off in (1, 2):
        t.begin(A, off)
        t.begin(B, off)
    t.release(A, 1)
    t.drop(A)  # revoked / lost before advance()
    assert t.in_flight(A) == 0
    assert t.in_flight() == 2
    assert t.advance() == {}  # a dropped partition is never stored
    # deliveries and scored windows of the dropped partition may still come back
    t.hold(A, 2)
    t.release(A, 2)
    t.release(("other", 9), 1)
    assert t.advance() == {}
    t.release(B, 1)
    assert t.advance() == {B: 2}
    # after re-assignment the partition starts afresh
    t.begin(A, 50)
    t.release(A, 50)
    assert t.advance() == {A: 51}
    t.drop(("never", 0))  # unknown partition: no error


def test_a_lost_and_reassigned_partition_ignores_its_old_generation() -> None:
    """Lost, assigned again and the same offset read again: a stale release (a window scored
    or a delivery report from before the loss) must not free the new reading's hold."""
    t = OffsetTracker()
    old = t.begin(A, 7)
    t.hold(A, 7, old)  # e.g. its alert is in flight
    t.drop(A)  # partitions lost
    new = t.begin(A, 7)  # re-assigned, the same offset is read again
    assert new is not old and t.generation(A) is new
    t.release(A, 7, old)
    t.release(A, 7, old)
    t.hold(A, 7, old)
    assert t.advance() == {}  # the new reading is still unfinished
    t.release(A, 7, new)
    assert t.advance() == {A: 8}


def test_publish_skips_results_read_before_their_partition_was_lost() -> None:
    from stream_detector.consumer import DetectorService, _Ref
    from stream_detector.detector import ScoredBatch

    class FakeProducer:
        def __init__(self) -> None:
            self.sent: list[tuple[str, bytes]] = []
            self.callbacks: list = []

        def produce(self, topic, value, key, on_delivery) -> None:
            self.sent.append((topic, value))
            self.callbacks.append(on_delivery)

    settings = Settings(kafka={"score_topic": "scores"})
    service = DetectorService(settings, None, None, serve_http=False)  # type: ignore[arg-type]
    service._producer = FakeProducer()  # type: ignore[assignment]

    def batch(*refs: _Ref) -> ScoredBatch:
        n = len(refs)
        return ScoredBatch(("s1",) * n, refs, [0] * n, [1] * n, [0.5] * n, [0.1] * n,
                           [0.2] * n, [1.0] * n, ["normal"] * n, {}, "m")

    stale = _Ref(A, 7, False, 0)
    stale.gen = service.tracker.begin(A, 7)
    service.tracker.drop(A)  # what _on_lost does
    fresh = _Ref(A, 7, False, 0)
    fresh.gen = service.tracker.begin(A, 7)
    service._publish([batch(stale, fresh)])
    assert [topic for topic, _ in service._producer.sent] == ["scores"]  # only the fresh one
    assert service.tracker.advance() == {}  # the score record is not delivered yet
    service._producer.callbacks[0](None, None)
    assert service.tracker.advance() == {A: 8}


def test_release_after_advance_is_ignored() -> None:
    t = OffsetTracker()
    t.begin(A, 1)
    t.release(A, 1)
    assert t.advance() == {A: 2}
    t.release(A, 1)  # a duplicate callback
    t.hold(A, 1)
    assert t.advance() == {}


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
    assert admin.conf == settings.kafka.common()  # same security settings as the clients
    assert admin.conf["sasl.password"] == "pw"


def test_zero_retries_means_one_attempt(clean_env, fake_admin) -> None:
    fake_admin.fail = 1
    delays: list[float] = []
    with pytest.raises(FatalError, match="after 1 attempts"):
        wait_for_broker(_settings("b:9092", retries=0, backoff=1.0), sleep=delays.append)
    assert delays == []


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
    # every metric of the package carries the sd_ prefix
    families = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert families and all(f.startswith("sd_") for f in families), families


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
