"""Choosing the vision backend: which (backend, precision) pairs to try, in what order, and why
each one before the chosen was skipped.

`open_vision(..., backend="auto")` tries pairs fastest first — TensorRT FP16, TensorRT INT8, ONNX
Runtime CUDA FP16, ONNX Runtime CUDA FP32, ONNX Runtime CPU (its fastest validated variant) —
and records why each one before the chosen was skipped. Failing loudly, falling back: whatever a
backend raises while it loads (a missing package, a TensorRT builder that returns null, CUDA out
of memory, an ONNX Runtime provider error) becomes a `VisionError` naming the backend, precision
and cause; `auto` records it and tries the next pair, an explicit backend request raises it.
Only a bundle file that does not match its manifest (`BundleError`) stops the search: that is a
broken bundle, not a missing accelerator.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eyecare_edge.bundle import BundleError, FileEntry, Manifest
from eyecare_edge.formats import GPU_BACKENDS, VISION_BACKENDS
from eyecare_edge.vision.encoder import PRECISIONS, VisionEncoder, VisionError
from eyecare_edge.vision.engines import open_tensorrt_vision
from eyecare_edge.vision.files import onnx_entry, onnx_files
from eyecare_edge.vision.onnxruntime import (
    ORT_CPU_INSTALL,
    ORT_GPU_INSTALL,
    OnnxRuntimeVision,
    OpenVinoVision,
)
from eyecare_edge.vision.tensorrt import TensorRTError, gpu_info, tensorrt_available

BACKENDS = ("auto", *VISION_BACKENDS)
# (backend, precision) pairs `auto` tries, fastest first; "auto" precision on the CPU means the
# fastest validated CPU variant (`cpu_precision_order`).
AUTO_ORDER: tuple[tuple[str, str], ...] = (
    ("tensorrt", "fp16"),
    ("tensorrt", "int8"),
    ("ort-cuda", "fp16"),
    ("ort-cuda", "fp32"),
    ("ort-cpu", "auto"),
)

# Called with the manifest entries a backend is about to read, before it reads them (raise to
# refuse); the pipeline passes `eyecare_edge.bundle.require_valid` bound to the bundle.
FileCheck = Callable[[Sequence[FileEntry]], None]


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
        ok, detail = tensorrt_available()
        if not ok:
            return False, detail
        try:
            gpu_info(device)
        except TensorRTError as e:
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
        try:
            gpu_info(device)
        except TensorRTError as e:
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
        p = "fp16" if precision == "auto" else precision
        if not validated(manifest, p):
            raise VisionError(f"export recorded a failed check for the {p} vision ONNX")
        return open_tensorrt_vision(
            root, manifest, p, device=device, build=build_engine, check=check, progress=progress
        )
    if name == "ort-cuda":
        p = "fp16" if precision == "auto" else precision
        if not validated(manifest, p):
            raise VisionError(f"export recorded a failed check for the {p} vision ONNX")
        entry = onnx_entry(manifest, p)
        if check is not None:
            check(onnx_files(manifest, entry))
        return OnnxRuntimeVision(
            root / entry.path, precision=p, device="cuda", threads=threads, device_id=device
        )
    options = cpu_precision_order(manifest) if precision == "auto" else [precision]
    if not options:
        raise VisionError("bundle has no validated CPU vision ONNX")
    p = options[0]
    entry = onnx_entry(manifest, p)
    if check is not None:
        check(onnx_files(manifest, entry))
    path = root / entry.path
    if name == "openvino":
        return OpenVinoVision(path, precision=p, threads=threads)
    return OnnxRuntimeVision(path, precision=p, device="cpu", threads=threads)
