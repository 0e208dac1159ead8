"""How every training worker wraps the model (torchtitan's "parallelize" step), in this order:
activation checkpointing, then DDP or FSDP2, then torch.compile.

The unit of both activation checkpointing and FSDP2 sharding is the transformer block: the classes
in `BLOCKS`, named here rather than found by their names, so a new block class is a decision
made in this file. None of it changes a parameter's name: the EMA, the optimizer's named state,
checkpoints and exports read the same names with any of these switched on or off.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

from flowar.ar import ARBlock
from flowar.flownet import AdaLNBlock, CrossAttentionBlock

__all__ = ["BLOCKS", "LossModule", "transformer_blocks", "apply_activation_checkpointing",
           "apply_fsdp", "apply_ddp", "parallelize", "grad_sync"]

# The transformer blocks of the AR transformer (flowar/ar.py) and the flow net (flowar/flownet.py).
BLOCKS = (ARBlock, AdaLNBlock, CrossAttentionBlock)


class LossModule(nn.Module):
    """forward = FlowAR.loss, so DDP's and FSDP's forward hooks run around the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, latents, labels, scale_targets=None):
        total, per_scale = self.model.loss(latents, labels, scale_targets=scale_targets)
        return total, torch.stack([p.float() for p in per_scale])


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, BLOCKS)]


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every block's activations in backward instead of keeping them (memory for
    compute; model.grad_checkpointing). Wraps each block's forward in place, so the module tree
    and parameter names stay as they are; returns the number of blocks."""
    blocks = transformer_blocks(model)
    for block in blocks:
        block.forward = _checkpointed(block, block.forward)
    return len(blocks)


def _checkpointed(block: nn.Module, forward: Callable) -> Callable:
    @functools.wraps(forward)
    def run(*args, **kwargs):
        # Only a training forward that builds a graph keeps activations worth dropping;
        # generation (no_grad, KV cache) runs the block as it is.
        if block.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)
    return run


def apply_fsdp(wrapper: nn.Module, device: torch.device, world: int, bf16: bool) -> int:
    """FSDP2: fully_shard every transformer block, then the root (the rest of the parameters);
    returns the number of blocks. bf16 keeps bf16 parameters for compute, fp32 gradients."""
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    blocks = transformer_blocks(wrapper)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(wrapper, mesh=mesh, mp_policy=mp)
    return len(blocks)


def apply_ddp(wrapper: nn.Module, device: torch.device) -> nn.Module:
    # find_unused_parameters=False (the default, as Ray Train's prepare_model): every parameter
    # must get a gradient every step, which tests/test_parallel_ablations.py checks per ablation.
    return nn.parallel.DistributedDataParallel(
        wrapper, device_ids=[device.index] if device.type == "cuda" else None)


def parallelize(model: nn.Module, device: torch.device, world: int, *, strategy: str = "ddp",
                bf16: bool = False, compile: bool = False,
                grad_checkpointing: bool = False) -> tuple[nn.Module, Callable]:
    """Wrap `model` (a FlowAR on `device`, the same initial weights on every rank) for training.

    Returns (the wrapped LossModule, whose gradient sync `grad_sync` switches; what a
    micro-batch calls: the same module, or its torch.compile). The optimizer, EMA and clipping
    keep working on `model` itself: FSDP2 shards its parameters in place, DDP shares them."""
    if grad_checkpointing:
        apply_activation_checkpointing(model)
    wrapper = LossModule(model)
    if strategy == "fsdp":
        apply_fsdp(wrapper, device, world, bf16)
    else:
        wrapper = apply_ddp(wrapper, device)
    return wrapper, torch.compile(wrapper) if compile else wrapper


def grad_sync(wrapped: nn.Module, strategy: str, sync: bool):
    """The context of one micro-batch's forward: gradients are reduced across ranks only when
    `sync` (the last micro-batch of a step). DDP decides at forward time (no_sync); FSDP2 keeps
    the setting until it is changed, so it is set here for the micro-batch's backward too."""
    if strategy == "fsdp":
        wrapped.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else wrapped.no_sync()
