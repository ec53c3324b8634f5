"""Command line: thin wrappers that parse arguments, build settings and call one function.

``stream-detector train | evaluate | serve | replay | demo | dev-broker | check | datasets |
config | bench``.
Exit codes: 0 ok; 1 a failed check or parity, or serve left records undelivered at the end of
its grace period; 2 bad input, config or artifact, or a fatal runtime error (a failed delivery, a
broker unreachable at start); 130 interrupted (Ctrl-C; SIGTERM/SIGHUP for demo, replay, bench).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from stream_detector.errors import ConfigError, StreamDetectorError


def _overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs, values as given: the trainer types each by its option
    (``train.config_from_overrides``)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ConfigError(f"--set expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _count(text: str) -> int:
    """argparse type: a whole number >= 0."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {n}")
    return n


def _threads(text: str) -> int:
    """argparse type: torch threads, the range SD_SERVICE__TORCH_THREADS takes (0-256)."""
    from stream_detector.config import MAX_TORCH_THREADS

    n = _count(text)
    if n > MAX_TORCH_THREADS:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TORCH_THREADS} (as "
                                         f"SD_SERVICE__TORCH_THREADS), got {n}")
    return n


def _entities(text: str | None) -> list[str] | None:
    """``--entities``: None (the option left out) means all; a value must name at least one
    entity, each once."""
    if text is None:
        return None
    from stream_detector.datasets import check_entity_names

    names = [e.strip() for e in text.split(",") if e.strip()]
    check_entity_names(names, "--entities")
    return names


def _dataset(text: str) -> str:
    """argparse type: a dataset name, as the registry spells it (lower case): it names the
    artifact directory and the model version, so SMD and smd must be one dataset."""
    return text.strip().lower()


def _epochs(text: str) -> int:
    """argparse type: a number of training epochs (>= 1)."""
    n = _count(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", type=_dataset, default="synthetic",
                   help="smd, smap, msl, nab or synthetic (default; needs no data)")
    p.add_argument("--data-dir", type=Path, default=None, help="dataset directory")
    p.add_argument("--entities", default=None,
                   help="comma-separated entities (machines, channels, streams), each named "
                        "once; default all")


def cmd_train(args: argparse.Namespace) -> int:
    from stream_detector.datasets import load_dataset
    from stream_detector.evaluation import counted, prepare_out_dir
    from stream_detector.train_config import config_from_overrides

    overrides = _overrides(args.set)
    if args.quick:
        overrides.setdefault("epochs", 3)
        overrides.setdefault("max_windows_per_epoch", 20_000)
    cfg = config_from_overrides(overrides)
    out = args.out or Path("artifacts") / args.dataset
    prepare_out_dir(out, what="artifact")  # before minutes of training, not after
    entities = load_dataset(args.dataset, args.data_dir, _entities(args.entities))
    # the options, --out and the data are checked before torch's import (seconds)
    from stream_detector.train import train

    manifest = train(entities, cfg, out, dataset=args.dataset)
    print(f"artifact: {out}  model_version: {manifest.model_version}  "
          f"trained in {manifest.training['seconds']} s, "
          f"{counted(len(manifest.training['history']), 'epoch')} "
          f"({manifest.training['stopped_by'].replace('_', ' ')})")
    print(f"input scaling: {_scaling(manifest)}")
    print(f"long-term term: {_long_term(manifest)}")
    return 0


def _long_term(manifest: Any) -> str:
    lt = manifest.score.long_term
    if lt is None:
        return "off (--set long_term_alpha=0.05 adds it; docs/evaluation.md)"
    return (f"alpha {lt.alpha:g}, own figures for {len(lt.per_sensor)} sensor(s) (schema 4: "
            "builds before it refuse the artifact)")


