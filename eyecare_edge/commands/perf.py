"""`eyecare-edge perf`: the runtime against PyTorch FP32/BF16 and against this machine's limits."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from eyecare_edge.commands.options import PIPELINE_FLAGS
from eyecare_edge.errors import EyecareError
from eyecare_edge.formats import format_names
from eyecare_edge.presets import DEFAULT_PRESET, preset_names
from eyecare_edge.reduce import METHODS


def _csv(value: str) -> tuple[str, ...]:
    if value.strip().lower() in ("", "none"):
        return ()
    return tuple(v.strip().lower() for v in value.split(",") if v.strip())


def _ints(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers") from None


def _token_budgets(value: str) -> tuple[float | int, ...]:
    from eyecare_edge.reduce import TokenBudget, parse_visual_tokens

    try:
        out = tuple(parse_visual_tokens(v) for v in _csv(value))
        for v in out:
            TokenBudget(v)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--visual-tokens") from None
    return tuple(v for v in out if v is not None and v != 1.0)


@click.command("perf")
@click.option(
    "--preset",
    type=click.Choice(preset_names()),
    default=DEFAULT_PRESET,
    show_default=True,
    help="Shapes to measure (a random-weight checkpoint and bundle are built once and cached).",
)
@click.option(
    "--bundle",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Measure this bundle instead (its source checkpoint gives shapes and the PyTorch references).",
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="With --bundle: the checkpoint it was exported from, if the manifest's path is not valid here.",
)
@click.option(
    "--image",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Image to ask about [a 3504x2336 HRF fundus photo from ../shared/data/hrf, else a phantom].",
)
@click.option(
    "--llm-layers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="LLM depth to build (full width); 0 = the preset's full depth.",
)
@click.option(
    "--vision-layers",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="SigLIP depth to build (>= 2 keeps the dense connector's shape); 0 = full depth.",
)
@click.option(
    "--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), help="Write the report here."
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Cache of checkpoints, bundles and logs [~/.cache/eyecare-edge/perf].",
)
@PIPELINE_FLAGS["n_threads"].option(param="threads", help="CPU threads [physical cores].")
@click.option("--decode-tokens", type=click.IntRange(min=2), default=64, show_default=True)
@click.option(
    "--time-box",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="Seconds per measured phase; slower systems are measured on less work and scaled (0 = no box).",
)
@click.option("--references", default="fp32,bf16", show_default=True, help="transformers dtypes, or 'none'.")
@click.option(
    "--llm-variants",
    default=",".join(format_names("llm", measured=True)),
    show_default=True,
    help="GGUF types to measure.",
)
@click.option("--no-vision-backends", is_flag=True, help="Skip the per-backend vision measurements.")
@click.option(
    "--budgets", default="1,2,4,9", show_default=True, help="Max-tile budgets N to time, or 'none'."
)
@click.option("--no-fast-budget", is_flag=True, help="Do not time the named `fast` budget.")
@click.option(
    "--accuracy-bundle",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A trained (tiny phantom) bundle: closed-QA accuracy per budget.",
)
@click.option(
    "--accuracy-ckpt",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Or a trained checkpoint (PyTorch) for the accuracy per budget.",
)
@click.option(
    "--accuracy-data",
    type=click.Path(exists=True, path_type=Path),
    help="Bench JSONL with closed questions for the accuracy per budget.",
)
@click.option("--accuracy-limit", type=click.IntRange(min=1), default=None, help="At most N questions.")
@click.option(
    "--sweep", is_flag=True, help="Also time llama.cpp settings (repack, flash attention, batch...)."
)
@click.option(
    "--proposed", is_flag=True, help="Also run end to end with the settings this benchmark proposes."
)
@click.option(
    "--visual-tokens",
    default="0.5,0.25,0.15,0.1",
    show_default=True,
    help="Visual-token budgets (fractions or counts per image) for the budget x method table, or 'none'.",
)
@click.option(
    "--token-methods",
    default="pool,diverse",
    show_default=True,
    help="Token reduction methods for the budget x method table.",
)
@click.option("--no-kv-variants", is_flag=True, help="Do not time the KV cache types at the default budget.")
@click.option("--check-targets", is_flag=True, help="Exit with code 1 when a target is missed.")
def perf(
    preset,
    bundle,
    checkpoint,
    image,
    llm_layers,
    vision_layers,
    json_out,
    workdir,
    threads,
    decode_tokens,
    time_box,
    references,
    llm_variants,
    no_vision_backends,
    budgets,
    no_fast_budget,
    accuracy_bundle,
    accuracy_ckpt,
    accuracy_data,
    accuracy_limit,
    sweep,
    proposed,
    visual_tokens,
    token_methods,
    no_kv_variants,
    check_targets,
) -> None:
    """Measure TTFT, prefill and decode speed, vision per tile and peak memory of the runtime
    against transformers FP32/BF16 and against this machine's bandwidth and FLOP/s.

    \b
    Example:
      eyecare-edge perf --json perf.json                  # eyecare-3.8b shapes, 2+2 layers
      eyecare-edge perf --llm-layers 4 --vision-layers 4 --sweep --json perf.json
    The default run takes minutes on 2 cores (plus a one-off build of ~4 GB of cached files);
    figures at full depth are extrapolated per layer (see the report's `extrapolation`).
    """
    from eyecare_edge.formats import REFERENCE_DTYPES
    from eyecare_edge.perf.options import DEFAULT_WORKDIR, PerfOptions
    from eyecare_edge.perf.run import run_perf, write_json
    from eyecare_edge.perf.table import render_table

    refs = _csv(references)
    bad = [r for r in refs if r not in REFERENCE_DTYPES]
    if bad:
        raise click.BadParameter(f"unknown reference dtype(s) {bad}", param_hint="--references")
    if vision_layers == 1:
        raise click.BadParameter(
            "use >= 2 (one layer changes the dense connector's width)", param_hint="--vision-layers"
        )
    if (accuracy_bundle or accuracy_ckpt) and accuracy_data is None:
        raise click.UsageError("--accuracy-bundle/--accuracy-ckpt need --accuracy-data BENCH.jsonl")
    methods = _csv(token_methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise click.BadParameter(
            f"unknown method(s) {unknown}; known: {', '.join(METHODS)}", param_hint="--token-methods"
        )
    opts = PerfOptions(
        preset=preset,
        bundle=bundle,
        checkpoint=checkpoint,
        image=image,
        llm_layers=llm_layers or None,
        vision_layers=vision_layers or None,
        workdir=workdir or DEFAULT_WORKDIR,
        threads=threads,
        n_decode=decode_tokens,
        time_box_s=time_box,
        references=refs,
        llm_variants=_csv(llm_variants),
        vision_backends=not no_vision_backends,
        budgets=_ints(budgets),
        fast_budget=not no_fast_budget,
        accuracy_bundle=accuracy_bundle,
        accuracy_ckpt=accuracy_ckpt,
        accuracy_data=accuracy_data,
        accuracy_limit=accuracy_limit,
        sweep=sweep,
        proposed=proposed,
        visual_tokens=_token_budgets(visual_tokens),
        token_methods=methods,
        kv_variants=not no_kv_variants,
    )

    def progress(msg: str) -> None:
        click.echo(msg, err=True)

    try:
        report = run_perf(opts, progress)
    except (FileNotFoundError, ValueError) as e:  # ChildError is an EyecareError already
        raise EyecareError(str(e)) from e
    if sys.argv and Path(sys.argv[0]).name.startswith("eyecare-edge"):
        report["config"]["command"] = "eyecare-edge " + " ".join(sys.argv[1:])
    click.echo(render_table(report))
    if json_out is not None:
        write_json(report, json_out)
        click.echo(f"report: {json_out}", err=True)
    missed = [t for t in report["targets"] if t["met"] is False]
    if check_targets and missed:
        raise EyecareError(f"{len(missed)} target(s) missed (see the table)")
