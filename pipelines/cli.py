"""The `flowar` command line: one subcommand per job, all sharing the config system.

Each job module exposes `register(subparsers)`, which adds its subcommand and sets `func`.
Modules import their heavy dependencies (torch, ray, mlflow) inside functions, so `--help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Order is the order of `flowar --help`, which is the order of the pipeline.
JOB_MODULES = [
    "pipelines.quickstart",  # flowar quickstart: the whole pipeline on the embedded default
    "pipelines.vae_train",   # flowar vae train
    "pipelines.encode",      # flowar encode
    "pipelines.train.job",       # flowar train
    "pipelines.import_published",  # flowar import: released FlowAR-S/L/H -> a model folder
    "pipelines.sample",      # flowar sample
    "pipelines.evaluate.job",    # flowar evaluate
    "pipelines.sweep.job",       # flowar sweep
    "pipelines.submit",      # flowar submit / flowar jobs
]

DESCRIPTION = """\
flowar: train and evaluate FlowAR image generators on Ray.

Pipeline: images -> (vae train) -> encode -> latent pyramids (Parquet) -> train -> checkpoints
-> sample / evaluate -> metrics, everything logged to MLflow. Every job takes a YAML config and
key=value overrides (unknown keys are errors), e.g.

    flowar train configs/quickstart.yaml model.scales=[1,2,4,8] train.max_steps=500
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowar", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in JOB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # job not built yet in this checkout
                continue
            raise
        module.register(sub)
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
    from flowar.config import ConfigError
    try:
        if getattr(args, "print_config", False):
            import yaml

            from flowar.config import to_dict
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
