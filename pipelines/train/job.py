"""`flowar train CONFIG [key=value ...]`: distributed FlowAR training on Ray Train.

The driver (this module) validates everything that can be validated before any worker starts:
the config (unknown keys, batch arithmetic), the latent dataset's metadata against the model, and
the MLflow store. It then starts or resumes one MLflow run and one Ray Train run with the same
name, and hands the per-worker loop (pipelines/train/loop.py) a typed `WorkerPayload`
(pipelines/train/config.py): the job, the run, and the dataset metadata read here once.

Resuming: Ray Train V2 restores the latest checkpoint of a run when a run with the same
`RunConfig(name, storage_path)` starts again, so re-running the same command (same run name)
continues where it stopped, and `FailureConfig` restarts of dead workers continue the same MLflow
run because the run id travels in the payload.

`flowar --help` imports this module: torch, Ray and MLflow are imported inside the functions.
"""

from __future__ import annotations

from flowar.config import ConfigError, from_dict, to_dict
from pipelines.core import tracking
from pipelines.core.config import add_job_parser
from pipelines.core.lineage import TRAINING, log_dataset
from pipelines.core.progress import follow
from pipelines.core.ray_runtime import init_ray
from pipelines.core.source import flowar_command, source_tags
from pipelines.data.latents import LatentDataset, LatentDatasetMeta, check_compatible
from pipelines.train.config import TrainJobConfig, WorkerPayload, load_train_config, run_name

