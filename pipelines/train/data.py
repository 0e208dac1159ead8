"""Each training worker's batches, streamed from the latent dataset's row groups.

The data order is pipelines/data/stream.py's: units (Parquet row groups) permuted per epoch, the
stream cut into `partitions` equal ranges, each read in shuffled windows of `data.shuffle_buffer`
rows. Step s of an epoch trains on positions [s*b, (s+1)*b) of every partition (b = global
batch / partitions); laid end to end, partition after partition, those are the step's global
batch, and rank r takes its contiguous slice of it, cut into micro-batches. The data position is
therefore just the optimizer step (step -> (epoch, index in epoch)), whatever the worker count.

Per step and partition, a fresh posterior sample z = mean + std * eps (normalised the dataset's
way) and the flip choice (50%, when flips are stored and `data.flip_augment`) are drawn from a
generator seeded by (seed, epoch, step, partition): a run resumed at any step, at any worker
count, draws the same latents for the same rows. With image scale construction (Table 3) every
coarser scale's map is sampled the same way from its own image-derived moments, flipped together
with the finest latent. Only the columns this draws on are read.
"""

from __future__ import annotations

import torch

from pipelines.data.latents import (LatentDataset, LatentDatasetMeta, image_columns,
                                    moment_column, sample_latents)
from pipelines.data.stream import WindowReader, seed_of

__all__ = ["seed_of", "latent_columns", "open_reader", "BatchSource"]


def latent_columns(flip: bool, image_scales=()) -> list[str]:
    """The columns a run reads: no flips unless it flips, image moments only for Table 3's
    image scale construction."""
    moments = ["mean", "std"] + (["mean_flip", "std_flip"] if flip else [])
    return ["key", "label", *moments, *image_columns(image_scales, flip)]


def open_reader(path: str, units, columns: list[str], *, seed: int, partitions: int, window: int,
                on_read=None) -> WindowReader:
    """A WindowReader of the latent dataset at `path` over `units` (LatentDataset.units(), read
    by the driver), reading only `columns`."""
    dataset = LatentDataset(path)
    return WindowReader(units, lambda unit, lo, hi: dataset.read_rows(unit, columns), seed=seed,
                        partitions=partitions, window=window, on_read=on_read)


class BatchSource:
    """Batches of (normalised latents, labels, scale targets) for (step, micro) on one rank.

    Scale targets are None unless `image_scales` is given (model.scale_construction=image): then
    they are the maps of those scales sampled from their image-derived moments, plus the latent.
    `last_keys` holds the keys of the last batch (what the test hooks record)."""

    def __init__(self, reader: WindowReader, meta: LatentDatasetMeta, *, seed: int, rank: int,
                 world: int, global_batch: int, accum: int, flip: bool, image_scales=()):
        partitions = reader.partitions
        if global_batch % partitions or global_batch % (world * accum):
            raise ValueError(f"train.global_batch_size={global_batch} must divide into "
                             f"{partitions} partitions and {world} workers x {accum} micro-batches")
        self.reader, self.meta, self.seed, self.flip = reader, meta, seed, flip
        self.image_scales = tuple(image_scales)
        self.per_partition = global_batch // partitions
        self.micro_batch = global_batch // (world * accum)
        self.first = rank * accum * self.micro_batch  # this rank's slice of the global batch
        rows = reader.rows_per_partition()
        self.steps_per_epoch = rows // self.per_partition
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the dataset has {rows * partitions} rows ({rows} per partition of "
                f"{partitions}), fewer than one step of {global_batch}; lower "
                "train.global_batch_size or data.partitions")
        self._noise_key, self._noise = None, None
        self.last_keys: list[str] = []

    def position(self, step: int) -> tuple[int, int]:
        return divmod(step, self.steps_per_epoch)

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor, list | None]:
        epoch, index = self.position(step)
        b = self.per_partition
        start = self.first + micro * self.micro_batch
        rows, noise = [], []
        for p in range(start // b, (start + self.micro_batch - 1) // b + 1):
            lo, hi = max(start, p * b) - p * b, min(start + self.micro_batch, (p + 1) * b) - p * b
            rows.append(self.reader.take(epoch, p, index * b + lo, index * b + hi))
            noise.append([None if n is None else n[lo:hi] for n in self._draws(epoch, index, p)])
        col = {k: _cat([r[k] for r in rows]) for k in rows[0]}
        flip, *eps = [None if n[0] is None else torch.cat(n) for n in zip(*noise)]
        self.last_keys = [str(k) for r in rows for k in r["key"]]
        labels = torch.as_tensor(col["label"], dtype=torch.long)
        z = self._sample(col, flip, eps[0], None)
        if not self.image_scales:
            return z, labels, None
        targets = [self._sample(col, flip, e, k) for k, e in zip(self.image_scales, eps[1:])]
        return z, labels, targets + [z]

    def _draws(self, epoch: int, index: int, p: int) -> list:
        """[flip choice or None, eps of the latent, eps of each image scale] for partition p's
        b rows of this step; kept for the next micro-batch of the same step."""
        key = (epoch, index, p)
        if self._noise_key != key:
            g = torch.Generator().manual_seed(seed_of("batch", self.seed, epoch, index, p))
            b, c, side = self.per_partition, self.meta.latent_channels, self.meta.latent_size
            flip = torch.rand(b, generator=g) < 0.5 if self.flip else None
            eps = [torch.randn((b, c, k, k), generator=g) for k in (side, *self.image_scales)]
            self._noise_key, self._noise = key, [flip, *eps]
        return self._noise

    def _sample(self, col: dict, flip, eps, side):
        """The normalised sample of the given scale (None: the latent), flipped rows taking the
        flipped moments."""
        mean = torch.as_tensor(col[moment_column("mean", False, side)])
        std = torch.as_tensor(col[moment_column("std", False, side)])
        if flip is not None:
            pick = flip.view(-1, 1, 1, 1)
            mean = torch.where(pick, torch.as_tensor(col[moment_column("mean", True, side)]), mean)
            std = torch.where(pick, torch.as_tensor(col[moment_column("std", True, side)]), std)
        return sample_latents(mean, std, self.meta, eps=eps)


def _cat(arrays):
    import numpy as np

    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
