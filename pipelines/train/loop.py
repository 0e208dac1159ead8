"""The per-worker training function of `flowar train` (runs inside Ray Train workers).

One optimizer step: `grad_accum_steps` micro-batches (gradient sync only on the last), a global
all-reduce of the losses (which also makes every rank see a NaN/inf at once, so all stop
together), clipping, AdamW, EMA. Every `checkpoint_every` steps all ranks call
`ray.train.report` with a checkpoint (the report is a barrier); rank 0 alone logs to MLflow.

Determinism: the global torch RNG is reseeded from (seed, rank, step) before every step, and the
data order is a pure function of (seed, epoch, step, rank) (pipelines/train/data.py), so resuming
from any checkpoint replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray.data
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from torch import nn

from flowar import FlowAR
from flowar.optim import EMA, clip_grad_norm, lr_at, scaled_lr
from pipelines.core import tracking
from pipelines.train.checkpointing import (copy_dir, export_ema, full_ema_state, load_checkpoint,
                                           save_checkpoint)
from pipelines.train.config import TrainConfig, TrainJobConfig, WorkerPayload
from pipelines.train.data import BatchSource, load_shard, seed_of
from pipelines.train.faults import inject_fault
from pipelines.train.parallelize import grad_sync, parallelize
from pipelines.train.samples import SampleGrid

__all__ = ["train_loop_per_worker", "non_finite_message", "Meter", "Worker"]


# ------------------------------------------------------------------ the loop

def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function; `config` is {"payload": WorkerPayload} (pipelines/train/job.py)."""
    payload = WorkerPayload.from_loop_config(config)
    w = setup(payload)
    tc = w.train
    window, interval = Meter.zeros(w.num_losses), Meter.zeros(w.num_losses)  # since log, checkpoint
    t_loop = time.perf_counter()
    for step in range(w.start_step, w.total_steps):
        inject_fault(payload.fault, w.rank, w.world, step, payload.run_dir)
        lr = set_lr(w, step)
        losses, grad_norm = forward_backward(w, step)
        reason = non_finite_message(losses, grad_norm, step)
        if reason:
            stop(w, reason, step)
            return
        w.optimizer.step()
        w.optimizer.zero_grad(set_to_none=True)
        w.ema.update(w.model)
        window.add(losses, grad_norm)
        interval.add(losses, grad_norm)

        done = step + 1
        if done % tc.log_every == 0 or done == w.total_steps:
            log_metrics(w, window, lr, done)
            window.reset()
        if tc.sample_every and done % tc.sample_every == 0 and done != w.total_steps:
            log_samples(w, done)
        if done % tc.checkpoint_every == 0 or done == w.total_steps:
            checkpoint(w, interval, lr, done)
            interval.reset()
    summarise(w, time.perf_counter() - t_loop)


@dataclass
class Meter:
    """Running sums over the steps since the last reset: the rank-averaged losses (total, then
    one per scale), the grad norm, the number of steps, and when the window started."""
    losses: torch.Tensor  # float64 on the CPU
    grad_norm: float = 0.0
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def zeros(cls, n: int) -> Meter:
        return cls(torch.zeros(n, dtype=torch.float64))

    def add(self, losses: torch.Tensor, grad_norm: float) -> None:
        self.losses += losses
        self.grad_norm += grad_norm
        self.steps += 1

    def mean(self) -> list[float]:
        return (self.losses / self.steps).tolist()

    def mean_loss(self) -> float:
        return self.losses[0].item() / max(self.steps, 1)

    def reset(self) -> None:
        self.losses.zero_()
        self.grad_norm, self.steps, self.t0 = 0.0, 0, time.perf_counter()


