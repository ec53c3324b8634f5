"""The artifact manifest: the contract between the trainer and the consumer (no torch here).

An artifact is a directory::

    model.pt        TorchScript module: (B, W, F) scaled windows -> (rec_err, fc_err), each (B, F)
    manifest.json   everything else the consumer needs, see :class:`Manifest`

Loading verifies the schema version, the sha256 of ``model.pt``, the internal consistency of
shapes and the values (thresholds and scales finite and positive, typed fields, unique feature
names), and refuses with an :class:`~stream_detector.errors.ArtifactError` that names the field.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from stream_detector.errors import ArtifactError

SCHEMA_VERSION = 4

#: Largest window (and score smoothing) an artifact may declare: every sensor keeps a ring of
#: this many readings, so an edited manifest with a huge window would exhaust memory at load.
MAX_WINDOW = 10_000
#: Schema versions this build reads. Version 1 had no per-sensor error scales and no feature
#: weights; it is read with both absent (global scales, every feature weighted equally).
#: Version 2 had no per-sensor input scalers (every sensor scaled by ``scaler_mean/std``).
#: Version 3 had no long-term score (``score.long_term``). A build that reads only up to
#: version N refuses N + 1: it would score without what N + 1 added (the trainer writes the
#: lowest version that holds its artifact).
READABLE_SCHEMA_VERSIONS = (1, 2, 3, 4)
MODEL_FILE = "model.pt"
MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class LongTermSpec:
    """The long-term term of the score: a sensor's sustained error level, which catches an
    anomaly that raises every window's error a little for a long time (a drift, a slowly
    degrading machine) before any single window crosses the threshold.

    Per sensor, ``L`` is an exponentially weighted moving average (weight ``alpha`` for the
    newest window) of its raw window scores clipped at its threshold ``q_s``, in window order,
    started at ``start`` when the sensor starts (its mean clipped validation score). The score
    becomes ``max(short, q_s * (L - start) / (level - start))``: the short-term score (the mean
    of the last ``smoothing`` window scores), or the long-term level expressed in the same
    units, about 0 at the sensor's usual level and reaching the threshold exactly when ``L``
    reaches ``level``, the ``quantile`` of ``L`` on the sensor's validation windows (at least
    ``start + alpha * threshold``). The thresholds are those of the short-term score (not
    refitted with the term).

    ``per_sensor``: ``{sensor: {"start": .., "level": ..}}`` for sensors with at least
    ``min_sensor_windows`` validation windows; the others (and sensors unseen in training) get
    ``start`` / ``level`` fitted on all sensors' validation windows.
    """

    alpha: float
    quantile: float
    start: float
    level: float
    per_sensor: dict[str, dict[str, float]] = field(default_factory=dict)

    def for_sensor(self, sensor: str) -> tuple[float, float]:
        """``(start, level)`` of ``sensor``."""
        own = self.per_sensor.get(sensor)
        return (own["start"], own["level"]) if own is not None else (self.start, self.level)


@dataclass(frozen=True)
class ScoreSpec:
    """How per-feature errors become one score. Higher score = more anomalous.

    ``score = w_rec * reconstruction_error + w_fc * forecast_error`` where each error term is the
    (weighted) mean over features of the squared error divided by that feature's typical error
    on validation data, so that no single noisy feature dominates.

    * ``rec_scale`` / ``fc_scale``: typical errors over all training sensors (the default, and
      what a sensor unseen in training, or with fewer than ``min_sensor_windows`` validation
      windows, gets).
    * ``per_sensor``: ``{sensor: {"rec": [...], "fc": [...]}}``, typical errors of that sensor
      on its own validation rows (empty = global scales for every sensor).
    * ``feature_weights``: one non-negative weight per feature for the mean over features
      (empty = equal weights). A zero weight keeps a feature as model input but out of the
      score, e.g. the command flags of the SMAP/MSL channels.

    The reported score is the mean of the last ``smoothing`` window scores of the sensor, or
    its long-term term where that is higher (``long_term``, see :class:`LongTermSpec`; None:
    no long-term term, schema <= 3).
    """

    w_rec: float
    w_fc: float
    rec_scale: tuple[float, ...]
    fc_scale: tuple[float, ...]
    smoothing: int = 1
    per_sensor: dict[str, dict[str, tuple[float, ...]]] = field(default_factory=dict)
    feature_weights: tuple[float, ...] = ()
    long_term: LongTermSpec | None = None


@dataclass(frozen=True)
class ThresholdSpec:
    """Decision thresholds fitted on validation scores only (never on test labels)."""

    method: str
    default: float
    per_sensor: dict[str, float] = field(default_factory=dict)
    params: dict[str, float] = field(default_factory=dict)

    def for_sensor(self, sensor: str) -> float:
        return self.per_sensor.get(sensor, self.default)


@dataclass(frozen=True)
class Manifest:
    """``scaler_mean`` / ``scaler_std``: the input scaler of every sensor not in
    ``scaler_per_sensor``, fitted on all fit rows (followed by the per-sensor scaling's second
    stage when there is one, see ``train._input_scalers``).
    ``scaler_per_sensor``: ``{sensor: {"mean": [...], "std": [...]}}``, the input scaler of each
    training sensor, fitted on its own rows. Empty (``input_scaling=global``, schema <= 2):
    every sensor is scaled by the global one."""

    schema_version: int
    model_version: str
    dataset: str
    features: tuple[str, ...]
    window: int
    network: dict[str, Any]
    scaler_mean: tuple[float, ...]
    scaler_std: tuple[float, ...]
    clip: float
    score: ScoreSpec
    thresholds: ThresholdSpec
    sha256: str
    training: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    created_at: str = ""
    scaler_per_sensor: dict[str, dict[str, tuple[float, ...]]] = field(default_factory=dict)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @cached_property
    def _scaler_rows(self) -> dict[str, int]:
        return {name: i + 1 for i, name in enumerate(self.scaler_per_sensor)}

    def scaler_row(self, sensor: str) -> int:
        """Row of :meth:`scaler_table` that scales ``sensor``'s readings (0: the global one)."""
        return self._scaler_rows.get(sensor, 0)

    def scaler_table(self) -> tuple[np.ndarray, np.ndarray]:
        """Input scalers as ``(mean, 1 / std)``, float32 ``(1 + sensors, F)``: row 0 global,
        then one row per sensor of ``scaler_per_sensor`` (:meth:`scaler_row`)."""
        means = [self.scaler_mean, *(sc["mean"] for sc in self.scaler_per_sensor.values())]
        stds = [self.scaler_std, *(sc["std"] for sc in self.scaler_per_sensor.values())]
        inv = (1.0 / np.asarray(stds, dtype=np.float64)).astype(np.float32)
        return np.asarray(means, dtype=np.float32), inv

    def as_written(self) -> dict[str, Any]:
        """The manifest as its JSON holds it. Fields a schema added are left out when unused
        (no long-term term, no per-sensor scalers), so a build that predates them reads the
        artifact (the trainer writes the lowest schema version that holds it for that reason),
        and the model version digest of such an artifact stays what it was."""
        data = asdict(self)
        if data["score"].get("long_term") is None:
            data["score"].pop("long_term", None)
        if not data.get("scaler_per_sensor"):
            data.pop("scaler_per_sensor", None)
        return data

    def to_json(self) -> bytes:
        return orjson.dumps(self.as_written(),
                            option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        """Parse a manifest's JSON object; every field is type-checked and an error names it."""
        try:
            data = dict(raw)
            data["schema_version"] = _int("schema_version", data["schema_version"])
            for key in ("model_version", "dataset", "sha256"):
                data[key] = _str(key, data[key])
            feats = data["features"]
            if not isinstance(feats, list | tuple):
                raise ArtifactError("manifest features must be a list of names")
            data["features"] = tuple(_str(f"features[{i}]", v) for i, v in enumerate(feats))
            data["window"] = _int("window", data["window"])
            data["clip"] = _num("clip", data["clip"])
            data["scaler_mean"] = _nums("scaler_mean", data["scaler_mean"])
            data["scaler_std"] = _nums("scaler_std", data["scaler_std"])
            data["scaler_per_sensor"] = {
                str(name): {k: _nums(f"scaler_per_sensor[{name!r}].{k}",
                                     _key(f"scaler_per_sensor[{name!r}]", sc, k))
                            for k in ("mean", "std")}
                for name, sc in _obj("scaler_per_sensor",
                                     _or_empty(data.get("scaler_per_sensor"))).items()
            }
            for key in ("network", "training", "versions"):
                if not isinstance(data.get(key, {}), dict):
                    raise ArtifactError(f"manifest {key} must be a JSON object")
            s = dict(_obj("score", data["score"]))
            s["w_rec"] = _num("score.w_rec", s["w_rec"])
            s["w_fc"] = _num("score.w_fc", s["w_fc"])
            s["smoothing"] = _int("score.smoothing", s.get("smoothing", 1))
            s["rec_scale"] = _nums("score.rec_scale", s["rec_scale"])
            s["fc_scale"] = _nums("score.fc_scale", s["fc_scale"])
            per_sensor = {}
            for name, sc in _obj("score.per_sensor", s.get("per_sensor") or {}).items():
                per_sensor[str(name)] = {
                    k: _nums(f"score.per_sensor[{name!r}].{k}",
                             _key(f"score.per_sensor[{name!r}]", sc, k)) for k in ("rec", "fc")
                }
            s["per_sensor"] = per_sensor
            s["feature_weights"] = _nums("score.feature_weights", s.get("feature_weights") or ())
            s["long_term"] = _long_term(s.get("long_term"))
            data["score"] = ScoreSpec(**s)
            t = dict(_obj("thresholds", data["thresholds"]))
            t["method"] = _str("thresholds.method", t["method"])
            t["default"] = _num("thresholds.default", t["default"])
            t["per_sensor"] = {
                str(name): _num(f"thresholds.per_sensor[{name!r}]", v)
                for name, v in _obj("thresholds.per_sensor", t.get("per_sensor") or {}).items()
            }
            data["thresholds"] = ThresholdSpec(**t)
            return cls(**data)
        except KeyError as exc:
            raise ArtifactError(f"manifest is malformed: missing field {exc}") from None
        except TypeError as exc:  # an unknown or missing dataclass field
            raise ArtifactError(f"manifest is malformed: {exc}") from None

    def validate(self) -> None:
        """Check internal consistency and values; raise ArtifactError naming the first problem.

        Every number the consumer divides by or compares with must be usable: a threshold or
        error scale that is zero, negative or not finite would alert on every window or on none,
        so such an artifact is refused at load, not discovered in production.
        """
        f = self.n_features
        if f == 0:
            raise ArtifactError("manifest features is empty")
        dup = sorted(repeated_names(self.features))
        if dup:
            raise ArtifactError(f"manifest features has duplicate names {dup[:10]}")
        checks = {
            "scaler_mean": len(self.scaler_mean),
            "scaler_std": len(self.scaler_std),
            "score.rec_scale": len(self.score.rec_scale),
            "score.fc_scale": len(self.score.fc_scale),
        }
        for sensor, sc in self.scaler_per_sensor.items():
            checks[f"scaler_per_sensor[{sensor!r}].mean"] = len(sc["mean"])
            checks[f"scaler_per_sensor[{sensor!r}].std"] = len(sc["std"])
        for sensor, sc in self.score.per_sensor.items():
            checks[f"score.per_sensor[{sensor!r}].rec"] = len(sc["rec"])
            checks[f"score.per_sensor[{sensor!r}].fc"] = len(sc["fc"])
        if self.score.feature_weights:
            checks["score.feature_weights"] = len(self.score.feature_weights)
        for name, n in checks.items():
            if n != f:
                raise ArtifactError(f"manifest {name} has {n} values but there are {f} features")
        weights = self.score.feature_weights
        if weights and (min(weights) < 0 or sum(weights) <= 0 or not np.all(np.isfinite(weights))):
            raise ArtifactError(
                "manifest score.feature_weights must be finite, non-negative and not all zero"
            )
        if not 3 <= self.window <= MAX_WINDOW:
            raise ArtifactError(f"manifest window must be in [3, {MAX_WINDOW:,}], "
                                f"got {self.window}")
        if not 1 <= self.score.smoothing <= MAX_WINDOW:
            raise ArtifactError(f"manifest score.smoothing must be in [1, {MAX_WINDOW:,}], "
                                f"got {self.score.smoothing}")
        _finite("scaler_mean", self.scaler_mean)
        _positive("scaler_std", self.scaler_std)
        for sensor, sc in self.scaler_per_sensor.items():
            _finite(f"scaler_per_sensor[{sensor!r}].mean", sc["mean"])
            _positive(f"scaler_per_sensor[{sensor!r}].std", sc["std"])
        _positive("clip", (self.clip,))
        spec = self.score
        if not (np.isfinite([spec.w_rec, spec.w_fc]).all() and min(spec.w_rec, spec.w_fc) >= 0
                and spec.w_rec + spec.w_fc > 0):
            raise ArtifactError(
                f"manifest score weights must be finite, non-negative and not both zero, got "
                f"w_rec={spec.w_rec}, w_fc={spec.w_fc}"
            )
        _positive("score.rec_scale", spec.rec_scale)
        _positive("score.fc_scale", spec.fc_scale)
        for sensor, scales in spec.per_sensor.items():
            for k in ("rec", "fc"):
                _positive(f"score.per_sensor[{sensor!r}].{k}", scales[k])
        _positive("thresholds.default", (self.thresholds.default,))
        for sensor, thr in self.thresholds.per_sensor.items():
            _positive(f"thresholds.per_sensor[{sensor!r}]", (thr,))
        lt = spec.long_term
        if lt is not None:
            if self.schema_version < 4:
                raise ArtifactError(f"manifest score.long_term needs schema_version 4, the "
                                    f"manifest says {self.schema_version}")
            if not (np.isfinite(lt.alpha) and 0 < lt.alpha <= 1):
                raise ArtifactError(f"manifest score.long_term.alpha must be in (0, 1], "
                                    f"got {lt.alpha}")
            if not (np.isfinite(lt.quantile) and 0 < lt.quantile < 1):
                raise ArtifactError(f"manifest score.long_term.quantile must be in (0, 1), "
                                    f"got {lt.quantile}")
            # start >= 0 (a mean of clipped scores); level > start (their difference divides)
            _start_level("score.long_term", lt.start, lt.level)
            for sensor, own in lt.per_sensor.items():
                _start_level(f"score.long_term.per_sensor[{sensor!r}]", own["start"],
                             own["level"])


def _long_term(raw: Any) -> LongTermSpec | None:
    if raw is None:
        return None
    lt = dict(_obj("score.long_term", raw))
    known = set(LongTermSpec.__dataclass_fields__)
    if set(lt) - known:
        raise ArtifactError(f"manifest score.long_term has unknown fields "
                            f"{sorted(set(lt) - known)}")
    out: dict[str, Any] = {}
    for key in ("alpha", "quantile", "start", "level"):
        out[key] = _num(f"score.long_term.{key}", _key("score.long_term", lt, key))
    per_sensor = {}
    for name, own in _obj("score.long_term.per_sensor",
                          _or_empty(lt.get("per_sensor"))).items():
        where = f"score.long_term.per_sensor[{name!r}]"
        extra = set(_obj(where, own)) - {"start", "level"}
        if extra:
            raise ArtifactError(f"manifest {where} has unknown fields {sorted(extra)}")
        per_sensor[str(name)] = {k: _num(f"{where}.{k}", _key(where, own, k))
                                 for k in ("start", "level")}
    out["per_sensor"] = per_sensor
    return LongTermSpec(**out)


def _start_level(path: str, start: float, level: float) -> None:
    """``start`` finite and >= 0; ``level`` finite and above it (their difference divides)."""
    if not (np.isfinite(start) and start >= 0):
        raise ArtifactError(f"manifest {path}.start must be finite and >= 0, got {start}")
    if not (np.isfinite(level) and level > start):
        raise ArtifactError(f"manifest {path}.level must be finite and above {path}.start "
                            f"({start}), got {level}")


def _num(path: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ArtifactError(f"manifest {path} must be a number, got {_short(v)}")
    return float(v)


def _nums(path: str, values: Any) -> tuple[float, ...]:
    if not isinstance(values, list | tuple):
        raise ArtifactError(f"manifest {path} must be a list of numbers, got {_short(values)}")
    return tuple(_num(f"{path}[{i}]", v) for i, v in enumerate(values))


def _int(path: str, v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise ArtifactError(f"manifest {path} must be an integer, got {_short(v)}")
    return v


def _str(path: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ArtifactError(f"manifest {path} must be a string, got {_short(v)}")
    return v


def _obj(path: str, v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise ArtifactError(f"manifest {path} must be a JSON object, got {_short(v)}")
    return v


def _key(path: str, obj: Any, key: str) -> Any:
    obj = _obj(path, obj)
    if key not in obj:
        raise ArtifactError(f"manifest {path} has no {key!r}")
    return obj[key]


def _or_empty(v: Any) -> Any:
    return {} if v is None else v


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def _finite(path: str, values: tuple[float, ...]) -> None:
    bad = [i for i, v in enumerate(values) if not np.isfinite(v)]
    if bad:
        raise ArtifactError(f"manifest {path}[{bad[0]}] is not finite: {values[bad[0]]}")


def _positive(path: str, values: tuple[float, ...]) -> None:
    """Every value finite and > 0 (a threshold, scale or divisor)."""
    for i, v in enumerate(values):
        if not (np.isfinite(v) and v > 0):
            where = path if len(values) == 1 else f"{path}[{i}]"
            raise ArtifactError(f"manifest {where} must be finite and > 0, got {v}")


def repeated_names(names: Iterable[str]) -> list[str]:
    """The names that appear more than once in ``names``, in the order they first appear."""
    counts = Counter(names)
    return [n for n in counts if counts[n] > 1]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


#: A reader that finds the model's checksum not matching the manifest reads again after this
#: pause when either file changed meanwhile (the trainer replaces them by two renames, model
#: first: a reader between them sees the new model with the old manifest), at most
#: ``REREAD_LIMIT`` times.
REREAD_PAUSE_S = 0.2
REREAD_LIMIT = 5


def _signature(*paths: Path) -> tuple[tuple[int, int, int], ...]:
    out = []
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:
            out.append((-1, -1, -1))
        else:
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


def read_manifest(
    artifact_dir: str | Path,
    *,
    expect_features: tuple[str, ...] | None = None,
    expect_window: int | None = None,
) -> Manifest:
    """Read and verify an artifact's manifest (schema, checksum, shapes, expectations)."""
    return read_artifact(artifact_dir, expect_features=expect_features,
                         expect_window=expect_window)[0]


def read_artifact(
    artifact_dir: str | Path,
    *,
    expect_features: tuple[str, ...] | None = None,
    expect_window: int | None = None,
) -> tuple[Manifest, bytes]:
    """:func:`read_manifest`, and the model file's bytes that its checksum was verified on
    (load those, not the file again: it may have been replaced since). An artifact being
    rewritten while it is read is read again once its files have settled."""
    root = Path(artifact_dir)
    mpath = root / MANIFEST_FILE
    model_path = root / MODEL_FILE
    if root.exists() and not root.is_dir():
        raise ArtifactError(f"artifact {root} is a file; an artifact is the directory train "
                            f"writes ({MANIFEST_FILE} and {MODEL_FILE})")
    if not root.is_dir():
        raise ArtifactError(f"artifact directory {root} does not exist (train one first)")
    if not mpath.is_file():
        raise ArtifactError(f"artifact {root} has no {MANIFEST_FILE}")
    if not model_path.is_file():
        raise ArtifactError(f"artifact {root} has no {MODEL_FILE}")
    for _ in range(REREAD_LIMIT + 1):
        before = _signature(mpath, model_path)
        manifest = _parse_manifest(mpath)
        model = model_path.read_bytes()
        actual = hashlib.sha256(model).hexdigest()
        if actual == manifest.sha256:
            break
        time.sleep(REREAD_PAUSE_S)
        if _signature(mpath, model_path) == before:
            break  # nothing was being written: the files do not belong together
    if actual != manifest.sha256:
        raise ArtifactError(
            f"checksum mismatch for {model_path}: manifest says {manifest.sha256[:16]}..., "
            f"file is {actual[:16]}... (tampered with, from another training run, or a "
            "training that stopped while it replaced the artifact: train again)"
        )
    if expect_features is not None and tuple(expect_features) != manifest.features:
        missing = [f for f in expect_features if f not in manifest.features]
        extra = [f for f in manifest.features if f not in expect_features]
        raise ArtifactError(
            f"feature mismatch: expected {len(expect_features)} features, artifact has "
            f"{manifest.n_features}; missing from artifact {missing[:10]}, unexpected {extra[:10]}"
            + ("; same names in another order" if not missing and not extra else "")
        )
    if expect_window is not None and expect_window != manifest.window:
        raise ArtifactError(
            f"window mismatch: expected {expect_window}, artifact has {manifest.window}"
        )
    return manifest, model


def _parse_manifest(mpath: Path) -> Manifest:
    try:
        raw = orjson.loads(mpath.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ArtifactError(f"{mpath} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{mpath} must hold a JSON object")
    version = raw.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        readable = ", ".join(str(v) for v in READABLE_SCHEMA_VERSIONS)
        raise ArtifactError(
            f"{mpath} has schema_version {version!r}; this build reads {readable}"
        )
    manifest = Manifest.from_dict(raw)
    manifest.validate()
    return manifest
