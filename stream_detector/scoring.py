"""Scores, thresholds and alert levels (numpy only; shared by trainer, evaluation and consumer).

Direction, stated once for the whole package: **a higher score means more anomalous.**

* :class:`ScoreFunction` turns the model's per-feature squared errors into the two error terms,
  the weighted score and per-feature contributions (which sum to the score).
* :func:`smooth` averages the last ``k`` window scores of a sensor (offline; the detector computes
  the same numbers online, a batch of windows of many sensors at a time).
* :func:`long_term` is the score's long-term term (offline; the detector computes the same
  numbers online), fitted on validation scores by :func:`fit_long_term`.
* Thresholds are fitted on validation scores only: :func:`fit_threshold`.
* :class:`EpisodeTracker` turns a score stream into alert events with hysteresis, so one anomaly
  episode gives one ``open`` event, rate-limited ``update`` events and one ``resolve`` event.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from stream_detector.manifest import LongTermSpec, Manifest, ScoreSpec

EPS = 1e-12


@dataclass(frozen=True)
class ScoredWindows:
    """Score terms for a batch of windows; arrays are float64, ``(B,)`` or ``(B, F)``."""

    reconstruction: np.ndarray
    forecast: np.ndarray
    score: np.ndarray
    contributions: np.ndarray


class ScoreFunction:
    """``score = w_rec * mean_f(rec_err_f / rec_scale_f) + w_fc * mean_f(fc_err_f / fc_scale_f)``

    The scales are the sensor's own (``ScoreSpec.per_sensor``) or the global ones; the mean over
    features is weighted by ``ScoreSpec.feature_weights`` when the artifact has them. Call with
    ``rows`` (one :meth:`row` per window, or a single row for all of them) to use per-sensor
    scales; without it every window gets the global scales.
    """

    def __init__(self, spec: ScoreSpec) -> None:
        self.spec = spec
        names = list(spec.per_sensor)
        self._rows = {name: i + 1 for i, name in enumerate(names)}  # row 0: global scales
        rec = [spec.rec_scale] + [spec.per_sensor[n]["rec"] for n in names]
        fc = [spec.fc_scale] + [spec.per_sensor[n]["fc"] for n in names]
        self._rec_inv = 1.0 / np.maximum(np.asarray(rec, dtype=np.float64), EPS)
        self._fc_inv = 1.0 / np.maximum(np.asarray(fc, dtype=np.float64), EPS)
        w = np.asarray(spec.feature_weights, dtype=np.float64)
        self._weights = w / w.sum() if w.size else None

    def row(self, sensor: str) -> int:
        """Index of ``sensor``'s scales (0 = the global ones: sensors unseen in training or with
        too few validation windows)."""
        return self._rows.get(sensor, 0)

    def __call__(
        self,
        rec_err: np.ndarray,
        fc_err: np.ndarray,
        rows: int | Sequence[int] | np.ndarray | None = None,
    ) -> ScoredWindows:
        if rows is None or len(self._rows) == 0:
            rec_inv, fc_inv = self._rec_inv[0], self._fc_inv[0]
        else:
            idx = np.asarray(rows, dtype=np.intp)
            rec_inv, fc_inv = self._rec_inv[idx], self._fc_inv[idx]
        rec_n = np.asarray(rec_err, dtype=np.float64) * rec_inv
        fc_n = np.asarray(fc_err, dtype=np.float64) * fc_inv
        w_rec, w_fc = self.spec.w_rec, self.spec.w_fc
        if self._weights is None:
            n_features = rec_n.shape[1]
            contrib = (w_rec * rec_n + w_fc * fc_n) / n_features
            rec_term = rec_n.mean(axis=1)
            fc_term = fc_n.mean(axis=1)
        else:
            wts = self._weights
            contrib = (w_rec * rec_n + w_fc * fc_n) * wts
            # summed row by row: a matrix product's rounding depends on how many rows the
            # call has, so a window's score differed in its last bits with the micro-batch it
            # landed in (and from the offline reference; found in review)
            rec_term = (rec_n * wts).sum(axis=1)
            fc_term = (fc_n * wts).sum(axis=1)
        score = w_rec * rec_term + w_fc * fc_term
        return ScoredWindows(rec_term, fc_term, score, contrib)


def smooth(raw: np.ndarray, k: int) -> np.ndarray:
    """Trailing mean of the last ``k`` values (fewer at the start), exactly as the detector
    smooths online: each window's ``k`` values summed oldest to newest (zeros before the
    first value), so equal raw scores give equal smoothed scores, bit for bit."""
    raw = np.asarray(raw, dtype=np.float64)
    if k <= 1 or raw.size == 0:
        return raw.copy()
    # each mean sums its own k values (differences of a running sum left ~1e-13 of noise,
    # which the metrics' tie handling turned into different best-F1 / AUC-PR for evaluate and
    # replay); the first k - 1 sum zeros first, as the detector's ring before it is full
    padded = np.concatenate([np.zeros(k - 1), raw])
    return sliding_window_view(padded, k).sum(axis=1) / np.minimum(np.arange(1, raw.size + 1), k)


def long_term(raw: np.ndarray, threshold: float, alpha: float, start: float) -> np.ndarray:
    """The long-term level ``L`` after each window (see
    :class:`~stream_detector.manifest.LongTermSpec`): an EWMA of ``min(raw, threshold)``
    started at ``start``, one window at a time in double precision, ``L = L + alpha * (x - L)``,
    the operations the detector does online, so the two agree bit for bit."""
    clipped = np.minimum(np.asarray(raw, dtype=np.float64), threshold).tolist()
    out = np.empty(len(clipped))
    level, a = float(start), float(alpha)
    for i, x in enumerate(clipped):
        level = level + a * (x - level)
        out[i] = level
    return out


def long_term_gain(threshold: float, level: float, start: float) -> float:
    """Factor that puts ``L`` in score units: ``(L - start) * gain`` is 0 at the sensor's
    usual level and reaches ``threshold`` when ``L`` reaches ``level``."""
    return float(threshold) / (float(level) - float(start))


def long_term_units(levels: np.ndarray, start: float | np.ndarray,
                    gain: float | np.ndarray) -> np.ndarray:
    """Levels ``L`` in score units, ``max(0, (L - start) * gain)``: the operations offline
    and online scoring share (per sensor, or per window with arrays)."""
    return np.maximum((levels - start) * gain, 0.0)


def long_term_term(levels: np.ndarray, threshold: float, start: float,
                   level: float) -> np.ndarray:
    """The long-term term in score units of a sensor's levels ``L``."""
    return long_term_units(levels, start, long_term_gain(threshold, level, start))


