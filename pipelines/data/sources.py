"""Image sources for `flowar encode` and `flowar vae train`, and the paper's preprocessing.

A source lists its images as items (key, label, ref) on the driver (cheap: names only), sorted by
key so that shard i always holds the same images (what makes resume exact). The bytes are read and
decoded later, in Ray CPU tasks (`decode_items`), a shard at a time:

- `folder`: class subfolders (ImageNet layout), label = index of the sorted folder name;
- `parquet`: Parquet files with an image column (bytes, or HF-datasets {bytes, path} structs),
  a label column and optionally a key column; listing reads the label/key columns, decoding a
  shard reads the image column of the row groups its rows fall in, no others;
- `webdataset`: .tar shards with `<key>.<jpg|png|webp|...>` plus `<key>.cls` (or .json "label");
  listing reads member headers and label members only, several tars at a time (`_list_webdataset`),
  and each ref keeps its member's offset and size, so decoding a shard reads its images in a few
  ranged reads (`tar_items`);
- `fashion-mnist`: the bundled data set's IDX files (pipelines.data.bundled: Debian's package,
  else torchvision's download), 28x28 grey padded to 32x32.

`flowar evaluate` reads a `fashion-mnist[:train|test]` reference here too (`parse_reference_source`,
`load_reference_images`), and a folder of reference images in pipelines/evaluate/reference.py,
both with `preprocess`, so reference and training images are prepared alike.

Paths may be local or any URI pyarrow's filesystems read (s3://, gs://, ...).
Preprocessing (ADM/MAR `center_crop_arr`): halve with a box filter while the short side is at least
twice the target, resize the short side to the target with bicubic, crop the center; grey, palette
and RGBA images become RGB. A file that fails any of this is a reject with its reason, and so is
an image without a label (NO_LABEL, BAD_LABEL); one bad item never rejects its neighbours.

`flowar --help` imports this module (encode and vae train configs hold a SourceConfig), so numpy,
PIL and pyarrow, which would double its start-up time, are imported where images are read.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from flowar.config import ConfigError
from pipelines.core import storage
from pipelines.core.config import path_field
from pipelines.data.bundled import MissingData, fashion_mnist_file
from pipelines.data.shards import (BAD_LABEL, IMAGE_EXTS, NO_LABEL, guarded, list_tar, parquet_items,
                                   tar_items)

if TYPE_CHECKING:
    import numpy as np

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]
PARQUET_SUFFIX = ".parquet"
# Labels that listing cannot give (pipelines.data.shards); decode_items rejects them, saying why.
LABEL_REJECTS = {NO_LABEL: "no label (no .cls/.json member for this key, or a null label column)",
                 BAD_LABEL: "unreadable label (a .cls that is not a non-negative integer, "
                            "or a .json without an integer \"label\")"}
LIST_THREADS = 16  # tars listed at a time (I/O-bound: object-store latency, not CPU)


def is_image_name(name: str) -> bool:
    """Whether a file name has one of IMAGE_EXTS (any case: .JPEG and .jpg alike)."""
    return name.rpartition(".")[2].lower() in IMAGE_EXTS and "." in name


@dataclass
class SourceConfig:
    kind: Literal["folder", "parquet", "webdataset", "fashion-mnist"] = "fashion-mnist"
    path: str = path_field("input")  # folder / shard directory / URI; fashion-mnist: the IDX folder
    split: Literal["train", "test"] = "train"  # fashion-mnist only
    limit: int = 0  # keep the first N images (by key); 0 keeps all
    image_column: str = "image"  # parquet only
    label_column: str = "label"  # parquet only
    key_column: str = "key"  # parquet only; when absent, keys are <file>/<row>

    def __post_init__(self):
        if self.kind != "fashion-mnist" and not self.path:
            raise ConfigError(f"source.path is empty: source.kind={self.kind} needs the folder, "
                              "shard directory or URI to read")
        if self.limit < 0:
            raise ConfigError(f"source.limit={self.limit} must not be negative (0 keeps all)")


# ------------------------------------------------------------------------------------------------
# Listing (driver)
# ------------------------------------------------------------------------------------------------

def list_items(cfg: SourceConfig) -> tuple[list[tuple[str, int, str]], list[str]]:
    """([(key, label, ref), ...] sorted by key, class names). Raises ConfigError on bad input."""
    lister = {"folder": _list_folder, "parquet": _list_parquet, "webdataset": _list_webdataset,
              "fashion-mnist": _list_fashion_mnist}[cfg.kind]
    items, classes = lister(cfg)
    items.sort(key=lambda it: it[0])
    for a, b in zip(items, items[1:]):
        if a[0] == b[0]:
            raise ConfigError(f"source {cfg.kind} {cfg.path!r}: key {a[0]!r} appears twice "
                              f"({a[2]} and {b[2]}); keys must be unique")
    if cfg.limit > 0:
        items = items[:cfg.limit]
    if not items:
        raise ConfigError(f"source {cfg.kind} {cfg.path!r} holds no images")
    return items, classes


def _files(path: str, what: str):
    """(filesystem, root, file infos sorted by path, prefix): `prefix + info.path` is a ref that
    `storage.resolve` opens again on any node (an object store's paths carry no scheme)."""
    import pyarrow.fs as pafs
    if not path:
        raise ConfigError(f"source.path is empty: give the {what} (local path or URI)")
    fs, root = storage.resolve(path)
    prefix = f"{urlsplit(path).scheme}://" if storage.is_uri(path) else ""
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ConfigError(f"source.path {path!r} does not exist")
    if info.type == pafs.FileType.File:
        return fs, root, [info], prefix
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return fs, root, sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path), prefix


