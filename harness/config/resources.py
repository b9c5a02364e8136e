"""What this machine gives a run: the CPUs this process may really use (contract C9), and where the
real data lives (`data_root`).

CPUs:
`os.cpu_count()` is the whole node: on a SLURM or container allocation of 4 CPUs on a 64-core node it
says 64, and 64 OpenMP threads per run then spin against each other. Count instead the CPUs this
process is allowed to run on (`sched_getaffinity`: SLURM's cgroup cpuset, `taskset`), capped by the
cgroup CPU quota where one is set (Docker `--cpus`, Kubernetes limits).
"""

from __future__ import annotations

import math
import os


def _cgroup_quota() -> int | None:
    """CPUs allowed by the cgroup CPU quota (rounded up, as joblib/loky do), or None if unlimited."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max" and int(period) > 0:
            return max(1, math.ceil(int(quota) / int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        if quota > 0 and period > 0:
            return max(1, math.ceil(quota / period))
    except (OSError, ValueError):
        pass
    return None


def available_cpus() -> int:
    """len(os.sched_getaffinity(0)) capped by the cgroup CPU quota; at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity API
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(n, quota) if quota else n)


DATA_DIR_ENV = "HARNESS_DATA_DIR"


def data_root(configured: str | None = None) -> str | None:
    """The real-data directory: the `data_dir=` config key if given, else $HARNESS_DATA_DIR, else None.

    The one place that reads the variable (the config's data_dir(), the Pythia task's relative model and
    tokenizer paths, analysis.pythia's tokenizer lookup)."""
    return configured or os.environ.get(DATA_DIR_ENV) or None
