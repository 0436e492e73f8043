"""Building one TensorRT engine from a bundle ONNX, and checking it against the FP32 ONNX.

Engines are built strongly typed from the FP16 ONNX (cast in the graph) or the S8S8 Q/DQ ONNX —
the one recipe that works on TensorRT 10.x (Jetson JetPack 6) and 11.x (which removed the
FP16/INT8 builder flags and implicit calibration). The optimisation profile covers 1..max tiles
(tiles are the batch axis). The timing cache is read before and written after a build, so a
rebuild after a TensorRT patch update is quick. `engines` decides when to build; the
`build-engine` command and the tests call `build_engine` directly too.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eyecare_edge.bundle import Manifest, sha256_files
from eyecare_edge.formats import export_formats
from eyecare_edge.vision.tensorrt import EngineBuildError, EngineRunner, GpuInfo, device_context, gpu_info


def profile_shapes(
    tile_size: int, *, max_tiles: int, opt_tiles: int, min_tiles: int = 1
) -> dict[str, tuple[int, int, int, int]]:
    """min/opt/max input shapes of the optimisation profile (tiles on the batch axis)."""
    if not 1 <= min_tiles <= opt_tiles <= max_tiles:
        raise ValueError(
            f"need 1 <= min_tiles <= opt_tiles <= max_tiles, got {min_tiles}, {opt_tiles}, {max_tiles}"
        )
    return {
        "min": (min_tiles, 3, tile_size, tile_size),
        "opt": (opt_tiles, 3, tile_size, tile_size),
        "max": (max_tiles, 3, tile_size, tile_size),
    }


def engine_key(
    *,
    onnx_sha256: str,
    precision: str,
    trt_version: str,
    compute_capability: str,
    profile: dict[str, tuple[int, ...]],
) -> str:
    """What an engine is a function of: same key, same engine (ANCHORS: cache by GPU, TRT
    version, precision, profile, ONNX digest)."""
    blob = json.dumps(
        {
            "onnx": onnx_sha256,
            "precision": precision,
            "trt": trt_version,
            "sm": compute_capability,
            "profile": {k: list(v) for k, v in sorted(profile.items())},
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class EngineInfo:
    path: Path
    precision: str
    trt_version: str
    compute_capability: str
    gpu_name: str
    build_seconds: float
    profile: dict
    onnx_sha256: str
    key: str
    timing_cache_path: Path | None
    size: int

    def manifest_extra(self, onnx_rel_path: str) -> dict:
        """The `extra` fields of the engine's manifest entry (what staleness checks read)."""
        return {
            "onnx": onnx_rel_path,
            "onnx_sha256": self.onnx_sha256,
            "engine_key": self.key,
            "gpu_name": self.gpu_name,
            "build_seconds": round(self.build_seconds, 2),
            "min_tiles": self.profile["min"][0],
            "opt_tiles": self.profile["opt"][0],
            "max_tiles": self.profile["max"][0],
            "tile_size": self.profile["max"][-1],
            "strongly_typed": True,
        }


def onnx_digest(path: str | Path) -> str:
    """sha256 of an ONNX file and its `<name>.data` file if present (the graph's identity; see
    `eyecare_edge.bundle.sha256_files` for the layout the engine records depend on)."""
    path = Path(path)
    return sha256_files(f for f in (path, path.with_name(path.name + ".data")) if f.exists())


# --- building ------------------------------------------------------------------------------------


