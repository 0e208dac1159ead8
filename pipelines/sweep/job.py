"""`flowar sweep SWEEP.yaml [key=value ...] [--resume]`: Ray Tune sweeps of full training runs.

Each trial is one `flowar train` run (Ray Train inside Tune, the nesting Ray 2.60 supports: a Tune
function trainable that calls `run_training` with Tune's `TuneReportCallback`, so ASHA sees every
checkpoint's report). MLflow gets one parent run per sweep and one nested child run per trial
(tag `mlflow.parentRunId`); the child is the training run itself, so it holds the trial's full
config as params, the training curves, and tags naming the sweep and the axis values.

Paths: the driver reads the base config once (`pipelines.sweep.config.resolved_bases`: paths absolute
against the user's directory, the default MLflow store and Ray storage filled) and hands trials
that dict; a trial only adds its axis values. A trial runs in Ray's per-trial directory, where
re-reading the files would resolve ./relative paths and ./flowar-runs somewhere else.

Statuses are the driver's (`trial_status`, from Tune's record): a trial stopped by ASHA is killed
without running any of its own code, so the driver closes its child run (FINISHED, tag
trial_status=STOPPED_EARLY, or COMPLETED when its last report carries the export); a failed
trial's child run is FAILED with the error as tag and artefact. The callback does this as trials
end, `settle_trials` once more after the sweep, and the summary writes what it settled.
Resume: `--resume` restores the Tune experiment (same storage path and name); finished trials
are kept, unfinished ones restart and their Train runs continue from their last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import time
import traceback

from flowar.config import ConfigError

__all__ = ["run_sweep", "register", "child_run_name", "release_orphaned_placement_groups"]

PARENT_TAG = "mlflow.parentRunId"


def child_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


def _axis_tags(params: dict) -> dict[str, str]:
    import json

    return {f"axis.{k}": json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            for k, v in params.items()}


# ----------------------------------------------------------------------------- the trial (Tune)

def run_trial(params: dict, ctx: dict) -> None:
    """One trial: a full `flowar train` run whose MLflow run is a child of the sweep's run.

    Its config is the driver's resolved base plus its axis values (pipelines.sweep.config.trial_config):
    a trial runs in Ray's per-trial directory, so it must not read files or fill defaults itself.
    Its status (COMPLETED, STOPPED_EARLY) is the driver's to write: only the driver knows
    whether Tune stopped it."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.core import tracking
    from pipelines.sweep.config import SweepConfig, trial_config
    from pipelines.train.job import run_training, tune_is_stopping_this_trial
    from flowar.config import from_dict

    sweep = from_dict(SweepConfig, ctx["sweep"])
    trial_id = tune.get_context().get_trial_id()
    name = child_run_name(sweep.name, trial_id)
    cfg = trial_config(sweep, ctx["bases"], params, [f"mlflow.run_name={name}",
                                                     f"ray.storage_path={ctx['trials_dir']}"])
    uri = cfg.mlflow.resolved_uri()
    # Created here, before run_training, so the run is a nested child from its first moment;
    # run_training finds it by name and keeps logging to it (also when a resumed trial restarts).
    run_id, _ = tracking.start_or_resume_run(uri, cfg.mlflow.experiment, name,
                                                 artifact_location=cfg.mlflow.artifact_location)
    client = tracking.client(uri)
    for key, value in {PARENT_TAG: ctx["parent_run_id"], "sweep": sweep.name,
                       "sweep.trial_id": trial_id, **_axis_tags(params)}.items():
        client.set_tag(run_id, key, value)
    resources = {"CPU": sweep.resources.cpus_per_worker}
    if sweep.resources.gpus_per_worker:
        resources["GPU"] = sweep.resources.gpus_per_worker
    kwargs = {"callbacks": [TuneReportCallback()], "resources_per_worker": resources}
    if ctx.get("dataset") is not None:
        kwargs["dataset"] = ctx["dataset"]  # read once by the sweep driver
    try:
        run_training(cfg, **kwargs)
    except Exception as e:
        if not tune_is_stopping_this_trial():  # a trial Tune stops (ASHA) is closed by the driver
            _record_failure(client, run_id, f"{type(e).__name__}: {e}", traceback.format_exc())
        raise


# ------------------------------------------------------- trial bookkeeping (driver side only)

def ended_status(last_result: dict | None) -> str:
    """The status of a trial Tune ended without error. Tune ends trials by killing them (ASHA,
    and every trial at max_t); the loop's last report carries export_dir only once all steps
    are done, which tells a completed trial from one the scheduler stopped early."""
    return "COMPLETED" if "export_dir" in (last_result or {}) else "STOPPED_EARLY"


