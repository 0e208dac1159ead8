"""The per-worker training function of `flowar train` (runs inside Ray Train workers).

One optimizer step: `grad_accum_steps` micro-batches (gradient sync only on the last), a global
all-reduce of the losses (which also makes every rank see a NaN/inf at once, so all stop
together), clipping, AdamW, EMA. Every `checkpoint_every` steps all ranks call
`ray.train.report` with a checkpoint (the report is a barrier); rank 0 alone logs to MLflow.

Determinism: the global torch RNG is reseeded from (seed, rank, step) before every step, and the
data order is a pure function of (seed, epoch, step, rank) (pipelines/train/data.py), so resuming from any
checkpoint replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

__all__ = ["train_loop_per_worker", "LossModule", "shard_model", "non_finite_message"]


class LossModule(nn.Module):
    """forward = FlowAR.loss, so DDP's and FSDP's forward hooks run around the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, latents, labels, scale_targets=None):
        total, per_scale = self.model.loss(latents, labels, scale_targets=scale_targets)
        return total, torch.stack([p.float() for p in per_scale])


def shard_model(wrapper: nn.Module, device: torch.device, world: int, bf16: bool) -> int:
    """FSDP2: fully_shard every transformer block (class name ending in "Block"), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    blocks = [m for m in wrapper.modules() if type(m).__name__.endswith("Block")]
    for block in reversed(blocks):  # innermost first when blocks nest
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(wrapper, mesh=mesh, mp_policy=mp)
    return len(blocks)


def non_finite_message(stats: torch.Tensor, grad_norm: float, step: int) -> str:
    """The reason to stop when the (globally reduced) losses or the grad norm are NaN/inf, else ""."""
    if torch.isfinite(stats).all() and torch.isfinite(torch.tensor(grad_norm)):
        return ""
    return (f"non-finite training at step {step}: loss {stats[0].item():.4g}, grad norm "
            f"{grad_norm:.4g}, per scale {[round(v, 4) for v in stats[1:].tolist()]}. Stopped "
            "instead of training on garbage; lower train.base_lr, keep train.precision=fp32, or "
            "resume from an earlier checkpoint.")


def _inject_fault(fault: dict, rank: int, world: int, step: int, run_dir: str = "") -> None:
    """Test hook: once (marker file), kill or fail one worker at a step to exercise recovery.

    `after_checkpoint`: first wait until Ray's controller has registered the checkpoint of that
    step (its checkpoint manager snapshot in the run directory says so), so that the recovery
    under test starts from it on a loaded machine as on an idle one."""
    if not fault or step != fault["step"] or rank != fault.get("rank", world - 1):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    if fault.get("after_checkpoint"):
        _wait_for_registered_checkpoint(run_dir, int(fault["after_checkpoint"]))
    marker.write_text(f"fault injected at step {step}\n")
    if fault.get("mode", "kill") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at step {step}")


def _wait_for_registered_checkpoint(run_dir: str, step: int, limit_s: float = 600.0) -> None:
    """Block until the latest checkpoint in Ray Train's snapshot of `run_dir` is of `step`."""
    import json

    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"  # Ray Train V2's own file
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            if (latest.get("metrics") or {}).get("step", -1) >= step:
                return
        except (OSError, ValueError):
            pass  # not written yet, or caught mid-write
        time.sleep(0.2)
    raise RuntimeError(f"fault hook: Ray never registered the step-{step} checkpoint in {snapshot}")


