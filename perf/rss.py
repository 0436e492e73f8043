"""Run one measurement in a child process and read its peak resident memory.

Why a child per system: peak RSS is a property of a process. PyTorch FP32, PyTorch BF16 and
llama.cpp measured in one process would add up (and torch's allocator keeps what it once held),
so each system runs alone in a fresh interpreter and reports its own high-water mark.

Why `VmHWM` from /proc rather than `ru_maxrss`: Python starts children with vfork/posix_spawn
where it can, and Linux carries the *parent's* high-water mark into the child's `ru_maxrss` at
exec time. `VmHWM` belongs to the child's own address space, created by exec, so it counts only
what the measured system touched (file-backed pages of a memory-mapped model included, which is
what a user sees as resident memory).

The child is `python -m eyecare_edge.perf.rss SPEC OUT`: SPEC names `module:function` and its JSON
keyword arguments; OUT receives `{"value", "peak_rss_bytes", "baseline_rss_bytes", "wall_s"}` or
`{"error", "traceback"}`. The function must return something JSON can hold.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eyecare_edge.cpus import child_environ
from eyecare_edge.errors import EyecareError


class ChildError(EyecareError):
    """A measurement child that failed, timed out or returned nothing; the message says which."""


@dataclass
class ChildResult:
    """What one child measured. baseline_rss_bytes: resident memory after the interpreter and the
    target's module were imported, before the function ran (the fixed cost of the process)."""

    value: Any
    peak_rss_bytes: int
    baseline_rss_bytes: int
    wall_s: float


def proc_status_bytes(field: str, status: str | None = None) -> int:
    """A `kB` field of /proc/self/status (VmHWM, VmRSS) in bytes; 0 where /proc is missing."""
    if status is None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return 0
    for line in status.splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            return int(parts[1]) * 1024 if len(parts) >= 2 and parts[1].isdigit() else 0
    return 0


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM; ru_maxrss where /proc is unavailable)."""
    value = proc_status_bytes("VmHWM")
    if value:
        return value
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _resolve(target: str):
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ValueError(f"target {target!r} is not 'module:function'")
    return importlib.import_module(module_name), attr


def run_in_child(
    target: str,
    kwargs: dict[str, Any],
    *,
    timeout_s: float | None = None,
    log_path: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
) -> ChildResult:
    """Call `target(**kwargs)` in a fresh Python process; its stderr/stdout go to `log_path`
    (a temporary file when None). Raises ChildError with the log's tail when it fails."""
    with tempfile.TemporaryDirectory(prefix="eyecare-perf-") as tmp:
        spec = Path(tmp) / "spec.json"
        out = Path(tmp) / "out.json"
        spec.write_text(json.dumps({"target": target, "kwargs": kwargs}))
        log = Path(log_path) if log_path is not None else Path(tmp) / "child.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log, "ab") as log_fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "eyecare_edge.perf.rss", str(spec), str(out)],
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                env={**child_environ(), **(env or {})},
            )
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise ChildError(
                    f"{target} ran past its {timeout_s:.0f} s limit (log: {log})\n{_tail(log)}"
                ) from None
        wall = time.perf_counter() - t0
        if not out.exists():
            raise ChildError(f"{target} exited with code {rc} and wrote no result (log: {log})\n{_tail(log)}")
        data = json.loads(out.read_text())
        if "error" in data:
            raise ChildError(f"{target} failed: {data['error']}\n{data.get('traceback', '')}".rstrip())
        return ChildResult(
            value=data["value"],
            peak_rss_bytes=int(data["peak_rss_bytes"]),
            baseline_rss_bytes=int(data["baseline_rss_bytes"]),
            wall_s=wall,
        )


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _child_main(spec_path: str, out_path: str) -> int:
    out = Path(out_path)
    try:
        spec = json.loads(Path(spec_path).read_text())
        module, attr = _resolve(spec["target"])
        fn = getattr(module, attr)
        baseline = proc_status_bytes("VmRSS")
        value = fn(**spec.get("kwargs", {}))
        result = {"value": value, "peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline}
        out.write_text(json.dumps(result))
        return 0
    except BaseException as e:  # the parent reads the reason from the file
        out.write_text(json.dumps({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}))
        return 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m eyecare_edge.perf.rss SPEC.json OUT.json")
    sys.exit(_child_main(sys.argv[1], sys.argv[2]))
