"""What a partition's rebuild costs after an assignment, with and without the deepening.

One partition of the embedded broker holds ``--sensors`` sensors x ``--readings`` readings each
(SMD machine-1-1's rows, shifted per sensor, when ../shared/data/smd is there; else values
drawn around the artifact's scaler mean). A consumer group's committed offset is set
``--live`` readings per sensor before the end, and a DetectorService with the given artifact
takes the partition over, once per look-back setting. Printed per setting: the seconds from
the assignment until every live reading is done (scored, or only warming its window), the
records re-read, the deepenings, and how many live readings were scored vs only warmed a
window (a cold sensor's first window - 1 readings are not scored).

    .venv/bin/python scripts/rebuild_cost.py --artifact artifacts/smd
"""

from __future__ import annotations

import argparse
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from confluent_kafka import Consumer, Producer, TopicPartition

from stream_detector.config import Settings
from stream_detector.consumer import DetectorService
from stream_detector.devbroker import EmbeddedBroker
from stream_detector.logs import configure_logging
from stream_detector.model.runtime import TorchScorer
from stream_detector.records import encode_reading

SMD_ROWS = Path(__file__).resolve().parents[2] / "shared/data/smd/test/machine-1-1.txt.gz"
SETTINGS = [(10_000, 10_000), (10_000, 500_000), (40_000, 500_000)]  # look-back, maximum


def readings(manifest, n_rows: int) -> np.ndarray:
    if SMD_ROWS.exists() and manifest.n_features == 38:
        return np.loadtxt(SMD_ROWS, delimiter=",")
    rng = np.random.default_rng(0)
    mean, std = np.asarray(manifest.scaler_mean), np.asarray(manifest.scaler_std)
    return mean + std * rng.normal(0.0, 0.5, (n_rows, manifest.n_features))


def run(bs: str, broker: EmbeddedBroker, scorer: TorchScorer, rows: np.ndarray,
        args: argparse.Namespace, lookback: int, maximum: int) -> dict[str, object]:
    t = {k: f"rebuild-{k}-{uuid.uuid4().hex[:6]}" for k in ("in", "alerts", "dlq")}
    broker.create_topics(t.values(), partitions=1)
    p = Producer({"bootstrap.servers": bs, "linger.ms": 20, "compression.type": "lz4"})
    for r in range(args.readings):
        for i in range(args.sensors):
            v = rows[(i * 37 + r) % len(rows)]
            p.produce(t["in"], key=f"s{i}".encode(),
                      value=encode_reading(f"s{i}", 1_000_000 + r * 1000, v))
        p.poll(0)
    assert p.flush(60) == 0
    group = f"rebuild-{uuid.uuid4().hex[:6]}"
    committed = args.sensors * (args.readings - args.live)
    c = Consumer({"bootstrap.servers": bs, "group.id": group, "enable.auto.commit": False})
    c.commit(offsets=[TopicPartition(t["in"], 0, committed)], asynchronous=False)
    c.close()
    settings = Settings(
        kafka={"bootstrap_servers": bs, "input_topic": t["in"], "alert_topic": t["alerts"],
               "score_topic": "", "dead_letter_topic": t["dlq"], "group_id": group,
               "session_timeout_ms": 6000, "heartbeat_interval_ms": 1000},
        service={"http_port": 0, "rebuild_lookback": lookback,
                 "rebuild_max_lookback": maximum})
    svc = DetectorService(settings, scorer.manifest, scorer, serve_http=False)
    th = threading.Thread(target=svc.run, daemon=True)
    th.start()
    m = svc.metrics
    while m.assigned._value.get() < 1 and th.is_alive():
        time.sleep(0.005)
    t0 = time.monotonic()
    live = args.sensors * args.live
    while (m.windows._value.get() + m.warming._value.get() < live and th.is_alive()
           and time.monotonic() - t0 < 600):
        time.sleep(0.005)
    seconds = time.monotonic() - t0
    svc.stop()
    th.join(30)
    return {"lookback": lookback, "maximum": maximum, "seconds": round(seconds, 2),
            "re-read": int(m.rebuilt._value.get()),
            "deepened": int(m.rebuild_deepened._value.get()),
            "inexact": int(m.rebuild_inexact._value.get()),
            "live scored": int(m.windows._value.get()),
            "live warming only": int(m.warming._value.get())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, default=Path("artifacts/smd"))
    ap.add_argument("--sensors", type=int, default=1000)
    ap.add_argument("--readings", type=int, default=200, help="per sensor, in all")
    ap.add_argument("--live", type=int, default=10, help="per sensor, after the commit")
    args = ap.parse_args()
    configure_logging("console", "WARNING")
    scorer = TorchScorer.load(args.artifact, threads=1)
    rows = readings(scorer.manifest, 5000)
    print(f"{args.sensors} sensors x {args.readings} readings on one partition, committed "
          f"{args.live} readings per sensor before the end; artifact {args.artifact} "
          f"(window {scorer.manifest.window}); rows from "
          f"{SMD_ROWS.name if len(rows) != 5000 else 'the scaler mean + noise'}")
    print("| look-back | maximum | seconds | re-read | deepened | inexact | live scored "
          "| live warming only |")
    print("|---|---|---|---|---|---|---|---|")
    with EmbeddedBroker() as broker:
        for lookback, maximum in SETTINGS:
            r = run(broker.bootstrap_servers, broker, scorer, rows, args, lookback, maximum)
            print("| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v)
                                    for v in r.values()) + " |", flush=True)


if __name__ == "__main__":
    main()
