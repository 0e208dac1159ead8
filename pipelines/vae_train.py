"""`flowar vae train`: train a small diffusers AutoencoderKL on an image source with Ray Train.

No pretrained VAE can be downloaded on an offline machine, so the embedded default trains its own
(configs/vae-fashion-mnist.yaml: 32x32 RGB -> 4x8x8 in a few minutes on 2 CPUs). The loss is
LDM's without the GAN: pixel MSE + kl_weight * KL (KL per image divided by the pixel count, so
kl_weight means what LDM's 1e-6 means). At the end rank 0 measures the latents' mean and std on
its data and stores shift_factor = mean, scaling_factor = 1/std in the VAE's config, so the
normalised latents are roughly unit Gaussian, as FlowAR's flow matching assumes.

Losses and a reconstruction grid (PNG: originals above, reconstructions below) go to MLflow; the
VAE is saved with `save_pretrained` to `output`. An existing output is reused unless overwrite.
"""

from __future__ import annotations

import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

from flowar.config import ConfigError
from pipelines.core import storage
from pipelines.core.config import (MLflowConfig, RayConfig, add_print_config, default_storage_path,
                              load_config, path_field)
from pipelines.data.sources import SourceConfig


@dataclass
class VAEModelSection:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # n levels: /2^(n-1)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32

    def __post_init__(self):
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ConfigError(f"model.block_out_channels={self.block_out_channels}: need at least "
                              "one level, each with at least 1 channel")
        for name in ("layers_per_block", "latent_channels", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be at least 1")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"model.block_out_channels={self.block_out_channels} must be multiples "
                              f"of model.norm_num_groups={self.norm_num_groups}")


@dataclass
class VAETrainSection:
    steps: int = 1500
    batch_size: int = 64  # per worker
    lr: float = 1e-3
    kl_weight: float = 1e-6
    num_workers: int = 2
    seed: int = 0
    log_every: int = 50
    image_every: int = 500  # reconstruction grid every N steps (and at the end)

    def __post_init__(self):
        for name in ("steps", "batch_size", "num_workers", "log_every", "image_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be at least 1")
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be more than 0")
        if self.kl_weight < 0:
            raise ConfigError(f"train.kl_weight={self.kl_weight} must not be negative")


@dataclass
class VAETrainConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    resolution: int = 32
    model: VAEModelSection = field(default_factory=VAEModelSection)
    train: VAETrainSection = field(default_factory=VAETrainSection)
    output: str = path_field("output")  # save_pretrained folder (local or URI)
    overwrite: bool = False  # retrain even when output already holds a VAE
    mlflow: MLflowConfig = field(default_factory=lambda: MLflowConfig(experiment="flowar-vae"))
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        """Every check that needs only the config, so `flowar vae train --print-config` refuses
        what the run would. Left to the run (they read the data): the source's listing
        (source.*) and whether it holds any image that decodes."""
        if not self.output:
            raise ConfigError("output is empty: give the folder to save the VAE in (local path or URI)")
        check_resolution(self.model, self.resolution)


def check_resolution(model: VAEModelSection, resolution: int) -> None:
    n = len(model.block_out_channels)
    if resolution < 1 or resolution % 2 ** (n - 1):
        raise ConfigError(f"resolution={resolution} is not a positive multiple of the downsampling "
                          f"2^{n - 1} of model.block_out_channels={model.block_out_channels}")


def build_vae(model: VAEModelSection, resolution: int):
    from diffusers import AutoencoderKL
    check_resolution(model, resolution)  # the sections' own checks ran when they were built
    n = len(model.block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * n,
                         up_block_types=["UpDecoderBlock2D"] * n,
                         block_out_channels=list(model.block_out_channels),
                         layers_per_block=model.layers_per_block, latent_channels=model.latent_channels,
                         norm_num_groups=model.norm_num_groups, sample_size=resolution)


