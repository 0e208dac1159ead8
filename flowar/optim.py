"""The published optimisation recipe in plain PyTorch: LR rule and schedule, EMA, clipping.

FlowAR (docs/stack-facts.md, "The published training recipe") trains with AdamW (0.9, 0.95), weight decay 0.02 on every matrix
(biases and 1-D norm weights are not decayed; embeddings and the flow net *are*), lr = base_lr x
global_batch / 256, a linear warm-up from 0 followed by a cosine decay to a floor, an EMA of the
weights at 0.9999 updated every step from step 0, and global-norm clipping at 3.0. The weight
decay groups are timm's `timm.optim.param_groups_weight_decay`, whose rule is the published one
(misc.add_weight_decay: 1-D tensors and biases skip decay).

Nothing here knows about distribution: the same functions work on plain, DDP-wrapped and FSDP2
(DTensor) parameters, which is what the Ray training loop needs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["scaled_lr", "lr_at", "EMA", "clip_grad_norm"]


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule of the published code: lr = base_lr * global_batch / 256."""
    return base_lr * global_batch / 256


def lr_at(step: int, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """Linear warm-up from 0 to peak_lr over warmup_steps, then cosine from peak_lr to min_lr.

    `step` counts optimizer steps from 0; the LR of step s is used for that step's update, so
    step 0 of a warm-up trains at 0 exactly as the published per-iteration schedule does."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    floor = min(min_lr, peak_lr)  # a floor above the peak would make "decay" climb
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a module's parameters, kept as detached copies.

    Works on sharded (DTensor) parameters too: each rank averages its own shard, so FSDP's memory
    saving is kept. `state_dict` uses the module's parameter names."""

    def __init__(self, module: nn.Module, decay: float = 0.9999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay {decay} must be in [0, 1)")
        self.decay = decay
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = dict(module.named_parameters())
        names = list(self.shadow)
        shadows = [self.shadow[n] for n in names]
        current = [params[n].detach() for n in names]
        # lerp_(p, 1 - decay) == decay * ema + (1 - decay) * p, in one fused pass.
        if shadows and all(type(s) is torch.Tensor for s in shadows):
            torch._foreach_lerp_(shadows, current, 1.0 - self.decay)
        else:  # DTensors: per tensor, dispatch handles the shard
            for s, p in zip(shadows, current):
                s.lerp_(p, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = sorted(set(self.shadow) - set(state))
        unexpected = sorted(set(state) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                target = self.shadow[name]
                if target.shape != value.shape:
                    raise ValueError(f"EMA state {name}: shape {tuple(value.shape)} does not "
                                     f"match the model's {tuple(target.shape)}")
                target.copy_(value)

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        """Write the averaged weights into `module` (same names, same sharding)."""
        params = dict(module.named_parameters())
        for name, value in self.shadow.items():
            params[name].copy_(value)


def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float) -> float:
    """Global-norm clipping that returns the pre-clip norm as a float, for plain or DTensor grads.

    max_norm <= 0 only measures the norm (useful for logging without clipping)."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"),
                                          foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2: the total norm is a DTensor over the mesh
        norm = norm.full_tensor()
    return float(norm)
