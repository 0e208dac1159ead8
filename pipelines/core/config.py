"""The one configuration system of every job: dataclasses, YAML files and key=value overrides.

Each job module (encode, train, evaluate, sweep, vae_train) defines its top-level dataclass out of
the sections below and flowar's model/sampler configs, then calls `load_config(JobConfig, path,
overrides)`. Unknown keys anywhere are errors naming the dotted key; values are typed.

    flowar train configs/quickstart.yaml train.max_steps=200 model.scales=[1,2,4,8]

Paths. A field declared with `path_field` names a place (a dataset, an output folder, a store).
`load_config` makes every such value absolute against the directory the user typed the command
in, and fills the defaults that depend on that directory or on $FLOWAR_HOME ($FLOWAR_HOME, else
./flowar-runs), so the config that reaches Ray workers, Tune trials and child runs means the same
place on every process: a Ray worker's working directory is not the user's. URIs (s3://, ...)
are kept as they are. `flowar submit` reads job configs with `paths_as_given()` instead: there a
relative path means relative to the uploaded working directory (see pipelines/submit/job.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import yaml

from flowar.config import ConfigError, from_dict, to_dict
from pipelines.core.storage import is_uri

__all__ = ["ConfigError", "MLflowConfig", "RayConfig", "load_config", "read_yaml_mapping",
           "parse_overrides", "apply_overrides", "flatten", "dump_yaml", "config_hash", "default_tracking_uri",
           "add_print_config", "add_job_parser", "flowar_home", "path_field", "resolve_paths", "path_fields",
           "paths_as_given", "absolute_path", "default_storage_path", "local_tracking_uri",
           "HOME_DEFAULT", "RAY_RESULTS"]

# What a path field names, which decides how a relative value is read:
#   input        a file or folder that must exist (a dataset, a checkpoint, a weights file)
#   output       a place a job writes (its default, when empty, is under $FLOWAR_HOME)
#   input_or_id  a local path or a hub id (org/name): made absolute only when it is a local path
#   reference    an evaluation reference: 'fashion-mnist[:split]', 'folder:PATH', PATH or .npz
#   tracking_uri an MLflow URI; sqlite:///relative.db becomes sqlite:////abs/relative.db
PathKind = Literal["input", "output", "input_or_id", "reference", "tracking_uri"]


# The one spelling of the places under $FLOWAR_HOME: every job's defaults (and the folders
# `flowar submit` never uploads) come from these.
HOME_DEFAULT = "flowar-runs"  # $FLOWAR_HOME when unset, relative to where the command runs
RAY_RESULTS = "ray_results"  # Ray Train/Tune storage of every job (training, sweeps, the VAE)
MLFLOW_DB = "mlflow.db"  # the local MLflow store


def flowar_home() -> Path:
    """Where jobs write by default: $FLOWAR_HOME, else ./flowar-runs (absolute)."""
    return Path(os.environ.get("FLOWAR_HOME") or HOME_DEFAULT).expanduser().absolute()


def local_tracking_uri(home: str | os.PathLike) -> str:
    """The SQLite MLflow store under `home` (absolute path: sqlite:////abs/path, see
    docs/stack-facts.md, "SQLite URIs")."""
    return f"sqlite:///{Path(home).absolute() / MLFLOW_DB}"


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI when set (cluster pods point it at the cluster's MLflow server, see
    clusters/), else the local SQLite store under $FLOWAR_HOME."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return _absolute_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
    return local_tracking_uri(flowar_home())


def default_storage_path() -> str:
    """Ray Train/Tune storage when the config leaves it empty: $FLOWAR_HOME/ray_results."""
    return str(flowar_home() / RAY_RESULTS)


def path_field(kind: PathKind, default: str = "", *, default_fn: Callable[[], str] | None = None):
    """A config field that names a place; `default_fn` fills it when empty (at config read)."""
    return field(default=default, metadata={"path": kind, "default_fn": default_fn})


@dataclass
class MLflowConfig:
    # empty: $MLFLOW_TRACKING_URI, else sqlite:////<$FLOWAR_HOME>/mlflow.db (filled at config read)
    tracking_uri: str = path_field("tracking_uri", default_fn=default_tracking_uri)
    experiment: str = "flowar"
    run_name: str = ""
    artifact_location: str = path_field("output")  # e.g. s3://bucket/mlflow; empty: beside the store
    # flowar train: also register the logged model under this name (a new version); empty: not
    register_model: str = ""
    # seconds between samples of MLflow's system metrics (CPU, memory, GPU) per node; 0: none
    system_metrics_every: float = 10.0

    def __post_init__(self):
        if self.system_metrics_every < 0:
            raise ConfigError(f"mlflow.system_metrics_every={self.system_metrics_every}: seconds "
                              "between samples, >= 0 (0 turns system metrics off)")

    def resolved_uri(self) -> str:
        return self.tracking_uri or default_tracking_uri()


@dataclass
class RayConfig:
    address: str = ""  # empty: start a local Ray (or use RAY_ADDRESS when set)
    num_cpus: int = 0  # local Ray only; 0 lets Ray count the machine's cores
    # Ray Train/Tune storage; must be shared storage on a multi-node cluster.
    # Empty: <$FLOWAR_HOME>/ray_results (filled at config read).
    storage_path: str = path_field("output", default_fn=default_storage_path)

    def resolved_storage_path(self) -> str:
        return self.storage_path or default_storage_path()


# ------------------------------------------------------------------------------------------------
# Paths: resolved once, where the user typed the command
# ------------------------------------------------------------------------------------------------

_RESOLVE = {"on": True}


@contextlib.contextmanager
def paths_as_given():
    """Read configs without making paths absolute or filling path defaults (flowar submit: the
    job's own driver resolves them on the cluster, against the uploaded working directory)."""
    before = _RESOLVE["on"]
    _RESOLVE["on"] = False
    try:
        yield
    finally:
        _RESOLVE["on"] = before


def _absolute_tracking_uri(uri: str, cwd: Path | None = None) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(cwd or Path.cwd()) / uri[len('sqlite:///'):]}"
    return uri


