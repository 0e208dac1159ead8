"""The flow-matching transformer: one network, shared by every scale, that predicts the velocity of
one scale's tokens from their noisy values, the time, and the AR transformer's semantics.

How the semantics enter is the paper's Table 6 ablation (`config.injection`):
- spatial_adaln (the paper's design, published S): per-token adaLN. Scale, shift and gate of every
  norm come from Linear(SiLU(semantics_i + t)) at position i.
- cross_attention_adaln (published L and H): t-only adaLN on self-attention, then an ungated
  cross-attention to the raw semantics, then per-token adaLN on the MLP.
- adaln: ordinary adaLN on the spatially averaged semantics (+ t): no positional control.
- addition: semantics added to the embedded input; blocks modulated by t only.
- cross_attention: tokens attend to the semantics; blocks modulated by t only.
- sequence_concat: semantics appended along the sequence; the output keeps the input positions.
- channel_concat: semantics concatenated to the input channels, then projected.
`config.head == "per_token"` drops the attention: a MAR-style per-token MLP head.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

import torch
from torch import nn

from .config import FlowARConfig
from .layers import (GEGLU, CrossAttention, RMSNorm, Rope2D, SelfAttention, TimestepEmbedder,
                     gated, modulate)

PER_TOKEN_CONDITION = ("spatial_adaln", "cross_attention_adaln")
# Injections that read the semantics at flow width through `semantics_proj`. cross_attention reads
# them raw (its key/value projection maps ar_width itself) and channel_concat through input_proj,
# so those two have no semantics_proj: a parameter that never gets a gradient makes DDP fail.
PROJECTED_SEMANTICS = ("spatial_adaln", "cross_attention_adaln", "adaln", "addition", "sequence_concat")


class AdaLNBlock(nn.Module):
    """Self-attention + GEGLU MLP, both under adaLN from `cond` ((B, N, W) per token or (B, 1, W))."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, attention: bool = True):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = SelfAttention(width, heads, qkv_bias=False) if attention else None
        self.norm2 = RMSNorm(width)
        self.mlp = GEGLU(width, mlp_hidden)
        self.ada_lin = nn.Linear(width, 6 * width)

    def forward(self, x, cond, semantics, rope):
        gate1, gate2, scale1, scale2, shift1, shift2 = self.ada_lin(nn.functional.silu(cond)).chunk(6, -1)
        if self.attn is not None:
            x = gated(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1), rope))
        return gated(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))


class CrossAttentionBlock(nn.Module):
    """t-adaLN self-attention, ungated cross-attention to the semantics, adaLN MLP (published L/H)."""

    def __init__(self, width: int, heads: int, mlp_hidden: int, semantics_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = SelfAttention(width, heads, qkv_bias=False)
        self.query_norm = RMSNorm(width, affine=True)
        self.semantics_norm = RMSNorm(semantics_dim, affine=True)
        self.cross_attn = CrossAttention(width, semantics_dim, heads)
        self.norm2 = RMSNorm(width)
        self.mlp = GEGLU(width, mlp_hidden)
        self.ada_lin_attn = nn.Linear(width, 3 * width)
        self.ada_lin_mlp = nn.Linear(width, 3 * width)

    def keys_values(self, semantics, rope):
        return self.cross_attn.keys_values(self.semantics_norm(semantics), rope)

    def forward(self, x, cond, context, rope, t_emb):
        """context: the scale's semantics, or their keys_values computed ahead (generation)."""
        keys_values = context if isinstance(context, tuple) else self.keys_values(context, rope)
        gate1, scale1, shift1 = self.ada_lin_attn(nn.functional.silu(t_emb)).chunk(3, -1)
        gate2, scale2, shift2 = self.ada_lin_mlp(nn.functional.silu(cond)).chunk(3, -1)
        x = gated(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1), rope))
        x = x + self.cross_attn(self.query_norm(x), keys_values, rope)
        return gated(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm = RMSNorm(width)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, out_channels)

    def forward(self, x, cond):
        shift, scale = self.ada_lin(cond).chunk(2, -1)  # published order: shift first
        return self.linear(modulate(self.norm(x), shift, scale))


