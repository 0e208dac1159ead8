"""flowar sweep on a real local Ray runtime (Tune around Ray Train) and a real MLflow SQLite store.

One 4-trial sweep over two axes (a good and a hopeless learning rate x two injections), run with
the defaults a user gets (relative data.path, no tracking URI, no storage path, from a fresh
directory), checks the parent + nested child runs in ./flowar-runs/mlflow.db, their
params/tags/metrics, ASHA stopping the hopeless trials early, and the summary's statuses and run
ids. A second sweep runs in a subprocess whose driver SIGKILLs itself once Tune's saved state
records a finished trial; `--resume` completes it without re-running that trial. Bad keys, values
and data paths are refused before anything starts. The shipped sweep files (paper Tables 3-6)
pass validation; tests/test_sweep_files.py runs them.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flowar.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train-tiny.yaml"
SWEEPS = ROOT / "configs" / "sweeps"
FAST = ["train.warmup_steps=1", "train.keep_checkpoints=1", "train.log_every=5",
        "train.checkpoint_every=5"]


def make_dataset(path: Path, **kw) -> Path:
    from test_train import make_dataset as make  # the training tests' latent dataset writer

    return make(path, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("latents") / "tiny")


def write_sweep(tmp: Path, name: str, search: dict, **extra) -> Path:
    spec = {"name": name, "base": str(TINY), "overrides": FAST + extra.pop("overrides", []),
            "search": search, "metric": "loss", "mode": "min",
            "resources": {"workers": 1}, "storage_path": str(tmp / "tune"), **extra}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))  # axis order = column order
    return path


def children_of(uri: str, parent_name: str, experiment: str = "flowar"):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(experiment)
    parents = c.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{parent_name}'")
    assert len(parents) == 1
    parent = parents[0]
    kids = c.search_runs([exp.experiment_id],
                         f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return c, parent, kids


def default_store(cwd: Path) -> str:
    """Where a run lands when no tracking URI is given and FLOWAR_HOME is unset."""
    return f"sqlite:///{cwd / 'flowar-runs' / 'mlflow.db'}"


def check_trials(summary_dir: Path, uri: str, sweep_name: str, max_steps: int,
                 experiment: str = "flowar") -> list[dict]:
    """trials.csv/.md as the user reads them, checked against the MLflow store and the exports.

    No trial FAILED. Each row's run_id is a child run of the sweep's parent in `uri`, FINISHED
    and tagged with the row's status. A trial the scheduler stopped ran fewer than max_steps
    and exported nothing: STOPPED_EARLY; one that ran all max_steps has its export: COMPLETED."""
    c, parent, kids = children_of(uri, sweep_name, experiment)
    with open(summary_dir / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    table = (summary_dir / "trials.md").read_text()
    by_id = {k.info.run_id: k for k in kids}
    assert rows and len(rows) == len(kids), (rows, len(kids))
    for row in rows:
        assert row["status"] in ("COMPLETED", "STOPPED_EARLY"), rows
        kid = by_id[row["run_id"]]
        assert kid.data.tags["sweep.trial_id"] == row["trial_id"]
        assert kid.data.tags["trial_status"] == row["status"] and kid.info.status == "FINISHED"
        step = int(row["step"])
        if step == max_steps:
            assert row["status"] == "COMPLETED", row
            assert (Path(row["export_dir"]) / "model.safetensors").is_file(), row
        else:
            assert row["status"] == "STOPPED_EARLY" and step < max_steps, row
            assert row["export_dir"] == "", row
        line = next(ln for ln in table.splitlines() if f"| {row['trial_id']} |" in ln)
        assert line.rstrip().endswith(f"| {row['status']} |"), line
    stopped = sum(r["status"] == "STOPPED_EARLY" for r in rows)
    assert c.get_metric_history(parent.info.run_id, "trials_stopped_early")[0].value == stopped
    return rows


# ------------------------------------------------------------------------- refused before work

@pytest.mark.parametrize("search, named", [
    ({"train.learning_rate": {"grid": [1e-3, 1e-4]}}, "train.learning_rate"),
    ({"model.injection": {"grid": ["adaln", "telepathy"]}}, "telepathy"),
    ({"model.scales": {"choice": [[1, 2, 4], [1, 2, 8]]}}, "[1, 2, 8]"),  # latent is 4x4
    ({"train.base_lr": {"loguniform": [0.0, 1e-3]}}, "search.train.base_lr"),
])
def test_bad_key_or_value_is_refused_before_any_trial(dataset, tmp_path, search, named, capsys):
    from pipelines.cli import main

    sweep = write_sweep(tmp_path, "bad", search)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", str(sweep), f"data.path={dataset}", f"mlflow.tracking_uri={uri}"]) == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "tune").exists()  # no Tune experiment, no trial
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run either


def test_missing_relative_data_path_is_refused_before_any_trial(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLOWAR_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = SWEEPS / "table6-injection-tiny.yaml"
    assert main(["sweep", str(sweep), "data.path=./flowar-runs/latents-fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert f"data.path={tmp_path / 'flowar-runs' / 'latents-fashion-mnist'}" in err, err
    assert not (tmp_path / "flowar-runs").exists()  # no Tune experiment, no MLflow store


def test_combination_of_valid_values_that_the_model_refuses_is_caught(dataset, tmp_path):
    from pipelines.sweep.config import read_sweep_file, validate

    sweep, base = read_sweep_file(write_sweep(tmp_path, "combo", {
        "model.head": {"grid": ["per_scale", "per_token"]},
        "model.injection": {"grid": ["adaln", "cross_attention"]}}))
    with pytest.raises(ConfigError, match="per_token.*cross_attention|cross_attention.*per_token"):
        validate(sweep, base, [f"data.path={dataset}"])


def test_shipped_table3_to_table6_sweeps_validate(tmp_path):
    from pipelines.sweep.config import read_sweep_file, validate

    # the quickstart's 4x8x8 latents and ImageNet's 16x16x16, both with the image pyramid
    tiny = make_dataset(tmp_path / "fmnist", count=8, side=8, image_scales=(1, 2, 4))
    full = make_dataset(tmp_path / "in256", count=8, side=16, channels=16, num_classes=1000,
                        image_scales=(1, 2, 4, 8))
    expected = {"table3-scale-construction": [("model.scale_construction", 2)],
                "table4-scales": [("model.scales", 3)],
                "table5-head-objective": [("model.head", 2), ("model.objective", 2)],
                "table6-injection": [("model.injection", 7)]}
    # The full files evaluate against ADM's ImageNet reference batch, which this machine lacks.
    for name, axes_expected in expected.items():
        for suffix, data, extra in (("", full, ["train.eval_reference=fashion-mnist:test"]),
                                    ("-tiny", tiny, [])):
            sweep, base = read_sweep_file(SWEEPS / f"{name}{suffix}.yaml")
            axes, cfg, _ = validate(sweep, base, [f"data.path={data}", *extra])
            seeds = [("train.seed", 2)] if suffix else []  # the tiny ones: two seeds a setting
            assert [(a.key, len(a.values)) for a in axes] == axes_expected + seeds, name + suffix
            assert sweep.name == name + suffix
            # ranked by in-training FID: the loss is not comparable across most of these axes
            assert sweep.metric == "eval/fid" and cfg.train.eval_every > 0, name + suffix
    sweep, _ = read_sweep_file(SWEEPS / "table6-injection.yaml")
    assert sweep.search["model.injection"]["grid"] == [
        "spatial_adaln", "cross_attention_adaln", "adaln", "addition", "cross_attention",
        "sequence_concat", "channel_concat"]
    sweep, _ = read_sweep_file(SWEEPS / "table4-scales.yaml")
    assert sweep.search["model.scales"]["grid"] == [[1, 2, 4, 8, 16], [1, 4, 8, 16], [1, 4, 16]]
    # Ranked by loss instead, the sweeps whose axes change what the loss measures are refused.
    for name, refused in (("table3-scale-construction", True), ("table4-scales", True),
                          ("table5-head-objective", True), ("table6-injection", False)):
        sweep, base = read_sweep_file(SWEEPS / f"{name}-tiny.yaml", ["metric=loss"])
        if refused:
            with pytest.raises(ConfigError, match="metric=loss cannot rank"):
                validate(sweep, base, [f"data.path={tiny}"])
        else:
            validate(sweep, base, [f"data.path={tiny}"])
    # Table 3's image arm needs the image pyramid in the dataset: refused before any trial.
    sweep, base = read_sweep_file(SWEEPS / "table3-scale-construction-tiny.yaml")
    plain = make_dataset(tmp_path / "plain", count=8, side=8)
    with pytest.raises(ConfigError, match="image_pyramid"):
        validate(sweep, base, [f"data.path={plain}"])


EVALUATING = ["train.eval_every=2", "train.eval_reference=fashion-mnist:test"]


@pytest.mark.parametrize("search, spec, overrides, message", [
    ({"model.objective": {"grid": ["flow", "diffusion"]}}, {}, [], "metric=loss cannot rank"),
    ({"model.time_sampling": {"grid": ["uniform", "logit_normal"]}}, {}, [],
     "not comparable across values of model.time_sampling"),
    ({"model.injection": {"grid": ["adaln"]}}, {"metric": "eval/fid"}, [], "set train.eval_every"),
    ({"model.injection": {"grid": ["adaln"]}}, {"metric": "eval/fid", "mode": "max"}, EVALUATING,
     "set mode: min"),
    ({"model.injection": {"grid": ["adaln"]}}, {"metric": "eval/class_accuracy", "mode": "max"},
     EVALUATING, "needs train.eval_classifier"),
    ({"model.injection": {"grid": ["adaln"]}},
     {"metric": "eval/fid", "scheduler": {"type": "asha", "grace_period": 3}}, EVALUATING,
     "grace_period=3 is not a multiple of train.eval_every=2"),
])
def test_a_metric_that_cannot_rank_the_sweep_is_refused_before_any_trial(
        dataset, tmp_path, capsys, search, spec, overrides, message):
    """The loss across axes that change what it measures; an eval/* metric the trials do not
    log, or ranked the wrong way, or with ASHA's rungs between evaluations."""
    from pipelines.cli import main

    sweep = write_sweep(tmp_path, "unrankable", search, overrides=overrides, **spec)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["sweep", str(sweep), f"data.path={dataset}", f"mlflow.tracking_uri={uri}"]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "tune").exists() and not (tmp_path / "mlflow.db").exists()


# ------------------------------------------------------------------------- real sweeps

def test_sweep_ranked_by_in_training_fid(ray_local, tmp_path):
    """metric: eval/fid. Each trial evaluates at steps 2 and 4; the summary ranks by its last
    FID, with the loss beside it, and the best config is the lowest-FID trial's."""
    from test_train_eval import N, reference_folder, tiny_vae

    from pipelines.sweep.config import load_sweep
    from pipelines.sweep.job import run_sweep

    data = make_dataset(tmp_path / "latents", vae=str(tiny_vae(tmp_path / "vae")))
    ref = reference_folder(tmp_path / "reference")
    sweep = write_sweep(tmp_path, "by-fid", {"model.injection": {"grid": ["adaln", "addition"]}},
                        overrides=["train.max_steps=4", "train.eval_every=2", f"train.eval_samples={N}",
                                   "train.eval_batch_size=8", f"train.eval_reference={ref}"],
                        metric="eval/fid", scheduler={"type": "none"})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = run_sweep(load_sweep(sweep, [f"data.path={data}", f"mlflow.tracking_uri={uri}"]))

    c, parent, kids = children_of(uri, "by-fid")
    assert len(kids) == 2
    final = {}
    for kid in kids:
        fid = {m.step: m.value for m in c.get_metric_history(kid.info.run_id, "eval/fid")}
        assert sorted(fid) == [2, 4] and all(math.isfinite(v) for v in fid.values())
        final[kid.info.run_id] = fid[4]
    rows = summary["rows"]
    assert {r["run_id"]: r["eval/fid"] for r in rows} == pytest.approx(final)
    assert all(math.isfinite(r["loss"]) for r in rows)  # each trial's loss beside its FID
    best = min(rows, key=lambda r: r["eval/fid"])
    assert summary["best_trial"] == best["trial_id"] and summary["best_value"] == best["eval/fid"]
    assert "| trial_id | model.injection | eval/fid | loss |" in summary["table"]
    assert yaml.safe_load(Path(summary["best_config"]).read_text())["model"]["injection"] \
        == best["model.injection"]
    assert c.get_run(parent.info.run_id).data.metrics["best_eval/fid"] == pytest.approx(best["eval/fid"])
    with open(Path(summary["dir"]) / "trials.csv") as f:
        assert {"eval/fid", "loss"} <= set(csv.DictReader(f).fieldnames)
    assert (Path(summary["dir"]) / "eval_fid_per_axis.png").is_file()


def test_four_trial_sweep_logs_parent_children_and_asha_stops_a_hopeless_trial(
        ray_local, dataset, tmp_path, monkeypatch):
    from pipelines.sweep.config import load_sweep
    from pipelines.sweep.job import run_sweep

    # The defaults a user gets: run from their own directory with a relative data.path, no
    # tracking URI, no storage path. Trials run in Ray's per-trial directories, yet every run
    # must land in this directory's ./flowar-runs.
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLOWAR_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = write_sweep(
        tmp_path, "grid", {"train.base_lr": {"grid": [0.016, 1e-9]},  # lr 1e-3 vs ~0: hopeless
                           "model.injection": {"grid": ["adaln", "addition"]}},
        overrides=["train.max_steps=20"], storage_path="",
        scheduler={"type": "asha", "time_attr": "step", "grace_period": 10,
                   "reduction_factor": 2})
    summary = run_sweep(load_sweep(sweep, [f"data.path={os.path.relpath(dataset, tmp_path)}"]))

    uri = default_store(tmp_path)
    c, parent, kids = children_of(uri, "grid")
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.role"] == "parent"
    assert len(kids) == 4
    assert sorted(p.name for p in tmp_path.rglob("mlflow.db")) == ["mlflow.db"]  # one store
    seen = set()
    for kid in kids:
        p, t = kid.data.params, kid.data.tags
        assert t["sweep"] == "grid" and t["mlflow.runName"] == f"grid-{t['sweep.trial_id']}"
        assert kid.info.status == "FINISHED", (t, kid.info.status)
        # The full trial config as params, the axis values both as params and as tags.
        assert p["model.injection"] == t["axis.model.injection"]
        assert float(p["train.base_lr"]) == float(t["axis.train.base_lr"])
        assert p["train.num_workers"] == "1" and p["train.max_steps"] == "20"
        assert p["model.ar_width"] == "64" and p["train.checkpoint_every"] == "5"
        assert p["data.path"] == str(dataset) and p["mlflow.tracking_uri"] == uri
        seen.add((float(p["train.base_lr"]), p["model.injection"]))
        curve = [m.value for m in c.get_metric_history(kid.info.run_id, "loss")]
        assert curve and all(math.isfinite(v) for v in curve)
        final = c.get_metric_history(kid.info.run_id, "final_loss")
        assert len(final) == 1 and final[0].value == pytest.approx(curve[-1], rel=0.5)
    assert seen == {(0.016, "adaln"), (0.016, "addition"), (1e-9, "adaln"), (1e-9, "addition")}

    out = Path(summary["dir"])
    assert out == tmp_path / "flowar-runs" / "ray_results" / "grid" / "summary"
    rows = check_trials(out, uri, "grid", max_steps=20)
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in summary["rows"]]
    # Tune runs a grid in a fixed order, one trial at a time here: both good learning rates
    # first (its first axis in sorted key order, model.injection, varies fastest).
    order = [(float(r["train.base_lr"]), r["model.injection"]) for r in rows]
    assert order == [(0.016, "adaln"), (0.016, "addition"), (1e-9, "adaln"), (1e-9, "addition")]
    # ASHA at the step-10 rung stops a trial worse than the median of those recorded before
    # it: the first trial always continues; each hopeless one is worse than every good one.
    assert rows[0]["status"] == "COMPLETED", rows
    assert [r["status"] for r in rows[2:]] == ["STOPPED_EARLY"] * 2, rows
    good, hopeless = summary["rows"][:2], summary["rows"][2:]
    assert max(r["loss"] for r in good) < min(r["loss"] for r in hopeless)
    assert "STOPPED_EARLY" in summary["table"] and summary["counts"]["STOPPED_EARLY"] == 2

    # Summary: table + CSV + plot + best config, on disk and on the parent run.
    assert summary["best_trial"] in {r["trial_id"] for r in good}
    best = yaml.safe_load(Path(summary["best_config"]).read_text())
    best_row = next(r for r in good if r["trial_id"] == summary["best_trial"])
    assert best["train"]["base_lr"] == 0.016
    assert best["model"]["injection"] == best_row["model.injection"]
    assert best["data"]["path"] == str(dataset)  # the resolved path, usable from anywhere
    assert c.get_run(parent.info.run_id).data.tags["best_run_id"] == best_row["run_id"]
    logged = {a.path for a in c.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/trials.csv", "summary/trials.md", "summary/loss_per_axis.png",
            "summary/best_config.yaml"} <= logged
    assert "| trial_id | train.base_lr | model.injection | loss | step | status |" \
        in summary["table"]


# The sweep driver of the kill test: `flowar sweep ...` whose Tune loop SIGKILLs its own process
# at the first step after Tune's saved experiment state (in the sweep's storage, what --resume
# reads) records a finished trial. The moment is decided by what Tune wrote, not by a clock.
# The patch sits on Tune's controller class in this process only: a patched callback would be
# pickled into the experiment (tuner.pkl) and kill the resumed driver too.
KILLED_DRIVER = """
import json, os, signal, sys
from pathlib import Path
from ray.tune.execution.tune_controller import TuneController
from pipelines import cli

exp_dir = Path(sys.argv[1])

def finished_trial_saved():
    for state in exp_dir.glob("experiment_state-*.json"):
        try:
            saved = json.loads(state.read_text())["trial_data"]
        except (OSError, ValueError, KeyError):
            continue  # caught mid-write: the next step reads it again
        if any(json.loads(t[0]).get("status") == "TERMINATED" for t in saved):
            return True
    return False

step = TuneController.step

def step_then_die_once_a_finished_trial_is_saved(self):
    step(self)
    if finished_trial_saved():
        os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind

TuneController.step = step_then_die_once_a_finished_trial_is_saved
sys.exit(cli.main(["sweep", *sys.argv[2:]]))
"""


def test_killed_sweep_resumes_without_rerunning_finished_trials(
        ray_local, dataset, tmp_path, mlflow_uri):
    from pipelines.sweep.config import load_sweep
    from pipelines.sweep.job import run_sweep

    sweep = write_sweep(tmp_path, "resume", {"model.injection": {"grid": ["adaln", "addition"]}},
                        overrides=["train.max_steps=10"], scheduler={"type": "none"})
    args = [str(sweep), f"data.path={dataset}", f"mlflow.tracking_uri={mlflow_uri}"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    exp_dir = tmp_path / "tune" / "resume"
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.run([sys.executable, "-c", KILLED_DRIVER, str(exp_dir), *args],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=1800)  # a guard against a hang only
    assert driver.returncode == -signal.SIGKILL, (tmp_path / "driver.log").read_text()[-3000:]
    first = _finished_trials(exp_dir)
    assert len(first) == 1, first  # killed while the second trial had not finished
    c, parent, kids = children_of(mlflow_uri, "resume")
    assert parent.info.status == "RUNNING"  # the killed driver never closed it
    finished_before = {k.info.run_id: k.info.end_time for k in kids
                       if k.data.tags.get("trial_status") == "COMPLETED"}
    assert [k.data.tags["sweep.trial_id"] for k in kids
            if k.info.run_id in finished_before] == first

    summary = run_sweep(load_sweep(sweep, args[1:]), resume=True)

    c, parent, kids = children_of(mlflow_uri, "resume")
    assert parent.info.status == "FINISHED"
    assert len(kids) == 2 and {k.data.params["model.injection"] for k in kids} == {"adaln", "addition"}
    assert [r["status"] for r in summary["rows"]] == ["COMPLETED", "COMPLETED"], summary["table"]
    check_trials(Path(summary["dir"]), mlflow_uri, "resume", max_steps=10)
    for run_id, end_time in finished_before.items():
        run = c.get_run(run_id)
        assert run.info.end_time == end_time  # untouched: not re-run
        resumed = [m.value for m in c.get_metric_history(run_id, "resumed_from_step")]
        assert resumed == [0]  # trained once
    with pytest.raises(ConfigError, match="already exists"):  # same name without --resume
        run_sweep(load_sweep(sweep, args[1:]))


def _finished_trials(exp_dir: Path) -> list[str]:
    """The trial ids Tune's newest saved experiment state records as finished."""
    state = sorted(exp_dir.glob("experiment_state-*.json"))[-1]
    trials = [json.loads(t[0]) for t in json.loads(state.read_text())["trial_data"]]
    return [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]
