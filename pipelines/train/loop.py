"""The per-worker training function of `flowar train` (runs inside Ray Train workers).

One optimizer step: `grad_accum_steps` micro-batches (gradient sync only on the last), a global
all-reduce of the losses (which also makes every rank see a NaN/inf at once, so all stop
together), clipping, AdamW, EMA. Every `checkpoint_every` steps all ranks call
`ray.train.report` with a checkpoint (the report is a barrier); rank 0 alone logs to MLflow.

Determinism: the global torch RNG is reseeded from (seed, rank, step) before every step, and the
data order is a pure function of (seed, epoch, step, partitions) (pipelines/train/data.py), so
resuming from any checkpoint replays exactly what an uninterrupted run would have done, and
resuming at another worker count continues the same epoch.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from timm.optim import param_groups_weight_decay
from torch import nn

from flowar import FlowAR
from flowar.optim import EMA, clip_grad_norm, lr_at, scaled_lr
from pipelines.core import tracking
from pipelines.train.checkpointing import (full_ema_state, load_checkpoint, model_buffers,
                                           read_state, save_checkpoint)
from pipelines.train.config import TrainConfig, TrainJobConfig, WorkerPayload
from pipelines.train.data import BatchSource, latent_columns, open_reader, seed_of
from pipelines.train.evaluation import InTrainingEval
from pipelines.train.faults import inject_fault, log_keys, read_logger
from pipelines.train.parallelize import grad_sync, parallelize
from pipelines.train.records import (export, log_metrics, log_samples, start_system_metrics,
                                     stop_system_metrics)
from pipelines.train.samples import SampleGrid

__all__ = ["train_loop_per_worker", "non_finite_message", "Meter", "Worker"]


# ------------------------------------------------------------------ the loop

def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function; `config` is {"payload": WorkerPayload} (pipelines/train/job.py)."""
    w = setup(WorkerPayload.from_loop_config(config))
    try:
        run_steps(w)
    finally:
        stop_system_metrics(w.system_metrics)


def run_steps(w: Worker) -> None:
    """The steps from the restored one to the last, with their logs, evaluations and checkpoints."""
    tc, payload = w.train, w.payload
    window, interval = Meter.zeros(w.num_losses), Meter.zeros(w.num_losses)  # since log, checkpoint
    t_loop = time.perf_counter()
    for step in range(w.start_step, w.total_steps):
        inject_fault(payload.fault, w.rank, w.world, step, payload.run_dir)
        lr = set_lr(w, step)
        losses, grad_norm, data_s = forward_backward(w, step)
        reason = non_finite_message(losses, grad_norm, step)
        if reason:
            stop(w, reason, step)
            return
        w.optimizer.step()
        w.optimizer.zero_grad(set_to_none=True)
        w.ema.update(w.model)
        window.add(losses, grad_norm, data_s)
        interval.add(losses, grad_norm, data_s)

        done = step + 1
        if done % tc.log_every == 0 or done == w.total_steps:
            log_metrics(w, window, lr, done)
            window.reset()
        if tc.sample_every and done % tc.sample_every == 0 and done != w.total_steps:
            log_samples(w, done)
        evaluated = evaluate(w, done) if is_eval_step(tc, done, w.total_steps) else None
        if done % tc.checkpoint_every == 0 or done == w.total_steps:
            checkpoint(w, interval, lr, done, evaluated or {})
            interval.reset()
        elif evaluated is not None:  # Tune's scheduler sees eval/* at every evaluation step
            ray.train.report({"step": done, "loss": interval.mean_loss(), "lr": lr,
                              "epoch": done / w.source.steps_per_epoch, **evaluated})
    summarise(w, time.perf_counter() - t_loop)


