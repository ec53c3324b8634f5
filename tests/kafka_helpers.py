"""Helpers for integration tests: a tiny trained artifact, producing readings, reading topics."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import orjson
from confluent_kafka import Consumer, Producer, TopicPartition

from stream_detector.config import Settings
from stream_detector.datasets.base import Entity
from stream_detector.records import encode_reading

FEATURES = ("f0", "f1", "f2", "f3")


def tiny_entities(n: int = 3, rows: int = 600, seed: int = 0) -> list[Entity]:
    """Sinusoids + noise; the test part has one large spike on feature f2 per entity."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        t = np.arange(2 * rows)
        base = np.stack([np.sin(2 * np.pi * t / (20 + 5 * j) + i) for j in range(4)], axis=1)
        data = (base + rng.normal(0, 0.05, base.shape)).astype(np.float32)
        train, test = data[:rows], data[rows:].copy()
        labels = np.zeros(rows, np.int8)
        at = 200 + 40 * i
        test[at : at + 3, 2] += 6.0
        labels[at : at + 3] = 1
        out.append(Entity(f"sensor-{i}", train, test, labels, FEATURES))
    return out


def train_tiny(out_dir: Path, **options: float) -> Path:
    from stream_detector.train import TrainConfig, train

    cfg = TrainConfig(window=8, hidden=16, epochs=3, max_windows_per_epoch=3000,
                      batch_size=128, progress=False, smoothing=2, threshold_q=0.999,
                      **options)  # type: ignore[arg-type]
    train(tiny_entities(), cfg, out_dir, dataset="tiny")
    return out_dir


def stream_of(entities: list[Entity], window: int) -> list[tuple[str, int, np.ndarray]]:
    """(sensor, ts_ms, values) interleaved across sensors in timestamp order."""
    from stream_detector.offline import stream_rows

    rows = {e.name: stream_rows(e, window)[0] for e in entities}
    n = max(len(r) for r in rows.values())
    out = []
    for t in range(n):
        for name, r in rows.items():
            if t < len(r):
                out.append((name, 1_000_000 + t * 1000, r[t]))
    return out


def produce_readings(bootstrap: str, topic: str, items, extra: list[tuple[bytes, bytes]] = (),
                     headers: dict[bytes, list[tuple[str, bytes]]] | None = None):
    """``items`` as readings, then the raw ``extra`` records (``headers``: by record value)."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for sensor, ts, values in items:
        p.produce(topic, key=sensor.encode(), value=encode_reading(sensor, ts, values))
        p.poll(0)
    for key, value in extra:
        p.produce(topic, key=key, value=value, headers=(headers or {}).get(value))
    assert p.flush(30) == 0


def produce_with_raw_header_key(bootstrap: str, topic: str, key: bytes, value: bytes,
                                header_key: bytes) -> None:
    """One record whose header key is the raw bytes ``header_key`` (not UTF-8, say), which the
    protocol allows and some clients send; confluent-kafka's producer sends str keys only, so
    this one goes through kafka-python (a dev dependency)."""
    import warnings

    class RawKey(str):
        def encode(self, *args: object, **kwargs: object) -> bytes:  # type: ignore[override]
            return header_key

    with warnings.catch_warnings():  # kafka-python's own (importlib.resources) deprecations
        warnings.simplefilter("ignore", DeprecationWarning)
        from kafka import KafkaProducer

        p = KafkaProducer(bootstrap_servers=bootstrap)
        try:
            p.send(topic, value=value, key=key, headers=[(RawKey("raw"), b"v")]).get(timeout=30)
        finally:
            p.close(timeout=10)


def produce_paced(bootstrap: str, topic: str, items, per_second: float):
    """Produce ``items`` at about ``per_second`` in a background thread; returns the thread."""
    import threading

    def run() -> None:
        p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                      "linger.ms": 5})
        t0 = time.monotonic()
        for i, (sensor, ts, values) in enumerate(items):
            p.produce(topic, key=sensor.encode(), value=encode_reading(sensor, ts, values))
            p.poll(0)
            ahead = i / per_second - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        assert p.flush(30) == 0

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th


def read_all(bootstrap: str, topic: str, expect: int | None = None, idle_s: float = 3.0,
             max_s: float = 90.0) -> list[dict]:
    """Read a topic from the beginning (all partitions) until idle or ``expect`` reached."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{time.time_ns()}",
                  "enable.auto.commit": False, "auto.offset.reset": "earliest"})
    md = c.list_topics(topic, timeout=10)
    parts = [TopicPartition(topic, p, 0) for p in md.topics[topic].partitions]
    c.assign(parts)
    out: list[dict] = []
    t0 = last = time.monotonic()
    while time.monotonic() - t0 < max_s:
        msgs = c.consume(1000, 0.2)
        for m in msgs:
            if m.error() is None:
                out.append(orjson.loads(m.value()))
        if msgs:
            last = time.monotonic()
        if expect is not None and len(out) >= expect:
            break
        if expect is None and time.monotonic() - last > idle_s:
            break
    c.close()
    return out


def settings_for(bootstrap: str, topics: dict[str, str], artifact: Path, **kafka) -> Settings:
    return Settings(
        artifact_dir=artifact,
        kafka={
            "bootstrap_servers": bootstrap,
            "input_topic": topics["input"],
            "alert_topic": topics["alerts"],
            "score_topic": topics.get("scores", ""),
            "dead_letter_topic": topics["dlq"],
            "group_id": topics["group"],
            "session_timeout_ms": 6000,
            "heartbeat_interval_ms": 1000,
            "consume_timeout_s": 0.05,
            **kafka,
        },
        detector={"max_batch": 64, "max_wait_ms": 20, "clear_after": 5},
        service={"http_port": 0, "grace_period_s": 10, "startup_retries": 2,
                 "startup_backoff_s": 0.2},
    )


def env_for(settings: Settings) -> dict[str, str]:
    """SD_* environment for a `stream-detector serve` subprocess with these settings."""
    k = settings.kafka
    d = settings.detector
    return {
        "SD_ARTIFACT_DIR": str(settings.artifact_dir),
        "SD_KAFKA__BOOTSTRAP_SERVERS": k.bootstrap_servers,
        "SD_KAFKA__INPUT_TOPIC": k.input_topic,
        "SD_KAFKA__ALERT_TOPIC": k.alert_topic,
        "SD_KAFKA__SCORE_TOPIC": k.score_topic,
        "SD_KAFKA__DEAD_LETTER_TOPIC": k.dead_letter_topic,
        "SD_KAFKA__GROUP_ID": k.group_id,
        "SD_KAFKA__SESSION_TIMEOUT_MS": str(k.session_timeout_ms),
        "SD_KAFKA__HEARTBEAT_INTERVAL_MS": str(k.heartbeat_interval_ms),
        "SD_KAFKA__CONSUME_TIMEOUT_S": str(k.consume_timeout_s),
        "SD_KAFKA__PARTITION_ASSIGNMENT_STRATEGY": k.partition_assignment_strategy,
        "SD_DETECTOR__MAX_BATCH": str(d.max_batch),
        "SD_DETECTOR__MAX_WAIT_MS": str(d.max_wait_ms),
        "SD_DETECTOR__DISPATCH_WHEN_IDLE": str(d.dispatch_when_idle).lower(),
        "SD_DETECTOR__CLEAR_AFTER": str(d.clear_after),
        "SD_SERVICE__HTTP_PORT": "0",
        "SD_SERVICE__LOG_FORMAT": "json",
        "SD_SERVICE__GRACE_PERIOD_S": "10",
    }