def _class_names(labels) -> list[str]:
    """'0'..'max label' (the sources that number their classes); rejects' labels left out."""
    return [str(i) for i in range(max((y for y in labels if y >= 0), default=-1) + 1)]


def _list_folder(cfg):
    import pyarrow.fs as pafs
    fs, root, _, prefix = _files(cfg.path, "image folder (class subfolders)")
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=False))
    classes = sorted(e.base_name for e in entries
                     if e.type == pafs.FileType.Directory and not e.base_name.startswith("."))
    if not classes:
        raise ConfigError(f"source.path {cfg.path!r} has no class subfolders (expected <class>/<image>)")
    items = []
    for label, name in enumerate(classes):
        for info in fs.get_file_info(pafs.FileSelector(f"{root}/{name}", recursive=True)):
            if info.type == pafs.FileType.File and not info.base_name.startswith("."):
                key = info.path[len(root) + 1:]
                items.append((key, label, prefix + info.path))
    return items, classes


def _list_parquet(cfg):
    """Reads the label (and key) column of each file, never the images. A null label is
    NO_LABEL: that row becomes a reject when it is decoded."""
    import pyarrow.parquet as pq
    fs, _, files, prefix = _files(cfg.path, "Parquet shard directory")
    items = []
    for info in (f for f in files if f.base_name.endswith(PARQUET_SUFFIX)):
        pf = pq.ParquetFile(info.path, filesystem=fs)
        names = pf.schema_arrow.names
        for col in (cfg.image_column, cfg.label_column):
            if col not in names:
                raise ConfigError(f"Parquet source {info.path}: no column {col!r} (columns: {names}); "
                                  "set source.image_column / source.label_column")
        cols = [cfg.label_column] + ([cfg.key_column] if cfg.key_column in names else [])
        table = pf.read(columns=cols)
        labels = table[cfg.label_column].to_pylist()
        keys = (table[cfg.key_column].to_pylist() if cfg.key_column in names else
                [f"{info.base_name.removesuffix(PARQUET_SUFFIX)}/{i:07d}" for i in range(len(labels))])
        for i, (key, label) in enumerate(zip(keys, labels)):
            items.append((str(key), NO_LABEL if label is None else int(label), f"{prefix}{info.path}#{i}"))
    return items, _class_names(y for _, y, _ in items)


