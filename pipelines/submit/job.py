"""`flowar submit JOB [args]` and `flowar jobs list|status|logs|stop`: run jobs on a Ray cluster.

A submitted job is the same command as a local run: the entrypoint is
`python -m pipelines.cli JOB args...`, run on the cluster from a copy of this working directory
(uploaded through Ray's `working_dir` runtime env, minus .git, data, checkpoints, MLflow stores and
virtual environments). So `flowar submit train configs/x.yaml train.max_steps=500` runs exactly
what `flowar train configs/x.yaml train.max_steps=500` runs here. As the upload has no .git, the
commit (and whether the tree had uncommitted changes) and the user are read here and passed as
FLOWAR_SOURCE_* variables, which the job's MLflow source tags name (pipelines/core/source.py).

Paths: a relative path means the uploaded working directory; outputs must outlive the job,
so they are checked before the upload (pipelines/submit/outputs.py), as is the upload's size
(pipelines/submit/upload.py).

The cluster: `--address`, else RAY_API_SERVER_ADDRESS or RAY_ADDRESS, else the local recipe's
dashboard http://127.0.0.1:8265 (also where `kubectl port-forward` puts a KubeRay head).
Ray >= 2.52 clusters use token authentication; the token comes from RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, the same sources Ray itself reads.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from pipelines.core.source import ENV_COMMIT, ENV_DIRTY, source_env
from pipelines.registry import job_parser, subcommands
from pipelines.submit.outputs import (Output, SubmitError, ask_cluster_settings, cluster_settings_for,
                                      job_outputs, refuse_relative_outputs)
from pipelines.submit.upload import DEFAULT_EXCLUDES, MAX_UPLOAD_MIB, UploadPlan, check_upload, plan_upload

DEFAULT_ADDRESS = "http://127.0.0.1:8265"

# Local environment variables forwarded to the job when set here: offline switches and
# regions, never credentials (the cluster should hold its own, e.g. IAM roles or Kubernetes
# secrets), and not FLOWAR_HOME / MLFLOW_TRACKING_URI: those name places on this machine (or a
# port-forward of it), while the job's defaults belong where the cluster keeps them (see
# pipelines/submit/outputs.py); `--env FLOWAR_HOME` forwards the local value on purpose.
PASSTHROUGH_ENV = [
    "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "MLFLOW_EXPERIMENT_NAME",
    "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
    "RAY_TRAIN_V2_ENABLED", "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "TOKENIZERS_PARALLELISM",
]


def project_root(start: Path | None = None) -> Path:
    """The directory holding pipelines/cli.py at or above `start` (default: cwd); else cwd."""
    here = (start or Path.cwd()).resolve()
    for d in (here, *here.parents):
        if (d / "pipelines" / "cli.py").is_file():
            return d
    return here


def resolve_address(address: str | None = None) -> str:
    addr = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or ""
    if not addr or addr == "auto":
        return DEFAULT_ADDRESS
    if addr.startswith("ray://"):
        raise SubmitError(f"cluster address {addr!r} is a Ray Client address; Ray Jobs need the "
                          f"dashboard address, e.g. http://<head>:8265")
    if "://" not in addr:
        addr = "http://" + addr
    return addr.rstrip("/")


def auth_token() -> str | None:
    """The cluster token, from the places Ray reads (RAY_AUTH_MODE=disabled: none)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file():
            token = Path(path).read_text().strip()
            if token:
                return token
    return None


def make_client(address: str | None = None):
    """A JobSubmissionClient for the cluster, sending the token as a Bearer header."""
    from ray.job_submission import JobSubmissionClient

    addr = resolve_address(address)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(addr, headers=headers)
    except Exception as e:  # connection refused, 401, version mismatch: say which cluster
        hint = ("" if token else "\n  no auth token found: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH "
                "(KubeRay: the token Secret, see clusters/README.md)")
        raise SubmitError(f"cannot reach the Ray cluster at {addr}: {e}{hint}") from None


