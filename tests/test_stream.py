"""The streamed training input (pipelines/data/stream.py, pipelines/train/data.py), without Ray.

Every row once per epoch; an order that is a function of (seed, epoch, partitions) alone; the same
global batches and the same latents at any worker count; bounded windows; only the columns a run
uses; float16 datasets read as float32 latents.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from test_train import make_dataset


def units_of(sizes):
    from pipelines.data.stream import Unit

    return [Unit((i,), n) for i, n in enumerate(sizes)]


def reader_of(sizes, *, partitions, window, seed=0):
    """A WindowReader whose unit i holds rows "i:0", "i:1", ... (so a row names its place)."""
    from pipelines.data.stream import WindowReader

    units = units_of(sizes)
    return WindowReader(units, lambda u, lo, hi: {"key": np.array([f"{u.ref[0]}:{j}" for j in
                                                                   range(lo, hi)])},
                        seed=seed, partitions=partitions, window=window)


@pytest.mark.parametrize("partitions,window", [(1, 7), (2, 5), (3, 100)])
def test_every_row_once_per_epoch_and_a_new_order_each_epoch(partitions, window):
    sizes = [5, 9, 1, 12, 7, 6]  # 40 rows
    reader = reader_of(sizes, partitions=partitions, window=window)
    length = reader.rows_per_partition()
    assert length == 40 // partitions
    epochs = []
    for epoch in range(2):
        keys = [k for p in range(partitions) for k in reader.take(epoch, p, 0, length)["key"]]
        assert len(keys) == len(set(keys)) == length * partitions  # none twice
        epochs.append(keys)
    assert epochs[0] != epochs[1]
    again = reader_of(sizes, partitions=partitions, window=window)  # a fresh process: same order
    assert list(again.take(1, 0, 3, length)["key"]) == epochs[1][3:length]
    assert len(reader._windows) <= 2 * partitions  # the current and next window of each
    reader.close()


def test_a_window_is_read_from_its_units_only():
    """Reading one position reads the units of its window (and the next, ahead), not the rest."""
    reader = reader_of([4] * 50, partitions=2, window=8)
    reader.take(0, 0, 0, 1)
    reader._windows[(0, 0, 1)].result()  # the read-ahead of window 1
    assert 4 <= reader.stats.units <= 6 and reader.stats.rows <= 24, reader.stats  # of 200 rows
    reader.close()


def source(path, *, world, rank, partitions=2, accum=1, flip=True, image_scales=(), window=16,
           batch=16):
    from pipelines.data.latents import LatentDataset
    from pipelines.train.data import BatchSource, latent_columns, open_reader

    dataset = LatentDataset(str(path))
    reader = open_reader(str(path), dataset.units(), latent_columns(flip, image_scales), seed=1,
                         partitions=partitions, window=window)
    return BatchSource(reader, dataset.meta, seed=1, rank=rank, world=world, global_batch=batch,
                       accum=accum, flip=flip, image_scales=image_scales)


def step_rows(path, step, *, world, accum, partitions=2):
    """{key: latent} of one global step, gathered over every rank and micro-batch."""
    out = {}
    for rank in range(world):
        src = source(path, world=world, rank=rank, accum=accum, partitions=partitions)
        for micro in range(accum):
            z, labels, _ = src.batch(step, micro)
            assert len(z) == 16 // (world * accum)
            out.update(zip(src.last_keys, z))
        src.reader.close()
    return out


def test_the_same_global_batches_and_latents_at_any_worker_count(tmp_path):
    """Partitions fixed at 2: 1, 2 or 4 workers (with or without accumulation) train each step on
    the same rows with the same posterior samples and flips (what elastic resume relies on)."""
    path = make_dataset(tmp_path / "d", count=96, parts=6)
    for step in (0, 2, 7):  # 3 steps per epoch of 48 rows per partition: 7 is in epoch 2
        ref = step_rows(path, step, world=2, accum=1)
        for world, accum in ((1, 1), (1, 2), (4, 1), (2, 2)):
            got = step_rows(path, step, world=world, accum=accum)
            assert got.keys() == ref.keys(), (step, world, accum)
            for key, z in got.items():
                torch.testing.assert_close(z, ref[key], rtol=0, atol=0)


def test_an_epoch_trains_on_every_key_once_and_positions_map_to_steps(tmp_path):
    path = make_dataset(tmp_path / "d", count=64, parts=4)
    src = source(path, world=2, rank=0)
    assert src.steps_per_epoch == 4 and src.position(9) == (2, 1)
    seen = Counter()
    for step in range(4):
        seen.update(list(step_rows(path, step, world=2, accum=1)))
    assert len(seen) == 64 and set(seen.values()) == {1}
    a, b = step_rows(path, 0, world=2, accum=1), step_rows(path, 4, world=2, accum=1)
    assert a.keys() != b.keys()  # a new epoch, a new order


def test_only_the_columns_the_run_uses_are_read(tmp_path):
    from pipelines.data.latents import LatentDataset
    from pipelines.train.data import latent_columns

    path = make_dataset(tmp_path / "d", count=32, image_scales=(1, 2))
    assert latent_columns(False) == ["key", "label", "mean", "std"]
    assert "mean_flip_img2" in latent_columns(True, (1, 2))
    dataset = LatentDataset(str(path))
    rows = dataset.read_rows(dataset.units()[0], latent_columns(False))
    assert set(rows) == {"key", "label", "mean", "std"} and rows["mean"].shape == (16, 4, 4, 4)


def test_float16_moments_train_as_float32_latents(tmp_path):
    """encode.dtype=float16 halves the bytes; batches come out float32, equal up to fp16 rounding."""
    full = make_dataset(tmp_path / "f32", count=32)
    half = make_dataset(tmp_path / "f16", count=32, dtype=np.float16)
    files = sorted(p.stat().st_size for p in (tmp_path / "f16").glob("part-*.parquet"))
    assert sum(files) < 0.75 * sum(p.stat().st_size for p in (tmp_path / "f32").glob("part-*"))
    za, ya, _ = source(full, world=1, rank=0).batch(0, 0)
    zb, yb, _ = source(half, world=1, rank=0).batch(0, 0)
    assert zb.dtype == torch.float32 and torch.equal(ya, yb)
    torch.testing.assert_close(zb, za, rtol=2e-3, atol=2e-3)


def test_image_scale_targets_come_from_their_columns_flipped_with_the_latent(tmp_path):
    path = make_dataset(tmp_path / "d", count=32, image_scales=(1, 2), std=0.0)
    src = source(path, world=1, rank=0, image_scales=(1, 2), batch=8)
    flipped = 0
    from pipelines.data.latents import TorchLatentDataset

    unflipped = TorchLatentDataset(str(path)).columns["mean"]
    for step in range(4):
        z, _, targets = src.batch(step, 0)
        assert [tuple(t.shape) for t in targets] == [(8, 4, 1, 1), (8, 4, 2, 2), (8, 4, 4, 4)]
        assert targets[-1] is z
        for k, t in zip((1, 2), targets):  # the image map of the same (maybe flipped) image
            torch.testing.assert_close(t, torch.nn.functional.avg_pool2d(z, 4 // k) + 1.0)
        flipped += sum(not (unflipped == z[i]).all(dim=(1, 2, 3)).any() for i in range(len(z)))
    assert 0 < flipped < 32  # both orientations were drawn


def test_too_few_rows_for_one_step_are_refused_naming_the_batch(tmp_path):
    path = make_dataset(tmp_path / "d", count=12)
    with pytest.raises(ValueError, match="global_batch_size"):
        source(path, world=2, rank=0, batch=16)
