"""The end of a sweep: a table of trials (axis values, final metric with each trial's loss and other
evaluation metrics beside it, status), ranked by the sweep's metric, a plot of the metric per axis value and the best trial's full training config, written beside the Tune experiment and
logged to the sweep's MLflow parent run.

This module only writes the report, from what it is handed: the trials come settled by the
driver (pipelines.sweep.trial.settle_trials), each with its status (COMPLETED, STOPPED_EARLY when
the scheduler stopped it, FAILED, or Tune's status for a trial that never ended) and its MLflow
child run id. It searches no MLflow store and imports neither the driver nor the trial module.

Imported by the driver only when a sweep has run (pipelines/sweep/job.py): matplotlib takes a
second to import, too long for `flowar --help`.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipelines.core import tracking
from pipelines.core.config import dump_yaml
from pipelines.core.storage import is_uri
from pipelines.sweep.config import EVAL_METRICS, SweepJob, trial_config

__all__ = ["summarise", "trial_rows", "markdown_table", "best_row"]

STATUSES = ("COMPLETED", "STOPPED_EARLY", "FAILED")
COLOURS = {"COMPLETED": "tab:blue", "STOPPED_EARLY": "tab:orange", "FAILED": "tab:red"}


def summarise(trials: list, job: SweepJob, uri: str, parent_id: str, exp_dir: str) -> dict:
    """Write trials.csv/.md, the plot and the best config; log them on the parent run.

    `trials`: pipelines.sweep.trial.SettledTrial, in trial order. Returns what the command line
    prints: rows, table, metric, dir, best_trial, best_value, best_config, counts."""
    metric = job.sweep.metric
    beside = [m for m in ("loss", *EVAL_METRICS) if m != metric
              and any(m in t.last_result for t in trials)]  # each trial's loss, other eval metrics
    rows = trial_rows(trials, job.axes, metric, beside)
    columns = ["trial_id", *(a.key for a in job.axes), metric, *beside, "step", "status"]
    table = markdown_table(rows, columns)
    best = best_row(rows, metric, job.sweep.mode)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}

    out = Path(exp_dir) / "summary" if not is_uri(exp_dir) else Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(rows, columns + ["run_id", "export_dir"], out / "trials.csv")
    (out / "trials.md").write_text(table + "\n")
    _plot(rows, job.axes, metric, out / f"{metric.replace('/', '_')}_per_axis.png")
    best_config = _write_best_config(job, best, out / "best_config.yaml") if best else ""
    _log_on_parent(tracking.client(uri), parent_id, out, rows, counts, best, metric)
    return {"rows": rows, "table": table, "metric": metric, "dir": str(out),
            "best_trial": best["trial_id"] if best else "", "best_value": best[metric] if best else None,
            "best_config": best_config, "counts": counts}


def trial_rows(trials: list, axes, metric: str, beside=()) -> list[dict]:
    """One dict per settled trial: trial_id, each axis, the metric and those `beside` it (from
    its last report; NaN when absent), step, status, run_id, export_dir."""
    rows = []
    for trial in trials:
        last = trial.last_result
        values = {m: float(last[m]) if isinstance(last.get(m), (int, float)) else float("nan")
                  for m in (metric, *beside)}
        rows.append({"trial_id": trial.trial_id,
                     **{a.key: trial.config.get(a.key) for a in axes}, **values,
                     "step": last.get("step", ""), "status": trial.status,
                     "run_id": trial.run_id, "export_dir": last.get("export_dir", "")})
    return rows


def best_row(rows: list[dict], metric: str, mode: str) -> dict | None:
    """The best trial by `metric`: among those that ran all their steps when any did (a trial
    stopped early reports a metric from fewer steps), never a failed one."""
    sign = 1 if mode == "min" else -1
    usable = [r for r in rows if math.isfinite(r[metric]) and r["status"] != "FAILED"]
    finished = [r for r in usable if r["status"] == "COMPLETED"] or usable
    return min(finished, key=lambda r: sign * r[metric]) if finished else None


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_show(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def _write_csv(rows: list[dict], columns: list[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _show(v) for k, v in r.items()} for r in rows)


def _write_best_config(job: SweepJob, best: dict, path: Path) -> str:
    """The best trial's full training config, reusable as `flowar train PATH`."""
    cfg = trial_config(job.sweep, job.bases, {a.key: best[a.key] for a in job.axes})
    cfg.mlflow.run_name = ""  # a reusable training config, not the trial's run
    dump_yaml(cfg, path)
    return str(path)


def _plot(rows: list[dict], axes, metric: str, path: Path) -> None:
    """One panel per axis: each trial's final metric at its axis value, coloured by status.
    A bare Figure (no pyplot): no GUI backend and no global figure state in the driver."""
    fig = Figure(figsize=(4.5 * len(axes), 3.6))
    panels = fig.subplots(1, len(axes), squeeze=False)
    for ax, axis in zip(panels[0], axes):
        _plot_axis(ax, rows, axis, metric)
    handles = [Line2D([], [], marker="o", ls="", color=c, label=s) for s, c in COLOURS.items()]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_axis(ax, rows: list[dict], axis, metric: str) -> None:
    numeric = axis.kind in ("uniform", "loguniform")
    labels = [] if numeric else [_show(v) for v in axis.values]
    for row in rows:
        y = row[metric]
        if not math.isfinite(y):
            continue
        shown = _show(row[axis.key])
        x = row[axis.key] if numeric else labels.index(shown) if shown in labels else len(labels)
        ax.scatter([x], [y], color=COLOURS.get(row["status"], "grey"), s=36)
    if axis.kind == "loguniform":
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_xlabel(axis.key)
    ax.set_ylabel(f"final {metric}")
    ax.grid(alpha=0.3)


def _log_on_parent(client, parent_id: str, out: Path, rows: list[dict], counts: dict,
                   best: dict | None, metric: str) -> None:
    """The report as the parent run's artefacts, its counts and best trial as metrics and tags."""
    client.log_artifacts(parent_id, str(out), artifact_path="summary")
    client.log_metric(parent_id, "trials", len(rows))
    for status, n in counts.items():
        client.log_metric(parent_id, f"trials_{status.lower()}", n)
    if best is not None:
        client.log_metric(parent_id, f"best_{metric}", best[metric])
        client.set_tag(parent_id, "best_trial", best["trial_id"])
        client.set_tag(parent_id, "best_run_id", best["run_id"])
