"""Detection and interpretation metrics (numpy, plus scikit-learn for average precision).

Conventions, used by every function here:

* A higher score means more anomalous; a row is flagged when ``score >= threshold``.
* ``labels`` are 0/1 per row (any non-zero value counts as 1).
* *best F1* is the best F1 over all thresholds **without** point adjustment; *PA best F1* is the
  same with point adjustment. Point adjustment is very generous (random scores reach 0.76-0.88 on
  SMD/SMAP/MSL), so never report it alone.
* The metrics that rank scores (best F1, AUC-PR, PA best F1) compare them at float32 precision,
  the model's (:func:`_at_model_precision`); F1 at a given threshold uses the scores as they are.
* An entity whose test labels hold no anomaly has no defined recall, F1 or AUC-PR: the
  label-dependent metrics are NaN there, meaning "skip this entity", and :func:`summarize` and
  :func:`markdown_table` average over the entities where the metric is defined.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from stream_detector.records import F32_MAX

NAN = float("nan")

#: The keys of :func:`entity_metrics`, in report order.
ENTITY_METRIC_KEYS: tuple[str, ...] = (
    "best_f1",
    "best_precision",
    "best_recall",
    "precision_at_threshold",
    "recall_at_threshold",
    "f1_at_threshold",
    "auc_pr",
    "pa_best_f1",
)


def _as_arrays(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) != 0
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in length: {s.shape[0]} vs {y.shape[0]}")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    return s, y


def _at_model_precision(s: np.ndarray) -> np.ndarray:
    """Scores rounded to float32 (about 7 significant digits), the precision the model computes
    in, for the metrics that rank scores (best-F1, AUC-PR, PA best-F1). They count equal scores
    as ties, so differences far below that precision used to decide them: the model's float32
    arithmetic varies in its last bits with the micro-batch a window is scored in, and on SMAP
    channels with long constant stretches such noise (~1e-13) moved one channel's PA best-F1
    by 0.012 between ``evaluate`` and ``replay`` for the same scores."""
    # scores beyond float32's range, infinite ones included, rank at its limit: sklearn refuses
    # inf (AUC-PR raised on an infinite score that best-F1 took, found in review)
    return np.clip(s, -F32_MAX, F32_MAX).astype(np.float32).astype(np.float64)


def _original_threshold(orig: np.ndarray, rounded: np.ndarray, t: float) -> float:
    """The threshold ``t`` found on rounded scores, as a value of the original scores: the
    smallest original score whose rounded value reaches ``t`` (rounding keeps the order, so
    ``orig >= it`` flags exactly the rows that ``rounded >= t`` flags)."""
    return float(orig[rounded >= t].min())


def _prf(tp: float, fp: float, fn: float) -> tuple[float, float, float]:
    """Precision, recall, F1 from counts; 0 where a denominator is 0."""
    precision = tp / (tp + fp) if tp + fp > 0 else 0.0
    recall = tp / (tp + fn) if tp + fn > 0 else 0.0
    f1 = 2.0 * tp / (2.0 * tp + fp + fn) if tp > 0 else 0.0
    return float(precision), float(recall), float(f1)


def segments(labels: Any) -> list[tuple[int, int]]:
    """The runs of non-zero labels as ``(start, end_exclusive)`` pairs, in order."""
    y = (np.asarray(labels).reshape(-1) != 0).astype(np.int8)
    if y.size == 0:
        return []
    d = np.diff(np.concatenate(([0], y, [0])))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return [(int(a), int(b)) for a, b in zip(starts, ends, strict=True)]


def f1_at(scores: Any, labels: Any, threshold: float) -> dict[str, float]:
    """F1, precision and recall of ``scores >= threshold`` (no point adjustment)."""
    s, y = _as_arrays(scores, labels)
    pred = s >= threshold
    tp = float(np.count_nonzero(pred & y))
    fp = float(np.count_nonzero(pred & ~y))
    fn = float(np.count_nonzero(~pred & y))
    precision, recall, f1 = _prf(tp, fp, fn)
    return {"f1": f1, "precision": precision, "recall": recall}


def best_f1(scores: Any, labels: Any) -> dict[str, float]:
    """Best F1 over all thresholds, no point adjustment, exact, ``O(n log n)``.

    Sorting the scores in decreasing order, flagging the top ``k`` rows is threshold
    ``t = s_(k)``; ties are handled by only considering ``k`` at the end of a run of equal scores
    (so every candidate is a real threshold). Returns ``f1``, ``precision``, ``recall`` and the
    ``threshold`` (a score value; ``score >= threshold`` is anomalous). With no positive label
    everything is NaN; with no row at all too.
    """
    s, y = _as_arrays(scores, labels)
    orig, s = s, _at_model_precision(s)
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or s.size == 0:
        return {"f1": NAN, "precision": NAN, "recall": NAN, "threshold": NAN}
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    tp = np.cumsum(y[order], dtype=np.int64)
    k = np.arange(1, s.size + 1, dtype=np.int64)
    # Last index of each run of equal scores: flagging stops only between different values.
    last = np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))
    tp_c = tp[last]
    k_c = k[last]
    f1 = 2.0 * tp_c / (k_c + n_pos)
    i = int(np.argmax(f1))
    return {
        "f1": float(f1[i]),
        "precision": float(tp_c[i] / k_c[i]),
        "recall": float(tp_c[i] / n_pos),
        "threshold": _original_threshold(orig, s, float(s_sorted[last[i]])),
    }


def auc_pr(scores: Any, labels: Any) -> float:
    """Area under the precision-recall curve as average precision; NaN without positives."""
    s, y = _as_arrays(scores, labels)
    s = _at_model_precision(s)
    if not y.any():
        return NAN
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y.astype(np.int8), s))


def point_adjust(pred: Any, labels: Any) -> np.ndarray:
    """Standard point adjustment: a labelled segment with any flagged row is flagged entirely.

    Rows outside labelled segments keep their prediction. Returns a bool array.
    """
    p = np.asarray(pred).reshape(-1) != 0
    y = np.asarray(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"pred and labels differ in length: {p.shape[0]} vs {y.shape[0]}")
    out = p.copy()
    for a, b in segments(y):
        if p[a:b].any():
            out[a:b] = True
    return out


def pa_best_f1(scores: Any, labels: Any) -> dict[str, float]:
    """Best F1 over all thresholds with point adjustment, exact, ``O(n log n)``.

    Under point adjustment at threshold ``t`` a segment is entirely a true positive when its
    maximum score is ``>= t`` and entirely a false negative otherwise; false positives are the
    normal rows with ``score >= t``. Lowering ``t`` below a segment maximum only adds false
    positives until the next segment maximum, so the optimum lies at a segment maximum: for each
    of them (sorted), ``TP`` is a cumulative sum of segment lengths and ``FP`` a ``searchsorted``
    in the sorted normal scores. Same keys as :func:`best_f1`; NaN without positives.
    """
    s, y = _as_arrays(scores, labels)
    orig, s = s, _at_model_precision(s)
    segs = segments(y)
    if not segs:
        return {"f1": NAN, "precision": NAN, "recall": NAN, "threshold": NAN}
    lengths = np.array([b - a for a, b in segs], dtype=np.int64)
    # Each segment's own maximum (total work is the number of positive rows).
    seg_max = np.array([s[a:b].max() for a, b in segs], dtype=np.float64)
    n_pos = int(lengths.sum())
    order = np.argsort(-seg_max, kind="stable")
    t_sorted = seg_max[order]
    tp = np.cumsum(lengths[order])
    # Among equal maxima only the last of the run is a real threshold.
    last = np.flatnonzero(np.append(t_sorted[1:] != t_sorted[:-1], True))
    t_c = t_sorted[last]
    tp_c = tp[last]
    normal = np.sort(s[~y])
    fp_c = normal.size - np.searchsorted(normal, t_c, side="left")
    f1 = 2.0 * tp_c / (2.0 * tp_c + fp_c + (n_pos - tp_c))
    i = int(np.argmax(f1))
    return {
        "f1": float(f1[i]),
        "precision": float(tp_c[i] / (tp_c[i] + fp_c[i])),
        "recall": float(tp_c[i] / n_pos),
        "threshold": _original_threshold(orig, s, float(t_c[i])),
    }


def hit_rate(
    predicted_ranked_features: Sequence[int], true_features: Iterable[int], p: float
) -> float:
    """HitRate@P% of a feature ranking against the responsible features (OmniAnomaly, KDD 2019).

    ``HitRate@P% = |top_k(ranking) ∩ GT| / |GT|`` with ``k = int(p * |GT|)``, ``p`` a fraction
    (1.0 for HitRate@100%, 1.5 for HitRate@150%). ``k`` truncates like OmniAnomaly's
    ``int(P% * len(GT))`` (with a 1e-9 guard against float error such as ``0.29 * 100``), and is
    at least 1 so a tiny ``p`` never gives an empty top list (irrelevant for the usual p >= 1).
    Repeated features in the ranking count once (first occurrence). NaN for an empty ``GT``.
    """
    gt = {int(f) for f in true_features}
    if not gt:
        return NAN
    if p <= 0:
        raise ValueError(f"p must be positive, got {p}")
    k = max(1, int(math.floor(p * len(gt) + 1e-9)))
    ranked: list[int] = []
    seen: set[int] = set()
    for f in predicted_ranked_features:
        fi = int(f)
        if fi not in seen:
            seen.add(fi)
            ranked.append(fi)
        if len(ranked) >= k:
            break
    return len(gt.intersection(ranked)) / len(gt)


#: The keys of :func:`episode_metrics`, in report order.
EPISODE_METRIC_KEYS: tuple[str, ...] = (
    "incidents",
    "incident_recall",
    "episode_precision",
    "event_f1",
    "random_event_f1",
    "random_incident_recall",
    "random_episode_precision",
    "false_episodes_per_10k",
    "alert_share",
    "delay_p50",
)


def _covered(episodes: np.ndarray, n: int) -> np.ndarray:
    """Per row: is some episode (rows ``[start, end)``) open there."""
    d = np.zeros(n + 1, dtype=np.int64)
    np.add.at(d, episodes[:, 0], 1)
    np.add.at(d, episodes[:, 1], -1)
    return np.cumsum(d[:-1]) > 0


def _event_counts(episodes: np.ndarray, segs: np.ndarray, n: int) -> tuple[int, int, np.ndarray]:
    """(segments overlapped by an episode, episodes overlapping a segment, covered rows)."""
    cov = _covered(episodes, n) if len(episodes) else np.zeros(n, dtype=bool)
    csum = np.concatenate(([0], np.cumsum(cov)))
    hit_segs = int(np.count_nonzero(csum[segs[:, 1]] - csum[segs[:, 0]])) if len(segs) else 0
    if len(episodes) and len(segs):
        # the first segment ending after an episode's start overlaps it iff it starts before
        # the episode's end (segments are sorted and disjoint)
        j = np.searchsorted(segs[:, 1], episodes[:, 0], side="right")
        ok = j < len(segs)
        true_eps = int(np.count_nonzero(segs[np.minimum(j, len(segs) - 1), 0][ok]
                                        < episodes[ok, 1]))
    else:
        true_eps = 0
    return hit_segs, true_eps, cov


def _event_f1(recall: float, precision: float) -> float:
    if math.isnan(recall):
        return NAN
    if recall == 0.0 or math.isnan(precision) or precision == 0.0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def episode_metrics(episodes: Sequence[tuple[int, int]], labels: Any, draws: int = 100,
                    seed: int = 0) -> dict[str, float]:
    """Event-level metrics of alert episodes (what an on-call team sees), with their chance level.

    ``episodes`` are ``(start, end_exclusive)`` row ranges (an alert's open to its resolve);
    ``labels`` 0/1 per row. An *incident* is a run of labelled rows (:func:`segments`); it is
    detected when an episode overlaps it (an episode already open when it began counts, with
    delay 0). Keys: ``incidents``; ``incident_recall`` (incidents detected / incidents);
    ``episode_precision`` (episodes overlapping an incident / episodes; NaN without episodes);
    ``event_f1`` (their harmonic mean; 0 when nothing is detected); ``false_episodes_per_10k``
    (episodes overlapping no incident per 10,000 rows); ``alert_share`` (the share of rows with
    an episode open); ``delay_p50`` (the median over detected incidents of the rows from the
    incident's start to its first row with an episode open).

    Any overlap counts, so like point adjustment these figures reward long episodes: the
    ``random_*`` keys are the means over ``draws`` placements of episodes with the same lengths
    at uniformly random positions (seeded), the chance level for this alert budget. Without
    incidents every incident-based key is NaN; the false-episode rate and share still count.
    """
    y = np.asarray(labels).reshape(-1)
    n = int(y.size)
    segs = np.asarray(segments(y), dtype=np.int64).reshape(-1, 2)
    eps = np.asarray(list(episodes), dtype=np.int64).reshape(-1, 2)
    if len(eps) and (eps[:, 0].min() < 0 or eps[:, 1].max() > n
                     or (eps[:, 1] <= eps[:, 0]).any()):
        raise ValueError(f"episodes must be non-empty row ranges within [0, {n}]")
    hit, true_eps, cov = _event_counts(eps, segs, n)
    out = dict.fromkeys(EPISODE_METRIC_KEYS, NAN)
    out["incidents"] = float(len(segs))
    out["false_episodes_per_10k"] = (len(eps) - true_eps) / n * 1e4 if n else NAN
    out["alert_share"] = float(cov.mean()) if n else NAN
    if not len(segs):
        return out
    recall = hit / len(segs)
    precision = true_eps / len(eps) if len(eps) else NAN
    out["incident_recall"], out["episode_precision"] = recall, precision
    out["event_f1"] = _event_f1(recall, precision)
    delays = [int(np.argmax(cov[a:b])) for a, b in segs if cov[a:b].any()]
    out["delay_p50"] = float(np.median(delays)) if delays else NAN
    if len(eps):
        rng = np.random.default_rng(seed)
        lengths = eps[:, 1] - eps[:, 0]
        r_rec, r_prec, r_f1 = [], [], []
        for _ in range(draws):
            starts = rng.integers(0, n - lengths + 1)
            h, t, _cov = _event_counts(np.stack([starts, starts + lengths], axis=1), segs, n)
            r_rec.append(h / len(segs))
            r_prec.append(t / len(eps))
            r_f1.append(_event_f1(r_rec[-1], r_prec[-1]))
        out["random_incident_recall"] = float(np.mean(r_rec))
        out["random_episode_precision"] = float(np.mean(r_prec))
        out["random_event_f1"] = float(np.mean(r_f1))
    else:
        out["random_incident_recall"] = out["random_event_f1"] = 0.0
    return out


def entity_metrics(scores: Any, labels: Any, threshold: float | None = None,
                   threshold_scores: Any = None) -> dict[str, float]:
    """One entity's detection metrics, all floats.

    Keys: ``best_f1`` (best over thresholds, no point adjustment) with its ``best_precision``
    and ``best_recall``; ``precision_at_threshold``, ``recall_at_threshold`` and
    ``f1_at_threshold`` (of ``scores >= threshold``: the operating point actually deployed),
    ``auc_pr`` (average precision), ``pa_best_f1`` (best F1 with point adjustment) and
    ``best_threshold`` (the score value giving ``best_f1``). Without positive labels every value
    is NaN (skip the entity); with ``threshold`` None the three threshold metrics are NaN.
    ``threshold_scores``, when given, are the scores the threshold is applied to instead of
    ``scores`` (a baseline's threshold belongs to another fit than its ``scores``).
    """
    s, y = _as_arrays(scores, labels)
    out = dict.fromkeys((*ENTITY_METRIC_KEYS, "best_threshold"), NAN)
    if not y.any():
        return out
    b = best_f1(s, y)
    out["best_f1"] = b["f1"]
    out["best_precision"], out["best_recall"] = b["precision"], b["recall"]
    out["best_threshold"] = b["threshold"]
    if threshold is not None and not math.isnan(threshold):
        at = f1_at(s if threshold_scores is None else threshold_scores, y, threshold)
        out["precision_at_threshold"] = at["precision"]
        out["recall_at_threshold"] = at["recall"]
        out["f1_at_threshold"] = at["f1"]
    out["auc_pr"] = auc_pr(s, y)
    out["pa_best_f1"] = pa_best_f1(s, y)["f1"]
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)


def _nanmean(values: Iterable[Any]) -> float:
    vals = [float(v) for v in values if _is_number(v) and not math.isnan(float(v))]
    return sum(vals) / len(vals) if vals else NAN


#: Per-entity figures whose mean over entities means nothing: a score value on each entity's
#: own scale (the best-F1 threshold) and a per-entity maximum (replay's parity error, whose
#: maximum over entities the report states). :func:`summarize` leaves them out and
#: :func:`markdown_table` leaves their mean cell empty.
NOT_AVERAGED: frozenset[str] = frozenset({"best_threshold", "parity_max_abs"})


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Mean of every numeric key over ``rows`` (one per entity), skipping NaN values.

    Non-numeric values (entity names) and the keys in :data:`NOT_AVERAGED` are left out; a key
    NaN on every row stays NaN. Keys are in first-seen order.
    """
    keys: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k not in keys and k not in NOT_AVERAGED and _is_number(v):
                keys.append(k)
    return {k: _nanmean(row.get(k) for row in rows) for k in keys}


def _fmt(v: Any, spec: str = ".3f") -> str:
    if v is None:
        return ""
    if _is_number(v):
        if isinstance(v, int | np.integer):
            return str(int(v))
        f = float(v)
        return "n/a" if math.isnan(f) else format(f, spec)
    return str(v).replace("|", "\\|")


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str | tuple[str, str]],
    title: str | None = None,
    mean_row: bool = True,
    formats: Mapping[str, str] | None = None,
) -> str:
    """A Markdown table of ``rows`` with a final ``mean`` row (NaN skipped, shown as ``n/a``).

    ``columns`` are row keys, or ``(key, header)`` pairs. Floats get 3 decimals, ints as is;
    ``formats`` maps a key to another format spec for its floats (e.g. ``".1e"`` for figures
    far below 0.001, which 3 decimals would all show as 0.000).
    In the mean row, numeric columns hold the mean over rows (empty for :data:`NOT_AVERAGED`)
    and the first non-numeric column reads ``**mean**``. ``title`` becomes a ``### title``
    line above the table.
    """
    cols = [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]
    spec = {k: (formats or {}).get(k, ".3f") for k, _ in cols}
    lines: list[str] = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(h for _, h in cols) + " |")
    lines.append(
        "|"
        + "|".join("---:" if any(_is_number(r.get(k)) for r in rows) else "---" for k, _ in cols)
        + "|"
    )
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), spec[k]) for k, _ in cols) + " |")
    if mean_row and rows:
        cells: list[str] = []
        labelled = False
        for k, _ in cols:
            if k in NOT_AVERAGED:
                cells.append("")
            elif any(_is_number(r.get(k)) for r in rows):
                counts = all(isinstance(r.get(k), int | np.integer) and not isinstance(
                    r.get(k), bool) for r in rows)  # a mean count: one decimal, not three
                cells.append(_fmt(_nanmean(r.get(k) for r in rows),
                                  ".1f" if counts and k not in (formats or {}) else spec[k]))
            elif not labelled:
                cells.append("**mean**")
                labelled = True
            else:
                cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
