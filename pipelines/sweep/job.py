"""`flowar sweep SWEEP.yaml [key=value ...] [--resume]`: Ray Tune sweeps of full training runs.

Each trial is one `flowar train` run (pipelines/sweep/trial.py: the trainable, its MLflow child
run and its status). MLflow gets one parent run per sweep, started here, and one nested child run
per trial; the end writes and logs a table, a plot and the best config (pipelines/sweep/summary.py).

Paths: `load_sweep` (pipelines/sweep/config.py) reads the base config once on the driver (paths
absolute against the user's directory, the default MLflow store and Ray storage filled) and
trials get that dict; a trial only adds its axis values. A trial runs in Ray's per-trial
directory, where re-reading the files would resolve ./relative paths and ./flowar-runs elsewhere.
Resume: `--resume` restores the Tune experiment (same storage path and name); finished trials
are kept, unfinished ones restart and their Train runs continue from their last checkpoint.

`flowar --help` imports this module: Ray Tune, and the trial and summary modules (Ray,
matplotlib), are imported only once a sweep runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from flowar.config import ConfigError
from pipelines.core import tracking
from pipelines.core.config import add_job_parser
from pipelines.core.ray_runtime import init_ray
from pipelines.core.source import flowar_command, source_tags
from pipelines.core.storage import is_uri
from pipelines.sweep.config import SweepJob, load_sweep

__all__ = ["run_sweep", "register", "experiment_dir"]


def run_sweep(job: SweepJob, *, resume: bool = False) -> dict:
    """Run (or resume) the sweep `job` (read and checked by `load_sweep`), write and log its
    summary; return the summary (pipelines.sweep.summary.summarise)."""
    from pipelines.sweep import summary, trial  # Ray, matplotlib: not on `flowar --help`'s path

    exp_dir = experiment_dir(job)
    _check_resume(job, exp_dir, resume)
    uri, parent_id = _start_parent_run(job, exp_dir)
    print(f"flowar sweep: {'resuming' if resume else 'starting'} sweep {job.sweep.name!r} "
          f"({len(job.axes)} axes; MLflow parent run {parent_id}; Tune dir {exp_dir})")
    _start_ray(job)
    trainable = trial.trainable(job, parent_id, f"{exp_dir}/train")
    children = trial.ChildRuns(uri, job.base.mlflow.experiment, job.sweep.name)
    if resume:
        tuner = _restored_tuner(exp_dir, trainable)  # with the callback the experiment saved
    else:
        tuner = _new_tuner(job, trainable, trial.ChildRunCallback(children, job.sweep.metric))
    results = tuner.fit()
    trials = trial.settle_trials(results, children)  # every trial process has ended
    report = summary.summarise(trials, job, uri, parent_id, exp_dir)
    tracking.end_run(uri, parent_id, "FINISHED")
    return report


def experiment_dir(job: SweepJob) -> str:
    """The Tune experiment: <sweep.storage_path, else the training job's storage>/<sweep name>."""
    return f"{_tune_storage(job).rstrip('/')}/{job.sweep.name}"


def _tune_storage(job: SweepJob) -> str:
    root = job.sweep.storage_path or job.base.ray.resolved_storage_path()
    return root if is_uri(root) else str(Path(root).resolve())


def _check_resume(job: SweepJob, exp_dir: str, resume: bool) -> None:
    """--resume needs the sweep's experiment; a new sweep must not overwrite one."""
    from ray import tune

    exists = tune.Tuner.can_restore(exp_dir)
    if resume and not exists:
        raise ConfigError(f"--resume: there is no sweep {job.sweep.name!r} to resume at {exp_dir}")
    if not resume and exists:
        raise ConfigError(f"a sweep named {job.sweep.name!r} already exists at {exp_dir}: pass "
                          "--resume to continue it, or sweep.name=NEW for a new sweep")


