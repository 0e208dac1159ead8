"""Every shipped tiny sweep file (configs/sweeps/*-tiny.yaml), run as its header says.

Each test reads the `flowar sweep ...` command from the file's header comment and runs it the
way a user would: from a fresh directory, with the header's relative data.path, no tracking URI
and no storage path (FLOWAR_HOME unset), so every MLflow run must land in that directory's
./flowar-runs/mlflow.db. The header's latent dataset (from `flowar encode`, with the image
pyramid for Table 3) is stood in for by a small one written with the encode job's own writer.

Appended to the header's command, to keep the four sweeps to a few minutes on 2 cores:
* sizes: 4 steps, a report and an in-training FID (ASHA rung) every 2 steps, of 8 samples against
  8 test images, and ASHA's grace period scaled down with them (the files' 10 steps of 30 become
  2 of 4);
* a CAP ON EACH GRID (`sweep.search=...` narrowing one axis, see CAPS): a trial costs 15-50 s
  of Ray start-up (trial actor, Train controller, worker group) however small the model, so the
  files' 32 trials (two seeds each) would take 15-30 min. Kept (6 trials, about 3 min): what each table adds to a
  default training run. Table 3's image arm, Table 4's [1, 4, 8] (the latent arm and [1, 2, 4, 8]
  are the default training of the other files), both heads with the diffusion objective, and the
  two injections that need every parameter to take part under DDP (cross_attention,
  channel_concat; two trials under ASHA). Every value of every full grid still builds a valid
  trial config against the dataset in test_sweep.py::test_shipped_table3_to_table6_sweeps_validate.
  FLOWAR_TEST_FULL_GRIDS=1 runs the files' whole grids.
Checked: no trial failed; each row of trials.csv has the run id of a child run of the sweep's
parent in the default store; a trial is COMPLETED exactly when it ran all steps (its export
exists) and STOPPED_EARLY when the scheduler stopped it before.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import pytest

from test_sweep import check_trials, default_store, make_dataset
from test_train_eval import tiny_vae

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ROOT / "configs" / "sweeps"
MAX_STEPS = 4
SMALL = [f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=2", "train.log_every=2",
         "train.warmup_steps=1", "train.global_batch_size=8", "train.sample_classes=[0,1]",
         "train.samples_per_class=1", "sweep.scheduler.grace_period=2",
         # in-training FID at steps 2 and 4 (the files rank by eval/fid) of 8 samples against
         # 8 test images, instead of 100 against 1,000
         "train.eval_every=2", "train.eval_samples=8", "train.eval_batch_size=8",
         "train.eval_reference_images=8"]
FULL_GRIDS = os.environ.get("FLOWAR_TEST_FULL_GRIDS") == "1"
CAPS = {  # see the module docstring; (override, trials it leaves). An override of `search`
    # merges into the file's axes: the seed axis is narrowed to one seed too.
    "table3-scale-construction-tiny":
        ("sweep.search={model.scale_construction: {grid: [image]}, train.seed: {grid: [0]}}", 1),
    "table4-scales-tiny": ("sweep.search={model.scales: {grid: [[1, 4, 8]]}, train.seed: {grid: [0]}}", 1),
    "table5-head-objective-tiny":
        ("sweep.search={model.objective: {grid: [diffusion]}, train.seed: {grid: [0]}}", 2),
    "table6-injection-tiny": ("sweep.search={model.injection: {grid: [cross_attention, channel_concat]}, "
                              "train.seed: {grid: [0]}}", 2),
}
TRIALS = {"table3-scale-construction-tiny": 4, "table4-scales-tiny": 6,
          "table5-head-objective-tiny": 8, "table6-injection-tiny": 14}  # x 2 seeds


def header_command(sweep_file: Path) -> list[str]:
    """The arguments of the header's `flowar sweep` command line (with its continuation lines),
    the sweep file's repo-relative path made absolute: the test runs from another directory."""
    comments = [line.lstrip("#").strip() for line in sweep_file.read_text().splitlines()
                if line.startswith("#")]
    start = next(i for i, line in enumerate(comments) if line.startswith("flowar sweep "))
    command = comments[start]
    for line in comments[start + 1:]:
        if not command.endswith("\\"):
            break
        command = command[:-1] + " " + line
    argv = shlex.split(command)[1:]  # drop "flowar"
    assert argv[0] == "sweep" and (ROOT / argv[1]).resolve() == sweep_file.resolve(), argv
    return ["sweep", str(ROOT / argv[1]), *argv[2:]]


def test_header_commands_are_read_as_written():
    argv = header_command(SWEEPS / "table3-scale-construction-tiny.yaml")
    assert argv == ["sweep", str(SWEEPS / "table3-scale-construction-tiny.yaml"),
                    "data.path=./flowar-runs/latents-fashion-mnist-img"]
    assert sorted(p.stem for p in SWEEPS.glob("*-tiny.yaml")) == sorted(TRIALS) == sorted(CAPS)


# Table 6's header command is the README's sweep line: tests/test_readme.py runs it (with these
# sizes and this cap) as the last stage of the README's pipeline, on the latents its encode wrote.
RUN_BY_README_TEST = "table6-injection-tiny"


def test_readme_sweep_line_is_the_table6_header_command():
    from test_readme import readme_commands

    line = next(argv for argv in readme_commands() if argv[1] == "sweep")
    header = header_command(SWEEPS / f"{RUN_BY_README_TEST}.yaml")
    assert ["sweep", str(ROOT / line[2]), *line[3:]] == header, (line, header)


@pytest.mark.parametrize("name", sorted(set(TRIALS) - {RUN_BY_README_TEST}))
def test_shipped_tiny_sweep_runs_as_its_header_says(name, ray_local, tmp_path, monkeypatch,
                                                    capsys):
    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLOWAR_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv = header_command(SWEEPS / f"{name}.yaml")
    data = next(a.split("=", 1)[1] for a in argv if a.startswith("data.path="))
    assert not Path(data).is_absolute(), data
    # The quickstart's 4x8x8 latents; the image pyramid too (Table 3's header encodes it).
    # Decoded by a tiny saved VAE: the trials' in-training evaluation makes images.
    make_dataset(tmp_path / data, count=16, side=8, image_scales=(1, 2, 4),
                 vae=str(tiny_vae(tmp_path / "vae")))

    cap, trials = ([], TRIALS[name]) if FULL_GRIDS else ([CAPS[name][0]], CAPS[name][1])
    code = main([*argv, *SMALL, *cap])
    printed = capsys.readouterr().out

    summary = tmp_path / "flowar-runs" / "ray_results" / name / "summary"
    rows = check_trials(summary, default_store(tmp_path), name, MAX_STEPS,
                        experiment="flowar-sweeps")
    assert len(rows) == trials, rows
    assert code == 0, printed[-3000:]
    for row in rows:  # the printed table says what trials.csv says
        line = next(ln for ln in printed.splitlines() if f"| {row['trial_id']} |" in ln)
        assert line.rstrip().endswith(f"| {row['status']} |"), line
