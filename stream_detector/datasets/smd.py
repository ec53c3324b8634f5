"""SMD, the Server Machine Dataset (OmniAnomaly, Su et al., KDD 2019).

Layout of a data directory (the upstream ``ServerMachineDataset/`` folder, plain or gzipped)::

    train/<machine>.txt[.gz]                 N x 38 comma-separated floats, no header
    test/<machine>.txt[.gz]                  M x 38, same columns
    test_label/<machine>.txt[.gz]            one 0/1 per line, one line per test row
    interpretation_label/<machine>.txt[.gz]  optional; lines ``START-END:d1,d2,...``
    labels_only/...                          machines with labels but no values (ignored)

Entities are the machines that have all three of ``train``, ``test`` and ``test_label``; a
machine found only under ``labels_only/`` is not an entity (loading it says why). When both
``X.txt`` and ``X.txt.gz`` exist, the plain ``.txt`` is read. Features are named ``m01``,
``m02``, ... (upstream's 1-based metric dimensions), their count taken from the files.

Quirks of the real data, and how they are handled:

- Train is often one row shorter than test (e.g. 23702 vs 23703): upstream; only test and
  test_label must agree, and they are checked to.
- Several columns are constant (all 0.0) on a machine, sometimes only in train or only in test:
  kept as they are; consumers must tolerate zero variance.
- Values were min-max scaled over train and test together (a mild look-ahead): kept as they are.
- ``interpretation_label`` ranges are half-open against ``test_label`` in almost every line
  (``S-E`` covers rows S..E-1), so ``S-E`` becomes ``Interpretation(S, E, ...)`` with 0-based
  feature indices. A few upstream lines disagree with ``test_label`` (longer, shorter, inclusive,
  a labelled segment with no line, a second line nested inside another): they are kept as
  written; use ``labels`` for detection metrics and ``interpretation`` only for root cause.
"""

from __future__ import annotations

import gzip
import re
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from stream_detector.datasets.base import Entity, Interpretation
from stream_detector.errors import DatasetError

NAME = "smd"
KINDS: tuple[str, ...] = ("train", "test", "test_label", "interpretation_label")
REQUIRED_KINDS: tuple[str, ...] = ("train", "test", "test_label")
SUFFIXES: tuple[str, ...] = (".txt", ".txt.gz")

_INTERP_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*:\s*(\d+(?:\s*,\s*\d+)*)\s*,?\s*$")


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key putting ``machine-3-2`` before ``machine-3-10``."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def feature_names(n: int) -> tuple[str, ...]:
    """``m01``, ``m02``, ... for ``n`` columns (wider numbers past 99)."""
    width = max(2, len(str(n)))
    return tuple(f"m{i + 1:0{width}d}" for i in range(n))


def read_text(path: Path) -> str:
    """The text of ``path``, gunzipped when it ends in ``.gz``; DatasetError when unreadable.

    A leading UTF-8 byte-order mark is dropped.
    """
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8-sig") as fh:
                return fh.read()
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DatasetError(f"missing file: {path}") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None


def _data_rows(lines: list[str]) -> tuple[list[str], Sequence[int]]:
    """The lines holding data (not blank after strip) and each one's 1-based line number."""
    if all(map(str.strip, lines)):  # the usual case, checked at C speed: no blank line
        return lines, range(1, len(lines) + 1)
    rows: list[str] = []
    linenos: list[int] = []
    for lineno, line in enumerate(lines, start=1):
        if line.strip():
            rows.append(line)
            linenos.append(lineno)
    return rows, linenos


def _loadtxt(rows: list[str]) -> np.ndarray:
    return np.loadtxt(rows, delimiter=",", dtype=np.float32, ndmin=2, comments=None)


