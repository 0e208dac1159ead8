"""`flowar evaluate`: FID, IS, KID and precision/recall of a trained model, sharded over Ray.

    flowar evaluate configs/eval-fashion-mnist.yaml generation.checkpoint=runs/export sampler.cfg=2.0

Generation and Inception features run in Ray actors (GPU when the cluster has one), each of which
finds its Inception weights on its own node. Every sample is defined by its global index, shards
are fixed index ranges, and each finished shard is written to the output folder, so the result
does not depend on the number of workers and a killed evaluation resumes where it stopped.
Workers return mergeable float64 statistics, which the driver adds to one running total in shard
order as they arrive (pipelines/evaluate/fold.py): its memory does not grow with the samples or
the reference. KID and precision/recall use bounded, seeded feature subsets
(metrics.feature_subset_size), recorded in the report; the metrics are torch-fidelity's formulas.
Reference statistics come from an image source (computed by the same actors, cached by source,
extractor and resolution) or an ADM-style .npz. The export, the reference and the output folder
are local paths or storage URIs (s3://...).

MLflow: each evaluation is its own run, a child of the export's training run (or of run_id=,
or of a run named eval-<export folder> in mlflow.experiment when the store has no training run),
named after its sampler settings and a hash of everything that decides its numbers, e.g.
`eval cfg=2 gh=0.9 steps=25 [ab12cd34]`. Re-running the same evaluation resumes that child;
another sampler setting is another child, so no evaluation overwrites another. The child holds
the metrics at the checkpoint step, the settings as params, report.json and samples.png.

Sampler grids: a list for sampler keys evaluates every combination (the cartesian product, in
the order given), each as its own child run, sharing the cached reference statistics:

    flowar evaluate CONFIG generation.checkpoint=runs/export 'sampler.cfg=[1.5,2,3,4]' \\
        'sampler.guidance_high=[0.7,0.9]' 'sampler.num_steps=[10,25]'

(or lists in the config file's sampler: section). Every combination is checked before any
work. With output_dir= each combination gets a subfolder of it. At the end: a table (printed,
and logged on the parent run), a plot of FID against sampler.cfg, and the lowest-FID setting
written beside the export as <checkpoint>/sampler.json. Only sampler keys take lists, and a
grid needs metrics.fid=true (the best setting is chosen by FID).

Sampler defaults: when <checkpoint>/sampler.json exists, the sampler section starts from it;
the config file's sampler keys, then the command line, override it (sampler.json < config
file < command line). One line says which values came from it. `flowar sample` does the same.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import sys
import tempfile
from pathlib import Path

from flowar.config import ConfigError, SamplerConfig, to_dict
from pipelines.core import tracking
from pipelines.core.config import add_job_parser, flowar_home
from pipelines.core.ray_runtime import init_ray
from pipelines.core.source import flowar_command, source_tags
from pipelines.evaluate import search
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.export import (check_sampler_for_export, checked_export, checkpoint_identity,
                                       generator_spec, read_training_link)

# EvalConfig, read_training_link and check_sampler_for_export are imported from here by the
# quickstart and `flowar sample`: this module is the evaluation's public face.
__all__ = ["run_evaluate", "EvalConfig", "read_training_link", "check_sampler_for_export",
           "register"]


def run_evaluate(cfg: EvalConfig) -> dict:
    """Run one evaluation; returns the report (also written to <output_dir>/report.json).
    A sampler grid is a loop over this (pipelines/evaluate/search.py)."""
    # Ray, torch and MLflow load here, not at import: `flowar --help` imports this module.
    from pipelines.evaluate import shards
    from pipelines.evaluate.metrics import requested_metrics

    g = cfg.generation
    ckpt = checked_export(g.checkpoint, "generation.checkpoint=")
    generator = generator_spec(ckpt, cfg.sampler, vae=g.vae, seed=g.seed,
                               samples_per_class=g.samples_per_class, use_ema=g.use_ema)
    link = read_training_link(ckpt)
    parent_id, parent_note = resolve_run(cfg, link)
    spec = check_reference(cfg.reference)  # a bad reference fails now, not after 50,000 samples

    init_ray(cfg.ray)
    # Each worker finds its Inception weights on its own node; they must agree (start_workers).
    workers, worker_info, extractor = shards.start_workers(
        cfg, generator, len(shards.index_shards(g.num_samples, g.shard_size)))
    try:
        settings = evaluation_settings(cfg, ckpt, generator, extractor)
        out = prepare_output_dir(cfg, settings)
        generated, run = shards.generate(cfg, workers, out.child("shards"), grid_indices(cfg),
                                         settings["keep_features"], settings["logits"])
        resolution = cfg.reference.resolution or generated["resolution"]
        reference = shards.compute_reference(cfg, workers, extractor, resolution,
                                             settings["keep_features"], spec)
    finally:  # finished shards are in the output folder: a rerun resumes from them
        shards.kill(workers)
    results = requested_metrics(cfg.metrics, generated, reference)
    step = cfg.step if cfg.step >= 0 else int(link.get("step", 0))
    done = {"generated": generated, "reference": reference, "run": run, "extractor": extractor,
            "resolution": resolution, "workers": worker_info}
    mlflow = open_child_run(cfg, ckpt, parent_id, parent_note, settings)
    mlflow["training_run_id"] = link.get("run_id", "")
    report = build_report(cfg, results, done, settings, step, out, mlflow)
    publish(cfg, report, generated["grid"], out, {"model_id": link.get("model_id", ""), "reference": spec})
    shards.print_table(results, report)
    return report


# ------------------------------------------------------------------------------------------------
# The steps, in the order they run
# ------------------------------------------------------------------------------------------------

def resolve_run(cfg: EvalConfig, link: dict) -> tuple[str, str]:
    """(the parent run of the evaluation's child run, or "" for a run found or made by name at
    the end; a note saying which). An explicit run_id must exist in the store; the export's
    training run is used when this store has it."""
    run_id = cfg.run_id or link.get("run_id", "")
    if not run_id:
        return "", "a run named after the export (no training run recorded)"
    uri = cfg.mlflow.resolved_uri()
    try:
        tracking.client(uri).get_run(run_id)
        return run_id, "run_id" if cfg.run_id else "the export's training run"
    except Exception:  # noqa: BLE001 (mlflow raises MlflowException or a store error)
        if cfg.run_id:
            raise ConfigError(f"run_id={run_id!r} is not a run of the MLflow store {uri}") from None
        return "", f"a run named after the export (training run {run_id} is not in {uri})"


def open_child_run(cfg: EvalConfig, ckpt: str, parent_id: str, note: str, settings: dict) -> dict:
    """Create, or resume by name, the evaluation's own MLflow run: a child of `parent_id`, else
    of a run named eval-<export folder> (mlflow.run_name when set) in mlflow.experiment. Its
    name is the sampler settings and a hash of everything that decides the numbers, so the same
    evaluation run again lands in the same child and another one never overwrites it."""
    uri = cfg.mlflow.resolved_uri()
    if not parent_id:
        name = cfg.mlflow.run_name or f"eval-{posixpath.basename(ckpt.rstrip('/'))}"
        parent_id, _ = tracking.start_or_resume_run(uri, cfg.mlflow.experiment, name,
                                                    cfg.mlflow.artifact_location)
        tracking.end_run(uri, parent_id, "FINISHED")  # it only groups evaluations: nothing runs in it
    key = settings_key(result_identity(cfg, settings))[:8]
    name = child_run_name(cfg.sampler, key)
    tags = {"flowar.evaluation": key, **source_tags(flowar_command("evaluate", ckpt))}
    run_id, resumed = tracking.start_or_resume_child_run(uri, parent_id, name, tags)
    return {"run_id": run_id, "run_name": name, "resumed": resumed, "parent_run_id": parent_id,
            "parent": note}


def result_identity(cfg: EvalConfig, settings: dict) -> dict:
    """What decides an evaluation's numbers: the generated shards' settings, the reference and
    the metrics' settings (one child run per distinct identity)."""
    r = cfg.reference
    return {**settings, "reference": [r.source, r.resolution, r.max_images],
            "metrics": to_dict(cfg.metrics)}


