"""Sampler grids of `flowar evaluate`, and the sampler setting an export carries (sampler.json).

    flowar evaluate CONFIG generation.checkpoint=runs/export 'sampler.cfg=[1.5,2,3,4]'

A list for sampler keys (on the command line or in the config file's `sampler:` section) makes
a grid: the cartesian product of the lists in the order given, each combination one evaluation
(job.run_evaluate) and so one MLflow child run. Every combination's config is built and checked
when the config is read, before any work. The combinations share the reference statistics
through shards.compute_reference's cache. At the end of a grid of two or more: a markdown
table and a plot of FID against sampler.cfg, both logged on the parent run, and the lowest-FID
setting written beside the export as <checkpoint>/sampler.json, from which `flowar evaluate`
and `flowar sample` then start their sampler section (sampler.json < config file < command
line).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import tempfile
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from flowar.config import ConfigError, SamplerConfig, from_dict, to_dict
from flowar.hub import SAMPLER_FILE  # <checkpoint>/sampler.json: the best setting of a sampler grid
from pipelines.core import storage
from pipelines.core.config import (absolute_path, apply_overrides, flowar_home, load_config,
                                   parse_overrides, read_yaml_mapping)
from pipelines.core.source import source_info
from pipelines.evaluate.config import EvalConfig
from pipelines.evaluate.export import check_sampler_for_export, read_text

__all__ = ["SAMPLER_FILE", "EvalPlan", "load_plan", "run_plan", "read_sampler_file",
           "sampler_base", "markdown_table"]



# ------------------------------------------------------------------------------------------------
# sampler.json
# ------------------------------------------------------------------------------------------------

def read_sampler_file(checkpoint: str) -> tuple[dict, str] | None:
    """(its sampler section, the file) of <checkpoint>/sampler.json; None when there is none.
    A file that is not a valid sampler setting is refused, naming it."""
    where = storage.join(checkpoint, SAMPLER_FILE)
    try:
        text = read_text(checkpoint, SAMPLER_FILE)
    except (OSError, ValueError):
        return None  # an unreadable export is refused, naming it, where it is checked
    if text is None:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is malformed: not JSON ({e}); fix or delete it") from None
    if not isinstance(data, dict) or not isinstance(data.get("sampler"), dict):
        raise ConfigError(f"{where} is malformed: expected an object with a \"sampler\" mapping "
                          "(as a flowar evaluate sampler grid writes it); fix or delete it")
    try:
        from_dict(SamplerConfig, data["sampler"], "sampler")
    except ConfigError as e:
        raise ConfigError(f"{where} is malformed: {e}") from None
    return data["sampler"], where


def sampler_base(checkpoint: str, given: dict) -> tuple[dict, str]:
    """({"sampler": sampler.json's values} or {}, a line saying which values came from it, ""
    without a file). `given`: the sampler keys the config file and command line set."""
    found = read_sampler_file(checkpoint) if checkpoint else None
    if found is None:
        return {}, ""
    values, where = found
    used = [f"{k}={v}" for k, v in values.items() if k not in given]
    over = [k for k in values if k in given]
    return {"sampler": dict(values)}, (
        f"sampler values from {storage.display(where)}: {' '.join(used) or 'none'}"
        + (f" (overridden by the config or command line: {', '.join(over)})" if over else ""))


# ------------------------------------------------------------------------------------------------
# The plan: every evaluation of the config, built and checked before any work
# ------------------------------------------------------------------------------------------------

@dataclass
class EvalPlan:
    evaluations: list[EvalConfig]  # one per combination, in the order of the grid
    varying: dict[str, list]  # sampler key -> its values, for keys given >= 2 values
    combos: list[dict]  # each evaluation's values of the varying keys
    output_dir: str = ""  # as configured (a grid's evaluations each use a subfolder of it)
    defaults_note: str = ""  # which sampler values came from sampler.json

    def printable(self):
        """The resolved config; a grid's with its lists in the sampler section (a config file
        that runs the same grid)."""
        if len(self.evaluations) == 1:
            return self.evaluations[0]
        data = to_dict(self.evaluations[0])
        data["sampler"].update(self.varying)
        data["output_dir"] = self.output_dir
        return data


def load_plan(path: str | None, overrides: list[str]) -> EvalPlan:
    """The config file and key=value overrides as the evaluations they ask for."""
    given = apply_overrides(read_yaml_mapping(path) if path else {}, parse_overrides(overrides))
    sampler = given.get("sampler") if isinstance(given.get("sampler"), dict) else {}
    _refuse_other_lists(EvalConfig, given)
    varying = _grid_keys(sampler)
    generation = given.get("generation") if isinstance(given.get("generation"), dict) else {}
    ckpt = str(generation.get("checkpoint") or "")
    ckpt = absolute_path(ckpt, "input") if ckpt else ""
    base, note = sampler_base(ckpt, sampler)
    singles = {k: v[0] for k, v in sampler.items() if isinstance(v, list) and k not in varying}
    base = apply_overrides(apply_overrides(base, given), {"sampler": singles})
    combos = [dict(zip(varying, values)) for values in itertools.product(*varying.values())]
    evaluations = [_evaluation(base, combo) for combo in combos]
    # the values as the configs typed them (cfg=3 is 3.0), in the order given
    combos = [{k: getattr(c.sampler, k) for k in varying} for c in evaluations]
    typed = {k: list(dict.fromkeys(c[k] for c in combos)) for k in varying}
    out = evaluations[0].output_dir
    if len(combos) > 1:
        _check_grid(evaluations, typed, varying)
        for cfg, combo in zip(evaluations, combos):
            cfg.output_dir = storage.join(out, folder_name(combo)) if out else ""
    return EvalPlan(evaluations, typed, combos, out, note)


def _refuse_other_lists(cls, data: dict, prefix: str = "") -> None:
    """A list is a grid only for sampler keys; elsewhere it is refused, naming the key (keys
    whose type is a list, and unknown keys, which load_config names, are left alone)."""
    hints = typing.get_type_hints(cls)
    for name, value in data.items():
        tp = hints.get(name)
        key = f"{prefix}{name}"
        if tp is None or key == "sampler":
            continue
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            _refuse_other_lists(tp, value, key + ".")
        elif isinstance(value, list) and typing.get_origin(tp) not in (list, tuple):
            raise ConfigError(f"{key}={json.dumps(value)}: only sampler keys take lists (a sampler "
                              f"grid, e.g. sampler.cfg=[1.5,2,3]); give {key} one value")


def _grid_keys(sampler: dict) -> dict[str, list]:
    """The sampler keys given two or more values, with their values in order."""
    varying = {}
    for key, values in sampler.items():
        if not isinstance(values, list):
            continue
        if not values:
            raise ConfigError(f"sampler.{key}=[]: an empty list; give one value or several")
        if len(values) > 1:
            varying[key] = values
    return varying


def _evaluation(base: dict, combo: dict) -> EvalConfig:
    """One combination's config, checked as a single evaluation's is (its values named in the
    message)."""
    data = apply_overrides(base, {"sampler": combo})
    try:
        cfg = load_config(EvalConfig, None, data)
        check_sampler_for_export(cfg.generation.checkpoint, cfg.sampler)
    except ConfigError as e:
        if combo and any(f"sampler.{k}" in str(e) for k in combo):
            raise ConfigError(f"{e} (sampler grid: {label(combo)})") from None
        raise
    return cfg


def _check_grid(evaluations: list[EvalConfig], varying: dict, given: dict) -> None:
    """A grid is chosen by FID and evaluates each setting once. `varying`: each key's distinct
    values as the config types them; `given`: the lists as written."""
    grid = " ".join(f"sampler.{k}={json.dumps(v)}" for k, v in given.items())
    if not evaluations[0].metrics.fid:
        raise ConfigError(f"metrics.fid=false with a sampler grid ({grid}): the grid picks its "
                          "best setting by FID; set metrics.fid=true")
    if any(len(values) < len(given[k]) for k, values in varying.items()):
        raise ConfigError(f"the sampler grid {grid} repeats a value; give each value once")


def label(combo: dict) -> str:
    return " ".join(f"sampler.{k}={v}" for k, v in combo.items())


def folder_name(combo: dict) -> str:
    """A combination's subfolder of an explicit output_dir, e.g. cfg=2_guidance_high=0.9."""
    return "_".join(f"{k}={v}" for k, v in combo.items())


