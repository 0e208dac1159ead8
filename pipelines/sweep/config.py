"""The sweep file of `flowar sweep`: a base training config, a search space over its dotted keys,
the metric, the scheduler and per-trial resources; plus the checks run before any trial starts.

    name: table6-injection-tiny
    base: ../train-tiny.yaml            # a `flowar train` config, relative to this file
    overrides: [train.max_steps=40]     # applied to the base before the axes
    search:
      model.injection: {grid: [adaln, addition]}
      train.base_lr: {loguniform: [1.0e-5, 1.0e-2]}
    metric: loss                        # a metric the training loop reports (ASHA acts on it)
    scheduler: {type: asha, grace_period: 10}
    resources: {workers: 1, cpus_per_worker: 1}

Every axis value is checked by building the trial's full TrainJobConfig (the config's own
validation raises, naming the key) and, for model keys, against the dataset's metadata.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flowar.config import ConfigError
from pipelines.core.config import path_field

__all__ = ["SweepConfig", "SchedulerConfig", "TrialResources", "Axis", "load_sweep",
           "trial_overrides", "REPORTED_METRICS", "validate", "resolved_bases", "trial_config"]

# What the training loop's ray.train.report carries at each checkpoint (all Tune and ASHA can see).
REPORTED_METRICS = ("loss", "lr", "epoch", "step")
KINDS = ("grid", "choice", "uniform", "loguniform")
# Above this many grid x choice combinations only each value is checked on its own.
MAX_COMBINATIONS_CHECKED = 512


@dataclass
class SchedulerConfig:
    type: Literal["asha", "none"] = "asha"
    time_attr: Literal["step", "epoch", "training_iteration"] = "step"  # step survives a resume
    max_t: int = 0  # 0: the base config's train.max_steps
    grace_period: int = 1  # in time_attr units: no trial is stopped before this
    reduction_factor: float = 2.0
    brackets: int = 1

    def __post_init__(self):
        if self.grace_period < 1 or self.max_t < 0 or self.brackets < 1:
            raise ConfigError("sweep scheduler: grace_period and brackets must be >= 1, max_t >= 0")
        if self.reduction_factor <= 1:
            raise ConfigError(f"scheduler.reduction_factor={self.reduction_factor} must be > 1")


@dataclass
class TrialResources:
    workers: int = 0  # Ray Train workers per trial; 0: train.num_workers of the config
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # > 0 sets train.device=cuda
    # The trial's own process only waits on Ray Train; Tune needs a non-empty bundle for it.
    trial_cpus: float = 0.1

    def __post_init__(self):
        if self.workers < 0 or self.cpus_per_worker < 0 or self.gpus_per_worker < 0:
            raise ConfigError("sweep resources must not be negative")
        if self.trial_cpus <= 0:
            raise ConfigError(f"resources.trial_cpus={self.trial_cpus} must be > 0 (e.g. 0.1)")


@dataclass
class SweepConfig:
    name: str = ""  # empty: the sweep file's stem; names the MLflow parent run and Tune dir
    base: str = ""  # a flowar train YAML, relative to the sweep file; empty: the defaults
    overrides: list[str] = field(default_factory=list)  # key=value on the base config
    search: dict = field(default_factory=dict)  # dotted key -> {grid|choice|uniform|loguniform: ...}
    metric: str = "loss"
    mode: Literal["min", "max"] = "min"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_samples: int = 1  # repeats of the grid; samples of choice/uniform axes
    max_concurrent_trials: int = 1
    seed: int = 0  # random search state (choice/uniform/loguniform)
    resources: TrialResources = field(default_factory=TrialResources)
    storage_path: str = path_field("output")  # Tune's experiment root; empty: the training job's

    def __post_init__(self):
        if self.num_samples < 1 or self.max_concurrent_trials < 1:
            raise ConfigError("sweep num_samples and max_concurrent_trials must be >= 1")
        if not self.search:
            raise ConfigError("the sweep has no search space: add `search:` with at least one key")
        if self.metric not in REPORTED_METRICS:
            raise ConfigError(f"metric={self.metric!r} is not reported by the training loop; "
                              f"choose one of {', '.join(REPORTED_METRICS)}")
        if "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"name={self.name!r} must be a plain name (no '/')")


@dataclass
class Axis:
    key: str
    kind: str
    values: list  # grid/choice: the values; uniform/loguniform: [low, high]

    def tune_domain(self):
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(self.values)
        if self.kind == "choice":
            return tune.choice(self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        return tune.loguniform(*self.values)

    def checked_values(self) -> list:
        return list(self.values)  # bounds of a range, every value of a set


def parse_axes(search: dict) -> list[Axis]:
    axes = []
    for key, spec in search.items():
        where = f"search.{key}"
        if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
            raise ConfigError(f"{where}: expected one of {{grid: [...]}}, {{choice: [...]}}, "
                              f"{{uniform: [low, high]}}, {{loguniform: [low, high]}}; got {spec!r}")
        kind, values = next(iter(spec.items()))
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{kind}: expected a non-empty list, got {values!r}")
        if kind in ("uniform", "loguniform"):
            if len(values) != 2 or not all(isinstance(v, (int, float)) for v in values):
                raise ConfigError(f"{where}.{kind}: expected [low, high] numbers, got {values!r}")
            low, high = values
            if not low < high or (kind == "loguniform" and low <= 0):
                raise ConfigError(f"{where}.{kind}={values}: need {'0 < ' if kind == 'loguniform' else ''}"
                                  "low < high")
        axes.append(Axis(str(key), kind, list(values)))
    return axes


def load_sweep(path, sweep_overrides=()) -> tuple[SweepConfig, Path | None]:
    """The sweep file (+ `sweep.`-prefixed overrides) and its base training config's path."""
    from pipelines.core.config import load_config

    sweep = load_config(SweepConfig, path, list(sweep_overrides))
    if not sweep.name:
        sweep.name = Path(path).stem
    base = None
    if sweep.base:
        base = Path(sweep.base)
        if not base.is_absolute():
            base = (Path(path).resolve().parent / base).resolve()
        if not base.is_file():
            raise ConfigError(f"base={sweep.base!r}: training config {str(base)!r} does not exist")
    return sweep, base