def _network_flags(trt: Any) -> int:
    # STRONGLY_TYPED exists in 10.x and (deprecated, ignored: always on) in 11.x.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    max_tiles: int,
    opt_tiles: int,
    workspace_gb: float = 4.0,
    timing_cache_path: str | Path | None = None,
    min_tiles: int = 1,
    precision: str | None = None,
    device: int = 0,
    verbose: bool = False,
) -> EngineInfo:
    """Build a strongly typed engine from `onnx_path` on this GPU and write it to `engine_path`.

    The precision is the ONNX's own (FP16 cast or Q/DQ INT8); `precision` only labels the result
    (default: from the bundle file name, `vision_<precision>.onnx`). The timing cache at `timing_cache_path` is
    read when present and written back after the build.
    """
    import tensorrt as trt

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise EngineBuildError(f"{onnx_path}: ONNX not found")
    gpu = gpu_info(device)
    with device_context(device):
        return _build_on_current_device(
            trt, onnx_path, engine_path, gpu, max_tiles=max_tiles, opt_tiles=opt_tiles,
            workspace_gb=workspace_gb, timing_cache_path=timing_cache_path, min_tiles=min_tiles,
            precision=precision, verbose=verbose,
        )  # fmt: skip


def _build_on_current_device(
    trt: Any,
    onnx_path: Path,
    engine_path: Path,
    gpu: GpuInfo,
    *,
    max_tiles: int,
    opt_tiles: int,
    workspace_gb: float,
    timing_cache_path: str | Path | None,
    min_tiles: int,
    precision: str | None,
    verbose: bool,
) -> EngineInfo:
    version = str(trt.__version__)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    try:
        builder = trt.Builder(logger)
    except TypeError as e:  # pybind: "factory function returned nullptr" (no CUDA / no memory)
        builder, why = None, str(e)
    else:
        why = "returned null"
    if builder is None:
        raise EngineBuildError(
            f"TensorRT {version} could not create a builder on {gpu.name} ({why}): "
            "the GPU is out of memory, or the CUDA driver does not match this TensorRT"
        )
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(os.fspath(onnx_path)):
        errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"{onnx_path}: TensorRT could not parse the ONNX: {errors}")
    if network.num_inputs != 1:
        raise EngineBuildError(f"{onnx_path}: expected one input, found {network.num_inputs}")
    inp = network.get_input(0)
    tile_size = int(inp.shape[-1])
    shapes = profile_shapes(tile_size, max_tiles=max_tiles, opt_tiles=opt_tiles, min_tiles=min_tiles)

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, shapes["min"], shapes["opt"], shapes["max"])
    config.add_optimization_profile(profile)

    cache_path = Path(timing_cache_path) if timing_cache_path is not None else None
    blob = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another device/version: start a fresh one rather than fail the build.
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)

    t0 = time.perf_counter()
    try:
        plan = builder.build_serialized_network(network, config)
    except (MemoryError, RuntimeError) as e:  # allocation failures surface as either
        raise EngineBuildError(f"{onnx_path}: TensorRT {version} failed building on {gpu.name}: {e}") from e
    seconds = time.perf_counter() - t0
    if plan is None:
        raise EngineBuildError(
            f"{onnx_path}: TensorRT {version} failed to build an engine on {gpu.name} "
            f"(sm {gpu.compute_capability}); rerun with verbose=True for the builder log"
        )
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(plan))
    os.replace(tmp, engine_path)
    if cache_path is not None:
        serialized = config.get_timing_cache().serialize()
        cache_path.write_bytes(bytes(memoryview(serialized)))

    label = precision or _onnx_precision(onnx_path)
    digest = onnx_digest(onnx_path)
    return EngineInfo(
        path=engine_path,
        precision=label,
        trt_version=version,
        compute_capability=gpu.compute_capability,
        gpu_name=gpu.name,
        build_seconds=seconds,
        profile=shapes,
        onnx_sha256=digest,
        key=engine_key(
            onnx_sha256=digest,
            precision=label,
            trt_version=version,
            compute_capability=gpu.compute_capability,
            profile=shapes,
        ),
        timing_cache_path=cache_path,
        size=engine_path.stat().st_size,
    )


def _onnx_precision(path: Path) -> str:
    """The precision a bundle ONNX name says (`vision_fp16.onnx` -> fp16)."""
    name = path.name.removesuffix(".onnx")
    return name.removeprefix("vision_") if name.startswith("vision_") else "unknown"