# Short names of the sampler keys in child run names; the others appear when not the default.
_SHORT = {"cfg": "cfg", "guidance_high": "gh", "num_steps": "steps", "guidance_low": "gl",
          "cfg_schedule": "schedule", "time_grid": "grid", "solver": "solver"}


def child_run_name(sampler: SamplerConfig, key: str) -> str:
    """e.g. `eval cfg=2 gh=0.9 steps=25 [ab12cd34]`."""
    values, default = to_dict(sampler), to_dict(SamplerConfig())
    shown = [k for k in _SHORT if k in ("cfg", "guidance_high", "num_steps") or values[k] != default[k]]
    text = " ".join(f"{_SHORT[k]}={values[k]:g}" if isinstance(values[k], float) else
                    f"{_SHORT[k]}={values[k]}" for k in shown)
    return f"eval {text} [{key}]"


def child_params(cfg: EvalConfig, ckpt: str) -> dict:
    """The child run's params: the sampler settings and what the numbers were measured on."""
    g = cfg.generation
    return {**{f"sampler.{k}": v for k, v in to_dict(cfg.sampler).items()},
            "generation.num_samples": g.num_samples, "generation.seed": g.seed,
            "reference.source": cfg.reference.source, "checkpoint": ckpt}


def publish(cfg: EvalConfig, report: dict, grid: list, out, lineage: dict) -> None:
    """The grid and report.json into the output folder, then everything into the child run
    (which ends FAILED, not RUNNING, when either fails). `lineage`: the export's MLflow model id
    (the metrics are logged against it) and the reference's spec (the run's evaluation input)."""
    from pipelines.evaluate import shards

    try:
        with tempfile.TemporaryDirectory(prefix="flowar-eval-") as tmp:  # written here, then copied
            grid_path = shards.save_sample_grid(grid, cfg.generation.grid_per_class, Path(tmp) / "samples.png")
            report_path = Path(tmp) / "report.json"
            report_path.write_text(json.dumps(report, indent=1, default=str))
            for path in (report_path, grid_path):
                if path is not None:
                    out.put_file(path, path.name)
            shards.log_to_mlflow(cfg, report["mlflow_run_id"], report["step"], report["results"],
                                 child_params(cfg, report["settings"]["checkpoint"]),
                                 [report_path, grid_path], grid=grid_path, **lineage)
    except BaseException:
        tracking.fail_run_if_running(tracking.client(cfg.mlflow.resolved_uri()), report["mlflow_run_id"])
        raise


