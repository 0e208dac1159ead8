"""A training run as MLflow 3 shows it, through a real `mlflow server` on loopback (REST API,
served artefacts): the logged model that loads by `models:/` URI and makes images, the latent
dataset as the run's input, system metrics per node, the source tags, the sample grids per step,
and the experiment's model-training kind.

One tiny `flowar train` (4 steps, a real random-weight VAE so the model can decode) serves all.
"""

from __future__ import annotations

import hashlib
import json
import subprocess

import numpy as np
import pytest

from conftest import ROOT
from test_train import TINY, make_dataset
from test_train_eval import tiny_vae

pytestmark = pytest.mark.usefixtures("ray_local")
REGISTERED = "flowar-tiny-test"


@pytest.fixture(scope="module")
def trained(mlflow_server, tmp_path_factory):
    from mlflow import MlflowClient

    from pipelines.cli import main

    root = tmp_path_factory.mktemp("served")
    data = make_dataset(root / "latents", vae=str(tiny_vae(root / "vae")))
    code = main(["train", str(TINY), f"data.path={data}", "train.max_steps=4", "train.checkpoint_every=2",
                 "train.log_every=2", "train.sample_every=2", "train.samples_per_class=1",
                 "mlflow.run_name=served", f"mlflow.tracking_uri={mlflow_server}",
                 "mlflow.system_metrics_every=1", f"mlflow.register_model={REGISTERED}",
                 f"ray.storage_path={root / 'ray_results'}"])
    assert code == 0
    c = MlflowClient(mlflow_server)
    exp = c.get_experiment_by_name("flowar")
    [run] = c.search_runs([exp.experiment_id], filter_string="tags.`mlflow.runName` = 'served'")
    return {"client": c, "run": run, "experiment": exp, "data": data, "uri": mlflow_server,
            "export": root / "ray_results" / "served" / "export"}


def test_the_run_has_a_logged_model_that_loads_by_uri_and_makes_images(trained):
    import mlflow
    import pandas as pd

    c, run = trained["client"], trained["run"]
    [model] = c.search_logged_models([run.info.experiment_id],
                                     filter_string=f"source_run_id = '{run.info.run_id}'")
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(model.model_id, 4)]
    training = json.loads((trained["export"] / "config.json").read_text())["training"]
    assert training["mlflow_model_id"] == model.model_id  # flowar evaluate links its metrics by it
    [version] = c.search_model_versions(f"name = '{REGISTERED}'")
    assert model.model_id in version.source  # the registry entry points at the logged model

    mlflow.set_tracking_uri(trained["uri"])
    loaded = mlflow.pyfunc.load_model(f"models:/{model.model_id}")
    labels = pd.DataFrame({"class_label": [0, 3, 7]})
    images = loaded.predict(labels, params={"num_steps": 4, "seed": 1})
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, loaded.predict(labels, params={"num_steps": 4, "seed": 1}))
    assert not np.array_equal(images, loaded.predict(labels, params={"num_steps": 4, "seed": 2}))
    with pytest.raises(Exception, match="class_label"):
        loaded.predict(pd.DataFrame({"class_label": [10]}))


def test_the_latent_dataset_is_the_runs_training_input(trained):
    run = trained["client"].get_run(trained["run"].info.run_id)
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1, inputs
    dataset, tags = inputs[0].dataset, {t.key: t.value for t in inputs[0].tags}
    record = json.loads((trained["data"] / "metadata.json").read_text())  # make_dataset writes no _job.json
    assert dataset.digest == hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]
    assert dataset.name == "latents" and tags["mlflow.data.context"] == "training"
    assert json.loads(dataset.source)["uri"] == str(trained["data"])
    assert json.loads(dataset.profile)["rows"] == 64


def test_system_metrics_are_logged_per_node(trained):
    metrics = trained["client"].get_run(trained["run"].info.run_id).data.metrics
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        assert f"system/node0/{name}" in metrics, sorted(metrics)


def test_the_source_tags_name_the_commit_of_the_checkout(trained):
    tags = trained["run"].data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert tags["mlflow.source.git.commit"] == head
    assert tags["mlflow.source.name"].startswith("flowar train") and tags["mlflow.user"]


def test_sample_grids_are_images_per_step_and_the_experiment_is_model_training(trained):
    from pipelines.core import tracking

    assert tracking.image_steps(trained["client"], trained["run"].info.run_id, "samples") == [2, 4]
    assert trained["experiment"].tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_resumed_run_with_a_changed_value_keeps_the_param_and_tags_the_change(mlflow_server):
    """MLflow params are immutable: log_config records a changed value as changed.<key>."""
    from pipelines.core import tracking
    from pipelines.train.config import load_train_config

    run_id, _ = tracking.start_or_resume_run(mlflow_server, "log-config", "resumed")
    for workers in (2, 1):
        cfg = load_train_config(TINY, ["data.path=unused", f"train.num_workers={workers}"])
        tracking.log_config(mlflow_server, run_id, cfg, None, tags={"preset": "tiny"})
    run = tracking.client(mlflow_server).get_run(run_id)
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.tags["changed.train.num_workers"] == "1" and run.data.tags["preset"] == "tiny"
