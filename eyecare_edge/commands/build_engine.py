"""`eyecare-edge build-engine`: build the vision TensorRT engine of a bundle on this GPU.

Engines are never shipped: the bundle carries the FP16 and Q/DQ INT8 ONNX, and this command
builds a strongly typed engine from the one matching `--precision` on the GPU it runs on,
records it (with TensorRT version and compute capability) and the timing cache in the manifest,
and checks its output against the FP32 ONNX. No torch is imported.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from eyecare_edge.formats import export_formats

# The vision formats TensorRT builds engines from (the rows with an engine check).
ENGINE_FORMATS = [f.name for f in export_formats() if f.engine_check is not None]


@click.command("build-engine")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--precision",
    type=click.Choice(ENGINE_FORMATS),
    default=ENGINE_FORMATS[0],
    show_default=True,
    help="fp16: from vision_fp16.onnx; int8: from the S8S8 Q/DQ vision_int8.onnx.",
)
@click.option(
    "--max-tiles",
    type=click.IntRange(min=1),
    default=None,
    help="Most tiles per call (profile max). Default: the most one image can give under the bundle's preprocessing.",
)
@click.option(
    "--opt-tiles",
    type=click.IntRange(min=1),
    default=None,
    help="Tile count the engine is tuned for. Default: a 3:2 fundus photo's tile count.",
)
@click.option(
    "--workspace", type=float, default=4.0, show_default=True, help="Builder workspace limit in GB."
)
@click.option("--device", type=int, default=0, show_default=True, help="CUDA device ordinal.")
@click.option("--force", is_flag=True, help="Rebuild even if a matching engine is recorded.")
@click.option("--no-validate", is_flag=True, help="Skip the engine-vs-ONNX-FP32 check.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def build_engine(
    bundle: Path,
    precision: str,
    max_tiles: int | None,
    opt_tiles: int | None,
    workspace: float,
    device: int,
    force: bool,
    no_validate: bool,
    as_json: bool,
) -> None:
    """Build (or reuse) the TensorRT engine of BUNDLE for this GPU and TensorRT version.

    \b
    Examples:
      eyecare-edge build-engine bundles/eyecare-3.8b
      eyecare-edge build-engine bundles/eyecare-3.8b --precision int8 --max-tiles 10 --workspace 8
    """
    from eyecare_edge.bundle import read_manifest, require_valid
    from eyecare_edge.vision.engines import ensure_engine
    from eyecare_edge.vision.tensorrt import TensorRTError, tensorrt_available

    ok, detail = tensorrt_available()
    if not ok:
        raise TensorRTError(detail)
    manifest = read_manifest(bundle)  # BundleError and TensorRTError: exit 1
    res = ensure_engine(
        bundle,
        manifest,
        precision,
        device=device,
        force=force,
        max_tiles=max_tiles,
        opt_tiles=opt_tiles,
        workspace_gb=workspace,
        validate=not no_validate,
        check=lambda entries: require_valid(bundle, entries),
        progress=None if as_json else click.echo,
    )
    result = {
        "status": res.status,
        "engine": res.entry.path,
        "trt_version": res.trt_version,
        "compute_capability": res.gpu.compute_capability,
        "gpu": res.gpu.name,
    }
    if res.info is not None:
        result.update(
            {
                "build_seconds": round(res.info.build_seconds, 1),
                "size": res.info.size,
                "validation": res.validation,
            }
        )
    _report(as_json, result)


def _report(as_json: bool, result: dict) -> None:
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if result["status"] == "up-to-date":
        click.echo(
            f"engine {result['engine']} is up to date (TensorRT {result['trt_version']}, "
            f"sm {result['compute_capability']}); --force rebuilds it"
        )
        return
    click.echo(
        f"built {result['engine']} in {result['build_seconds']} s on {result['gpu']} ({result['size'] / 1e6:.1f} MB)"
    )
    v = result.get("validation")
    if v and "cosine_min" in v:
        click.echo(
            f"vs ONNX FP32: cosine min {v['cosine_min']:.5f} mean {v['cosine_mean']:.5f}, "
            f"max abs {v['max_abs']:.3g}; {v['gpu_ms_per_tile']:.2f} ms/tile"
        )
