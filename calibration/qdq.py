"""INT8 vision ONNX with explicit Q/DQ nodes, calibrated on real tiles with bounded memory.

What gets quantized (`qdq_graph`): only the weight GEMMs and the patch-embedding Conv, activations
through a QuantizeLinear -> DequantizeLinear pair, weights as int8 with per-output-channel scales.

Two variants from one calibration:

* `int8` (symmetric_activations=True): int8 activations with zero point 0, int8 weights with zero
  point 0 — S8S8, what TensorRT 10 and 11 build INT8 engines from (TensorRT is symmetric only).
* `int8_u8s8` (symmetric_activations=False): uint8 asymmetric activations, int8 symmetric
  weights — the variant ONNX Runtime's CPU provider fuses into integer GEMMs for every weight
  MatMul (0.82 s vs 1.20 s per so400m tile on a 2-core AVX-512 CPU). Use it for the CPU runtime.

Calibration (`ranges`) runs the FP32 graph in ONNX Runtime with a ReduceMin/ReduceMax on each
tensor to be quantized, so it costs the memory of plain inference on `batch_tiles` tiles.

Results are cached by sha256(FP32 ONNX) + data digest + settings: a second export with the same
model and calibration data copies the cached file instead of recalibrating. The measured ranges
are cached on their own (model + data + range method), so making the second variant (U8S8 after
S8S8) reuses the calibration run and only rebuilds the graph.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from eyecare_edge.calibration.data import tiles_digest
from eyecare_edge.calibration.onnx_files import copy_onnx, model_sha256, save_onnx
from eyecare_edge.calibration.qdq_graph import activation_qparams, find_weight_gemms, insert_qdq
from eyecare_edge.calibration.ranges import QuantizationError, TensorRange, collect_ranges
from onnx import TensorProto, helper

QDQ_VERSION = 1
METHODS = ("minmax", "percentile")
EXTERNAL_DATA_THRESHOLD = 2**31


@dataclass(frozen=True)
class QuantSettings:
    symmetric_activations: bool = True
    per_channel: bool = True
    method: str = "minmax"
    percentile: float = 99.99
    # 7-bit weights ([-63, 63]). ONNX Runtime's x86 integer GEMM without VNNI (AVX2, AVX-512F)
    # multiplies u8 x s8 pairs into saturating int16 sums; 7-bit weights cannot saturate. Measured
    # on the tiny model (AVX2 CPU): 8-bit weights cosine 0.9976 fused vs 0.9996 exact Q/DQ;
    # 7-bit 0.9989 both ways. On by default for the CPU variant only: TensorRT accumulates exactly.
    reduce_range: bool = False
    # Floor of every scale (weights and activations). 0 for FP32 graphs; float16's smallest normal
    # (6.1e-5) for the TensorRT variant, whose Q/DQ run on an FP16 base: a weight channel with
    # |w| < 0.0078 would otherwise get a scale that is 0 or subnormal in FP16, which TensorRT
    # rejects. The int8 values are computed for the clamped scale, so nothing else changes.
    min_scale: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; expected one of {METHODS}")
        if not 90.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (90, 100], got {self.percentile}")

    @property
    def precision(self) -> str:
        return "int8" if self.symmetric_activations else "int8_u8s8"


@dataclass
class QuantizeResult:
    path: Path
    precision: str
    n_quantized_nodes: int
    n_calibration_tiles: int
    cache_hit: bool
    ranges_path: Path
    cache_key: str
    settings: dict
    seconds: float
    # The activation ranges came from the cache (another variant of the same model and data was
    # calibrated before): only the graph was rebuilt.
    ranges_reused: bool = False


def _as_tile_array(tiles: Iterable[np.ndarray]) -> np.ndarray:
    arrays = []
    for t in tiles:
        a = np.asarray(t, dtype=np.float32)
        arrays.append(a[None] if a.ndim == 3 else a)
    if not arrays:
        raise QuantizationError("no calibration tiles were given")
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) != 1 or any(a.ndim != 4 for a in arrays):
        raise QuantizationError(
            f"calibration tiles must all be [T, 3, S, S] of one size, got {sorted(shapes)}"
        )
    return np.concatenate(arrays, axis=0)


def _cache_key(model_digest: str, data: str, settings: QuantSettings) -> str:
    blob = json.dumps(
        {"version": QDQ_VERSION, "model": model_digest, "data": data, "settings": asdict(settings)},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _ranges_key(model_digest: str, data: str, settings: QuantSettings) -> str:
    """Ranges depend on model, data and the range method, not on how they become scales."""
    blob = json.dumps(
        {
            "version": QDQ_VERSION,
            "model": model_digest,
            "data": data,
            "method": settings.method,
            "percentile": settings.percentile if settings.method == "percentile" else None,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_cached_ranges(path: Path, tensors: list[str]) -> tuple[dict[str, TensorRange], int] | None:
    try:
        data = json.loads(path.read_text())
        ranges = {name: TensorRange(**data["ranges"][name]) for name in tensors}
        return ranges, int(data["n_tiles"])
    except (OSError, KeyError, TypeError, ValueError):
        return None  # unreadable or for other tensors: calibrate again


def _write_cached_ranges(path: Path, ranges: dict[str, TensorRange], n_tiles: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    payload = {"n_tiles": n_tiles, "ranges": {k: asdict(v) for k, v in ranges.items()}}
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def ranges_path_for(dst: str | Path) -> Path:
    """`vision_int8.onnx` -> `vision_int8.ranges.json` (the measured ranges and chosen scales)."""
    dst = Path(dst)
    return dst.with_name(dst.name.removesuffix(".onnx") + ".ranges.json")


def quantize_vision_int8(
    fp32_onnx: str | Path,
    dst: str | Path,
    tiles: Iterable[np.ndarray],
    *,
    symmetric_activations: bool = True,
    per_channel: bool = True,
    method: str = "minmax",
    percentile: float = 99.99,
    reduce_range: bool | None = None,
    min_scale: float = 0.0,
    cache_dir: str | Path | None = None,
    data_digest: str | None = None,
    batch_tiles: int = 2,
    max_output_bytes: int = 1 << 30,
    threads: int | None = None,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> QuantizeResult:
    """Calibrate the FP32 vision ONNX on `tiles` and write its Q/DQ INT8 version to `dst`.

    `tiles`: arrays [T, 3, S, S] (or single tiles [3, S, S]) from the shared preprocessing, e.g.
    `calibration_tiles(...)`. With `data_digest` (from `calibration.data.data_digest`) a cache
    hit does not even consume `tiles`; without it the digest is taken of the tiles themselves.
    Also writes `<dst stem>.ranges.json` with every tensor's range, scale and zero point.
    `reduce_range=None` means 7-bit weights for the asymmetric (CPU) variant only. `min_scale`:
    floor of every scale (float16's smallest normal for a graph that will be converted to FP16).
    """
    t0 = time.perf_counter()
    if reduce_range is None:
        reduce_range = not symmetric_activations
    settings = QuantSettings(symmetric_activations, per_channel, method, percentile, reduce_range, min_scale)
    src, dst = Path(fp32_onnx), Path(dst)
    if not src.is_file():
        raise QuantizationError(f"{src}: FP32 ONNX not found")
    tile_array = None
    if data_digest is None:
        tile_array = _as_tile_array(tiles)
        data_digest = tiles_digest([tile_array])
    model_digest = model_sha256(src)
    key = _cache_key(model_digest, data_digest, settings)
    entry = Path(cache_dir) / f"{settings.precision}-{key[:32]}" if cache_dir is not None else None
    ranges_dst = ranges_path_for(dst)

    if entry is not None and (entry / "result.json").is_file():
        meta = json.loads((entry / "result.json").read_text())
        copy_onnx(entry / "model.onnx", dst, external_data_threshold)
        shutil.copyfile(entry / "ranges.json", ranges_dst)
        return QuantizeResult(
            path=dst,
            precision=settings.precision,
            n_quantized_nodes=meta["n_quantized_nodes"],
            n_calibration_tiles=meta["n_calibration_tiles"],
            cache_hit=True,
            ranges_path=ranges_dst,
            cache_key=key,
            settings=asdict(settings),
            seconds=time.perf_counter() - t0,
        )

    model = onnx.load(os.fspath(src))
    gemms = find_weight_gemms(model)
    if not gemms:
        raise QuantizationError(f"{src}: no weight MatMul/Gemm/Conv to quantize")
    activations = list(dict.fromkeys(q.activation for q in gemms))
    del model  # not resident while ONNX Runtime holds its own copy of the weights
    ranges_cache = (
        Path(cache_dir) / f"ranges-{_ranges_key(model_digest, data_digest, settings)[:32]}.json"
        if cache_dir is not None
        else None
    )
    cached = _read_cached_ranges(ranges_cache, activations) if ranges_cache is not None else None
    if cached is not None:
        ranges, n_tiles = cached
    else:
        if tile_array is None:
            tile_array = _as_tile_array(tiles)
        n_tiles = int(tile_array.shape[0])
        ranges = collect_ranges(
            src,
            activations,
            tile_array,
            method=method,
            percentile=percentile,
            batch_tiles=batch_tiles,
            max_output_bytes=max_output_bytes,
            threads=threads,
        )
        if ranges_cache is not None:
            _write_cached_ranges(ranges_cache, ranges, n_tiles)
    model = onnx.load(os.fspath(src))
    n = insert_qdq(
        model,
        gemms,
        ranges,
        symmetric_activations=symmetric_activations,
        per_channel=per_channel,
        reduce_range=reduce_range,
        min_scale=min_scale,
    )
    props = {p.key: p.value for p in model.metadata_props}
    props.update(
        {
            "eyecare.precision": settings.precision,
            "eyecare.qdq": json.dumps({**asdict(settings), "n_quantized_nodes": n, "tiles": n_tiles}),
        }
    )
    helper.set_model_props(model, props)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_onnx(model, dst, external_data_threshold)
    del model
    onnx.checker.check_model(os.fspath(dst))
    _write_ranges(ranges_dst, ranges, settings, src)

    if entry is not None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        copy_onnx(dst, tmp / "model.onnx", external_data_threshold)
        shutil.copyfile(ranges_dst, tmp / "ranges.json")
        (tmp / "result.json").write_text(
            json.dumps(
                {
                    "n_quantized_nodes": n,
                    "n_calibration_tiles": n_tiles,
                    "key": key,
                    "settings": asdict(settings),
                },
                indent=2,
            )
        )
        if entry.exists():
            shutil.rmtree(entry)
        shutil.move(os.fspath(tmp), os.fspath(entry))
    return QuantizeResult(
        path=dst,
        precision=settings.precision,
        n_quantized_nodes=n,
        n_calibration_tiles=n_tiles,
        cache_hit=False,
        ranges_path=ranges_dst,
        cache_key=key,
        settings=asdict(settings),
        seconds=time.perf_counter() - t0,
        ranges_reused=cached is not None,
    )


def _write_ranges(path: Path, ranges: dict[str, TensorRange], settings: QuantSettings, src: Path) -> None:
    out = {}
    for name, r in ranges.items():
        p = activation_qparams(r, symmetric=settings.symmetric_activations, min_scale=settings.min_scale)
        out[name] = {
            "min": r.min,
            "max": r.max,
            "threshold": r.threshold,
            "scale": p.scale,
            "zero_point": p.zero_point,
            "dtype": "int8" if p.dtype == TensorProto.INT8 else "uint8",
        }
    payload = {"source": src.name, "settings": asdict(settings), "tensors": out}
    path.write_text(json.dumps(payload, indent=2) + "\n")
