"""The jobs of the `flowar` command, in the order of `flowar --help` (the order of the pipeline).

The one list of jobs: the command line (pipelines/cli.py) adds these and `flowar submit` /
`flowar jobs` on top; `flowar submit` parses a job's arguments with `job_parser()` before it
uploads anything. Kept apart from cli.py so that submit, which needs the jobs, and the command
line, which needs submit, do not import each other.

Every job module has `register(subparsers)`, which adds its subcommand and sets `func`. These
modules import torch, Ray and MLflow only inside functions, so `flowar --help` stays fast.
"""

from __future__ import annotations

import argparse

from pipelines import encode, import_published, quickstart, sample, vae_train
from pipelines.evaluate import job as evaluate
from pipelines.sweep import job as sweep
from pipelines.train import job as train

JOBS = [
    quickstart,        # flowar quickstart: the whole pipeline on the embedded default
    vae_train,         # flowar vae train
    encode,            # flowar encode
    train,             # flowar train
    import_published,  # flowar import: released FlowAR-S/L/H -> a model folder
    sample,            # flowar sample
    evaluate,          # flowar evaluate
    sweep,             # flowar sweep
]

PROG = "flowar"


def add_jobs(subparsers) -> None:
    """Add every job's subcommand to `subparsers`."""
    for module in JOBS:
        module.register(subparsers)


def job_parser() -> argparse.ArgumentParser:
    """A parser of the jobs alone (no submit, no jobs): what `flowar submit JOB args` may run."""
    parser = argparse.ArgumentParser(prog=PROG)
    add_jobs(parser.add_subparsers(dest="command", metavar="COMMAND"))
    return parser


def subcommands(parser: argparse.ArgumentParser) -> list[str]:
    """The names of a parser's subcommands, in order."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)
