"""PNG figures for reports and docs (matplotlib, object API: no pyplot, no global state).

Figures are built on :class:`matplotlib.figure.Figure` and written with the Agg canvas, so this
module never touches the pyplot state machine or the process-wide backend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stream_detector.metrics import segments

DPI = 110
_LABEL_COLOR = "tab:red"
_ALERT_COLOR = "tab:purple"
_SIGNAL_COLORS = ("tab:blue", "tab:green", "tab:brown")
_BASELINE_COLORS = ("tab:green", "tab:brown", "tab:gray", "tab:olive", "tab:cyan", "tab:pink")


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=DPI, format="png")
    return out


def _alert_ranges(alerts: Sequence[Any] | None) -> list[tuple[int, int]]:
    """Alerts as ``(start, end_exclusive)`` row ranges; a bare row index is a one-row range."""
    out: list[tuple[int, int]] = []
    for a in alerts or ():
        if isinstance(a, int | np.integer):
            out.append((int(a), int(a) + 1))
        else:
            start, end = a
            out.append((int(start), max(int(end), int(start) + 1)))
    return out


def _shade_labels(ax: Any, segs: list[tuple[int, int]], legend: bool) -> None:
    for i, (a, b) in enumerate(segs):
        ax.axvspan(
            a - 0.5,
            b - 0.5,
            color=_LABEL_COLOR,
            alpha=0.15,
            lw=0,
            label="labelled anomaly" if legend and i == 0 else None,
        )


def _normalize(x: np.ndarray) -> np.ndarray:
    """Scale a score to [0, 1] for display, whatever its scale and tail.

    ``log1p((x - min) / median(x - min))`` compresses heavy tails (a PCA error can span twelve
    orders of magnitude), then the 0.5th..99.5th percentiles map to [0, 1] (clipped).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x
    x = x - x.min()
    med = float(np.median(x))
    x = np.log1p(x / med) if med > 0 else x
    lo, hi = np.percentile(x, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(x.min()), float(x.max())
    if not hi > lo:
        return np.zeros_like(x)
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def plot_entity(
    path: str | Path,
    name: str,
    scores: np.ndarray,
    labels: np.ndarray | None,
    threshold: float | None,
    signal: np.ndarray | None = None,
    feature_names: Sequence[str] | None = None,
    alerts: Sequence[Any] | None = None,
    baselines: Mapping[str, np.ndarray] | None = None,
    title: str | None = None,
) -> Path:
    """One PNG for one entity; the x axis is the test row index in every panel.

    * top (when ``signal``, the test rows ``(rows, F)``, is given): the up to 3 features with the
      largest standard deviation over the test rows;
    * middle: the score, the ``threshold`` line, alert ranges (``alerts``: ``(start, end)`` row
      ranges, end exclusive, or single row indices) shaded and marked at their start;
    * bottom (when ``baselines``, name -> scores, is given): each baseline's score on a log
      scale rescaled to [0, 1] (see :func:`_normalize`), for shape comparison only.

    Labelled anomaly ranges (``labels``) are shaded red in every panel. When scores reach more
    than 20 times the threshold, the score axis is linear up to the threshold and logarithmic
    above it; otherwise, when a few extreme scores would flatten the score curve, the y axis is
    cut at a level that keeps the threshold and 99.5 % of the scores visible (either noted in
    the panel). Returns the path written.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = s.size
    x = np.arange(n)
    segs = segments(labels) if labels is not None else []
    alert_ranges = _alert_ranges(alerts)
    has_signal = signal is not None and np.asarray(signal).size > 0
    has_baselines = bool(baselines)
    panels = ["signal"] * has_signal + ["score"] + ["baselines"] * has_baselines
    ratios = {"signal": 2.0, "score": 2.5, "baselines": 1.5}
    fig = Figure(figsize=(12, 7), layout="constrained")
    axes = fig.subplots(
        len(panels), 1, sharex=True, squeeze=False, height_ratios=[ratios[p] for p in panels]
    )[:, 0]
    by_panel = dict(zip(panels, axes, strict=True))
    fig.suptitle(title or name, fontsize=12)

    if has_signal:
        ax = by_panel["signal"]
        sig = np.asarray(signal, dtype=np.float64)
        sig = sig.reshape(-1, 1) if sig.ndim == 1 else sig
        std = np.nan_to_num(sig.std(axis=0), nan=0.0)
        top = [int(i) for i in np.argsort(-std, kind="stable")[: min(3, sig.shape[1])]]
        for c, i in enumerate(top):
            fname = (
                feature_names[i] if feature_names is not None and i < len(feature_names) else None
            )
            ax.plot(
                np.arange(len(sig)),
                sig[:, i],
                lw=0.7,
                label=fname or f"feature {i}",
                color=_SIGNAL_COLORS[c % len(_SIGNAL_COLORS)],
            )
        _shade_labels(ax, segs, legend=True)
        ax.set_ylabel("value")
        ax.set_title("signal: most variable features", fontsize=9, loc="left")
        ax.legend(loc="upper right", fontsize=8, ncols=4)

    ax = by_panel["score"]
    ax.plot(x, s, lw=0.7, color="tab:blue", label="score")
    thr = float("nan") if threshold is None else float(threshold)
    thr_ok = math.isfinite(thr)
    if thr_ok:
        ax.axhline(thr, color="black", ls="--", lw=1.0, label=f"threshold {thr:.3g}")
    _shade_labels(ax, segs, legend=True)
    peak = float(s.max()) if n else float("nan")
    if n and thr_ok and thr > 0 and float(s.min()) >= 0 and math.isfinite(peak) and peak > 20 * thr:
        # scores spanning orders of magnitude above the threshold (many long anomalies, where
        # no axis cut helps): linear up to the threshold, logarithmic above it
        ax.set_yscale("symlog", linthresh=thr, linscale=1.0)
        ax.set_ylim(0, peak * 1.3)
        ax.text(0.005, 0.97, f"y axis logarithmic above the threshold (max {s.max():.3g})",
                fontsize=7, transform=ax.transAxes, va="top")
    elif n:
        q = float(np.percentile(s, 99.5))
        cap = max(q * 1.25, thr * 1.5 if thr_ok else q)
        lo = float(s.min())
        if float(s.max()) > cap > lo and (float(s.max()) - lo) > 4 * (cap - lo):
            ax.set_ylim(lo - 0.02 * (cap - lo), cap)
            ax.text(
                0.005,
                0.97,
                f"y axis cut at {cap:.3g} (max {s.max():.3g})",
                fontsize=7,
                transform=ax.transAxes,
                va="top",
            )
    for a, b in alert_ranges:
        ax.axvspan(a - 0.5, b - 0.5, color=_ALERT_COLOR, alpha=0.25, lw=0)
        ax.axvline(a, color=_ALERT_COLOR, lw=0.8, alpha=0.8)
    if alert_ranges:
        starts = [a for a, _ in alert_ranges]
        ax.plot(
            starts,
            [1.0] * len(starts),
            ls="none",
            marker="v",
            color=_ALERT_COLOR,
            ms=7,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            label=f"alert ({len(alert_ranges)})",
        )
    ax.set_ylabel("anomaly score")
    ax.legend(loc="upper right", fontsize=8, ncols=4)

    if has_baselines and baselines is not None:
        ax = by_panel["baselines"]
        for c, (bname, bscores) in enumerate(baselines.items()):
            curve = _normalize(np.asarray(bscores, dtype=np.float64).reshape(-1))
            color = _BASELINE_COLORS[c % len(_BASELINE_COLORS)]
            ax.plot(np.arange(curve.size), curve, lw=0.6, alpha=0.85, label=str(bname), color=color)
        _shade_labels(ax, segs, legend=False)
        ax.set_ylabel("baselines\n(log, rescaled)")
        ax.set_ylim(-0.05, 1.05)
        ax.legend(loc="upper right", fontsize=8, ncols=4)

    axes[-1].set_xlabel("test row")
    if n:
        axes[-1].set_xlim(-0.5, n - 0.5)
    return _save(fig, path)


def plot_bars(
    path: str | Path,
    table_rows: Sequence[Mapping[str, Any]],
    metric: str,
    title: str,
    method_key: str = "method",
    group_key: str | None = None,
) -> Path:
    """Grouped bar chart of ``metric``: one bar per method within each group.

    ``table_rows`` are dicts holding ``method_key`` and ``metric``; the group is ``group_key``,
    by default ``dataset`` or else ``entity`` when the rows have it, otherwise one group. Values
    are written above the bars; NaN is drawn as a missing bar. Returns the path written.
    """
    rows = list(table_rows)
    if group_key is None:
        group_key = next((k for k in ("dataset", "entity") if any(k in r for r in rows)), None)
    methods: list[str] = []
    groups: list[str] = []
    values: dict[tuple[str, str], float] = {}
    for r in rows:
        m = str(r[method_key])
        g = str(r.get(group_key, "")) if group_key else ""
        if m not in methods:
            methods.append(m)
        if g not in groups:
            groups.append(g)
        v = r.get(metric)
        values[(g, m)] = float(v) if v is not None else math.nan
    width = 0.8 / max(1, len(methods))
    fig = Figure(
        figsize=(max(6.0, 1.2 + 1.6 * len(groups) * max(1, len(methods)) * 0.45), 4.5),
        layout="constrained",
    )
    ax = fig.subplots()
    xs = np.arange(len(groups))
    for j, m in enumerate(methods):
        vals = np.array([values.get((g, m), math.nan) for g in groups])
        pos = xs - 0.4 + width * (j + 0.5)
        bars = ax.bar(pos, np.nan_to_num(vals, nan=0.0), width * 0.92, label=m)
        for bar, v in zip(bars, vals, strict=True):
            if math.isfinite(v):
                ax.annotate(
                    f"{v:.3f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                    xytext=(0, 1),
                    textcoords="offset points",
                )
            else:
                bar.set_visible(False)
    ax.set_xticks(xs, groups if any(groups) else [""])
    ax.set_ylabel(metric)
    finite = [v for v in values.values() if math.isfinite(v)]
    top = max(finite) if finite else 1.0
    ax.set_ylim(0, top * 1.18 if top > 0 else 1.0)
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=min(4, max(1, len(methods))), loc="upper left")
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
