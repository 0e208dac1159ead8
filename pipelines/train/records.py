"""What a training run writes to MLflow besides its checkpoints: metrics, sample grids, the
exported model and the machines' system metrics.

Rank 0 alone logs (its `Worker.mlflow` client; None elsewhere), except the system metrics, which
the first worker of every Ray node logs under its own node id. Every rank still calls the
functions that gather the EMA weights, a collective under FSDP.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import ray.train
import torch
import torch.distributed as dist

from pipelines.core import storage, tracking
from pipelines.train.checkpointing import copy_dir, export_ema, full_ema_state, model_buffers

if TYPE_CHECKING:
    from pipelines.train.loop import Meter, Worker

__all__ = ["log_metrics", "log_samples", "export", "start_system_metrics", "stop_system_metrics"]

SAMPLES_KEY = "samples"  # the image key of the sample grids (the UI's step slider)


def log_metrics(w: Worker, window: Meter, lr: float, done: int) -> None:
    """Rank 0 logs the means over the steps since the last log and the throughput; every rank
    first joins one reduction of the worst data wait and memory (so the log shows the slowest
    input and the largest worker, not rank 0's)."""
    elapsed = time.perf_counter() - window.t0
    # ru_maxrss is in KiB on Linux: this process's peak resident memory
    worst = torch.tensor([window.data_s / max(elapsed, 1e-9),
                          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], device=w.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if w.mlflow is None:
        return
    mean = window.mean()
    images_s = w.train.global_batch_size * window.steps / max(elapsed, 1e-9)
    scale_names = [f"loss_scale{s}" for s in w.job.model.scales]
    metrics = {"loss": mean[0], **dict(zip(scale_names, mean[1:])), "lr": lr,
               "grad_norm": window.grad_norm / window.steps, "images_per_s": images_s,
               "tokens_per_s": images_s * w.job.model.num_tokens,
               "epoch": done / w.source.steps_per_epoch,
               # the fraction of the window the slowest rank spent waiting for its batches
               "data_wait_fraction": worst[0].item(), "worker_peak_rss_mb": worst[1].item(),
               "data_rows_read": w.source.reader.stats.rows}
    if w.device.type == "cuda":
        metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(w.device) / 2**30
    tracking.log_metrics(w.mlflow, w.payload.run_id, metrics, step=done)


def log_samples(w: Worker, step: int) -> None:
    """A sample grid of the EMA weights (every rank calls it: gathering them is collective under FSDP)."""
    full = full_ema_state(w.ema)
    if w.grid is not None:
        tracking.log_image(w.mlflow, w.payload.run_id, w.grid.render(full), SAMPLES_KEY, step)


def export(w: Worker, out_dir: str, step: int, log_model: bool = False) -> None:
    """The EMA weights as a from_pretrained folder at `out_dir`; with `log_model`, also the run's
    MLflow model (pipelines/core/logged_model.py), whose id the export's config.json then
    records. Every rank calls it: gathering the EMA is collective under FSDP."""
    full = full_ema_state(w.ema)
    if w.rank != 0:
        return
    buffers = model_buffers(w.model, full)
    info = {"run_dir": w.payload.run_dir, "mlflow_run_id": w.payload.run_id, "step": step,
            "ema_decay": w.train.ema_decay, "dataset": w.job.data.path}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"  # the name the logged model keeps it under
        export_ema(w.model.config, full, folder, dataclasses.asdict(w.payload.meta), buffers, info)
        copy_dir(folder, out_dir)  # the export is safe before anything talks to MLflow
        if log_model:
            from pipelines.core.logged_model import log_export

            model_id = log_export(w.payload.tracking_uri, w.payload.run_id, folder, step,
                                  register=w.job.mlflow.register_model)
            for name in record_model_id(folder, model_id):
                storage.write_bytes(storage.join(out_dir, name), (folder / name).read_bytes())
            print(f"flowar train: logged the export as MLflow model {model_id} (models:/{model_id})",
                  flush=True)


def record_model_id(folder: Path, model_id: str) -> list[str]:
    """Add the MLflow model id to the export's training record and its card; the files changed."""
    from flowar.hub import CARD_FILE, write_model_card

    config = json.loads((folder / "config.json").read_text())
    config.setdefault("training", {})["mlflow_model_id"] = model_id
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    write_model_card(folder)
    return ["config.json", CARD_FILE]


# ------------------------------------------------------------------ system metrics

def start_system_metrics(w: Worker):
    """MLflow's system metrics (CPU, memory, disk, network; GPU utilisation and memory through
    pynvml) of this node, from its first worker, as system/node<N>/...; None elsewhere or when
    mlflow.system_metrics_every=0."""
    every = w.job.mlflow.system_metrics_every
    ctx = ray.train.get_context()
    if not every or ctx.get_local_rank() != 0:
        return None
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError as e:  # psutil missing: the training matters more than its gauges
        print(f"flowar train: no system metrics ({e}; pip install psutil)", flush=True)
        return None
    monitor = SystemMetricsMonitor(w.payload.run_id, sampling_interval=every, resume_logging=True,
                                   node_id=f"node{ctx.get_node_rank()}",
                                   tracking_uri=w.payload.tracking_uri)
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop the sampling thread and log one last sample, so that every run (a short one too)
    ends with the machine's state at its end."""
    if monitor is None:
        return
    try:
        monitor.finish()
        monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as e:  # noqa: BLE001 - the machine's metrics must never fail the training
        print(f"flowar train: the last system metrics were not logged ({type(e).__name__}: {e})")
