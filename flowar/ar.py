"""The scale-wise autoregressive transformer: class and coarser scales in, per-token semantics out.

Sequence: [class token] + projected inputs of scales 2..K (each built from the scale before it).
Attention is block-causal: a token sees its own scale and every coarser one. Each block is an
adaLN block conditioned on the class embedding (the same embedding that forms the first token).
The stack is split in two halves with a learned position table before each and a third after
the last norm, exactly as the published model (its "encoder" and "decoder" halves are both
causal, so together they are one deep causal transformer). The output is the semantics ŝ: one
vector per token, read by the flow net of that token's scale.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import FlowARConfig
from .layers import GEGLU, KVCache, RMSNorm, Rope2D, SelfAttention, gated, modulate
from .pyramid import segments


class ARBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, attn_drop: float, proj_drop: float):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = SelfAttention(width, heads, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = RMSNorm(width)
        self.mlp = GEGLU(width, int(width * mlp_ratio * 2 / 3), drop=proj_drop)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x, cond, rope, mask=None, cache: KVCache | None = None, layer: int = 0):
        # Published order of the six modulation vectors: gates, scales, shifts.
        gate1, gate2, scale1, scale2, shift1, shift2 = self.ada_lin(cond)[:, None].chunk(6, dim=-1)
        x = gated(x, gate1, self.attn(modulate(self.norm1(x), shift1, scale1), rope, mask, cache, layer))
        return gated(x, gate2, self.mlp(modulate(self.norm2(x), shift2, scale2)))


class ScaleAR(nn.Module):
    def __init__(self, cfg: FlowARConfig):
        super().__init__()
        self.cfg = cfg
        d, n_tokens = cfg.ar_width, cfg.num_tokens
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d)  # index num_classes: null class
        self.input_proj = nn.Linear(cfg.latent_channels, d)
        self.input_norm = RMSNorm(d, affine=True)
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, d))
        half = cfg.ar_depth // 2
        block = lambda: ARBlock(d, cfg.ar_heads, cfg.ar_mlp_ratio, cfg.attn_dropout, cfg.proj_dropout)
        self.first_half = nn.ModuleList(block() for _ in range(half))
        self.first_norm = RMSNorm(d, affine=True)
        self.bridge = nn.Linear(d, d)
        self.second_pos_embed = nn.Parameter(torch.zeros(1, n_tokens, d))
        self.second_half = nn.ModuleList(block() for _ in range(cfg.ar_depth - half))
        self.second_norm = RMSNorm(d, affine=True)
        self.semantics_pos_embed = nn.Parameter(torch.zeros(1, n_tokens, d))
        self.rope = Rope2D(d // cfg.ar_heads, cfg.latent_size)

        # scale index of every token; a query may attend to keys of its own or a coarser scale
        scale_of = torch.cat([torch.full((s * s,), k) for k, s in enumerate(cfg.scales)])
        self.register_buffer("attend", scale_of[:, None] >= scale_of[None, :], persistent=False)

    @property
    def blocks(self) -> list[ARBlock]:
        return [*self.first_half, *self.second_half]

    def _run(self, x, cond, rope, mask, cache, start: int, end: int):
        x = self.input_norm(x + self.pos_embed[:, start:end])
        for i, blk in enumerate(self.first_half):
            x = blk(x, cond, rope, mask, cache=cache, layer=i)
        x = self.bridge(self.first_norm(x)) + self.second_pos_embed[:, start:end]
        offset = len(self.first_half)
        for i, blk in enumerate(self.second_half):
            x = blk(x, cond, rope, mask, cache=cache, layer=offset + i)
        return self.second_norm(x) + self.semantics_pos_embed[:, start:end]

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced semantics of every scale.

        inputs: (B, L - 1, C) AR inputs of scales 2..K; labels: (B,) with num_classes = null.
        Returns (B, L, ar_width)."""
        cond = self.class_embed(labels)
        x = torch.cat([cond[:, None], self.input_proj(inputs)], dim=1)
        rope = self.rope.tables(self.cfg.scales, x.device)
        return self._run(x, cond, rope, self.attend, None, 0, x.shape[1])

    def step(self, inputs: torch.Tensor | None, labels: torch.Tensor, k: int,
             cache: KVCache) -> torch.Tensor:
        """Semantics of scale k only, reusing the cached keys/values of scales < k.

        inputs: None for k = 0 (the class token is the input), else (B, s_k^2, C)."""
        cond = self.class_embed(labels)
        x = cond[:, None] if k == 0 else self.input_proj(inputs)
        start, end = segments(self.cfg.scales)[k]
        rope = self.rope.table(self.cfg.scales[k], x.device)
        return self._run(x, cond, rope, None, cache, start, end)
