"""Message shapes on the wire (JSON: written with orjson; read with msgspec on the batch
path, orjson otherwise) and their validation.

Every message carries ``schema_version``. Input readings (topic ``SD_KAFKA__INPUT_TOPIC``)::

    {"schema_version": 1, "sensor": "machine-1-1", "ts": 1700000000000,
     "values": [0.12, 0.5, ...]}                      # in manifest feature order, or
     "values": {"cpu": 0.12, "mem": 0.5, ...}         # keyed by feature name

``ts`` is epoch milliseconds (integer). The Kafka key should be the sensor id so one sensor's
readings stay ordered on one partition. Decoding problems raise :class:`BadRecord` with a
machine-readable ``reason`` (one of :data:`REASONS`) used for the dead-letter topic and metrics.
See docs/messages.md for alerts, score records and dead-letter records.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import attrgetter, itemgetter
from typing import Any

import msgspec
import numpy as np
import orjson

SCHEMA_VERSION = 1

REASONS = (
    "oversized",
    "malformed_json",
    "not_an_object",
    "unknown_schema_version",
    "missing_field",
    "bad_sensor",
    "bad_timestamp",
    "wrong_value_count",
    "unknown_feature",
    "non_numeric",
    "non_finite",
    "late_or_duplicate",
    "sensor_limit",
    "internal_error",
)


class BadRecord(Exception):
    """A record that cannot be processed; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Reading:
    """One reading of one sensor. ``ref`` is an opaque token of the driver (e.g. an offset)."""

    sensor: str
    ts_ms: int
    values: np.ndarray
    ref: Any = None


#: The largest float32 magnitude: a value beyond it becomes inf in a float32 window.
F32_MAX = float(np.finfo(np.float32).max)
_NUMBER_TYPES = frozenset((int, float))
# how orjson words its refusal of a number beyond double range, e.g. 1e400 (orjson 3.x)
_ORJSON_OVERFLOW = "number is infinity when parsed as double"