__all__ = ["run_train", "check_dataset", "check_evaluation", "TrainingDiverged",
           "tune_is_stopping_this_trial", "register"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; training stopped instead of continuing on garbage."""


def run_train(cfg: TrainJobConfig, config_path: str | None = None, *, fault: dict | None = None,
              callbacks=(), resources_per_worker: dict | None = None,
              progress: bool | None = None):
    """Train (or resume) and return the Ray `Result`.

    The workers stream the dataset themselves (pipelines/train/data.py): nothing of it passes
    through the driver or Ray's object store. `fault` is a test hook that kills or fails one
    worker once, or logs what each worker read (see pipelines/train/faults.py).

    `callbacks` (Ray Train callbacks, e.g. Tune's TuneReportCallback when a sweep trial runs this)
    and `resources_per_worker` (e.g. {"CPU": 2}) are passed to the trainer as they are.

    `progress`: show step/total, loss, images/s and time left on stderr while fit() runs
    (pipelines.core.progress: a bar on a terminal, a line per train.log_every otherwise), read from
    what rank 0 logs to MLflow. None: on, except inside a Tune trial (Tune reports those).
    """
    cfg = from_dict(TrainJobConfig, to_dict(cfg))  # every config check again: cfg may have been edited
    meta = check_dataset(cfg)
    eval_reference = check_evaluation(cfg, meta)
    units = LatentDataset(cfg.data.path).units()  # the row groups the workers stream
    payload = _start_run(cfg, config_path, meta, units, fault or {})
    payload.eval_reference = eval_reference
    _log_inputs(payload, eval_reference)
    init_ray(cfg.ray, min_cpus=cfg.train.num_workers + 1)  # + one CPU for the driver's actors
    trainer = _trainer(payload, callbacks, resources_per_worker)
    result = _fit(trainer, payload, progress if progress is not None else not _in_tune_trial())
    _finish(payload, result)
    return result


def check_dataset(cfg: TrainJobConfig) -> LatentDatasetMeta:
    """Read and check the dataset's metadata before anything starts (ConfigError when unfit)."""
    meta = LatentDataset(cfg.data.path).meta
    check_compatible(meta, cfg.model)  # incl. image-derived scales for scale_construction=image
    return meta


def check_evaluation(cfg: TrainJobConfig, meta: LatentDatasetMeta) -> dict | None:
    """With train.eval_every: the reference, the classifier and the dataset's VAE checked before
    anything starts (ConfigError naming the key); the reference's spec for the workers."""
    if not cfg.train.eval_every:
        return None
    from pipelines.train.evaluation import check_eval_inputs  # torch: not on --help's path

    try:
        return check_eval_inputs(cfg, meta.vae)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _start_run(cfg: TrainJobConfig, config_path: str | None, meta: LatentDatasetMeta,
               units: list, fault: dict) -> WorkerPayload:
    """Start or resume the MLflow run of this job (its config, tags and a cleared "stopped"
    tag of an earlier diverged attempt) and return what the workers need."""
    name, uri = run_name(cfg), cfg.mlflow.resolved_uri()
    tracking.check_reachable(uri)  # fail now, not after hours
    run_id, resumed = tracking.start_or_resume_run(
        uri, cfg.mlflow.experiment, name, artifact_location=cfg.mlflow.artifact_location)
    tracking.log_config(uri, run_id, cfg, config_path, tags=_tags(cfg, meta, config_path))
    if resumed and "stopped" in tracking.client(uri).get_run(run_id).data.tags:
        tracking.client(uri).delete_tag(run_id, "stopped")  # a new attempt after a divergence
    print(f"flowar train: {'resuming' if resumed else 'starting'} run {name!r} "
          f"(MLflow run {run_id}, {uri})")
    run_dir = f"{cfg.ray.resolved_storage_path().rstrip('/')}/{name}"
    return WorkerPayload(job=cfg, run_id=run_id, tracking_uri=uri, run_dir=run_dir, meta=meta,
                         units=units, fault=fault)


def _log_inputs(payload: WorkerPayload, reference: dict | None) -> None:
    """The latent dataset (and the in-training evaluation's reference) as the run's inputs."""
    c, cfg, meta = tracking.client(payload.tracking_uri), payload.job, payload.meta
    path = cfg.data.path
    log_dataset(c, payload.run_id, digest=LatentDataset(path).digest(), where=path, context=TRAINING,
                profile={"rows": meta.count, "resolution": meta.resolution, "scales": meta.scales,
                         "vae": (meta.vae or {}).get("id"), "flip": meta.flip})
    if reference:
        from pipelines.evaluate.reference import log_reference

        log_reference(c, payload.run_id, reference, cfg.train.eval_reference)


def _tags(cfg: TrainJobConfig, meta: LatentDatasetMeta, config_path: str | None) -> dict[str, str]:
    vae = meta.vae or {}
    return {"dataset": f"{cfg.data.path} ({meta.count} latents, {meta.created or 'undated'})",
            "dataset_path": cfg.data.path,
            "vae": str(vae.get("id", "unknown")), "vae_sha256": str(vae.get("sha256", "unknown")),
            "preset": cfg.preset or "custom", "strategy": cfg.train.strategy,
            **source_tags(flowar_command("train", config_path))}


def _trainer(payload: WorkerPayload, callbacks, resources_per_worker):
    """The Ray TorchTrainer of this run: train.num_workers workers, each streaming its share."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipelines.train.loop import train_loop_per_worker

    cfg = payload.job
    use_gpu = _use_gpu(cfg)
    return TorchTrainer(
        train_loop_per_worker, train_loop_config=payload.as_loop_config(),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                                resources_per_worker=resources_per_worker),
        run_config=ray.train.RunConfig(
            name=run_name(cfg), storage_path=cfg.ray.resolved_storage_path(),
            callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints)),
    )


def _use_gpu(cfg: TrainJobConfig) -> bool:
    import ray

    if cfg.train.device == "cpu":
        return False
    gpus = ray.cluster_resources().get("GPU", 0)
    if cfg.train.device == "cuda" and gpus < cfg.train.num_workers:
        raise ConfigError(f"train.device=cuda needs {cfg.train.num_workers} GPUs; the Ray "
                          f"cluster has {gpus:g}")
    return gpus >= cfg.train.num_workers


def _fit(trainer, payload: WorkerPayload, show_progress: bool):
    """trainer.fit() with the progress line; a failed fit marks the MLflow run FAILED."""
    tc = payload.job.train
    try:
        with follow(payload.tracking_uri, payload.run_id, enabled=show_progress,
                    total=tc.max_steps or None, images_per_step=tc.global_batch_size,
                    log_every=tc.log_every, desc="train"):
            return trainer.fit()
    except Exception:
        # A sweep trial that Tune stops (ASHA) lands here too, possibly after the sweep driver
        # has closed its run as FINISHED: only a real failure may mark the run FAILED.
        if not tune_is_stopping_this_trial():
            tracking.fail_run_if_running(tracking.client(payload.tracking_uri), payload.run_id)
        raise


def _finish(payload: WorkerPayload, result) -> None:
    """Close the MLflow run: FINISHED, or FAILED and TrainingDiverged when the loss diverged."""
    uri, run_id = payload.tracking_uri, payload.run_id
    # Rank 0 tags the run "stopped" on NaN/inf; the tag (not result.metrics, which Ray fills
    # only from reports that carry a checkpoint) tells the driver that training diverged.
    stopped = tracking.client(uri).get_run(run_id).data.tags.get("stopped")
    if stopped or (result.metrics or {}).get("non_finite_loss"):
        tracking.end_run(uri, run_id, "FAILED")
        raise TrainingDiverged(stopped or "the loss became NaN or inf")
    tracking.end_run(uri, run_id, "FINISHED")


def _in_tune_trial() -> bool:
    try:
        from ray.train._internal.session import get_session

        return get_session() is not None
    except Exception:
        return False


def tune_is_stopping_this_trial() -> bool:
    """True inside a Ray Tune trial that Tune is stopping (its fit() then raises as the
    controller goes away); False outside Tune."""
    try:
        from ray.train._internal.session import get_session

        return get_session().stop_event.is_set()
    except Exception:
        return False


# ------------------------------------------------------------------ command line

def _load_and_check_dataset(args) -> TrainJobConfig:
    """What `--print-config` shows: the config, refused exactly as the run would refuse it,
    the dataset's metadata included (reads metadata.json, nothing else)."""
    cfg = load_train_config(args.config, args.overrides)
    check_evaluation(cfg, check_dataset(cfg))
    return cfg


def _cli(args) -> int:
    cfg = load_train_config(args.config, args.overrides)
    try:
        result = run_train(cfg, args.config)
    except TrainingDiverged as e:
        print(f"flowar train: stopped: {e}")
        return 1
    m = result.metrics or {}
    print(f"flowar train: done at step {m.get('step')} (loss {m.get('loss', float('nan')):.4f}); "
          f"EMA model exported to {m.get('export_dir')}; run dir "
          # not result.path: Ray drops the scheme of an object-store storage path (s3://...)
          f"{cfg.ray.resolved_storage_path().rstrip('/')}/{run_name(cfg)}")
    return 0


def register(subparsers) -> None:
    add_job_parser(
        subparsers, "train", run=_cli, load=_load_and_check_dataset, raw_description=True,
        help="train FlowAR on a latent dataset with Ray Train (DDP or FSDP)",
        description="Train FlowAR on a latent pyramid dataset with Ray Train. Re-running with the "
                    "same run name (mlflow.run_name, default derived from the config) resumes from "
                    "the last checkpoint. Example:\n  flowar train configs/train-tiny.yaml "
                    "data.path=./latents train.strategy=fsdp train.max_steps=500",
        config_help="YAML job config (sections: preset, data, model, sampler, train, mlflow, ray)",
        overrides_example="train.max_steps=200 model.scales=[1,2,4]")
