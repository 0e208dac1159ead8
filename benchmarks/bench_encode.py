"""Encode throughput of `flowar encode` with 1 and 2 encoder actors, side by side, with a VAE of
real cost; and (--listing) what listing a WebDataset source reads and holds on the driver.

Throughput: a folder of JPEGs (two classes, 1.25x the target side, so decoding crops and
resizes) through the KL-16 architecture (flowar.vae.KL16_CONFIG: MAR's VAE, 66M parameters,
random weights: speed does not depend on them) at 256 px, or `--vae quickstart` (the tiny VAE
of configs/vae-fashion-mnist.yaml) on Fashion-MNIST at 32 px. Each measurement is its own
`run_encode` on a fresh local Ray runtime; it reports
  - images/s over the whole pipeline (the encode job's own figure: actor start-up included),
  - steady images/s: the images of the parts finished after every actor had written its first,
    over the time from that moment to the last part (start-up and the first batch left out),
  - Ray Data's per-stage timing (`ds.stats()`), kept in the JSON,
and the 1-minute load average (`/proc/loadavg`) before and after it: other processes on the
machine take cores too. Before each measurement the script waits (up to --wait seconds) for the
load to drop below --max-load.

Listing (--listing): 32 tars of 100 PNG + .cls members, listed serially (one tar at a time, as
before) and with sources.LIST_THREADS threads, on local disk and through a filesystem that adds
--latency-ms to every read (an object store's request latency); bytes read, read calls, seconds,
and the driver's memory per listed image (tracemalloc).

Resumable: every measurement is kept as JSON under --out (default benchmarks/.bench_data/encode,
ignored by git) and skipped when it is there; --fresh measures again.

    .venv/bin/python benchmarks/bench_encode.py [--vae kl16|quickstart] [--images 64]
        [--actors 1 2] [--repeats 1] [--max-load 1.0] [--fresh] [--listing]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load1() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def wait_for_load(max_load: float, wait_s: float) -> float:
    """Sleep until the 1-minute load is below max_load, or wait_s has passed; returns the load."""
    deadline = time.time() + wait_s
    while load1() >= max_load and time.time() < deadline:
        print(f"  load {load1():.2f} >= {max_load}: waiting", file=sys.stderr, flush=True)
        time.sleep(15)
    return load1()


# ------------------------------------------------------------------------------------------------
# Inputs (kept under --out, made once)
# ------------------------------------------------------------------------------------------------

def make_vae(out: Path, kind: str) -> str:
    import torch
    from diffusers import AutoencoderKL

    from flowar.vae import KL16_CONFIG, _diffusers_kwargs
    path = out / f"vae-{kind}"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        kwargs = (_diffusers_kwargs(KL16_CONFIG, decoder_up_attention=False) if kind == "kl16" else
                  dict(down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                       block_out_channels=[32, 64, 64], layers_per_block=1, latent_channels=4))
        AutoencoderKL(**kwargs).save_pretrained(path)
    return str(path)


def make_images(out: Path, count: int, side: int) -> str:
    """`count` JPEGs of smooth random colour fields, (1.25 side) x (1.1 side), two classes."""
    import numpy as np
    from PIL import Image
    path = out / f"images-{side}-{count}"
    if not (path / ".done").exists():
        rng = np.random.default_rng(0)
        h, w = int(side * 1.1), int(side * 1.25)
        for i in range(count):
            (path / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((w, h), Image.BICUBIC).save(path / f"c{i % 2}" / f"{i:05d}.jpg", quality=90)
        (path / ".done").write_text("")
    return str(path)


# ------------------------------------------------------------------------------------------------
# Throughput
# ------------------------------------------------------------------------------------------------

def steady_rate(output: str, actors: int) -> float | None:
    """Images/s of the parts finished after every actor had written one (parts' mtimes)."""
    from pipelines.data.latents import LatentDataset
    parts = sorted((os.stat(p).st_mtime, end - start)
                   for ranges in LatentDataset(output).parts().values() for start, end, p in ranges)
    if len(parts) <= actors:
        return None
    t0 = parts[actors - 1][0]
    return sum(n for _, n in parts[actors:]) / max(parts[-1][0] - t0, 1e-9)


def measure(a, vae: str, source: list[str], actors: int, output: Path) -> dict:
    import shutil

    import ray

    from pipelines.core.config import load_config
    from pipelines.encode import EncodeConfig, run_encode
    shutil.rmtree(output, ignore_errors=True)
    before = wait_for_load(a.max_load, a.wait)
    ray.init(num_cpus=max(os.cpu_count() or 1, actors + 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE.parent), "HF_HUB_OFFLINE": "1"}})
    try:
        cfg = load_config(EncodeConfig, None, [
            f"vae.spec={vae}", f"output={output}", *source, f"encode.resolution={a.resolution}",
            f"encode.shard_size={a.shard_size}", f"encode.batch_size={a.batch_size}",
            f"encode.flip={str(a.flip).lower()}", f"encode.actors={actors}", "encode.actor_cpus=1"])
        summary = run_encode(cfg)
    finally:
        ray.shutdown()
    summary.update(actors=actors, steady_images_per_s=steady_rate(str(output), actors),
                   load1_before=before, load1_after=load1(), when=time.strftime("%Y-%m-%d %H:%M:%S"))
    shutil.rmtree(output, ignore_errors=True)
    return summary


