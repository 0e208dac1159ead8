"""MLflow helpers for the jobs: reachability check, start-or-resume by name, params, metrics, images.

Only the driver (run creation, params, status) and world rank 0 (metrics, images, artefacts) call
these; other workers never touch MLflow. Everything goes through an explicit `MlflowClient` and
run id instead of mlflow's global "active run", so a worker restarted by Ray's FailureConfig
simply keeps logging to the same run.
"""

from __future__ import annotations

import posixpath
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

from flowar.config import ConfigError
from pipelines.core.config import dump_yaml, flatten

__all__ = ["check_reachable", "start_or_resume_run", "start_or_resume_child_run", "log_config",
           "log_new_params", "log_metrics", "log_image", "image_steps", "log_artifacts", "end_run",
           "fail_run_if_running", "client", "PARENT_TAG"]

PARENT_TAG = "mlflow.parentRunId"  # MLflow's UI nests a run under the run this tag names
# The UI opens an experiment in the layout its kind names; untagged, MLflow 3's UI may infer its
# GenAI layout (traces, judges). flowar's experiments are model training: runs table, charts,
# compare view.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """Fail at start, with a message naming the URI, when the tracking store cannot be used."""
    scheme = urlsplit(uri).scheme
    if scheme == "sqlite":
        path = Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
        if path is None or not path.is_absolute():
            raise ConfigError(f"mlflow.tracking_uri={uri!r}: use an absolute SQLite path, "
                              "sqlite:////abs/path/mlflow.db (4 slashes)")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"mlflow.tracking_uri={uri!r}: cannot create {path.parent}: {e}") from None
        return
    if scheme in ("http", "https"):
        import requests  # here, not at the top: 0.15 s that `flowar --help` need not pay

        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        except requests.RequestException as e:
            raise ConfigError(f"the MLflow tracking server {uri} is unreachable ({type(e).__name__}:"
                              f" {e}); start it or set mlflow.tracking_uri") from None
        if response.status_code != 200:
            raise ConfigError(f"the MLflow tracking server {uri} answered /health with HTTP "
                              f"{response.status_code}; is it an MLflow server?")
        return
    if scheme in ("", "file"):
        raise ConfigError(f"mlflow.tracking_uri={uri!r}: MLflow 3 refuses file stores; use "
                          "sqlite:////abs/path/mlflow.db or an http(s) server")


def _experiment_id(c, uri: str, name: str, artifact_location: str = "") -> str:
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made by an older flowar, or by hand
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
        return exp.experiment_id
    if not artifact_location and uri.startswith("sqlite:///"):
        # MLflow's default artefact root is relative to the current directory, which differs
        # between the driver and Ray workers; keep artefacts beside the database instead.
        artifact_location = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / name).as_uri()
    return c.create_experiment(name, artifact_location=artifact_location or None,
                               tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})


def start_or_resume_run(uri: str, experiment: str, run_name: str,
                        artifact_location: str = "") -> tuple[str, bool]:
    """The id of the run called `run_name` in `experiment` (created if absent) and whether it existed."""
    c = client(uri)
    exp_id = _experiment_id(c, uri, experiment, artifact_location)
    found = c.search_runs([exp_id], filter_string=f"tags.`mlflow.runName` = '{run_name}'",
                          max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id, True
    run = c.create_run(exp_id, run_name=run_name)
    return run.info.run_id, False


def start_or_resume_child_run(uri: str, parent_id: str, run_name: str,
                              tags: dict[str, str] | None = None) -> tuple[str, bool]:
    """The id of the child run of `parent_id` called `run_name` (created in the parent's
    experiment when absent, with `tags`) and whether it existed. Resuming by name makes a
    re-run of the same work land in the same child instead of a duplicate."""
    c = client(uri)
    exp_id = c.get_run(parent_id).info.experiment_id
    found = c.search_runs([exp_id], filter_string=f"tags.`mlflow.runName` = '{run_name}' and "
                                                  f"tags.`{PARENT_TAG}` = '{parent_id}'",
                          max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id, True
    run = c.create_run(exp_id, run_name=run_name, tags={**(tags or {}), PARENT_TAG: parent_id})
    return run.info.run_id, False


def log_new_params(c, run_id: str, params: dict[str, str]) -> None:
    """Log the params the run does not have yet; MLflow params are immutable, so a value that
    differs from the logged one is recorded as a `changed.<key>` tag instead of failing."""
    from mlflow.entities import Param, RunTag

    existing = c.get_run(run_id).data.params
    new = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
    changed = [RunTag(f"changed.{k}", str(v)) for k, v in params.items()
               if k in existing and existing[k] != str(v)[:6000]]
    for i in range(0, len(new), 100):  # MLflow's batch limit is 100 params
        c.log_batch(run_id, params=new[i:i + 100])
    if changed:
        c.log_batch(run_id, tags=changed)


def log_config(uri: str, run_id: str, cfg, config_path: str | None, tags: dict[str, str]) -> None:
    """Flattened resolved config as params, tags, and the config file + resolved YAML as artefacts.

    A resumed run may be re-launched with a changed value (e.g. more workers); MLflow params are
    immutable, so a changed value is recorded as a `changed.<key>` tag instead of failing."""
    from mlflow.entities import RunTag

    c = client(uri)
    log_new_params(c, run_id, flatten(cfg))
    c.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    with tempfile.TemporaryDirectory() as tmp:
        dump_yaml(cfg, Path(tmp) / "resolved_config.yaml")
        c.log_artifact(run_id, str(Path(tmp) / "resolved_config.yaml"), artifact_path="config")
    if config_path:
        c.log_artifact(run_id, str(config_path), artifact_path="config")


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int, model_id: str = "") -> None:
    """`model_id`: the MLflow logged model these metrics measure (its page lists them)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    c.log_batch(run_id, metrics=[Metric(k, float(v), now, step, model_id=model_id or None)
                                 for k, v in metrics.items()])


def log_image(c, run_id: str, image, key: str, step: int) -> None:
    """`image`: HxWx3 uint8 numpy array, logged as image `key` at `step`: the run's Images
    panel shows one per step with a slider, and the compare view puts runs side by side."""
    c.log_image(run_id, image, key=key, step=step, synchronous=True)


def image_steps(c, run_id: str, key: str) -> list[int]:
    """The steps at which image `key` was logged (log_image's files: images/<key>+step+<N>+...)."""
    prefix = key.replace("/", "~") + "+step+"
    names = (posixpath.basename(a.path) for a in c.list_artifacts(run_id, "images"))
    return sorted(int(n[len(prefix):].split("+")[0]) for n in names
                  if n.startswith(prefix) and n.endswith(".png") and "+compressed" not in n)


def log_artifacts(c, run_id: str, local_dir: str, artifact_path: str) -> None:
    c.log_artifacts(run_id, local_dir, artifact_path=artifact_path)


def end_run(uri: str, run_id: str, status: str) -> None:
    client(uri).set_terminated(run_id, status=status)


def fail_run_if_running(c, run_id: str) -> bool:
    """Mark a run FAILED unless something already ended it (a sweep driver closes the runs of
    trials Tune stopped; a stopped trial's own late error must not overwrite that)."""
    if c.get_run(run_id).info.status != "RUNNING":
        return False
    c.set_terminated(run_id, status="FAILED")
    return True

