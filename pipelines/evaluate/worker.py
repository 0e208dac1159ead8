"""What one evaluation worker does: make images (by generation or from an image source) and
turn them into Inception statistics. The driver (pipelines/evaluate/job.py) runs these as Ray actors.

Every generated sample is a pure function of its global index: label = index // samples_per_class
and its starting noise comes from a generator seeded with (seed, index). Shards are index ranges
processed in fixed batches from the shard start, so the images do not depend on how many workers
there are, and any shard can be recomputed alone.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".JPEG")


# ------------------------------------------------------------------------------------------------
# Per-sample noise and decoding
# ------------------------------------------------------------------------------------------------

def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of run `seed` (SeedSequence mixes both well)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def sample_noise(seed: int, index: int, scales, channels: int):
    """The starting noise of one sample: one (s*s, C) float32 tensor per scale."""
    import torch

    g = torch.Generator().manual_seed(sample_seed(seed, index))
    return [torch.randn(s * s, channels, generator=g) for s in scales]


def batch_noise(seed: int, indices, scales, channels: int, guided: bool, device="cpu"):
    """Noise for model.generate(noise=...): per scale (B, s*s, C), or (2B, s*s, C) with CFG,
    conditional half first and the same noise in the unconditional half."""
    import torch

    per_sample = [sample_noise(seed, i, scales, channels) for i in indices]
    out = []
    for k in range(len(scales)):
        n = torch.stack([p[k] for p in per_sample])
        out.append((torch.cat([n, n]) if guided else n).to(device))
    return out


def to_uint8(images):
    """[-1, 1] float (B,C,H,W) -> uint8 RGB (B,3,H,W); grey is replicated to RGB for Inception."""
    import torch

    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[1] != 3:
        raise ValueError(f"decoded images have {x.shape[1]} channels; expected 1 or 3")
    return x.contiguous()


def export_vae_spec(ckpt: Path) -> dict:
    """The `vae` entry of a training export's latents.json (the latent dataset's metadata)."""
    from flowar.config import ConfigError
    from pipelines.data.latents import LatentDatasetMeta

    path = Path(ckpt) / "latents.json"
    if not path.is_file():
        raise ConfigError(f"{ckpt} has no latents.json naming the VAE of its latents; "
                          "give the VAE explicitly (generation.vae / --vae)")
    return dict(LatentDatasetMeta.from_json(path.read_text(), str(path)).vae)


def load_vae(spec: dict, device):
    """(vae, decode) for the VAE named by a latent dataset's metadata (`vae` of latents.json):
    decode maps normalised latents to images in [-1, 1] with the dataset's own normalisation."""
    import dataclasses

    from flowar import vae as flowar_vae

    if not spec.get("id"):
        raise ValueError(f"VAE spec {spec!r} names no VAE ('id')")
    vae, info = flowar_vae.load_vae(spec["id"], device)
    if spec.get("sha256") and spec["sha256"] != info.sha256:
        raise ValueError(f"VAE {spec['id']!r} has weights {info.sha256[:12]}, but the model was trained "
                         f"on latents of {spec['sha256'][:12]}: decoding would give wrong images")
    info = dataclasses.replace(info, scaling_factor=float(spec.get("scaling_factor", info.scaling_factor)),
                               shift_factor=float(spec.get("shift_factor") or 0.0))
    return vae, (lambda z: flowar_vae.decode(vae, z, info))


# ------------------------------------------------------------------------------------------------
# Image sources for reference statistics
# ------------------------------------------------------------------------------------------------

