"""benchmarks/ablations.py: `report` on hand-written trials.csv files, and `run`'s dry path.

The trials.csv files are real CSV files in the layout `flowar sweep` writes (trial_id, each axis
including train.seed, eval/fid, loss, step, status, run_id, export_dir). Table 6's has no class
accuracy column: its accuracies are in a real MLflow SQLite store, logged on the runs the CSV
names, as the training loop logs them. Table 4's carries them beside the FID (eval/kid,
eval/class_accuracy), as the summary writes them when the trials report them. Table 6 is built
so that the paper's ordering holds (spatial_adaln lowest, beyond the seed spread), Table 4 so
that it does not, and Table 5 is not run at all. No Ray, no training.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import ablations  # noqa: E402 (imported once benchmarks/ is on the path)
from ablations_study import TABLES  # noqa: E402

# (setting value, seed, FID or None, status, class accuracy or None)
TABLE6 = [("spatial_adaln", 0, 40.0, "COMPLETED", 0.80), ("spatial_adaln", 1, 42.0, "COMPLETED", 0.90),
          ("channel_concat", 0, 50.0, "COMPLETED", 0.60), ("channel_concat", 1, 54.0, "COMPLETED", 0.70),
          ("cross_attention", 0, 60.0, "COMPLETED", None), ("cross_attention", 1, 61.0, "COMPLETED", None),
          ("adaln", 0, 90.0, "COMPLETED", None), ("adaln", 1, 95.0, "COMPLETED", None),
          ("sequence_concat", 0, 70.0, "COMPLETED", None), ("sequence_concat", 1, None, "FAILED", None),
          ("cross_attention_adaln", 0, 45.0, "COMPLETED", None),
          ("cross_attention_adaln", 1, 47.0, "COMPLETED", None)]  # no `addition` at all
TABLE4 = [([1, 2, 4, 8], 0, 32.0, "COMPLETED", 0.5), ([1, 2, 4, 8], 1, 34.0, "COMPLETED", 0.7),
          ([1, 4, 8], 0, 30.0, "COMPLETED", 0.6), ([1, 4, 8], 1, 33.0, "COMPLETED", 0.6),
          ([1, 8], 0, 45.0, "COMPLETED", 0.4), ([1, 8], 1, 47.0, "COMPLETED", 0.4)]
SETTINGS = ablations.StudySettings(steps=300, eval_samples=500, eval_every=0, seeds=[0, 1],
                                   reference="fashion-mnist:test", reference_images=0,
                                   checkpoint_every=30)


def write_trials(home: Path, number: int, trials: list, uri: str, acc_column: bool) -> Path:
    """trials.csv where the study's sweep writes it; class accuracies in a column beside the FID
    (`acc_column`) or only on the trials' real MLflow runs."""
    from mlflow import MlflowClient

    spec = TABLES[number]
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(f"flowar-sweeps-{number}")
    path = ablations.trials_csv(home, spec)
    path.parent.mkdir(parents=True)
    beside = ["loss", "eval/kid", "eval/class_accuracy"] if acc_column else ["loss"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial_id", spec.axes[0], "train.seed", "eval/fid", *beside, "step", "status",
                    "run_id", "export_dir"])
        for i, (value, seed, fid, status, acc) in enumerate(trials):
            run_id = client.create_run(exp).info.run_id
            if acc is not None and not acc_column:
                client.log_metric(run_id, "eval/class_accuracy", acc, step=300)
            cell = json.dumps(value) if isinstance(value, list) else value
            metrics = [f"{0.5 + 0.01 * i:.4g}"] + (["0.01", f"{acc:.4g}"] if acc_column else [])
            w.writerow([f"t{number}_{i:05d}", cell, seed, "nan" if fid is None else f"{fid:.4g}",
                        *metrics, 300 if fid else 120, status, run_id,
                        f"/x/t{i}/export" if fid else ""])
    return path