# ------------------------------------------------------------------------------------------------
# Running the plan, and what a grid leaves behind
# ------------------------------------------------------------------------------------------------

def run_plan(plan: EvalPlan) -> dict:
    """Every evaluation in order; for a grid, then the table, the plot and sampler.json.
    {"reports": [...]} plus, for a grid, what summarize returns."""
    from pipelines.evaluate.job import run_evaluate

    reports = []
    for i, (cfg, combo) in enumerate(zip(plan.evaluations, plan.combos)):
        if len(plan.evaluations) > 1:
            print(f"\n=== sampler grid {i + 1}/{len(plan.evaluations)}: {label(combo)} ===", flush=True)
        reports.append(run_evaluate(cfg))
    if len(reports) < 2:
        write_card(reports[0])
        return {"reports": reports}
    summary = summarize(plan, reports)
    if summary["best"] is not None:
        write_card(reports[summary["best"]])
    return {"reports": reports, **summary}


def write_card(report: dict) -> str:
    """The evaluated export's model card (README.md) and evaluation.json with these results and
    how they were measured (flowar.hub.write_model_card), when the export is a local folder; a
    sampler grid writes its best setting's. Returns the card's path, "" when none was written."""
    from flowar.hub import write_model_card

    s = report["settings"]
    if storage.is_uri(s["checkpoint"]):
        print(f"the model card of {storage.display(s['checkpoint'])} is left as it is (not a local "
              "folder); report.json holds the results")
        return ""
    details = {"sampler": s["sampler"], "samples": report["num_generated"],
               "reference": report["config"]["reference"]["source"],
               "reference images": report["num_reference"], "seed": s["seed"],
               "step": report["step"], "mlflow run": report["mlflow_run_id"]}
    return str(write_model_card(s["checkpoint"], report["results"], details))