@dataclass
class Meter:
    """Running sums over the steps since the last reset: the rank-averaged losses (total, then
    one per scale), the grad norm, the seconds spent waiting for batches, the number of steps,
    and when the window started."""
    losses: torch.Tensor  # float64 on the CPU
    grad_norm: float = 0.0
    data_s: float = 0.0
    steps: int = 0
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def zeros(cls, n: int) -> Meter:
        return cls(torch.zeros(n, dtype=torch.float64))

    def add(self, losses: torch.Tensor, grad_norm: float, data_s: float) -> None:
        self.losses += losses
        self.grad_norm += grad_norm
        self.data_s += data_s
        self.steps += 1

    def mean(self) -> list[float]:
        return (self.losses / self.steps).tolist()

    def mean_loss(self) -> float:
        return self.losses[0].item() / max(self.steps, 1)

    def reset(self) -> None:
        self.losses.zero_()
        self.grad_norm, self.data_s, self.steps, self.t0 = 0.0, 0.0, 0, time.perf_counter()


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
    system_metrics: Any = None  # the first worker of each node: MLflow's SystemMetricsMonitor
    evaluator: InTrainingEval | None = None  # every rank, with train.eval_every

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
    latest = ray.train.get_checkpoint()  # a restart or a resume: its state fixes the data order
    with latest.as_directory() if latest else contextlib.nullcontext() as checkpoint_dir:
        state = read_state(checkpoint_dir) if checkpoint_dir else {}
        source = _batch_source(payload, rank, world, state)
        warmup = (tc.warmup_steps if tc.warmup_steps >= 0
                  else round(tc.warmup_epochs * source.steps_per_epoch))
        w = Worker(payload, rank, world, device, model, wrapped, forward, EMA(model, tc.ema_decay),
                   optimizer, source, sum(u.rows for u in payload.units), peak_lr, warmup,
                   total_steps=tc.max_steps or tc.epochs * source.steps_per_epoch)
        if checkpoint_dir:
            _restore(w, checkpoint_dir)
    if tc.eval_every:
        w.evaluator = InTrainingEval(job, payload.meta.vae, payload.eval_reference, device, rank, world)
    if rank == 0:
        _announce(w, time.perf_counter() - t_start)
    w.system_metrics = start_system_metrics(w)
    return w


def _announce(w: Worker, seconds: float) -> None:
    """Rank 0: the run's shape in MLflow and on stdout."""
    source, tc = w.source, w.train
    w.mlflow = tracking.client(w.payload.tracking_uri)
    tracking.log_metrics(w.mlflow, w.payload.run_id, {
        "resumed_from_step": w.start_step, "steps_per_epoch": source.steps_per_epoch,
        "total_steps": w.total_steps}, step=w.start_step)
    w.grid = SampleGrid(w.job, w.payload.meta, w.device)
    print(f"flowar train: rank 0 ready in {seconds:.1f}s; steps {w.start_step}..{w.total_steps}, "
          f"{source.steps_per_epoch} per epoch, {w.rows} latents in {len(w.payload.units)} row "
          f"groups streamed as {source.reader.partitions} partition(s) in windows of "
          f"{source.reader.window}, micro-batch {tc.micro_batch} x {tc.grad_accum_steps}",
          flush=True)


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


def _batch_source(payload: WorkerPayload, rank: int, world: int, state: dict) -> BatchSource:
    """This rank's batches, streamed from the dataset (pipelines/train/data.py). A resumed run
    keeps its checkpoint's partitions, so the data order continues at any worker count."""
    job = payload.job
    batch = job.train.global_batch_size
    if state.get("global_batch_size", batch) != batch:
        raise ValueError(f"train.global_batch_size={batch}, but the checkpoint being resumed was "
                         f"trained with {state['global_batch_size']}: the data position would "
                         "move. Resume with the same global batch (or start a new run name)")
    partitions = state.get("partitions") or job.data.partitions or world
    # Table 3's image scale construction: the coarser scales come from their own dataset columns.
    image_scales = job.model.scales[:-1] if job.model.scale_construction == "image" else ()
    flip = job.data.flip_augment and payload.meta.flip
    reader = open_reader(job.data.path, payload.units, latent_columns(flip, image_scales),
                         seed=job.train.seed, partitions=partitions,
                         window=job.data.shuffle_buffer, on_read=read_logger(payload.fault, rank))
    return BatchSource(reader, payload.meta, seed=job.train.seed, rank=rank, world=world,
                       global_batch=batch, accum=job.train.grad_accum_steps, flip=flip,
                       image_scales=image_scales)


