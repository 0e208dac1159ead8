"""The evaluation's output folder (shards, settings, report, grid): a local path or a storage URI.

Files are written whole: locally through a temporary name and os.replace, in an object store by
one upload (an object appears complete or not at all), so a killed evaluation never leaves a half
shard that looks finished. Reading a shard opens its .npz lazily: folding a shard's statistics
never reads the images stored beside them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import numpy as np

from pipelines.core import storage


class Folder:
    """A folder at a local path or URI (pipelines.core.storage), created on first write."""

    def __init__(self, uri: str):
        import pyarrow.fs as pafs

        self.uri = os.fspath(uri)
        self.local = not storage.is_uri(self.uri)
        self.fs, self.root = storage.resolve(self.uri)
        self._types = pafs.FileType

    def __str__(self) -> str:
        return storage.display(self.uri)

    def child(self, name: str) -> "Folder":
        return Folder(storage.join(self.uri, name))

    def path(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str = "") -> bool:
        return self.fs.get_file_info(self.path(name) if name else self.root).type != self._types.NotFound

    def names(self) -> set[str]:
        """Names of the files directly in the folder (empty when it does not exist)."""
        import pyarrow.fs as pafs

        if not self.exists():
            return set()
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=False))
        return {i.base_name for i in infos if i.type == self._types.File}

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read().decode()

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode())

    def write_bytes(self, name: str, data: bytes) -> None:
        with tempfile.NamedTemporaryFile(suffix="-" + name) as tmp:
            tmp.write(data)
            tmp.flush()
            self.put_file(tmp.name, name)

    def put_file(self, local: str | os.PathLike, name: str) -> None:
        """Copy the local file `local` in as `name`, whole."""
        self.fs.create_dir(self.root, recursive=True)
        dst = self.path(name)
        if self.local:
            tmp = f"{dst}.tmp{os.getpid()}"
            shutil.copyfile(local, tmp)
            os.replace(tmp, dst)
            return
        with open(local, "rb") as src, self.fs.open_output_stream(dst) as out:
            shutil.copyfileobj(src, out, 1 << 22)

    def save_npz(self, name: str, arrays: dict) -> None:
        if self.local:  # straight into the folder, then renamed: no second copy
            self.fs.create_dir(self.root, recursive=True)
            tmp = self.path(f"{name}.tmp{os.getpid()}.npz")
            np.savez(tmp, **arrays)
            os.replace(tmp, self.path(name))
            return
        with tempfile.TemporaryDirectory(prefix="flowar-eval-") as d:
            np.savez(os.path.join(d, name), **arrays)
            self.put_file(os.path.join(d, name), name)

    @contextlib.contextmanager
    def open_npz(self, name: str):
        """np.load of the file `name`, lazily (only the arrays asked for are read)."""
        if self.local:
            with np.load(self.path(name)) as z:
                yield z
            return
        with self.fs.open_input_file(self.path(name)) as f, np.load(f) as z:
            yield z

    def remove(self) -> None:
        """Delete the folder and everything in it (a no-op when it does not exist)."""
        if self.exists():
            self.fs.delete_dir(self.root)
