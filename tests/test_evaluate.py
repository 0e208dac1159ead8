"""`flowar evaluate` end to end on a real Ray runtime, a real tiny FlowAR, a real (random-weight)
diffusers VAE, real Fashion-MNIST reference images and a real MLflow store; and `flowar sample`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipelines.core import tracking

pytestmark = pytest.mark.ray

BASE = ["generation.num_samples=12", "generation.samples_per_class=2", "generation.batch_size=2",
        "generation.shard_size=4", "generation.save_images=true", "generation.grid_classes=3",
        "generation.grid_per_class=2", "sampler.num_steps=4", "sampler.cfg=2.0",
        "reference.source=fashion-mnist:test", "reference.max_images=12", "reference.batch_size=12",
        "reference.shard_size=12", "metrics.kid=true", "metrics.prc=true"]


def make_export(d):
    """A training export under folder `d`: a tiny FlowAR's from_pretrained folder (d/model) with
    latents.json naming a tiny AutoencoderKL (random weights) saved beside it (d/vae)."""
    import torch
    from diffusers import AutoencoderKL

    from flowar import FlowAR
    from flowar.vae import load_vae
    from pipelines.data.latents import LatentDatasetMeta

    torch.manual_seed(0)
    FlowAR.from_preset("tiny", latent_channels=4, scales=(1, 2, 4), num_classes=10).save_pretrained(d / "model")
    AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(d / "vae")
    info = load_vae(str(d / "vae"))[1]
    meta = LatentDatasetMeta(vae=info.to_dict(), resolution=8, latent_size=4, latent_channels=4,
                             scales=[1, 2, 4], num_classes=10)
    (d / "model" / "latents.json").write_text(meta.to_json())
    return d


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def runs(ray_local, export, tmp_path_factory):
    """The same evaluation with 1 and with 2 workers, then the 2-worker one resumed after losing
    one shard file."""
    from pipelines.core.config import load_config
    from pipelines.evaluate.job import EvalConfig, run_evaluate

    import mlflow

    from flowar import FlowAR

    tmp = tmp_path_factory.mktemp("evals")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    # The export names its training run and step (config.json "training"), as flowar train's does.
    mlflow.set_tracking_uri(uri)
    exp_id = mlflow.MlflowClient(uri).create_experiment(
        "training", artifact_location=(tmp / "artifacts").as_uri())  # not ./mlruns
    with mlflow.start_run(experiment_id=exp_id) as train_run:
        pass
    FlowAR.from_pretrained(export / "model").save_pretrained(
        export / "model", extra={"training": {"mlflow_run_id": train_run.info.run_id, "step": 7}})
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOWAR_CACHE", str(tmp / "cache"))  # converted Inception + reference stats

        def run(name, workers):
            cfg = load_config(EvalConfig, None, BASE + [
                f"generation.checkpoint={export / 'model'}",  # its VAE from latents.json
                f"workers.num_workers={workers}", f"output_dir={tmp / name}",
                f"mlflow.tracking_uri={uri}"])
            return run_evaluate(cfg)

        one = run("one", 1)
        two = run("two", 2)
        shards = sorted((tmp / "two" / "shards").glob("*.npz"))
        mtimes = {p.name: p.stat().st_mtime_ns for p in shards}
        shards[1].unlink()  # as if the evaluation had been killed before this shard finished
        resumed = run("two", 1)
    return {"one": one, "two": two, "resumed": resumed, "mtimes": mtimes, "lost": shards[1].name,
            "tmp": tmp, "uri": uri, "train_run_id": train_run.info.run_id}


def _images(report):
    """The saved images of an evaluation, read back shard by shard from its output folder."""
    from pipelines.evaluate.outputs import Folder
    from pipelines.evaluate.shards import shard_images

    return np.concatenate([images for _, images in shard_images(Folder(report["output_dir"]).child("shards"))])


def _stats(report):
    """The generated statistics, folded from the shard files in index order."""
    from pipelines.evaluate.fold import InOrder, Summary
    from pipelines.evaluate.outputs import Folder
    from pipelines.evaluate.shards import index_shards, shard_name

    shards, folder, summary = index_shards(12, 4), Folder(report["output_dir"]).child("shards"), Summary()
    fold = InOrder(shards, lambda s: folder.open_npz(shard_name(*s)), summary)
    for s in reversed(shards):  # arriving last-first: every shard waits in its file
        fold.arrived(s)
    return summary.result()["stats"]


def test_images_identical_with_1_and_2_workers(runs):
    one, two = _images(runs["one"]), _images(runs["two"])
    assert runs["one"]["workers"]["count"] == 1 and runs["two"]["workers"]["count"] == 2
    assert one.shape == (12, 3, 8, 8) and one.dtype == np.uint8
    assert len({im.tobytes() for im in one}) == 12  # every index has its own noise
    np.testing.assert_array_equal(one, two)
    # The running sums of the two evaluations (arrival orders differ) are bit-equal, and equal
    # to the same shards folded from disk in reverse arrival.
    s1, s2 = _stats(runs["one"]), _stats(runs["two"])
    np.testing.assert_array_equal(s1.sum, s2.sum)
    np.testing.assert_array_equal(s1.outer, s2.outer)
    r1, r2 = runs["one"]["results"], runs["two"]["results"]
    assert np.isfinite(r1["fid"]) and r1["fid"] > 0
    for k in ("fid", "kid", "precision", "recall"):
        assert r1[k] == r2[k], k  # bit-equal: shards are added in index order at any worker count


def test_resumed_evaluation_skips_finished_shards(runs):
    resumed, two = runs["resumed"], runs["two"]
    counts = ("total", "resumed", "computed")
    assert {k: two["shards"][k] for k in counts} == {"total": 3, "resumed": 0, "computed": 3}
    assert {k: resumed["shards"][k] for k in counts} == {"total": 3, "resumed": 2, "computed": 1}
    assert sum(resumed["shards"]["by_node"].values()) == 1
    assert resumed["throughput"]["images"] == 4  # only the lost shard's samples were made again
    shard_dir = runs["tmp"] / "two" / "shards"
    for name, mtime in runs["mtimes"].items():
        if name != runs["lost"]:
            assert (shard_dir / name).stat().st_mtime_ns == mtime, f"{name} was rewritten"
    assert resumed["results"]["fid"] == two["results"]["fid"]
    assert resumed["reference"]["cached"] is True  # reference stats came from the cache


def test_report_and_mlflow(runs):
    import mlflow

    rep = runs["one"]
    assert rep["results"]["inception_score"].startswith("unavailable")  # pool-only weights
    assert rep["num_generated"] == 12 and rep["num_reference"] == 12 and rep["kid_subset_size"] == 12
    saved = json.loads((runs["tmp"] / "one" / "report.json").read_text())
    assert saved["config"]["sampler"]["cfg"] == 2.0 and saved["settings"]["seed"] == 0
    client = mlflow.tracking.MlflowClient(runs["uri"])
    train_id = runs["train_run_id"]
    assert rep["step"] == 7 and rep["mlflow"]["parent_run_id"] == train_id  # from the export
    assert saved["mlflow_run_id"] == rep["mlflow_run_id"] and saved["mlflow"]["parent_run_id"] == train_id
    # The three evaluations (1 worker, 2 workers, resumed) have the same settings, so they are
    # one child run of the training run, created once and resumed twice, in its experiment.
    exp_id = client.get_run(train_id).info.experiment_id
    children = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{train_id}'")
    assert [c.info.run_id for c in children] == [rep["mlflow_run_id"]]
    assert {runs[k]["mlflow_run_id"] for k in ("one", "two", "resumed")} == {rep["mlflow_run_id"]}
    assert [runs[k]["mlflow"]["resumed"] for k in ("one", "two", "resumed")] == [False, True, True]
    child = children[0]
    assert child.info.status == "FINISHED"
    assert child.info.run_name.startswith("eval cfg=2 gh=0.9 steps=4 [")
    assert child.info.run_name == rep["mlflow"]["run_name"]
    hist = client.get_metric_history(child.info.run_id, "eval/fid")
    assert [m.step for m in hist] == [7, 7, 7]  # each evaluation logged at the checkpoint step
    assert hist[0].value == pytest.approx(rep["results"]["fid"])
    assert "eval/inception_score" not in child.data.metrics
    assert child.data.tags["eval/inception_score"].startswith("unavailable")
    assert {a.path for a in client.list_artifacts(child.info.run_id)} == {"report.json", "samples.png", "images"}
    assert tracking.image_steps(client, child.info.run_id, "eval_samples") == [7, 7, 7]  # the grid, per evaluation
    params = child.data.params
    assert (params["sampler.cfg"], params["sampler.num_steps"], params["generation.num_samples"],
            params["generation.seed"], params["reference.source"]) == ("2.0", "4", "12", "0",
                                                                       "fashion-mnist:test")
    assert params["checkpoint"] == rep["settings"]["checkpoint"]
    # Nothing goes into the training run itself any more.
    train = client.get_run(train_id)
    assert not [k for k in train.data.metrics if k.startswith("eval/")]
    assert not client.list_artifacts(train_id)


def test_sample_cli_writes_grid_and_files_of_the_evaluated_samples(runs, export, tmp_path):
    from PIL import Image

    from pipelines.cli import main

    out, files = tmp_path / "grid.png", tmp_path / "files"
    rc = main(["sample", str(export / "model"), "sampler.num_steps=4", "sampler.cfg=2.0",
               "--classes", "0,1", "--per-class", "2", "--batch-size", "2", "--out", str(out),
               "--images-dir", str(files)])
    assert rc == 0
    assert Image.open(out).size == (2 * 10 + 2, 2 * 10 + 2)  # 2x2 grid of 8px images, 2px gaps
    written = sorted(files.iterdir())
    assert [p.name for p in written] == [f"class{i // 2}_{i:06d}.png" for i in range(4)]
    evaluated = _images(runs["one"])[:4]  # indices 0-3 = classes 0, 1 (2 per class)
    for p, ref in zip(written, evaluated):
        got = np.asarray(Image.open(p)).transpose(2, 0, 1).astype(int)
        assert np.abs(got - ref.astype(int)).max() <= 1


def test_bad_inputs_fail_before_work(runs, export, tmp_path):
    from flowar.config import ConfigError
    from pipelines.cli import main as cli
    from pipelines.core.config import load_config
    from pipelines.evaluate.job import EvalConfig, run_evaluate
    from pipelines.evaluate.inception import CONVERTED_FILE

    with pytest.raises(ConfigError, match="generation.checkpoint"):
        load_config(EvalConfig, None, ["reference.source=fashion-mnist"])
    with pytest.raises(ConfigError, match="shard"):
        load_config(EvalConfig, None, BASE + ["generation.checkpoint=x", "generation.shard_size=3"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(EvalConfig, None, BASE + ["generation.checkpoint=x", "generation.nope=1"])
    changed = load_config(EvalConfig, None, BASE + [
        f"generation.checkpoint={export / 'model'}", "generation.seed=1", f"output_dir={runs['tmp'] / 'one'}", f"mlflow.tracking_uri={runs['uri']}",
        f"inception.weights={runs['one']['extractor']['weights']}"])  # the file the workers found
    with pytest.raises(ConfigError, match="differs in: seed"):
        run_evaluate(changed)
    # Weights that the workers' node does not have: refused as the workers start, before work.
    missing = load_config(EvalConfig, None, BASE + [
        f"generation.checkpoint={export / 'model'}", f"output_dir={tmp_path / 'out'}",
        f"inception.weights={tmp_path / CONVERTED_FILE}"])
    with pytest.raises(ConfigError, match=r"inception\.weights=.*does not exist on"):
        run_evaluate(missing)
    assert not (tmp_path / "out").exists()
    for source in ("/nonexistent/ref.npz", str(tmp_path)):  # missing file; folder without images
        bad_ref = load_config(EvalConfig, None, BASE + [
            f"generation.checkpoint={export / 'model'}", f"reference.source={source}",
            f"output_dir={tmp_path / 'out'}"])
        with pytest.raises(ConfigError, match="reference.source"):
            run_evaluate(bad_ref)
        assert not (tmp_path / "out").exists()  # refused before any work
    assert cli(["sample", str(export / "model"), "--classes", "0,10", "--vae", str(export / "vae")]) == 2