def trial_overrides(sweep: SweepConfig, params: dict) -> dict:
    """Axis values (and per-trial resources) as a nested override dict on the base config."""
    from pipelines.core.config import parse_overrides

    tree: dict = {}
    for key, value in params.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    resources = {}
    if sweep.resources.workers:
        resources["train.num_workers"] = sweep.resources.workers
    if sweep.resources.gpus_per_worker > 0:
        resources["train.device"] = "cuda"
    if resources:
        from pipelines.core.config import apply_overrides

        tree = apply_overrides(parse_overrides([f"{k}={v}" for k, v in resources.items()]), tree)
    return tree


def _from_files(sweep: SweepConfig, base: Path | None, cli_overrides, params: dict):
    """A TrainJobConfig read the way `flowar train` reads one: base file, sweep overrides, CLI
    overrides, then `params`. Paths resolve against the cwd: call it on the driver only."""
    from pipelines.core.config import apply_overrides, parse_overrides
    from pipelines.train.job import load_train_config

    tree = parse_overrides(list(sweep.overrides) + list(cli_overrides))
    return load_train_config(base, apply_overrides(tree, trial_overrides(sweep, params)))


def resolved_bases(sweep: SweepConfig, base: Path | None, cli_overrides, axes) -> dict:
    """The trials' base configs as plain dicts, read once here on the driver: every path absolute
    against the user's directory, every default (MLflow store, Ray storage) filled.

    A trial runs in Ray's per-trial directory, where re-reading the files would put a relative
    data.path or the default ./flowar-runs/mlflow.db somewhere else. Keyed by preset: the key
    None is the base itself; when `preset` is an axis each of its values gets its own base,
    because a preset fills the model section *under* the files (a resolved dict already holds
    every model key, so setting `preset` on it later would change nothing)."""
    from flowar.config import to_dict

    try:
        bases = {None: to_dict(_from_files(sweep, base, cli_overrides, {}))}
    except ConfigError as e:
        raise ConfigError(f"base config {str(base) if base else '(defaults)'} with overrides: {e}") \
            from None
    for value in next((a.values for a in axes if a.key == "preset"), []):
        try:
            bases[value] = to_dict(_from_files(sweep, base, cli_overrides, {"preset": value}))
        except (ConfigError, TypeError) as e:  # TypeError: an unhashable value such as a list
            raise ConfigError(f"search.preset: value {value!r} is refused by the training "
                              f"config: {e}") from None
    return bases


