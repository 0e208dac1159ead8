"""The sweep file of `flowar sweep`: a base training config, a search space over its dotted keys,
the metric, the scheduler and per-trial resources; plus the checks run before any trial starts.

    name: table6-injection-tiny
    base: ../train-tiny.yaml            # a `flowar train` config, relative to this file
    overrides: [train.max_steps=40]     # applied to the base before the axes
    search:
      model.injection: {grid: [adaln, addition]}
      train.base_lr: {loguniform: [1.0e-5, 1.0e-2]}
    metric: loss                        # loss, or eval/fid with train.eval_every (ASHA acts on it)
    scheduler: {type: asha, grace_period: 10}
    resources: {workers: 1, cpus_per_worker: 1}

`load_sweep(path, overrides)` reads the file and the command line's overrides into a `SweepJob`,
what `run_sweep` (pipelines/sweep/job.py) runs. Every axis value is checked on the way by
building the trial's full TrainJobConfig (the config's own validation raises, naming the key)
and, for model keys, against the dataset's metadata.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

from flowar.config import ConfigError, to_dict
from pipelines.core.config import (absolute_path, apply_overrides, load_config, parse_overrides,
                                   path_field, path_fields)
from pipelines.data.latents import LatentDataset, check_compatible
from pipelines.train.config import TrainJobConfig, load_train_config
from pipelines.train.job import check_evaluation

__all__ = ["SweepConfig", "SchedulerConfig", "TrialResources", "Axis", "SweepJob", "load_sweep",
           "read_sweep_file", "split_overrides", "parse_axes", "trial_overrides",
           "REPORTED_METRICS", "EVAL_METRICS", "LOSS_CHANGING_KEYS", "validate", "resolved_bases", "trial_config"]

# What the training loop's ray.train.report carries at each checkpoint (all Tune and ASHA can see).
REPORTED_METRICS = ("loss", "lr", "epoch", "step")
# What it adds at every in-training evaluation (train.eval_every, pipelines/train/evaluation.py),
# with the direction in which each is better.
EVAL_METRICS = {"eval/fid": "min", "eval/kid": "min", "eval/class_accuracy": "max"}
# Axes whose values change what the training loss measures (its targets, or their weights): a
# "best loss" across them means nothing, so such a sweep must rank by an evaluation metric.
LOSS_CHANGING_KEYS = ("model.objective", "model.scale_construction", "model.loss_weighting",
                      "model.time_sampling", "model.scales")
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
        parse_axes(self.search)  # the shape of every axis; its values are checked by `validate`
        if self.resources.workers and "train.num_workers" in self.search:
            raise ConfigError("search.train.num_workers and resources.workers both set the worker "
                              "count; keep one")
        if self.metric not in REPORTED_METRICS + tuple(EVAL_METRICS):
            raise ConfigError(f"metric={self.metric!r} is not reported by the training loop; "
                              f"choose one of {', '.join(REPORTED_METRICS + tuple(EVAL_METRICS))}")
        better = EVAL_METRICS.get(self.metric)
        if better and self.mode != better:
            raise ConfigError(f"metric={self.metric} is better when "
                              f"{'lower' if better == 'min' else 'higher'}: set mode: {better}")
        if "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"name={self.name!r} must be a plain name (no '/')")


@dataclass
class Axis:
    key: str
    kind: str
    values: list  # grid/choice: the values; uniform/loguniform: [low, high]

    def tune_domain(self):
        # Ray is imported here, not at the top: this module is on `flowar --help`'s import path
        # (pipelines/sweep/job.py imports it) and Ray takes seconds to import.
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


@dataclass
class SweepJob:
    """A sweep ready to run: what `load_sweep` read and checked, and what `run_sweep` runs."""
    sweep: SweepConfig
    path: str  # the sweep file, logged on the sweep's MLflow parent run
    axes: list[Axis]
    # The trials' base TrainJobConfig without axis values: its MLflow store, Ray storage, data
    # and train.max_steps are the sweep's.
    base: TrainJobConfig
    bases: dict  # preset -> resolved base as a plain dict (`resolved_bases`): what trials build from


# ----------------------------------------------------------------------------- reading the file

def load_sweep(path, overrides=()) -> SweepJob:
    """`flowar sweep PATH [key=value ...]` read and checked before anything starts: `sweep.KEY=V`
    overrides the sweep file, every other override the base training config (`split_overrides`).
    Every path and default is resolved here, in the directory where the user typed the command."""
    sweep_overrides, train_overrides = split_overrides(overrides)
    sweep, base = read_sweep_file(path, sweep_overrides)
    axes, base_cfg, bases = validate(sweep, base, train_overrides)
    return SweepJob(sweep=sweep, path=str(path), axes=axes, base=base_cfg, bases=bases)


def split_overrides(overrides) -> tuple[list[str], list[str]]:
    """`sweep.key=value` goes to the sweep file, everything else to the base training config."""
    overrides = list(overrides)
    sweep = [o[len("sweep."):] for o in overrides if o.startswith("sweep.")]
    return sweep, [o for o in overrides if not o.startswith("sweep.")]


def read_sweep_file(path, sweep_overrides=()) -> tuple[SweepConfig, Path | None]:
    """The sweep file (+ `sweep.`-prefixed overrides) and its base training config's path."""
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


