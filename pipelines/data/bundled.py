"""The bundled data set, Fashion-MNIST: one lookup for every stage that reads it.

`flowar encode`, `flowar vae train`, the classifier and `flowar evaluate`'s `fashion-mnist`
reference all call `fashion_mnist_dir()`, which looks, in this order, in:

1. `$FLOWAR_FASHION_MNIST`: a folder holding the four IDX files (`train-images-idx3-ubyte.gz`, ...);
2. Debian's `dataset-fashion-mnist` package: /usr/share/datasets/fashion-mnist (offline);
3. the cache of an earlier download: `$FLOWAR_DATA_CACHE/FashionMNIST/raw` (default
   ~/.cache/flowar);
4. torchvision's download into that cache (the same files; needs the internet).

`python -m pipelines.data.bundled ensure` is what `make quickstart` and `make test` run first,
with the system Python and nothing installed: it finds the files, or installs the Debian package
when it runs as root with apt-get, or checks that the download host answers (the download itself
happens at first use, through torchvision). Where none of these can work it fails at once, before
minutes of installing, with one line that says what to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["fashion_mnist_dir", "fashion_mnist_file", "find_fashion_mnist", "ensure", "MissingData"]

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"
# torchvision's FashionMNIST mirror (torchvision/datasets/mnist.py)
DOWNLOAD_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
HOW_TO_GET = (f"run `sudo apt-get install {DEBIAN_PACKAGE}`, or put the four IDX files "
              "(train/t10k images and labels, .gz) in a folder and set FLOWAR_FASHION_MNIST to it")


class MissingData(FileNotFoundError):
    """Fashion-MNIST is nowhere this machine can read it, and it cannot be fetched."""


def _cache_dir() -> Path:
    return Path(os.environ.get("FLOWAR_DATA_CACHE") or "~/.cache/flowar").expanduser()


def _complete(folder: Path) -> bool:
    return all((folder / name).is_file() for pair in FILES.values() for name in pair)


def candidates() -> list[Path]:
    """Where the files may already be, in the order they are looked up."""
    found = [Path(os.environ["FLOWAR_FASHION_MNIST"]).expanduser()] \
        if os.environ.get("FLOWAR_FASHION_MNIST") else []
    return found + [DEBIAN_DIR, _cache_dir() / "FashionMNIST" / "raw"]


def find_fashion_mnist() -> Path | None:
    """The first folder that holds all four IDX files, or None (never downloads)."""
    return next((c for c in candidates() if _complete(c)), None)


def fashion_mnist_dir(explicit: str = "", download: bool = True) -> Path:
    """The folder of the IDX files; `explicit` (a user's `source.path`) must hold them itself."""
    if explicit:
        folder = Path(explicit).expanduser()
        if not _complete(folder):
            raise MissingData(f"{folder} does not hold the Fashion-MNIST IDX files "
                              f"({', '.join(FILES['train'] + FILES['test'])})")
        return folder
    found = find_fashion_mnist()
    if found is not None:
        return found
    if os.environ.get("FLOWAR_FASHION_MNIST"):
        raise MissingData(f"FLOWAR_FASHION_MNIST={os.environ['FLOWAR_FASHION_MNIST']} does not "
                          "hold the four Fashion-MNIST IDX files")
    if not download:
        raise MissingData(f"Fashion-MNIST is not on this machine: {HOW_TO_GET}")
    try:  # torchvision fetches the same files and checks their MD5s
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(_cache_dir()), download=True)
    except Exception as e:
        raise MissingData(f"Fashion-MNIST: not found in {', '.join(map(str, candidates()))} and "
                          f"the download failed ({type(e).__name__}: {e}); {HOW_TO_GET}") from None
    return _cache_dir() / "FashionMNIST" / "raw"


def fashion_mnist_file(split: str, what: str = "images", explicit: str = "") -> Path:
    """The IDX file of `split` (train or test) and `what` (images or labels), in
    `fashion_mnist_dir(explicit)`."""
    if split not in FILES or what not in ("images", "labels"):
        raise ValueError(f"Fashion-MNIST has splits train/test and files images/labels, "
                         f"not {split}/{what}")
    return fashion_mnist_dir(explicit) / FILES[split][0 if what == "images" else 1]


# ------------------------------------------------------------------------------------------------
# `python -m pipelines.data.bundled ensure`: the first step of `make quickstart` / `make test`
# ------------------------------------------------------------------------------------------------

def _apt_install() -> bool:
    """Install the Debian package when this process may (root, apt-get present)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    print(f"flowar: installing Fashion-MNIST from Debian's {DEBIAN_PACKAGE} (31 MB)", flush=True)
    quiet = {"env": env, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    if subprocess.run(["apt-get", "install", "-y", "-qq", DEBIAN_PACKAGE], **quiet).returncode:
        subprocess.run(["apt-get", "update", "-qq"], **quiet)  # a fresh machine's lists may be empty
        subprocess.run(["apt-get", "install", "-y", "-qq", DEBIAN_PACKAGE], **quiet)
    return _complete(DEBIAN_DIR)


def _download_reachable(timeout_s: float = 3.0) -> str:
    """'' when the download host answers, else why not (no download happens here)."""
    # Imported here: urllib.request (http, ssl, email) costs ~0.08 s, and `flowar --help` imports
    # this module (pipelines/data/sources.py's Fashion-MNIST lookup); only `ensure` needs it.
    import urllib.error
    import urllib.request

    url = os.environ.get("FLOWAR_FASHION_MNIST_URL") or DOWNLOAD_URL
    try:
        with urllib.request.urlopen(urllib.request.Request(url + FILES["test"][1], method="HEAD"),
                                    timeout=timeout_s):
            return ""
    except urllib.error.HTTPError as e:
        return "" if e.code < 500 and e.code not in (403, 404) else f"{url}: HTTP {e.code}"
    except (OSError, ValueError) as e:
        return f"{url}: {getattr(e, 'reason', e)}"


def ensure() -> str:
    """Where the data is or will come from; raises MissingData (one line) when nowhere."""
    found = find_fashion_mnist()
    if found is not None:
        return f"Fashion-MNIST: {found}"
    if _apt_install():
        return f"Fashion-MNIST: {DEBIAN_DIR} (Debian package {DEBIAN_PACKAGE}, just installed)"
    why = _download_reachable()
    if not why:
        return f"Fashion-MNIST: torchvision downloads it into {_cache_dir()} at first use"
    raise MissingData(f"Fashion-MNIST is not on this machine, the Debian package cannot be "
                      f"installed here (needs root and apt-get), and the download host is "
                      f"unreachable ({why}): {HOW_TO_GET}")


def main(argv: list[str]) -> int:
    if argv[:1] != ["ensure"]:
        print("usage: python -m pipelines.data.bundled ensure", file=sys.stderr)
        return 2
    try:
        print(ensure(), flush=True)
    except MissingData as e:
        print(f"flowar: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
