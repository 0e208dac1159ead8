"""Starting or joining Ray, the same way for every job.

- Already initialised (tests, the quickstart, a Tune trial): reuse it.
- `ray.address` in the config or RAY_ADDRESS in the environment (a job submitted with
  `flowar submit` runs with it set): join that cluster; it has its own CPU count.
- Otherwise a local Ray with at least `min_cpus` logical CPUs: a job's actors and workers
  (and Ray Data's tasks beside them in encode and evaluate; docs/stack-facts.md, "CPU budget for
  Ray Data") must all fit, so a 2-core laptop is oversubscribed logically rather than deadlocked.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: workers import pipelines/ and flowar/ from it


def init_ray(cfg=None, min_cpus: int = 0):
    import ray

    if ray.is_initialized():
        return ray
    address = (getattr(cfg, "address", "") or os.environ.get("RAY_ADDRESS", "")) or None
    env = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"), "PYTHONPATH": str(ROOT)}
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        num_cpus = getattr(cfg, "num_cpus", 0) or max(os.cpu_count() or 1, min_cpus)
        # The dashboard hosts the State API, which Ray Train needs to free the placement groups
        # of trials that Tune stops (docs/stack-facts.md, "Freeing Tune trials' placement
        # groups"); it binds to loopback.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=False, runtime_env={"env_vars": env})
    return ray
