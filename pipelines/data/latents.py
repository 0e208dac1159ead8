"""The latent pyramid dataset: what `flowar encode` writes and training/evaluation read.

A dataset is a directory (local or any pyarrow-filesystem URI) holding

    metadata.json                      LatentDatasetMeta, the authoritative record
    _common_metadata                   the same record in a schema-only Parquet file
    part-SSSSS-AAAAAAA-BBBBBBB.parquet rows A..B-1 of source shard S (rejected images left out)
    rejects.jsonl                      one {"key", "source", "reason"} per image that was skipped
    rejects/part-...jsonl              the rejects of each part, merged into rejects.jsonl

Columns: `key` (string, unique), `label` (int64), `mean`, `std` (the VAE posterior's raw moments,
fixed-shape tensors (C, h, w)), `mean_flip`/`std_flip` when the horizontal flip was encoded too,
and `mean_s{k}` (area-downsampled means, (C, k, k)) for coarser scales when asked. For Table 3's
"image" scale construction, `mean_img{k}`/`std_img{k}` (and `mean_flip_img{k}`/`std_flip_img{k}`)
hold the moments of the image area-downsampled to k * (resolution // latent_size) pixels and
encoded by the same VAE; `image_scales` in the metadata lists those k. Storing the
moments rather than a sample lets training draw a fresh posterior sample each epoch (MAR's cache,
kohya-ss/sd-scripts#1709), and `sample_latents` applies the VAE's normalisation.

A part file appears by an atomic rename once complete, so its presence means "done": that is what
makes a killed `flowar encode` resumable without duplicates or gaps.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import PurePosixPath
from types import SimpleNamespace

from flowar.config import ConfigError
from pipelines.core import storage
from pipelines.core.source import source_info

FORMAT_VERSION = 1
META_KEY = b"flowar.latents"  # key of the JSON record in each Parquet file's schema metadata
# Rows per Parquet row group: the unit training streams and shuffles (pipelines/data/stream.py).
# Smaller units mix better across the dataset; 512 rows of 16x16x16 float32 moments with flips
# are 32 MiB, large enough that reads stay sequential.
ROW_GROUP_ROWS = 512
PART_RE = re.compile(r"part-(\d{5})-(\d{7})-(\d{7})\.parquet$")


@dataclass
class LatentDatasetMeta:
    format_version: int = FORMAT_VERSION
    vae: dict = field(default_factory=dict)  # VAEInfo.to_dict(): id, sha256, kind, latent_channels, ...
    resolution: int = 0  # image side after the center crop
    latent_size: int = 0  # latent side = resolution // vae downsample
    latent_channels: int = 0
    scales: list[int] = field(default_factory=list)  # sides stored: coarser `mean_s{k}` + latent_size
    image_scales: list[int] = field(default_factory=list)  # sides encoded from downsampled images
    dtype: str = "float32"
    count: int = 0  # images stored (rejects excluded)
    rejects: int = 0
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)
    flip: bool = False  # mean_flip/std_flip present
    crop: str = "adm_center"
    source: dict = field(default_factory=dict)
    code_version: str = ""
    created: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "metadata") -> "LatentDatasetMeta":
        data = json.loads(text)
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown} (written by a newer flowar?)")
        meta = cls(**data)
        if meta.format_version != FORMAT_VERSION:
            raise ConfigError(f"{where}: latent format version {meta.format_version}, this flowar "
                              f"reads version {FORMAT_VERSION}; re-encode the dataset")
        return meta


def moment_column(moment: str, flip: bool = False, image_side: int | None = None) -> str:
    """The one spelling of a moment column: mean, std_flip, mean_img4, std_flip_img2, ..."""
    return f"{moment}{'_flip' if flip else ''}{'' if image_side is None else f'_img{image_side}'}"


def image_columns(image_sides, flip: bool) -> list[str]:
    """Columns of the image-derived moments of the given sides (and their flips)."""
    return [moment_column(m, f, k) for k in image_sides for m in ("mean", "std")
            for f in ((False, True) if flip else (False,))]


def code_version() -> str:
    """`flowar <version>+g<commit>` (`-dirty` after it when tracked files had uncommitted
    changes), so a dataset names its maker: the commit of this checkout, or for a job sent with
    `flowar submit` the laptop's (pipelines/core/source.py); no `+g...` when neither is known."""
    # here, not at the top: 0.03 s that `flowar --help` (which imports this module) need not pay
    from importlib.metadata import PackageNotFoundError, version

    try:
        text = f"flowar {version('flowar')}"
    except PackageNotFoundError:
        text = "flowar (not installed)"
    source = source_info()
    if source.commit:
        text += f"+g{source.commit[:7]}" + ("-dirty" if source.dirty else "")
    return text


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# Writing helpers (every part is complete or absent)
# ------------------------------------------------------------------------------------------------

