"""Training throughput (images/s): 1 vs 2 Ray Train workers, and cached latents vs on-the-fly encoding.

Part 1 runs the real `flowar train` job (DDP, cached latents) on a synthetic 8x8x4 latent dataset
(speed does not depend on the values) with 1 and then 2 workers at the same global batch, and
reads the images/s the job logs to MLflow (median over the logging windows after the first, so
start-up and the first steps are left out).

Part 2 measures, in one process, what the published code does (encode every batch through the
VAE, fresh posterior sample) against what `flowar train` does (a posterior sample from cached
moments): the same model and optimizer step, 32x32 images through an AutoencoderKL shaped like
configs/vae-fashion-mnist.yaml (random weights) to the same 8x8x4 latents.

    .venv/bin/python benchmarks/bench_train.py [--preset small-cpu] [--steps 30] [--batch 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_latents(path: Path, count: int, side: int = 8, channels: int = 4, classes: int = 10):
    import numpy as np

    from pipelines.data.latents import LatentDataset, LatentDatasetMeta

    rng = np.random.default_rng(0)
    mean = rng.normal(size=(count, channels, side, side)).astype(np.float32)
    cols = {"key": [f"img{i:06d}" for i in range(count)], "label": np.arange(count) % classes,
            "mean": mean, "std": np.full_like(mean, 0.05)}
    meta = LatentDatasetMeta(vae={"id": "bench/random"}, resolution=side * 4, latent_size=side,
                             latent_channels=channels, scales=[side], count=count, num_classes=classes)
    (path / "rejects").mkdir(parents=True)
    LatentDataset(str(path)).write_part(0, 0, count, cols, [], meta)
    LatentDataset(str(path)).finalise(meta)


def ray_train_throughput(args, tmp: Path) -> dict[int, float]:
    import ray
    from mlflow import MlflowClient

    from pipelines.train.config import load_train_config
    from pipelines.train.job import run_train

    data = tmp / "latents"
    synthetic_latents(data, count=args.batch * 8)
    ray.init(num_cpus=max(4, (os.cpu_count() or 1)), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}})
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    out = {}
    for workers in args.workers:
        cfg = load_train_config(None, [
            f"preset={args.preset}", f"data.path={data}", "model.latent_channels=4",
            "model.scales=[1,2,4,8]", "model.num_classes=10", f"train.num_workers={workers}",
            "train.device=cpu", f"train.global_batch_size={args.batch}", f"train.max_steps={args.steps}",
            f"train.log_every={max(1, args.steps // 6)}", f"train.checkpoint_every={args.steps}",
            "train.sample_every=0", "train.samples_per_class=1", "train.sample_classes=[0]",
            "sampler.num_steps=4", f"mlflow.tracking_uri={uri}", f"mlflow.run_name=bench-{workers}",
            f"ray.storage_path={tmp / 'ray'}", "train.max_failures=0"])
        run_train(cfg)  # the workers stream the latents themselves
        c = MlflowClient(uri)
        run = c.search_runs([c.get_experiment_by_name("flowar").experiment_id],
                            filter_string=f"tags.`mlflow.runName` = 'bench-{workers}'")[0]
        history = sorted(c.get_metric_history(run.info.run_id, "images_per_s"), key=lambda m: m.step)
        out[workers] = statistics.median(m.value for m in history[1:] or history)
    ray.shutdown()
    return out


def encode_vs_cached(args) -> dict[str, float]:
    import torch
    from diffusers import AutoencoderKL
    from timm.optim import param_groups_weight_decay

    from flowar import FlowAR

    # One thread, like a Ray Train worker with 1 CPU (Ray sets OMP_NUM_THREADS=1): comparable
    # figures, and no OpenMP spin-waiting against other processes on a small machine.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 64, 64],
                        layers_per_block=1, latent_channels=4).eval()
    model = FlowAR.from_preset(args.preset, latent_channels=4, scales=(1, 2, 4, 8), num_classes=10)
    opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.02), lr=1e-4, betas=(0.9, 0.95))
    images = torch.rand(args.batch, 3, 32, 32) * 2 - 1
    labels = torch.arange(args.batch) % 10
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    cached_mean, cached_std = dist.mean, dist.std

    def step(latents):
        total, _ = model.loss(latents, labels)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cached():
        step(cached_mean + cached_std * torch.randn_like(cached_std))

    def on_the_fly():
        with torch.no_grad():
            d = vae.encode(images).latent_dist
        step(d.mean + d.std * torch.randn_like(d.std))

    out = {}
    for name, fn in (("cached latents", cached), ("encode every step", on_the_fly)):
        for _ in range(3):
            fn()  # warm-up
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        out[name] = args.batch * args.steps / (time.perf_counter() - t)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small-cpu")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=32, help="global batch")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--skip-ray", action="store_true", help="only the in-process comparison")
    args = p.parse_args()

    print(f"## Training throughput: preset {args.preset}, 8x8x4 latents (32x32 images), global batch "
          f"{args.batch}, {args.steps} steps, {os.cpu_count()} CPU cores\n")
    if not args.skip_ray:
        with tempfile.TemporaryDirectory() as tmp:
            ray_figures = ray_train_throughput(args, Path(tmp))
        base = ray_figures[args.workers[0]]
        print("| flowar train (Ray Train, DDP, cached latents) | images/s | vs 1st |")
        print("|---|---:|---:|")
        for workers, ips in ray_figures.items():
            print(f"| {workers} worker(s) | {ips:.1f} | {ips / base:.2f}x |")
        print()
    figures = encode_vs_cached(args)
    base = figures["encode every step"]
    print("| one process, same step | images/s | vs encoding |")
    print("|---|---:|---:|")
    for name, ips in figures.items():
        print(f"| {name} | {ips:.1f} | {ips / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