def _scan_for_error(
    rows: list[str], linenos: Sequence[int], path: Path, ncols: int | None
) -> DatasetError:
    """Walk the data rows in Python to find exactly where the fast parser choked."""
    expected = ncols
    for line, lineno in zip(rows, linenos, strict=True):
        fields = line.split(",")
        if expected is None:
            expected = len(fields)
        elif len(fields) != expected:
            return DatasetError(
                f"{path} line {lineno}: expected {expected} comma-separated values, "
                f"found {len(fields)}"
            )
        for col, field in enumerate(fields, start=1):
            text = field.strip()
            try:
                # float() also takes "1_0" and non-ASCII digits, which np.loadtxt refuses
                if "_" in text or not text.isascii():
                    raise ValueError(text)
                float(text)
            except ValueError:
                return DatasetError(
                    f"{path} line {lineno} column {col}: non-numeric value {text!r}"
                )
    # Anything float() took but the fast parser did not: find the row by parsing each alone.
    for line, lineno in zip(rows, linenos, strict=True):
        try:
            _loadtxt([line])
        except ValueError as exc:
            return DatasetError(f"{path} line {lineno}: cannot parse {line.strip()!r} ({exc})")
    return DatasetError(f"{path}: could not be parsed as comma-separated numbers")


def _read_rows(
    path: Path, ncols: int | None
) -> tuple[np.ndarray, list[str], Sequence[int]]:
    """``read_matrix``'s array, plus the data lines and their 1-based line numbers."""
    rows, linenos = _data_rows(read_text(path).splitlines())
    if not rows:
        raise DatasetError(f"{path} is empty")
    try:
        arr = _loadtxt(rows)
    except ValueError:
        raise _scan_for_error(rows, linenos, path, ncols) from None
    if ncols is not None and arr.shape[1] != ncols:
        raise _scan_for_error(rows, linenos, path, ncols)
    if not np.isfinite(arr).all():
        row = int(np.argwhere(~np.isfinite(arr))[0][0])
        raise DatasetError(f"{path} line {linenos[row]}: value is NaN, infinite or beyond "
                           "float32 range (about 3.4e38)")
    return arr, rows, linenos


def read_matrix(path: Path, ncols: int | None = None) -> np.ndarray:
    """A comma-separated numeric file as float32 ``(rows, cols)``.

    Blank lines (empty or only whitespace) are skipped. Every row must have the same number of
    columns (``ncols`` when given); values must be finite numbers. Errors name the file and the
    1-based line.
    """
    return _read_rows(path, ncols)[0]


def read_labels(path: Path) -> np.ndarray:
    """A one-value-per-line 0/1 label file as int8 ``(rows,)``; blank lines are skipped."""
    arr, rows, linenos = _read_rows(path, ncols=1)
    values = arr[:, 0]
    bad = np.flatnonzero((values != 0) & (values != 1))
    if bad.size:
        row = int(bad[0])
        raise DatasetError(
            f"{path} line {linenos[row]}: labels must be 0 or 1, found {rows[row].strip()!r}"
        )
    return values.astype(np.int8)


def parse_interpretation(
    lines: Iterable[str], n_features: int, n_rows: int, source: str = "<interpretation>"
) -> tuple[Interpretation, ...]:
    """Parse ``START-END:d1,d2,...`` lines into 0-based, end-exclusive Interpretations.

    ``START``/``END`` are 0-based test rows with ``END`` exclusive (see the module docstring);
    ``d`` are 1-based feature ids in ``1..n_features``. Blank lines are skipped.
    """
    out: list[Interpretation] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        m = _INTERP_RE.match(line)
        if m is None:
            raise DatasetError(
                f"{source} line {lineno}: expected 'START-END:d1,d2,...', found {line.strip()!r}"
            )
        start, end = int(m.group(1)), int(m.group(2))
        dims = sorted({int(d) for d in m.group(3).split(",")})
        if not start < end <= n_rows:
            raise DatasetError(
                f"{source} line {lineno}: range {start}-{end} is empty or outside the "
                f"{n_rows} test rows"
            )
        if dims[0] < 1 or dims[-1] > n_features:
            raise DatasetError(
                f"{source} line {lineno}: feature ids must be 1..{n_features}, found {dims}"
            )
        out.append(Interpretation(start, end, tuple(d - 1 for d in dims)))
    return tuple(out)


def find_file(data_dir: Path, kind: str, machine: str) -> Path | None:
    """``<data_dir>/<kind>/<machine>.txt`` or ``.txt.gz``, whichever exists (plain first)."""
    for suffix in SUFFIXES:
        path = data_dir / kind / f"{machine}{suffix}"
        if path.is_file():
            return path
    return None


