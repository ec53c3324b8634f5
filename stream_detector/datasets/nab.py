"""NAB, the Numenta Anomaly Benchmark (Ahmad et al., Neurocomputing 2017).

Layout of a data directory: CSV streams ``timestamp,value`` (timestamps like
``2013-12-02 21:15:00``, read as UTC), either flat or in NAB's category folders
(``realKnownCause/NAME.csv``), plus the label files:

- ``labels.json`` (or NAB's ``combined_labels.json`` / ``labels/combined_labels.json``): maps
  ``CATEGORY/NAME.csv`` to the list of labelled anomaly timestamps. Keys are matched to a CSV by
  its path relative to the data directory, else by file name (the shared copy is flat but keeps
  the ``realKnownCause/`` keys).
- Optionally ``combined_windows.json`` (or ``labels/combined_windows.json``, ``windows.json``):
  maps the same keys to ``[start, end]`` timestamp pairs, both ends inclusive. When a stream has
  an entry there, those windows are used as they are.

Otherwise windows are built as NAB does: a total width of 10 % of the stream's rows, divided by
the number of anomalies, centred on each labelled timestamp (``int(0.1 * rows / k)`` rows, half
on each side, clipped to the stream), then expressed as timestamps. A row is labelled 1 when its
timestamp lies in a window (both ends inclusive).

NAB has no train/test split. The first 15 % of rows (``floor(0.15 * rows)``; NAB's
"probationary period" fraction) are the train part, the rest the test part. Real NAB windows can
reach into that train part (``meta["train_labelled_rows"]`` counts such rows; their labels are
dropped since train carries none). Rows keep file order even where timestamps repeat or step
back (real NAB has both: ``ec2_request_latency_system_failure`` repeats ``2014-03-09 03:00:00``
12 times, ``machine_temperature_system_failure`` steps back 55 minutes once);
``meta["non_increasing_steps"]`` counts such steps. Entity names are file stems
(``nyc_taxi``); the single feature is ``value``; ``test_timestamps`` holds the test rows' epoch
milliseconds (UTC), in file order.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import structlog

from stream_detector.datasets.base import Entity
from stream_detector.errors import DatasetError
from stream_detector.records import F32_MAX

log = structlog.get_logger(__name__)
#: (label file, unlabelled streams...) already warned about (list_entities runs more than
#: once a command)
_WARNED_UNLABELLED: set[tuple[str, ...]] = set()

NAME = "nab"
TRAIN_FRACTION = 0.15
WINDOW_FRACTION = 0.10
LABEL_FILES: tuple[str, ...] = (
    "labels.json",
    "combined_labels.json",
    "labels/combined_labels.json",
)
WINDOW_FILES: tuple[str, ...] = (
    "combined_windows.json",
    "labels/combined_windows.json",
    "windows.json",
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def parse_timestamp(text: str, where: str) -> int:
    """An ISO-like timestamp (naive means UTC) as epoch milliseconds."""
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise DatasetError(f"{where}: bad timestamp {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MS


def read_stream(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NAB CSV as (epoch-ms int64 timestamps, float64 values); errors name file and line."""
    ts: list[int] = []
    vals: list[float] = []
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:  # -sig: drop a byte-order mark
            reader = csv.reader(fh)
            header = [h.strip().lower() for h in next(reader, [])]
            if "timestamp" not in header or "value" not in header:
                raise DatasetError(f"{path} line 1: expected header 'timestamp,value', "
                                   f"found {','.join(header)!r}")
            it, iv = header.index("timestamp"), header.index("value")
            for row in reader:
                if not row or not any(f.strip() for f in row):
                    continue
                where = f"{path} line {reader.line_num}"
                if len(row) != len(header):
                    raise DatasetError(f"{where}: expected {len(header)} fields, found {len(row)}")
                ts.append(parse_timestamp(row[it], where))
                try:
                    v = float(row[iv])
                except ValueError:
                    raise DatasetError(f"{where}: non-numeric value {row[iv]!r}") from None
                if not math.isfinite(v):
                    raise DatasetError(f"{where}: value is NaN or infinite")
                if abs(v) > F32_MAX:  # inf once stored as float32 (review)
                    raise DatasetError(f"{where}: value {row[iv]!r} is beyond the float32 "
                                       "range (about 3.4e38)")
                vals.append(v)
    except FileNotFoundError:
        raise DatasetError(f"missing file: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if not ts:
        raise DatasetError(f"{path} has no rows")
    return np.asarray(ts, dtype=np.int64), np.asarray(vals, dtype=np.float64)


def _read_json(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise DatasetError(f"{path}: expected an object mapping file names to lists")
    return data


def _first_existing(data_dir: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def _lookup(table: dict[str, list], rel: str, source: Path) -> list | None:
    """Entry for a CSV: by relative path, else by unique file name."""
    if rel in table:
        return table[rel]
    base = rel.rsplit("/", 1)[-1]
    hits = [k for k in table if k.replace("\\", "/").rsplit("/", 1)[-1] == base]
    if len(hits) > 1:
        raise DatasetError(f"{source}: several entries match {base}: {hits}")
    return table[hits[0]] if hits else None


def nab_windows(timestamps: np.ndarray, anomalies: list[int]) -> list[tuple[int, int]]:
    """NAB's default windows as inclusive ``(start_ms, end_ms)`` pairs, one per anomaly.

    As NAB's labeler: width ``int(0.1 * rows / len(anomalies))`` rows, centred on the row whose
    timestamp equals the anomaly (the nearest row when none does), clipped to the stream, and
    turned back into timestamps.
    """
    n = len(timestamps)
    if not anomalies:
        return []
    half = int(WINDOW_FRACTION * n / len(anomalies)) // 2
    out = []
    for a in anomalies:
        exact = np.flatnonzero(timestamps == a)
        pos = int(exact[0]) if exact.size else int(np.argmin(np.abs(timestamps - a)))
        lo, hi = max(pos - half, 0), min(pos + half, n - 1)
        out.append((int(timestamps[lo]), int(timestamps[hi])))
    return out


def _iso(ms: int) -> str:
    return (_EPOCH + ms * _MS).strftime("%Y-%m-%d %H:%M:%S")


def _explicit_windows(entry: list, where: str) -> list[tuple[int, int]]:
    """``[start, end]`` timestamp pairs from a windows file as inclusive epoch-ms pairs."""
    spans = []
    for w in entry:
        if not (isinstance(w, list) and len(w) == 2):
            raise DatasetError(f"{where}: windows must be [start, end] timestamp pairs")
        lo, hi = parse_timestamp(str(w[0]), where), parse_timestamp(str(w[1]), where)
        if lo > hi:  # labelled nothing, without a word (review)
            raise DatasetError(f"{where}: window [{w[0]}, {w[1]}] ends before it starts")
        spans.append((lo, hi))
    return spans


@dataclass
class _Index:
    """The streams and label tables of one NAB directory."""

    root: Path
    streams: dict[str, Path]
    labels_path: Path | None
    labels: dict[str, list]
    windows_path: Path | None
    windows: dict[str, list]

    def key(self, stem: str) -> str:
        return self.streams[stem].relative_to(self.root).as_posix()

    def label_entry(self, stem: str) -> list | None:
        if self.labels_path is None:
            return None
        return _lookup(self.labels, self.key(stem), self.labels_path)

    def window_entry(self, stem: str) -> list | None:
        if self.windows_path is None:
            return None
        return _lookup(self.windows, self.key(stem), self.windows_path)

    def has_entry(self, stem: str) -> bool:
        return self.label_entry(stem) is not None or self.window_entry(stem) is not None


class NABLoader:
    """Loader for NAB streams (see the module docstring)."""

    name = NAME
    needs_data_dir = True

    def __init__(self, train_fraction: float = TRAIN_FRACTION) -> None:
        if not 0.0 < train_fraction < 1.0:
            raise DatasetError(f"train_fraction must be in (0, 1), got {train_fraction}")
        self.train_fraction = train_fraction

    def _dir(self, data_dir: Path | None) -> Path:
        from stream_detector.datasets import resolve_data_dir

        return resolve_data_dir(self.name, data_dir)

    def _index(self, path: Path) -> _Index:
        labels_path = _first_existing(path, LABEL_FILES)
        windows_path = _first_existing(path, WINDOW_FILES)
        if labels_path is None and windows_path is None:
            raise DatasetError(
                f"{path} is not a NAB directory: no {' / '.join(LABEL_FILES)} found"
            )
        streams: dict[str, Path] = {}
        for csv_path in sorted(path.rglob("*.csv")):
            stem = csv_path.stem
            if stem in streams:
                raise DatasetError(
                    f"two NAB streams named {stem!r}: {streams[stem]} and {csv_path}"
                )
            streams[stem] = csv_path
        return _Index(
            root=path,
            streams=streams,
            labels_path=labels_path,
            labels=_read_json(labels_path) if labels_path else {},
            windows_path=windows_path,
            windows=_read_json(windows_path) if windows_path else {},
        )

    def list_entities(self, data_dir: Path | None) -> list[str]:
        index = self._index(self._dir(data_dir))
        unlabelled = tuple(sorted(s for s in index.streams if not index.has_entry(s)))
        seen = (str(index.labels_path), *unlabelled)
        if unlabelled and seen not in _WARNED_UNLABELLED:
            # left out, not an error (NAB's data folder holds streams the label file may not
            # cover), but said: in a folder where none is covered the next message is "no
            # entities", which would not say why
            _WARNED_UNLABELLED.add(seen)
            log.warning("NAB streams without an entry in the label file are left out",
                        count=len(unlabelled), streams=list(unlabelled[:10]),
                        label_file=str(index.labels_path) if index.labels_path else None)
        return sorted(s for s in index.streams if index.has_entry(s))

    def load_entity(self, data_dir: Path | None, entity: str) -> Entity:
        path = self._dir(data_dir)
        index = self._index(path)
        csv_path = index.streams.get(entity)
        if csv_path is None:
            known = sorted(s for s in index.streams if index.has_entry(s))
            shown = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
            raise DatasetError(
                f"unknown NAB stream {entity!r} in {path}; known ({len(known)}): "
                f"{shown or 'none'}"
            )
        rel = index.key(entity)
        ts, values = read_stream(csv_path)
        n = len(ts)

        win_entry = index.window_entry(entity)
        label_entry = index.label_entry(entity)
        if win_entry is not None:
            spans = _explicit_windows(win_entry, f"{index.windows_path} [{rel}]")
            for lo, hi in spans:  # as label timestamps outside the stream are refused
                if hi < ts.min() or lo > ts.max():
                    raise DatasetError(
                        f"{index.windows_path} [{rel}]: window {_iso(lo)} .. {_iso(hi)} is "
                        f"outside the stream ({_iso(int(ts.min()))} .. {_iso(int(ts.max()))})")
            window_source = str(index.windows_path)
        elif label_entry is not None:
            where = f"{index.labels_path} [{rel}]"
            anomalies = sorted(parse_timestamp(str(a), where) for a in label_entry)
            for a in anomalies:
                if not ts.min() <= a <= ts.max():
                    raise DatasetError(
                        f"{where}: anomaly timestamp {_iso(a)} is outside the stream "
                        f"({_iso(int(ts.min()))} .. {_iso(int(ts.max()))})"
                    )
            spans = nab_windows(ts, anomalies)
            window_source = f"built from {index.labels_path} (NAB 10% convention)"
        else:
            raise DatasetError(
                f"NAB stream {entity!r}: no entry for {rel} in "
                f"{index.labels_path or index.windows_path}"
            )

        row_labels = np.zeros(n, dtype=np.int8)
        for lo, hi in spans:  # by timestamp, as NAB scores (rows need not be sorted)
            row_labels[(ts >= lo) & (ts <= hi)] = 1
        n_train = int(math.floor(self.train_fraction * n))
        if n_train < 1 or n - n_train < 1:
            raise DatasetError(f"{csv_path}: {n} rows are too few to split into train and test")
        col = values.astype(np.float32)[:, None]
        return Entity(
            name=entity,
            train=col[:n_train],
            test=col[n_train:],
            labels=row_labels[n_train:].copy(),
            features=("value",),
            interpretation=None,
            test_timestamps=ts[n_train:].copy(),
            meta={
                "dataset": NAME,
                "file": str(csv_path),
                "key": rel,
                "windows": window_source,
                "train_rows": str(n_train),
                "train_labelled_rows": str(int(row_labels[:n_train].sum())),
                "non_increasing_steps": str(int((np.diff(ts) <= 0).sum())),
            },
        )
