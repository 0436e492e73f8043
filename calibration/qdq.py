"""INT8 vision ONNX with explicit Q/DQ nodes, calibrated on real tiles with bounded memory.

What gets quantized (measured to matter, see ANCHORS.md): only the weight GEMMs — MatMul/Gemm
whose weight is an initializer — and the patch-embedding Conv. Their activation input gets a
QuantizeLinear -> DequantizeLinear pair, their weight is stored as int8 with per-output-channel
scales behind a DequantizeLinear. Attention MatMuls (activation x activation), Softmax,
LayerNorm, GELU and the residual Adds stay float. Biases stay float (TensorRT fuses a float bias
into the int8 GEMM; an int32 bias DQ is something it does not take).

Two variants from one calibration:

* `int8` (symmetric_activations=True): int8 activations with zero point 0, int8 weights with zero
  point 0 — S8S8, what TensorRT 10 and 11 build INT8 engines from (TensorRT is symmetric only).
* `int8_u8s8` (symmetric_activations=False): uint8 asymmetric activations, int8 symmetric
  weights — the variant ONNX Runtime's CPU provider fuses into integer GEMMs for every weight
  MatMul (0.82 s vs 1.20 s per so400m tile on a 2-core AVX-512 CPU). Use it for the CPU runtime.

Calibration without ORT's calibrator (which holds every intermediate of so400m at once: 12-19 GB):
the FP32 graph is extended with a ReduceMin and a ReduceMax on each tensor to be quantized, and
those scalars are its extra outputs. ONNX Runtime frees each intermediate after its reduction,
so calibrating costs the memory of plain inference on `batch_tiles` tiles. For `method=
"percentile"` a second pass exposes the tensors themselves, in groups sized to
`max_output_bytes`, and histograms |x| on the range the first pass found.

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
from onnx import TensorProto, helper, numpy_helper

from eyecare_edge.bundle import sha256_files
from eyecare_edge.errors import EyecareError

QDQ_VERSION = 1
METHODS = ("minmax", "percentile")
EXTERNAL_DATA_THRESHOLD = 2**31
_HIST_BINS = 2048


class QuantizationError(EyecareError, ValueError):
    """The model or the calibration data cannot be quantized; the message says which and why."""


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


@dataclass(frozen=True)
class WeightGemm:
    """A node whose weight input is an initializer: the only kind that gets Q/DQ."""

    node: str
    op_type: str
    activation: str
    weight: str
    axis: int  # output-channel axis of the weight (per-channel scales run along it)


@dataclass
class TensorRange:
    min: float
    max: float
    threshold: float | None = None  # percentile of |x| when method == "percentile"

    @property
    def amax(self) -> float:
        return max(abs(self.min), abs(self.max))


# --- graph inspection --------------------------------------------------------------------------


def find_weight_gemms(model: onnx.ModelProto) -> list[WeightGemm]:
    """MatMul/Gemm with an initializer weight and an activation input, and Conv with an
    initializer kernel. Activation x activation MatMuls (attention) are not listed."""
    inits = {t.name: t for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if x in inits or w not in inits or inits[w].data_type != TensorProto.FLOAT:
            continue
        rank = len(inits[w].dims)
        if node.op_type == "MatMul" and rank == 2:
            out.append(WeightGemm(node.name, "MatMul", x, w, 1))
        elif node.op_type == "Gemm" and rank == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            out.append(WeightGemm(node.name, "Gemm", x, w, 0 if trans_b else 1))
        elif node.op_type == "Conv" and rank >= 3:
            out.append(WeightGemm(node.name, "Conv", x, w, 0))
    return out


def model_sha256(path: str | Path) -> str:
    """sha256 over an ONNX file and its external-data file(s), in a fixed order."""
    path = Path(path)
    return sha256_files([path, *_external_files(path)])


def _external_files(path: Path) -> list[Path]:
    skeleton = onnx.load(os.fspath(path), load_external_data=False)
    locations = set()
    for t in skeleton.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            locations.update(e.value for e in t.external_data if e.key == "location")
    return [path.parent / loc for loc in sorted(locations)]


def _save_onnx(model: onnx.ModelProto, path: Path, threshold: int) -> None:
    """Write `model`, weights in one `<name>.data` file when above `threshold` bytes."""
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    size = sum(
        int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in model.graph.initializer
    )
    if size > threshold:
        onnx.save_model(
            model,
            os.fspath(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, os.fspath(path))


def _copy_onnx(src: Path, dst: Path, threshold: int) -> None:
    """Copy an ONNX file; with external data, re-save so the data file is named after `dst`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if _external_files(src):
        _save_onnx(onnx.load(os.fspath(src)), dst, threshold)
    else:
        stale = dst.with_name(dst.name + ".data")
        if stale.exists():
            stale.unlink()
        shutil.copyfile(src, dst)


