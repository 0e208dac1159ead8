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

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core.config import add_print_config, flowar_home, load_config, path_field

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
    from pipelines.core import tracking
    from pipelines.evaluate.classifier import train_classifier
    from pipelines.core.config import apply_overrides
    from pipelines.encode import EncodeConfig, run_encode
    from pipelines.core.ray_runtime import init_ray
    from pipelines.evaluate.job import EvalConfig, read_training_link
    from pipelines.train.job import load_train_config, run_training
    from pipelines.vae_train import VAETrainConfig, run_vae_train

    home = Path(cfg.home or flowar_home())
    home.mkdir(parents=True, exist_ok=True)
    os.environ["FLOWAR_HOME"] = str(home)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow = {"tracking_uri": uri}
    timings: dict[str, float] = {}
    started = time.time()

    # Every config is read and validated before the first stage starts.
    vae_cfg = load_config(VAETrainConfig, CONFIGS / "vae-fashion-mnist.yaml", apply_overrides(
        {"output": str(home / "vae-fashion-mnist"), "mlflow": mlflow}, cfg.vae))
    encode_cfg = load_config(EncodeConfig, CONFIGS / "encode-fashion-mnist.yaml", apply_overrides(
        {"output": str(home / "latents-fashion-mnist"), "vae": {"spec": vae_cfg.output},
         "source": {"limit": cfg.images}}, cfg.encode))
    train_over = apply_overrides({"data": {"path": encode_cfg.output}, "mlflow": mlflow}, cfg.train)
    train_cfg = load_train_config(CONFIGS / "quickstart.yaml", _as_overrides(train_over))
    eval_over = apply_overrides({"mlflow": mlflow, "generation": {"checkpoint": "<after training>"},
                                 "output_dir": str(home / "eval")}, cfg.evaluate)
    load_config(EvalConfig, CONFIGS / "eval-quickstart.yaml", eval_over)

    init_ray(None, min_cpus=4)  # Ray Data needs CPU beside the 2 training workers

    with _stage("1/6 VAE (flowar vae train)", timings):
        run_vae_train(vae_cfg)
    with _stage("2/6 encode (flowar encode)", timings):
        encoded = run_encode(encode_cfg)
    with _stage("3/6 classifier that judges the samples", timings):
        clf_record = train_classifier(home / "classifier", epochs=cfg.classifier_epochs,
                                      limit=cfg.classifier_images)
    with _stage("4/6 train (flowar train, 2 workers)", timings):
        result = run_training(train_cfg, str(CONFIGS / "quickstart.yaml"))
        export = (result.metrics or {}).get("export_dir")
        # the export records its training run; `flowar evaluate` logs into it from there too
        run_id = read_training_link(Path(export)).get("run_id", "")
    with _stage("5/6 evaluate (flowar evaluate: FID vs the test set)", timings):
        report = evaluate_export(export, eval_over)
    with _stage("6/6 class accuracy of the samples and the 10-class grid", timings):
        class_acc, grid = class_accuracy(export, home, cfg.accuracy_samples_per_class,
                                         report["config"]["sampler"])
    fid = report["results"].get("fid")
    summary = {"wall_seconds": round(time.time() - started, 1), "stage_seconds": timings,
               "fid": fid, "class_accuracy": class_acc,
               "classifier_test_accuracy": clf_record["test_accuracy"],
               "num_generated": report.get("num_generated"), "num_reference": report.get("num_reference"),
               "images_encoded": encoded.get("images"), "export_dir": export, "mlflow_run_id": run_id,
               "grid": str(grid), "home": str(home), "tracking_uri": uri}
    if run_id:
        c = tracking.client(uri)
        tracking.log_metrics(c, run_id, {"quickstart/class_accuracy": class_acc,
                                             "quickstart/fid": float(fid)}, step=report.get("step", 0))
        c.log_artifact(run_id, str(grid), "quickstart")
    (home / "quickstart-summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _print_summary(summary)
    return summary


def evaluate_export(export: str, eval_overrides: dict) -> dict:
    """`flowar evaluate` of one export with the quickstart's evaluation settings."""
    from pipelines.core.config import apply_overrides
    from pipelines.evaluate.job import EvalConfig, main as run_evaluate
    over = apply_overrides(eval_overrides, {"generation": {"checkpoint": export}})
    return run_evaluate(load_config(EvalConfig, CONFIGS / "eval-quickstart.yaml", over))


def class_accuracy(export: str, home: Path, per_class: int, sampler: dict) -> tuple[float, Path]:
    """Fraction of `per_class` samples of each class that the classifier assigns to that class,
    and a grid PNG (one row per class)."""
    import torch

    from flowar.config import SamplerConfig, from_dict
    from pipelines.evaluate.classifier import accuracy, load_classifier
    from pipelines.evaluate.shards import grid_png
    from pipelines.sample import sample_images

    images, indices = sample_images(export, list(range(10)), per_class,
                                    from_dict(SamplerConfig, sampler, "sampler"))
    labels = torch.tensor([i // per_class for i in indices])
    pixels = torch.from_numpy(images).float().div(127.5).sub(1)
    acc = accuracy(load_classifier(home / "classifier"), pixels, labels)
    shown = min(per_class, 8)
    grid = grid_png(list(images[[c * per_class + j for c in range(10) for j in range(shown)]]), shown,
                    Path(export).parent / f"{Path(export).name}-classes.png")
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
    import sys
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    print(f"  {mlflow_cli} ui --backend-store-uri {s['tracking_uri']} --host 127.0.0.1 --port 5000")
    print("  then browse http://127.0.0.1:5000")


def register(subparsers) -> None:
    p = subparsers.add_parser("quickstart", help="the whole pipeline on Fashion-MNIST, locally",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value, e.g. images=20000 train.train.max_steps=400")
    p.set_defaults(func=_cli)
    add_print_config(p, lambda a: load_config(QuickstartConfig, None, a.overrides))


def _cli(args) -> int:
    run_quickstart(load_config(QuickstartConfig, None, args.overrides))
    return 0
