"""In-training evaluation (train.eval_every): real Ray Train workers, a real MLflow store, real
Inception features, a real (tiny, random-weight) VAE decoding the samples.

One training run of 4 steps with an evaluation every 2 steps, then `flowar evaluate` and
`flowar sample` of its export with the same settings: the last in-training FID must equal the
evaluation's (the same samples, the same reference statistics, read from the shared cache), and
the class accuracy must equal the classifier's verdict on `flowar sample`'s images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from test_train import TINY, make_dataset, mlflow_run

pytestmark = pytest.mark.usefixtures("ray_local")

N = 8  # samples per evaluation: sample i has class i (ceil(8 / 10) = 1 per class)


def tiny_vae(path: Path) -> Path:
    """A random-weight AutoencoderKL saved as a diffusers folder: 4-channel latents, 8x down."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, latent_channels=4,
                  norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).save_pretrained(path)
    return path


def reference_folder(path: Path, n: int = N) -> Path:
    """n Fashion-MNIST training images as PNG files: a reference with its own cache key."""
    from PIL import Image

    from pipelines.data.bundled import fashion_mnist_file
    from pipelines.data.sources import read_idx

    path.mkdir(parents=True)
    for i, image in enumerate(read_idx(fashion_mnist_file("train", "images"))[:n]):
        Image.fromarray(image).save(path / f"{i:03d}.png")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A latent dataset decoded by a tiny saved VAE (4x4 latents -> 32 px), a reference folder
    of 8 Fashion-MNIST PNGs unique to this test (a fresh cache key) and a classifier."""
    from pipelines.evaluate.classifier import train_classifier

    root = tmp_path_factory.mktemp("train-eval")
    data = make_dataset(root / "latents", vae=str(tiny_vae(root / "vae")))
    train_classifier(root / "classifier", epochs=1, limit=512, progress=False)
    return {"root": root, "data": data, "reference": reference_folder(root / "reference"),
            "classifier": root / "classifier"}


def eval_overrides(inputs) -> list[str]:
    return ["train.eval_every=2", f"train.eval_samples={N}", "train.eval_batch_size=4",
            f"train.eval_reference={inputs['reference']}", f"train.eval_classifier={inputs['classifier']}"]


@pytest.fixture(scope="module")
def trained(inputs):
    from pipelines.cli import main

    root = inputs["root"]
    uri = f"sqlite:///{root / 'mlflow.db'}"
    code = main(["train", str(TINY), f"data.path={inputs['data']}", "train.max_steps=4",
                 "train.checkpoint_every=4", "train.log_every=2", "mlflow.run_name=evaluated",
                 f"mlflow.tracking_uri={uri}", f"ray.storage_path={root / 'ray_results'}",
                 *eval_overrides(inputs)])
    assert code == 0
    c, runs = mlflow_run(uri, "evaluated")
    return {"uri": uri, "client": c, "run": runs[0], "export": root / "ray_results" / "evaluated" / "export"}


def history(trained, key: str) -> dict[int, float]:
    return {m.step: m.value for m in trained["client"].get_metric_history(trained["run"].info.run_id, key)}


def test_metrics_logged_at_every_evaluation_step(trained):
    fid, kid, acc = (history(trained, f"eval/{k}") for k in ("fid", "kid", "class_accuracy"))
    assert sorted(fid) == sorted(kid) == sorted(acc) == [2, 4]
    assert all(np.isfinite(v) and v > 0 for v in fid.values())
    assert all(v in {k / N for k in range(N + 1)} for v in acc.values())  # a count out of N
    # the reference was computed once, at the first evaluation, and read from the cache after
    assert sorted(history(trained, "eval/reference_seconds")) == [2]


def test_last_evaluation_equals_flowar_evaluate_of_the_export(trained, inputs, tmp_path):
    """The same samples (index -> class and noise) and the same reference statistics, which the
    evaluation finds in the cache the training wrote."""
    import json

    from pipelines.cli import main

    code = main([
        "evaluate", f"generation.checkpoint={trained['export']}", f"generation.num_samples={N}",
        "generation.samples_per_class=1", "generation.batch_size=4", "generation.shard_size=4",
        "sampler.num_steps=4", "sampler.cfg=1.5", f"reference.source={inputs['reference']}",
        "reference.batch_size=4", "reference.shard_size=4", "metrics.kid=true", "metrics.isc=false", "metrics.isc_splits=1",
        "workers.num_workers=2", f"mlflow.tracking_uri={trained['uri']}",
        f"output_dir={tmp_path / 'eval'}"])
    assert code == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["reference"]["cached"] is True
    assert report["results"]["fid"] == pytest.approx(history(trained, "eval/fid")[4], rel=1e-6)
    assert report["results"]["kid"] == pytest.approx(history(trained, "eval/kid")[4], rel=1e-4, abs=1e-9)

    # Lineage: the evaluation's metrics are logged against the export's MLflow model, which is
    # the evaluation run's input beside the reference; the training run lists its reference too.
    c = trained["client"]
    model_id = json.loads((trained["export"] / "config.json").read_text())["training"]["mlflow_model_id"]
    model_metrics = {(m.key, m.run_id) for m in c.get_logged_model(model_id).metrics}
    assert ("eval/fid", report["mlflow_run_id"]) in model_metrics  # flowar evaluate's child run
    assert ("eval/fid", trained["run"].info.run_id) in model_metrics  # the last in-training one
    child = c.get_run(report["mlflow_run_id"])
    assert [m.model_id for m in child.inputs.model_inputs] == [model_id]
    contexts = {d.dataset.name: {t.value for t in d.tags} for d in child.inputs.dataset_inputs}
    assert contexts == {"reference:reference": {"evaluation"}}
    training = {d.dataset.name: {t.value for t in d.tags} for d in trained["run"].inputs.dataset_inputs}
    assert training == {"latents": {"training"}, "reference:reference": {"evaluation"}}


def test_class_accuracy_is_the_classifiers_verdict_on_the_samples(trained, inputs):
    import torch

    from flowar.config import SamplerConfig
    from pipelines.core.images import from_uint8
    from pipelines.evaluate.classifier import accuracy, load_classifier
    from pipelines.sample import sample_images

    images, indices = sample_images(str(trained["export"]), list(range(N)), 1,
                                    SamplerConfig(num_steps=4, cfg=1.5))
    expected = accuracy(load_classifier(inputs["classifier"]), from_uint8(images), torch.tensor(indices))
    assert history(trained, "eval/class_accuracy")[4] == pytest.approx(expected)


@pytest.mark.parametrize("override, message", [
    (["train.eval_reference="], "needs train.eval_reference"),
    (["train.eval_samples=1"], "train.eval_samples=1 must be at least 2"),
    (["train.eval_every=-1"], "train.eval_every=-1 must not be negative"),
])
def test_bad_evaluation_settings_refused_when_read(override, message):
    from flowar.config import ConfigError
    from pipelines.train.config import load_train_config

    base = ["data.path=unused", "train.eval_every=2", "train.eval_reference=fashion-mnist:test"]
    with pytest.raises(ConfigError, match=message):
        load_train_config(TINY, base + override)


@pytest.mark.parametrize("case, key", [("classifier", "train.eval_classifier"),
                                       ("reference", "train.eval_reference"),
                                       ("vae", "train.eval_every needs images")])
def test_unusable_evaluation_inputs_refused_before_training(inputs, tmp_path, capsys, case, key):
    """Checked on the driver before any worker starts, by the run and by --print-config alike."""
    from pipelines.cli import main

    data, over = inputs["data"], eval_overrides(inputs)
    if case == "classifier":
        over.append(f"train.eval_classifier={tmp_path}")
    elif case == "reference":
        over.append(f"train.eval_reference={tmp_path / 'missing'}")
    else:
        data = make_dataset(tmp_path / "latents", vae=str(tmp_path / "no-vae"))
    common = [str(TINY), f"data.path={data}", f"ray.storage_path={tmp_path / 'ray_results'}",
              f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", *over]
    for argv in (["train", *common, "--print-config"], ["train", *common]):
        assert main(argv) == 2
        assert key in capsys.readouterr().err
    assert not (tmp_path / "ray_results").exists() and not (tmp_path / "mlflow.db").exists()


def _evaluate_in_group(rank: int, world: int, port: int, spec: dict, out: str) -> None:
    """One rank of a gloo group that runs the in-training evaluation of fixed weights."""
    import json
    import os

    import torch
    import torch.distributed as dist

    from flowar import FlowAR
    from pipelines.evaluate.reference import reference_spec
    from pipelines.train.config import load_train_config
    from pipelines.train.evaluation import InTrainingEval

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FLOWAR_CACHE=spec["cache"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    job = load_train_config(TINY, ["data.path=unused", *spec["overrides"]])
    torch.manual_seed(0)
    weights = FlowAR(job.model.architecture()).state_dict()
    evaluate = InTrainingEval(job, {"id": spec["vae"]}, reference_spec(spec["reference"]),
                              torch.device("cpu"), rank, world)
    metrics = evaluate(weights)
    if rank == 0:
        Path(out).write_text(json.dumps(metrics))
    dist.destroy_process_group()


def test_same_metrics_on_one_and_two_ranks(inputs, tmp_path):
    """The same samples and reference give the same FID/KID on 1 and 2 ranks when one rank has no
    batch at all (8 samples in one batch of 8) and computes the reference with none (two ranks
    that each have batches are tested against `flowar evaluate` above)."""
    batch = 8
    import json
    import socket

    import torch.multiprocessing as mp

    results = {}
    for world in (1, 2):
        with socket.socket() as s:  # a free port for this group's rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        spec = {"cache": str(tmp_path / f"cache-{world}"), "vae": str(inputs["root"] / "vae"),
                "reference": str(inputs["reference"]),
                "overrides": ["train.eval_every=1", f"train.eval_samples={N}",
                              f"train.eval_batch_size={batch}",
                              f"train.eval_reference={inputs['reference']}"]}
        out = tmp_path / f"metrics-{world}.json"
        mp.spawn(_evaluate_in_group, args=(world, port, spec, str(out)), nprocs=world, join=True)
        results[world] = json.loads(out.read_text())
        assert (tmp_path / f"cache-{world}" / "reference").is_dir()  # computed, then cached
    assert results[1]["eval/fid"] == pytest.approx(results[2]["eval/fid"], rel=1e-9)
    assert results[1]["eval/kid"] == pytest.approx(results[2]["eval/kid"], rel=1e-6, abs=1e-12)
