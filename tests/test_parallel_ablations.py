"""Every ablation switch through the real distributed training step: DDP and FSDP2 over gloo.

tests/test_ablations.py trains each switch unwrapped in one process, which cannot see what only a
distributed wrapper checks: DDP (find_unused_parameters=False, as Ray Train's prepare_model uses)
fails when a parameter gets no gradient, and FSDP2 silently leaves such a parameter's gradient None.
Here each switch runs 2 optimizer steps through `pipelines.train.parallelize.parallelize` (the
LossModule under DDP or FSDP2), as `flowar train` does, at world sizes 1 and 2. Each world size is one
spawned process group that loops over every (strategy, switch) case and writes its per-case
results to a JSON file per rank; the tests below read those files, one test per case.
"""

from __future__ import annotations

import json
import math
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from flowar.config import INJECTIONS

BASE = dict(latent_channels=4, scales=(1, 2, 4), num_classes=10)
STEPS, BATCH = 2, 2  # optimizer steps per case, latents per rank and step
STRATEGIES = ("ddp", "fsdp")
WORLDS = (1, 2)

CASES = {f"injection={i}": dict(injection=i) for i in INJECTIONS}
CASES.update({f"head=per_token-injection={i}": dict(head="per_token", injection=i)
              for i in ("spatial_adaln", "adaln", "addition", "channel_concat")})
CASES.update({
    "objective=diffusion": dict(objective="diffusion"),
    "scale_construction=image": dict(scale_construction="image"),
    "scales=1-4": dict(scales=(1, 4)),
    "scales=1-2-3-4": dict(scales=(1, 2, 3, 4)),
    "scale_input=upsample2x": dict(scale_input="upsample2x"),
    "init=zero": dict(init="zero"),
    "time_sampling=logit_normal": dict(time_sampling="logit_normal"),
    "loss_weighting=equal": dict(loss_weighting="equal"),
    "dropouts": dict(attn_dropout=0.2, proj_dropout=0.2, label_drop=0.3),
    "grad_checkpointing": dict(grad_checkpointing=True),
})
TRAINING_OPTIONS = ("grad_checkpointing",)  # how the model is trained: parallelize's, not FlowAR's


# ------------------------------------------------------------------ inside the spawned workers

def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: the shard of an FSDP2 DTensor, else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _batch(config, rank: int, step: int):
    """Different data on every rank and step, so DDP's gradient averaging has work to do."""
    g = torch.Generator().manual_seed(100 * rank + step)
    side, c = config.latent_size, config.latent_channels
    latents = torch.randn(BATCH, c, side, side, generator=g)
    labels = torch.randint(0, config.num_classes, (BATCH,), generator=g)
    targets = None
    if config.scale_construction == "image":  # stand-ins for the image-derived maps of each scale
        targets = [torch.randn(BATCH, c, s, s, generator=g) for s in config.scales[:-1]] + [latents]
    return latents, labels, targets


def _train_case(strategy: str, overrides: dict, rank: int, world: int) -> dict:
    import torch.distributed as dist

    from flowar import FlowAR
    from pipelines.train.parallelize import parallelize

    torch.manual_seed(0)  # the same init on every rank, as pipelines/train/loop.py does
    training = {k: v for k, v in overrides.items() if k in TRAINING_OPTIONS}
    model_overrides = {k: v for k, v in overrides.items() if k not in TRAINING_OPTIONS}
    model = FlowAR.from_preset("tiny", **{**BASE, **model_overrides}).train()
    # DDP with find_unused_parameters=False, or FSDP2 per block, as the training job wraps it
    _, step_fn = parallelize(model, torch.device("cpu"), world, strategy=strategy, **training)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [_local(p).detach().clone() for p in model.parameters()]
    losses, no_grad, bad_grad = [], set(), set()
    for step in range(STEPS):
        torch.manual_seed(1000 * rank + step)  # label drop, t and noise, as pipelines/train/loop.py reseeds
        total, per_scale = step_fn(*_batch(model.config, rank, step))
        total.backward()
        for name, p in model.named_parameters():
            if p.grad is None:
                no_grad.add(name)
            elif not torch.isfinite(_local(p.grad)).all():
                bad_grad.add(name)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append([total.item(), *per_scale.tolist()])
    changed = sum(not torch.equal(b, _local(p)) for b, p in zip(before, model.parameters()))
    result = dict(error=None, losses=losses, no_grad=sorted(no_grad), bad_grad=sorted(bad_grad),
                  changed=changed, diff_to_rank0=None)
    if strategy == "ddp":  # DDP's contract: every replica holds the same weights after a step
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        result["diff_to_rank0"] = (flat - gathered[0]).abs().max().item()
    return result


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)  # 2 ranks on 2 cores
    # The timeout turns a collective one rank left behind into an error instead of a hang.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    results, out = {}, Path(out_dir) / f"rank{rank}.json"
    for strategy in STRATEGIES:
        for name, overrides in CASES.items():
            try:
                results[f"{strategy}/{name}"] = _train_case(strategy, overrides, rank, world)
            except Exception:
                results[f"{strategy}/{name}"] = dict(error=traceback.format_exc()[-3000:])
            out.write_text(json.dumps(results))  # after every case: a crash keeps what ran
    dist.destroy_process_group()


# ------------------------------------------------------------------ the tests

@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """results[world] = one dict of case results per rank; each group is spawned on first use."""
    import torch.multiprocessing as mp

    cache = {}

    def get(world: int) -> list[dict]:
        if world not in cache:
            tmp = tmp_path_factory.mktemp(f"world{world}")
            failure = ""
            try:
                mp.spawn(_worker, args=(world, str(tmp / "store"), str(tmp)), nprocs=world)
            except Exception as e:  # a rank died outside a case; its finished cases still count
                failure = f"process group failed: {e}"
            files = [tmp / f"rank{r}.json" for r in range(world)]
            cache[world] = [json.loads(f.read_text()) if f.exists() else {} for f in files], failure
        return cache[world]
    return get


@pytest.mark.parametrize("world", WORLDS, ids=lambda w: f"world{w}")
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", list(CASES))
def test_switch_trains_under_distributed_wrapper(group_results, case, strategy, world):
    per_rank, failure = group_results(world)
    for rank, results in enumerate(per_rank):
        r = results.get(f"{strategy}/{case}")
        if r is None:
            pytest.fail(f"rank {rank} has no result for {strategy}/{case}; {failure}")
        if r["error"] is not None:
            pytest.fail(f"{strategy}/{case}, rank {rank} of {world}:\n{r['error']}")
        assert not r["no_grad"], f"rank {rank}: parameters without a gradient: {r['no_grad']}"
        assert not r["bad_grad"], f"rank {rank}: non-finite gradients: {r['bad_grad']}"
        assert all(math.isfinite(v) for step in r["losses"] for v in step), r["losses"]
        assert r["changed"] > 0, f"rank {rank}: no weight changed in {STEPS} steps"
        if strategy == "ddp":
            assert r["diff_to_rank0"] == 0.0, f"rank {rank} drifted from rank 0 by {r['diff_to_rank0']}"


def test_a_scale_sequence_without_the_class_token_scale_is_refused_when_read():
    """The AR sequence opens with the class token as the 1x1 scale's input; (2, 4) used to pass
    the config and then crash the first step on a RoPE shape mismatch."""
    from flowar.config import ConfigError, preset_config

    with pytest.raises(ConfigError, match="first scale must be 1"):
        preset_config("tiny", **{**BASE, "scales": (2, 4)})