@dataclass
class ScaleCondition:
    """What the flow net reads from one scale's semantics, apart from x_t and t: the raw semantics,
    their projection to flow width, and each cross-attention block's keys and values. They are
    the same at every solver step of the scale, so generation computes them once per scale (the
    published sampler recomputes them at every step)."""
    semantics: torch.Tensor
    projected: torch.Tensor | None
    keys_values: list[tuple[torch.Tensor, torch.Tensor]]

    def head(self, n: int) -> "ScaleCondition":
        """The first n samples' condition (each row is computed on its own, so this is exact)."""
        return ScaleCondition(self.semantics[:n], None if self.projected is None else self.projected[:n],
                              [(k[:n], v[:n]) for k, v in self.keys_values])


class FlowNet(nn.Module):
    def __init__(self, cfg: FlowARConfig):
        super().__init__()
        self.cfg = cfg
        W, C, d = cfg.flow_width, cfg.latent_channels, cfg.ar_width
        heads, hidden = W // cfg.flow_head_dim, int(W * cfg.flow_mlp_ratio)
        self.injection = cfg.injection
        self.time_embed = TimestepEmbedder(W, cfg.time_freq_dim)
        self.semantics_proj = nn.Linear(d, W) if cfg.injection in PROJECTED_SEMANTICS else None
        self.input_proj = nn.Linear(C + d if cfg.injection == "channel_concat" else C, W)
        attention = cfg.head == "per_scale"
        if cfg.injection in ("cross_attention_adaln", "cross_attention"):
            self.blocks = nn.ModuleList(CrossAttentionBlock(W, heads, hidden, d)
                                        for _ in range(cfg.flow_depth))
        else:
            self.blocks = nn.ModuleList(AdaLNBlock(W, heads, hidden, attention)
                                        for _ in range(cfg.flow_depth))
        self.final_layer = FinalLayer(W, C)
        self.rope = Rope2D(cfg.flow_head_dim, cfg.latent_size)

    def condition(self, semantics: torch.Tensor, keys_values: bool = True) -> ScaleCondition:
        """semantics (B, N, ar_width) of one scale -> what every step of that scale reads
        (keys_values=False: without the cross-attention blocks' keys and values)."""
        rope = self.rope.table(int(round(semantics.shape[1] ** 0.5)), semantics.device)
        projected = self.semantics_proj(semantics) if self.semantics_proj is not None else None
        kv = [blk.keys_values(semantics, rope) for blk in self.blocks
              if isinstance(blk, CrossAttentionBlock)] if keys_values else []
        return ScaleCondition(semantics, projected, kv)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor,
                semantics: torch.Tensor | ScaleCondition) -> torch.Tensor:
        """x_t (B, N, C) one scale's noisy tokens, t (B,), semantics (B, N, ar_width) or their
        ScaleCondition -> (B, N, C)."""
        n = x_t.shape[1]
        side = int(round(n ** 0.5))
        t_emb = self.time_embed(t)[:, None]
        if isinstance(semantics, ScaleCondition):
            given, contexts = semantics, iter(semantics.keys_values)
        else:
            # Each cross-attention block projects the semantics in its own forward, where FSDP
            # has gathered the block's weights and activation checkpointing covers it.
            given, contexts = self.condition(semantics, keys_values=False), repeat(semantics)
        semantics, sem = given.semantics, given.projected
        mode = self.injection
        if mode == "channel_concat":
            x = self.input_proj(torch.cat([x_t, semantics], dim=-1))
        else:
            x = self.input_proj(x_t)
        if mode == "addition":
            x = x + sem
        rope = self.rope.table(side, x.device)
        if mode == "sequence_concat":
            x = torch.cat([x, sem], dim=1)  # semantics token i sits at the same position as input i
            rope = torch.cat([rope, rope])

        if mode in PER_TOKEN_CONDITION:
            cond = sem + t_emb
        elif mode == "adaln":
            cond = sem.mean(dim=1, keepdim=True) + t_emb
        else:
            cond = t_emb

        for blk in self.blocks:
            if isinstance(blk, CrossAttentionBlock):
                x = blk(x, cond, next(contexts), rope, t_emb)
            else:
                x = blk(x, cond, semantics, rope)
        return self.final_layer(x, cond)[:, :n]
