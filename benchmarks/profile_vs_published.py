"""Where the time of a training step and of a generation goes, flowar and the published code side
by side, against the floor this machine's matmul speed sets (issue 19's "what limits it").

    python benchmarks/profile_vs_published.py --ref /path/to/FlowAR [--configs small,S]

For each configuration of bench_vs_published.py and each implementation, after a warm-up:
  * one call under torch.profiler, its self CPU time split into matmul kernels (mm, addmm,
    bmm, the fused attention kernels), dropout-mask drawing (bernoulli_, random_) and the rest
    (elementwise ops, copies, norms, the optimizer, dispatch);
  * its floating-point work, counted by torch's FlopCounterMode;
  * the floor: that work at the fp32 matmul speed measured here on a large, well-shaped GEMM.
The profiler's own overhead makes its total a little above the wall time of an unprofiled run;
the shares are what matter. Nothing is saved: it takes a few minutes per configuration.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_vs_published as bvp  # noqa: E402

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
          "aten::_scaled_dot_product_flash_attention_for_cpu",
          "aten::_scaled_dot_product_flash_attention_for_cpu_backward"}
MASKS = {"aten::bernoulli_", "aten::random_"}


def matmul_peak(seconds: float = 2.0) -> float:
    """fp32 GFLOP/s of a (2048 x 1024) @ (1024 x 1024) matmul, best of repeated calls."""
    a, b = torch.randn(2048, 1024), torch.randn(1024, 1024)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 2048 * 1024 * 1024 / best / 1e9


def split(fn) -> dict:
    """Seconds of self CPU time per group, and the total, for one call of fn."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    groups = {"matmul": 0.0, "masks": 0.0, "rest": 0.0}
    for event in prof.key_averages():
        group = "matmul" if event.key in MATMUL else "masks" if event.key in MASKS else "rest"
        groups[group] += event.self_cpu_time_total / 1e6
    return {**groups, "total": sum(groups.values())}


def gflop(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def profile_config(published, name: str, peak: float) -> list[str]:
    models = dict(zip(("published", "flowar"), bvp.build(published, name)[:2]))
    rows = []
    for what in ("train", "generate"):
        for impl, model in models.items():
            fn = bvp.timed_call(name, what, impl, model)
            fn()  # warm-up
            s, work = split(fn), gflop(fn)
            floor = work / peak
            rows.append(f"| {name} | {what} | {impl} | {s['total']:.2f} | {s['matmul']:.2f} "
                        f"({s['matmul'] / s['total']:.0%}) | {s['masks']:.2f} | {s['rest']:.2f} | "
                        f"{work:.0f} | {floor:.2f} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="a checkout of the published FlowAR code")
    p.add_argument("--configs", default="small,S", help=f"of {', '.join(bvp.CONFIGS)}")
    a = p.parse_args(argv)
    names = a.configs.split(",")
    unknown = [n for n in names if n not in bvp.CONFIGS]
    if unknown:
        p.error(f"--configs: unknown {unknown}; known: {', '.join(bvp.CONFIGS)}")
    published = bvp.import_published(Path(a.ref).resolve())
    peak = matmul_peak()
    lines = [f"fp32 matmul speed here: {peak:.0f} GFLOP/s ({torch.get_num_threads()} threads)", "",
             "| config | what | implementation | profiled (s) | matmul kernels (s) | dropout masks (s) "
             "| the rest (s) | GFLOP | floor at that speed (s) |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in names:
        lines += profile_config(published, name, peak)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
