"""Where a submitted job writes, decided on the laptop before the upload (`flowar submit`).

On a cluster a relative path means the job's uploaded working directory, which Ray unpacks under
its session temp dir and deletes later. Inputs may be relative (they are read from the upload);
outputs may not. So `job_outputs` reads the job's output fields as given (config file +
overrides, nothing made absolute; pipelines.core.config path fields), `refuse_relative_outputs`
refuses a relative one naming its key, and `cluster_settings_for` checks that the outputs left
empty have a home on the cluster: its FLOWAR_HOME / MLFLOW_TRACKING_URI (set on every node by the
recipes in clusters/), taken from --env or asked of the cluster by a tiny job that prints them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shlex
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from flowar.config import ConfigError
from pipelines.core.config import apply_overrides, parse_overrides
from pipelines.core.storage import is_uri
from pipelines.encode import EncodeConfig
from pipelines.evaluate.job import EvalConfig
from pipelines.quickstart import QuickstartConfig
from pipelines.registry import job_parser
from pipelines.train.config import TrainJobConfig
from pipelines.vae_train import VAETrainConfig

# The cluster settings that job outputs left empty default to (pipelines/core/config.py): FLOWAR_HOME
# for folders (ray_results, eval, the quickstart's home), MLFLOW_TRACKING_URI else
# sqlite under FLOWAR_HOME for the MLflow store.
OUTPUT_SETTINGS = ("FLOWAR_HOME", "MLFLOW_TRACKING_URI")
# Empty outputs whose default a job computes from FLOWAR_HOME while it runs, not through a
# path_field default (evaluate: $FLOWAR_HOME/eval/<settings hash>).
HOME_DEFAULTS_AT_RUN_TIME = {"evaluate": {"output_dir"}}
# Output fields a job's config has but the job never writes (their default needs no checking).
UNUSED_OUTPUTS = {"encode": {"ray.storage_path"}, "evaluate": {"ray.storage_path"}}
# Jobs configured by options instead of a config file: their output options (argparse dests).
OUTPUT_OPTIONS = {"sample": ("out", "images_dir"), "import": ("out",)}


class SubmitError(Exception):
    """Bad input to submit (unknown job, relative output, upload too large, ...), raised before
    the job is uploaded."""



@dataclass
class Output:
    """One place a job writes: `key` as the user types it, `value` as given ('' = default)."""

    key: str
    kind: str  # "output" or "tracking_uri" (pipelines.core.config.PathKind)
    value: str
    needs: str = ""  # for an empty value: the cluster setting its default lives under, if any


def lands_in_working_dir(kind: str, value: str) -> bool:
    """True when `value` is a relative place: on the cluster, inside the job's working dir."""
    if value.startswith("sqlite:///"):  # sqlite:///rel.db is relative, sqlite:////abs.db is not
        path = value[len("sqlite:///"):]
    elif value.startswith("file:"):
        path = value[len("file:"):].removeprefix("//")
    elif is_uri(value) or (kind == "tracking_uri" and (urlsplit(value).scheme
                                                       or value in ("databricks", "databricks-uc"))):
        return False  # s3://, http://, postgresql://, databricks: nothing on the node's disk
    else:
        path = value
    return bool(path) and not path.startswith(("/", "~"))


