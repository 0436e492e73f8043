"""The Q/DQ rewrite of the vision ONNX: which nodes get quantized, their scales, the new graph.

What gets quantized (measured to matter, see ANCHORS.md): only the weight GEMMs — MatMul/Gemm
whose weight is an initializer — and the patch-embedding Conv. Their activation input gets a
QuantizeLinear -> DequantizeLinear pair, their weight is stored as int8 with per-output-channel
scales behind a DequantizeLinear. Attention MatMuls (activation x activation), Softmax,
LayerNorm, GELU and the residual Adds stay float. Biases stay float (TensorRT fuses a float bias
into the int8 GEMM; an int32 bias DQ is something it does not take).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from eyecare_edge.calibration.ranges import TensorRange
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class WeightGemm:
    """A node whose weight input is an initializer: the only kind that gets Q/DQ."""

    node: str
    op_type: str
    activation: str
    weight: str
    axis: int  # output-channel axis of the weight (per-channel scales run along it)


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
