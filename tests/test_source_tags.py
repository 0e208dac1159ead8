"""MLflow's source tags (pipelines/core/source.py) against real git checkouts made here: the commit
and dirtiness git reports, the FLOWAR_SOURCE_* variables of a submitted job winning over git,
no commit tag outside a checkout, and what `flowar submit` captures from the directory it uploads.
The end-to-end check through a cluster and an MLflow server is in tests/test_submit.py."""

from __future__ import annotations

import getpass
import subprocess
import sys

import pytest

from flowar.config import ConfigError
from pipelines.core import source
from pipelines.core.source import (ENV_COMMIT, ENV_DIRTY, ENV_TYPE, ENV_USER, flowar_command, git_state,
                                   source_env, source_info, source_tags)


def git(repo, *args) -> str:
    # -c: a commit must not depend on this machine's git identity or signing settings
    out = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com",
                          "-c", "commit.gpgsign=false", *args], cwd=repo, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip()


@pytest.fixture
def repo(tmp_path):
    """A git checkout with one commit of one tracked file; returns (path, HEAD)."""
    path = tmp_path / "checkout"
    path.mkdir()
    git(path, "init", "-q")
    (path / "train.py").write_text("print('v1')\n")
    git(path, "add", "train.py")
    git(path, "commit", "-q", "-m", "v1")
    return path, git(path, "rev-parse", "HEAD")


def test_dirty_means_tracked_files_changed_not_untracked_ones(repo):
    path, head = repo
    assert git_state(path) == (head, False)
    (path / "notes.txt").write_text("scratch\n")  # untracked: the code that runs is the commit's
    assert git_state(path) == (head, False)
    (path / "train.py").write_text("print('v2')\n")
    assert git_state(path) == (head, True)
    git(path, "add", "train.py")  # staged but not committed is still not the commit
    assert git_state(path) == (head, True)
    git(path, "commit", "-q", "-m", "v2")
    assert git_state(path) == (git(path, "rev-parse", "HEAD"), False)


def test_local_run_reads_git_in_the_package_checkout(repo, monkeypatch):
    path, head = repo
    monkeypatch.setattr(source, "REPOSITORY", path)
    (path / "train.py").write_text("print('edited')\n")
    assert source_info({}) == source.SourceInfo(commit=head, dirty=True, user=getpass.getuser(),
                                                source_type="LOCAL")
    assert source_tags("flowar train configs/train-tiny.yaml", {}) == {
        "mlflow.source.name": "flowar train configs/train-tiny.yaml", "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": head, "mlflow.source.git.dirty": "true", "mlflow.user": getpass.getuser()}


def test_submitted_jobs_variables_win_over_git(repo, monkeypatch):
    path, head = repo
    monkeypatch.setattr(source, "REPOSITORY", path)  # a checkout at another commit than the job's
    env = {ENV_TYPE: "JOB", ENV_COMMIT: "f" * 40, ENV_DIRTY: "false", ENV_USER: "alice"}
    assert source_tags("flowar encode c.yaml", env) == {
        "mlflow.source.name": "flowar encode c.yaml", "mlflow.source.type": "JOB",
        "mlflow.source.git.commit": "f" * 40, "mlflow.source.git.dirty": "false", "mlflow.user": "alice"}
    # submitted from a directory that was no checkout: no commit, and git here is not asked
    assert source_tags("flowar train c.yaml", {ENV_TYPE: "JOB", ENV_USER: "alice"}) == {
        "mlflow.source.name": "flowar train c.yaml", "mlflow.source.type": "JOB", "mlflow.user": "alice"}


