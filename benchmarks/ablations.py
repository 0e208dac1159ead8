"""The paper's Tables 6, 4 and 5 at small scale: a resumable study runner and its report.

    python benchmarks/ablations.py run [--tables 6,4,5] [--steps N] [--eval-samples 1000]
                                       [--seeds 0,1] [--home DIR] [--dry-run]
    python benchmarks/ablations.py report [--home DIR] [--out benchmarks/ablations.md]

`run` runs, for each table, the shipped tiny sweep exactly as its header prints it
(`flowar sweep configs/sweeps/<file> data.path=<latents>`) plus the study's overrides: its own
sweep name (a user's plain run of the same file is left alone), every setting trained to the end
(`sweep.scheduler.type=none`: an ablation must not be cut by ASHA), the step count, and an FID
(and class accuracy) evaluation at the last step, ranked by `eval/fid`. Each table's trials are
seeds x settings. It is resumable: a table whose sweep finished with every trial COMPLETED is
skipped, an interrupted one is continued with `flowar sweep ... --resume`. The state file
<home>/ablations-state.json records each table's command, its invocations and wall times. The
Fashion-MNIST latents and the classifier are made first when missing, by the quickstart's own
stages 1-3 (`prepare`: VAE, encode, classifier; no quickstart training).

`report` reads each table's trials.csv, aggregates each setting over its seeds and writes a
Markdown page with one plot per table, the paper's number beside each row, what is missing, and
a conclusion per table that it writes mechanically from the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling modules, also when imported by the tests
    sys.path.insert(0, str(HERE))

from ablations_study import (CLASSIFIER, LATENTS, ROOT, SEED_AXIS, TABLES, StudyError,  # noqa: E402
                             TableSpec, default_home, experiment_dir, read_state, shown,
                             sweep_status, tracking_uri, trials_csv, write_state)

METRIC = "eval/fid"
DEFAULT_SEEDS = [0, 1]


@dataclass
class StudySettings:
    steps: int
    eval_samples: int
    eval_every: int  # 0: one evaluation, at the last step
    seeds: list | None  # None: the sweep file's train.seed grid
    reference: str  # empty: the sweep file's train.eval_reference
    reference_images: int | None  # None: the sweep file's
    checkpoint_every: int
    concurrent: int = 2  # trials at a time: each trains and evaluates on 1 CPU worker


# ----------------------------------------------------------------------------- commands

def read_sweep_file(spec: TableSpec) -> dict:
    return yaml.safe_load((ROOT / spec.sweep_file).read_text()) or {}


def study_overrides(spec: TableSpec, s: StudySettings, home: Path) -> list[str]:
    """What the study adds to the header's command (key=value, as typed)."""
    sweep = read_sweep_file(spec)
    over = [f"sweep.name={spec.sweep_name}", "sweep.scheduler.type=none",
            f"sweep.max_concurrent_trials={s.concurrent}"]
    if sweep.get("metric") != METRIC or sweep.get("mode", "min") != "min":
        over += [f"sweep.metric={METRIC}", "sweep.mode=min"]
    file_seeds = (sweep.get("search") or {}).get(SEED_AXIS, {}).get("grid")
    if s.seeds and file_seeds != s.seeds:
        # merged into the file's search (overrides deep-merge): only the seed axis changes
        over.append(f"sweep.search={{{SEED_AXIS}: {{grid: {json.dumps(s.seeds)}}}}}")
    over += [f"train.max_steps={s.steps}", f"train.checkpoint_every={s.checkpoint_every}",
             f"train.eval_every={s.eval_every or s.steps}", f"train.eval_samples={s.eval_samples}"]
    if s.reference:
        over.append(f"train.eval_reference={s.reference}")
    if s.reference_images is not None:
        over.append(f"train.eval_reference_images={s.reference_images}")
    return over + [f"train.eval_classifier={shown(home / CLASSIFIER)}"]