def with_long_term(short: np.ndarray, raw: np.ndarray, threshold: float, spec: LongTermSpec | None,
                   sensor: str) -> np.ndarray:
    """A sensor's reported scores: ``max(short, long-term term)`` from its first window on
    (the short-term scores unchanged when ``spec`` is None)."""
    if spec is None:
        return short
    start, level = spec.for_sensor(sensor)
    levels = long_term(raw, threshold, spec.alpha, start)
    return np.maximum(short, long_term_term(levels, threshold, start, level))


def long_term_words(manifest: Manifest) -> str:
    """How a report names the artifact's long-term term."""
    lt = manifest.score.long_term
    return "no long-term term" if lt is None else f"long-term term alpha {lt.alpha:g}"


def fit_long_term(raw: dict[str, np.ndarray], thresholds: dict[str, float], alpha: float,
                  q: float, min_windows: int, default_threshold: float) -> LongTermSpec:
    """Fit the long-term term on validation scores (no labels): ``raw[sensor]``, the sensor's
    raw window scores in time order; ``thresholds[sensor]``, its threshold;
    ``default_threshold``, the threshold of sensors without their own.

    ``start``: the mean of the sensor's clipped scores; ``level``: the ``q`` quantile of ``L``
    over its validation windows, with ``L`` started at ``start`` as a consumer starts a sensor,
    and at least ``start + alpha * threshold``: from its usual level no single window can
    raise the term to the threshold (one window moves ``L`` by less than ``alpha *
    threshold``), however little ``L`` varied on validation (a channel whose validation
    scores were constant would otherwise alert on the smallest rise).
    Sensors with fewer than ``min_windows`` windows get the figures of all sensors together
    (the mean of all clipped scores; the quantile of all sensors' ``L``), as does a sensor
    unseen in training."""
    if not raw:
        raise ValueError("cannot fit the long-term term on zero sensors")
    clipped = {n: np.minimum(np.asarray(r, dtype=np.float64), thresholds[n])
               for n, r in raw.items()}
    every = np.concatenate(list(clipped.values()))
    if every.size == 0:
        raise ValueError("cannot fit the long-term term on zero windows")
    start_all = float(every.mean())
    own = {n: len(c) >= min_windows for n, c in clipped.items()}
    starts = {n: float(c.mean()) if own[n] else start_all for n, c in clipped.items()}
    levels = {n: long_term(raw[n], thresholds[n], alpha, starts[n]) for n in raw}
    pooled = float(np.quantile(np.concatenate(list(levels.values())), q))

    def above(level: float, start: float, threshold: float) -> float:
        return max(level, start + alpha * threshold)

    per_sensor = {n: {"start": starts[n],
                      "level": above(float(np.quantile(levels[n], q)), starts[n],
                                     thresholds[n])}
                  for n in raw if own[n]}
    return LongTermSpec(alpha=float(alpha), quantile=float(q), start=start_all,
                        level=above(pooled, start_all, default_threshold),
                        per_sensor=per_sensor)


