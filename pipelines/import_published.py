"""`flowar import`: a released FlowAR checkpoint -> a flowar model folder that `flowar sample` and
`flowar evaluate` take like any training export.

    flowar import FlowAR-S.pth --model S --vae /models/kl16.ckpt --out ./flowar-S
    flowar import s3://models/FlowAR-S.pth --model S --vae /models/kl16.ckpt --out s3://models/flowar-S
    flowar evaluate configs/eval-imagenet256-adm.yaml generation.checkpoint=./flowar-S \\
        reference.source=/data/adm_in256_stats.npz

The released files are raw state dicts of the published code; its training checkpoints hold
`model_ema` and `model` (the EMA is used unless --entry says otherwise). Every tensor is renamed and
used exactly once (flowar.load_published). The VAE is checked against the model (latent channels,
and latent size = image size / VAE downsampling), then named with its weights' hash in the
folder's latents.json, so sampling decodes with exactly that VAE and its normalisation.

The checkpoint and --out are local paths or storage URIs (pipelines/core/storage.py): a remote
checkpoint is downloaded into a temporary folder, a remote folder is written locally first and
then uploaded. --vae is a local file or folder, or a hub id.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

from flowar.config import ConfigError
from pipelines.core import storage
from pipelines.data.latents import LatentDatasetMeta, code_version


def _published_args(model: str, published_config: str) -> dict:
    """The published constructor's keyword arguments, from --model or --published-config."""
    from flowar.published import PUBLISHED_CONFIGS  # torch

    if bool(model) == bool(published_config):
        raise ConfigError("give exactly one of --model (S, L or H) and --published-config")
    if model:
        if model not in PUBLISHED_CONFIGS:
            raise ConfigError(f"--model {model!r}: released models are {', '.join(PUBLISHED_CONFIGS)}")
        return dict(PUBLISHED_CONFIGS[model])
    is_json = published_config.lstrip().startswith(("{", '"'))
    text = published_config if is_json else _read_config_file(published_config)
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--published-config: neither a file nor JSON ({e})") from None
    if isinstance(args, str):  # the golden files store the JSON as a string
        args = json.loads(args)
    return args


def _read_config_file(place: str) -> str:
    try:
        return storage.read_bytes(place).decode()
    except (OSError, ValueError) as e:
        raise ConfigError(f"--published-config {place!r}: neither JSON nor a readable file ({e})") from None


def run_import(checkpoint: str, out: str, vae: str, model: str = "", published_config: str = "",
               entry: str = "auto", overwrite: bool = False) -> dict:
    """Convert, check and write; returns a summary."""
    from flowar import load_published, read_published_file  # torch

    args = _published_args(model, published_config)
    _check_out(out, overwrite)
    _check_checkpoint(checkpoint)
    vae_path = Path(vae).expanduser()
    spec = str(vae_path.resolve()) if vae_path.exists() else vae  # a path stays valid from any cwd
    info = _vae_info(spec, vae)
    with _local_checkpoint(checkpoint) as local:
        flowar_model = load_published(read_published_file(local, entry), args)
    resolution = int(args.get("img_size", 256))
    _check_vae_fits(info, flowar_model.config, resolution, vae)
    tmp = Path(tempfile.mkdtemp(prefix="flowar-import-")) if storage.is_uri(out) else None
    try:  # a remote folder is written here first, then uploaded whole
        sampler = _write_export(flowar_model, tmp or Path(out).expanduser(), info, resolution,
                                checkpoint, entry, args, model)
        if tmp:
            storage.upload_dir(tmp, out)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    params = sum(p.numel() for p in flowar_model.parameters())
    return {"out": storage.display(out), "parameters": params, "vae": spec, "sampler": sampler}


