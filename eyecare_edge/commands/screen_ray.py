"""`eyecare-edge screen --engine ray`: its options and the run (Ray is imported only here, late)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from eyecare_edge.commands.options import options, pipeline_options
from eyecare_edge.errors import EyecareError, ItemsFailed

_RAY_OPTIONS = [
    click.option(
        "--address",
        default=None,
        help="Ray cluster to join: auto (a `ray start` cluster on this node) or ray://HEAD:10001 [a local Ray].",
    ),
    click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=None,
        help="Ray actors, each holding one model [1].",
    ),
    click.option(
        "--threads-per-worker",
        type=click.IntRange(min=1),
        default=None,
        help="CPU threads per actor, its Ray num_cpus (llama.cpp and vision threads; replaces --threads/--vision-threads) [1].",
    ),
    click.option(
        "--gpus-per-worker",
        type=click.FloatRange(min=0),
        default=None,
        help="GPUs per actor (e.g. 0.5: two actors share a GPU) [0].",
    ),
    click.option(
        "--sources-per-batch",
        type=click.IntRange(min=1),
        default=None,
        help="Files per Ray task: more amortises Ray's per-task cost on fast models, fewer loses less when a worker dies [1].",
    ),
    click.option(
        "--part-format",
        type=click.Choice(["jsonl", "parquet"]),
        default=None,
        help="Format of the result parts [jsonl].",
    ),
]


# Adds the --engine ray options to a command (they arrive as keyword arguments).
ray_options = options(*_RAY_OPTIONS)


def screen_on_ray(
    *,
    bundle: Path,
    inputs: Sequence[str],
    output: Path,
    digest: str,
    questions: Sequence[Any],
    task: str,
    max_tokens: int,
    resume: bool,
    retry_errors: bool,
    no_progress: bool,
    runtime: dict[str, Any],
    address: str | None,
    workers: int,
    threads_per_worker: int,
    gpus_per_worker: float,
    part_format: str,
    sources_per_batch: int = 1,
) -> None:
    """Resolve sources, open the parts directory, run the pool, print the summary; `ItemsFailed`
    (exit 3) when some items ended in an error."""
    from eyecare_edge.distributed.inputs import resolve_sources
    from eyecare_edge.distributed.parts import PartsDir
    from eyecare_edge.screening import ScreenError

    def err(msg: str) -> None:
        click.echo(msg, err=True)

    try:
        from eyecare_edge.distributed.ray_engine import RayScreenConfig, print_summary, run_ray_screen
    except ImportError as e:
        raise EyecareError(f"--engine ray needs Ray ({e}); pip install 'eyecare-edge[ray]'") from e
    try:
        sources = resolve_sources(inputs)
        parts = PartsDir(output, digest=digest, resume=resume, retry_errors=retry_errors, fmt=part_format)
    except ScreenError as e:
        raise click.UsageError(str(e)) from e
    except OSError as e:
        raise EyecareError(str(e)) from e
    st = parts.state
    if st.dropped_errors:
        err(f"{output}: retrying {st.dropped_errors} item(s) that ended in an error")
    if st.dropped_duplicates:
        err(f"{output}: removed {st.dropped_duplicates} duplicate line(s)")
    config = RayScreenConfig(
        bundle=str(bundle.resolve()),
        options=pipeline_options(runtime),
        questions=list(questions),
        task=task,
        max_tokens=max_tokens,
        workers=workers,
        threads_per_worker=threads_per_worker,
        gpus_per_worker=gpus_per_worker,
        sources_per_batch=sources_per_batch,
    )
    try:
        summary = run_ray_screen(
            config, sources, parts, address=address, report=err, progress=not no_progress
        )
    except KeyboardInterrupt:
        err(f"\ninterrupted; finished items are in {output}: rerun with --resume")
        sys.exit(130)
    except Exception as e:  # Ray's own errors (cannot connect, an actor that cannot load the bundle)
        raise EyecareError(f"the ray run failed: {type(e).__name__}: {' '.join(str(e).split())[:2000]}") from e
    print_summary(summary, str(output), err)
    if summary.exit_code:
        s = summary
        raise ItemsFailed(s.n_errors + s.n_previous_errors, s.n_items + s.n_skipped, where=str(output))
