"""Periodic sample grids during training (rank 0): fixed labels and noise, EMA weights, VAE decode.

The same labels and generator seed every time, so grids at successive steps show the model
improving on identical inputs. Decoded through the dataset's VAE when it can be loaded here;
otherwise (e.g. a test dataset with no VAE on disk) the latents' first channels are shown, which
still shows whether training does something.
"""

from __future__ import annotations

import numpy as np
import torch

from flowar import FlowAR
from flowar.vae import decode, load_for_latents
from pipelines.core.images import image_grid
from pipelines.data.latents import LatentDatasetMeta
from pipelines.train.config import TrainJobConfig

__all__ = ["SampleGrid"]


def _latents_as_images(z: torch.Tensor, min_side: int = 32) -> torch.Tensor:
    x = z[:, :3] if z.shape[1] >= 3 else z[:, :1].repeat(1, 3, 1, 1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    x = (x - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
    factor = max(1, min_side // x.shape[-1])
    return torch.nn.functional.interpolate(x, scale_factor=factor, mode="nearest")


class SampleGrid:
    """One row per class (train.sample_classes, else the first 8), train.samples_per_class
    images a row. The classes were checked against the model when the job config was read."""

    def __init__(self, job: TrainJobConfig, meta: LatentDatasetMeta, device: torch.device):
        self.job, self.meta, self.device = job, meta, device
        self.classes = list(job.train.sample_classes) or list(range(min(8, job.model.num_classes)))
        self.labels = torch.tensor(self.classes, device=device).repeat_interleave(
            job.train.samples_per_class)
        self._vae, self._vae_tried = None, False

    def _decoder(self):
        if not self._vae_tried:
            self._vae_tried = True
            try:
                spec = self.meta.vae or {}  # its normalisation: the dataset's, as decoding wants
                self._vae = load_for_latents(spec, self.device) if spec.get("id") else None
            except Exception as e:  # noqa: BLE001 - any failure means "show latents instead"
                print(f"flowar train: sample grids show raw latents; the dataset's VAE did not "
                      f"load here ({type(e).__name__}: {e})")
                self._vae = None
        return self._vae

    @torch.no_grad()
    def render(self, ema_full: dict[str, torch.Tensor]) -> np.ndarray:
        model = FlowAR(self.job.model.architecture())
        state = model.state_dict()
        state.update(ema_full)
        model.load_state_dict(state)
        model.to(self.device).eval()
        s = self.job.sampler
        g = torch.Generator(self.device).manual_seed(self.job.train.seed)
        z = model.generate(self.labels, num_steps=s.num_steps, cfg=s.cfg,
                           guidance_high=s.guidance_high, sampler=s, generator=g)
        vae = self._decoder()
        if vae is not None:
            vae_model, info = vae
            images = decode(vae_model, z, info)
        else:
            images = _latents_as_images(z)
        return image_grid(images, per_row=self.job.train.samples_per_class)
