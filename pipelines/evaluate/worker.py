"""What one evaluation worker does: make images (by generation or from an image source) and
turn them into Inception statistics. The driver (pipelines/evaluate/job.py) runs these as Ray actors.

Every generated sample is a pure function of its global index: label = index // samples_per_class
and its starting noise comes from a generator seeded with (seed, index). Shards are index ranges
processed in fixed batches from the shard start, so the images do not depend on how many workers
there are, and any shard can be recomputed alone.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import socket
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from flowar import vae as flowar_vae
from flowar.config import SamplerConfig, from_dict
from flowar.model import FlowAR
from pipelines.core import storage
from pipelines.core.images import to_uint8
from pipelines.evaluate.inception import InceptionFeatures
from pipelines.evaluate.metrics import FeatureStats
from pipelines.evaluate.reference import read_range

# ------------------------------------------------------------------------------------------------
# Per-sample noise and decoding
# ------------------------------------------------------------------------------------------------


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of run `seed` (SeedSequence mixes both well)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def sample_noise(seed: int, index: int, scales, channels: int):
    """The starting noise of one sample: one (s*s, C) float32 tensor per scale."""
    g = torch.Generator().manual_seed(sample_seed(seed, index))
    return [torch.randn(s * s, channels, generator=g) for s in scales]


def batch_noise(seed: int, indices, scales, channels: int, guided: bool, device="cpu"):
    """Noise for model.generate(noise=...): per scale (B, s*s, C), or (2B, s*s, C) with CFG,
    conditional half first and the same noise in the unconditional half."""
    per_sample = [sample_noise(seed, i, scales, channels) for i in indices]
    out = []
    for k in range(len(scales)):
        n = torch.stack([p[k] for p in per_sample])
        out.append((torch.cat([n, n]) if guided else n).to(device))
    return out


def as_rgb(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B,1|3,H,W) -> (B,3,H,W): Inception takes RGB, so grey is replicated."""
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    if pixels.shape[1] != 3:
        raise ValueError(f"decoded images have {pixels.shape[1]} channels; expected 1 or 3")
    return pixels.contiguous()


def load_vae(spec: dict, device):
    """(vae, decode) for the VAE named by a latent dataset's metadata (`vae` of latents.json):
    decode maps normalised latents to images in [-1, 1] with the dataset's own normalisation."""
    vae, info = flowar_vae.load_for_latents(spec, device)
    return vae, (lambda z: flowar_vae.decode(vae, z, info))


# ------------------------------------------------------------------------------------------------
# The worker
# ------------------------------------------------------------------------------------------------

