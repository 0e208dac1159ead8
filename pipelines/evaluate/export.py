"""A model export as `flowar evaluate` and `flowar sample` read it: a from_pretrained folder
(config.json, model.safetensors, optionally ema.safetensors) with latents.json naming the VAE.

The folder is a local path or a storage URI (pipelines/core/storage.py): only JSON and file names
are read here (no torch, no download), so both jobs check their inputs when the config is read,
before any model is loaded; evaluation workers download a remote export themselves.
"""

from __future__ import annotations

import json
import os

from flowar.config import ConfigError, SamplerConfig, check_sampler_fits, to_dict
from pipelines.core import storage
from pipelines.data.latents import LatentDatasetMeta

__all__ = ["is_export", "checked_export", "export_vae_spec", "generator_spec", "read_training_link",
           "checkpoint_identity", "check_sampler_for_export"]

EMA_FILE = "ema.safetensors"  # written beside the model by flowar train's EMA export


def read_text(ckpt, name: str) -> str | None:
    """The text of file `name` in the export (a path or URI), or None when there is none."""
    try:
        return storage.read_bytes(storage.join(os.fspath(ckpt), name)).decode()
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as e:  # pyarrow reports a missing object as OSError with the path
        if any(w in str(e).lower() for w in ("not found", "no such file", "does not exist")):
            return None
        raise


def is_export(ckpt) -> bool:
    """Whether `ckpt` is a save_pretrained folder (it has config.json)."""
    return storage.exists(storage.join(os.fspath(ckpt), "config.json"))


def checked_export(checkpoint: str, name: str) -> str:
    """`checkpoint` as an absolute folder or a URI, refused unless it can be read and
    save_pretrained wrote it; `name` names the input in the message ("generation.checkpoint="
    or "checkpoint "). Reads one file's metadata, downloads nothing."""
    ckpt = os.fspath(checkpoint)
    ckpt = ckpt if storage.is_uri(ckpt) else os.path.abspath(os.path.expanduser(ckpt))
    try:
        found = is_export(ckpt)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{name}{checkpoint!r} cannot be read: {e}") from None
    if not found:
        raise ConfigError(f"{name}{checkpoint!r} is not a save_pretrained folder (no config.json)")
    return ckpt


def export_vae_spec(ckpt) -> dict:
    """The `vae` entry of a training export's latents.json (the latent dataset's metadata)."""
    text = read_text(ckpt, "latents.json")
    if text is None:
        raise ConfigError(f"{ckpt} has no latents.json naming the VAE of its latents; "
                          "give the VAE explicitly (generation.vae / --vae)")
    return dict(LatentDatasetMeta.from_json(text, storage.join(os.fspath(ckpt), "latents.json")).vae)


def generator_spec(ckpt, sampler: SamplerConfig, *, vae: str = "", seed: int = 0,
                   samples_per_class: int = 50, use_ema: bool = True) -> dict:
    """What a worker (pipelines/evaluate/worker.py) needs to make samples of this export (a path
    or URI): the model and its EMA weights when present and wanted, the VAE (the export's unless
    `vae` overrides it), the seed and class layout of the sample indices, and the sampler."""
    ckpt = os.fspath(ckpt)
    ema_file = storage.join(ckpt, EMA_FILE)
    return {"checkpoint": ckpt, "ema_file": ema_file if use_ema and storage.exists(ema_file) else "",
            "vae": {"id": vae} if vae else export_vae_spec(ckpt), "seed": seed,
            "samples_per_class": samples_per_class, "sampler": to_dict(sampler)}


def read_training_link(ckpt) -> dict:
    """{run_id, step, model_id (its MLflow logged model)} of the training that wrote this export (config.json's "training" entry,
    written by flowar train's EMA export); empty for a bare save_pretrained folder."""
    training = json.loads(read_text(ckpt, "config.json") or "{}").get("training") or {}
    return {k: v for k, v in (("run_id", training.get("mlflow_run_id")),
                              ("step", training.get("step")),
                              ("model_id", training.get("mlflow_model_id"))) if v is not None}


def checkpoint_identity(ckpt) -> dict:
    """What makes two checkpoints the same for resumption: file names, sizes and mtimes, of the
    files that are the model (not those that describe it: the model card, evaluation.json and
    a sampler grid's sampler.json, flowar.hub.DESCRIPTIVE_FILES, written beside it later)."""
    import pyarrow.fs as pafs

    from flowar.hub import DESCRIPTIVE_FILES

    fs, root = storage.resolve(ckpt)
    files = sorted((i for i in fs.get_file_info(pafs.FileSelector(root))
                    if i.type == pafs.FileType.File and i.base_name not in DESCRIPTIVE_FILES),
                   key=lambda i: i.base_name)
    return {i.base_name: [i.size, int(i.mtime.timestamp()) if i.mtime else 0] for i in files}


def check_sampler_for_export(checkpoint: str, sampler: SamplerConfig) -> None:
    """The exported model decides which samplers work: refuse a misfit when the config is read
    (reads the export's config.json; a missing or unreadable one is refused by the run itself)."""
    try:
        text = read_text(checkpoint, "config.json") if checkpoint else None
    except (OSError, ValueError):
        text = None
    if text is not None:
        model = json.loads(text).get("model") or {}
        check_sampler_fits(model.get("objective", "flow"), sampler)