def absolute_path(value: str, kind: PathKind = "input", cwd: Path | None = None) -> str:
    """`value` as the same place seen from any directory (URIs and hub ids unchanged)."""
    cwd = Path(cwd or Path.cwd())
    if kind == "tracking_uri":
        return _absolute_tracking_uri(value, cwd)
    if not value or is_uri(value):
        return value
    if kind == "reference":
        if value.startswith("fashion-mnist"):
            return value
        if value.startswith("folder:"):
            return "folder:" + absolute_path(value[len("folder:"):], "input", cwd)
    if value.startswith("file://"):
        value = value[len("file://"):]
    if kind == "input_or_id" and not _looks_local(value, cwd):
        return value  # a hub id such as org/name or org/name:subfolder
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else cwd / path)


def _looks_local(value: str, cwd: Path) -> bool:
    return (value.startswith((".", "/", "~")) or (cwd / value).exists()
            or value.count("/") != 1 or Path(value).suffix in (".ckpt", ".pt", ".pth", ".safetensors"))


def path_fields(cfg, prefix: str = ""):
    """(dotted key, kind, value, metadata) for every path field of a (nested) config dataclass."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from path_fields(value, f"{prefix}{f.name}.")
        elif f.metadata.get("path"):
            yield f"{prefix}{f.name}", f.metadata["path"], value, f.metadata


def resolve_paths(cfg, cwd: Path | None = None):
    """Make every path field of `cfg` absolute and fill the path defaults; returns `cfg`."""
    for key, kind, value, meta in list(path_fields(cfg)):
        owner = cfg
        *parents, name = key.split(".")
        for part in parents:
            owner = getattr(owner, part)
        if not value and meta.get("default_fn"):
            value = meta["default_fn"]()
        object.__setattr__(owner, name, absolute_path(value, kind, cwd))
    return cfg


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict:
    """["a.b=1", "c=[1,2]"] -> {"a": {"b": 1}, "c": [1, 2]} with YAML typing of each value."""
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (example: train.lr=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        node[parts[-1]] = value
    return tree


def apply_overrides(data: dict, overrides: dict) -> dict:
    """Deep-merge overrides into data (dicts merge, everything else replaces)."""
    out = dict(data)
    for k, v in overrides.items():
        out[k] = apply_overrides(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml_mapping(path: str | os.PathLike) -> dict:
    """A config file's top-level mapping; ConfigError naming the file when it is missing, not
    YAML, or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def load_config(cls, path: str | os.PathLike | None = None, overrides=(), base: dict | None = None):
    """YAML file (optional) + base dict + key=value overrides -> a validated `cls` instance."""
    data = dict(base or {})
    if path is not None:
        data = apply_overrides(data, read_yaml_mapping(path))
    if isinstance(overrides, dict):
        data = apply_overrides(data, overrides)
    else:
        data = apply_overrides(data, parse_overrides(list(overrides)))
    cfg = from_dict(cls, data)
    return resolve_paths(cfg) if _RESOLVE["on"] else cfg


def add_print_config(parser, load) -> None:
    """Give a job's subcommand `--print-config`; `load(args)` returns its resolved config."""
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key: defaults, then the file, then "
                             "the overrides) as YAML and exit without running anything")
    parser.set_defaults(load_config=load)


def add_job_parser(subparsers, name: str, *, run, load, help: str, description: str,
                   config_help: str | None, overrides_example: str, epilog: str | None = None,
                   config_optional: bool = False, raw_description: bool = False):
    """The subcommand of one config-driven job: `flowar NAME CONFIG [key=value ...]
    [--print-config]`. `run(args)` runs it (the job's `_cli`), `load(args)` builds its config.
    `config_help=None`: no CONFIG argument (a job configured by overrides alone, e.g. the
    quickstart). `raw_description`: keep the description's line breaks (a module docstring).
    Returns the parser, for the job's own extra options."""
    formatter = argparse.RawDescriptionHelpFormatter if raw_description else argparse.HelpFormatter
    parser = subparsers.add_parser(name, help=help, description=description, epilog=epilog,
                                   formatter_class=formatter)
    if config_help is not None:
        parser.add_argument("config", nargs="?" if config_optional else None, help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"dotted-key overrides of the config, e.g. {overrides_example}")
    parser.set_defaults(func=run)
    add_print_config(parser, load)
    return parser


def flatten(obj, prefix: str = "") -> dict[str, str]:
    """Dataclass or dict -> {"model.ar_width": "768", ...} for MLflow params."""
    data = to_dict(obj) if not isinstance(obj, dict) else obj
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def dump_yaml(obj, path: str | os.PathLike) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(to_dict(obj), sort_keys=True).encode()).hexdigest()[:12]
