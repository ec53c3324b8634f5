"""The small protocol every dataset module implements.

A dataset is a set of *entities* (an SMD machine, a SMAP channel, a NAB stream, a synthetic
device). Each entity has a train array (assumed mostly normal), a test array with 0/1 labels per
row, and feature names. In the streaming service an entity is one *sensor*: the Kafka key of its
readings, each reading holding one value per feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Interpretation:
    """One labelled anomaly range and the features known to be responsible for it.

    ``start`` and ``end`` are 0-based test-row indices, ``end`` exclusive; ``features`` are
    0-based feature indices.
    """

    start: int
    end: int
    features: tuple[int, ...]


@dataclass(frozen=True)
class Entity:
    """One entity's data. Arrays are float32 ``(rows, features)``; labels int8 ``(test_rows,)``."""

    name: str
    train: np.ndarray
    test: np.ndarray
    labels: np.ndarray
    features: tuple[str, ...]
    interpretation: tuple[Interpretation, ...] | None = None
    #: Optional epoch-millisecond timestamps of the test rows (NAB); None means one row per step.
    test_timestamps: np.ndarray | None = None
    meta: dict[str, str] = field(default_factory=dict)
    #: Features that are measurements to score; None = all. The others are model inputs only
    #: (SMAP/MSL: the command flags beside the telemetry value).
    scored_features: tuple[str, ...] | None = None


class DatasetLoader(Protocol):
    """A dataset module. ``data_dir`` None means "the module's default" (only synthetic has one)."""

    name: str
    needs_data_dir: bool

    def list_entities(self, data_dir: Path | None) -> list[str]: ...

    def load_entity(self, data_dir: Path | None, entity: str) -> Entity: ...
