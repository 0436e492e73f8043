"""TensorRT engines for the vision graph, built on the GPU that will run them.

An engine is tied to the GPU (compute capability) and the TensorRT version it was built with, so
bundles ship ONNX and the target builds the engine: strongly typed from the FP16 ONNX (cast in
the graph) or the S8S8 Q/DQ ONNX — the one recipe that works on TensorRT 10.x (Jetson JetPack 6)
and 11.x (which removed the FP16/INT8 builder flags and implicit calibration). The optimisation
profile covers 1..max tiles (tiles are the batch axis), tuned for a typical image's tile count.
The timing cache is kept in the bundle so a rebuild after a TensorRT patch update is quick.

Only numpy, ctypes and (lazily) `tensorrt` are imported here — no torch, no onnx — so the runtime
can reuse the pure helpers (cache key, staleness) and even rebuild an engine. Device memory for
running an engine comes from the CUDA driver library (libcuda, always present where a GPU
driver is) through ctypes, so no cuda-python/pycuda/torch is needed on a Jetson.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eyecare_edge.bundle import FileEntry, Manifest
from eyecare_edge.preprocess import PreprocessConfig, plan_image

INSTALL_HINT = (
    "TensorRT is not installed. Install it for your CUDA version, e.g. "
    "`pip install tensorrt` (NVIDIA's wheels: tensorrt-cu12 from pypi.nvidia.com), "
    "or on Jetson use JetPack's system package (`sudo apt install python3-libnvinfer`, TensorRT 10.x on JetPack 6) "
    "in a venv created with --system-site-packages."
)
ENGINE_PRECISIONS = ("fp16", "int8")
# The ONNX each engine precision is built from: INT8 engines from the symmetric S8S8 Q/DQ graph.
ONNX_FOR_PRECISION = {"fp16": "vision_fp16.onnx", "int8": "vision_int8.onnx"}
# A 3:2 colour fundus photograph (HRF's 3504x2336): the tile count the profile is tuned for.
TYPICAL_IMAGE_SIZE = (2336, 3504)


class EngineBuildError(RuntimeError):
    """TensorRT could not parse the ONNX or build the engine; the message carries its errors."""


class CudaError(RuntimeError):
    """A CUDA driver call failed (message names the call and CUDA's error string)."""


# --- availability and device ---------------------------------------------------------------------


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when `import tensorrt` works, else (False, how to install it)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        return False, f"{INSTALL_HINT} ({e})"
    except Exception as e:  # a broken install (missing libnvinfer) raises OSError & co.
        return False, f"TensorRT is installed but does not load: {e}. {INSTALL_HINT}"
    return True, str(trt.__version__)


def trt_version() -> str:
    import tensorrt as trt

    return str(trt.__version__)


class _CudaDriver:
    """The handful of CUDA driver API calls needed to query the GPU and run an engine."""

    _CC_MAJOR, _CC_MINOR = 75, 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_{MAJOR,MINOR}

    def __init__(self) -> None:
        names = ["nvcuda.dll"] if sys.platform == "win32" else ["libcuda.so.1", "libcuda.so"]
        found = ctypes.util.find_library("cuda")
        if found:
            names.append(found)
        self.lib = None
        for name in names:
            try:
                self.lib = ctypes.CDLL(name)
                break
            except OSError:
                continue
        if self.lib is None:
            raise CudaError("no CUDA driver library (libcuda) found: is an NVIDIA driver installed?")
        self.call("cuInit", ctypes.c_uint(0))

    def call(self, name: str, *args: Any) -> None:
        res = getattr(self.lib, name)(*args)
        if res != 0:
            msg = ctypes.c_char_p()
            self.lib.cuGetErrorString(res, ctypes.byref(msg))
            text = msg.value.decode() if msg.value else f"error {res}"
            raise CudaError(f"{name} failed: {text}")

    def device(self, ordinal: int = 0) -> ctypes.c_int:
        dev = ctypes.c_int()
        self.call("cuDeviceGet", ctypes.byref(dev), ctypes.c_int(ordinal))
        return dev

    def compute_capability(self, ordinal: int = 0) -> str:
        dev = self.device(ordinal)
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.call("cuDeviceGetAttribute", ctypes.byref(major), ctypes.c_int(self._CC_MAJOR), dev)
        self.call("cuDeviceGetAttribute", ctypes.byref(minor), ctypes.c_int(self._CC_MINOR), dev)
        return f"{major.value}.{minor.value}"

    def name(self, ordinal: int = 0) -> str:
        buf = ctypes.create_string_buffer(256)
        self.call("cuDeviceGetName", buf, ctypes.c_int(256), self.device(ordinal))
        return buf.value.decode(errors="replace")


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"


def gpu_info(ordinal: int = 0) -> GpuInfo:
    """Name and compute capability of GPU `ordinal`, from the CUDA driver (no toolkit needed)."""
    drv = _CudaDriver()
    return GpuInfo(drv.name(ordinal), drv.compute_capability(ordinal))


# --- pure helpers (no TensorRT needed) -----------------------------------------------------------


def default_tile_counts(preprocess: PreprocessConfig) -> tuple[int, int]:
    """(opt, max) tiles for the profile: a 3:2 fundus photo's tile count, and the most any image
    can produce under `preprocess` (largest allowed canvas + the global view)."""
    s = preprocess.tile_size
    most = max((h // s) * (w // s) for h, w in preprocess.allowed_pinpoints()) + 1
    typical = plan_image(TYPICAL_IMAGE_SIZE, preprocess).n_tiles
    return min(typical, most), most


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


def engine_file_name(precision: str, *, compute_capability: str, trt_version: str) -> str:
    """`vision_fp16.sm87.trt10.3.0.engine`: engines of several GPUs can share one bundle."""
    return f"vision_{precision}.sm{compute_capability.replace('.', '')}.trt{trt_version}.engine"


def timing_cache_file_name(*, compute_capability: str, trt_version: str) -> str:
    return f"vision.sm{compute_capability.replace('.', '')}.trt{trt_version}.trtcache"


def is_engine_stale(
    entry: FileEntry | dict,
    *,
    trt_version: str,
    compute_capability: str,
    onnx_sha256: str,
    max_tiles: int | None = None,
) -> bool:
    """True when the recorded engine cannot be used here: built by another TensorRT version, for
    another GPU architecture, from another ONNX, or for fewer tiles than needed."""
    e = entry if isinstance(entry, FileEntry) else FileEntry(**entry)
    extra = e.extra or {}
    if e.format != "engine":
        return True
    if e.trt_version != trt_version or e.compute_capability != compute_capability:
        return True
    if extra.get("onnx_sha256") != onnx_sha256:
        return True
    return max_tiles is not None and int(extra.get("max_tiles", 0)) < max_tiles


def find_engine(
    manifest: Manifest,
    precision: str,
    *,
    trt_version: str,
    compute_capability: str,
    onnx_sha256: str,
    max_tiles: int | None = None,
) -> FileEntry | None:
    """The recorded engine of `precision` usable on this GPU/TensorRT, or None (then build one)."""
    for f in manifest.files:
        if (
            f.format == "engine"
            and f.precision == precision
            and not is_engine_stale(
                f,
                trt_version=trt_version,
                compute_capability=compute_capability,
                onnx_sha256=onnx_sha256,
                max_tiles=max_tiles,
            )
        ):
            return f
    return None


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
    """sha256 of an ONNX file and its `<name>.data` file if present (the graph's identity)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in (path, path.with_name(path.name + ".data")):
        if f.exists():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
    return h.hexdigest()


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
    version = str(trt.__version__)
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
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
    plan = builder.build_serialized_network(network, config)
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


def _parser_error(err: Any) -> str:
    """One ONNX parser error as text: node, op and description where the binding has them."""
    try:
        return f"node {err.node_name()} ({err.node_operator()}): {err.desc()}"
    except AttributeError:
        return str(err)


def _onnx_precision(path: Path) -> str:
    """The precision a bundle ONNX name says (`vision_fp16.onnx` -> fp16)."""
    name = path.name.removesuffix(".onnx")
    return name.removeprefix("vision_") if name.startswith("vision_") else "unknown"


# --- running (validation and timing) ------------------------------------------------------------


class EngineRunner:
    """Runs a serialized engine on numpy tiles: `runner(tiles) -> embeddings` (float32)."""

    def __init__(self, engine_path: str | Path, *, device: int = 0) -> None:
        import tensorrt as trt

        self._trt = trt
        self._drv = _CudaDriver()
        dev = self._drv.device(device)
        self._dev = dev
        self._ctx = ctypes.c_void_p()
        self._drv.call("cuDevicePrimaryCtxRetain", ctypes.byref(self._ctx), dev)
        self._drv.call("cuCtxSetCurrent", self._ctx)
        self._stream = ctypes.c_void_p()
        self._drv.call("cuStreamCreate", ctypes.byref(self._stream), ctypes.c_uint(0))
        self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise EngineBuildError(
                f"{engine_path}: TensorRT could not deserialize the engine (other GPU/version?)"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self._buffers: dict[str, tuple[ctypes.c_uint64, int]] = {}

    def _buffer(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (None, 0))
        if ptr is None or size < nbytes:
            if ptr is not None:
                self._drv.call("cuMemFree_v2", ptr)
            ptr = ctypes.c_uint64()
            self._drv.call("cuMemAlloc_v2", ctypes.byref(ptr), ctypes.c_size_t(nbytes))
            self._buffers[name] = (ptr, nbytes)
        return int(self._buffers[name][0].value)

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        trt = self._trt
        x = np.ascontiguousarray(tiles, dtype=trt.nptype(self.engine.get_tensor_dtype(self.input)))
        self.context.set_input_shape(self.input, tuple(x.shape))
        out_shape = tuple(self.context.get_tensor_shape(self.output))
        out = np.empty(out_shape, dtype=trt.nptype(self.engine.get_tensor_dtype(self.output)))
        d_in = self._buffer(self.input, x.nbytes)
        d_out = self._buffer(self.output, out.nbytes)
        self._drv.call(
            "cuMemcpyHtoD_v2",
            ctypes.c_uint64(d_in),
            x.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_size_t(x.nbytes),
        )
        self.context.set_tensor_address(self.input, d_in)
        self.context.set_tensor_address(self.output, d_out)
        if not self.context.execute_async_v3(self._stream.value or 0):
            raise EngineBuildError("TensorRT execution failed")
        self._drv.call("cuStreamSynchronize", self._stream)
        self._drv.call(
            "cuMemcpyDtoH_v2",
            out.ctypes.data_as(ctypes.c_void_p),
            ctypes.c_uint64(d_out),
            ctypes.c_size_t(out.nbytes),
        )
        return out.astype(np.float32, copy=False)

    def close(self) -> None:
        for ptr, _ in self._buffers.values():
            self._drv.call("cuMemFree_v2", ptr)
        self._buffers.clear()
        self.context = None
        self.engine = None
        if self._stream:
            self._drv.call("cuStreamDestroy_v2", self._stream)
            self._stream = ctypes.c_void_p()
        self._drv.call("cuDevicePrimaryCtxRelease_v2", self._dev)

    def __enter__(self) -> EngineRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
