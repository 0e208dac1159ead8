"""`flowar evaluate`'s reference images: what they are (on the driver) and a range of them (in a worker).

The driver never holds a folder's file list. A folder (a local path or any storage URI,
pipelines/core/storage.py) is walked one directory at a time in a fixed order: in each directory
its images sorted by name, then its subdirectories sorted by name (names starting with '.' are
skipped). The driver keeps the number of images of each directory and a digest of every image's
(path, size), which is the folder's identity in the reference cache. A shard call carries its own
range as segments (directory, offset, count); the worker lists those directories itself and keeps
the last one listed, so a flat folder is listed once per worker and an ImageNet-style folder one or
two class directories per shard. The driver holds O(directories), a call O(directories it touches).

`fashion-mnist[:train|test]` names the bundled IDX files, which each worker finds for itself
(pipelines.data.bundled), as it finds its own Inception weights.
"""

from __future__ import annotations

import hashlib
import json

from pipelines.core import storage
from pipelines.data.sources import (is_image_name, load_reference_images, parse_reference_source,
                                    preprocess)


def reference_spec(source: str, max_images: int = 0) -> dict:
    """The reference `source` as the driver knows it: {kind, count, ...}; a .npz is {kind: npz}.
    Raises FileNotFoundError / ValueError naming the source when it cannot be read."""
    if source.endswith(".npz"):
        return {"kind": "npz", "path": source}
    if source.startswith("fashion-mnist"):
        spec = {"kind": "fashion-mnist", "source": source, "count": parse_reference_source(source)["count"]}
    else:
        spec = folder_spec(source.split(":", 1)[1] if source.startswith("folder:") else source)
    if max_images:
        spec["count"] = min(spec["count"], max_images)
    return spec


def checked_reference_spec(source: str, max_images: int = 0) -> dict:
    """reference_spec, with a statistics .npz also opened and checked; ValueError or OSError
    naming the source when it cannot be read (flowar evaluate and the in-training evaluation
    refuse a bad reference before any work)."""
    spec = reference_spec(source, max_images)
    if spec["kind"] == "npz":
        from pipelines.evaluate.metrics import load_reference_npz  # numpy and torch-fidelity

        load_reference_npz(source)
    return spec


def folder_spec(path: str) -> dict:
    """{kind: folder, path, count, dirs: [[relative dir, images in it], ...], digest}."""
    import pyarrow.fs as pafs

    fs, root = storage.resolve(path)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"reference source {path!r} is not a folder of images")
    digest, dirs, count = hashlib.sha256(), [], 0
    for rel, files in _walk(fs, root, ""):
        if files:
            dirs.append([rel, len(files)])
            count += len(files)
        for info in files:
            digest.update(f"{rel}/{info.base_name}:{info.size}\n".encode())
    if not count:
        raise ValueError(f"reference source {path!r}: no images (.jpg, .png, .webp, ...) in it")
    return {"kind": "folder", "path": storage.display(path), "count": count, "dirs": dirs,
            "digest": digest.hexdigest()}


def _listing(fs, root: str, rel: str):
    """(image FileInfos sorted by name, subdirectory names sorted) of one directory."""
    import pyarrow.fs as pafs

    infos = fs.get_file_info(pafs.FileSelector(f"{root}/{rel}" if rel else root, recursive=False))
    infos = [i for i in infos if not i.base_name.startswith(".")]
    files = sorted((i for i in infos if i.type == pafs.FileType.File and is_image_name(i.base_name)),
                   key=lambda i: i.base_name)
    subdirs = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
    return files, subdirs


def _walk(fs, root: str, rel: str):
    """(relative dir, its image FileInfos) for every directory, in the reference order."""
    files, subdirs = _listing(fs, root, rel)
    yield rel, files
    for name in subdirs:
        yield from _walk(fs, root, f"{rel}/{name}" if rel else name)


def identity(spec: dict) -> dict:
    """What names the reference in the statistics cache (the digest stands for the listing)."""
    return {k: v for k, v in spec.items() if k != "dirs"}


def reference_digest(spec: dict) -> str:
    """The reference's identity as a short hash (its MLflow dataset digest)."""
    return hashlib.sha256(json.dumps(identity(spec), sort_keys=True).encode()).hexdigest()[:32]


def log_reference(c, run_id: str, spec: dict, source: str) -> None:
    """The reference `spec` (read from `source`) as the MLflow run's evaluation input."""
    from pipelines.core.lineage import EVALUATION, log_dataset

    where = str(spec.get("path") or spec.get("source") or source)
    log_dataset(c, run_id, prefix="reference:", digest=reference_digest(spec), where=where,
                context=EVALUATION,
                profile={"images": spec.get("count"), "kind": spec.get("kind")})


def range_call(spec: dict, start: int, end: int) -> dict:
    """What one shard call carries to read images [start, end): the source, and for a folder the
    segments [relative dir, offset in it, count, images in the dir] the range covers."""
    if spec["kind"] == "fashion-mnist":
        return {"kind": "fashion-mnist", "source": spec["source"]}
    segments, first = [], 0
    for rel, n in spec["dirs"]:
        lo, hi = max(start, first), min(end, first + n)
        if lo < hi:
            segments.append([rel, lo - first, hi - lo, n])
        first += n
        if first >= end:
            break
    return {"kind": "folder", "path": spec["path"], "start": start, "segments": segments}


_LISTED: dict = {}  # the last directory a worker listed: {(folder, rel): names}


def read_range(call: dict, start: int, end: int, resolution: int):
    """uint8 (B, resolution, resolution, 3) reference images [start, end), inside the range of
    `call` (range_call's), prepared like training images (pipelines.data.sources.preprocess)."""
    import numpy as np

    if call["kind"] == "fashion-mnist":
        spec = parse_reference_source(call["source"])  # this node's own copy of the files
        return load_reference_images(spec, start, end, resolution)
    fs, root = storage.resolve(call["path"])
    out, first = [], call["start"]
    for rel, offset, n, total in call["segments"]:
        lo, hi = max(start, first), min(end, first + n)
        first += n
        if lo >= hi:
            continue
        names = _dir_names(fs, root, call["path"], rel)
        if len(names) != total:
            raise RuntimeError(f"reference folder {call['path']!r} changed during the evaluation: "
                               f"{rel or '.'} has {len(names)} images, the listing had {total}")
        skip = offset + lo - (first - n)
        for name in names[skip:skip + hi - lo]:
            path = f"{root}/{rel}/{name}" if rel else f"{root}/{name}"
            with fs.open_input_stream(path) as f:
                raw = f.read()
            try:
                out.append(preprocess(raw, resolution))
            except Exception as e:  # noqa: BLE001 (PIL raises many kinds)
                raise ValueError(f"reference image {path}: {type(e).__name__}: {e}") from None
    if len(out) != end - start:
        raise RuntimeError(f"reference range [{start}, {end}) gave {len(out)} images")
    return np.stack(out)


def _dir_names(fs, root: str, folder: str, rel: str) -> list[str]:
    key = (folder, rel)
    if key not in _LISTED:
        _LISTED.clear()
        _LISTED[key] = [i.base_name for i in _listing(fs, root, rel)[0]]
    return _LISTED[key]
