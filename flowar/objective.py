"""Training objectives of one scale: linear-path flow matching (default) or DDPM-style diffusion.

Flow matching uses the published convention: t = 0 is data and t = 1 is noise,
x_t = (1 - t) x + t eps, and the net predicts the velocity eps - x. Diffusion (Table 5's
alternative) uses a linear beta schedule, x_t = sqrt(abar) x + sqrt(1 - abar) eps, and the net
predicts eps; its integer step is handed to the net as t = step / T, so the time embedding sees
the same integer steps as in flow matching.
"""

from __future__ import annotations

import torch

from .config import FlowARConfig


def sample_time(batch: int, cfg: FlowARConfig, device, generator=None) -> torch.Tensor:
    if cfg.time_sampling == "logit_normal":
        return torch.sigmoid(torch.randn(batch, device=device, generator=generator))
    return torch.rand(batch, device=device, generator=generator)


def ddpm_alphas_cumprod(steps: int, device=None) -> torch.Tensor:
    betas = torch.linspace(1e-4, 0.02, steps, dtype=torch.float64, device=device)
    return torch.cumprod(1.0 - betas, dim=0)


def noisy_input_and_target(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                           cfg: FlowARConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, regression target, the time the net is given) for clean tokens x (B, N, C)."""
    if cfg.objective == "flow":
        tb = t.view(-1, 1, 1).to(x.dtype)
        return (1 - tb) * x + tb * noise, noise - x, t
    steps = cfg.diffusion_steps
    index = (t * steps).long().clamp(0, steps - 1)
    abar = ddpm_alphas_cumprod(steps, x.device)[index].to(x.dtype).view(-1, 1, 1)
    x_t = abar.sqrt() * x + (1 - abar).sqrt() * noise
    return x_t, noise, index.to(t.dtype) / steps


def scale_weights(cfg: FlowARConfig) -> list[float]:
    """Published: token-count weighting s^2 / (latent side)^2, so the finest scale has weight 1."""
    if cfg.loss_weighting == "equal":
        return [1.0 / len(cfg.scales)] * len(cfg.scales)
    return [s * s / cfg.latent_size ** 2 for s in cfg.scales]