def train_loop_per_worker(config: dict) -> None:
    import ray.data
    import ray.train
    import torch.distributed as dist

    from flowar import FlowAR
    from flowar.config import from_dict
    from timm.optim import param_groups_weight_decay

    from flowar.optim import EMA, clip_grad_norm, lr_at, scaled_lr
    from pipelines.core import tracking
    from pipelines.train.checkpointing import export_ema, full_ema_state, load_checkpoint, save_checkpoint
    from pipelines.data.latents import LatentDataset
    from pipelines.train.job import TrainJobConfig
    from pipelines.train.data import BatchSource, load_shard, seed_of
    from pipelines.train.samples import SampleGrid

    t_start = time.perf_counter()
    job = from_dict(TrainJobConfig, config["job"])
    tc = job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != tc.num_workers:
        raise RuntimeError(f"Ray started {world} workers, the config asks for {tc.num_workers}")
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tc.tf32
        torch.backends.cudnn.allow_tf32 = tc.tf32

    # Same init on every rank (FSDP2 shards each rank's local copy; DDP would broadcast anyway).
    torch.manual_seed(seed_of("init", tc.seed))
    inner = FlowAR(job.model).to(device)
    wrapper = LossModule(inner)
    if tc.strategy == "fsdp":
        shard_model(wrapper, device, world, tc.precision == "bf16")
        model = wrapper
    else:
        model = nn.parallel.DistributedDataParallel(
            wrapper, device_ids=[device.index] if device.type == "cuda" else None)
    step_fn = torch.compile(model) if tc.compile else model
    ema = EMA(inner, tc.ema_decay)
    peak_lr = scaled_lr(tc.base_lr, tc.global_batch_size)
    # The published groups (misc.add_weight_decay): matrices decay, 1-D tensors and biases do not.
    optimizer = torch.optim.AdamW(param_groups_weight_decay(inner, tc.weight_decay), lr=peak_lr,
                                  betas=tuple(tc.betas))

    meta = LatentDataset(job.data.path).meta
    ray.data.DataContext.get_current().enable_progress_bars = False  # one read, no bar spam
    # Table 3's image scale construction: the coarser scales come from their own dataset columns.
    image_scales = job.model.scales[:-1] if job.model.scale_construction == "image" else ()
    shard = load_shard(ray.train.get_dataset_shard("train").iter_batches(
        batch_size=1024, batch_format="numpy"), rank, world, image_scales)
    source = BatchSource(shard, meta, seed=tc.seed, rank=rank, micro_batch=tc.micro_batch,
                         accum=tc.grad_accum_steps, flip_augment=job.data.flip_augment,
                         image_scales=image_scales)
    t_data = time.perf_counter()
    total_steps = tc.max_steps or tc.epochs * source.steps_per_epoch
    warmup = tc.warmup_steps if tc.warmup_steps >= 0 else round(tc.warmup_epochs * source.steps_per_epoch)

    start_step, best_loss = 0, float("inf")
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_checkpoint(d, strategy=tc.strategy, model=inner, optimizer=optimizer, ema=ema)
        start_step, best_loss = state["step"], state.get("best_loss", float("inf"))

    mlf = tracking.client(config["tracking_uri"]) if rank == 0 else None
    run_id, run_dir = config["run_id"], config["run_dir"]
    if mlf is not None:
        tracking.log_metrics(mlf, run_id, {"resumed_from_step": start_step,
                                               "steps_per_epoch": source.steps_per_epoch,
                                               "total_steps": total_steps}, step=start_step)
    grid = SampleGrid(job, meta, config["meta"], device) if rank == 0 else None
    scale_names = [f"loss_scale{s}" for s in job.model.scales]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    window = {"sum": torch.zeros(1 + len(job.model.scales), dtype=torch.float64), "steps": 0,
              "gn": 0.0, "t0": time.perf_counter(), "ckpt_sum": 0.0, "ckpt_steps": 0}

    def ema_export(out_dir: str, step: int, artifact_path: str = "") -> None:
        full = full_ema_state(ema)  # collective under FSDP
        if rank == 0:
            buffers = {k: v.detach().cpu() for k, v in inner.state_dict().items() if k not in full}
            info = {"run_dir": run_dir, "mlflow_run_id": run_id, "step": step,
                    "ema_decay": tc.ema_decay, "dataset": job.data.path}
            with tempfile.TemporaryDirectory() as tmp:
                export_ema(FlowAR, job.model, full, tmp, config["meta"], buffers, info)
                _write_dir(tmp, out_dir)
                if artifact_path:
                    tracking.log_artifacts(mlf, run_id, tmp, artifact_path)

    def sample(step: int) -> None:
        full = full_ema_state(ema)
        if grid is not None:
            tracking.log_image(mlf, run_id, grid.render(full), f"samples/step_{step:07d}.png")

    t_loop = time.perf_counter()
    if rank == 0:
        print(f"flowar train: rank 0 ready in {t_loop - t_start:.1f}s (data {t_data - t_start:.1f}s); "
              f"steps {start_step}..{total_steps}, {source.steps_per_epoch} per epoch, "
              f"{shard.total_rows} latents, micro-batch {tc.micro_batch} x {tc.grad_accum_steps}", flush=True)
    for step in range(start_step, total_steps):
        _inject_fault(config.get("fault") or {}, rank, world, step, run_dir)
        torch.manual_seed(seed_of("step", tc.seed, rank, step))  # label drop, t, noise
        lr = lr_at(step, peak_lr, warmup, total_steps, tc.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = torch.zeros(1 + len(job.model.scales), device=device)
        for micro in range(tc.grad_accum_steps):
            latents, labels, targets = source.batch(step, micro)
            latents, labels = latents.to(device, non_blocking=True), labels.to(device)
            if targets is not None:
                targets = [m.to(device, non_blocking=True) for m in targets]
            last = micro == tc.grad_accum_steps - 1
            if tc.strategy == "fsdp":
                model.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            else:
                sync = contextlib.nullcontext() if last else model.no_sync()
            with sync, autocast:
                total, per_scale = step_fn(latents, labels, targets)
            (total / tc.grad_accum_steps).backward()
            stats += torch.cat([total.detach().float()[None], per_scale.detach()]) / tc.grad_accum_steps
        dist.all_reduce(stats)  # sum; a NaN anywhere makes every rank's copy NaN
        stats = (stats / world).cpu().double()
        grad_norm = clip_grad_norm(inner.parameters(), tc.grad_clip)
        msg = non_finite_message(stats, grad_norm, step)
        if msg:
            if mlf is not None:
                mlf.set_tag(run_id, "stopped", msg)
            ray.train.report({"non_finite_loss": 1, "message": msg, "step": step})
            return
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(inner)
        done = step + 1
        window["sum"] += stats
        window["steps"] += 1
        window["gn"] += grad_norm
        window["ckpt_sum"] += stats[0].item()
        window["ckpt_steps"] += 1

        if mlf is not None and (done % tc.log_every == 0 or done == total_steps):
            elapsed = time.perf_counter() - window["t0"]
            mean = (window["sum"] / window["steps"]).tolist()
            images_s = tc.global_batch_size * window["steps"] / max(elapsed, 1e-9)
            metrics = {"loss": mean[0], **dict(zip(scale_names, mean[1:])), "lr": lr,
                       "grad_norm": window["gn"] / window["steps"], "images_per_s": images_s,
                       "tokens_per_s": images_s * job.model.num_tokens,
                       "epoch": done / source.steps_per_epoch}
            if device.type == "cuda":
                metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            tracking.log_metrics(mlf, run_id, metrics, step=done)
        if done % tc.log_every == 0 or done == total_steps:
            window.update(sum=torch.zeros_like(window["sum"]), steps=0, gn=0.0, t0=time.perf_counter())

        if tc.sample_every and done % tc.sample_every == 0 and done != total_steps:
            sample(done)
        if done % tc.checkpoint_every == 0 or done == total_steps:
            interval_loss = window["ckpt_sum"] / max(window["ckpt_steps"], 1)
            window.update(ckpt_sum=0.0, ckpt_steps=0)
            metrics = {"step": done, "loss": interval_loss, "lr": lr, "epoch": done / source.steps_per_epoch}
            if interval_loss < best_loss:
                best_loss = interval_loss
                ema_export(f"{run_dir}/best", done)  # keep the best apart from Ray's last-N
            if done == total_steps:
                sample(done)
                export_dir = tc.export_dir or f"{run_dir}/export"
                ema_export(export_dir, done, artifact_path="model")
                metrics["export_dir"] = export_dir
            epoch, index = source.position(done)
            state = {"step": done, "epoch": epoch, "index_in_epoch": index, "world_size": world,
                     "seed": tc.seed, "best_loss": best_loss, "rows": shard.total_rows,
                     "rng": "reseeded every step from (seed, rank, step)"}
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(tmp, strategy=tc.strategy, model=inner, optimizer=optimizer,
                                ema=ema, state=state, rank=rank)
                writes = tc.strategy == "fsdp" or rank == 0
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp)
                                 if writes else None)
    if rank == 0 and total_steps > start_step:
        seconds = time.perf_counter() - t_loop
        images = (total_steps - start_step) * tc.global_batch_size
        print(f"flowar train: steps {start_step}..{total_steps} in {seconds:.1f}s "
              f"({images / seconds:.1f} images/s over {world} worker(s)); best interval loss "
              f"{best_loss:.4f}", flush=True)


def _write_dir(local: str, target: str) -> None:
    from pipelines.core.storage import is_uri, upload_dir

    if is_uri(target):
        upload_dir(local, target)
        return
    import shutil

    Path(target).parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(local, target, dirs_exist_ok=True)
