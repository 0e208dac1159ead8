"""`flowar evaluate` on a real two-node Ray cluster (two `ray start` nodes on this machine): each
node's worker finds its own Inception weights, in a cache only that node has.

The head and the second node get 1 CPU each, so the two workers (1 CPU each, spread) run one per
node. Each node's processes see their own FLOWAR_CACHE and TORCH_HOME; the driver (`flowar
evaluate` in a subprocess, joining with ray.address) has a third, so no worker can use a file the
driver found. The cluster's processes are stopped by their own pids (those whose command line
names this test's Ray temp dir), never with a global `ray stop`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from test_evaluate import BASE, export  # noqa: F401 (the module-scoped export fixture)

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _node_env(root: Path, name: str) -> dict:
    """The environment of one node's Ray processes (and so of its workers): its own caches."""
    env = {**os.environ, "FLOWAR_CACHE": str(root / name / "flowar-cache"),
           "TORCH_HOME": str(root / name / "torch"), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def _ray_start(args: list[str], env: dict, temp: Path) -> None:
    ports = _free_ports(4)
    cmd = [RAY, "start", "--num-cpus=1", f"--temp-dir={temp}", "--disable-usage-stats",
           f"--dashboard-agent-listen-port={ports[0]}", f"--dashboard-agent-grpc-port={ports[1]}",
           f"--metrics-export-port={ports[2]}", f"--runtime-env-agent-port={ports[3]}", *args]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=180)


def _stop_cluster(temp: Path) -> None:
    """SIGKILL every process whose command line names `temp`: this cluster's and nothing else."""
    me = os.getpid()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if str(temp) in cmdline and int(pid) != me:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture(scope="module")
def cluster():
    # Short: Ray's socket paths under the temp dir must fit in 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="ev16n-", dir="/tmp"))
    temp = root / "ray"
    gcs, client = _free_ports(2)
    try:
        _ray_start(["--head", f"--port={gcs}", f"--ray-client-server-port={client}",
                    "--include-dashboard=false", "--node-ip-address=127.0.0.1"], _node_env(root, "head"), temp)
        _ray_start([f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1"], _node_env(root, "node2"), temp)
        yield {"address": f"127.0.0.1:{gcs}", "root": root}
    finally:
        _stop_cluster(temp)
        shutil.rmtree(root, ignore_errors=True)


def _evaluate(cluster, export, name: str, workers: int) -> dict:  # noqa: F811
    root = cluster["root"]
    out = root / name
    args = BASE + [f"generation.checkpoint={export / 'model'}", f"workers.num_workers={workers}",
                   f"output_dir={out}", f"mlflow.tracking_uri=sqlite:///{root / 'mlflow.db'}",
                   f"ray.address={cluster['address']}"]
    env = {**_node_env(root, "driver"), "RAY_ADDRESS": cluster["address"]}
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "evaluate", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((out / "report.json").read_text())


def test_each_node_finds_its_own_inception_weights(cluster, export):  # noqa: F811
    root = cluster["root"]
    two = _evaluate(cluster, export, "two", 2)
    nodes = two["workers"]["nodes"]
    assert len({n["node_id"] for n in nodes}) == 2  # one worker per node
    # Each worker converted fid-helper's copy into its own node's cache; the driver has none.
    assert sorted(str(Path(n["weights"]).parents[0].parent.name) for n in nodes) == ["head", "node2"]
    assert len({n["digest"] for n in nodes}) == 1
    assert not (root / "driver" / "flowar-cache" / "inception-2015-12-05-from-fid-helper-pool-only.pth").exists()
    assert set(two["shards"]["by_node"]) == {n["node_id"] for n in nodes}  # both computed shards
    one = _evaluate(cluster, export, "one", 1)
    assert len(one["workers"]["nodes"]) == 1
    for k in ("fid", "kid", "precision", "recall"):
        assert two["results"][k] == one["results"][k], k
