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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eyecare_edge.perf.build import DEFAULT_LLM, DEFAULT_VISION, GPU_VISION, BuildSpec, Built, ensure_built
from eyecare_edge.perf.machine import load_average, probe_machine, reprobe
from eyecare_edge.perf.rss import ChildError, run_in_child
from eyecare_edge.perf.runtime import DEFAULT_QUESTION
from eyecare_edge.perf.tokens import TOKEN_FRACTIONS, TOKEN_METHODS

from eyecare_edge import costs

DEFAULT_WORKDIR = Path("~/.cache/eyecare-edge/perf").expanduser()
PHANTOM_SIZE = (3504, 2336)  # (width, height) of the HRF fundus photographs
BUDGET_TILES = (1, 2, 4, 9)
# llama.cpp settings tried by --sweep (on the default weight type): label -> (LLMOptions changes,
# environment of the child). OMP_WAIT_POLICY=PASSIVE: llama.cpp's CPU build synchronises its
# threads with OpenMP barriers, which spin while a sibling thread is descheduled.
SWEEP: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    "repack off": ({"repack": False}, {}),
    "flash attention": ({"flash_attn": True}, {}),
    "flash + q8_0 KV": ({"flash_attn": True, "kv_type": "q8_0"}, {}),
    "ubatch 256": ({"n_batch": 256, "n_ubatch": 256}, {}),
    "batch/ubatch 1024": ({"n_batch": 1024, "n_ubatch": 1024}, {}),
    "repack off + flash": ({"repack": False, "flash_attn": True}, {}),
    "1 thread": ({"n_threads": 1}, {}),
    "OMP passive": ({}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "GOMP_SPINCOUNT=10000": ({}, {"GOMP_SPINCOUNT": "10000"}),
    "OMP passive + repack off": ({"repack": False}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "OMP passive + repack off + flash": (
        {"repack": False, "flash_attn": True},
        {"OMP_WAIT_POLICY": "PASSIVE"},
    ),
}

# Settings this benchmark proposes for the runtime's defaults (measured with `--proposed`, shown
# next to "eyecare-edge default"): PipelineOptions overrides, tiles per vision call, environment.
PROPOSED: dict = {
    "options": {"repack": False, "flash_attn": False},
    "vision_chunk": 1,
    "env": {"OMP_WAIT_POLICY": "PASSIVE"},
}


@dataclass
class PerfOptions:
    """What one `eyecare-edge perf` run measures (the command's options, as data)."""

    preset: str = "eyecare-3.8b"
    bundle: Path | None = None
    checkpoint: Path | None = None
    image: Path | None = None
    llm_layers: int | None = 2
    vision_layers: int | None = 2
    workdir: Path = DEFAULT_WORKDIR
    threads: int | None = None
    n_decode: int = 64
    time_box_s: float = 30.0
    references: tuple[str, ...] = ("fp32", "bf16")
    llm_variants: tuple[str, ...] = ("f16", "bf16", "q8_0", "q4_k_m")
    vision_backends: bool = True
    budgets: tuple[int, ...] = BUDGET_TILES
    fast_budget: bool = True
    accuracy_bundle: Path | None = None
    accuracy_ckpt: Path | None = None
    accuracy_data: Path | None = None
    accuracy_limit: int | None = None
    sweep: bool = False
    proposed: bool = False
    question: str = DEFAULT_QUESTION
    seed: int = 0
    child_timeout_s: float = 1800.0
    quick_probe: bool = False
    build_vision: tuple[str, ...] = DEFAULT_VISION
    build_llm: tuple[str, ...] = DEFAULT_LLM
    calibration_images: int = 4
    # visual-token budgets x reduction methods (see perf/tokens.py); () = skip the table
    visual_tokens: tuple[float | int, ...] = TOKEN_FRACTIONS
    token_methods: tuple[str, ...] = TOKEN_METHODS
    kv_variants: bool = True
    token_repeats: int = 2  # asks per budget row, fastest kept (a shared 2-core machine is noisy)


@dataclass
class RunState:
    """Raw results, filled stage by stage; `report.build_report` reads it."""

    options: dict
    config: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    build: dict = field(default_factory=dict)
    vision: list[dict] = field(default_factory=list)
    pipeline: dict = field(default_factory=dict)
    proposed: dict = field(default_factory=dict)
    llm: list[dict] = field(default_factory=list)
    references: list[dict] = field(default_factory=list)
    budgets: list[dict] = field(default_factory=list)
    accuracy: dict = field(default_factory=dict)
    token_budgets: list[dict] = field(default_factory=list)
    token_accuracy: dict = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=list)
    gpu: dict = field(default_factory=dict)
    gpu_one_tile: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------- helpers


