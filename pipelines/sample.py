"""`flowar sample`: images of given classes from a trained model, as a PNG grid (and files).

    flowar sample runs/export --classes 0,3,7 --per-class 8 --out samples.png --images-dir samples/
    flowar sample runs/export --classes 1 sampler.cfg=2.0 sampler.num_steps=50
    flowar sample s3://bucket/run/export --out s3://bucket/samples/grid.png

The model folder and the outputs are local paths or storage URIs (pipelines/core/storage.py): a
remote model folder is downloaded into a temporary folder for the run.

Each sample is defined like in `flowar evaluate`: sample j of class c has index c * per_class + j
and its noise is seeded from (seed, index); with --per-class equal to the evaluation's
samples_per_class these are the evaluation's samples of that class. Runs in
this process (no Ray): it is for looking at a few images, not for 50,000.

Sampler settings: when <checkpoint>/sampler.json exists (the lowest-FID setting of a `flowar
evaluate` sampler grid), the sampler starts from it; --config's sampler: section, then the
sampler.* overrides, override it (sampler.json < --config < command line). One line says which
values came from it. A malformed sampler.json is refused, naming the file.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field

import yaml

from flowar.config import ConfigError, SamplerConfig, to_dict
from pipelines.core import storage
from pipelines.core.config import apply_overrides, load_config, parse_overrides
from pipelines.evaluate.export import check_sampler_for_export, checked_export, generator_spec

__all__ = ["SampleConfig", "run_sample", "sample_images", "parse_classes", "register"]


@dataclass
class SampleConfig:
    """What `flowar sample` makes and writes (its command line, typed)."""
    checkpoint: str  # model folder written by save_pretrained (a training export), path or URI
    classes: list[int] | None = None  # None: every class of the model
    per_class: int = 8  # samples per class = images per grid row
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0
    out: str = "samples.png"  # the grid PNG (path or URI)
    images_dir: str = ""  # also write each image as <dir>/class<c>_<index>.png (path or URI)
    vae: str = ""  # override the VAE named by the checkpoint's latents.json
    batch_size: int = 32
    device: str = "auto"

    def __post_init__(self):
        if self.per_class < 1:
            raise ConfigError(f"--per-class={self.per_class}: need at least 1")


def parse_classes(text: str, num_classes: int) -> list[int]:
    try:
        classes = [int(c) for c in text.replace(" ", "").split(",") if c]
    except ValueError:
        raise ConfigError(f"--classes {text!r}: expected integers separated by commas, e.g. 0,3,7") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise ConfigError(f"--classes {text!r}: classes must be in [0, {num_classes - 1}] for this model"
                          + (f" (bad: {bad})" if bad else ""))
    return classes


def sample_images(checkpoint: str, classes: list[int] | None, per_class: int, sampler: SamplerConfig,
                  seed: int = 0, batch_size: int = 32, vae: str = "", device: str = "auto"):
    """uint8 (N,3,H,W) numpy images: `per_class` samples of each class, in class order, and
    their indices. Sample j of class c has global index c * per_class + j; its noise is seeded
    from (seed, index)."""
    import numpy as np

    from pipelines.evaluate.worker import EvalWorker  # torch

    with local_export(checkpoint) as ckpt:  # the worker has loaded it when the block ends
        check_sampler_for_export(str(ckpt), sampler)
        gen = generator_spec(ckpt, sampler, vae=vae, seed=seed, samples_per_class=per_class)
        worker = EvalWorker(None, gen, device)  # generator only: no Inception network needed
    num_classes = worker.model.config.num_classes
    classes = parse_classes(",".join(map(str, classes if classes is not None else range(num_classes))),
                            num_classes)
    indices = [c * per_class + j for c in classes for j in range(per_class)]
    out = [worker.generate(indices[i:i + batch_size]).cpu().numpy()
           for i in range(0, len(indices), batch_size)]
    return np.concatenate(out), indices


@contextlib.contextmanager
def local_export(checkpoint: str):
    """The model folder at `checkpoint` (a path or a URI) as a local folder: a remote one is
    checked for config.json before anything is downloaded, then downloaded for the block."""
    with storage.local_dir(checked_export(checkpoint, "checkpoint ")) as local:
        yield local


def run_sample(cfg: SampleConfig) -> dict:
    """Make the samples and write the grid (and the files); returns where they went."""
    from pipelines.core.images import image_grid, save_png  # torch

    for key, place in (("--out", cfg.out), ("--images-dir", cfg.images_dir)):
        if place:
            _check_output(key, place)
    images, indices = sample_images(cfg.checkpoint, cfg.classes, cfg.per_class, cfg.sampler, cfg.seed,
                                    cfg.batch_size, cfg.vae, cfg.device)
    grid = storage.display(save_png(image_grid(images, cfg.per_class), cfg.out))
    files = []
    if cfg.images_dir:
        for img, i in zip(images, indices):
            files.append(storage.display(save_png(img.transpose(1, 2, 0).copy(), storage.join(
                cfg.images_dir, f"class{i // cfg.per_class}_{i:06d}.png"))))
    return {"grid": grid, "count": len(images), "files": files, "sampler": to_dict(cfg.sampler)}


def _check_output(key: str, place: str) -> None:
    """An output place that cannot be opened (an unknown scheme, a malformed URI) is refused
    before any sampling, not after it."""
    try:
        storage.resolve(place)
    except ValueError as e:
        raise ConfigError(f"{key} {place!r}: {e}") from None


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="PNG grid (and files) of samples of given classes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="model folder written by save_pretrained (a training export): "
                                      "a path or a URI such as s3://bucket/run/export")
    p.add_argument("overrides", nargs="*", help="sampler.key=value, e.g. sampler.cfg=2.0 sampler.num_steps=50; "
                                                "unset keys come from <checkpoint>/sampler.json when it exists")
    p.add_argument("--classes", default="", help="comma-separated class indices (default: all)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class = images per grid row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png", help="grid PNG: a path or a URI")
    p.add_argument("--images-dir", default="",
                   help="also write each image as <dir>/class<c>_<index>.png (a path or a URI)")
    p.add_argument("--config", default=None, help="YAML whose `sampler:` section is used (e.g. an eval config)")
    p.add_argument("--vae", default="", help="override the VAE named by the checkpoint's latents.json")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cli)


@dataclass
class _SamplerOnly:
    """The sampler section of any config (an eval config's, say); the rest is ignored."""
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


def _sampler(args) -> SamplerConfig:
    """<checkpoint>/sampler.json, then --config's `sampler:` section, then the sampler.*
    overrides (checked against the export when it is read, sample_images)."""
    from pipelines.evaluate.search import sampler_base  # light: no torch, Ray or MLflow

    section = {}
    if args.config:
        try:
            text = storage.read_bytes(args.config).decode()  # a path or a URI
        except (OSError, ValueError) as e:
            raise ConfigError(f"--config {args.config!r}: cannot read it ({e})") from None
        section = (yaml.safe_load(text) or {}).get("sampler") or {}
    bad = [o for o in args.overrides if not o.startswith("sampler.")]
    if bad:
        raise ConfigError(f"flowar sample takes only sampler.* overrides, got {bad}")
    given = apply_overrides(section if isinstance(section, dict) else {},
                            parse_overrides(args.overrides).get("sampler", {}))
    base, note = sampler_base(args.checkpoint, given)
    if note:
        print(f"flowar sample: {note}", file=sys.stderr)
    base = apply_overrides(base, {"sampler": section})
    return load_config(_SamplerOnly, None, args.overrides, base=base).sampler


def _classes(text: str) -> list[int] | None:
    """--classes as integers (None: all); their range is checked against the model."""
    if not text:
        return None
    classes = [int(c) for c in text.split(",") if c.strip().lstrip("-").isdigit()]
    if len(classes) != len([c for c in text.split(",") if c.strip()]):
        raise ConfigError(f"--classes {text!r}: expected integers separated by commas")
    return classes


def _cli(args) -> int:
    sampler = _sampler(args)
    cfg = SampleConfig(args.checkpoint, _classes(args.classes), args.per_class, sampler, args.seed,
                       args.out, args.images_dir, args.vae, args.batch_size, args.device)
    done = run_sample(cfg)
    used = " ".join(f"{k}={v}" for k, v in done["sampler"].items())
    print(f"wrote {done['count']} samples as {done['grid']} (sampler: {used})")
    if cfg.images_dir:
        print(f"wrote {done['count']} files to {storage.display(cfg.images_dir)}")
    return 0
