"""The one configuration system of every job: dataclasses, YAML files and key=value overrides.

Each job module (encode, train, evaluate, sweep, vae_train) defines its top-level dataclass out of
the sections below and flowar's model/sampler configs, then calls `load_config(JobConfig, path,
overrides)`. Unknown keys anywhere are errors naming the dotted key; values are typed.

    flowar train configs/quickstart.yaml train.max_steps=200 model.scales=[1,2,4,8]
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from flowar.config import ConfigError, from_dict, to_dict

__all__ = ["ConfigError", "MLflowConfig", "RayConfig", "load_config", "parse_overrides",
           "apply_overrides", "flatten", "dump_yaml", "config_hash", "default_tracking_uri",
           "add_print_config"]


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI when set (cluster pods point it at the cluster's MLflow server, see
    clusters/), else a local SQLite store (absolute path: sqlite:////abs/path, see ray-stack-facts)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(os.environ.get("FLOWAR_HOME", Path.cwd() / "flowar-runs")).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


@dataclass
class MLflowConfig:
    tracking_uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else SQLite under $FLOWAR_HOME
    experiment: str = "flowar"
    run_name: str = ""
    artifact_location: str = ""  # e.g. s3://bucket/mlflow; empty: next to the store

    def resolved_uri(self) -> str:
        return self.tracking_uri or default_tracking_uri()


@dataclass
class RayConfig:
    address: str = ""  # empty: start a local Ray (or use RAY_ADDRESS when set)
    num_cpus: int = 0  # local Ray only; 0 lets Ray count the machine's cores
    storage_path: str = ""  # Ray Train/Tune storage; must be shared storage on a multi-node cluster


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


def load_config(cls, path: str | os.PathLike | None = None, overrides=(), base: dict | None = None):
    """YAML file (optional) + base dict + key=value overrides -> a validated `cls` instance."""
    data = dict(base or {})
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
        data = apply_overrides(data, loaded)
    if isinstance(overrides, dict):
        data = apply_overrides(data, overrides)
    else:
        data = apply_overrides(data, parse_overrides(list(overrides)))
    return from_dict(cls, data)


def add_print_config(parser, load) -> None:
    """Give a job's subcommand `--print-config`; `load(args)` returns its resolved config."""
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (every key: defaults, then the file, then "
                             "the overrides) as YAML and exit without running anything")
    parser.set_defaults(load_config=load)


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
