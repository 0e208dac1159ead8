"""What the ablation study (benchmarks/ablations.py) is and where it keeps things: the three
tables (which shipped tiny sweep re-runs each, which config keys make a setting, the paper's
numbers for the same rows and the paper's claims), the places under the study's home (latents,
classifier, each table's Tune experiment and trials.csv) and its state file.

The paper's numbers are read from its text (arXiv 2412.15205, Sec. 4.2,
https://arxiv.org/abs/2412.15205). They are ImageNet 256x256 FIDs/IS of FlowAR-S-sized models
(every table's default row, 3.61 / 234.1, is Table 1's FlowAR-S row); the study runs the tiny
preset on 4x8x8 Fashion-MNIST latents, so only the ordering of rows can be compared, never values.

How each table was read (the text extraction loses some columns):
* Table 6: rows and FID/IS as printed; the paper has no row for cross_attention_adaln (the
  published L/H code's design), so that setting has no paper number.
* Table 4: the extraction drops the "scales" column; the text beside it names the FlowAR rows:
  {1, 2, 4, 8, 16} FID 3.61, {1, 4, 8, 16} 4.88, {1, 4, 16} 6.10 (IS 234.1, 200.1, 194.2 in
  the table's order). The 8x8 sequences are the shipped sweep file's: every octave [1, 2, 4, 8],
  without the 2x2 scale [1, 4, 8], and [1, 8]; like the paper's rows, each has one scale fewer
  than the one before.
* Table 5: the extraction drops where the check marks sit. The text fixes per-scale + flow
  matching = 3.61 (the final model) and says per-scale beats per-token under both objectives and
  flow matching gives "marginal improvements" over diffusion; so per-scale + diffusion = 3.93.
  The per-token pair (6.85, 6.15) is assigned in the table's row order (diffusion before flow
  matching, as for the per-scale pair): per-token + diffusion 6.85, per-token + flow 6.15.
  That assignment is an inference; the claims built on it say so.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE_FILE = "ablations-state.json"
LATENTS = "latents-fashion-mnist"  # the quickstart's names under its home
CLASSIFIER = "classifier"


@dataclass(frozen=True)
class PaperRow:
    name: str  # the row as the paper names it
    values: tuple  # the config values of TableSpec.axes for the same row
    fid: float
    inception_score: float


@dataclass(frozen=True)
class Claim:
    """The paper says `better` has a lower FID than `worse` (both tuples of axis values)."""
    better: tuple
    worse: tuple
    says: str  # the paper's statement, in words
    inferred: bool = False  # rests on the inferred Table 5 assignment


@dataclass(frozen=True)
class TableSpec:
    number: int
    title: str
    sweep_file: str  # relative to the repository root
    axes: tuple  # the sweep axes that make a setting (train.seed is the repeat axis)
    rows: tuple  # PaperRow, in the paper's order
    claims: tuple = ()  # Claim, checked besides "the paper's best row has the lowest FID"
    no_row: dict = field(default_factory=dict)  # value key -> why the paper has no such row
    reading: str = ""  # how the paper's numbers were read, printed under the table

    @property
    def sweep_name(self) -> str:
        """The study's own sweep name: a user's plain run of the same file is left alone."""
        stem = self.sweep_file.rsplit("/", 1)[-1].removesuffix(".yaml")
        return f"ablations-{stem}"

    def paper_row(self, key: tuple) -> PaperRow | None:
        return next((r for r in self.rows if value_key(r.values) == key), None)

    @property
    def paper_best(self) -> PaperRow:
        return min(self.rows, key=lambda r: r.fid)


SEED_AXIS = "train.seed"


def value_key(values) -> tuple:
    """A setting's values as a hashable key, the same for a YAML value and a trials.csv cell."""
    return tuple(json.dumps(v) for v in values)


def show_values(values) -> list[str]:
    return [json.dumps(v) if isinstance(v, (list, tuple)) else str(v) for v in values]


TABLE6 = TableSpec(
    6, "Injection of semantics", "configs/sweeps/table6-injection-tiny.yaml", ("model.injection",),
    rows=(PaperRow("adaLN", ("adaln",), 14.28, 111.9),
          PaperRow("sequence concatenation", ("sequence_concat",), 9.22, 146.9),
          PaperRow("addition", ("addition",), 6.22, 188.2),
          PaperRow("cross attention", ("cross_attention",), 5.37, 202.5),
          PaperRow("channel concatenation", ("channel_concat",), 4.85, 210.9),
          PaperRow("spatial-adaLN", ("spatial_adaln",), 3.61, 234.1)),
    no_row={value_key(("cross_attention_adaln",)): "not in Table 6: the published L/H design"},
    reading="Rows and FID/IS as printed in Table 6.")