def parse_axes(search: dict) -> list[Axis]:
    """The search space as axes; a malformed axis is refused naming `search.KEY`."""
    return [_parse_axis(str(key), spec) for key, spec in search.items()]


def _parse_axis(key: str, spec) -> Axis:
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
    return Axis(key, kind, list(values))


# ----------------------------------------------------------------------------- trial configs

def trial_overrides(sweep: SweepConfig, params: dict) -> dict:
    """Axis values (and per-trial resources) as a nested override dict on the base config."""
    tree: dict = {}
    for key, value in params.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    resources = []
    if sweep.resources.workers:
        resources.append(f"train.num_workers={sweep.resources.workers}")
    if sweep.resources.gpus_per_worker > 0:
        resources.append("train.device=cuda")
    return apply_overrides(parse_overrides(resources), tree) if resources else tree


def _from_files(sweep: SweepConfig, base: Path | None, cli_overrides, params: dict):
    """A TrainJobConfig read the way `flowar train` reads one: base file, sweep overrides, CLI
    overrides, then `params`. Paths resolve against the cwd: call it on the driver only."""
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


def trial_config(sweep: SweepConfig, bases: dict, params: dict, extra=()) -> TrainJobConfig:
    """A trial's TrainJobConfig: its resolved base (`resolved_bases`), its axis values, then
    `extra` key=value overrides. Reads no file, so it means the same on every process."""
    axes = {k: v for k, v in params.items() if k != "preset"}  # already in its base
    tree = apply_overrides(trial_overrides(sweep, axes), parse_overrides(list(extra)))
    return load_config(TrainJobConfig, None, tree, base=bases[params.get("preset")])


# ----------------------------------------------------------------------------- checks

def validate(sweep: SweepConfig, base: Path | None,
             cli_overrides) -> tuple[list[Axis], TrainJobConfig, dict]:
    """Refuse a bad search space before anything starts; return the axes, the base config and
    the resolved bases the trials build their configs from (`trial_config`).

    Every key must be a config key and every value (each grid/choice value, both range bounds)
    must build a valid trial config, exactly as the trial will build it, and fit its dataset;
    grid x choice combinations are checked together when there are not too many (e.g.
    head=per_token with injection=cross_attention is refused)."""
    axes = parse_axes(sweep.search)
    bases = resolved_bases(sweep, base, cli_overrides, axes)
    base_cfg = trial_config(sweep, bases, {})
    _absolute_path_axes(axes, base_cfg)
    metas: dict = {}
    if "data.path" not in sweep.search:
        # Before the axes: the base alone may not fit the data when an axis sets model keys
        # (e.g. the base's scales end at 4, every scales value of the axis ends at 8).
        # The in-training evaluation's reference, classifier and VAE are checked once here too.
        check_evaluation(base_cfg, _dataset_meta(base_cfg.data.path, metas))
    for params, what, others in _params_to_check(axes):
        _check_trial(sweep, bases, params, what, metas, others)
    _check_asha_length(sweep, base_cfg)
    check_metric(sweep, axes, base_cfg)
    return axes, base_cfg, bases


