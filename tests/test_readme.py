"""The README's "one command per stage" block, run as written from a fresh directory.

Each command is taken from README.md itself (so the README cannot drift from what is tested) and
run through the `flowar` command line in a temporary directory that holds only a `configs` link,
with relative paths, no tracking URI, no storage path and no FLOWAR_HOME: what a new user types.
Small sizes are appended as overrides. Every stage must find what the one before wrote, and every
output and MLflow run (sweep children included) must land in that directory's ./flowar-runs,
although Ray's workers and Tune's trials run in directories of their own.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from test_sweep import check_trials
from test_sweep_files import CAPS, MAX_STEPS
from test_sweep_files import SMALL as SWEEP_SMALL

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BLOCK_HEADING = "## The pipeline, one command per stage"

# Appended to each README command: the same commands at test size.
SMALL = {
    "vae": ["source.limit=600", "train.steps=12", "train.num_workers=1", "train.batch_size=32",
            "train.log_every=6", "train.image_every=12"],
    "encode": ["source.limit=600", "encode.shard_size=300"],
    "train": ["train.max_steps=6", "train.log_every=2", "train.checkpoint_every=6",
              "train.sample_every=0", "train.warmup_steps=2",
              # one in-training evaluation, at step 6, against the evaluate stage's 40 images
              "train.eval_samples=10", "train.eval_reference_images=40"],
    "sample": ["--per-class", "2", "sampler.num_steps=4"],
    "evaluate": ["generation.num_samples=20", "generation.samples_per_class=2",
                 "generation.shard_size=10", "generation.batch_size=10", "reference.max_images=40",
                 "sampler.num_steps=4", "metrics.prc=false", "metrics.kid_subset_size=10"],
    # The same sizes and grid cap as tests/test_sweep_files.py (which defers this file to here).
    "sweep": [*SWEEP_SMALL, CAPS["table6-injection-tiny"][0]],
}
# Lines of the block that need what a test machine has not: each is tested elsewhere.
RUN_ELSEWHERE = {
    "import": "needs the released FlowAR-S.pth and kl16.ckpt; tests/test_import.py runs it on "
              "the golden stand-ins",
    "submit": "needs a cluster; tests/test_submit.py submits to clusters/local/cluster.sh",
}
EXPERIMENT = {"vae": "flowar-vae", "train": "flowar-quickstart", "sweep": "flowar-sweeps"}


def readme_commands() -> list[list[str]]:
    """The `flowar ...` lines of the README's stage block, comments removed, split as a shell would."""
    text = (ROOT / "README.md").read_text()
    section = text.split(BLOCK_HEADING, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [shlex.split(line, comments=True) for line in block.splitlines()
            if line.startswith("flowar ")]


@pytest.fixture(scope="module")
def readme_run(ray_local, tmp_path_factory):
    """Run the block once; {stage: exit status} and the directory it ran in."""
    from pipelines.cli import main

    work = tmp_path_factory.mktemp("new-user")
    (work / "configs").symlink_to(ROOT / "configs")
    codes: dict[str, int] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        for var in ("FLOWAR_HOME", "MLFLOW_TRACKING_URI"):
            mp.delenv(var, raising=False)
        for argv in readme_commands():
            stage = argv[1]
            if stage in RUN_ELSEWHERE:
                continue
            codes[stage] = main(argv[1:] + SMALL[stage])
            if codes[stage] != 0:
                break  # the next stage would only fail on the missing output
    return work, codes


def test_block_is_the_pipeline():
    """Every line of the block is either run here or named as tested elsewhere."""
    stages = [argv[1] for argv in readme_commands()]
    assert all(argv[0] == "flowar" for argv in readme_commands())
    assert set(stages) == set(SMALL) | set(RUN_ELSEWHERE), stages
    assert stages.index("encode") < stages.index("train") < stages.index("evaluate")


def _outputs(work: Path) -> dict[str, list[Path]]:
    home = work / "flowar-runs"
    return {
        "vae": [home / "vae-fashion-mnist" / "config.json"],
        "encode": [home / "latents-fashion-mnist" / "metadata.json"],
        "train": [home / "export" / "config.json", home / "export" / "latents.json"],
        "sample": [work / "grid.png"],
        "evaluate": [next(iter((home / "eval").glob("*/report.json")), home / "eval" / "report.json")],
        "sweep": [home / "ray_results" / "table6-injection-tiny"],
    }


@pytest.mark.parametrize("stage", list(SMALL))
def test_stage_runs_with_relative_paths(readme_run, stage):
    """The stage exits 0 and its output is in the user's directory, where the next stage looks."""
    work, codes = readme_run
    assert codes.get(stage) == 0, f"{stage} exited {codes.get(stage)} (all: {codes})"
    for path in _outputs(work)[stage]:
        assert path.exists(), f"{stage}: {path} is missing"


@pytest.mark.parametrize("stage", ["vae", "train", "evaluate", "sweep"])
def test_stage_runs_land_in_default_store(readme_run, stage):
    """With no tracking URI, each run (and each sweep child) is in ./flowar-runs/mlflow.db, and no
    other MLflow store appeared: not in the user's directory, not in a Ray working directory."""
    from mlflow import MlflowClient

    work, codes = readme_run
    assert codes.get(stage) == 0, codes
    store = work / "flowar-runs" / "mlflow.db"
    client = MlflowClient(f"sqlite:///{store}")
    stray = [p for p in Path("/tmp").glob("ray/session_*/**/flowar-runs/mlflow.db")]
    assert sorted(work.rglob("mlflow.db")) == [store] and not stray, stray
    if stage == "evaluate":  # a child run of the training run of the export it evaluated
        from pipelines.evaluate.export import read_training_link

        train_id = read_training_link(work / "flowar-runs" / "export")["run_id"]
        exp_id = client.get_experiment_by_name(EXPERIMENT["train"]).experiment_id
        runs = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{train_id}'")
        assert any("eval/fid" in r.data.metrics for r in runs), [r.data.metrics for r in runs]
        # the training run holds its own in-training evaluation only (one point, at step 6)
        assert [m.step for m in client.get_metric_history(train_id, "eval/fid")] == [6]
        return
    exp = client.get_experiment_by_name(EXPERIMENT[stage])
    assert exp is not None, f"no experiment {EXPERIMENT[stage]!r} in {store}"
    runs = client.search_runs([exp.experiment_id])
    assert runs and all(r.info.status == "FINISHED" for r in runs if stage != "sweep"), runs
    if stage == "sweep":  # no failed trial, a child run per row, statuses that match
        rows = check_trials(work / "flowar-runs" / "ray_results" / "table6-injection-tiny" / "summary",
                            f"sqlite:///{store}", "table6-injection-tiny", MAX_STEPS,
                            experiment=EXPERIMENT["sweep"])
        assert len(rows) == CAPS["table6-injection-tiny"][1], rows
