"""`flowar train CONFIG [key=value ...]`: distributed FlowAR training on Ray Train.

The driver (this module) validates everything that can be validated before any worker starts:
the config (unknown keys, batch arithmetic), the latent dataset's metadata against the model, and
the MLflow store. It then starts or resumes one MLflow run and one Ray Train run with the same
name, and hands the per-worker loop (`pipelines.train.loop`) a plain-dict config.

Resuming: Ray Train V2 restores the latest checkpoint of a run when a run with the same
`RunConfig(name, storage_path)` starts again, so re-running the same command (same run name)
continues where it stopped, and `FailureConfig` restarts of dead workers continue the same MLflow
run because the run id travels in the worker config.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

from flowar.config import (PRESETS, ConfigError, FlowARConfig, SamplerConfig, check_sampler_fits,
                           from_dict, to_dict)
from pipelines.core.config import (MLflowConfig, RayConfig, add_print_config, config_hash, load_config,
                              path_field)

__all__ = ["DataConfig", "TrainConfig", "TrainJobConfig", "load_train_config", "run_training",
           "TrainingDiverged", "register"]


@dataclass
class DataConfig:
    path: str = path_field("input")  # a latent pyramid dataset written by `flowar encode` (path or URI)
    flip_augment: bool = True  # use the stored horizontally flipped latents half of the time


@dataclass
class TrainConfig:
    """The published recipe (docs/stack-facts.md) is the default."""
    num_workers: int = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: one GPU per worker when Ray has GPUs
    strategy: Literal["ddp", "fsdp"] = "ddp"  # fsdp: FSDP2 fully_shard per transformer block
    global_batch_size: int = 2048
    grad_accum_steps: int = 1  # micro-batch per worker = global / (workers * accum)
    epochs: int = 400
    max_steps: int = 0  # optimizer steps; 0: epochs * steps per epoch
    base_lr: float = 5e-5  # lr = base_lr * global_batch_size / 256
    min_lr: float = 1e-5  # cosine floor
    warmup_epochs: float = 100.0
    warmup_steps: int = -1  # >= 0 overrides warmup_epochs
    betas: tuple[float, ...] = (0.9, 0.95)
    weight_decay: float = 0.02  # matrices only
    grad_clip: float = 3.0  # global norm; 0 disables clipping (the norm is still logged)
    ema_decay: float = 0.9999
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast; published is fp32
    tf32: bool = True  # published: fp32 with TF32 matmuls (CUDA only)
    compile: bool = False  # torch.compile the model
    seed: int = 0
    log_every: int = 50  # steps between MLflow metric logs
    checkpoint_every: int = 1000  # steps between checkpoints (one more at the end)
    keep_checkpoints: int = 3  # Ray keeps the last N; the best EMA export is kept apart
    max_failures: int = 3  # worker-group restarts from the last checkpoint
    sample_every: int = 5000  # steps between sample grids; 0: only at the end
    sample_classes: tuple[int, ...] = ()  # empty: the first 8 classes
    samples_per_class: int = 4
    export_dir: str = path_field("output")  # empty: <storage>/<run name>/export

    def __post_init__(self):
        positive = ("num_workers", "global_batch_size", "grad_accum_steps", "epochs", "log_every",
                    "checkpoint_every", "keep_checkpoints", "samples_per_class")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}={getattr(self, key)} must be at least 1")
        per_worker = self.num_workers * self.grad_accum_steps
        if self.global_batch_size % per_worker:
            raise ConfigError(
                f"train.global_batch_size={self.global_batch_size} is not divisible by "
                f"train.num_workers * train.grad_accum_steps = {per_worker}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas={self.betas}: need two values in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay={self.ema_decay} must be in [0, 1)")
        if self.max_steps < 0 or self.max_failures < 0 or self.sample_every < 0:
            raise ConfigError("train.max_steps, train.max_failures and train.sample_every "
                              "must not be negative")

    @property
    def micro_batch(self) -> int:
        return self.global_batch_size // (self.num_workers * self.grad_accum_steps)


@dataclass
class TrainJobConfig:
    preset: str = ""  # start the model from a preset (flowar.config.PRESETS); `model:` overrides it
    data: DataConfig = field(default_factory=DataConfig)
    model: FlowARConfig = field(default_factory=FlowARConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        check_job(self)  # combinations across sections, refused when the config is read


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; training stopped instead of continuing on garbage."""


def load_train_config(path=None, overrides=()) -> TrainJobConfig:
    """YAML + overrides; a `preset:` fills the model section under whatever the file sets.

    `flowar train --print-config`, `flowar train`, sweeps and the quickstart all read the job
    here, so each refuses the same configs with the same message: every section's own checks
    (the dataclasses' `__post_init__`) and the combinations of `check_job`. Needs no I/O.
    What needs I/O is checked by `run_training` before any Ray or MLflow work: the dataset's
    metadata against the model (`check_dataset`, reads metadata.json), the MLflow store, and
    train.device=cuda against the Ray cluster's GPUs."""
    # The preset is read first, so the config is built (and checked) once, with the preset's
    # model under the file's: checked with the default model, a message would quote widths
    # the job does not have.
    preset = _preset_name(path, overrides)
    if preset and preset not in PRESETS:
        raise ConfigError(f"preset={preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    cfg = load_config(TrainJobConfig, path, overrides,
                      base={"model": dict(PRESETS[preset])} if preset else None)
    if not cfg.data.path:
        raise ConfigError("data.path is empty: name a latent dataset written by `flowar encode`")
    return cfg


