"""The driver's side of merging shards: one running summary, added to shard by shard, in index order.

Shard results arrive in any order (workers pull shards as they finish). Float64 addition is not
associative, so the summary adds shards in index order, which makes its statistics bit-equal at
any worker count: a shard that arrives before those in front of it waits in its file (written
anyway, for resumption) and is read back when its turn comes. The driver holds one running total
(count, sum, sum of outer products: 32 MiB at 2048 features, whatever the number of shards), the
bounded feature subset of KID and precision/recall, the Inception Score's per-chunk sums and the
grid images; never a list of per-shard statistics, all the features, logits or images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from pipelines.evaluate.metrics import FeatureStats, IscSums


class Summary:
    """Merged data of shards added in index order (`add` takes one shard's arrays: a worker's
    result or its .npz file, read lazily, so images in the file are never loaded)."""

    def __init__(self, want_features: bool = False, isc: IscSums | None = None):
        self.stats: FeatureStats | None = None
        self.resolution = 0
        self.want_features = want_features
        self.features: list[np.ndarray] = []
        self.feature_idx: list[np.ndarray] = []
        self.isc = isc
        self.grid: dict[int, np.ndarray] = {}

    def add(self, z: Mapping) -> None:
        stats = FeatureStats.from_arrays(z)
        if self.stats is None:  # a copy: a worker's arrays may be read-only views of Ray's store
            stats = FeatureStats(stats.count, stats.sum.copy(), stats.outer.copy())
        self.stats = stats if self.stats is None else self.stats.add_(stats)
        self.resolution = int(z["resolution"])
        if self.want_features:
            if "features" not in z:
                raise ValueError(f"shard {int(z['start'])}-{int(z['end'])} has no features; "
                                 "its file was written by an evaluation that did not keep them")
            self.features.append(np.array(z["features"], np.float32))
            self.feature_idx.append(np.array(z["feature_idx"], np.int64))
        if self.isc is not None:
            if "logits" not in z:  # a worker without a logits layer: no IS at all
                self.isc = None
            else:
                self.isc.add(int(z["start"]), z["logits"])
        if "grid_idx" in z:
            self.grid.update(zip(z["grid_idx"].tolist(), np.array(z["grid_images"])))

    def result(self) -> dict:
        """{stats, resolution, features (the subset, in index order; None when not kept),
        feature_idx, isc (IscSums or None), grid (images in index order)}."""
        if self.stats is None:
            raise ValueError("no shards were added")
        keep = self.want_features
        return {"stats": self.stats, "resolution": self.resolution,
                "features": np.concatenate(self.features) if keep else None,
                "feature_idx": np.concatenate(self.feature_idx) if keep else None,
                "isc": self.isc, "grid": [self.grid[i] for i in sorted(self.grid)]}


class InOrder:
    """Feeds shards to a Summary in the order of `shards`, whatever order they finish in.

    `arrived(shard, arrays)` is called once per finished shard (with its arrays when they are at
    hand, else None: they are loaded by `load(shard)` when the shard's turn comes). Only shards
    that finished out of order are read back, one at a time."""

    def __init__(self, shards: list[tuple[int, int]], load: Callable[[tuple[int, int]], Mapping],
                 summary: Summary):
        self.order, self.load, self.summary = list(shards), load, summary
        self.next = 0
        self.waiting: set[tuple[int, int]] = set()
        self.read_back = 0  # shards loaded from their file (resumed or out of order)

    def arrived(self, shard: tuple[int, int], arrays: Mapping | None = None) -> None:
        self.waiting.add(shard)
        while self.next < len(self.order) and self.order[self.next] in self.waiting:
            s = self.order[self.next]
            self.waiting.discard(s)
            if s == shard and arrays is not None:
                self.summary.add(arrays)
            else:
                self.read_back += 1
                with self.load(s) as z:
                    self.summary.add(z)
            self.next += 1

    @property
    def done(self) -> bool:
        return self.next == len(self.order)
