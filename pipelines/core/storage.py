"""Local paths and object-store URIs behind one small API, so every stage takes either.

Datasets, checkpoints and artefacts can live on the laptop (`./data/latents`), on a cluster's
shared volume (`/mnt/cluster_storage/...`) or in an object store (`s3://bucket/x`, `gs://bucket/x`).
Stages call `resolve(uri)` to get a `pyarrow.fs.FileSystem` and a path on it, and use `join`,
`exists`, `upload_dir`, `download_dir` instead of `os.path`/`shutil`. Ray Data and Ray Train accept
the same URIs directly (`read_parquet("s3://...")`, `RunConfig(storage_path="s3://...")`).

Schemes pyarrow does not know natively (e.g. `memory://`, `abfs://` with adlfs installed) go
through fsspec, wrapped as a pyarrow filesystem.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["is_uri", "resolve", "join", "exists", "makedirs", "upload_dir", "download_dir",
           "local_dir", "local_file", "read_bytes", "write_bytes", "display"]

# Schemes pyarrow.fs resolves itself; anything else is tried through fsspec.
_PYARROW_SCHEMES = {"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"}


def is_uri(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (any scheme but file://), False for local paths."""
    text = os.fspath(path)
    if "://" not in text:
        return False
    return urlsplit(text).scheme not in ("", "file")


def _local_path(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    if text.startswith("file://"):
        text = urlsplit(text).path
    return str(Path(text).expanduser().resolve())


def _s3(uri: str):
    """S3 without pyarrow's region lookup (a network call) when the region is known.

    Region: `?region=` in the URI, else AWS_REGION / AWS_DEFAULT_REGION. Endpoint (MinIO, R2, ...):
    AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL."""
    import pyarrow.fs as pafs

    parts = urlsplit(uri)
    if parts.query:  # explicit options in the URI: let pyarrow parse all of them
        return pafs.FileSystem.from_uri(uri)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not region and not endpoint:
        return pafs.FileSystem.from_uri(uri)
    kwargs = {"region": region or "us-east-1"}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = urlsplit(endpoint).scheme or "https"
    path = (parts.netloc + parts.path).rstrip("/")
    return pafs.S3FileSystem(**kwargs), path


def resolve(uri: str | os.PathLike):
    """`uri` -> (pyarrow FileSystem, path on it). Local paths come back absolute."""
    import pyarrow.fs as pafs

    text = os.fspath(uri)
    if not text:
        raise ValueError("storage path is empty: give a local path or a URI such as s3://bucket/dir")
    if not is_uri(text):
        return pafs.LocalFileSystem(), _local_path(text)
    scheme = urlsplit(text).scheme
    try:
        if scheme == "s3":
            return _s3(text)
        if scheme in _PYARROW_SCHEMES:
            return pafs.FileSystem.from_uri(text)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot open storage {text!r}: {e}") from None
    return _fsspec(text, scheme)


def _fsspec(uri: str, scheme: str):
    import pyarrow.fs as pafs

    try:
        import fsspec
        fs = fsspec.filesystem(scheme)
    except (ImportError, ValueError) as e:
        raise ValueError(f"storage {uri!r}: scheme {scheme!r} is not supported "
                         f"(use a local path, s3://, gs:// or an installed fsspec backend): {e}") from None
    path = fs._strip_protocol(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path parts onto a local path or a URI, keeping the URI's scheme."""
    text = os.fspath(base)
    if is_uri(text):
        return posixpath.join(text.rstrip("/"), *[p.strip("/") for p in parts])
    return os.path.join(text, *parts)


def exists(uri: str | os.PathLike) -> bool:
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str | os.PathLike) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)


def upload_dir(local: str | os.PathLike, uri: str | os.PathLike) -> str:
    """Copy a local directory tree to `uri` (local or remote); returns `uri` as a string."""
    import pyarrow.fs as pafs

    src = Path(local)
    if not src.is_dir():
        raise FileNotFoundError(f"upload_dir: {str(src)!r} is not a directory")
    dst_fs, dst_path = resolve(uri)
    dst_fs.create_dir(dst_path, recursive=True)
    pafs.copy_files(str(src.resolve()), dst_path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=dst_fs)
    return os.fspath(uri)


def download_dir(uri: str | os.PathLike, local: str | os.PathLike) -> Path:
    """Copy the directory tree at `uri` into the local directory `local`; returns it."""
    import pyarrow.fs as pafs

    src_fs, src_path = resolve(uri)
    if src_fs.get_file_info(src_path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"download_dir: {os.fspath(uri)!r} is not a directory")
    dst = Path(local)
    dst.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src_path, str(dst.resolve()), source_filesystem=src_fs,
                    destination_filesystem=pafs.LocalFileSystem())
    return dst


@contextlib.contextmanager
def local_dir(uri: str | os.PathLike):
    """A local directory with the contents of `uri`, for libraries that only read local files
    (e.g. `from_pretrained`). Local paths are yielded as they are; remote trees are downloaded
    into a temporary directory that is removed afterwards."""
    if not is_uri(uri):
        yield Path(_local_path(uri))
        return
    tmp = tempfile.mkdtemp(prefix="flowar-dl-")
    try:
        yield download_dir(uri, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def local_file(uri: str | os.PathLike):
    """A local copy of the file at `uri`, for readers that only open local files (torch.load).
    Local paths are yielded as they are (missing ones too: the reader says what is wrong);
    a remote file is downloaded into a temporary directory removed afterwards."""
    import pyarrow.fs as pafs

    if not is_uri(uri):
        yield Path(_local_path(uri))
        return
    src_fs, src_path = resolve(uri)
    if src_fs.get_file_info(src_path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{os.fspath(uri)!r} is not a file")
    tmp = tempfile.mkdtemp(prefix="flowar-dl-")
    try:
        dst = Path(tmp) / posixpath.basename(src_path)  # keeps the suffix readers go by
        pafs.copy_files(src_path, str(dst), source_filesystem=src_fs,
                        destination_filesystem=pafs.LocalFileSystem())
        yield dst
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The whole file at `uri` (small files: configs, JSON)."""
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str | os.PathLike, data: bytes) -> str:
    """Write `data` as the file `uri`, creating a local file's folder (object stores have no
    folders to create); returns `uri` as a string."""
    import pyarrow.fs as pafs

    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(data)
    return os.fspath(uri)


def display(uri: str | os.PathLike) -> str:
    """How to print a storage location: URIs as given, local paths absolute."""
    return os.fspath(uri) if is_uri(uri) else _local_path(uri)