def trial_status(trial) -> str:
    """COMPLETED, STOPPED_EARLY or FAILED from Tune's own record of the trial (its child run may
    be in any state: a killed trial cannot close it); Tune's status for a trial that never ended
    (e.g. PENDING when the driver was stopped)."""
    if trial.status == "ERROR":
        return "FAILED"
    if trial.status == "TERMINATED":
        return ended_status(trial.last_result)
    return trial.status


def find_child(client, experiment_id: str | None, sweep_name: str, trial_id: str):
    """The trial's MLflow child run (found by name: it exists before its tags), or None."""
    if experiment_id is None:
        return None
    runs = client.search_runs([experiment_id], "tags.`mlflow.runName` = "
                              f"'{child_run_name(sweep_name, trial_id)}'", max_results=1)
    return runs[0] if runs else None


def close_child(client, run, status: str) -> None:
    """Make the child run say what happened to its trial (tag trial_status, run status)."""
    tags = run.data.tags
    if status == "FAILED":
        if run.info.status == "RUNNING":  # else the trial recorded its own error
            _record_failure(client, run.info.run_id, "trial failed (see Tune's error file)", "")
        elif tags.get("trial_status") != "FAILED":
            client.set_tag(run.info.run_id, "trial_status", "FAILED")
        return
    if status not in ("COMPLETED", "STOPPED_EARLY"):
        return  # never ended: a resumed sweep continues it
    if tags.get("trial_status") == status and run.info.status == "FINISHED" and "error" not in tags:
        return
    client.set_tag(run.info.run_id, "trial_status", status)
    if "error" in tags:  # the abort of a stopped trial, not a failure
        client.delete_tag(run.info.run_id, "error")
    client.set_terminated(run.info.run_id, status="FINISHED")


def settle_trials(results, uri: str, experiment: str, sweep_name: str) -> list[dict]:
    """After `Tuner.fit`: every trial's status from Tune, its child run closed to match, its run
    id. One dict per trial in trial order: trial_id, config, last_result, status, run_id."""
    from pipelines.core import tracking

    c = tracking.client(uri)
    exp = c.get_experiment_by_name(experiment)
    settled = []
    for trial in sorted(results._experiment_analysis.trials, key=lambda t: t.trial_id):
        status = trial_status(trial)
        run = find_child(c, exp.experiment_id if exp else None, sweep_name, trial.trial_id)
        if run is not None:
            close_child(c, run, status)
        settled.append({"trial_id": trial.trial_id, "config": dict(trial.config),
                        "last_result": dict(trial.last_result or {}), "status": status,
                        "run_id": run.info.run_id if run else ""})
    return settled


def _record_failure(client, run_id: str, message: str, details: str) -> None:
    status = client.get_run(run_id).info.status
    if status == "FINISHED":  # the driver closed it already: a trial Tune stopped, not a failure
        return
    client.set_tag(run_id, "trial_status", "FAILED")
    client.set_tag(run_id, "error", message[:5000])
    if details:
        client.log_text(run_id, details, "error.txt")
    client.set_terminated(run_id, status="FAILED")


# ------------------------------------------------------------------- driver-side Tune callback

def release_orphaned_placement_groups() -> list[str]:
    """Remove placement groups whose creating actor is dead; return their ids.

    A trial stopped by ASHA kills its Ray Train controller, whose worker placement group is
    owned by the job and outlives it. Ray Train's PlacementGroupCleaner frees it through the
    State API, which only exists with the dashboard (docs/stack-facts.md); without it the next
    trial waits forever for CPUs. Only a group made by an actor that has died qualifies, which is
    exactly that leak (driver-made groups, e.g. Tune's own, have no creator actor)."""
    import ray
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if state_api_available():  # Ray Train frees them itself; never race it
        return []
    nil = b"\xff" * 16
    released = []
    accessor = ray._private.state.state._connect_and_get_accessor()
    for raw in accessor.get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (pg.creator_actor_dead and pg.creator_actor_id and pg.creator_actor_id != nil
                and not pg.is_detached
                and pg.state != gcs_pb2.PlacementGroupTableData.PlacementGroupState.REMOVED):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            released.append(pg.placement_group_id.hex())
    return released


_STATE_API: list[bool] = []