def _scaling(manifest: Any) -> str:
    own = len(manifest.scaler_per_sensor)
    if not own:
        return "global (one scaler for every sensor)"
    seen = (manifest.training.get("config") or {}).get("fleet_view") is True
    return (f"per sensor for {own} training sensor(s); any other sensor gets the scaler of all "
            "training rows, " + ("which the network was also trained on (fleet_view)" if seen
                                 else "which the network was not trained on: sensors unseen in "
                                 "training detect worse (docs/evaluation.md)"))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from stream_detector.evaluation import run_evaluation

    baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    result = run_evaluation(
        dataset=args.dataset, data_dir=args.data_dir, entities=_entities(args.entities),
        artifact_dir=args.artifact or Path("artifacts") / args.dataset, out_dir=args.out,
        baselines=baselines,
        plots=not args.no_plots,
    )
    print(result.markdown)
    print(f"\nreport: {result.out_dir / 'evaluation.md'}")
    return 0


class _StoppedBeforeStart(BaseException):
    """SIGTERM while serve was still loading (torch's import, the model); a BaseException, so
    that no ``except Exception`` on the way (the artifact loader's) turns it into an error."""


def _stop_before_start(signum: int, frame: Any) -> None:
    raise _StoppedBeforeStart


def cmd_serve(args: argparse.Namespace) -> int:
    import signal

    # As PID 1 in a container, a process ignores SIGTERM until it installs a handler: a pod
    # deleted while serve imported torch and loaded its model (seconds) went on to join the
    # group, then was killed at the grace period without leaving it (two rebalances and a
    # session timeout's stall for its partitions). Until the service's own handlers are in
    # place, SIGTERM ends the load at once: nothing was consumed, so nothing to drain.
    previous = signal.signal(signal.SIGTERM, _stop_before_start)
    installed = False
    try:
        from stream_detector.config import load_settings
        from stream_detector.consumer import DetectorService
        from stream_detector.logs import configure_logging

        overrides: dict[str, Any] = {}
        if args.artifact:
            overrides["artifact_dir"] = args.artifact
        settings = load_settings(**overrides)
        configure_logging(settings.service.log_format, settings.service.log_level)
        from stream_detector.model.runtime import TorchScorer

        threads = settings.service.torch_threads if args.threads is None else args.threads
        scorer = TorchScorer.load(settings.artifact_dir, threads=threads)
        service = DetectorService(settings, scorer.manifest, scorer,
                                  rebuild_lookback=args.rebuild_lookback)
        service.install_signal_handlers()
        installed = True
    except _StoppedBeforeStart:
        import structlog

        structlog.get_logger("stream_detector.cli").info(
            "stopped before start", reason="SIGTERM while loading", exit_code=0)
        return 0
    finally:
        if not installed:  # stopped, or a bad setting or artifact: the caller's handler back
            signal.signal(signal.SIGTERM, previous)
    code = service.run()
    if service.close_abandoned:
        # a Kafka client still waits for a broker that stopped answering: exiting the usual
        # way would wait for it too (its destructor), past the grace period
        import os

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def cmd_replay(args: argparse.Namespace) -> int:
    from stream_detector.replay import ReplayOptions, run_replay

    opts = ReplayOptions(
        dataset=args.dataset, data_dir=args.data_dir, entities=_entities(args.entities),
        artifact_dir=args.artifact, out_dir=args.out, bootstrap_servers=args.bootstrap_servers,
        rate=args.rate, max_parity_error=args.max_parity_error, plots=not args.no_plots,
        train_if_missing=args.train_if_missing,
    )
    report = run_replay(opts)
    print(report.markdown)
    print(f"\nreport: {report.out_dir / 'report.md'}")
    return 0 if report.parity_ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from stream_detector.demo import DemoOptions, run_demo

    return run_demo(DemoOptions(
        dataset=args.dataset, data_dir=args.data_dir, entities=_entities(args.entities),
        artifact_dir=args.artifact, out_dir=args.out, retrain=args.retrain, epochs=args.epochs,
    ))