def effective_settings(spec: TableSpec, s: StudySettings) -> dict:
    """The study's settings with what it leaves to the sweep file filled from the file: what the
    state file records and the page prints."""
    sweep = read_sweep_file(spec)
    over = dict(o.split("=", 1) for o in sweep.get("overrides", []) if "=" in o)
    out = asdict(s)
    out["seeds"] = s.seeds or (sweep.get("search") or {}).get(SEED_AXIS, {}).get("grid")
    out["reference"] = s.reference or over.get("train.eval_reference", "")
    if s.reference_images is None:
        out["reference_images"] = int(over.get("train.eval_reference_images", "0"))
    return out


def sweep_argv(spec: TableSpec, s: StudySettings, home: Path) -> list[str]:
    return ["flowar", "sweep", spec.sweep_file, f"data.path={shown(home / LATENTS)}",
            *study_overrides(spec, s, home)]


def display(argv: list[str], home: Path) -> str:
    """The command as typed from the repository root (FLOWAR_HOME only when not the default)."""
    prefix = "" if home == (ROOT / "flowar-runs") else f"FLOWAR_HOME={shlex.quote(shown(home))} "
    return prefix + shlex.join(argv)


def flowar_executable() -> str:
    beside = Path(sys.executable).parent / "flowar"
    found = str(beside) if beside.is_file() else shutil.which("flowar")
    if not found:
        raise StudyError("the `flowar` command is not installed beside this Python nor on PATH: "
                         "run `make setup` (or pip install -e .) first")
    return found


def child_env(home: Path) -> dict:
    env = dict(os.environ, FLOWAR_HOME=str(home))
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


# ----------------------------------------------------------------------------- run

def plan(tables: list[int], s: StudySettings, home: Path, state: dict) -> list[dict]:
    """Each table's command and what this run does with it; refuses, before any work, a table
    that was started with other settings (its trials would mix two studies)."""
    steps = []
    for n in tables:
        spec = TABLES[n]
        argv = sweep_argv(spec, s, home)
        command = display(argv, home)
        status = sweep_status(home, spec)
        recorded = state.get("tables", {}).get(str(n), {}).get("command")
        if status != "not_started" and recorded and recorded != command:
            raise StudyError(
                f"table {n} was started with\n  {recorded}\nbut this run would use\n  {command}\n"
                f"use the same options, another --home, or remove {experiment_dir(home, spec)}")
        action = {"complete": "skip", "failed": "skip", "interrupted": "resume",
                  "not_started": "start"}[status]
        steps.append({"table": n, "spec": spec, "argv": argv, "command": command,
                      "status": status, "action": action})
    return steps


def needs_prepare(home: Path) -> list[str]:
    missing = []
    if not (home / LATENTS / "metadata.json").is_file():
        missing.append(f"latent dataset {home / LATENTS}")
    if not (home / CLASSIFIER / "classifier.safetensors").is_file():
        missing.append(f"classifier {home / CLASSIFIER}")
    return missing


def run_child(argv: list[str], home: Path) -> tuple[int, float]:
    start = time.time()
    rc = subprocess.run(argv, check=False, cwd=ROOT, env=child_env(home)).returncode
    return rc, round(time.time() - start, 1)


def run_prepare(home: Path, state: dict) -> None:
    argv = [sys.executable, str(Path(__file__).resolve()), "prepare", "--home", str(home)]
    command = f"python benchmarks/ablations.py prepare --home {shlex.quote(shown(home))}"
    print(f"\n=== ablations: preparing ({', '.join(needs_prepare(home))} missing)\n$ {command}",
          flush=True)
    rc, wall = run_child(argv, home)
    state["prepare"] = {"command": command, "wall_seconds": wall, "returncode": rc}
    write_state(home, state)
    if rc != 0 or needs_prepare(home):
        raise SystemExit(f"ablations: prepare failed (exit {rc}); see its output above")


