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
from dataclasses import dataclass, field
from pathlib import Path

from flowar.config import ConfigError, SamplerConfig, to_dict
from pipelines.core.config import (MLflowConfig, RayConfig, add_print_config, flowar_home, load_config,
                              path_field)


@dataclass
class GenerationConfig:
    checkpoint: str = path_field("input")  # a from_pretrained folder (config.json, model.safetensors, latents.json)
    use_ema: bool = True  # use <checkpoint>/ema.safetensors when the export has one
    vae: str = path_field("input_or_id")  # override the VAE of <checkpoint>/latents.json (folder, file, hub id)
    num_samples: int = 50000  # the standard protocol: 50 per class of ImageNet's 1000
    samples_per_class: int = 50
    seed: int = 0
    batch_size: int = 50
    shard_size: int = 1000  # a multiple of batch_size; the unit of resumption
    grid_classes: int = 8  # sample grid: first samples of the first classes
    grid_per_class: int = 8
    save_images: bool = False  # keep every generated image (uint8) in the shard files


@dataclass
class ReferenceConfig:
    source: str = path_field("reference")  # 'fashion-mnist[:test|train]', an image folder, or an ADM .npz
    resolution: int = 0  # images are center-cropped/resized to this; 0: the generated resolution
    max_images: int = 0  # 0: all images of the source
    batch_size: int = 50
    shard_size: int = 1000


@dataclass
class MetricsConfig:
    fid: bool = True
    isc: bool = True  # reported only when the Inception weights have a real logits layer
    kid: bool = False
    prc: bool = False
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # capped at the smaller set (recorded in the report)
    prc_neighborhood: int = 3
    isc_splits: int = 10


@dataclass
class InceptionConfig:
    weights: str = path_field("input")  # empty: torch-fidelity's cache, else fid-helper's copy, else download
    allow_download: bool = True


@dataclass
class WorkersConfig:
    num_workers: int = 0  # 0: one per GPU, else one per CPU of the cluster (capped by the shards)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # used only when the cluster has GPUs
    device: str = "auto"  # auto: cuda in a worker that got a GPU, else cpu