def check_reference(ref) -> dict:
    """The reference (pipelines.evaluate.reference's spec), refused when it cannot be read: a
    .npz must hold statistics, an image source must exist and hold images."""
    from pipelines.evaluate.reference import checked_reference_spec

    try:
        return checked_reference_spec(ref.source, ref.max_images)
    except (OSError, ValueError) as e:
        raise ConfigError(f"reference.source: {e}") from None


def evaluation_settings(cfg: EvalConfig, ckpt: str, generator: dict, extractor: dict) -> dict:
    """Everything that decides the generated shards' content. It names the default output
    folder (its hash) and guards a resumed one: shards of other settings are never mixed in."""
    g, m = cfg.generation, cfg.metrics
    keep_features = m.kid or m.prc
    return {"checkpoint": ckpt, "checkpoint_files": checkpoint_identity(ckpt),
            "weights": "ema" if generator["ema_file"] else "model", "vae": generator["vae"],
            "sampler": to_dict(cfg.sampler), "seed": g.seed, "num_samples": g.num_samples,
            "samples_per_class": g.samples_per_class, "batch_size": g.batch_size,
            "shard_size": g.shard_size, "extractor": extractor["digest"],
            "keep_features": keep_features,
            "features": [m.feature_subset_size, m.feature_subset_seed] if keep_features else None,
            "logits": bool(m.isc and extractor["has_logits"]), "save_images": g.save_images,
            "grid": [g.grid_classes, g.grid_per_class]}