def cmd_dev_broker(args: argparse.Namespace) -> int:
    from stream_detector.devbroker import run_dev_broker

    topics: dict[str, int] = {}
    if not args.no_topics:
        from stream_detector.config import load_settings

        k = load_settings().kafka
        if args.partitions < 1:
            raise ConfigError("--partitions must be at least 1")
        topics = {k.input_topic: args.partitions,
                  **{t: 1 for t in (k.alert_topic, k.dead_letter_topic, k.score_topic) if t}}
    return run_dev_broker(args.port, args.ready_file, topics) or 0


def cmd_check(args: argparse.Namespace) -> int:
    """Probe-friendly check: artifact loads and scores; optionally the broker answers."""
    from stream_detector.config import load_settings

    overrides: dict[str, Any] = {"artifact_dir": args.artifact} if args.artifact else {}
    settings = load_settings(**overrides)
    if args.http:
        import urllib.request

        if not args.http.lower().startswith(("http://", "https://")):
            raise ConfigError(f"--http takes an http:// or https:// URL (such as "
                              f"http://127.0.0.1:8000/readyz), got {args.http!r}")
        try:
            with urllib.request.urlopen(args.http, timeout=3) as resp:  # noqa: S310
                ok = resp.status == 200
        except ValueError as exc:  # not a URL urllib can open ("http://[::1", a bad port)
            raise ConfigError(f"--http {args.http!r} is not a valid URL: {exc}") from None
        except OSError as exc:
            print(f"FAIL {args.http}: {exc}")
            return 1
        print(("ok " if ok else "FAIL ") + args.http)
        return 0 if ok else 1
    from stream_detector.model.runtime import TorchScorer

    scorer = TorchScorer.load(settings.artifact_dir)
    m = scorer.manifest
    print(f"artifact ok: {settings.artifact_dir} model_version={m.model_version} "
          f"features={m.n_features} window={m.window}")
    print("model version: " + ("verified (the digest of the weights and the manifest)"
                               if scorer.version_verified else
                               "NOT verifiable (an artifact without versions."
                               "model_version_rule, written before 2026-11-27 10:35 or edited "
                               "since, whose version is not the digest of its contents)"))
    print(f"input scaling: {_scaling(m)}")
    print(f"long-term term: {_long_term(m)}")
    code = 0
    if not scorer.version_verified and not args.allow_unverified:
        # serve and replay load such an artifact (with a warning); the check is the gate that
        # says an artifact is what training wrote, so it fails unless told the age is known
        print("FAIL model version: not verifiable; pass --allow-unverified for an artifact "
              "known to predate the check")
        code = 1
    if args.broker:
        return max(code, check_broker(settings))
    return code


