"""Each table's results, read from its trials.csv, and the conclusions the page draws from them.

Per setting (the values of the table's axes) the finished seeds are aggregated: mean ± spread,
where spread is half the range, (max - min) / 2 over the n seeds (for n = 2 it equals the
population standard deviation); n is printed beside it. Only COMPLETED trials with an FID count.
Class accuracy comes from trials.csv when it has an `eval/class_accuracy` column, else from each
trial's MLflow run (`run_id`), where the training loop logs it. Two settings are
"distinguishable" when their seed ranges do not overlap: |difference of means| > the sum of
their spreads, which needs at least 2 seeds each. Every sentence of a conclusion is made here
from those numbers (`conclusions`); none is written by hand.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from ablations_study import SEED_AXIS, PaperRow, TableSpec, show_values, value_key

FID, ACC = "eval/fid", "eval/class_accuracy"
REQUIRED = ("trial_id", FID, "status")


@dataclass
class Setting:
    values: tuple
    paper: PaperRow | None
    no_row: str = ""  # why the paper has no row for it
    fids: list = field(default_factory=list)
    accs: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    seeds: list = field(default_factory=list)  # the finished ones
    missing: list = field(default_factory=list)  # "seed 1: FAILED", ...
    in_sweep: bool = True

    @property
    def label(self) -> str:
        return ", ".join(show_values(self.values))


@dataclass
class TableResult:
    spec: TableSpec
    csv_path: Path
    entry: dict  # the table's record in the state file ({} if none)
    settings: list = field(default_factory=list)
    expected_seeds: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # why the table cannot be read at all
    acc_note: str = ""

    @property
    def measured(self) -> list:
        return [s for s in self.settings if s.fids]


def aggregate(values: list) -> tuple[float, float, int]:
    """(mean, spread = half the range, n); NaNs when there is nothing."""
    if not values:
        return math.nan, math.nan, 0
    return sum(values) / len(values), (max(values) - min(values)) / 2, len(values)


# ----------------------------------------------------------------------------- reading

def parse_cell(text: str):
    """A trials.csv cell back to its value: lists and numbers are JSON there, names are bare."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return text


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def read_trials(path: Path, spec: TableSpec) -> tuple[list[dict], list[str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows, columns = list(reader), reader.fieldnames or []
    lacking = [c for c in (*REQUIRED, *spec.axes) if c not in columns]
    if lacking:
        return [], [f"{path} lacks the column(s) {', '.join(lacking)}"]
    return rows, []


def swept_settings(spec: TableSpec, sweep_file: Path) -> tuple[list[tuple], list]:
    """(the settings the sweep file's grids make, in its order; its train.seed grid or [])."""
    search = (yaml.safe_load(sweep_file.read_text()) or {}).get("search") or {}
    grids = [search.get(a, {}).get("grid", []) for a in spec.axes]
    return [tuple(v) for v in itertools.product(*grids)], search.get(SEED_AXIS, {}).get("grid", [])


def class_accuracies(uri: str, run_ids: list[str]) -> tuple[dict, str]:
    """eval/class_accuracy (its latest value) of each MLflow run; a note when none can be read."""
    if not run_ids:
        return {}, ""
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        return {}, f"not available, MLflow store {uri} not found"
    from mlflow import MlflowClient  # seconds to import: only when there is a store to read
    from mlflow.exceptions import MlflowException

    client, found = MlflowClient(tracking_uri=uri), {}
    for rid in run_ids:
        try:
            value = client.get_run(rid).data.metrics.get(ACC)
        except MlflowException:  # a run id the store does not know: that trial's accuracy is missing
            value = None
        if value is not None:
            found[rid] = float(value)
    return found, "" if found else f"not logged ({ACC}) in the runs of {uri}"


def table_result(spec: TableSpec, csv_path: Path, entry: dict, uri: str, root: Path,
                 default_seeds: list) -> TableResult:
    """The table's settings (the sweep file's, those in trials.csv, the paper's rows), each with
    its finished seeds and what is missing. Seeds expected: those the run recorded, else the
    sweep file's train.seed grid, else those in trials.csv, else `default_seeds` (run's)."""
    res = TableResult(spec, csv_path, entry)
    expected, file_seeds = swept_settings(spec, root / spec.sweep_file)
    rows = []
    if csv_path.is_file():
        rows, res.problems = read_trials(csv_path, spec)
    has_seed = bool(rows) and SEED_AXIS in rows[0]
    seen_seeds = sorted({parse_cell(r[SEED_AXIS]) for r in rows}) if has_seed else []
    no_seed_column = [None] if rows and not has_seed else []  # one run per setting
    res.expected_seeds = (entry.get("settings", {}).get("seeds") or file_seeds or seen_seeds
                          or no_seed_column or list(default_seeds))
    by_key: dict = {}
    for r in rows:
        values = tuple(parse_cell(r[a]) for a in spec.axes)
        by_key.setdefault(value_key(values), (values, []))[1].append(r)
    keys = [value_key(v) for v in expected]
    order = list(dict.fromkeys(keys + list(by_key) + [value_key(p.values) for p in spec.rows]))
    values_of = {**{value_key(v): v for v in expected}, **{k: v for k, (v, _) in by_key.items()},
                 **{value_key(p.values): p.values for p in spec.rows}}
    accs, res.acc_note = _accuracies(rows, uri)
    for key in order:
        s = Setting(values_of[key], spec.paper_row(key), spec.no_row.get(key, ""),
                    in_sweep=key in keys or key in by_key)
        _fill(s, by_key.get(key, ((), []))[1], res.expected_seeds, accs, has_seed)
        res.settings.append(s)
    return res


def _accuracies(rows: list[dict], uri: str) -> tuple[dict, str]:
    """trial_id -> class accuracy, from the CSV's column when present, else from MLflow."""
    if rows and ACC in rows[0]:
        accs = {r["trial_id"]: _float(r[ACC]) for r in rows}
        found = any(math.isfinite(v) for v in accs.values())
        return accs, "" if found else f"not recorded ({ACC} empty in trials.csv)"
    done = [r for r in rows if r["status"] == "COMPLETED" and r.get("run_id")]
    by_run, note = class_accuracies(uri, [r["run_id"] for r in done])
    return {r["trial_id"]: by_run[r["run_id"]] for r in done if r["run_id"] in by_run}, note


def _fill(s: Setting, rows: list[dict], seeds: list, accs: dict, has_seed: bool) -> None:
    """The setting's finished seeds and, for each expected seed that is not, why."""
    if not s.in_sweep:
        s.missing.append("not in the sweep file")
        return
    by_seed = {(parse_cell(r[SEED_AXIS]) if has_seed else None): r for r in rows}
    for seed in list(dict.fromkeys(list(seeds) + list(by_seed))):
        r, name = by_seed.get(seed), "the run" if seed is None else f"seed {seed}"
        if r is None:
            s.missing.append(f"{name}: not run")
        elif r["status"] != "COMPLETED":
            s.missing.append(f"{name}: {r['status'] or 'no status'}")
        elif not math.isfinite(_float(r[FID])):
            s.missing.append(f"{name}: COMPLETED without {FID}")
        else:
            s.seeds.append(seed)
            s.fids.append(_float(r[FID]))
            s.losses += [v for v in [_float(r.get("loss"))] if math.isfinite(v)]
            s.accs += [accs[r["trial_id"]]] if math.isfinite(accs.get(r["trial_id"], math.nan)) else []


# ----------------------------------------------------------------------------- conclusions

def _stat(s: Setting) -> str:
    mean, spread, n = aggregate(s.fids)
    return f"{mean:.2f} ± {spread:.2f} (n={n})" if n > 1 else f"{mean:.2f} (n={n})"


def compare(a: Setting, b: Setting) -> tuple[float, float | None, bool]:
    """(mean FID of b - mean FID of a, combined spread or None with < 2 seeds, distinguishable)."""
    (ma, sa, na), (mb, sb, nb) = aggregate(a.fids), aggregate(b.fids)
    if na < 2 or nb < 2:
        return mb - ma, None, False
    return mb - ma, sa + sb, abs(mb - ma) > sa + sb


def _judged(diff: float, spread: float | None, distinct: bool) -> str:
    if spread is None:
        return f"difference {abs(diff):.2f}; seed spread unknown (fewer than 2 seeds): not judged"
    return (f"difference {abs(diff):.2f} against a combined seed spread of {spread:.2f}: "
            f"{'distinguishable' if distinct else 'not distinguishable'} at this scale")


def best_claim(res: TableResult) -> tuple[str, str, bool]:
    """(sentence, holds|fails|unchecked, distinguishable) for "the paper's best row is lowest"."""
    best = res.spec.paper_best
    mine = next(s for s in res.settings if s.paper is best)
    ranked = sorted((s for s in res.measured if s.paper), key=lambda s: aggregate(s.fids)[0])
    name = f"`{mine.label}` (paper: {best.name})"
    if not mine.fids or len(ranked) < 2:
        why = "it has no finished seed" if not mine.fids else "no other paper row measured"
        return f"{name} has the lowest FID in the paper; cannot be checked here: {why}.", "unchecked", False
    if ranked[0] is mine:
        other, verb = ranked[1], "is"
        tail = f"the next is `{other.label}`, {_stat(other)}"
    else:
        other, verb = ranked[0], "is not"
        tail = f"the lowest is `{other.label}` ({other.paper.name}), {_stat(other)}"
    diff, spread, distinct = compare(mine, other)
    text = (f"{name} {verb} the lowest mean FID of the paper's rows: {_stat(mine)}; {tail}; "
            f"{_judged(diff, spread, distinct)}.")
    lowest = min(res.measured, key=lambda s: aggregate(s.fids)[0])
    if not lowest.paper:
        text += f" Of all settings the lowest is `{lowest.label}` (no paper row), {_stat(lowest)}."
    return text, "holds" if verb == "is" else "fails", distinct


def pair_claim(res: TableResult, claim) -> tuple[str, str, bool]:
    better, worse = (next((s for s in res.settings if value_key(s.values) == value_key(v)), None)
                     for v in (claim.better, claim.worse))
    head = (f"Paper: {claim.says}"
            + (" (rests on the inferred per-token assignment)" if claim.inferred else "") + ": ")
    if not (better and better.fids and worse and worse.fids):
        gone = [f"`{', '.join(show_values(v))}`" for v, s in ((claim.better, better),
                                                               (claim.worse, worse)) if not (s and s.fids)]
        return head + f"cannot be checked, no finished seed of {' and '.join(gone)}.", "unchecked", False
    diff, spread, distinct = compare(better, worse)
    holds = diff > 0
    return (head + f"`{better.label}` {_stat(better)} vs `{worse.label}` {_stat(worse)}: "
            f"{'holds' if holds else 'does not hold'} ({_judged(diff, spread, distinct)})."), \
        "holds" if holds else "fails", distinct


def pairs_line(res: TableResult) -> str:
    rows = [s for s in res.measured if s.paper]
    pairs = [(a, b) if a.paper.fid < b.paper.fid else (b, a)
             for a, b in itertools.combinations(rows, 2) if a.paper.fid != b.paper.fid]
    agree = [(a, b) for a, b in pairs if compare(a, b)[0] > 0]
    reverse = [(a, b) for a, b in pairs if compare(a, b)[0] <= 0]

    def n_distinct(ps):
        return sum(compare(a, b)[2] for a, b in ps)
    return (f"Pairs of paper rows in the paper's order here: {len(agree)} of {len(pairs)} "
            f"({n_distinct(agree)} distinguishable); in the reverse order: {len(reverse)} "
            f"({n_distinct(reverse)} distinguishable).")


def conclusions(res: TableResult) -> list[str]:
    """The conclusion block's lines: the paper's best row, each of the paper's claims, the pairs
    in order, and a verdict over the claims (over the best row alone when the table has none:
    where it has claims, they imply its best row, which is not counted twice)."""
    if not res.measured:
        return ["No conclusion: no trial of this table has finished with an FID."]
    best = best_claim(res)
    pairs = [pair_claim(res, c) for c in res.spec.claims]
    lines = [c[0] for c in [best, *pairs]] + [pairs_line(res)]
    claims = pairs or [best]
    states = [c[1] for c in claims]
    n = len(claims)
    if "unchecked" in states:
        verdict = (f"cannot be fully judged: {states.count('unchecked')} of {n} claims could not "
                   "be checked, settings or seeds missing")
    elif "fails" in states:
        strong = sum(1 for c in claims if c[1] == "fails" and c[2])
        verdict = (f"does not hold at this scale: {states.count('fails')} of {n} claims fail, "
                   f"{strong} of them distinguishable")
    elif all(c[2] for c in claims):
        verdict = "holds at this scale: every claim holds and is distinguishable"
    else:
        weak = sum(1 for c in claims if not c[2])
        verdict = (f"holds in direction only: every claim holds, but {weak} of {n} are not "
                   "distinguishable at this scale")
    partial = "unchecked" not in states and any(s.missing for s in res.settings if s.paper)
    lines.append(f"**Verdict: the paper's ordering {verdict}"
                 + (" (from incomplete seeds, see Missing).**" if partial else ".**"))
    return lines


