"""`eyecare-edge ask`: one question (or a report) about one or more images, streamed (no torch)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

# Options shared by `ask` and `screen` (and what they become in PipelineOptions).
_RUNTIME_OPTIONS: list[Callable[[Any], Any]] = [
    click.option(
        "--vision",
        "vision",
        type=click.Choice(["auto", "tensorrt", "ort-cuda", "ort-cpu", "openvino"]),
        default="auto",
        show_default=True,
        help="Vision backend; auto takes the fastest that loads and says which.",
    ),
    click.option(
        "--vision-precision",
        type=click.Choice(["auto", "fp32", "fp16", "int8", "int8_u8s8"]),
        default="auto",
        show_default=True,
        help="Vision graph precision (auto: fp16 on GPU, fastest validated INT8 on CPU).",
    ),
    click.option(
        "--llm",
        default="auto",
        show_default=True,
        help="GGUF precision in the bundle (q4_k_m, q8_0, f16, f32...).",
    ),
    click.option(
        "--threads",
        "n_threads",
        type=click.IntRange(min=1),
        default=None,
        help="llama.cpp threads [physical cores].",
    ),
    click.option(
        "--vision-threads",
        type=click.IntRange(min=1),
        default=None,
        help="Vision CPU threads [physical cores].",
    ),
    click.option(
        "--n-ctx",
        type=click.IntRange(min=256),
        default=None,
        help="Context size [largest image plan + 1024].",
    ),
    click.option(
        "--gpu-layers",
        "n_gpu_layers",
        type=int,
        default=None,
        help="LLM layers on the GPU (-1 all, 0 none) [all when llama.cpp is a GPU build].",
    ),
    click.option(
        "--device",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="GPU ordinal for TensorRT / ONNX Runtime CUDA.",
    ),
    click.option(
        "--kv-type", type=click.Choice(["f16", "f32", "q8_0", "bf16"]), default="f16", show_default=True
    ),
    click.option(
        "--flash-attn/--no-flash-attn",
        default=None,
        help="Flash attention [auto: llama.cpp's choice on a GPU, off on the CPU].",
    ),
    click.option(
        "--crop-fov", "fundus_crop", is_flag=True, help="Crop fundus photos to their circular field of view."
    ),
    click.option(
        "--max-tiles",
        type=click.IntRange(min=1),
        default=None,
        help="Token budget: at most N patch tiles per image.",
    ),
    click.option(
        "--visual-tokens",
        default=None,
        help="Visual tokens per image: a count (800), a fraction (0.25 or 25%), or 'all' "
        "[the bundle's budget]; n_ctx follows.",
    ),
    click.option(
        "--token-reduction",
        type=click.Choice(["pool", "diverse"]),
        default=None,
        help="How kept visual tokens are chosen [the bundle's, else pool].",
    ),
    click.option(
        "--max-pixels",
        type=click.IntRange(min=1),
        default=None,
        help="Refuse images larger than this (header check).",
    ),
    click.option(
        "--no-verify",
        is_flag=True,
        help="Skip the sha256 check of the bundle files (verified at install time).",
    ),
    click.option("--no-engine-build", is_flag=True, help="Never build a TensorRT engine on first use."),
]


def runtime_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add the pipeline options to a command (they arrive as keyword arguments)."""
    for option in reversed(_RUNTIME_OPTIONS):
        f = option(f)
    return f


def pipeline_options(values: dict[str, Any]):
    """PipelineOptions from the keyword arguments `runtime_options` added."""
    from eyecare_edge.pipeline import PipelineOptions

    v = dict(values)
    opts = PipelineOptions(
        vision=v.pop("vision"),
        vision_precision=v.pop("vision_precision"),
        llm=v.pop("llm"),
        n_threads=v.pop("n_threads"),
        vision_threads=v.pop("vision_threads"),
        n_ctx=v.pop("n_ctx"),
        n_gpu_layers=v.pop("n_gpu_layers"),
        device=v.pop("device"),
        kv_type=v.pop("kv_type"),
        flash_attn=v.pop("flash_attn"),
        fundus_crop=v.pop("fundus_crop"),
        max_tiles=v.pop("max_tiles"),
        visual_tokens=v.pop("visual_tokens"),
        token_reduction=v.pop("token_reduction"),
        verify=not v.pop("no_verify"),
        build_engine=not v.pop("no_engine_build"),
    )
    max_pixels = v.pop("max_pixels")
    if max_pixels is not None:
        opts.max_pixels = max_pixels
    if v:
        raise TypeError(f"unexpected options {sorted(v)}")
    return opts