def part_name(shard: int, start: int, end: int) -> str:
    return f"part-{shard:05d}-{start:07d}-{end:07d}.parquet"


def tensor_array(array):
    """(N, *shape) numpy -> a canonical arrow.fixed_shape_tensor column (Ray and pyarrow read it)."""
    import numpy as np
    import pyarrow as pa
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))


def parquet_options(table) -> dict:
    """How a part is encoded, chosen for read speed: training decodes every row group each epoch.

    Moment columns: no dictionary (random floats overflow it, and decoding a float16 dictionary
    page is value by value: 4.7x slower to read), byte-stream-split (each byte plane of the floats
    compresses apart, which wins back what the dictionary saved on real latents) and zstd. One
    512-row group of 16x16x16 moments with flips, one core: float16 191 -> 54 us per row, 13.4 ->
    12.3 MB; float32 73 -> 68 us, 35.2 -> 25.6 MB (benchmarks/RESULTS.md, "Training input").
    Plain Parquet all the same: pyarrow and Ray Data read it as before."""
    import pyarrow as pa

    moments = [f.name for f in table.schema if isinstance(f.type, pa.FixedShapeTensorType)]
    return dict(row_group_size=ROW_GROUP_ROWS, compression="zstd",
                use_dictionary=[c for c in ("label",) if c in table.column_names],
                use_byte_stream_split=[f"{name}.list.element" for name in moments])


def _write_atomic(fs, path: str, write) -> int:
    """write(tmp_path) then rename, so readers and resumes never see half a file; returns bytes."""
    parent, name = path.rsplit("/", 1)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex[:8]}-{name}"
    write(tmp)
    fs.move(tmp, path)
    return fs.get_file_info(path).size


def covers(ranges: list[tuple[int, int, str]], length: int) -> bool:
    """True when the ranges tile [0, length) exactly, with no overlap and no gap."""
    pos = 0
    for start, end, _ in sorted(ranges):
        if start != pos:
            return False
        pos = end
    return pos == length