# --- calibration -------------------------------------------------------------------------------


def _session(src: Path, workdir: Path, threads: int | None, modify):
    """An ORT CPU session for `src` changed by `modify(model)` (extra outputs).

    The changed graph is written to `workdir` (external weights are linked, not copied) and
    dropped before ONNX Runtime loads it, so only one copy of the weights is resident.
    """
    import onnxruntime as ort

    for f in _external_files(src):
        link = workdir / f.name
        if not link.exists():
            os.symlink(f.resolve(), link)
    model = onnx.load(os.fspath(src), load_external_data=False)
    modify(model)
    path = workdir / "calibrate.onnx"
    onnx.save_model(model, os.fspath(path))
    del model
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])


def _batches(tiles: np.ndarray, batch_tiles: int) -> Iterable[np.ndarray]:
    for i in range(0, tiles.shape[0], batch_tiles):
        yield tiles[i : i + batch_tiles]


def _input_name(model: onnx.ModelProto) -> str:
    inits = {t.name for t in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in inits]
    if len(names) != 1:
        raise QuantizationError(f"expected one graph input, found {names}")
    return names[0]


def collect_ranges(
    fp32_onnx: str | Path,
    tensors: list[str],
    tiles: np.ndarray,
    *,
    method: str = "minmax",
    percentile: float = 99.99,
    batch_tiles: int = 2,
    max_output_bytes: int = 1 << 30,
    threads: int | None = None,
) -> dict[str, TensorRange]:
    """Min/max (and, for "percentile", the percentile of |x|) of each tensor over all tiles.

    Memory stays that of plain inference on `batch_tiles` tiles (+ `max_output_bytes` of exposed
    tensors in the percentile pass), whatever the model size.
    """
    src = Path(fp32_onnx)
    skeleton = onnx.load(os.fspath(src), load_external_data=False)
    feed = _input_name(skeleton)
    per_tile = _tensor_elems_per_tile(skeleton) if method == "percentile" else {}
    del skeleton
    ranges: dict[str, TensorRange] = {}

    def add_reductions(model: onnx.ModelProto) -> None:
        g = model.graph
        for i, name in enumerate(tensors):
            for op in ("ReduceMin", "ReduceMax"):
                out = f"__calib_{i}_{op}"
                g.node.append(helper.make_node(op, [name], [out], name=out, keepdims=0))
                g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, []))

    with tempfile.TemporaryDirectory(prefix="eyecare-calib-") as tmp:
        work = Path(tmp)
        # Pass 1: scalar min/max of every tensor, computed inside the graph.
        sess = _session(src, work, threads, add_reductions)
        out_names = [o.name for o in sess.get_outputs()]
        lo = np.full(len(tensors), np.inf)
        hi = np.full(len(tensors), -np.inf)
        for batch in _batches(tiles, batch_tiles):
            values = dict(zip(out_names, sess.run(None, {feed: batch}), strict=True))
            for i in range(len(tensors)):
                lo[i] = min(lo[i], float(values[f"__calib_{i}_ReduceMin"]))
                hi[i] = max(hi[i], float(values[f"__calib_{i}_ReduceMax"]))
        del sess
        for i, name in enumerate(tensors):
            if not (np.isfinite(lo[i]) and np.isfinite(hi[i])):
                raise QuantizationError(
                    f"{src}: tensor {name!r} has non-finite values on the calibration tiles"
                )
            ranges[name] = TensorRange(float(lo[i]), float(hi[i]))
        if method == "percentile":
            _percentiles(
                src,
                feed,
                per_tile,
                work,
                tensors,
                tiles,
                ranges,
                percentile,
                batch_tiles,
                max_output_bytes,
                threads,
            )
    return ranges


