"""The configuration of `flowar train`, and what the driver hands each worker.

`TrainJobConfig` is the YAML job (sections preset, data, model, sampler, train, mlflow, ray);
`load_train_config` reads it for `flowar train`, `--print-config`, sweeps and the quickstart
alike, so each refuses the same configs with the same message. `WorkerPayload` is everything the
driver (pipelines/train/job.py) has resolved that the per-worker loop (pipelines/train/loop.py)
needs; both import this module, neither imports the other.

Light on purpose (no torch, Ray or MLflow): `flowar --help` and `--print-config` import it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from flowar.config import (PRESETS, ConfigError, FlowARConfig, SamplerConfig, check_sampler_fits,
                           from_dict, to_dict)
from pipelines.core.config import (MLflowConfig, RayConfig, apply_overrides, config_hash,
                                   load_config, parse_overrides, path_field)
from pipelines.data.latents import LatentDatasetMeta

__all__ = ["DataConfig", "TrainModelConfig", "TrainConfig", "TrainJobConfig", "WorkerPayload",
           "TRAINING_PRESETS", "check_job", "load_train_config", "run_name"]

# What a preset sets beyond the model's architecture: how that model is trained. The published
# H trains with gradient checkpointing (its constructor's use_checkpoint=True, see
# flowar/published.py PUBLISHED_CONFIGS), so `preset: H` does too unless the file says otherwise.
TRAINING_PRESETS: dict[str, dict] = {"H": {"grad_checkpointing": True}}


@dataclass
class DataConfig:
    """How workers stream the latent dataset (pipelines/data/stream.py): the epoch's row groups
    in a seeded order, cut into `partitions`, each read in shuffled windows of `shuffle_buffer`
    rows. A worker holds about two windows per partition it reads, whatever the dataset's size."""
    path: str = path_field("input")  # a latent pyramid dataset written by `flowar encode` (path or URI)
    flip_augment: bool = True  # use the stored horizontally flipped latents half of the time
    shuffle_buffer: int = 8192  # rows per shuffled window: more mixes better, costs memory
    # Parts of each epoch's stream, fixed for a run (a resume keeps its checkpoint's); every step
    # takes global_batch_size / partitions rows of each. 0: train.num_workers at the first start.
    partitions: int = 0

    def __post_init__(self):
        if self.shuffle_buffer < 1 or self.partitions < 0:
            raise ConfigError(f"data.shuffle_buffer={self.shuffle_buffer} must be at least 1 and "
                              f"data.partitions={self.partitions} not negative")


@dataclass
class TrainModelConfig(FlowARConfig):
    """The `model:` section of a training job: the architecture (every FlowARConfig key) plus
    how to train it. Only the architecture is exported (`architecture()`, the export's
    config.json), so a trained model's config does not depend on how it was trained."""
    # Recompute each transformer block's activations in backward instead of keeping them
    # (memory for compute); applied by pipelines/train/parallelize.py.
    grad_checkpointing: bool = False

    def architecture(self) -> FlowARConfig:
        """The model's own config, without the training options."""
        data = to_dict(self)
        data.pop("grad_checkpointing")
        return from_dict(FlowARConfig, data, "model")


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
    # In-training evaluation (pipelines/train/evaluation.py): every eval_every steps and at the
    # last step, the workers generate eval_samples samples of the EMA weights and log eval/fid,
    # eval/kid and (with a classifier) eval/class_accuracy at that step, also to Tune (sweeps).
    eval_every: int = 0  # steps; 0: no in-training evaluation
    eval_samples: int = 1000  # sample i has class i // ceil(eval_samples / classes), as in flowar evaluate
    eval_batch_size: int = 50
    eval_seed: int = 0  # the samples' noise, as generation.seed in flowar evaluate
    # The real images: fashion-mnist[:test|train], an image folder, or an ADM .npz (FID only).
    # Their statistics are computed once and cached (the same cache as flowar evaluate's).
    eval_reference: str = path_field("reference")
    eval_reference_images: int = 0  # 0: all images of eval_reference
    eval_kid: bool = True  # KID of the feature subsets (10,000 at most of each, seed 0)
    # A folder with the Fashion-MNIST classifier (classifier.safetensors, written by
    # pipelines/evaluate/classifier.py; the quickstart's <home>/classifier): eval/class_accuracy.
    eval_classifier: str = path_field("input")

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
        self._check_eval()

    def _check_eval(self):
        if self.eval_every < 0:
            raise ConfigError(f"train.eval_every={self.eval_every} must not be negative (0: off)")
        if not self.eval_every:
            return
        if self.eval_samples < 2 or self.eval_batch_size < 1:
            raise ConfigError(f"train.eval_samples={self.eval_samples} must be at least 2 (a "
                              f"covariance) and train.eval_batch_size={self.eval_batch_size} >= 1")
        if not self.eval_reference:
            raise ConfigError(f"train.eval_every={self.eval_every} needs train.eval_reference: the "
                              "real images to compare with (fashion-mnist:test, an image folder, "
                              "or an ADM .npz of statistics)")
        if self.eval_reference_images < 0:
            raise ConfigError(f"train.eval_reference_images={self.eval_reference_images} must "
                              "not be negative (0: all)")

    @property
    def micro_batch(self) -> int:
        return self.global_batch_size // (self.num_workers * self.grad_accum_steps)