def _parser_error(err: Any) -> str:
    """One ONNX parser error as text: node, op and description where the binding has them."""
    try:
        return f"node {err.node_name()} ({err.node_operator()}): {err.desc()}"
    except AttributeError:
        return str(err)


# --- checking an engine against the FP32 ONNX ----------------------------------------------------


def check_tiles(tile_size: int, n: int, *, seed: int = 0) -> np.ndarray:
    """Deterministic smooth test tiles in [-1, 1] (low-frequency patterns, not white noise, so the
    attention sees image-like structure) for checking an engine against the ONNX on the device."""
    import cv2

    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, tile_size, tile_size), dtype=np.float32)
    for i in range(n):
        coarse = rng.uniform(-1, 1, (12, 12, 3)).astype(np.float32)
        fine = cv2.resize(coarse, (tile_size, tile_size), interpolation=cv2.INTER_CUBIC)
        out[i] = np.clip(fine, -1, 1).transpose(2, 0, 1)
    return out


def engine_info_json(info: EngineInfo) -> dict:
    d = asdict(info)
    d["path"] = str(info.path)
    d["timing_cache_path"] = str(info.timing_cache_path) if info.timing_cache_path else None
    return d


# precision -> (figure, minimum) an engine must reach against the FP32 ONNX before it is used.
ENGINE_TOLERANCES: dict[str, tuple[str, float]] = {
    f.name: f.engine_check for f in export_formats() if f.engine_check is not None
}


def embedding_agreement(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Per-token cosine (min, mean) and max absolute difference of `test` against `ref` [T, n, d]."""
    a = np.asarray(ref, dtype=np.float64).reshape(-1, np.shape(ref)[-1])
    b = np.asarray(test, dtype=np.float64).reshape(-1, np.shape(test)[-1])
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in shape: reference {np.shape(ref)}, test {np.shape(test)}")
    if not np.isfinite(b).all():
        return {"cosine_min": 0.0, "cosine_mean": 0.0, "max_abs": float("inf")}
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na == 0) & (nb == 0), 1.0, (a * b).sum(axis=1) / (na * nb))
    cos = np.nan_to_num(cos, nan=0.0)
    return {
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "max_abs": float(np.abs(a - b).max()),
    }


def validate_engine(
    bundle: str | Path,
    manifest: Manifest,
    engine_path: str | Path,
    precision: str,
    *,
    opt_tiles: int,
    device: int = 0,
) -> dict:
    """Engine vs the bundle's FP32 ONNX (ONNX Runtime CPU) on deterministic smooth tiles, plus
    the engine's GPU latency per tile. Returns figures with `passed` and `failed`."""
    tile_size = int(manifest.preprocess_config().tile_size)
    tiles = check_tiles(tile_size, min(2, opt_tiles))
    figures: dict = {}
    with EngineRunner(engine_path, device=device) as run:
        out = run(tiles)
        batch = check_tiles(tile_size, opt_tiles, seed=1)
        run(batch)
        t0 = time.perf_counter()
        for _ in range(5):
            run(batch)
        figures["gpu_ms_per_tile"] = (time.perf_counter() - t0) / (5 * opt_tiles) * 1000
    ref_entry = manifest.find("vision", format="onnx", precision="fp32")
    if ref_entry is None:
        # Not compared is not passed: the caller keeps the engine but records it as unvalidated.
        figures.update(
            {
                "passed": None,
                "validated": False,
                "failed": [],
                "note": "not validated: no FP32 ONNX in the bundle to compare with",
            }
        )
        return figures
    import onnxruntime as ort

    sess = ort.InferenceSession(str(Path(bundle) / ref_entry.path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: tiles})[0]
    figures.update(embedding_agreement(ref, out))
    name, limit = ENGINE_TOLERANCES[precision]
    ok = figures[name] >= limit
    figures["check"] = f"{name} >= {limit}"
    figures["passed"] = bool(ok)
    figures["failed"] = [] if ok else [f"{name} {figures[name]:.6g} < {limit}"]
    return figures