@click.command("ask")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument(
    "images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("-q", "--question", default=None, help="The question. Images are placed before it.")
@click.option("--report", is_flag=True, help="Ask for an examination report (the bundle's report prompt).")
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Most tokens to generate [256; report 512].",
)
@click.option(
    "--temperature", type=click.FloatRange(min=0.0), default=0.0, show_default=True, help="0 = greedy."
)
@click.option(
    "--top-p", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=1.0, show_default=True
)
@click.option("--seed", type=int, default=None, help="Sampling seed (temperature > 0).")
@runtime_options
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object (answer, timings) instead of streaming."
)
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Say where each half runs: every skipped vision backend with its full reason, LLM offload.",
)
def ask(
    bundle: Path,
    images: tuple[Path, ...],
    question: str | None,
    report: bool,
    max_tokens: int | None,
    temperature: float,
    top_p: float,
    seed: int | None,
    as_json: bool,
    verbose: bool,
    **runtime: object,
) -> None:
    """Ask QUESTION about IMAGE(s) with BUNDLE; the answer streams to stdout, timings to stderr.

    \b
    Examples:
      eyecare-edge ask bundles/eyecare-3.8b fundus.jpg -q "Is there diabetic retinopathy?"
      eyecare-edge ask bundles/eyecare-3.8b oct.png --report --llm q8_0 --json
    Exit codes: 0 answered; 1 bundle, image or model error; 2 bad usage.
    """
    if (question is None) == (not report):
        raise click.UsageError("give -q QUESTION or --report (one of them)")
    from eyecare_edge.bundle import BundleError
    from eyecare_edge.images import ImageError
    from eyecare_edge.llm import LLMError
    from eyecare_edge.pipeline import Pipeline
    from eyecare_edge.vision import VisionError

    def notice(msg: str) -> None:
        click.echo(msg, err=True)

    try:
        pipe = Pipeline.load(bundle, pipeline_options(runtime), progress=notice)
    except (BundleError, VisionError, LLMError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if verbose:
        for line in placement(pipe):
            click.echo(line, err=True)
    elif not as_json:
        click.echo(pipe.describe(), err=True)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    kwargs = {"temperature": temperature, "top_p": top_p, "seed": seed, "stream": None if as_json else stream}
    try:
        with pipe:
            if report:
                answer = pipe.report(list(images), max_tokens=max_tokens or 512, **kwargs)
            else:
                answer = pipe.ask(list(images), question, max_tokens=max_tokens or 256, **kwargs)
    except (ImageError, VisionError, LLMError, BundleError, ValueError) as e:
        if not as_json:
            sys.stdout.write("\n")
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    if as_json:
        out = {
            "answer": answer.text,
            "images": [str(p) for p in images],
            "question": pipe.manifest.prompt.report_prompt if report else question,
            **{k: v for k, v in answer.to_dict().items() if k != "text"},
            "tokens_per_s": round(answer.tokens_per_s, 2),
            "vision": f"{pipe.vision.encoder.name} {pipe.vision.encoder.precision}",
            "vision_device": pipe.vision.where,
            "llm_device": pipe.lm.describe_device(),
            "llm": pipe.llm_entry.precision,
            "bundle_digest": pipe.digest,
        }
        click.echo(json.dumps(out, ensure_ascii=False))
        return
    sys.stdout.write("\n")
    sys.stdout.flush()
    t = answer.timings
    click.echo(
        f"[{answer.n_image_tokens} image + {answer.n_prompt_tokens - answer.n_image_tokens} text tokens, "
        f"{answer.n_generated} generated ({answer.stop_reason}); "
        f"decode {t['decode_ms']:.0f} ms, preprocess {t['preprocess_ms']:.0f} ms, vision {t['vision_ms']:.0f} ms, "
        f"prefill {t['prefill_ms']:.0f} ms, generate {t['generate_ms']:.0f} ms "
        f"({answer.tokens_per_s:.1f} tok/s); first token {t['first_token_ms']:.0f} ms, total {t['total_ms']:.0f} ms]",
        err=True,
    )


def placement(pipe) -> list[str]:
    """`ask --verbose`: where each half runs, and every vision backend skipped with its full reason."""
    choice = pipe.vision
    lines = [f"vision: {choice.encoder.name} {choice.encoder.precision} on {choice.where}"]
    lines += [f"  skipped {reason}" for reason in choice.skipped]
    lines.append(f"llm: llama.cpp {pipe.llm_entry.precision} ({pipe.llm_entry.path}) on {pipe.lm.describe_device()}")
    lines.append(f"  n_ctx {pipe.lm.n_ctx}, n_batch {pipe.lm.n_batch}")
    return lines
