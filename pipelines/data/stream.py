"""A deterministic, resumable, elastic stream of a dataset's rows: each worker reads its own share.

Used by `flowar train` (latent row groups, pipelines/train/data.py) and `flowar vae train`
(chunks of source images). Why not Ray Data: `streaming_split` hands blocks to whichever worker
asks first, so the order is not reproducible (ray-project/ray#35053) and an interrupted run cannot
replay it; and giving every worker the whole dataset to filter (what training did before) costs
every worker memory in proportion to the dataset. Here the order is a pure function of
(seed, epoch, partitions), every worker reads only the units its positions need, straight from
the dataset's files, and holds only a bounded window of rows. MosaicML's StreamingDataset
(https://github.com/mosaicml/streaming) is the model: deterministic, resumable mid-epoch, elastic.

The order of one epoch:

  1. The dataset is a list of *units*: runs of rows that are read together (a Parquet row group,
     or a chunk of source images). The units are permuted by (seed, epoch); the epoch's *stream*
     is their rows in that order.
  2. The stream is cut into `partitions` equal contiguous ranges (the remainder, fewer rows than
     `partitions`, is left out of that epoch; a new permutation leaves out others next epoch).
  3. Each partition is read in *windows* of `window` rows, and the rows of a window are shuffled
     by (seed, epoch, partition, window). Position i of a partition is row perm[i % window] of
     window i // window.

Partitions are fixed for a run (the worker count of its first start). Step s of an epoch takes
positions [s*b, (s+1)*b) of every partition, b = global batch / partitions, so which rows a step
trains on does not depend on how many workers there are: a run resumed at another worker count
continues the same epoch without repeating or skipping a row. A worker reads only the partitions
its slice of the global batch covers (one each when workers == partitions), a window at a time,
with the next window read ahead on a thread.

Mixing: a batch draws b rows from each partition's current window, i.e. from about
window / unit-size units per partition, chosen at random over the whole dataset each epoch. Rows
that sit next to each other in the files (a class-sorted source) stay together within a unit, so
a larger window, smaller units (encode writes row groups of ROW_GROUP_ROWS) or more partitions mix
more; a worker's memory is about two windows per partition it reads.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = ["seed_of", "Unit", "EpochOrder", "WindowReader", "ReadStats"]

Columns = dict[str, np.ndarray]


def seed_of(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class Unit:
    """Rows read together: `ref` says where (e.g. (file, row group)), `rows` how many."""
    ref: tuple
    rows: int


class EpochOrder:
    """The stream of one epoch: the units' permutation, the partitions' ranges and the windows'
    shuffles, all functions of (units, seed, epoch, partitions, window)."""

    def __init__(self, units: list[Unit], *, seed: int, epoch: int, partitions: int, window: int):
        self.seed, self.epoch, self.partitions, self.window = seed, epoch, partitions, window
        self.order = np.random.default_rng(seed_of("units", seed, epoch)).permutation(len(units))
        sizes = np.array([units[i].rows for i in self.order], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(sizes)])  # stream offset of each unit
        self.length = int(self.starts[-1]) // partitions  # rows per partition

    def windows(self) -> int:
        return -(-self.length // self.window)

    def window_span(self, partition: int, w: int) -> tuple[int, int]:
        """Stream offsets [a, b) of window w of a partition."""
        a = partition * self.length + w * self.window
        return a, min(a + self.window, (partition + 1) * self.length)

    def pieces(self, a: int, b: int) -> list[tuple[int, int, int]]:
        """(unit index, first row, end row) of the units that make stream offsets [a, b)."""
        out = []
        k = int(np.searchsorted(self.starts, a, side="right")) - 1
        while a < b:
            lo, end = a - int(self.starts[k]), int(self.starts[k + 1])
            hi = min(b, end) - int(self.starts[k])
            out.append((int(self.order[k]), lo, hi))
            a, k = min(b, end), k + 1
        return out

    def window_perm(self, partition: int, w: int) -> np.ndarray:
        a, b = self.window_span(partition, w)
        rng = np.random.default_rng(seed_of("window", self.seed, self.epoch, partition, w))
        return rng.permutation(b - a)


@dataclass
class ReadStats:
    """What a reader has read: units and rows (a row of a unit split over two windows counts
    once per read), and the seconds the caller waited for a window that was not ready."""
    units: int = 0
    rows: int = 0
    wait_s: float = 0.0


class WindowReader:
    """Rows of partitions of the stream, a shuffled window at a time, the next one read ahead.

    `read(unit, lo, hi)` returns the unit's rows [lo, hi) as {column: array}. A reader keeps at
    most the current and the next window of each partition it is asked for; reads happen on one
    background thread (so a unit cut by a window edge is read once, from a one-unit cache)."""

    def __init__(self, units: list[Unit], read: Callable[[Unit, int, int], Columns], *,
                 seed: int, partitions: int, window: int, on_read: Callable | None = None):
        if window < 1 or partitions < 1:
            raise ValueError(f"window={window} and partitions={partitions} must be at least 1")
        self.units, self.read, self.on_read = units, read, on_read
        self.seed, self.partitions, self.window = seed, partitions, window
        self.stats = ReadStats()
        self._orders: dict[int, EpochOrder] = {}
        self._windows: dict[tuple[int, int, int], Future] = {}  # (epoch, partition, w)
        self._cache: tuple[tuple, Columns] | None = None  # the last unit read, whole
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowar-read")
        self._lock = threading.Lock()

    def order(self, epoch: int) -> EpochOrder:
        with self._lock:  # the read-ahead thread asks for the next epoch's order too
            if epoch not in self._orders:
                self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
                self._orders[epoch] = EpochOrder(self.units, seed=self.seed, epoch=epoch,
                                                 partitions=self.partitions, window=self.window)
            return self._orders[epoch]

    def rows_per_partition(self) -> int:
        return self.order(0).length  # the same every epoch: the units do not change

    def take(self, epoch: int, partition: int, a: int, b: int) -> Columns:
        """Rows at positions [a, b) of a partition's stream in `epoch`, in stream order."""
        order = self.order(epoch)
        if not 0 <= a <= b <= order.length:
            raise IndexError(f"positions [{a}, {b}) outside partition of {order.length} rows")
        parts = []
        while a < b:
            w = a // self.window
            rows = self._get(epoch, partition, w)
            end = min(b, (w + 1) * self.window)
            parts.append({k: v[a - w * self.window:end - w * self.window] for k, v in rows.items()})
            a = end
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- windows
    def _get(self, epoch: int, partition: int, w: int) -> Columns:
        import time

        key = (epoch, partition, w)
        for old in [k for k in self._windows if k[1] == partition and k[:1] + k[2:] < (epoch, w)]:
            self._windows.pop(old).cancel()  # behind this position: never asked for again
        future = self._windows.get(key) or self._submit(key)
        if not future.done():
            t0 = time.perf_counter()
            future.result()
            self.stats.wait_s += time.perf_counter() - t0
        nxt = (epoch, partition, w + 1) if w + 1 < self.order(epoch).windows() else (epoch + 1, partition, 0)
        if nxt not in self._windows:
            self._submit(nxt)  # read ahead while the caller trains on this one
        return future.result()

    def _submit(self, key: tuple[int, int, int]) -> Future:
        self._windows[key] = self._pool.submit(self._load, *key)
        return self._windows[key]

    def _load(self, epoch: int, partition: int, w: int) -> Columns:
        """Window w of a partition: its units' rows, scattered straight into shuffled places."""
        order = self.order(epoch)
        a, b = order.window_span(partition, w)
        dest = np.empty(b - a, dtype=np.int64)
        dest[order.window_perm(partition, w)] = np.arange(b - a)  # stream row j goes to dest[j]
        out: Columns = {}
        offset = 0
        for index, lo, hi in order.pieces(a, b):
            rows = self._unit_rows(index, lo, hi)
            for k, v in rows.items():
                if k not in out:
                    out[k] = np.empty((b - a, *v.shape[1:]), dtype=v.dtype)
                out[k][dest[offset:offset + hi - lo]] = v
            offset += hi - lo
        return out

    def _unit_rows(self, index: int, lo: int, hi: int) -> Columns:
        unit = self.units[index]
        if self._cache is not None and self._cache[0] == (index,):
            whole = self._cache[1]
        else:
            whole = self.read(unit, 0, unit.rows)
            self._cache = ((index,), whole) if hi < unit.rows else None  # the rest is read next
            self.stats.units += 1
            self.stats.rows += unit.rows
            if self.on_read is not None:
                self.on_read(unit)
        return {k: v[lo:hi] for k, v in whole.items()}
