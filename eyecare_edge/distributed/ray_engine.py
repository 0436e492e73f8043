"""`eyecare-edge screen --engine ray`: the local engine's items, run by a Ray Data actor pool.

Each actor of `map_batches` holds one `Pipeline` (the model is loaded once per actor) and runs
`screening.run_screen` on the sources of its batch, so a line is exactly what the local engine
writes for the same file, frame and question (plus `source_id`, `source_items`, `worker`).
Results stream back to the driver, which writes them to a `PartsDir` (atomic parts; resume).

Failures, from the smallest up:
* a file that cannot be read or decoded, or an item whose answer fails: error lines, written by
  `run_screen` inside the worker, as locally;
* a worker process that dies (SIGKILL, OOM, a crash in native code): Ray restarts the actor
  (`max_restarts`) and retries its batch (`max_task_retries`); a batch that still fails is
  dropped by Ray Data (`max_errored_blocks = -1`) instead of failing the job, and its sources run
  once more one per batch, so one poisonous file cannot take its batch-mates with it; a source
  that fails that too gets error lines ("worker died ...") written by the driver;
* the driver killed: parts on disk are whole, `--resume` skips every source they complete.

`num_cpus` of an actor is its thread count (llama.cpp and the vision backend each get that many
threads and run one after the other), so Ray never places more threads than cores on a node.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eyecare_edge.distributed.inputs import Source
from eyecare_edge.distributed.parts import PartsDir
from eyecare_edge.errors import EXIT_ITEMS_FAILED, EXIT_OK
from eyecare_edge.screening import Question, ScreenPipeline, item_id, run_screen

PipelineFactory = Callable[[], ScreenPipeline]


@dataclass
class RayScreenConfig:
    """How the pool is shaped. `sources_per_batch` trades scheduling overhead (about 10 ms a
    batch) against what a dying worker loses; one source (a few seconds of work at real model
    sizes) is the default."""

    bundle: str
    options: Any  # pipeline.PipelineOptions (threads are set from threads_per_worker)
    questions: Sequence[Question]
    task: str
    max_tokens: int = 256
    workers: int = 1
    threads_per_worker: int = 1
    gpus_per_worker: float = 0.0
    sources_per_batch: int = 1
    max_restarts: int = 3
    max_task_retries: int = 2
    # A part is written when a block arrives and 1000 lines or 2 s have gathered: a killed driver
    # loses at most 2 s of work, and a million items at 100 items/s make about 5000 parts.
    flush_rows: int = 1000
    flush_seconds: float = 2.0


@dataclass
class WorkerStats:
    items: int = 0
    busy_s: float = 0.0

    @property
    def items_per_s(self) -> float:
        return self.items / self.busy_s if self.busy_s > 0 else 0.0


@dataclass
class RaySummary:
    n_sources: int = 0
    n_items: int = 0
    n_ok: int = 0
    n_errors: int = 0
    n_skipped: int = 0
    n_previous_errors: int = 0
    n_crashed_sources: int = 0  # sources whose worker died on every try (error lines written)
    seconds: float = 0.0
    first_result_s: float = 0.0  # start-up: connecting, starting actors, loading the model
    first_block_items: int = 0
    workers: dict[str, WorkerStats] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        return self.n_items / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_items_per_s(self) -> float:
        """Items/s after the first block arrived (its items excluded): the pool's rate without
        its start-up. Blocks finished while the driver was busy can make it read high."""
        dt = self.seconds - self.first_result_s
        n = self.n_items - self.first_block_items
        return n / dt if self.first_result_s > 0 and dt > 0 and n > 0 else 0.0

    @property
    def exit_code(self) -> int:
        return EXIT_ITEMS_FAILED if self.n_errors or self.n_previous_errors else EXIT_OK

    def to_dict(self) -> dict:
        return {
            "sources": self.n_sources,
            "items": self.n_items,
            "ok": self.n_ok,
            "errors": self.n_errors,
            "skipped": self.n_skipped,
            "previous_errors": self.n_previous_errors,
            "crashed_sources": self.n_crashed_sources,
            "seconds": round(self.seconds, 2),
            "items_per_s": round(self.items_per_s, 3),
            "first_result_s": round(self.first_result_s, 2),
            "steady_items_per_s": round(self.steady_items_per_s, 3),
            "workers": {
                w: {"items": s.items, "busy_s": round(s.busy_s, 2), "items_per_s": round(s.items_per_s, 3)}
                for w, s in sorted(self.workers.items())
            },
        }


def pipeline_fields(pipe: Any) -> dict[str, str]:
    """The per-line fields naming what ran (as the local `screen` command writes them)."""
    try:
        return {
            "vision": f"{pipe.vision.encoder.name} {pipe.vision.encoder.precision}",
            "llm": pipe.llm_entry.precision,
        }
    except AttributeError:  # a pipeline without these (tests' stand-ins)
        return {}


class _Collected:
    """What `run_screen` needs of a results file, kept in memory for one source."""

    def __init__(self, done: Sequence[str]) -> None:
        self.done = set(done)
        self.n_existing_errors = 0
        self.rows: list[dict] = []

    def append(self, record: dict) -> None:
        self.rows.append(record)
        self.done.add(record["id"])


class ScreenWorker:
    """The callable class of `map_batches`: one Pipeline per actor, loaded in `__init__`."""

    def __init__(
        self,
        bundle: str,
        options: Any,
        questions: Sequence[Question],
        task: str,
        max_tokens: int,
        pipeline_factory: PipelineFactory | None = None,
    ) -> None:
        if pipeline_factory is None:
            from eyecare_edge.pipeline import Pipeline

            self.pipe: ScreenPipeline = Pipeline.load(bundle, options)
        else:
            self.pipe = pipeline_factory()
        self.questions = list(questions)
        self.task = task
        self.max_tokens = max_tokens
        self.extra = pipeline_fields(self.pipe)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        records: list[str] = []
        busy: list[float] = []
        for path, sid, done in zip(batch["path"], batch["source_id"], batch["done"], strict=True):
            t0 = time.perf_counter()
            got = _Collected(json.loads(done))
            s = run_screen(
                self.pipe,
                [Path(path)],
                self.questions,
                got,  # type: ignore[arg-type]  # duck-typed ResultsFile
                task=self.task,
                max_tokens=self.max_tokens,
                extra_fields=self.extra,
            )
            n_items = s.n_items + s.n_skipped
            seconds = (time.perf_counter() - t0) / max(1, len(got.rows))
            for rec in got.rows:
                rec.update(source_id=str(sid), source_items=n_items, worker=self.worker)
                records.append(json.dumps(rec, ensure_ascii=False))
                busy.append(seconds)
        return {"record": records, "busy_s": busy}


def crash_rows(source: Source, questions: Sequence[Question], task: str, digest: str, why: str) -> list[dict]:
    """Error lines for a source no worker survived: one per question (frames unknown: the file
    is not decoded on the driver, where a crash would end the run)."""
    from eyecare_edge.bundle import sha256_file

    try:
        sha: str | None = sha256_file(Path(source.path))
    except OSError:
        sha = None
    return [
        {
            "id": item_id(source.path, sha, None, q.prompt),
            "path": source.path,
            "frame": None,
            "image_sha256": sha,
            "task": task,
            "question": q.prompt,
            "question_id": q.qid,
            "options": q.options,
            "answer": None,
            "error": why,
            "timings": {},
            "bundle_digest": digest,
            "source_id": source.source_id,
            "source_items": len(questions),
            "worker": None,
        }
        for q in questions
    ]


@dataclass
class RayProgress:
    """Our own line next to Ray's bars: items done of the expected total, items/s and ETA."""

    total: int
    report: Callable[[str], None] = lambda line: None
    every_s: float = 5.0
    done: int = 0
    errors: int = 0
    _t0: float = field(default_factory=time.perf_counter)
    _last: float = 0.0

    def line(self) -> str:
        dt = time.perf_counter() - self._t0
        rate = self.done / dt if dt > 0 else 0.0
        left = max(0, self.total - self.done)
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        return f"screen: {self.done}/{self.total} items, {self.errors} errors, {rate:.2f} items/s, ETA {eta}"

    def advance(self, rows: Sequence[dict]) -> None:
        self.done += len(rows)
        self.errors += sum(r.get("error") is not None for r in rows)
        self.total = max(self.total, self.done)  # multi-frame files add items
        now = time.perf_counter()
        if now - self._last >= self.every_s:
            self._last = now
            self.report(self.line())


