"""The per-worker loop of `flowar vae train` (pipelines/vae_train.py), run by Ray Train.

Every worker trains the same AutoencoderKL under DDP; rank 0 logs the losses, the data metrics
and reconstruction grids to MLflow. At the end each rank measures its latents' mean and std and
stores them as the VAE's shift_factor and scaling_factor; rank 0's VAE is the checkpoint.

The images stream with the loader `flowar train` uses (pipelines/data/stream.py): the driver
cuts the source's items into units of consecutive items, and worker r reads partition r of
their seeded order in shuffled windows of `train.shuffle_buffer` images, decoding a unit when
its window needs it (`decode_items`, the same preprocessing as `flowar encode`). Step s trains
on positions [s*B, (s+1)*B) of the partition, epoch after epoch; a worker holds about two
windows of decoded images, whatever the size of the source.

Rejects (images that do not decode): a window must hold exactly the rows of its units, so a
reject stays in the stream as a blank image with good=False, and the losses are means over the
good images of the batch only (a batch of rejects adds nothing to the gradients). Rejects are
counted (MLflow `data_rejects`, summed over the workers) and the first few named in the worker's
log; training goes on.

Runs only inside Ray Train workers, so it imports torch and Ray at the top.
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from diffusers import AutoencoderKL
from torch import nn

from flowar.config import to_dict
from pipelines.core import tracking
from pipelines.core.images import from_uint8, image_grid
from pipelines.data.sources import decode_items
from pipelines.data.stream import Unit, WindowReader

SHOWN = 8  # images in each reconstruction grid (and in the final reconstruction error)
STATS_IMAGES = 1024  # images whose latents set the normalisation
NAMED_REJECTS = 5  # rejects a worker names in its log (the rest are only counted)


def build_vae(model, resolution: int) -> AutoencoderKL:
    """The AutoencoderKL of a VAEModelSection (pipelines/vae_train.py) for `resolution`."""
    n = len(model.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n,
                         block_out_channels=list(model.block_out_channels),
                         layers_per_block=model.layers_per_block, latent_channels=model.latent_channels,
                         norm_num_groups=model.norm_num_groups, sample_size=resolution)


class Objective(nn.Module):
    """Reconstruction and KL in one forward, so DDP syncs the gradients of both halves."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        """(reconstruction, KL of each image per pixel: what LDM's kl_weight means)."""
        post = self.vae.encode(x).latent_dist
        recon = self.vae.decode(post.sample()).sample
        return recon, post.kl() / x[0].numel()


def train_loop_per_worker(config: dict) -> None:
    """Ray Train loop (runs on every worker). config: {"cfg": VAETrainConfig, "refs": the
    source's image refs, sorted by key, "units": the Units over them, "mlflow_uri", "run_id"}."""
    cfg, t = config["cfg"], config["cfg"].train
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(t.seed)  # same init on every rank
    vae = build_vae(cfg.model, cfg.resolution)
    model = ray.train.torch.prepare_model(Objective(vae))
    device = ray.train.torch.get_device()
    stream = ImageStream(config["refs"], config["units"], to_dict(cfg.source), cfg.resolution,
                         seed=t.seed, rank=rank, partitions=ctx.get_world_size(),
                         window=t.shuffle_buffer)
    try:
        # the reconstructions shown: good images of the first window, which step 1 reads anyway
        held = from_uint8(stream.good_images(0, min(t.shuffle_buffer, stream.length), SHOWN)).to(device)
        log = _Log(config["mlflow_uri"], config["run_id"], t, rank)
        _train(model, vae, stream, held, t, device, log)
        # the normalisation's sample: the positions after the last step's, which start in the
        # window read ahead (nothing training passed is read again)
        sample = stream.good_images(t.steps * t.batch_size, min(STATS_IMAGES, stream.length))
        final = _set_normalisation(vae, sample, device)
        final.update(data_metrics(stream, None, device))
    finally:
        stream.close()
    _report(vae, final, log, t.steps)


# ------------------------------------------------------------------------------------ the stream

class ImageStream:
    """Partition `rank` of the source's stream of decoded images, position after position,
    epoch after epoch: position p is row p % length of epoch p // length."""

    def __init__(self, refs: list[str], units: list[Unit], source: dict, resolution: int, *,
                 seed: int, rank: int, partitions: int, window: int):
        self.refs, self.source, self.resolution, self.rank = refs, source, resolution, rank
        self.rejects = 0
        self.reader = WindowReader(units, self._read, seed=seed, partitions=partitions, window=window)
        self.length = self.reader.rows_per_partition()
        if self.length < 1:
            raise RuntimeError(f"{len(refs)} images for {partitions} workers: each needs one at least")

    def take(self, a: int, b: int) -> dict[str, np.ndarray]:
        """{"image": uint8 (n, H, W, 3), "good": bool (n,)} of positions [a, b)."""
        parts = []
        while a < b:
            epoch, i = divmod(a, self.length)
            n = min(b - a, self.length - i)
            parts.append(self.reader.take(epoch, self.rank, i, i + n))
            a += n
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def batch(self, step: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step`'s (0-based) uint8 images (size, 3, H, W) and their good flags."""
        rows = self.take(step * size, (step + 1) * size)
        return torch.from_numpy(rows["image"]).permute(0, 3, 1, 2), torch.from_numpy(rows["good"])

    def good_images(self, start: int, span: int, most: int | None = None) -> torch.Tensor:
        """The first `most` (default all) good images, uint8 (n, 3, H, W), of positions
        [start, start + span); only those are copied. Raises when none of them decoded."""
        rows = self.take(start, start + span)
        keep = np.flatnonzero(rows["good"])[:most]
        if len(keep) == 0:
            raise RuntimeError(f"worker {self.rank}: none of {span} images of the source decoded "
                               f"({self.rejects} rejects so far; the worker's log names the first "
                               "ones); check source.*")
        return torch.from_numpy(rows["image"][keep]).permute(0, 3, 1, 2)

    def close(self) -> None:
        self.reader.close()

    def _read(self, unit: Unit, lo: int, hi: int) -> dict[str, np.ndarray]:
        """WindowReader's read (on its thread): the unit's items [lo, hi), decoded; a reject is
        a blank image with good=False (a window needs every row of its units)."""
        a, b = unit.ref
        refs = self.refs[a + lo:a + hi]
        out = decode_items({"shard": [0], "keys": [refs], "labels": [[0] * len(refs)],
                            "refs": [refs]}, self.source, self.resolution)
        good = out["reason"] == ""
        for i in np.flatnonzero(~good):
            self.rejects += 1
            if self.rejects <= NAMED_REJECTS:
                print(f"flowar vae train: worker {self.rank}: reject {refs[i]}: {out['reason'][i]}"
                      + (" (further rejects are only counted)" if self.rejects == NAMED_REJECTS else ""),
                      file=sys.stderr, flush=True)
        return {"image": out["image"], "good": good}


def data_metrics(stream: ImageStream, wait_fraction: float | None, device) -> dict:
    """Every rank joins: the worst rank's data wait (left out when None), peak RSS and rows
    read, and the rejects of all ranks (what rank 0 logs)."""
    # ru_maxrss is in KiB on Linux: this process's peak resident memory
    worst = torch.tensor([wait_fraction or 0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          stream.reader.stats.rows], dtype=torch.float64, device=device)
    rejects = torch.tensor([stream.rejects], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        dist.all_reduce(rejects)
    out = {"worker_peak_rss_mb": worst[1].item(), "data_rows_read": worst[2].item(),
           "data_rejects": rejects[0].item()}
    return out if wait_fraction is None else {"data_wait_fraction": worst[0].item(), **out}


# ------------------------------------------------------------------------------------ training

def _masked_mean(values: torch.Tensor, good: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the good rows (0 when there are none)."""
    return (values * good).sum() / good.sum().clamp(min=1)


def _train(model, vae, stream: ImageStream, held, t, device, log: "_Log") -> None:
    """t.steps AdamW steps, step s on positions [s*B, (s+1)*B) of this worker's stream."""
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=0.0)
    for step in range(1, t.steps + 1):
        t0 = time.perf_counter()
        images, good = stream.batch(step - 1, t.batch_size)
        data_s = time.perf_counter() - t0
        x, good = from_uint8(images).to(device), good.to(device, torch.float32)
        recon, kl = model(x)
        mse = _masked_mean(((recon - x) ** 2).flatten(1).mean(1), good)
        kl = _masked_mean(kl, good)
        loss = mse + t.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        log.step(step, stream, data_s, device, loss=loss, recon_mse=mse, kl=kl)
        if step % t.image_every == 0 or step == t.steps:
            log.reconstructions(step, model, vae, held)


class _Log:
    """MLflow logging: every `log_every` steps (and at the last) rank 0 logs the mean losses of
    those steps, images/s and the data metrics (for which every rank joins a reduction), and
    reconstruction grids (originals above, reconstructions below)."""

    def __init__(self, uri: str, run_id: str, t, rank: int):
        self.client = tracking.client(uri) if rank == 0 else None
        self.run_id, self.t = run_id, t
        self.world_size = ray.train.get_context().get_world_size()
        self.start = self.window_start = time.perf_counter()
        self.sums = {"loss": 0.0, "recon_mse": 0.0, "kl": 0.0}
        self.data_s = 0.0

    def step(self, step: int, stream: ImageStream, data_s: float, device, **values) -> None:
        for k, v in values.items():
            self.sums[k] += float(v)
        self.data_s += data_s
        t = self.t
        if not (step % t.log_every == 0 or step == t.steps):
            return
        now = time.perf_counter()
        data = data_metrics(stream, self.data_s / max(now - self.window_start, 1e-9), device)
        if self.client is not None:
            n = t.log_every if step % t.log_every == 0 else step % t.log_every
            metrics = {k: v / n for k, v in self.sums.items()}
            metrics["images_per_s"] = step * t.batch_size * self.world_size / (now - self.start)
            tracking.log_metrics(self.client, self.run_id, {**metrics, **data}, step)
        self.sums, self.data_s, self.window_start = dict.fromkeys(self.sums, 0.0), 0.0, now

    def reconstructions(self, step: int, model, vae, held) -> None:
        if self.client is None:
            return
        model.eval()
        with torch.no_grad():
            recon = vae.decode(vae.encode(held).latent_dist.mean).sample
        model.train()
        grid = image_grid(torch.cat([held.cpu(), recon.cpu()]), per_row=len(held))
        tracking.log_image(self.client, self.run_id, grid, "reconstructions", step)

    def final(self, metrics: dict, step: int) -> None:
        if self.client is not None:
            tracking.log_metrics(self.client, self.run_id,
                                 {f"final_{k}": v for k, v in metrics.items()}, step)


@torch.no_grad()
def _set_normalisation(vae, images: torch.Tensor, device) -> dict:
    """The latents' mean and std over `images` (uint8) -> the VAE's own normalisation
    (shift_factor = mean, scaling_factor = 1/std, saved in its config), so normalised latents
    are roughly unit Gaussian. Returns the final metrics."""
    vae.eval()
    z = torch.cat([vae.encode(from_uint8(images[i:i + 256]).to(device)).latent_dist.sample()
                   for i in range(0, len(images), 256)])
    shift, std = float(z.mean()), float(z.std())
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=shift)
    shown = from_uint8(images[:SHOWN]).to(device)
    recon_mse = float(torch.nn.functional.mse_loss(vae.decode(z[:SHOWN]).sample, shown))
    return {"recon_mse": recon_mse, "latent_std": std, "latent_mean": shift}


def _report(vae, final: dict, log: _Log, steps: int) -> None:
    """Report the final metrics to Ray Train, with rank 0's VAE (save_pretrained) as the checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if log.client is not None:
            vae.save_pretrained(tmp)
            log.final(final, steps)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(final, checkpoint=checkpoint)
