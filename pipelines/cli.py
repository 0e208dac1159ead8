"""The `flowar` command line: one subcommand per job, all sharing the config system.

The jobs are listed once, in pipelines/registry.py; `flowar submit` and `flowar jobs`
(pipelines/submit/job.py) run them on a Ray cluster. Job modules import their heavy dependencies
(torch, ray, mlflow) inside functions, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import sys

import yaml

from flowar.config import ConfigError, to_dict
from pipelines import registry
from pipelines.submit import job as submit

DESCRIPTION = """\
flowar: train and evaluate FlowAR image generators on Ray.

Pipeline: images -> (vae train) -> encode -> latent pyramids (Parquet) -> train -> checkpoints
-> sample / evaluate -> metrics, everything logged to MLflow. Every job takes a YAML config and
key=value overrides (unknown keys are errors), e.g.

    flowar train configs/quickstart.yaml model.scales=[1,2,4,8] train.max_steps=500
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=registry.PROG, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    registry.add_jobs(sub)
    submit.register(sub)  # flowar submit / flowar jobs
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value overrides may come after options too (`flowar sample DIR --classes 1 sampler.cfg=2`):
    # argparse leaves those over, so they are appended to the job's overrides here.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "print_config", False):
            print(yaml.safe_dump(to_dict(args.load_config(args)), sort_keys=False,
                                 default_flow_style=None), end="")
            return 0
        return int(args.func(args) or 0)
    except ConfigError as e:
        job = " ".join(filter(None, [args.command, getattr(args, "vae_command", None)]))
        print(f"flowar {job}: configuration error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