def gpu_status() -> tuple[bool, str]:
    """(present, why not): an NVIDIA GPU that ONNX Runtime CUDA or TensorRT could use."""
    if not any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/nvgpu")):
        return False, "no NVIDIA GPU device on this machine"
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return True, ""
    except ImportError:
        pass
    try:
        import tensorrt  # noqa: F401

        return True, ""
    except ImportError:
        return False, "a GPU device exists but neither onnxruntime-gpu nor tensorrt is installed"


def shared_hrf_dirs() -> list[Path]:
    """Where the real HRF fundus photographs live next to a checkout (../shared/data/hrf)."""
    pkg_root = Path(__file__).resolve().parents[2]
    return [Path.cwd().parent / "shared" / "data" / "hrf", pkg_root.parent / "shared" / "data" / "hrf"]


def default_image(workdir: Path, run_child: Callable[[str, dict], object], seed: int = 0) -> tuple[Path, str]:
    """(path, source): an HRF photograph if present, else a cached phantom of the same size."""
    for d in shared_hrf_dirs():
        images = sorted(
            p for p in (d / "images").glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif")
        )
        if images:
            return images[0], "hrf"
    out = Path(workdir) / f"phantom_{PHANTOM_SIZE[0]}x{PHANTOM_SIZE[1]}_s{seed}.png"
    if not out.exists():
        run_child("eyecare_edge.perf.run:phantom_child", {"out": str(out), "seed": seed})
    return out, "phantom"


