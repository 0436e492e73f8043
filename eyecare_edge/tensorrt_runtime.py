"""TensorRT for the vision graph: engines built on the GPU that runs them, and run from the runtime.

An engine is tied to the GPU (compute capability) and the TensorRT version it was built with, so
bundles ship ONNX and the target builds the engine: strongly typed from the FP16 ONNX (cast in
the graph) or the S8S8 Q/DQ ONNX — the one recipe that works on TensorRT 10.x (Jetson JetPack 6)
and 11.x (which removed the FP16/INT8 builder flags and implicit calibration). The optimisation
profile covers 1..max tiles (tiles are the batch axis), tuned for a typical image's tile count.
The timing cache is kept in the bundle so a rebuild after a TensorRT patch update is quick.

This module is part of the runtime (`eyecare_edge`): only numpy, ctypes and (lazily) `tensorrt`
are imported — no torch, no onnx. The runtime finds a usable engine in the manifest, or builds
and validates one on first use (`ensure_engine`), and runs it (`TensorRTVision`); the
`build-engine` command uses the same functions. Device memory and streams come from the CUDA
driver library (libcuda, always present where a GPU driver is) through ctypes, so no
cuda-python/pycuda/torch is needed on a Jetson.
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
from eyecare_edge.versions import TENSORRT_MIN, at_least
from eyecare_edge.vision import VisionError

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


class TensorRTError(VisionError, RuntimeError):
    """TensorRT cannot be used here, or an engine cannot be found, built or run (message says why).

    A `VisionError`, so the pipeline falls back from it (backend auto) and the CLI prints it as
    an error line; still a RuntimeError for callers that caught it as one."""


class EngineBuildError(TensorRTError):
    """TensorRT could not parse the ONNX or build the engine; the message carries its errors."""


class CudaError(TensorRTError):
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
    version = str(getattr(trt, "__version__", "unknown"))
    if not at_least(version, TENSORRT_MIN):
        return False, (
            f"TensorRT {version} is too old: eyecare-edge needs TensorRT >= {TENSORRT_MIN} "
            "(tensor-name I/O, strongly typed networks). On a workstation: pip install -U 'tensorrt>=10'; "
            "on Jetson: JetPack 6.x (TensorRT 10.x)"
        )
    return True, version


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

    def count(self) -> int:
        n = ctypes.c_int()
        self.call("cuDeviceGetCount", ctypes.byref(n))
        return int(n.value)

    def driver_version(self) -> str:
        """"12.4" from cuDriverGetVersion (the CUDA version the driver supports)."""
        v = ctypes.c_int()
        self.call("cuDriverGetVersion", ctypes.byref(v))
        return f"{v.value // 1000}.{(v.value % 1000) // 10}"


class _DeviceContext:
    """GPU `ordinal`'s primary context made current on this thread for the `with` body.

    TensorRT's builder and runtime work on the calling thread's current CUDA context; without
    this they take GPU 0 whatever device the caller asked for (and the engine would be labelled
    with GPU N's compute capability while built for GPU 0)."""

    def __init__(self, drv: _CudaDriver, ordinal: int) -> None:
        self.drv, self.dev, self.ctx = drv, drv.device(ordinal), ctypes.c_void_p()

    def __enter__(self) -> _DeviceContext:
        self.drv.call("cuDevicePrimaryCtxRetain", ctypes.byref(self.ctx), self.dev)
        try:
            self.drv.call("cuCtxSetCurrent", self.ctx)
        except CudaError:
            self.drv.call("cuDevicePrimaryCtxRelease_v2", self.dev)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.drv.call("cuDevicePrimaryCtxRelease_v2", self.dev)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"


def gpu_info(ordinal: int = 0) -> GpuInfo:
    """Name and compute capability of GPU `ordinal`, from the CUDA driver (no toolkit needed)."""
    drv = _CudaDriver()
    n = drv.count()
    if not 0 <= ordinal < n:
        raise CudaError(f"no GPU {ordinal}: the CUDA driver sees {n} GPU(s)")
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
    with _DeviceContext(_CudaDriver(), device):
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


# --- running (validation and timing) ------------------------------------------------------------


class EngineRunner:
    """Runs a serialized engine on numpy tiles: `runner(tiles) -> embeddings` (float32)."""

    def __init__(self, engine_path: str | Path, *, device: int = 0) -> None:
        import tensorrt as trt

        self._trt = trt
        self._buffers: dict[str, tuple[ctypes.c_uint64, int]] = {}
        self._ctx = None
        self.context = self.engine = None
        self._drv = _CudaDriver()
        dev = self._drv.device(device)
        self._dev = dev
        ctx = ctypes.c_void_p()
        self._drv.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
        self._ctx = ctx
        self._stream = ctypes.c_void_p()
        try:
            self._drv.call("cuCtxSetCurrent", self._ctx)
            self._drv.call("cuStreamCreate", ctypes.byref(self._stream), ctypes.c_uint(0))
            self._logger = trt.Logger(trt.Logger.WARNING)  # must outlive the runtime
            self._runtime = trt.Runtime(self._logger)
            self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
            if self.engine is None:
                raise EngineBuildError(
                    f"{engine_path}: TensorRT could not deserialize the engine (other GPU/version?)"
                )
            self.context = self.engine.create_execution_context()
        except BaseException:
            self.close()  # release the context reference and the stream taken above
            raise
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)

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
        # The primary context must be current on the calling thread (a server may call from
        # another thread than the one that created the runner).
        self._drv.call("cuCtxSetCurrent", self._ctx)
        x = np.ascontiguousarray(tiles, dtype=trt.nptype(self.engine.get_tensor_dtype(self.input)))
        if not self.context.set_input_shape(self.input, tuple(x.shape)):
            raise TensorRTError(
                f"TensorRT refused input shape {tuple(x.shape)} for {self.input!r}: outside the "
                f"engine's optimisation profile {tuple(self.engine.get_tensor_profile_shape(self.input, 0))}"
            )
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
        """Free device buffers, the stream and the context reference; safe to call twice."""
        if self._ctx is None:
            return
        self._drv.call("cuCtxSetCurrent", self._ctx)
        for ptr, _ in self._buffers.values():
            self._drv.call("cuMemFree_v2", ptr)
        self._buffers.clear()
        self.context = None
        self.engine = None
        if self._stream:
            self._drv.call("cuStreamDestroy_v2", self._stream)
            self._stream = ctypes.c_void_p()
        self._drv.call("cuDevicePrimaryCtxRelease_v2", self._dev)
        self._ctx = None

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