def _grid(originals, recons):
    """Two rows of images in [-1, 1] -> one HxWx3 uint8 grid."""
    import torch
    x = torch.cat([torch.cat(list(originals), 2), torch.cat(list(recons), 2)], 1)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def _train_worker(config: dict) -> None:
    """Ray Train loop (runs on every worker)."""
    import numpy as np
    import ray.train
    import ray.train.torch
    import torch
    import torch.nn.functional as F

    from flowar.config import from_dict
    from pipelines.core import tracking

    cfg = from_dict(VAETrainConfig, config["cfg"])
    t, ctx = cfg.train, ray.train.get_context()
    rank = ctx.get_world_rank()
    torch.manual_seed(t.seed)  # same init on every rank
    vae = build_vae(cfg.model, cfg.resolution)

    class Objective(torch.nn.Module):  # one forward, so DDP syncs the gradients of both halves
        def __init__(self, vae):
            super().__init__()
            self.vae = vae

        def forward(self, x):
            post = self.vae.encode(x).latent_dist
            recon = self.vae.decode(post.sample()).sample
            return recon, post.kl().mean() / x[0].numel()

    model = ray.train.torch.prepare_model(Objective(vae))
    device = ray.train.torch.get_device()
    parts = list(ray.train.get_dataset_shard("train").iter_batches(batch_size=4096, batch_format="numpy"))
    images = torch.from_numpy(np.concatenate([p["image"] for p in parts])).permute(0, 3, 1, 2)
    if len(images) < 1:
        raise RuntimeError(f"worker {rank} received no images")
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(t.seed * 1000 + rank)
    held = images[:8].float().div(127.5).sub(1).to(device)
    client = tracking.client(config["mlflow_uri"]) if rank == 0 else None
    run_id = config["run_id"]

    def log_grid(step):
        model.eval()
        with torch.no_grad():
            recon = vae.decode(vae.encode(held).latent_dist.mean).sample
        model.train()
        tracking.log_image(client, run_id, _grid(held.cpu(), recon.cpu()),
                               f"reconstructions/step_{step:06d}.png")

    start, sums = time.time(), {"loss": 0.0, "recon_mse": 0.0, "kl": 0.0}
    for step in range(1, t.steps + 1):
        idx = torch.randint(len(images), (t.batch_size,), generator=gen)
        x = images[idx].float().div(127.5).sub(1).to(device)
        recon, kl = model(x)
        mse = F.mse_loss(recon, x)
        loss = mse + t.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in (("loss", loss), ("recon_mse", mse), ("kl", kl)):
            sums[k] += float(v)
        if rank == 0 and (step % t.log_every == 0 or step == t.steps):
            n = t.log_every if step % t.log_every == 0 else step % t.log_every
            metrics = {k: v / n for k, v in sums.items()}
            metrics["images_per_s"] = step * t.batch_size * ctx.get_world_size() / (time.time() - start)
            tracking.log_metrics(client, run_id, metrics, step)
            sums = dict.fromkeys(sums, 0.0)
        if rank == 0 and (step % t.image_every == 0 or step == t.steps):
            log_grid(step)

    # Latent statistics -> the VAE's own normalisation (saved in its config).
    with torch.no_grad():
        vae.eval()
        sample = images[:1024].float().div(127.5).sub(1).to(device)
        z = torch.cat([vae.encode(sample[i:i + 256]).latent_dist.sample() for i in range(0, len(sample), 256)])
        shift, std = float(z.mean()), float(z.std())
    vae.register_to_config(scaling_factor=1.0 / std, shift_factor=shift)
    final = {"recon_mse": float(F.mse_loss(vae.decode(z[:len(held)]).sample, sample[:len(held)])),
             "latent_std": std, "latent_mean": shift}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            vae.save_pretrained(tmp)
            tracking.log_metrics(client, run_id, {f"final_{k}": v for k, v in final.items()}, t.steps)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(final, checkpoint=checkpoint)


def _init_ray(cfg: VAETrainConfig):
    from pipelines.core.ray_runtime import init_ray
    # the data stage needs CPU beside the workers (docs/stack-facts.md, "CPU budget for Ray Data")
    return init_ray(cfg.ray, min_cpus=cfg.train.num_workers + 2)


def _good_images(batch: dict, source: dict, resolution: int) -> dict:
    """decode_items, keeping only the images that decoded (rejects are skipped, not fatal)."""
    from pipelines.data.sources import decode_items
    out = decode_items(batch, source, resolution)
    return {"image": out["image"][out["reason"] == ""]}