class EvalWorker:
    """Holds the Inception network, and the generator + VAE when evaluating a model.

    `generator` is pipelines.evaluate.export.generator_spec's dict; `inception` holds `weights`
    (inception.weights as configured: empty, a file or a URI) and `allow_download`. Each worker
    finds the weights on its own node (pipelines.evaluate.inception.resolve_weights: its cache,
    the offline copy or a download), so no node needs a file that only the driver has."""

    def __init__(self, inception: dict | None, generator: dict | None = None, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.inception = None  # None: a generator only (flowar sample)
        if inception is not None:
            self.inception = InceptionFeatures(inception.get("weights", ""), str(self.device),
                                               inception.get("allow_download", True))
        self.gen = generator
        self.model = None
        if generator is not None:
            self._load_generator(generator)

    def _load_generator(self, spec: dict):
        # A checkpoint URI is downloaded by each worker for itself (removed once loaded).
        with storage.local_dir(spec["checkpoint"]) as folder:
            model = FlowAR.from_pretrained(folder)
            if spec.get("ema_file"):
                ema = Path(folder) / posixpath.basename(spec["ema_file"])
                model.load_state_dict(load_file(str(ema)), strict=True)
        self.use_generator(model, spec)

    def use_generator(self, model: FlowAR, spec: dict):
        """Generate with `model` (e.g. the EMA weights of a running training,
        pipelines/train/evaluation.py), the VAE, seed, class layout and sampler of `spec`."""
        self.gen, self.model = spec, model.to(self.device).eval()
        self.vae, self.decode = load_vae(spec["vae"], self.device)

    def extractor_info(self) -> dict:
        """The extractor this worker resolved (weights path, digest, logits) and where it runs."""
        info = self.inception.info
        return {**dataclasses.asdict(info), "id": info.id, "node_id": _node_id(),
                "hostname": socket.gethostname(), "pid": os.getpid()}

    # --- images --------------------------------------------------------------------------------
    def generate(self, indices: list[int]) -> torch.Tensor:
        """uint8 (B,3,H,W) images of the given global sample indices (one batch)."""
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
        return as_rgb(to_uint8(self.decode(z)))

    def load_source(self, source: dict, start: int, end: int, resolution: int) -> torch.Tensor:
        """uint8 (B,3,res,res) reference images start..end (`source`: what
        pipelines.evaluate.reference.range_call gives for this shard; the encode job's preprocessing)."""
        pixels = read_range(source, start, end, resolution)
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

    # --- one shard ----------------------------------------------------------------------------
    def run_shard(self, start: int, end: int, batch_size: int, keep=(), keep_logits: bool = False,
                  keep_images: bool = False, grid_indices=(), source: dict | None = None,
                  resolution: int = 0) -> dict:
        """Stats of samples [start, end) (+ the features of the indices in `keep`, the logits,
        the images, the grid images), in fixed batches from `start`: generated, or read from
        `source` (a range_call) when one is given."""
        t0 = time.perf_counter()
        keep, wanted = set(keep), set(grid_indices)
        stats, kept, logits, images, grid = None, {}, [], [], {}
        image_s = feature_s = 0.0
        for b0 in range(start, end, batch_size):
            idx = list(range(b0, min(b0 + batch_size, end)))
            t = time.perf_counter()
            x = self.generate(idx) if source is None else self.load_source(source, idx[0], idx[-1] + 1, resolution)
            t1 = time.perf_counter()
            f, lg = self.inception(x)
            feature_s += time.perf_counter() - t1
            image_s += t1 - t
            # Added batch by batch in a fixed order: the shard's sums do not depend on the worker.
            stats = FeatureStats.of(f) if stats is None else stats.add_(FeatureStats.of(f))
            kept.update({i: f[j] for j, i in enumerate(idx) if i in keep})
            if keep_logits and lg is not None:
                logits.append(lg)
            if keep_images:
                images.append(x.cpu().numpy())
            grid.update({i: x[j].cpu().numpy() for j, i in enumerate(idx) if i in wanted})
        timing = {"image_seconds": image_s, "feature_seconds": feature_s,
                  "seconds": time.perf_counter() - t0}
        return shard_result(start, end, int(x.shape[-1]), timing, stats, kept,
                            logits, images if keep_images else None, grid)


def shard_result(start: int, end: int, resolution: int, timing: dict, stats: FeatureStats,
                 kept: dict, logits: list, images: list | None, grid: dict) -> dict:
    """One shard's arrays as the driver saves them (one .npz): mergeable stats, the index range,
    timings, where it ran, and the kept features (with their indices) / logits / images / grid
    images when there are any."""
    out = {**stats.to_arrays(), "start": start, "end": end, **timing, "resolution": resolution,
           "node_id": np.array(_node_id())}
    order = sorted(kept)
    out["feature_idx"] = np.array(order, np.int64)
    out["features"] = (np.stack([kept[i] for i in order]) if order
                       else np.zeros((0, stats.sum.shape[0]))).astype(np.float32)
    if logits:
        out["logits"] = np.concatenate(logits).astype(np.float32)
    if images is not None:
        out["images"] = np.concatenate(images)
    if grid:
        out["grid_idx"] = np.array(sorted(grid), np.int64)
        out["grid_images"] = np.stack([grid[i] for i in sorted(grid)])
    return out


def _node_id() -> str:
    """The Ray node this process runs on ("" outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 (no runtime context: not in Ray)
        return ""
