"""The driver side of `flowar evaluate`: Ray actors, resumable shards, reference statistics,
and the outputs (sample grid, the evaluation's MLflow run, table).

A shard is an index range; its result is written as one .npz in the output folder (a local path
or a URI, pipelines/evaluate/outputs.py) as soon as it arrives, and a shard whose file exists is
never recomputed. Workers pull shards as they finish, so a slow worker does not hold the others
back, and the shard layout never depends on the worker count. Each result is added at once to
one running summary (pipelines/evaluate/fold.py), so the driver's memory does not grow with the
number of shards, samples or reference images; a shard call carries only its own range.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from flowar.config import ConfigError
from pipelines.core.images import image_grid, save_png
from pipelines.evaluate.fold import InOrder, Summary
from pipelines.evaluate.inception import cache_dir
from pipelines.evaluate.metrics import IscSums, feature_subset, load_reference_npz, save_reference
from pipelines.evaluate.outputs import Folder
from pipelines.evaluate.reference import identity, range_call
from pipelines.evaluate.worker import EvalWorker


def generate(cfg, workers, shard_dir: Folder, grid_indices: list[int], keep_features: bool,
             keep_logits: bool) -> tuple[dict, dict]:
    """The generated samples' merged data (Summary.result) and the `run` record; shards under
    `shard_dir`, resumed when present."""
    g, m = cfg.generation, cfg.metrics
    shards = index_shards(g.num_samples, g.shard_size)
    subset = feature_subset(g.num_samples, m.feature_subset_size, m.feature_subset_seed) if keep_features else None
    summary = Summary(keep_features, IscSums(g.num_samples, m.isc_splits) if keep_logits else None)
    fold = InOrder(shards, lambda s: shard_dir.open_npz(shard_name(*s)), summary)

    def call(s):
        return {"batch_size": g.batch_size, "keep": _within(subset, s), "keep_logits": keep_logits,
                "keep_images": g.save_images, "grid_indices": [i for i in grid_indices if s[0] <= i < s[1]]}

    run = run_shards(workers, shards, shard_dir, call, "generate+features", fold)
    return summary.result(), run


def index_shards(count: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `shard_size` indices (the last one shorter) covering 0..count."""
    return [(s, min(s + shard_size, count)) for s in range(0, count, shard_size)]


def _within(subset: np.ndarray | None, shard: tuple[int, int]) -> list[int]:
    """The indices of `subset` (sorted) inside the shard: the features the shard keeps."""
    if subset is None:
        return []
    lo, hi = np.searchsorted(subset, shard)
    return subset[lo:hi].tolist()


# ------------------------------------------------------------------------------------------------
# Workers
# ------------------------------------------------------------------------------------------------

def start_workers(cfg, generator: dict | None, num_shards: int) -> tuple[list, dict, dict]:
    """(actors, worker info, extractor). Each actor finds its Inception weights on its own node;
    they must all find the same weights (digest), else the features would not be comparable."""
    workers, info = make_workers(cfg, generator, num_shards)
    try:
        found = ray.get([w.extractor_info.remote() for w in workers])
    except ray.exceptions.RayActorError as e:
        kill(workers)
        raise ConfigError(f"an evaluation worker could not start (inception.weights="
                          f"{cfg.inception.weights!r}, generation.checkpoint={cfg.generation.checkpoint!r}): "
                          f"{_cause(e)}") from None
    if len({f["digest"] for f in found}) > 1:
        kill(workers)
        seen = "; ".join(f"{f['hostname']} ({f['node_id'][:8]}): {f['weights']} [{f['digest']}]" for f in found)
        raise ConfigError(f"the workers found different Inception weights: {seen}. Give every node "
                          "the same file (inception.weights) or the same cache")
    info["nodes"] = [{k: f[k] for k in ("node_id", "hostname", "weights", "digest")} for f in found]
    extractor = {k: v for k, v in found[0].items() if k not in ("node_id", "hostname", "pid")}
    return workers, info, extractor


def _cause(error: Exception) -> str:
    """The exception line of a failed actor's creation task (Ray wraps it in its own text)."""
    lines = [ln.strip() for ln in str(error).splitlines() if re.match(r"^\s*\w+(Error|Exception): ", ln)]
    return lines[-1] if lines else str(error).splitlines()[0]


