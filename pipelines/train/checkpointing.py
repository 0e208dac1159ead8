"""Training checkpoints: everything needed to resume exactly, in safetensors + JSON, or PyTorch DCP.

Layout of one checkpoint directory (what a worker hands to `ray.train.report`):

    state.json              step, epoch position, strategy, world size, seeds   (rank 0)
    DDP:  model.safetensors, ema.safetensors, optimizer.safetensors + optimizer.json (rank 0)
    FSDP: .metadata, __<rank>_0.distcp  (torch.distributed.checkpoint; every rank writes its
          shards to its own directory and Ray merges the directories into one checkpoint)

Both use the optimizer's *named* (FQN-keyed) state dict, so a checkpoint does not depend on the
order of parameters; DCP additionally reshards, so an FSDP checkpoint loads at another worker
count. RNG state is not stored because the loop reseeds from (seed, rank, step) every step: that
is what makes a resumed run equal an uninterrupted one, at any restart point.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_state_dict)

from flowar import FlowAR
from flowar.config import FlowARConfig
from pipelines.core.storage import is_uri, upload_dir
from pipelines.train.config import TrainModelConfig

__all__ = ["save_checkpoint", "load_checkpoint", "read_state", "export_ema", "full_ema_state",
           "copy_dir"]

STATE_FILE = "state.json"


def _options(full: bool) -> StateDictOptions:
    return StateDictOptions(full_state_dict=full, cpu_offload=full)


def _flatten_optimizer(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, plain_state = {}, {}
    for fqn, entry in osd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}::{key}"] = value.detach().cpu().contiguous()
            else:
                plain_state.setdefault(fqn, {})[key] = value
    return tensors, {"param_groups": osd["param_groups"], "plain_state": plain_state}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict[str, dict] = {k: dict(v) for k, v in info["plain_state"].items()}
    for name, value in tensors.items():
        fqn, key = name.rsplit("::", 1)
        state.setdefault(fqn, {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


def save_checkpoint(directory: str | Path, *, strategy: str, model, optimizer, ema, state: dict,
                    rank: int) -> None:
    """Collective for FSDP (every rank calls it); for DDP only rank 0 writes weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if strategy == "fsdp":
        msd, osd = get_state_dict(model, optimizer, options=_options(full=False))
        dcp.save({"model": msd, "optim": osd, "ema": ema.state_dict()}, checkpoint_id=str(directory))
    elif rank == 0:
        msd, osd = get_state_dict(model, optimizer, options=_options(full=True))
        save_file({k: v.contiguous() for k, v in msd.items()}, directory / "model.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()},
                  directory / "ema.safetensors")
        tensors, info = _flatten_optimizer(osd)
        save_file(tensors, directory / "optimizer.safetensors")
        (directory / "optimizer.json").write_text(json.dumps(info))
    if rank == 0:
        (directory / STATE_FILE).write_text(json.dumps({**state, "strategy": strategy}, indent=1))


def read_state(directory: str | Path) -> dict:
    return json.loads((Path(directory) / STATE_FILE).read_text())


def load_checkpoint(directory: str | Path, *, strategy: str, model, optimizer, ema) -> dict:
    """Restore model, optimizer and EMA in place (every rank calls it); returns state.json."""
    directory = Path(directory)
    state = read_state(directory)
    if state.get("strategy") != strategy:
        raise ValueError(f"checkpoint {directory} was written with train.strategy="
                         f"{state.get('strategy')}; this run uses {strategy}. Resume with the "
                         "same strategy (or start a new run name)")
    if strategy == "fsdp":
        msd, osd = get_state_dict(model, optimizer, options=_options(full=False))
        target = {"model": msd, "optim": osd, "ema": ema.state_dict()}
        dcp.load(target, checkpoint_id=str(directory))  # reshards to this world size
        set_state_dict(model, optimizer, model_state_dict=target["model"],
                       optim_state_dict=target["optim"], options=_options(full=False))
        ema.load_state_dict(target["ema"])
    else:
        msd = load_file(directory / "model.safetensors")
        osd = _unflatten_optimizer(load_file(directory / "optimizer.safetensors"),
                                   json.loads((directory / "optimizer.json").read_text()))
        device = next(model.parameters()).device
        set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd,
                       options=_options(full=True))
        ema.load_state_dict({k: v.to(device) for k, v in load_file(directory / "ema.safetensors").items()})
    return state


def full_ema_state(ema) -> dict[str, torch.Tensor]:
    """The EMA weights as full CPU tensors (collective under FSDP: every rank must call it)."""
    out = {}
    for name, value in ema.state_dict().items():
        if hasattr(value, "full_tensor"):
            value = value.full_tensor()
        out[name] = value.detach().cpu()
    return out


def model_buffers(model, ema_full: dict) -> dict[str, torch.Tensor]:
    """Everything in the model's state dict that the EMA does not hold (its buffers), on the
    CPU: with the EMA weights, a complete state dict of the averaged model."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in ema_full}


def export_ema(model_config: FlowARConfig, ema_full: dict[str, torch.Tensor], out_dir: str | Path,
               meta: dict, extra_state: dict[str, torch.Tensor] | None = None,
               info: dict | None = None) -> FlowAR:
    """Write the EMA weights as a `FlowAR.from_pretrained` directory plus latents.json and the
    model card README.md (flowar/hub.py), ready for `flowar.hub.push_export`.

    latents.json is a copy of the dataset metadata, so later stages (sampling, evaluation) know
    which VAE and normalisation decode this model's latents. `extra_state`: the trained model's
    buffers (everything in its state dict that is not an EMA'd parameter); `info` goes into
    config.json under "training" (the card lists it: MLflow run id, step, dataset). A training
    job's model section is exported as its architecture alone: how it was trained
    (model.grad_checkpointing) is not the model's config."""
    if isinstance(model_config, TrainModelConfig):
        model_config = model_config.architecture()
    model = FlowAR(model_config)
    state = model.state_dict()
    state.update(extra_state or {})
    missing = sorted(set(ema_full) - set(state))
    if missing:
        raise KeyError(f"EMA holds parameters the model does not have: {missing[:5]}")
    state.update(ema_full)
    model.load_state_dict(state)
    model.save_pretrained(Path(out_dir), extra={"training": info or {}}, latents=meta)
    return model


def copy_dir(local: str | Path, target: str) -> None:
    """Copy a finished local folder to `target`, a local path or a storage URI."""
    if is_uri(target):
        upload_dir(local, target)
        return
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(local, target, dirs_exist_ok=True)
