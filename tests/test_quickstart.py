"""The quickstart pipeline end to end at a small size, and a trained model beating an untrained one
on both FID and class accuracy."""

import json
import shutil

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL = [
    "images=3000", "classifier_images=6000", "classifier_epochs=1", "accuracy_samples_per_class=10",
    "vae.source.limit=3000", "vae.train.steps=120", "vae.train.num_workers=1", "vae.train.batch_size=32",
    "vae.train.log_every=40", "vae.train.image_every=120",
    "vae.model.block_out_channels=[16,32,32]", "vae.model.norm_num_groups=16",
    "encode.encode.shard_size=1000", "encode.encode.flip=false",
    "train.train.max_steps=300", "train.train.log_every=50", "train.train.checkpoint_every=300",
    "train.train.sample_every=0", "train.train.warmup_steps=20",
    "train.train.ema_decay=0.98",  # a 300-step run: a longer EMA would still hold the init
    # one in-training evaluation (at the last step) against the evaluation's 200 test images
    "train.train.eval_samples=50", "train.train.eval_reference_images=200",
    "evaluate.generation.num_samples=100", "evaluate.generation.samples_per_class=10",
    "evaluate.generation.shard_size=50", "evaluate.reference.max_images=200",
    "evaluate.sampler.num_steps=10",
]


def test_quickstart_small_trained_beats_untrained(ray_local, tmp_path):
    import mlflow
    import torch

    from flowar import FlowAR
    from pipelines.core.config import load_config
    from pipelines.quickstart import QuickstartConfig, class_accuracy, evaluate_export, run_quickstart

    cfg = load_config(QuickstartConfig, None, [f"home={tmp_path}"] + SMALL)
    summary = run_quickstart(cfg)

    # Everything the quickstart promises is on disk and in MLflow.
    export = summary["export_dir"]
    assert (tmp_path / "quickstart-summary.json").is_file() and (tmp_path / "vae-fashion-mnist").is_dir()
    assert summary["num_generated"] == 100 and summary["fid"] > 0
    mlflow.set_tracking_uri(summary["tracking_uri"])
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert "quickstart/class_accuracy" in run.data.metrics and "quickstart/fid" in run.data.metrics
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "quickstart")]
    assert any(p.endswith(".png") for p in artifacts)
    # The training evaluated itself at its last step, judged by the quickstart's classifier, and
    # the evaluation stage found the reference statistics the training had cached.
    history = {k: mlflow.MlflowClient().get_metric_history(run.info.run_id, f"eval/{k}")
               for k in ("fid", "kid", "class_accuracy")}
    assert {k: [m.step for m in h] for k, h in history.items()} == {k: [300] for k in history}
    assert history["fid"][0].value > 0 and 0 <= history["class_accuracy"][0].value <= 1
    eval_report = json.loads(next((tmp_path / "eval").glob("**/report.json")).read_text())
    assert eval_report["reference"]["cached"] is True

    # The same judges applied to the same architecture before any training.
    untrained = tmp_path / "untrained"
    torch.manual_seed(0)
    FlowAR(FlowAR.from_pretrained(export).config).save_pretrained(untrained)
    shutil.copy(f"{export}/latents.json", untrained / "latents.json")
    eval_over = {"mlflow": {"tracking_uri": summary["tracking_uri"]}, "output_dir": str(tmp_path / "eval-untrained"),
                 "generation": {"num_samples": 100, "samples_per_class": 10, "shard_size": 50},
                 "reference": {"max_images": 200}, "sampler": {"num_steps": 10}}
    base = evaluate_export(str(untrained), eval_over)
    base_acc, _ = class_accuracy(str(untrained), tmp_path, 10, base["config"]["sampler"])
    report = json.dumps({"trained": [summary["fid"], summary["class_accuracy"]],
                         "untrained": [base["results"]["fid"], base_acc]})
    assert summary["fid"] < base["results"]["fid"], report
    assert summary["class_accuracy"] > base_acc + 0.1, report