@dataclass
class Worker:
    """One rank's training state: built once by `setup`, then read by the step, log and
    checkpoint functions (`checkpoint` also moves `best_loss`)."""
    payload: WorkerPayload
    rank: int
    world: int
    device: torch.device
    model: FlowAR  # unwrapped: the optimizer, EMA, clipping and exports use its parameter names
    wrapped: nn.Module  # the DDP or FSDP2 LossModule, whose gradient sync each micro-batch sets
    forward: Callable  # what a micro-batch calls: `wrapped`, or its torch.compile
    ema: EMA
    optimizer: torch.optim.Optimizer
    source: BatchSource
    rows: int  # latents in the whole dataset
    peak_lr: float
    warmup_steps: int
    total_steps: int
    start_step: int = 0
    best_loss: float = math.inf  # of the checkpoint intervals so far
    mlflow: Any = None  # rank 0's MLflow client; None on every other rank
    grid: SampleGrid | None = None  # rank 0 only

    @property
    def job(self) -> TrainJobConfig:
        return self.payload.job

    @property
    def train(self) -> TrainConfig:
        return self.payload.job.train

    @property
    def num_losses(self) -> int:
        return 1 + len(self.job.model.scales)


# ------------------------------------------------------------------ setup

def setup(payload: WorkerPayload) -> Worker:
    """This rank's model, optimizer, data and restored checkpoint. Every rank runs the same
    steps in the same order: the wrapping and the checkpoint load are collectives."""
    t_start = time.perf_counter()
    job, tc = payload.job, payload.job.train
    rank, world, device = _process(tc)
    # Same init on every rank (FSDP2 shards each rank's local copy; DDP would broadcast anyway).
    torch.manual_seed(seed_of("init", tc.seed))
    model = FlowAR(job.model.architecture()).to(device)
    wrapped, forward = parallelize(model, device, world, strategy=tc.strategy,
                                   bf16=tc.precision == "bf16", compile=tc.compile,
                                   grad_checkpointing=job.model.grad_checkpointing)
    peak_lr = scaled_lr(tc.base_lr, tc.global_batch_size)
    # The published groups (misc.add_weight_decay): matrices decay, 1-D tensors and biases do not.
    optimizer = torch.optim.AdamW(param_groups_weight_decay(model, tc.weight_decay), lr=peak_lr,
                                  betas=tuple(tc.betas))
    source, rows = _batch_source(payload, rank, world)
    t_data = time.perf_counter()
    warmup = tc.warmup_steps if tc.warmup_steps >= 0 else round(tc.warmup_epochs * source.steps_per_epoch)
    w = Worker(payload, rank, world, device, model, wrapped, forward, EMA(model, tc.ema_decay),
               optimizer, source, rows, peak_lr, warmup,
               total_steps=tc.max_steps or tc.epochs * source.steps_per_epoch)
    _restore(w)
    if rank == 0:
        w.mlflow = tracking.client(payload.tracking_uri)
        tracking.log_metrics(w.mlflow, payload.run_id, {
            "resumed_from_step": w.start_step, "steps_per_epoch": source.steps_per_epoch,
            "total_steps": w.total_steps}, step=w.start_step)
        w.grid = SampleGrid(job, payload.meta, device)
        print(f"flowar train: rank 0 ready in {time.perf_counter() - t_start:.1f}s (data "
              f"{t_data - t_start:.1f}s); steps {w.start_step}..{w.total_steps}, "
              f"{source.steps_per_epoch} per epoch, {rows} latents, micro-batch "
              f"{tc.micro_batch} x {tc.grad_accum_steps}", flush=True)
    return w