def row(page: str, table: int, label: str) -> str:
    """The line of Table `table`'s Markdown table whose first cell is `label`."""
    section = page.split(f"## Table {table}:")[1].split("\n## ")[0]
    lines = [ln for ln in section.splitlines() if ln.startswith(f"| `{label}` |")]
    assert len(lines) == 1, (label, section)
    return lines[0]


def conclusion(page: str, table: int) -> str:
    m = re.search(rf"<!-- conclusion table {table}:.*?-->\n(.*?)<!-- end conclusion table {table} -->",
                  page, re.DOTALL)
    assert m, page
    return m.group(1)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    home = tmp_path_factory.mktemp("ablations-home")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    write_trials(home, 6, TABLE6, uri, acc_column=False)
    write_trials(home, 4, TABLE4, uri, acc_column=True)
    command = ablations.display(ablations.sweep_argv(TABLES[6], SETTINGS, home), home)
    state = {"tables": {"6": {
        "command": command, "settings": asdict(SETTINGS), "tracking_uri": uri,
        "attempts": [{"resume": False, "wall_seconds": 1000.0, "returncode": 1},
                     {"resume": True, "wall_seconds": 2600.0, "returncode": 0}],
        "wall_seconds": 3600.0}}}
    ablations.write_state(home, state)
    out = home / "site" / "ablations.md"
    assert ablations.main(["report", "--home", str(home), "--out", str(out)]) == 0
    return home, out, out.read_text(), command


def test_report_aggregates_seeds_with_paper_numbers_beside_the_right_rows(report):
    _, out, page, command = report
    # mean ± half the range over the seeds, class accuracy from MLflow, seeds finished of 2
    r = row(page, 6, "spatial_adaln")
    assert "41.00 ± 1.00" in r and "85.0 ± 5.0 %" in r and "| 2/2 |" in r
    assert "| spatial-adaLN | 3.61 | 234.1 |" in r
    r = row(page, 6, "channel_concat")
    assert "52.00 ± 2.00" in r and "65.0 ± 5.0 %" in r and "| channel concatenation | 4.85 | 210.9 |" in r
    r = row(page, 6, "adaln")
    assert "92.50 ± 2.50" in r and "| adaLN | 14.28 | 111.9 |" in r
    assert "70.00 (1 seed)" in row(page, 6, "sequence_concat") and "| 1/2 |" in row(page, 6, "sequence_concat")
    assert "| sequence concatenation | 9.22 | 146.9 |" in row(page, 6, "sequence_concat")
    assert "not in Table 6" in row(page, 6, "cross_attention_adaln")
    assert "| addition | 6.22 | 188.2 |" in row(page, 6, "addition") and "| 0/2 |" in row(page, 6, "addition")
    r = row(page, 4, "[1, 2, 4, 8]")
    assert "33.00 ± 1.00" in r and "60.0 ± 10.0 %" in r and "| FlowAR {1, 2, 4, 8, 16} | 3.61 | 234.1 |" in r
    assert "| FlowAR {1, 4, 8, 16} | 4.88 | 200.1 |" in row(page, 4, "[1, 4, 8]")
    assert "31.50 ± 1.50" in row(page, 4, "[1, 4, 8]") and "60.0 ± 0.0 %" in row(page, 4, "[1, 4, 8]")
    assert "| FlowAR {1, 4, 16} | 6.10 | 194.2 |" in row(page, 4, "[1, 8]")
    # Table 5 was not run: its paper rows are still listed, each with nothing measured
    assert "| per-scale + flow-matching | 3.61 | 234.1 |" in row(page, 5, "per_scale` | `flow")
    assert "| 0/2 |" in row(page, 5, "per_scale` | `flow")  # run's default seeds: no record
    assert "| per-token + diffusion | 6.85 | 155.6 |" in row(page, 5, "per_token` | `diffusion")
    # the exact command, its resume, the wall time; one plot per table that has data
    assert command in page and command + " --resume" in page and "sweep.scheduler.type=none" in command
    assert "1.00 h (3600 s) over 2 invocation(s): started, resumed" in page
    plots = sorted(p.name for p in (out.parent / "ablations").iterdir())
    assert plots == ["table4.png", "table6.png"]
    assert all((out.parent / "ablations" / p).read_bytes()[:4] == b"\x89PNG" for p in plots)
    assert "![Table 6](ablations/table6.png)" in page and "No plot" in page.split("## Table 5")[1]


