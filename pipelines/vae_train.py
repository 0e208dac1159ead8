"""`flowar vae train`: train a small diffusers AutoencoderKL on an image source with Ray Train.

No pretrained VAE can be downloaded on an offline machine, so the embedded default trains its own
(configs/vae-fashion-mnist.yaml: 32x32 RGB -> 4x8x8 in a few minutes on 2 CPUs). The loss is
LDM's without the GAN: pixel MSE + kl_weight * KL (KL per image divided by the pixel count, so
kl_weight means what LDM's 1e-6 means). At the end rank 0 measures the latents' mean and std on
its data and stores shift_factor = mean, scaling_factor = 1/std in the VAE's config, so the
normalised latents are roughly unit Gaussian, as FlowAR's flow matching assumes.

Losses and a reconstruction grid (PNG: originals above, reconstructions below) go to MLflow; the
VAE is saved with `save_pretrained` to `output`. An existing output is reused unless overwrite.
The images stream (pipelines/vae_train_loop.py, with `flowar train`'s loader,
pipelines/data/stream.py): the driver lists the source's items once (names only) and cuts them
into units of UNIT_IMAGES consecutive items; each worker reads its own partition of their seeded
order, decoding a unit when its shuffled window of `train.shuffle_buffer` images needs it. Nothing
is decoded on the driver or held in Ray's object store, and a worker holds about two windows of
images, whatever the size of the source. Images that do not decode are counted and left out of the
losses (`data_rejects` in MLflow), never fatal. The per-worker loop is in
pipelines/vae_train_loop.py.
"""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass, field

from flowar.config import ConfigError, from_dict, to_dict
from pipelines.core import storage, tracking
from pipelines.core.config import MLflowConfig, RayConfig, add_job_parser, load_config, path_field
from pipelines.core.progress import follow
from pipelines.core.ray_runtime import init_ray
from pipelines.core.source import flowar_command, source_tags
from pipelines.data.sources import SourceConfig, list_items

# Source items decoded together (a stream.py unit). Items are sorted by key, so a class-sorted
# source (folders) puts one class in a unit: a window of shuffle_buffer images mixes about
# shuffle_buffer / UNIT_IMAGES units; smaller units mix more but read the source in more pieces.
UNIT_IMAGES = 256


@dataclass
class VAEModelSection:
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # n levels: /2^(n-1)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32

    def __post_init__(self):
        if not self.block_out_channels or any(c < 1 for c in self.block_out_channels):
            raise ConfigError(f"model.block_out_channels={self.block_out_channels}: need at least "
                              "one level, each with at least 1 channel")
        for name in ("layers_per_block", "latent_channels", "norm_num_groups"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}={getattr(self, name)} must be at least 1")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError(f"model.block_out_channels={self.block_out_channels} must be multiples "
                              f"of model.norm_num_groups={self.norm_num_groups}")


@dataclass
class VAETrainSection:
    steps: int = 1500
    batch_size: int = 64  # per worker
    lr: float = 1e-3
    kl_weight: float = 1e-6
    num_workers: int = 2
    seed: int = 0
    log_every: int = 50
    image_every: int = 500  # reconstruction grid every N steps (and at the end)
    # images per shuffled window of a worker's stream: more mixes better; a worker holds about
    # two windows of decoded images (2048 at 32x32: 12 MB; at 256x256: 800 MB)
    shuffle_buffer: int = 2048

    def __post_init__(self):
        for name in ("steps", "batch_size", "num_workers", "log_every", "image_every",
                     "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be at least 1")
        if not self.lr > 0:
            raise ConfigError(f"train.lr={self.lr} must be more than 0")
        if self.kl_weight < 0:
            raise ConfigError(f"train.kl_weight={self.kl_weight} must not be negative")


@dataclass
class VAETrainConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    resolution: int = 32
    model: VAEModelSection = field(default_factory=VAEModelSection)
    train: VAETrainSection = field(default_factory=VAETrainSection)
    output: str = path_field("output")  # save_pretrained folder (local or URI)
    overwrite: bool = False  # retrain even when output already holds a VAE
    mlflow: MLflowConfig = field(default_factory=lambda: MLflowConfig(experiment="flowar-vae"))
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        """Every check that needs only the config, so `flowar vae train --print-config` refuses
        what the run would. Left to the run (they read the data): the source's listing
        (source.*) and whether it holds any image that decodes."""
        if not self.output:
            raise ConfigError("output is empty: give the folder to save the VAE in (local path or URI)")
        check_resolution(self.model, self.resolution)


def check_resolution(model: VAEModelSection, resolution: int) -> None:
    n = len(model.block_out_channels)
    if resolution < 1 or resolution % 2 ** (n - 1):
        raise ConfigError(f"resolution={resolution} is not a positive multiple of the downsampling "
                          f"2^{n - 1} of model.block_out_channels={model.block_out_channels}")


def _init_ray(cfg: VAETrainConfig):
    # the workers and the trainer's own actor (one CPU each); the workers decode their images
    return init_ray(cfg.ray, min_cpus=cfg.train.num_workers + 1)