def check_broker(settings: Any) -> int:
    """One metadata request (5 s at most), not the service's start-up retries: a probe must
    answer quickly, and an unreachable broker is a failed check (1), not bad input (2)."""
    from stream_detector.consumer import FatalError, check_client_settings, wait_for_broker

    check_client_settings(settings)  # every librdkafka property, per-client extras included
    once = settings.model_copy(
        update={"service": settings.service.model_copy(update={"startup_retries": 0})})
    try:
        wait_for_broker(once)
    except FatalError as exc:
        print(f"FAIL broker: {exc}")
        return 1
    print(f"broker ok: {settings.kafka.bootstrap_servers}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from stream_detector.datasets import (
        DATASETS,
        default_data_dir,
        get_loader,
        refuse_data_dir_of_generated,
    )
    from stream_detector.errors import DatasetError
    from stream_detector.evaluation import counted

    if args.action == "list":
        if args.to is not None:
            raise ConfigError("--to is where `datasets download` writes; `datasets list NAME "
                              "--data-dir DIR` lists a directory")
        if args.entities is not None:
            raise ConfigError("--entities selects machines to download; `datasets list NAME` "
                              "lists a dataset's entities")
        if args.name is None:
            if args.data_dir is not None:
                raise ConfigError("--data-dir needs the dataset it holds: datasets list NAME "
                                  "--data-dir DIR")
            for name, loader in DATASETS.items():
                if not loader.needs_data_dir:
                    print(f"{name:10s} built in            "
                          f"entities: {len(loader.list_entities(None))}")
                    continue
                path = default_data_dir(name)
                try:
                    n = len(loader.list_entities(path)) if path else 0
                    where = f"{path}  entities: {n}" if path else "not found; pass --data-dir"
                except DatasetError as exc:
                    where = f"{path}: {exc}"
                print(f"{name:10s} {where}")
            return 0
        # one dataset: its directory and entity names (what --entities takes); errors exit 2
        loader = get_loader(args.name)
        refuse_data_dir_of_generated(args.name, args.data_dir)
        path = args.data_dir or (default_data_dir(args.name) if loader.needs_data_dir else None)
        if loader.needs_data_dir and path is None:
            raise DatasetError(f"no {args.name} data found; pass --data-dir")
        names = loader.list_entities(path)
        if not names:
            raise DatasetError(f"dataset {args.name!r} has no entities in {path}: is that the "
                               f"{args.name} data directory?")
        print(f"{args.name}: {path if path else 'built in'}, "
              f"{counted(len(names), 'entity', 'entities')}")
        print(",".join(names))
        return 0
    if (args.name or "smd") != "smd":
        raise ConfigError("only 'smd' can be downloaded; see docs/backtesting.md for the others")
    from stream_detector.datasets.download import download_smd

    if args.data_dir is not None:
        raise ConfigError("datasets download writes to --to DIR (default data/smd); "
                          "--data-dir is for datasets list")
    get_loader("smd")
    path = download_smd(args.to or Path("data/smd"), machines=_entities(args.entities))
    print(f"SMD downloaded to {path}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from stream_detector.config import effective_settings, load_settings, settings_reference

    if args.effective or args.changed:
        # what serve would run with: the environment and .env, validated as settings (a bad
        # value exits 2 naming its variable; librdkafka checks its own properties when serve
        # or check --broker builds a client), secrets masked; * marks a value away from its
        # default
        for env, value, changed in effective_settings(load_settings()):
            if changed or not args.changed:
                print(f"{'*' if changed else ' '} {env}={value}")
        return 0
    print("| variable | type | default | description |\n|---|---|---|---|")
    for env, typ, default, desc in settings_reference():
        print(f"| `{env}` | {typ} | `{default}` | {desc} |")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from stream_detector.bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stream-detector", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train the hybrid model and write an artifact")
    _add_data_args(t)
    t.add_argument("--out", type=Path, default=None,
                   help="artifact directory (default artifacts/DATASET, where evaluate, replay "
                        "and demo look; serve and check look in SD_ARTIFACT_DIR, which the "
                        "repository's .env sets to artifacts/synthetic)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="training option, e.g. --set window=32 --set hidden=64 (repeatable)")
    t.add_argument("--quick", action="store_true", help="few epochs, for smoke tests")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="batch-score test data; metrics table, baselines, plots")
    _add_data_args(e)
    e.add_argument("--artifact", type=Path, default=None,
                   help="artifact directory (default artifacts/DATASET, train's default --out)")
    e.add_argument("--out", type=Path, default=Path("reports/evaluation"),
                   help="report directory (default reports/evaluation; make backtest writes "
                        "reports/evaluation-DATASET)")
    e.add_argument("--baselines", default="random,pca,iforest,ridge,ridge_matched",
                   help="comma-separated baselines to compare with (random, pca, iforest, "
                        "ridge, ridge_matched: the ridge smoothed as the model's score; default "
                        "all); random is always computed, whatever this says: point-adjusted "
                        "F1 is never shown without it")
    e.add_argument("--no-plots", action="store_true")
    e.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("serve", help="run the Kafka consumer (settings from SD_* env / .env)")
    s.add_argument("--artifact", type=Path, default=None, help="overrides SD_ARTIFACT_DIR")
    s.add_argument("--threads", type=_threads, default=None,
                   help="torch intra-op threads (default SD_SERVICE__TORCH_THREADS, 1; "
                        "0 = torch's default, one per core)")
    s.add_argument("--rebuild-lookback", type=_count, default=None,
                   help="records re-read per assigned partition to rebuild windows and alert "
                        "state, doubled while a sensor's state is not exact, up to "
                        "SD_SERVICE__REBUILD_MAX_LOOKBACK (default SD_SERVICE__REBUILD_LOOKBACK, "
                        "10,000)")
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("replay", help="backtest: dataset -> Kafka -> consumer -> metrics")
    _add_replay_args(r)

    dm = sub.add_parser("demo", help="broker + train + evaluate + serve + replay, end to end")
    _add_data_args(dm)
    dm.add_argument("--artifact", type=Path, default=None,
                    help="artifact dir (default artifacts/<dataset>)")
    dm.add_argument("--out", type=Path, default=Path("reports/demo"))
    dm.add_argument("--retrain", action="store_true", help="train even if the artifact exists")
    dm.add_argument("--epochs", type=_epochs, default=None,
                    help="override training epochs (>= 1)")
    dm.set_defaults(func=cmd_demo)

    d = sub.add_parser("dev-broker", help="run the embedded Tansu broker on loopback")
    d.add_argument("--port", type=int, default=None)
    d.add_argument("--ready-file", type=Path, default=None,
                   help="write the bootstrap address here once the broker answers")
    d.add_argument("--partitions", type=_count, default=4,
                   help="partitions of the input topic it creates (default 4)")
    d.add_argument("--no-topics", action="store_true",
                   help="create no topics (default: the input, alert, dead-letter and score "
                        "topics the SD_* settings / .env name, so `serve` finds them)")
    d.set_defaults(func=cmd_dev_broker)

    c = sub.add_parser("check", help="health check with a probe-friendly exit code")
    c.add_argument("--artifact", type=Path, default=None)
    c.add_argument("--broker", action="store_true", help="also check the broker answers")
    c.add_argument("--allow-unverified", action="store_true",
                   help="pass an artifact whose model version cannot be verified (one written "
                        "before the check existed); without it such an artifact fails (exit 1)")
    c.add_argument("--http", default=None, help="GET this URL (e.g. .../readyz) instead")
    c.set_defaults(func=cmd_check)

    ds = sub.add_parser(
        "datasets", help="list datasets or download SMD",
        description="datasets list [NAME] [--data-dir DIR]: the datasets and where their data "
                    "is (with NAME: its entity names, what --entities takes). datasets download "
                    "smd [--to DIR] [--entities M,M]: fetch the public SMD files.")
    ds.add_argument("action", choices=["list", "download"])
    ds.add_argument("name", nargs="?", default=None,
                    help="list: this dataset's directory and entity names (default: every "
                         "dataset); download: smd (the default)")
    ds.add_argument("--to", type=Path, default=None,
                    help="download: the directory to fill (default data/smd)")
    ds.add_argument("--data-dir", type=Path, default=None,
                    help="list NAME: the dataset's directory (default: found under "
                         "../shared/data or data/, where datasets download writes)")
    ds.add_argument("--entities", default=None, help="machines to download (default all 28)")
    ds.set_defaults(func=cmd_datasets)

    cf = sub.add_parser("config", help="print every setting, its env var and default; "
                        "--effective: the values this environment gives, validated")
    cf.add_argument("--effective", action="store_true",
                    help="read the environment and .env as serve does, exit 2 on a bad value "
                    "(librdkafka properties are checked by serve and check --broker), and print "
                    "each variable's value (secrets masked; * = not the default)")
    cf.add_argument("--changed", action="store_true",
                    help="--effective, only the variables set away from their default")
    cf.set_defaults(func=cmd_config)

    b = sub.add_parser("bench", help="throughput, latency and memory benchmarks")
    b.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    b.add_argument("--out", type=Path, default=Path("reports/bench"))
    b.add_argument("--data-dir", type=Path, default=None, help="SMD dir for the quality table")
    b.add_argument("--quality", action="store_true",
                   help="also train 4 model configurations on SMD (slow) for the quality table")
    b.add_argument("--artifact", type=Path, default=None,
                   help="benchmark this artifact instead of training a small synthetic one")
    b.add_argument("--sections", default=None, metavar="LIST",
                   help="comma-separated sections to run (model, ingest, e2e, latency, memory, "
                        "river, quality; default all); the ones they need are added (e2e needs "
                        "model, latency needs e2e)")
    b.add_argument("--e2e-reps", type=int, default=None, metavar="N",
                   help="repetitions of each end-to-end run (default 3, the median is reported)")
    b.add_argument("--service-cpus", default=None, metavar="CPUS",
                   help="pin the service (and the model-only timing) to these CPUs, e.g. 0,1 or "
                        "0-1, and the broker and load generators to the rest (Linux)")
    b.set_defaults(func=cmd_bench)
    return p