def _list_webdataset(cfg):
    """The driver reads each tar's member headers (512 bytes a member; the image data is skipped
    by a seek) and its label members (.cls/.json, a few bytes each), never an image, LIST_THREADS
    tars at a time so that an object store's per-request latency overlaps. Only `.tar` files are
    listed: WebDataset's shards are uncompressed, which is what lets a header scan seek.
    It holds one (key, label, ref) per image, as every source does: a few hundred bytes an image
    (`benchmarks/bench_encode.py --listing` measures it). An image without a readable label lists
    as NO_LABEL / BAD_LABEL and becomes a reject when decoded; a tar cut short lists the members
    whose headers it still has (reading the cut one is then a reject)."""
    from concurrent.futures import ThreadPoolExecutor
    fs, _, files, prefix = _files(cfg.path, "WebDataset .tar shard directory")
    tars = [f.path for f in files if f.base_name.endswith(".tar")]
    with ThreadPoolExecutor(max_workers=max(1, min(LIST_THREADS, len(tars)))) as pool:
        listed = list(pool.map(lambda path: list_tar(fs, path, prefix), tars))
    items = [item for tar_items in listed for item in tar_items]
    return items, _class_names(y for _, y, _ in items)


def _fashion_mnist_file(cfg, what: str) -> str:
    """The bundled data's one lookup (pipelines.data.bundled); `source.path` overrides it."""
    try:
        return str(fashion_mnist_file(cfg.split, what, cfg.path))
    except MissingData as e:
        raise ConfigError(f"source.path: {e}" if cfg.path else str(e)) from None


def _list_fashion_mnist(cfg):
    labels = read_idx(_fashion_mnist_file(cfg, "labels"))
    images = _fashion_mnist_file(cfg, "images")
    items = [(f"fashion-mnist/{cfg.split}/{i:05d}", int(y), f"{images}#{i}")
             for i, y in enumerate(labels)]
    return items, list(FASHION_MNIST_CLASSES)


# ------------------------------------------------------------------------------------------------
# IDX files (Fashion-MNIST's format: a magic number, the dimensions, then uint8 data)
# ------------------------------------------------------------------------------------------------

_IDX_CACHE: dict[str, np.ndarray] = {}


