"""flowar sweep on a real local Ray runtime (Tune around Ray Train) and a real MLflow SQLite store.

One 4-trial sweep over two axes (a good and a hopeless learning rate x two injections) checks the
parent + nested child runs, their params/tags/metrics, ASHA stopping a hopeless trial early, and
the summary. A second sweep runs in a subprocess whose driver is SIGKILLed after its first trial
finished; `--resume` completes it without re-running that trial. Bad keys and values are refused
before anything starts. The shipped sweep files (paper Tables 4 and 6) pass validation.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
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


def children_of(uri: str, parent_name: str):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("flowar")
    parents = c.search_runs([exp.experiment_id], f"tags.`mlflow.runName` = '{parent_name}'")
    assert len(parents) == 1
    parent = parents[0]
    kids = c.search_runs([exp.experiment_id],
                         f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return c, parent, kids


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


def test_combination_of_valid_values_that_the_model_refuses_is_caught(dataset, tmp_path):
    from pipelines.sweep_config import load_sweep, validate

    sweep, base = load_sweep(write_sweep(tmp_path, "combo", {
        "model.head": {"grid": ["per_scale", "per_token"]},
        "model.injection": {"grid": ["adaln", "cross_attention"]}}))
    with pytest.raises(ConfigError, match="per_token.*cross_attention|cross_attention.*per_token"):
        validate(sweep, base, [f"data.path={dataset}"])


def test_shipped_table3_to_table6_sweeps_validate(tmp_path):
    from pipelines.sweep_config import load_sweep, validate

    # the quickstart's 4x8x8 latents and ImageNet's 16x16x16, both with the image pyramid
    tiny = make_dataset(tmp_path / "fmnist", count=8, side=8, image_scales=(1, 2, 4))
    full = make_dataset(tmp_path / "in256", count=8, side=16, channels=16, num_classes=1000,
                        image_scales=(1, 2, 4, 8))
    expected = {"table3-scale-construction": [("model.scale_construction", 2)],
                "table4-scales": [("model.scales", 3)],
                "table5-head-objective": [("model.head", 2), ("model.objective", 2)],
                "table6-injection": [("model.injection", 6)]}
    for name, axes_expected in expected.items():
        for suffix, data in (("", full), ("-tiny", tiny)):
            sweep, base = load_sweep(SWEEPS / f"{name}{suffix}.yaml")
            axes, cfg = validate(sweep, base, [f"data.path={data}"])
            assert [(a.key, len(a.values)) for a in axes] == axes_expected, name + suffix
            assert sweep.name == name + suffix
    sweep, _ = load_sweep(SWEEPS / "table6-injection.yaml")
    assert sweep.search["model.injection"]["grid"] == [
        "spatial_adaln", "adaln", "addition", "cross_attention", "sequence_concat",
        "channel_concat"]
    sweep, _ = load_sweep(SWEEPS / "table4-scales.yaml")
    assert sweep.search["model.scales"]["grid"] == [[1, 2, 4, 8, 16], [1, 4, 8, 16], [1, 4, 16]]
    # Where the axes change what the loss measures, the summary says "best by loss" means nothing.
    from pipelines.sweep_summary import loss_caveat
    for name, caveat in (("table3-scale-construction", "model.scale_construction"),
                         ("table5-head-objective", "model.objective"), ("table6-injection", "")):
        sweep, base = load_sweep(SWEEPS / f"{name}-tiny.yaml")
        axes, _ = validate(sweep, base, [f"data.path={tiny}"])
        text = loss_caveat(axes, sweep.metric)
        assert (caveat in text) if caveat else text == "", name
    # Table 3's image arm needs the image pyramid in the dataset: refused before any trial.
    sweep, base = load_sweep(SWEEPS / "table3-scale-construction-tiny.yaml")
    plain = make_dataset(tmp_path / "plain", count=8, side=8)
    with pytest.raises(ConfigError, match="image_pyramid"):
        validate(sweep, base, [f"data.path={plain}"])


# ------------------------------------------------------------------------- real sweeps

def test_four_trial_sweep_logs_parent_children_and_asha_stops_a_hopeless_trial(
        ray_local, dataset, tmp_path, mlflow_uri):
    from pipelines.sweep import run_sweep

    sweep = write_sweep(
        tmp_path, "grid", {"train.base_lr": {"grid": [0.016, 1e-9]},  # lr 1e-3 vs ~0: hopeless
                           "model.injection": {"grid": ["adaln", "addition"]}},
        overrides=["train.max_steps=20"],
        scheduler={"type": "asha", "time_attr": "step", "grace_period": 10,
                   "reduction_factor": 2})
    summary = run_sweep(sweep, [f"data.path={dataset}", f"mlflow.tracking_uri={mlflow_uri}"])

    c, parent, kids = children_of(mlflow_uri, "grid")
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.role"] == "parent"
    assert len(kids) == 4
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
        seen.add((float(p["train.base_lr"]), p["model.injection"]))
        curve = [m.value for m in c.get_metric_history(kid.info.run_id, "loss")]
        assert curve and all(math.isfinite(v) for v in curve)
        final = c.get_metric_history(kid.info.run_id, "final_loss")
        assert len(final) == 1 and final[0].value == pytest.approx(curve[-1], rel=0.5)
    assert seen == {(0.016, "adaln"), (0.016, "addition"), (1e-9, "adaln"), (1e-9, "addition")}

    rows = {(r["train.base_lr"], r["model.injection"]): r for r in summary["rows"]}
    good = [r for (lr, _), r in rows.items() if lr == 0.016]
    hopeless = [r for (lr, _), r in rows.items() if lr == 1e-9]
    assert all(r["status"] == "COMPLETED" and r["step"] == 20 for r in good), summary["table"]
    # The good trials ran first (grid order, one at a time), so at rung 10 the hopeless ones
    # are worse than the cutoff and ASHA stops at least one before its 20 steps.
    stopped = [r for r in hopeless if r["status"] == "STOPPED_EARLY"]
    assert stopped and all(r["step"] < 20 for r in stopped), summary["table"]
    assert max(r["loss"] for r in good) < min(r["loss"] for r in hopeless)
    by_run = {k.info.run_id: k for k in kids}
    assert by_run[stopped[0]["run_id"]].data.tags["trial_status"] == "STOPPED_EARLY"

    # Summary: table + CSV + plot + best config, on disk and on the parent run.
    assert summary["best_trial"] in {r["trial_id"] for r in good}
    best = yaml.safe_load(Path(summary["best_config"]).read_text())
    best_row = next(r for r in good if r["trial_id"] == summary["best_trial"])
    assert best["train"]["base_lr"] == 0.016
    assert best["model"]["injection"] == best_row["model.injection"]
    logged = {a.path for a in c.list_artifacts(parent.info.run_id, "summary")}
    assert {"summary/trials.csv", "summary/trials.md", "summary/loss_per_axis.png",
            "summary/best_config.yaml"} <= logged
    assert "| trial_id | train.base_lr | model.injection | loss | step | status |" \
        in summary["table"]
    assert summary["caveat"] == ""  # injection and lr leave the loss comparable
    completed = [r for r in good if r["status"] == "COMPLETED"]
    assert all((Path(r["export_dir"]) / "model.safetensors").is_file() for r in completed)
    assert c.get_metric_history(parent.info.run_id, "trials_stopped_early")[0].value >= 1


def test_killed_sweep_resumes_without_rerunning_finished_trials(
        ray_local, dataset, tmp_path, mlflow_uri):
    from pipelines.sweep import run_sweep

    sweep = write_sweep(tmp_path, "resume", {"model.injection": {"grid": ["adaln", "addition"]}},
                        overrides=["train.max_steps=10"], scheduler={"type": "none"})
    args = [str(sweep), f"data.path={dataset}", f"mlflow.tracking_uri={mlflow_uri}"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "sweep", *args], cwd=ROOT,
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    exp_dir = tmp_path / "tune" / "resume"
    try:
        first = _wait_for_first_finished_trial(mlflow_uri, exp_dir, driver, timeout_s=400)
    finally:
        driver.send_signal(signal.SIGKILL)  # the driver dies without any clean-up
        driver.wait()
    log.close()
    c, parent, kids = children_of(mlflow_uri, "resume")
    assert parent.info.status == "RUNNING"  # the killed driver never closed it
    finished_before = {k.info.run_id: k.info.end_time for k in kids
                       if k.data.tags.get("trial_status") == "COMPLETED"}
    assert first in finished_before

    summary = run_sweep(sweep, args[1:], resume=True)

    c, parent, kids = children_of(mlflow_uri, "resume")
    assert parent.info.status == "FINISHED"
    assert len(kids) == 2 and {k.data.params["model.injection"] for k in kids} == {"adaln", "addition"}
    assert [r["status"] for r in summary["rows"]] == ["COMPLETED", "COMPLETED"], summary["table"]
    for run_id, end_time in finished_before.items():
        run = c.get_run(run_id)
        assert run.info.end_time == end_time  # untouched: not re-run
        resumed = [m.value for m in c.get_metric_history(run_id, "resumed_from_step")]
        assert resumed == [0]  # trained once
    with pytest.raises(ConfigError, match="already exists"):  # same name without --resume
        run_sweep(sweep, args[1:])


def _wait_for_first_finished_trial(uri, exp_dir: Path, driver, timeout_s: float) -> str:
    """The run id of the first trial that finished, once Tune's saved state says it ended."""
    import json

    from mlflow import MlflowClient

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert driver.poll() is None, "the sweep driver exited before it could be killed"
        for state in sorted(exp_dir.glob("experiment_state-*.json"))[-1:]:
            try:
                trials = [json.loads(t[0]) for t in json.loads(state.read_text())["trial_data"]]
            except (ValueError, KeyError):
                continue  # caught mid-write
            ended = [t["trial_id"] for t in trials if t.get("status") == "TERMINATED"]
            if ended:
                c = MlflowClient(uri)
                exp = c.get_experiment_by_name("flowar")
                runs = c.search_runs([exp.experiment_id],
                                     f"tags.`sweep.trial_id` = '{ended[0]}'")
                return runs[0].info.run_id
        time.sleep(1)
    raise AssertionError("no trial finished in time")
