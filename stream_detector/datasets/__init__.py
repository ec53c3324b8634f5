"""Dataset registry: real benchmarks (SMD, SMAP, MSL, NAB) and a built-in synthetic generator.

Every dataset is a :class:`~stream_detector.datasets.base.DatasetLoader`; look one up with
:func:`get_loader` and load entities with :func:`load_dataset`::

    from stream_detector.datasets import load_dataset
    entities = load_dataset("smd", "/data/smd", ["machine-1-1"])

Real datasets need a data directory. When none is given, :func:`default_data_dir` looks for the
shared checkout next to the repository (``../shared/data/<smd|smap_msl|nab>``, relative to the
current directory or to the repository root); when that is absent too, loading fails with a
:class:`~stream_detector.errors.DatasetError` asking for ``--data-dir``.

:func:`load_dataset` refuses, with a DatasetError, a directory that holds no entity of the
dataset (e.g. SMAP/MSL's directory given for SMD), and (:func:`check_entity_names`) an empty
entity list (None means all) or an entity named more than once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from stream_detector.datasets.base import DatasetLoader, Entity, Interpretation
from stream_detector.datasets.nab import NABLoader
from stream_detector.datasets.smap_msl import TelemanomLoader
from stream_detector.datasets.smd import SMDLoader
from stream_detector.datasets.synthetic import SyntheticLoader
from stream_detector.errors import DatasetError
from stream_detector.manifest import repeated_names

__all__ = [
    "DATASETS",
    "DEFAULT_DATASET",
    "DatasetLoader",
    "Entity",
    "Interpretation",
    "default_data_dir",
    "get_loader",
    "load_dataset",
    "check_entity_names",
    "refuse_data_dir_of_generated",
    "resolve_data_dir",
]

DEFAULT_DATASET = "synthetic"

DATASETS: dict[str, DatasetLoader] = {
    "smd": SMDLoader(),
    "smap": TelemanomLoader("smap"),
    "msl": TelemanomLoader("msl"),
    "nab": NABLoader(),
    "synthetic": SyntheticLoader(),
}

#: Sub-folder of ``../shared/data`` holding each real dataset.
_SHARED_SUBDIR: dict[str, str] = {
    "smd": "smd",
    "smap": "smap_msl",
    "msl": "smap_msl",
    "nab": "nab",
}

#: Repository root: the parent of the ``stream_detector`` package directory.
_REPO_ROOT = Path(__file__).resolve().parent.parent.parent


def get_loader(name: str) -> DatasetLoader:
    """The loader registered as ``name`` (case-insensitive); DatasetError when unknown."""
    key = name.strip().lower()
    try:
        return DATASETS[key]
    except KeyError:
        known = ", ".join(DATASETS)
        raise DatasetError(f"unknown dataset {name!r}; known datasets: {known}") from None


def default_data_dir(name: str) -> Path | None:
    """``../shared/data/<subdir>`` for a real dataset, if it exists, else ``data/<subdir>``
    (where ``datasets download smd`` writes by default); else None.

    Each looked up relative to the current working directory first, then to the repository
    root. Synthetic and unknown names give None.
    """
    sub = _SHARED_SUBDIR.get(name.strip().lower())
    if sub is None:
        return None
    for candidate in (*(base.parent / "shared" / "data" / sub for base in (Path.cwd(), _REPO_ROOT)),
                      *(base / "data" / sub for base in (Path.cwd(), _REPO_ROOT))):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def resolve_data_dir(name: str, data_dir: str | Path | None) -> Path:
    """``data_dir`` as a Path that exists, or the default one; DatasetError otherwise."""
    if data_dir is None:
        found = default_data_dir(name)
        if found is None:
            sub = _SHARED_SUBDIR.get(name, name)
            raise DatasetError(
                f"dataset {name!r} needs its data directory: pass --data-dir "
                f"(no default ../shared/data/{sub} found)"
            )
        return found
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise DatasetError(f"{name} data directory {path} {what}")
    return path


def check_entity_names(names: Sequence[str], source: str) -> None:
    """DatasetError when ``names`` (from ``source``, e.g. ``--entities``) is empty or names an
    entity more than once: each would be scored, and averaged, once per mention."""
    if not names:
        raise DatasetError(f"{source} names no entity: give comma-separated names, or leave "
                           "the option out for all")
    repeated = repeated_names(names)
    if repeated:
        raise DatasetError(f"{source} names {', '.join(repeated)} more than once: name each "
                           "entity once")


def refuse_data_dir_of_generated(name: str, data_dir: str | Path | None) -> None:
    """DatasetError when a data directory is given for a dataset that is generated, not read
    (``synthetic``): it would be ignored without a word."""
    if data_dir is not None and not get_loader(name).needs_data_dir:
        raise DatasetError(f"dataset {name!r} is generated, not read from files: leave out "
                           f"--data-dir (got {data_dir})")


def load_dataset(
    name: str, data_dir: str | Path | None = None, entities: Sequence[str] | None = None
) -> list[Entity]:
    """Load ``entities`` (all when None) of dataset ``name`` from ``data_dir``.

    DatasetError when the selection is empty (an empty list, or a directory holding no entity
    of this dataset) or names an entity more than once: each would be scored, and averaged,
    once per mention.
    """
    loader = get_loader(name)
    refuse_data_dir_of_generated(name, data_dir)
    path = Path(data_dir) if data_dir is not None else None
    if entities is None:
        names = loader.list_entities(path)
        if not names:
            where = (f" in {resolve_data_dir(name, data_dir)}" if loader.needs_data_dir
                     else "")
            raise DatasetError(
                f"dataset {name!r} has no entities{where}: is that the {name} data "
                "directory? (pass it with --data-dir)"
            )
    else:
        names = list(entities)
        check_entity_names(names, f"the entity list of dataset {name!r}")
    return [loader.load_entity(path, e) for e in names]
