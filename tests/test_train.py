"""flowar train on a real local Ray runtime and a real MLflow SQLite store, 2 CPU workers.

The tiny preset on 64 latents of 4x4x4: DDP and FSDP2 train and the loss falls; a worker killed
mid-run is recovered from its checkpoint; an interrupted run resumed by re-running the same command
ends with exactly the weights of an uninterrupted one; MLflow holds params, metrics, a sample grid
and the exported model; unfit datasets and unknown keys are refused before training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowar.config import ConfigError
from pipelines.core import tracking

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "train-tiny.yaml"


def make_dataset(path: Path, count: int = 64, side: int = 4, channels: int = 4,
                 num_classes: int = 10, flip: bool = True, image_scales=(), std: float = 0.05,
                 parts: int = 2, dtype=np.float32, vae: str = "none/test-vae") -> Path:
    """A finished latent dataset written with the encode job's own writer (pipelines.data.latents),
    naming `vae` (the default names none that loads: sample grids then show raw latents).

    Means are a per-class pattern plus a little noise, so the model has something to learn.
    The image-derived scale k (`image_scales`) is the latent area-pooled to k x k plus 1, a map
    that pooling the latent alone would not give."""
    from pipelines.data.latents import LatentDataset, LatentDatasetMeta

    def pool(x, k):
        return x.reshape(*x.shape[:-2], k, side // k, k, side // k).mean(axis=(-3, -1)) + 1.0

    rng = np.random.default_rng(0)
    labels = np.arange(count) % num_classes
    patterns = rng.normal(size=(num_classes, channels, side, side)).astype(np.float32)
    mean = patterns[labels] + 0.1 * rng.normal(size=(count, channels, side, side)).astype(np.float32)
    std = np.full_like(mean, std)
    columns = {"key": [f"img{i:05d}" for i in range(count)], "label": labels.astype(np.int64),
               "mean": mean, "std": std}
    if flip:
        columns.update(mean_flip=mean[..., ::-1].copy(), std_flip=std.copy())
    for k in image_scales:
        columns.update({f"mean_img{k}": pool(mean, k), f"std_img{k}": pool(std, k) - 1.0})
        if flip:
            columns.update({f"mean_flip_img{k}": pool(mean[..., ::-1], k),
                            f"std_flip_img{k}": pool(std, k) - 1.0})
    meta = LatentDatasetMeta(vae={"id": vae, "scaling_factor": 1.0, "shift_factor": 0.0},
                             resolution=side * 8, latent_size=side, latent_channels=channels,
                             scales=[side], count=count, num_classes=num_classes, flip=flip,
                             image_scales=list(image_scales))
    (path / "rejects").mkdir(parents=True)
    if dtype != np.float32:
        meta.dtype = np.dtype(dtype).name
        columns = {k: v.astype(dtype) if getattr(v, "dtype", None) == np.float32 else v
                   for k, v in columns.items()}
    edges = np.linspace(0, count, parts + 1).astype(int)  # part files, like an encode's shards
    for shard, (a, b) in enumerate(zip(edges[:-1], edges[1:])):
        part = {k: v[a:b] for k, v in columns.items()}
        LatentDataset(str(path)).write_part(shard, int(a), int(b), part, [], meta)
    LatentDataset(str(path)).finalise(meta)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("latents") / "tiny")


def job(dataset, tmp_path, mlflow_uri, *overrides):
    from pipelines.train.config import load_train_config

    return load_train_config(TINY, [f"data.path={dataset}", f"mlflow.tracking_uri={mlflow_uri}",
                                    f"ray.storage_path={tmp_path / 'ray_results'}", *overrides])


def final_weights(result) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    with result.checkpoint.as_directory() as d:
        return load_file(str(Path(d) / "model.safetensors"))


def mlflow_run(uri: str, name: str):
    from mlflow import MlflowClient

    c = MlflowClient(uri)
    runs = c.search_runs([c.get_experiment_by_name("flowar").experiment_id],
                         filter_string=f"tags.`mlflow.runName` = '{name}'")
    return c, runs


def losses(c, run_id) -> list[float]:
    return [m.value for m in sorted(c.get_metric_history(run_id, "loss"), key=lambda m: m.step)]


# ------------------------------------------------------------------------------------ recipe units

def test_weight_decay_applies_to_matrices_only():
    """timm's groups (what the training loop uses) follow the published rule, misc.add_weight_decay:
    every matrix decays (the class embedding and the flow net too), 1-D tensors and biases do not."""
    from timm.optim import param_groups_weight_decay

    from flowar import FlowAR

    model = FlowAR.from_preset("tiny", latent_channels=4, scales=(1, 2, 4), num_classes=10)
    no_decay, decay = param_groups_weight_decay(model, 0.02)
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim < 2 for p in no_decay["params"])
    assert any(p is model.ar.class_embed.weight for p in decay["params"])  # published: decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    # exactly the published rule's split of the FlowAR model, parameter by parameter
    rule = [p for name, p in model.named_parameters() if p.ndim >= 2 and not name.endswith(".bias")]
    rest = [p for name, p in model.named_parameters() if p.ndim < 2 or name.endswith(".bias")]
    assert [id(p) for p in decay["params"]] == [id(p) for p in rule]
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in rest]


def test_an_export_keeps_the_architecture_not_the_training_options(tmp_path):
    """model.grad_checkpointing is how the model was trained: it checkpoints the blocks'
    activations in training (pipelines/train/parallelize.py) and stays out of the export's
    config.json, which loads with or without it (exports of earlier versions carry it)."""
    from flowar import FlowAR
    from pipelines.train.checkpointing import export_ema
    from pipelines.train.config import load_train_config
    from pipelines.train.parallelize import apply_activation_checkpointing

    cfg = load_train_config(TINY, ["data.path=unused", "model.grad_checkpointing=true"])
    assert cfg.model.grad_checkpointing and load_train_config(TINY, [
        "data.path=unused", "preset=H"]).model.grad_checkpointing  # as the published H trains
    model = FlowAR(cfg.model.architecture()).train()
    assert apply_activation_checkpointing(model) == 3  # 2 AR blocks + 1 flow block
    latents, labels = torch.randn(2, 4, 4, 4), torch.tensor([1, 2])
    model.loss(latents, labels)[0].backward()
    assert all(p.grad is not None for p in model.parameters())
    ema = {k: v.detach() for k, v in model.named_parameters()}
    export = tmp_path / "export"
    export_ema(cfg.model, ema, export, {"vae": {}})  # the job's model section, as it is
    config = json.loads((export / "config.json").read_text())
    assert "grad_checkpointing" not in config["model"]
    assert FlowAR.from_pretrained(export).config == cfg.model.architecture()
    config["model"]["grad_checkpointing"] = True  # an export written before it left the model
    (export / "config.json").write_text(json.dumps(config))
    assert FlowAR.from_pretrained(export).config == cfg.model.architecture()


def test_lr_rule_warmup_and_cosine_floor():
    from flowar.optim import lr_at, scaled_lr

    peak = scaled_lr(5e-5, 2048)
    assert peak == pytest.approx(4e-4)  # the published README figure
    assert lr_at(0, peak, 100, 400, 1e-5) == 0.0
    assert lr_at(50, peak, 100, 400, 1e-5) == pytest.approx(peak / 2)
    assert lr_at(100, peak, 100, 400, 1e-5) == pytest.approx(peak)
    assert lr_at(250, peak, 100, 400, 1e-5) == pytest.approx((peak + 1e-5) / 2)
    assert lr_at(400, peak, 100, 400, 1e-5) == pytest.approx(1e-5)
    assert lr_at(999, peak, 100, 400, 1e-5) == pytest.approx(1e-5)


def test_ema_averages_and_round_trips_its_state():
    from flowar.optim import EMA, clip_grad_norm

    net = torch.nn.Linear(3, 2)
    ema = EMA(net, decay=0.5)
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    torch.testing.assert_close(ema.state_dict()["weight"], start + 0.5)
    other = EMA(torch.nn.Linear(3, 2), decay=0.5)
    other.load_state_dict(ema.state_dict())
    torch.testing.assert_close(other.state_dict()["weight"], start + 0.5)
    with pytest.raises(KeyError):
        other.load_state_dict({"weight": start})
    net.weight.grad = torch.full_like(net.weight, 10.0)
    norm = clip_grad_norm(net.parameters(), 3.0)
    assert norm == pytest.approx(10.0 * math.sqrt(6))
    assert float(net.weight.grad.norm()) == pytest.approx(3.0, rel=1e-4)


def test_non_finite_loss_gives_a_stop_message_naming_the_step():
    from pipelines.train.loop import non_finite_message

    assert non_finite_message(torch.tensor([1.0, 0.5]), 2.0, 7) == ""
    msg = non_finite_message(torch.tensor([float("nan"), 0.5]), 2.0, 7)
    assert "step 7" in msg and "nan" in msg
    assert non_finite_message(torch.tensor([1.0, 0.5]), float("inf"), 3)


# ------------------------------------------------------------------------------------ no Ray needed

def test_unknown_config_key_is_refused(dataset, capsys):
    from pipelines.cli import main

    assert main(["train", str(TINY), f"data.path={dataset}", "train.learning_rate=1"]) == 2
    assert "train.learning_rate" in capsys.readouterr().err
    # overrides after an option still count as overrides; an unknown flag is an argparse error
    assert main(["train", str(TINY), "--print-config", f"data.path={dataset}", "train.max_steps=7"]) == 0
    assert "max_steps: 7" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", str(TINY), "--max-steps", "7"])
    assert "unrecognized arguments: --max-steps 7" in capsys.readouterr().err


def test_print_config_shows_every_resolved_key_and_runs_nothing(dataset, tmp_path, capsys):
    import yaml

    from pipelines.cli import main
    from pipelines.train.config import load_train_config

    # A dataset without image-derived scales is refused as the run refuses it...
    refused = [str(TINY), f"data.path={dataset}", "model.scale_construction=image"]
    assert main(["train", *refused, "--print-config"]) == 2
    assert "encode.image_pyramid=[1, 2]" in capsys.readouterr().err
    # ...and one that has them prints.
    with_scales = make_dataset(tmp_path / "image-scales", count=16, image_scales=(1, 2))
    args = [str(TINY), f"data.path={with_scales}", "model.scale_construction=image",
            f"ray.storage_path={tmp_path / 'ray_results'}"]
    assert main(["train", *args, "--print-config"]) == 0
    printed = capsys.readouterr().out
    data = yaml.safe_load(printed)
    assert data["model"]["ar_width"] == 64  # from the preset, not the file
    assert data["model"]["scale_construction"] == "image" and data["train"]["max_steps"] == 40
    assert data["model"]["scales"] == [1, 2, 4] and "attn_dropout" in data["model"]  # defaults too
    (tmp_path / "resolved.yaml").write_text(printed)  # the print is itself the same job's config
    assert load_train_config(tmp_path / "resolved.yaml") == load_train_config(TINY, args[1:])
    assert not (tmp_path / "ray_results").exists()


def test_sampler_settings_that_cannot_sample_are_refused_before_training(dataset, tmp_path, mlflow_uri):
    from pipelines.train.job import run_train

    with pytest.raises(ConfigError, match="sampler.num_steps"):
        run_train(job(dataset, tmp_path, mlflow_uri, "sampler.num_steps=2"))
    with pytest.raises(ConfigError, match="sample_classes"):
        run_train(job(dataset, tmp_path, mlflow_uri, "train.sample_classes=[3,12]"))
    assert not (tmp_path / "ray_results").exists()


def test_dataset_that_does_not_fit_the_model_is_refused_before_training(tmp_path, mlflow_uri):
    from pipelines.train.job import run_train

    with pytest.raises(ConfigError, match=r"scale_construction.*image_pyramid=\[1, 2\]"):
        run_train(job(make_dataset(tmp_path / "img", count=8, image_scales=(1,)), tmp_path,
                         mlflow_uri, "model.scale_construction=image"))

    other = make_dataset(tmp_path / "eight", count=8, side=8)  # 8x8 latents, model ends at 4
    cfg = job(other, tmp_path, mlflow_uri)
    with pytest.raises(ConfigError, match="latent_size"):
        run_train(cfg)
    assert not (tmp_path / "ray_results").exists()  # nothing started


def test_unreachable_mlflow_server_fails_at_start(dataset, tmp_path):
    from pipelines.train.job import run_train

    cfg = job(dataset, tmp_path, "http://127.0.0.1:9")  # discard port: connection refused
    with pytest.raises(ConfigError, match="unreachable"):
        run_train(cfg)


# ------------------------------------------------------------------------------------ Ray Train

@pytest.fixture(scope="module")
def reference(dataset, ray_local, tmp_path_factory):
    """One uninterrupted DDP run (the baseline of the resume test)."""
    from pipelines.train.job import run_train

    tmp = tmp_path_factory.mktemp("reference")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = job(dataset, tmp, uri, "mlflow.run_name=reference", "train.sample_every=20")
    result = run_train(cfg)
    return {"result": result, "uri": uri, "weights": final_weights(result), "cfg": cfg}


def test_ddp_trains_and_logs_params_metrics_samples_and_model(reference):
    from flowar import FlowAR

    c, runs = mlflow_run(reference["uri"], "reference")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.strategy"] == "ddp"
    assert run.data.params["model.ar_width"] == "64"  # from the preset
    assert run.data.tags["preset"] == "tiny" and run.data.tags["vae"] == "none/test-vae"
    curve = losses(c, run.info.run_id)
    assert len(curve) == 8 and all(math.isfinite(v) for v in curve)
    assert np.mean(curve[-2:]) < 0.7 * np.mean(curve[:2]), curve
    for key in ("lr", "grad_norm", "images_per_s", "tokens_per_s", "loss_scale1", "loss_scale4"):
        assert c.get_metric_history(run.info.run_id, key), key
    assert tracking.image_steps(c, run.info.run_id, "samples") == [20, 40]
    [model] = c.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'")
    assert "artifacts/export/latents.json" in {a.path for a in c.list_logged_model_artifacts(model.model_id, "artifacts/export")}
    assert "config/resolved_config.yaml" in {a.path for a in c.list_artifacts(run.info.run_id, "config")}
    export = Path(reference["result"].metrics["export_dir"])
    model = FlowAR.from_pretrained(export)
    assert model.config.scales == (1, 2, 4)
    assert json.loads((export / "latents.json").read_text())["vae"]["id"] == "none/test-vae"
    assert (Path(reference["result"].path) / "best" / "model.safetensors").is_file()


def test_rerunning_the_same_command_resumes_to_the_uninterrupted_weights(
        reference, dataset, ray_local, tmp_path, mlflow_uri):
    from pipelines.train.job import run_train

    cfg = job(dataset, tmp_path, mlflow_uri, "mlflow.run_name=rerun", "train.max_failures=0")
    with pytest.raises(Exception, match="injected fault"):
        run_train(cfg,
                     fault={"step": 30, "mode": "raise", "marker": str(tmp_path / "m")})
    result = run_train(cfg)  # the same command again
    c, runs = mlflow_run(mlflow_uri, "rerun")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    resumed = [m.value for m in c.get_metric_history(runs[0].info.run_id, "resumed_from_step")]
    assert sorted(resumed) == [0, 20]
    weights = final_weights(result)
    assert weights.keys() == reference["weights"].keys()
    for name, ref in reference["weights"].items():
        torch.testing.assert_close(weights[name], ref, rtol=0, atol=1e-6)


def test_fsdp_trains_survives_a_killed_worker_and_resumes_at_another_worker_count(
        dataset, ray_local, tmp_path, mlflow_uri):
    from pipelines.train.job import run_train

    # With activation checkpointing, as the large presets train (preset H turns it on).
    cfg = job(dataset, tmp_path, mlflow_uri, "mlflow.run_name=fsdp", "train.strategy=fsdp",
              "model.grad_checkpointing=true")
    marker = tmp_path / "killed-once"
    result = run_train(cfg,
                          fault={"step": 30, "mode": "kill", "marker": str(marker),
                                 "after_checkpoint": 20})
    assert marker.exists()  # a worker was SIGKILLed at step 30
    c, runs = mlflow_run(mlflow_uri, "fsdp")
    assert len(runs) == 1  # the restarted worker group continued the same MLflow run
    run_id = runs[0].info.run_id
    resumed = [m.value for m in c.get_metric_history(run_id, "resumed_from_step")]
    assert sorted(resumed) == [0, 20]  # restarted from the step-20 checkpoint, not from scratch
    curve = losses(c, run_id)
    assert np.mean(curve[-2:]) < 0.7 * np.mean(curve[:2]), curve
    assert result.metrics["step"] == 40
    assert (Path(result.checkpoint.path) / ".metadata").is_file()  # a DCP checkpoint
    # The sharded checkpoint of 2 workers continues on 1 worker (DCP reshards on load).
    one = job(dataset, tmp_path, mlflow_uri, "mlflow.run_name=fsdp", "train.strategy=fsdp",
              "model.grad_checkpointing=true", "train.num_workers=1", "train.max_steps=45")
    result = run_train(one)
    assert result.metrics["step"] == 45 and math.isfinite(result.metrics["loss"])
    resumed = [m.value for m in c.get_metric_history(run_id, "resumed_from_step")]
    assert sorted(resumed) == [0, 20, 40]
    exported = json.loads((Path(result.metrics["export_dir"]) / "config.json").read_text())
    assert "grad_checkpointing" not in exported["model"]


def test_diverging_loss_stops_the_run_with_a_clear_message(dataset, ray_local, tmp_path, mlflow_uri):
    from pipelines.train.job import TrainingDiverged, run_train

    cfg = job(dataset, tmp_path, mlflow_uri, "mlflow.run_name=nan", "train.base_lr=1e9",
              "train.warmup_steps=0", "train.grad_clip=0")
    with pytest.raises(TrainingDiverged, match=r"non-finite training at step \d+"):
        run_train(cfg)
    c, runs = mlflow_run(mlflow_uri, "nan")
    assert runs[0].info.status == "FAILED" and "lower train.base_lr" in runs[0].data.tags["stopped"]
    assert not list((tmp_path / "ray_results" / "nan").glob("checkpoint_*"))  # nothing saved after


def test_image_scale_construction_trains_through_ray_train(tmp_path, ray_local, mlflow_uri):
    """Table 3's "image" pyramid end to end: the workers read the image-derived columns."""
    from flowar import FlowAR
    from pipelines.train.job import run_train

    path = make_dataset(tmp_path / "img", count=32, image_scales=(1, 2))
    cfg = job(path, tmp_path, mlflow_uri, "mlflow.run_name=image", "model.scale_construction=image",
              "train.max_steps=10", "train.checkpoint_every=10")
    result = run_train(cfg)
    assert result.metrics["step"] == 10 and math.isfinite(result.metrics["loss"])
    c, runs = mlflow_run(mlflow_uri, "image")
    assert runs[0].data.params["model.scale_construction"] == "image"
    curve = losses(c, runs[0].info.run_id)
    assert len(curve) == 2 and curve[-1] < curve[0], curve
    model = FlowAR.from_pretrained(result.metrics["export_dir"])
    assert model.config.scale_construction == "image"