def phantom_child(out: str, seed: int) -> str:
    """Write a phantom fundus photograph of the HRF size (child process: training room)."""
    import cv2
    from eyecare_edge.training.synthetic import make_phantom_fundus

    rgb = make_phantom_fundus(PHANTOM_SIZE, seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(out, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{out}: could not write the phantom image")
    return out


def one_tile_image(image: Path, workdir: Path, size: int) -> Path:
    """A size x size centre crop of `image` (resized when smaller), for the one-tile GPU figure."""
    import cv2

    from eyecare_edge.images import load_image

    out = Path(workdir) / f"one_tile_{size}.png"
    rgb = load_image(image).rgb
    h, w = rgb.shape[:2]
    side = min(h, w)
    crop = rgb[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(out), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    return out


def budget_list(tiles: tuple[int, ...], fast: bool) -> list[dict]:
    """Budgets to time: N patch tiles at most (the bundle's compression), plus the named `fast`."""
    from eyecare_edge.preprocess import BUDGETS

    rows = [{"name": f"N={n}", "max_tiles": n, "anyres_max": None} for n in tiles]
    if fast:
        b = BUDGETS["fast"]
        rows.append({"name": "fast", "max_tiles": b.get("max_tiles"), "anyres_max": b.get("anyres_max")})
    return rows


def same_budget(budget: dict, preprocess) -> bool:
    """Whether a budget leaves the bundle's preprocessing as it is (then the default run is it)."""
    if budget.get("anyres_max") not in (None, preprocess.anyres_max):
        return False
    mt = budget.get("max_tiles")
    return mt is None or set(preprocess.replace(max_tiles=mt).allowed_pinpoints()) == set(
        preprocess.allowed_pinpoints()
    )


def gguf_bytes(bundle: Path, manifest, llm_shape: costs.LLMShape) -> dict[str, dict]:
    """Per-layer and fixed weight bytes of every GGUF in the bundle (tensor tables; without the
    `gguf` package, each file's size is split in proportion to the parameter counts)."""
    out = {}
    for entry in manifest.files:
        if entry.role != "llm" or entry.format != "gguf":
            continue
        path = Path(bundle) / entry.path
        try:
            wb = costs.gguf_weight_bytes(path, llm_shape.layers, llm_shape.hidden)
        except ImportError:
            share = entry.size / llm_shape.params
            head = llm_shape.embed_params if llm_shape.tied_embeddings else llm_shape.head_params
            wb = costs.WeightBytes(
                per_layer=llm_shape.layer_params * share,
                fixed_per_token=head * share,
                resident_fixed=(llm_shape.params - llm_shape.layers * llm_shape.layer_params) * share,
            )
        out[entry.precision] = asdict(wb)
    return out


class Runner:
    """Runs children, records failures, tells progress."""

    def __init__(self, opts: PerfOptions, state: RunState, progress: Callable[[str], None]) -> None:
        self.opts, self.state, self.progress = opts, state, progress
        self.t0 = time.perf_counter()
        self.logs = Path(opts.workdir) / "logs"

    def child(self, name: str, target: str, kwargs: dict, env: dict | None = None) -> dict:
        """Run one measurement; returns its value plus peak RSS, or {"error": ...}."""
        self.progress(f"[{time.perf_counter() - self.t0:6.0f} s] {name}")
        log = self.logs / (name.replace(" ", "_").replace("/", "-") + ".log")
        log.unlink(missing_ok=True)
        try:
            res = run_in_child(target, kwargs, timeout_s=self.opts.child_timeout_s, log_path=log, env=env)
        except ChildError as e:
            self.progress(f"  failed: {str(e).splitlines()[0]}")
            return {"system": name, "error": str(e)}
        value = res.value if isinstance(res.value, dict) else {"value": res.value}
        return {
            "system": name,
            **value,
            "peak_rss_bytes": res.peak_rss_bytes,
            "baseline_rss_bytes": res.baseline_rss_bytes,
            "child_wall_s": res.wall_s,
        }

    def raw_child(self, target: str, kwargs: dict) -> object:
        """A child whose failure stops the run (building)."""
        log = self.logs / (target.rsplit(":", 1)[-1] + ".log")
        return run_in_child(target, kwargs, timeout_s=self.opts.child_timeout_s, log_path=log).value

    def stage(self, name: str, t: float) -> None:
        self.state.stages[name] = round(time.perf_counter() - t, 1)


# ------------------------------------------------------------------------- the run


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
        state.vision = _vision_backends(runner, bundle, manifest, threads, box, gpu, gpu_why)
    runner.stage("vision", t)

    # eyecare-edge default, end to end (also the source of the visual rows)
    t = time.perf_counter()
    state.pipeline = runner.child(
        "eyecare-edge default",
        "eyecare_edge.perf.runtime:measure_pipeline",
        {
            "bundle": str(bundle),
            "image": str(image),
            "question": opts.question,
            "n_decode": opts.n_decode,
            "options": {"n_threads": opts.threads, "vision_threads": opts.threads},
            "save_visual": str(visual_npy),
            "time_box_s": box,
        },
    )
    runner.stage("pipeline", t)
    if opts.proposed:
        t = time.perf_counter()
        state.proposed = runner.child(
            "eyecare-edge proposed",
            "eyecare_edge.perf.runtime:measure_pipeline",
            {
                "bundle": str(bundle),
                "image": str(image),
                "question": opts.question,
                "n_decode": opts.n_decode,
                "options": {"n_threads": opts.threads, "vision_threads": opts.threads, **PROPOSED["options"]},
                "time_box_s": box,
                "vision_chunk": PROPOSED["vision_chunk"],
            },
            env=PROPOSED["env"],
        )
        state.proposed["proposed"] = PROPOSED
        runner.stage("proposed", t)

    # llama.cpp weight types
    t = time.perf_counter()
    state.llm = _llm_variants(runner, opts, bundle, manifest, visual_npy, llm_shape, box)
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
    state.budgets = _budgets(runner, opts, bundle, image, preprocess, state.pipeline, box)
    runner.stage("budgets", t)

    # accuracy per budget (optional)
    t = time.perf_counter()
    state.accuracy = _accuracy(runner, opts, threads)
    runner.stage("accuracy", t)

    # visual-token budgets x methods: speed here, accuracy on the trained bundle, KV types
    if opts.visual_tokens:
        t = time.perf_counter()
        _token_budgets(runner, opts, bundle, image, manifest, box)
        runner.stage("token_budgets", t)

    # llama.cpp settings sweep (optional)
    if opts.sweep:
        t = time.perf_counter()
        state.sweep = _sweep(runner, opts, bundle, manifest, visual_npy, llm_shape, box)
        runner.stage("sweep", t)

    progress("probing the machine again (the bounds keep the best of both probes)")
    reprobe(machine, threads, quick=opts.quick_probe)
    machine.load_average_end = load_average()
    state.machine = machine.to_dict()
    state.stages["total"] = round(time.perf_counter() - t_run, 1)
    return build_report(state.to_dict())


def _vision_backends(
    runner: Runner, bundle: Path, manifest, threads: int, box: float, gpu: bool, gpu_why: str
) -> list[dict]:
    from eyecare_edge.perf.runtime import openvino_capabilities

    have = set(manifest.precisions("vision", "onnx"))
    rows: list[dict] = []
    plan: list[tuple[str, str, str, str | None]] = []
    for p in ("fp32", "int8", "int8_u8s8"):
        if p in have:
            plan.append((f"ONNX Runtime CPU {p.upper()}", "ort-cpu", p, None))
    caps = openvino_capabilities()
    if not caps:
        rows.append(
            {
                "system": "OpenVINO",
                "skipped": "openvino is not installed (pip install 'eyecare-edge[openvino]')",
            }
        )
    else:
        if "fp32" in have:
            plan.append(("OpenVINO FP32", "openvino", "fp32", "f32"))
            if "BF16" in caps:
                plan.append(("OpenVINO BF16", "openvino", "fp32", "bf16"))
            else:
                rows.append(
                    {
                        "system": "OpenVINO BF16",
                        "skipped": f"this CPU has no BF16 in OpenVINO (capabilities {caps})",
                    }
                )
        for p in ("int8", "int8_u8s8"):
            if p in have:
                plan.append((f"OpenVINO {p.upper()}", "openvino", p, None))
    if gpu:
        for backend, p in (("tensorrt", "fp16"), ("tensorrt", "int8"), ("ort-cuda", "fp16")):
            if p in have:
                plan.append(
                    (
                        f"{'TensorRT' if backend == 'tensorrt' else 'ONNX Runtime CUDA'} {p.upper()}",
                        backend,
                        p,
                        None,
                    )
                )
    else:
        rows.append({"system": "GPU vision (TensorRT / ONNX Runtime CUDA)", "skipped": gpu_why})
    for name, backend, precision, hint in plan:
        row = runner.child(
            name,
            "eyecare_edge.perf.runtime:measure_vision",
            {
                "bundle": str(bundle),
                "backend": backend,
                "precision": precision,
                "threads": threads,
                "time_box_s": box,
                "ov_hint": hint,
            },
        )
        row["kind"] = "gpu" if backend in ("tensorrt", "ort-cuda") else "cpu"
        rows.append(row)
    return rows


def _max_prompt(llm_shape, pipeline: dict, box: float) -> int | None:
    """Prompt positions a llama.cpp variant may prefill within the box, predicted from the
    default run's prefill rate (None: all of them)."""
    from eyecare_edge.costs import largest_prefix

    n = pipeline.get("n_prompt")
    ms = pipeline.get("timings", {}).get("prefill_ms")
    if not n or not ms:
        return None
    flops_per_s = llm_shape.prefill_flops(n) / (ms / 1000.0)
    p = largest_prefix(llm_shape, n, flops_per_s, box)
    return None if p >= n else p


def _llm_variants(runner, opts, bundle, manifest, visual_npy, llm_shape, box) -> list[dict]:
    have = manifest.precisions("llm", "gguf")
    default = runner.state.pipeline
    rows = []
    for q in opts.llm_variants:
        name = f"llama.cpp {q.upper()}"
        if q not in have:
            rows.append({"system": name, "precision": q, "skipped": f"the bundle has no {q} GGUF"})
            continue
        if default.get("llm_precision") == q and "error" not in default:
            t = default["timings"]
            rows.append(
                {
                    "system": name,
                    "precision": q,
                    "from": "eyecare-edge default",
                    "n_prompt": default["n_prompt"],
                    "prefill_tokens_measured": default["n_prompt"],
                    "prefill_ms": t["prefill_ms"],
                    "prefill_tok_s": default["n_prompt"] / (t["prefill_ms"] / 1000.0),
                    "decode_tok_s": default.get("decode_tok_s"),
                    "decode_tokens_measured": default.get("decode_tokens_measured"),
                    "file_bytes": default["loaded_files"].get(f"llm_{q}.gguf")
                    or next((f.size for f in manifest.files if f.role == "llm" and f.precision == q), None),
                    "peak_rss_bytes": default.get("peak_rss_bytes"),
                    "options": {
                        k: default["options"].get(k) for k in ("n_batch", "repack", "flash_attn", "kv_type")
                    },
                }
            )
            continue
        if not visual_npy.exists():
            rows.append(
                {"system": name, "precision": q, "skipped": "no visual rows (the default run failed)"}
            )
            continue
        rows.append(
            runner.child(
                name,
                "eyecare_edge.perf.runtime:measure_llm",
                {
                    "bundle": str(bundle),
                    "precision": q,
                    "visual_npy": str(visual_npy),
                    "shape": asdict(llm_shape),
                    "question": opts.question,
                    "n_decode": opts.n_decode,
                    "options": _llm_options(opts, default),
                    "max_prompt": _max_prompt(llm_shape, default, box),
                    "time_box_s": box,
                },
            )
        )
    return rows


def _llm_options(opts: PerfOptions, default: dict, **changes) -> dict:
    """The default pipeline's llama.cpp settings (same n_ctx, batch, threads), plus changes."""
    o = default.get("options", {})
    base = {
        "n_ctx": default.get("n_ctx") or 4096,
        "n_batch": o.get("n_batch", 512),
        "n_ubatch": o.get("n_batch", 512),
        "n_threads": opts.threads,
        "kv_type": o.get("kv_type", "f16"),
        "flash_attn": o.get("flash_attn", False),
        "repack": o.get("repack", True),
    }
    base.update(changes)
    if base["n_ubatch"] > base["n_batch"]:
        base["n_ubatch"] = base["n_batch"]
    return base


def _budgets(runner, opts, bundle, image, preprocess, default: dict, box: float) -> list[dict]:
    rows = []
    for b in budget_list(opts.budgets, opts.fast_budget):
        try:
            preprocess.replace(**{k: v for k, v in b.items() if k != "name" and v is not None})
        except ValueError as e:
            rows.append({**b, "skipped": f"does not fit the bundle's pinpoints ({e})"})
            continue
        if same_budget(b, preprocess) and "error" not in default:
            rows.append({**b, "from": "eyecare-edge default", **_ttft_fields(default)})
            continue
        res = runner.child(
            f"budget {b['name']}",
            "eyecare_edge.perf.runtime:measure_pipeline",
            {
                "bundle": str(bundle),
                "image": str(image),
                "question": opts.question,
                "n_decode": 1,
                "options": {
                    "n_threads": opts.threads,
                    "vision_threads": opts.threads,
                    **({"max_tiles": b["max_tiles"]} if b["max_tiles"] is not None else {}),
                },
                "anyres_max": b["anyres_max"],
                "time_box_s": box,
            },
        )
        rows.append({**b, **_ttft_fields(res)})
    return rows


def _ttft_fields(res: dict) -> dict:
    if "error" in res:
        return {"error": res["error"]}
    return {
        "n_tiles": res["n_tiles"],
        "n_image_tokens": res["n_image_tokens"],
        "n_prompt": res["n_prompt"],
        "timings": res["timings"],
        "peak_rss_bytes": res.get("peak_rss_bytes"),
    }


def _accuracy(runner: Runner, opts: PerfOptions, threads: int) -> dict:
    budgets = budget_list(opts.budgets, opts.fast_budget)
    if opts.accuracy_data is None or (opts.accuracy_bundle is None and opts.accuracy_ckpt is None):
        return {
            "skipped": "no --accuracy-data with --accuracy-bundle/--accuracy-ckpt given (a trained tiny "
            "phantom model and its bench.jsonl, e.g. from `eyecare-edge demo`)"
        }
    if opts.accuracy_bundle is not None:
        res = runner.child(
            "accuracy per budget (bundle)",
            "eyecare_edge.perf.runtime:closed_qa_accuracy",
            {
                "bundle": str(opts.accuracy_bundle),
                "bench": str(opts.accuracy_data),
                "budgets": budgets,
                "limit": opts.accuracy_limit,
                "options": {"n_threads": opts.threads, "vision_threads": opts.threads},
            },
        )
        source = str(opts.accuracy_bundle)
    else:
        res = runner.child(
            "accuracy per budget (PyTorch)",
            "eyecare_edge.training.reference:closed_qa_accuracy_torch",
            {
                "ckpt": str(opts.accuracy_ckpt),
                "bench": str(opts.accuracy_data),
                "budgets": budgets,
                "limit": opts.accuracy_limit,
                "threads": threads,
            },
        )
        source = str(opts.accuracy_ckpt)
    if "error" in res:
        return {"source": source, "data": str(opts.accuracy_data), "error": res["error"]}
    return {"source": source, "data": str(opts.accuracy_data), "rows": res.get("value", [])}


def _sweep(runner, opts, bundle, manifest, visual_npy, llm_shape, box) -> list[dict]:
    default = runner.state.pipeline
    q = default.get("llm_precision", "q4_k_m")
    if not visual_npy.exists():
        return [{"skipped": "no visual rows (the default run failed)"}]
    rows = []
    for label, (change, env) in SWEEP.items():
        row = runner.child(
            f"sweep {label}",
            "eyecare_edge.perf.runtime:measure_llm",
            {
                "bundle": str(bundle),
                "precision": q,
                "visual_npy": str(visual_npy),
                "shape": asdict(llm_shape),
                "question": opts.question,
                "n_decode": min(opts.n_decode, 32),
                "options": _llm_options(opts, default, **change),
                "max_prompt": None,
                "time_box_s": box,
            },
            env=env,
        )
        row["setting"] = label
        row["env"] = env
        rows.append(row)
    return rows


def write_json(report: dict, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    return out


def _token_budgets(
    runner: Runner, opts: PerfOptions, bundle: Path, image: Path, manifest, box: float
) -> None:
    """The budget x method table's raw rows: one TTFT child per budget (fastest of
    `token_repeats` asks), closed-QA accuracy per budget on --accuracy-bundle, then the KV cache
    variants at the default budget the rule picks."""
    from eyecare_edge.perf.tokens import KV_VARIANTS, choose_default, pipeline_overrides, token_grid

    from eyecare_edge.images import load_image
    from eyecare_edge.preprocess import plan_image
    from eyecare_edge.reduce import TokenBudget, kept_tokens

    state = runner.state
    grid = token_grid(tuple(opts.visual_tokens), tuple(opts.token_methods))
    base = {"n_threads": opts.threads, "vision_threads": opts.threads}
    bundle_tiles = manifest.preprocess_config().max_tiles

    def timed(name: str, overrides: dict) -> dict:
        return runner.child(
            f"tokens {name}",
            "eyecare_edge.perf.runtime:measure_pipeline",
            {
                "bundle": str(bundle),
                "image": str(image),
                "question": opts.question,
                "n_decode": 1,
                "options": {**base, **overrides},
                "time_box_s": box,
                "repeats": opts.token_repeats,
            },
        )

    # every row (the full-token one too) timed the same way: warm LLM, fastest of the repeats
    rows = [{**row, "result": timed(row["name"], pipeline_overrides(row, bundle_tiles))} for row in grid]
    state.token_budgets = rows

    if opts.accuracy_bundle is not None and opts.accuracy_data is not None:
        res = runner.child(
            "tokens accuracy",
            "eyecare_edge.perf.tokens:closed_qa_by_budget",
            {
                "bundle": str(opts.accuracy_bundle),
                "bench": str(opts.accuracy_data),
                "grid": grid,
                "limit": opts.accuracy_limit,
                "options": base,
            },
        )
        state.token_accuracy = {"source": str(opts.accuracy_bundle), "data": str(opts.accuracy_data)}
        state.token_accuracy.update(
            {"error": res["error"]} if "error" in res else {"rows": res.get("value", [])}
        )
    else:
        state.token_accuracy = {"skipped": "no --accuracy-bundle/--accuracy-data (a trained demo bundle)"}

    if not opts.kv_variants:
        return
    # the default budget by the rule, on this image's kept-token counts
    h, w = load_image(image).rgb.shape[:2]
    pre = manifest.preprocess_config()
    acc = {r["name"]: r for r in state.token_accuracy.get("rows", [])}
    tokens = []
    for row in grid:
        p = plan_image((h, w), pre.replace(max_tiles=row["max_tiles"]) if row["max_tiles"] else pre)
        budget = TokenBudget(row["visual_tokens"], row["method"] or "pool")
        a = acc.get(row["name"], {})
        tokens.append(
            {
                "name": row["name"],
                "n_image_tokens": kept_tokens(p, budget),
                "accuracy": a.get("accuracy"),
                "accuracy_tiles_as_budgeted": a.get("tiles_as_budgeted", True),
            }
        )
    chosen = choose_default(tokens)
    if chosen is None:
        from eyecare_edge.reduce import NAMED_BUDGETS

        b = NAMED_BUDGETS["balanced"]
        chosen = next(
            (r for r in grid if r["visual_tokens"] == b["visual_tokens"] and r["method"] == b["method"]),
            grid[0],
        )
    row = next(r for r in grid if r["name"] == chosen["name"])
    for label, change in KV_VARIANTS.items():
        res = timed(f"{row['name']} {label}", {**pipeline_overrides(row, bundle_tiles), **change})
        state.token_budgets.append({**row, "kv": label, "result": res})
