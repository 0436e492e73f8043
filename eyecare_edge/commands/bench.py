"""`eyecare-edge bench`: bundle variants (and the PyTorch reference) on Eyecare-Bench-style data."""

from __future__ import annotations

import time
from pathlib import Path

import click

from eyecare_edge.commands.options import PIPELINE_FLAGS, options
from eyecare_edge.errors import EyecareError
from eyecare_edge.prompts import TASKS


@click.command("bench")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("data", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Report directory (report.json, report.md, charts, results/).",
)
@click.option(
    "--variant",
    "variants",
    multiple=True,
    help="Bundle variant to run, e.g. 'vision=int8_u8s8,llm=q4_k_m'; repeatable (default: the "
    "most exact and the fastest the bundle holds).",
)
@click.option(
    "--reference",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="PyTorch checkpoint to compare against (needs the train extra).",
)
@click.option("--limit", type=int, default=None, help="At most N records per task.")
@click.option("--tasks", default=None, help=f"Comma-separated tasks to run ({', '.join(TASKS)}).")
@click.option(
    "--images-root",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Resolve image paths against this folder instead of the data file's.",
)
@options(
    PIPELINE_FLAGS["n_threads"].option(param="threads", help="CPU threads for vision and LLM."),
    PIPELINE_FLAGS["visual_tokens"].option(),
    PIPELINE_FLAGS["token_reduction"].option(),
)
def bench(
    bundle,
    data,
    out_dir,
    variants,
    reference,
    limit,
    tasks,
    images_root,
    threads,
    visual_tokens,
    token_reduction,
) -> None:
    """Score BUNDLE on DATA (project JSONL, LLaVA JSON or OmniMedVQA records).

    \b
    Example:
      eyecare-edge bench bundles/tiny data/bench.jsonl --reference ckpt/tiny \\
          --variant vision=fp32,llm=f16 --variant vision=int8_u8s8,llm=q4_k_m -o report
    Resumable: run it again with the same -o to continue after an interruption.
    """
    from eyecare_edge.bench.metrics import require_bench_extra

    require_bench_extra()
    from eyecare_edge.bench.report import write_report
    from eyecare_edge.bench.runner import (
        REFERENCE_NAME,
        bundle_answerer,
        parse_variant,
        run_system,
        select_records,
    )
    from eyecare_edge.bundle import read_manifest
    from eyecare_edge.pipeline import Pipeline
    from eyecare_edge.qa.loaders import load_bench
    from eyecare_edge.training.reference import reference_answerer

    try:
        manifest = read_manifest(bundle)
        chosen = [parse_variant(v) for v in variants] or default_variants(manifest)
        records = load_bench(data, images_root=images_root)
    except ValueError as e:  # a bad --variant; BundleError and BenchFormatError are EyecareErrors
        if isinstance(e, EyecareError):
            raise
        raise EyecareError(str(e)) from e
    records = select_records(
        records, limit=limit, tasks=[t.strip() for t in tasks.split(",")] if tasks else None
    )
    if not records:
        raise EyecareError(f"{data}: no records to run")
    results_dir = out_dir / "results"
    all_results = []
    t0 = time.perf_counter()
    digest = manifest.digest()
    budget_tag = "".join(
        f",{k}={v}" for k, v in (("tokens", visual_tokens), ("reduction", token_reduction)) if v is not None
    )
    for v in chosen:
        name, slug = (
            v.name + budget_tag,
            v.slug + budget_tag.replace(",", "_").replace("=", "-").replace("%", "pct"),
        )
        click.echo(f"[{time.perf_counter() - t0:6.1f}s] {name}: {len(records)} items", err=True)
        try:
            pipe = Pipeline.load(
                bundle,
                vision_precision=v.vision,
                llm=v.llm,
                n_threads=threads,
                vision_threads=threads,
                visual_tokens=visual_tokens,
                token_reduction=token_reduction,
            )
        except Exception as e:  # llama.cpp and ONNX Runtime raise their own errors too
            raise EyecareError(f"cannot load {v.name}: {e}") from e
        click.echo(f"  {pipe.describe()}", err=True)  # where each half runs
        with pipe:
            all_results += _run(
                name,
                bundle_answerer(pipe),
                records,
                results_dir / f"{slug}.jsonl",
                f"{digest}:{slug}",
                run_system,
            )
    ref_name = None
    if reference is not None:
        click.echo(
            f"[{time.perf_counter() - t0:6.1f}s] {REFERENCE_NAME} ({reference}): {len(records)} items",
            err=True,
        )
        answer, ref_digest = reference_answerer(reference, preprocess=manifest.preprocess)
        all_results += _run(
            REFERENCE_NAME, answer, records, results_dir / "pytorch.jsonl", ref_digest, run_system
        )
        ref_name = REFERENCE_NAME
    paths = write_report(
        out_dir, all_results, reference=ref_name, title=f"Eyecare-Bench report: {bundle.name}"
    )
    click.echo(f"report: {paths.markdown} ({len(all_results)} answers, {time.perf_counter() - t0:.0f} s)")


def default_variants(manifest):
    """The most exact pair and the fastest pair the bundle holds (one when they coincide)."""
    from eyecare_edge.bench.runner import Variant

    vision = manifest.precisions("vision", "onnx")
    llm = manifest.precisions("llm", "gguf")
    exact_llm = next((q for q in ("f32", "f16", "bf16", "q8_0") if q in llm), llm[0] if llm else "auto")
    fast_llm = next((q for q in ("q4_k_m", "q4_0", "q5_k_m", "q6_k", "q8_0") if q in llm), exact_llm)
    fast_vision = next((p for p in ("int8_u8s8", "int8") if p in vision), "fp32")
    out = [Variant("fp32", exact_llm), Variant(fast_vision, fast_llm)]
    return list(dict.fromkeys(out))


def _run(name, answer, records, path, digest, run_system):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task(name, total=len(records))
        results = run_system(name, answer, records, path, digest=digest, on_item=lambda r: bar.advance(task))
    return results
