"""Each training worker's deterministic share of a latent dataset, and its batches.

Ray Train's default `streaming_split` hands blocks to whichever worker asks first, so the data
order differs between runs and an interrupted run cannot replay it. Exact resume needs a data
order that is a pure function of (seed, epoch, step, rank). So every worker reads the (already
materialised) Ray Dataset once, keeps the rows whose key hashes to its rank (1/N of the memory),
sorts them by key, and then draws, per epoch, a seeded permutation of its rows. The data position
is therefore just the optimizer step: step -> (epoch, index in epoch).

Per batch, a fresh posterior sample z = mean + std * eps (normalised the dataset's way) and the
optional flipped latents (50%) are drawn from a generator seeded by (seed, epoch, step, micro,
rank), which is also what makes resumed runs bit-identical. With image scale construction (Table 3)
every coarser scale's map is sampled the same way from its own image-derived moments, flipped
together with the finest latent.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from pipelines.data.latents import LatentDatasetMeta, image_columns, moment_column, sample_latents

__all__ = ["seed_of", "owner_rank", "LatentShard", "load_shard", "BatchSource"]


def seed_of(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings, stable across processes and Python versions."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def owner_rank(key: str, world_size: int) -> int:
    return zlib.crc32(str(key).encode()) % world_size


@dataclass
class LatentShard:
    keys: list[str]
    labels: torch.Tensor  # (n,) long
    mean: torch.Tensor  # (n, C, H, W)
    std: torch.Tensor
    mean_flip: torch.Tensor | None
    std_flip: torch.Tensor | None
    rows_per_rank: list[int]  # every rank's share, so all agree on the epoch length
    total_rows: int
    image: dict[str, torch.Tensor] = field(default_factory=dict)  # mean_img{k}, std_flip_img{k}, ...

    def steps_per_epoch(self, micro_batch: int, accum: int) -> int:
        """Equal on every rank (collectives must match): the smallest share sets the epoch."""
        return min(self.rows_per_rank) // (micro_batch * accum)


def load_shard(batches, rank: int, world_size: int, image_scales=()) -> LatentShard:
    """Keep this rank's rows of an iterable of numpy batches (dict of column -> array); with
    `image_scales`, also those scales' image-derived moments."""
    counts = [0] * world_size
    wanted: list[str] = []  # decided at the first batch, which shows whether flips are stored
    keep: dict[str, list] = {}
    for batch in batches:
        keys = [str(k) for k in batch["key"]]
        owners = np.array([owner_rank(k, world_size) for k in keys])
        for r in range(world_size):
            counts[r] += int((owners == r).sum())
        mine = np.nonzero(owners == rank)[0]
        if not len(mine):
            continue
        keep.setdefault("key", []).extend(keys[i] for i in mine)
        if not wanted:
            wanted = ["label", "mean", "std", "mean_flip", "std_flip"]
            wanted += image_columns(image_scales, "mean_flip" in batch)
            absent = [c for c in wanted[5:] if c not in batch]
            if absent:
                raise ValueError(f"the latent dataset has no column(s) {absent}: it was not encoded "
                                 f"with encode.image_pyramid covering scales {list(image_scales)}")
        for col in wanted:
            if col in batch:
                keep.setdefault(col, []).append(np.asarray(batch[col])[mine])
    if not keep:
        raise ValueError(f"rank {rank} of {world_size} received no rows: the dataset has "
                         f"{sum(counts)} rows, too few for {world_size} workers")
    order = np.argsort(np.array(keep["key"]), kind="stable")  # arrival order is not stable
    col = {k: np.concatenate(v)[order] for k, v in keep.items() if k != "key"}

    def tensor(name, dtype=torch.float32):
        return torch.from_numpy(np.ascontiguousarray(col[name])).to(dtype) if name in col else None

    return LatentShard(keys=[keep["key"][i] for i in order], labels=tensor("label", torch.long),
                       mean=tensor("mean"), std=tensor("std"), mean_flip=tensor("mean_flip"),
                       std_flip=tensor("std_flip"), rows_per_rank=counts, total_rows=sum(counts),
                       image={c: tensor(c) for c in wanted[5:] if c in col})


class BatchSource:
    """Batches of (normalised latents, labels, scale targets) for (step, micro) on one rank.

    Scale targets are None unless `image_scales` is given (model.scale_construction=image): then
    they are the maps of those scales sampled from their image-derived moments, plus the latent."""

    def __init__(self, shard: LatentShard, meta: LatentDatasetMeta, *, seed: int, rank: int,
                 micro_batch: int, accum: int, flip_augment: bool, image_scales=()):
        self.shard, self.meta, self.seed, self.rank = shard, meta, seed, rank
        self.micro_batch, self.accum = micro_batch, accum
        self.flip = flip_augment and shard.mean_flip is not None
        self.image_scales = tuple(image_scales)
        missing = [c for c in image_columns(self.image_scales, self.flip) if c not in shard.image]
        if missing:
            raise ValueError(f"image scale construction needs the dataset columns {missing}")
        self.steps_per_epoch = shard.steps_per_epoch(micro_batch, accum)
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the dataset has {shard.total_rows} rows ({min(shard.rows_per_rank)} on the "
                f"smallest worker share), fewer than one step of {micro_batch * accum} per worker;"
                " lower train.global_batch_size or use fewer workers")
        self._perm_epoch, self._perm = -1, None

    def position(self, step: int) -> tuple[int, int]:
        return divmod(step, self.steps_per_epoch)

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, list | None]:
        epoch, index = self.position(step)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(seed_of("perm", self.seed, epoch, self.rank))
            self._perm = torch.randperm(len(self.shard.keys), generator=g)
            self._perm_epoch = epoch
        start = (index * self.accum + micro) * self.micro_batch
        rows = self._perm[start:start + self.micro_batch]
        g = torch.Generator().manual_seed(seed_of("batch", self.seed, epoch, index, micro, self.rank))
        pick = None
        if self.flip:
            use = torch.rand(len(rows), generator=g) < 0.5
            pick = use.view(-1, 1, 1, 1)

        def moments(mean, std, mean_flip, std_flip):
            mean, std = mean[rows], std[rows]
            if pick is not None:
                mean = torch.where(pick, mean_flip[rows], mean)
                std = torch.where(pick, std_flip[rows], std)
            return mean, std
        s = self.shard
        z = sample_latents(*moments(s.mean, s.std, s.mean_flip, s.std_flip), self.meta, generator=g)
        if not self.image_scales:
            return z, s.labels[rows], None
        targets = []
        for k in self.image_scales:  # in moments' order: mean, std, flipped mean, flipped std
            columns = [s.image.get(moment_column(m, flip, k)) for flip in (False, True)
                       for m in ("mean", "std")]
            targets.append(sample_latents(*moments(*columns), self.meta, generator=g))
        return z, s.labels[rows], targets + [z]
