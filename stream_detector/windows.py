"""Per-sensor ring buffers in one preallocated numpy pool, appended to a batch at a time.

Each sensor owns a slot of ``W`` rows (its last ``W`` readings, row ``count mod W``) and a ring
of the matching timestamps. :meth:`WindowStore.append_many` takes a whole ``consume()`` batch:
the readings are grouped by sensor with numpy, every reading that completes a window gets its
window gathered from the ring (older rows) and from the batch itself (newer rows of the same
sensor), and then only the last ``W`` readings of each sensor are written back. The result is the
same as appending the readings one at a time, in order (tests check it), at a fraction of the
per-reading Python cost. The pool doubles when full (amortised O(1) per new sensor).

Policies (documented in docs/messages.md):

* **Warm-up:** a sensor yields no window until it has ``W`` readings; those readings are counted
  (``warming``) and never padded with fake data.
* **Late or duplicate data:** a reading whose timestamp is not strictly after the sensor's last
  accepted reading is rejected (the driver dead-letters it with reason ``late_or_duplicate``).
* **Gaps:** windows are made of consecutive *readings*; missing readings are not filled in.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class Status(enum.Enum):
    WARMING = "warming"
    READY = "ready"
    LATE = "late"
    FULL = "full"


# status codes of :meth:`WindowStore.append_many` (``STATUSES[code]`` is the enum member)
WARMING, READY, LATE, FULL = 0, 1, 2, 3
STATUSES = (Status.WARMING, Status.READY, Status.LATE, Status.FULL)


@dataclass(frozen=True, slots=True)
class Appended:
    """What :meth:`WindowStore.append_many` did with a batch of ``n`` readings.

    ``status``: one code per reading (:data:`READY` etc.). ``ready``: the input positions of the
    readings that completed a window, ascending; ``windows[j]`` (owned by the caller),
    ``start_ms[j]`` and ``slots[j]`` belong to reading ``ready[j]``. ``new``: the sensors given a
    slot by this batch, with their slots (the caller resets per-slot state for them).
    """

    status: np.ndarray
    ready: np.ndarray
    windows: np.ndarray
    start_ms: np.ndarray
    slots: np.ndarray
    new: list[tuple[str, int]]


def group_ranks(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable grouping of ``keys``: ``(order, starts, rank)``.

    ``order`` sorts the keys stably (equal keys keep their input order); in sorted order,
    ``starts[g]`` is where group ``g`` begins and ``rank[i]`` is the position of element ``i``
    within its group (0 for a key's first occurrence).
    """
    order = np.argsort(keys, kind="stable")
    ks = keys[order]
    first = np.empty(len(ks), dtype=bool)
    if len(ks):
        first[0] = True
        np.not_equal(ks[1:], ks[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    gid = np.cumsum(first) - 1
    rank = np.arange(len(ks)) - starts[gid]
    return order, starts, rank


class WindowStore:
    """Ring buffers for many sensors; ``append_many`` returns statuses and the ready windows."""

    def __init__(
        self, window: int, n_features: int, max_sensors: int = 200_000, initial: int = 64
    ) -> None:
        self.window = window
        self.n_features = n_features
        self.max_sensors = max_sensors
        cap = max(1, min(initial, max_sensors))
        self._pool = np.zeros((cap, window, n_features), dtype=np.float32)
        self._ts = np.zeros((cap, window), dtype=np.int64)  # the rows' timestamps
        self._count = np.zeros(cap, dtype=np.int64)
        self._last_ts = np.full(cap, -1, dtype=np.int64)
        self._slots: dict[str, int] = {}
        self._free: list[int] = []

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, sensor: str) -> bool:
        return sensor in self._slots

    @property
    def capacity(self) -> int:
        """Number of slots allocated (per-slot state of callers must be at least this long)."""
        return len(self._pool)

    @property
    def nbytes(self) -> int:
        return int(self._pool.nbytes + self._ts.nbytes + self._count.nbytes
                   + self._last_ts.nbytes)

    def sensors(self) -> list[str]:
        return list(self._slots)

    def slot(self, sensor: str) -> int | None:
        return self._slots.get(sensor)

    def used_slots(self) -> np.ndarray:
        """The slots that hold a sensor (in no particular order)."""
        return np.fromiter(self._slots.values(), dtype=np.intp, count=len(self._slots))

    def _assign(self, sensor: str) -> int | None:
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
        w, f = self.window, self.n_features
        self._pool = np.concatenate([self._pool, np.zeros((extra, w, f), np.float32)])
        self._ts = np.concatenate([self._ts, np.zeros((extra, w), np.int64)])
        self._count = np.concatenate([self._count, np.zeros(extra, np.int64)])
        self._last_ts = np.concatenate([self._last_ts, np.full(extra, -1, np.int64)])

    def append_many(
        self, sensors: Sequence[str], ts_ms: Sequence[int] | np.ndarray, values: np.ndarray
    ) -> Appended:
        """Add readings ``(sensors[i], ts_ms[i], values[i])`` in order; see :class:`Appended`."""
        n = len(sensors)
        # everything that can fail is checked before a new sensor takes a slot: a batch that
        # raised half-way left a sensor with a slot but no state (its threshold 0: an episode
        # that opened at score 0 and never resolved; found in review)
        try:
            ts = np.asarray(ts_ms, dtype=np.int64).reshape(n)
        except (OverflowError, TypeError, ValueError):
            raise ValueError("timestamps must be n integers in [0, 2**63)") from None
        if n and ts.min() < 0:
            raise ValueError(f"timestamps must be >= 0 (epoch milliseconds), got {ts.min()}")
        get = self._slots.get
        slots = np.fromiter((get(s, -1) for s in sensors), dtype=np.int64, count=n)
        new: list[tuple[str, int]] = []
        if n and slots.min() < 0:
            fresh = np.flatnonzero(slots < 0).tolist()
            for i in fresh:  # a sensor's name becomes its alert ids' bytes (UTF-8)
                name = sensors[i]
                if not isinstance(name, str):
                    raise ValueError(f"sensor names must be strings, got {name!r}")
                try:
                    name.encode()
                except UnicodeEncodeError:
                    raise ValueError(f"sensor name {name!r} is not valid Unicode "
                                     "(a lone surrogate)") from None
            for i in fresh:
                s = sensors[i]
                slot = get(s)  # an earlier reading of this batch may have assigned it
                if slot is None:
                    slot = self._assign(s)
                    if slot is None:
                        continue  # FULL: stays -1
                    new.append((s, slot))
                slots[i] = slot
        status = np.full(n, WARMING, dtype=np.uint8)
        status[slots < 0] = FULL
        # group the accepted candidates by slot, in input order within a sensor
        pos = np.flatnonzero(slots >= 0)
        order, starts, rank = group_ranks(slots[pos])
        pos = pos[order]
        sl = slots[pos]
        t = ts[pos]
        prev = np.empty_like(t)
        prev[starts] = self._last_ts[sl[starts]]
        inner = rank > 0
        prev[inner] = t[np.flatnonzero(inner) - 1]
        if not (t > prev).all():
            # late or duplicate readings in this batch: a reading is accepted when its ts is
            # after every earlier ts of its sensor (rejected ones never exceed the running max)
            ok = self._accept_in_order(t, starts, self._last_ts[sl[starts]])
            status[pos[~ok]] = LATE
            pos, sl, t = pos[ok], sl[ok], t[ok]
            _, starts, rank = group_ranks(sl)  # sl is still grouped: the order is the identity
        w = self.window
        c0 = self._count[sl]  # the sensor's count before this batch (same for its group)
        c = c0 + rank  # readings of the sensor before this one
        is_ready = c + 1 >= w
        status[pos] = np.where(is_ready, READY, WARMING)
        sel = np.flatnonzero(is_ready)
        sel = sel[np.argsort(pos[sel], kind="stable")]  # ready readings in input order
        gstart = np.repeat(starts, np.diff(np.append(starts, len(sl))))  # group start per row
        windows, start_ms = self._gather(sl[sel], c[sel], c0[sel], gstart[sel], pos, values, t)
        # write back the last W readings of each sensor (distinct ring rows, so no clashes)
        sizes = np.diff(np.append(starts, len(sl)))
        keep = (np.repeat(sizes, sizes) - rank) <= w
        ks, kc = sl[keep], c[keep] % w
        self._pool[ks, kc] = values[pos[keep]]
        self._ts[ks, kc] = t[keep]
        gs = sl[starts]
        self._count[gs] += sizes
        self._last_ts[gs] = t[starts + sizes - 1]
        return Appended(status, pos[sel], windows, start_ms, sl[sel], new)

    def _gather(self, sl: np.ndarray, c: np.ndarray, c0: np.ndarray, gstart: np.ndarray,
                pos: np.ndarray, values: np.ndarray,
                t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windows of ready readings: counts ``c - W + 1 .. c`` of their sensor, from the ring
        where the count is below ``c0`` (before this batch), else from this batch."""
        w = self.window
        q = c[:, None] - (w - 1) + np.arange(w)  # (m, W) counts making up each window
        windows = self._pool[sl[:, None], q % w]  # ring rows (stale where the row is newer)
        start_ms = self._ts[sl, q[:, 0] % w]
        fresh = q >= c0[:, None]
        if fresh.any():
            rows = gstart[:, None] + (q - c0[:, None])  # sorted position of that reading
            windows[fresh] = values[pos[rows[fresh]]]
            first = fresh[:, 0]
            start_ms[first] = t[rows[first, 0]]
        return windows, start_ms

    @staticmethod
    def _accept_in_order(t: np.ndarray, starts: np.ndarray, last_ts: np.ndarray) -> np.ndarray:
        ok = np.zeros(len(t), dtype=bool)
        bounds = np.append(starts, len(t)).tolist()
        ts = t.tolist()
        for g, top in enumerate(last_ts.tolist()):
            a, b = bounds[g], bounds[g + 1]
            for i in range(a, b):
                if ts[i] > top:
                    ok[i] = True
                    top = ts[i]
        return ok

    def append(
        self, sensor: str, ts_ms: int, values: np.ndarray
    ) -> tuple[Status, np.ndarray | None, int]:
        """One reading: ``(status, window or None, window start ts)`` (tests, tools)."""
        row = np.asarray(values, dtype=np.float32).reshape(1, self.n_features)
        out = self.append_many([sensor], [ts_ms], row)
        status = STATUSES[int(out.status[0])]
        if status is Status.READY:
            return status, out.windows[0], int(out.start_ms[0])
        return status, None, 0

    def remove(self, sensor: str) -> None:
        slot = self._slots.pop(sensor, None)
        if slot is not None:
            self._free.append(slot)

    def count(self, sensor: str) -> int:
        slot = self._slots.get(sensor)
        return 0 if slot is None else int(self._count[slot])
