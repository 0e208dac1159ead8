"""Evaluations as MLflow child runs, sampler grids, and sampler.json (issue 17): a real Ray
runtime, a real SQLite MLflow store, a real tiny FlowAR export with a random-weight VAE, and real
Fashion-MNIST reference images (tests/test_evaluate.py's export)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipelines.core import tracking
from test_evaluate import BASE, make_export

pytestmark = pytest.mark.ray

SMALL = BASE + ["workers.num_workers=1"]
NO_SAMPLER = [a for a in SMALL if not a.startswith("sampler.")]
# The grid's reference is 10 images, not 12: its cache entry is its own, so the grid's first
# evaluation computes it and the second must find it cached.
GRID_REFERENCE = ["reference.max_images=10", "reference.batch_size=10", "reference.shard_size=10"]


@pytest.fixture(scope="module")
def env(ray_local, tmp_path_factory):
    """A store, a flowar home and cache of the module's own, and a tiny export to copy."""
    tmp = tmp_path_factory.mktemp("search")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWAR_CACHE", str(tmp / "cache"))  # converted Inception + reference stats
        mp.setenv("FLOWAR_HOME", str(tmp / "home"))  # the default output folders
        yield {"tmp": tmp, "uri": f"sqlite:///{tmp / 'mlflow.db'}",
               "export": make_export(tmp / "export-source")}


def linked_export(env, name: str) -> tuple[str, str]:
    """A copy of the export whose config.json names a fresh training run (in an experiment of
    its own), as flowar train's export does; (model folder, training run id)."""
    from mlflow import MlflowClient

    from flowar import FlowAR

    d = env["tmp"] / name
    shutil.copytree(env["export"], d)
    client = MlflowClient(env["uri"])
    exp = client.get_experiment_by_name("training") or client.get_experiment(client.create_experiment(
        "training", artifact_location=(env["tmp"] / "artifacts").as_uri()))  # not ./mlruns
    run = client.create_run(exp.experiment_id, run_name=f"train-{name}")
    client.set_terminated(run.info.run_id)
    FlowAR.from_pretrained(d / "model").save_pretrained(
        d / "model", extra={"training": {"mlflow_run_id": run.info.run_id, "step": 5}})
    return str(d / "model"), run.info.run_id


def children(uri: str, parent_id: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_id}'",
                              order_by=["attributes.start_time ASC"])


