"""Smoke test of ``stream-detector bench``: quick sizes finish, print every section and write
both reports. Timings are not asserted (the machine is shared; see docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest

from stream_detector.bench import SECTIONS as BENCH_SECTIONS
from stream_detector.bench import (
    histogram_buckets,
    histogram_quantiles,
    parse_cpus,
    parse_sections,
    run_bench,
)
from stream_detector.cli import build_parser
from stream_detector.errors import ConfigError

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SECTIONS = (
    "## 1. Model-only limit",
    "## 2. Ingest limit",
    "## 3. End to end",
    "## 4. Latency",
    "## 5. Memory and scale",
    "## 6. River HalfSpaceTrees",
    "## 7. Quality / speed trade-off",
    "## Targets",
)


def test_cli_parses_bench_flags(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["bench", "--quick", "--quality", "--out", str(tmp_path), "--artifact", "a",
         "--data-dir", "d"])
    assert args.quick and args.quality and args.out == tmp_path
    assert args.artifact == Path("a") and args.data_dir == Path("d")
    assert args.sections is None and args.e2e_reps is None
    args = build_parser().parse_args(["bench", "--sections", "latency", "--e2e-reps", "1"])
    assert args.sections == "latency" and args.e2e_reps == 1


def test_sections_bring_what_they_need_in_run_order() -> None:
    assert parse_sections(None) == BENCH_SECTIONS == parse_sections("all")
    assert parse_sections("latency") == ("model", "e2e", "latency")
    assert parse_sections(" memory , model ") == ("model", "memory")
    assert parse_sections("e2e,river") == ("model", "e2e", "river")
    with pytest.raises(ConfigError, match="unknown bench section.*'foo'"):
        parse_sections("model,foo")
    with pytest.raises(ConfigError):
        parse_sections(",")


def test_bench_runs_only_the_sections_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(quick=True, quality=False, out=tmp_path, artifact=None,
                              data_dir=None, sections="model", e2e_reps=None)
    assert run_bench(args) == 0
    printed = capsys.readouterr().out
    assert "## 1. Model-only limit" in printed
    assert "## 2. Ingest" not in printed and "## 4. Latency" not in printed
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["sections"] == ["model"]
    assert set(report["section_seconds"]) == {"artifact", "model"}
    assert "e2e" not in report and "memory" not in report and report["targets"] == []
    assert "Sections run: model." in (tmp_path / "bench.md").read_text()
    with pytest.raises(ConfigError, match="at least 1"):
        run_bench(argparse.Namespace(quick=True, out=tmp_path, e2e_reps=0))


def test_service_cpus_are_checked() -> None:
    avail = {0, 1, 2, 3}
    assert parse_cpus("0,1", avail) == {0, 1} == parse_cpus("0-1", avail)
    assert parse_cpus("1-2, 3", avail) == {1, 2, 3}
    with pytest.raises(ConfigError, match="expected CPU ids"):
        parse_cpus("a-b", avail)
    with pytest.raises(ConfigError, match=r"\[7\] are not available"):
        parse_cpus("0,7", avail)
    with pytest.raises(ConfigError, match="leave at least one CPU"):
        parse_cpus("0-3", avail)
    with pytest.raises(ConfigError, match="no CPU ids"):
        parse_cpus(" , ", avail)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two CPUs")
def test_pinned_bench_times_the_model_on_the_service_cpus(tmp_path: Path) -> None:
    import torch

    before_aff, before_threads = os.sched_getaffinity(0), torch.get_num_threads()
    one = min(before_aff)
    args = argparse.Namespace(quick=True, quality=False, out=tmp_path, artifact=None,
                              data_dir=None, sections="model", e2e_reps=None,
                              service_cpus=str(one))
    assert run_bench(args) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["pinning"] == {"service_cpus": [one],
                                 "other_cpus": sorted(before_aff - {one})}
    # torch's default thread count follows the service CPUs: one thread, timed on that CPU
    assert {s["threads"] for s in report["model"]["sweep"]} == {1}
    assert "CPU pinning" in (tmp_path / "bench.md").read_text()
    # everything is put back
    assert os.sched_getaffinity(0) == before_aff and torch.get_num_threads() == before_threads


@pytest.mark.timeout(900)
def test_quick_bench_prints_every_section_and_writes_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = argparse.Namespace(quick=True, quality=False, out=tmp_path / "bench", artifact=None,
                              data_dir=tmp_path / "no-smd-here")
    assert run_bench(args) == 0
    printed = capsys.readouterr().out
    for section in SECTIONS:
        assert section in printed, section
    assert "skipped (pass --quality)" in printed
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    for key in ("machine", "model", "ingest", "e2e", "latency", "memory", "river", "targets"):
        assert key in report, key
    assert report["e2e"]["model"]["windows"] > 0
    assert report["model"]["headline"]["windows_per_s"] > 0
    assert len(report["latency"]) >= 2
    for row in report["latency"]:  # the service's own time, where a service ran
        own = row["processing_ms"]
        if row["via"] == "broker":
            assert own == {}
        else:
            assert own["n"] > 0 and 0 < own["p50"] <= own["p99"] < 30_000
    assert report["river"]["speed"]["readings_per_s"] > 0
    md = (tmp_path / "bench" / "bench.md").read_text()
    for section in SECTIONS[:6]:
        assert section.split(" (")[0] in md


def test_histogram_quantiles_interpolate_inside_buckets() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    hist = Histogram("x_seconds", "x", registry=registry, buckets=(0.01, 0.02, 0.05))
    hist.observe(0.5)  # before the first snapshot: not counted
    before = histogram_buckets(registry, "x_seconds")
    assert math.isnan(histogram_quantiles(before, before)["p50"])  # nothing observed
    for v in [0.005] * 50 + [0.015] * 40 + [0.03] * 9 + [7.0]:
        hist.observe(v)
    q = histogram_quantiles(before, histogram_buckets(registry, "x_seconds"), (0.5, 0.95, 0.995))
    assert q["n"] == 100
    assert q["p50"] == pytest.approx(0.01)  # rank 50: the last of the first bucket's 50
    assert q["p95"] == pytest.approx(0.02 + 0.03 * 5 / 9)  # rank 95: 5th of 9 in (0.02, 0.05]
    assert q["p99.5"] == pytest.approx(0.05)  # in the +Inf bucket: the largest finite bound


# The benchmarks drive the Detector with TorchScorer.errors_async (model overlapped with
# decoding); results must not depend on it.


class _Handle:
    def __init__(self, future) -> None:
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def result(self):
        return self._future.result()


class _AsyncNumpyScorer:
    """NumpyScorer whose ``errors_async`` finishes a little later on another thread."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from stream_detector.testing import NumpyScorer

        self.inner = NumpyScorer()
        self.pool = ThreadPoolExecutor(1)
        self.started = 0

    def errors(self, windows):
        return self.inner.errors(windows)

    def errors_async(self, windows, chunk=0):
        import time

        self.started += 1

        def run():
            time.sleep(0.001)
            return self.inner.errors(windows)

        return _Handle(self.pool.submit(run))