def throughput(a, out: Path) -> None:
    if a.vae == "kl16":
        vae, what = make_vae(out, "kl16"), f"KL-16 architecture (random weights) at {a.resolution} px"
        source = ["source.kind=folder", f"source.path={make_images(out, a.images, a.resolution)}"]
    else:
        vae, what = make_vae(out, "quickstart"), f"quickstart VAE on Fashion-MNIST at {a.resolution} px"
        source = ["source.kind=fashion-mnist", f"source.limit={a.images}"]
    results = {}
    for rep in range(a.repeats):
        for n in (a.actors if rep % 2 == 0 else a.actors[::-1]):  # alternate: load drifts
            name = f"{a.vae}-{a.resolution}px-{a.images}img-b{a.batch_size}-s{a.shard_size}-flip{int(a.flip)}-a{n}-r{rep}"
            path = out / f"{name}.json"
            if a.fresh or not path.exists():
                print(f"== {name}", file=sys.stderr, flush=True)
                path.write_text(json.dumps(measure(a, vae, source, n, out / "tmp-output"), indent=1))
            results[(rep, n)] = json.loads(path.read_text())
    print(f"\nencode throughput: {a.images} images, {what}, flip {'on' if a.flip else 'off'}, "
          f"batch {a.batch_size}, shards of {a.shard_size}, {os.cpu_count()} cores, CPU only\n")
    print("| repeat | actors | seconds | images/s | steady images/s | load before / after |")
    print("|---|---:|---:|---:|---:|---|")
    for (rep, n), s in sorted(results.items()):
        steady = f"{s['steady_images_per_s']:.3f}" if s["steady_images_per_s"] else "-"
        print(f"| {rep} | {n} | {s['seconds']:.1f} | {s['images_per_s']:.3f} | {steady} | "
              f"{s['load1_before']:.2f} / {s['load1_after']:.2f} |")
    if len(a.actors) >= 2:
        lo, hi = a.actors[0], a.actors[1]
        for rep in range(a.repeats):
            x, y = results[(rep, lo)], results[(rep, hi)]
            steady = (f"{y['steady_images_per_s'] / x['steady_images_per_s']:.2f}x"
                      if x["steady_images_per_s"] and y["steady_images_per_s"] else "-")
            print(f"\nrepeat {rep}: {hi} / {lo} actors: {y['images_per_s'] / x['images_per_s']:.2f}x "
                  f"whole pipeline, {steady} steady")
        print("\nRay Data stages, last run with", hi, "actors:\n")
        print("\n".join(line for line in results[(a.repeats - 1, hi)]["ray_data_stats"].splitlines()
                        if line.startswith(("Operator", "* Remote wall", "* Remote cpu", "* Output num rows",
                                             "* Total time overall", "* Operator throughput"))
                        or "Ray Data throughput" in line or "iterator" in line.lower()))