def test_report_states_missing_tables_and_seeds(report):
    home, _, page, _ = report
    t6 = page.split("## Table 6:")[1].split("\n## ")[0]
    assert "**Missing**" in t6
    assert "- `sequence_concat`: seed 1: FAILED" in t6
    assert "- `addition`: seed 0: not run; seed 1: not run" in t6
    t5 = page.split("## Table 5:")[1]
    assert f"the whole table: not run (no {ablations.trials_csv(home, TABLES[5])})" in t5  # not in the repo
    assert "No conclusion: no trial of this table has finished" in conclusion(page, 5)
    assert "Table 5 (" in page and "**not run or unreadable**" in page
    assert "Table 6 (Injection of semantics): **incomplete**: 3 missing (setting, seed)" in page


def test_report_conclusion_where_the_paper_ordering_holds(report):
    text = conclusion(report[2], 6)
    assert ("`spatial_adaln` (paper: spatial-adaLN) is the lowest mean FID of the paper's rows: "
            "41.00 ± 1.00 (n=2); the next is `channel_concat`, 52.00 ± 2.00 (n=2); difference "
            "11.00 against a combined seed spread of 3.00: distinguishable at this scale.") in text
    # 5 paper rows measured: every pair in the paper's order; pairs with the 1-seed row not judged
    assert "in the paper's order here: 10 of 10 (6 distinguishable)" in text
    assert ("**Verdict: the paper's ordering holds at this scale: every claim holds and is "
            "distinguishable (from incomplete seeds, see Missing).**") in text


def test_report_conclusion_where_the_paper_ordering_does_not_hold(report):
    text = conclusion(report[2], 4)
    assert ("`[1, 2, 4, 8]` (paper: FlowAR {1, 2, 4, 8, 16}) is not the lowest mean FID of the "
            "paper's rows: 33.00 ± 1.00 (n=2); the lowest is `[1, 4, 8]` (FlowAR {1, 4, 8, 16}), "
            "31.50 ± 1.50 (n=2); difference 1.50 against a combined seed spread of 2.50: not "
            "distinguishable at this scale.") in text
    assert ("`[1, 2, 4, 8]` 33.00 ± 1.00 (n=2) vs `[1, 4, 8]` 31.50 ± 1.50 (n=2): does not hold "
            "(difference 1.50 against a combined seed spread of 2.50: not distinguishable") in text
    assert "`[1, 4, 8]` 31.50 ± 1.50 (n=2) vs `[1, 8]` 46.00 ± 1.00 (n=2): holds" in text
    assert ("**Verdict: the paper's ordering does not hold at this scale: 1 of 2 claims fail, 0 of "
            "them distinguishable.**") in text


def test_report_refuses_bad_input_naming_it(tmp_path, capsys):
    assert ablations.main(["report", "--home", str(tmp_path / "nowhere")]) == 2
    assert "--home" in capsys.readouterr().err
    assert ablations.main(["report", "--home", str(tmp_path), "--trials", "6=/no/such.csv"]) == 2
    assert "/no/such.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ablations.main(["report", "--tables", "3"])
    assert "--tables" in capsys.readouterr().err