@pytest.mark.parametrize("strategy,injection", [("ddp", "cross_attention"),
                                                ("fsdp", "channel_concat")])
def test_injections_without_semantics_proj_train_through_ray_train(
        strategy, injection, dataset, ray_local, tmp_path, mlflow_uri):
    """The two injections whose unused semantics projection crashed DDP in the Table 6 sweep
    (issue 13): 2 workers, a few steps, the model exported without that projection."""
    from flowar import FlowAR
    from pipelines.train.job import run_train

    name = f"{strategy}-{injection}"
    cfg = job(dataset, tmp_path, mlflow_uri, f"mlflow.run_name={name}", f"train.strategy={strategy}",
              f"model.injection={injection}", "train.max_steps=4", "train.checkpoint_every=4",
              "train.log_every=2")
    result = run_train(cfg)
    assert result.metrics["step"] == 4 and math.isfinite(result.metrics["loss"])
    c, runs = mlflow_run(mlflow_uri, name)
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.params["model.injection"] == injection
    assert runs[0].data.params["train.strategy"] == strategy
    assert all(math.isfinite(v) for v in losses(c, runs[0].info.run_id))
    model = FlowAR.from_pretrained(result.metrics["export_dir"])
    assert model.config.injection == injection and model.flow.semantics_proj is None


