"""Building blocks shared by the autoregressive transformer and the flow net.

Numerics follow the published FlowAR code so its checkpoints load: RMSNorm in float32 with eps
1e-6, EVA-style axial 2D RoPE with interleaved pairs, DiT's sinusoidal timestep embedding on
floor(1000 t), and timm's SwiGLU with a GELU gate (a GEGLU), which is what the published
"SwiGLU" really computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import SwiGLU
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, affine: bool = False, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 whatever the autocast dtype: bf16 mean-of-squares loses too much.
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out * self.weight if self.weight is not None else out


def geglu_mlp(dim: int, hidden: int, drop: float = 0.0) -> nn.Module:
    """Gated MLP act(fc1_g(x)) * fc1_x(x) -> fc2 with a GELU gate, as the published model."""
    return SwiGLU(in_features=dim, hidden_features=hidden, act_layer=nn.GELU, drop=drop)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's modulation of a normalised x (DiT's `modulate`), in every adaLN block."""
    return x * (1 + scale) + shift


# ---------------------------------------------------------------------------------------------
# 2D rotary position embedding. Every scale's n x n grid is mapped onto the finest grid
# (position i -> i * latent_size / n), so a token keeps its spatial meaning across scales.
# ---------------------------------------------------------------------------------------------

class Rope2D(nn.Module):
    def __init__(self, head_dim: int, latent_size: int, theta: float = 10000.0):
        super().__init__()
        axis_dim = head_dim // 2  # half the channels rotate with the row, half with the column
        freqs = 1.0 / theta ** (torch.arange(0, axis_dim, 2)[: axis_dim // 2].float() / axis_dim)
        self.register_buffer("freqs", freqs, persistent=False)
        self.latent_size = latent_size
        self._tables: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, side: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each (side*side, head_dim), for a side x side grid in raster order."""
        key = (side, str(device))
        if key not in self._tables:
            pos = torch.arange(side, dtype=torch.float32, device=device) / side * self.latent_size
            angles = torch.outer(pos, self.freqs.to(device)).repeat_interleave(2, dim=-1)
            rows = angles[:, None, :].expand(side, side, -1)
            cols = angles[None, :, :].expand(side, side, -1)
            full = torch.cat([rows, cols], dim=-1).reshape(side * side, -1)
            self._tables[key] = (full.cos(), full.sin())
        return self._tables[key]

    def tables(self, sides, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables for consecutive scale segments of one sequence, concatenated."""
        parts = [self.table(s, device) for s in sides]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x = rearrange(x, "... (d r) -> ... d r", r=2)
    x1, x2 = x.unbind(-1)
    return rearrange(torch.stack((-x2, x1), dim=-1), "... d r -> ... (d r)")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, heads, N, head_dim); cos/sin (N, head_dim)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class KVCache:
    """Keys and values of the scales generated so far, one entry per attention layer."""

    def __init__(self):
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if layer in self.store:
            pk, pv = self.store[layer]
            k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        self.store[layer] = (k, v)
        return k, v


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor] | None, mask=None,
                cache: KVCache | None = None, layer: int = 0):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            # The queries are exactly the newest scale, which may see every cached (coarser)
            # scale and itself: the block-causal mask needs no explicit form here.
            k, v = cache.extend(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(rearrange(out, "b h n d -> b n (h d)")))


class CrossAttention(nn.Module):
    """Queries from the flow net's tokens, keys/values from the semantics of the same scale."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, rope=None):
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.kv(context), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class TimestepEmbedder(nn.Module):
    """DiT's embedding of the integer time floor(1000 t): sinusoid then a two-layer MLP."""

    def __init__(self, width: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_int = (t * 1000).long().float()  # the published net sees integer steps 0..999
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) *
                          torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t_int[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.freq_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))

