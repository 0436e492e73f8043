"""Runs a perf run's measurements, each in its own child process, records failures, tells progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from eyecare_edge.perf.options import PerfOptions, RunState
from eyecare_edge.perf.rss import ChildError, run_in_child


class Runner:
    """Runs children, records failures, tells progress."""

    def __init__(self, opts: PerfOptions, state: RunState, progress: Callable[[str], None]) -> None:
        self.opts, self.state, self.progress = opts, state, progress
        self.t0 = time.perf_counter()
        self.logs = Path(opts.workdir) / "logs"

    def child(self, name: str, target: str, kwargs: dict, env: dict | None = None) -> dict:
        """Run one measurement; returns its value plus peak RSS, or {"error": ...}."""
        self.progress(f"[{time.perf_counter() - self.t0:6.0f} s] {name}")
        log = self.logs / (name.replace(" ", "_").replace("/", "-") + ".log")
        log.unlink(missing_ok=True)
        try:
            res = run_in_child(target, kwargs, timeout_s=self.opts.child_timeout_s, log_path=log, env=env)
        except ChildError as e:
            self.progress(f"  failed: {str(e).splitlines()[0]}")
            return {"system": name, "error": str(e)}
        value = res.value if isinstance(res.value, dict) else {"value": res.value}
        return {
            "system": name,
            **value,
            "peak_rss_bytes": res.peak_rss_bytes,
            "baseline_rss_bytes": res.baseline_rss_bytes,
            "child_wall_s": res.wall_s,
        }

    def raw_child(self, target: str, kwargs: dict) -> object:
        """A child whose failure stops the run (building)."""
        log = self.logs / (target.rsplit(":", 1)[-1] + ".log")
        return run_in_child(target, kwargs, timeout_s=self.opts.child_timeout_s, log_path=log).value

    def stage(self, name: str, t: float) -> None:
        self.state.stages[name] = round(time.perf_counter() - t, 1)