def _run_detector(scorer) -> tuple[list[tuple], int]:
    import numpy as np

    from stream_detector.config import DetectorSettings
    from stream_detector.detector import Detector
    from stream_detector.records import Reading
    from stream_detector.testing import FakeClock, make_manifest

    clock = FakeClock()
    det = Detector(make_manifest(window=4, smoothing=3, threshold=0.5), scorer,
                   DetectorSettings(max_batch=3, max_wait_ms=5, clear_after=2), clock=clock,
                   wall_clock_ms=lambda: 0)
    rng = np.random.default_rng(0)
    out = []
    max_pending = 0
    for t in range(40):
        for s in ("a", "b", "c", "d", "e"):
            v = rng.normal(0, 0.1, 3).astype(np.float32)
            if s == "b" and 20 <= t < 23:
                v[2] += 5.0
            det.submit(Reading(s, t, v, ref=(s, t)))
        clock.advance(0.002)
        max_pending = max(max_pending, det.pending)
        out += det.poll()
    out += det.flush()
    assert det.pending == 0 and det.next_deadline() is None
    rows = [(r.ref, r.score.score, r.score.level, r.alert.event if r.alert else None)
            for r in out]
    return rows, max_pending


def test_async_scorer_gives_the_same_results_in_the_same_order() -> None:
    from stream_detector.testing import NumpyScorer

    sync_rows, _ = _run_detector(NumpyScorer())
    scorer = _AsyncNumpyScorer()
    async_rows, _ = _run_detector(scorer)
    assert scorer.started > 10
    assert async_rows == sync_rows
    assert len(sync_rows) == 5 * (40 - 3)
    assert any(row[3] == "open" for row in sync_rows)
