"""Throughput of `flowar evaluate`'s workers with 1 and 2 Ray actors, side by side.

    .venv/bin/python benchmarks/bench_evaluate.py [--samples 48] [--preset tiny] [--steps 25]

samples/s: generation (FlowAR + CFG + VAE decode) and Inception features of generated samples,
end to end through the shard queue; features/s: Inception features of Fashion-MNIST reference
images through the same actors. Actor start-up and one warm-up shard per actor are excluded.
Each actor gets 1 CPU (torch uses 1 thread in it), so the ideal 2-vs-1 ratio is 2.0 on >= 2 free
cores. Uses a tiny random-weight model and VAE: the figures are of the pipeline, not of a
published model (where generation dominates and runs on GPUs).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build_export(root: Path, preset: str) -> tuple[Path, Path]:
    import torch
    from diffusers import AutoencoderKL

    from flowar import FlowAR

    torch.manual_seed(0)
    FlowAR.from_preset(preset, latent_channels=4, scales=(1, 2, 4), num_classes=10).save_pretrained(root / "model")
    AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(root / "vae")
    return root / "model", root / "vae"


def measure(num_workers: int, args, model: Path, vae: Path, tmp: Path) -> dict:
    import ray

    from pipelines.core.config import load_config
    from pipelines.data.sources import parse_reference_source
    from pipelines.evaluate.export import generator_spec
    from pipelines.evaluate.inception import resolve_weights
    from pipelines.evaluate.job import EvalConfig
    from pipelines.evaluate.shards import index_shards, make_workers, run_shards

    cfg = load_config(EvalConfig, None, [
        f"generation.checkpoint={model}", f"generation.vae={vae}", "reference.source=fashion-mnist:test",
        f"generation.batch_size={args.batch}", f"generation.shard_size={args.batch}",
        f"sampler.num_steps={args.steps}", f"workers.num_workers={num_workers}"])
    gen = generator_spec(model, cfg.sampler, vae=str(vae), seed=0, samples_per_class=50)
    weights = str(resolve_weights())
    n = args.samples
    shards = index_shards(n, args.batch)
    workers, _ = make_workers(cfg, weights, gen, len(shards))
    warm = [(n + i * args.batch, n + (i + 1) * args.batch) for i in range(num_workers)]
    run_shards(workers, warm, tmp / f"warm{num_workers}", dict(batch_size=args.batch, keep_features=False),
               desc="warm-up")
    g = run_shards(workers, shards, tmp / f"gen{num_workers}", dict(batch_size=args.batch, keep_features=False),
                   desc=f"generate x{num_workers}")
    source = parse_reference_source("fashion-mnist:test")
    f = run_shards(workers, shards, tmp / f"ref{num_workers}",
                   dict(batch_size=args.batch, keep_features=False, source=source, resolution=8),
                   desc=f"features x{num_workers}")
    for w in workers:
        ray.kill(w)
    gt, ft = g["throughput"], f["throughput"]
    return {"samples_per_s": gt["images_per_second"], "features_per_s": ft["images_per_second"],
            "gen_share": gt["worker_image_seconds"] / max(1e-9, gt["worker_image_seconds"] + gt["worker_feature_seconds"])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--preset", default="tiny")
    args = p.parse_args()
    if args.samples % args.batch:
        p.error("--samples must be a multiple of --batch")
    import ray

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, vae = build_export(tmp, args.preset)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1",
                                           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
        rows = {n: measure(n, args, model, vae, tmp) for n in (1, 2)}
        ray.shutdown()
    print(f"\nflowar evaluate throughput: {args.samples} samples, batch {args.batch}, "
          f"preset {args.preset}, {args.steps} steps, CFG on, {os.cpu_count()} CPUs")
    print(f"{'':22}{'1 worker':>12}{'2 workers':>12}{'ratio':>8}")
    for key, label in (("samples_per_s", "samples/s (gen+feat)"), ("features_per_s", "features/s")):
        a, b = rows[1][key], rows[2][key]
        print(f"{label:22}{a:12.2f}{b:12.2f}{b / a:8.2f}")
    print(f"{'generation share':22}{rows[1]['gen_share']:12.0%}{rows[2]['gen_share']:12.0%}")


if __name__ == "__main__":
    main()