def _connect(address: str | None) -> bool:
    """Join the cluster at `address` (or start a local one). True when this call started Ray."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
    ray.init(**kwargs)
    return True


def _run_pass(
    config: RayScreenConfig,
    sources: Sequence[Source],
    parts: PartsDir,
    batch: int,
    on_rows: Callable[[list[dict], list[float]], None],
    pipeline_factory: PipelineFactory | None,
) -> None:
    import ray
    import ray.data

    st = parts.state
    items = [
        {
            "path": s.path,
            "source_id": s.source_id,
            "done": json.dumps(sorted(st.ids_by_source.get(s.source_id, ()))),
        }
        for s in sources
    ]
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / batch)))
    opts = config.options
    if opts is not None:
        from dataclasses import replace

        opts = replace(opts, n_threads=config.threads_per_worker, vision_threads=config.threads_per_worker)
    with warnings.catch_warnings():
        # Ray 2.60 deprecates extra remote args but has no named parameter for max_restarts /
        # max_task_retries yet (its actor pool reads them from there); the pin keeps this working.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        out = ds.map_batches(
            ScreenWorker,
            fn_constructor_kwargs={
                "bundle": config.bundle,
                "options": opts,
                "questions": list(config.questions),
                "task": config.task,
                "max_tokens": config.max_tokens,
                "pipeline_factory": pipeline_factory,
            },
            batch_size=batch,
            # The one-per-batch retry pass queues one task per actor: a file queued behind one that
            # kills the actor would otherwise die with it on every try and be blamed for the crash.
            compute=ray.data.ActorPoolStrategy(
                size=config.workers, max_tasks_in_flight_per_actor=1 if batch == 1 else None
            ),
            num_cpus=config.threads_per_worker,
            num_gpus=config.gpus_per_worker or None,
            max_restarts=config.max_restarts,
            max_task_retries=config.max_task_retries,
        )
    buffer: list[dict] = []
    last = time.monotonic()
    try:
        for block in out.iter_batches(batch_size=None, batch_format="pyarrow"):
            rows = [json.loads(x) for x in block.column("record").to_pylist()]
            on_rows(rows, block.column("busy_s").to_pylist())
            buffer.extend(rows)  # a block holds whole sources: parts stay whole-source
            if len(buffer) >= config.flush_rows or time.monotonic() - last >= config.flush_seconds:
                parts.write(buffer)
                buffer, last = [], time.monotonic()
    finally:  # an interrupted run keeps what it received
        parts.write(buffer)


def run_ray_screen(
    config: RayScreenConfig,
    sources: Sequence[Source],
    parts: PartsDir,
    *,
    address: str | None = None,
    report: Callable[[str], None] | None = None,
    progress: bool = True,
    on_rows: Callable[[list[dict]], None] | None = None,
    pipeline_factory: PipelineFactory | None = None,
) -> RaySummary:
    """Screen `sources` on a Ray cluster into `parts`, skipping sources the parts complete.

    `report` gets notices and (when `progress`) our progress lines; `progress` also turns Ray's
    bars on or off;
    `on_rows` sees every block of lines as it arrives (tests kill workers from it);
    `pipeline_factory` replaces `Pipeline.load` in the actors (tests only).
    """
    say = report or (lambda line: None)
    st = parts.state
    summary = RaySummary(n_sources=len(sources), n_previous_errors=st.n_errors)
    pending = [s for s in sources if not st.source_done(s.source_id)]
    summary.n_skipped = sum(len(st.ids_by_source.get(s.source_id, ())) for s in sources)
    nq = len(config.questions)
    prog = RayProgress(
        total=len(pending) * nq - sum(len(st.ids_by_source.get(s.source_id, ())) for s in pending),
        report=say if progress else (lambda line: None),
    )
    t0 = time.perf_counter()

    def take(rows: list[dict], busy: list[float]) -> None:
        if not summary.first_result_s:
            summary.first_result_s = time.perf_counter() - t0
            summary.first_block_items = len(rows)
        for row, b in zip(rows, busy, strict=True):
            if row["id"] in st.done_ids:
                continue
            summary.n_items += 1
            if row.get("error") is None:
                summary.n_ok += 1
            else:
                summary.n_errors += 1
                if len(summary.errors) < 20:
                    summary.errors.append(f"{row['path']}: {row['error']}")
            w = summary.workers.setdefault(str(row.get("worker")), WorkerStats())
            w.items += 1
            w.busy_s += b
        prog.advance(rows)
        if on_rows is not None:
            on_rows(rows)

    if pending:
        import ray
        from ray.data import DataContext

        started = _connect(address)
        ctx = DataContext.get_current()
        saved = (ctx.max_errored_blocks, ctx.enable_progress_bars)
        ctx.max_errored_blocks = -1  # a batch that kills its worker every time is retried below
        ctx.enable_progress_bars = progress
        try:
            cpus = ray.cluster_resources().get("CPU", 0)
            if config.workers * config.threads_per_worker > cpus:
                say(
                    f"note: {config.workers} worker(s) x {config.threads_per_worker} thread(s) > {cpus:g} CPUs "
                    "in the cluster: workers wait for CPUs (or for an autoscaler)"
                )
            _run_pass(config, pending, parts, config.sources_per_batch, take, pipeline_factory)
            missing = [s for s in pending if not st.source_done(s.source_id)]
            if missing and config.sources_per_batch > 1:
                say(f"{len(missing)} source(s) lost with their worker; retrying them one per batch")
                _run_pass(config, missing, parts, 1, take, pipeline_factory)
                missing = [s for s in missing if not st.source_done(s.source_id)]
        finally:
            ctx.max_errored_blocks, ctx.enable_progress_bars = saved
            if started:
                ray.shutdown()
        tries = 1 + config.max_task_retries
        for s in missing:
            why = f"a worker process died on each of {tries} tries at this file (crash or out of memory)"
            rows = crash_rows(s, config.questions, config.task, parts.digest, why)
            rows = [r for r in rows if r["id"] not in st.done_ids]
            take(rows, [0.0] * len(rows))
            parts.write(rows)
            summary.n_crashed_sources += 1
    summary.seconds = time.perf_counter() - t0
    if pending and progress:
        say(prog.line())
    return summary


def print_summary(
    summary: RaySummary, out: str, echo: Callable[[str], None] = lambda s: print(s, file=sys.stderr)
) -> None:
    """The closing lines: counts, items/s, and each worker's throughput."""
    s = summary
    echo(
        f"{s.n_items} item(s) in {s.seconds:.1f} s ({s.items_per_s:.2f}/s): {s.n_ok} ok, {s.n_errors} error(s)"
        + (f", {s.n_skipped} already done" if s.n_skipped else "")
        + (
            f", {s.n_previous_errors} earlier error(s) kept (--retry-errors runs them again)"
            if s.n_previous_errors
            else ""
        )
        + (f", {s.n_crashed_sources} file(s) crashed every worker" if s.n_crashed_sources else "")
        + f"; results in {out}"
    )
    if s.first_result_s:
        echo(
            f"  first result after {s.first_result_s:.1f} s (start-up), then {s.steady_items_per_s:.2f} items/s"
        )
    for w, ws in sorted(s.workers.items()):
        echo(f"  worker {w}: {ws.items} item(s), {ws.busy_s:.1f} s busy, {ws.items_per_s:.2f} items/s")
    for line in s.errors[:10]:
        echo(f"  error: {line}")
    if s.n_errors > 10:
        echo(f"  ... and {s.n_errors - 10} more (see the 'error' field)")
