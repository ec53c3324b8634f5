"""Replay through the embedded broker: parity with offline scores, reports, root-cause check.

The console script is exercised as users run it (``python -m stream_detector.cli replay``), each
run starting its own embedded broker and consumer.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_detector.replay import T0_MS, interleave
from tests.conftest import shared_dataset

pytestmark = [pytest.mark.integration]


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "stream_detector.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def _check_report(out: Path, entities: list[str], limit: float = 1e-4) -> dict:
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert "not a blind test of the defaults" in md
    s = report["summary"]
    assert s["parity_ok"] is True and s["parity_max_abs"] <= limit
    assert [r["entity"] for r in report["entities"]] == entities
    assert s["windows_scored"] == sum(r["rows"] for r in report["entities"])
    for key in ("best_f1", "f1_at_threshold", "auc_pr", "pa_best_f1", "random_pa_best_f1"):
        assert key in report["entities"][0]
    assert s["throughput_readings_per_s"] > 0 and s["latency_ms"]["p99"] >= s["latency_ms"]["p50"]
    assert "parity" in md and "point adjust" in md and "## Alert episodes" in md
    for key in ("incident_recall", "episode_precision", "event_f1", "random_event_f1"):
        assert key in report["entities"][0] and key in s["mean"]
    for e in entities:
        png = out / f"{e}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny trained artifact for the replays of this module (they only read it)."""
    from tests.kafka_helpers import train_tiny

    return train_tiny(tmp_path_factory.mktemp("tiny") / "art")


def _assert_streamed_equals_offline(report: Any, art: Path, entities: list, skip: int = 0) -> None:
    """The streamed scores against ``offline.batch_score`` of the same artifact, computed here
    (not the report's own parity flag): at most 1e-4 apart on every test row from ``skip``."""
    from stream_detector.model.runtime import TorchScorer
    from stream_detector.offline import batch_score

    scorer = TorchScorer.load(art)
    assert sorted(report.data) == sorted(e.name for e in entities)
    for e in entities:
        streamed = np.asarray(report.data[e.name]["score"])
        ref = batch_score(scorer, scorer.manifest, e).score
        assert streamed.shape == ref.shape == (len(e.test),)
        np.testing.assert_allclose(streamed[skip:], ref[skip:], rtol=0, atol=1e-4,
                                   err_msg=f"{e.name}: streamed vs offline scores")


