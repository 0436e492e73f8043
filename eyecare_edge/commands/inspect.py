"""`eyecare-edge inspect`: what an image is and what it will cost the model (no torch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from eyecare_edge.commands.common import resolve_preprocess


@click.command("inspect")
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--preset", default=None, help="Preset whose preprocessing to plan with (default eyecare-3.8b)."
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
@click.option("--max-tiles", type=int, default=None, help="Token budget: at most N patch tiles.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list, one object per image (frame).")
def inspect_images(images, preset, checkpoint, bundle, max_tiles, as_json) -> None:
    """Decode info and the anyres plan (grid, tiles, visual tokens) of each image.

    \b
    Example:
      eyecare-edge inspect fundus.jpg scan.dcm --preset eyecare-3.8b --json
    Exit code 3 when any image failed to decode.
    """
    from eyecare_edge.images import ImageError, load_images
    from eyecare_edge.preprocess import plan_image

    config = resolve_preprocess(preset=preset, checkpoint=checkpoint, bundle=bundle, max_tiles=max_tiles)
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
                f"{r['visual_tokens']} visual tokens"
            )
    if any("error" in r for r in rows):
        sys.exit(3)
