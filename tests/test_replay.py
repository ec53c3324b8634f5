"""Replay through the embedded broker: parity with offline scores, reports, root-cause check.

The console script is exercised as users run it (``python -m stream_detector.cli replay``), each
run starting its own embedded broker and consumer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    s = report["summary"]
    assert s["parity_ok"] is True and s["parity_max_abs"] <= limit
    assert [r["entity"] for r in report["entities"]] == entities
    assert s["windows_scored"] == sum(r["rows"] for r in report["entities"])
    for key in ("best_f1", "f1_at_threshold", "auc_pr", "pa_best_f1", "random_pa_best_f1"):
        assert key in report["entities"][0]
    assert s["throughput_readings_per_s"] > 0 and s["latency_ms"]["p99"] >= s["latency_ms"]["p50"]
    assert "parity" in md and "point adjust" in md
    for e in entities:
        png = out / f"{e}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return report


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
    assert "parity" in r.stdout


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.parametrize(("dataset", "folder", "entities"), [
    ("smd", "smd", "machine-1-1,machine-2-1"),       # 2 real SMD machines
    ("smap", "smap_msl", "P-1,S-1,E-1,E-2,A-1"),     # 5 real SMAP channels
])
def test_replay_real_data(dataset: str, folder: str, entities: str, tmp_path: Path) -> None:
    data = shared_dataset(folder)
    art, out = tmp_path / "art", tmp_path / "report"
    t = _cli("train", "--dataset", dataset, "--data-dir", str(data), "--entities", entities,
             "--out", str(art), "--quick")
    assert t.returncode == 0, t.stderr[-3000:]
    r = _cli("replay", "--dataset", dataset, "--data-dir", str(data), "--entities", entities,
             "--artifact", str(art), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    report = _check_report(out, entities.split(","))
    if dataset == "smd":  # interpretation_label gives the responsible metrics: HitRate reported
        assert all(np.isfinite(row["hitrate_100"]) for row in report["entities"]
                   if row["rc_alerts"] > 0)


def test_replay_refuses_artifact_of_other_dataset(tmp_path: Path) -> None:
    from stream_detector.replay import ReplayError, ReplayOptions, run_replay
    from tests.kafka_helpers import train_tiny

    art = train_tiny(tmp_path / "art")
    with pytest.raises(ReplayError, match="features"):
        run_replay(ReplayOptions(dataset="synthetic", artifact_dir=art, out_dir=tmp_path / "o",
                                 progress=False))


def test_replay_without_artifact_says_how_to_train(tmp_path: Path) -> None:
    r = _cli("replay", "--dataset", "synthetic", "--artifact", str(tmp_path / "none"),
             "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "--train-if-missing" in r.stderr and "stream-detector train" in r.stderr
