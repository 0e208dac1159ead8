"""`flowar quickstart`: the whole pipeline on the embedded default, on one machine.

Fashion-MNIST -> a small VAE (`flowar vae train`, reused when present) -> `flowar encode` (Ray
Data) -> `flowar train` (Ray Train, 2 workers, DDP) -> `flowar evaluate` (FID against the held-out
test set) -> the accuracy with which a Fashion-MNIST classifier recognises each sample's class,
and a grid of all 10 classes, all in one local MLflow store. Every stage resumes: re-running the
command skips what is done. Each stage's settings come from its config file in configs/ and can
be overridden per stage:

    flowar quickstart train.train.max_steps=2000 evaluate.generation.num_samples=2000
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flowar.config import SamplerConfig, from_dict
from pipelines.core import tracking
from pipelines.core.config import (add_job_parser, apply_overrides, flowar_home, load_config,
                                   local_tracking_uri, path_field)
from pipelines.core.ray_runtime import init_ray
from pipelines.encode import EncodeConfig, run_encode
from pipelines.evaluate.job import EvalConfig, read_training_link, run_evaluate
from pipelines.sample import sample_images
from pipelines.train.config import TrainJobConfig, load_train_config
from pipelines.train.job import run_train
from pipelines.vae_train import VAETrainConfig, run_vae_train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class QuickstartConfig:
    home: str = path_field("output", default_fn=lambda: str(flowar_home()))  # empty: $FLOWAR_HOME, else ./flowar-runs
    images: int = 20000  # Fashion-MNIST training images to encode; 0: all 60,000
    classifier_epochs: int = 2
    classifier_images: int = 30000  # training images for the classifier; 0: all 60,000
    accuracy_samples_per_class: int = 50
    vae: dict = field(default_factory=dict)  # overrides of configs/vae-fashion-mnist.yaml
    encode: dict = field(default_factory=dict)  # overrides of configs/encode-fashion-mnist.yaml
    train: dict = field(default_factory=dict)  # overrides of configs/quickstart.yaml
    evaluate: dict = field(default_factory=dict)  # overrides of configs/eval-quickstart.yaml


@dataclass
class StageConfigs:
    """Every stage's config, read and validated before the first stage starts."""

    vae: VAETrainConfig
    encode: EncodeConfig
    train: TrainJobConfig
    evaluate: dict  # overrides of configs/eval-quickstart.yaml (the checkpoint comes from training)


def _stage(name: str, timings: dict):
    class Timer:
        def __enter__(self):
            print(f"\n=== flowar quickstart: {name} ===", flush=True)
            self.start = time.time()

        def __exit__(self, *exc):
            timings[name] = round(time.time() - self.start, 1)
            if exc[0] is None:
                print(f"=== {name}: done in {timings[name]:.0f} s ===", flush=True)
    return Timer()