def read_idx_images(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    n, rows, cols = (int.from_bytes(data[i:i + 4], "big") for i in (4, 8, 12))
    return np.frombuffer(data, np.uint8, offset=16).reshape(n, rows, cols)


def parse_source(source: str) -> dict:
    """'fashion-mnist[:train|test]', 'folder:/path' or a bare folder path -> a source spec.
    Images are then prepared like `flowar encode` does (pipelines.data.sources.preprocess: Fashion-MNIST
    padded 28 -> 32, ADM center crop, grey -> RGB)."""
    if source.startswith("fashion-mnist"):
        split = source.split(":", 1)[1] if ":" in source else "test"
        if split not in ("train", "test"):
            raise ValueError(f"reference source {source!r}: split must be train or test")
        from pipelines.data.bundled import fashion_mnist_file  # encode's and the classifier's lookup

        path = fashion_mnist_file(split, "images")
        return {"kind": "fashion-mnist", "path": str(path), "count": _idx_count(path)}
    folder = Path(source.split(":", 1)[1] if source.startswith("folder:") else source).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"reference source {source!r}: {folder} is not a folder of images")
    files = sorted(str(p) for p in folder.rglob("*") if p.suffix in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"reference source {source!r}: no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return {"kind": "folder", "path": str(folder), "files": files, "count": len(files)}


def _idx_count(path: Path) -> int:
    with gzip.open(path, "rb") as f:
        return int.from_bytes(f.read(8)[4:8], "big")


# ------------------------------------------------------------------------------------------------
# The worker
# ------------------------------------------------------------------------------------------------

class EvalWorker:
    """Holds the Inception network, and the generator + VAE when evaluating a model."""

    def __init__(self, inception: dict | None, generator: dict | None = None, device: str = "auto"):
        import torch

        from pipelines.evaluate.inception import InceptionFeatures

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.inception = None  # None: a generator only (flowar sample)
        if inception is not None:
            self.inception = InceptionFeatures(inception.get("weights", ""), str(self.device),
                                               inception.get("allow_download", True))
        self.gen = generator
        self.model = None
        self._source_cache: dict = {}
        if generator is not None:
            self._load_generator(generator)

    def _load_generator(self, spec: dict):
        from flowar import FlowAR

        self.model = FlowAR.from_pretrained(spec["checkpoint"]).to(self.device).eval()
        if spec.get("ema_file"):
            from safetensors.torch import load_file

            self.model.load_state_dict(load_file(spec["ema_file"], device=str(self.device)), strict=True)
        self.vae, self.decode = load_vae(spec["vae"], self.device)

    def extractor_info(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self.inception.info), "id": self.inception.info.id}

    # --- images --------------------------------------------------------------------------------
    def generate(self, indices: list[int]):
        """uint8 (B,3,H,W) images of the given global sample indices (one batch)."""
        import torch

        from flowar.config import SamplerConfig, from_dict

        g, s = self.gen, self.gen["sampler"]
        cfg = self.model.config
        labels = torch.tensor([i // g["samples_per_class"] % cfg.num_classes for i in indices],
                              dtype=torch.long, device=self.device)
        noise = batch_noise(g["seed"], indices, cfg.scales, cfg.latent_channels,
                            guided=s["cfg"] > 1.0, device=self.device)
        with torch.inference_mode():
            # The SDE solver's per-step noise: seeded from the batch's first index; batches are
            # fixed by shard and batch size, never by the worker count.
            g_sde = torch.Generator(self.device).manual_seed(sample_seed(g["seed"] + 1, indices[0]))
            z = self.model.generate(labels, noise=noise, sampler=from_dict(SamplerConfig, s, "sampler"),
                                    generator=g_sde)
        return to_uint8(self.decode(z))

    def load_source(self, source: dict, start: int, end: int, resolution: int):
        """uint8 (B,3,res,res) images start..end of a reference source."""
        import torch

        from pipelines.data.sources import preprocess  # the encode job's: same pad, crop and resize

        if source["kind"] == "fashion-mnist":
            if source["path"] not in self._source_cache:
                self._source_cache = {source["path"]: read_idx_images(Path(source["path"]))}
            raw = list(self._source_cache[source["path"]][start:end])
        else:
            raw = [Path(p).read_bytes() for p in source["files"][start:end]]
        arr = np.stack([preprocess(r, resolution) for r in raw])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    # --- one shard ----------------------------------------------------------------------------
    def run_shard(self, start: int, end: int, batch_size: int, keep_features: bool,
                  keep_images: bool = False, grid_indices=(), source: dict | None = None,
                  resolution: int = 0) -> dict:
        """Stats (+ features, logits, images) of samples [start, end), in fixed batches."""
        import time

        t0 = time.perf_counter()
        from pipelines.evaluate.metrics import FeatureStats

        feats, logits, images, grid = [], [], [], {}
        wanted = set(grid_indices)
        gen_s = feat_s = 0.0
        for b0 in range(start, end, batch_size):
            idx = list(range(b0, min(b0 + batch_size, end)))
            t = time.perf_counter()
            x = self.generate(idx) if source is None else self.load_source(source, idx[0], idx[-1] + 1, resolution)
            t1 = time.perf_counter()
            f, lg = self.inception(x)
            feat_s += time.perf_counter() - t1
            gen_s += t1 - t
            feats.append(f)
            if lg is not None:
                logits.append(lg)
            if keep_images:
                images.append(x.cpu().numpy())
            for j, i in enumerate(idx):
                if i in wanted:
                    grid[i] = x[j].cpu().numpy()
        features = np.concatenate(feats)
        out = {**FeatureStats.of(features).to_arrays(), "start": start, "end": end,
               "image_seconds": gen_s, "feature_seconds": feat_s,
               "seconds": time.perf_counter() - t0, "resolution": int(x.shape[-1])}
        if keep_features:
            out["features"] = features.astype(np.float32)
        if logits:
            out["logits"] = np.concatenate(logits).astype(np.float32)
        if keep_images:
            out["images"] = np.concatenate(images)
        if grid:
            out["grid_idx"] = np.array(sorted(grid), np.int64)
            out["grid_images"] = np.stack([grid[i] for i in sorted(grid)])
        return out