def _preset_name(path, overrides) -> str:
    """`preset` of the file + overrides, before the config is built (load_config reports any
    unreadable file or malformed override itself)."""
    from pathlib import Path

    import yaml

    from pipelines.core.config import apply_overrides, parse_overrides

    data = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError):
            data = {}
    data = data if isinstance(data, dict) else {}
    tree = overrides if isinstance(overrides, dict) else parse_overrides(list(overrides))
    preset = apply_overrides(data, tree).get("preset")
    return "" if preset is None else str(preset)


def run_name(cfg: TrainJobConfig) -> str:
    """The MLflow run and the Ray Train run share this name; the same config resumes by default."""
    return cfg.mlflow.run_name or f"train-{cfg.preset or 'flowar'}-{config_hash(cfg)}"


def storage_path(cfg: TrainJobConfig) -> str:
    """Ray Train's storage (filled at config read: $FLOWAR_HOME/ray_results when not given)."""
    from pipelines.core.config import default_storage_path

    return cfg.ray.storage_path or default_storage_path()


def check_job(cfg: TrainJobConfig) -> None:
    """Combinations across sections, which no section's own `__post_init__` can see.

    Runs when the config is built (`TrainJobConfig.__post_init__`), so `--print-config`, sweeps
    and the run refuse them alike, instead of the first sample grid (mid-training, then retried
    train.max_failures times by Ray). The sampler's own impossible time grids are SamplerConfig's."""
    model, sampler, train = cfg.model, cfg.sampler, cfg.train
    check_sampler_fits(model.objective, sampler)  # the same refusal as FlowAR.generate's
    bad = [c for c in train.sample_classes if not 0 <= c < model.num_classes]
    if bad:
        raise ConfigError(f"train.sample_classes {bad} are outside [0, model.num_classes="
                          f"{model.num_classes})")


def check_dataset(cfg: TrainJobConfig):
    """Read and check the dataset's metadata before anything starts (ConfigError when unfit)."""
    from pipelines.data.latents import LatentDataset, check_compatible

    meta = LatentDataset(cfg.data.path).meta
    check_compatible(meta, cfg.model)  # incl. image-derived scales for scale_construction=image
    return meta


def _use_gpu(cfg: TrainJobConfig) -> bool:
    import ray

    if cfg.train.device == "cpu":
        return False
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.train.device == "cuda" and gpus < cfg.train.num_workers:
        raise ConfigError(f"train.device=cuda needs {cfg.train.num_workers} GPUs; the Ray "
                          f"cluster has {gpus:g}")
    return gpus >= cfg.train.num_workers


