"""`flowar encode`: images -> VAE posterior moments -> a latent pyramid dataset (pipelines.data.latents).

Ray Data, streaming (memory stays flat however many images):

    shards (names only) --map_batches(decode_items, CPU tasks)--> cropped uint8 images
        --map_batches(LatentWriter, ActorPoolStrategy, num_gpus when the cluster has GPUs)-->
        parts written by the actors themselves --> one summary row per part back to the driver

With GPUs the decode tasks and the GPU actors are separate stages (different resources); on CPUs
Ray fuses decoding into the actors, which saves moving the images between processes.

The images are cut into fixed shards of `encode.shard_size` (by sorted key). Each actor writes
what it receives as parts covering ranges of a shard, atomically. A re-run keeps every shard whose
parts cover it exactly and redoes the others (dropping their partial parts), so a killed run
resumes with no duplicates and no gaps. Unreadable images become rows of rejects.jsonl, never a
dead job. The actor, LatentWriter, is in pipelines/encode_writer.py.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from flowar.config import ConfigError, to_dict
from pipelines.core import storage
from pipelines.core.config import RayConfig, add_job_parser, load_config, path_field
from pipelines.core.ray_runtime import init_ray
from pipelines.data import latents
from pipelines.data.sources import SourceConfig, decode_items, list_items


@dataclass
class VAESection:
    spec: str = path_field("input_or_id")  # diffusers folder, hub id (org/name[:subfolder]) or LDM .ckpt/.pt
    ldm_config: dict = field(default_factory=dict)  # LDM checkpoints only; empty: MAR's KL-16


@dataclass
class EncodeSection:
    resolution: int = 32  # side of the center crop
    flip: bool = True  # also store the horizontally flipped image's moments (MAR does)
    pyramid: list[int] = field(default_factory=list)  # coarser sides to store as mean_s{k}
    # Coarser sides whose latents are encoded from the area-downsampled image (Table 3's "image"
    # scale construction, for model.scale_construction=image): columns mean_img{k}, std_img{k}.
    image_pyramid: list[int] = field(default_factory=list)
    dtype: Literal["float32", "float16"] = "float32"
    shard_size: int = 1000  # images per resume unit
    batch_size: int = 64  # images per VAE forward pass
    actors: int = 1  # size of the encoder actor pool
    actor_cpus: float = 1.0  # CPUs per actor (its torch threads on CPU)
    actor_gpus: float = 1.0  # GPUs per actor, used only when the cluster has GPUs

    def __post_init__(self):
        for name in ("resolution", "shard_size", "batch_size", "actors"):
            if getattr(self, name) < 1:
                raise ConfigError(f"encode.{name}={getattr(self, name)} must be at least 1")
        if self.actor_cpus <= 0:
            raise ConfigError(f"encode.actor_cpus={self.actor_cpus} must be more than 0")
        if self.actor_gpus < 0:
            raise ConfigError(f"encode.actor_gpus={self.actor_gpus} must not be negative")
        for name in ("pyramid", "image_pyramid"):
            sides = getattr(self, name)
            if any(s < 1 for s in sides):
                raise ConfigError(f"encode.{name}={sides}: sides must be at least 1")


@dataclass
class EncodeConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    vae: VAESection = field(default_factory=VAESection)
    output: str = path_field("output")  # dataset directory, local or URI
    overwrite: bool = False  # start over when output holds a dataset made with other settings
    encode: EncodeSection = field(default_factory=EncodeSection)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self):
        if not self.output:
            raise ConfigError("output is empty: give the dataset directory (local path or URI)")
        if not self.vae.spec:
            raise ConfigError("vae.spec is empty: give a diffusers folder, hub id or LDM checkpoint")


def load_encode_config(path=None, overrides=()) -> EncodeConfig:
    """The encode job's config, as `flowar encode` and `flowar encode --print-config` read it.

    No I/O: every value of every section (the dataclasses' `__post_init__`). Cheap I/O: the VAE's
    own config (a folder's config.json, an LDM checkpoint's `vae.ldm_config` or `<file>.json`)
    gives its downsampling factor, against which encode.resolution and the pyramid sides are
    checked (`check_vae_geometry`); a hub id, or an LDM file that carries its config inside,
    is checked when `run_encode` has loaded it. Left to the run because they need more than a
    config file: whether the VAE can encode each encode.image_pyramid size (a forward pass of
    the loaded VAE), the source's listing (source.*), and an existing output made with other
    settings (compared with the listing)."""
    cfg = load_config(EncodeConfig, path, overrides)
    check_vae_config(cfg)
    return cfg


def check_vae_config(cfg: EncodeConfig) -> None:
    """encode.resolution and the pyramid sides against the downsampling that the VAE's config
    file gives, when it gives one (see `vae_downsample`)."""
    downsample = vae_downsample(cfg.vae.spec, cfg.vae.ldm_config or None)
    if downsample is not None:
        check_vae_geometry(cfg, downsample)


# Where each supported diffusers class keeps the channel list whose length sets its downsampling
# (2^(levels - 1)); flowar.vae._info reads the same from the built model.
_DOWNSAMPLE_KEYS = {"AutoencoderKL": "block_out_channels",
                    "AutoencoderDC": "encoder_block_out_channels",
                    "AutoencoderTiny": "encoder_block_out_channels"}


def vae_downsample(spec: str, ldm_config: dict | None = None) -> int | None:
    """The VAE's downsampling factor from its config alone (no weights, no torch), or None when
    only loading it can tell (a hub id; an LDM checkpoint without vae.ldm_config, unless it is a
    .safetensors file with a <file>.json beside it). ConfigError, with
    `flowar.vae.load_vae`'s reason, when `spec` cannot be a VAE at all."""
    path = Path(spec).expanduser()
    if path.is_file():  # an LDM checkpoint, configured as load_vae does it
        return _ldm_downsample(spec, path, ldm_config)
    if path.is_dir():
        return _diffusers_downsample(spec, path)
    if spec.startswith((".", "/", "~")) or spec.partition(":")[0].count("/") != 1:
        _refuse_vae(spec, f"VAE {spec!r}: no such file or folder, and not a hub id (org/name)")
    return None  # a hub id: its config is on the hub


def _refuse_vae(spec: str, reason: str):
    raise ConfigError(f"vae.spec={spec!r}: {reason}")


def _ldm_downsample(spec: str, path: Path, config: dict | None) -> int | None:
    """2^(levels - 1) of an LDM checkpoint's `ch_mult`, from vae.ldm_config or <file>.json."""
    sidecar = path.with_suffix(path.suffix + ".json")
    if config is None:
        if path.suffix != ".safetensors":
            return None  # a `config` entry in the file would win over <file>.json
        if sidecar.is_file():
            try:
                config = json.loads(sidecar.read_text())
            except (OSError, ValueError) as e:
                _refuse_vae(spec, f"{sidecar} is not a readable JSON config ({e})")
    mult = (config or {}).get("ch_mult")
    return 2 ** (len(mult) - 1) if isinstance(mult, (list, tuple)) and mult else None


def _diffusers_downsample(spec: str, path: Path) -> int | None:
    """2^(levels - 1) of a diffusers save_pretrained folder's encoder channel list."""
    if not (path / "config.json").is_file():
        _refuse_vae(spec, f"VAE folder {spec!r} has no config.json (expected a diffusers "
                          "save_pretrained folder)")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        _refuse_vae(spec, f"{path / 'config.json'} is not readable JSON ({e})")
    kind = config.get("_class_name", "AutoencoderKL")
    if kind not in _DOWNSAMPLE_KEYS:
        _refuse_vae(spec, f"VAE {spec!r} is a {kind}; supported: {', '.join(_DOWNSAMPLE_KEYS)}")
    levels = config.get(_DOWNSAMPLE_KEYS[kind])
    return 2 ** (len(levels) - 1) if isinstance(levels, list) and levels else None


def check_vae_geometry(cfg: EncodeConfig, downsample: int) -> int:
    """encode.resolution and the pyramid sides against the VAE's downsampling; the latent side."""
    enc = cfg.encode
    if enc.resolution % downsample:
        raise ConfigError(f"encode.resolution={enc.resolution} is not a multiple of the VAE's "
                          f"downsampling factor {downsample} (vae.spec={cfg.vae.spec!r})")
    latent_size = enc.resolution // downsample
    for name in ("pyramid", "image_pyramid"):
        sides = getattr(enc, name)
        bad = [s for s in sides if not 1 <= s < latent_size]
        if bad:
            raise ConfigError(f"encode.{name}={sides}: sides {bad} are not coarser than the "
                              f"{latent_size}x{latent_size} latent (encode.resolution="
                              f"{enc.resolution} / VAE downsampling {downsample})")
    return latent_size


def _job_record(meta: latents.LatentDatasetMeta, cfg: EncodeConfig, items) -> dict:
    """What must stay the same for a resume to be correct."""
    keys = hashlib.sha256("\n".join(k for k, _, _ in items).encode()).hexdigest()
    static = {k: v for k, v in json.loads(meta.to_json()).items()
              if k not in ("count", "rejects", "created", "code_version")}
    return {"meta": static, "shard_size": cfg.encode.shard_size, "items": len(items), "keys_sha256": keys}


def _prepare_output(cfg: EncodeConfig, record: dict) -> None:
    """Refuse (or with overwrite, clear) an output made with other settings; note ours."""
    import pyarrow.fs as pafs
    fs, root = storage.resolve(cfg.output)
    job = f"{root}/_job.json"
    if fs.get_file_info(job).is_file:
        with fs.open_input_stream(job) as f:
            old = json.loads(f.read())
        if old != record and not cfg.overwrite:
            flat_old = {**old.pop("meta"), **old}
            flat_new = {**record["meta"], **{k: v for k, v in record.items() if k != "meta"}}
            diff = [k for k in flat_new if flat_old.get(k) != flat_new.get(k)]
            raise ConfigError(f"output {storage.display(cfg.output)} holds a dataset made with other "
                              f"settings ({', '.join(diff)} differ); set overwrite=true or choose another output")
        if old != record:
            fs.delete_dir_contents(root)
    elif fs.get_file_info(root).type != pafs.FileType.NotFound and not cfg.overwrite:
        if fs.get_file_info(pafs.FileSelector(root)):
            raise ConfigError(f"output {storage.display(cfg.output)} exists and is not a flowar encode "
                              "output; choose an empty or new directory, or set overwrite=true")
    elif cfg.overwrite and fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir_contents(root)
    fs.create_dir(root, recursive=True)
    fs.create_dir(f"{root}/rejects", recursive=True)
    with fs.open_output_stream(job) as f:
        f.write(json.dumps(record, indent=1).encode())


def _probe_image_scales(vae, sides, downsample: int, channels: int) -> None:
    """Encode one blank image at each image-pyramid size before any work: a VAE that cannot take a
    small image (e.g. GroupNorm with one value per group at 1x1) fails here, not in an actor."""
    import torch

    from flowar.vae import encode_moments  # torch: not at the top, `flowar --help` imports this
    for side in sorted(set(sides)):
        px = side * downsample
        try:
            with torch.no_grad():
                mean, _ = encode_moments(vae, torch.zeros(1, 3, px, px))
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"encode.image_pyramid: the VAE cannot encode the {px}x{px} image "
                              f"of scale {side} ({e}); leave out that side") from None
        if tuple(mean.shape[1:]) != (channels, side, side):
            raise ConfigError(f"encode.image_pyramid: a {px}x{px} image encodes to "
                              f"{tuple(mean.shape[1:])}, not ({channels}, {side}, {side})")