def _source_refs(cfg: VAETrainConfig) -> list[str]:
    """Where each of the source's images is (sorted by key), listed once on the driver; raises
    ConfigError when the source cannot give every worker an image."""
    items, _ = list_items(cfg.source)
    if len(items) < cfg.train.num_workers:
        raise ConfigError(f"source {cfg.source.kind} {cfg.source.path!r} has {len(items)} images, "
                          f"fewer than train.num_workers={cfg.train.num_workers}: every worker "
                          "streams its own share; lower train.num_workers or raise source.limit")
    return [ref for _, _, ref in items]


def image_units(n: int) -> list:
    """The stream's units over n items: runs of UNIT_IMAGES consecutive items, ref (start, end)."""
    from pipelines.data.stream import Unit  # numpy: off `flowar --help`'s import path

    return [Unit(ref=(a, min(a + UNIT_IMAGES, n)), rows=min(a + UNIT_IMAGES, n) - a)
            for a in range(0, n, UNIT_IMAGES)]


def run_vae_train(cfg: VAETrainConfig, config_path: str | None = None) -> str:
    """Train (or reuse) the VAE at cfg.output; returns the output location."""
    from_dict(VAETrainConfig, to_dict(cfg))  # every config check again: cfg may have been edited
    if storage.exists(storage.join(cfg.output, "config.json")) and not cfg.overwrite:
        print(f"flowar vae train: reusing the VAE at {storage.display(cfg.output)} "
              "(set overwrite=true to train again)", file=sys.stderr)
        return cfg.output
    refs = _source_refs(cfg)  # before the MLflow run: a source that cannot serve is refused
    uri = cfg.mlflow.resolved_uri()
    run_id = _start_run(cfg, uri, config_path)
    status = "FAILED"
    try:
        result = _fit(cfg, refs, uri, run_id)
        _save(result.checkpoint, cfg)
        status = "FINISHED"
        print(f"flowar vae train: saved to {storage.display(cfg.output)}; "
              + ", ".join(f"{k}={v:.4g}" for k, v in result.metrics.items() if isinstance(v, float)),
              file=sys.stderr)
    finally:
        tracking.end_run(uri, run_id, status)
    return cfg.output


def _start_run(cfg: VAETrainConfig, uri: str, config_path: str | None) -> str:
    """The MLflow run of this training (resumed by name when it exists), its config logged."""
    tracking.check_reachable(uri)
    run_name = cfg.mlflow.run_name or f"vae-{uuid.uuid4().hex[:6]}"
    run_id, _ = tracking.start_or_resume_run(uri, cfg.mlflow.experiment, run_name,
                                             cfg.mlflow.artifact_location)
    tracking.log_config(uri, run_id, cfg, config_path, {
        "job": "vae-train", "output": storage.display(cfg.output),
        **source_tags(flowar_command("vae", "train", config_path))})
    return run_id


def _fit(cfg: VAETrainConfig, refs: list[str], uri: str, run_id: str):
    """Ray Train's fit of pipelines/vae_train_loop.py on the source's images; its Result."""
    _init_ray(cfg)
    import ray.train  # Ray and torch: not at the top, `flowar --help` imports this module
    from ray.train.torch import TorchTrainer

    from pipelines.vae_train_loop import train_loop_per_worker

    t = cfg.train
    use_gpu = ray.cluster_resources().get("GPU", 0) >= t.num_workers
    trainer = TorchTrainer(
        train_loop_per_worker,
        # the typed config travels as it is: the loop reads it without importing this module;
        # with it the images' refs (names, not pixels) and their units
        train_loop_config={"cfg": cfg, "refs": refs, "units": image_units(len(refs)),
                           "mlflow_uri": uri, "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(name=f"vae-train-{run_id[:8]}-{uuid.uuid4().hex[:4]}",
                                       storage_path=cfg.ray.resolved_storage_path()))
    # step/total, loss, images/s and time left from rank 0's MLflow metrics while fit() runs
    with follow(uri, run_id, total=t.steps, log_every=t.log_every,
                images_per_step=t.batch_size * t.num_workers, desc="vae train"):
        return trainer.fit()


def _save(checkpoint, cfg: VAETrainConfig) -> None:
    """Copy rank 0's save_pretrained folder to cfg.output (emptied first with overwrite)."""
    with checkpoint.as_directory() as d:
        if cfg.overwrite and storage.exists(cfg.output):
            fs, path = storage.resolve(cfg.output)
            fs.delete_dir_contents(path)
        storage.upload_dir(d, cfg.output)


def _cli(args) -> int:
    run_vae_train(load_config(VAETrainConfig, args.config, args.overrides), args.config)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("vae", help="tokenizers: train a small VAE (flowar vae train)",
                              description="VAE tools. `flowar vae train CONFIG` trains a small "
                                          "diffusers AutoencoderKL with Ray Train.")
    sub = p.add_subparsers(dest="vae_command", metavar="SUBCOMMAND")
    add_job_parser(sub, "train", run=_cli,
                   load=lambda a: load_config(VAETrainConfig, a.config, a.overrides),
                   help="train a small AutoencoderKL (recon + KL) with Ray Train, log to MLflow",
                   description=__doc__, raw_description=True,
                   epilog="example: flowar vae train configs/vae-fashion-mnist.yaml train.steps=200",
                   config_help="YAML config (see configs/vae-*.yaml)", overrides_example="train.steps=200")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