def run_quickstart(cfg: QuickstartConfig) -> dict:
    """Run (or resume) every stage under cfg.home; returns the summary it writes and prints."""
    from pipelines.evaluate.classifier import train_classifier  # imports torch

    home = _prepare_home(cfg)
    uri = local_tracking_uri(home)
    timings: dict[str, float] = {}
    started = time.time()
    stages = stage_configs(cfg, home, uri)
    init_ray(None, min_cpus=4)  # Ray Data needs CPU beside the 2 training workers

    with _stage("1/6 VAE (flowar vae train)", timings):
        run_vae_train(stages.vae)
    with _stage("2/6 encode (flowar encode)", timings):
        encoded = run_encode(stages.encode)
    with _stage("3/6 classifier that judges the samples", timings):
        clf_record = train_classifier(home / "classifier", epochs=cfg.classifier_epochs,
                                      limit=cfg.classifier_images)
    with _stage("4/6 train (flowar train, 2 workers)", timings):
        result = run_train(stages.train, str(CONFIGS / "quickstart.yaml"))
        export = (result.metrics or {}).get("export_dir")
        # the export records its training run; `flowar evaluate` logs a child run of it
        run_id = read_training_link(Path(export)).get("run_id", "")
    with _stage("5/6 evaluate (flowar evaluate: FID vs the test set)", timings):
        report = evaluate_export(export, stages.evaluate)
    with _stage("6/6 class accuracy of the samples and the 10-class grid", timings):
        class_acc, grid = class_accuracy(export, home, cfg.accuracy_samples_per_class,
                                         report["config"]["sampler"])
    summary = {"wall_seconds": round(time.time() - started, 1), "stage_seconds": timings,
               "fid": report["results"].get("fid"), "class_accuracy": class_acc,
               "classifier_test_accuracy": clf_record["test_accuracy"],
               "num_generated": report.get("num_generated"), "num_reference": report.get("num_reference"),
               "images_encoded": encoded.get("images"), "export_dir": export, "mlflow_run_id": run_id,
               "grid": str(grid), "home": str(home), "tracking_uri": uri}
    if run_id:
        _log_to_training_run(uri, run_id, summary, report.get("step", 0))
    (home / "quickstart-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary)
    return summary


def _prepare_home(cfg: QuickstartConfig) -> Path:
    """cfg.home, created and made $FLOWAR_HOME, so every stage's defaults land under it."""
    home = Path(cfg.home or flowar_home())
    home.mkdir(parents=True, exist_ok=True)
    os.environ["FLOWAR_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return home


def stage_configs(cfg: QuickstartConfig, home: Path, uri: str) -> StageConfigs:
    """Each stage's config file in configs/, with the quickstart's places and the user's
    per-stage overrides on top; all in the one MLflow store `uri`."""
    mlflow = {"tracking_uri": uri}
    vae = load_config(VAETrainConfig, CONFIGS / "vae-fashion-mnist.yaml", apply_overrides(
        {"output": str(home / "vae-fashion-mnist"), "mlflow": mlflow}, cfg.vae))
    encode = load_config(EncodeConfig, CONFIGS / "encode-fashion-mnist.yaml", apply_overrides(
        {"output": str(home / "latents-fashion-mnist"), "vae": {"spec": vae.output},
         "source": {"limit": cfg.images}}, cfg.encode))
    # The classifier (stage 3) judges the in-training samples too: eval/class_accuracy.
    train_over = apply_overrides({"data": {"path": encode.output}, "mlflow": mlflow,
                                  "train": {"eval_classifier": str(home / "classifier")}}, cfg.train)
    train = load_train_config(CONFIGS / "quickstart.yaml", _as_overrides(train_over))
    eval_over = apply_overrides({"mlflow": mlflow, "generation": {"checkpoint": "<after training>"},
                                 "output_dir": str(home / "eval")}, cfg.evaluate)
    load_config(EvalConfig, CONFIGS / "eval-quickstart.yaml", eval_over)  # checked now, run later
    return StageConfigs(vae, encode, train, eval_over)


def _log_to_training_run(uri: str, run_id: str, summary: dict, step: int) -> None:
    """The quickstart's own measures and the class grid, in the training run beside its FID."""
    c = tracking.client(uri)
    tracking.log_metrics(c, run_id, {"quickstart/class_accuracy": summary["class_accuracy"],
                                     "quickstart/fid": float(summary["fid"])}, step=step)
    c.log_artifact(run_id, summary["grid"], "quickstart")


def evaluate_export(export: str, eval_overrides: dict) -> dict:
    """`flowar evaluate` of one export with the quickstart's evaluation settings."""
    over = apply_overrides(eval_overrides, {"generation": {"checkpoint": export}})
    return run_evaluate(load_config(EvalConfig, CONFIGS / "eval-quickstart.yaml", over))


def class_accuracy(export: str, home: Path, per_class: int, sampler: dict) -> tuple[float, Path]:
    """Fraction of `per_class` samples of each class that the classifier assigns to that class,
    and a grid PNG (one row per class)."""
    import torch  # torch and what imports it: not at the top, `flowar --help` imports this

    from pipelines.core.images import from_uint8, image_grid, save_png
    from pipelines.evaluate.classifier import accuracy, load_classifier

    images, indices = sample_images(export, list(range(10)), per_class,
                                    from_dict(SamplerConfig, sampler, "sampler"))
    labels = torch.tensor([i // per_class for i in indices])
    acc = accuracy(load_classifier(home / "classifier"), from_uint8(images), labels)
    shown = min(per_class, 8)
    rows = images[[c * per_class + j for c in range(10) for j in range(shown)]]
    grid = save_png(image_grid(rows, shown), Path(export).parent / f"{Path(export).name}-classes.png")
    return acc, grid


def _as_overrides(tree: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out += _as_overrides(v, key + ".") if isinstance(v, dict) else [f"{key}={json.dumps(v)}"]
    return out


def _print_summary(s: dict) -> None:
    print("\n" + "=" * 72)
    print(f"flowar quickstart finished in {s['wall_seconds'] / 60:.1f} min")
    for stage, secs in s["stage_seconds"].items():
        print(f"  {stage:<58} {secs:>7.0f} s")
    print(f"  FID vs the Fashion-MNIST test set ({s['num_generated']} samples): {s['fid']:.2f}")
    print(f"  class accuracy of the samples (classifier: {s['classifier_test_accuracy']:.1%} on real "
          f"test images): {s['class_accuracy']:.1%}")
    print(f"\nWritten under {s['home']}:")
    print(f"  model (EMA, from_pretrained):  {s['export_dir']}")
    print(f"  grid of all 10 classes:        {s['grid']}")
    print(f"  MLflow store:                  {s['tracking_uri']}")
    print(f"  summary:                       {s['home']}/quickstart-summary.json")
    print("\nOpen the MLflow UI (runs, metrics, sample grids) with:")
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    print(f"  {mlflow_cli} ui --backend-store-uri {s['tracking_uri']} --host 127.0.0.1 --port 5000")
    print("  then browse http://127.0.0.1:5000")


def _cli(args) -> int:
    run_quickstart(load_config(QuickstartConfig, None, args.overrides))
    return 0


def register(subparsers) -> None:
    add_job_parser(subparsers, "quickstart", run=_cli,
                   load=lambda a: load_config(QuickstartConfig, None, a.overrides),
                   help="the whole pipeline on Fashion-MNIST, locally", description=__doc__,
                   raw_description=True, config_help=None,
                   overrides_example="images=20000 train.train.max_steps=400")