def read_data_log(directory: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(directory.glob("*.jsonl")) for line in f.open()]


def test_a_killed_worker_rereads_little_and_a_resume_at_one_worker_finishes_the_epoch(
        tmp_path, ray_local, mlflow_uri):
    """Streaming input under failure and elastic resume (issue 15), DDP on 2 workers.

    1024 latents in 32 files, windows of 16 rows: an epoch is 64 steps of 16. A worker is killed
    at step 9 and the group restarts from the step-6 checkpoint; the run stops at step 12; the
    same run resumed on 1 worker finishes the epoch. Every replayed micro-batch equals what the
    killed attempt drew, every key of the epoch is trained on exactly once, and the restarted
    workers read a few row groups, not the dataset."""
    from pipelines.train.job import run_train

    path = make_dataset(tmp_path / "big", count=1024, parts=32)
    log = tmp_path / "data-log"
    log.mkdir()
    common = ["mlflow.run_name=elastic", "data.shuffle_buffer=16", "train.checkpoint_every=6",
              "train.log_every=3", "train.max_failures=1"]
    two = job(path, tmp_path, mlflow_uri, *common, "train.max_steps=12")
    run_train(two, fault={"step": 9, "mode": "kill", "marker": str(tmp_path / "killed"),
                          "after_checkpoint": 6, "data_log": str(log)})
    assert (tmp_path / "killed").exists()
    one = job(path, tmp_path, mlflow_uri, *common, "train.num_workers=1", "train.max_steps=64")
    result = run_train(one, fault={"data_log": str(log)})
    assert result.metrics["step"] == 64

    records = read_data_log(log)
    batches: dict[tuple, list] = {}
    for r in (r for r in records if "keys" in r):
        where = (r["step"], r["world"], r["rank"], r["micro"])
        assert batches.setdefault(where, r["keys"]) == r["keys"], where  # a replay is the same
    trained = [k for keys in batches.values() for k in keys]
    assert len(trained) == 64 * 16 and len(set(trained)) == 1024  # every key once, none twice
    assert {s for s, world, _, _ in batches if world == 1} == set(range(12, 64))

    first_step: dict[int, int] = {}
    for r in (r for r in records if "keys" in r):
        first_step[r["pid"]] = min(first_step.get(r["pid"], r["step"]), r["step"])
    restarted = {pid for pid, s in first_step.items() if s == 6}
    assert len(restarted) == 2, first_step
    reread = [sum(r["rows"] for r in records if r.get("pid") == pid and "read" in r)
              for pid in restarted]
    assert all(0 < rows <= 256 for rows in reread), reread  # of 1024: its few windows