def make_workers(cfg, generator: dict | None, num_shards: int):
    """Ray actors holding Inception (and the generator): one per GPU, else one per CPU; spread
    over the nodes."""
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
    actor = ray.remote(EvalWorker).options(num_cpus=w.cpus_per_worker, scheduling_strategy="SPREAD",
                                           num_gpus=w.gpus_per_worker if use_gpu else 0)
    inception = {"weights": cfg.inception.weights, "allow_download": cfg.inception.allow_download}
    workers = [actor.remote(inception, generator, w.device) for _ in range(n)]
    info = {"count": n, "gpu": bool(use_gpu), "cpus_per_worker": w.cpus_per_worker,
            "gpus_per_worker": w.gpus_per_worker if use_gpu else 0}
    return workers, info


def kill(workers) -> None:
    for w in workers:
        ray.kill(w)


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------

def shard_name(start: int, end: int) -> str:
    return f"{start:09d}-{end:09d}.npz"


def run_shards(workers, shards, shard_dir: Folder, call, desc: str, fold: InOrder) -> dict:
    """Run every shard whose file is missing on the workers (`call(shard)`: its keyword
    arguments), write each result and add it to `fold` as it arrives; returns the run record."""
    present = shard_dir.names()
    todo = [s for s in shards if shard_name(*s) not in present]
    for s in shards:
        if shard_name(*s) in present:
            fold.arrived(s)  # resumed: read back from its file when its turn comes
    total = sum(e - s for s, e in todo)
    pending, queue, idle = {}, list(todo), list(workers)
    image_s = feature_s = 0.0
    by_node: Counter = Counter()
    t0 = time.perf_counter()
    with tqdm(total=total, desc=desc, unit="img", disable=total == 0) as bar:
        while queue or pending:
            while queue and idle:
                worker, (s, e) = idle.pop(), queue.pop(0)
                pending[worker.run_shard.remote(s, e, **call((s, e)))] = worker
            done, _ = ray.wait(list(pending), num_returns=1)
            idle.append(pending.pop(done[0]))
            result = ray.get(done[0])
            shard = (int(result["start"]), int(result["end"]))
            shard_dir.save_npz(shard_name(*shard), result)
            fold.arrived(shard, result)
            image_s += float(result["image_seconds"])
            feature_s += float(result["feature_seconds"])
            by_node[str(result["node_id"])] += 1
            bar.update(shard[1] - shard[0])
            del result, done  # the next result replaces this one: one shard in memory at a time
    if not fold.done:
        raise RuntimeError(f"{desc}: shards missing after the run ({fold.next} of {len(shards)} added)")
    wall = time.perf_counter() - t0
    throughput = {"images": total, "wall_seconds": wall,
                  "images_per_second": total / wall if total else 0.0,
                  "worker_image_seconds": image_s, "worker_feature_seconds": feature_s}
    return {"resumed": len(shards) - len(todo), "computed": len(todo), "read_back": fold.read_back,
            "throughput": throughput, "shards_by_node": dict(by_node)}


def shard_images(shard_dir: Folder):
    """(start, uint8 images) of every shard file holding images, in index order, one at a time
    (generation.save_images keeps them in the shard files)."""
    for name in sorted(n for n in shard_dir.names() if re.fullmatch(r"\d{9}-\d{9}\.npz", n)):
        with shard_dir.open_npz(name) as z:
            if "images" in z:
                yield int(z["start"]), z["images"]


# ------------------------------------------------------------------------------------------------
# Reference statistics
# ------------------------------------------------------------------------------------------------

def reference_key(spec: dict, resolution: int, extractor_digest: str, subset: list | None) -> str:
    """The cache name of reference statistics: the source (its digest for a folder), resolution,
    extractor, and the feature subset (size, seed) when features are kept."""
    data = json.dumps({"source": identity(spec), "resolution": resolution, "extractor": extractor_digest,
                       "features": subset}, sort_keys=True)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def reference_cache_file(spec: dict, resolution: int, extractor_digest: str, subset: list | None) -> Path:
    """<flowar cache>/reference/<reference_key>.npz: where flowar evaluate and the in-training
    evaluation (pipelines/train/evaluation.py) keep a reference's statistics."""
    return cache_dir() / "reference" / f"{reference_key(spec, resolution, extractor_digest, subset)}.npz"


def load_cached_reference(path: Path) -> dict:
    """{mu, sigma, count, features (None when not kept)} of a cached reference file."""
    with np.load(path) as z:
        return {"mu": np.array(z["mu"]), "sigma": np.array(z["sigma"]), "count": int(z["count"]),
                "features": np.array(z["features"]) if "features" in z else None}


