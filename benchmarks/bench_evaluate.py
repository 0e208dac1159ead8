"""`flowar evaluate`: the driver's peak memory at N vs 8N samples, and worker throughput with 1 vs 2 actors.

    .venv/bin/python benchmarks/bench_evaluate.py memory [--sizes 2000,16000] [--shard 1000] [--old CHECKOUT]
                                                         [--out benchmarks/.bench_evaluate]
    .venv/bin/python benchmarks/bench_evaluate.py throughput [--samples 48] [--preset tiny] [--steps 25]

memory (issue 16): `flowar evaluate` of N generated samples against a reference folder of N real
images (Fashion-MNIST train images, 32x32 PNG in ten class folders), for each N of --sizes, each in
a fresh process (the driver) with 2 workers, default shards of 1,000, FID + KID + precision/recall
(feature_subset_size = the smallest N, so every run keeps the same number of features: the subset
is bounded, what is measured is what grows with N) and save_images on. A tiny random-weight
FlowAR + VAE makes 8 px samples (generation costs little next to Inception, which resizes every
image to 299 px: about 0.26 s per image per core here, so N=16,000 is about 32,000 Inception
forwards). The driver reports its own peak RSS (getrusage ru_maxrss) and a thread samples it every
0.2 s, with the RSS when the first shard result arrived (start-up: Ray, torch, the workers).
Each run writes <out>/memory-<N>.json; a finished one is skipped, a killed one resumes from its
shard files (the JSON says how many shards were resumed). Then it prints the ratio and a projection
for 50,000 samples and the full ImageNet reference (1,281,167 images), before vs after. `--old`
measures the same on another checkout (e.g. `git archive c1b4052 | tar -x -C /tmp/old`: the
driver before issue 16). `--sizes 100,800 --shard 50` keeps the shard counts of 2,000 vs 16,000
(2 vs 16 a set: what the old driver's memory grew with) at a twentieth of the Inception work.

throughput: samples/s of generation (FlowAR + CFG + VAE decode) + Inception through the shard
queue, and features/s of Fashion-MNIST reference images, with 1 and 2 actors (1 CPU each; the
ideal ratio is 2.0 on >= 2 free cores); start-up and one warm-up shard per actor excluded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from measure import MB, Sampler, child, measured  # noqa: E402

STATS_MB = (2048 * 2048 + 2048) * 8 / MB  # one shard's count/sum/outer, float64: 32 MiB
FEATURE_KB = 2048 * 4 / 1024  # one kept feature vector, float32
IMAGENET = 1_281_167


# ------------------------------------------------------------------ inputs (built once, kept in --out)

def build_export(root: Path, preset: str = "tiny") -> tuple[Path, Path]:
    """A random-weight FlowAR (scales 1, 2, 4; 10 classes) and a tiny AutoencoderKL beside it."""
    import torch
    from diffusers import AutoencoderKL

    from flowar import FlowAR

    if (root / "model" / "config.json").exists() and (root / "vae" / "config.json").exists():
        return root / "model", root / "vae"
    torch.manual_seed(0)
    FlowAR.from_preset(preset, latent_channels=4, scales=(1, 2, 4), num_classes=10).save_pretrained(root / "model")
    AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(root / "vae")
    return root / "model", root / "vae"


def reference_folder(root: Path, n: int) -> Path:
    """n Fashion-MNIST training images as PNG files in ten class folders (an ImageNet layout)."""
    from PIL import Image

    from pipelines.data.bundled import fashion_mnist_file
    from pipelines.data.sources import read_idx

    folder = root / f"reference-{n}"
    if (folder / ".complete").exists():
        return folder
    images = read_idx(fashion_mnist_file("train", "images"))
    labels = read_idx(fashion_mnist_file("train", "labels"))
    for i in range(n):
        (folder / f"class{labels[i]}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"class{labels[i]}" / f"{i:06d}.png")
    (folder / ".complete").write_text(str(n))
    return folder


# ------------------------------------------------------------------ memory: one driver per size

def memory_spec(out: Path, n: int, subset: int, old: str, shard: int = 1000) -> dict:
    model, vae = build_export(out / "export")
    ref = reference_folder(out, n)
    run = out / f"run-{_name(n, shard)}{'-old' if old else ''}"
    overrides = [f"generation.checkpoint={model}", f"generation.vae={vae}", f"generation.num_samples={n}",
                 f"generation.samples_per_class={n // 10}", "generation.batch_size=50",
                 f"generation.shard_size={shard}", "generation.save_images=true", "sampler.num_steps=4",
                 "sampler.cfg=1.0", f"reference.source={ref}", "reference.batch_size=50",
                 f"reference.shard_size={shard}", "metrics.kid=true", "metrics.prc=true",
                 "workers.num_workers=2", f"output_dir={run / 'eval'}",
                 f"mlflow.tracking_uri=sqlite:///{out / 'mlflow.db'}"]
    if not old:  # the old code kept every feature and capped KID's subsets itself
        overrides += [f"metrics.feature_subset_size={subset}", f"metrics.kid_subset_size={min(subset, 1000)}"]
    return {"mode": "memory", "n": n, "overrides": overrides, "cache": str(run / "cache"),
            "result": str(run / "result.json")}


def memory_child(spec: dict) -> None:
    """The driver: `flowar evaluate` in this process; its peak RSS and when start-up ended."""
    os.environ["FLOWAR_CACHE"] = spec["cache"]
    import ray  # noqa: F401 (the Sampler's psutil is Ray's copy: importable once ray is)

    from pipelines.core.config import load_config
    from pipelines.evaluate.job import EvalConfig, run_evaluate

    cfg = load_config(EvalConfig, None, spec["overrides"])
    shards = Path(cfg.output_dir) / "shards"
    before = set(shards.glob("*.npz")) if shards.exists() else set()
    sampler, startup = Sampler(every=0.2, worker="EvalWorker"), {}
    stop = threading.Event()

    def watch():  # the driver's RSS when the first new shard file appears: start-up is done
        while not stop.wait(0.2):
            if shards.exists() and set(shards.glob("*.npz")) - before:
                startup["rss"] = _rss()
                return

    watcher = threading.Thread(target=watch, daemon=True)
    load_before, t0 = os.getloadavg(), time.time()
    sampler.start()
    watcher.start()
    report = run_evaluate(cfg)
    stop.set()
    sampler.stop.set()
    sampler.join()
    Path(spec["result"]).write_text(json.dumps({
        "n": spec["n"], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sampled_peak_mb": sampler.peak_driver / MB, "startup_rss_mb": startup.get("rss", 0) / MB,
        "ray_peak_mb": sampler.peak_ray / MB, "seconds": round(time.time() - t0, 1),
        "load_before": load_before, "load_after": os.getloadavg(), "shards": report["shards"],
        "num_generated": report["num_generated"], "num_reference": report["num_reference"],
        "feature_subsets": report.get("feature_subsets"), "results": report["results"],
        "throughput": report["throughput"]}, default=str))


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def run_memory(args) -> None:
    out = Path(args.out)
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = {}
    for n in sizes:
        spec = memory_spec(out, n, min(sizes), "", args.shard)
        rows[n] = measured(out, f"memory-{_name(n, args.shard)}",
                           lambda spec=spec: child(__file__, spec, ROOT, ROOT, timeout=8 * 3600))
    if args.old:  # the same on another checkout (the code before this issue)
        for n in sizes:
            spec = {**memory_spec(out, n, n, "old", args.shard), "root": str(Path(args.old).resolve())}
            rows[f"old-{n}"] = measured(out, f"memory-{_name(n, args.shard)}-old", lambda spec=spec: child(
                __file__, spec, Path(args.old), Path(args.old), timeout=8 * 3600))
    print_memory(rows, sizes, min(sizes), args.shard)


def _name(n: int, shard: int) -> str:
    return str(n) if shard == 1000 else f"{n}-shard{shard}"


def print_memory(rows: dict, sizes: list[int], subset: int, shard: int) -> None:
    print(f"\nflowar evaluate, driver peak RSS (MB): N generated vs N reference images, 2 workers, "
          f"shards of {shard:,}, FID+KID+PR (feature subset {subset}), save_images on")
    print(f"{'code':>5}{'N':>7}{'peak':>8}{'sampled':>9}{'start-up':>10}{'growth':>8}{'shards':>8}"
          f"{'resumed':>9}{'minutes':>9}  load (1-min avg, before -> after)")
    for key in [*sizes, *(f"old-{n}" for n in sizes)]:
        if key not in rows:
            continue
        r, code = rows[key], "old" if str(key).startswith("old") else "new"
        print(f"{code:>5}{r['n']:>7}{r['peak_rss_mb']:8.0f}{r['sampled_peak_mb']:9.0f}{r['startup_rss_mb']:10.0f}"
              f"{r['peak_rss_mb'] - r['startup_rss_mb']:8.0f}{r['shards']['total']:>8}{r['shards']['resumed']:>9}"
              f"{r['seconds'] / 60:9.1f}  {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}")
    for code, (a, b) in (("new", (sizes[0], sizes[-1])), ("old", (f"old-{sizes[0]}", f"old-{sizes[-1]}"))):
        if a in rows and b in rows:
            print(f"{code}: ratio {sizes[-1]} / {sizes[0]}: {rows[b]['peak_rss_mb'] / rows[a]['peak_rss_mb']:.3f}"
                  f" ({rows[b]['peak_rss_mb'] - rows[a]['peak_rss_mb']:+.0f} MB)")
    print("target (issue 16): the new code's ratio at most 1.10")
    project(rows[sizes[-1]]["peak_rss_mb"], sizes[-1], subset)


def project(peak_mb: float, n_measured: int, subset: int) -> None:
    """Driver peak for 50,000 samples against 50,000 reference images and against ImageNet,
    before and after, from the measured peak of the new code at the largest N. Before (the old
    shards.py): summarise_shards held every shard's statistics (32 MiB each) until merged, the
    generated list and then the reference's (not both at once), every feature of both sets
    (float32, 8 KiB a sample) and the folder's file list (about 120 B a path). After: the
    measured peak, plus the default feature subset (10,000 a set) instead of the measured
    one, plus 4 B a sample (the Inception Score's chunk index)."""
    print(f"\nprojection, driver peak (GB), shards of 1,000, FID+KID+PR, from the new code's peak at "
          f"N={n_measured:,} ({peak_mb:,.0f} MB)")
    for gen, ref, what in ((50_000, 50_000, "50,000 samples, 50,000 reference images"),
                           (50_000, IMAGENET, "50,000 samples, ImageNet train (1,281,167)")):
        before = (peak_mb + max(math.ceil(gen / 1000), math.ceil(ref / 1000)) * STATS_MB
                  + (gen + ref) * FEATURE_KB / 1024 + ref * 120 / MB)
        after = peak_mb + 2 * (10_000 - subset) * FEATURE_KB / 1024 + 4 * gen / MB
        print(f"  {what:<45} before {before / 1000:7.1f}   after {after / 1000:5.2f}")


# ------------------------------------------------------------------ throughput: 1 vs 2 actors

def measure_throughput(num_workers: int, args, model: Path, vae: Path, tmp: Path) -> dict:
    from pipelines.core.config import load_config
    from pipelines.evaluate.export import generator_spec
    from pipelines.evaluate.fold import InOrder, Summary
    from pipelines.evaluate.job import EvalConfig
    from pipelines.evaluate.outputs import Folder
    from pipelines.evaluate.reference import range_call, reference_spec
    from pipelines.evaluate.shards import index_shards, kill, run_shards, shard_name, start_workers

    cfg = load_config(EvalConfig, None, [
        f"generation.checkpoint={model}", f"generation.vae={vae}", "reference.source=fashion-mnist:test",
        f"generation.batch_size={args.batch}", f"generation.shard_size={args.batch}",
        f"sampler.num_steps={args.steps}", f"workers.num_workers={num_workers}"])
    gen = generator_spec(model, cfg.sampler, vae=str(vae), seed=0, samples_per_class=50)
    n = args.samples
    shards = index_shards(n, args.batch)
    workers, _, _ = start_workers(cfg, gen, len(shards))

    def run(shards, name, desc, **kwargs):
        folder = Folder(str(tmp / f"{name}{num_workers}"))
        fold = InOrder(shards, lambda s: folder.open_npz(shard_name(*s)), Summary())
        return run_shards(workers, shards, folder, lambda s: {"batch_size": args.batch, **{
            k: v(s) if callable(v) else v for k, v in kwargs.items()}}, desc, fold)

    warm = [(n + i * args.batch, n + (i + 1) * args.batch) for i in range(num_workers)]
    run(warm, "warm", "warm-up")
    g = run(shards, "gen", f"generate x{num_workers}")
    spec = reference_spec("fashion-mnist:test")
    f = run(shards, "ref", f"features x{num_workers}", source=lambda s: range_call(spec, *s), resolution=8)
    kill(workers)
    gt, ft = g["throughput"], f["throughput"]
    return {"samples_per_s": gt["images_per_second"], "features_per_s": ft["images_per_second"],
            "gen_share": gt["worker_image_seconds"] / max(1e-9, gt["worker_image_seconds"] + gt["worker_feature_seconds"])}


def run_throughput(args) -> None:
    import tempfile

    import ray

    if args.samples % args.batch:
        sys.exit("--samples must be a multiple of --batch")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, vae = build_export(tmp, args.preset)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}})
        rows = {n: measure_throughput(n, args, model, vae, tmp) for n in (1, 2)}
        ray.shutdown()
    print(f"\nflowar evaluate throughput: {args.samples} samples, batch {args.batch}, "
          f"preset {args.preset}, {args.steps} steps, CFG on, {os.cpu_count()} CPUs")
    print(f"{'':22}{'1 worker':>12}{'2 workers':>12}{'ratio':>8}")
    for key, label in (("samples_per_s", "samples/s (gen+feat)"), ("features_per_s", "features/s")):
        a, b = rows[1][key], rows[2][key]
        print(f"{label:22}{a:12.2f}{b:12.2f}{b / a:8.2f}")
    print(f"{'generation share':22}{rows[1]['gen_share']:12.0%}{rows[2]['gen_share']:12.0%}")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        spec = json.loads(sys.argv[2])
        if spec.get("root"):  # another checkout's pipelines (--old)
            sys.path.insert(0, spec["root"])
        return memory_child(spec)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what")
    mem = sub.add_parser("memory", help="driver peak RSS at N vs 8N samples and reference images")
    mem.add_argument("--sizes", default="2000,16000")
    mem.add_argument("--out", default=str(HERE / ".bench_evaluate"))
    mem.add_argument("--shard", type=int, default=1000, help="generation and reference shard size")
    mem.add_argument("--old", default="", help="another checkout (the code before) to measure too")
    thr = sub.add_parser("throughput", help="1 vs 2 workers")
    thr.add_argument("--samples", type=int, default=48)
    thr.add_argument("--batch", type=int, default=8)
    thr.add_argument("--steps", type=int, default=25)
    thr.add_argument("--preset", default="tiny")
    args = p.parse_args(sys.argv[1:] or ["throughput"])
    (run_memory if args.what == "memory" else run_throughput)(args)


if __name__ == "__main__":
    main()
