"""`eyecare-edge ask`: one question (or a report) about one or more images, streamed (no torch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from eyecare_edge.commands.options import MAX_TOKENS, runtime_options
from eyecare_edge.errors import EyecareError


@click.command("ask")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument(
    "images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path)
)
@click.option("-q", "--question", default=None, help="The question. Images are placed before it.")
@click.option("--report", is_flag=True, help="Ask for an examination report (the bundle's report prompt).")
@MAX_TOKENS.option(help="Most tokens to generate [256; report 512].")
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
    from eyecare_edge.commands.options import pipeline_options
    from eyecare_edge.pipeline import Pipeline

    def notice(msg: str) -> None:
        click.echo(msg, err=True)

    pipe = Pipeline.load(bundle, pipeline_options(runtime), progress=notice)  # EyecareError: exit 1
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
    except (EyecareError, ValueError) as e:
        if not as_json:
            sys.stdout.write("\n")  # end the streamed part before the error line
        if isinstance(e, EyecareError):
            raise
        raise EyecareError(str(e)) from e
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
    lines.append(
        f"  n_ctx {pipe.lm.n_ctx}, n_batch {pipe.lm.n_batch}, n_ubatch {pipe.lm.n_ubatch}, "
        f"KV {pipe.lm.options.kv_type}"
    )
    return lines
