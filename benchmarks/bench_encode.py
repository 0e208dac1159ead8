"""Encode throughput of `flowar encode` with 1 and 2 encoder actors, side by side.

Fashion-MNIST (32x32 RGB) through an AutoencoderKL shaped like configs/vae-fashion-mnist.yaml
(random weights: speed does not depend on them), flip on. images/s counts from the pipeline's
start, so it includes the actors' start-up (loading torch + diffusers); use more images to
amortise it.

    .venv/bin/python benchmarks/bench_encode.py [--images 3000] [--actors 1 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--shard-size", type=int, default=250)
    args = parser.parse_args()

    import ray
    import torch
    from diffusers import AutoencoderKL

    from pipelines.core.config import load_config
    from pipelines.encode import EncodeConfig, run_encode

    root = Path(__file__).resolve().parents[1]
    ray.init(num_cpus=max(os.cpu_count() or 1, max(args.actors) + 1), include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}})
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                      block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=4
                      ).save_pretrained(f"{tmp}/vae")
        for n in args.actors:
            cfg = load_config(EncodeConfig, None, [
                f"vae.spec={tmp}/vae", f"output={tmp}/out-{n}", "source.kind=fashion-mnist",
                f"source.limit={args.images}", f"encode.shard_size={args.shard_size}",
                "encode.batch_size=125", f"encode.actors={n}", "encode.actor_cpus=1"])
            results[n] = run_encode(cfg)
    ray.shutdown()

    print(f"\nencode throughput, {args.images} Fashion-MNIST images at 32x32 (+flip), "
          f"{os.cpu_count()} cores, CPU only")
    print(f"{'actors':>6} {'seconds':>8} {'images/s':>9} {'MB written':>10}")
    for n, s in results.items():
        print(f"{n:>6} {s['seconds']:>8.1f} {s['images_per_s']:>9.1f} {s['bytes'] / 2**20:>10.1f}")
    if len(results) >= 2:
        a, b = list(results)[:2]
        print(f"ratio {b} actors / {a} actor: {results[b]['images_per_s'] / results[a]['images_per_s']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