def state_api_available() -> bool:
    """Whether this Ray has the dashboard's State API (then Ray Train cleans up after itself)."""
    if not _STATE_API:
        try:
            from ray.util.state import list_nodes
            list_nodes(limit=1, timeout=5)
            _STATE_API.append(True)
        except Exception:
            _STATE_API.append(False)
    return _STATE_API[0]


def make_callback(sweep_name: str, uri: str, experiment: str, metric: str):
    """A Tune Callback (defined lazily: ray.tune is a heavy import) that closes child runs."""
    from ray.tune import Callback

    class _SweepCallback(Callback):
        def __init__(self):
            self.last_release = 0.0

        def on_step_begin(self, iteration, trials, **info):
            if time.monotonic() - self.last_release > 2.0:
                self.last_release = time.monotonic()
                try:
                    for pg in release_orphaned_placement_groups():
                        print(f"flowar sweep: released placement group {pg} of a stopped trial")
                except Exception as e:  # private Ray API: never let it stop the sweep
                    print(f"flowar sweep: could not check placement groups ({e})")

        def _child(self, trial):
            from pipelines.core import tracking

            c = tracking.client(uri)
            exp = c.get_experiment_by_name(experiment)
            return c, find_child(c, exp.experiment_id if exp else None, sweep_name,
                                 trial.trial_id)

        def _final_metric(self, c, run, trial):
            value = (trial.last_result or {}).get(metric)
            if isinstance(value, (int, float)):
                step = int((trial.last_result or {}).get("step", 0) or 0)
                c.log_metric(run.info.run_id, f"final_{metric}", float(value), step=step)

        def on_trial_complete(self, iteration, trials, trial, **info):
            c, run = self._child(trial)
            if run is None:
                return
            self._final_metric(c, run, trial)
            # Now, so the UI shows it while the sweep runs; the trial's process may still write
            # after this, so settle_trials closes every run once more at the end.
            close_child(c, run, ended_status(trial.last_result))

        def on_trial_error(self, iteration, trials, trial, **info):
            c, run = self._child(trial)
            if run is None or run.info.status != "RUNNING":
                return  # the trial recorded its own error
            message = str(getattr(trial, "error_file", "") or "trial error")
            _record_failure(c, run.info.run_id, f"trial {trial.trial_id} failed (see Tune's "
                            f"error file {message})", message)

    return _SweepCallback()


# ------------------------------------------------------------------------------- the driver

def _split_overrides(overrides) -> tuple[list[str], list[str]]:
    """`sweep.key=value` goes to the sweep file, everything else to the base training config."""
    sweep = [o[len("sweep."):] for o in overrides if o.startswith("sweep.")]
    return sweep, [o for o in overrides if not o.startswith("sweep.")]