def _not_json(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


def _loads_overflowing(raw: bytes) -> Any:
    """Parse a record orjson refused for a number beyond double range, with such numbers as
    infinity (json reads them so; longer integers become floats, as orjson makes them), so that
    the usual checks name the record's problem. Only ever used to pick a :class:`BadRecord`
    reason, never to accept a record. Not JSON beyond the overflow either: ``malformed_json``."""
    try:
        return json.loads(raw, parse_constant=_not_json,
                          parse_int=lambda s: int(s) if len(s) <= 20 else float(s))
    except Exception as err:  # noqa: BLE001 - not JSON (or nested too deep for json)
        raise BadRecord("malformed_json", str(err)[:200]) from None


class _CleanReading(msgspec.Struct, forbid_unknown_fields=True):
    """The common shape of a reading, for the batch path: msgspec checks the types while it
    parses (strings, booleans, null or nested lists in ``values``, a non-integer ``ts`` all
    fail), so no second pass over the values is needed. Anything else fails to decode and the
    batch goes down the general path."""

    sensor: str
    ts: int
    values: list[float]
    schema_version: int = SCHEMA_VERSION


class _KeyedReading(msgspec.Struct, forbid_unknown_fields=True):
    """The same with ``values`` keyed by feature name (the other documented shape)."""

    sensor: str
    ts: int
    values: dict[str, float]
    schema_version: int = SCHEMA_VERSION


_decode_clean = msgspec.json.Decoder(_CleanReading).decode
_decode_keyed = msgspec.json.Decoder(_KeyedReading).decode
_CLEAN_FIELDS = attrgetter("sensor", "ts", "values", "schema_version")


class DecodedBatch:
    """What :meth:`ReadingDecoder.decode_many` made of ``n`` raw records.

    ``index[j]`` is the input position of good reading ``j``: ``sensors[j]``, ``ts_ms[j]``,
    ``values[j]`` (float32, ``(len(index), F)``). ``bad`` lists ``(position, BadRecord)``.
    """

    __slots__ = ("index", "sensors", "ts_ms", "values", "bad")

    def __init__(self, index: list[int], sensors: list[str], ts_ms: list[int],
                 values: np.ndarray, bad: list[tuple[int, BadRecord]]) -> None:
        self.index = index
        self.sensors = sensors
        self.ts_ms = ts_ms
        self.values = values
        self.bad = bad


class ReadingDecoder:
    """Decode and validate input readings against the manifest's feature list."""

    def __init__(self, features: tuple[str, ...], max_bytes: int = 65_536) -> None:
        self.features = features
        self.n = len(features)
        self.index = {name: i for i, name in enumerate(features)}
        self.max_bytes = max_bytes
        # a reading's values keyed by name -> in manifest order (KeyError for a missing name)
        self._in_order: Callable[[dict[str, float]], tuple[float, ...]] = (
            itemgetter(*features) if len(features) > 1
            else (lambda d: tuple(d[f] for f in features)))

    def decode(self, raw: bytes | None, ref: Any = None) -> Reading:
        if raw is None:
            raise BadRecord("malformed_json", "empty message (tombstone)")
        if len(raw) > self.max_bytes:
            raise BadRecord("oversized", f"{len(raw)} bytes > limit {self.max_bytes}")
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if not str(exc).startswith(_ORJSON_OVERFLOW):
                raise BadRecord("malformed_json", str(exc)[:200]) from None
            # a number beyond double range (1e400): valid JSON that orjson (and msgspec) refuse.
            # Never accepted; checked as usual to name the problem: non_finite in the values
            self._check(_loads_overflowing(raw), ref)
            raise BadRecord("non_finite", "a number is beyond double range") from None
        return self._check(obj, ref)

    def _check(self, obj: Any, ref: Any) -> Reading:
        if not isinstance(obj, dict):
            raise BadRecord("not_an_object", f"top level is {type(obj).__name__}")
        version = obj.get("schema_version", SCHEMA_VERSION)
        # type check first: True == 1.0 == 1 in Python, yet neither is schema version 1
        if type(version) is not int or version != SCHEMA_VERSION:
            raise BadRecord("unknown_schema_version", f"{version!r}, expected {SCHEMA_VERSION}")
        for key in ("sensor", "ts", "values"):
            if key not in obj:
                raise BadRecord("missing_field", f"field {key!r} is missing")
        sensor = obj["sensor"]
        if not isinstance(sensor, str) or not sensor or len(sensor) > 256:
            raise BadRecord("bad_sensor", "sensor must be a non-empty string of <= 256 chars")
        ts = obj["ts"]
        if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts < 2**63:
            raise BadRecord("bad_timestamp", f"ts must be a non-negative integer (ms), got {ts!r}")
        return Reading(sensor, ts, self._values(obj["values"]), ref)

    def decode_many(self, raws: list[bytes | None]) -> DecodedBatch:
        """Decode a batch; the same readings and the same :class:`BadRecord` reasons as
        :meth:`decode` per record. The common shape (values as a list of numbers) is checked
        and converted for the whole batch at once; anything else goes through :meth:`decode`."""
        try:
            clean = self._clean_batch(raws)
        except Exception:  # noqa: BLE001 - some record is not clean: the general path below
            clean = None
        if clean is not None:
            return clean
        loads, n, max_bytes = orjson.loads, self.n, self.max_bytes
        index: list[int] = []
        sensors: list[str] = []
        stamps: list[int] = []
        rows: list[Any] = []
        slow: list[int] = []
        for i, raw in enumerate(raws):
            try:
                if raw is None or len(raw) > max_bytes:
                    raise ValueError
                obj = loads(raw)
                version = obj.get("schema_version", SCHEMA_VERSION)
                if type(version) is not int or version != SCHEMA_VERSION:
                    raise ValueError
                sensor, ts, values = obj["sensor"], obj["ts"], obj["values"]
                if not (type(sensor) is str and 0 < len(sensor) <= 256 and type(ts) is int
                        and 0 <= ts < 2**63 and type(values) is list and len(values) == n):
                    raise ValueError
            except Exception:  # noqa: BLE001 - decode() below names the exact problem
                slow.append(i)
                continue
            index.append(i)
            sensors.append(sensor)
            stamps.append(ts)
            rows.append(values)
        if rows and not _NUMBER_TYPES.issuperset(map(type, chain.from_iterable(rows))):
            slow.extend(index)  # some value is not a number: let decode() find which
            index, sensors, stamps, rows = [], [], [], []
        wide = np.array(rows, dtype=np.float64).reshape(len(rows), n)
        bad: list[tuple[int, BadRecord]] = []
        if len(rows):
            finite = np.abs(wide).max(axis=1) <= F32_MAX if n else np.ones(len(rows), bool)
            if not finite.all():
                for j in np.flatnonzero(~finite).tolist():
                    bad.append((index[j], BadRecord(
                        "non_finite", "values hold NaN, infinity or exceed float32 range")))
                keep = finite.tolist()
                index = [x for x, k in zip(index, keep, strict=True) if k]
                sensors = [x for x, k in zip(sensors, keep, strict=True) if k]
                stamps = [x for x, k in zip(stamps, keep, strict=True) if k]
                wide = wide[finite]
        values = wide.astype(np.float32)
        if slow:
            return self._merge(raws, slow, index, sensors, stamps, values, bad)
        return DecodedBatch(index, sensors, stamps, values, bad)

    def _clean_batch(self, raws: list[bytes | None]) -> DecodedBatch | None:
        """All-or-nothing: every record a JSON object with schema 1, a valid sensor and ts, and
        ``values`` a list of ``F`` finite numbers. msgspec checks the types while parsing
        (:class:`_CleanReading`), the ranges are checked column by column. None (or an
        exception) sends the batch down the general path."""
        if not raws or None in raws or max(map(len, raws)) > self.max_bytes:  # type: ignore[arg-type]
            return None
        try:
            objs: list[Any] = list(map(_decode_clean, raws))  # type: ignore[arg-type]
            keyed = False
        except msgspec.ValidationError:  # not the list form: values keyed by name, or bad
            objs = list(map(_decode_keyed, raws))  # type: ignore[arg-type]
            keyed = True
        sensors, stamps, rows, versions = zip(*map(_CLEAN_FIELDS, objs), strict=True)
        if set(versions) != {SCHEMA_VERSION}:
            return None
        if min(map(len, sensors)) < 1 or max(map(len, sensors)) > 256:
            return None
        if min(stamps) < 0 or max(stamps) >= 2**63:
            return None
        if set(map(len, rows)) != {self.n}:
            return None
        if keyed:  # n names, each a feature (a KeyError otherwise): exactly the features
            rows = tuple(map(self._in_order, rows))
        wide = np.array(rows, dtype=np.float64).reshape(len(rows), self.n)
        if wide.size and not np.abs(wide).max() <= F32_MAX:
            return None
        return DecodedBatch(list(range(len(raws))), list(sensors), list(stamps),
                            wide.astype(np.float32), [])

    def _merge(self, raws: list[bytes | None], slow: list[int], index: list[int],
               sensors: list[str], stamps: list[int], values: np.ndarray,
               bad: list[tuple[int, BadRecord]]) -> DecodedBatch:
        """Decode the records the fast path set aside one by one and merge, in input order."""
        extra: list[tuple[int, Reading]] = []
        for i in slow:
            try:
                extra.append((i, self.decode(raws[i])))
            except BadRecord as exc:
                bad.append((i, exc))
            except Exception as exc:  # noqa: BLE001 - a record must never stop the partition
                bad.append((i, BadRecord("internal_error", f"{type(exc).__name__}: {exc}"[:300])))
        bad.sort(key=lambda x: x[0])
        if not extra:
            return DecodedBatch(index, sensors, stamps, values, bad)
        pos = index + [i for i, _ in extra]
        order = sorted(range(len(pos)), key=pos.__getitem__)
        all_sensors = sensors + [r.sensor for _, r in extra]
        all_ts = stamps + [r.ts_ms for _, r in extra]
        all_values = np.concatenate([values, np.stack([r.values for _, r in extra])])
        return DecodedBatch([pos[k] for k in order], [all_sensors[k] for k in order],
                            [all_ts[k] for k in order], all_values[order], bad)

    def _values(self, values: Any) -> np.ndarray:
        if isinstance(values, dict):
            unknown = [k for k in values if k not in self.index]
            if unknown:
                raise BadRecord("unknown_feature", f"unknown features {unknown[:5]}")
            if len(values) != self.n:
                missing = [f for f in self.features if f not in values]
                raise BadRecord("wrong_value_count", f"missing features {missing[:5]}")
            values = [values[f] for f in self.features]
        elif not isinstance(values, list):
            raise BadRecord("non_numeric", "values must be a list or an object")
        if len(values) != self.n:
            raise BadRecord("wrong_value_count", f"got {len(values)} values, expected {self.n}")
        # fast path: JSON numbers decode to exactly int or float (bool is its own type); only
        # when another type shows up, walk the values to name the first offender
        if not _NUMBER_TYPES.issuperset(map(type, values)):
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise BadRecord("non_numeric", f"value {v!r} is not a number")
        wide = np.asarray(values, dtype=np.float64)
        # check before the float32 cast: 1e39 is finite in JSON but overflows float32. One
        # reduction covers NaN (max is NaN, the comparison is False) and infinity.
        if wide.size and not np.abs(wide).max() <= F32_MAX:
            raise BadRecord("non_finite", "values hold NaN, infinity or exceed float32 range")
        return wide.astype(np.float32)


def encode_reading(sensor: str, ts_ms: int, values: list[float] | np.ndarray) -> bytes:
    vals = values.tolist() if isinstance(values, np.ndarray) else list(values)
    return orjson.dumps(
        {"schema_version": SCHEMA_VERSION, "sensor": sensor, "ts": int(ts_ms), "values": vals}
    )


def alert_id(sensor: str, episode_start_ms: int, model_version: str) -> str:
    """Deterministic id of an anomaly episode: the same after restarts and rebalances."""
    key = f"{sensor}\x1f{episode_start_ms}\x1f{model_version}".encode()
    return hashlib.sha256(key).hexdigest()[:24]


@dataclass(frozen=True, slots=True)
class ScoreRecord:
    sensor: str
    window_start_ms: int
    window_end_ms: int
    score: float
    reconstruction_error: float
    forecast_error: float
    threshold: float
    level: str
    model_version: str

    def to_json(self) -> bytes:
        return score_json(self.sensor, self.window_start_ms, self.window_end_ms, self.score,
                          self.reconstruction_error, self.forecast_error, self.threshold,
                          self.level, self.model_version)


def score_json(sensor: str, window_start_ms: int, window_end_ms: int, score: float,
               reconstruction_error: float, forecast_error: float, threshold: float, level: str,
               model_version: str) -> bytes:
    """A score record's JSON (:class:`ScoreRecord`; the consumer encodes straight from a
    :class:`~stream_detector.detector.ScoredBatch`'s columns, without the object)."""
    return orjson.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "type": "score",
            "sensor": sensor,
            "window_start": window_start_ms,
            "window_end": window_end_ms,
            "score": score,
            "reconstruction_error": reconstruction_error,
            "forecast_error": forecast_error,
            "threshold": threshold,
            "level": level,
            "model_version": model_version,
        }
    )


