"""The config of `flowar evaluate` (configs/eval-*.yaml): what to generate, the reference, the
metrics, the Inception weights and the Ray workers. Checks that need only the config run here,
when it is read; checks that read files (the export, the reference) run in
pipelines/evaluate/job.py before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flowar.config import ConfigError, SamplerConfig
from pipelines.core.config import MLflowConfig, RayConfig, path_field

__all__ = ["EvalConfig", "GenerationConfig", "ReferenceConfig", "MetricsConfig", "InceptionConfig",
           "WorkersConfig"]


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
    # KID and precision/recall use the features of a bounded subset of each set (ADM's suite:
    # 10,000 images for precision/recall): feature_subset_size samples drawn without replacement
    # by numpy's Generator(feature_subset_seed) from each set's indices, or all of a smaller set.
    # Only these features are kept; the report records the sizes used.
    feature_subset_size: int = 10000
    feature_subset_seed: int = 0
    kid_subsets: int = 100  # KID: this many random subsets of the feature subset (torch-fidelity's)
    kid_subset_size: int = 1000  # capped at the smaller feature subset (recorded in the report)
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
        """Every section's numbers, checked here (not in the sections) so that a missing
        checkpoint is named first, whatever else is wrong."""
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
                  **_metric_checks(self.metrics, g.num_samples)}
        for key, (value, ok, need) in checks.items():
            if not ok:
                raise ConfigError(f"{key}={value} is invalid: must be {need}")
        if not r.source:
            raise ConfigError("reference.source is required: fashion-mnist[:test], a folder, or a .npz")


def _metric_checks(m: MetricsConfig, num_samples: int) -> dict:
    """{key: (value, ok, what it must be)} of the metrics section."""
    n = m.feature_subset_size
    return {"metrics.feature_subset_size": (n, n >= 2, ">= 2"),
            "metrics.kid_subsets": (m.kid_subsets, m.kid_subsets >= 1, ">= 1"),
            "metrics.kid_subset_size": (m.kid_subset_size, 2 <= m.kid_subset_size <= n,
                                        f"in [2, metrics.feature_subset_size={n}]"),
            "metrics.prc_neighborhood": (m.prc_neighborhood, 1 <= m.prc_neighborhood < n,
                                         f"in [1, metrics.feature_subset_size={n})"),
            "metrics.isc_splits": (m.isc_splits, 1 <= m.isc_splits <= num_samples,
                                   f"in [1, generation.num_samples={num_samples}]")}
