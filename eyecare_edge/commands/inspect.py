"""`eyecare-edge inspect`: what an image is and what it will cost the model (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from eyecare_edge.commands.common import resolve_preprocess
from eyecare_edge.commands.options import PIPELINE_FLAGS, options
from eyecare_edge.errors import ItemsFailed
from eyecare_edge.presets import DEFAULT_PRESET, preset_names
from eyecare_edge.reduce import NAMED_BUDGETS


@click.command("inspect")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--preset",
    default=None,
    help=f"Preset whose preprocessing to plan with: {', '.join(preset_names())} (default {DEFAULT_PRESET}).",
)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Use a checkpoint's preprocessing.",
)
@click.option(
    "--bundle",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Use a bundle's preprocessing.",
)
@options(
    PIPELINE_FLAGS["max_tiles"].option(),
    PIPELINE_FLAGS["visual_tokens"].option(
        help="Visual tokens per image the LLM reads: a count, a fraction (0.25 or 25%), or 'all' "
        "[a bundle's budget, else all]."
    ),
    PIPELINE_FLAGS["token_reduction"].option(),
)
@click.option(
    "--budget",
    type=click.Choice(list(NAMED_BUDGETS)),
    default=None,
    help="A named budget of `export --budget` (tiles + kept tokens).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per image (frame).")
def inspect_images(
    images, preset, checkpoint, bundle, max_tiles, visual_tokens, token_reduction, budget, as_json
) -> None:
    """Decode info, the anyres plan (grid, tiles, visual tokens), the tokens kept under the
    token budget and an estimated LLM prefill time on this machine, for each image.

    \b
    Example:
      eyecare-edge inspect fundus.jpg scan.dcm --preset eyecare-3.8b --json
    Exit code 3 when any image failed to decode.
    """
    from eyecare_edge.images import ImageError, load_images
    from eyecare_edge.preprocess import plan_image
    from eyecare_edge.reduce import kept_tokens

    config = resolve_preprocess(preset=preset, checkpoint=checkpoint, bundle=bundle, max_tiles=max_tiles)
    named = NAMED_BUDGETS[budget] if budget else {}
    if named.get("max_tiles") is not None and max_tiles is None:
        config = config.replace(max_tiles=named["max_tiles"])
    reduction, shape = resolve_reduction(
        preset,
        checkpoint,
        bundle,
        visual_tokens or named.get("visual_tokens"),
        token_reduction or named.get("method"),
    )
    gflops = None
    if shape is not None:
        from eyecare_edge.prefill_estimate import measure_matmul_gflops

        gflops = measure_matmul_gflops()
    rows: list[dict] = []
    for path in images:
        try:
            decoded = load_images(path)
        except ImageError as e:
            rows.append({"path": str(path), "error": e.reason})
            continue
        for img in decoded:
            plan = plan_image((img.height, img.width), config)
            rows.append(
                {
                    "path": str(path),
                    "frame": img.frame,
                    "format": img.format,
                    "mode": img.source_mode,
                    "bit_depth": img.bit_depth,
                    "width": img.width,
                    "height": img.height,
                    "meta": img.meta,
                    "grid": [plan.grid[1], plan.grid[0]],
                    "canvas": [plan.canvas[1], plan.canvas[0]],
                    "tiles": plan.n_tiles,
                    "visual_tokens": plan.visual_tokens,
                    "kept_tokens": kept_tokens(plan, reduction),
                    "token_reduction": None if reduction.is_full else reduction.method,
                    "estimated_prefill_s": _prefill_s(shape, kept_tokens(plan, reduction), gflops),
                    "feature_map": list(plan.feature_map),
                    "compressed_map": list(plan.compressed_map),
                }
            )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        for r in rows:
            if "error" in r:
                click.echo(f"{r['path']}: ERROR {r['error']}")
                continue
            frame = f" frame {r['frame']}" if r["frame"] is not None else ""
            meta = "".join(f" {k}={v}" for k, v in r["meta"].items())
            click.echo(
                f"{r['path']}{frame}: {r['format']} {r['mode']} {r['width']}x{r['height']}{meta}\n"
                f"  grid {r['grid'][0]}x{r['grid'][1]} (cols x rows), {r['tiles']} tiles incl. global view, "
                f"{r['visual_tokens']} visual tokens, {r['kept_tokens']} kept"
                + (f" ({r['token_reduction']})" if r["token_reduction"] else "")
                + (
                    f"; LLM image prefill ~{r['estimated_prefill_s']:.1f} s on this machine (estimate)"
                    if r["estimated_prefill_s"] is not None
                    else ""
                )
            )
    failed = sum("error" in r for r in rows)
    if failed:
        raise ItemsFailed(failed, len(rows), what="images")


def resolve_reduction(preset, checkpoint, bundle, visual_tokens, method):
    """(TokenBudget, LLM shape for the estimate or None): a bundle's baked budget with the
    options applied; the shape of the bundle's / checkpoint's / preset's LLM."""
    from eyecare_edge.costs import shapes_from_config
    from eyecare_edge.prefill_estimate import llm_shape_for
    from eyecare_edge.reduce import TokenBudget, parse_visual_tokens

    baked: dict = {}
    shape = None
    try:
        if bundle is not None:
            from eyecare_edge.bundle import read_manifest

            m = read_manifest(bundle)
            baked = m.budget
            shape = llm_shape_for(m.model.get("preset"), m.model.get("llm_layers"))
        elif checkpoint is not None:
            shape = shapes_from_config(json.loads((checkpoint / "config.json").read_text()))[0]
        else:
            shape = llm_shape_for(preset or DEFAULT_PRESET)
        base = TokenBudget.from_dict(baked)
        k = base.visual_tokens if visual_tokens is None else parse_visual_tokens(visual_tokens)
        return TokenBudget(k, method or base.method), shape
    except ValueError as e:
        raise click.UsageError(str(e)) from e


def _prefill_s(shape, n_tokens: int, gflops: float | None) -> float | None:
    if shape is None or not gflops:
        return None
    from eyecare_edge.prefill_estimate import prefill_seconds

    return round(prefill_seconds(shape, n_tokens, gflops), 2)
