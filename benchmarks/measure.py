"""What the benchmarks share: resumable results, one measurement per fresh process, and a sampler
of peak memory (RSS of a process tree and of Ray's workers, Ray's object-store bytes).

A benchmark writes each measurement to <out>/<name>.json once it is complete (`measured`); a
killed run, started again, skips what exists. Measurements run in a child process (`child`) so
that one's memory and threads do not colour the next.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

MB = 2**20


def measured(out: Path, name: str, measure) -> dict:
    """The result <out>/<name>.json, measured (and written atomically) unless it exists."""
    path = out / f"{name}.json"
    if not path.exists():
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(measure(), indent=1))
        tmp.rename(path)
    return json.loads(path.read_text())


def load(out: Path, name: str) -> dict | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def child(script: str, spec: dict, cwd: Path, pythonpath: Path, timeout: int = 3600) -> dict:
    """Run one measurement in a fresh process (`python script --child SPEC`); it writes its
    result as JSON to spec["result"], which comes back."""
    result = Path(spec["result"])
    result.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run([sys.executable, str(Path(script).resolve()), "--child", json.dumps(spec)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode or not result.exists():
        raise RuntimeError(f"measurement failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


class Sampler(threading.Thread):
    """Peak RSS of this process, of the descendants whose cmdline names `worker` (Ray's training
    workers by default), of all descendants together (the local Ray cluster it started), and peak
    object-store bytes, every `every` seconds."""

    def __init__(self, every: float = 0.2, worker: str = "RayTrainWorker"):
        super().__init__(daemon=True)
        self.every, self.worker, self.stop = every, worker, threading.Event()
        self.workers: dict[int, int] = {}  # pid of a matching worker -> peak RSS
        self.peak_ray = self.peak_driver = self.peak_store = self.samples = 0
        self.store_error, self._state = "", None

    def run(self):
        import psutil  # Ray's copy (ray/thirdparty_files): importable once ray is imported

        me = psutil.Process()
        while not self.stop.wait(self.every):
            total = 0
            for p in me.children(recursive=True):
                try:
                    rss = p.memory_info().rss
                    if p.pid not in self.workers and self.worker in " ".join(p.cmdline()):
                        self.workers[p.pid] = 0
                except psutil.Error:
                    continue
                total += rss
                if p.pid in self.workers:
                    self.workers[p.pid] = max(self.workers[p.pid], rss)
            self.peak_ray = max(self.peak_ray, total)
            self.peak_driver = max(self.peak_driver, me.memory_info().rss)
            self.peak_store = max(self.peak_store, self.store_bytes())
            self.samples += 1

    def store_bytes(self) -> int:
        if "ray" not in sys.modules or self.store_error:
            return 0
        try:
            from ray._private import internal_api

            ray = sys.modules["ray"]
            if self._state is None:
                if not ray.is_initialized():
                    return 0
                self._state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
            reply = internal_api.get_memory_info_reply(self._state, timeout_seconds=10)
            return int(reply.store_stats.object_store_bytes_used)
        except Exception as e:  # noqa: BLE001 - reported in the result, not fatal
            self.store_error = repr(e)[:300]
            return 0
