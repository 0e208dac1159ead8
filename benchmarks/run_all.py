"""Run every benchmark in one go and write their tables to benchmarks/RESULTS.md.

    python benchmarks/run_all.py [--only model,encode] [--out benchmarks/RESULTS.md]

Each benchmark is its own script (run alone for details) that prints a Markdown table of figures
and ratios measured side by side in one run: KV cache vs recompute and generation images/s per
preset (bench_model), encode throughput with 1 vs 2 actors (bench_encode), training images/s with
1 vs 2 workers and cached latents vs on-the-fly encoding (bench_train), samples/s and features/s
with 1 vs 2 evaluation workers (bench_evaluate), training input memory at N vs 8N rows, loader
samples/s, an ImageNet projection and float16 moments (bench_data; resumable: its measurements
are kept under benchmarks/.bench_data/, pass --old there to measure the code before streaming).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "model": ["bench_model.py", "--presets", "tiny,small-cpu,S", "--batch", "4", "--steps", "10"],
    "encode": ["bench_encode.py"],
    "train": ["bench_train.py"],
    "evaluate": ["bench_evaluate.py"],
    "data": ["bench_data.py"],
}


def machine() -> str:
    import os

    import torch
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, Python "
            f"{platform.python_version()}, torch {torch.__version__}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    p.add_argument("--out", default=str(HERE / "RESULTS.md"))
    a = p.parse_args(argv)
    names = [n for n in (a.only.split(",") if a.only else BENCHMARKS) if n]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    sections = [f"# Benchmarks\n\nMeasured on {machine()}, {time.strftime('%Y-%m-%d')}.\n"]
    failed = 0
    for name in names:
        script, *args = BENCHMARKS[name]
        print(f"== {name}: {script} {' '.join(args)}", flush=True)
        start = time.time()
        proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True,
                              text=True, cwd=HERE.parent)
        took = time.time() - start
        # the tables and ratios; not Ray's log lines that worker processes print to stdout
        table = "\n".join(line for line in proc.stdout.splitlines()
                          if " INFO " not in line and not line.startswith(("(", "[")))
        if proc.returncode:
            failed += 1
            table = f"failed (exit {proc.returncode}):\n\n```\n{proc.stderr[-2000:]}\n```"
        sections.append(f"## {name} ({took:.0f} s)\n\n{table.strip()}\n")
        print(table, flush=True)
    Path(a.out).write_text("\n".join(sections))
    print(f"wrote {a.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
