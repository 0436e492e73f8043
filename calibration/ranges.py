"""Activation ranges of the FP32 vision ONNX over calibration tiles, with bounded memory.

Calibration without ORT's calibrator (which holds every intermediate of so400m at once: 12-19 GB):
the FP32 graph is extended with a ReduceMin and a ReduceMax on each tensor to be quantized, and
those scalars are its extra outputs. ONNX Runtime frees each intermediate after its reduction,
so calibrating costs the memory of plain inference on `batch_tiles` tiles. For `method=
"percentile"` a second pass exposes the tensors themselves, in groups sized to
`max_output_bytes`, and histograms |x| on the range the first pass found.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from eyecare_edge.calibration.onnx_files import external_files
from onnx import TensorProto, helper

from eyecare_edge.errors import EyecareError

_HIST_BINS = 2048


class QuantizationError(EyecareError, ValueError):
    """The model or the calibration data cannot be quantized; the message says which and why."""


@dataclass
class TensorRange:
    min: float
    max: float
    threshold: float | None = None  # percentile of |x| when method == "percentile"

    @property
    def amax(self) -> float:
        return max(abs(self.min), abs(self.max))


def _session(src: Path, workdir: Path, threads: int | None, modify):
    """An ORT CPU session for `src` changed by `modify(model)` (extra outputs).

    The changed graph is written to `workdir` (external weights are linked, not copied) and
    dropped before ONNX Runtime loads it, so only one copy of the weights is resident.
    """
    import onnxruntime as ort

    for f in external_files(src):
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
