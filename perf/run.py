"""The orchestration behind `eyecare-edge perf`: what is measured, in which order, in which process.

    probe the machine (numpy, this process)
    build or reuse the cut-depth checkpoint + bundle              (children: torch)
    vision backends, one child each                               (ORT, OpenVINO, TensorRT)
    eyecare-edge default end to end (Pipeline), saving its visual rows
    llama.cpp weight types on those rows, one child each
    transformers FP32 and BF16 end to end, one child each         (children: torch)
    token budgets N = 1, 2, 4, 9 and `fast` end to end (TTFT)
    optional: closed-QA accuracy per budget, llama.cpp settings sweep

Every measurement runs in its own child, so each peak RSS is that system's alone, and this
process never imports torch. A system that fails is recorded with its error and the run goes
on; `report.build_report` turns the raw results into figures, ratios and targets.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from eyecare_edge.perf.build import GPU_VISION, BuildSpec, Built, ensure_built
from eyecare_edge.perf.inputs import default_image, gguf_bytes, gpu_status, one_tile_image
from eyecare_edge.perf.machine import load_average, probe_machine, reprobe
from eyecare_edge.perf.options import PerfOptions, RunState
from eyecare_edge.perf.runner import Runner
from eyecare_edge.perf.stages import (
    measure_accuracy,
    measure_budgets,
    measure_llm_variants,
    measure_sweep,
    measure_vision_backends,
)
from eyecare_edge.perf.token_runs import measure_token_budgets

from eyecare_edge import costs

# Settings this benchmark proposes for the runtime's defaults (measured with `--proposed`, shown
# next to "eyecare-edge default"): PipelineOptions overrides, tiles per vision call, environment.
PROPOSED: dict = {
    "options": {"repack": False},
    "vision_chunk": 1,
    "env": {"OMP_WAIT_POLICY": "PASSIVE"},
}


def resolve_build(opts: PerfOptions, runner: Runner, gpu: bool) -> tuple[Path, Path, dict]:
    """(checkpoint, bundle, build info) for --preset (built/cached) or --bundle (as given)."""
    if opts.bundle is not None:
        from eyecare_edge.bundle import read_manifest

        manifest = read_manifest(opts.bundle)
        ckpt = opts.checkpoint or (
            Path(manifest.source["checkpoint"]) if manifest.source.get("checkpoint") else None
        )
        if ckpt is None or not (Path(ckpt) / "config.json").is_file():
            raise FileNotFoundError(
                f"{opts.bundle}: its source checkpoint ({ckpt}) is not here; pass --checkpoint C "
                "(needed for the model's shapes and the PyTorch references)"
            )
        return Path(ckpt), Path(opts.bundle), {"bundle": str(opts.bundle), "checkpoint": str(ckpt)}
    spec = BuildSpec(
        preset=opts.preset,
        llm_layers=opts.llm_layers,
        vision_layers=opts.vision_layers,
        seed=opts.seed,
        vision=tuple(dict.fromkeys(opts.build_vision + (GPU_VISION if gpu else ()))),
        llm=opts.build_llm,
        calibration_images=opts.calibration_images,
    )
    built: Built = ensure_built(spec, Path(opts.workdir), runner.raw_child, runner.progress)
    return built.checkpoint, built.bundle, built.to_dict()


def run_perf(opts: PerfOptions, progress: Callable[[str], None] = lambda m: None) -> dict:
    """Measure everything `opts` asks for and return the report (see `report.build_report`)."""
    from eyecare_edge.perf.report import build_report

    from eyecare_edge.bundle import read_manifest
    from eyecare_edge.images import load_image
    from eyecare_edge.llm import physical_cores

    t_run = time.perf_counter()
    workdir = Path(opts.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    threads = opts.threads or physical_cores()
    state = RunState(options={k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()})
    runner = Runner(opts, state, progress)

    t = time.perf_counter()
    progress("probing the machine (memory bandwidth, numpy FP32 matmul)")
    machine = probe_machine(threads, quick=opts.quick_probe)
    state.stages["machine"] = round(time.perf_counter() - t, 1)
    gpu, gpu_why = gpu_status()
    state.gpu = {"present": gpu, "reason": gpu_why}

    t = time.perf_counter()
    ckpt, bundle, build_info = resolve_build(opts, runner, gpu)
    state.build = build_info
    runner.stage("build", t)
    manifest = read_manifest(bundle)
    cfg = json.loads((ckpt / "config.json").read_text())
    llm_shape, vision_shape = costs.shapes_from_config(cfg)
    preset = cfg.get("preset") or manifest.model.get("preset")
    full_llm, full_vision = costs.full_depth(preset, llm_shape.layers, vision_shape.layers)
    state.shapes = {
        "llm": costs.shape_dict(llm_shape),
        "vision": costs.shape_dict(vision_shape),
        "full_llm_layers": full_llm,
        "full_vision_layers": full_vision,
        "gguf_bytes": gguf_bytes(bundle, manifest, llm_shape),
    }

    image, image_source = (
        (Path(opts.image), "user") if opts.image else default_image(workdir, runner.raw_child, opts.seed)
    )
    h, w = load_image(image).rgb.shape[:2]
    preprocess = manifest.preprocess_config()
    state.config = {
        "preset": preset,
        "llm_layers": llm_shape.layers,
        "vision_layers": vision_shape.layers,
        "full_llm_layers": full_llm,
        "full_vision_layers": full_vision,
        "image": {"path": str(image), "source": image_source, "width": w, "height": h},
        "threads": threads,
        "n_decode": opts.n_decode,
        "time_box_s": opts.time_box_s,
        "question": opts.question,
        "bundle": str(bundle),
        "checkpoint": str(ckpt),
        "workdir": str(workdir),
        "preprocess": {"max_tiles": preprocess.max_tiles, "anyres_max": preprocess.anyres_max},
        "tile_size": preprocess.tile_size,
    }
    visual_npy = workdir / "visual_rows.npy"
    box = opts.time_box_s if opts.time_box_s > 0 else 1e9

    # vision backends
    t = time.perf_counter()
    if opts.vision_backends:
        state.vision = measure_vision_backends(runner, bundle, manifest, threads, box, gpu, gpu_why)
    runner.stage("vision", t)

    # eyecare-edge default, end to end (also the source of the visual rows)
    t = time.perf_counter()
    pipeline_args = {
        "bundle": str(bundle),
        "image": str(image),
        "question": opts.question,
        "n_decode": opts.n_decode,
        "options": {"n_threads": opts.threads, "vision_threads": opts.threads},
        "time_box_s": box,
    }
    state.pipeline = runner.child(
        "eyecare-edge default",
        "eyecare_edge.perf.runtime:measure_pipeline",
        {**pipeline_args, "save_visual": str(visual_npy)},
    )
    runner.stage("pipeline", t)
    if opts.proposed:
        t = time.perf_counter()
        state.proposed = runner.child(
            "eyecare-edge proposed",
            "eyecare_edge.perf.runtime:measure_pipeline",
            {
                **pipeline_args,
                "options": {**pipeline_args["options"], **PROPOSED["options"]},
                "vision_chunk": PROPOSED["vision_chunk"],
            },
            env=PROPOSED["env"],
        )
        state.proposed["proposed"] = PROPOSED
        runner.stage("proposed", t)

    # llama.cpp weight types
    t = time.perf_counter()
    state.llm = measure_llm_variants(runner, opts, bundle, manifest, visual_npy, llm_shape, box)
    runner.stage("llm", t)

    # references
    t = time.perf_counter()
    for dtype in opts.references:
        row = runner.child(
            f"transformers {dtype.upper()}",
            "eyecare_edge.training.reference:measure_reference",
            {
                "ckpt": str(ckpt),
                "dtype": dtype,
                "image": str(image),
                "question": opts.question,
                "n_decode": opts.n_decode,
                "threads": threads,
                "time_box_s": box,
            },
        )
        state.references.append(row)
        if "matmul_gflops" in row:
            machine.matmul_gflops[dtype] = row["matmul_gflops"]
    runner.stage("references", t)

    # GPU: one 384^2 tile end to end, everything offloaded
    if gpu:
        t = time.perf_counter()
        state.gpu_one_tile = runner.child(
            "GPU one tile",
            "eyecare_edge.perf.runtime:measure_pipeline",
            {
                "bundle": str(bundle),
                "image": str(one_tile_image(image, workdir, preprocess.tile_size)),
                "question": opts.question,
                "n_decode": 1,
                "options": {"n_gpu_layers": -1},
                "time_box_s": box,
            },
        )
        runner.stage("gpu_one_tile", t)

    # token budgets
    t = time.perf_counter()
    state.budgets = measure_budgets(runner, opts, bundle, image, preprocess, state.pipeline, box)
    runner.stage("budgets", t)

    # accuracy per budget (optional)
    t = time.perf_counter()
    state.accuracy = measure_accuracy(runner, opts, threads)
    runner.stage("accuracy", t)

    # visual-token budgets x methods: speed here, accuracy on the trained bundle, KV types
    if opts.visual_tokens:
        t = time.perf_counter()
        measure_token_budgets(runner, opts, bundle, image, manifest, box)
        runner.stage("token_budgets", t)

    # llama.cpp settings sweep (optional)
    if opts.sweep:
        t = time.perf_counter()
        state.sweep = measure_sweep(runner, opts, bundle, manifest, visual_npy, llm_shape, box)
        runner.stage("sweep", t)

    progress("probing the machine again (the bounds keep the best of both probes)")
    reprobe(machine, threads, quick=opts.quick_probe)
    machine.load_average_end = load_average()
    state.machine = machine.to_dict()
    state.stages["total"] = round(time.perf_counter() - t_run, 1)
    return build_report(state.to_dict())


def write_json(report: dict, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    return out