def summarize(plan: EvalPlan, reports: list[dict]) -> dict:
    """The grid's table (printed) and plot, logged on the parent run and written to the
    grid's folder (output_dir, else $FLOWAR_HOME/eval/search-<hash>), and the best setting as
    <checkpoint>/sampler.json."""
    from pipelines.core import tracking
    from pipelines.evaluate.outputs import Folder

    rows = [{"combo": combo, "results": r["results"], "run_id": r["mlflow_run_id"]}
            for combo, r in zip(plan.combos, reports)]
    finite = [i for i, row in enumerate(rows) if _number(row["results"].get("fid")) is not None]
    best = min(finite, key=lambda i: rows[i]["results"]["fid"]) if finite else None
    table = markdown_table(rows, list(plan.varying), best)
    print("\n" + table)
    key = hashlib.sha256(" ".join(sorted(r["mlflow"]["run_name"] for r in reports)).encode()).hexdigest()[:8]
    folder = Folder(plan.output_dir or str(flowar_home() / "eval" / f"search-{key}"))
    parent = reports[0]["mlflow"]["parent_run_id"]
    c = tracking.client(plan.evaluations[0].mlflow.resolved_uri())
    with tempfile.TemporaryDirectory(prefix="flowar-search-") as tmp:
        files = [Path(tmp) / "sampler_search.md", Path(tmp) / "fid.png"]
        files[0].write_text(table + "\n")
        plot_fid(rows, plan.varying, best, files[1])
        for path in files:
            folder.put_file(path, path.name)
            c.log_artifact(parent, str(path), artifact_path=f"sampler_search/{key}")
    written = ""
    if best is not None:
        written = write_sampler_file(plan, reports, best, parent)
        print(f"best: {label(plan.combos[best])} (fid {rows[best]['results']['fid']:.6g}); "
              f"wrote {storage.display(written)}")
    return {"table": table, "best": best, "sampler_file": written, "folder": str(folder),
            "parent_run_id": parent, "artifact_path": f"sampler_search/{key}"}


