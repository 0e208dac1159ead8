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


def start_mlflow_server(root: Path):
    """`mlflow server` on loopback (a free port), its store a SQLite file under `root` and its
    artefacts served by the server itself (mlflow-artifacts:/, as a team's server would).
    Returns (uri, process); ready when /health answers."""
    import socket
    import subprocess
    import sys
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT,
        # MLflow 3's job runner (for GenAI judges) costs ~1.3 GB per server; flowar needs none.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    while True:  # until the server answers or its process has died
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited: {(root / 'server.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return uri, proc
        except OSError:
            try:  # poll again in 0.5 s, or stop at once when the server process exits
                proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback, one per test module; its URI (http://127.0.0.1:PORT)."""
    uri, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield uri
    proc.terminate()
    proc.wait(timeout=30)
