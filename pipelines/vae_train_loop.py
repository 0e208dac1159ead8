"""The per-worker loop of `flowar vae train` (pipelines/vae_train.py), run by Ray Train.

Every worker trains the same AutoencoderKL under DDP on its shard of the images; rank 0 logs the
losses and reconstruction grids to MLflow. At the end each rank measures its latents' mean and
std and stores them as the VAE's shift_factor and scaling_factor; rank 0's VAE is the checkpoint.

Runs only inside Ray Train workers, so it imports torch and Ray at the top.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from pipelines.core import tracking
from pipelines.core.images import from_uint8, image_grid

SHOWN = 8  # images in each reconstruction grid (and in the final reconstruction error)
STATS_IMAGES = 1024  # images whose latents set the normalisation


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
        post = self.vae.encode(x).latent_dist
        recon = self.vae.decode(post.sample()).sample
        return recon, post.kl().mean() / x[0].numel()  # KL per pixel: what LDM's kl_weight means


def train_loop_per_worker(config: dict) -> None:
    """Ray Train loop (runs on every worker). config: {"cfg": VAETrainConfig, "mlflow_uri",
    "run_id"}."""
    cfg, t = config["cfg"], config["cfg"].train
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(t.seed)  # same init on every rank
    vae = build_vae(cfg.model, cfg.resolution)
    model = ray.train.torch.prepare_model(Objective(vae))
    device = ray.train.torch.get_device()
    images = _shard_images(rank)
    held = from_uint8(images[:SHOWN]).to(device)  # the images whose reconstructions are shown
    log = _Rank0Log(config["mlflow_uri"], config["run_id"], t) if rank == 0 else None
    _train(model, vae, images, held, t, device, rank, log)
    final = _set_normalisation(vae, images, len(held), device)
    _report(vae, final, log, t.steps)


def _shard_images(rank: int) -> torch.Tensor:
    """This worker's shard of the decoded images, uint8 (N, 3, H, W), held in memory."""
    shard = ray.train.get_dataset_shard("train")
    parts = list(shard.iter_batches(batch_size=4096, batch_format="numpy"))
    images = torch.from_numpy(np.concatenate([p["image"] for p in parts])).permute(0, 3, 1, 2)
    if len(images) < 1:
        raise RuntimeError(f"worker {rank} received no images")
    return images


def _train(model, vae, images, held, t, device, rank: int, log: "_Rank0Log | None") -> None:
    """t.steps AdamW steps on random batches of `images` (a seed per rank)."""
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(t.seed * 1000 + rank)
    for step in range(1, t.steps + 1):
        idx = torch.randint(len(images), (t.batch_size,), generator=gen)
        x = from_uint8(images[idx]).to(device)
        recon, kl = model(x)
        mse = F.mse_loss(recon, x)
        loss = mse + t.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None:
            log.losses(step, loss=loss, recon_mse=mse, kl=kl)
            if step % t.image_every == 0 or step == t.steps:
                log.reconstructions(step, model, vae, held)


class _Rank0Log:
    """Rank 0's MLflow logging: the mean losses of every `log_every` steps (and of the last
    ones) with images/s, and reconstruction grids (originals above, reconstructions below)."""

    def __init__(self, uri: str, run_id: str, t):
        self.client, self.run_id, self.t = tracking.client(uri), run_id, t
        self.world_size = ray.train.get_context().get_world_size()
        self.start = time.time()
        self.sums = {"loss": 0.0, "recon_mse": 0.0, "kl": 0.0}

    def losses(self, step: int, **values) -> None:
        for k, v in values.items():
            self.sums[k] += float(v)
        t = self.t
        if step % t.log_every == 0 or step == t.steps:
            n = t.log_every if step % t.log_every == 0 else step % t.log_every
            metrics = {k: v / n for k, v in self.sums.items()}
            metrics["images_per_s"] = step * t.batch_size * self.world_size / (time.time() - self.start)
            tracking.log_metrics(self.client, self.run_id, metrics, step)
            self.sums = dict.fromkeys(self.sums, 0.0)

    def reconstructions(self, step: int, model, vae, held) -> None:
        model.eval()
        with torch.no_grad():
            recon = vae.decode(vae.encode(held).latent_dist.mean).sample
        model.train()
        grid = image_grid(torch.cat([held.cpu(), recon.cpu()]), per_row=len(held))
        tracking.log_image(self.client, self.run_id, grid, f"reconstructions/step_{step:06d}.png")

    def final(self, metrics: dict, step: int) -> None:
        tracking.log_metrics(self.client, self.run_id, {f"final_{k}": v for k, v in metrics.items()}, step)


@torch.no_grad()
def _set_normalisation(vae, images, shown: int, device) -> dict:
    """The latents' mean and std over the first images -> the VAE's own normalisation
    (shift_factor = mean, scaling_factor = 1/std, saved in its config), so normalised latents
    are roughly unit Gaussian. Returns the final metrics."""
    vae.eval()
    sample = from_uint8(images[:STATS_IMAGES]).to(device)
    z = torch.cat([vae.encode(sample[i:i + 256]).latent_dist.sample() for i in range(0, len(sample), 256)])
    shift, std = float(z.mean()), float(z.std())
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=shift)
    recon_mse = float(F.mse_loss(vae.decode(z[:shown]).sample, sample[:shown]))
    return {"recon_mse": recon_mse, "latent_std": std, "latent_mean": shift}


def _report(vae, final: dict, log: "_Rank0Log | None", steps: int) -> None:
    """Report the final metrics to Ray Train, with rank 0's VAE (save_pretrained) as the checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if log is not None:
            vae.save_pretrained(tmp)
            log.final(final, steps)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(final, checkpoint=checkpoint)