class LatentDataset:
    """One latent pyramid dataset: its path (local or URI), resolved once to (filesystem, root).

    The writer (`flowar encode`) adds parts and finalises; readers (training, evaluation, sweeps)
    take `meta` (read once, then kept) and `part_files()`."""

    def __init__(self, path: str):
        self.path = str(path)
        self.fs, self.root = storage.resolve(self.path)
        self._meta: LatentDatasetMeta | None = None

    def __str__(self) -> str:
        return storage.display(self.path)

    def __reduce__(self):  # crosses process boundaries (Ray actors) as its path
        return (LatentDataset, (self.path,))

    def _rejects_of(self, part_path: str) -> str:
        """rejects/<part name without .parquet>.jsonl: where one part's skipped images are listed."""
        return f"{self.root}/rejects/{PurePosixPath(part_path).stem}.jsonl"

    # -------------------------------------------------------------------- writing (flowar encode)
    def write_part(self, shard: int, start: int, end: int, columns: dict, rejects: list[dict],
                   meta: LatentDatasetMeta) -> int:
        """Write one part (and its rejects, first) atomically; returns bytes written."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        fs, name = self.fs, part_name(shard, start, end)
        payload = "".join(json.dumps(r) + "\n" for r in rejects).encode()

        def write_rejects(tmp):
            with fs.open_output_stream(tmp) as f:
                f.write(payload)
        nbytes = _write_atomic(fs, self._rejects_of(name), write_rejects)
        arrays = {k: (tensor_array(v) if getattr(v, "ndim", 1) > 1 else pa.array(v))
                  for k, v in columns.items()}
        if not len(columns.get("key", [])):  # every row rejected: an empty part still marks the range done
            arrays = {"key": pa.array([], pa.string()), "label": pa.array([], pa.int64())}
        table = pa.table(arrays).replace_schema_metadata({META_KEY: meta.to_json().encode()})
        return nbytes + _write_atomic(fs, f"{self.root}/{name}",
                                      lambda tmp: pq.write_table(table, tmp, filesystem=fs,
                                                                 **parquet_options(table)))

    def parts(self) -> dict[int, list[tuple[int, int, str]]]:
        """{shard: [(start, end, full path), ...]} of the complete parts."""
        import pyarrow.fs as pafs
        if self.fs.get_file_info(self.root).type == pafs.FileType.NotFound:
            return {}
        found: dict[int, list] = {}
        for info in self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False)):
            m = PART_RE.fullmatch(info.base_name)
            if m:
                found.setdefault(int(m[1]), []).append((int(m[2]), int(m[3]), info.path))
        return {s: sorted(v) for s, v in found.items()}

    def remove(self, paths: list[str]) -> None:
        """Delete parts (and their rejects): a killed run's partial shards are redone whole."""
        for p in paths:
            self.fs.delete_file(p)
            if self.fs.get_file_info(self._rejects_of(p)).is_file:
                self.fs.delete_file(self._rejects_of(p))

    def finalise(self, meta: LatentDatasetMeta) -> LatentDatasetMeta:
        """Count rows and rejects over all parts, merge rejects.jsonl, write metadata.json and
        _common_metadata. Returns the completed metadata."""
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq

        fs, root = self.fs, self.root
        parts = sorted(p for ranges in self.parts().values() for _, _, p in ranges)
        meta.count = sum(pq.ParquetFile(p, filesystem=fs).metadata.num_rows for p in parts)
        rejects = b""
        for p in parts:
            if fs.get_file_info(self._rejects_of(p)).is_file:
                with fs.open_input_stream(self._rejects_of(p)) as f:
                    rejects += f.read()
        meta.rejects = rejects.count(b"\n")
        with fs.open_output_stream(f"{root}/rejects.jsonl") as f:
            f.write(rejects)
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
            if info.base_name.startswith(".tmp-"):  # left by a killed run
                fs.delete_file(info.path)
        meta.created = meta.created or now()
        with fs.open_output_stream(f"{root}/metadata.json") as f:
            f.write(meta.to_json().encode())
        if parts:
            schema = pq.ParquetFile(parts[0], filesystem=fs).schema_arrow
            pq.write_metadata(schema.with_metadata({META_KEY: meta.to_json().encode()}),
                              f"{root}/_common_metadata", filesystem=fs)
        self._meta = meta
        return meta

    # -------------------------------------------------------------------- reading
    @property
    def meta(self) -> LatentDatasetMeta:
        """metadata.json, read on first use and kept (a finished dataset does not change)."""
        if self._meta is None:
            path = f"{self.root}/metadata.json"
            if not self.fs.get_file_info(path).is_file:
                raise ConfigError(f"latent dataset {self}: no metadata.json (not a finished "
                                  "`flowar encode` output; re-run the encode to complete it)")
            with self.fs.open_input_stream(path) as f:
                self._meta = LatentDatasetMeta.from_json(f.read(), f"latent dataset {self}")
        return self._meta

    def digest(self) -> str:
        """What identifies this dataset's content, without reading it: the hash of encode's job
        record (_job.json: the hash of the source's item keys, the VAE's weights hash and every
        setting that shaped the latents), or of metadata.json for a dataset made otherwise."""
        for name in ("_job.json", "metadata.json"):
            path = f"{self.root}/{name}"
            if self.fs.get_file_info(path).is_file:
                with self.fs.open_input_stream(path) as f:
                    record = json.loads(f.read())
                text = json.dumps(record, sort_keys=True)
                return hashlib.sha256(text.encode()).hexdigest()[:32]
        raise ConfigError(f"latent dataset {self}: no metadata.json (not a finished dataset)")

    def part_files(self) -> list[str]:
        files = sorted(p for ranges in self.parts().values() for _, _, p in ranges)
        if not files:
            raise ConfigError(f"latent dataset {self} has no part files")
        return files

    def units(self) -> list:
        """Every non-empty Parquet row group as a stream Unit(ref=(file, row group), rows), in
        file order: what training streams (pipelines/data/stream.py). Reads the files' footers."""
        import pyarrow.parquet as pq

        from pipelines.data.stream import Unit

        units = []
        for path in self.part_files():
            md = pq.ParquetFile(path, filesystem=self.fs).metadata
            units += [Unit((path, i), md.row_group(i).num_rows) for i in range(md.num_row_groups)
                      if md.row_group(i).num_rows]
        if not units:
            raise ConfigError(f"latent dataset {self} has no rows")
        return units

    def read_rows(self, unit, columns: list[str]) -> dict:
        """One unit's `columns` as numpy arrays (tensor columns as (rows, C, h, w), in the dtype
        the dataset stores: float16 stays float16 until a batch is sampled)."""
        import pyarrow.parquet as pq

        path, group = unit.ref
        table = pq.ParquetFile(path, filesystem=self.fs).read_row_group(group, columns=columns)
        out = {}
        for name in columns:
            column = table[name].combine_chunks()
            out[name] = (column.to_numpy_ndarray() if hasattr(column, "to_numpy_ndarray")
                         else column.to_numpy(zero_copy_only=False))
        return out

    def ray_dataset(self, columns: list[str] | None = None):
        """The dataset as a ray.data.Dataset (tensor columns come back as (C, h, w) arrays)."""
        import ray

        ds = ray.data.read_parquet(self.part_files(), filesystem=self.fs)
        return ds.select_columns(columns) if columns else ds


