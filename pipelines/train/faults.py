"""A test hook of the training loop: kill or fail one worker once, at a chosen step.

tests/test_train.py passes `fault` to `run_train` (pipelines/train/job.py), which carries it to the
workers in the WorkerPayload; the loop (pipelines/train/loop.py) calls `inject_fault` before every
step. With no fault given it does nothing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

__all__ = ["inject_fault"]


def inject_fault(fault: dict, rank: int, world: int, step: int, run_dir: str = "") -> None:
    """Test hook: once (marker file), kill or fail one worker at a step to exercise recovery.

    `after_checkpoint`: first wait until Ray's controller has registered the checkpoint of that
    step (its checkpoint manager snapshot in the run directory says so), so that the recovery
    under test starts from it on a loaded machine as on an idle one."""
    if not fault or step != fault["step"] or rank != fault.get("rank", world - 1):
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
