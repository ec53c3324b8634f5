"""The consumer against the real embedded broker: alerts, parity, dead letters, crash, rebalance,
SIGTERM drain."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_detector.consumer import DetectorService
from stream_detector.model.runtime import TorchScorer
from stream_detector.offline import batch_score
from tests.kafka_helpers import (
    env_for,
    produce_paced,
    produce_readings,
    produce_with_raw_header_key,
    read_all,
    settings_for,
    stream_of,
    tiny_entities,
    train_tiny,
)

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("art") / "model")


@pytest.fixture
def topics(make_topic) -> dict[str, str]:
    return {
        "input": make_topic(partitions=3),
        "alerts": make_topic(partitions=1),
        "scores": make_topic(partitions=1),
        "dlq": make_topic(partitions=1),
        "group": f"g-{time.time_ns()}",
    }


def _run_in_thread(service: DetectorService) -> threading.Thread:
    th = threading.Thread(target=service.run, daemon=True)
    th.start()
    return th


def _wait_for(pred, timeout: float = 90.0, step: float = 0.2) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return
        time.sleep(step)
    raise AssertionError("condition not met in time")


def _expected_windows(entities, window: int) -> int:
    return sum(len(e.test) for e in entities)


def test_scores_match_offline_and_alerts_flow(kafka_broker, topics, artifact) -> None:
    bs = kafka_broker.bootstrap_servers
    settings = settings_for(bs, topics, artifact)
    scorer = TorchScorer.load(artifact)
    entities = tiny_entities()
    produce_readings(bs, topics["input"], stream_of(entities, scorer.manifest.window))
    service = DetectorService(settings, scorer.manifest, scorer, serve_http=False)
    th = _run_in_thread(service)
    n = _expected_windows(entities, scorer.manifest.window)
    scores = read_all(bs, topics["scores"], expect=n)
    service.stop()
    th.join(30)
    assert len(scores) == n
    for e in entities:
        offline = batch_score(scorer, scorer.manifest, e)
        streamed = sorted((s for s in scores if s["sensor"] == e.name),
                          key=lambda s: s["window_end"])
        got = np.array([s["score"] for s in streamed])
        assert len(got) == len(offline.score)
        assert np.max(np.abs(got - offline.score)) < 1e-5
        rec = np.array([s["reconstruction_error"] for s in streamed])
        assert np.max(np.abs(rec - offline.reconstruction)) < 1e-5
    alerts = read_all(bs, topics["alerts"])
    opened = [a for a in alerts if a["event"] == "open"]
    assert opened, "the injected spikes must raise alerts"
    # each entity's spike (feature f2) is caught and named as the top feature
    for e in entities:
        at = int(np.flatnonzero(e.labels)[0])
        ts_spike = 1_000_000 + (scorer.manifest.window - 1 + at) * 1000
        hits = [a for a in opened if a["sensor"] == e.name
                and ts_spike <= a["window_end"] <= ts_spike + 3000]
        assert hits, f"no alert at the spike of {e.name}"
        assert hits[0]["top_features"][0]["feature"] == "f2"
        assert len(hits[0]["alert_id"]) == 24


def test_a_quiet_stream_is_scored_without_waiting_for_the_batch_deadline(
    kafka_broker, topics, artifact
) -> None:
    """dispatch_when_idle: a handful of windows, far fewer than a batch, with the batch
    deadline at its 60 s maximum. Once the consumer has read everything there is, the model is
    free and takes them at once; without it they would wait the 60 s (longer than this test
    reads)."""
    bs = kafka_broker.bootstrap_servers
    settings = settings_for(bs, topics, artifact)
    settings = settings.model_copy(update={"detector": settings.detector.model_copy(
        update={"max_batch": 4096, "max_wait_ms": 60_000})})
    scorer = TorchScorer.load(artifact)
    w = scorer.manifest.window
    items = stream_of(tiny_entities(n=1), w)[: w - 1 + 5]  # 5 complete windows
    produce_readings(bs, topics["input"], items)
    service = DetectorService(settings, scorer.manifest, scorer, serve_http=False)
    th = _run_in_thread(service)
    try:
        scores = read_all(bs, topics["scores"], expect=5, max_s=30)
    finally:
        service.stop()
        th.join(30)
    assert sorted(s["window_end"] for s in scores) == [ts for _, ts, _ in items[w - 1 :]]


class _HeldBack:
    """A model task that reports done only ``hold_s`` after it started."""

    def __init__(self, handle, hold_s: float) -> None:
        self._handle, self._at = handle, time.monotonic() + hold_s

    def done(self) -> bool:
        return time.monotonic() >= self._at and self._handle.done()

    def result(self):
        return self._handle.result()


class _SlowScorer:
    """The TorchScorer with every model task held back: a slow model, or a loaded machine."""

    def __init__(self, inner: TorchScorer, hold_s: float) -> None:
        self.inner, self.hold_s, self.tasks = inner, hold_s, 0

    def errors(self, *args):
        return self.inner.errors(*args)

    def errors_async(self, *args):
        self.tasks += 1
        return _HeldBack(self.inner.errors_async(*args), self.hold_s)


def test_the_loop_waits_while_the_model_works(kafka_broker, topics, artifact) -> None:
    """While a model task is in flight the loop polls for its result about once a
    millisecond; it must block in consume() between polls, not spin (a sub-millisecond
    timeout used to be truncated to 0 by the client: tens of thousands of loop iterations per
    second, a core burnt at any input rate)."""
    bs = kafka_broker.bootstrap_servers
    settings = settings_for(bs, topics, artifact)
    inner = TorchScorer.load(artifact)
    w = inner.manifest.window
    items = stream_of(tiny_entities(n=1), w)[: w - 1 + 5]
    produce_readings(bs, topics["input"], items)
    scorer = _SlowScorer(inner, hold_s=2.0)
    service = DetectorService(settings, inner.manifest, scorer, serve_http=False)
    th = _run_in_thread(service)
    try:
        scores = read_all(bs, topics["scores"], expect=5, max_s=60)
        held = scorer.tasks * scorer.hold_s
        iterations = service.iterations
    finally:
        service.stop()
        th.join(30)
    assert len(scores) == 5 and held >= 2.0
    # about 1,000 per second held, plus 20 per second of waiting for records (consume
    # timeout 50 ms) through the group join; a spinning loop makes 10,000s per second held
    assert iterations < 1_500 * held + 500, (iterations, held)


def test_bad_input_goes_to_dead_letter_with_reason(kafka_broker, topics, artifact) -> None:
    bs = kafka_broker.bootstrap_servers
    settings = settings_for(bs, topics, artifact)
    scorer = TorchScorer.load(artifact)
    entities = tiny_entities(n=1, rows=200)
    good = stream_of(entities, scorer.manifest.window)
    bad = [
        (b"x", b"{not json"),
        (b"x", b'{"sensor": "x", "ts": 1}'),
        (b"x", b'{"sensor": "x", "ts": 1, "values": [1, 2]}'),
        (b"x", b'{"sensor": "x", "ts": 1, "values": [1, "a", 2, 3]}'),
        (b"x", b'{"sensor": "x", "ts": 1, "values": [1, 1e39, 2, 3]}'),
        (b"x", b'{"schema_version": 9, "sensor": "x", "ts": 1, "values": [1, 2, 3, 4]}'),
        (b"x", b'{"sensor": "x", "ts": 1, "values": {"f0": 1, "zz": 2, "f2": 3, "f3": 4}}'),
        (b"x", b"[1, 2, 3]"),
        (b"x", b'{"sensor": "x", "ts": 1, "values": [' + b"1," * 40_000 + b"1]}"),
        # duplicate and out-of-order timestamps of a sensor that is otherwise fine
        (b"sensor-0", b'{"sensor": "sensor-0", "ts": 5, "values": [0, 0, 0, 0]}'),
    ]
    # first half of the good readings, then the bad ones, then the rest: good keep flowing
    half = len(good) // 2
    started_ms = int(time.time() * 1000)
    produce_readings(bs, topics["input"], good[:half], extra=bad,
                     headers={b"[1, 2, 3]": [("trace-id", b"abc\x00")]})
    # a header key that is not UTF-8: any client can send one (confluent-kafka's cannot)
    produce_with_raw_header_key(bs, topics["input"], b"x", b"[4]", b"\xff\xfe")
    bad.append((b"x", b"[4]"))
    produce_readings(bs, topics["input"], good[half:])
    service = DetectorService(settings, scorer.manifest, scorer, serve_http=False)
    th = _run_in_thread(service)
    dlq = read_all(bs, topics["dlq"], expect=len(bad))
    scores = read_all(bs, topics["scores"], expect=len(entities[0].test))
    service.stop()
    th.join(30)
    reasons = sorted(d["reason"] for d in dlq)
    assert reasons == sorted([
        "malformed_json", "missing_field", "wrong_value_count", "non_numeric", "non_finite",
        "unknown_schema_version", "unknown_feature", "not_an_object", "not_an_object",
        "oversized", "late_or_duplicate",
    ])
    assert all("original_b64" in d and d["offset"] >= 0 for d in dlq)
    # the original's Kafka timestamp (CreateTime, set by the producing client) and headers
    assert all(abs(d["original_timestamp"] - started_ms) < 600_000 for d in dlq)
    [traced] = [d for d in dlq if d["original_headers"]]
    assert traced["reason"] == "not_an_object"
    assert [(h["key"], base64.b64decode(h["value_b64"])) for h in traced["original_headers"]] == [
        ("trace-id", b"abc\x00")]
    # a header key confluent-kafka cannot decode: its dead letter stopped the service, at
    # every restart (review); now it goes without the headers, saying why
    [odd] = [d for d in dlq if base64.b64decode(d["original_b64"]) == b"[4]"]
    assert odd["original_headers"] == [] and "header key is not valid UTF-8" in odd["detail"]
    assert len(scores) == len(entities[0].test)
    assert service.metrics.dead_letters.labels("oversized")._value.get() == 1


def _serve_proc(settings, log_path: Path) -> subprocess.Popen:
    env = {**os.environ, **env_for(settings)}
    with log_path.open("wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "stream_detector.cli", "serve", "--rebuild-lookback",
             "100000"],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )


def _event_ids(alerts: list[dict]) -> set[str]:
    return {a["event_id"] for a in alerts}


@pytest.fixture(scope="module")
def reference_alerts(kafka_broker, artifact, tmp_path_factory) -> tuple[list, set[str]]:
    """Alerts of an uninterrupted run over a 3-sensor stream (one consumer)."""
    items, ids, _ = _reference_run(kafka_broker, artifact)
    return items, ids


@pytest.fixture(scope="module")
def long_term_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("art-lt") / "model", long_term_alpha=0.05)


def _reference_run(kafka_broker, artifact: Path) -> tuple[list, set[str], list[dict]]:
    """Readings, alert event ids and score records of an uninterrupted run over a 3-sensor
    stream (one consumer)."""
    import uuid

    bs = kafka_broker.bootstrap_servers
    names = {k: f"ref-{k}-{uuid.uuid4().hex[:8]}" for k in ("input", "alerts", "scores", "dlq")}
    kafka_broker.create_topics([names["input"]], partitions=3)
    kafka_broker.create_topics([names["alerts"], names["scores"], names["dlq"]], partitions=1)
    names["group"] = f"g-ref-{uuid.uuid4().hex[:8]}"
    scorer = TorchScorer.load(artifact)
    items = stream_of(tiny_entities(), scorer.manifest.window)
    produce_readings(bs, names["input"], items)
    service = DetectorService(settings_for(bs, names, artifact), scorer.manifest, scorer,
                              serve_http=False)
    th = _run_in_thread(service)
    read_all(bs, names["scores"], expect=_expected_windows(tiny_entities(), 8))
    service.stop()
    th.join(30)
    scores = read_all(bs, names["scores"])
    alerts = read_all(bs, names["alerts"])
    assert alerts
    return items, _event_ids(alerts), scores


@pytest.mark.slow
def test_sigkill_mid_stream_then_restart_loses_no_alert(
    kafka_broker, topics, artifact, reference_alerts, tmp_path
) -> None:
    items, expected = reference_alerts
    bs = kafka_broker.bootstrap_servers
    settings = settings_for(bs, topics, artifact)
    proc = _serve_proc(settings, tmp_path / "first.log")
    # readings arrive at ~150/s while it runs; kill it mid-stream, with work in flight
    producer = produce_paced(bs, topics["input"], items, per_second=150)
    _wait_for(lambda: len(read_all(bs, topics["scores"], idle_s=0.5, max_s=2)) > 300, 120)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    partial = read_all(bs, topics["scores"], idle_s=0.5, max_s=5)
    assert len(partial) < len(items) - 3 * 7, "killed too late to test anything"
    producer.join(60)
    proc = _serve_proc(settings, tmp_path / "second.log")
    try:
        n = _expected_windows(tiny_entities(), 8)
        _wait_for(lambda: len({(s["sensor"], s["window_end"]) for s in
                               read_all(bs, topics["scores"], idle_s=0.5, max_s=5)}) >= n, 150)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    alerts = read_all(bs, topics["alerts"])
    got = _event_ids(alerts)
    assert expected <= got, f"lost alerts: {sorted(expected - got)[:5]}"
    assert got == expected  # duplicates only as repeats of the same event ids


@pytest.mark.slow
def test_two_consumers_with_rebalance_emit_reference_alerts(
    kafka_broker, topics, artifact, reference_alerts, tmp_path
) -> None:
    items, expected = reference_alerts
    bs = kafka_broker.bootstrap_servers
    settings = settings_for(bs, topics, artifact)
    produce_readings(bs, topics["input"], items[: len(items) // 3])
    first = _serve_proc(settings, tmp_path / "a.log")
    _wait_for(lambda: len(read_all(bs, topics["scores"], idle_s=0.5, max_s=2)) > 200, 120)
    second = _serve_proc(settings, tmp_path / "b.log")  # joins the group: rebalance
    time.sleep(4)
    produce_readings(bs, topics["input"], items[len(items) // 3 :])
    try:
        n = _expected_windows(tiny_entities(), 8)
        _wait_for(lambda: len({(s["sensor"], s["window_end"]) for s in
                               read_all(bs, topics["scores"], idle_s=0.5, max_s=5)}) >= n, 150)
    finally:
        for p in (first, second):
            p.send_signal(signal.SIGTERM)
        codes = [p.wait(40) for p in (first, second)]
    assert codes == [0, 0]
    got = _event_ids(read_all(bs, topics["alerts"]))
    assert got == expected


def _restart_in_the_spike_episode(kafka_broker, topics, art: Path, items: list
                                  ) -> tuple[DetectorService, Any]:
    """A consumer stopped 3 readings into sensor-0's spike episode (test row 200), with that
    episode open; its successor starts with a look-back of 4 records per partition (less than
    a window: it rebuilds nobody in its first pass) and runs to the end of the stream.
    Returns the successor (stopped) and the settings."""
    bs = kafka_broker.bootstrap_servers
    settings = settings_for(bs, topics, art)
    scorer = TorchScorer.load(art)
    window = scorer.manifest.window
    split = 3 * (window - 1 + 200 + 3)  # sensor-0's spike (test row 200) began 3 readings ago
    produce_readings(bs, topics["input"], items[:split])
    first = DetectorService(settings, scorer.manifest, scorer, serve_http=False)
    th = _run_in_thread(first)
    read_all(bs, topics["scores"], expect=split - 3 * (window - 1))
    first.stop()
    th.join(30)
    before = read_all(bs, topics["alerts"])
    assert [a["event"] for a in before if a["sensor"] == "sensor-0"][-1] == "open"
    produce_readings(bs, topics["input"], items[split:])
    second = DetectorService(settings, scorer.manifest, scorer, serve_http=False,
                             rebuild_lookback=4)
    th = _run_in_thread(second)
    n = _expected_windows(tiny_entities(), window)
    _wait_for(lambda: len({(s["sensor"], s["window_end"]) for s in
                           read_all(bs, topics["scores"], idle_s=0.5, max_s=5)}) >= n, 120)
    second.stop()
    th.join(30)
    assert not th.is_alive() and second.failure is None
    return second, settings


@pytest.mark.slow
def test_a_short_rebuild_look_back_deepens_until_alert_ids_survive_a_restart(
    kafka_broker, topics, artifact, reference_alerts
) -> None:
    """A consumer stopped in the middle of sensor-0's spike episode; its successor starts with
    a look-back of 4 records per partition (less than a window: it rebuilt nobody, and the
    episode went on under a new alert_id). It deepens the rebuild through the real consumer's
    seek() until every sensor's state is exact, and publishes the reference's events."""
    items, expected = reference_alerts
    second, _ = _restart_in_the_spike_episode(kafka_broker, topics, artifact, items)
    assert _event_ids(read_all(kafka_broker.bootstrap_servers, topics["alerts"])) == expected
    m = second.metrics
    assert m.rebuild_deepened._value.get() >= 3  # 4 -> 8 -> 16 -> 32 records at least
    assert m.rebuild_inexact._value.get() == 0


@pytest.mark.slow
def test_a_long_term_artifact_rebuilds_its_term_after_a_restart(
    kafka_broker, topics, long_term_artifact
) -> None:
    """The same restart in sensor-0's spike episode with an artifact trained with the
    long-term term: its successor deepens (from 4 records) until the term has forgotten its
    start, here to the log's start, so the episode keeps its alert_id, every event is the
    uninterrupted run's, and every score after the restart is that run's within
    SD_DETECTOR__LONG_TERM_TOLERANCE x threshold (a consumer that rebuilt the windows and the
    smoothing only, with the term started afresh, is off by far more)."""
    items, expected, ref_scores = _reference_run(kafka_broker, long_term_artifact)
    assert TorchScorer.load(long_term_artifact).manifest.score.long_term is not None
    second, settings = _restart_in_the_spike_episode(kafka_broker, topics, long_term_artifact,
                                                     items)
    bs = kafka_broker.bootstrap_servers
    assert _event_ids(read_all(bs, topics["alerts"])) == expected
    assert second.metrics.rebuild_deepened._value.get() >= 5  # to the log's start
    assert second.metrics.rebuild_inexact._value.get() == 0
    ref = {(s["sensor"], s["window_end"]): s["score"] for s in ref_scores}
    tol = settings.detector.long_term_tolerance
    for s in read_all(bs, topics["scores"]):
        key = (s["sensor"], s["window_end"])
        assert abs(s["score"] - ref[key]) <= tol * s["threshold"] + 1e-9, key


def test_sigterm_drains_and_exits_zero(kafka_broker, topics, artifact, tmp_path) -> None:
    """SIGTERM with every window still waiting in the micro-batch (a 60 s batch deadline, no
    idle dispatch): the drain scores and publishes all 300, commits the input to its end and
    exits 0 within the grace period."""
    from confluent_kafka import Consumer, TopicPartition

    bs = kafka_broker.bootstrap_servers
    settings = settings_for(bs, topics, artifact)
    settings = settings.model_copy(update={"detector": settings.detector.model_copy(
        update={"max_batch": 4096, "max_wait_ms": 60_000, "dispatch_when_idle": False})})
    scorer = TorchScorer.load(artifact)
    items = stream_of(tiny_entities(n=1, rows=300), scorer.manifest.window)
    produce_readings(bs, topics["input"], items)
    log_path = tmp_path / "serve.log"
    proc = _serve_proc(settings, log_path)
    _wait_for(lambda: '"assigned"' in log_path.read_text(), 120)
    time.sleep(3)  # the readings are in the topic already: fetched and buffered meanwhile
    assert read_all(bs, topics["scores"], idle_s=0.5, max_s=1) == []  # all still pending
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert time.monotonic() - t0 < settings.service.grace_period_s + 5
    log = log_path.read_text()
    assert '"stopped"' in log and '"exit_code":0' in log
    scores = read_all(bs, topics["scores"], expect=300, max_s=30)
    assert sorted(s["window_end"] for s in scores) == sorted(
        ts for _, ts, _ in items[scorer.manifest.window - 1 :])
    c = Consumer({"bootstrap.servers": bs, "group.id": settings.kafka.group_id})
    try:
        parts = c.list_topics(topics["input"], timeout=10).topics[topics["input"]].partitions
        tps = [TopicPartition(topics["input"], p) for p in parts]
        committed = [tp.offset for tp in c.committed(tps, timeout=10) if tp.offset >= 0]
    finally:
        c.close()
    # one sensor: every reading on one partition, committed to its end
    assert committed == [len(items)], committed


def test_sigterm_exits_within_the_grace_period_when_the_broker_stops_answering(
        artifact, tmp_path) -> None:
    """The final commit and the group leave waited for a broker that stopped answering until
    its socket timeout (60 s), far past SD_SERVICE__GRACE_PERIOD_S, so Kubernetes killed the
    pod: now serve exits 1 at the end of the grace period, saying why. A broker of its own,
    frozen with SIGSTOP after the consumer joined."""
    from stream_detector.devbroker import EmbeddedBroker, create_topics

    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    frozen = False
    try:
        bs = broker.bootstrap_servers
        topics = {k: f"frozen-{k}" for k in ("input", "alerts", "dlq")} | {"group": "frozen"}
        create_topics(bs, [topics["input"], topics["alerts"], topics["dlq"]], 1)
        settings = settings_for(bs, topics, artifact)
        produce_readings(bs, topics["input"],
                         stream_of(tiny_entities(n=1, rows=40),
                                   TorchScorer.load(artifact).manifest.window))
        log_path = tmp_path / "serve.log"
        env = {**os.environ, **env_for(settings), "SD_SERVICE__GRACE_PERIOD_S": "3"}
        with log_path.open("wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "stream_detector.cli", "serve"],
                                    env=env, stdout=subprocess.DEVNULL, stderr=log)
        try:
            _wait_for(lambda: '"assigned"' in log_path.read_text(), 120)
            time.sleep(2)
            assert broker._proc is not None
            os.kill(broker._proc.pid, signal.SIGSTOP)
            frozen = True
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(30)
            took = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
        assert code == 1, log_path.read_text()[-3000:]
        assert took < 3 + 3, took
        assert "did not confirm the final commit" in log_path.read_text()
    finally:
        if frozen and broker._proc is not None:
            os.kill(broker._proc.pid, signal.SIGCONT)
        broker.stop()
