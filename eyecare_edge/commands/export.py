"""`eyecare-edge export`: checkpoint -> validated bundle (vision ONNX variants, LLM GGUFs)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from eyecare_edge.commands.options import PIPELINE_FLAGS
from eyecare_edge.errors import EyecareError
from eyecare_edge.formats import export_formats, format_names
from eyecare_edge.preprocess import BUDGETS


def _listing(role: str) -> str:
    """'fp32, fp16, ...' with each format's one-line description, for `--help`."""
    return ", ".join(f"{f.name} ({f.description})" for f in export_formats() if f.role == role)


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip().lower() for v in value.split(",") if v.strip())


@click.command("export")
@click.argument("checkpoint", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Bundle directory.",
)
@click.option(
    "--vision",
    default=",".join(format_names("vision", default=True)),
    show_default=True,
    help=f"Vision ONNX variants: {_listing('vision')}.",
)
@click.option(
    "--llm",
    default=",".join(format_names("llm", default=True)),
    show_default=True,
    help=f"LLM GGUF types: {', '.join(format_names('llm'))}.",
)
@click.option(
    "--calibration",
    type=click.Path(exists=True, path_type=Path),
    help="INT8 calibration images: a folder, a bench JSONL or a LLaVA JSON (default: the shipped samples).",
)
@click.option("--calibration-images", default=16, show_default=True, help="Images used for calibration.")
@PIPELINE_FLAGS["max_tiles"].option()
@click.option("--anyres-max", type=int, default=None, help="Compression cap N of anyres_max_N.")
@click.option(
    "--budget",
    type=click.Choice(list(BUDGETS)),
    default=None,
    help="Named token budget (fast: for CPU-only clinics).",
)
@PIPELINE_FLAGS["n_threads"].option(param="threads", help="CPU threads for calibration and validation.")
@click.option(
    "--no-validate", is_flag=True, help="Skip the comparisons with the checkpoint (not recommended)."
)
def export(
    checkpoint,
    out_dir,
    vision,
    llm,
    calibration,
    calibration_images,
    max_tiles,
    anyres_max,
    budget,
    threads,
    no_validate,
) -> None:
    """Export CHECKPOINT to a bundle and validate every file against it.

    \b
    Example:
      eyecare-edge export ckpt/eyecare-3.8b -o bundles/eyecare-3.8b --vision fp32,fp16,int8 --llm f16,q4_k_m
    Exit code 1 (naming the check) when a validation figure is outside its tolerance.
    """
    from eyecare_edge.export.exporter import ExportError, ExportFailed, ExportOptions, export_bundle

    options = ExportOptions(
        vision=_csv(vision),
        llm=_csv(llm),
        calibration=calibration,
        calibration_images=calibration_images,
        max_tiles=max_tiles,
        anyres_max=anyres_max,
        budget=budget,
        validate=not no_validate,
        threads=threads,
    )
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        click.echo(f"[{time.perf_counter() - t0:6.1f}s] {msg}", err=True)

    try:
        result = export_bundle(checkpoint, out_dir, options, progress=progress)
    except ExportFailed as e:
        _summary(e.result)
        raise  # "validation failed: <the checks>", exit 1
    except (EyecareError, ValueError, OSError) as e:  # CheckpointError, ExportError, a bad file
        raise ExportError(f"export failed: {e}") from e
    _summary(result)
    click.echo(
        f"bundle written to {result.bundle} in {time.perf_counter() - t0:.1f} s "
        f"(check with: eyecare-edge info {result.bundle} --verify)"
    )


def _summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bundle {result.bundle}")
    for col in ("file", "size", "time", "validation"):
        table.add_column(col, justify="right" if col in ("size", "time") else "left")
    for r in result.rows:
        table.add_row(r.file, f"{r.size / 1e6:.1f} MB", f"{r.seconds:.1f} s", r.figure)
    Console().print(table)
    for f in result.failed:
        click.echo(f"FAILED {f}", err=True)