def test_outside_a_checkout_there_is_no_commit_tag(tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert git_state(plain) == (None, None)
    monkeypatch.setattr(source, "REPOSITORY", plain)  # e.g. a copy of the code without .git
    tags = source_tags("flowar train c.yaml", {})
    assert "mlflow.source.git.commit" not in tags and "mlflow.source.git.dirty" not in tags
    assert tags["mlflow.source.type"] == "LOCAL" and "unknown" not in tags.values()
    assert git_state(tmp_path / "missing") == (None, None)


@pytest.mark.parametrize("env, named", [
    ({ENV_TYPE: "LAPTOP"}, ENV_TYPE),
    ({ENV_TYPE: "JOB", ENV_COMMIT: "abc", ENV_DIRTY: "yes"}, ENV_DIRTY),
])
def test_bad_source_variables_are_refused_naming_them(env, named):
    with pytest.raises(ConfigError, match=named):
        source_info(env)


def test_source_types_are_the_ones_mlflow_accepts():
    from mlflow.entities import SourceType

    assert set(source.SOURCE_TYPES) == set(SourceType._STRING_TO_SOURCETYPE)
    for name in ("JOB", "LOCAL"):
        SourceType.from_string(name)


def test_submit_captures_the_uploaded_directorys_commit(repo, tmp_path, monkeypatch):
    from pipelines.submit.job import build_runtime_env

    path, head = repo
    for var in (ENV_TYPE, ENV_COMMIT, ENV_DIRTY, ENV_USER):
        monkeypatch.delenv(var, raising=False)
    env = build_runtime_env(path, [], {})["env_vars"]
    assert {k: env[k] for k in (ENV_TYPE, ENV_COMMIT, ENV_DIRTY, ENV_USER)} == {
        ENV_TYPE: "JOB", ENV_COMMIT: head, ENV_DIRTY: "false", ENV_USER: getpass.getuser()}
    (path / "train.py").write_text("print('uncommitted')\n")
    assert build_runtime_env(path, [], {})["env_vars"][ENV_DIRTY] == "true"
    # what the job then tags its runs with
    assert source_tags("flowar train c.yaml", env)["mlflow.source.git.commit"] == head
    # --env wins over what was read
    assert build_runtime_env(path, [], {ENV_COMMIT: "c" * 40})["env_vars"][ENV_COMMIT] == "c" * 40

    plain = tmp_path / "plain"
    plain.mkdir()
    env = build_runtime_env(plain, [], {})["env_vars"]
    assert env[ENV_TYPE] == "JOB" and ENV_COMMIT not in env and ENV_DIRTY not in env
    assert source_env(plain) == {ENV_TYPE: "JOB", ENV_USER: getpass.getuser()}


def test_code_version_names_the_submitted_commit(monkeypatch):
    from pipelines.data.latents import code_version

    monkeypatch.setenv(ENV_TYPE, "JOB")
    monkeypatch.setenv(ENV_COMMIT, "0123456789abcdef" + "0" * 24)
    monkeypatch.setenv(ENV_DIRTY, "true")
    assert code_version().endswith("+g0123456-dirty")
    monkeypatch.setenv(ENV_DIRTY, "false")
    assert code_version().endswith("+g0123456")
    monkeypatch.delenv(ENV_COMMIT)
    assert "+g" not in code_version()


def test_source_name_is_the_flowar_command_that_ran(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/flowar", "train", "c.yaml", "mlflow.run_name=a b"])
    assert flowar_command("train", "ignored.yaml") == "flowar train c.yaml 'mlflow.run_name=a b'"
    # a submitted job runs `python -m pipelines.cli JOB ...` in Ray's copy of the upload
    monkeypatch.setattr(sys, "argv", ["/tmp/ray/_ray_pkg_1/pipelines/cli.py", "sweep", "s.yaml"])
    assert flowar_command("sweep", "s.yaml") == "flowar sweep s.yaml"
    # started from Python (a sweep's trial, a test): the job and its config
    monkeypatch.setattr(sys, "argv", ["/venv/bin/pytest", "-q"])
    assert flowar_command("train", "configs/train-tiny.yaml") == "flowar train configs/train-tiny.yaml"
    assert flowar_command("train", None) == "flowar train"
    monkeypatch.setattr(sys, "argv", ["/venv/bin/flowar", "sweep", "s.yaml"])  # not this job
    assert flowar_command("train", None) == "flowar train"
