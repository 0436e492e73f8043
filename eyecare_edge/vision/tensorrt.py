"""TensorRT and the GPU on this machine: availability, the CUDA driver, and running an engine.

This module is part of the runtime (`eyecare_edge`): only numpy, ctypes and (lazily) `tensorrt`
are imported — no torch, no onnx. Device memory and streams come from the CUDA driver library
(libcuda, always present where a GPU driver is) through ctypes, so no cuda-python/pycuda/torch is
needed on a Jetson. Finding or building the engine a bundle needs is `engines` (its build and
check against the ONNX, `engine_build`); this module runs one (`EngineRunner`) behind the
`VisionEncoder` interface (`TensorRTVision`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from eyecare_edge.versions import TENSORRT_MIN, at_least
from eyecare_edge.vision.encoder import VisionError

INSTALL_HINT = (
    "TensorRT is not installed. Install it for your CUDA version, e.g. "
    "`pip install tensorrt` (NVIDIA's wheels: tensorrt-cu12 from pypi.nvidia.com), "
    "or on Jetson use JetPack's system package (`sudo apt install python3-libnvinfer`, TensorRT 10.x on JetPack 6) "
    "in a venv created with --system-site-packages."
)


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


class CudaDriver:
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


class DeviceContext:
    """GPU `ordinal`'s primary context made current on this thread for the `with` body.

    TensorRT's builder and runtime work on the calling thread's current CUDA context; without
    this they take GPU 0 whatever device the caller asked for (and the engine would be labelled
    with GPU N's compute capability while built for GPU 0)."""

    def __init__(self, drv: CudaDriver, ordinal: int) -> None:
        self.drv, self.dev, self.ctx = drv, drv.device(ordinal), ctypes.c_void_p()

    def __enter__(self) -> DeviceContext:
        self.drv.call("cuDevicePrimaryCtxRetain", ctypes.byref(self.ctx), self.dev)
        try:
            self.drv.call("cuCtxSetCurrent", self.ctx)
        except CudaError:
            self.drv.call("cuDevicePrimaryCtxRelease_v2", self.dev)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.drv.call("cuDevicePrimaryCtxRelease_v2", self.dev)


def device_context(ordinal: int) -> DeviceContext:
    """GPU `ordinal`'s primary context, for a `with` block (TensorRT's builder runs in one)."""
    return DeviceContext(CudaDriver(), ordinal)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    compute_capability: str  # "8.7"


def gpu_info(ordinal: int = 0) -> GpuInfo:
    """Name and compute capability of GPU `ordinal`, from the CUDA driver (no toolkit needed)."""
    drv = CudaDriver()
    n = drv.count()
    if not 0 <= ordinal < n:
        raise CudaError(f"no GPU {ordinal}: the CUDA driver sees {n} GPU(s)")
    return GpuInfo(drv.name(ordinal), drv.compute_capability(ordinal))


# --- running an engine ---------------------------------------------------------------------------


class EngineRunner:
    """Runs a serialized engine on numpy tiles: `runner(tiles) -> embeddings` (float32)."""

    def __init__(self, engine_path: str | Path, *, device: int = 0) -> None:
        import tensorrt as trt

        self._trt = trt
        self._buffers: dict[str, tuple[ctypes.c_uint64, int]] = {}
        self._ctx = None
        self.context = self.engine = None
        self._drv = CudaDriver()
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


class as_tensorrt_error:
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
        with self._lock, as_tensorrt_error(f"running the {self.precision} engine"):
            parts = [
                self.runner(tiles[i : i + self.max_tiles]) for i in range(0, tiles.shape[0], self.max_tiles)
            ]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)

    def close(self) -> None:
        with self._lock:
            self.runner.close()
