"""Building blocks shared by the autoregressive transformer and the flow net.

Numerics follow the published FlowAR code so its checkpoints load: RMSNorm in float32 with eps
1e-6, EVA-style axial 2D RoPE with interleaved pairs, DiT's sinusoidal timestep embedding on
floor(1000 t), and a SwiGLU MLP with a GELU gate (a GEGLU), which is what the published
"SwiGLU" (timm's) really computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, affine: bool = False, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 whatever the autocast dtype: bf16 mean-of-squares loses too much.
        # x * rsqrt(mean(x^2) + eps), torch's fused kernel.
        out = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)
        return out * self.weight if self.weight is not None else out


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout's Bernoulli(1 - p) keep mask, of x's shape, from uniform 32-bit integers: P(keep)
    is 1 - p to within 2^-32, every element independent. On the CPU this draws a 64-bit word per
    two elements, about a third of the cost of the float bernoulli_ that F.dropout draws (which
    took 17% of a training step's time; benchmarks/RESULTS.md)."""
    n = x.numel()
    words = torch.empty((n + 1) // 2, dtype=torch.int64, device=x.device).random_(-2 ** 63, None)
    threshold = round((1 - p) * 2 ** 32) - 2 ** 31  # int32 words are uniform on [-2^31, 2^31)
    return (words.view(torch.int32)[:n] < threshold).view(x.shape)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout (same p, same placement, same 1 / (1 - p) scaling) with keep_mask on the CPU.
    torch.where saves only the mask for backward (and is 5x faster than a product with it)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, training=True)  # CUDA's fused kernel draws its mask cheaply
    return torch.where(keep_mask(x, p), x, 0.0).mul_(1.0 / (1.0 - p))


def attention(q, k, v, mask: torch.Tensor | None, dropout_p: float) -> torch.Tensor:
    """scaled_dot_product_attention; `mask` True where a query may attend. With dropout on the
    CPU, torch's fused kernels do not apply and its math fallback draws a float mask over the
    whole attention matrix, so this spells the same computation out with keep_mask, and applies
    1 / (1 - p) to the (smaller) output instead of to the weights."""
    if dropout_p == 0.0 or q.device.type != "cpu" or dropout_p >= 1.0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))  # in place: the matmul's backward keeps q and k
    weights = scores.softmax(dim=-1)
    kept = torch.where(keep_mask(weights, dropout_p), weights, 0.0)
    return (kept @ v).mul_(1.0 / (1.0 - dropout_p))


# Hidden widths are padded to a multiple of this inside the MLP's matmuls (not in its weights),
# when the matmul has at least PAD_MIN_ROWS rows: below that the padding does not pay.
MATMUL_ALIGN, PAD_MIN_ROWS = 16, 2048