def parse_env(items: list[str]) -> dict[str, str]:
    """--env KEY=VALUE sets a value; --env KEY forwards the local value (error if unset)."""
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not key.replace("_", "").isalnum():
            raise SubmitError(f"--env {item!r}: expected KEY=VALUE or KEY")
        if not sep:
            if key not in os.environ:
                raise SubmitError(f"--env {key}: not set in the local environment")
            value = os.environ[key]
        env[key] = value
    return env


def build_runtime_env(working_dir: Path, excludes: list[str], env: dict[str, str],
                      pip: list[str] = (), py_modules: list[str] = ()) -> dict:
    env_vars = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
    # Jobs written for local runs pass their own runtime_env to ray.init (e.g. env_vars); inside
    # a submitted job Ray refuses any overlap with the job's runtime env unless told to merge
    # (the driver's values win per key, the job's working_dir stays).
    env_vars["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    # The upload leaves out .git: the commit, dirtiness and user are read here, in the
    # directory being uploaded, and the job's MLflow source tags come from them.
    env_vars.update(source_env(working_dir))
    env_vars.update(env)
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": list(excludes),
                         "env_vars": env_vars}
    if pip:
        runtime_env["pip"] = list(pip)
    if py_modules:
        runtime_env["py_modules"] = list(py_modules)
    return runtime_env


def job_names() -> list[str]:
    """The subcommands a cluster job may run (every job; not submit or jobs themselves)."""
    return subcommands(job_parser())


def entrypoint_for(job: str, job_args: list[str], raw: bool = False) -> str:
    """The shell command the cluster runs: the local CLI, from the uploaded working dir
    (`raw`: JOB and its args are a command of their own, e.g. a benchmark script)."""
    if raw:
        return shlex.join([job, *job_args])
    names = job_names()
    if job not in names:
        raise SubmitError(f"unknown job {job!r}: choose one of {', '.join(names) or '(none built)'}")
    return shlex.join(["python", "-m", "pipelines.cli", job, *job_args])


def exit_code(info) -> int:
    """The job's exit status: the driver's own code when Ray reports one."""
    from ray.job_submission import JobStatus

    if info.status == JobStatus.SUCCEEDED:
        return 0
    if info.status == JobStatus.STOPPED:
        return 130
    return info.driver_exit_code or 1


def follow(client, job_id: str, out=sys.stdout, poll_s: float = 1.0) -> int:
    """Stream the job's logs until it ends; return its exit status."""
    import asyncio  # here, not at the top: 0.03 s that `flowar --help` need not pay

    from ray.job_submission import JobStatus

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as e:  # log stream dropped (e.g. port-forward restarted): poll instead
        print(f"[flowar] log stream ended early ({e}); polling status", file=sys.stderr)
    while True:  # the stream can end a moment before the status turns terminal
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            break
        time.sleep(poll_s)
    code = exit_code(info)
    verdict = "succeeded" if info.status == JobStatus.SUCCEEDED else f"{info.status.value.lower()}"
    # Ray's failure message repeats the log tail we already streamed: keep its first line.
    first = (info.message or "").strip().splitlines()[:1]
    msg = f": {first[0]}" if info.status != JobStatus.SUCCEEDED and first else ""
    print(f"[flowar] job {job_id} {verdict} (exit status {code}){msg}", file=sys.stderr)
    return code