def test_run_dry_path_prints_the_commands_and_touches_nothing(tmp_path, capsys):
    home = tmp_path / "home"
    assert ablations.main(["run", "--dry-run", "--home", str(home), "--tables", "6,4",
                           "--steps", "50", "--seeds", "0,1,2"]) == 0
    out = capsys.readouterr().out
    assert not home.exists()
    assert "prepare (latent dataset" in out and "classifier" in out
    for file in ("table6-injection-tiny", "table4-scales-tiny"):
        line = next(ln for ln in out.splitlines() if f"configs/sweeps/{file}.yaml" in ln)
        assert line.strip().startswith(f"FLOWAR_HOME={home} flowar sweep configs/sweeps/{file}.yaml "
                                       f"data.path={home}/latents-fashion-mnist ")
        for part in (f"sweep.name=ablations-{file}", "sweep.scheduler.type=none",
                     "train.max_steps=50", "train.eval_every=50", "train.eval_samples=1000",
                     "'sweep.search={train.seed: {grid: [0, 1, 2]}}'",
                     f"train.eval_classifier={home}/classifier"):
            assert part in line, (part, line)
        assert "train.eval_reference" not in line  # the sweep file's reference, unless given
    assert "table 5" not in out


def test_run_skips_finished_tables_resumes_interrupted_ones_refuses_changed_ones(tmp_path, capsys):
    home = tmp_path
    done = ablations.trials_csv(home, TABLES[6])
    done.parent.mkdir(parents=True)
    done.write_text("trial_id,model.injection,train.seed,eval/fid,loss,step,status,run_id,export_dir\n"
                    "a,adaln,0,50,0.5,300,COMPLETED,r,e\n")
    (ablations.experiment_dir(home, TABLES[4])).mkdir(parents=True)
    (ablations.experiment_dir(home, TABLES[4]) / "tuner.pkl").write_bytes(b"")
    assert ablations.main(["run", "--dry-run", "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "table 6 [complete: skip]" in out and "table 5 [not_started: start]" in out
    assert "table 4 [interrupted: resume]" in out and " --resume" in out.split("table 4")[1].split("table 5")[0]
    ablations.write_state(home, {"tables": {"4": {"command": "flowar sweep (other options)"}}})
    assert ablations.main(["run", "--dry-run", "--home", str(home), "--steps", "20"]) == 2
    err = capsys.readouterr().err
    assert "table 4 was started with" in err and "flowar sweep (other options)" in err


def test_report_reads_other_trials_files_and_says_what_it_cannot_judge(tmp_path):
    """--trials N=PATH (e.g. a plain `flowar sweep` of the file): Table 5 with the per-token
    head never run and one seed each, Table 6 from a file without an FID column."""
    t5, t6 = tmp_path / "t5.csv", tmp_path / "t6.csv"
    t5.write_text("trial_id,model.head,model.objective,train.seed,eval/fid,loss,step,status,run_id,export_dir\n"
                  "a,per_scale,flow,0,20.5,0.5,30,COMPLETED,r1,e1\n"
                  "b,per_scale,diffusion,0,22,0.6,30,COMPLETED,r2,e2\n")
    t6.write_text("trial_id,model.injection,train.seed,loss,step,status,run_id,export_dir\n"
                  "a,adaln,0,0.5,30,COMPLETED,r1,e1\n")
    out = tmp_path / "page.md"
    assert ablations.main(["report", "--home", str(tmp_path), "--out", str(out), "--tables", "5,6",
                           "--trials", f"5={t5}", "--trials", f"6={t6}"]) == 0
    page = out.read_text()
    assert "20.50 (1 seed)" in row(page, 5, "per_scale` | `flow") and "| 1/2 |" in row(page, 5, "per_scale` | `flow")
    assert "- `per_token, diffusion`: seed 0: not run; seed 1: not run" in page
    assert "Class accuracy: not available, MLflow store" in page  # none in this home
    text = conclusion(page, 5)
    assert ("`per_scale, flow` 20.50 (n=1) vs `per_scale, diffusion` 22.00 (n=1): holds (difference "
            "1.50; seed spread unknown (fewer than 2 seeds): not judged)") in text
    assert "cannot be checked, no finished seed of `per_token, flow`" in text
    assert ("**Verdict: the paper's ordering cannot be fully judged: 3 of 4 claims could not be "
            "checked, settings or seeds missing.**") in text
    assert f"{t6} lacks the column(s) eval/fid" in page and "No conclusion" in conclusion(page, 6)
