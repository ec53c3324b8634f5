"""Metrics against hand-computed cases and brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stream_detector.metrics import (
    ENTITY_METRIC_KEYS,
    EPISODE_METRIC_KEYS,
    auc_pr,
    best_f1,
    entity_metrics,
    episode_metrics,
    f1_at,
    hit_rate,
    markdown_table,
    pa_best_f1,
    point_adjust,
    segments,
    summarize,
)


def _f1(pred: np.ndarray, y: np.ndarray) -> float:
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def _brute(scores: np.ndarray, labels: np.ndarray, adjust: bool) -> float:
    """Best F1 by trying every distinct score as threshold (and +inf: flag nothing)."""
    y = labels.astype(bool)
    best = 0.0
    for t in [*np.unique(scores), np.inf]:
        pred = scores >= t
        if adjust:
            pred = point_adjust(pred, y)
        best = max(best, _f1(pred, y))
    return best


# Worked by hand. Sorted by decreasing score (label): 0.9(1) 0.8(1) 0.7(0) 0.6(1) 0.5(0) ...
# with P = 3 positives, F1 = 2 TP / (k + P) after flagging the top k:
#   k=1: 2/4 = 0.500   k=2: 4/5 = 0.800   k=3: 4/6 = 0.667   k=4: 6/7 = 0.857   k=5: 6/8 = 0.750
# and lower for larger k. Best: k=4, threshold 0.6, precision 3/4, recall 3/3.
HAND_SCORES = np.array([0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4, 0.6, 0.5, 0.05])
HAND_LABELS = np.array([0, 1, 0, 1, 0, 0, 0, 1, 0, 0], dtype=np.int8)


def test_best_f1_hand_example() -> None:
    r = best_f1(HAND_SCORES, HAND_LABELS)
    assert r["f1"] == pytest.approx(6 / 7)
    assert r["threshold"] == pytest.approx(0.6)
    assert r["precision"] == pytest.approx(0.75)
    assert r["recall"] == pytest.approx(1.0)
    # The threshold reproduces the F1 through f1_at.
    assert f1_at(HAND_SCORES, HAND_LABELS, r["threshold"])["f1"] == pytest.approx(6 / 7)


def test_f1_at_hand_example() -> None:
    # threshold 0.75 flags 0.9 and 0.8: TP 2, FP 0, FN 1
    r = f1_at(HAND_SCORES, HAND_LABELS, 0.75)
    assert r == pytest.approx({"f1": 0.8, "precision": 1.0, "recall": 2 / 3})
    # nothing flagged: zeros, no division error
    assert f1_at(HAND_SCORES, HAND_LABELS, 5.0) == {"f1": 0.0, "precision": 0.0, "recall": 0.0}


def test_best_f1_ties_only_real_thresholds() -> None:
    # 0.5 is shared by a positive and two negatives: flagging "the positive only" is impossible.
    scores = np.array([0.5, 0.5, 0.5, 0.1])
    labels = np.array([1, 0, 0, 0])
    r = best_f1(scores, labels)
    assert r["f1"] == pytest.approx(2 * 1 / (3 + 1))
    assert r["threshold"] == 0.5


@pytest.mark.parametrize("seed", range(6))
def test_best_f1_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 200
    labels = (rng.random(n) < 0.15).astype(np.int8)
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if seed % 2:  # many ties
        scores = np.round(scores, 1)
    r = best_f1(scores, labels)
    assert r["f1"] == pytest.approx(_brute(scores, labels, adjust=False))
    assert f1_at(scores, labels, r["threshold"])["f1"] == pytest.approx(r["f1"])


def test_segments_and_point_adjust_hand_example() -> None:
    labels = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0])
    assert segments(labels) == [(1, 4), (6, 8)]
    assert segments([1, 1, 0, 1]) == [(0, 2), (3, 4)]
    assert segments([]) == []
    pred = np.array([0, 0, 1, 0, 0, 0, 0, 0, 1])
    # Row 2 hits the first segment, which becomes fully detected; the second segment is missed;
    # the false positive at row 8 stays.
    expected = np.array([0, 1, 1, 1, 0, 0, 0, 0, 1], dtype=bool)
    np.testing.assert_array_equal(point_adjust(pred, labels), expected)


def test_pa_best_f1_hand_example() -> None:
    labels = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0])
    scores = np.array([0.2, 0.1, 0.9, 0.1, 0.3, 0.2, 0.1, 0.25, 0.0])
    # t = 0.9: segment 1 (3 rows) detected, FP 0, FN 2 -> F1 = 6 / 8 = 0.75
    # t = 0.25: both segments (5 rows), FP = rows 0.3 -> 1, F1 = 10 / 11 = 0.909
    r = pa_best_f1(scores, labels)
    assert r["f1"] == pytest.approx(10 / 11)
    assert r["threshold"] == pytest.approx(0.25)
    assert r["precision"] == pytest.approx(5 / 6)
    assert r["recall"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(8))
def test_pa_best_f1_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n = 200
    labels = np.zeros(n, dtype=np.int8)
    for _ in range(rng.integers(1, 6)):
        a = int(rng.integers(0, n - 1))
        labels[a : a + int(rng.integers(1, 25))] = 1
    scores = rng.normal(size=n)
    if seed % 2:
        scores = np.round(scores, 1)
    r = pa_best_f1(scores, labels)
    assert r["f1"] == pytest.approx(_brute(scores, labels, adjust=True))
    pred = point_adjust(scores >= r["threshold"], labels)
    assert _f1(pred, labels.astype(bool)) == pytest.approx(r["f1"])


def test_pa_best_f1_matches_brute_force_on_a_long_series_with_many_segments() -> None:
    """Many segments and ties across a longer series (the sweep's bookkeeping per segment is
    where a fast implementation would go wrong). Speed is not asserted here (benchmarks only)."""
    rng = np.random.default_rng(0)
    n = 3_000
    labels = (np.convolve(rng.random(n) < 0.01, np.ones(20), mode="same") > 0).astype(np.int8)
    scores = np.round(rng.random(n), 2)  # ties
    assert len(segments(labels)) > 15
    assert pa_best_f1(scores, labels)["f1"] == pytest.approx(_brute(scores, labels, adjust=True))
    assert best_f1(scores, labels)["f1"] == pytest.approx(_brute(scores, labels, adjust=False))


def test_auc_pr_sanity() -> None:
    labels = np.array([0, 0, 1, 1, 0, 1])
    assert auc_pr(labels * 2.0 + 0.1, labels) == pytest.approx(1.0)
    # one positive ranked last out of 4: precision at its recall point is 1/4
    assert auc_pr([4, 3, 2, 1], [0, 0, 0, 1]) == pytest.approx(0.25)
    rng = np.random.default_rng(0)
    y = (rng.random(20_000) < 0.1).astype(int)
    assert auc_pr(rng.random(y.size), y) == pytest.approx(0.1, abs=0.02)


def test_infinite_scores_rank_highest_or_lowest_in_every_ranking_metric() -> None:
    """AUC-PR raised on an infinite score (sklearn refuses inf) that best-F1 took (review)."""
    inf = math.inf
    assert auc_pr([inf, 0.2, 0.1], [1, 0, 0]) == pytest.approx(1.0)
    assert auc_pr([-inf, 0.2, 0.1], [1, 0, 0]) == pytest.approx(1 / 3)
    assert best_f1([inf, 0.2, 0.1], [1, 0, 0])["f1"] == pytest.approx(1.0)
    assert pa_best_f1([inf, 0.2, 0.1], [1, 0, 0])["f1"] == pytest.approx(1.0)
    m = entity_metrics(np.array([0.1, inf, 0.3, -inf]), np.array([0, 1, 1, 0]), 0.2)
    assert m["auc_pr"] == pytest.approx(1.0) and m["f1_at_threshold"] == pytest.approx(1.0)


def test_hit_rate_examples() -> None:
    gt = {1, 2, 3}
    ranking = [1, 5, 2, 3, 7]
    assert hit_rate(ranking, gt, 1.0) == pytest.approx(2 / 3)  # top 3: 1, 5, 2
    assert hit_rate(ranking, gt, 1.5) == pytest.approx(1.0)  # top int(4.5) = 4
    assert hit_rate([9, 8, 7], gt, 1.0) == 0.0
    assert hit_rate([1, 1, 1, 2, 3], gt, 1.0) == pytest.approx(1.0)  # repeats count once
    assert hit_rate([3, 0], {3}, 1.5) == 1.0  # top int(1.5) = 1
    assert hit_rate([0, 3], {3}, 0.2) == 0.0  # k floored to 0, then at least 1
    assert hit_rate(list(range(100)), set(range(100)), 0.29) == pytest.approx(0.29)  # float guard
    assert math.isnan(hit_rate([1, 2], set(), 1.0))


def test_entity_metrics_keys_and_values() -> None:
    m = entity_metrics(HAND_SCORES, HAND_LABELS, threshold=0.75)
    assert set(ENTITY_METRIC_KEYS) <= set(m)
    assert all(isinstance(v, float) for v in m.values())
    assert m["best_f1"] == pytest.approx(6 / 7)
    assert m["f1_at_threshold"] == pytest.approx(0.8)
    # at the threshold (0.75: the top 2, both positive) and at the best-F1 point (the top 4)
    assert m["precision_at_threshold"] == pytest.approx(1.0)
    assert m["recall_at_threshold"] == pytest.approx(2 / 3)
    assert m["best_precision"] == pytest.approx(0.75) and m["best_recall"] == pytest.approx(1.0)
    assert 0 < m["auc_pr"] <= 1
    assert m["pa_best_f1"] >= m["best_f1"]
    no_thr = entity_metrics(HAND_SCORES, HAND_LABELS)
    assert math.isnan(no_thr["f1_at_threshold"]) and not math.isnan(no_thr["best_f1"])


def test_no_positive_labels_gives_nan_and_summarize_skips_it() -> None:
    m_empty = entity_metrics(np.arange(10.0), np.zeros(10), threshold=5.0)
    assert all(math.isnan(m_empty[k]) for k in ENTITY_METRIC_KEYS)
    assert math.isnan(best_f1(np.arange(3.0), np.zeros(3))["f1"])
    assert math.isnan(pa_best_f1(np.arange(3.0), np.zeros(3))["f1"])
    assert math.isnan(auc_pr(np.arange(3.0), np.zeros(3)))
    m_ok = entity_metrics(HAND_SCORES, HAND_LABELS, threshold=0.75)
    rows = [{"entity": "a", **m_ok}, {"entity": "b", **m_empty}]
    s = summarize(rows)
    assert "entity" not in s
    assert s["best_f1"] == pytest.approx(6 / 7)
    assert s["f1_at_threshold"] == pytest.approx(0.8)
    assert math.isnan(summarize([{"x": float("nan")}])["x"])


def test_markdown_table() -> None:
    rows = [
        {"entity": "m-1", "best_f1": 0.5, "auc_pr": 0.25, "n": 3},
        {"entity": "m-2", "best_f1": float("nan"), "auc_pr": 0.75, "n": 5},
    ]
    text = markdown_table(rows, ["entity", ("best_f1", "best F1"), "auc_pr", "n"], title="SMD")
    lines = text.strip().splitlines()
    assert lines[0] == "### SMD"
    assert lines[2] == "| entity | best F1 | auc_pr | n |"
    assert lines[3] == "|---|---:|---:|---:|"
    assert lines[4] == "| m-1 | 0.500 | 0.250 | 3 |"
    assert lines[5] == "| m-2 | n/a | 0.750 | 5 |"
    assert lines[6] == "| **mean** | 0.500 | 0.500 | 4.0 |"  # a mean count: one decimal


def test_markdown_table_formats_a_column_in_scientific_notation() -> None:
    """Parity errors of 1e-12 or of 2e-4 (above replay's 1e-4 limit) all showed as 0.000."""
    rows = [
        {"entity": "a", "best_f1": 0.5, "parity_max_abs": 8.4e-13},
        {"entity": "b", "best_f1": 0.25, "parity_max_abs": 2e-4},
        {"entity": "c", "best_f1": 0.75, "parity_max_abs": float("nan")},
    ]
    text = markdown_table(rows, ["entity", "best_f1", "parity_max_abs"],
                          formats={"parity_max_abs": ".1e"})
    lines = text.strip().splitlines()
    assert lines[2] == "| a | 0.500 | 8.4e-13 |"
    assert lines[3] == "| b | 0.250 | 2.0e-04 |"
    assert lines[4] == "| c | 0.750 | n/a |"
    # a mean of per-entity maxima reads like the maximum: the cell stays empty
    assert lines[5] == "| **mean** | 0.500 |  |"
    assert summarize(rows) == {"best_f1": 0.5}


def test_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        best_f1([1.0, 2.0], [1])
    with pytest.raises(ValueError):
        point_adjust([1, 0], [1])


def test_ranking_metrics_ignore_differences_below_the_models_precision() -> None:
    """Long runs of equal scores (SMAP channels) perturbed by ~1e-13, as the model's float32
    arithmetic does between micro-batches: best-F1, AUC-PR and PA best-F1 must not move (they
    treated the perturbed values as distinct and moved by up to 0.012 between evaluate and
    replay). A real difference, above float32 precision, still counts."""
    from stream_detector.metrics import auc_pr, best_f1, pa_best_f1

    rng = np.random.default_rng(0)
    base = np.repeat(rng.random(40), 50)  # 40 runs of 50 equal scores
    labels = np.zeros(base.size, dtype=np.int8)
    for a in (120, 700, 1510):
        labels[a : a + 60] = 1
    noisy = base + rng.normal(0, 1e-13, base.size)
    for fn in (auc_pr, lambda s, y: best_f1(s, y)["f1"], lambda s, y: pa_best_f1(s, y)["f1"]):
        assert fn(noisy, labels) == fn(base, labels)
    real = base.copy()
    real[130] += 1e-3 * real[130]  # one row of a labelled segment really scores higher
    assert auc_pr(real, labels) != auc_pr(base, labels)

    # finite scores beyond float32's range: still finite, still ranked (they became inf, which
    # sklearn refuses)
    assert auc_pr([1.0, 2.0, 1e39], [0, 1, 1]) == pytest.approx(1.0)
    assert best_f1([1.0, -1e39, 1e39], [0, 0, 1])["f1"] == 1.0


# Incidents (labelled runs) at rows 10-19, 50-59, 90-94 of 100. Episodes: 5-11 overlaps the
# first (open when it begins: delay 0), 30-34 overlaps none (one false episode in 100 rows =
# 100 per 10k), 55-69 overlaps the second (first open row 55: delay 5). Recall 2/3, precision
# 2/3, F1 2/3; 7 + 5 + 15 = 27 of 100 rows under an open episode; median delay (0 + 5) / 2.
EV_LABELS = np.zeros(100, dtype=np.int8)
EV_LABELS[10:20] = EV_LABELS[50:60] = EV_LABELS[90:95] = 1


def test_episode_metrics_hand_example() -> None:
    m = episode_metrics([(5, 12), (30, 35), (55, 70)], EV_LABELS)
    assert list(m) == list(EPISODE_METRIC_KEYS)
    assert m["incidents"] == 3
    assert m["incident_recall"] == pytest.approx(2 / 3)
    assert m["episode_precision"] == pytest.approx(2 / 3)
    assert m["event_f1"] == pytest.approx(2 / 3)
    assert m["false_episodes_per_10k"] == pytest.approx(100.0)
    assert m["alert_share"] == pytest.approx(0.27)
    assert m["delay_p50"] == pytest.approx(2.5)
    # an episode touching an incident's last row, and one ending just before an incident
    m = episode_metrics([(19, 25), (40, 50)], EV_LABELS)
    assert m["incident_recall"] == pytest.approx(1 / 3) and m["episode_precision"] == 0.5


def test_episode_metrics_edge_cases() -> None:
    none = episode_metrics([], EV_LABELS)  # nothing raised: nothing detected, nothing false
    assert none["incident_recall"] == 0.0 and none["event_f1"] == 0.0
    assert math.isnan(none["episode_precision"]) and none["false_episodes_per_10k"] == 0.0
    assert none["random_event_f1"] == 0.0 and none["alert_share"] == 0.0
    # one episode over everything: perfect by these figures, and so is chance
    all_ = episode_metrics([(0, 100)], EV_LABELS)
    assert all_["event_f1"] == 1.0 and all_["random_event_f1"] == 1.0
    assert all_["delay_p50"] == 0.0
    # no incidents: only the false-episode rate and the share are defined
    quiet = episode_metrics([(0, 3)], np.zeros(10))
    assert quiet["false_episodes_per_10k"] == pytest.approx(1000.0)
    assert quiet["alert_share"] == pytest.approx(0.3)
    assert math.isnan(quiet["event_f1"]) and math.isnan(quiet["random_event_f1"])
    for bad in ([(-1, 3)], [(5, 5)], [(90, 101)]):
        with pytest.raises(ValueError, match="row ranges"):
            episode_metrics(bad, EV_LABELS)


def test_episode_metrics_random_level_matches_its_expectation() -> None:
    """One episode of length 6 on the 100 rows: of its 95 start positions, those overlapping an
    incident are 5-19, 45-59 and 85-94 (15 + 15 + 10 = 40), so its chance precision is 40/95;
    the seeded Monte-Carlo mean is within 0.01 of it and the same for the same seed."""
    m = episode_metrics([(0, 6)], EV_LABELS, draws=20_000, seed=3)
    assert m["random_episode_precision"] == pytest.approx(40 / 95, abs=0.01)
    assert m["random_incident_recall"] == pytest.approx(40 / 95 / 3, abs=0.01)
    again = episode_metrics([(0, 6)], EV_LABELS, draws=20_000, seed=3)
    assert again["random_event_f1"] == m["random_event_f1"]
