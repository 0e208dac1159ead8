"""The end of a sweep: a table of trials (axis values, final metric, status), a plot of the metric
per axis value and the best trial's full training config, written beside the Tune experiment and
logged to the sweep's MLflow parent run.

This module only writes the report: the trials come settled by the driver (pipelines.sweep.job.
settle_trials), each with its status (COMPLETED, STOPPED_EARLY when the scheduler stopped it,
FAILED, or Tune's status for a trial that never ended) and its MLflow child run id.
"""

from __future__ import annotations

import csv
import json
import math
import tempfile
from pathlib import Path

__all__ = ["summarise", "trial_rows", "markdown_table"]

# Axes whose values change what the training loss measures (its targets, or their weights): a
# "best loss" across them means nothing, so the summary says so and points at each trial's export.
LOSS_CHANGING_KEYS = ("model.objective", "model.scale_construction", "model.loss_weighting",
                      "model.time_sampling", "model.scales")


def loss_caveat(axes, metric: str) -> str:
    keys = [a.key for a in axes if a.key in LOSS_CHANGING_KEYS]
    if metric != "loss" or not keys:
        return ""
    return (f"The training loss is not comparable across values of {', '.join(keys)} (the targets "
            "or their weights differ), so the best trial by loss is not the best model: evaluate "
            "each trial's export (export_dir in trials.csv) with flowar evaluate.")


def _show(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return json.dumps(list(value))
    return str(value)


def trial_rows(trials: list[dict], axes, metric: str) -> list[dict]:
    """One dict per settled trial: trial_id, each axis, metric, step, status, run_id, export_dir."""
    rows = []
    for trial in trials:
        last = trial["last_result"]
        value = last.get(metric)
        rows.append({"trial_id": trial["trial_id"],
                     **{a.key: trial["config"].get(a.key) for a in axes},
                     metric: float(value) if isinstance(value, (int, float)) else float("nan"),
                     "step": last.get("step", ""), "status": trial["status"],
                     "run_id": trial["run_id"], "export_dir": last.get("export_dir", "")})
    return rows


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_show(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _plot(rows: list[dict], axes, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"COMPLETED": "tab:blue", "STOPPED_EARLY": "tab:orange", "FAILED": "tab:red"}
    fig, panels = plt.subplots(1, len(axes), figsize=(4.5 * len(axes), 3.6), squeeze=False)
    for ax, axis in zip(panels[0], axes):
        numeric = axis.kind in ("uniform", "loguniform")
        labels = [] if numeric else [_show(v) for v in axis.values]
        for row in rows:
            y = row[metric]
            if not math.isfinite(y):
                continue
            x = row[axis.key] if numeric else labels.index(_show(row[axis.key])) \
                if _show(row[axis.key]) in labels else len(labels)
            ax.scatter([x], [y], color=colours.get(row["status"], "grey"), s=36)
        if numeric and axis.kind == "loguniform":
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        ax.set_xlabel(axis.key)
        ax.set_ylabel(f"final {metric}")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=s) for s, c in colours.items()]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarise(trials: list[dict], sweep, axes, bases: dict, uri: str, parent_id: str,
              exp_dir: str) -> dict:
    """Write trials.csv/.md, the plot and the best config; log them on the parent run."""
    from pipelines.core import tracking
    from pipelines.core.config import dump_yaml
    from pipelines.core.storage import is_uri
    from pipelines.sweep.config import trial_config

    c = tracking.client(uri)
    metric = sweep.metric
    rows = trial_rows(trials, axes, metric)
    columns = ["trial_id", *(a.key for a in axes), metric, "step", "status"]
    table = markdown_table(rows, columns)

    sign = 1 if sweep.mode == "min" else -1
    usable = [r for r in rows if math.isfinite(r[metric]) and r["status"] != "FAILED"]
    finished = [r for r in usable if r["status"] == "COMPLETED"] or usable
    best = min(finished, key=lambda r: sign * r[metric]) if finished else None

    out = Path(exp_dir) / "summary" if not is_uri(exp_dir) else Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "trials.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns + ["run_id", "export_dir"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _show(v) for k, v in r.items()} for r in rows)
    caveat = loss_caveat(axes, metric)
    (out / "trials.md").write_text(table + "\n" + (f"\n{caveat}\n" if caveat else ""))
    _plot(rows, axes, metric, out / f"{metric}_per_axis.png")
    best_config = ""
    if best is not None:
        cfg = trial_config(sweep, bases, {a.key: best[a.key] for a in axes})
        cfg.mlflow.run_name = ""  # a reusable training config, not the trial's run
        dump_yaml(cfg, out / "best_config.yaml")
        best_config = str(out / "best_config.yaml")

    counts = {s: sum(r["status"] == s for r in rows)
              for s in ("COMPLETED", "STOPPED_EARLY", "FAILED")}
    c.log_artifacts(parent_id, str(out), artifact_path="summary")
    c.log_metric(parent_id, "trials", len(rows))
    for status, n in counts.items():
        c.log_metric(parent_id, f"trials_{status.lower()}", n)
    if best is not None:
        c.log_metric(parent_id, f"best_{metric}", best[metric])
        c.set_tag(parent_id, "best_trial", best["trial_id"])
        c.set_tag(parent_id, "best_run_id", best["run_id"])
    if caveat:
        c.set_tag(parent_id, "caveat", caveat)
    return {"rows": rows, "table": table, "metric": metric, "dir": str(out), "caveat": caveat,
            "best_trial": best["trial_id"] if best else "", "best_value": best[metric] if best else None,
            "best_config": best_config, "counts": counts}