def _tensor_elems_per_tile(skeleton: onnx.ModelProto) -> dict[str, int | None]:
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    sizes: dict[str, int | None] = {}
    for vi in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        static = [d.dim_value for d in dims[1:]]
        sizes[vi.name] = int(np.prod(static)) if dims and all(static) else None
    return sizes


def _percentiles(
    src: Path,
    feed: str,
    per_tile: dict[str, int | None],
    work: Path,
    tensors: list[str],
    tiles: np.ndarray,
    ranges: dict[str, TensorRange],
    percentile: float,
    batch_tiles: int,
    max_output_bytes: int,
    threads: int | None,
) -> None:
    """Pass 2: histogram |x| per tensor on [0, amax]; groups of tensors bounded by bytes."""
    groups: list[list[str]] = [[]]
    used = 0
    for name in tensors:
        n = per_tile.get(name)
        cost = (n or max_output_bytes) * 4 * batch_tiles
        if groups[-1] and used + cost > max_output_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += cost
    for group in groups:

        def expose(model: onnx.ModelProto, group: list[str] = group) -> None:
            del model.graph.output[:]
            model.graph.output.extend(
                helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in group
            )

        sess = _session(src, work, threads, expose)
        hists = {n: np.zeros(_HIST_BINS, dtype=np.int64) for n in group}
        for batch in _batches(tiles, batch_tiles):
            for name, value in zip(group, sess.run(group, {feed: batch}), strict=True):
                amax = ranges[name].amax or 1.0
                hists[name] += np.histogram(np.abs(value), bins=_HIST_BINS, range=(0.0, amax))[0]
        del sess
        for name in group:
            cdf = np.cumsum(hists[name])
            k = int(np.searchsorted(cdf, cdf[-1] * percentile / 100.0))
            amax = ranges[name].amax
            ranges[name].threshold = min(amax, amax * (k + 1) / _HIST_BINS)


# --- Q/DQ graph ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _QParams:
    scale: float
    zero_point: int
    dtype: int  # TensorProto.INT8 or UINT8


def activation_qparams(r: TensorRange, *, symmetric: bool, min_scale: float = 0.0) -> _QParams:
    """Scale/zero point of an activation: symmetric int8 (zp 0) or asymmetric uint8; the scale
    is at least `min_scale`."""
    if symmetric:
        a = r.threshold if r.threshold is not None else r.amax
        return _QParams(max(a / 127.0, min_scale) if a > 0 else 1.0, 0, TensorProto.INT8)
    lo, hi = min(r.min, 0.0), max(r.max, 0.0)
    if r.threshold is not None:
        lo, hi = max(lo, -r.threshold), min(hi, r.threshold)
    scale = max((hi - lo) / 255.0, min_scale) if hi > lo else 1.0
    zp = int(np.clip(np.rint(-lo / scale), 0, 255))
    return _QParams(scale, zp, TensorProto.UINT8)