def _machines_in(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    out: set[str] = set()
    for p in folder.iterdir():
        for suffix in SUFFIXES:
            if p.name.endswith(suffix) and p.is_file():
                out.add(p.name[: -len(suffix)])
    return out


def _present(path: Path | None) -> Path:
    if path is None:  # checked by the caller; keeps the type checker honest
        raise DatasetError("internal error: SMD file unexpectedly missing")
    return path


class SMDLoader:
    """Loader for SMD in the standard layout (see the module docstring)."""

    name = NAME
    needs_data_dir = True

    def _dir(self, data_dir: Path | None) -> Path:
        from stream_detector.datasets import resolve_data_dir

        path = resolve_data_dir(self.name, data_dir)
        if not (path / "train").is_dir() and not (path / "test").is_dir():
            raise DatasetError(
                f"{path} is not an SMD directory: no train/ or test/ folder "
                "(expected train/, test/, test_label/, interpretation_label/)"
            )
        return path

    def list_entities(self, data_dir: Path | None) -> list[str]:
        path = self._dir(data_dir)
        sets = [_machines_in(path / kind) for kind in REQUIRED_KINDS]
        return sorted(set.intersection(*sets), key=natural_key)

    def load_entity(self, data_dir: Path | None, entity: str) -> Entity:
        path = self._dir(data_dir)
        if entity != Path(entity).name or entity in (".", "..") or "\\" in entity:
            # a path ("./m-1", "../test_label/m-1") loaded a machine under a second name, or
            # reached into another folder (review)
            raise DatasetError(f"SMD machine names are file names, not paths: {entity!r}")
        files = {kind: find_file(path, kind, entity) for kind in KINDS}
        if all(files[k] is None for k in REQUIRED_KINDS):
            raise self._unknown(path, entity)
        for kind in REQUIRED_KINDS:
            if files[kind] is None:
                raise DatasetError(
                    f"SMD machine {entity!r}: missing file {path / kind / entity}.txt[.gz]"
                )
        train_path, test_path, label_path = (_present(files[k]) for k in REQUIRED_KINDS)

        train = read_matrix(train_path)
        test = read_matrix(test_path)
        if train.shape[1] != test.shape[1]:
            raise DatasetError(
                f"SMD machine {entity!r}: train has {train.shape[1]} columns ({train_path}) "
                f"but test has {test.shape[1]} ({test_path})"
            )
        labels = read_labels(label_path)
        if labels.shape[0] != test.shape[0]:
            raise DatasetError(
                f"SMD machine {entity!r}: {label_path} has {labels.shape[0]} labels but "
                f"{test_path} has {test.shape[0]} rows"
            )
        interp_path = files["interpretation_label"]
        interpretation = None
        if interp_path is not None:
            interpretation = parse_interpretation(
                read_text(interp_path).splitlines(), test.shape[1], test.shape[0],
                str(interp_path),
            )
        constant = np.flatnonzero(np.ptp(train, axis=0) == 0) + 1  # 1-based, as upstream
        return Entity(
            name=entity,
            train=train,
            test=test,
            labels=labels,
            features=feature_names(train.shape[1]),
            interpretation=interpretation,
            meta={
                "dataset": NAME,
                "data_dir": str(path),
                "constant_train_features": ",".join(str(int(i)) for i in constant),
            },
        )

    def _unknown(self, path: Path, entity: str) -> DatasetError:
        if find_file(path / "labels_only", "test_label", entity) is not None:
            return DatasetError(
                f"SMD machine {entity!r} has labels only ({path / 'labels_only'}): its "
                "train/test values are not in this directory"
            )
        known = self.list_entities(path)
        shown = ", ".join(known[:5]) + (", ..." if len(known) > 5 else "")
        if not known:
            return DatasetError(f"unknown SMD machine {entity!r}: {path} holds no machines")
        return DatasetError(
            f"unknown SMD machine {entity!r} in {path}; known ({len(known)}): {shown}"
        )

