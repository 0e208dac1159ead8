"""`python benchmarks/ablations.py report`: the study's Markdown page and one plot per table.

The numbers and the conclusions come from ablations_results.py; this module lays them out: per
table the exact commands, the wall time, the settings with FID and class accuracy (mean ± spread
over seeds), final loss, seeds finished and the paper's row beside each, what is missing, a
plot, and a marked conclusion block that only `report` writes.
"""

from __future__ import annotations

import datetime
from pathlib import Path

from ablations_results import TableResult, aggregate, conclusions, table_result
from ablations_study import (ROOT, TABLES, StudyError, read_state, show_values, shown,
                             tracking_uri, trials_csv)


# ----------------------------------------------------------------------------- the page

def _fmt(values: list, digits: int, scale: float = 1.0, unit: str = "") -> str:
    mean, spread, n = aggregate([v * scale for v in values])
    if not n:
        return "—"
    if n == 1:
        return f"{mean:.{digits}f}{unit} (1 seed)"
    return f"{mean:.{digits}f} ± {spread:.{digits}f}{unit}"


def _ranks(items: list, key) -> dict:
    return {id(s): i + 1 for i, s in enumerate(sorted(items, key=key))}


def table_markdown(res: TableResult) -> list[str]:
    spec = res.spec
    here = _ranks(res.measured, lambda s: aggregate(s.fids)[0])
    paper = _ranks([s for s in res.settings if s.paper], lambda s: s.paper.fid)
    head = [*spec.axes, "FID mean ± spread", "class accuracy", "final loss", "seeds", "rank",
            "paper row", "paper FID", "paper IS", "paper rank"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    want = len(res.expected_seeds)
    for s in res.settings:
        p = s.paper
        cells = [*(f"`{v}`" for v in show_values(s.values)), _fmt(s.fids, 2),
                 _fmt(s.accs, 1, 100, " %"), _fmt(s.losses, 4),
                 f"{len(s.fids)}/{want}" if s.in_sweep else "not swept", str(here.get(id(s), "—")),
                 p.name if p else f"— ({s.no_row or 'no paper row'})",
                 f"{p.fid:.2f}" if p else "—", f"{p.inception_score:.1f}" if p else "—",
                 str(paper.get(id(s), "—"))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def missing_lines(res: TableResult) -> list[str]:
    if res.problems:
        return [f"- {p}" for p in res.problems]
    if not res.csv_path.is_file():
        return [f"- the whole table: not run (no {shown(res.csv_path)})"]
    return [f"- `{s.label}`: {'; '.join(s.missing)}" for s in res.settings if s.missing]


def _wall(entry: dict) -> str:
    if not entry.get("attempts"):
        return "not recorded (this table was not run by `ablations.py run` in this home)"
    secs = entry.get("wall_seconds", 0)
    kinds = ", ".join("resumed" if a.get("resume") else "started" for a in entry["attempts"])
    return (f"{secs / 3600:.2f} h ({secs:.0f} s) over {len(entry['attempts'])} invocation(s): "
            f"{kinds}")


def section(res: TableResult, plot: str) -> list[str]:
    spec, entry = res.spec, res.entry
    cmd, settings = entry.get("command"), entry.get("settings", {})
    resumed = any(a.get("resume") for a in entry.get("attempts", []))
    commands = [cmd] + ([cmd + " --resume"] if resumed else [])
    out = [f"## Table {spec.number}: {spec.title}", "",
           f"Sweep file `{spec.sweep_file}`; trials: `{shown(res.csv_path)}`.", ""]
    out += (["Commands (from the repository root):", "", "```bash", *commands, "```", ""] if cmd
            else [(f"Commands: not recorded (no state file entry); `python benchmarks/ablations.py "
                   f"run --tables {spec.number}` runs this table (`--dry-run` prints its command)."),
                  ""])
    out += [f"Wall time: {_wall(entry)}.", ""]
    if settings:
        out += [(f"Settings: {settings.get('steps')} steps per trial, FID of "
                 f"{settings.get('eval_samples')} samples against `{settings.get('reference')}` "
                 f"({settings.get('reference_images') or 'all'} images), seeds "
                 f"{settings.get('seeds')}."), ""]
    out += table_markdown(res) + [""]
    if res.acc_note:
        out += [f"Class accuracy: {res.acc_note}.", ""]
    miss = missing_lines(res)
    out += (["**Missing** (this table is incomplete):", *miss, ""] if miss
            else ["Complete: every setting has every seed.", ""])
    out += [f"Paper numbers: {spec.reading}", ""]
    out += [f"![Table {spec.number}]({plot})", ""] if plot else ["No plot: nothing finished.", ""]
    out += ["### Conclusion: whether the paper's ordering holds at this scale", "",
            (f"<!-- conclusion table {spec.number}: written by `ablations.py report` from the "
             "numbers above; re-run report, do not edit -->"),
            *(f"- {line}" for line in conclusions(res)),
            f"<!-- end conclusion table {spec.number} -->", ""]
    return out


PREAMBLE = """\
Each setting's trials are seeds; the table gives mean ± spread over the finished seeds, where
**spread is half the range**, (max − min)/2 (for 2 seeds it equals the population standard
deviation), and the number of seeds finished. Only COMPLETED trials with an FID count. Two
settings are **distinguishable** when their seed ranges do not overlap (|difference of means| >
sum of spreads; it needs 2 seeds each). The paper's numbers (arXiv 2412.15205, Sec. 4.2) are
ImageNet 256×256 FID/IS of FlowAR-S-sized models; this study trains the tiny preset on 4×8×8
Fashion-MNIST latents, so compare orderings, not values. Final losses are not comparable across
objectives or scale sequences. The conclusions are written by `report` from the numbers."""


def plot_table(res: TableResult, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state

    settings = [s for s in res.settings if s.in_sweep or s.paper]
    fig = Figure(figsize=(max(7.0, 1.3 * len(settings)), 3.8))
    ours, theirs = fig.subplots(1, 2)
    for i, s in enumerate(settings):
        ours.scatter([i] * len(s.fids), s.fids, color="grey", s=14, zorder=2)
        if s.fids:
            mean, spread, _ = aggregate(s.fids)
            ours.errorbar([i], [mean], [spread], fmt="o", color="tab:blue", capsize=4, zorder=3)
        if s.paper:
            theirs.bar([i], [s.paper.fid], color="tab:orange")
    ours.set_ylabel(f"FID vs {res.entry.get('settings', {}).get('reference') or 'the reference'}")
    theirs.set_ylabel("FID, ImageNet 256x256")
    for ax, title in ((ours, "this study: mean ± half-range (dots: seeds)"),
                      (theirs, "paper")):
        ax.set_xticks(range(len(settings)), [s.label for s in settings], rotation=30,
                      ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Table {res.spec.number}: {res.spec.title}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def status_line(res: TableResult) -> str:
    spec = res.spec
    if res.problems or not res.csv_path.is_file():
        return f"- Table {spec.number} ({spec.title}): **not run or unreadable**, see its section."
    missing = sum(len(s.missing) for s in res.settings if s.in_sweep)
    done = sum(len(s.fids) for s in res.settings)
    state = "complete" if not missing else f"**incomplete**: {missing} missing (setting, seed)"
    return f"- Table {spec.number} ({spec.title}): {state}; {done} finished trials."


def write_report(out: Path, tables: list[int], csv_paths: dict, entries: dict, uri: str,
                 root: Path, how: str, prepared: str = "", default_seeds=(0, 1)) -> dict:
    """Write the page `out` and its plots in <out without .md>/; returns text, results, plots."""
    results = {n: table_result(TABLES[n], csv_paths[n], entries.get(n, {}), uri, root,
                               default_seeds) for n in tables}
    plots, body = {}, []
    for n, res in results.items():
        rel = ""
        if res.measured:
            plots[n] = out.parent / out.stem / f"table{n}.png"
            plot_table(res, plots[n])
            rel = f"{out.stem}/table{n}.png"
        body += section(res, rel)
    today = datetime.date.today().isoformat()
    head = ["# FlowAR ablations at small scale: the paper's Tables "
            + ", ".join(map(str, tables)), "",
            f"Written by `{how}` on {today}. Re-run it to refresh; do not edit by hand.", "",
            PREAMBLE, ""]
    if prepared:
        head += [f"Latents and classifier made by: `{prepared}` (the quickstart's stages 1-3).", ""]
    head += ["## Status", "", *(status_line(r) for r in results.values()), ""]
    text = "\n".join(head + body)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return {"text": text, "results": results, "plots": plots}


def _trials_paths(items: list[str], tables: list[int], home: Path) -> dict:
    paths = {n: trials_csv(home, TABLES[n]) for n in tables}
    for item in items:
        n, sep, path = item.partition("=")
        if not sep or not n.strip().isdigit() or int(n) not in tables:
            raise StudyError(f"--trials {item!r}: expected N=PATH with N one of {tables}")
        if not Path(path).is_file():
            raise StudyError(f"--trials {item!r}: no file {path}")
        paths[int(n)] = Path(path).absolute()
    return paths


def report(args, home: Path) -> int:
    """`report`'s command line: the page for the study in `home` (args from ablations.py)."""
    if not home.is_dir():
        raise StudyError(f"--home {home}: no such directory (run the study there first)")
    paths = _trials_paths(args.trials, args.tables, home)
    state = read_state(home)
    entries = {n: state.get("tables", {}).get(str(n), {}) for n in args.tables}
    uri = args.tracking_uri or next((e["tracking_uri"] for e in entries.values()
                                     if e.get("tracking_uri")), "") or tracking_uri(home)
    how = f"python benchmarks/ablations.py report --home {shown(home)}"
    done = write_report(args.out.absolute(), args.tables, paths, entries, uri, ROOT, how,
                        state.get("prepare", {}).get("command", ""), args.default_seeds)
    print(f"ablations: wrote {args.out}" + "".join(f", {p}" for p in done["plots"].values()))
    return 0