def quantize_weight(
    w: np.ndarray, axis: int, *, per_channel: bool, reduce_range: bool = False, min_scale: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 weights in [-127, 127] ([-63, 63] with `reduce_range`) and their scales
    ([C] along `axis`, or a scalar; each at least `min_scale`, the weights rounded for it)."""
    qmax = 63.0 if reduce_range else 127.0
    if per_channel:
        other = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.abs(w).max(axis=other)
    else:
        amax = np.asarray(np.abs(w).max())
    scale = np.where(amax > 0, np.maximum(amax / qmax, min_scale), 1.0).astype(np.float32)
    shape = [1] * w.ndim
    if per_channel:
        shape[axis] = -1
    q = np.clip(np.rint(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return q, scale


def insert_qdq(
    model: onnx.ModelProto,
    gemms: list[WeightGemm],
    ranges: dict[str, TensorRange],
    *,
    symmetric_activations: bool,
    per_channel: bool,
    reduce_range: bool = False,
    min_scale: float = 0.0,
) -> int:
    """Rewrite `model` in place: Q/DQ on each GEMM's activation, int8 weight + DQ. Returns the count."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    by_node = {q.node: q for q in gemms}
    q_out: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    new_inits: list[onnx.TensorProto] = []
    weight_q: dict[str, tuple[str, str, str, int]] = {}

    def const(name: str, arr: np.ndarray) -> str:
        new_inits.append(numpy_helper.from_array(arr, name))
        return name

    for node in g.node:
        q = by_node.get(node.name)
        if q is None:
            new_nodes.append(node)
            continue
        act = q.activation
        p = activation_qparams(ranges[act], symmetric=symmetric_activations, min_scale=min_scale)
        np_dtype = np.int8 if p.dtype == TensorProto.INT8 else np.uint8
        if act not in q_out:
            scale = const(f"{act}_scale", np.array(p.scale, dtype=np.float32))
            zp = const(f"{act}_zero_point", np.array(p.zero_point, dtype=np_dtype))
            q_out[act] = f"{act}_quantized"
            new_nodes.append(
                helper.make_node(
                    "QuantizeLinear", [act, scale, zp], [q_out[act]], name=f"{act}_QuantizeLinear"
                )
            )
        dq_act = f"{act}_dequantized_for_{node.name}"
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [q_out[act], f"{act}_scale", f"{act}_zero_point"],
                [dq_act],
                name=f"{act}_DequantizeLinear_{node.name}",
            )
        )
        if q.weight not in weight_q:
            w = numpy_helper.to_array(inits[q.weight])
            wq, ws = quantize_weight(
                w, q.axis, per_channel=per_channel, reduce_range=reduce_range, min_scale=min_scale
            )
            qname = const(f"{q.weight}_quantized", wq)
            sname = const(f"{q.weight}_scale", ws)
            zname = const(f"{q.weight}_zero_point", np.zeros(ws.shape, dtype=np.int8))
            weight_q[q.weight] = (qname, sname, zname, q.axis)
        qname, sname, zname, axis = weight_q[q.weight]
        dq_w = f"{q.weight}_dequantized_for_{node.name}"
        attrs = {"axis": axis} if per_channel else {}
        new_nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [qname, sname, zname],
                [dq_w],
                name=f"{q.weight}_DequantizeLinear_{node.name}",
                **attrs,
            )
        )
        node.input[0] = dq_act
        node.input[1] = dq_w
        new_nodes.append(node)

    still_used = {name for n in new_nodes for name in n.input}
    kept = [t for t in g.initializer if t.name in still_used or t.name not in weight_q]
    del g.initializer[:]
    g.initializer.extend(kept + new_inits)
    del g.node[:]
    g.node.extend(new_nodes)
    return len(by_node)


# --- the entry point ----------------------------------------------------------------------------


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
        _copy_onnx(entry / "model.onnx", dst, external_data_threshold)
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
    _save_onnx(model, dst, external_data_threshold)
    del model
    onnx.checker.check_model(os.fspath(dst))
    _write_ranges(ranges_dst, ranges, settings, src)

    if entry is not None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
        _copy_onnx(dst, tmp / "model.onnx", external_data_threshold)
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
