"""`flowar evaluate`: FID, IS, KID and precision/recall of a trained model, sharded over Ray.

    flowar evaluate configs/eval-fashion-mnist.yaml generation.checkpoint=runs/export sampler.cfg=2.0

Generation and Inception features run in Ray actors (GPU when the cluster has one). Every sample
is defined by its global index, shards are fixed index ranges, and each finished shard is written
to the output folder, so the result does not depend on the number of workers and a killed
evaluation resumes where it stopped. Workers return mergeable float64 statistics; the metrics are
torch-fidelity's formulas on the merged data. Reference statistics come from an image source
(computed by the same actors, cached by source, extractor and resolution) or an ADM-style .npz.
Results go to MLflow (the training run when known), as a table and a JSON report.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from flowar.config import ConfigError, to_dict
from pipelines.core import tracking
from pipelines.core.config import add_job_parser, flowar_home, load_config
from pipelines.core.ray_runtime import init_ray
from pipelines.data.sources import parse_reference_source
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.export import (check_sampler_for_export, checkpoint_identity, generator_spec,
                                       is_export, read_training_link)

# EvalConfig, read_training_link and check_sampler_for_export are imported from here by the
# quickstart and `flowar sample`: this module is the evaluation's public face.
__all__ = ["run_evaluate", "EvalConfig", "read_training_link", "check_sampler_for_export",
           "register"]


def run_evaluate(cfg: EvalConfig) -> dict:
    """Run the evaluation; returns the report (also written to <output_dir>/report.json)."""
    # Ray, torch and MLflow load here, not at import: `flowar --help` imports this module.
    from pipelines.evaluate import shards
    from pipelines.evaluate.inception import resolve_weights
    from pipelines.evaluate.metrics import requested_metrics

    g = cfg.generation
    ckpt = export_folder(g.checkpoint)
    generator = generator_spec(ckpt, cfg.sampler, vae=g.vae, seed=g.seed,
                               samples_per_class=g.samples_per_class, use_ema=g.use_ema)
    link = read_training_link(ckpt)
    run_id, run_note = resolve_run(cfg, link)
    check_reference(cfg.reference.source)  # a bad reference fails now, not after 50,000 samples

    init_ray(cfg.ray)
    # Resolved (and converted, once) here: workers on every node get one explicit file.
    weights = resolve_weights(cfg.inception.weights, cfg.inception.allow_download)
    settings = evaluation_settings(cfg, ckpt, generator, weights)
    out = prepare_output_dir(cfg, settings)
    done = shards.generate_and_reference(cfg, str(weights or ""), generator, out / "shards",
                                         grid_indices(cfg), settings["keep_features"])
    results = requested_metrics(cfg.metrics, done["generated"], done["reference"])
    grid_path = shards.save_sample_grid(done["generated"]["grid"], g.grid_per_class, out / "samples.png")

    step = cfg.step if cfg.step >= 0 else int(link.get("step", 0))
    report = build_report(cfg, results, done, settings, step, out,
                          {"logged_to": run_note, "training_run_id": link.get("run_id", "")})
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    report["mlflow_run_id"] = shards.log_to_mlflow(cfg, run_id, step, results, out / "report.json",
                                                   grid_path)
    shards.print_table(results, report)
    return report


# ------------------------------------------------------------------------------------------------
# The steps, in the order they run
# ------------------------------------------------------------------------------------------------

def export_folder(checkpoint: str) -> Path:
    """generation.checkpoint as an absolute folder, refused unless save_pretrained wrote it."""
    ckpt = Path(checkpoint).expanduser().resolve()
    if not is_export(ckpt):
        raise ConfigError(f"generation.checkpoint={checkpoint!r} is not a save_pretrained folder "
                          "(no config.json)")
    return ckpt


def resolve_run(cfg: EvalConfig, link: dict) -> tuple[str, str]:
    """(run id to log into or "", note). An explicit run_id must exist in the store; the
    export's training run is used when this store has it, else a new run records its id."""
    run_id = cfg.run_id or link.get("run_id", "")
    if not run_id:
        return "", "new run"
    uri = cfg.mlflow.resolved_uri()
    try:
        tracking.client(uri).get_run(run_id)
        return run_id, "training run"
    except Exception:  # noqa: BLE001 (mlflow raises MlflowException or a store error)
        if cfg.run_id:
            raise ConfigError(f"run_id={run_id!r} is not a run of the MLflow store {uri}") from None
        return "", f"new run (training run {run_id} is not in {uri})"


