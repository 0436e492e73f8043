"""`eyecare-edge build-engine`: build the vision TensorRT engine of a bundle on this GPU.

Engines are never shipped: the bundle carries the FP16 and Q/DQ INT8 ONNX, and this command
builds a strongly typed engine from the one matching `--precision` on the GPU it runs on,
records it (with TensorRT version and compute capability) and the timing cache in the manifest,
and checks its output against the FP32 ONNX. No torch is imported.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click


@click.command("build-engine")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--precision",
    type=click.Choice(["fp16", "int8"]),
    default="fp16",
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
    from eyecare_edge.export import tensorrt_engine as te

    ok, detail = te.tensorrt_available()
    if not ok:
        click.echo(f"error: {detail}", err=True)
        sys.exit(1)

    from eyecare_edge.bundle import BundleError, add_file, read_manifest, require_valid, write_manifest

    try:
        manifest = read_manifest(bundle)
    except BundleError as e:
        raise click.ClickException(str(e)) from e
    onnx_entry = manifest.find("vision", format="onnx", precision=precision)
    if onnx_entry is None:
        click.echo(
            f"error: {bundle}: no {precision} vision ONNX in the manifest "
            f"(expected {te.ONNX_FOR_PRECISION[precision]}; re-export with that precision)",
            err=True,
        )
        sys.exit(1)
    onnx_path = bundle / onnx_entry.path
    data_rel = onnx_entry.path + ".data"
    check = [onnx_entry.path] + ([data_rel] if any(f.path == data_rel for f in manifest.files) else [])
    try:
        require_valid(bundle, manifest, only=check)
    except BundleError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)

    try:
        gpu = te.gpu_info(device)
    except te.CudaError as e:
        click.echo(f"error: no usable NVIDIA GPU: {e}", err=True)
        sys.exit(1)
    version = te.trt_version()
    preprocess = manifest.preprocess_config()
    default_opt, default_max = te.default_tile_counts(preprocess)
    max_tiles = max_tiles or default_max
    opt_tiles = min(opt_tiles or default_opt, max_tiles)
    digest = te.onnx_digest(onnx_path)

    existing = te.find_engine(
        manifest,
        precision,
        trt_version=version,
        compute_capability=gpu.compute_capability,
        onnx_sha256=digest,
        max_tiles=max_tiles,
    )
    # A recorded engine for this GPU, TensorRT and ONNX is reused unless its file changed.
    if existing is not None and not force:
        try:
            require_valid(bundle, manifest, only=[existing.path])
        except BundleError:
            existing = None
        if existing is not None:
            _report(
                as_json,
                {
                    "status": "up-to-date",
                    "engine": existing.path,
                    "trt_version": version,
                    "compute_capability": gpu.compute_capability,
                },
            )
            return

    engine_rel = te.engine_file_name(
        precision, compute_capability=gpu.compute_capability, trt_version=version
    )
    cache_rel = te.timing_cache_file_name(compute_capability=gpu.compute_capability, trt_version=version)
    if not as_json:
        click.echo(
            f"building {precision} engine from {onnx_entry.path} on {gpu.name} (sm {gpu.compute_capability}), "
            f"TensorRT {version}, tiles 1/{opt_tiles}/{max_tiles} ..."
        )
    try:
        info = te.build_engine(
            onnx_path,
            bundle / engine_rel,
            max_tiles=max_tiles,
            opt_tiles=opt_tiles,
            workspace_gb=workspace,
            timing_cache_path=bundle / cache_rel,
            precision=precision,
            device=device,
        )
    except te.EngineBuildError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)

    validation = None
    if not no_validate:
        validation = _validate(te, bundle, manifest, info, precision, opt_tiles)
        manifest.validation[f"engine_{precision}"] = validation
        if not validation["passed"]:
            (bundle / engine_rel).unlink(missing_ok=True)
            write_manifest(bundle, manifest)
            click.echo(
                f"error: engine_{precision}: {'; '.join(validation['failed'])} (vs ONNX FP32); engine discarded",
                err=True,
            )
            sys.exit(1)

    add_file(
        bundle,
        manifest,
        engine_rel,
        role="vision",
        precision=precision,
        trt_version=info.trt_version,
        compute_capability=info.compute_capability,
        extra=info.manifest_extra(onnx_entry.path),
    )
    add_file(
        bundle,
        manifest,
        cache_rel,
        role="extra",
        precision="-",
        trt_version=info.trt_version,
        compute_capability=info.compute_capability,
        extra={"kind": "tensorrt timing cache"},
    )
    write_manifest(bundle, manifest)
    _report(
        as_json,
        {
            "status": "built",
            "engine": engine_rel,
            "timing_cache": cache_rel,
            "trt_version": info.trt_version,
            "compute_capability": info.compute_capability,
            "gpu": info.gpu_name,
            "build_seconds": round(info.build_seconds, 1),
            "size": info.size,
            "validation": validation,
        },
    )


def _validate(te, bundle: Path, manifest, info, precision: str, opt_tiles: int) -> dict:
    """Engine vs ONNX FP32 (ONNX Runtime CPU) on deterministic smooth tiles, plus GPU latency."""
    import numpy as np

    from eyecare_edge.export.vision_validate import compare_embeddings

    ref_entry = manifest.find("vision", format="onnx", precision="fp32")
    tile_size = info.profile["max"][-1]
    tiles = te.check_tiles(tile_size, min(2, opt_tiles))
    figures: dict = {"trt_version": info.trt_version, "compute_capability": info.compute_capability}
    with te.EngineRunner(info.path) as run:
        out = run(tiles)
        batch = te.check_tiles(tile_size, opt_tiles, seed=1)
        run(batch)
        t0 = time.perf_counter()
        for _ in range(5):
            run(batch)
        figures["gpu_ms_per_tile"] = (time.perf_counter() - t0) / (5 * opt_tiles) * 1000
    if ref_entry is None:
        figures.update({"passed": True, "failed": [], "note": "no FP32 ONNX in the bundle to compare with"})
        return figures
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / ref_entry.path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: tiles})[0]
    figures.update(compare_embeddings(np.asarray(ref), out))
    limit = {"fp16": ("cosine_min", 0.999), "int8": ("cosine_mean", 0.99)}[precision]
    ok = figures[limit[0]] >= limit[1]
    figures["check"] = f"{limit[0]} >= {limit[1]}"
    figures["passed"] = bool(ok)
    figures["failed"] = [] if ok else [f"{limit[0]} {figures[limit[0]]:.6g} < {limit[1]}"]
    return figures


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
        f"built {result['engine']} in {result['build_seconds']} s on {result['gpu']} "
        f"({result['size'] / 1e6:.1f} MB); timing cache {result['timing_cache']}"
    )
    v = result.get("validation")
    if v and "cosine_min" in v:
        click.echo(
            f"vs ONNX FP32: cosine min {v['cosine_min']:.5f} mean {v['cosine_mean']:.5f}, "
            f"max abs {v['max_abs']:.3g}; {v['gpu_ms_per_tile']:.2f} ms/tile"
        )