def compute_reference(cfg, workers, extractor: dict, resolution: int, need_features: bool,
                      spec: dict) -> dict:
    """mu, sigma (+ the feature subset) of the reference: an ADM .npz, or an image source
    (pipelines.evaluate.reference's spec) through the workers, cached under
    <flowar cache>/reference/<key>.npz. The shard files are deleted once merged."""
    r, m = cfg.reference, cfg.metrics
    if spec["kind"] == "npz":
        mu, sigma = load_reference_npz(r.source)
        return {"mu": mu, "sigma": sigma, "features": None, "count": None, "source": r.source,
                "cached": True, "note": "statistics file: its Inception extractor is assumed to match"}
    count = spec["count"]
    sub = [m.feature_subset_size, m.feature_subset_seed] if need_features else None
    cache = reference_cache_file(spec, resolution, extractor["digest"], sub)
    if cache.is_file():
        return {**load_cached_reference(cache), "source": r.source, "cached": True,
                "cache_file": str(cache)}
    subset = feature_subset(count, *sub) if need_features else None
    parts = Folder(str(cache.with_suffix(".parts")))
    shards = index_shards(count, r.shard_size)
    summary = Summary(need_features)
    fold = InOrder(shards, lambda s: parts.open_npz(shard_name(*s)), summary)
    run_shards(workers, shards, parts, lambda s: {
        "batch_size": r.batch_size, "keep": _within(subset, s), "source": range_call(spec, *s),
        "resolution": resolution}, "reference features", fold)
    merged = summary.result()
    save_reference(cache, merged["stats"], merged["features"],
                   {"source": r.source, "resolution": resolution, "extractor": extractor["id"]})
    parts.remove()  # merged into the cache file: 32 MiB a shard need not stay on disk
    mu, sigma = merged["stats"].mu_sigma()
    return {"mu": mu, "sigma": sigma, "features": merged["features"], "count": merged["stats"].count,
            "source": r.source, "cached": False, "cache_file": str(cache)}


def save_sample_grid(images: list, per_row: int, path: Path) -> Path | None:
    """The evaluation's sample grid (uint8 (3,H,W) images, `per_row` a row) as a PNG; None when
    the grid is empty (grid_classes=0)."""
    if not len(images):
        return None
    return save_png(image_grid(np.stack(images), per_row), path)


def log_to_mlflow(cfg, run_id: str, step: int, results: dict, params: dict, files: list,
                  grid: Path | None = None, model_id: str = "", reference: dict | None = None) -> None:
    """Into the evaluation's own MLflow run `run_id` (a child run, job.open_child_run): the
    metrics at the checkpoint step (unavailable ones as tags, never numbers), against the
    export's MLflow model `model_id` when it has one (the model's page then lists them, and the
    model is the run's input); the reference as the run's evaluation input; the settings as
    params; `files` (the report, the grid; None skipped) as artefacts, and `grid` (the grid's
    PNG) as the image `eval_samples` at the step. The run ends FINISHED, or FAILED when logging fails."""
    from pipelines.core import tracking

    c = tracking.client(cfg.mlflow.resolved_uri())
    prefix = cfg.metric_prefix.rstrip("/") + "/" if cfg.metric_prefix else ""
    model_id = _known_model(c, model_id)
    try:
        nums = {f"{prefix}{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}
        tracking.log_metrics(c, run_id, nums, step, model_id=model_id)
        for k, v in results.items():
            if isinstance(v, str):
                c.set_tag(run_id, f"{prefix}{k}", v)
        tracking.log_new_params(c, run_id, params)
        _log_lineage(c, run_id, model_id, reference, cfg.reference.source)
        for path in files:
            if path is not None:
                c.log_artifact(run_id, str(path))
        if grid is not None:  # with a step slider in the UI
            from PIL import Image

            with Image.open(grid) as image:
                tracking.log_image(c, run_id, np.asarray(image.convert("RGB")), "eval_samples", step)
    except BaseException:
        c.set_terminated(run_id, status="FAILED")
        raise
    c.set_terminated(run_id, status="FINISHED")


def _known_model(c, model_id: str) -> str:
    """`model_id` when this store has that logged model (an export evaluated against another
    store than the one it was trained with has none here), else ""."""
    if not model_id:
        return ""
    try:
        c.get_logged_model(model_id)
        return model_id
    except Exception:  # noqa: BLE001 (MlflowException: not found)
        return ""


def _log_lineage(c, run_id: str, model_id: str, reference: dict | None, source: str) -> None:
    """The evaluated model and the reference as the run's inputs."""
    from pipelines.evaluate.reference import log_reference

    if model_id:
        from mlflow.entities import LoggedModelInput

        c.log_inputs(run_id, models=[LoggedModelInput(model_id)])
    if reference:
        log_reference(c, run_id, reference, source)


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
