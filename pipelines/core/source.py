"""Where the code of a run came from: the commit, whether the work tree had uncommitted changes,
and who ran it, as MLflow's standard source tags (the run page's "Source" and "Created by").

A local run asks git in the repository checkout this package was imported from. A job sent with
`flowar submit` cannot: the upload leaves out .git, so submit reads git in the uploaded directory
on the laptop (`source_env`) and hands the result to the job as FLOWAR_SOURCE_* environment
variables, which then win over anything found where the job runs. Any launcher that runs flowar
from a copy without .git (a CI tarball, a container image) can set the same variables.

`flowar --help` imports the job modules, and they import this one: only the standard library here.
"""

from __future__ import annotations

import getpass
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from flowar.config import ConfigError

__all__ = ["SourceInfo", "source_info", "source_tags", "source_env", "git_state", "flowar_command",
           "ENV_COMMIT", "ENV_DIRTY", "ENV_USER", "ENV_TYPE"]

ENV_COMMIT = "FLOWAR_SOURCE_COMMIT"  # the full commit; absent when the upload was not a checkout
ENV_DIRTY = "FLOWAR_SOURCE_DIRTY"  # "true" / "false", beside the commit
ENV_USER = "FLOWAR_SOURCE_USER"  # who submitted
ENV_TYPE = "FLOWAR_SOURCE_TYPE"  # "JOB" from flowar submit; its presence means "use these variables"

# The names mlflow.entities.SourceType accepts for mlflow.source.type (kept here as strings so
# that this module does not import MLflow; tests/test_source_tags.py checks them against it).
SOURCE_TYPES = ("NOTEBOOK", "JOB", "PROJECT", "LOCAL", "UNKNOWN")

REPOSITORY = Path(__file__).resolve().parents[2]  # the checkout this package runs from, if any


@dataclass(frozen=True)
class SourceInfo:
    commit: str | None  # None: no checkout, so no commit to name
    dirty: bool | None  # uncommitted changes to tracked files; None when commit is None
    user: str | None
    source_type: str  # "JOB" for a submitted job, "LOCAL" otherwise


def _git(directory: Path, *args: str) -> str | None:
    """git's stdout in `directory`, or None when git is missing, fails or it is no checkout."""
    try:
        out = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10,
                             # no index.lock taken: others may run git in the same checkout
                             env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state(directory: str | os.PathLike) -> tuple[str | None, bool | None]:
    """(HEAD's commit, work tree dirty) of the checkout holding `directory`; (None, None) if none.

    Untracked files do not count as dirty: a work tree nearly always holds some (outputs, notes,
    scratch scripts), so counting them would mark almost every run dirty and the marker would
    stop saying anything; changes to tracked files, staged or not, are what makes the code that
    ran differ from the commit. It also keeps git from walking large untracked data folders."""
    commit = (_git(Path(directory), "rev-parse", "HEAD") or "").strip()
    if not commit:
        return None, None
    status = _git(Path(directory), "status", "--porcelain", "--untracked-files=no")
    return commit, (bool(status.strip()) if status is not None else None)


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no USER/LOGNAME and no passwd entry (some containers)
        return None


def _from_env(env) -> SourceInfo:
    source_type = env[ENV_TYPE]
    if source_type not in SOURCE_TYPES:
        raise ConfigError(f"{ENV_TYPE}={source_type!r}: expected one of {', '.join(SOURCE_TYPES)}")
    commit = env.get(ENV_COMMIT) or None
    dirty = env.get(ENV_DIRTY)
    if dirty not in (None, "true", "false"):
        raise ConfigError(f"{ENV_DIRTY}={dirty!r}: expected 'true' or 'false'")
    return SourceInfo(commit=commit, dirty=(dirty == "true") if commit and dirty else None,
                      user=env.get(ENV_USER) or None, source_type=source_type)


def source_info(environ=None) -> SourceInfo:
    """The source of the code running now: the FLOWAR_SOURCE_* variables when FLOWAR_SOURCE_TYPE
    is set (a submitted job; git where the job runs sees only the upload, never the laptop's
    checkout), else git in this package's checkout and the local user."""
    env = os.environ if environ is None else environ
    if ENV_TYPE in env:
        return _from_env(env)
    commit, dirty = git_state(REPOSITORY)
    return SourceInfo(commit=commit, dirty=dirty, user=_user(), source_type="LOCAL")


def source_tags(command: str, environ=None) -> dict[str, str]:
    """MLflow's source tags for a run started by `command` (e.g. "flowar train configs/x.yaml"),
    with mlflow.source.git.dirty. No commit, no commit tag: "unknown" there would read as a commit."""
    info = source_info(environ)
    tags = {"mlflow.source.name": command, "mlflow.source.type": info.source_type}
    if info.commit:
        tags["mlflow.source.git.commit"] = info.commit
        if info.dirty is not None:
            tags["mlflow.source.git.dirty"] = "true" if info.dirty else "false"
    if info.user:
        tags["mlflow.user"] = info.user
    return tags


def source_env(working_dir: str | os.PathLike) -> dict[str, str]:
    """The FLOWAR_SOURCE_* variables `flowar submit` gives a job uploaded from `working_dir`:
    git is asked there (the directory being uploaded), not in this package's directory."""
    commit, dirty = git_state(working_dir)
    env = {ENV_TYPE: "JOB"}
    if commit:
        env[ENV_COMMIT] = commit
    if commit and dirty is not None:
        env[ENV_DIRTY] = "true" if dirty else "false"
    user = _user()
    if user:
        env[ENV_USER] = user
    return env


def flowar_command(job: str, *args: str | None) -> str:
    """The command line that started this `flowar JOB` run: this process's own when it is the
    flowar CLI running JOB (`flowar JOB ...`, or `python -m pipelines.cli JOB ...` as a submitted
    job runs it), else `flowar JOB ARGS` (a run started from Python, e.g. a sweep's trial)."""
    argv = sys.argv
    launcher = Path(argv[0]) if argv and argv[0] else Path()
    is_cli = launcher.name == "flowar" or launcher.parts[-2:] == ("pipelines", "cli.py")
    if is_cli and len(argv) > 1 and argv[1] == job:
        return "flowar " + shlex.join(argv[1:])
    return "flowar " + shlex.join([job, *(str(a) for a in args if a)])