def _add_replay_args(r: argparse.ArgumentParser) -> None:
    _add_data_args(r)
    r.add_argument("--artifact", type=Path, default=None,
                   help="artifact to deploy (default artifacts/<dataset>)")
    r.add_argument("--train-if-missing", action="store_true",
                   help="train the artifact first when it does not exist")
    r.add_argument("--out", type=Path, default=None, help="report dir (default reports/replay-*)")
    r.add_argument("--bootstrap-servers", default=None,
                   help="use a running Kafka + deployment instead of the embedded broker")
    r.add_argument("--rate", type=float, default=0.0,
                   help="readings per second to produce (0 = as fast as possible)")
    r.add_argument("--max-parity-error", type=float, default=1e-4,
                   help="largest streamed-vs-offline score difference allowed (exit 1 above)")
    r.add_argument("--no-plots", action="store_true")
    r.set_defaults(func=cmd_replay)


#: Commands that start an embedded broker or a serve process: SIGTERM/SIGHUP (a cancelled CI
#: job, `kill`, a closed terminal) must stop those too, as Ctrl-C does. serve and dev-broker
#: handle SIGTERM themselves.
_CLEANUP_ON_SIGTERM = frozenset({"demo", "replay", "bench"})


def _interrupt_on_sigterm() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, so the ``with`` blocks that own the broker
    and the demo's serve process stop them (the default action killed us and left both)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)