# ------------------------------------------------------------------------------------------------
# WebDataset listing
# ------------------------------------------------------------------------------------------------

STATS = {"bytes": 0, "calls": 0, "latency": 0.0}


def counting_fs():
    """Register benchfs://: the local filesystem, counting bytes and read calls, each read
    delayed by STATS["latency"] seconds (a sleep: it waits like a network request, GIL free)."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    class Counted:
        def __init__(self, f):
            self._f = f

        def read(self, *args):
            time.sleep(STATS["latency"])
            data = self._f.read(*args)
            STATS["bytes"] += len(data)
            STATS["calls"] += 1
            return data

        def __getattr__(self, name):
            return getattr(self._f, name)

    class BenchFS(LocalFileSystem):
        protocol = ("benchfs",)

        def _open(self, path, mode="rb", **kwargs):
            return Counted(super()._open(path, mode, **kwargs))

    fsspec.register_implementation("benchfs", BenchFS, clobber=True)


def make_tars(out: Path, tars: int, members: int) -> Path:
    import io
    import tarfile

    import numpy as np
    from PIL import Image
    path = out / f"wds-{tars}x{members}"
    if not (path / ".done").exists():
        path.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(0)
        for t in range(tars):
            with tarfile.open(path / f"{t:05d}.tar", "w") as tar:
                for i in range(members):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
                    for ext, data in (("png", buf.getvalue()), ("cls", str(i % 10).encode())):
                        info = tarfile.TarInfo(f"{t:05d}-{i:05d}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
        (path / ".done").write_text("")
    return path


def listing(a, out: Path) -> None:
    import tracemalloc

    from pipelines.data import sources
    counting_fs()
    root = make_tars(out, 32, 100)
    size = sum(p.stat().st_size for p in root.glob("*.tar"))
    rows = []
    for latency in (0.0, a.latency_ms / 1000):
        for threads in (1, sources.LIST_THREADS):
            STATS.update(bytes=0, calls=0, latency=latency)
            sources.LIST_THREADS, saved = threads, sources.LIST_THREADS
            start = time.time()
            items, _ = sources.list_items(sources.SourceConfig(kind="webdataset", path=f"benchfs://{root}"))
            rows.append((latency * 1000, threads, len(items), time.time() - start, STATS["bytes"], STATS["calls"]))
            sources.LIST_THREADS = saved
    tracemalloc.start()
    items, _ = sources.list_items(sources.SourceConfig(kind="webdataset", path=str(root)))
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"\nWebDataset listing: 32 tars x 100 (PNG + .cls) members, {size / 2**20:.1f} MiB, "
          f"load {load1():.2f}\n")
    print("| read latency (ms) | threads | images | seconds | bytes read | read calls |")
    print("|---:|---:|---:|---:|---:|---:|")
    for lat, threads, n, secs, nbytes, calls in rows:
        print(f"| {lat:.0f} | {threads} | {n} | {secs:.2f} | {nbytes:,} ({nbytes / size:.1%}) | {calls:,} |")
    print(f"\ndriver memory held by the listing: {held / len(items):.0f} bytes per image "
          f"(1.28M images: {held / len(items) * 1.28e6 / 2**30:.2f} GiB)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", choices=["kl16", "quickstart"], default="kl16")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--resolution", type=int, default=0, help="default: 256 (kl16), 32 (quickstart)")
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--shard-size", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--flip", action="store_true", help="also encode the flipped image (MAR does)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--max-load", type=float, default=1.0)
    p.add_argument("--wait", type=float, default=600, help="seconds to wait for --max-load")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--listing", action="store_true", help="measure WebDataset listing instead")
    p.add_argument("--latency-ms", type=float, default=5.0)
    p.add_argument("--out", default=str(HERE / ".bench_data" / "encode"))
    a = p.parse_args()
    a.resolution = a.resolution or (256 if a.vae == "kl16" else 32)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.listing:
        listing(a, out)
    else:
        throughput(a, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