def check_reference(source: str) -> None:
    """Refuse a reference.source that cannot be read: a .npz must hold statistics, an image
    source must exist and hold images (pipelines.data.sources.parse_reference_source)."""
    try:
        if source.endswith(".npz"):
            from pipelines.evaluate.metrics import load_reference_npz  # numpy and torch-fidelity

            load_reference_npz(source)
        else:
            parse_reference_source(source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"reference.source: {e}") from None


def evaluation_settings(cfg: EvalConfig, ckpt: Path, generator: dict, weights: Path | None) -> dict:
    """Everything that decides the generated shards' content. It names the default output
    folder (its hash) and guards a resumed one: shards of other settings are never mixed in."""
    from pipelines.evaluate.inception import file_digest

    g, m = cfg.generation, cfg.metrics
    return {"checkpoint": str(ckpt), "checkpoint_files": checkpoint_identity(ckpt),
            "weights": "ema" if generator["ema_file"] else "model", "vae": generator["vae"],
            "sampler": to_dict(cfg.sampler), "seed": g.seed, "num_samples": g.num_samples,
            "samples_per_class": g.samples_per_class, "batch_size": g.batch_size,
            "shard_size": g.shard_size, "extractor": file_digest(weights) if weights else "download",
            "keep_features": m.kid or m.prc, "save_images": g.save_images,
            "grid": [g.grid_classes, g.grid_per_class]}


def settings_key(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def prepare_output_dir(cfg: EvalConfig, settings: dict) -> Path:
    """output_dir (default: $FLOWAR_HOME/eval/<settings hash>) with settings.json written; a
    folder holding another evaluation's shards is refused, naming what differs."""
    out = Path(cfg.output_dir or flowar_home() / "eval" / settings_key(settings)).expanduser()
    guard = out / "settings.json"
    if guard.is_file() and json.loads(guard.read_text()) != settings:
        old = json.loads(guard.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise ConfigError(f"output_dir={str(out)!r} holds shards of a different evaluation "
                          f"(differs in: {', '.join(diff)}); use another output_dir")
    out.mkdir(parents=True, exist_ok=True)
    guard.write_text(json.dumps(settings, indent=1, sort_keys=True))
    return out


def grid_indices(cfg: EvalConfig) -> list[int]:
    """The sample grid's indices: the first grid_per_class samples of the first grid_classes."""
    g = cfg.generation
    indices = [c * g.samples_per_class + j for c in range(g.grid_classes)
               for j in range(min(g.grid_per_class, g.samples_per_class))]
    return [i for i in indices if i < g.num_samples]


def build_report(cfg: EvalConfig, results: dict, done: dict, settings: dict, step: int, out: Path,
                 mlflow: dict) -> dict:
    """report.json: the results and everything needed to read them (counts, resolutions, the
    extractor, the reference, shards resumed/computed, throughput, workers, settings, config)."""
    gen, ref, run = done["generated"], done["reference"], done["run"]
    return {"results": results, "step": step, "num_generated": gen["stats"].count,
            "num_reference": ref["count"], "resolution": gen["resolution"],
            "reference_resolution": done["resolution"], "extractor": done["extractor"],
            "reference": {k: v for k, v in ref.items() if k not in ("mu", "sigma", "features")},
            "shards": {"total": done["num_shards"], "resumed": run["resumed"], "computed": run["computed"]},
            "throughput": run["throughput"], "workers": done["workers"],
            "kid_subset_size": min(cfg.metrics.kid_subset_size, gen["stats"].count, ref["count"] or 0),
            "settings": settings, "config": to_dict(cfg), "output_dir": str(out), "mlflow": mlflow}


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    add_job_parser(
        subparsers, "evaluate", run=_cli, load=_load, raw_description=True, config_optional=True,
        help="FID / IS / KID / precision-recall of a checkpoint, sharded over Ray",
        description=__doc__, config_help="YAML config (see configs/eval-*.yaml)",
        overrides_example="sampler.cfg=2.0 generation.num_samples=10000 metrics.prc=true")


def _load(args) -> EvalConfig:
    overrides = list(args.overrides)
    path = args.config
    if path and "=" in path and not Path(path).is_file():  # only overrides were given
        overrides, path = [path] + overrides, None
    cfg = load_config(EvalConfig, path, overrides)
    check_sampler_for_export(cfg.generation.checkpoint, cfg.sampler)
    return cfg


def _cli(args) -> int:
    run_evaluate(_load(args))
    return 0
