"""The driver side of `flowar evaluate`: Ray actors, resumable shards, reference statistics,
and the outputs (sample grid, MLflow, table).

A shard is an index range; its result is written as one .npz (atomically) as soon as it arrives,
and a shard whose file exists is never recomputed. Workers pull shards as they finish, so a slow
worker does not hold the others back, and the shard layout never depends on the worker count.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import mlflow
import numpy as np
import ray
from tqdm import tqdm

from pipelines.core.images import image_grid, save_png
from pipelines.data.sources import parse_reference_source
from pipelines.evaluate.inception import cache_dir
from pipelines.evaluate.metrics import FeatureStats, load_reference_npz, save_reference
from pipelines.evaluate.worker import EvalWorker


def generate_and_reference(cfg, weights: str, generator: dict, shard_dir: Path, grid_indices: list[int],
                           keep_features: bool) -> dict:
    """Generated samples' statistics (shards under `shard_dir`, resumed when present) and the
    reference's, on one set of actors that is killed afterwards. Returns the merged `generated`
    and `reference` data, the `run` record, the extractor, the resolution and the workers."""
    g = cfg.generation
    shards = index_shards(g.num_samples, g.shard_size)
    workers, worker_info = make_workers(cfg, weights, generator, len(shards))
    try:
        extractor = ray.get(workers[0].extractor_info.remote())
        run = run_shards(workers, shards, shard_dir, dict(
            batch_size=g.batch_size, keep_features=keep_features, keep_images=g.save_images,
            grid_indices=grid_indices), desc="generate+features")
        generated = summarise_shards(run["files"])
        resolution = cfg.reference.resolution or generated["resolution"]
        reference = compute_reference(cfg, workers, extractor, resolution, keep_features)
    finally:  # finished shards are on disk: a rerun resumes from them
        for w in workers:
            ray.kill(w)
    return {"generated": generated, "reference": reference, "run": run, "extractor": extractor,
            "resolution": resolution, "workers": worker_info, "num_shards": len(shards)}


def index_shards(count: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `shard_size` indices (the last one shorter) covering 0..count."""
    return [(s, min(s + shard_size, count)) for s in range(0, count, shard_size)]