def test_interleave_orders_by_time_across_sensors() -> None:
    e, t = interleave({"a": np.zeros((3, 1)), "b": np.zeros((1, 1)), "c": np.zeros((2, 1))})
    assert list(zip(e.tolist(), t.tolist(), strict=True)) == [
        (0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]
    assert T0_MS > 0


@pytest.mark.slow
def test_replay_synthetic_from_scratch(tmp_path: Path) -> None:
    """A fresh clone: no artifact, no data directory; replay trains, streams, reports."""
    art, out = tmp_path / "art", tmp_path / "report"
    r = _cli("replay", "--dataset", "synthetic", "--entities", "sensor-000,sensor-003",
             "--artifact", str(art), "--train-if-missing", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    report = _check_report(out, ["sensor-000", "sensor-003"])
    # the generator knows which features it disturbed: root cause is checked, and beats chance
    rows = report["entities"]
    assert all(row["rc_alerts"] > 0 for row in rows)
    assert np.mean([row["hitrate_150"] for row in rows]) > 0.5
    # the alert episodes it raised catch the generator's incidents better than episodes of
    # the same lengths placed at random
    assert all(row["incidents"] > 0 for row in rows)
    assert np.mean([row["event_f1"] for row in rows]) > np.mean(
        [row["random_event_f1"] for row in rows])
    assert "parity" in r.stdout


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize(("dataset", "folder", "entities", "options"), [
    # 2 real SMD machines, with the long-term score term (off by default): the streamed
    # scores, the term included, equal the offline ones (the report's parity check)
    ("smd", "smd", "machine-1-1,machine-2-1", ["--set", "long_term_alpha=0.05"]),
    ("smap", "smap_msl", "P-1,S-1,E-1,E-2,A-1", []),     # 5 real SMAP channels
])
def test_replay_real_data(dataset: str, folder: str, entities: str, options: list[str],
                          tmp_path: Path) -> None:
    data = shared_dataset(folder)
    art, out = tmp_path / "art", tmp_path / "report"
    t = _cli("train", "--dataset", dataset, "--data-dir", str(data), "--entities", entities,
             "--out", str(art), "--quick", *options)
    assert t.returncode == 0, t.stderr[-3000:]
    if options:
        assert json.loads((art / "manifest.json").read_text())["score"]["long_term"]
        assert "long-term term: alpha 0.05, own figures for 2 sensor(s)" in t.stdout
    r = _cli("replay", "--dataset", dataset, "--data-dir", str(data), "--entities", entities,
             "--artifact", str(art), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    report = _check_report(out, entities.split(","))
    md = (out / "report.md").read_text()
    assert ("long-term term alpha 0.05" if options else "no long-term term") in md
    if dataset == "smd":  # interpretation_label gives the responsible metrics: HitRate reported
        assert all(np.isfinite(row["hitrate_100"]) for row in report["entities"]
                   if row["rc_alerts"] > 0)


def test_replay_refuses_artifact_of_other_dataset(tiny_artifact: Path, tmp_path: Path) -> None:
    from stream_detector.replay import ReplayError, ReplayOptions, run_replay

    art = tiny_artifact
    with pytest.raises(ReplayError, match="features"):
        run_replay(ReplayOptions(dataset="synthetic", artifact_dir=art, out_dir=tmp_path / "o",
                                 progress=False))


def test_replay_without_artifact_says_how_to_train(tmp_path: Path) -> None:
    r = _cli("replay", "--dataset", "synthetic", "--artifact", str(tmp_path / "none"),
             "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "--train-if-missing" in r.stderr and "stream-detector train" in r.stderr


# -- --rate pacing -----------------------------------------------------------------------------
class _FakeProducer:
    """Stands in for confluent_kafka.Producer: records when each reading leaves."""

    sent: list[float] = []
    polls = 0
    clock: Any = time.monotonic

    def __init__(self, conf: dict) -> None:
        type(self).conf = conf

    def produce(self, topic: str, key: bytes | None = None, value: bytes | None = None) -> None:
        type(self).sent.append(type(self).clock())

    def poll(self, timeout: float) -> int:
        type(self).polls += 1
        return 0

    def flush(self, timeout: float) -> int:
        return 0

    def list_topics(self, topic: str, timeout: float) -> None:
        type(self).connected = True


def _produce(monkeypatch: pytest.MonkeyPatch, n: int, rate: float, **kw: Any) -> list[float]:
    import confluent_kafka

    from stream_detector.replay import _producer_loop

    monkeypatch.setattr(confluent_kafka, "Producer", _FakeProducer)
    _FakeProducer.sent, _FakeProducer.polls = [], 0
    _FakeProducer.clock = kw.get("clock", time.monotonic)
    streams = [np.zeros((n, 2), np.float32)]
    errors: list[str] = []
    _producer_loop("x", "t", ["s"], streams, np.zeros(n, np.int64), np.arange(n), rate,
                   [np.zeros(n)], False, errors, **kw)
    assert not errors
    return list(_FakeProducer.sent)


def test_rate_paces_every_reading_not_bursts_of_1000(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake clock: each reading leaves at i / rate, after one sleep per reading."""
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    rate, n = 100.0, 250  # fewer than 1000 readings: they used to leave unpaced, at once
    sent = _produce(monkeypatch, n, rate, clock=lambda: now[0], sleep=sleep)
    assert len(sent) == n
    np.testing.assert_allclose(sent, np.arange(n) / rate, atol=1e-9)
    assert len(sleeps) == n and min(sleeps) > 0
    assert _FakeProducer.polls >= 4  # delivery reports are served while pacing (2.5 s)


def test_rate_behind_schedule_sends_without_sleeping(monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer slower than --rate never sleeps (and never busy-waits or sleeps ~0 s)."""
    from stream_detector.replay import MIN_SLEEP_S, _pace

    now = [0.0]
    sleeps: list[float] = []

    def clock() -> float:
        now[0] += 0.003  # every look at the clock costs 3 ms: slower than 1000/s
        return now[0]

    _produce(monkeypatch, 50, 1000.0, clock=clock, sleep=sleeps.append)
    assert sleeps == []
    assert not _pace(0, 1e6, 0.0, sleeps.append)  # 1 us ahead: not worth a sleep call
    assert _pace(0, 1e3, 0.0, sleeps.append) and sleeps == [pytest.approx(1e-3)]
    assert MIN_SLEEP_S <= 1e-3


def test_rate_spreads_a_short_real_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real clock: no reading leaves before its schedule (a lower bound: load cannot break it)."""
    rate, n = 200.0, 60
    sent = np.asarray(_produce(monkeypatch, n, rate))
    t = sent - sent[0]
    assert np.all(t >= np.arange(n) / rate - 2e-3), t[:5]
    assert t[-1] >= (n - 1) / rate - 2e-3


@pytest.mark.parametrize(("field", "value"), [
    ("rate", -5.0), ("rate", float("nan")), ("rate", float("inf")),
    ("max_parity_error", -1e-4), ("max_parity_error", float("nan")),
])
def test_replay_refuses_bad_rate_and_parity_limit(field: str, value: float,
                                                  tmp_path: Path) -> None:
    from stream_detector.replay import ReplayError, ReplayOptions, run_replay

    opts = ReplayOptions(dataset="synthetic", artifact_dir=tmp_path / "none",
                         out_dir=tmp_path / "o", progress=False, **{field: value})
    with pytest.raises(ReplayError, match=f"--{field.replace('_', '-')} must be"):
        run_replay(opts)


def test_replay_cli_negative_rate_is_a_usage_error(tmp_path: Path) -> None:
    r = _cli("replay", "--dataset", "synthetic", "--rate", "-5", "--artifact",
             str(tmp_path / "none"), "--out", str(tmp_path / "o"), timeout=120)
    assert r.returncode == 2
    assert "--rate must be" in r.stderr and "Traceback" not in r.stderr


# -- replaying into a running consumer -----------------------------------------------------------
def test_first_timestamp_starts_after_earlier_readings() -> None:
    from stream_detector.replay import STEP_MS, first_timestamp

    now = 1_800_000_000_123
    assert first_timestamp({}, now) == 1_800_000_000_000  # no earlier run: now, whole seconds
    assert first_timestamp({}, 5) == T0_MS
    later = now + 7_000_000
    assert first_timestamp({"a": now - 10, "b": later}, now) == later + STEP_MS
    assert first_timestamp({"a": T0_MS + 5_000}, now) == 1_800_000_000_000


@pytest.fixture(scope="module")
def tiny_long_term_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny artifact trained with the long-term score term."""
    from tests.kafka_helpers import train_tiny

    return train_tiny(tmp_path_factory.mktemp("tiny-lt") / "art", long_term_alpha=0.05)


def _deployment(kafka_broker, make_topic, art: Path, monkeypatch: pytest.MonkeyPatch,
                version: str | None = None):
    """A consumer of ``art`` on fresh topics of the test broker, as a deployment a replay with
    ``--bootstrap-servers`` meets (``version``: the model version it claims), and two tiny
    entities as the replayed dataset: ``(settings, entities, scorer, service)``; the caller
    starts and stops the service."""
    import dataclasses

    import stream_detector.datasets
    from stream_detector.consumer import DetectorService
    from stream_detector.model.runtime import TorchScorer
    from tests.kafka_helpers import settings_for, tiny_entities

    topics = {"input": make_topic(partitions=2), "alerts": make_topic(), "scores": make_topic(),
              "dlq": make_topic(), "group": f"g-{time.time_ns()}"}
    settings = settings_for(kafka_broker.bootstrap_servers, topics, art)
    entities = tiny_entities(2)
    monkeypatch.setattr(stream_detector.datasets, "load_dataset",
                        lambda name, data_dir=None, wanted=None: entities)
    scorer = TorchScorer.load(art)
    manifest = (scorer.manifest if version is None
                else dataclasses.replace(scorer.manifest, model_version=version))
    return settings, entities, scorer, DetectorService(settings, manifest, scorer,
                                                       serve_http=False)


@pytest.mark.parametrize("long_term", [False, True])
def test_replay_twice_into_one_running_consumer(kafka_broker, make_topic, tiny_artifact: Path,
                                                tiny_long_term_artifact: Path, long_term: bool,
                                                tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """``--bootstrap-servers`` twice against the same long-lived consumer: both runs are fully
    scored with parity (the second used to be rejected as late, then time out). With a
    long-term term the second run's first scores carry run 1's level, which fades: left out
    of the parity until it is below the limit (they failed it)."""
    from stream_detector.replay import ReplayOptions, run_replay

    art = tiny_long_term_artifact if long_term else tiny_artifact
    bs = kafka_broker.bootstrap_servers
    settings, entities, scorer, service = _deployment(kafka_broker, make_topic, art, monkeypatch)
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        reports = [run_replay(ReplayOptions(
            dataset="tiny", artifact_dir=art, out_dir=tmp_path / f"run{k}", bootstrap_servers=bs,
            settings=settings, plots=False, progress=False, idle_timeout_s=20))
            for k in (1, 2)]
    finally:
        service.stop()
        thread.join(30)
    n_test = sum(len(e.test) for e in entities)
    for rep in reports:
        assert rep.parity_ok, rep.max_parity_error
        assert rep.summary["windows_scored"] == n_test
        assert all(not np.isnan(d["score"]).any() for d in rep.data.values())
    # parity checked here, not taken from the report: run 1 on every row; run 2 continues the
    # consumer's sensor state, so its first k - 1 smoothed scores also average run 1's windows
    _assert_streamed_equals_offline(reports[0], art, entities)
    if not long_term:
        _assert_streamed_equals_offline(reports[1], art, entities,
                                        skip=int(scorer.manifest.score.smoothing) - 1)
    else:  # run 1's level in run 2's first scores, gone by the last 100 rows
        from stream_detector.offline import batch_score

        assert scorer.manifest.score.long_term is not None
        first = [abs(reports[1].data[e.name]["score"][0]
                     - batch_score(scorer, scorer.manifest, e).score[0]) for e in entities]
        assert max(first) > 1e-4
        _assert_streamed_equals_offline(reports[1], art, entities,
                                        skip=min(len(e.test) for e in entities) - 100)
    s1, s2 = reports[0].summary, reports[1].summary
    n_stream = max(len(e.test) for e in entities) + scorer.manifest.window - 1
    assert s2["t0_ms"] >= s1["t0_ms"] + n_stream * 1000  # after every reading of run 1
    assert s1["sensors_with_earlier_state"] == 0 and s2["sensors_with_earlier_state"] == 2
    assert "already had state" in reports[1].markdown
    dead = sum(s.value for s in service.metrics.dead_letters.collect()[0].samples
               if s.name.endswith("_total"))
    assert dead == 0


def test_replay_against_a_consumer_of_another_model_says_so_and_stops_producing(
        kafka_broker, make_topic, tiny_artifact: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A deployment serving another artifact was reported as a parity failure (exit 1) with
    its scores as this artifact's metrics; and a failed replay's producer went on producing
    into the deployment's input topic (review). Now: a ReplayError naming both versions, and
    the producer stopped."""
    from stream_detector.replay import ReplayError, ReplayOptions, run_replay

    bs = kafka_broker.bootstrap_servers
    settings, _, scorer, service = _deployment(kafka_broker, make_topic, tiny_artifact,
                                               monkeypatch, version="other-model-0001")
    thread = threading.Thread(target=service.run, daemon=True)
    thread.start()
    try:
        with pytest.raises(ReplayError, match="'other-model-0001'.*"
                           + scorer.manifest.model_version):
            run_replay(ReplayOptions(
                dataset="tiny", artifact_dir=tiny_artifact, out_dir=tmp_path / "r",
                bootstrap_servers=bs, settings=settings, plots=False, progress=False,
                idle_timeout_s=20, rate=200.0))
        assert not any(t.name == "replay-producer" and t.is_alive()
                       for t in threading.enumerate())
    finally:
        service.stop()
        thread.join(30)


def test_replay_fails_when_offline_reference_differs(tiny_artifact: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline scores 1e-3 off the stream (above the 1e-4 limit): parity is measured, so the
    report says FAILED and ``stream-detector replay`` exits 1 (docs/backtesting.md)."""
    import stream_detector.datasets
    import stream_detector.offline
    from stream_detector.cli import build_parser
    from tests.kafka_helpers import tiny_entities

    entities = tiny_entities(2)
    monkeypatch.setattr(stream_detector.datasets, "load_dataset",
                        lambda name, data_dir=None, wanted=None: entities)
    real = stream_detector.offline.batch_score

    def shifted(scorer: Any, manifest: Any, entity: Any) -> Any:
        ref = real(scorer, manifest, entity)
        return dataclasses.replace(ref, score=ref.score + 1e-3)

    # replay imports batch_score from stream_detector.offline when it runs: patch it there
    monkeypatch.setattr(stream_detector.offline, "batch_score", shifted)
    out = tmp_path / "report"
    args = build_parser().parse_args([
        "replay", "--dataset", "tiny", "--artifact", str(tiny_artifact), "--out", str(out),
        "--no-plots"])
    assert args.func(args) == 1  # the exit code of `stream-detector replay`
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert s["parity_ok"] is False
    assert s["parity_max_abs"] == pytest.approx(1e-3, rel=0.05)
    assert all(row["parity_max_abs"] > 1e-4 for row in report["entities"])
    assert "FAILED" in (out / "report.md").read_text()


def _replay_without_kafka(monkeypatch: pytest.MonkeyPatch, entities: list, art: Path,
                          out: Path, **extra: Any) -> Any:
    """``run_replay`` on ``entities`` with the Kafka round trip replaced by the offline scores
    (a perfect stream): everything after the stream runs as in a real replay."""
    import stream_detector.datasets
    import stream_detector.replay as replay
    from stream_detector.offline import batch_score

    def fake_stream(opts, manifest, scorer, names, streams, expected, n_ctx):
        by_name = {e.name: e for e in entities}
        out: dict[str, Any] = {"scores": [], "rec": [], "fc": []}
        for name, c in zip(names, n_ctx, strict=True):
            ref = batch_score(scorer, manifest, by_name[name])
            for key, arr in (("scores", ref.score), ("rec", ref.reconstruction),
                             ("fc", ref.forecast)):
                out[key].append(np.concatenate([np.full(c, np.nan), arr]))
        return {**out, "latency_ms": np.array([1.0]), "alerts": [], "duplicates": 0,
                "elapsed_s": 1.0, "service": {}, "t0_ms": T0_MS,
                "earlier_state": [False] * len(names), "warning_ratio": 1.0, **extra}

    monkeypatch.setattr(stream_detector.datasets, "load_dataset",
                        lambda name, data_dir=None, wanted=None: entities)
    monkeypatch.setattr(replay, "_stream", fake_stream)
    return replay.run_replay(replay.ReplayOptions(
        dataset="tiny", artifact_dir=art, out_dir=out, plots=False, progress=False))


def test_replay_random_baseline_depends_only_on_seed_and_entity(
        tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One RNG was shared across entities: an entity's random figures changed with the other
    entities selected and their order, and differed from evaluate's random baseline."""
    from stream_detector.baselines import run_baselines
    from stream_detector.metrics import entity_metrics
    from tests.kafka_helpers import tiny_entities

    a, b, c = tiny_entities(3)
    keys = ("random_best_f1", "random_pa_best_f1")
    figures: dict[str, list[tuple[float, ...]]] = {}
    for k, selection in enumerate(([a, b, c], [c, b, a], [b], [c])):
        rep = _replay_without_kafka(monkeypatch, selection, tiny_artifact, tmp_path / f"r{k}")
        assert rep.parity_ok
        for row in rep.rows:
            figures.setdefault(row["entity"], []).append(tuple(row[key] for key in keys))
    for e in (a, b, c):
        # evaluate's random baseline for this entity and seed (run_evaluation's figures)
        rnd = entity_metrics(run_baselines(e, ["random"], 0)["random"], e.labels, 0.995)
        expected = (rnd["best_f1"], rnd["pa_best_f1"])
        assert figures[e.name] == [expected] * len(figures[e.name]), e.name


def test_replay_report_shows_parity_error_in_scientific_notation(
        tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-entity table printed parity_max_abs with 3 decimals: 0.000 for every value,
    even one above the 1e-4 limit."""
    import stream_detector.replay as replay
    from stream_detector.manifest import read_manifest
    from tests.kafka_helpers import tiny_entities

    rep = _replay_without_kafka(monkeypatch, tiny_entities(2), tiny_artifact, tmp_path / "r")
    rows = [{**r, "parity_max_abs": err} for r, err in zip(rep.rows, (8.4e-13, 2.5e-4),
                                                            strict=True)]
    opts = replay.ReplayOptions(dataset="tiny", plots=False)
    md = replay._markdown(opts, rows, rep.summary, read_manifest(tiny_artifact), tmp_path)
    table = [line for line in md.splitlines() if line.startswith("| sensor-")]
    assert table[0].endswith("| 8.4e-13 |") and table[1].endswith("| 2.5e-04 |"), table


# -- plots ----------------------------------------------------------------------------------------
def test_alert_ranges_pair_open_and_resolve() -> None:
    from stream_detector.replay import STEP_MS, alert_ranges

    n_ctx, t0, n = 3, T0_MS + 5_000, 100

    def ev(kind: str, aid: str, start_row: int, row: int) -> dict:
        ms = t0 + (n_ctx + row) * STEP_MS
        return {"event": kind, "alert_id": aid, "sensor": "s", "window_end": ms,
                "episode_start": t0 + (n_ctx + start_row) * STEP_MS}

    alerts = [
        ev("open", "a", 5, 5), ev("update", "a", 5, 20), ev("resolve", "a", 5, 54),
        ev("resolve", "z", -2, 2),                  # opened before this run's first test row
        ev("open", "b", 70, 70), ev("resolve", "b", 70, 80),
        ev("open", "c", 95, 95),                    # still open at the end
    ]
    assert alert_ranges(alerts, n_ctx, n, t0) == [(0, 3), (5, 55), (70, 81), (95, 100)]
    assert alert_ranges([], n_ctx, n, t0) == []


def test_the_producer_connects_first_and_starts_on_go(monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock of a replay starts when its consumer has its partitions: the producer
    connects meanwhile (its own start-up would otherwise count as the first readings' latency)
    and sends nothing before ``go``; when the replay gives up first, it sends nothing at all."""
    import threading

    import confluent_kafka

    from stream_detector.replay import _producer_loop

    monkeypatch.setattr(confluent_kafka, "Producer", _FakeProducer)
    streams = [np.zeros((5, 2), np.float32)]
    for give_up in (False, True):
        _FakeProducer.sent, _FakeProducer.connected = [], False
        go, errors = threading.Event(), []
        th = threading.Thread(target=_producer_loop, args=(
            "x", "t", ["s"], streams, np.zeros(5, np.int64), np.arange(5), 0.0, [np.zeros(5)],
            False, errors), kwargs={"go": go})
        th.start()
        time.sleep(0.3)
        assert _FakeProducer.connected and _FakeProducer.sent == [] and th.is_alive()
        if give_up:
            errors.append("consumer failed")
        go.set()
        th.join(5)
        assert len(_FakeProducer.sent) == (0 if give_up else 5)


def test_waiting_for_the_assignment_ends_on_ready_failure_death_or_timeout() -> None:
    import threading
    from types import SimpleNamespace

    from stream_detector.replay import ReplayError, _wait_for_assignment

    alive = threading.Thread(target=time.sleep, args=(5,), daemon=True)
    alive.start()
    ready = SimpleNamespace(health=SimpleNamespace(ready=True), failure=None)
    _wait_for_assignment(ready, alive, 1.0)  # returns at once
    failed = SimpleNamespace(health=SimpleNamespace(ready=False), failure="broker gone")
    with pytest.raises(ReplayError, match="consumer failed: broker gone"):
        _wait_for_assignment(failed, alive, 1.0)
    waiting = SimpleNamespace(health=SimpleNamespace(ready=False), failure=None)
    with pytest.raises(ReplayError, match="not assigned its partitions within 0 s"):
        _wait_for_assignment(waiting, alive, 0.1)
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    with pytest.raises(ReplayError, match="stopped before it was assigned"):
        _wait_for_assignment(waiting, dead, 5.0)


def test_the_replay_producer_takes_the_deployments_client_settings(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a running deployment (--bootstrap-servers) the replay's own clients got only
    the address: a SASL/SSL cluster refused them. They get the deployment's common settings."""
    import confluent_kafka

    from stream_detector.config import KafkaSettings
    from stream_detector.replay import _producer_loop

    monkeypatch.setattr(confluent_kafka, "Producer", _FakeProducer)
    k = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                      sasl_username="u", sasl_password="p")
    conf = {**k.common(), "bootstrap.servers": "kafka:9093"}
    errors: list[str] = []
    _producer_loop("ignored", "t", ["s"], [np.zeros((2, 2), np.float32)],
                   np.zeros(2, np.int64), np.arange(2), 0.0, [np.zeros(2)], False, errors,
                   conf=conf)
    assert not errors
    got = _FakeProducer.conf
    assert got["bootstrap.servers"] == "kafka:9093" and got["security.protocol"] == "SASL_SSL"
    assert got["sasl.password"] == "p" and got["enable.idempotence"] is True


def test_parity_error_counts_a_nan_difference_as_a_failure() -> None:
    """A NaN difference (a null error field in a score record, a NaN in the offline
    reference) passed parity as 0: Python's max() of 0.0 and NaN is 0.0 (found in review)."""
    from stream_detector.replay import parity_error

    a, b = np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0 + 1e-6, 3.0])
    assert abs(parity_error((a, b)) - 1e-6) < 1e-12
    assert parity_error((a, a), (b, b)) == 0.0
    assert parity_error((np.array([]), np.array([]))) == 0.0
    nan = np.array([1.0, np.nan, 3.0])
    assert parity_error((a, a), (nan, a)) == math.inf
    assert parity_error((a, nan), (a, a)) == math.inf


def test_replay_f1_at_the_deployed_threshold_takes_the_warning_ratio(
        tiny_artifact: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Episodes open at score >= threshold x SD_DETECTOR__WARNING_RATIO; the report's F1 at
    the deployed threshold assumed a ratio of 1 (found in review)."""
    from stream_detector.metrics import entity_metrics
    from stream_detector.model.runtime import TorchScorer
    from stream_detector.offline import batch_score
    from tests.kafka_helpers import tiny_entities

    entities = tiny_entities(2)
    scorer = TorchScorer.load(tiny_artifact)
    for ratio in (1.0, 0.5):
        rep = _replay_without_kafka(monkeypatch, entities, tiny_artifact, tmp_path / f"r{ratio}",
                                    warning_ratio=ratio)
        for row, e in zip(rep.rows, entities, strict=True):
            ref = batch_score(scorer, scorer.manifest, e)
            want = entity_metrics(ref.score, e.labels, ref.threshold * ratio)["f1_at_threshold"]
            assert row["f1_at_threshold"] == pytest.approx(want, nan_ok=True), (ratio, e.name)
        # the report says at which level (it did not: review), as evaluate's differs
        assert json.loads((tmp_path / f"r{ratio}" / "report.json").read_text())[
            "summary"]["warning_ratio"] == ratio
        md = (tmp_path / f"r{ratio}" / "report.md").read_text()
        assert ("times 0.5 (SD_DETECTOR__WARNING_RATIO)" in md) is (ratio == 0.5)
    # the two ratios give different figures on these entities (the test can fail)
    one = _replay_without_kafka(monkeypatch, entities, tiny_artifact, tmp_path / "a",
                                warning_ratio=1.0)
    half = _replay_without_kafka(monkeypatch, entities, tiny_artifact, tmp_path / "b",
                                 warning_ratio=0.5)
    assert [r["f1_at_threshold"] for r in one.rows] != [r["f1_at_threshold"] for r in half.rows]
    # the plots draw the line where episodes open
    import stream_detector.plots as plots
    import stream_detector.replay as replay

    drawn: list[float] = []
    monkeypatch.setattr(plots, "plot_entity", lambda path, name, score, labels, thr, **kw:
                        drawn.append(thr))
    ref = batch_score(scorer, scorer.manifest, entities[0])
    replay._plots(tmp_path, {"x": {"score": ref.score, "ref": ref, "entity": entities[0],
                                   "episodes": []}}, 0.5, progress=False)
    assert drawn == [pytest.approx(0.5 * ref.threshold)]