def _restore(w: Worker, checkpoint_dir: str) -> None:
    """Continue from Ray's latest checkpoint of this run (a restart or a resume)."""
    state = load_checkpoint(checkpoint_dir, strategy=w.train.strategy, model=w.model,
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
    per scale) averaged over micro-batches and ranks, as float64 on the CPU, the grad norm
    before clipping, and the seconds this rank waited for its batches."""
    tc = w.train
    torch.manual_seed(seed_of("step", tc.seed, w.rank, step))  # label drop, t, noise
    autocast = torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16")
    losses = torch.zeros(w.num_losses, device=w.device)
    data_s = 0.0
    for micro in range(tc.grad_accum_steps):
        t0 = time.perf_counter()
        latents, labels, targets = w.source.batch(step, micro)
        data_s += time.perf_counter() - t0
        log_keys(w.payload.fault, w.rank, w.world, step, micro, w.source.last_keys)
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
    return losses, clip_grad_norm(w.model.parameters(), tc.grad_clip), data_s


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

def is_eval_step(tc: TrainConfig, done: int, total: int) -> bool:
    """Every train.eval_every steps, and at the last step (so a run's final report, which a
    sweep ranks by, carries its evaluation)."""
    return bool(tc.eval_every) and (done % tc.eval_every == 0 or done == total)


def evaluate(w: Worker, step: int) -> dict:
    """The in-training evaluation of the EMA weights (pipelines/train/evaluation.py). Every rank
    calls it (gathering the EMA and the statistics are collective); rank 0 logs the metrics to
    MLflow at `step` and returns them, the other ranks return {}."""
    full = full_ema_state(w.ema)
    metrics = w.evaluator({**full, **model_buffers(w.model, full)})
    if w.mlflow is not None:
        tracking.log_metrics(w.mlflow, w.payload.run_id, metrics, step=step)
        print(f"flowar train: step {step}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    return metrics


def checkpoint(w: Worker, interval: Meter, lr: float, done: int, evaluated: dict) -> None:
    """Every rank: the best EMA so far to <run dir>/best, at the end the last samples and the
    export, then Ray's checkpoint of the step (its report carries `evaluated`, the step's
    in-training evaluation, when there is one)."""
    run_dir = w.payload.run_dir
    loss = interval.mean_loss()
    metrics = {"step": done, "loss": loss, "lr": lr, "epoch": done / w.source.steps_per_epoch,
               **evaluated}
    if loss < w.best_loss:
        w.best_loss = loss
        export(w, f"{run_dir}/best", done)  # kept apart from Ray's last-N checkpoints
    if done == w.total_steps:
        log_samples(w, done)
        metrics["export_dir"] = w.train.export_dir or f"{run_dir}/export"
        export(w, metrics["export_dir"], done, log_model=True)
    report(w, metrics, done)


def report(w: Worker, metrics: dict, done: int) -> None:
    """Ray's checkpoint of step `done` (the report is a barrier of every rank). Under FSDP every
    rank writes its shards; under DDP rank 0 writes the whole state."""
    epoch, index = w.source.position(done)
    state = {"step": done, "epoch": epoch, "index_in_epoch": index, "world_size": w.world,
             "partitions": w.source.reader.partitions,
             "global_batch_size": w.train.global_batch_size,
             "seed": w.train.seed, "best_loss": w.best_loss, "rows": w.rows,
             "rng": "reseeded every step from (seed, rank, step)"}
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, strategy=w.train.strategy, model=w.model, optimizer=w.optimizer,
                        ema=w.ema, state=state, rank=w.rank)
        writes = w.train.strategy == "fsdp" or w.rank == 0
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp)
                         if writes else None)


def summarise(w: Worker, seconds: float) -> None:
    w.source.reader.close()
    if w.rank == 0 and w.total_steps > w.start_step:
        images = (w.total_steps - w.start_step) * w.train.global_batch_size
        print(f"flowar train: steps {w.start_step}..{w.total_steps} in {seconds:.1f}s "
              f"({images / seconds:.1f} images/s over {w.world} worker(s)); best interval loss "
              f"{w.best_loss:.4f}", flush=True)