def run_submit(job: str, job_args: list[str], *, address: str | None = None,
               working_dir: str | os.PathLike | None = None, excludes: list[str] = (),
               env: dict[str, str] | None = None, pip: list[str] = (), py_modules: list[str] = (),
               num_cpus: float | None = None, num_gpus: float | None = None,
               submission_id: str | None = None, wait: bool = True, raw: bool = False,
               max_upload_mib: float = MAX_UPLOAD_MIB, out=sys.stdout) -> tuple[str, int]:
    """Submit `flowar JOB job_args` to the cluster. Returns (job id, exit status; 0 if not waiting).

    Everything that can be refused (unknown job, relative outputs, an upload over the limit) is
    checked before the cluster is contacted; then the outputs left empty are pinned to the
    cluster's FLOWAR_HOME / MLFLOW_TRACKING_URI, and the job is submitted."""
    wd = Path(working_dir).resolve() if working_dir else project_root()
    if not wd.is_dir():
        raise SubmitError(f"--working-dir {str(wd)!r} is not a directory")
    entrypoint = entrypoint_for(job, list(job_args), raw)
    outputs = [] if raw else job_outputs(job, list(job_args), wd)  # raw commands: not checked
    refuse_relative_outputs(job, outputs)
    all_excludes = DEFAULT_EXCLUDES + list(excludes)
    plan = _checked_upload(wd, all_excludes, max_upload_mib)
    client = make_client(address)
    env = dict(env or {})
    env.update(_pinned_settings(client, job, outputs, env))
    runtime_env = build_runtime_env(wd, all_excludes, env, pip, py_modules)
    print(f"[flowar] cluster {resolve_address(address)}; uploading {plan.summary()}", file=sys.stderr)
    if runtime_env["env_vars"].get(ENV_DIRTY) == "true":  # the runs will name a commit it is not
        print(f"[flowar] uploading uncommitted changes of {runtime_env['env_vars'][ENV_COMMIT]}",
              file=sys.stderr)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                               submission_id=submission_id, entrypoint_num_cpus=num_cpus,
                               entrypoint_num_gpus=num_gpus,
                               metadata={"flowar_job": job, "submitted_by": "flowar submit"})
    print(f"[flowar] submitted job {job_id}: {entrypoint}", file=sys.stderr)
    print(job_id, file=out, flush=True)
    if not wait:
        print(f"[flowar] follow it with: flowar jobs logs {job_id} --follow", file=sys.stderr)
        return job_id, 0
    return job_id, _follow_until_interrupted(client, job_id, out)


def _checked_upload(wd: Path, excludes: list[str], max_mib: float) -> UploadPlan:
    """The upload's plan, refused over `max_mib` and warned about over half of it."""
    plan = plan_upload(wd, excludes)
    check_upload(plan, max_mib)
    if plan.zip_bytes > max_mib * 2**20 / 2:
        print(f"[flowar] warning: upload is over half the limit: {plan.summary()}", file=sys.stderr)
    return plan


def _pinned_settings(client, job: str, outputs: list[Output], env: dict[str, str]) -> dict[str, str]:
    """The cluster's FLOWAR_HOME / MLFLOW_TRACKING_URI that the outputs left empty go under,
    for the job's env (pipelines/submit/outputs.py), said aloud when there are any."""
    pinned = cluster_settings_for(job, outputs, env, lambda: ask_cluster_settings(client))
    if pinned:
        defaulted = ", ".join(o.key for o in outputs if o.needs)
        print(f"[flowar] outputs not given ({defaulted}) go under the cluster's "
              + ", ".join(f"{k}={v}" for k, v in pinned.items()), file=sys.stderr)
    return pinned


def _follow_until_interrupted(client, job_id: str, out) -> int:
    """follow(), where Ctrl-C stops following but leaves the job running (exit status 130)."""
    try:
        return follow(client, job_id, out)
    except KeyboardInterrupt:
        print(f"\n[flowar] stopped following; the job keeps running. Stop it with: "
              f"flowar jobs stop {job_id}", file=sys.stderr)
        return 130


# ----------------------------------------------------------------------------- command line

def _cli_submit(args) -> int:
    job_args = list(args.job_args)
    if job_args[:1] == ["--"]:
        job_args = job_args[1:]
    try:
        _, code = run_submit(args.job, job_args, address=args.address, working_dir=args.working_dir,
                             excludes=args.exclude, env=parse_env(args.env), pip=args.pip,
                             py_modules=args.py_module, num_cpus=args.num_cpus,
                             num_gpus=args.num_gpus, submission_id=args.submission_id,
                             wait=not args.no_wait, raw=args.raw,
                             max_upload_mib=args.max_upload_mib)
    except SubmitError as e:
        print(f"flowar submit: {e}", file=sys.stderr)
        return 2
    return code


def _cli_jobs(args) -> int:
    try:
        client = make_client(args.address)
    except SubmitError as e:
        print(f"flowar jobs: {e}", file=sys.stderr)
        return 2
    if args.action == "list":
        return _list_jobs(client)
    if not args.job_id:
        print(f"flowar jobs {args.action}: give a JOB_ID (see `flowar jobs list`)", file=sys.stderr)
        return 2
    return {"status": _job_status, "logs": _job_logs, "stop": _stop_job}[args.action](client, args)


