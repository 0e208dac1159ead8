"""The bundled data's one lookup (pipelines/data/bundled.py) and `make`'s first step.

Every stage finds Fashion-MNIST the same way; `python -m pipelines.data.bundled ensure` (run by
`make quickstart` and `make test` before installing anything) says where the data is or fails with
one line that says what to run, without installing or downloading anything when it cannot.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_idx_folder(folder: Path, count: int = 3) -> Path:
    """The four IDX files with `count` distinct 28x28 images (pixel value = index)."""
    import numpy as np

    from pipelines.data.bundled import FILES

    folder.mkdir(parents=True, exist_ok=True)
    for images, labels in FILES.values():
        header = (2051).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (count, 28, 28))
        pixels = np.repeat(np.arange(count, dtype=np.uint8), 28 * 28).tobytes()
        (folder / images).write_bytes(gzip.compress(header + pixels))
        head = (2049).to_bytes(4, "big") + count.to_bytes(4, "big")
        (folder / labels).write_bytes(gzip.compress(head + bytes(range(count))))
    return folder


@pytest.fixture
def nowhere(monkeypatch, tmp_path):
    """A machine without the data: no Debian folder, an empty cache, no apt, no download host."""
    from pipelines.data import bundled

    monkeypatch.setattr(bundled, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setenv("FLOWAR_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FLOWAR_FASHION_MNIST", raising=False)
    monkeypatch.setenv("FLOWAR_FASHION_MNIST_URL", "http://127.0.0.1:9/")  # discard port: refused
    monkeypatch.setattr(bundled.shutil, "which", lambda name: None)
    return tmp_path


def test_every_stage_reads_the_same_files(monkeypatch, tmp_path):
    """encode's source, the classifier and evaluate's reference all read FLOWAR_FASHION_MNIST."""
    from pipelines.data.sources import SourceConfig, list_items, parse_reference_source
    from pipelines.evaluate.classifier import load_fashion_mnist

    folder = _fake_idx_folder(tmp_path / "fm", count=3)
    monkeypatch.setenv("FLOWAR_FASHION_MNIST", str(folder))
    items, _ = list_items(SourceConfig(kind="fashion-mnist", split="test"))
    images, labels = load_fashion_mnist("test")
    reference = parse_reference_source("fashion-mnist:test")
    assert [label for _, label, _ in items] == labels.tolist() == [0, 1, 2]
    assert images.shape == (3, 32, 32) and images[2, 16, 16] == 2
    assert reference["count"] == 3 and Path(reference["path"]).parent == folder


def test_incomplete_folder_is_named(monkeypatch, nowhere):
    from pipelines.data.bundled import MissingData, fashion_mnist_dir

    folder = _fake_idx_folder(nowhere / "fm")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    monkeypatch.setenv("FLOWAR_FASHION_MNIST", str(folder))
    with pytest.raises(MissingData, match="FLOWAR_FASHION_MNIST=.*four"):
        fashion_mnist_dir()
    with pytest.raises(MissingData, match=f"{folder} does not hold"):
        fashion_mnist_dir(str(folder))


def test_lookup_order(monkeypatch, nowhere):
    """The explicit folder wins over Debian's, which wins over an earlier download's cache."""
    from pipelines.data import bundled

    debian = _fake_idx_folder(nowhere / "debian")
    cache = _fake_idx_folder(nowhere / "cache" / "FashionMNIST" / "raw")
    monkeypatch.setattr(bundled, "DEBIAN_DIR", debian)
    assert bundled.fashion_mnist_dir(download=False) == debian
    debian_file = debian / "train-images-idx3-ubyte.gz"
    debian_file.unlink()
    assert bundled.fashion_mnist_dir(download=False) == cache
    mine = _fake_idx_folder(nowhere / "mine")
    monkeypatch.setenv("FLOWAR_FASHION_MNIST", str(mine))
    assert bundled.fashion_mnist_file("train", "labels") == mine / "train-labels-idx1-ubyte.gz"


def test_ensure_fails_at_once_with_what_to_run(nowhere, capsys):
    """No data, no apt, no download host: one line naming the command, exit status 1."""
    from pipelines.data import bundled

    assert bundled.main(["ensure"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "apt-get install dataset-fashion-mnist" in err and "FLOWAR_FASHION_MNIST" in err
    assert "127.0.0.1:9" in err  # says which download host did not answer
    assert not (nowhere / "cache").exists()  # nothing was half-downloaded


def test_ensure_reports_found_data_with_system_python(tmp_path):
    """`make`'s step runs before the venv exists: the module must need nothing but the stdlib."""
    folder = _fake_idx_folder(tmp_path / "fm")
    env = {"PATH": os.environ["PATH"], "FLOWAR_FASHION_MNIST": str(folder), "PYTHONNOUSERSITE": "1"}
    # -S: no site-packages at all, so an import of numpy/torch/yaml would fail here.
    out = subprocess.run([sys.executable, "-S", "-m", "pipelines.data.bundled", "ensure"], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"Fashion-MNIST: {folder}"


@pytest.mark.parametrize("target", ["quickstart", "test"])
def test_make_checks_the_data_before_installing(tmp_path, target):
    """`make quickstart` / `make test` on a fresh clone: the data step is the first command, before
    the venv and minutes of pip (dry run with a venv path that does not exist)."""
    # Under `make test` (CI) the parent make's MAKEFLAGS/MAKELEVEL are inherited: drop them so this
    # is the dry run a user's shell would get, and let make print no "Entering directory" lines.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    out = subprocess.run(["make", "--no-print-directory", "-n", target, f"VENV={tmp_path / 'venv'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    commands = [line for line in out.stdout.splitlines()
                if line and not line.startswith(("#", "make["))]
    assert "pipelines.data.bundled ensure" in commands[0], commands
    assert any("-m venv" in c for c in commands[1:]), commands