def check_metric(sweep: SweepConfig, axes, base_cfg: TrainJobConfig) -> None:
    """The sweep's metric must mean the same in every trial and be reported where ASHA looks:
    the loss only across axes that leave it comparable; an eval/* metric only when the trials
    evaluate (train.eval_every), with ASHA's rungs on evaluation steps."""
    tc, sc = base_cfg.train, sweep.scheduler
    changing = [a.key for a in axes if a.key in LOSS_CHANGING_KEYS]
    if sweep.metric == "loss" and changing:
        raise ConfigError(
            f"metric=loss cannot rank this sweep: the training loss is not comparable across values "
            f"of {', '.join(changing)} (they change its targets or their weights). Rank by an "
            "evaluation metric instead: metric: eval/fid (mode: min), with the trials evaluating, "
            "e.g. overrides: [train.eval_every=10, train.eval_reference=fashion-mnist:test]")
    if sweep.metric not in EVAL_METRICS:
        return
    if not tc.eval_every:
        raise ConfigError(f"metric={sweep.metric} is logged by in-training evaluation: set "
                          "train.eval_every (and train.eval_reference) in the base config or the "
                          "sweep's overrides")
    if sweep.metric == "eval/class_accuracy" and not tc.eval_classifier:
        raise ConfigError("metric=eval/class_accuracy needs train.eval_classifier (a folder with "
                          "the Fashion-MNIST classifier)")
    if sweep.metric == "eval/kid" and not tc.eval_kid:
        raise ConfigError("metric=eval/kid needs train.eval_kid=true")
    if sc.type == "asha" and sc.time_attr == "step" and sc.grace_period % tc.eval_every:
        raise ConfigError(f"scheduler.grace_period={sc.grace_period} is not a multiple of "
                          f"train.eval_every={tc.eval_every}: ASHA's rungs must fall on evaluation "
                          f"steps, where {sweep.metric} is reported")


def _absolute_path_axes(axes, cfg) -> None:
    """Axis values that name a place (e.g. a data.path grid) made absolute here, like the base's:
    Tune hands them to trials running in other directories."""
    kinds = {key: kind for key, kind, _, _ in path_fields(cfg)}
    for axis in axes:
        if axis.key in kinds:
            axis.values = [absolute_path(v, kinds[axis.key]) if isinstance(v, str) else v
                           for v in axis.values]


def _dataset_meta(path: str, cache: dict):
    """The latent dataset's metadata, read once per path; refused naming data.path."""
    if path not in cache:
        try:
            cache[path] = LatentDataset(path).meta
        except (ConfigError, OSError) as e:
            raise ConfigError(f"data.path={path}: {e}") from None
    return cache[path]


def _params_to_check(axes) -> Iterator[tuple[dict, str, dict]]:
    """(axis values, how to name them, the other axes' first values) for every value of every
    axis, then every grid x choice combination when there are at most
    MAX_COMBINATIONS_CHECKED of them."""
    for axis in axes:
        others = {a.key: a.values[0] for a in axes if a is not axis}
        for value in axis.checked_values():
            yield {axis.key: value}, f"search.{axis.key}: value {value!r}", others
    sets = [a for a in axes if a.kind in ("grid", "choice")]
    combos = 1
    for a in sets:
        combos *= len(a.values)
    if len(sets) > 1 and combos <= MAX_COMBINATIONS_CHECKED:
        for values in itertools.product(*(a.values for a in sets)):
            params = {a.key: v for a, v in zip(sets, values)}
            yield params, "the combination " + ", ".join(f"{k}={v!r}" for k, v in params.items()), {}


def _check_trial(sweep: SweepConfig, bases: dict, params: dict, what: str, metas: dict,
                 others: dict) -> None:
    """Build the trial config of `params` as the trial will, and check it against its data.
    A value refused on the base alone may still fit beside the other axes' values (a seed on a
    base whose scales only the scales axis makes fit the data): then it is checked with the
    other axes at their first values, a trial the sweep runs, and refused only if that fails too."""
    errors = []
    for tried in ((params, {**others, **params}) if others else (params,)):
        try:
            cfg = trial_config(sweep, bases, tried)
            check_compatible(_dataset_meta(cfg.data.path, metas), cfg.model)
            return
        except ConfigError as e:
            errors.append(e)
    raise ConfigError(f"{what} is refused by the training config: {errors[0]}") from None


def _check_asha_length(sweep: SweepConfig, base_cfg: TrainJobConfig) -> None:
    """ASHA needs max_t, the length of a full trial in time_attr units: its last rung."""
    max_t = sweep.scheduler.max_t or base_cfg.train.max_steps
    if sweep.scheduler.type == "asha" and sweep.scheduler.time_attr == "step" and not max_t:
        raise ConfigError("scheduler.max_t=0 and train.max_steps=0: set one of them so ASHA "
                          "knows the full length of a trial")
