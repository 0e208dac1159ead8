"""A model export as `flowar evaluate` and `flowar sample` read it: a from_pretrained folder
(config.json, model.safetensors, optionally ema.safetensors) with latents.json naming the VAE.

Only JSON and file names are read here (no torch), so both jobs check their inputs when the
config is read, before any model is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

from flowar.config import ConfigError, SamplerConfig, check_sampler_fits, to_dict
from pipelines.data.latents import LatentDatasetMeta

__all__ = ["is_export", "export_vae_spec", "generator_spec", "read_training_link",
           "checkpoint_identity", "check_sampler_for_export"]

EMA_FILE = "ema.safetensors"  # written beside the model by flowar train's EMA export


def is_export(ckpt: Path) -> bool:
    """Whether `ckpt` is a save_pretrained folder (it has config.json)."""
    return (ckpt / "config.json").is_file()


def export_vae_spec(ckpt: Path) -> dict:
    """The `vae` entry of a training export's latents.json (the latent dataset's metadata)."""
    path = Path(ckpt) / "latents.json"
    if not path.is_file():
        raise ConfigError(f"{ckpt} has no latents.json naming the VAE of its latents; "
                          "give the VAE explicitly (generation.vae / --vae)")
    return dict(LatentDatasetMeta.from_json(path.read_text(), str(path)).vae)


def generator_spec(ckpt: Path, sampler: SamplerConfig, *, vae: str = "", seed: int = 0,
                   samples_per_class: int = 50, use_ema: bool = True) -> dict:
    """What a worker (pipelines/evaluate/worker.py) needs to make samples of this export: the
    model and its EMA weights when present and wanted, the VAE (the export's unless `vae`
    overrides it), the seed and class layout of the sample indices, and the sampler."""
    ema_file = ckpt / EMA_FILE
    return {"checkpoint": str(ckpt), "ema_file": str(ema_file) if use_ema and ema_file.is_file() else "",
            "vae": {"id": vae} if vae else export_vae_spec(ckpt), "seed": seed,
            "samples_per_class": samples_per_class, "sampler": to_dict(sampler)}


def read_training_link(ckpt: Path) -> dict:
    """{run_id, step} of the training that wrote this export (config.json's "training" entry,
    written by flowar train's EMA export); empty for a bare save_pretrained folder."""
    training = json.loads((ckpt / "config.json").read_text()).get("training") or {}
    return {k: v for k, v in (("run_id", training.get("mlflow_run_id")),
                              ("step", training.get("step"))) if v is not None}


def checkpoint_identity(ckpt: Path) -> dict:
    """What makes two checkpoints the same for resumption: file names, sizes and mtimes."""
    files = sorted(p for p in ckpt.iterdir() if p.is_file())
    return {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in files}


def check_sampler_for_export(checkpoint: str, sampler: SamplerConfig) -> None:
    """The exported model decides which samplers work: refuse a misfit when the config is read
    (reads the export's config.json; a missing one is refused by the run itself)."""
    config_file = Path(checkpoint) / "config.json"
    if config_file.is_file():
        model = json.loads(config_file.read_text()).get("model") or {}
        check_sampler_fits(model.get("objective", "flow"), sampler)