TABLE4 = TableSpec(
    4, "Scale configurations", "configs/sweeps/table4-scales-tiny.yaml", ("model.scales",),
    rows=(PaperRow("FlowAR {1, 2, 4, 8, 16}", ([1, 2, 4, 8],), 3.61, 234.1),
          PaperRow("FlowAR {1, 4, 8, 16}", ([1, 4, 8],), 4.88, 200.1),
          PaperRow("FlowAR {1, 4, 16}", ([1, 8],), 6.10, 194.2)),
    claims=(Claim(([1, 2, 4, 8],), ([1, 4, 8],), "{1, 2, 4, 8, 16} beats {1, 4, 8, 16}"),
            Claim(([1, 4, 8],), ([1, 8],), "{1, 4, 8, 16} beats {1, 4, 16}")),
    reading="FlowAR rows from the text beside Table 4 (the extraction drops its scales column). "
            "The 8x8 sequences are the sweep file's: every octave, without the 2x2 scale, and "
            "[1, 8]; like the paper's rows, each has one scale fewer than the one before.")

_SF, _SD = ("per_scale", "flow"), ("per_scale", "diffusion")
_TF, _TD = ("per_token", "flow"), ("per_token", "diffusion")
TABLE5 = TableSpec(
    5, "Per-scale vs per-token head x flow matching vs diffusion",
    "configs/sweeps/table5-head-objective-tiny.yaml", ("model.head", "model.objective"),
    rows=(PaperRow("per-token + diffusion", _TD, 6.85, 155.6),
          PaperRow("per-token + flow-matching", _TF, 6.15, 184.1),
          PaperRow("per-scale + diffusion", _SD, 3.93, 223.9),
          PaperRow("per-scale + flow-matching", _SF, 3.61, 234.1)),
    claims=(Claim(_SF, _TF, "per-scale beats per-token with flow matching"),
            Claim(_SD, _TD, "per-scale beats per-token with diffusion"),
            Claim(_SF, _SD, "flow matching marginally beats diffusion (per-scale)"),
            Claim(_TF, _TD, "flow matching beats diffusion (per-token)", inferred=True)),
    reading="Check-mark columns are lost in the paper's text extraction: per-scale + flow = 3.61 "
            "and per-scale + diffusion = 3.93 follow from the text; the per-token pair is "
            "assigned in the table's row order (diffusion 6.85, flow 6.15), an inference.")

TABLES = {6: TABLE6, 4: TABLE4, 5: TABLE5}


class StudyError(ValueError):
    """Bad input or a state that does not fit: raised before any work starts."""


# ----------------------------------------------------------------------------- places and state

def default_home() -> Path:
    return Path(os.environ.get("FLOWAR_HOME") or ROOT / "flowar-runs").absolute()


def shown(path: Path) -> str:
    """A path as the user would type it from the repository root."""
    try:
        return "./" + str(Path(path).absolute().relative_to(ROOT))
    except ValueError:
        return str(path)


def tracking_uri(home: Path) -> str:
    """The MLflow store `flowar sweep` uses with FLOWAR_HOME=home (pipelines.core.config)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"


def experiment_dir(home: Path, spec: TableSpec) -> Path:
    return home / "ray_results" / spec.sweep_name


def trials_csv(home: Path, spec: TableSpec) -> Path:
    return experiment_dir(home, spec) / "summary" / "trials.csv"


def read_state(home: Path) -> dict:
    path = home / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StudyError(f"state file {path} is not valid JSON ({e}); fix or remove it") from None


def write_state(home: Path, state: dict) -> None:
    """Written whole and renamed into place: a killed run never leaves half a file."""
    tmp = home / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(home / STATE_FILE)


def sweep_status(home: Path, spec: TableSpec) -> str:
    """complete | failed (finished, not every trial COMPLETED) | interrupted | not_started."""
    path = trials_csv(home, spec)
    if path.is_file():
        with open(path, newline="") as f:
            statuses = [row.get("status", "") for row in csv.DictReader(f)]
        return "complete" if statuses and all(s == "COMPLETED" for s in statuses) else "failed"
    if (experiment_dir(home, spec) / "tuner.pkl").is_file():  # Tune's restorable state
        return "interrupted"
    return "not_started"
