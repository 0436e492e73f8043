"""The bundle's TensorRT engines: which one fits this GPU, and building it once when none does.

An engine is tied to the GPU (compute capability) and the TensorRT version it was built with, so
bundles ship ONNX and the target builds the engine on first use (`ensure_engine`), records it
(with its timing cache) in the manifest under a name that says GPU and TensorRT version, and
reuses it while it fits: same TensorRT, same compute capability, same ONNX digest, enough tiles
(`is_engine_stale`). A lock outside the bundle makes two processes on a fresh bundle build once.
The profile is tuned for a typical image's tile count (`default_tile_counts`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from eyecare_edge.bundle import (
    DIGESTS,
    BundleError,
    FileEntry,
    Manifest,
    add_file,
    read_manifest,
    write_manifest,
)
from eyecare_edge.preprocess import PreprocessConfig, plan_image
from eyecare_edge.vision.engine_build import (
    ENGINE_TOLERANCES,
    EngineInfo,
    build_engine,
    onnx_digest,
    validate_engine,
)
from eyecare_edge.vision.files import onnx_files
from eyecare_edge.vision.tensorrt import (
    EngineBuildError,
    GpuInfo,
    TensorRTError,
    TensorRTVision,
    as_tensorrt_error,
    gpu_info,
    tensorrt_available,
    trt_version,
)

ENGINE_PRECISIONS = tuple(ENGINE_TOLERANCES)
# The ONNX each engine precision is built from: INT8 engines from the symmetric S8S8 Q/DQ graph.
ONNX_FOR_PRECISION = {"fp16": "vision_fp16.onnx", "int8": "vision_int8.onnx"}
# A 3:2 colour fundus photograph (HRF's 3504x2336): the tile count the profile is tuned for.
TYPICAL_IMAGE_SIZE = (2336, 3504)


def default_tile_counts(preprocess: PreprocessConfig) -> tuple[int, int]:
    """(opt, max) tiles for the profile: a 3:2 fundus photo's tile count, and the most any image
    can produce under `preprocess` (largest allowed canvas + the global view)."""
    s = preprocess.tile_size
    most = max((h // s) * (w // s) for h, w in preprocess.allowed_pinpoints()) + 1
    typical = plan_image(TYPICAL_IMAGE_SIZE, preprocess).n_tiles
    return min(typical, most), most


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


# --- find or build ------------------------------------------------------------------------------


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
    return DIGESTS.digest([path, path.with_name(path.name + ".data")], lambda: onnx_digest(path), kind="onnx")


def _usable(root: Path, entry: FileEntry | None, check: Any) -> FileEntry | None:
    """`entry` when its file is present and (if `check` is given) matches the manifest."""
    if entry is None or not (root / entry.path).is_file():
        return None
    if check is not None:
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
        with as_tensorrt_error(f"building the {precision} engine on {gpu.name}"):
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
            with as_tensorrt_error(f"checking the new {precision} engine", cleanup=root / engine_rel):
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
