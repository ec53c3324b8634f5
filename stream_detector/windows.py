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
from array import array

import numpy as np


class Status(enum.Enum):
    WARMING = "warming"
    READY = "ready"
    LATE = "late"
    FULL = "full"


_WARMING, _READY, _LATE, _FULL = Status.WARMING, Status.READY, Status.LATE, Status.FULL


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
        # per-slot integers live in flat int64 arrays of the ``array`` module: same 8 bytes
        # per value as numpy, but indexing them gives plain ints (this is the per-reading path)
        self._count = array("q", bytes(8 * cap))
        self._last_ts = array("q", [-1]) * cap
        self._first_ts = array("q", bytes(8 * cap * window))  # ts ring per slot, window start
        self._slots: dict[str, int] = {}
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, sensor: str) -> bool:
        return sensor in self._slots

    @property
    def nbytes(self) -> int:
        ints = len(self._count) + len(self._last_ts) + len(self._first_ts)
        return int(self._pool.nbytes) + ints * self._count.itemsize

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
        self._count.frombytes(bytes(8 * extra))
        self._last_ts.extend(array("q", [-1]) * extra)
        self._first_ts.frombytes(bytes(8 * extra * self.window))

    def append(
        self, sensor: str, ts_ms: int, values: np.ndarray
    ) -> tuple[Status, np.ndarray | None, int]:
        """Add a reading. Returns ``(status, window view or None, window start ts)``.

        The returned window is a *view* into the pool, valid until the sensor's next append:
        copy it (the micro-batcher does) before appending again.
        """
        slot = self._slots.get(sensor)
        if slot is None:
            slot = self._slot(sensor)
            if slot is None:
                return _FULL, None, 0
        if type(ts_ms) is not int:  # numpy integers etc.; the int64 arrays take plain ints
            ts_ms = int(ts_ms)
        last_ts = self._last_ts
        if ts_ms <= last_ts[slot]:
            return _LATE, None, 0
        w = self.window
        count = self._count
        c = count[slot]
        i = c % w
        buf = self._pool[slot]
        buf[i] = values
        buf[i + w] = values
        base = slot * w
        self._first_ts[base + i] = ts_ms
        last_ts[slot] = ts_ms
        count[slot] = c + 1
        if c + 1 < w:
            return _WARMING, None, 0
        start = i + 1
        return _READY, buf[start : start + w], self._first_ts[base + start % w]

    def remove(self, sensor: str) -> None:
        slot = self._slots.pop(sensor, None)
        if slot is not None:
            self._free.append(slot)

    def count(self, sensor: str) -> int:
        slot = self._slots.get(sensor)
        return 0 if slot is None else self._count[slot]