class GEGLU(nn.Module):
    """Gated MLP fc2(GELU(fc1_g(x)) * fc1_x(x)), the published model's "SwiGLU" (timm's module
    with a GELU gate; the same parameter names, so checkpoints load).

    The published hidden widths are not multiples of 16 (682 for width 256, 2730 for 1024), and
    MKL's fp32 GEMM on AVX-512 runs fc1 at such a width up to 1.8x slower once it has a few
    thousand rows (benchmarks/RESULTS.md, "against the published code"). So large matmuls run on
    weights padded with zero rows (fc1) and zero columns (fc2): the padded hidden units are
    GELU(0) * 0 = 0 and add exact zeros to fc2, so the output is the same up to float32
    rounding, and the padding gets no gradient. Without autograd the padded weights are kept
    until the weights change."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden)
        self.fc1_x = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = drop
        self.pad = -hidden % MATMUL_ALIGN
        self._padded_cache = None

    def weights(self, rows: int) -> tuple[torch.Tensor, ...]:
        """(fc1_g weight, bias, fc1_x weight, bias, fc2 weight), padded for a large matmul."""
        params = (self.fc1_g.weight, self.fc1_g.bias, self.fc1_x.weight, self.fc1_x.bias, self.fc2.weight)
        if not self.pad or rows < PAD_MIN_ROWS:
            return params
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return self._pad(params)
        key = tuple((p.data_ptr(), p._version) for p in params)
        if self._padded_cache is None or self._padded_cache[0] != key:
            self._padded_cache = (key, self._pad(params))
        return self._padded_cache[1]

    def _pad(self, params):
        wg, bg, wx, bx, w2 = params
        rows, bias = (0, 0, 0, self.pad), (0, self.pad)
        return F.pad(wg, rows), F.pad(bg, bias), F.pad(wx, rows), F.pad(bx, bias), F.pad(w2, (0, self.pad))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wg, bg, wx, bx, w2 = self.weights(x.numel() // x.shape[-1])
        hidden = dropout(F.gelu(F.linear(x, wg, bg)) * F.linear(x, wx, bx), self.drop, self.training)
        return dropout(F.linear(hidden, w2, self.fc2.bias), self.drop, self.training)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's modulation of a normalised x (DiT's `modulate`, x * (1 + scale) + shift), in every
    adaLN block; addcmul does the product and the sum in one pass."""
    return torch.addcmul(shift, x, 1 + scale)


def gated(x: torch.Tensor, gate: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """The gated residual x + gate * branch, in one pass."""
    return torch.addcmul(x, gate, branch)


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
        self._tables: dict[tuple, torch.Tensor] = {}

    def table(self, side: int, device: torch.device) -> torch.Tensor:
        """Unit complex rotations (side*side, head_dim // 2) for a side x side grid in raster
        order: one per interleaved channel pair, the first half of the pairs turning with the
        row, the second half with the column."""
        key = (side, str(device))
        if key not in self._tables:
            pos = torch.arange(side, dtype=torch.float32, device=device) / side * self.latent_size
            angles = torch.outer(pos, self.freqs.to(device))
            rows = angles[:, None, :].expand(side, side, -1)
            cols = angles[None, :, :].expand(side, side, -1)
            full = torch.cat([rows, cols], dim=-1).reshape(side * side, -1)
            self._tables[key] = torch.complex(full.cos(), full.sin())
        return self._tables[key]

    def tables(self, sides, device) -> torch.Tensor:
        """Tables for consecutive scale segments of one sequence, concatenated."""
        return torch.cat([self.table(s, device) for s in sides])


def apply_rope(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x (B, heads, N, head_dim), rotation (N, head_dim // 2) complex: each channel pair
    (x1, x2) becomes (x1 cos - x2 sin, x2 cos + x1 sin), the published x * cos +
    rotate_half(x) * sin, computed as one complex product instead of five passes."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


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
        self.attn_drop, self.proj_drop = attn_drop, proj_drop

    def forward(self, x, rope: torch.Tensor | None, mask=None,
                cache: KVCache | None = None, layer: int = 0):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is not None:
            # The queries are exactly the newest scale, which may see every cached (coarser)
            # scale and itself: the block-causal mask needs no explicit form here.
            k, v = cache.extend(layer, k, v)
        out = attention(q, k, v, mask, self.attn_drop if self.training else 0.0)
        out = self.proj(rearrange(out, "b h n d -> b n (h d)"))
        return dropout(out, self.proj_drop, self.training)


class CrossAttention(nn.Module):
    """Queries from the flow net's tokens, keys/values from the semantics of the same scale."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(context_dim, 2 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def keys_values(self, context, rope=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated) and values of the context: the same at every solver step of a scale."""
        k, v = rearrange(self.kv(context), "b n (two h d) -> two b h n d", two=2, h=self.heads)
        return (apply_rope(k, rope) if rope is not None else k), v

    def forward(self, x, keys_values: tuple[torch.Tensor, torch.Tensor], rope=None):
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.heads)
        if rope is not None:
            q = apply_rope(q, rope)
        out = F.scaled_dot_product_attention(q, *keys_values)
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

