"""One trial of `flowar sweep`, from its start to what its MLflow child run says at the end.

A trial is one `flowar train` run: a Tune function trainable (`run_trial`) that calls the
training job with Tune's `TuneReportCallback`, so ASHA sees every checkpoint's report (Ray Train
inside Tune). Its MLflow run is a nested child of the sweep's parent run (tag
`mlflow.parentRunId`) named `<sweep>-<trial id>`; it is the training run itself, so it holds the
trial's full config as params, the training curves, and tags naming the sweep and the axis values.

Statuses are the driver's (`trial_status`, from Tune's record): a trial stopped by ASHA is killed
without running any of its own code, so the driver closes its child run (FINISHED, tag
trial_status=STOPPED_EARLY, or COMPLETED when its last report carries the export); a failed
trial's child run is FAILED with the error as tag and artefact. `ChildRunCallback` does this as
trials end, `settle_trials` once more after the sweep, and the summary writes what it settled.

Imported by the driver only when a sweep runs (pipelines/sweep/job.py), so Ray is imported at
the top here; Tune's trial processes import it to run `run_trial`.
"""

from __future__ import annotations

import functools
import json
import time
import traceback
from dataclasses import dataclass

import ray
from ray import tune
from ray.core.generated import gcs_pb2
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.state import list_nodes

from pipelines.core import tracking
from pipelines.sweep.config import SweepConfig, SweepJob, trial_config
from pipelines.train.job import run_train, tune_is_stopping_this_trial

__all__ = ["TrialContext", "trainable", "run_trial", "ChildRuns", "ChildRunCallback",
           "SettledTrial", "settle_trials", "trial_status", "ended_status", "child_run_name",
           "release_orphaned_placement_groups"]

PARENT_TAG = "mlflow.parentRunId"


def child_run_name(sweep_name: str, trial_id: str) -> str:
    return f"{sweep_name}-{trial_id}"


# ----------------------------------------------------------------- the trial (Tune's trial process)

@dataclass
class TrialContext:
    """What the driver hands every trial (through Ray's object store: `tune.with_parameters`)."""
    sweep: SweepConfig
    bases: dict  # the resolved base configs (pipelines.sweep.config.resolved_bases)
    parent_run_id: str  # the sweep's MLflow run
    trials_dir: str  # Ray Train's storage for the trials' training runs


def trainable(job: SweepJob, parent_run_id: str, trials_dir: str):
    """`run_trial` as Tune runs it: with the sweep's context and the trial process's CPU share
    (its Ray Train workers reserve their own resources)."""
    ctx = TrialContext(job.sweep, job.bases, parent_run_id, trials_dir)
    return tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                               {"cpu": job.sweep.resources.trial_cpus})


def run_trial(params: dict, ctx: TrialContext) -> None:
    """One trial: a full `flowar train` run whose MLflow run is a child of the sweep's run.

    Its config is the driver's resolved base plus its axis values (pipelines.sweep.config.trial_config):
    a trial runs in Ray's per-trial directory, so it must not read files or fill defaults itself.
    Its status (COMPLETED, STOPPED_EARLY) is the driver's to write: only the driver knows
    whether Tune stopped it."""
    trial_id = tune.get_context().get_trial_id()
    name = child_run_name(ctx.sweep.name, trial_id)
    cfg = trial_config(ctx.sweep, ctx.bases, params,
                       [f"mlflow.run_name={name}", f"ray.storage_path={ctx.trials_dir}"])
    client, run_id = _start_child_run(cfg, ctx, trial_id, params)
    try:
        run_train(cfg, **_training_options(ctx))
    except Exception as e:
        if not tune_is_stopping_this_trial():  # a trial Tune stops (ASHA) is closed by the driver
            record_failure(client, run_id, f"{type(e).__name__}: {e}", traceback.format_exc())
        raise


def _start_child_run(cfg, ctx: TrialContext, trial_id: str, params: dict):
    """The trial's MLflow run, tagged as the sweep's child; returns (client, run id).

    Created here, before the training job, so the run is a nested child from its first moment;
    the training job finds it by name (cfg.mlflow.run_name) and keeps logging to it, also when
    a resumed trial restarts."""
    uri = cfg.mlflow.resolved_uri()
    run_id, _ = tracking.start_or_resume_run(uri, cfg.mlflow.experiment, cfg.mlflow.run_name,
                                             artifact_location=cfg.mlflow.artifact_location)
    client = tracking.client(uri)
    tags = {PARENT_TAG: ctx.parent_run_id, "sweep": ctx.sweep.name, "sweep.trial_id": trial_id,
            **{f"axis.{k}": json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
               for k, v in params.items()}}
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return client, run_id


def _training_options(ctx: TrialContext) -> dict:
    """The training job's keyword arguments inside a trial: Tune's report callback (so ASHA sees
    each checkpoint's report) and the sweep's resources per worker. Each trial's workers stream
    the dataset themselves (pipelines/train/data.py)."""
    resources = {"CPU": ctx.sweep.resources.cpus_per_worker}
    if ctx.sweep.resources.gpus_per_worker:
        resources["GPU"] = ctx.sweep.resources.gpus_per_worker
    return {"callbacks": [TuneReportCallback()], "resources_per_worker": resources}


