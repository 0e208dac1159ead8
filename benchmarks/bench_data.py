"""Training input (issue 15): memory in dataset size, loader throughput, an ImageNet projection, float16.

    python benchmarks/bench_data.py [--only memory,loader,projection,float16] [--old /path/to/old/checkout]
                                    [--real ./flowar-runs/latents-fashion-mnist] [--out benchmarks/.bench_data]

1. memory: `flowar train` (configs/quickstart.yaml, 2 workers, a few steps) on synthetic latent
   datasets of N and 8N rows written with the encode job's own writer. A thread in the driver
   samples every 0.2 s the RSS of Ray's training workers (cmdline "RayTrainWorker") and of all Ray
   processes (the driver's descendants, so other Ray clusters on the machine do not count), and
   the object store's used bytes (the raylet's FormatGlobalMemoryInfo reply, what `ray memory
   --stats-only` prints). `--old` runs the same on another checkout (the code before streaming).
2. loader: samples/s of one BatchSource (pipelines/train/data.py) for 16x16x16 latents with flips
   and fresh posterior samples, one torch thread, the process pinned to one core; also per
   CPU-second (every thread of the process), which a loaded machine does not distort.
3. projection: ImageNet-256/512 bytes on disk, bytes read and peak memory per worker, before vs
   after, computed (the "before" slope is item 1's, else the issue's 1.5 bytes per byte).
4. float16: a float16 copy of a real quickstart latent dataset: bytes, moment errors, and the loss
   of 100 quickstart steps on each (and on float32 with another seed, for scale).

Each measurement runs in its own process, one at a time, and writes <out>/<name>.json; one whose
JSON exists is skipped, so a killed run continues where it stopped. The tables are printed from
those files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from measure import MB, Sampler, child, load, measured

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CONFIG = "configs/quickstart.yaml"


# ------------------------------------------------------------------ results and datasets

def synth_dataset(path: Path, rows: int, side: int, channels: int, dtype=np.float32,
                  part_rows: int = 2000) -> Path:
    """A finished latent dataset with flips, written part by part with the encode job's writer
    (pipelines/data/latents.py): per-class means plus noise, as tests/test_train.py make_dataset,
    so the quickstart model has something to learn."""
    from pipelines.data.latents import LatentDataset, LatentDatasetMeta

    if (path / "metadata.json").exists():
        return path
    shutil.rmtree(path, ignore_errors=True)  # a killed write: start over
    (path / "rejects").mkdir(parents=True)
    meta = LatentDatasetMeta(vae={"id": "none/bench-vae", "scaling_factor": 1.0, "shift_factor": 0.0},
                             resolution=side * 8, latent_size=side, latent_channels=channels,
                             scales=[side], num_classes=10, flip=True, dtype=np.dtype(dtype).name)
    patterns = np.random.default_rng(0).normal(size=(10, channels, side, side)).astype(np.float32)
    dataset = LatentDataset(str(path))
    for shard, a in enumerate(range(0, rows, part_rows)):
        b = min(rows, a + part_rows)
        rng = np.random.default_rng(shard + 1)
        labels = np.arange(a, b) % 10
        mean = patterns[labels] + 0.1 * rng.normal(size=(b - a, channels, side, side))
        mean = mean.astype(dtype)
        # stds that vary like a VAE's (a constant column would compress to nothing on disk)
        std = (0.05 * np.exp(0.2 * rng.normal(size=mean.shape))).astype(dtype)
        cols = {"key": [f"img{i:07d}" for i in range(a, b)], "label": labels.astype(np.int64),
                "mean": mean, "std": std, "mean_flip": mean[..., ::-1].copy(),
                "std_flip": std[..., ::-1].copy()}
        dataset.write_part(shard, a, b, cols, [], meta)
    dataset.finalise(meta)
    return path


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("part-*.parquet"))


# ------------------------------------------------------------------ inside a child: training

def train_child(spec: dict) -> dict:
    import ray  # noqa: F401 - puts Ray's psutil on sys.path for the sampler

    import pipelines
    from pipelines.train.config import load_train_config
    from pipelines.train.job import run_train

    sampler = Sampler()
    sampler.start()
    t0 = time.time()
    run_train(load_train_config(spec["config"], spec["overrides"]), spec["config"], progress=False)
    sampler.stop.set()
    sampler.join()
    uri = next(o.split("=", 1)[1] for o in spec["overrides"] if o.startswith("mlflow.tracking_uri="))
    return {"wall_s": time.time() - t0, "code": str(Path(pipelines.__file__).parent.parent),
            "worker_peak_rss_mb": sorted(v / MB for v in sampler.workers.values()),
            "ray_peak_rss_mb": sampler.peak_ray / MB, "driver_peak_rss_mb": sampler.peak_driver / MB,
            "store_peak_bytes": sampler.peak_store, "store_error": sampler.store_error,
            "samples": sampler.samples, "metrics": metric_history(uri)}


def metric_history(uri: str) -> dict:
    """{metric: [[step, value], ...]} of the single run in the store (loss, worker_peak_rss_mb)."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    out = {}
    for name in ("loss", "worker_peak_rss_mb", "data_wait_fraction"):
        hist = c.get_metric_history(runs[0].info.run_id, name) if runs else []
        out[name] = sorted([m.step, m.value] for m in hist)
    return out