@dataclass(frozen=True, slots=True)
class Alert:
    """An alert event of one episode (``open``, ``update`` or ``resolve``)."""

    alert_id: str
    event: str
    sensor: str
    level: str
    score: float
    peak_score: float
    threshold: float
    reconstruction_error: float
    forecast_error: float
    top_features: tuple[tuple[str, float], ...]
    episode_start_ms: int
    window_start_ms: int
    window_end_ms: int
    model_version: str
    detected_at_ms: int
    long_term_score: float | None = None

    @property
    def event_id(self) -> str:
        """Deterministic id of this event: subscribers deduplicate on it."""
        return f"{self.alert_id}:{self.event}:{self.window_end_ms}"

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "schema_version": SCHEMA_VERSION,
                "type": "alert",
                "alert_id": self.alert_id,
                "event_id": self.event_id,
                "event": self.event,
                "sensor": self.sensor,
                "level": self.level,
                "score": self.score,
                "peak_score": self.peak_score,
                "threshold": self.threshold,
                "reconstruction_error": self.reconstruction_error,
                "forecast_error": self.forecast_error,
                "top_features": [
                    {"feature": f, "contribution": c} for f, c in self.top_features
                ],
                "episode_start": self.episode_start_ms,
                "window_start": self.window_start_ms,
                "window_end": self.window_end_ms,
                "model_version": self.model_version,
                "detected_at": self.detected_at_ms,
                "long_term_score": self.long_term_score,
            }
        )


def dead_letter(
    reason: str, detail: str, raw: bytes | None, topic: str, partition: int, offset: int,
    timestamp: int | None = None, headers: Sequence[tuple[str, bytes | None]] | None = None,
) -> bytes:
    """Dead-letter record: the original bytes base64-encoded, so any payload survives, with the
    original record's Kafka timestamp (epoch ms; None: it had none) and headers (each value
    base64-encoded, None for a header without a value), so it can be re-driven as it was."""
    return orjson.dumps(
        {
            "schema_version": SCHEMA_VERSION,
            "type": "dead_letter",
            "reason": reason,
            "detail": detail,
            "topic": topic,
            "partition": partition,
            "offset": offset,
            "original_b64": base64.b64encode(raw or b"").decode(),
            "original_timestamp": timestamp,
            "original_headers": [
                {"key": k, "value_b64": None if v is None else base64.b64encode(v).decode()}
                for k, v in headers or ()
            ],
        }
    )


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None