def trial_config(sweep: SweepConfig, bases: dict, params: dict, extra=()):
    """A trial's TrainJobConfig: its resolved base (`resolved_bases`), its axis values, then
    `extra` key=value overrides. Reads no file, so it means the same on every process."""
    from pipelines.core.config import apply_overrides, load_config, parse_overrides
    from pipelines.train.job import TrainJobConfig

    axes = {k: v for k, v in params.items() if k != "preset"}  # already in its base
    tree = apply_overrides(trial_overrides(sweep, axes), parse_overrides(list(extra)))
    return load_config(TrainJobConfig, None, tree, base=bases[params.get("preset")])


def _absolute_path_axes(axes, cfg) -> None:
    """Axis values that name a place (e.g. a data.path grid) made absolute here, like the base's:
    Tune hands them to trials running in other directories."""
    from pipelines.core.config import absolute_path, path_fields

    kinds = {key: kind for key, kind, _, _ in path_fields(cfg)}
    for axis in axes:
        if axis.key in kinds:
            axis.values = [absolute_path(v, kinds[axis.key]) if isinstance(v, str) else v
                           for v in axis.values]


def _dataset_meta(path: str, cache: dict):
    """The latent dataset's metadata, read once per path; refused naming data.path."""
    from pipelines.data.latents import LatentDataset

    if path not in cache:
        try:
            cache[path] = LatentDataset(path).meta
        except (ConfigError, OSError) as e:
            raise ConfigError(f"data.path={path}: {e}") from None
    return cache[path]


def validate(sweep: SweepConfig, base: Path | None, cli_overrides) -> tuple[list[Axis], Any, dict]:
    """Refuse a bad search space before anything starts; return the axes, the base config and
    the resolved bases the trials build their configs from (`trial_config`).

    Every key must be a config key and every value (each grid/choice value, both range bounds)
    must build a valid trial config, exactly as the trial will build it, and fit its dataset;
    grid x choice combinations are checked together when there are not too many (e.g.
    head=per_token with injection=cross_attention is refused)."""
    from pipelines.data.latents import check_compatible

    axes = parse_axes(sweep.search)
    if sweep.resources.workers and "train.num_workers" in sweep.search:
        raise ConfigError("search.train.num_workers and resources.workers both set the worker "
                          "count; keep one")
    bases = resolved_bases(sweep, base, cli_overrides, axes)
    base_cfg = trial_config(sweep, bases, {})
    _absolute_path_axes(axes, base_cfg)
    metas: dict = {}
    if "data.path" not in sweep.search:
        # Before the axes: the base alone may not fit the data when an axis sets model keys
        # (e.g. the base's scales end at 4, every scales value of the axis ends at 8).
        _dataset_meta(base_cfg.data.path, metas)

    def check(params: dict, what: str):
        try:
            cfg = trial_config(sweep, bases, params)
            check_compatible(_dataset_meta(cfg.data.path, metas), cfg.model)
        except ConfigError as e:
            raise ConfigError(f"{what} is refused by the training config: {e}") from None
        return cfg

    for axis in axes:
        for value in axis.checked_values():
            check({axis.key: value}, f"search.{axis.key}: value {value!r}")
    sets = [a for a in axes if a.kind in ("grid", "choice")]
    combos = 1
    for a in sets:
        combos *= len(a.values)
    if len(sets) > 1 and combos <= MAX_COMBINATIONS_CHECKED:
        for values in itertools.product(*(a.values for a in sets)):
            params = {a.key: v for a, v in zip(sets, values)}
            check(params, "the combination " + ", ".join(f"{k}={v!r}" for k, v in params.items()))
    max_t = sweep.scheduler.max_t or base_cfg.train.max_steps
    if sweep.scheduler.type == "asha" and sweep.scheduler.time_attr == "step" and not max_t:
        raise ConfigError("scheduler.max_t=0 and train.max_steps=0: set one of them so ASHA "
                          "knows the full length of a trial")
    return axes, base_cfg, bases