@dataclass
class TrainJobConfig:
    preset: str = ""  # start the model from a preset (flowar.config.PRESETS); `model:` overrides it
    data: DataConfig = field(default_factory=DataConfig)
    model: TrainModelConfig = field(default_factory=TrainModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        check_job(self)  # combinations across sections, refused when the config is read


def check_job(cfg: TrainJobConfig) -> None:
    """Combinations across sections, which no section's own `__post_init__` can see.

    Runs when the config is built (`TrainJobConfig.__post_init__`), so `--print-config`, sweeps
    and the run refuse them alike, instead of the first sample grid (mid-training, then retried
    train.max_failures times by Ray). The sampler's own impossible time grids are SamplerConfig's."""
    model, sampler, train = cfg.model, cfg.sampler, cfg.train
    check_sampler_fits(model.objective, sampler)  # the same refusal as FlowAR.generate's
    if cfg.data.partitions and train.global_batch_size % cfg.data.partitions:
        raise ConfigError(f"data.partitions={cfg.data.partitions} does not divide "
                          f"train.global_batch_size={train.global_batch_size}: every step takes "
                          "the same number of rows from each partition")
    bad = [c for c in train.sample_classes if not 0 <= c < model.num_classes]
    if bad:
        raise ConfigError(f"train.sample_classes {bad} are outside [0, model.num_classes="
                          f"{model.num_classes})")


def load_train_config(path=None, overrides=()) -> TrainJobConfig:
    """YAML + overrides; a `preset:` fills the model section under whatever the file sets.

    `flowar train --print-config`, `flowar train`, sweeps and the quickstart all read the job
    here, so each refuses the same configs with the same message: every section's own checks
    (the dataclasses' `__post_init__`) and the combinations of `check_job`. Needs no I/O.
    What needs I/O is checked by `run_train` (pipelines/train/job.py) before any Ray or MLflow
    work: the dataset's metadata against the model, the MLflow store, and train.device=cuda
    against the Ray cluster's GPUs."""
    # The preset is read first, so the config is built (and checked) once, with the preset's
    # model under the file's: checked with the default model, a message would quote widths
    # the job does not have.
    preset = _preset_name(path, overrides)
    if preset and preset not in PRESETS:
        raise ConfigError(f"preset={preset!r} is unknown; choose one of {', '.join(PRESETS)}")
    model = {**PRESETS[preset], **TRAINING_PRESETS.get(preset, {})} if preset else None
    cfg = load_config(TrainJobConfig, path, overrides, base={"model": model} if model else None)
    if not cfg.data.path:
        raise ConfigError("data.path is empty: name a latent dataset written by `flowar encode`")
    return cfg


def _preset_name(path, overrides) -> str:
    """`preset` of the file + overrides, before the config is built (load_config reports any
    unreadable file or malformed override itself)."""
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
    """The MLflow run and the Ray Train run share this name; the same config resumes by default.

    How the same training is spread over processes (train.num_workers, train.grad_accum_steps,
    train.device) is left out of the name: the same job re-run on another number of workers
    continues the run (elastic resume; the data order does not depend on the worker count)."""
    if cfg.mlflow.run_name:
        return cfg.mlflow.run_name
    data = to_dict(cfg)
    for key in ("num_workers", "grad_accum_steps", "device"):
        data["train"].pop(key)
    return f"train-{cfg.preset or 'flowar'}-{config_hash(data)}"


@dataclass
class WorkerPayload:
    """What the driver hands every training worker: the job, the MLflow run it logs to, Ray's
    directory of the run, and the dataset metadata and row-group list the driver already read
    (so no worker reads them again). Ray Train's train_loop_config must be a dict: the payload travels as
    {"payload": WorkerPayload} (`as_loop_config`) and the worker unpacks it once."""
    job: TrainJobConfig
    run_id: str  # the MLflow run; FailureConfig restarts of dead workers keep logging to it
    tracking_uri: str
    run_dir: str  # <storage>/<run name>: Ray's run directory, also holding best/ and export/
    meta: LatentDatasetMeta
    units: list = field(default_factory=list)  # the dataset's row groups (LatentDataset.units())
    fault: dict = field(default_factory=dict)  # test hook, see pipelines/train/faults.py
    # train.eval_reference as the driver read it (pipelines/evaluate/reference.py's spec); None
    # when train.eval_every is 0
    eval_reference: dict | None = None

    def as_loop_config(self) -> dict:
        return {"payload": self}

    @staticmethod
    def from_loop_config(config: dict) -> WorkerPayload:
        return config["payload"]