def settings_key(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def prepare_output_dir(cfg: EvalConfig, settings: dict):
    """output_dir (a path or URI; default: $FLOWAR_HOME/eval/<settings hash>) as an outputs.Folder
    with settings.json written; a folder holding another evaluation's shards is refused, naming
    what differs."""
    from pipelines.evaluate.outputs import Folder

    out = Folder(cfg.output_dir or str(flowar_home() / "eval" / settings_key(settings)))
    if "settings.json" in out.names():
        old = json.loads(out.read_text("settings.json"))
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ConfigError(f"output_dir={str(out)!r} holds shards of a different evaluation "
                              f"(differs in: {', '.join(diff)}); use another output_dir")
    out.write_text("settings.json", json.dumps(settings, indent=1, sort_keys=True))
    return out


def grid_indices(cfg: EvalConfig) -> list[int]:
    """The sample grid's indices: the first grid_per_class samples of the first grid_classes."""
    g = cfg.generation
    indices = [c * g.samples_per_class + j for c in range(g.grid_classes)
               for j in range(min(g.grid_per_class, g.samples_per_class))]
    return [i for i in indices if i < g.num_samples]


def build_report(cfg: EvalConfig, results: dict, done: dict, settings: dict, step: int, out,
                 mlflow: dict) -> dict:
    """report.json: the results and everything needed to read them (counts, resolutions, the
    extractor, the reference, the feature subsets, shards resumed/computed and where, throughput,
    workers and their nodes, settings, config) and the MLflow child run and its parent."""
    gen, ref, run = done["generated"], done["reference"], done["run"]
    subsets = feature_subsets(cfg, gen, ref)
    return {"results": results, "step": step, "num_generated": gen["stats"].count,
            "num_reference": ref["count"], "resolution": gen["resolution"],
            "reference_resolution": done["resolution"], "extractor": done["extractor"],
            "reference": {k: v for k, v in ref.items() if k not in ("mu", "sigma", "features")},
            "feature_subsets": subsets, "kid_subset_size": subsets.get("kid_subset_size"),
            "shards": {"total": run["resumed"] + run["computed"], "resumed": run["resumed"],
                       "computed": run["computed"], "by_node": run["shards_by_node"]},
            "throughput": run["throughput"], "workers": done["workers"],
            "settings": settings, "config": to_dict(cfg), "output_dir": str(out),
            "mlflow_run_id": mlflow["run_id"], "mlflow": mlflow}


def feature_subsets(cfg: EvalConfig, gen: dict, ref: dict) -> dict:
    """Which features KID and precision/recall used: the sizes of both subsets, how they were
    drawn, and KID's subsets (capped at the smaller set)."""
    m = cfg.metrics
    if gen["features"] is None:
        return {}
    n_ref = len(ref["features"]) if ref.get("features") is not None else 0
    out = {"generated": len(gen["features"]), "reference": n_ref, "max": m.feature_subset_size,
           "seed": m.feature_subset_seed,
           "drawn": "numpy Generator(seed).choice(count, max, replace=False) over each set's "
                    "indices, sorted; all indices when count <= max"}
    if m.kid and n_ref:
        out.update(kid_subsets=m.kid_subsets, kid_subset_size=min(m.kid_subset_size, out["generated"], n_ref))
    if m.prc and n_ref:
        out["prc_neighborhood"] = m.prc_neighborhood
    return out


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    add_job_parser(
        subparsers, "evaluate", run=_cli, load=_load, raw_description=True, config_optional=True,
        help="FID / IS / KID / precision-recall of a checkpoint, sharded over Ray; sampler grids",
        description=__doc__, config_help="YAML config (see configs/eval-*.yaml)",
        overrides_example="sampler.cfg=2.0 generation.num_samples=10000 metrics.prc=true "
                          "'sampler.cfg=[1.5,2,3]' (a list: a sampler grid)")


def _plan(args) -> "search.EvalPlan":
    overrides = list(args.overrides)
    path = args.config
    if path and "=" in path and not Path(path).is_file():  # only overrides were given
        overrides, path = [path] + overrides, None
    plan = search.load_plan(path, overrides)
    if plan.defaults_note:
        print(f"flowar evaluate: {plan.defaults_note}", file=sys.stderr)
    return plan


def _load(args):
    """The resolved config (--print-config): a grid's has lists in its sampler section."""
    return _plan(args).printable()


def _cli(args) -> int:
    search.run_plan(_plan(args))
    return 0