def snapshot(uri: str, run_id: str, tmp) -> dict:
    """A run's artefacts (bytes), metric histories, params and tags, to compare later."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    where = client.download_artifacts(run_id, "", str(tmp))
    files = {str(p.relative_to(where)): p.read_bytes() for p in sorted(Path(where).rglob("*"))
             if p.is_file()}
    history = {k: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(run_id, k)]
               for k in run.data.metrics}
    return {"files": files, "history": history, "params": run.data.params,
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}}


@pytest.fixture(scope="module")
def two_evaluations(env, tmp_path_factory):
    """`flowar evaluate` of one export twice, with sampler.cfg=1.5 and then 3; the first child
    run as it was before the second evaluation."""
    from pipelines.evaluate.search import load_plan, run_plan

    ckpt, train_id = linked_export(env, "export")
    common = SMALL + [f"generation.checkpoint={ckpt}", f"mlflow.tracking_uri={env['uri']}"]
    first = run_plan(load_plan(None, common + ["sampler.cfg=1.5"]))["reports"][0]
    before = snapshot(env["uri"], first["mlflow_run_id"], tmp_path_factory.mktemp("before"))
    second = run_plan(load_plan(None, common + ["sampler.cfg=3"]))["reports"][0]
    after = snapshot(env["uri"], first["mlflow_run_id"], tmp_path_factory.mktemp("after"))
    return {"first": first, "second": second, "before": before, "after": after, "ckpt": ckpt,
            "train_id": train_id, "children": children(env["uri"], train_id)}


def test_two_evaluations_are_two_child_runs(env, two_evaluations):
    from mlflow import MlflowClient

    first, second = two_evaluations["first"], two_evaluations["second"]
    train_id = two_evaluations["train_id"]
    kids = two_evaluations["children"]
    assert [k.info.run_id for k in kids] == [first["mlflow_run_id"], second["mlflow_run_id"]]
    client = MlflowClient(env["uri"])
    train_exp = client.get_run(train_id).info.experiment_id
    assert {k.info.experiment_id for k in kids} == {train_exp}  # the parent's experiment
    assert client.get_experiment_by_name("flowar") is None  # mlflow.experiment was not needed
    for kid, cfg, report in zip(kids, ("1.5", "3.0"), (first, second)):
        assert kid.data.params["sampler.cfg"] == cfg and kid.info.status == "FINISHED"
        assert kid.info.run_name.startswith(f"eval cfg={float(cfg):g} gh=0.9 steps=4 [")
        assert {a.path for a in client.list_artifacts(kid.info.run_id)} == {"report.json", "samples.png", "images"}
        assert tracking.image_steps(client, kid.info.run_id, "eval_samples") == [5]  # the grid, at the step
        assert [(m.step, m.value) for m in client.get_metric_history(kid.info.run_id, "eval/fid")] == [
            (5, pytest.approx(report["results"]["fid"]))]
        logged = json.loads(Path(client.download_artifacts(
            kid.info.run_id, "report.json", str(env["tmp"]))).read_text())
        assert logged["mlflow_run_id"] == kid.info.run_id and logged["mlflow"]["parent_run_id"] == train_id
        assert logged["config"]["sampler"]["cfg"] == float(cfg)
    assert first["output_dir"] != second["output_dir"]  # each its own settings-hash folder
    assert first["results"]["fid"] != second["results"]["fid"]
    assert first["reference"]["cached"] is False and second["reference"]["cached"] is True
    # The second evaluation changed nothing of the first's run: artefacts, metrics, params, tags.
    assert two_evaluations["after"] == two_evaluations["before"]
    assert not [k for k in client.get_run(train_id).data.metrics if k.startswith("eval/")]


@pytest.fixture(scope="module")
def grid(env, two_evaluations):
    """A sampler grid of two cfg values through the command line, as a user types it, of the
    same export against another reference (its own child runs, and its own reference cache
    entry; the generated shards of the two evaluations above are reused, which saves time)."""
    from pipelines.cli import main

    ckpt, train_id = two_evaluations["ckpt"], two_evaluations["train_id"]
    before = {k.info.run_id for k in children(env["uri"], train_id)}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = main(["evaluate", *SMALL, *GRID_REFERENCE, f"generation.checkpoint={ckpt}",
                   f"mlflow.tracking_uri={env['uri']}", "sampler.cfg=[1.5,3]"])
    new = [k for k in children(env["uri"], train_id) if k.info.run_id not in before]
    return {"rc": rc, "out": printed.getvalue(), "ckpt": ckpt, "train_id": train_id, "children": new}


def test_grid_runs_each_combination_as_a_child_and_writes_the_best(env, grid):
    from mlflow import MlflowClient

    assert grid["rc"] == 0, grid["out"]
    kids = grid["children"]  # two new child runs of the training run
    assert [k.data.params["sampler.cfg"] for k in kids] == ["1.5", "3.0"]  # the order given
    assert [k.data.params["reference.source"] for k in kids] == ["fashion-mnist:test"] * 2
    saved = json.loads(Path(grid["ckpt"], "sampler.json").read_text())
    fids = [e["fid"] for e in saved["evaluations"]]
    assert [e["sampler"]["cfg"] for e in saved["evaluations"]] == [1.5, 3.0] and fids[0] != fids[1]
    best = int(np.argmin(fids))
    assert saved["sampler"] == saved["evaluations"][best]["sampler"]
    assert saved["sampler"]["cfg"] == [1.5, 3.0][best]
    assert saved["sampler"]["num_steps"] == 4 and len(saved["sampler"]) == 7  # the full setting
    assert saved["fid"] == min(fids) and saved["metric"] == "fid"
    assert [e["mlflow_run_id"] for e in saved["evaluations"]] == [k.info.run_id for k in kids]
    for kid, e in zip(kids, saved["evaluations"]):
        assert kid.data.metrics["eval/fid"] == pytest.approx(e["fid"])
    assert saved["written_by"]["parent_run_id"] == grid["train_id"]
    # The export's model card carries the best setting's results and where they were measured.
    card = json.loads(Path(grid["ckpt"], "evaluation.json").read_text())
    assert card["results"]["fid"] == pytest.approx(min(fids))
    assert card["details"]["mlflow run"] == kids[best].info.run_id
    assert card["details"]["sampler"] == saved["sampler"]
    assert f"| fid | {min(fids):.6g} |" in Path(grid["ckpt"], "README.md").read_text()
    # The two evaluations shared the reference statistics through the cache.
    reports = [json.loads(Path(e["output_dir"], "report.json").read_text()) for e in saved["evaluations"]]
    assert [r["reference"]["cached"] for r in reports] == [False, True]
    assert reports[0]["reference"]["cache_file"] == reports[1]["reference"]["cache_file"]
    # The table (printed and on the parent run) and the plot.
    rows = [line for line in grid["out"].splitlines() if line.startswith("|")]
    assert rows[0] == "| sampler.cfg | fid | inception_score | kid | kid_std | precision | recall | mlflow run |"
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| 1.5", "| 3.0"]
    assert "(best)" in rows[2 + best] and kids[best].info.run_id in rows[2 + best]
    client = MlflowClient(env["uri"])
    [folder] = client.list_artifacts(grid["train_id"], "sampler_search")
    assert {a.path.rsplit("/", 1)[1] for a in client.list_artifacts(grid["train_id"], folder.path)} == {
        "sampler_search.md", "fid.png"}
    table = client.download_artifacts(grid["train_id"], f"{folder.path}/sampler_search.md", str(env["tmp"]))
    assert Path(table).read_text().strip() == "\n".join(rows)


def test_evaluation_again_resumes_its_child(env, grid, capsys):
    """One of the grid's settings evaluated again, now that sampler.json is beside the model:
    the same child run (resumed by name) and the same shards, so sampler.json did not change
    what identifies the model."""
    from mlflow import MlflowClient

    from pipelines.cli import main

    before = [k.info.run_id for k in children(env["uri"], grid["train_id"])]
    assert main(["evaluate", *SMALL, *GRID_REFERENCE, f"generation.checkpoint={grid['ckpt']}",
                 f"mlflow.tracking_uri={env['uri']}", "sampler.cfg=1.5"]) == 0
    assert [k.info.run_id for k in children(env["uri"], grid["train_id"])] == before
    kid = grid["children"][0]  # the grid's sampler.cfg=1.5 child: now with two evaluations
    assert len(MlflowClient(env["uri"]).get_metric_history(kid.info.run_id, "eval/fid")) == 2
    assert "shards computed/resumed  0/3" in capsys.readouterr().out


def test_sample_starts_from_sampler_json(env, grid, tmp_path, capsys):
    from PIL import Image

    from flowar.config import SamplerConfig
    from pipelines.cli import main
    from pipelines.sample import sample_images

    saved = json.loads(Path(grid["ckpt"], "sampler.json").read_text())
    best_cfg = saved["sampler"]["cfg"]
    files = tmp_path / "files"
    assert main(["sample", grid["ckpt"], "--classes", "0,1", "--per-class", "2", "--batch-size", "2",
                 "--out", str(tmp_path / "grid.png"), "--images-dir", str(files)]) == 0
    out, err = capsys.readouterr()
    assert f"sampler values from {grid['ckpt']}/sampler.json: num_steps=4 cfg={best_cfg} " in err
    assert f"(sampler: num_steps=4 cfg={best_cfg} guidance_low=0.0 guidance_high=0.9 " in out
    got = np.stack([np.asarray(Image.open(p)).transpose(2, 0, 1) for p in sorted(files.iterdir())])
    explicit, _ = sample_images(grid["ckpt"], [0, 1], 2, SamplerConfig(num_steps=4, cfg=best_cfg), batch_size=2)
    np.testing.assert_array_equal(got, explicit)
    other, _ = sample_images(grid["ckpt"], [0, 1], 2, SamplerConfig(num_steps=4, cfg=4.5 - best_cfg),
                             batch_size=2)
    assert not np.array_equal(got, other)  # the setting from sampler.json made a difference
    # --config's sampler section and the command line override sampler.json, in that order.
    conf = tmp_path / "sampler.yaml"
    conf.write_text("sampler:\n  cfg: 2.5\n  num_steps: 5\n")
    assert main(["sample", grid["ckpt"], "--config", str(conf), "sampler.num_steps=6", "--classes", "0",
                 "--per-class", "1", "--out", str(tmp_path / "g2.png")]) == 0
    out, err = capsys.readouterr()
    assert "(sampler: num_steps=6 cfg=2.5 " in out
    assert "(overridden by the config or command line: num_steps, cfg)" in err


def test_evaluate_precedence_of_sampler_json(env, grid, tmp_path, capsys):
    """sampler.json < config file < command line, shown by --print-config (no work)."""
    import yaml

    from pipelines.cli import main

    saved = json.loads(Path(grid["ckpt"], "sampler.json").read_text())
    args = NO_SAMPLER + [f"generation.checkpoint={grid['ckpt']}"]
    assert main(["evaluate", *args, "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert yaml.safe_load(out)["sampler"] == saved["sampler"]
    assert err.count("\n") == 1 and err.startswith(f"flowar evaluate: sampler values from {grid['ckpt']}")
    conf = tmp_path / "eval.yaml"
    conf.write_text("sampler:\n  cfg: 2.5\n  num_steps: 5\n")
    assert main(["evaluate", str(conf), *args, "sampler.num_steps=6", "--print-config"]) == 0
    sampler = yaml.safe_load(capsys.readouterr().out)["sampler"]
    assert (sampler["cfg"], sampler["num_steps"], sampler["guidance_high"]) == (2.5, 6, saved["sampler"]["guidance_high"])


# ------------------------------------------------------------------------- refused before any work

def test_grid_plan_order_and_output_folders(env, tmp_path):
    """The cartesian product in the order given (file lists, a command-line list over a file
    value), one subfolder of an explicit output_dir per combination; nothing runs."""
    from pipelines.evaluate.search import load_plan

    conf = tmp_path / "grid.yaml"
    conf.write_text("sampler:\n  cfg: [1.5, 2]\n  guidance_high: [0.7, 0.9]\n  num_steps: 8\n")
    plan = load_plan(str(conf), NO_SAMPLER + [f"generation.checkpoint={env['export'] / 'model'}",
                                        "sampler.num_steps=[4,6]", f"output_dir={tmp_path / 'out'}"])
    got = [(c.sampler.cfg, c.sampler.guidance_high, c.sampler.num_steps) for c in plan.evaluations]
    assert got == [(cfg, gh, n) for cfg in (1.5, 2.0) for gh in (0.7, 0.9) for n in (4, 6)]
    assert plan.evaluations[0].output_dir == str(tmp_path / "out" / "cfg=1.5_guidance_high=0.7_num_steps=4")
    assert len({c.output_dir for c in plan.evaluations}) == 8
    assert plan.printable()["sampler"]["cfg"] == [1.5, 2] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["generation.seed=[0,1]"], "generation.seed=[0, 1]: only sampler keys take lists"),
    (["sampler.cfg=[2,0.5]"], "sampler.cfg=0.5: guidance scales below 1 are not supported"),
    (["sampler.cfg=[2,3]", "metrics.fid=false"], "metrics.fid=false with a sampler grid"),
])
def test_bad_grids_are_refused_before_any_work(env, tmp_path, capsys, args, message):
    from pipelines.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["evaluate", *SMALL, f"generation.checkpoint={env['export'] / 'model'}",
               f"output_dir={tmp_path / 'out'}", f"mlflow.tracking_uri={uri}", *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("flowar evaluate: configuration error: ") and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("text, why", [("{\"sampler\": ", "not JSON"),
                                       ("{\"sampler\": {\"cfg\": 0.5}}", "sampler.cfg=0.5"),
                                       ("[1, 2]", "expected an object with a \"sampler\" mapping")])
def test_a_malformed_sampler_json_is_refused_naming_it(env, tmp_path, capsys, text, why):
    from pipelines.cli import main

    d = tmp_path / "export"
    shutil.copytree(env["export"], d)
    (d / "model" / "sampler.json").write_text(text)
    rc = main(["evaluate", *SMALL, f"generation.checkpoint={d / 'model'}",
               f"output_dir={tmp_path / 'out'}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{d / 'model' / 'sampler.json'} is malformed: " in err and why in err, err
    rc = main(["sample", str(d / "model"), "--out", str(tmp_path / "grid.png")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{d / 'model' / 'sampler.json'} is malformed: " in err and why in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "grid.png").exists()
    assert not (tmp_path / "m.db").exists()


def test_without_a_training_run_the_parent_is_named_after_the_export(env, tmp_path):
    """No training run recorded: the children go under a run named eval-<export folder> in
    mlflow.experiment, found again by name; run_id= names the parent instead. (The MLflow side
    of run_evaluate alone: the evaluations themselves are tested above.)"""
    from mlflow import MlflowClient

    from flowar.config import to_dict
    from pipelines.core.config import load_config
    from pipelines.evaluate.job import EvalConfig, open_child_run, resolve_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ckpt = str(env["export"] / "model")  # the export without a training link

    def child(*extra):
        cfg = load_config(EvalConfig, None, SMALL + [f"generation.checkpoint={ckpt}", *extra,
                                                     f"mlflow.tracking_uri={uri}", "mlflow.experiment=evals"])
        parent, note = resolve_run(cfg, {})
        return open_child_run(cfg, ckpt, parent, note, {"checkpoint": ckpt, "sampler": to_dict(cfg.sampler)})

    first, again, other = child(), child(), child("sampler.cfg=3")
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("evals")
    [parent] = client.search_runs([exp.experiment_id], "tags.`mlflow.runName` = 'eval-model'")
    assert parent.info.status == "FINISHED"
    assert {first["parent_run_id"], again["parent_run_id"], other["parent_run_id"]} == {parent.info.run_id}
    assert again["run_id"] == first["run_id"] != other["run_id"] and again["resumed"] and not first["resumed"]
    assert len(client.search_runs([exp.experiment_id])) == 3  # the parent and two children
    assert first["run_name"].startswith("eval cfg=2 gh=0.9 steps=4 [")
    named = child(f"run_id={first['run_id']}")  # an explicit parent (any run of the store)
    assert named["parent_run_id"] == first["run_id"]
    assert client.get_run(named["run_id"]).data.tags["mlflow.parentRunId"] == first["run_id"]