def _start_parent_run(job: SweepJob, exp_dir: str) -> tuple[str, str]:
    """The sweep's MLflow run (resumed by name), with the sweep file as params; (uri, run id)."""
    mlflow = job.base.mlflow
    uri = mlflow.resolved_uri()
    tracking.check_reachable(uri)
    parent_id, _ = tracking.start_or_resume_run(uri, mlflow.experiment, job.sweep.name,
                                                artifact_location=mlflow.artifact_location)
    tracking.log_config(uri, parent_id, job.sweep, job.path, tags={
        "sweep": job.sweep.name, "sweep.role": "parent",
        "sweep.axes": ", ".join(a.key for a in job.axes), "sweep.dir": exp_dir,
        **source_tags(flowar_command("sweep", job.path))})
    return uri, parent_id


def _start_ray(job: SweepJob) -> None:
    # A local Ray may come up without the dashboard (no State API): the trials' callback then
    # frees the placement groups of stopped trials itself (pipelines/sweep/trial.py).
    init_ray(job.base.ray, min_cpus=4)
    # A diverged trial reports no metric (the training loop's non-finite report): it must fail
    # alone, not stop the sweep on Tune's strict metric check. Experiment state is saved every
    # 2 s, so a killed driver loses little.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")


def _new_tuner(job: SweepJob, trainable, callback):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    sweep, sc = job.sweep, job.sweep.scheduler
    scheduler = FIFOScheduler() if sc.type == "none" else ASHAScheduler(
        time_attr=sc.time_attr, max_t=sc.max_t or job.base.train.max_steps,
        grace_period=sc.grace_period, reduction_factor=sc.reduction_factor, brackets=sc.brackets)
    return tune.Tuner(
        trainable, param_space={a.key: a.tune_domain() for a in job.axes},
        tune_config=tune.TuneConfig(
            metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
            # The limit sits on the search algorithm: Tune ignores TuneConfig's
            # max_concurrent_trials when a BasicVariantGenerator is passed (it warns so).
            search_alg=BasicVariantGenerator(random_state=sweep.seed,
                                             max_concurrent=sweep.max_concurrent_trials),
            num_samples=sweep.num_samples),
        run_config=tune.RunConfig(
            name=sweep.name, storage_path=_tune_storage(job), verbose=1,
            failure_config=tune.FailureConfig(max_failures=0),  # Train retries inside
            callbacks=[callback]))


def _restored_tuner(exp_dir: str, trainable):
    from ray import tune

    return tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True,
                              resume_errored=False, restart_errored=False)


# ----------------------------------------------------------------------------- command line

def _cli(args) -> int:
    report = run_sweep(load_sweep(args.config, args.overrides), resume=args.resume)
    print(report["table"])
    print(f"flowar sweep: {report['counts']}; best {report['metric']} "
          f"{report['best_value']} ({report['best_trial']}); best config: "
          f"{report['best_config']}; summary: {report['dir']}")
    return 0 if report["best_trial"] else 1


DESCRIPTION = """\
Run a Ray Tune sweep: each trial is a full `flowar train` run of the sweep file's base config
with the trial's axis values. ASHA stops bad trials early; MLflow gets a parent run for the sweep
and a nested child run per trial; the end prints and logs a table, a plot and the best config.
--print-config prints the sweep file as read, after every check a sweep makes before its first
trial."""

EXAMPLES = """\
Overrides: key=value applies to the base training config (e.g. data.path=./latents),
sweep.key=value to the sweep file (e.g. sweep.num_samples=2).

Examples:
  flowar sweep configs/sweeps/table6-injection-tiny.yaml data.path=./latents
  flowar sweep configs/sweeps/table6-injection-tiny.yaml data.path=./latents --resume
"""


def register(subparsers) -> None:
    p = add_job_parser(
        subparsers, "sweep", run=_cli, load=lambda a: load_sweep(a.config, a.overrides).sweep,
        help="Ray Tune sweep of training runs (ASHA), parent + child runs in MLflow",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        config_help="sweep YAML (name, base, overrides, search, metric, mode, scheduler, "
                    "num_samples, max_concurrent_trials, resources)",
        overrides_example="data.path=./latents (base training config) or sweep.num_samples=2")
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the examples' lines
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep of the same name after the driver was stopped: "
                        "finished trials are kept, unfinished ones continue from checkpoints")