def _idx_dims(f, path) -> list[int]:
    """Read an IDX header: 0, 0, the type (0x08: uint8), the number of dimensions, then each
    dimension as a big-endian uint32. The uint8 data follows."""
    magic = f.read(4)
    if len(magic) != 4 or magic[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not a uint8 IDX file")
    return [int.from_bytes(f.read(4), "big") for _ in range(magic[3])]


def read_idx(path) -> np.ndarray:
    """A gzipped uint8 IDX file as an array of its own shape (labels (N,), images (N, 28, 28)).
    Cached per process: Ray tasks and actors reuse their worker, so a file is read once there."""
    import numpy as np
    path = str(path)
    if path not in _IDX_CACHE:
        with gzip.open(path, "rb") as f:
            dims = _idx_dims(f, path)
            _IDX_CACHE[path] = np.frombuffer(f.read(), np.uint8).reshape(dims)
    return _IDX_CACHE[path]


def idx_count(path) -> int:
    """The number of items of an IDX file, from its header alone."""
    with gzip.open(path, "rb") as f:
        return _idx_dims(f, path)[0]


# ------------------------------------------------------------------------------------------------
# Reading and preprocessing (Ray CPU tasks)
# ------------------------------------------------------------------------------------------------

def center_crop_arr(image, size: int):
    """ADM's center crop (guided-diffusion, used by MAR and FlowAR): box-halve, bicubic, crop."""
    import numpy as np
    from PIL import Image
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


def _read_raw(kind: str, refs: list[str], cfg: dict) -> list:
    """Raw bytes (or arrays) per ref, or the exception that reading that one item raised: a bad
    item never rejects the others of its file. Only a file that cannot be opened at all rejects
    every item of it."""
    out: list = [None] * len(refs)
    by_file: dict[str, list[tuple[int, str]]] = {}
    for i, ref in enumerate(refs):
        if kind == "folder":
            out[i] = guarded(_read_file, ref)
        else:
            file, _, part = ref.rpartition("#")
            by_file.setdefault(file, []).append((i, part))
    reader = {"fashion-mnist": _idx_items, "parquet": parquet_items, "webdataset": tar_items}.get(kind)
    for file, wanted in by_file.items():
        try:
            for i, value in reader(file, wanted, cfg):
                out[i] = value
        except Exception as e:  # the file itself is unreadable (missing, not a tar/Parquet, cut short)
            for i, _ in wanted:
                out[i] = out[i] if out[i] is not None else e
    return [FileNotFoundError("not found in its shard") if v is None else v for v in out]


def _read_file(ref: str) -> bytes:
    if not storage.is_uri(ref):
        with open(ref, "rb") as f:
            return f.read()
    fs, path = storage.resolve(ref)
    with fs.open_input_stream(path) as f:
        return f.read()


def _idx_items(file: str, wanted, cfg):
    import numpy as np
    images = read_idx(file)
    for i, part in wanted:
        yield i, guarded(lambda row: np.array(images[int(row)]), part)


def preprocess(raw, resolution: int):
    """Bytes (any PIL format) or a 28x28 grey array -> uint8 (resolution, resolution, 3)."""
    import numpy as np
    from PIL import Image
    if isinstance(raw, np.ndarray):  # Fashion-MNIST: pad 28 -> 32 with the black background
        image = Image.fromarray(np.pad(raw, 2)) if raw.shape == (28, 28) else Image.fromarray(raw)
    else:
        if not raw:
            raise ValueError("empty file")
        image = Image.open(io.BytesIO(raw))
        image.load()  # decode now: a truncated file fails here, not later
    image = image.convert("RGB")
    if image.size == (resolution, resolution):
        return np.asarray(image, dtype=np.uint8)
    return center_crop_arr(image, resolution)


def decode_items(batch: dict, source: dict, resolution: int) -> dict:
    """Ray map_batches function: one row per shard in, one row per image out.

    Input rows: shard, keys, labels, refs. Output: shard, index (position in the shard), key,
    label, ref, image (uint8 HxWx3; zeros for a reject) and reason ("" when the image is good)."""
    import numpy as np
    cols = {k: [] for k in ("shard", "index", "key", "label", "ref", "image", "reason")}
    blank = np.zeros((resolution, resolution, 3), np.uint8)
    for shard, keys, labels, refs in zip(batch["shard"], batch["keys"], batch["labels"], batch["refs"]):
        raws = _read_raw(source["kind"], list(refs), source)
        for index, (key, label, ref, raw) in enumerate(zip(keys, labels, refs, raws)):
            try:
                if isinstance(raw, Exception):
                    raise raw
                if label in LABEL_REJECTS:
                    raise LookupError(LABEL_REJECTS[label])
                image, reason = preprocess(raw, resolution), ""
            except Exception as e:
                image, reason = blank, f"{type(e).__name__}: {e}"[:300]
            for name, value in (("shard", shard), ("index", index), ("key", key), ("label", label),
                                ("ref", ref), ("image", image), ("reason", reason)):
                cols[name].append(value)
    return {"shard": np.asarray(cols["shard"], np.int64), "index": np.asarray(cols["index"], np.int64),
            "key": np.asarray(cols["key"], object), "label": np.asarray(cols["label"], np.int64),
            "ref": np.asarray(cols["ref"], object), "reason": np.asarray(cols["reason"], object),
            "image": np.stack(cols["image"]) if cols["image"] else blank[None][:0]}


# ------------------------------------------------------------------------------------------------
# Evaluation references (`flowar evaluate`'s reference.source)
# ------------------------------------------------------------------------------------------------

def parse_reference_source(source: str) -> dict:
    """'fashion-mnist[:train|test]' -> {kind, path, count} (a folder of reference images is
    pipelines.evaluate.reference's: listed directory by directory, never whole)."""
    if not source.startswith("fashion-mnist"):
        raise ValueError(f"reference source {source!r}: not a fashion-mnist split "
                         "(folders are read by pipelines.evaluate.reference)")
    split = source.split(":", 1)[1] if ":" in source else "test"
    if split not in ("train", "test"):
        raise ValueError(f"reference source {source!r}: split must be train or test")
    path = fashion_mnist_file(split, "images")
    return {"kind": "fashion-mnist", "path": str(path), "count": idx_count(path)}


def load_reference_images(spec: dict, start: int, end: int, resolution: int) -> np.ndarray:
    """uint8 (B, resolution, resolution, 3) images start..end of a fashion-mnist reference spec,
    prepared like the training images (`preprocess`: padded 28 -> 32, grey -> RGB)."""
    import numpy as np
    return np.stack([preprocess(r, resolution) for r in read_idx(spec["path"])[start:end]])
