"""What `flowar submit` uploads: the working directory as Ray's `working_dir` runtime env will zip
it, measured on the laptop before anything is sent, so an upload over the limit is refused with
the files that make it large.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.core.config import HOME_DEFAULT, RAY_RESULTS
from pipelines.submit.outputs import SubmitError

# Ray documents 100 MiB as the working_dir limit (GCS storage;
# https://docs.ray.io/en/latest/ray-core/handling-dependencies.html). Ray 2.60 raised its own cap,
# but KubeRay's GCS and older clusters still enforce 100 MiB, so we do too.
MAX_UPLOAD_MIB = 100

# Never shipped with a job (gitignore syntax, relative to the working dir; a leading / anchors a
# pattern to the top, so a package such as flowar/data/ still ships). Large data belongs on
# shared storage or an object store (pipelines/core/storage.py), not in the upload.
DEFAULT_EXCLUDES = [
    ".git/", ".venv/", "venv/", "env/", "__pycache__/", "*.pyc", "*.egg-info/", ".pytest_cache/",
    "/data/", "/datasets/", "/checkpoints/", "/ckpt/", "/outputs/", f"/{HOME_DEFAULT}/",
    f"/{RAY_RESULTS}/", "mlruns/", "mlartifacts/", "*.db", "*.sqlite", "/build/", "/dist/",
    "/wandb/", ".ipynb_checkpoints/", "*.safetensors", "*.pt", "*.pth", "*.ckpt", "*.parquet",
]


@dataclass
class UploadPlan:
    """What `working_dir` sends: the files Ray will zip, their size and the zip's size."""

    working_dir: Path
    excludes: list[str]
    files: list[tuple[str, int]] = field(default_factory=list)
    raw_bytes: int = 0
    zip_bytes: int = 0
    limit_mib: float = MAX_UPLOAD_MIB

    def summary(self) -> str:
        return (f"working dir {self.working_dir}: {len(self.files)} files, "
                f"{self.raw_bytes / 2**20:.2f} MiB, {self.zip_bytes / 2**20:.2f} MiB zipped "
                f"(limit {self.limit_mib:g} MiB)")

    def largest(self, n: int = 8) -> list[tuple[str, int]]:
        return sorted(self.files, key=lambda f: -f[1])[:n]


def _include_gitignore() -> bool:
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    return os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"


def plan_upload(working_dir: Path, excludes: list[str]) -> UploadPlan:
    """Walk and zip the working dir exactly as the Ray Jobs SDK will (same traversal, excludes,
    .gitignore/.rayignore handling), so the size we check is the size Ray uploads."""
    from ray._private.runtime_env import packaging

    wd = working_dir.resolve()
    plan = UploadPlan(wd, list(excludes))

    def visit(p: Path):
        if p.is_file():
            size = p.stat().st_size
            plan.files.append((str(p.relative_to(wd)), size))
            plan.raw_bytes += size

    quiet = logging.getLogger("flowar.submit.plan")  # Ray logs every .gitignore it reads at INFO
    quiet.setLevel(logging.WARNING)
    packaging._dir_travel(wd, [packaging._get_excludes(wd, plan.excludes)], visit,
                          include_gitignore=_include_gitignore(), logger=quiet)
    with tempfile.TemporaryDirectory(prefix="flowar-pkg-") as tmp:
        target = Path(tmp) / "pkg.zip"
        packaging._zip_files(str(wd), plan.excludes, str(target),
                             include_gitignore=_include_gitignore(), logger=quiet)
        plan.zip_bytes = target.stat().st_size
    return plan


def check_upload(plan: UploadPlan, max_mib: float = MAX_UPLOAD_MIB) -> None:
    plan.limit_mib = max_mib
    if plan.zip_bytes > max_mib * 2**20:
        biggest = "\n".join(f"    {s / 2**20:8.2f} MiB  {name}" for name, s in plan.largest())
        raise SubmitError(f"refusing to upload: {plan.summary()} exceeds {max_mib} MiB.\n"
                          f"  Largest files:\n{biggest}\n  Add them to --exclude or .rayignore and "
                          f"put data on shared storage or an object store (s3://, gs://).")