def make_workers(cfg, weights: str, generator: dict | None, num_shards: int):
    """Ray actors holding Inception (and the generator): one per GPU, else one per CPU."""
    w = cfg.workers
    res = ray.cluster_resources()
    gpus = res.get("GPU", 0.0)
    use_gpu = gpus > 0 and w.device in ("auto", "cuda")
    if w.num_workers > 0:
        n = w.num_workers
    elif use_gpu:
        n = max(1, int(gpus // w.gpus_per_worker))
    else:
        n = max(1, int(res.get("CPU", 1) // w.cpus_per_worker))
    n = max(1, min(n, num_shards))
    actor = ray.remote(EvalWorker).options(num_cpus=w.cpus_per_worker,
                                           num_gpus=w.gpus_per_worker if use_gpu else 0)
    inception = {"weights": weights, "allow_download": cfg.inception.allow_download}
    workers = [actor.remote(inception, generator, w.device) for _ in range(n)]
    info = {"count": n, "gpu": bool(use_gpu), "cpus_per_worker": w.cpus_per_worker,
            "gpus_per_worker": w.gpus_per_worker if use_gpu else 0}
    return workers, info


def shard_path(shard_dir: Path, start: int, end: int) -> Path:
    return shard_dir / f"{start:09d}-{end:09d}.npz"


def _save_npz(path: Path, arrays: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # a killed driver never leaves a half shard that looks finished


def run_shards(workers, shards, shard_dir: Path, kwargs: dict, desc: str) -> dict:
    """Run every shard whose file is missing on the workers; returns files and throughput."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    todo = [s for s in shards if not shard_path(shard_dir, *s).is_file()]
    resumed = len(shards) - len(todo)
    total = sum(e - s for s, e in todo)
    pending, queue, idle = {}, list(todo), list(workers)
    image_s = feature_s = 0.0
    t0 = time.perf_counter()
    with tqdm(total=total, desc=desc, unit="img", disable=total == 0) as bar:
        while queue or pending:
            while queue and idle:
                worker, (s, e) = idle.pop(), queue.pop(0)
                pending[worker.run_shard.remote(s, e, **kwargs)] = worker
            done, _ = ray.wait(list(pending), num_returns=1)
            worker = pending.pop(done[0])
            result = ray.get(done[0])
            _save_npz(shard_path(shard_dir, int(result["start"]), int(result["end"])), result)
            image_s += float(result["image_seconds"])
            feature_s += float(result["feature_seconds"])
            bar.update(int(result["end"] - result["start"]))
            idle.append(worker)
    wall = time.perf_counter() - t0
    throughput = {"images": total, "wall_seconds": wall,
                  "images_per_second": total / wall if total else 0.0,
                  "worker_image_seconds": image_s, "worker_feature_seconds": feature_s}
    return {"files": [shard_path(shard_dir, *s) for s in shards], "resumed": resumed,
            "computed": len(todo), "throughput": throughput}


def summarise_shards(files) -> dict:
    """Merge shard files (in index order): stats, and features/logits/grid/images when present."""
    stats, feats, logits, grid, images, resolution = [], [], [], {}, [], 0
    for f in files:
        with np.load(f) as z:
            stats.append(FeatureStats.from_arrays(z))
            resolution = int(z["resolution"])
            if "features" in z:
                feats.append(z["features"])
            if "logits" in z:
                logits.append(z["logits"])
            if "images" in z:
                images.append(z["images"])
            if "grid_idx" in z:
                grid.update(zip(z["grid_idx"].tolist(), z["grid_images"]))
    return {"stats": FeatureStats.merge(stats), "resolution": resolution,
            "features": np.concatenate(feats) if len(feats) == len(files) else None,
            "logits": np.concatenate(logits) if len(logits) == len(files) else None,
            "images": np.concatenate(images) if len(images) == len(files) else None,
            "grid": [grid[i] for i in sorted(grid)]}


def reference_key(source: dict, resolution: int, extractor_digest: str, max_images: int) -> str:
    """The cache name of reference statistics: the source spec, resolution, extractor, limit."""
    ident = {k: v for k, v in source.items() if k != "files"}
    if "files" in source:  # a folder: its file list (names and sizes) is its identity
        ident["files"] = hashlib.sha256("\n".join(
            f"{p}:{os.path.getsize(p)}" for p in source["files"]).encode()).hexdigest()
    data = json.dumps({"source": ident, "resolution": resolution, "extractor": extractor_digest,
                       "max_images": max_images}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def compute_reference(cfg, workers, extractor: dict, resolution: int, need_features: bool) -> dict:
    """mu, sigma (+ features) of the reference: an ADM .npz, or an image source through the
    workers, cached under <flowar cache>/reference/<key>.npz."""
    r = cfg.reference
    if r.source.endswith(".npz"):
        mu, sigma = load_reference_npz(r.source)
        return {"mu": mu, "sigma": sigma, "features": None, "count": None, "source": r.source,
                "cached": True, "note": "statistics file: its Inception extractor is assumed to match"}
    source = parse_reference_source(r.source)
    count = min(source["count"], r.max_images) if r.max_images else source["count"]
    key = reference_key(source, resolution, extractor["digest"], r.max_images)
    cache = cache_dir() / "reference" / f"{key}.npz"
    cached = _cached_reference(cache, need_features)
    if cached is not None:
        return {**cached, "source": r.source, "cached": True, "cache_file": str(cache)}
    parts = cache.with_name(f"{key}{'-features' if need_features else ''}.parts")
    run = run_shards(workers, index_shards(count, r.shard_size), parts,
                     dict(batch_size=r.batch_size, keep_features=need_features, source=source,
                          resolution=resolution), desc="reference features")
    merged = summarise_shards(run["files"])
    stats: FeatureStats = merged["stats"]
    save_reference(cache, stats, merged["features"],
                   {"source": r.source, "resolution": resolution, "extractor": extractor["id"]})
    mu, sigma = stats.mu_sigma()
    return {"mu": mu, "sigma": sigma, "features": merged["features"], "count": stats.count,
            "source": r.source, "cached": False, "cache_file": str(cache)}


def _cached_reference(cache: Path, need_features: bool) -> dict | None:
    """{mu, sigma, count, features} of a cached reference, or None when there is none (or it
    lacks the features that KID / precision-recall need)."""
    if not cache.is_file():
        return None
    with np.load(cache) as z:
        if "features" not in z and need_features:
            return None
        return {"mu": z["mu"], "sigma": z["sigma"], "count": int(z["count"]),
                "features": z["features"] if "features" in z else None}


def save_sample_grid(images: list, per_row: int, path: Path) -> Path | None:
    """The evaluation's sample grid (uint8 (3,H,W) images, `per_row` a row) as a PNG; None when
    the grid is empty (grid_classes=0)."""
    if not len(images):
        return None
    return save_png(image_grid(np.stack(images), per_row), path)


def log_to_mlflow(cfg, run_id: str, step: int, results: dict, report_path: Path,
                  grid_path: Path | None) -> str:
    """Metrics (at the checkpoint step), the grid and the report into the training run (when
    known) or a new run. Unavailable metrics are tags, never numbers."""
    mlflow.set_tracking_uri(cfg.mlflow.resolved_uri())
    prefix = cfg.metric_prefix.rstrip("/") + "/" if cfg.metric_prefix else ""
    if run_id:
        ctx = mlflow.start_run(run_id=run_id)
    else:
        mlflow.set_experiment(cfg.mlflow.experiment)
        ctx = mlflow.start_run(run_name=cfg.mlflow.run_name or f"eval-{Path(cfg.generation.checkpoint).name}")
    with ctx as run:
        nums = {f"{prefix}{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}
        mlflow.log_metrics(nums, step=step)
        for k, v in results.items():
            if isinstance(v, str):
                mlflow.set_tag(f"{prefix}{k}", v)
        mlflow.log_artifact(str(report_path), artifact_path=prefix.rstrip("/") or None)
        if grid_path is not None:
            mlflow.log_artifact(str(grid_path), artifact_path=prefix.rstrip("/") or None)
        return run.info.run_id


def print_table(results: dict, report: dict) -> None:
    """The results and the counts behind them, as a two-column table on stdout."""
    rows = [(k, f"{v:.6g}" if isinstance(v, float) else str(v)) for k, v in results.items()]
    rows += [("generated", str(report["num_generated"])), ("reference", str(report["num_reference"])),
             ("resolution", str(report["resolution"])), ("step", str(report["step"])),
             ("shards computed/resumed", f"{report['shards']['computed']}/{report['shards']['resumed']}"),
             ("extractor", report["extractor"]["id"])]
    width = max(len(k) for k, _ in rows)
    print("\n".join([f"{'metric':<{width}}  value", "-" * (width + 20)] +
                    [f"{k:<{width}}  {v}" for k, v in rows]))