def _list_jobs(client) -> int:
    jobs = sorted(client.list_jobs(), key=lambda j: j.start_time or 0)
    print(f"{'JOB ID':<28} {'STATUS':<10} {'STARTED':<19} ENTRYPOINT")
    for j in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime((j.start_time or 0) / 1000))
        print(f"{j.submission_id or j.job_id:<28} {j.status.value:<10} {started:<19} {j.entrypoint[:80]}")
    return 0


def _job_status(client, args) -> int:
    info = client.get_job_info(args.job_id)
    print(f"{args.job_id}: {info.status.value}" + (f" ({info.message})" if info.message else ""))
    return exit_code(info) if info.status.is_terminal() else 0


def _job_logs(client, args) -> int:
    if args.follow:
        return follow(client, args.job_id)
    sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _stop_job(client, args) -> int:
    stopped = client.stop_job(args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


SUBMIT_HELP = """\
Run `flowar JOB args...` on a Ray cluster: upload this working directory (without .git, data,
checkpoints, MLflow stores, venvs), print the job id, follow the logs and exit with the job's
exit status.

Paths: on the cluster a relative path means the uploaded working directory.
  * Inputs may be relative: configs/x.yaml is read from the upload.
  * Outputs may not: Ray deletes the upload after the job, so a relative output is refused
    before anything is uploaded. Give an absolute path on storage every node shares, or a URI.
  * Outputs left empty (mlflow.tracking_uri, ray.storage_path, evaluate's output_dir, ...) go
    under the cluster's FLOWAR_HOME and MLFLOW_TRACKING_URI, which the recipes in clusters/
    set on every node (--env FLOWAR_HOME=... overrides them). A cluster without them, or
    with a relative one, is refused.
  * Raw commands (--raw) are not checked.
"""


def _add_address(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None,
                   help=f"Ray dashboard address (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS, "
                        f"else {DEFAULT_ADDRESS})")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "submit", help="run a flowar job on a Ray cluster (Ray Jobs)",
        description=SUBMIT_HELP,
        epilog="example: flowar submit --address http://127.0.0.1:8265 train configs/train-tiny.yaml "
               "data.path=/shared/latents train.max_steps=100",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_address(p)
    p.add_argument("--working-dir", default=None, help="directory to upload (default: project root)")
    p.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="extra gitignore-style pattern not to upload (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                   help="environment variable for the job; KEY alone forwards the local value")
    p.add_argument("--pip", action="append", default=[], metavar="REQ",
                   help="extra pip requirement installed for the job (runtime env)")
    p.add_argument("--py-module", action="append", default=[], metavar="PATH",
                   help="extra local package shipped with the job (runtime env py_modules)")
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs reserved for the driver")
    p.add_argument("--num-gpus", type=float, default=None, help="GPUs reserved for the driver")
    p.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    p.add_argument("--raw", action="store_true",
                   help="JOB and its args are a plain command (e.g. python benchmarks/x.py), "
                        "run in the uploaded working dir")
    p.add_argument("--max-upload-mib", type=float, default=MAX_UPLOAD_MIB,
                   help=f"refuse uploads whose zip exceeds this (default {MAX_UPLOAD_MIB})")
    p.add_argument("job", help="flowar subcommand to run: encode, train, sweep, evaluate, ...")
    p.add_argument("job_args", nargs=argparse.REMAINDER, help="its arguments, as for a local run")
    p.set_defaults(func=_cli_submit)

    j = subparsers.add_parser("jobs", help="list, inspect, follow or stop Ray jobs",
                              description="Manage jobs on a Ray cluster (same address and token "
                                          "rules as `flowar submit`).")
    _add_address(j)
    j.add_argument("action", choices=["list", "status", "logs", "stop"])
    j.add_argument("job_id", nargs="?", help="job id (for status, logs, stop)")
    j.add_argument("--follow", "-f", action="store_true", help="logs: stream until the job ends")
    j.set_defaults(func=_cli_jobs)
