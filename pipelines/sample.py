"""`flowar sample`: images of given classes from a trained model, as a PNG grid (and files).

    flowar sample runs/export --classes 0,3,7 --per-class 8 --out samples.png --images-dir samples/
    flowar sample runs/export --classes 1 sampler.cfg=2.0 sampler.num_steps=50

Each sample is defined like in `flowar evaluate`: sample j of class c has index c * per_class + j
and its noise is seeded from (seed, index); with --per-class equal to the evaluation's
samples_per_class these are the evaluation's samples of that class. Runs in
this process (no Ray): it is for looking at a few images, not for 50,000.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flowar.config import ConfigError, SamplerConfig
from pipelines.core.config import load_config


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
    """uint8 (N,3,H,W) images: `per_class` samples of each class, in class order.

    Sample j of class c has global index c * per_class + j; its noise is seeded from (seed, index)."""
    import numpy as np
    from flowar.config import to_dict
    from pipelines.evaluate.worker import EvalWorker, export_vae_spec

    ckpt = Path(checkpoint).expanduser().resolve()
    if not (ckpt / "config.json").is_file():
        raise ConfigError(f"checkpoint {checkpoint!r} is not a save_pretrained folder (no config.json)")
    spec = {"id": vae} if vae else export_vae_spec(ckpt)
    ema = ckpt / "ema.safetensors"
    gen = {"checkpoint": str(ckpt), "ema_file": str(ema) if ema.is_file() else "", "vae": spec,
           "seed": seed, "samples_per_class": per_class, "sampler": to_dict(sampler)}
    worker = EvalWorker(None, gen, device)  # generator only: no Inception network needed
    if classes is None:
        classes = list(range(worker.model.config.num_classes))
    classes = parse_classes(",".join(map(str, classes)), worker.model.config.num_classes)
    indices = [c * per_class + j for c in classes for j in range(per_class)]
    out = [worker.generate(indices[i:i + batch_size]).cpu().numpy()
           for i in range(0, len(indices), batch_size)]
    return np.concatenate(out), indices


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="PNG grid (and files) of samples of given classes",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="model folder written by save_pretrained (a training export)")
    p.add_argument("overrides", nargs="*", help="sampler.key=value, e.g. sampler.cfg=2.0 sampler.num_steps=50")
    p.add_argument("--classes", default="", help="comma-separated class indices (default: all)")
    p.add_argument("--per-class", type=int, default=8, help="samples per class = images per grid row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples.png", help="grid PNG path")
    p.add_argument("--images-dir", default="", help="also write each image as <dir>/class<c>_<index>.png")
    p.add_argument("--config", default=None, help="YAML whose `sampler:` section is used (e.g. an eval config)")
    p.add_argument("--vae", default="", help="override the VAE named by the checkpoint's latents.json")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from dataclasses import dataclass, field

    import numpy as np
    from PIL import Image

    from pipelines.evaluate.shards import grid_png
    from pipelines.evaluate.job import check_sampler_for_export

    @dataclass
    class _SamplerOnly:  # the sampler section of any config, the rest ignored
        sampler: SamplerConfig = field(default_factory=SamplerConfig)

    base = None
    if args.config:
        import yaml
        base = {"sampler": (yaml.safe_load(Path(args.config).read_text()) or {}).get("sampler", {})}
    bad = [o for o in args.overrides if not o.startswith("sampler.")]
    if bad:
        raise ConfigError(f"flowar sample takes only sampler.* overrides, got {bad}")
    sampler = load_config(_SamplerOnly, None, args.overrides, base=base).sampler
    check_sampler_for_export(args.checkpoint, sampler)
    if args.per_class < 1:
        raise ConfigError(f"--per-class={args.per_class}: need at least 1")
    classes = None
    if args.classes:
        classes = [int(c) for c in args.classes.split(",") if c.strip().lstrip("-").isdigit()]
        if len(classes) != len([c for c in args.classes.split(",") if c.strip()]):
            raise ConfigError(f"--classes {args.classes!r}: expected integers separated by commas")
    images, indices = sample_images(args.checkpoint, classes, args.per_class, sampler, args.seed,
                                    args.batch_size, args.vae, args.device)
    grid = grid_png(list(images), args.per_class, Path(args.out))
    print(f"wrote {len(images)} samples as {grid}")
    if args.images_dir:
        d = Path(args.images_dir)
        d.mkdir(parents=True, exist_ok=True)
        for img, i in zip(images, indices):
            Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(
                d / f"class{i // args.per_class}_{i:06d}.png")
        print(f"wrote {len(images)} files to {d}")
    return 0
