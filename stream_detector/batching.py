"""Micro-batching of ready windows across sensors: flush on size OR deadline, never block.

The clock is injected (seconds, monotonic) so tests drive time by hand. A batch is immutable
once emitted: the windows array is owned by the batch and the batcher starts a fresh buffer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Batch:
    windows: np.ndarray  # (n, W, F) float32, owned by the batch
    items: tuple[Any, ...]  # per-window metadata, in arrival order
    opened_at: float  # clock time the first window arrived

    def __len__(self) -> int:
        return len(self.items)


class MicroBatcher:
    def __init__(
        self,
        max_batch: int,
        max_wait_s: float,
        window: int,
        n_features: int,
        clock: Callable[[], float],
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._shape = (max_batch, window, n_features)
        self._clock = clock
        self._buf = np.empty(self._shape, dtype=np.float32)
        self._items: list[Any] = []
        self._opened_at = 0.0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, window: np.ndarray, item: Any) -> Batch | None:
        """Copy ``window`` in; return the full batch when this window fills it."""
        n = len(self._items)
        if n == 0:
            self._opened_at = self._clock()
        self._buf[n] = window
        self._items.append(item)
        if n + 1 >= self.max_batch:
            return self._emit()
        return None

    def add_many(self, windows: np.ndarray, items: Sequence[Any]) -> list[Batch]:
        """Copy ``windows`` in (``items[j]`` belongs to ``windows[j]``); return the batches they
        filled, in order (the same batches as ``add`` called once per window)."""
        out: list[Batch] = []
        m = len(items)
        i = 0
        while i < m:
            n = len(self._items)
            if n == 0:
                self._opened_at = self._clock()
            take = min(self.max_batch - n, m - i)
            self._buf[n : n + take] = windows[i : i + take]
            self._items.extend(items[i : i + take])
            i += take
            if n + take >= self.max_batch:
                out.append(self._emit())
        return out

    def deadline(self) -> float | None:
        """Clock time at which the pending batch is due, or None when empty."""
        return self._opened_at + self.max_wait_s if self._items else None

    def due(self) -> bool:
        d = self.deadline()
        return d is not None and self._clock() >= d

    def poll(self) -> Batch | None:
        """Return the pending batch if its deadline has passed."""
        return self._emit() if self.due() else None

    def flush(self) -> Batch | None:
        """Return whatever is pending, now."""
        return self._emit() if self._items else None

    def _emit(self) -> Batch:
        n = len(self._items)
        windows = self._buf[:n]
        batch = Batch(windows, tuple(self._items), self._opened_at)
        self._buf = np.empty(self._shape, dtype=np.float32)
        self._items = []
        return batch
