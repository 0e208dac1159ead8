"""The actor of `flowar encode` (pipelines/encode.py): loads the VAE once, encodes batches of
cropped images into posterior moments, and writes them as parts of the latent dataset itself.

Runs only inside Ray Data's actor pool, so it imports torch and the VAE at the top.
"""

from __future__ import annotations

import os
import threading

import numpy as np
import torch
import torch.nn.functional as F

from flowar.pyramid import image_at_scale
from flowar.vae import encode_moments, load_vae
from pipelines.core.images import from_uint8
from pipelines.data import latents

# Test hook (tests/test_encode.py): after this many parts an actor writes nothing more.
HOLD_ENV = "FLOWAR_TEST_ENCODE_HOLD_AFTER_PARTS"

SUMMARY_KEYS = ("shard", "start", "end", "images", "rejects", "bytes")  # one row per part written


class LatentWriter:
    """Actor: loads the VAE once, encodes batches of cropped images, writes them as parts."""

    def __init__(self, cfg: dict, meta_json: str, out: str):
        self.cfg = cfg
        self.dataset = latents.LatentDataset(out)  # resolved once per actor, not once per part
        self.meta = latents.LatentDatasetMeta.from_json(meta_json)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cpu":
            torch.set_num_threads(max(1, int(cfg["encode"]["actor_cpus"])))
        self.vae, info = load_vae(cfg["vae"]["spec"], self.device, cfg["vae"]["ldm_config"] or None)
        if info.sha256 != self.meta.vae["sha256"]:  # e.g. a node with another copy of the file
            raise RuntimeError(f"VAE {info.id} on this node hashes to {info.sha256[:12]}, the driver's "
                               f"to {self.meta.vae['sha256'][:12]}")
        self.parts_written = 0

    def _moments(self, images) -> dict:
        """uint8 (N, H, W, 3) images -> every moment column of the dataset, (N, C, h, w) each."""
        batch_size = self.cfg["encode"]["batch_size"]
        out: dict[str, list] = {}
        for s in range(0, len(images), batch_size):
            x = from_uint8(torch.from_numpy(images[s:s + batch_size].copy()).permute(0, 3, 1, 2))
            views = [(False, x)] + ([(True, x.flip(3))] if self.meta.flip else [])
            for flip, view in views:
                self._encode_view(view, flip, out)
        cols = {k: torch.cat(v) for k, v in out.items()}
        for side in self.meta.scales[:-1]:  # coarser pyramid levels of the mean, area-downsampled
            cols[f"mean_s{side}"] = F.interpolate(cols["mean"], size=(side, side), mode="area")
        dtype = getattr(torch, self.meta.dtype)
        return {k: v.to(dtype).numpy() for k, v in cols.items()}

    def _encode_view(self, view, flip: bool, out: dict) -> None:
        """The moments of one view (the image or its flip), of the full-size image and of each
        image-pyramid size, appended to `out` under their column names."""
        downsample = self.meta.resolution // self.meta.latent_size
        for side in [None, *self.meta.image_scales]:  # None: the full-size image -> the latent
            small = view if side is None else image_at_scale(view, side, downsample)
            mean, std = encode_moments(self.vae, small)
            out.setdefault(latents.moment_column("mean", flip, side), []).append(mean.cpu())
            out.setdefault(latents.moment_column("std", flip, side), []).append(std.cpu())

    def _hold_if_asked(self) -> None:
        """Test hook (HOLD_ENV=N): after this actor's N-th part, write nothing more until the
        job is killed, so a kill test finds exactly N parts however loaded the machine is."""
        self.parts_written += 1
        hold = os.environ.get(HOLD_ENV, "")
        if hold and self.parts_written >= int(hold):
            threading.Event().wait()  # until the kill

    def __call__(self, batch: dict) -> dict:
        """Decoded images of one or more shards -> one part per run of consecutive indices of a
        shard; returns one summary row per part."""
        summary = {k: [] for k in SUMMARY_KEYS}
        order = np.lexsort((batch["index"], batch["shard"]))
        shard, index = batch["shard"][order], batch["index"][order]
        # Split into runs of consecutive indices of one shard: each run becomes one part.
        cut = np.flatnonzero((np.diff(shard) != 0) | (np.diff(index) != 1)) + 1
        for run in np.split(order, cut):
            if len(run):
                for k, v in zip(SUMMARY_KEYS, self._write_run(batch, run)):
                    summary[k].append(v)
        return {k: np.asarray(v, np.int64) for k, v in summary.items()}

    def _write_run(self, batch: dict, run) -> tuple[int, int, int, int, int, int]:
        """Write the rows `run` of `batch` (one shard, consecutive indices) as one part; returns
        its summary row (shard, start, end, images, rejects, bytes)."""
        ok = run[batch["reason"][run] == ""]
        bad = run[batch["reason"][run] != ""]
        cols = {"key": batch["key"][ok].astype(str).tolist(), "label": batch["label"][ok]}
        if len(ok):
            cols.update(self._moments(batch["image"][ok]))
        rejects = [{"key": str(batch["key"][i]), "source": str(batch["ref"][i]),
                    "reason": str(batch["reason"][i])} for i in bad]
        s, a, b = int(batch["shard"][run[0]]), int(batch["index"][run[0]]), int(batch["index"][run[-1]]) + 1
        nbytes = self.dataset.write_part(s, a, b, cols, rejects, self.meta)
        self._hold_if_asked()
        return s, a, b, len(ok), len(bad), nbytes