def _init_ray(cfg: EncodeConfig):
    need = cfg.encode.actors * cfg.encode.actor_cpus + 1  # + one decode task at a time
    return init_ray(cfg.ray, min_cpus=int(need + 0.999))


def run_encode(cfg: EncodeConfig) -> dict:
    """Encode (or resume encoding) cfg.source into cfg.output; returns the summary."""
    # The config's own checks ran when it was built; these read the VAE's config (the same
    # function and messages as load_encode_config, so --print-config and the run agree).
    check_vae_config(cfg)
    items, classes = list_items(cfg.source)
    meta = _dataset_meta(cfg, classes)
    _prepare_output(cfg, _job_record(meta, cfg, items))
    shards = [items[i:i + cfg.encode.shard_size] for i in range(0, len(items), cfg.encode.shard_size)]
    done, todo = _resume(cfg.output, shards)
    print(f"flowar encode: {len(items)} images in {len(shards)} shards; {len(done)} already "
          f"written, {len(todo)} to do -> {storage.display(cfg.output)}", file=sys.stderr)

    counts = {"images": 0, "rejects": 0, "bytes": 0, "seconds": 0.0}
    if todo:
        counts = _run_pipeline(cfg, meta, shards, todo, sum(len(shards[s]) for s in todo))
    final = latents.LatentDataset(cfg.output).finalise(meta)
    images, elapsed = counts["images"], counts["seconds"]
    summary = {"images": images, "rejects": counts["rejects"], "seconds": round(elapsed, 2),
               "images_per_s": round(images / elapsed, 2) if images else 0.0, "bytes": counts["bytes"],
               "shards_done": len(todo), "shards_skipped": len(done),
               "dataset_count": final.count, "dataset_rejects": final.rejects,
               "output": storage.display(cfg.output)}
    print("flowar encode: " + ", ".join(f"{k}={v}" for k, v in summary.items()), file=sys.stderr)
    summary["ray_data_stats"] = counts.get("stats", "")  # per-stage timing; returned, not printed
    return summary


