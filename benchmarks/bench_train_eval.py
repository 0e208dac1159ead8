"""What in-training evaluation (train.eval_every) adds to the wall time of the quickstart's training.

    .venv/bin/python benchmarks/bench_train_eval.py [--latents ./flowar-runs/latents-fashion-mnist]
                                                    [--repeats 2] [--out benchmarks/.bench_train_eval]

Runs `flowar train configs/quickstart.yaml data.path=LATENTS` as a user types it (800 steps, 2 CPU
workers), with the evaluation the file configures (100 samples at steps 400 and 800: FID, KID)
and with train.eval_every=0, alternating the two (the machine's load drifts), each in a fresh
process under its own run name. Before the first run the reference statistics are computed once
(a 1-step run that evaluates), as they are once per dataset and reference source: the one-time
cost is printed apart. Each finished run is kept as <out>/<mode>-<repeat>.json, so a killed run
resumes; the table shows every run's wall time, the evaluation's own seconds (eval/seconds from
MLflow) and the median ratio on/off. The issue's bound: at most 1.20x.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from measure import measured  # noqa: E402

CONFIG = ROOT / "configs" / "quickstart.yaml"


def train(out: Path, latents: str, name: str, extra: list[str]) -> dict:
    """One `flowar train` in a fresh process; its wall time and what it logged."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{out / 'mlflow.db'}"
    argv = [str(ROOT / ".venv" / "bin" / "flowar"), "train", str(CONFIG), f"data.path={latents}",
            f"mlflow.run_name={name}", f"mlflow.tracking_uri={uri}",
            f"ray.storage_path={out / 'ray_results'}", "train.sample_every=0", *extra]
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    c = MlflowClient(uri)
    run = c.search_runs([c.get_experiment_by_name("flowar-quickstart").experiment_id],
                        f"tags.`mlflow.runName` = '{name}'")[0]

    def history(key):
        return {m.step: m.value for m in c.get_metric_history(run.info.run_id, key)}

    return {"wall_seconds": wall, "eval_seconds": sum(history("eval/seconds").values()),
            "reference_seconds": sum(history("eval/reference_seconds").values()),
            "fid": history("eval/fid"), "steps": run.data.metrics.get("total_steps")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", default=str(ROOT / "flowar-runs" / "latents-fashion-mnist"))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(HERE / ".bench_train_eval"))
    p.add_argument("--eval-samples", type=int, default=0, help="override train.eval_samples (0: the file's)")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    warm = measured(out, "reference", lambda: train(out, args.latents, "warm-reference",
                                                     ["train.max_steps=1", "train.eval_samples=2"]))
    rows = {}
    for rep in range(args.repeats):
        modes = ("off", "on") if rep % 2 == 0 else ("on", "off")
        for mode in modes:
            extra = (["train.eval_every=0"] if mode == "off" else
                     [f"train.eval_samples={args.eval_samples}"] if args.eval_samples else [])
            rows[mode, rep] = measured(out, f"{mode}-{rep}", lambda: train(
                out, args.latents, f"bench-{mode}-{rep}", extra))
    print(f"reference statistics, once per dataset and source: {warm['reference_seconds']:.0f} s "
          "(computed by the 2 training workers)\n")
    print("| run | eval | wall s | evaluation s | FID at steps |")
    print("|---|---|---:|---:|---|")
    for (mode, rep), r in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        fids = ", ".join(f"{s}: {v:.1f}" for s, v in sorted(r["fid"].items())) or "-"
        print(f"| {rep} | {mode} | {r['wall_seconds']:.0f} | {r['eval_seconds']:.0f} | {fids} |")
    ratios = [rows["on", k]["wall_seconds"] / rows["off", k]["wall_seconds"] for k in range(args.repeats)]
    print(f"\nwall time with / without in-training evaluation: median {statistics.median(ratios):.2f}x "
          f"({', '.join(f'{x:.2f}' for x in ratios)}); bound 1.20x")


if __name__ == "__main__":
    main()