def run_table(step: dict, s: StudySettings, home: Path, state: dict) -> str:
    spec, n = step["spec"], step["table"]
    entry = state.setdefault("tables", {}).setdefault(str(n), {"attempts": []})
    entry.update({"sweep_file": spec.sweep_file, "sweep_name": spec.sweep_name,
                  "command": step["command"], "settings": effective_settings(spec, s),
                  "trials_csv": str(trials_csv(home, spec)), "tracking_uri": tracking_uri(home)})
    resume = step["action"] == "resume"
    argv = [flowar_executable(), *step["argv"][1:]] + (["--resume"] if resume else [])
    print(f"\n=== ablations: table {n} ({'resuming' if resume else 'starting'})\n"
          f"$ {step['command']}{' --resume' if resume else ''}", flush=True)
    attempt = {"resume": resume, "started": datetime.datetime.now().isoformat(timespec="seconds")}
    entry["attempts"].append(attempt)
    start = time.time()
    try:
        attempt["returncode"] = run_child(argv, home)[0]
    finally:  # also when interrupted: the wall time so far stays on record
        attempt["wall_seconds"] = round(time.time() - start, 1)
        entry["wall_seconds"] = round(sum(a.get("wall_seconds", 0) for a in entry["attempts"]), 1)
        entry["status"] = sweep_status(home, spec)
        write_state(home, state)
    return entry["status"]


def run_study(tables: list[int], s: StudySettings, home: Path, dry_run: bool) -> int:
    if home.exists() and not home.is_dir():
        raise StudyError(f"--home {home} exists and is not a directory")
    state = read_state(home) if home.is_dir() else {}
    steps = plan(tables, s, home, state)
    missing = needs_prepare(home)
    if dry_run:
        if missing:
            print(f"prepare ({', '.join(missing)} missing):\n  python benchmarks/ablations.py "
                  f"prepare --home {shlex.quote(shown(home))}")
        for st in steps:
            extra = " --resume" if st["action"] == "resume" else ""
            print(f"table {st['table']} [{st['status']}: {st['action']}]:\n  {st['command']}{extra}")
        return 0
    flowar_executable()  # refuse before preparing anything
    home.mkdir(parents=True, exist_ok=True)
    if missing:
        run_prepare(home, state)
    outcome = {}
    for st in steps:
        if st["action"] == "skip":
            print(f"ablations: table {st['table']} already finished ({st['status']}): skipped")
            outcome[st["table"]] = st["status"]
            continue
        outcome[st["table"]] = run_table(st, s, home, state)
    print("\nablations: " + ", ".join(f"table {n} {v}" for n, v in outcome.items())
          + f"; write the page with: python benchmarks/ablations.py report --home {shown(home)}")
    failed = [n for n, v in outcome.items() if v != "complete"]
    if failed:
        print(f"ablations: tables {failed} did not complete every trial; `report` states what is "
              "missing. A finished sweep's failed trials are not re-run by --resume: remove its "
              "directory under <home>/ray_results to run that table again.")
    return 1 if failed else 0