# ----------------------------------------------------- a trial's status and child run (the driver)

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


@dataclass
class ChildRuns:
    """Where a sweep's child runs live. Plain strings: Tune pickles the callback holding it."""
    uri: str
    experiment: str
    sweep_name: str

    def find(self, trial_id: str):
        """(client, the trial's child run or None), the run found by name: it exists before its
        tags."""
        client = tracking.client(self.uri)
        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            return client, None
        runs = client.search_runs([exp.experiment_id], "tags.`mlflow.runName` = "
                                  f"'{child_run_name(self.sweep_name, trial_id)}'", max_results=1)
        return client, (runs[0] if runs else None)


def close_child(client, run, status: str) -> None:
    """Make the child run say what happened to its trial (tag trial_status, run status)."""
    tags = run.data.tags
    if status == "FAILED":
        if run.info.status == "RUNNING":  # else the trial recorded its own error
            record_failure(client, run.info.run_id, "trial failed (see Tune's error file)", "")
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


def record_failure(client, run_id: str, message: str, details: str) -> None:
    """Mark the child run FAILED with the error as tag (and `details` as error.txt), unless the
    driver closed it already: then Tune stopped the trial, which is no failure."""
    if client.get_run(run_id).info.status == "FINISHED":
        return
    client.set_tag(run_id, "trial_status", "FAILED")
    client.set_tag(run_id, "error", message[:5000])
    if details:
        client.log_text(run_id, details, "error.txt")
    client.set_terminated(run_id, status="FAILED")


@dataclass
class SettledTrial:
    """One trial of a finished sweep: Tune's record of it, its child run closed to match."""
    trial_id: str
    config: dict  # its axis values
    last_result: dict  # its last report (metric, step, export_dir once all steps ran)
    status: str  # COMPLETED, STOPPED_EARLY, FAILED, or Tune's status of a trial that never ended
    run_id: str  # its MLflow child run; "" when it never started one


def settle_trials(results, children: ChildRuns) -> list[SettledTrial]:
    """After `Tuner.fit`, when every trial process has ended: each trial's status from Tune, its
    child run closed to match, in trial order."""
    settled = []
    for trial in sorted(results._experiment_analysis.trials, key=lambda t: t.trial_id):
        status = trial_status(trial)
        client, run = children.find(trial.trial_id)
        if run is not None:
            close_child(client, run, status)
        settled.append(SettledTrial(trial.trial_id, dict(trial.config),
                                    dict(trial.last_result or {}), status,
                                    run.info.run_id if run else ""))
    return settled


# -------------------------------------------------------------- the driver's Tune callback

class ChildRunCallback(Callback):
    """Closes each trial's child run as Tune ends the trial (ASHA kills a trial without running
    any of its code), logs its final metric, and frees what stopped trials leak."""

    def __init__(self, children: ChildRuns, metric: str):
        self.children = children
        self.metric = metric
        self.last_release = 0.0

    def on_step_begin(self, iteration, trials, **info):
        if time.monotonic() - self.last_release > 2.0:
            self.last_release = time.monotonic()
            _release_stopped_trials_placement_groups()

    def on_trial_complete(self, iteration, trials, trial, **info):
        client, run = self.children.find(trial.trial_id)
        if run is None:
            return
        last = trial.last_result or {}
        value = last.get(self.metric)
        if isinstance(value, (int, float)):
            client.log_metric(run.info.run_id, f"final_{self.metric}", float(value),
                              step=int(last.get("step", 0) or 0))
        # Now, so the UI shows it while the sweep runs; the trial's process may still write
        # after this, so settle_trials closes every run once more at the end.
        close_child(client, run, ended_status(last))

    def on_trial_error(self, iteration, trials, trial, **info):
        client, run = self.children.find(trial.trial_id)
        if run is None or run.info.status != "RUNNING":
            return  # the trial recorded its own error
        error_file = str(getattr(trial, "error_file", "") or "trial error")
        record_failure(client, run.info.run_id, f"trial {trial.trial_id} failed (see Tune's "
                       f"error file {error_file})", error_file)


def _release_stopped_trials_placement_groups() -> None:
    try:
        for pg in release_orphaned_placement_groups():
            print(f"flowar sweep: released placement group {pg} of a stopped trial")
    except Exception as e:  # private Ray API: never let it stop the sweep
        print(f"flowar sweep: could not check placement groups ({e})")


def release_orphaned_placement_groups() -> list[str]:
    """Remove placement groups whose creating actor is dead; return their ids.

    A trial stopped by ASHA kills its Ray Train controller, whose worker placement group is
    owned by the job and outlives it. Ray Train's PlacementGroupCleaner frees it through the
    State API, which only exists with the dashboard (docs/stack-facts.md); without it the next
    trial waits forever for CPUs. Only a group made by an actor that has died qualifies, which is
    exactly that leak (driver-made groups, e.g. Tune's own, have no creator actor)."""
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


@functools.cache
def state_api_available() -> bool:
    """Whether this Ray has the dashboard's State API (then Ray Train cleans up after itself)."""
    try:
        list_nodes(limit=1, timeout=5)
        return True
    except Exception:
        return False