def _dataset_meta(cfg: EncodeConfig, classes: list[str]) -> latents.LatentDatasetMeta:
    """Load the VAE once on the driver: its geometry is checked (a hub id's or a checkpoint's
    own), its image-pyramid sizes probed, and its record becomes the dataset's metadata."""
    from flowar.vae import load_vae  # torch: not at the top, `flowar --help` imports this

    enc = cfg.encode
    try:
        vae, info = load_vae(cfg.vae.spec, "cpu", cfg.vae.ldm_config or None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"vae.spec={cfg.vae.spec!r}: {e}") from None
    latent_size = check_vae_geometry(cfg, info.downsample)
    _probe_image_scales(vae, enc.image_pyramid, info.downsample, info.latent_channels)
    source = {k: v for k, v in vars(cfg.source).items() if k in ("kind", "path", "split", "limit")}
    return latents.LatentDatasetMeta(
        vae=info.to_dict(), resolution=enc.resolution, latent_size=latent_size,
        latent_channels=info.latent_channels, scales=sorted(set(enc.pyramid)) + [latent_size],
        image_scales=sorted(set(enc.image_pyramid)),
        dtype=enc.dtype, num_classes=len(classes), class_names=classes, flip=enc.flip,
        source=source, code_version=latents.code_version())


def _resume(output: str, shards: list) -> tuple[set[int], list[int]]:
    """(shards already written whole, shards to do). The parts of a killed run's partial shards
    are removed: those shards are redone whole."""
    dataset = latents.LatentDataset(output)
    parts = dataset.parts()
    done = {s for s, ranges in parts.items() if s < len(shards) and latents.covers(ranges, len(shards[s]))}
    dataset.remove([p for s, ranges in parts.items() if s not in done for _, _, p in ranges])
    return done, [s for s in range(len(shards)) if s not in done]