def _number(value) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def markdown_table(rows: list[dict], keys: list[str], best: int | None) -> str:
    """One row per combination: the varying sampler keys, FID, the other metrics, the child run."""
    metrics = ["fid"] + [m for m in rows[0]["results"] if m != "fid"]
    head = [f"sampler.{k}" for k in keys] + metrics + ["mlflow run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, row in enumerate(rows):
        cells = [str(row["combo"][k]) for k in keys]
        for m in metrics:
            v = row["results"].get(m)
            cells.append(f"{v:.4g}" if _number(v) is not None else "n/a")
        if i == best:
            cells[len(keys)] += " (best)"
        lines.append("| " + " | ".join(cells + [row["run_id"]]) + " |")
    return "\n".join(lines)


def plot_fid(rows: list[dict], varying: dict, best: int | None, path: Path) -> None:
    """FID against sampler.cfg (else the first varying key), one curve per combination of the
    other varying keys. A bare Figure (no pyplot): no GUI backend, no global figure state."""
    from matplotlib.figure import Figure

    x_key = "cfg" if "cfg" in varying else next(iter(varying))
    others = [k for k in varying if k != x_key]
    numeric = all(_number(v) is not None for v in varying[x_key])
    ticks = [str(v) for v in varying[x_key]]

    def x(row):
        return row["combo"][x_key] if numeric else ticks.index(str(row["combo"][x_key]))

    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    curves: dict[tuple, list] = {}
    for row in rows:
        curves.setdefault(tuple(row["combo"][k] for k in others), []).append(row)
    for values, members in curves.items():
        points = sorted((x(r), r["results"]["fid"]) for r in members if _number(r["results"].get("fid")) is not None)
        name = " ".join(f"{k}={v}" for k, v in zip(others, values)) or None
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    if best is not None:
        ax.scatter([x(rows[best])], [rows[best]["results"]["fid"]], marker="*", s=180, color="black",
                   zorder=3, label="best")
    if not numeric:
        ax.set_xticks(range(len(ticks)), ticks)
    ax.set_xlabel(f"sampler.{x_key}")
    ax.set_ylabel("FID")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_sampler_file(plan: EvalPlan, reports: list[dict], best: int, parent: str) -> str:
    """<checkpoint>/sampler.json (a path or URI): the best combination's full sampler setting,
    its FID, every evaluation of the grid, and what wrote it."""
    cfg = plan.evaluations[best]
    source = source_info()
    evaluations = [{"sampler": to_dict(c.sampler), "fid": r["results"].get("fid"),
                    "results": r["results"], "mlflow_run_id": r["mlflow_run_id"],
                    "output_dir": r["output_dir"]} for c, r in zip(plan.evaluations, reports)]
    g = cfg.generation
    data = {"sampler": to_dict(cfg.sampler), "fid": reports[best]["results"]["fid"], "metric": "fid",
            "mlflow_run_id": reports[best]["mlflow_run_id"], "evaluations": evaluations,
            "written_by": {"command": "flowar evaluate (sampler grid, pipelines/evaluate/search.py)",
                           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "git_commit": source.commit, "git_dirty": source.dirty,
                           "parent_run_id": parent, "grid": plan.varying,
                           "num_samples": g.num_samples, "seed": g.seed,
                           "reference": cfg.reference.source}}
    where = storage.join(reports[best]["settings"]["checkpoint"], SAMPLER_FILE)
    return storage.write_bytes(where, json.dumps(data, indent=1, default=str).encode())
