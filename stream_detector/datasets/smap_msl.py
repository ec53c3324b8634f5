"""SMAP and MSL spacecraft telemetry (telemanom; Hundman et al., KDD 2018).

Layout of a data directory (shared by both spacecraft)::

    train/<CHAN>.npy           float array, one row per time step
    test/<CHAN>.npy            same columns
    labeled_anomalies.csv      chan_id,spacecraft,anomaly_sequences,class,num_values

Column 0 is the scaled telemetry value (feature ``value``); the other columns are one-hot
command flags (features ``cmd01``, ``cmd02``, ...): 25 columns in all for SMAP, 55 for MSL.
``anomaly_sequences`` is a JSON-style list of ``[start, end]`` test-row pairs, **both ends
inclusive**; ``num_values`` is the test length and is checked against the test array.

Entities are the channels whose ``spacecraft`` is SMAP (loader ``smap``) or MSL (loader ``msl``)
and that have both ``.npy`` files. Arrays are returned as float32 (stored as float64).

Quirk: the upstream label file lists ``P-2`` twice under SMAP, with different sequences
(``[[5350, 6575]]`` and ``[[5300, 6420]]``) and one data file. Rows for the same channel are
merged: the labels are the union of all their sequences (rows 5300..6575), and their
``num_values`` must agree. There is no per-feature attribution, so ``interpretation`` is None.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stream_detector.datasets.base import Entity
from stream_detector.datasets.smd import natural_key
from stream_detector.errors import DatasetError

LABEL_FILE = "labeled_anomalies.csv"
SPACECRAFT: dict[str, str] = {"smap": "SMAP", "msl": "MSL"}
_COLUMNS = ("chan_id", "spacecraft", "anomaly_sequences", "num_values")


@dataclass
class ChannelLabels:
    """The merged label rows of one channel."""

    chan_id: str
    spacecraft: str
    num_values: int
    sequences: list[tuple[int, int]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    rows: int = 0


def feature_names(n: int) -> tuple[str, ...]:
    """``value`` then ``cmd01``, ``cmd02``, ... for ``n`` columns."""
    width = max(2, len(str(n - 1)))
    return ("value",) + tuple(f"cmd{i:0{width}d}" for i in range(1, n))


def _parse_sequences(text: str, where: str) -> list[tuple[int, int]]:
    try:
        raw = json.loads(text)
        # whole numbers only, each pair a list of two: int() truncated 100.7, took true as 1,
        # unpacked the string "12" into (1, 2) and raised OverflowError on 1e400 (review)
        if not isinstance(raw, list) or not all(
                isinstance(p, list) and len(p) == 2 and all(type(x) is int for x in p)
                for p in raw):
            raise ValueError("not a list of [start, end] pairs of whole numbers")
        pairs = [(a, b) for a, b in raw]
    except (ValueError, TypeError) as exc:
        raise DatasetError(
            f"{where}: anomaly_sequences must be a list of [start, end] pairs, "
            f"found {text!r} ({exc})"
        ) from None
    for a, b in pairs:
        if not 0 <= a <= b:
            raise DatasetError(f"{where}: bad anomaly sequence [{a}, {b}]")
    return pairs


def read_label_file(path: Path) -> dict[str, ChannelLabels]:
    """``labeled_anomalies.csv`` keyed by channel, duplicate rows merged (see module docs)."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: drop a byte-order mark
            reader = csv.DictReader(fh)
            fields = [f.strip() for f in reader.fieldnames or []]
            missing = [c for c in _COLUMNS if c not in fields]
            if missing:
                raise DatasetError(f"{path}: missing column(s) {missing}; found {fields}")
            rows: list[tuple[int, dict[str, str]]] = []
            for raw in reader:
                lineno = reader.line_num  # the row's (last) line in the file, blank lines counted
                if None in raw:  # DictReader files fields beyond the header under None
                    raise DatasetError(
                        f"{path} line {lineno}: more fields than the header (expected "
                        f"{len(fields)}, found {len(fields) + len(raw[None])})"
                    )
                row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
                if any(row.values()):  # a line of only whitespace/commas is skipped
                    rows.append((lineno, row))
    except FileNotFoundError:
        raise DatasetError(f"missing label file {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None

    out: dict[str, ChannelLabels] = {}
    for lineno, row in rows:
        where = f"{path} line {lineno}"
        chan, craft = row["chan_id"], row["spacecraft"].upper()
        if not chan:
            raise DatasetError(f"{where}: empty chan_id")
        try:
            num_values = int(row["num_values"])
        except ValueError:
            raise DatasetError(
                f"{where}: num_values {row['num_values']!r} is not an integer"
            ) from None
        seqs = _parse_sequences(row["anomaly_sequences"], where)
        entry = out.get(chan)
        if entry is None:
            entry = out[chan] = ChannelLabels(chan, craft, num_values)
        elif entry.spacecraft != craft or entry.num_values != num_values:
            raise DatasetError(
                f"{where}: channel {chan} listed again with spacecraft/num_values "
                f"{craft}/{num_values}, earlier {entry.spacecraft}/{entry.num_values}"
            )
        entry.sequences.extend(seqs)
        entry.classes.append(row.get("class", ""))
        entry.rows += 1
    return out


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DatasetError(f"missing file: {path}")
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DatasetError(f"{path}: expected a non-empty 2-D array, found shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        # a complex array lost its imaginary part with a warning only (review)
        raise DatasetError(f"{path}: expected a real numeric array, found dtype {arr.dtype}")
    with np.errstate(over="ignore"):  # beyond float32: refused below, without numpy's warning
        out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        row = int(np.argwhere(~np.isfinite(out))[0][0])
        raise DatasetError(f"{path}: NaN, infinite or beyond float32 range (about 3.4e38) "
                           f"value at row {row}")
    return out


class TelemanomLoader:
    """Loader for one spacecraft (``smap`` or ``msl``) of the telemanom data."""

    needs_data_dir = True

    def __init__(self, name: str) -> None:
        if name not in SPACECRAFT:
            raise DatasetError(f"unknown spacecraft {name!r}; known: {', '.join(SPACECRAFT)}")
        self.name = name
        self.spacecraft = SPACECRAFT[name]

    def _dir(self, data_dir: Path | None) -> Path:
        from stream_detector.datasets import resolve_data_dir

        path = resolve_data_dir(self.name, data_dir)
        if not (path / LABEL_FILE).is_file():
            raise DatasetError(
                f"{path} is not a SMAP/MSL directory: no {LABEL_FILE} "
                "(expected train/CHAN.npy, test/CHAN.npy, labeled_anomalies.csv)"
            )
        return path

    def list_entities(self, data_dir: Path | None) -> list[str]:
        path = self._dir(data_dir)
        labels = read_label_file(path / LABEL_FILE)
        chans = [
            c for c, e in labels.items()
            if e.spacecraft == self.spacecraft
            and (path / "train" / f"{c}.npy").is_file()
            and (path / "test" / f"{c}.npy").is_file()
        ]
        return sorted(chans, key=natural_key)

    def load_entity(self, data_dir: Path | None, entity: str) -> Entity:
        path = self._dir(data_dir)
        labels_by_chan = read_label_file(path / LABEL_FILE)
        info = labels_by_chan.get(entity)
        if info is None or info.spacecraft != self.spacecraft:
            raise self._unknown(path, entity, info)
        train = _load_npy(path / "train" / f"{entity}.npy")
        test = _load_npy(path / "test" / f"{entity}.npy")
        if train.shape[1] != test.shape[1]:
            raise DatasetError(
                f"{self.spacecraft} channel {entity}: train has {train.shape[1]} columns but "
                f"test has {test.shape[1]}"
            )
        if test.shape[0] != info.num_values:
            raise DatasetError(
                f"{self.spacecraft} channel {entity}: {LABEL_FILE} says num_values="
                f"{info.num_values} but test/{entity}.npy has {test.shape[0]} rows"
            )
        labels = np.zeros(test.shape[0], dtype=np.int8)
        for start, end in info.sequences:
            if end >= test.shape[0]:
                raise DatasetError(
                    f"{self.spacecraft} channel {entity}: anomaly sequence [{start}, {end}] "
                    f"goes past the {test.shape[0]} test rows"
                )
            labels[start : end + 1] = 1  # both ends inclusive
        return Entity(
            name=entity,
            train=train,
            test=test,
            labels=labels,
            features=feature_names(train.shape[1]),
            interpretation=None,
            # the command flags are inputs (what the spacecraft was told to do); the anomaly
            # is in the telemetry value, which is what telemanom and the reference scores use
            scored_features=("value",),
            meta={
                "dataset": self.name,
                "spacecraft": self.spacecraft,
                "data_dir": str(path),
                "anomaly_sequences": json.dumps(sorted(info.sequences)),
                "class": "; ".join(info.classes),
                "label_rows": str(info.rows),
            },
        )

    def _unknown(self, path: Path, entity: str, info: ChannelLabels | None) -> DatasetError:
        if info is not None:
            return DatasetError(
                f"channel {entity!r} belongs to {info.spacecraft}, not {self.spacecraft}: "
                f"use dataset {info.spacecraft.lower()!r}"
            )
        known = self.list_entities(path)
        shown = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
        return DatasetError(
            f"unknown {self.spacecraft} channel {entity!r} in {path}; "
            f"known ({len(known)}): {shown or 'none'}"
        )