def run_training(cfg: TrainJobConfig, config_path: str | None = None, *, dataset=None,
                 fault: dict | None = None,
                 callbacks=(), resources_per_worker: dict | None = None,
                 progress: bool | None = None):
    """Train (or resume) and return the Ray `Result`.

    `dataset`: the latent dataset of `cfg.data.path` already read as a materialised Ray Dataset,
    for callers that train several times on it (sweeps, tests): reading even a small Parquet
    dataset costs Ray Data tens of seconds of task start-up on a small machine. `fault` is a test
    hook that kills or fails one worker once (see pipelines.train.loop._inject_fault).

    `callbacks` (Ray Train callbacks, e.g. Tune's TuneReportCallback when a sweep trial runs this)
    and `resources_per_worker` (e.g. {"CPU": 2}) are passed to the trainer as they are.

    `progress`: show step/total, loss, images/s and time left on stderr while fit() runs
    (pipelines.core.progress: a bar on a terminal, a line per train.log_every otherwise), read from
    what rank 0 logs to MLflow. None: on, except inside a Tune trial (Tune reports those).
    """
    from_dict(TrainJobConfig, to_dict(cfg))  # every config check again: cfg may have been edited
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.core import tracking
    from pipelines.data.latents import LatentDataset
    from pipelines.train.loop import train_loop_per_worker

    meta = check_dataset(cfg)
    name = run_name(cfg)
    uri = cfg.mlflow.resolved_uri()
    tracking.check_reachable(uri)  # fail now, not after hours
    run_id, resumed = tracking.start_or_resume_run(
        uri, cfg.mlflow.experiment, name, artifact_location=cfg.mlflow.artifact_location)
    tracking.log_config(uri, run_id, cfg, config_path, tags=_tags(cfg, meta))
    if resumed and "stopped" in tracking.client(uri).get_run(run_id).data.tags:
        tracking.client(uri).delete_tag(run_id, "stopped")  # a new attempt after a divergence
    print(f"flowar train: {'resuming' if resumed else 'starting'} run {name!r} "
          f"(MLflow run {run_id}, {uri})")

    from pipelines.core.ray_runtime import init_ray
    init_ray(cfg.ray, min_cpus=cfg.train.num_workers + 2)  # + CPU for Ray Data beside the workers
    use_gpu = _use_gpu(cfg)
    # Materialised before fit: on small machines streaming reads starve beside the workers
    # (docs/stack-facts.md), and the workers read it several times.
    if dataset is None:
        dataset = LatentDataset(cfg.data.path).ray_dataset().materialize()
    storage = storage_path(cfg)
    loop_config = {"job": to_dict(cfg), "run_id": run_id, "tracking_uri": uri,
                   "run_dir": f"{storage.rstrip('/')}/{name}", "meta": _meta_dict(meta),
                   "fault": fault or {}}
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                                resources_per_worker=resources_per_worker),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage, callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
        datasets={"train": dataset},
        # Every worker sees the whole dataset and keeps its own deterministic partition
        # (pipelines/train/data.py): Ray's streaming split is not reproducible, exact resume needs that.
        dataset_config=ray.train.DataConfig(datasets_to_split=[]),
    )
    from pipelines.core.progress import follow

    show = progress if progress is not None else not _in_tune_trial()
    try:
        with follow(uri, run_id, enabled=show, total=cfg.train.max_steps or None,
                    images_per_step=cfg.train.global_batch_size, log_every=cfg.train.log_every,
                    desc="train"):
            result = trainer.fit()
    except Exception:
        # A sweep trial that Tune stops (ASHA) lands here too, possibly after the sweep driver
        # has closed its run as FINISHED: only a real failure may mark the run FAILED.
        if not tune_is_stopping_this_trial():
            tracking.fail_run_if_running(tracking.client(uri), run_id)
        raise
    # Rank 0 tags the run "stopped" on NaN/inf; the tag (not result.metrics, which Ray fills
    # only from reports that carry a checkpoint) tells the driver that training diverged.
    stopped = tracking.client(uri).get_run(run_id).data.tags.get("stopped")
    if stopped or (result.metrics or {}).get("non_finite_loss"):
        tracking.end_run(uri, run_id, "FAILED")
        raise TrainingDiverged(stopped or "the loss became NaN or inf")
    tracking.end_run(uri, run_id, "FINISHED")
    return result


def _in_tune_trial() -> bool:
    try:
        from ray.train._internal.session import get_session

        return get_session() is not None
    except Exception:
        return False


def tune_is_stopping_this_trial() -> bool:
    """True inside a Ray Tune trial that Tune is stopping (its fit() then raises as the
    controller goes away); False outside Tune."""
    try:
        from ray.train._internal.session import get_session

        return get_session().stop_event.is_set()
    except Exception:
        return False


def _meta_dict(meta) -> dict:
    import dataclasses

    return dataclasses.asdict(meta) if dataclasses.is_dataclass(meta) else dict(meta)


def _tags(cfg: TrainJobConfig, meta) -> dict[str, str]:
    from pipelines.core.tracking import git_commit

    vae = meta.vae or {}
    return {"dataset": f"{cfg.data.path} ({meta.count} latents, {meta.created or 'undated'})",
            "dataset_path": cfg.data.path,
            "vae": str(vae.get("id", "unknown")), "vae_sha256": str(vae.get("sha256", "unknown")),
            "preset": cfg.preset or "custom", "strategy": cfg.train.strategy,
            "git_commit": git_commit()}


def _load_and_check_dataset(args) -> TrainJobConfig:
    """What `--print-config` shows: the config, refused exactly as the run would refuse it,
    the dataset's metadata included (reads metadata.json, nothing else)."""
    cfg = load_train_config(args.config, args.overrides)
    check_dataset(cfg)
    return cfg


def _main(args) -> int:
    cfg = load_train_config(args.config, args.overrides)
    try:
        result = run_training(cfg, args.config)
    except TrainingDiverged as e:
        print(f"flowar train: stopped: {e}")
        return 1
    m = result.metrics or {}
    print(f"flowar train: done at step {m.get('step')} (loss {m.get('loss', float('nan')):.4f}); "
          f"EMA model exported to {m.get('export_dir')}; run dir {result.path}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train FlowAR on a latent dataset with Ray Train (DDP or FSDP)",
        description="Train FlowAR on a latent pyramid dataset with Ray Train. Re-running with the "
                    "same run name (mlflow.run_name, default derived from the config) resumes from "
                    "the last checkpoint. Example:\n  flowar train configs/train-tiny.yaml "
                    "data.path=./latents train.strategy=fsdp train.max_steps=500",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML job config (sections: preset, data, model, sampler, "
                                  "train, mlflow, ray)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. train.max_steps=200 model.scales=[1,2,4]")
    p.set_defaults(func=_main)
    add_print_config(p, _load_and_check_dataset)
