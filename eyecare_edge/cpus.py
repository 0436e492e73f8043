"""CPU facts that import nothing heavy: how many physical cores this process may use, how busy
the CPUs are, and the environment a child process should get.

Kept apart from `eyecare_edge.llm` on purpose: importing the llama.cpp binding sets
OMP_WAIT_POLICY=PASSIVE for llama.cpp's OpenMP workers (`llm.binding`), and torch shares that one
OpenMP runtime (both load libgomp.so.1, and the first load's environment decides). A command that
trains with torch must count its cores without importing the binding: measured on the 2-core EPYC,
the demo's vision stage ran 0.124 s a step with passive waits against 0.082 s without (300 steps,
`OMP_WAIT_POLICY=PASSIVE` vs unset), and took ~110 s instead of ~80 s in the demo.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# Set beside OMP_WAIT_POLICY when `llm.binding` chose PASSIVE itself (not the user).
WAIT_POLICY_MARK = "EYECARE_EDGE_SET_OMP_WAIT_POLICY"


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(path.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(len(cores), 1)


def busy_cpus(window_s: float = 0.5) -> float:
    """CPUs kept busy by other processes over `window_s` (Linux /proc/stat; else the load average)."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total jiffies, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(window_s)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    cpus = os.cpu_count() or 1
    return cpus * (1.0 - (i1 - i0) / max(1, t1 - t0))


def child_environ() -> dict[str, str]:
    """This process's environment for a child process, without the OMP_WAIT_POLICY that importing
    the llama.cpp binding set (a user's own setting is kept).

    Why: a child inherits the environment, so every child of a process that had imported the
    binding trained or ran torch with passive waits, and `perf`'s "default" llama.cpp settings and
    its transformers references were timed under them. A child that loads llama.cpp sets them again
    when it imports the binding."""
    env = dict(os.environ)
    if env.pop(WAIT_POLICY_MARK, None) is not None and env.get("OMP_WAIT_POLICY") == "PASSIVE":
        del env["OMP_WAIT_POLICY"]
    return env