def _run_pipeline(cfg: EncodeConfig, meta, shards, todo, total) -> dict:
    """Run the Ray Data pipeline over the shards `todo`; returns images, rejects and bytes written,
    the seconds it took and Ray Data's per-stage statistics (`ds.stats()`)."""
    from tqdm import tqdm  # 0.1 s that `flowar --help` need not pay

    ray = _init_ray(cfg)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts images, Ray's blocks
    ds = _pipeline(cfg, meta, ray, [shards[s] for s in todo], todo)
    counts = {"images": 0, "rejects": 0, "bytes": 0}
    start = time.time()  # after Ray's start: images/s measures the pipeline (actor start included)
    with tqdm(total=total, unit="img", desc="encode", file=sys.stderr, dynamic_ncols=True) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            for k in counts:
                counts[k] += int(batch[k].sum())
            bar.update(int(batch["images"].sum() + batch["rejects"].sum()))
            bar.set_postfix(rejects=counts["rejects"], MB=round(counts["bytes"] / 2**20, 1))
    return {**counts, "seconds": time.time() - start, "stats": ds.stats()}


def _pipeline(cfg: EncodeConfig, meta, ray, shards: list, ids: list[int]):
    """shards (names only) -> decode tasks -> the LatentWriter actor pool -> one row per part."""
    from pipelines.encode_writer import LatentWriter  # imports torch and the VAE

    enc = cfg.encode
    rows = [{"shard": s, "keys": [k for k, _, _ in shard], "labels": [y for _, y, _ in shard],
             "refs": [r for _, _, r in shard]} for s, shard in zip(ids, shards)]
    gpus = enc.actor_gpus if ray.cluster_resources().get("GPU", 0) > 0 else 0
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(decode_items, batch_size=1, num_cpus=1, batch_format="numpy",
                        fn_kwargs={"source": to_dict(cfg.source), "resolution": enc.resolution})
    # batch_size=None: each call takes one block, i.e. one shard (or the part of one that fits a
    # block). A row count here would be counted in *shard* rows once Ray fuses this stage with
    # decode_items (on CPUs): batch_size=shard_size bundled up to shard_size shards into one task,
    # so one actor got the whole job and a second actor idled (benchmarks/bench_encode.py).
    return ds.map_batches(LatentWriter, batch_size=None, batch_format="numpy",
                          compute=ray.data.ActorPoolStrategy(size=enc.actors),
                          num_cpus=enc.actor_cpus, num_gpus=gpus,
                          fn_constructor_args=(to_dict(cfg), meta.to_json(), cfg.output))


def _cli(args) -> int:
    run_encode(load_encode_config(args.config, args.overrides))
    return 0


def register(subparsers) -> None:
    add_job_parser(
        subparsers, "encode", run=_cli, load=lambda a: load_encode_config(a.config, a.overrides),
        help="encode images through a VAE into a latent pyramid dataset (Parquet)",
        description="Encode an image source (class folders, Parquet/WebDataset shards, fashion-mnist) "
                    "through any diffusers VAE or the KL-16 checkpoint into Parquet latent moments, on "
                    "Ray Data. Re-running resumes: finished shards are kept.",
        epilog="example: flowar encode configs/encode-fashion-mnist.yaml source.limit=2000 "
               "output=./data/fm-latents",
        config_help="YAML config (see configs/encode-*.yaml)", overrides_example="encode.actors=2")
