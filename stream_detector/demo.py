"""``stream-detector demo``: the whole product in one command, on the embedded broker.

1. starts the embedded Kafka-protocol broker (Tansu) on a free loopback port and creates topics;
2. trains the hybrid model on the dataset (the synthetic default needs no data) unless the
   artifact already exists;
3. evaluates it offline against the baselines (``evaluate``);
4. starts ``stream-detector serve`` as a separate process, exactly as deployed, and waits until
   its ``/readyz`` answers (joined its group), so the replay's latency figures time scoring, not
   the group join;
5. replays the dataset's test data through Kafka into that consumer (``replay``), checks parity
   with the offline scores and writes the report;
6. stops the consumer with SIGTERM (it drains and must exit 0) and the broker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import structlog

from stream_detector.errors import StreamDetectorError

log = structlog.get_logger(__name__)


@dataclass
class DemoOptions:
    dataset: str = "synthetic"
    data_dir: Path | None = None
    entities: list[str] | None = None
    artifact_dir: Path | None = None
    out_dir: Path = Path("reports/demo")
    retrain: bool = False
    epochs: int | None = None
    partitions: int = 4


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StreamDetectorError(
                f"serve exited with code {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:  # noqa: S310 - loopback
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise StreamDetectorError(f"serve not ready after {timeout:.0f} s; log: {log_path}")


def run_demo(opts: DemoOptions) -> int:
    from stream_detector.config import Settings
    from stream_detector.datasets import load_dataset
    from stream_detector.devbroker import EmbeddedBroker, free_port
    from stream_detector.evaluation import prepare_out_dir, run_evaluation
    from stream_detector.replay import ReplayOptions, run_replay
    from stream_detector.train_config import TrainConfig

    t0 = time.time()
    out = prepare_out_dir(Path(opts.out_dir))
    artifact = Path(opts.artifact_dir or Path("artifacts") / opts.dataset)

    print(f"[1/5] training on {opts.dataset} -> {artifact}", flush=True)
    if opts.retrain or not (artifact / "manifest.json").exists():
        cfg = TrainConfig(epochs=opts.epochs) if opts.epochs is not None else TrainConfig()
        entities = load_dataset(opts.dataset, opts.data_dir, opts.entities)
        from stream_detector.train import train  # torch's import: after the cheap checks

        train(entities, cfg, artifact, dataset=opts.dataset)
    else:
        print("      artifact exists, reusing it (--retrain to train again)", flush=True)

    print("[2/5] offline evaluation against baselines", flush=True)
    ev = run_evaluation(opts.dataset, opts.data_dir, opts.entities, artifact,
                        out / "evaluation", baselines=["random", "pca", "iforest", "ridge"])

    print("[3/5] starting the embedded Kafka-protocol broker (tansu)", flush=True)
    with EmbeddedBroker(log_path=out / "broker.log") as broker:
        bs = broker.bootstrap_servers
        run = f"demo-{int(time.time())}"
        topics = {"input": f"{run}-readings", "alerts": f"{run}-alerts",
                  "scores": f"{run}-scores", "dlq": f"{run}-dlq"}
        broker.create_topics([topics["input"]], partitions=opts.partitions)
        broker.create_topics([topics["alerts"], topics["scores"], topics["dlq"]], partitions=1)
        port = free_port()
        env = {
            **os.environ,
            "SD_ARTIFACT_DIR": str(artifact),
            "SD_KAFKA__BOOTSTRAP_SERVERS": bs,
            "SD_KAFKA__INPUT_TOPIC": topics["input"],
            "SD_KAFKA__ALERT_TOPIC": topics["alerts"],
            "SD_KAFKA__SCORE_TOPIC": topics["scores"],
            "SD_KAFKA__DEAD_LETTER_TOPIC": topics["dlq"],
            "SD_KAFKA__GROUP_ID": run,
            "SD_KAFKA__SESSION_TIMEOUT_MS": "6000",
            "SD_KAFKA__HEARTBEAT_INTERVAL_MS": "1000",
            # as replay's own consumer: every rise of an episode's peak is an update event, a
            # root-cause sample for HitRate (.env's 60 s would give the demo's report fewer
            # than a `replay` of the same artifact, docs/backtesting.md)
            "SD_DETECTOR__UPDATE_INTERVAL_S": "0",
            "SD_SERVICE__HTTP_HOST": "127.0.0.1",
            "SD_SERVICE__HTTP_PORT": str(port),
            "SD_SERVICE__LOG_FORMAT": "json",
        }
        serve_log = out / "serve.log"
        print(f"[4/5] stream-detector serve (log: {serve_log}, metrics: "
              f"http://127.0.0.1:{port}/metrics)", flush=True)
        with serve_log.open("wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "stream_detector.cli", "serve"],
                                    env=env, stdout=fh, stderr=subprocess.STDOUT)
        try:
            # readiness (joined the group), so the replay times scoring rather than the group join
            _wait_ready(f"http://127.0.0.1:{port}/readyz", proc, serve_log, 120)
            settings = Settings(
                artifact_dir=artifact,
                kafka={"bootstrap_servers": bs, "input_topic": topics["input"],
                       "alert_topic": topics["alerts"], "score_topic": topics["scores"],
                       "dead_letter_topic": topics["dlq"], "group_id": run},
            )
            print("[5/5] replaying the test data through Kafka into the consumer", flush=True)
            report = run_replay(ReplayOptions(
                dataset=opts.dataset, data_dir=opts.data_dir, entities=opts.entities,
                artifact_dir=artifact, out_dir=out / "replay", bootstrap_servers=bs,
                settings=settings,
            ))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
    print()
    print(ev.markdown.split("## Per entity")[0].strip())
    print()
    print(report.markdown)
    print(f"serve drained and exited with code {code}")
    print(f"\nevaluation report: {ev.out_dir / 'evaluation.md'}")
    print(f"replay report:     {report.out_dir / 'report.md'}")
    print(f"demo finished in {time.time() - t0:.0f} s")
    return 0 if (report.parity_ok and code == 0) else 1