def _check_out(out: str, overwrite: bool) -> None:
    """--out must be a place that can be opened, and hold no model unless --overwrite."""
    try:
        taken = storage.exists(storage.join(out, "config.json"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--out {out!r}: cannot open it ({e})") from None
    if taken and not overwrite:
        raise ConfigError(f"--out {out}: already holds a model; pass --overwrite or choose another folder")


def _check_checkpoint(checkpoint: str) -> None:
    """The released file must exist: asked before the VAE is loaded or anything downloaded."""
    try:
        found = storage.exists(checkpoint)
    except (OSError, ValueError) as e:
        raise ConfigError(f"published checkpoint {checkpoint!r}: cannot read it ({e})") from None
    if not found:
        raise ConfigError(f"published checkpoint {checkpoint!r} does not exist")


@contextlib.contextmanager
def _local_checkpoint(checkpoint: str):
    """The released file as a local path (a remote one downloaded for the block), its errors
    naming the file as given."""
    if not storage.is_uri(checkpoint):
        yield checkpoint
        return
    with storage.local_file(checkpoint) as local:
        try:
            yield str(local)
        except ConfigError as e:  # read_published_file's reason, about the downloaded copy
            raise ConfigError(str(e).replace(str(local), checkpoint)) from None


def _vae_info(spec: str, vae: str):
    """The VAE's VAEInfo (latent channels, downsampling, weights hash); --vae names it."""
    from flowar.vae import load_vae  # torch

    try:
        return load_vae(spec)[1]
    except (OSError, ValueError) as e:
        raise ConfigError(f"--vae {vae!r}: {e}") from None


def _check_vae_fits(info, cfg, resolution: int, vae: str) -> None:
    """The VAE must make the model's latents: its channels, and image size / downsampling =
    the model's finest scale."""
    if info.latent_channels != cfg.latent_channels:
        raise ConfigError(f"--vae {vae!r} makes {info.latent_channels}-channel latents; the model "
                          f"takes {cfg.latent_channels} (the published models use MAR's KL-16)")
    if resolution // info.downsample != cfg.latent_size:
        raise ConfigError(f"--vae {vae!r} downsamples by {info.downsample}: {resolution} px images give "
                          f"{resolution // info.downsample}x{resolution // info.downsample} latents, the "
                          f"model's finest scale is {cfg.latent_size}")


def _write_export(flowar_model, out_dir: Path, info, resolution: int, checkpoint: str, entry: str,
                  args: dict, model: str) -> dict:
    """save_pretrained + latents.json naming the VAE (with its weights' hash), as a training
    export has them; returns the published sampler settings recorded with it."""
    from flowar.published import PUBLISHED_SAMPLERS
    from flowar.vae import weights_sha256

    cfg = flowar_model.config
    source = {"kind": "published", "checkpoint": storage.display(checkpoint),
              "sha256": weights_sha256(flowar_model), "entry": entry}  # of the weights, in memory
    sampler = PUBLISHED_SAMPLERS.get(model, {})
    flowar_model.save_pretrained(out_dir, extra={"imported": {**source, "published_config": args,
                                                              "published_sampler": sampler}})
    meta = LatentDatasetMeta(vae=info.to_dict(), resolution=resolution, latent_size=cfg.latent_size,
                             latent_channels=cfg.latent_channels, scales=[cfg.latent_size],
                             num_classes=cfg.num_classes, source=source, code_version=code_version())
    (out_dir / "latents.json").write_text(meta.to_json())
    return sampler


def _cli(args) -> int:
    summary = run_import(args.checkpoint, args.out, args.vae, args.model, args.published_config,
                         args.entry, args.overwrite)
    flags = " ".join(f"sampler.{k}={v}" for k, v in summary["sampler"].items())
    print(f"flowar import: {summary['parameters']:,} parameters -> {summary['out']}\n"
          f"  samples:    flowar sample {summary['out']} --classes 207,360,387 {flags}\n"
          f"  evaluation: flowar evaluate configs/eval-imagenet256-adm.yaml "
          f"generation.checkpoint={summary['out']} {flags} reference.source=<adm_in256_stats.npz>",
          file=sys.stderr)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "import", help="a released FlowAR-S/L/H checkpoint -> a model folder for sample/evaluate",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="FlowAR-S/L/H.pth (raw state dict) or a published training "
                                      "checkpoint: a path or a URI")
    p.add_argument("--model", default="", help="S, L or H: the released model's constructor arguments")
    p.add_argument("--published-config", default="",
                   help="instead of --model: the published constructor's keyword arguments (JSON or a file)")
    p.add_argument("--vae", required=True,
                   help="the VAE of the model's latents: MAR's kl16.ckpt, a diffusers folder or a hub id")
    p.add_argument("--out", required=True,
                   help="model folder to write (config.json, model.safetensors, latents.json): a path or a URI")
    p.add_argument("--entry", default="auto",
                   help="training checkpoints only: which state dict to use (auto = model_ema, else model)")
    p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    p.set_defaults(func=_cli)
