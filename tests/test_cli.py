"""The command line as users run it: exit codes, messages, files written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from stream_detector.cli import main
from stream_detector.errors import DatasetError


def _cli(*args: str, timeout: float = 300, env: dict[str, str] | None = None):
    return subprocess.run([sys.executable, "-m", "stream_detector.cli", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_config_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    from stream_detector.config import settings_reference

    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for env, *_ in settings_reference():
        assert f"`{env}`" in out


def test_config_effective_shows_this_environment_validated_and_masked(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`config` printed the defaults only; an operator checking what a pod runs with (and
    whether its ConfigMap parses) had to start serve. --effective reads the environment as
    serve does, masks secrets and exits 2 naming a bad variable."""
    from stream_detector.config import settings_reference

    monkeypatch.setenv("SD_DETECTOR__MAX_BATCH", "7")
    monkeypatch.setenv("SD_KAFKA__SASL_PASSWORD", "hunter2")
    monkeypatch.setenv("SD_KAFKA__EXTRA", '{"ssl.keystore.password": "pw9", "fetch.max.bytes": 5, '
                       '"sasl.oauthbearer.config": "principal=svc clientSecret=S3CR3T"}')
    assert main(["config", "--effective"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln[2:].split("=", 1)[0] for ln in lines] == [env for env, *_ in settings_reference()]
    assert "* SD_DETECTOR__MAX_BATCH=7" in lines and "  SD_DETECTOR__MAX_WAIT_MS=20.0" in lines
    assert "* SD_KAFKA__SASL_PASSWORD=**********" in lines
    assert "  SD_KAFKA__SSL_KEY_PASSWORD=" in lines  # unset secret: empty, not the default
    extra = next(ln for ln in lines if "SD_KAFKA__EXTRA=" in ln)
    assert extra.startswith("* ") and json.loads(extra.split("=", 1)[1]) == {
        "ssl.keystore.password": "**********", "fetch.max.bytes": 5,
        "sasl.oauthbearer.config": "**********"}  # JSON, as it is set
    out = "\n".join(lines)
    assert "hunter2" not in out and "pw9" not in out and "S3CR3T" not in out
    assert main(["config", "--changed"]) == 0  # --changed implies --effective
    changed = capsys.readouterr().out.splitlines()
    assert changed and all(ln.startswith("* ") for ln in changed)
    assert "* SD_DETECTOR__MAX_BATCH=7" in changed
    assert not any("MAX_WAIT_MS" in ln for ln in changed)
    r = _cli("config", "--effective", env={"SD_DETECTOR__MAX_BATCH": "0"})
    assert r.returncode == 2 and "SD_DETECTOR__MAX_BATCH" in r.stderr


def test_unknown_dataset_and_missing_artifact_exit_2(tmp_path: Path) -> None:
    r = _cli("train", "--dataset", "nope", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "unknown dataset" in r.stderr.lower()
    assert "smd" in r.stderr and "synthetic" in r.stderr
    r = _cli("check", "--artifact", str(tmp_path / "missing"))
    assert r.returncode == 2 and "missing" in r.stderr


def test_bad_setting_names_the_variable(tmp_path: Path) -> None:
    r = _cli("serve", "--artifact", str(tmp_path), env={"SD_DETECTOR__MAX_BATCH": "0"})
    assert r.returncode == 2
    assert "detector.max_batch (env SD_DETECTOR__MAX_BATCH)" in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("epochs=2.5", "epochs=2.5 must be an integer"),
        ("hidden=abc", "hidden='abc' must be an integer"),
        ("per_sensor_scales=maybe", "per_sensor_scales='maybe' must be true or false"),
        ("encoder=transformer", "encoder must be one of ['gru', 'lstm', 'tcn']"),
        ("threshold_method=bogus", "threshold_method must be 'quantile' or 'pot'"),
        ("threshold_q=1.5", "threshold_q must be in [0.5, 1)"),
        ("batch_size=0", "batch_size must be >= 1"),
        ("smoothing=0", "smoothing must be >= 1"),
        ("lr=-1", "lr must be finite and >= 0"),
        ("nosuch=1", "unknown training options ['nosuch']"),
        ("epochs", "--set expects KEY=VALUE"),
        # these ran into numpy / torch and ended in a traceback (found in review)
        ("seed=-1", "seed must be in [0, 2**32)"),
        ("seed=99999999999999999999", "seed must be in [0, 2**32)"),
        ("threads=100000", "threads must be in [0, 256]"),
    ],
)
def test_bad_training_options_are_refused_before_training(option, message, tmp_path,
                                                          capsys) -> None:
    """Each is refused at once with exit code 2 and the option named (before, most trained
    first and then crashed with a traceback, or trained with a silently different setting)."""
    out = tmp_path / "art"
    assert main(["train", "--dataset", "synthetic", "--set", option, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_boolean_training_options_read_words() -> None:
    from stream_detector.train import config_from_overrides

    for word, value in (("no", False), ("off", False), ("0", False), ("false", False),
                        ("yes", True), ("on", True), ("1", True), ("True", True)):
        cfg = config_from_overrides({"per_sensor_scales": word, "per_sensor_thresholds": word})
        assert cfg.per_sensor_scales is value and cfg.per_sensor_thresholds is value, word
    cfg = config_from_overrides({"epochs": 3.0, "lr": 1, "encoder": "gru", "smoothing": "8"})
    assert (cfg.epochs, cfg.lr, cfg.encoder, cfg.smoothing) == (3, 1, "gru", 8)


@pytest.fixture(scope="module")
def quick_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "art"
    r = _cli("train", "--dataset", "synthetic", "--entities", "sensor-000,sensor-001",
             "--out", str(out), "--quick")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "model_version" in r.stdout
    assert "input scaling: per sensor for 2 training sensor(s)" in r.stdout
    assert "which the network was also trained on (fleet_view)" in r.stdout
    assert "long-term term: off" in r.stdout
    return out


def test_train_check_evaluate(quick_artifact: Path, tmp_path: Path) -> None:
    r = _cli("check", "--artifact", str(quick_artifact))
    assert r.returncode == 0 and "artifact ok" in r.stdout
    assert "input scaling: per sensor for 2 training sensor(s)" in r.stdout
    out = tmp_path / "eval"
    r = _cli("evaluate", "--dataset", "synthetic", "--entities", "sensor-000,sensor-001",
             "--artifact", str(quick_artifact), "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "evaluation.json").read_text())
    assert set(report["summary"]) == {"model", "random", "pca", "iforest", "ridge",
                                      "ridge_matched"}
    md = (out / "evaluation.md").read_text()
    assert "ridge_matched: ridge forecaster, abs error smoothed as the model's score " \
        "(trailing mean of 4)" in md
    for method in report["summary"].values():
        assert 0.0 <= method["best_f1"] <= 1.0 and 0.0 <= method["auc_pr"] <= 1.0
    # the model's figures come from its scores: far above random scores on the same labels
    summary = report["summary"]
    assert summary["model"]["auc_pr"] > 2 * summary["random"]["auc_pr"]
    assert summary["model"]["best_f1"] > summary["random"]["best_f1"] + 0.2
    # and at the label-free threshold (best-F1 picks its threshold with the test labels)
    assert summary["model"]["f1_at_threshold"] > summary["random"]["f1_at_threshold"] + 0.2
    md = (out / "evaluation.md").read_text()
    assert "features, no long-term term)" in md
    assert "PA best-F1" in md and "random" in md
    # the defaults were chosen on these test sets: every report says so (found in review)
    assert "not a blind test of the defaults" in md
    assert list(out.glob("*.png"))


def test_evaluate_refuses_artifact_of_other_features(tmp_path: Path) -> None:
    from tests.kafka_helpers import train_tiny

    art = train_tiny(tmp_path / "tiny")
    r = _cli("evaluate", "--dataset", "synthetic", "--entities", "sensor-000",
             "--artifact", str(art), "--out", str(tmp_path / "e"))
    assert r.returncode == 2 and "features" in r.stderr


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "--entities names no entity"),
        (" , ,", "--entities names no entity"),
        ("sensor-000, sensor-001,sensor-000", "--entities names sensor-000 more than once"),
    ],
)
def test_entities_must_name_each_entity_once(value: str, message: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """An empty --entities meant "all entities"; a repeated name was counted twice in
    evaluate's mean and hung replay for two minutes. Both are refused (exit 2) by every command
    that takes --entities, before anything else (here the artifact is missing, the old error)."""
    from stream_detector.cli import _entities

    missing = str(tmp_path / "missing")
    for argv in (["evaluate", "--artifact", missing, "--out", str(tmp_path / "e")],
                 ["train", "--dataset", "nope", "--out", str(tmp_path / "t")]):
        assert main([*argv, "--entities", value]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
    r = _cli("replay", "--entities", value, "--artifact", missing, "--out", str(tmp_path / "r"),
             "--no-plots", timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    with pytest.raises(DatasetError, match="names"):  # datasets download uses the same parser
        _entities(value)
    assert _entities(None) is None and _entities(" a ,b,, ") == ["a", "b"]


def test_option_data_and_out_errors_come_before_torchs_import(tmp_path: Path) -> None:
    """Such a mistake was reported after torch's import (4-6 s here; train, demo, and evaluate
    with an unknown baseline or a missing artifact), now at once: options, --out, the data
    and the artifact's manifest are checked first."""
    afile = tmp_path / "report.md"
    afile.write_text("x")
    missing = str(tmp_path / "missing")
    commands = [
        ["train", "--set", "epochs=0"],
        ["train", "--set", "encoder=rnn"],
        ["train", "--dataset", "synthetic", "--out", str(afile)],
        ["train", "--dataset", "smd", "--data-dir", missing, "--out", str(tmp_path / "a")],
        ["evaluate", "--baselines", "nope", "--out", str(tmp_path / "e1")],
        ["evaluate", "--artifact", missing, "--out", str(tmp_path / "e2")],
        ["demo", "--artifact", missing, "--out", str(afile)],
        ["replay", "--artifact", missing, "--out", str(tmp_path / "r")],
    ]
    code = ("import sys, json\n"
            "from stream_detector.cli import main\n"
            "codes = [main(a) for a in json.loads(sys.argv[1])]\n"
            "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules}))\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps(commands)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.splitlines()[-1])
    assert got["codes"] == [2] * len(commands), r.stderr[-3000:]
    assert not got["torch"]
    for text in ("epochs must be >= 1", "encoder must be one of ['gru', 'lstm', 'tcn']",
                 "is an existing file", "unknown baseline(s) ['nope']", "does not exist"):
        assert text in r.stderr, text
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "e1").exists()


def test_sigterm_while_serve_loads_stops_it_at_once(quick_artifact: Path, monkeypatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """As a container's PID 1, serve ignored a SIGTERM that came while it imported torch and
    loaded the model (no handler yet: the kernel drops it), joined the group and was killed at
    the grace period without leaving it. Until the service's handlers are in place, SIGTERM
    now ends the load at once with 0 (nothing consumed, nothing to drain)."""
    import stream_detector.consumer as consumer
    from stream_detector.model.runtime import TorchScorer

    class Outer(Exception):
        pass

    def outer(signum, frame):  # what this process had before: back once serve returns
        raise Outer

    def slow_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("the load was not interrupted")

    def no_service(*args, **kwargs):
        raise AssertionError("a service was built after the SIGTERM")

    old = signal.signal(signal.SIGTERM, outer)
    try:
        monkeypatch.setattr(TorchScorer, "load", slow_load)
        monkeypatch.setattr(consumer, "DetectorService", no_service)
        t0 = time.monotonic()
        assert main(["serve", "--artifact", str(quick_artifact)]) == 0
        assert time.monotonic() - t0 < 4
        assert "stopped before start" in capsys.readouterr().err  # the log line
        assert signal.getsignal(signal.SIGTERM) is outer
    finally:
        signal.signal(signal.SIGTERM, old)


def test_an_out_directory_that_cannot_be_written_is_refused_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An existing directory this user cannot write into (a shared volume whose owner the
    pod's fsGroup did not change) passed the --out check; train failed at its first write,
    after the whole training. /proc is such a directory for every user (root included);
    a read-only one by mode too where the tests do not run as root."""
    targets = [Path("/proc")] if Path("/proc/self").is_dir() else []
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() != 0:
        targets.append(ro)
    if not targets:
        pytest.skip("no directory here that this user cannot write into")
    for target in targets:
        assert main(["train", "--dataset", "synthetic", "--out", str(target)]) == 2
        err = capsys.readouterr().err
        assert f"--out {target}: cannot write into the artifact directory" in err, err
        assert main(["evaluate", "--artifact", str(tmp_path / "none"), "--out",
                     str(target)]) == 2
        assert "cannot write into the report directory" in capsys.readouterr().err
    assert list(ro.iterdir()) == []


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    """evaluate, replay and demo crashed with a FileExistsError traceback and exit code 1
    (replay's code for failed parity)."""
    afile = tmp_path / "report.md"
    afile.write_text("not a directory")
    missing = str(tmp_path / "missing")  # checked after --out: the --out error comes first
    for cmd in (["evaluate"], ["replay", "--no-plots"], ["demo"]):
        for out, message in ((afile, "is an existing file, not a directory"),
                             (afile / "sub", "cannot create the report directory")):
            r = _cli(*cmd, "--artifact", missing, "--out", str(out), timeout=60)
            assert r.returncode == 2, (cmd, r.stderr[-2000:])
            assert f"--out {out}" in r.stderr and message in r.stderr, (cmd, r.stderr[-2000:])
            assert "Traceback" not in r.stderr
    assert afile.read_text() == "not a directory"
    # train: before loading data or training (the error used to come after the training)
    for out, message in ((afile, "is an existing file, not a directory: pass a directory for "
                                 "the artifact"),
                         (afile / "sub", "cannot create the artifact directory")):
        r = _cli("train", "--dataset", "synthetic", "--data-dir", missing, "--out", str(out),
                 timeout=60)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, (
            r.stderr[-2000:])


def test_replay_against_an_unreachable_broker_exits_2_not_1(quick_artifact: Path,
                                                           tmp_path: Path) -> None:
    """Exit code 1 means failed parity: a wrong broker address must not read as one."""
    r = _cli("replay", "--dataset", "synthetic", "--artifact", str(quick_artifact),
             "--entities", "sensor-000", "--bootstrap-servers", "127.0.0.1:1", "--no-plots",
             "--out", str(tmp_path / "r"), timeout=120,
             env={"SD_KAFKA__SCORE_TOPIC": "scores"})
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Kafka error talking to 127.0.0.1:1" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_refuses_a_data_dir_without_entities(quick_artifact: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """--dataset smd with the SMAP/MSL directory (train/, test/, no SMD machine) exited 0 with
    an all-n/a report; replay already refused it."""
    data = tmp_path / "smap_msl"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    out = tmp_path / "e"
    assert main(["evaluate", "--dataset", "smd", "--data-dir", str(data), "--artifact",
                 str(quick_artifact), "--out", str(out), "--no-plots"]) == 2
    assert f"dataset 'smd' has no entities in {data}" in capsys.readouterr().err
    assert not (out / "evaluation.md").exists()


@pytest.mark.parametrize("baselines", [["pca"], []])
def test_evaluate_always_reports_the_random_baseline(quick_artifact: Path, tmp_path: Path,
                                                     baselines: list[str]) -> None:
    """Point-adjusted F1 is never shown without the random baseline's, whatever --baselines
    lists (``--baselines pca`` or an empty list left it out)."""
    from stream_detector.evaluation import run_evaluation

    res = run_evaluation("synthetic", None, ["sensor-000", "sensor-001"], quick_artifact,
                         tmp_path / "e", baselines=baselines, plots=False, progress=False)
    assert list(res.summary) == ["model", "random", *baselines]
    assert 0.0 <= res.summary["random"]["pa_best_f1"] <= 1.0
    assert all(0.0 <= r["random_pa_best_f1"] <= 1.0 for r in res.rows)
    md = res.markdown
    assert "\n| random | " in md and "random PA best-F1 |" in md
    # per entity, the model's PA best-F1 is followed by the random one
    row = next(line for line in md.splitlines() if line.startswith("| sensor-000 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[7] == f"{res.rows[0]['random_pa_best_f1']:.3f}"
    report = json.loads((tmp_path / "e" / "evaluation.json").read_text())
    assert "random" in report["summary"]


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ({"a": 0.3}, ["best-a"]),
        ({"a": 0.3, "b": 0.6}, ["worst-a", "best-b"]),
        ({"a": 0.3, "b": 0.6, "c": 0.4}, ["worst-a", "best-b", "best-c"]),
        ({"a": 0.3, "b": 0.6, "c": 0.4, "d": float("nan"), "e": 0.9, "f": 0.1},
         ["worst-f", "worst-a", "best-e", "best-b"]),
    ],
)
def test_evaluate_plots_never_call_the_best_entity_worst(
        scores: dict[str, float], expected: list[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With two or fewer entities every plot was named worst-*, the best entity included."""
    from types import SimpleNamespace

    import numpy as np

    import stream_detector.plots
    from stream_detector.datasets import Entity
    from stream_detector.evaluation import _plots

    made: list[tuple[str, str]] = []
    monkeypatch.setattr(stream_detector.plots, "plot_entity",
                        lambda path, name, *a, title, **k: made.append((path.stem, title)))
    data = [Entity(n, np.zeros((4, 1)), np.zeros((4, 1)), np.zeros(4, np.int8), ("x",))
            for n in scores]
    rows = [{"entity": n, "best_f1": f} for n, f in scores.items()]
    kept = {n: {"model": np.zeros(4)} for n in scores}
    manifest = SimpleNamespace(thresholds=SimpleNamespace(for_sensor=lambda name: 1.0))
    md = _plots(tmp_path, data, rows, kept, manifest, [])
    assert [stem for stem, _ in made] == expected
    for stem, title in made:
        kind, name = stem.split("-", 1)
        assert title.startswith(f"{name} ({kind}): best-F1 {scores[name]:.3f}")
        assert f"({stem}.png)" in md


@pytest.mark.integration
def test_dev_broker_runs_until_sigterm(tmp_path: Path) -> None:
    """It creates the topics the settings name (serve waited for its input topic, and a
    producer's auto-created one got the broker's default partitions), then runs until SIGTERM."""
    ready = tmp_path / "ready"
    env = {**os.environ, "SD_KAFKA__INPUT_TOPIC": "dev-in", "SD_KAFKA__ALERT_TOPIC": "dev-alerts",
           "SD_KAFKA__DEAD_LETTER_TOPIC": "dev-dlq", "SD_KAFKA__SCORE_TOPIC": ""}
    with subprocess.Popen([sys.executable, "-m", "stream_detector.cli", "dev-broker",
                           "--ready-file", str(ready), "--partitions", "3"],
                          stdout=subprocess.PIPE, text=True, env=env) as proc:
        try:
            t0 = time.monotonic()
            while not ready.exists() and time.monotonic() - t0 < 30:
                time.sleep(0.1)
            bootstrap = ready.read_text().strip()
            from confluent_kafka.admin import AdminClient

            meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10)
            assert {t: len(m.partitions) for t, m in meta.topics.items()
                    if t.startswith("dev-")} == {"dev-in": 3, "dev-alerts": 1, "dev-dlq": 1}
        finally:
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
        assert proc.returncode == 0
    assert not ready.exists()
    assert bootstrap in out


def test_unknown_baseline_is_a_clear_error(quick_artifact: Path, tmp_path: Path) -> None:
    r = _cli("evaluate", "--dataset", "synthetic", "--entities", "sensor-000",
             "--artifact", str(quick_artifact), "--out", str(tmp_path / "e"),
             "--baselines", "random,lstm")
    assert r.returncode == 2
    assert "unknown baseline" in r.stderr and "'lstm'" in r.stderr and "ridge" in r.stderr


def test_bad_training_options_are_clear_errors(tmp_path: Path) -> None:
    """Each is refused before training starts, with exit code 2 and no traceback."""
    cases = [
        (["--set", "window=1"], "invalid training option: window must be in [3, 10,000]"),
        (["--set", "windw=16"], "unknown training options ['windw']"),
        (["--set", "score_features=nope"], "score_features ['nope'] are not features"),
    ]
    for extra, message in cases:
        r = _cli("train", "--dataset", "synthetic", "--quick", "--out", str(tmp_path / "a"),
                 *extra)
        assert r.returncode == 2, (extra, r.stderr[-500:])
        assert message in r.stderr and "Traceback" not in r.stderr, (extra, r.stderr[-500:])


def test_demo_runs_the_whole_job_end_to_end(tmp_path: Path) -> None:
    """The README's first command (``make demo`` runs exactly this, with default paths): its
    own broker, training, evaluation, serve in a subprocess, replay through Kafka, reports."""
    out, art = tmp_path / "demo", tmp_path / "artifact"
    res = _cli("demo", "--artifact", str(art), "--out", str(out), "--epochs", "2", timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "-> **OK**" in res.stdout  # stream vs offline parity
    assert "serve drained and exited with code 0" in res.stdout
    for report in ("evaluation/evaluation.md", "evaluation/evaluation.json", "replay/report.md",
                   "replay/report.json", "serve.log"):
        assert (out / report).is_file(), report
    assert (art / "manifest.json").is_file() and (art / "model.pt").is_file()
    # the replay began after the consumer joined its group (the demo waits for /readyz), so
    # its latency figures time scoring, not the group join
    serve = [json.loads(line) for line in (out / "serve.log").read_text().splitlines()
             if line.startswith("{")]
    assigned = next(e["timestamp"] for e in serve if e["event"] == "assigned")
    started = next(line.split()[0] for line in (res.stdout + res.stderr).splitlines()
                   if "] replay " in line)
    assert assigned < started
    replay = (out / "replay" / "report.md").read_text()
    assert "16,000 windows scored through Kafka" in replay


def test_embedded_broker_is_not_fooled_by_another_listener_on_its_port(monkeypatch) -> None:
    """A port another process holds answered the readiness probe (tansu itself had failed to
    bind and exited, with code 0): callers went on against the wrong broker."""
    import socket

    import stream_detector.devbroker as devbroker
    from stream_detector.devbroker import BrokerError, EmbeddedBroker

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BrokerError, match=f"port {port} is already in use"):
            EmbeddedBroker(port).start(timeout=15)
        # a port picked automatically and taken before tansu bound it: picked again
        picks = iter([port])
        real = devbroker.free_port
        monkeypatch.setattr(devbroker, "free_port", lambda: next(picks, None) or real())
        broker = EmbeddedBroker()
        assert broker.port == port
        with broker:
            assert broker.port != port and broker.running


def test_embedded_broker_removes_its_temporary_log_after_a_clean_stop() -> None:
    from stream_detector.devbroker import EmbeddedBroker

    broker = EmbeddedBroker().start()
    log = broker._log_path
    assert log is not None and log.exists()
    broker.stop()
    assert not log.exists() and not broker.running


def _tansu_children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)
            name = fields[0].split("(", 1)[1]
            ppid = int(fields[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and name.startswith("tansu"):
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_replay_stops_its_broker_when_terminated(quick_artifact: Path, tmp_path: Path) -> None:
    """SIGTERM (a cancelled CI job, `kill`) used to end the process at once, leaving its
    embedded broker running forever; now it unwinds like Ctrl-C and stops the broker."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_detector.cli", "replay", "--dataset", "synthetic",
         "--entities", "sensor-000", "--artifact", str(quick_artifact), "--rate", "20",
         "--no-plots", "--out", str(tmp_path / "r")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        brokers: list[int] = []
        while not brokers and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            brokers = _tansu_children(proc.pid)
        assert brokers, "the replay did not start its broker"
        time.sleep(1.0)  # well inside the replay: producing at 20 readings/s
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130
        deadline = time.monotonic() + 10
        while Path(f"/proc/{brokers[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{brokers[0]}").exists(), "the broker outlived the replay"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _held_out_fit(e, baseline: str) -> tuple[np.ndarray, int]:
    """The baseline fitted on the first 80 % of ``e``'s train rows, scoring the last 20 % and
    then the test rows (recomputed here, independently of evaluation.baseline_label_free)."""
    from stream_detector.baselines import run_baselines
    from stream_detector.datasets.base import Entity

    n_val = int(len(e.train) * 0.2)
    after = np.concatenate([e.train[-n_val:], e.test])
    proxy = Entity(e.name, e.train[:-n_val], after, np.zeros(len(after), np.int8), e.features)
    return run_baselines(proxy, [baseline], 0)[baseline], n_val


def test_baseline_label_free_f1_uses_the_fit_its_threshold_came_from(quick_artifact: Path,
                                                                    tmp_path: Path) -> None:
    """A baseline's label-free threshold is a quantile of the scores of the baseline fitted on
    the first 80 % of the train rows; it was applied to the test scores of *another* fit (all
    train rows), whose scale differs (IsolationForest on SMD machine-2-8: 0.423 reported, 0.744
    with threshold and scores of one fit). Checked against an independent recomputation."""
    from stream_detector.baselines import run_baselines
    from stream_detector.datasets import load_dataset
    from stream_detector.evaluation import run_evaluation
    from stream_detector.metrics import f1_at

    names = ["sensor-000", "sensor-001"]
    res = run_evaluation("synthetic", None, names, quick_artifact, tmp_path / "e",
                         baselines=["pca", "iforest"], plots=False, progress=False)
    differs = 0
    for e, row in zip(load_dataset("synthetic", None, names), res.rows, strict=True):
        for b in ("pca", "iforest"):
            s, n_val = _held_out_fit(e, b)
            want = f1_at(s[n_val:], e.labels, float(np.quantile(s[:n_val], 0.995)))["f1"]
            assert row[f"{b}_f1_at_threshold"] == pytest.approx(want, abs=1e-12), (e.name, b)
            full = run_baselines(e, [b], 0)[b]  # the other fit, which best-F1 still uses
            old = f1_at(full, e.labels, float(np.quantile(s[:n_val], 0.995)))["f1"]
            differs += abs(old - want) > 1e-6
    assert differs  # the two fits do give different operating points here


def test_baseline_thresholds_follow_the_artifacts_rule(quick_artifact: Path,
                                                      tmp_path: Path) -> None:
    """An artifact trained with threshold_method=pot (or a threshold_margin) had its F1 at the
    label-free threshold compared with baselines thresholded by the plain quantile: now every
    baseline's threshold comes from the artifact's rule, recomputed here independently."""
    import shutil

    from stream_detector.baselines import run_baselines
    from stream_detector.datasets import load_dataset
    from stream_detector.evaluation import run_evaluation
    from stream_detector.metrics import f1_at
    from stream_detector.scoring import fit_threshold

    art = tmp_path / "pot"
    shutil.copytree(quick_artifact, art)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["training"]["config"].update(threshold_method="pot", threshold_margin=1.3)
    (art / "manifest.json").write_text(json.dumps(manifest))
    names = ["sensor-000", "sensor-001"]
    res = run_evaluation("synthetic", None, names, art, tmp_path / "e",
                         baselines=["pca", "iforest"], plots=False, progress=False)
    moved = 0
    for e, row in zip(load_dataset("synthetic", None, names), res.rows, strict=True):
        for b in ("pca", "iforest"):
            s, n_val = _held_out_fit(e, b)
            want = f1_at(s[n_val:], e.labels, fit_threshold(s[:n_val], "pot", 0.995, 1.3))["f1"]
            assert row[f"{b}_f1_at_threshold"] == pytest.approx(want, abs=1e-12), (e.name, b)
            plain = f1_at(s[n_val:], e.labels, float(np.quantile(s[:n_val], 0.995)))["f1"]
            moved += abs(plain - want) > 1e-6
        rnd = run_baselines(e, ["random"], 0)["random"]
        assert row["random_f1_at_threshold"] == pytest.approx(
            f1_at(rnd, e.labels, 0.995 * 1.3)["f1"], abs=1e-12)
    assert moved  # the rule changes the operating points here


def test_matched_ridge_takes_the_artifacts_smoothing(tmp_path: Path) -> None:
    """``ridge_matched`` is smoothed as the artifact's score is: k from its manifest, not the
    default 4."""
    from stream_detector.baselines import ridge_matched_scores
    from stream_detector.datasets import load_dataset
    from stream_detector.evaluation import baseline_label_free, run_evaluation
    from stream_detector.metrics import f1_at

    art = tmp_path / "art"
    r = _cli("train", "--dataset", "synthetic", "--entities", "sensor-000", "--out", str(art),
             "--quick", "--set", "smoothing=2")
    assert r.returncode == 0, r.stderr[-2000:]
    res = run_evaluation("synthetic", None, ["sensor-000"], art, tmp_path / "e",
                         baselines=["ridge_matched"], plots=False, progress=False)
    e = load_dataset("synthetic", None, ["sensor-000"])[0]
    got = res.scores["sensor-000"]["ridge_matched"]
    np.testing.assert_array_equal(got, ridge_matched_scores(e, smoothing=2))
    assert not np.allclose(got, ridge_matched_scores(e, smoothing=4))
    assert "(trailing mean of 2)" in res.markdown
    # its label-free threshold comes from the same smoothing (held-out fit, as for all baselines)
    thr, held_out = baseline_label_free(e, "ridge_matched", 0.995, 0.2, smoothing=2)
    assert held_out is not None
    want = f1_at(held_out, e.labels, thr)["f1"]
    assert res.rows[0]["ridge_matched_f1_at_threshold"] == pytest.approx(want, abs=1e-12)
    thr4, held4 = baseline_label_free(e, "ridge_matched", 0.995, 0.2, smoothing=4)
    assert held4 is not None and f1_at(held4, e.labels, thr4)["f1"] != pytest.approx(want)


def test_evaluate_removes_the_plots_of_an_earlier_run_into_its_folder(quick_artifact: Path,
                                                                      tmp_path: Path) -> None:
    """Evaluating other entities into the same --out left the earlier run's best-/worst-
    plots beside the new report, as if they were its own."""
    from stream_detector.evaluation import run_evaluation

    out = tmp_path / "e"
    run_evaluation("synthetic", None, ["sensor-000", "sensor-001"], quick_artifact, out,
                   baselines=[], progress=False)
    first = sorted(p.name for p in out.glob("*.png"))
    assert any("sensor-001" in n for n in first)
    run_evaluation("synthetic", None, ["sensor-000"], quick_artifact, out, baselines=[],
                   progress=False)
    assert sorted(p.name for p in out.glob("*.png")) == ["best-sensor-000.png"]
    assert "best-sensor-000.png" in (out / "evaluation.md").read_text()
    # with plots off too (they used to be cleaned only when this run plotted)
    (out / "notes.png").write_bytes(b"not ours")
    run_evaluation("synthetic", None, ["sensor-001"], quick_artifact, out, baselines=[],
                   progress=False, plots=False)
    assert sorted(p.name for p in out.glob("*.png")) == ["notes.png"]


def test_replay_removes_the_plots_of_an_earlier_replay_into_its_folder(quick_artifact: Path,
                                                                       tmp_path: Path) -> None:
    from stream_detector.replay import ReplayOptions, run_replay

    out = tmp_path / "r"
    run_replay(ReplayOptions(dataset="synthetic", entities=["sensor-000", "sensor-001"],
                             artifact_dir=quick_artifact, out_dir=out, progress=False))
    assert sorted(p.name for p in out.glob("*.png")) == ["sensor-000.png", "sensor-001.png"]
    (out / "notes.png").write_bytes(b"not ours")
    run_replay(ReplayOptions(dataset="synthetic", entities=["sensor-002"], plots=False,
                             artifact_dir=quick_artifact, out_dir=out, progress=False))
    assert sorted(p.name for p in out.glob("*.png")) == ["notes.png"]


def test_input_scaling_line_says_whether_unseen_sensors_were_trained_for() -> None:
    """`train` and `check` say how an unseen sensor is scaled and whether the network saw rows
    scaled that way (fleet_view, the default since 2026-11-26; older artifacts have no key)."""
    from types import SimpleNamespace

    from stream_detector.cli import _scaling

    own = {"a": {}, "b": {}}
    for config, trained in (({"fleet_view": True}, True), ({"fleet_view": False}, False),
                            ({}, False)):
        line = _scaling(SimpleNamespace(scaler_per_sensor=own, training={"config": config}))
        assert line.startswith("per sensor for 2 training sensor(s)")
        assert ("also trained on (fleet_view)" in line) is trained
        assert ("unseen in training detect worse" in line) is not trained
    assert _scaling(SimpleNamespace(scaler_per_sensor={}, training={})).startswith("global")


def test_datasets_list_names_a_datasets_entities_and_refuses_what_it_cannot_list(
        tmp_path: Path) -> None:
    """`datasets list` used to ignore its dataset name and exit 0 on any error."""
    r = _cli("datasets", "list", "synthetic", timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["synthetic: built in, 8 entities",
                                     ",".join(f"sensor-{i:03d}" for i in range(8))]
    for args, message in ((["foo"], "unknown dataset 'foo'"),
                          (["smd", "--data-dir", str(tmp_path)], "not an SMD directory"),
                          (["--data-dir", str(tmp_path)], "--data-dir needs the dataset"),
                          (["smd", "--entities", "machine-1-1"], "--entities selects"),
                          (["synthetic", "--data-dir", str(tmp_path)], "leave out --data-dir"),
                          (["smd", "--to", str(tmp_path)], "--to is where")):
        r = _cli("datasets", "list", *args, timeout=60)
        assert r.returncode == 2 and message in r.stderr, (args, r.stderr)
    r = _cli("datasets", "list", timeout=60)
    assert r.returncode == 0 and "synthetic  built in" in r.stdout
    r = _cli("datasets", "download", "--data-dir", str(tmp_path), timeout=60)
    assert r.returncode == 2 and "--data-dir is for datasets list" in r.stderr, r.stderr
    afile = tmp_path / "afile"  # --to naming a file: a message, not a traceback
    afile.write_text("x")
    r = _cli("datasets", "download", "smd", "--to", str(afile), "--entities", "machine-1-1",
             timeout=60)
    assert r.returncode == 2 and "is an existing file" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_failed_command_removes_the_empty_out_folders_it_created(tmp_path: Path) -> None:
    """train and evaluate create --out before they load anything, and left it behind, empty,
    when the data or the artifact was then refused; a folder that was there stays."""
    out = tmp_path / "new" / "art"
    r = _cli("train", "--dataset", "synthetic", "--data-dir", str(tmp_path / "nope"),
             "--out", str(out), timeout=60)
    assert r.returncode == 2 and "leave out --data-dir" in r.stderr, r.stderr
    assert not (tmp_path / "new").exists()
    r = _cli("evaluate", "--artifact", str(tmp_path / "nope"), "--out", str(tmp_path / "e"),
             timeout=60)
    assert r.returncode == 2 and not (tmp_path / "e").exists(), r.stderr
    (tmp_path / "kept").mkdir()
    r = _cli("evaluate", "--artifact", str(tmp_path / "nope"), "--out", str(tmp_path / "kept"),
             timeout=60)
    assert r.returncode == 2 and (tmp_path / "kept").is_dir()
    # a path through a missing folder back to an existing one names nothing new
    r = _cli("evaluate", "--artifact", str(tmp_path / "nope"),
             "--out", str(tmp_path / "missing" / ".." / "kept"), timeout=60)
    assert r.returncode == 2 and (tmp_path / "kept").is_dir()


def test_full_backtest_passes_training_options_and_output_folders(tmp_path: Path) -> None:
    """scripts/full_backtest.sh (make backtest): TRAIN_SET reaches every train call as --set,
    ARTIFACTS / REPORTS name the folders every command uses; without them, the defaults."""
    root = Path(__file__).resolve().parents[1]
    log = tmp_path / "calls.txt"
    stub = tmp_path / "stub"
    stub.write_text(f'#!/usr/bin/env bash\necho "$(basename "$0") $*" >> {log}\n')
    stub.chmod(0o755)
    rp = tmp_path / "replay"
    rp.symlink_to(stub)
    env = {**os.environ, "SD": str(stub), "RP": str(rp),
           "TRAIN_SET": "long_term_alpha=0.05 epochs=2", "ARTIFACTS": "art/lt",
           "REPORTS": "rep/lt"}
    r = subprocess.run(["bash", str(root / "scripts/full_backtest.sh"), str(tmp_path / "data")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    calls = log.read_text().splitlines()
    trains = [c for c in calls if " train " in f" {c} "]
    assert len(trains) == 5 and len(calls) == 15
    for c in trains:
        assert c.endswith("--set long_term_alpha=0.05 --set epochs=2"), c
        assert "--out art/lt/" in c
    assert all("--artifact art/lt/" in c for c in calls if c not in trains)
    assert {c.split("--out ")[1] for c in calls if c not in trains} == {
        f"rep/lt/{kind}-{ds}" for kind in ("evaluation", "replay")
        for ds in ("synthetic", "smd", "smap", "msl", "nab")}
    assert f"--data-dir {tmp_path / 'data'}/smd" in "\n".join(calls)
    log.unlink()
    env = {k: v for k, v in env.items() if k not in ("TRAIN_SET", "ARTIFACTS", "REPORTS")}
    r = subprocess.run(["bash", str(root / "scripts/full_backtest.sh")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    calls = log.read_text().splitlines()
    assert not any("--set" in c for c in calls)
    assert "train --dataset synthetic --out artifacts/synthetic" in calls[0]
    assert calls[1].endswith("--artifact artifacts/synthetic --out reports/evaluation-synthetic")


def test_check_http_and_serve_threads_refuse_bad_values_with_exit_2() -> None:
    """`check --http not-a-url` printed a traceback; `serve --threads 1000` started although
    SD_SERVICE__TORCH_THREADS=1000 is refused."""
    r = _cli("check", "--http", "HTTP://127.0.0.1:9/readyz", timeout=60)  # any case: a URL
    assert r.returncode == 1 and r.stdout.startswith("FAIL HTTP://"), (r.stdout, r.stderr)
    r = _cli("check", "--http", "not-a-url", timeout=60)
    assert r.returncode == 2 and "--http takes an http:// or https:// URL" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    r = _cli("serve", "--threads", "1000", timeout=60)
    assert r.returncode == 2 and "must be at most 256" in r.stderr, r.stderr


def test_review_findings_of_the_command_line(quick_artifact: Path, tmp_path: Path,
                                             monkeypatch, capsys) -> None:
    """Found in a newcomer's review: each used to end in a traceback, the wrong folder or a
    misleading exit code."""
    import shutil

    import orjson

    # train's default --out is artifacts/DATASET (it was artifacts/model, where nothing else
    # looked), and evaluate looks there; the dataset name is the registry's spelling
    monkeypatch.chdir(tmp_path)
    from stream_detector.cli import build_parser

    args = build_parser().parse_args(["train", "--dataset", " SMD "])
    assert args.dataset == "smd" and args.out is None
    assert main(["evaluate", "--dataset", "Synthetic"]) == 2
    assert "artifacts/synthetic" in capsys.readouterr().err
    # demo --epochs: at least 1 (0 was ignored, -1 a traceback)
    for bad in ("0", "-1"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["demo", "--epochs", bad])
        assert exc.value.code == 2
    # check --http with a URL urllib cannot open
    assert main(["check", "--http", "http://[::1"]) == 2
    assert "is not a valid URL" in capsys.readouterr().err
    # a .env in UTF-16 (PowerShell's `echo > .env`): exit 2 naming the problem, not exit 1
    (tmp_path / ".env").write_text("SD_SERVICE__HTTP_PORT=9000\n", encoding="utf-16")
    assert main(["config", "--effective"]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    (tmp_path / ".env").unlink()
    # an artifact whose version cannot be verified fails the check unless allowed
    old = tmp_path / "old"
    shutil.copytree(quick_artifact, old)
    raw = orjson.loads((old / "manifest.json").read_bytes())
    raw["thresholds"]["default"] = 0.001  # edited, and the marker of the rule removed
    del raw["versions"]["model_version_rule"]
    (old / "manifest.json").write_bytes(orjson.dumps(raw))
    assert main(["check", "--artifact", str(old)]) == 1
    assert "FAIL model version: not verifiable" in capsys.readouterr().out
    assert main(["check", "--artifact", str(old), "--allow-unverified"]) == 0
    assert main(["check", "--artifact", str(quick_artifact)]) == 0
    # bench: the quality section by name without --quality is refused before any training
    assert main(["bench", "--sections", "quality", "--out", str(tmp_path / "b")]) == 2
    assert "--sections quality needs --quality" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_output_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    """`stream-detector config | head -1` printed a BrokenPipeError traceback."""
    r = subprocess.run(f"{sys.executable} -m stream_detector.cli config | head -1",
                       shell=True, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.stdout.startswith("| variable |") and r.stderr == "", r.stderr[-2000:]
