"""Vision backends: normalised tiles [T, 3, S, S] -> tile embeddings [T, n, d], one small interface.

Backends: ONNX Runtime on CPU, ONNX Runtime with CUDA, TensorRT (engine from the bundle, built on
first use when missing or stale for this GPU/TensorRT; `eyecare_edge.tensorrt_runtime`), and
OpenVINO on request. `open_vision(..., backend="auto")` tries (backend, precision) pairs fastest
first — TensorRT FP16, TensorRT INT8, ONNX Runtime CUDA FP16, ONNX Runtime CUDA FP32, ONNX Runtime
CPU (its fastest validated variant) — and records why each one before the chosen was skipped.

Failing loudly, falling back: whatever a backend raises while it loads (a missing package, a
TensorRT builder that returns null, CUDA out of memory, an ONNX Runtime provider error) becomes a
`VisionError` naming the backend, precision and cause; `auto` records it and tries the next pair,
an explicit backend request raises it. Only a bundle file that does not match its manifest
(`BundleError`) stops the search: that is a broken bundle, not a missing accelerator.

Every backend reads files of the bundle; `open_vision` hands the manifest entries it is about to
load to a `check` callback first, so the pipeline verifies exactly the files it uses (and a
corrupt file is reported by name rather than as an obscure parser error).
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from eyecare_edge.bundle import BundleError, FileEntry, Manifest, Problem
from eyecare_edge.errors import EyecareError

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
BACKENDS = ("auto", "tensorrt", "ort-cuda", "openvino", "ort-cpu")
# (backend, precision) pairs `auto` tries, fastest first; "auto" precision on the CPU means the
# fastest validated CPU variant (`cpu_precision_order`).
AUTO_ORDER: tuple[tuple[str, str], ...] = (
    ("tensorrt", "fp16"),
    ("tensorrt", "int8"),
    ("ort-cuda", "fp16"),
    ("ort-cuda", "fp32"),
    ("ort-cpu", "auto"),
)
GPU_BACKENDS = ("tensorrt", "ort-cuda")
ORT_CPU_INSTALL = "pip install 'eyecare-edge[cpu]'"
ORT_GPU_INSTALL = "pip uninstall -y onnxruntime && pip install 'eyecare-edge[gpu]'"
# Vision precisions a bundle may hold; `int8_u8s8` is the ONNX Runtime CPU-fast INT8 variant
# (uint8 activations), `int8` the symmetric Q/DQ graph TensorRT builds from.
PRECISIONS = ("fp32", "fp16", "int8", "int8_u8s8")

FileCheck = Callable[[Sequence[FileEntry]], None]


class VisionError(EyecareError):
    """A vision backend that cannot load or run; the message says which and why."""


class VisionEncoder(Protocol):
    """What the pipeline needs from a backend. `width` is the embedding width d when the backend
    knows it before running (a static graph output), else None."""

    name: str
    precision: str
    width: int | None

    def encode(self, tiles: np.ndarray) -> np.ndarray: ...


def validate_tiles(tiles: np.ndarray) -> np.ndarray:
    """float32 C-contiguous [T, 3, S, S]; anything else is a VisionError naming the shape."""
    if tiles.ndim != 4 or tiles.shape[1] != 3 or tiles.shape[0] < 1:
        raise VisionError(f"tiles must be [T>=1, 3, S, S], got {tiles.shape}")
    return np.ascontiguousarray(tiles, dtype=np.float32)


def default_threads() -> int:
    """Physical cores: hyper-threads slow matrix kernels down rather than up."""
    from eyecare_edge.llm import physical_cores

    return physical_cores()


# ---------------------------------------------------------------------------------------------
# Verified file digests, remembered per process
# ---------------------------------------------------------------------------------------------


class DigestMemo:
    """sha256 of files, remembered by (real path, size, mtime_ns).

    Hashing a 2 GB GGUF takes seconds; a server that reloads a pipeline, or a screen run that
    opens several, should pay for it once per file version. A file that is rewritten gets a new
    mtime (or size) and is hashed again. Thread-safe.
    """

    def __init__(self) -> None:
        self._known: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def digest(self, paths: Sequence[Path], compute: Callable[[], str], kind: str = "sha256") -> str:
        key = (kind, *(_stat_key(p) for p in paths))
        with self._lock:
            hit = self._known.get(key)
        if hit is not None:
            return hit
        value = compute()
        with self._lock:
            self._known[key] = value
        return value

    def sha256(self, path: Path) -> str:
        return self.digest([path], lambda: _sha256(path))


def _stat_key(path: Path) -> tuple:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (str(path), None, None)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# One per process: the digest of a file version never changes, so sharing it is safe.
DIGESTS = DigestMemo()


def verify_entries(bundle: str | os.PathLike[str], entries: Sequence[FileEntry]) -> None:
    """Raise BundleError naming every file of `entries` whose size or sha256 differs from the
    manifest (digests remembered in `DIGESTS`)."""
    root = Path(bundle)
    problems: list[Problem] = []
    for entry in entries:
        full = root / entry.path
        if not full.is_file():
            problems.append(Problem(entry.path, "missing"))
            continue
        size = full.stat().st_size
        if size != entry.size:
            problems.append(Problem(entry.path, f"size {size} differs from the manifest's {entry.size}"))
        elif DIGESTS.sha256(full) != entry.sha256:
            problems.append(Problem(entry.path, "sha256 differs from the manifest (file changed or corrupt)"))
    if problems:
        listing = "; ".join(str(p) for p in problems)
        raise BundleError(f"{bundle}: bundle does not match its manifest: {listing}")


def onnx_files(manifest: Manifest, entry: FileEntry) -> list[FileEntry]:
    """An ONNX entry plus its external-data entry (`<name>.data`) when the manifest lists one."""
    data = entry.path + ".data"
    return [entry] + [f for f in manifest.files if f.path == data]


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


class OnnxRuntimeVision:
    """ONNX Runtime session on CPU or CUDA. `session.run` is thread-safe, so encode is too."""

    def __init__(
        self,
        onnx_path: Path,
        *,
        precision: str,
        device: str = "cpu",
        threads: int | None = None,
        device_id: int = 0,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise VisionError(f"onnxruntime is not installed: {ORT_CPU_INSTALL} (or [gpu])") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise VisionError(f"ONNX Runtime has no CUDA provider here: {ORT_GPU_INSTALL}")
            # device_id: the GPU the caller asked for (ONNX Runtime otherwise always takes GPU 0).
            providers = [("CUDAExecutionProvider", {"device_id": int(device_id)}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise VisionError(f"{onnx_path}: ONNX Runtime cannot load it ({e})") from e
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise VisionError("ONNX Runtime could not initialise CUDA (driver/CUDA/cuDNN mismatch?)")
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if INPUT_NAME not in names_in or OUTPUT_NAME not in names_out:
            raise VisionError(
                f"{onnx_path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                f"found inputs {names_in} and outputs {names_out}"
            )
        out = next(o for o in self.session.get_outputs() if o.name == OUTPUT_NAME)
        self.width = out.shape[-1] if isinstance(out.shape[-1], int) else None
        self.name = f"onnxruntime-{device}"
        self.device = device
        self.device_id = int(device_id) if device == "cuda" else None
        self.precision = precision
        self.threads = opts.intra_op_num_threads

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        tiles = validate_tiles(tiles)
        try:
            return self._encode(tiles)
        except Exception as e:  # onnxruntime's own error types (Fail, RuntimeException, OOM)
            raise VisionError(f"{self.name} {self.precision}: ONNX Runtime failed to run ({e})") from e

    def _encode(self, tiles: np.ndarray) -> np.ndarray:
        if self.device == "cpu":
            # One tile per run: a 7-tile batch grows ONNX Runtime's CPU arena by ~760 MB per call
            # for no speed gain (measured with SigLIP-so400m, eyecare_edge.perf).
            outs = [
                self.session.run([OUTPUT_NAME], {INPUT_NAME: tiles[i : i + 1]})[0] for i in range(len(tiles))
            ]
            return np.asarray(np.concatenate(outs, axis=0), dtype=np.float32)
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: tiles})[0]
        return np.asarray(out, dtype=np.float32)


class OpenVinoVision:
    """OpenVINO reading the same ONNX (optional extra `openvino`); BF16/INT8 kernels where the CPU
    has them. Asked for by name only (`backend="openvino"`); `auto` does not try it."""

    def __init__(self, onnx_path: Path, *, precision: str, threads: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise VisionError("OpenVINO is not installed: pip install 'eyecare-edge[openvino]'") from e
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads or default_threads(), "PERFORMANCE_HINT": "LATENCY"}
        try:
            self.model = core.compile_model(str(onnx_path), "CPU", config)
        except Exception as e:
            raise VisionError(f"{onnx_path}: OpenVINO cannot compile it ({e})") from e
        self._lock = threading.Lock()  # one infer request: serialise its use
        self.request = self.model.create_infer_request()
        self.name = "openvino-cpu"
        self.precision = precision
        self.width = None

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        with self._lock:
            result = self.request.infer({INPUT_NAME: validate_tiles(tiles)})
            return np.array(result[self.model.output(OUTPUT_NAME)], dtype=np.float32)


@dataclass
class VisionChoice:
    """What `open_vision` took, and why the faster options were skipped.

    skipped: "backend precision: reason" for each pair tried (or ruled out) before the chosen one.
    device: the GPU ordinal the encoder runs on, None on the CPU.
    """

    encoder: VisionEncoder
    skipped: list[str] = field(default_factory=list)
    device: int | None = None

    @property
    def where(self) -> str:
        """"GPU 0" or "CPU": where the vision half runs."""
        return "CPU" if self.device is None else f"GPU {self.device}"

    def describe(self) -> str:
        """One line: the backend, precision and device taken, and the first sentence of each skip reason."""
        why = f" (skipped {'; '.join(_first_sentence(s) for s in self.skipped)})" if self.skipped else ""
        return f"vision: {self.encoder.name} {self.encoder.precision} on {self.where}{why}"


def _first_sentence(text: str, limit: int = 160) -> str:
    head = text.split(". ", 1)[0]
    return head if len(head) <= limit else head[: limit - 3] + "..."


def _onnx_entry(manifest: Manifest, precision: str) -> FileEntry:
    entry = manifest.find("vision", format="onnx", precision=precision)
    if entry is None:
        have = ", ".join(manifest.precisions("vision", "onnx")) or "none"
        hint = " (re-export it: `eyecare-edge export` writes FP16 by default)" if precision == "fp16" else ""
        raise VisionError(f"bundle has no {precision} vision ONNX (it has: {have}){hint}")
    return entry


def validated(manifest: Manifest, precision: str) -> bool:
    """False only when export recorded a failed check for this vision precision."""
    check = manifest.validation.get(f"vision_{precision}")
    return check is None or bool(check.get("passed", True))


def fp16_based(manifest: Manifest, precision: str) -> bool:
    """True when the bundle's ONNX of `precision` computes in FP16 between its Q/DQ pairs (the
    TensorRT INT8 input since export writes it on an FP16 base): slow on a CPU."""
    entry = manifest.find("vision", format="onnx", precision=precision)
    return entry is not None and (entry.extra or {}).get("base") == "fp16"


def cpu_precision_order(manifest: Manifest) -> list[str]:
    """Fastest first among what the bundle holds and export did not fail (INT8 U8S8 is ORT's
    fast path on x86; S8S8 next when it has an FP32 base; FP32 last; FP16 — and INT8 on an FP16
    base, TensorRT's file — run slowly on CPUs and are never chosen)."""
    have = set(manifest.precisions("vision", "onnx"))
    return [
        p
        for p in ("int8_u8s8", "int8", "fp32")
        if p in have and validated(manifest, p) and not fp16_based(manifest, p)
    ]


def candidates(backend: str, precision: str) -> list[tuple[str, str]]:
    """The (backend, precision) pairs `open_vision` tries, in order.

    backend auto: `AUTO_ORDER`. An explicit backend: its pairs of `AUTO_ORDER` (TensorRT: fp16 then
    int8; ORT CUDA: fp16 then fp32). An explicit precision replaces the pair's precision (each
    backend then tried once with it).
    """
    if backend not in BACKENDS:
        raise VisionError(f"unknown vision backend {backend!r}; known: {', '.join(BACKENDS)}")
    if precision != "auto" and precision not in PRECISIONS:
        raise VisionError(f"unknown vision precision {precision!r}; known: auto, {', '.join(PRECISIONS)}")
    pairs = [pair for pair in AUTO_ORDER if backend in ("auto", pair[0])] or [(backend, "auto")]
    if precision == "auto":
        return pairs
    return [(name, precision) for name in dict.fromkeys(name for name, _ in pairs)]


def backend_ready(name: str, device: int = 0) -> tuple[bool, str]:
    """(True, version) when `name`'s libraries (and for a GPU backend the GPU) are here, else
    (False, why and how to install). Cheap: imports and a CUDA driver query, no model loaded —
    `open_vision` asks it before hashing files, `doctor` reports it."""
    if name == "tensorrt":
        from eyecare_edge import tensorrt_runtime as trt_rt

        ok, detail = trt_rt.tensorrt_available()
        if not ok:
            return False, detail
        try:
            trt_rt.gpu_info(device)
        except trt_rt.TensorRTError as e:
            return False, f"TensorRT {detail} is installed but GPU {device} is not usable: {e}"
        return True, detail
    if name == "openvino":
        try:
            import openvino as ov
        except Exception as e:
            return False, f"OpenVINO is not installed ({e}): pip install 'eyecare-edge[openvino]'"
        return True, str(getattr(ov, "__version__", "?"))
    try:
        import onnxruntime as ort
    except Exception as e:
        return False, f"onnxruntime is not installed ({e}): {ORT_CPU_INSTALL}"
    version = str(getattr(ort, "__version__", "?"))
    if name == "ort-cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return False, f"ONNX Runtime {version} has no CUDA provider here: {ORT_GPU_INSTALL}"
        from eyecare_edge import tensorrt_runtime as trt_rt

        try:
            trt_rt.gpu_info(device)
        except trt_rt.TensorRTError as e:
            return False, f"ONNX Runtime {version} has a CUDA provider but GPU {device} is not usable: {e}"
    return True, version


def open_vision(
    bundle: str | os.PathLike[str],
    manifest: Manifest,
    *,
    precision: str = "auto",
    backend: str = "auto",
    threads: int | None = None,
    device: int = 0,
    build_engine: bool = True,
    check: FileCheck | None = None,
    progress: Callable[[str], None] | None = None,
) -> VisionChoice:
    """Open the vision encoder of `bundle`.

    precision: fp32 | fp16 | int8 | int8_u8s8 | auto (GPU: fp16, then int8 on TensorRT or fp32 on
    ONNX Runtime CUDA; CPU: the fastest validated CPU variant). backend: auto | tensorrt | ort-cuda |
    openvino | ort-cpu (see `candidates`). threads: CPU threads (ONNX Runtime intra-op, OpenVINO);
    None = physical cores. device: GPU ordinal (TensorRT and ONNX Runtime CUDA). build_engine: let
    TensorRT build a missing or stale engine into the bundle (False: fail instead). check: called
    with the manifest entries a backend is about to read, before it reads them (raise to refuse).
    progress: one-line notices of slow steps (a first-use TensorRT build).

    Raises VisionError: with `auto`, listing every pair's reason when none loads; with an explicit
    backend, that backend's reason(s). BundleError from `check` is raised as is.
    """
    pairs = candidates(backend, precision)
    root = Path(bundle)
    skipped: list[str] = []
    ready: dict[str, tuple[bool, str]] = {}
    for name, p in pairs:
        if name not in ready:
            ready[name] = backend_ready(name, device)
        ok, why = ready[name]
        if not ok:
            skipped.append(f"{name} {p}: {why}")
            continue
        try:
            encoder = _open_one(name, root, manifest, p, threads, device, build_engine, check, progress)
        except BundleError:
            raise
        except VisionError as e:
            skipped.append(f"{name} {p}: {e}")
        except Exception as e:  # the backend's own failure: TypeError, MemoryError, RuntimeError...
            skipped.append(f"{name} {p}: {type(e).__name__}: {e}")
        else:
            return VisionChoice(encoder, skipped, device if name in GPU_BACKENDS else None)
    if backend == "auto":
        raise VisionError("no vision backend could load: " + "; ".join(skipped))
    raise VisionError(f"vision backend {backend} cannot run here: " + "; ".join(skipped))


def _open_one(
    name: str,
    root: Path,
    manifest: Manifest,
    precision: str,
    threads: int | None,
    device: int,
    build_engine: bool,
    check: FileCheck | None,
    progress: Callable[[str], None] | None,
) -> VisionEncoder:
    if name == "tensorrt":
        from eyecare_edge import tensorrt_runtime as trt_rt

        p = "fp16" if precision == "auto" else precision
        if not validated(manifest, p):
            raise VisionError(f"export recorded a failed check for the {p} vision ONNX")
        return trt_rt.open_tensorrt_vision(
            root, manifest, p, device=device, build=build_engine, check=check, progress=progress
        )
    if name == "ort-cuda":
        p = "fp16" if precision == "auto" else precision
        if not validated(manifest, p):
            raise VisionError(f"export recorded a failed check for the {p} vision ONNX")
        entry = _onnx_entry(manifest, p)
        if check is not None:
            check(onnx_files(manifest, entry))
        return OnnxRuntimeVision(
            root / entry.path, precision=p, device="cuda", threads=threads, device_id=device
        )
    options = cpu_precision_order(manifest) if precision == "auto" else [precision]
    if not options:
        raise VisionError("bundle has no validated CPU vision ONNX")
    p = options[0]
    entry = _onnx_entry(manifest, p)
    if check is not None:
        check(onnx_files(manifest, entry))
    path = root / entry.path
    if name == "openvino":
        return OpenVinoVision(path, precision=p, threads=threads)
    return OnnxRuntimeVision(path, precision=p, device="cpu", threads=threads)


def newline_entry(manifest: Manifest) -> FileEntry:
    entry = manifest.find("extra", format="npy")
    if entry is None:
        raise BundleError("manifest lists no image_newline .npy")
    return entry


def load_newline(bundle: str | os.PathLike[str], manifest: Manifest) -> np.ndarray:
    """The learned `image_newline` vector, float32 [d]."""
    entry = newline_entry(manifest)
    try:
        newline = np.load(Path(bundle) / entry.path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{bundle}: {entry.path}: unreadable .npy ({e})") from e
    return np.ascontiguousarray(newline, dtype=np.float32).reshape(-1)
