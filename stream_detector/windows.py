"""Per-sensor ring buffers in one preallocated numpy pool.

Each sensor owns a slot of ``2 * W`` rows. A reading is written twice, at ``i`` and ``i + W``
(``i = count mod W``), so the latest ``W`` readings are always the contiguous slice
``pool[slot, i + 1 : i + 1 + W]``: handing a window to the model is one slice copy, no modular
gather. The pool doubles when full (amortised O(1) per new sensor).

Policies (documented in docs/messages.md):

* **Warm-up:** a sensor yields no window until it has ``W`` readings; those readings are counted
  (``warming``) and never padded with fake data.
* **Late or duplicate data:** a reading whose timestamp is not strictly after the sensor's last
  accepted reading is rejected (the driver dead-letters it with reason ``late_or_duplicate``).
* **Gaps:** windows are made of consecutive *readings*; missing readings are not filled in.
"""

from __future__ import annotations

import enum

import numpy as np


class Status(enum.Enum):
    WARMING = "warming"
    READY = "ready"
    LATE = "late"
    FULL = "full"


class WindowStore:
    """Ring buffers for many sensors; ``append`` returns the status and, if ready, the window."""

    def __init__(
        self, window: int, n_features: int, max_sensors: int = 200_000, initial: int = 64
    ) -> None:
        self.window = window
        self.n_features = n_features
        self.max_sensors = max_sensors
        cap = max(1, min(initial, max_sensors))
        self._pool = np.zeros((cap, 2 * window, n_features), dtype=np.float32)
        self._count = np.zeros(cap, dtype=np.int64)
        self._last_ts = np.full(cap, -1, dtype=np.int64)
        self._first_ts = np.zeros((cap, window), dtype=np.int64)  # ts ring, for window start
        self._slots: dict[str, int] = {}
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, sensor: str) -> bool:
        return sensor in self._slots

    @property
    def nbytes(self) -> int:
        return int(
            self._pool.nbytes + self._count.nbytes + self._last_ts.nbytes + self._first_ts.nbytes
        )

    def sensors(self) -> list[str]:
        return list(self._slots)

    def _slot(self, sensor: str) -> int | None:
        slot = self._slots.get(sensor)
        if slot is not None:
            return slot
        if len(self._slots) >= self.max_sensors:
            return None
        if self._free:
            slot = self._free.pop()
        else:
            slot = len(self._slots)
            if slot >= len(self._pool):
                self._grow()
        self._slots[sensor] = slot
        self._count[slot] = 0
        self._last_ts[slot] = -1
        return slot

    def _grow(self) -> None:
        cap = min(len(self._pool) * 2, self.max_sensors)
        extra = cap - len(self._pool)
        self._pool = np.concatenate(
            [self._pool, np.zeros((extra, *self._pool.shape[1:]), np.float32)]
        )
        self._count = np.concatenate([self._count, np.zeros(extra, np.int64)])
        self._last_ts = np.concatenate([self._last_ts, np.full(extra, -1, np.int64)])
        self._first_ts = np.concatenate(
            [self._first_ts, np.zeros((extra, self.window), np.int64)]
        )

    def append(
        self, sensor: str, ts_ms: int, values: np.ndarray
    ) -> tuple[Status, np.ndarray | None, int]:
        """Add a reading. Returns ``(status, window view or None, window start ts)``.

        The returned window is a *view* into the pool, valid until the sensor's next append:
        copy it (the micro-batcher does) before appending again.
        """
        slot = self._slot(sensor)
        if slot is None:
            return Status.FULL, None, 0
        if ts_ms <= self._last_ts[slot]:
            return Status.LATE, None, 0
        w = self.window
        c = int(self._count[slot])
        i = c % w
        buf = self._pool[slot]
        buf[i] = values
        buf[i + w] = values
        self._first_ts[slot, i] = ts_ms
        self._last_ts[slot] = ts_ms
        self._count[slot] = c + 1
        if c + 1 < w:
            return Status.WARMING, None, 0
        start = i + 1
        return Status.READY, buf[start : start + w], int(self._first_ts[slot, (i + 1) % w])

    def remove(self, sensor: str) -> None:
        slot = self._slots.pop(sensor, None)
        if slot is not None:
            self._free.append(slot)

    def count(self, sensor: str) -> int:
        slot = self._slots.get(sensor)
        return 0 if slot is None else int(self._count[slot])