def fit_threshold(
    scores: np.ndarray, method: str = "quantile", q: float = 0.995, margin: float = 1.0
) -> float:
    """Fit a threshold on validation scores (assumed mostly normal; no labels are used).

    ``quantile``: the ``q`` quantile times ``margin``. ``pot``: peaks over threshold, a
    generalised Pareto tail fitted above the 0.98 quantile, solved for exceedance risk ``1 - q``
    (Siffer et al., KDD 2017); falls back to the quantile when the tail fit is degenerate.
    """
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    if s.size == 0:
        raise ValueError("cannot fit a threshold on zero finite scores")
    return _above_ties(s, _tail_point(s, method, q) * margin, q)


def _tail_point(s: np.ndarray, method: str, q: float) -> float:
    """:func:`fit_threshold` before its margin: the ``q`` quantile of the finite scores ``s``,
    or with ``pot`` the tail fit's point (the quantile when the fit is degenerate)."""
    base = float(np.quantile(s, q))
    if method == "quantile":
        return base
    if method == "pot":
        from scipy.stats import genpareto

        t = float(np.quantile(s, 0.98))
        peaks = s[s > t] - t
        if peaks.size < 20 or np.ptp(peaks) <= 0:
            return base
        shape, _, scale = genpareto.fit(peaks, floc=0.0)
        risk = 1.0 - q
        ratio = risk * s.size / peaks.size
        if abs(shape) < 1e-6:
            z = t - scale * np.log(ratio)
        else:
            z = t + scale / shape * (ratio ** (-shape) - 1.0)
        if not np.isfinite(z) or z <= 0:
            return base
        return float(z)
    raise ValueError(f"unknown threshold method {method!r}; use 'quantile' or 'pot'")


#: How far above tied validation scores :func:`_above_ties` moves a threshold, relative: above
#: the last bits in which a window's float32 errors differ between model calls.
TIE_STEP = 1e-6


