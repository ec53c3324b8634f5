"""Metrics: every labelled series with a known, finite label set exists from the start.

Prometheus' rate() / increase() need a sample of a series before its first increment: a series
created lazily by that increment makes them miss the first event (or burst) of each label set in
each pod, which for rare alerts and dead letters is most of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from stream_detector.observability import Metrics
from stream_detector.records import REASONS
from stream_detector.scoring import EpisodeTracker, Hysteresis

PACKAGE = Path(__file__).resolve().parents[1] / "stream_detector"

#: (event, level) of the alert events the detector publishes: open and update at warning or
#: critical, resolve at normal (scoring.EpisodeTracker, detector.Detector).
ALERT_COMBINATIONS = {
    ("open", "warning"), ("open", "critical"),
    ("update", "warning"), ("update", "critical"),
    ("resolve", "normal"),
}


def _samples(metrics: Metrics) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    """Sample name -> {label set: value}, parsed from the text exposition /metrics serves."""
    text = generate_latest(metrics.registry).decode()
    out: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def test_fresh_metrics_expose_every_alert_combination_at_zero() -> None:
    alerts = _samples(Metrics()).get("sd_alerts_total", {})
    expected = {frozenset({("event", e), ("level", lv)}) for e, lv in ALERT_COMBINATIONS}
    assert set(alerts) == expected  # every possible combination, and none that cannot occur
    assert set(alerts.values()) == {0.0}


def test_fresh_metrics_expose_every_dead_letter_reason_at_zero() -> None:
    dead = _samples(Metrics()).get("sd_dead_letters_total", {})
    assert set(dead) == {frozenset({("reason", r)}) for r in REASONS}
    assert set(dead.values()) == {0.0}


def test_fresh_metrics_expose_every_collector_generation_at_zero() -> None:
    samples = _samples(Metrics())  # without gc_callback() being called
    for suffix in ("_count", "_sum"):
        series = samples.get("sd_gc_pause_seconds" + suffix, {})
        assert set(series) == {frozenset({("generation", g)}) for g in ("0", "1", "2")}, suffix
        assert set(series.values()) == {0.0}
    buckets = samples.get("sd_gc_pause_seconds_bucket", {})
    assert {dict(k)["generation"] for k in buckets} == {"0", "1", "2"}
    assert set(buckets.values()) == {0.0}


def test_alert_combinations_are_exactly_those_the_episode_tracker_emits() -> None:
    """The pre-created set is neither short of nor beyond what scoring can produce."""
    rng = np.random.default_rng(0)
    seen: set[tuple[str, str]] = set()
    for h in (Hysteresis(), Hysteresis(update_interval_ms=0, clear_after=2)):
        tracker = EpisodeTracker()
        for i, ratio in enumerate(rng.uniform(0.0, 3.0, 20_000)):
            event = tracker.step(i * 1000, float(ratio), 1.0, h)
            if event is not None:  # what detector.Detector puts on the Alert
                seen.add((event.kind.value, event.level.label))
    assert seen == ALERT_COMBINATIONS


def test_every_dead_letter_reason_the_code_uses_is_in_reasons() -> None:
    used: set[str] = set()
    for path in PACKAGE.glob("*.py"):
        text = path.read_text()
        used.update(re.findall(r"(?:_dead_letter|BadRecord)\(\s*\"(\w+)\"", text))
    assert used, "no reasons found: the pattern no longer matches the code"
    assert used <= set(REASONS), used - set(REASONS)
