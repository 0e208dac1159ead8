"""Test hooks of the training loop: kill or fail one worker once, at a chosen step; record what
each worker read and trained on.

tests/test_train.py passes `fault` to `run_train` (pipelines/train/job.py), which carries it to the
workers in the WorkerPayload; the loop (pipelines/train/loop.py) calls `inject_fault` before every
step. `fault["data_log"]` (a directory) makes every worker append JSON lines there: the keys of
each micro-batch (`log_keys`) and each unit its reader read (`read_logger`), one file per process.
With no fault given they do nothing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

__all__ = ["inject_fault", "log_keys", "read_logger"]


def inject_fault(fault: dict, rank: int, world: int, step: int, run_dir: str = "") -> None:
    """Test hook: once (marker file), kill or fail one worker at a step to exercise recovery.

    `after_checkpoint`: first wait until Ray's controller has registered the checkpoint of that
    step (its checkpoint manager snapshot in the run directory says so), so that the recovery
    under test starts from it on a loaded machine as on an idle one."""
    if "step" not in (fault or {}) or step != fault["step"] or rank != fault.get("rank", world - 1):
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    if fault.get("after_checkpoint"):
        _wait_for_registered_checkpoint(run_dir, int(fault["after_checkpoint"]))
    marker.write_text(f"fault injected at step {step}\n")
    if fault.get("mode", "kill") == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected fault at step {step}")


def _wait_for_registered_checkpoint(run_dir: str, step: int, limit_s: float = 600.0) -> None:
    """Block until the latest checkpoint in Ray Train's snapshot of `run_dir` is of `step`."""
    snapshot = Path(run_dir) / "checkpoint_manager_snapshot.json"  # Ray Train V2's own file
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
            if (latest.get("metrics") or {}).get("step", -1) >= step:
                return
        except (OSError, ValueError):
            pass  # not written yet, or caught mid-write
        time.sleep(0.2)
    raise RuntimeError(f"fault hook: Ray never registered the step-{step} checkpoint in {snapshot}")


def _append(fault: dict, record: dict) -> None:
    path = Path(fault["data_log"]) / f"pid-{os.getpid()}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps({"pid": os.getpid(), **record}) + "\n")


def log_keys(fault: dict, rank: int, world: int, step: int, micro: int, keys: list[str]) -> None:
    """Test hook: the keys one micro-batch of `step` trained on."""
    if fault and fault.get("data_log"):
        _append(fault, {"rank": rank, "world": world, "step": step, "micro": micro, "keys": keys})


def read_logger(fault: dict, rank: int):
    """Test hook: a WindowReader on_read callback logging each unit read, or None."""
    if not (fault and fault.get("data_log")):
        return None
    return lambda unit: _append(fault, {"rank": rank, "read": list(unit.ref), "rows": unit.rows})