@dataclass
class EvalConfig:
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    inception: InceptionConfig = field(default_factory=InceptionConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    output_dir: str = path_field("output")  # shards, grid, report; empty: $FLOWAR_HOME/eval/<settings hash>
    run_id: str = ""  # MLflow run to log into; empty: the export's training run, else a new run
    step: int = -1  # checkpoint step for the metrics; -1: the export's training step, else 0
    metric_prefix: str = "eval"

    def __post_init__(self):
        g, r = self.generation, self.reference
        if not g.checkpoint:
            raise ConfigError("generation.checkpoint is required (a folder written by save_pretrained)")
        checks = {"generation.num_samples": (g.num_samples, g.num_samples >= 2, "at least 2"),
                  "generation.samples_per_class": (g.samples_per_class, g.samples_per_class >= 1, ">= 1"),
                  "generation.batch_size": (g.batch_size, g.batch_size >= 1, ">= 1"),
                  "reference.batch_size": (r.batch_size, r.batch_size >= 1, ">= 1"),
                  "generation.shard_size": (g.shard_size, g.shard_size % max(1, g.batch_size) == 0
                                            and g.shard_size >= 1,
                                            f"a positive multiple of generation.batch_size={g.batch_size}"),
                  "reference.shard_size": (r.shard_size, r.shard_size % max(1, r.batch_size) == 0
                                           and r.shard_size >= 1,
                                           f"a positive multiple of reference.batch_size={r.batch_size}"),
                  "metrics.prc_neighborhood": (self.metrics.prc_neighborhood,
                                               self.metrics.prc_neighborhood >= 1, ">= 1")}
        for key, (value, ok, need) in checks.items():
            if not ok:
                raise ConfigError(f"{key}={value} is invalid: must be {need}")
        if not r.source:
            raise ConfigError("reference.source is required: fashion-mnist[:test], a folder, or a .npz")


def settings_key(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_identity(ckpt: Path) -> dict:
    """What makes two checkpoints the same for resumption: file names, sizes and mtimes."""
    files = sorted(p for p in ckpt.iterdir() if p.is_file())
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in files}


def read_training_link(ckpt: Path) -> dict:
    """{run_id, step} of the training that wrote this export (config.json's "training" entry,
    written by flowar train's EMA export); empty for a bare save_pretrained folder."""
    training = json.loads((ckpt / "config.json").read_text()).get("training") or {}
    return {k: v for k, v in (("run_id", training.get("mlflow_run_id")),
                              ("step", training.get("step"))) if v is not None}


def resolve_run(cfg: EvalConfig, link: dict) -> tuple[str, str]:
    """(run id to log into or "", note). An explicit run_id must exist in the store; the
    export's training run is used when this store has it, else a new run records its id."""
    import mlflow

    run_id = cfg.run_id or link.get("run_id", "")
    if not run_id:
        return "", "new run"
    try:
        mlflow.tracking.MlflowClient(cfg.mlflow.resolved_uri()).get_run(run_id)
        return run_id, "training run"
    except Exception:  # noqa: BLE001 (mlflow raises MlflowException or a store error)
        if cfg.run_id:
            raise ConfigError(f"run_id={run_id!r} is not a run of the MLflow store "
                              f"{cfg.mlflow.resolved_uri()}") from None
        return "", f"new run (training run {run_id} is not in {cfg.mlflow.resolved_uri()})"


def vae_spec(cfg: EvalConfig, ckpt: Path) -> dict:
    from pipelines.evaluate.worker import export_vae_spec

    return {"id": cfg.generation.vae} if cfg.generation.vae else export_vae_spec(ckpt)


def main(cfg: EvalConfig) -> dict:
    """Run the evaluation; returns the report (also written to <output_dir>/report.json)."""
    import ray

    from pipelines.evaluate.shards import (compute_reference, grid_png, log_to_mlflow, make_workers,
                                    print_table, run_shards, summarise_shards)
    from pipelines.evaluate import metrics as M
    from pipelines.evaluate.inception import file_digest, resolve_weights

    g = cfg.generation
    ckpt = Path(g.checkpoint).expanduser().resolve()
    if not (ckpt / "config.json").is_file():
        raise ConfigError(f"generation.checkpoint={g.checkpoint!r} is not a save_pretrained folder "
                          "(no config.json)")
    ema_file = ckpt / "ema.safetensors"
    generator = {"checkpoint": str(ckpt), "ema_file": str(ema_file) if g.use_ema and ema_file.is_file() else "",
                 "vae": vae_spec(cfg, ckpt), "seed": g.seed, "samples_per_class": g.samples_per_class,
                 "sampler": to_dict(cfg.sampler)}
    link = read_training_link(ckpt)
    step = cfg.step if cfg.step >= 0 else int(link.get("step", 0))
    run_id, run_note = resolve_run(cfg, link)
    need_features = cfg.metrics.kid or cfg.metrics.prc
    # Refuse a bad sampler or reference before any work (not after 50,000 samples).
    from flowar.sampling import time_grid
    from pipelines.evaluate.worker import parse_source
    time_grid(cfg.sampler.num_steps, cfg.sampler.time_grid)
    try:
        if cfg.reference.source.endswith(".npz"):
            M.load_reference_npz(cfg.reference.source)
        else:
            parse_source(cfg.reference.source)
    except (OSError, ValueError) as e:
        raise ConfigError(f"reference.source: {e}") from None

    from pipelines.core.ray_runtime import init_ray
    init_ray(cfg.ray)
    # Resolved (and converted, once) here: workers on every node get one explicit file.
    weights = resolve_weights(cfg.inception.weights, cfg.inception.allow_download)
    shards = [(s, min(s + g.shard_size, g.num_samples)) for s in range(0, g.num_samples, g.shard_size)]

    settings = {"checkpoint": str(ckpt), "checkpoint_files": checkpoint_identity(ckpt),
                "weights": "ema" if generator["ema_file"] else "model", "vae": generator["vae"],
                "sampler": to_dict(cfg.sampler), "seed": g.seed, "num_samples": g.num_samples,
                "samples_per_class": g.samples_per_class, "batch_size": g.batch_size,
                "shard_size": g.shard_size, "extractor": file_digest(weights) if weights else "download",
                "keep_features": need_features, "save_images": g.save_images,
                "grid": [g.grid_classes, g.grid_per_class]}
    out = Path(cfg.output_dir or flowar_home() / "eval" / settings_key(settings)).expanduser()
    guard = out / "settings.json"
    if guard.is_file() and json.loads(guard.read_text()) != settings:
        old = json.loads(guard.read_text())
        diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        raise ConfigError(f"output_dir={str(out)!r} holds shards of a different evaluation "
                          f"(differs in: {', '.join(diff)}); use another output_dir")
    out.mkdir(parents=True, exist_ok=True)
    guard.write_text(json.dumps(settings, indent=1, sort_keys=True))
    grid_indices = [c * g.samples_per_class + j for c in range(g.grid_classes)
                    for j in range(min(g.grid_per_class, g.samples_per_class))]
    grid_indices = [i for i in grid_indices if i < g.num_samples]
    workers, worker_info = make_workers(cfg, str(weights or ""), generator, len(shards))
    try:
        extractor = ray.get(workers[0].extractor_info.remote())
        gen_run = run_shards(workers, shards, out / "shards", dict(
            batch_size=g.batch_size, keep_features=need_features, keep_images=g.save_images,
            grid_indices=grid_indices), desc="generate+features")
        gen = summarise_shards(gen_run["files"])
        resolution = cfg.reference.resolution or gen["resolution"]
        ref = compute_reference(cfg, workers, extractor, resolution, need_features)
    finally:  # finished shards are on disk: a rerun resumes from them
        for w in workers:
            ray.kill(w)

    mu, sigma = gen["stats"].mu_sigma()
    results: dict[str, float | str] = {}
    m = cfg.metrics
    if m.fid:
        results["fid"] = M.fid(mu, sigma, ref["mu"], ref["sigma"])
    if m.isc:
        if gen["logits"] is None:
            results["inception_score"] = "unavailable: the Inception weights have no logits layer"
        else:
            results["inception_score"], results["inception_score_std"] = M.inception_score(
                gen["logits"], m.isc_splits)
    for name, wanted in (("kid", m.kid), ("precision/recall", m.prc)):
        if wanted and ref["features"] is None:
            results[name] = "unavailable: the reference is a statistics file without features"
    if m.kid and ref["features"] is not None:
        results["kid"], results["kid_std"] = M.kid(gen["features"], ref["features"], m.kid_subsets,
                                                   m.kid_subset_size)
    if m.prc and ref["features"] is not None:
        results["precision"], results["recall"] = M.precision_recall(
            gen["features"], ref["features"], m.prc_neighborhood)

    grid_path = grid_png(gen["grid"], g.grid_per_class, out / "samples.png")
    report = {"results": results, "step": step, "num_generated": gen["stats"].count,
              "num_reference": ref["count"], "resolution": gen["resolution"],
              "reference_resolution": resolution, "extractor": extractor,
              "reference": {k: v for k, v in ref.items() if k not in ("mu", "sigma", "features")},
              "shards": {"total": len(shards), "resumed": gen_run["resumed"],
                         "computed": gen_run["computed"]},
              "throughput": gen_run["throughput"], "workers": worker_info,
              "kid_subset_size": min(m.kid_subset_size, gen["stats"].count, ref["count"] or 0),
              "settings": settings, "config": to_dict(cfg), "output_dir": str(out),
              "mlflow": {"logged_to": run_note, "training_run_id": link.get("run_id", "")}}
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    report["mlflow_run_id"] = log_to_mlflow(cfg, run_id, step, results, report, out / "report.json",
                                            grid_path)
    print_table(results, report)
    return report


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="FID / IS / KID / precision-recall of a checkpoint, sharded over Ray",
        description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config (see configs/eval-*.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sampler.cfg=2.0 "
                   "generation.num_samples=10000 metrics.prc=true")
    p.set_defaults(func=_cli)
    add_print_config(p, _load)


def _load(args) -> EvalConfig:
    overrides = list(args.overrides)
    path = args.config
    if path and "=" in path and not Path(path).is_file():  # only overrides were given
        overrides, path = [path] + overrides, None
    cfg = load_config(EvalConfig, path, overrides)
    check_sampler_for_export(cfg.generation.checkpoint, cfg.sampler)
    return cfg


def check_sampler_for_export(checkpoint: str, sampler: SamplerConfig) -> None:
    """The exported model decides which samplers work: refuse a misfit when the config is read
    (reads the export's config.json; a missing one is refused by the run itself)."""
    from flowar.config import check_sampler_fits

    config_file = Path(checkpoint) / "config.json"
    if config_file.is_file():
        model = json.loads(config_file.read_text()).get("model") or {}
        check_sampler_fits(model.get("objective", "flow"), sampler)


def _cli(args) -> int:
    main(_load(args))
    return 0