def _parse_job_args(job: str, job_args: list[str]):
    """The job's arguments parsed by its own subcommand, as `flowar JOB args` would parse them."""
    parser = job_parser()
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            args, extra = parser.parse_known_args([job, *job_args])
    except SystemExit:
        lines = errors.getvalue().strip().splitlines() or ["error: bad arguments"]
        raise SubmitError(f"flowar {job}: {lines[-1].split('error: ', 1)[-1]}") from None
    if extra:  # key=value after options: appended to the overrides, as pipelines.cli.main does
        if not (hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra)):
            raise SubmitError(f"flowar {job}: unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    return args


# The config class of each job that reads a config file. submit reads the file and overrides
# into these classes' path fields without the job's own checks: those may need files that exist
# only on the cluster (an input such as vae.spec=/mnt/cluster_storage/vae); the job checks them
# when it runs.
JOB_CONFIGS = {"train": TrainJobConfig, "encode": EncodeConfig, "vae": VAETrainConfig,
               "evaluate": EvalConfig, "quickstart": QuickstartConfig}


def _config_class(job: str):
    return JOB_CONFIGS["train" if job == "sweep" else job]


def _read_yaml(path: str | Path) -> dict:
    if not Path(path).is_file():
        raise ConfigError(f"config file {str(path)!r} is not in the working directory (submit "
                          f"reads it here to check the job's outputs)")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def _merged(path, overrides: list[str]) -> dict:
    """The config file (if any) with key=value overrides on top, as load_config merges them."""
    return apply_overrides(_read_yaml(path) if path else {}, parse_overrides(overrides))


def _path_fields_in(cls, data: dict, prefix: str = ""):
    """(key, kind, value as given, metadata) of every path field of `cls`, read from `data`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = data.get(f.name) if isinstance(data, dict) else None
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _path_fields_in(hints[f.name], value or {}, f"{prefix}{f.name}.")
        elif f.metadata.get("path"):
            given = value if value is not None else f.default
            yield f"{prefix}{f.name}", f.metadata["path"], str(given or ""), f.metadata


def _config_path_fields(job: str, args) -> list:
    """The path fields of the job's config (file + overrides) as the job will read them."""
    overrides = list(getattr(args, "overrides", None) or [])
    if job == "sweep":  # the sweep file (sweep.KEY=...) and its base training config
        sweep = _merged(args.config, [o[len("sweep."):] for o in overrides if o.startswith("sweep.")])
        base = sweep.get("base") and Path(args.config).parent / sweep["base"]
        train = _merged(base, list(sweep.get("overrides") or []) +
                        [o for o in overrides if not o.startswith("sweep.")])
        storage = str(sweep.get("storage_path") or "")  # empty: the training job's storage path
        return [("sweep.storage_path", "output", storage, {}),
                *_path_fields_in(_config_class(job), train)]
    path = getattr(args, "config", None)
    if path and "=" in path and not Path(path).is_file():  # evaluate: only overrides were given
        path, overrides = None, [path, *overrides]
    return list(_path_fields_in(_config_class(job), _merged(path, overrides)))


def job_outputs(job: str, job_args: list[str], working_dir: Path) -> list[Output]:
    """Every output of `flowar JOB job_args` as given, read in `working_dir` (the upload) as the
    job's driver will read it there. A config file that cannot be read is refused here."""
    args = _parse_job_args(job, job_args)
    if job in OUTPUT_OPTIONS:
        return [Output("--" + dest.replace("_", "-"), "output", getattr(args, dest) or "")
                for dest in OUTPUT_OPTIONS[job]]
    if (job not in JOB_CONFIGS and job != "sweep") or (job == "vae" and not args.vae_command):
        return []  # no outputs (`vae` without a subcommand only prints help)
    try:
        with contextlib.chdir(working_dir):
            fields = _config_path_fields(job, args)
    except ConfigError as e:
        raise SubmitError(f"flowar {job}: configuration error: {e}") from None
    outputs = []
    for key, kind, value, meta in fields:
        if kind not in ("output", "tracking_uri") or key in UNUSED_OUTPUTS.get(job, ()):
            continue
        needs = ""
        if not value and kind == "tracking_uri":
            needs = "MLFLOW_TRACKING_URI"
        elif not value and (meta.get("default_fn") or key in HOME_DEFAULTS_AT_RUN_TIME.get(job, ())):
            needs = "FLOWAR_HOME"
        # any other empty output derives from one checked here (train.export_dir sits under
        # ray.storage_path, a sweep under the training job's) or the job requires it (encode's)
        outputs.append(Output(key, kind, value, needs))
    return outputs


def refuse_relative_outputs(job: str, outputs: list[Output]) -> None:
    bad = [o for o in outputs if o.value and lands_in_working_dir(o.kind, o.value)]
    if bad:
        listed = "\n".join(f"    {o.key}={o.value}" for o in bad)
        raise SubmitError(
            f"refusing to submit `flowar {job}`: these outputs are relative paths, and on the "
            f"cluster a relative path is inside the job's uploaded working directory, which Ray "
            f"deletes after the job:\n{listed}\n  Give an absolute path on storage every node "
            f"shares (e.g. /mnt/cluster_storage/...) or a URI (s3://, gs://; for "
            f"mlflow.tracking_uri also http://... or sqlite:////absolute/path.db).")


PROBE = ("import json, os; print('flowar-cluster-settings', json.dumps("
         f"{{k: os.environ.get(k, '') for k in {OUTPUT_SETTINGS!r}}}))")


def ask_cluster_settings(client, timeout_s: float = 120) -> dict[str, str]:
    """FLOWAR_HOME and MLFLOW_TRACKING_URI as a job driver on the cluster sees them: a tiny job
    with no working_dir (nothing uploaded) prints them; it is deleted once read."""
    job_id = client.submit_job(entrypoint=shlex.join(["python", "-c", PROBE]),
                               metadata={"flowar_job": "settings probe", "submitted_by": "flowar submit"})
    deadline = time.monotonic() + timeout_s  # it needs no resources: only a broken cluster waits
    while not (status := client.get_job_status(job_id)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            raise SubmitError(f"the cluster did not run the settings probe job {job_id} within "
                              f"{timeout_s:g} s; pass --env FLOWAR_HOME=... --env MLFLOW_TRACKING_URI=...")
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    client.delete_job(job_id)
    for line in logs.splitlines():
        if line.startswith("flowar-cluster-settings "):
            return json.loads(line.split(" ", 1)[1])
    raise SubmitError(f"the settings probe job {job_id} {status.value.lower()}: {logs[-1000:]}")


def _setting_problem(name: str, value: str) -> str:
    """Why `value` of FLOWAR_HOME / MLFLOW_TRACKING_URI cannot hold job outputs ('' if it can)."""
    if not value:
        return f"{name} is not set"
    kind = "tracking_uri" if name == "MLFLOW_TRACKING_URI" else "output"
    if lands_in_working_dir(kind, value):
        return f"{name}={value} is relative (inside the job's working directory)"
    if name == "FLOWAR_HOME" and "://" in value:
        return f"{name}={value} is not a filesystem path"  # jobs make folders under it
    return ""


def cluster_settings_for(job: str, outputs: list[Output], env: dict[str, str],
                         ask_cluster) -> dict[str, str]:
    """The FLOWAR_HOME / MLFLOW_TRACKING_URI that the job's empty outputs default to, checked,
    for the job's env: pinned there, the job cannot drift to other values (e.g. a driver placed
    on another node). `env` (--env) wins; `ask_cluster()` is called only when it lacks one."""
    defaulted = [o for o in outputs if o.needs]
    if not defaulted:
        return {}
    settings = {k: env[k] for k in OUTPUT_SETTINGS if env.get(k)}
    if not {o.needs for o in defaulted} <= settings.keys():
        asked = {k: v for k, v in ask_cluster().items() if k in OUTPUT_SETTINGS and v}
        settings = {**asked, **settings}
    home_problem = _setting_problem("FLOWAR_HOME", settings.get("FLOWAR_HOME", ""))
    uri = settings.get("MLFLOW_TRACKING_URI", "")
    # an empty tracking URI means $MLFLOW_TRACKING_URI when set, else sqlite under FLOWAR_HOME
    uri_problem = (_setting_problem("MLFLOW_TRACKING_URI", uri) if uri else
                   home_problem and f"MLFLOW_TRACKING_URI is not set and {home_problem}")
    default = {"FLOWAR_HOME": "under $FLOWAR_HOME",
               "MLFLOW_TRACKING_URI": "$MLFLOW_TRACKING_URI, else sqlite under $FLOWAR_HOME"}
    unmet = [(o, home_problem if o.needs == "FLOWAR_HOME" else uri_problem) for o in defaulted]
    unmet = [f"    {o.key} (empty: {default[o.needs]}): {why}" for o, why in unmet if why]
    if unmet:
        raise SubmitError(
            f"refusing to submit `flowar {job}`: these outputs are not given, so they take their "
            f"default on the cluster, and neither --env nor the cluster names a place for it that "
            f"outlives the job (a relative default is inside the job's working directory, which Ray "
            f"deletes):\n" + "\n".join(unmet) + "\n  Set FLOWAR_HOME (an absolute path on "
            "storage every node shares) and MLFLOW_TRACKING_URI in the environment of the "
            "cluster's nodes (clusters/README.md), or pass them to this job "
            "(--env FLOWAR_HOME=/shared/flowar-runs), or give each key above (an absolute "
            "shared path or a URI).")
    return {k: v for k, v in settings.items() if not _setting_problem(k, v)}