def _process(tc: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this worker, checked against the config."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if world != tc.num_workers:
        raise RuntimeError(f"Ray started {world} workers, the config asks for {tc.num_workers}")
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tc.tf32
        torch.backends.cudnn.allow_tf32 = tc.tf32
    return rank, world, device


def _batch_source(payload: WorkerPayload, rank: int, world: int) -> tuple[BatchSource, int]:
    """This rank's share of the dataset (pipelines/train/data.py), and the dataset's row count."""
    job = payload.job
    ray.data.DataContext.get_current().enable_progress_bars = False  # one read, no bar spam
    # Table 3's image scale construction: the coarser scales come from their own dataset columns.
    image_scales = job.model.scales[:-1] if job.model.scale_construction == "image" else ()
    shard = load_shard(ray.train.get_dataset_shard("train").iter_batches(
        batch_size=1024, batch_format="numpy"), rank, world, image_scales)
    source = BatchSource(shard, payload.meta, seed=job.train.seed, rank=rank,
                         micro_batch=job.train.micro_batch, accum=job.train.grad_accum_steps,
                         flip_augment=job.data.flip_augment, image_scales=image_scales)
    return source, shard.total_rows


def _restore(w: Worker) -> None:
    """Continue from Ray's latest checkpoint of this run, if there is one (a restart or a resume)."""
    latest = ray.train.get_checkpoint()
    if latest is None:
        return
    with latest.as_directory() as d:
        state = load_checkpoint(d, strategy=w.train.strategy, model=w.model,
                                optimizer=w.optimizer, ema=w.ema)
    w.start_step, w.best_loss = state["step"], state.get("best_loss", math.inf)


# ------------------------------------------------------------------ one step

def set_lr(w: Worker, step: int) -> float:
    lr = lr_at(step, w.peak_lr, w.warmup_steps, w.total_steps, w.train.min_lr)
    for group in w.optimizer.param_groups:
        group["lr"] = lr
    return lr


def forward_backward(w: Worker, step: int) -> tuple[torch.Tensor, float]:
    """One step's gradients, reduced across ranks and clipped. Returns the losses (total, then
    per scale) averaged over micro-batches and ranks, as float64 on the CPU, and the grad norm
    before clipping."""
    tc = w.train
    torch.manual_seed(seed_of("step", tc.seed, w.rank, step))  # label drop, t, noise
    autocast = torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    losses = torch.zeros(w.num_losses, device=w.device)
    for micro in range(tc.grad_accum_steps):
        latents, labels, targets = w.source.batch(step, micro)
        latents, labels = latents.to(w.device, non_blocking=True), labels.to(w.device)
        if targets is not None:
            targets = [m.to(w.device, non_blocking=True) for m in targets]
        last = micro == tc.grad_accum_steps - 1
        with grad_sync(w.wrapped, tc.strategy, sync=last), autocast:
            total, per_scale = w.forward(latents, labels, targets)
        (total / tc.grad_accum_steps).backward()
        losses += torch.cat([total.detach().float()[None], per_scale.detach()]) / tc.grad_accum_steps
    dist.all_reduce(losses)  # sum; a NaN anywhere makes every rank's copy NaN
    losses = (losses / w.world).cpu().double()
    return losses, clip_grad_norm(w.model.parameters(), tc.grad_clip)


def non_finite_message(stats: torch.Tensor, grad_norm: float, step: int) -> str:
    """The reason to stop when the (globally reduced) losses or the grad norm are NaN/inf, else ""."""
    if torch.isfinite(stats).all() and torch.isfinite(torch.tensor(grad_norm)):
        return ""
    return (f"non-finite training at step {step}: loss {stats[0].item():.4g}, grad norm "
            f"{grad_norm:.4g}, per scale {[round(v, 4) for v in stats[1:].tolist()]}. Stopped "
            "instead of training on garbage; lower train.base_lr, keep train.precision=fp32, or "
            "resume from an earlier checkpoint.")


def stop(w: Worker, reason: str, step: int) -> None:
    """End this run without a checkpoint: rank 0 tags the MLflow run "stopped" (which the driver
    reads), every rank reports the reason."""
    if w.mlflow is not None:
        w.mlflow.set_tag(w.payload.run_id, "stopped", reason)
    ray.train.report({"non_finite_loss": 1, "message": reason, "step": step})


# ------------------------------------------------------------------ logs, samples, checkpoints

def log_metrics(w: Worker, window: Meter, lr: float, done: int) -> None:
    """Rank 0: the means over the steps since the last log, and the throughput."""
    if w.mlflow is None:
        return
    elapsed = time.perf_counter() - window.t0
    mean = window.mean()
    images_s = w.train.global_batch_size * window.steps / max(elapsed, 1e-9)
    scale_names = [f"loss_scale{s}" for s in w.job.model.scales]
    metrics = {"loss": mean[0], **dict(zip(scale_names, mean[1:])), "lr": lr,
               "grad_norm": window.grad_norm / window.steps, "images_per_s": images_s,
               "tokens_per_s": images_s * w.job.model.num_tokens,
               "epoch": done / w.source.steps_per_epoch}
    if w.device.type == "cuda":
        metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(w.device) / 2**30
    tracking.log_metrics(w.mlflow, w.payload.run_id, metrics, step=done)


def log_samples(w: Worker, step: int) -> None:
    """A sample grid of the EMA weights (every rank calls it: gathering them is collective under FSDP)."""
    full = full_ema_state(w.ema)
    if w.grid is not None:
        tracking.log_image(w.mlflow, w.payload.run_id, w.grid.render(full),
                           f"samples/step_{step:07d}.png")


def checkpoint(w: Worker, interval: Meter, lr: float, done: int) -> None:
    """Every rank: the best EMA so far to <run dir>/best, at the end the last samples and the
    export, then Ray's checkpoint of the step."""
    run_dir = w.payload.run_dir
    loss = interval.mean_loss()
    metrics = {"step": done, "loss": loss, "lr": lr, "epoch": done / w.source.steps_per_epoch}
    if loss < w.best_loss:
        w.best_loss = loss
        export(w, f"{run_dir}/best", done)  # kept apart from Ray's last-N checkpoints
    if done == w.total_steps:
        log_samples(w, done)
        metrics["export_dir"] = w.train.export_dir or f"{run_dir}/export"
        export(w, metrics["export_dir"], done, artifact_path="model")
    report(w, metrics, done)


def export(w: Worker, out_dir: str, step: int, artifact_path: str = "") -> None:
    """The EMA weights as a from_pretrained folder at `out_dir` (and under `artifact_path` in
    MLflow when given). Every rank calls it: gathering the EMA is collective under FSDP."""
    full = full_ema_state(w.ema)
    if w.rank != 0:
        return
    buffers = {k: v.detach().cpu() for k, v in w.model.state_dict().items() if k not in full}
    info = {"run_dir": w.payload.run_dir, "mlflow_run_id": w.payload.run_id, "step": step,
            "ema_decay": w.train.ema_decay, "dataset": w.job.data.path}
    with tempfile.TemporaryDirectory() as tmp:
        export_ema(w.model.config, full, tmp, dataclasses.asdict(w.payload.meta), buffers, info)
        copy_dir(tmp, out_dir)
        if artifact_path:
            tracking.log_artifacts(w.mlflow, w.payload.run_id, tmp, artifact_path)


def report(w: Worker, metrics: dict, done: int) -> None:
    """Ray's checkpoint of step `done` (the report is a barrier of every rank). Under FSDP every
    rank writes its shards; under DDP rank 0 writes the whole state."""
    epoch, index = w.source.position(done)
    state = {"step": done, "epoch": epoch, "index_in_epoch": index, "world_size": w.world,
             "seed": w.train.seed, "best_loss": w.best_loss, "rows": w.rows,
             "rng": "reseeded every step from (seed, rank, step)"}
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, strategy=w.train.strategy, model=w.model, optimizer=w.optimizer,
                        ema=w.ema, state=state, rank=w.rank)
        writes = w.train.strategy == "fsdp" or w.rank == 0
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp)
                         if writes else None)


def summarise(w: Worker, seconds: float) -> None:
    if w.rank == 0 and w.total_steps > w.start_step:
        images = (w.total_steps - w.start_step) * w.train.global_batch_size
        print(f"flowar train: steps {w.start_step}..{w.total_steps} in {seconds:.1f}s "
              f"({images / seconds:.1f} images/s over {w.world} worker(s)); best interval loss "
              f"{w.best_loss:.4f}", flush=True)
