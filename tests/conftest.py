"""Shared fixtures: a real local Ray runtime (one per test session) and real MLflow SQLite stores.

Heavy imports (ray, mlflow) happen inside fixtures, so the model tests start fast.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
GOLDEN = SHARED / "golden"


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A real local Ray runtime shared by the tests of a session.

    4 logical CPUs on a 2-core machine: Ray Data needs CPU budget beside 2 training workers
    (docs/stack-facts.md, "CPU budget for Ray Data")."""
    import ray

    if not ray.is_initialized():
        # With the dashboard: its State API lets Ray Train free the placement groups of trials
        # that Tune stops (docs/stack-facts.md).
        ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}})
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_uri(tmp_path):
    """A real MLflow tracking store: SQLite with an absolute path (4 slashes)."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