def run_training(out: Path, name: str, data: Path, code: Path, extra: list[str]) -> dict:
    """One `flowar train` of the quickstart config in a fresh MLflow store and Ray storage (a
    stale one would resume), with the code of checkout `code`."""
    tmp = out / "runs" / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    overrides = [f"data.path={data}", f"mlflow.tracking_uri=sqlite:///{tmp}/mlflow.db",
                 f"ray.storage_path={tmp}/ray", "train.num_workers=2", "train.sample_every=0", *extra]
    result = child(__file__, {"kind": "train", "config": CONFIG, "overrides": overrides,
                              "result": str(tmp / "result.json")}, cwd=code, pythonpath=code)
    shutil.rmtree(tmp / "ray", ignore_errors=True)  # checkpoints: not needed, not small
    return result


# ------------------------------------------------------------------ inside a child: the loader

def loader_child(spec: dict) -> dict:
    """samples/s of BatchSource.batch (built as tests/test_stream.py source()), one core: the
    best and the median of `rounds` timed runs of `steps` steps (other load only slows one down)."""
    import torch

    from pipelines.data.latents import LatentDataset
    from pipelines.train.data import BatchSource, latent_columns, open_reader

    torch.set_num_threads(1)
    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})  # reader and Arrow threads too: one core
    dataset = LatentDataset(spec["path"])
    reader = open_reader(spec["path"], dataset.units(), latent_columns(True), seed=1,
                         partitions=2, window=spec["window"])
    src = BatchSource(reader, dataset.meta, seed=1, rank=0, world=2, global_batch=2 * spec["batch"],
                      accum=1, flip=True)
    first, rounds = spec["warmup"], []
    for step in range(first):
        src.batch(step, 0)
    for _ in range(spec["rounds"]):
        wait0, t0, c0 = reader.stats.wait_s, time.perf_counter(), time.process_time()
        for step in range(first, first + spec["steps"]):
            src.batch(step, 0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        first += spec["steps"]
        samples = spec["batch"] * spec["steps"]
        rounds.append((samples / cpu, samples / wall, (reader.stats.wait_s - wait0) / wall))
    best = max(rounds)
    result = {"samples_per_cpu_s": best[0], "samples_per_s": best[1], "wait_fraction": best[2],
              "median_samples_per_cpu_s": float(np.median([r[0] for r in rounds])), "rounds": rounds,
              "epochs": spec["steps"] / src.steps_per_epoch, "steps_per_epoch": src.steps_per_epoch}
    if best[0] < spec["target"]:
        result["profile"] = profiles(src, first)
    reader.close()
    return result


def profiles(src, step: int) -> dict:
    """Where the CPU time goes: the main thread's batch() (its own CPU time: the read-ahead runs
    beside it) and one window read (the process's CPU time: Arrow decodes on its own threads)."""
    import cProfile
    import io
    import pstats

    def batches():
        for s in range(step, step + 50):
            src.batch(s, 0)
    out = {}
    for what, call, timer in (("batch() x 50, main thread", batches, time.thread_time),
                              ("one window read (the read-ahead's work)",
                               lambda: src.reader._load(99, 0, 0), time.process_time)):
        for future in list(src.reader._windows.values()):
            future.result()  # no read-ahead in flight while a window read is profiled
        prof = cProfile.Profile(timer)
        prof.runcall(call)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
        out[what] = text.getvalue()
    return out


# ------------------------------------------------------------------ the four items

def memory(out: Path, rows: int, factor: int, steps: int, old: Path | None) -> None:
    extra = [f"train.max_steps={steps}", f"train.checkpoint_every={steps}", "train.log_every=10"]
    for n in (rows, rows * factor):
        data = synth_dataset(out / "datasets" / f"q4x8x8-{n}", n, side=8, channels=4)
        for code, root in (("new", ROOT), ("old", old)):
            if root is None:
                continue

            def measure():
                r = run_training(out, f"memory-{code}-{n}", data, root, extra)
                return {**r, "rows": n, "disk_bytes": disk_bytes(data)}
            measured(out, f"memory-{code}-{n}", measure)


def loader(out: Path, rows: int, batch: int, steps: int, target: float) -> None:
    for dtype in (np.float32, np.float16):
        name = f"loader-16x16x16-{np.dtype(dtype).name}"

        def measure():
            data = synth_dataset(out / "datasets" / name, rows, side=16, channels=16, dtype=dtype)
            spec = {"kind": "loader", "path": str(data), "window": 8192, "batch": batch, "warmup": 10,
                    "steps": steps, "rounds": 3, "target": target,
                    "result": str(out / "loader.tmp.json")}
            return {**child(__file__, spec, ROOT, ROOT), "rows": rows, "batch": batch,
                    "disk_bytes": disk_bytes(data)}
        measured(out, name, measure)


def float16(out: Path, real: Path | None, steps: int) -> None:
    if real is None or not (real / "metadata.json").exists():
        return
    copy = out / "datasets" / f"{real.name}-float16"
    measured(out, "float16-copy", lambda: float16_copy(real, copy))
    extra = [f"train.max_steps={steps}", f"train.checkpoint_every={steps}", "train.log_every=5"]
    for name, data, more in (("float32", real, []), ("float16", copy, []),
                             ("float32-seed1", real, ["train.seed=1"])):
        measured(out, f"float16-train-{name}", lambda: run_training(out, f"fp16-{name}", data,
                                                                    ROOT, extra + more))


def float16_copy(src: Path, dst: Path) -> dict:
    """Write src's parts again with float16 moments (metadata dtype float16); the moments' errors."""
    import pyarrow.parquet as pq

    from pipelines.data.latents import PART_RE, LatentDataset

    shutil.rmtree(dst, ignore_errors=True)
    (dst / "rejects").mkdir(parents=True)
    source, target = LatentDataset(str(src)), LatentDataset(str(dst))
    meta = source.meta
    meta.dtype = "float16"
    err: dict[str, list] = {}
    for path in source.part_files():
        shard, a, b = map(int, PART_RE.search(path).groups())
        table = pq.read_table(path)
        cols = {}
        for name in table.column_names:
            col = table[name].combine_chunks()
            if hasattr(col, "to_numpy_ndarray"):  # a moment tensor column
                x = col.to_numpy_ndarray()
                y = x.astype(np.float16)
                rel = np.abs(y.astype(np.float32) - x) / np.maximum(np.abs(x), 1e-6)
                err.setdefault(name, []).append((rel.max(), rel.sum(), rel.size,
                                                 np.abs(y.astype(np.float32) - x).max()))
                cols[name] = y
            else:
                cols[name] = col.to_pylist() if name == "key" else col.to_numpy()
        target.write_part(shard, a, b, cols, [], meta)
    target.finalise(meta)
    return {"rows": meta.count, "bytes_float32": disk_bytes(src), "bytes_float16": disk_bytes(dst),
            "columns": {k: {"max_rel": float(max(e[0] for e in v)),
                            "mean_rel": float(sum(e[1] for e in v) / sum(e[2] for e in v)),
                            "max_abs": float(max(e[3] for e in v))} for k, v in err.items()}}


def projection(old_slope: float | None, window: int = 8192, unit_rows: int = 512) -> list[str]:
    """ImageNet-256/512 through KL-16 with flips: what each worker reads and holds, before/after."""
    slope = old_slope if old_slope else 1.5
    gib = 2**30
    lines = ["| dataset | moments | on disk (GiB) | workers | read per worker per epoch, before "
             "(GiB) | after (GiB) | data memory per worker, before (GiB) | after (GiB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, side in (("ImageNet-256 (16x16x16)", 16), ("ImageNet-512 (32x32x16)", 32)):
        for dtype, size in (("float32", 4), ("float16", 2)):
            row = 4 * 16 * side * side * size + 24  # mean, std and their flips; key and label
            disk = 1_281_167 * row
            for workers in (8, 64):
                after_read = (1_281_167 // workers + 2 * unit_rows) * row  # + the 2 edge row groups
                after_mem = (2 * window + 3 * unit_rows) * row  # 2 windows + row groups in flight
                lines.append(f"| {name} | {dtype} | {disk / gib:.1f} | {workers} | {disk / gib:.1f} "
                             f"| {after_read / gib:.2f} | {slope * disk / gib:.0f} | {after_mem / gib:.2f} |")
    lines.append(f"\nBefore: every worker read the whole dataset and held about {slope:.2f} bytes of "
                 f"RSS per byte of it ({'item 1' if old_slope else 'the issue'}'s slope, at 2 workers). "
                 f"After: 1/workers of the rows plus the two row groups ({unit_rows} rows) cut by its "
                 f"partition's edges; memory two windows of data.shuffle_buffer={window} rows plus "
                 "about three row groups being read. Both exclude the process's base (item 1) and the "
                 "model, whose weights and optimizer state sit on the GPU.")
    return lines


# ------------------------------------------------------------------ tables

def memory_table(out: Path, rows: int, factor: int) -> tuple[list[str], float | None]:
    lines = ["| code | rows | Parquet (MB) | peak RSS per worker (MB) | peak RSS, all Ray processes "
             "(MB) | driver peak RSS (MB) | peak object store (MB) | seconds |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    ratios, slope = [], None
    for code in ("new", "old"):
        got = [load(out, f"memory-{code}-{n}") for n in (rows, rows * factor)]
        for n, r in zip((rows, rows * factor), got):
            if r is None:
                lines.append(f"| {code} | {n:,} | | not measured | | | | |")
                continue
            peaks = sorted(r["worker_peak_rss_mb"], reverse=True)
            lines.append(f"| {code} | {n:,} | {r['disk_bytes'] / MB:,.0f} | {peaks[0]:,.0f} "
                         f"({' / '.join(f'{v:,.0f}' for v in peaks)}) | {r['ray_peak_rss_mb']:,.0f} | "
                         f"{r['driver_peak_rss_mb']:,.0f} | {r['store_peak_bytes'] / MB:,.2f} | "
                         f"{r['wall_s']:.0f} |")
        if all(got):
            a, b = (max(r["worker_peak_rss_mb"]) for r in got)
            ray_a, ray_b = (r["ray_peak_rss_mb"] for r in got)
            ratios.append(f"{code} code: per worker {b / a:.3f}x ({b - a:+,.0f} MB), all Ray "
                          f"processes {ray_b / ray_a:.2f}x ({ray_b - ray_a:+,.0f} MB)")
            if code == "old":
                slope = (b - a) * MB / (got[1]["disk_bytes"] - got[0]["disk_bytes"])
    lines += ["", f"Ratio {rows * factor:,} / {rows:,} rows (target for the new code: at most "
              "1.10x per worker): " + ("; ".join(ratios) or "not measured") + "."]
    if slope:
        lines.append(f"The old code: {slope:.2f} bytes of worker RSS per byte of Parquet.")
    lines.append("\nPer worker: the largest peak of the processes whose cmdline names "
                 "RayTrainWorker (all of them in brackets); all Ray processes: the sum of the RSS "
                 "of the driver's descendants (shared pages counted in each); object store: the "
                 "raylet's object_store_bytes_used (what `ray memory --stats-only` prints).")
    return lines, slope


def loader_table(out: Path, target: float) -> list[str]:
    lines = ["| moments | rows | batch | samples per CPU-second, best (median) of 3 | samples/s "
             "(wall, one core) | waiting for a window (of wall) | epochs per round |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    profiles = []
    for dtype in ("float32", "float16"):
        r = load(out, f"loader-16x16x16-{dtype}")
        if r is None:
            lines.append(f"| {dtype} | | | not measured | | | |")
            continue
        lines.append(f"| {dtype} | {r['rows']:,} | {r['batch']} | {r['samples_per_cpu_s']:,.0f} "
                     f"({r['median_samples_per_cpu_s']:,.0f}) | "
                     f"{r['samples_per_s']:,.0f} | {r['wait_fraction']:.0%} | {r['epochs']:.1f} |")
        for what, text in r.get("profile", {}).items():
            rows = text.strip().splitlines()  # the total, then the table from its header
            body = "\n".join(rows[:1] + rows[next(i for i, r in enumerate(rows) if "ncalls" in r):])
            body = re.sub(r"\S*site-packages/|" + re.escape(f"{ROOT}/"), "", body)
            profiles += [f"\n{dtype}, {what} (cProfile, CPU seconds):\n", "```", body, "```"]
    lines.append(f"\nTarget: at least {target:,.0f} samples/s on one core. Samples per CPU-second "
                 "count every thread of the process (the read-ahead too), so other load on the "
                 "machine does not lower them; the wall figure does.")
    return lines + profiles


def float16_tables(out: Path, steps: int) -> list[str]:
    copy = load(out, "float16-copy")
    if copy is None:
        return ["Not measured: no real quickstart latent dataset (give --real)."]
    lines = [f"{copy['rows']:,} rows; Parquet {copy['bytes_float32'] / MB:.2f} MB float32, "
             f"{copy['bytes_float16'] / MB:.2f} MB float16 ({copy['bytes_float16'] / copy['bytes_float32']:.2f}x).\n",
             "| column | max relative error | mean relative error | max absolute error |",
             "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['max_rel']:.2e} | {v['mean_rel']:.2e} | {v['max_abs']:.2e} |"
              for k, v in copy["columns"].items()]
    runs = {n: load(out, f"float16-train-{n}") for n in ("float32", "float16", "float32-seed1")}
    curves = {n: dict(map(tuple, r["metrics"]["loss"])) for n, r in runs.items() if r}
    if not curves:
        return lines
    names = list(curves)
    lines += ["", "| step | " + " | ".join(f"loss, {n}" for n in names) + " |",
              "|---:|" + "---:|" * len(names)]
    for step in sorted(set().union(*curves.values())):
        lines.append(f"| {step:.0f} | " + " | ".join(f"{curves[n].get(step, float('nan')):.4f}"
                                                    for n in names) + " |")
    last = {n: np.mean([v for s, v in c.items() if s > steps - 20]) for n, c in curves.items()}
    lines.append("\nMean loss of the last 20 steps: " +
                 ", ".join(f"{n} {v:.4f}" for n, v in last.items()) + ".")
    return lines


# ------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="memory,loader,projection,float16")
    p.add_argument("--out", default=str(HERE / ".bench_data"), help="results (JSON) and datasets")
    p.add_argument("--rows", type=int, default=20_000, help="the smaller dataset of item 1")
    p.add_argument("--factor", type=int, default=8)
    p.add_argument("--steps", type=int, default=30, help="training steps per memory measurement")
    p.add_argument("--old", default="", help="a checkout of the code before streaming (231cbfc)")
    p.add_argument("--loader-rows", type=int, default=8000)
    p.add_argument("--loader-batch", type=int, default=64)
    p.add_argument("--loader-steps", type=int, default=300)
    p.add_argument("--real", default=str(ROOT / "flowar-runs" / "latents-fashion-mnist"))
    p.add_argument("--fp16-steps", type=int, default=100)
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        spec = json.loads(a.child)
        result = (train_child if spec["kind"] == "train" else loader_child)(spec)
        Path(spec["result"]).write_text(json.dumps(result))
        return 0
    if a.old and not (Path(a.old) / "pipelines").is_dir():
        p.error(f"--old {a.old}: not a flowar checkout")
    out, only, target = Path(a.out).resolve(), a.only.split(","), 5000.0
    out.mkdir(parents=True, exist_ok=True)
    if "memory" in only:
        memory(out, a.rows, a.factor, a.steps, Path(a.old).resolve() if a.old else None)
    if "loader" in only:
        loader(out, a.loader_rows, a.loader_batch, a.loader_steps, target)
    if "float16" in only:
        float16(out, Path(a.real).resolve() if a.real else None, a.fp16_steps)
    mem_lines, slope = memory_table(out, a.rows, a.factor)
    sections = {"memory": ("Memory in dataset size (configs/quickstart.yaml, 2 workers, "
                           f"{a.steps} steps, 4x8x8 latents with flips)", mem_lines),
                "loader": ("Loader alone (one BatchSource, 16x16x16 latents, flips, fresh posterior "
                           "samples)", loader_table(out, target)),
                "projection": ("Projection: ImageNet through KL-16, with flips", projection(slope)),
                "float16": (f"Float16 moments (real quickstart latents, {a.fp16_steps} steps)",
                            float16_tables(out, a.fp16_steps))}
    for name in only:
        title, lines = sections[name]
        print(f"### {title}\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