def run_sweep(sweep_path, overrides=(), *, resume: bool = False) -> dict:
    """Validate, run (or resume) the sweep, write and log its summary; return the summary."""
    import inspect
    from pathlib import Path

    from pipelines.core import tracking
    from pipelines.core.storage import is_uri
    from pipelines.sweep.config import load_sweep, validate
    from pipelines.train.job import run_training, storage_path

    sweep_over, train_over = _split_overrides(list(overrides))
    sweep, base = load_sweep(sweep_path, sweep_over)
    # Before anything starts; every path and default resolved here, where the user typed it.
    axes, base_cfg, bases = validate(sweep, base, train_over)

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    root = sweep.storage_path or storage_path(base_cfg)
    if not is_uri(root):
        root = str(Path(root).resolve())
    exp_dir = f"{root.rstrip('/')}/{sweep.name}"
    exists = tune.Tuner.can_restore(exp_dir)
    if resume and not exists:
        raise ConfigError(f"--resume: there is no sweep {sweep.name!r} to resume at {exp_dir}")
    if not resume and exists:
        raise ConfigError(f"a sweep named {sweep.name!r} already exists at {exp_dir}: pass "
                          "--resume to continue it, or sweep.name=NEW for a new sweep")
    uri = base_cfg.mlflow.resolved_uri()
    tracking.check_reachable(uri)
    experiment = base_cfg.mlflow.experiment
    parent_id, _ = tracking.start_or_resume_run(
        uri, experiment, sweep.name, artifact_location=base_cfg.mlflow.artifact_location)
    tracking.log_config(uri, parent_id, sweep, str(sweep_path), tags={
        "sweep": sweep.name, "sweep.role": "parent", "sweep.axes": ", ".join(a.key for a in axes),
        "sweep.dir": exp_dir, "git_commit": tracking.git_commit()})
    print(f"flowar sweep: {'resuming' if resume else 'starting'} sweep {sweep.name!r} "
          f"({len(axes)} axes; MLflow parent run {parent_id}; Tune dir {exp_dir})")

    from pipelines.core.ray_runtime import init_ray

    # A local Ray may come up without the dashboard (no State API): SweepCallback then frees
    # the placement groups of stopped trials itself (release_orphaned_placement_groups).
    init_ray(base_cfg.ray, min_cpus=4)
    # A diverged trial reports no metric (the training loop's non-finite report): it must fail alone,
    # not stop the sweep on Tune's strict metric check. Experiment state is saved every 2 s, so
    # a killed driver loses little.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    dataset = None
    if "data.path" not in sweep.search and "dataset" in inspect.signature(run_training).parameters:
        from pipelines.data.latents import LatentDataset

        dataset = LatentDataset(base_cfg.data.path).ray_dataset().materialize()  # read once, shared by trials
    ctx = {"sweep": _to_plain(sweep), "bases": bases, "parent_run_id": parent_id,
           "trials_dir": f"{exp_dir}/train", "dataset": dataset}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    {"cpu": sweep.resources.trial_cpus})
    if resume:
        tuner = tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        sc = sweep.scheduler
        scheduler = FIFOScheduler() if sc.type == "none" else ASHAScheduler(
            time_attr=sc.time_attr, max_t=sc.max_t or base_cfg.train.max_steps,
            grace_period=sc.grace_period, reduction_factor=sc.reduction_factor,
            brackets=sc.brackets)
        tuner = tune.Tuner(
            trainable, param_space={a.key: a.tune_domain() for a in axes},
            tune_config=tune.TuneConfig(
                metric=sweep.metric, mode=sweep.mode, scheduler=scheduler,
                # The limit sits on the search algorithm: Tune ignores TuneConfig's
                # max_concurrent_trials when a BasicVariantGenerator is passed (it warns so).
                search_alg=BasicVariantGenerator(random_state=sweep.seed,
                                                 max_concurrent=sweep.max_concurrent_trials),
                num_samples=sweep.num_samples),
            run_config=tune.RunConfig(
                name=sweep.name, storage_path=root, verbose=1,
                failure_config=tune.FailureConfig(max_failures=0),  # Train retries inside
                callbacks=[make_callback(sweep.name, uri, experiment, sweep.metric)]))
    results = tuner.fit()

    from pipelines.sweep.summary import summarise

    trials = settle_trials(results, uri, experiment, sweep.name)  # all trial processes ended
    summary = summarise(trials, sweep, axes, bases, uri, parent_id, exp_dir)
    tracking.end_run(uri, parent_id, "FINISHED")
    return summary


def _to_plain(sweep) -> dict:
    from flowar.config import to_dict

    return to_dict(sweep)


def _main(args) -> int:
    summary = run_sweep(args.sweep, args.overrides, resume=args.resume)
    print(summary["table"])
    if summary["caveat"]:
        print(f"note: {summary['caveat']}")
    print(f"flowar sweep: {summary['counts']}; best {summary['metric']} "
          f"{summary['best_value']} ({summary['best_trial']}); best config: "
          f"{summary['best_config']}; summary: {summary['dir']}")
    return 0 if summary["best_trial"] else 1


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="Ray Tune sweep of training runs (ASHA), parent + child runs in MLflow",
        description="Run a Ray Tune sweep: each trial is a full `flowar train` run of the sweep "
                    "file's base config with the trial's axis values. ASHA stops bad trials "
                    "early; MLflow gets a parent run for the sweep and a nested child run per "
                    "trial; the end prints and logs a table, a plot and the best config.\n\n"
                    "Overrides: key=value applies to the base training config (e.g. "
                    "data.path=./latents), sweep.key=value to the sweep file (e.g. "
                    "sweep.num_samples=2).\n\nExamples:\n"
                    "  flowar sweep configs/sweeps/table6-injection-tiny.yaml data.path=./latents\n"
                    "  flowar sweep configs/sweeps/table6-injection-tiny.yaml "
                    "data.path=./latents --resume",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep YAML (name, base, overrides, search, metric, mode, "
                                 "scheduler, num_samples, max_concurrent_trials, resources)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="base-config overrides; sweep.KEY=VALUE for sweep settings")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep of the same name after the driver was stopped: "
                        "finished trials are kept, unfinished ones continue from checkpoints")
    p.set_defaults(func=_main)