# ------------------------------------------------------------------------------------------------
# Checks and sampling
# ------------------------------------------------------------------------------------------------

def check_compatible(meta: LatentDatasetMeta, model_config, vae: dict | None = None) -> None:
    """Refuse a dataset that does not fit a model config (FlowARConfig), naming the field."""
    if meta.latent_channels != model_config.latent_channels:
        raise ConfigError(f"latent_channels: the dataset has {meta.latent_channels}-channel latents "
                          f"(VAE {meta.vae.get('id')}), model.latent_channels={model_config.latent_channels}")
    if meta.latent_size != model_config.scales[-1]:
        raise ConfigError(f"latent_size: the dataset's latents are {meta.latent_size}x{meta.latent_size}, "
                          f"but model.scales={list(model_config.scales)} ends at {model_config.scales[-1]}")
    if meta.num_classes > model_config.num_classes:
        raise ConfigError(f"num_classes: the dataset has {meta.num_classes} classes, more than "
                          f"model.num_classes={model_config.num_classes}")
    if getattr(model_config, "scale_construction", "latent") == "image":
        missing = [s for s in model_config.scales[:-1] if s not in meta.image_scales]
        if missing:
            raise ConfigError(
                f"scale_construction: model.scale_construction='image' needs latents encoded from "
                f"downsampled images for scales {missing}; the dataset holds them for "
                f"{meta.image_scales or 'none'}. Re-encode with "
                f"encode.image_pyramid={list(model_config.scales[:-1])}")
    if vae is not None:
        for key in ("sha256", "scaling_factor", "shift_factor"):
            if key in vae and vae[key] != meta.vae.get(key):
                raise ConfigError(f"vae.{key}: the dataset was encoded with {meta.vae.get(key)!r} "
                                  f"(VAE {meta.vae.get('id')}), the given VAE has {vae[key]!r}")


def sample_latents(mean, std, meta: LatentDatasetMeta, generator=None, eps=None):
    """A fresh posterior sample, normalised as the model sees it: (mean + std*eps - shift) * scale
    (flowar.vae.normalise, with the factors the dataset records; absent ones change nothing).
    `eps`: the standard normal draw to use, else one is drawn from `generator`."""
    import torch

    from flowar.vae import normalise  # torch: not at the top, `flowar --help` imports this module

    mean, std = torch.as_tensor(mean).float(), torch.as_tensor(std).float()
    if eps is None:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device)
    factors = SimpleNamespace(shift_factor=float(meta.vae.get("shift_factor", 0.0)),
                              scaling_factor=float(meta.vae.get("scaling_factor", 1.0)))
    return normalise(mean + std * eps, factors)


class TorchLatentDataset:
    """A plain torch Dataset over a latent dataset, for one machine (holds it in memory).

    Items: {"key", "label", "mean", "std"} plus `mean_img{k}`/`std_img{k}` for the dataset's
    image_scales; with `random_flip` and flipped moments stored, each access returns the flipped
    moments (of every scale) half of the time (MAR's augmentation)."""

    def __init__(self, path: str, random_flip: bool = True):
        import numpy as np
        import pyarrow.parquet as pq
        import torch

        dataset = LatentDataset(path)
        self.meta = dataset.meta
        tables = [pq.read_table(p, filesystem=dataset.fs) for p in dataset.part_files()]
        tables = [t for t in tables if t.num_rows]
        self.random_flip = random_flip and self.meta.flip

        def col(name):
            arrays = [t[name].combine_chunks().to_numpy_ndarray() for t in tables]
            return torch.from_numpy(np.concatenate(arrays)) if arrays else torch.empty(0)
        self.keys = [k for t in tables for k in t["key"].to_pylist()]
        self.labels = torch.tensor([x for t in tables for x in t["label"].to_pylist()], dtype=torch.long)
        flips = (False, True) if self.meta.flip else (False,)
        self._sides = [None, *self.meta.image_scales]  # None: the latent itself
        names = [moment_column(m, f, k) for m in ("mean", "std") for f in flips for k in self._sides]
        self.columns = {n: col(n) for n in names}

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int) -> dict:
        import torch
        flip = self.random_flip and bool(torch.randint(2, ()).item())
        item = {"key": self.keys[i], "label": self.labels[i]}
        for m in ("mean", "std"):
            for k in self._sides:
                item[moment_column(m, False, k)] = self.columns[moment_column(m, flip, k)][i].float()
        return item