# --- the runtime: find or build, validate, run ---------------------------------------------------

# precision -> (figure, minimum) an engine must reach against the FP32 ONNX before it is used.
ENGINE_TOLERANCES: dict[str, tuple[str, float]] = {
    "fp16": ("cosine_min", 0.999),
    "int8": ("cosine_mean", 0.99),
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


@dataclass
class EngineResolution:
    """What `ensure_engine` found or did. status: "up-to-date" (a recorded engine fits this GPU
    and TensorRT) or "built". `manifest` is the manifest as now on disk (with the new entries)."""

    entry: FileEntry
    manifest: Manifest
    status: str
    gpu: GpuInfo
    trt_version: str
    info: EngineInfo | None = None
    validation: dict | None = None


def _lock_path(bundle: Path) -> Path:
    """A lock file outside the bundle (a bundle holds only model files), one per bundle."""
    import tempfile

    key = hashlib.sha256(os.path.realpath(bundle).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"eyecare-edge-engine-{key}.lock"


class _BuildLock:
    """An exclusive advisory lock, so two processes that start on a fresh bundle build once."""

    def __init__(self, bundle: Path) -> None:
        self.path = _lock_path(bundle)
        self._fh = None

    def __enter__(self) -> _BuildLock:
        self._fh = open(self.path, "a+b")  # held until __exit__
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no advisory locks, builds may race
            return self
        fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fh is not None:
            self._fh.close()  # closing releases the flock
            self._fh = None


def _onnx_digest_cached(path: Path) -> str:
    from eyecare_edge.vision import DIGESTS

    return DIGESTS.digest([path, path.with_name(path.name + ".data")], lambda: onnx_digest(path), kind="onnx")


def _usable(root: Path, entry: FileEntry | None, check: Any) -> FileEntry | None:
    """`entry` when its file is present and (if `check` is given) matches the manifest."""
    if entry is None or not (root / entry.path).is_file():
        return None
    if check is not None:
        from eyecare_edge.bundle import BundleError

        try:
            check([entry])
        except BundleError:
            return None
    return entry


def ensure_engine(
    bundle: str | Path,
    manifest: Manifest,
    precision: str,
    *,
    device: int = 0,
    build: bool = True,
    force: bool = False,
    max_tiles: int | None = None,
    opt_tiles: int | None = None,
    workspace_gb: float = 4.0,
    validate: bool = True,
    check: Any = None,
    progress: Any = None,
) -> EngineResolution:
    """A TensorRT engine of `precision` for this GPU and TensorRT version: the one recorded in the
    manifest when it fits (same TensorRT, compute capability, ONNX digest, enough tiles), else a
    new one built from the bundle's ONNX, checked against the FP32 ONNX, and recorded (engine and
    timing cache) in the manifest. The bundle directory must be writable to build.

    check: called with manifest entries before they are read (the pipeline's digest check);
    progress: called with one-line messages (building takes minutes for SigLIP-so400m).
    Raises TensorRTError (or a subclass) with the reason.
    """
    from eyecare_edge.bundle import add_file, read_manifest, write_manifest

    root = Path(bundle)
    if precision not in ENGINE_PRECISIONS:
        raise TensorRTError(
            f"TensorRT engines are built for {', '.join(ENGINE_PRECISIONS)}, not {precision!r} "
            "(fp32 and int8_u8s8 run on ONNX Runtime)"
        )
    ok, detail = tensorrt_available()
    if not ok:
        raise TensorRTError(detail)
    gpu = gpu_info(device)
    version = trt_version()
    onnx_entry = manifest.find("vision", format="onnx", precision=precision)
    if onnx_entry is None:
        have = ", ".join(manifest.precisions("vision", "onnx")) or "none"
        raise TensorRTError(
            f"{root}: no {precision} vision ONNX to build an engine from (bundle has: {have}; "
            f"expected {ONNX_FOR_PRECISION[precision]})"
        )
    onnx_path = root / onnx_entry.path
    default_opt, default_max = default_tile_counts(manifest.preprocess_config())
    max_tiles = max_tiles or default_max
    opt_tiles = min(opt_tiles or default_opt, max_tiles)
    digest = _onnx_digest_cached(onnx_path)

    def lookup(m: Manifest) -> FileEntry | None:
        found = find_engine(
            m,
            precision,
            trt_version=version,
            compute_capability=gpu.compute_capability,
            onnx_sha256=digest,
            max_tiles=max_tiles,
        )
        return _usable(root, found, check)

    if not force and (entry := lookup(manifest)) is not None:
        return EngineResolution(entry, manifest, "up-to-date", gpu, version)
    if not build:
        raise TensorRTError(
            f"{root}: no {precision} engine for {gpu.name} (sm {gpu.compute_capability}) and TensorRT {version}; "
            f"build it with `eyecare-edge build-engine {root} --precision {precision}`"
        )
    if not os.access(root, os.W_OK):
        raise TensorRTError(
            f"{root}: the bundle is not writable, so the {precision} engine for this GPU cannot be built "
            f"here; run `eyecare-edge build-engine {root} --precision {precision}` once as a user who can write it"
        )
    with _BuildLock(root):
        current = read_manifest(root)  # another process may have built it while we waited
        if not force and (entry := lookup(current)) is not None:
            return EngineResolution(entry, current, "up-to-date", gpu, version)
        if check is not None:
            from eyecare_edge.vision import onnx_files

            check(onnx_files(current, onnx_entry))
        engine_rel = engine_file_name(
            precision, compute_capability=gpu.compute_capability, trt_version=version
        )
        cache_rel = timing_cache_file_name(compute_capability=gpu.compute_capability, trt_version=version)
        if progress is not None:
            progress(
                f"building the {precision} TensorRT engine from {onnx_entry.path} on {gpu.name} "
                f"(sm {gpu.compute_capability}), TensorRT {version}, tiles 1/{opt_tiles}/{max_tiles}; "
                "this happens once per GPU and TensorRT version"
            )
        with _as_tensorrt_error(f"building the {precision} engine on {gpu.name}"):
            info = build_engine(
                onnx_path,
                root / engine_rel,
                max_tiles=max_tiles,
                opt_tiles=opt_tiles,
                workspace_gb=workspace_gb,
                timing_cache_path=root / cache_rel,
                precision=precision,
                device=device,
            )
        validation = None
        if validate:
            with _as_tensorrt_error(f"checking the new {precision} engine", cleanup=root / engine_rel):
                validation = validate_engine(
                    root, current, info.path, precision, opt_tiles=opt_tiles, device=device
                )
            validation.update(
                {"trt_version": info.trt_version, "compute_capability": info.compute_capability}
            )
            current.validation[f"engine_{precision}"] = validation
            if validation["passed"] is False:
                (root / engine_rel).unlink(missing_ok=True)
                write_manifest(root, current)
                raise EngineBuildError(
                    f"{root}: the {precision} engine built here fails its check against the FP32 ONNX "
                    f"({'; '.join(validation['failed'])}); engine discarded"
                )
        entry = add_file(
            root,
            current,
            engine_rel,
            role="vision",
            precision=precision,
            trt_version=info.trt_version,
            compute_capability=info.compute_capability,
            extra=info.manifest_extra(onnx_entry.path),
        )
        add_file(
            root,
            current,
            cache_rel,
            role="extra",
            precision="-",
            trt_version=info.trt_version,
            compute_capability=info.compute_capability,
            extra={"kind": "tensorrt timing cache"},
        )
        write_manifest(root, current)
    return EngineResolution(entry, current, "built", gpu, version, info, validation)


class _as_tensorrt_error:
    """Turn anything but a TensorRTError raised in the body into one naming `step` and the
    cause: a missing onnxruntime in the check, TensorRT's own RuntimeError/TypeError, CUDA out of
    memory. `cleanup`: a half-made file removed on failure. KeyboardInterrupt passes through."""

    def __init__(self, step: str, cleanup: Path | None = None) -> None:
        self.step, self.cleanup = step, cleanup

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False
        if self.cleanup is not None:
            self.cleanup.unlink(missing_ok=True)
        if isinstance(exc, TensorRTError):
            return False
        if isinstance(exc, ImportError):
            fix = (
                "; the engine check compares against the FP32 ONNX with it: pip install 'eyecare-edge[cpu]'"
                if exc.name == "onnxruntime"
                else ""
            )
            raise TensorRTError(f"{self.step}: {exc.name or 'a module'} is not installed ({exc}){fix}") from exc
        raise EngineBuildError(f"{self.step}: {type(exc).__name__}: {exc}") from exc


class TensorRTVision:
    """The vision encoder on a TensorRT engine (the `VisionEncoder` interface of `vision`).

    Calls with more tiles than the engine's profile allows are split into chunks. A lock
    serialises use of the one execution context and its device buffers.
    """

    def __init__(self, engine_path: str | Path, *, precision: str, max_tiles: int, device: int = 0) -> None:
        import threading

        self.runner = EngineRunner(engine_path, device=device)
        self.name = "tensorrt"
        self.precision = precision
        self.max_tiles = max(1, int(max_tiles))
        shape = tuple(self.runner.engine.get_tensor_shape(self.runner.output))
        self.width = int(shape[-1]) if shape and int(shape[-1]) > 0 else None
        self._lock = threading.Lock()

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        if tiles.ndim != 4 or tiles.shape[1] != 3 or tiles.shape[0] < 1:
            raise TensorRTError(f"tiles must be [T>=1, 3, S, S], got {tiles.shape}")
        with self._lock, _as_tensorrt_error(f"running the {self.precision} engine"):
            parts = [
                self.runner(tiles[i : i + self.max_tiles]) for i in range(0, tiles.shape[0], self.max_tiles)
            ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def close(self) -> None:
        with self._lock:
            self.runner.close()


def open_tensorrt_vision(
    bundle: str | Path,
    manifest: Manifest,
    precision: str = "fp16",
    *,
    device: int = 0,
    build: bool = True,
    check: Any = None,
    progress: Any = None,
) -> TensorRTVision:
    """Find (or build, see `ensure_engine`) this GPU's engine of `precision` and open it."""
    res = ensure_engine(
        bundle, manifest, precision, device=device, build=build, check=check, progress=progress
    )
    max_tiles = int(
        (res.entry.extra or {}).get("max_tiles") or default_tile_counts(manifest.preprocess_config())[1]
    )
    return TensorRTVision(
        Path(bundle) / res.entry.path, precision=precision, max_tiles=max_tiles, device=device
    )
