"""`flowar submit` / `flowar jobs` against a real local Ray cluster (clusters/local/cluster.sh:
a head with no work and one worker node, token auth on, loopback only), plus the upload plan,
address/token resolution and runtime env, checked without a cluster.

The cluster is ended by clusters/local/cluster.sh stop, which ends only its own processes
(`ray stop` would also end the Ray runtimes of other tests and programs on the machine)."""

from __future__ import annotations

import io
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "clusters" / "local" / "cluster.sh"
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------- without a cluster

def _write(path: Path, data: bytes | str = b"x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)


def test_upload_plan_leaves_out_git_venv_data_checkpoints_and_mlflow(tmp_path):
    from pipelines.submit.upload import DEFAULT_EXCLUDES, plan_upload

    keep = ["pipelines/cli.py", "flowar/data/loader.py", "configs/train.yaml", "README.md"]
    drop = [".git/objects/pack/big.pack", ".venv/lib/torch.so", "data/fashion/train.bin",
            "checkpoints/step_100/model.safetensors", "runs/last.pt", "mlruns/0/meta.yaml",
            "flowar-runs/mlflow.db", "outputs/samples.npz", "pipelines/__pycache__/cli.cpython-311.pyc",
            "notes/secret.txt", "latents/part-0.parquet"]
    for rel in keep + drop:
        _write(tmp_path / rel, b"0" * 1000)
    _write(tmp_path / ".gitignore", "notes/\n")  # Ray honours .gitignore; so does the plan
    plan = plan_upload(tmp_path, DEFAULT_EXCLUDES)
    assert sorted(name for name, _ in plan.files) == sorted(keep + [".gitignore"])
    assert plan.raw_bytes == 4 * 1000 + len("notes/\n")
    assert 0 < plan.zip_bytes < 10_000


def test_this_repository_uploads_small():
    from pipelines.submit.upload import DEFAULT_EXCLUDES, plan_upload

    plan = plan_upload(ROOT, DEFAULT_EXCLUDES)
    names = [n for n, _ in plan.files]
    assert "pipelines/submit/job.py" in names and "clusters/README.md" in names
    assert not any(n.startswith((".git/", ".venv/", "flowar-runs/")) for n in names)
    assert plan.zip_bytes < 5 * 2**20, plan.summary()  # far below the 100 MiB limit


def test_oversized_upload_is_refused_before_contacting_a_cluster(tmp_path):
    from pipelines.submit.job import SubmitError, run_submit

    _write(tmp_path / "pipelines" / "cli.py", "")
    _write(tmp_path / "weights.bin", os.urandom(3 * 2**20))  # incompressible
    with pytest.raises(SubmitError) as e:
        run_submit("x", [], raw=True, working_dir=tmp_path, address="http://127.0.0.1:9",
                   max_upload_mib=2)
    msg = str(e.value)
    assert "refusing to upload" in msg and "weights.bin" in msg and "3.00 MiB" in msg
    assert "(limit 2 MiB)" in msg
    (tmp_path / "weights.bin").unlink()  # small enough now: the next failure is the address
    with pytest.raises(SubmitError, match="cannot reach the Ray cluster at http://127.0.0.1:9"):
        run_submit("x", [], raw=True, working_dir=tmp_path, address="http://127.0.0.1:9")


def test_address_token_env_and_entrypoint(tmp_path, monkeypatch):
    from pipelines.submit import job as s

    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                "RAY_AUTH_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert s.resolve_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:8265")
    assert s.resolve_address() == "http://10.0.0.5:8265"
    assert s.resolve_address("https://ray.example/") == "https://ray.example"
    with pytest.raises(s.SubmitError, match="Ray Client"):
        s.resolve_address("ray://head:10001")

    assert s.auth_token() is None
    _write(tmp_path / ".ray" / "auth_token", "from-home\n")
    assert s.auth_token() == "from-home"
    _write(tmp_path / "tok", "from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert s.auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert s.auth_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert s.auth_token() is None

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-forwarded")
    monkeypatch.setenv("MY_SETTING", "local")
    # places on this machine are not the cluster's: forwarded only when asked for (--env KEY)
    monkeypatch.setenv("FLOWAR_HOME", "/home/me/flowar-runs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    env = s.build_runtime_env(tmp_path, ["data/"], s.parse_env(["A=1", "MY_SETTING"]), pip=["einops"])
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"]["A"] == "1"
    assert env["env_vars"]["MY_SETTING"] == "local" and "AWS_SECRET_ACCESS_KEY" not in env["env_vars"]
    assert "FLOWAR_HOME" not in env["env_vars"] and "MLFLOW_TRACKING_URI" not in env["env_vars"]
    assert s.parse_env(["FLOWAR_HOME"]) == {"FLOWAR_HOME": "/home/me/flowar-runs"}
    assert env["working_dir"] == str(tmp_path) and env["excludes"] == ["data/"] and env["pip"] == ["einops"]
    with pytest.raises(s.SubmitError, match="not set"):
        s.parse_env(["NOT_SET_ANYWHERE_123"])

    assert s.entrypoint_for("train", ["c.yaml", "mlflow.run_name=a b"]) == \
        "python -m pipelines.cli train c.yaml 'mlflow.run_name=a b'"
    with pytest.raises(s.SubmitError, match="unknown job 'trian'"):
        s.entrypoint_for("trian", [])
    with pytest.raises(s.SubmitError, match="unknown job 'submit'"):
        s.entrypoint_for("submit", [])


def test_cli_registers_submit_and_jobs():
    from pipelines.cli import build_parser

    args = build_parser().parse_args(["submit", "--address", "h:1", "train", "c.yaml", "--x", "a=1"])
    assert (args.job, args.job_args, args.address) == ("train", ["c.yaml", "--x", "a=1"], "h:1")
    args = build_parser().parse_args(["jobs", "logs", "raysubmit_1", "--follow"])
    assert (args.action, args.job_id, args.follow) == ("logs", "raysubmit_1", True)


@pytest.mark.parametrize("kind, value, relative", [
    ("output", "results", True), ("output", "./results", True), ("output", "file:results", True),
    ("output", "/shared/results", False), ("output", "~/results", False),
    ("output", "file:///shared/results", False), ("output", "s3://bucket/results", False),
    ("tracking_uri", "sqlite:///mlflow.db", True), ("tracking_uri", "mlruns", True),
    ("tracking_uri", "sqlite:////shared/mlflow.db", False), ("tracking_uri", "http://mlflow:5000", False),
    ("tracking_uri", "postgresql://u@db/mlflow", False), ("tracking_uri", "databricks", False),
])
def test_which_outputs_would_land_in_the_jobs_working_dir(kind, value, relative):
    from pipelines.submit.outputs import lands_in_working_dir

    assert lands_in_working_dir(kind, value) is relative


def test_relative_outputs_are_refused_before_anything_is_uploaded():
    """Each relative output is named; inputs stay as given (relative = the uploaded working dir).
    The address is unreachable: a refusal here was decided without any cluster."""
    from pipelines.submit.job import SubmitError, run_submit

    nowhere = "http://127.0.0.1:9"
    cases = {
        "train": (["configs/train-tiny.yaml", "data.path=latents", "ray.storage_path=results",
                   "mlflow.tracking_uri=sqlite:///mlflow.db", "train.export_dir=/shared/export"],
                  ["ray.storage_path=results", "mlflow.tracking_uri=sqlite:///mlflow.db"]),
        "evaluate": (["configs/eval-fashion-mnist.yaml", "output_dir=eval"], ["output_dir=eval"]),
        "sweep": (["configs/sweeps/table6-injection-tiny.yaml", "data.path=/d",
                   "sweep.storage_path=tune"], ["sweep.storage_path=tune"]),
        "sample": (["/shared/export", "--out", "grid.png"], ["--out=grid.png"]),
    }
    for job, (args, named) in cases.items():
        with pytest.raises(SubmitError) as e:
            run_submit(job, args, address=nowhere)
        msg = str(e.value)
        assert f"refusing to submit `flowar {job}`" in msg and "absolute path" in msg, msg
        assert all(f"    {key}\n" in msg + "\n" for key in named), msg
        assert "data.path" not in msg and "export_dir" not in msg, msg
    # Absolute paths and URIs, every output given: nothing to refuse or to ask the cluster;
    # the next failure is the unreachable cluster itself.
    given = ["configs/train-tiny.yaml", "data.path=latents", "ray.storage_path=s3://bucket/ray",
             "mlflow.tracking_uri=http://mlflow:5000"]
    with pytest.raises(SubmitError, match="cannot reach the Ray cluster"):
        run_submit("train", given, address=nowhere)


def test_config_that_cannot_be_read_here_is_refused():
    from pipelines.submit.job import SubmitError, run_submit

    with pytest.raises(SubmitError, match="'configs/missing.yaml' is not in the working directory"):
        run_submit("train", ["configs/missing.yaml"], address="http://127.0.0.1:9")
    with pytest.raises(SubmitError, match="flowar train: unrecognized arguments: --bogus"):
        run_submit("train", ["configs/train-tiny.yaml", "--bogus"], address="http://127.0.0.1:9")


def _never_asked():
    raise AssertionError("the cluster was asked although nothing needed its settings")


def test_defaulted_outputs_need_the_clusters_settings():
    """An output left empty takes its default on the cluster: under FLOWAR_HOME (the tracking
    URI: MLFLOW_TRACKING_URI, else sqlite under FLOWAR_HOME). Unset or relative there: refused,
    naming the keys and the setting; set: pinned in the job's env. --env values win and spare
    asking the cluster; outputs that are given, or that a job never writes, need nothing."""
    from pipelines.submit.outputs import SubmitError, cluster_settings_for, job_outputs

    train = job_outputs("train", ["configs/train-tiny.yaml", "data.path=/d"], ROOT)
    assert {o.key: o.needs for o in train if o.needs} == {
        "mlflow.tracking_uri": "MLFLOW_TRACKING_URI", "ray.storage_path": "FLOWAR_HOME"}
    for cluster, why, storage_refused in [
            ({}, "FLOWAR_HOME is not set", True),
            ({"FLOWAR_HOME": "flowar-runs"}, "FLOWAR_HOME=flowar-runs is relative", True),
            ({"FLOWAR_HOME": "/shared", "MLFLOW_TRACKING_URI": "sqlite:///m.db"},
             "MLFLOW_TRACKING_URI=sqlite:///m.db is relative", False)]:
        with pytest.raises(SubmitError) as e:
            cluster_settings_for("train", train, {}, lambda c=cluster: c)
        msg = str(e.value)
        assert why in msg and "mlflow.tracking_uri" in msg and "--env FLOWAR_HOME=" in msg, msg
        assert ("ray.storage_path" in msg) is storage_refused, msg

    assert cluster_settings_for("train", train, {}, lambda: {"FLOWAR_HOME": "/shared"}) == \
        {"FLOWAR_HOME": "/shared"}
    both = {"FLOWAR_HOME": "/shared", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    assert cluster_settings_for("train", train, {}, lambda: both) == both
    assert cluster_settings_for("train", train, {"FLOWAR_HOME": "/mine", "MLFLOW_TRACKING_URI":
                                                 "sqlite:////mine/m.db"}, _never_asked) == \
        {"FLOWAR_HOME": "/mine", "MLFLOW_TRACKING_URI": "sqlite:////mine/m.db"}
    with pytest.raises(SubmitError, match="FLOWAR_HOME=rel is relative"):
        cluster_settings_for("train", train, {"FLOWAR_HOME": "rel"}, dict)

    given = job_outputs("train", ["configs/train-tiny.yaml", "data.path=/d", "ray.storage_path=/r",
                                  "mlflow.tracking_uri=http://mlflow:5000"], ROOT)
    assert cluster_settings_for("train", given, {}, _never_asked) == {}
    encode = job_outputs("encode", ["configs/encode-fashion-mnist.yaml", "output=/shared/latents",
                                    "vae.spec=/only/on/the/cluster"], ROOT)
    assert [o.key for o in encode] == ["output"]  # encode never writes ray.storage_path
    assert cluster_settings_for("encode", encode, {}, _never_asked) == {}
    evaluate = job_outputs("evaluate", ["configs/eval-fashion-mnist.yaml"], ROOT)
    assert {o.key: o.needs for o in evaluate if o.needs}["output_dir"] == "FLOWAR_HOME"


# ---------------------------------------------------------------------------- a real local cluster

def _wait_for_mlflow_server(uri: str, temp: Path) -> None:
    """Until the recipe's `mlflow server` answers /health; fails at once if its process ended."""
    import urllib.request

    import ray  # noqa: F401  (puts the psutil that Ray bundles on sys.path)
    import psutil

    server = psutil.Process(int((temp / "mlflow.pid").read_text()))
    while True:
        try:
            with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if not server.is_running() or server.status() == psutil.STATUS_ZOMBIE:
            raise RuntimeError(f"mlflow server exited: {(temp / 'mlflow.log').read_text()[-2000:]}")
        try:  # poll again in 0.5 s, or stop at once when the server process ends
            server.wait(timeout=0.5)
        except psutil.TimeoutExpired:
            pass


@pytest.fixture(scope="module")
def cluster():
    """clusters/local/cluster.sh start 1 on free loopback ports, with its own token and the
    recipe's `mlflow server` (loopback, SQLite store under FLOWAR_HOME, served artefacts) as
    every node's MLFLOW_TRACKING_URI: jobs log through the REST API, as against a team's server."""
    temp = Path(tempfile.mkdtemp(prefix="fs", dir="/tmp"))  # short: socket paths <= 107 chars
    token = temp / "token"
    token.write_text(secrets.token_hex(32))
    dash = _free_port()
    env = {**os.environ, "FLOWAR_RAY_PORT": str(_free_port()), "FLOWAR_DASHBOARD_PORT": str(dash),
           "FLOWAR_CLIENT_PORT": str(_free_port()), "FLOWAR_RAY_TEMP": str(temp),
           "FLOWAR_HOME": str(temp / "home"), "FLOWAR_WORKER_CPUS": "4", "FLOWAR_PYTHON": sys.executable,
           "FLOWAR_MLFLOW_PORT": str(_free_port()), "RAY_AUTH_TOKEN_PATH": str(token),
           "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    start = subprocess.run(["bash", str(SCRIPT), "start", "1"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        # what the recipe put in every node's environment (FLOWAR_HOME, MLFLOW_TRACKING_URI)
        settings = dict(line.split("=", 1) for line in (temp / "cluster.env").read_text().split())
        assert settings["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{env['FLOWAR_MLFLOW_PORT']}"
        _wait_for_mlflow_server(settings["MLFLOW_TRACKING_URI"], temp)
        with pytest.MonkeyPatch.context() as mp:  # the in-process client finds the same token
            mp.setenv("RAY_AUTH_TOKEN_PATH", str(token))
            mp.delenv("RAY_AUTH_TOKEN", raising=False)
            yield {"address": f"http://127.0.0.1:{dash}", "env": env, "temp": temp,
                   "settings": settings}
    finally:
        stop = subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, text=True,
                              timeout=120)
        assert stop.returncode == 0, stop.stderr[-2000:]
        shutil.rmtree(temp, ignore_errors=True)  # session logs


def _flowar(env, cwd, *argv, timeout=300):
    """The real `flowar` command line in a subprocess; returns (exit status, stdout, stderr)."""
    p = subprocess.run([str(BIN / "flowar"), *argv], env=env, cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _jobs(cluster, capsys, *argv) -> tuple[int, str]:
    from pipelines.cli import main

    capsys.readouterr()
    code = main(["jobs", *argv, "--address", cluster["address"]])
    return code, capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A small random diffusers AutoencoderKL folder (downsampling 2) for `flowar encode`."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        block_out_channels=[32, 32], layers_per_block=1, latent_channels=4)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.mark.ray
def test_encode_then_train_and_the_results_outlive_the_job(cluster, tiny_vae, tmp_path, capsys):
    """The issue's end-to-end check, from a shell that is not in the project and whose own
    FLOWAR_HOME and MLFLOW_TRACKING_URI point elsewhere: `flowar submit encode` (an absolute
    output) then `flowar submit train` with its outputs at their defaults run on the worker node
    from the uploaded working dir (configs/... is read there) and succeed. Afterwards this
    process finds the latent dataset, and where the cluster's FLOWAR_HOME and
    MLFLOW_TRACKING_URI say, the finished MLflow run, the checkpoints and the EMA export;
    nothing went into the job's working dir (Ray's temp copy) or the shell's own FLOWAR_HOME.
    The upload has no .git, yet the run's source tags on the MLflow server and the dataset's
    code_version name the commit of the uploaded checkout (issue 18)."""
    import getpass

    from mlflow.tracking import MlflowClient

    from pipelines.data.latents import LatentDataset

    # read before submitting: the commit the upload is of (`flowar submit` reads it the same way)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    shell, laptop_home, latents = tmp_path / "elsewhere", tmp_path / "laptop-home", tmp_path / "latents"
    shell.mkdir()
    env = {**cluster["env"], "FLOWAR_HOME": str(laptop_home),
           "MLFLOW_TRACKING_URI": f"sqlite:///{laptop_home}/mlflow.db"}
    submit = ["submit", "--address", cluster["address"], "--working-dir", str(ROOT)]
    # 1. encode: job id first, then the logs, exit status 0.
    code, stdout, stderr = _flowar(
        env, shell, *submit, "encode", "configs/encode-fashion-mnist.yaml", "source.limit=48",
        f"vae.spec={tiny_vae}", f"output={latents}", "encode.resolution=8", "encode.shard_size=24",
        "encode.batch_size=24")
    assert code == 0, (stdout + stderr)[-4000:]
    encode_id = stdout.splitlines()[0]
    assert encode_id.startswith("raysubmit_") and "uploading working dir" in stderr
    assert f"job {encode_id} succeeded (exit status 0)" in stderr
    meta = LatentDataset(str(latents)).meta
    assert (meta.count, meta.latent_size, meta.latent_channels) == (48, 4, 4)
    dirty = f"uploading uncommitted changes of {head}" in stderr  # said when the tree is dirty
    assert meta.code_version.endswith(f"+g{head[:7]}" + ("-dirty" if dirty else "")), meta.code_version

    # 2. train with no tracking URI, storage path or export dir given.
    code, stdout, stderr = _flowar(
        env, shell, *submit, "train", "configs/train-tiny.yaml", f"data.path={latents}",
        "mlflow.experiment=e2e", "mlflow.run_name=e2e-tiny", "train.max_steps=6",
        "train.checkpoint_every=6", "train.log_every=2", "train.num_workers=1")
    assert code == 0, (stdout + stderr)[-4000:]
    train_id = stdout.splitlines()[0]
    home, uri = Path(cluster["settings"]["FLOWAR_HOME"]), cluster["settings"]["MLFLOW_TRACKING_URI"]
    assert f"go under the cluster's FLOWAR_HOME={home}, MLFLOW_TRACKING_URI={uri}" in stderr

    run_dir = home / "ray_results" / "e2e-tiny"
    assert sorted(run_dir.glob("checkpoint_*/model.safetensors")), sorted(map(str, home.rglob("*")))[:50]
    assert {"config.json", "model.safetensors"} <= {p.name for p in (run_dir / "export").iterdir()}
    mlflow = MlflowClient(uri)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("e2e").experiment_id])
    assert [r.info.run_name for r in runs] == ["e2e-tiny"] and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics, "the run logged no metrics"
    tags = runs[0].data.tags
    assert tags["mlflow.source.git.commit"] == head and tags["mlflow.source.type"] == "JOB"
    assert tags["mlflow.source.name"].startswith("flowar train configs/train-tiny.yaml data.path=")
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.git.dirty"] == ("true" if f"uncommitted changes of {head}" in stderr else "false")
    assert not laptop_home.exists()
    assert not list(cluster["temp"].rglob("_ray_pkg_*/flowar-runs"))

    code, text = _jobs(cluster, capsys, "status", train_id)
    assert code == 0 and f"{train_id}: SUCCEEDED" in text
    code, text = _jobs(cluster, capsys, "logs", train_id)
    assert code == 0 and "flowar train" in text
    code, text = _jobs(cluster, capsys, "list")
    assert code == 0 and encode_id in text and train_id in text


@pytest.mark.ray
def test_the_cluster_tells_submit_where_outputs_go(cluster):
    """The settings probe reads what the recipe gave every node, and leaves no job behind."""
    from pipelines.submit.job import make_client
    from pipelines.submit.outputs import ask_cluster_settings

    client = make_client(cluster["address"])
    before = {j.submission_id for j in client.list_jobs()}
    assert ask_cluster_settings(client) == cluster["settings"]
    assert cluster["settings"]["FLOWAR_HOME"] == str(cluster["temp"] / "home")
    assert {j.submission_id for j in client.list_jobs()} == before


@pytest.mark.ray
def test_raw_command_runs_on_a_worker_node_with_the_uploaded_code(cluster, tmp_path):
    """Tasks land on the worker (the head has num-cpus 0); the job sees the uploaded working
    dir and the --env variables."""
    from pipelines.submit.job import run_submit

    out = tmp_path / "result.txt"
    job = tmp_path / "job.py"  # the local cluster shares this filesystem
    job.write_text(
        "import os, ray\n"
        "ray.init()\n"
        "node = ray.get(ray.remote(lambda: ray.get_runtime_context().get_node_id()).remote())\n"
        "head = [n['NodeID'] for n in ray.nodes() if n['Resources'].get('CPU', 0) == 0]\n"
        f"open({str(out)!r}, 'w').write(f\"{{node in head}} {{os.path.isfile('pipelines/submit/job.py')}} "
        "{os.environ['FLOWAR_MARK']}\")\n"
        "print('JOB-MARKER done')\n")
    buf = io.StringIO()
    job_id, code = run_submit("python", [str(job)], raw=True, env={"FLOWAR_MARK": "abc"},
                              address=cluster["address"], out=buf)
    assert code == 0 and buf.getvalue().startswith(job_id) and "JOB-MARKER done" in buf.getvalue()
    assert out.read_text() == "False True abc"


@pytest.mark.ray
def test_failing_flowar_job_reports_failure_and_exit_status(cluster):
    """A real flowar job that fails on the cluster (bad input): its message and exit status
    (the CLI's 2 for configuration errors) come back to the laptop."""
    from pipelines.submit.job import run_submit

    buf = io.StringIO()
    job_id, code = run_submit("train", ["configs/train-tiny.yaml", "data.path="], address=cluster["address"],
                              out=buf)
    assert code == 2, buf.getvalue()[-3000:]
    assert "data.path is empty" in buf.getvalue()
    from pipelines.submit.job import make_client
    info = make_client(cluster["address"]).get_job_info(job_id)
    assert info.status.value == "FAILED" and info.driver_exit_code == 2


def _wait_for(client, job_id: str, done) -> str:
    """Poll the job until done(status) holds; the job's own end bounds the wait."""
    while not done(status := client.get_job_status(job_id)) and not status.is_terminal():
        time.sleep(0.5)
    return status


@pytest.mark.ray
def test_stop_a_running_job(cluster, capsys, tmp_path):
    """Stopped once it is running (it wrote its marker file), the job ends STOPPED, and
    `flowar jobs status` says so with exit status 130."""
    from pipelines.submit.job import make_client, run_submit

    marker = tmp_path / "running"
    script = f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(600)"
    job_id, code = run_submit("python", ["-c", script], raw=True, wait=False,
                              address=cluster["address"], out=io.StringIO())
    client = make_client(cluster["address"])
    try:
        status = _wait_for(client, job_id, lambda _: marker.exists())
        assert marker.exists(), f"{status}: {client.get_job_logs(job_id)[-2000:]}"
        code, text = _jobs(cluster, capsys, "stop", job_id)
        assert code == 0 and "stop requested" in text
        _wait_for(client, job_id, lambda status: status.is_terminal())
        code, text = _jobs(cluster, capsys, "status", job_id)
        assert f"{job_id}: STOPPED" in text and code == 130
    finally:
        client.stop_job(job_id)  # a failed check must not leave it sleeping on the cluster