def _images_dataset(cfg: VAETrainConfig, ray):
    """Decoded, cropped uint8 images of the source as a materialised Ray Dataset (rejects dropped)."""
    from flowar.config import to_dict
    from pipelines.data.sources import list_items
    items, _ = list_items(cfg.source)
    size = 2000
    rows = [{"shard": i // size, "keys": [k for k, _, _ in items[i:i + size]],
             "labels": [y for _, y, _ in items[i:i + size]], "refs": [r for _, _, r in items[i:i + size]]}
            for i in range(0, len(items), size)]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(_good_images, batch_size=1, batch_format="numpy",
                        fn_kwargs={"source": to_dict(cfg.source), "resolution": cfg.resolution})
    return ds.materialize()  # before fit: a streaming dataset starves on 2 cores (docs/stack-facts.md, "CPU budget for Ray Data")


def run_vae_train(cfg: VAETrainConfig, config_path: str | None = None) -> str:
    """Train (or reuse) the VAE at cfg.output; returns the output location."""
    from flowar.config import from_dict, to_dict
    from pipelines.core import tracking

    from_dict(VAETrainConfig, to_dict(cfg))  # every config check again: cfg may have been edited
    if storage.exists(storage.join(cfg.output, "config.json")) and not cfg.overwrite:
        print(f"flowar vae train: reusing the VAE at {storage.display(cfg.output)} "
              "(set overwrite=true to train again)", file=sys.stderr)
        return cfg.output
    uri = cfg.mlflow.resolved_uri()
    tracking.check_reachable(uri)
    run_name = cfg.mlflow.run_name or f"vae-{uuid.uuid4().hex[:6]}"
    run_id, _ = tracking.start_or_resume_run(uri, cfg.mlflow.experiment, run_name,
                                                 cfg.mlflow.artifact_location)
    tracking.log_config(uri, run_id, cfg, config_path, {"job": "vae-train",
                                                            "output": storage.display(cfg.output)})
    status = "FAILED"
    try:
        ray = _init_ray(cfg)
        import ray.train
        from ray.train.torch import TorchTrainer

        dataset = _images_dataset(cfg, ray)
        use_gpu = ray.cluster_resources().get("GPU", 0) >= cfg.train.num_workers
        trainer = TorchTrainer(
            _train_worker,
            train_loop_config={"cfg": to_dict(cfg), "mlflow_uri": uri, "run_id": run_id},
            scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu),
            run_config=ray.train.RunConfig(name=f"vae-train-{run_id[:8]}-{uuid.uuid4().hex[:4]}",
                                           storage_path=cfg.ray.storage_path or default_storage_path()),
            datasets={"train": dataset})
        from pipelines.core.progress import follow

        # step/total, loss, images/s and time left from rank 0's MLflow metrics while fit() runs
        with follow(uri, run_id, total=cfg.train.steps, log_every=cfg.train.log_every,
                    images_per_step=cfg.train.batch_size * cfg.train.num_workers,
                    desc="vae train"):
            result = trainer.fit()
        with result.checkpoint.as_directory() as d:
            if cfg.overwrite and storage.exists(cfg.output):
                fs, path = storage.resolve(cfg.output)
                fs.delete_dir_contents(path)
            storage.upload_dir(d, cfg.output)
        status = "FINISHED"
        print(f"flowar vae train: saved to {storage.display(cfg.output)}; "
              + ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if isinstance(v, float)),
              file=sys.stderr)
    finally:
        tracking.end_run(uri, run_id, status)
    return cfg.output


def main(args) -> int:
    cfg = load_config(VAETrainConfig, args.config, args.overrides)
    run_vae_train(cfg, args.config)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("vae", help="tokenizers: train a small VAE (flowar vae train)",
                              description="VAE tools. `flowar vae train CONFIG` trains a small "
                                          "diffusers AutoencoderKL with Ray Train.")
    sub = p.add_subparsers(dest="vae_command", metavar="SUBCOMMAND")
    t = sub.add_parser("train", help="train a small AutoencoderKL (recon + KL) with Ray Train, log to MLflow",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter,
                       epilog="example: flowar vae train configs/vae-fashion-mnist.yaml train.steps=200")
    t.add_argument("config", help="YAML config (see configs/vae-*.yaml)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200")
    t.set_defaults(func=main)
    add_print_config(t, lambda a: load_config(VAETrainConfig, a.config, a.overrides))
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
