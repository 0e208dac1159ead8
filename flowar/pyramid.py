"""The latent pyramid: every scale made by downsampling the latent of an off-the-shelf VAE.

Targets of every scale are area downsamples of the finest latent (not cascaded). The input the
autoregressive transformer reads for scale k+1 is built from scale k: the published recipe
upsamples bicubically to the finest grid and then area-downsamples to the next scale (VAR's trick);
`upsample2x` interpolates straight to the next scale instead (the author reports no difference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .config import ConfigError, validate_scales


def to_tokens(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, s, s) -> (B, s*s, C), raster order."""
    return rearrange(maps, "b c h w -> b (h w) c")


def to_maps(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(B, s*s, C) -> (B, C, s, s)."""
    return rearrange(tokens, "b (h w) c -> b c h w", h=side, w=side)


def check_latents(latents: torch.Tensor, scales: tuple[int, ...], channels: int) -> None:
    if latents.ndim != 4:
        raise ConfigError(f"latents must be (B, C, H, W), got shape {tuple(latents.shape)}")
    _, c, h, w = latents.shape
    if h != w:
        raise ConfigError(f"latents must be square, got {h}x{w}")
    if c != channels:
        raise ConfigError(f"latents have {c} channels but the model expects {channels}")
    validate_scales(scales, latent_size=h)


def targets(latents: torch.Tensor, scales: tuple[int, ...]) -> list[torch.Tensor]:
    """Target map of each scale, coarse to fine: area downsamples of the finest latent."""
    return [latents if s == latents.shape[-1] else F.interpolate(latents, size=(s, s), mode="area")
            for s in scales]


def next_scale_input(prev: torch.Tensor, next_side: int, latent_size: int,
                     mode: str = "bicubic_area") -> torch.Tensor:
    """The map the AR transformer reads for the next scale, built from the current scale's map."""
    if mode == "bicubic_area":
        full = F.interpolate(prev, size=(latent_size, latent_size), mode="bicubic")
        return F.interpolate(full, size=(next_side, next_side), mode="area")
    if mode == "upsample2x":
        return F.interpolate(prev, size=(next_side, next_side), mode="bicubic")
    raise ConfigError(f"model.scale_input={mode!r} is not one of: bicubic_area, upsample2x")


def teacher_inputs(target_maps: list[torch.Tensor], scales: tuple[int, ...],
                   mode: str = "bicubic_area") -> torch.Tensor:
    """AR inputs of scales 2..K (teacher forcing), as one token sequence (B, L - 1, C)."""
    latent_size = scales[-1]
    maps = [next_scale_input(target_maps[k], scales[k + 1], latent_size, mode)
            for k in range(len(scales) - 1)]
    if not maps:
        return target_maps[0].new_zeros(target_maps[0].shape[0], 0, target_maps[0].shape[1])
    return torch.cat([to_tokens(m) for m in maps], dim=1)


def segments(scales: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, end) token offsets of each scale in the full sequence."""
    out, start = [], 0
    for s in scales:
        out.append((start, start + s * s))
        start += s * s
    return out


def image_at_scale(images: torch.Tensor, side: int, downsample: int) -> torch.Tensor:
    """The image whose VAE latent is side x side: area-downsampled to side * downsample pixels."""
    px = side * downsample
    return images if images.shape[-1] == px else F.interpolate(images, size=(px, px), mode="area")


def image_scale_targets(images: torch.Tensor, scales: tuple[int, ...], downsample: int,
                        encode) -> list[torch.Tensor]:
    """Table 3's alternative: each scale's map is the VAE latent of the image downsampled to
    side * downsample pixels (`encode`: images in [-1, 1] -> normalised latents)."""
    return [encode(image_at_scale(images, s, downsample)) for s in scales]