def _above_ties(s: np.ndarray, thr: float, q: float) -> float:
    """``thr``, or just above it when validation scores tie at it and more of them reach it
    than the quantile allows (a sensor idle or stuck for its whole validation period scores
    the same on every window: its quantile is that score, and since a window alerts at
    ``score >= threshold`` it then alerted on every window that behaved exactly as in
    training). Continuous scores never change: at most one window more than ``(1 - q) n`` can
    reach an interpolated quantile."""
    if np.count_nonzero(s == thr) and np.count_nonzero(s >= thr) > (1.0 - q) * s.size + 1:
        return thr + abs(thr) * TIE_STEP if thr != 0 else float(np.nextafter(0.0, 1.0))
    return thr


class Level(enum.IntEnum):
    NORMAL = 0
    WARNING = 1
    CRITICAL = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class EventKind(enum.StrEnum):
    OPEN = "open"
    UPDATE = "update"
    RESOLVE = "resolve"


_NORMAL, _WARNING, _CRITICAL = Level.NORMAL, Level.WARNING, Level.CRITICAL
_OPEN, _UPDATE, _RESOLVE = EventKind.OPEN, EventKind.UPDATE, EventKind.RESOLVE


@dataclass(frozen=True)
class Event:
    kind: EventKind
    level: Level
    episode_start_ms: int
    peak_score: float


@dataclass(frozen=True)
class Hysteresis:
    warning_ratio: float = 1.0
    critical_ratio: float = 2.0
    clear_ratio: float = 0.8
    clear_after: int = 10
    update_interval_ms: int = 60_000


class EpisodeTracker:
    """Per-sensor alert state machine with hysteresis (a few dozen bytes per sensor).

    * ``open``: the score reaches ``warning_ratio * threshold`` (level warning, or critical if it
      reaches ``critical_ratio * threshold``) while no episode is open.
    * ``update``: while open, the level escalates (sent at once) or, at most once per
      ``update_interval_ms`` of reading time, the peak score rose since the last event.
    * ``resolve``: ``clear_after`` consecutive windows below ``clear_ratio * threshold``.
    Time is the reading's timestamp, so replays and live streams behave the same.
    """

    __slots__ = ("open", "level", "start_ms", "below", "last_event_ms", "peak", "peak_sent")

    def __init__(self) -> None:
        self.open = False
        self.level = Level.NORMAL
        self.start_ms = 0
        self.below = 0
        self.last_event_ms = 0
        self.peak = 0.0
        self.peak_sent = 0.0

    def step(self, ts_ms: int, score: float, threshold: float, h: Hysteresis) -> Event | None:
        ratio = score / threshold if threshold > 0 else float("inf")
        if ratio >= h.critical_ratio:
            level = _CRITICAL
        elif ratio >= h.warning_ratio:
            level = _WARNING
        else:
            level = _NORMAL
        if not self.open:
            if level == _NORMAL:
                return None
            self.open, self.level, self.start_ms = True, level, ts_ms
            self.below, self.last_event_ms = 0, ts_ms
            self.peak = self.peak_sent = score
            return Event(_OPEN, level, ts_ms, score)
        self.peak = max(self.peak, score)
        if ratio < h.clear_ratio:
            self.below += 1
            if self.below >= h.clear_after:
                event = Event(_RESOLVE, _NORMAL, self.start_ms, self.peak)
                self.open, self.level, self.below = False, _NORMAL, 0
                return event
            return None
        self.below = 0
        if level > self.level:
            self.level, self.last_event_ms, self.peak_sent = level, ts_ms, self.peak
            return Event(_UPDATE, level, self.start_ms, self.peak)
        if self.peak > self.peak_sent and ts_ms - self.last_event_ms >= h.update_interval_ms:
            self.last_event_ms, self.peak_sent = ts_ms, self.peak
            return Event(_UPDATE, self.level, self.start_ms, self.peak)
        return None
