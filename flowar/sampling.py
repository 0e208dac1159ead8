"""Solvers that turn one scale's noise into its latent tokens, and the guidance schedule.

The state is kept in float64 and the net is called in its own dtype, as the published sampler
does. Time runs from 1 (noise) to 0 (data).
"""

from __future__ import annotations

from typing import Callable

import torch

from .config import ConfigError, SamplerConfig
from .objective import ddpm_alphas_cumprod

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]  # (x float64, t) -> float64


def time_grid(num_steps: int, kind: str = "published") -> torch.Tensor:
    """Grid points from 1 to 0 (float64).

    "uniform": num_steps Euler steps. "published": the published two-segment grid, coarse at high
    noise then fine near the data; num_steps counts grid *points* there (25 -> 24 steps), and 50
    means a uniform grid of 50 steps, exactly as the published code."""
    if kind == "uniform" or (kind == "published" and num_steps == 50):
        return torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    if kind != "published":
        raise ConfigError(f"sampler.time_grid={kind!r} is not one of: published, uniform")
    if num_steps < 4:
        raise ConfigError(f"sampler.num_steps={num_steps}: the published grid needs at least 4 "
                          "points; use sampler.time_grid=uniform for fewer steps")
    half = num_steps // 2
    return torch.cat([torch.linspace(1, 0.3, half, dtype=torch.float64),
                      torch.linspace(0.25, 0, half + 1, dtype=torch.float64)])


def cfg_for_scale(k: int, num_scales: int, cfg: float, schedule: str) -> float:
    """Published: linear ramp over the scale index, no guidance at the first (1x1) scale."""
    if schedule == "constant" or num_scales == 1:
        return cfg
    return 1.0 + (cfg - 1.0) * k / (num_scales - 1)


def integrate(v_fn: VelocityFn, noise: torch.Tensor, grid: torch.Tensor, solver: str,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Solve the flow ODE (euler, heun) or its reverse SDE (sde) from t=1 to t=0."""
    x = noise.to(torch.float64)
    points = grid.tolist()
    for i, (t_cur, t_next) in enumerate(zip(points[:-1], points[1:])):
        h = t_next - t_cur  # negative
        v = v_fn(x, t_cur)
        if solver == "euler":
            x = x + h * v
        elif solver == "heun":
            x_pred = x + h * v
            x = x + h * 0.5 * (v + v_fn(x_pred, t_next)) if t_next > 0 else x_pred
        elif solver == "sde":
            # Reverse-time SDE with diffusion g^2 = 2t; the score of the linear path is
            # -eps_hat / t with eps_hat = x + (1 - t) v. No noise on the last step.
            if t_next > 0:
                eps_hat = x + (1 - t_cur) * v
                z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
                x = x + h * (v + eps_hat) + (2 * t_cur * -h) ** 0.5 * z
            else:
                x = x + h * v
        else:
            raise ConfigError(f"sampler.solver={solver!r} is not one of: euler, heun, sde")
    return x


def integrate_ddim(eps_fn: VelocityFn, noise: torch.Tensor, num_steps: int,
                   diffusion_steps: int) -> torch.Tensor:
    """Deterministic DDIM for the diffusion objective; eps_fn gets t = step / T."""
    abar = ddpm_alphas_cumprod(diffusion_steps, noise.device)
    steps = torch.linspace(diffusion_steps - 1, 0, num_steps).round().long().unique_consecutive()
    x = noise.to(torch.float64)
    for i, step in enumerate(steps.tolist()):
        a = abar[step]
        eps = eps_fn(x, step / diffusion_steps)
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        a_next = abar[steps[i + 1]] if i + 1 < len(steps) else torch.tensor(1.0, dtype=torch.float64)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def guided_fn(net, semantics_cond: torch.Tensor, semantics_uncond: torch.Tensor | None,
              cfg: float, sampler: SamplerConfig, dtype: torch.dtype) -> VelocityFn:
    """Velocity with classifier-free guidance while guidance_low <= t <= guidance_high.

    `net` is the flow net. What it reads from the semantics is computed once here, not at every
    step (net.condition). Conditional and unconditional halves go through the net in one batch.
    Outside the interval only the conditional half is evaluated: the published sampler lets the
    unconditional half run freely there, but it never reaches the kept conditional half, so
    skipping it is exact."""
    batch = semantics_cond.shape[0]
    guidance = semantics_uncond is not None and cfg > 1.0
    both = net.condition(torch.cat([semantics_cond, semantics_uncond])) if guidance else None
    cond_only = both.head(batch) if guidance else net.condition(semantics_cond)

    def v_fn(x: torch.Tensor, t: float) -> torch.Tensor:
        if guidance and sampler.guidance_low <= t <= sampler.guidance_high:
            xx = torch.cat([x, x]).to(dtype)
            tt = torch.full((2 * batch,), t, dtype=torch.float64, device=x.device).to(dtype)
            v = net(xx, tt, both).to(torch.float64)
            v_cond, v_uncond = v.chunk(2)
            return v_uncond + cfg * (v_cond - v_uncond)
        tt = torch.full((batch,), t, dtype=torch.float64, device=x.device).to(dtype)
        return net(x.to(dtype), tt, cond_only).to(torch.float64)

    return v_fn