def prepare(home: Path) -> None:
    """The quickstart's stages 1-3 (VAE, latents, classifier) under `home`, nothing else."""
    os.environ["FLOWAR_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from pipelines.core.config import load_config
    from pipelines.core.ray_runtime import init_ray
    from pipelines.encode import run_encode
    from pipelines.evaluate.classifier import train_classifier
    from pipelines.quickstart import QuickstartConfig, stage_configs
    from pipelines.vae_train import run_vae_train

    cfg = load_config(QuickstartConfig, None, [f"home={home}"])
    stages = stage_configs(cfg, home, tracking_uri(home))
    if not Path(stages.encode.output, "metadata.json").is_file():  # a finished dataset is kept
        init_ray(None, min_cpus=4)  # as the quickstart: Ray Data beside the VAE's 2 workers
        run_vae_train(stages.vae)
        run_encode(stages.encode)
    train_classifier(home / CLASSIFIER, epochs=cfg.classifier_epochs, limit=cfg.classifier_images)


# ----------------------------------------------------------------------------- command line

def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct integers, got {text!r}")
    return values


def _tables(text: str) -> list[int]:
    tables = _int_list(text)
    unknown = [t for t in tables if t not in TABLES]
    if unknown:
        raise argparse.ArgumentTypeError(f"no table {unknown}; choose from "
                                         f"{', '.join(map(str, TABLES))}")
    return tables


def _positive(zero_ok: bool = False):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = -1
        if v < 0 or (v == 0 and not zero_ok):
            raise argparse.ArgumentTypeError(
                f"expected an integer {'>= 0' if zero_ok else '> 0'}, got {text!r}")
        return v
    return parse


RUN_HELP = """\
Run each table's shipped tiny sweep (configs/sweeps/table{6,4,5}-*-tiny.yaml) as
`flowar sweep FILE data.path=<home>/latents-fashion-mnist` plus the study's overrides: sweep name
ablations-<file>, scheduler none (every setting trains to the end), --steps, an evaluation (FID
of --eval-samples samples against --reference, class accuracy by <home>/classifier) at the last
step, ranked by eval/fid, one trial per setting and seed. A table whose sweep finished is
skipped, an interrupted one resumed (--resume); a table started with other options is refused.
Missing latents or classifier are made first (`prepare`). --dry-run prints what would run."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/ablations.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) the tables' sweeps",
                       description=RUN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--tables", type=_tables, default=[6, 4, 5], help="tables, in order (default 6,4,5)")
    r.add_argument("--steps", type=_positive(), default=400,
                   help="training steps of every trial (default 400)")
    r.add_argument("--eval-samples", type=_positive(), default=1000,
                   help="generated samples per FID evaluation (default 1000)")
    r.add_argument("--eval-every", type=_positive(True), default=0,
                   help="steps between evaluations; 0 (default): one, at the last step")
    r.add_argument("--seeds", type=_int_list, default=None,
                   help="training seeds per setting (default: the sweep file's, 0,1)")
    r.add_argument("--reference", default="",
                   help="FID reference (default: the sweep file's, fashion-mnist:test)")
    r.add_argument("--reference-images", type=_positive(True), default=None,
                   help="reference images for the FID, 0: all (default: the sweep file's, "
                        "1000, whose statistics the quickstart's evaluation caches)")
    r.add_argument("--checkpoint-every", type=_positive(True), default=0,
                   help="steps between checkpoints (resume points); 0 (default): steps/10")
    r.add_argument("--concurrent", type=_positive(), default=2,
                   help="trials at a time (default 2: one per core of a 2-core machine; each "
                        "trial trains and evaluates on one CPU worker)")
    r.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    rp = sub.add_parser("report", help="write the study's Markdown page and plots",
                        description="Read each table's trials.csv, aggregate over seeds, write "
                                    "the page (plots beside it) with the paper's numbers and a "
                                    "mechanical conclusion per table.")
    rp.add_argument("--out", type=Path, default=HERE / "ablations.md",
                    help="the page; its plots go to <out without .md>/tableN.png "
                         "(default benchmarks/ablations.md)")
    rp.add_argument("--tables", type=_tables, default=[6, 4, 5], help="tables, in order")
    rp.add_argument("--trials", action="append", default=[], metavar="N=PATH",
                    help="read table N from this trials.csv instead of the study's own sweep "
                         "(e.g. a plain `flowar sweep` of the same file); repeatable")
    rp.set_defaults(default_seeds=DEFAULT_SEEDS)  # seeds expected of a table with no record
    rp.add_argument("--tracking-uri", default="",
                    help="MLflow store holding the trials' class accuracy (default: the one "
                         "the run recorded, else $MLFLOW_TRACKING_URI, else <home>/mlflow.db)")
    for sp in (r, rp, sub.add_parser("prepare", help="make the latents and classifier only")):
        sp.add_argument("--home", type=Path, default=None,
                        help="the study's home: latents, classifier, MLflow store, sweeps and "
                             "state file (default $FLOWAR_HOME, else ./flowar-runs)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    home = (args.home or default_home()).absolute()
    try:
        if args.command == "prepare":
            prepare(home)
            return 0
        if args.command == "report":
            from ablations_report import report  # matplotlib: only when writing the page
            return report(args, home)
        s = StudySettings(args.steps, args.eval_samples, args.eval_every, args.seeds,
                          args.reference, args.reference_images,
                          args.checkpoint_every or max(10, args.steps // 10), args.concurrent)
        return run_study(args.tables, s, home, args.dry_run)
    except StudyError as e:
        print(f"ablations: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the state file already holds the attempt and its wall time
        print("\nablations: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