def _run(args: argparse.Namespace) -> int:
    """Run a parsed command; our own errors become a message and exit code 2."""
    if args.command != "serve":  # serve configures logging from its settings
        from stream_detector.logs import configure_logging

        configure_logging("console", "INFO")
    if args.command in _CLEANUP_ON_SIGTERM:
        _interrupt_on_sigterm()
    from stream_detector.evaluation import forget_created_out_dirs, remove_created_out_dirs

    forget_created_out_dirs()  # an earlier command in this process keeps its folders
    try:
        return int(args.func(args) or 0)
    except StreamDetectorError as exc:
        remove_created_out_dirs()  # an --out made for this run and still empty
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        remove_created_out_dirs()
        return 130
    except BrokenPipeError:
        # the reader went away (`stream-detector config | head`): stop quietly, as a Unix
        # tool killed by SIGPIPE does, and keep Python from complaining at exit
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except BaseException:
        remove_created_out_dirs()  # not our error (a bug): the traceback, but no empty --out
        raise


def main(argv: list[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv))


def replay_main(argv: list[str] | None = None) -> int:
    """The ``replay`` console script: same as ``stream-detector replay``."""
    p = argparse.ArgumentParser(prog="replay", description="backtest through Kafka")
    _add_replay_args(p)
    p.set_defaults(command="replay")
    return _run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
