"""FP32 ONNX -> FP16 ONNX, with the numerically sensitive ops kept in FP32.

TensorRT 11 has no FP16 builder flag: precision is what the ONNX says, built strongly typed. So
the FP16 variant is a real FP16 graph: weights and activations in float16, except the ops in
`keep_float32_ops` (LayerNormalization and the reductions — their sums and variances over 1152
channels lose digits in fp16), which get Cast nodes around them. Softmax runs in FP16: a Softmax
cast to FP32 stops TensorRT's fused attention, which keeps its own row max/sum in FP32 anyway,
and ONNX Runtime subtracts the row max first; with the query pre-scaled (`onnx_attention`) the
tiny model's FP16 graph stays at cosine_min 0.9999999 against FP32 (check: 0.999). Graph inputs
and outputs stay float32, so the runtime feeds and reads the same arrays for every precision.

Written with `onnx` directly (no onnxconverter-common) because the pass is small and must know
our rules: an initializer read by both an FP16 and an FP32 op (the exporter deduplicates equal
tensors, e.g. all-zero biases and a LayerNorm bias) is split into two typed copies, and a Cast is
made once per tensor and target type.

Applied to the S8S8 Q/DQ graph it gives TensorRT's INT8 input: int8 weight GEMMs, FP16
everywhere else (a strongly typed build of the FP32 Q/DQ graph would run every non-quantized op
in FP32). Q/DQ then take float16 data and scales, which needs opset 19; the default-domain opset
is raised from 18 to 19 for that — no op the vision exporter emits changed meaning between them
(opset 19 only added types: float8 and float16 Q/DQ, Cast's saturate for float8).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from eyecare_edge.export.onnx_vision import EXTERNAL_DATA_THRESHOLD, save_onnx
from onnx import TensorProto, helper, numpy_helper

from eyecare_edge.errors import EyecareError

DEFAULT_KEEP_FLOAT32 = (
    "LayerNormalization",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceLogSumExp",
)
# QuantizeLinear/DequantizeLinear take float16 data and scales from opset 19 on.
QDQ_FP16_OPSET = 19
# Float inputs that are parameters of the op, not data: never cast (e.g. Resize's scales).
_FLOAT32_PARAM_INPUTS: dict[str, tuple[int, ...]] = {"Resize": (2,), "Upsample": (1,)}
_FP16_MAX = float(np.finfo(np.float16).max)
# Smallest normal float16: a Q/DQ scale below it is subnormal or 0 in FP16, which TensorRT rejects.
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 6.1035e-05
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16


class Fp16ConversionError(EyecareError, ValueError):
    """The graph holds something this pass cannot convert; the message names the node."""


def _float_types(src: Path) -> dict[str, int]:
    """Element type of every tensor of the FP32 graph, from onnx shape inference.

    Inference runs on the graph without loading external weights, so it works above 2 GB.
    """
    skeleton = onnx.load(os.fspath(src), load_external_data=False)
    inferred = onnx.shape_inference.infer_shapes(skeleton)
    g = inferred.graph
    types: dict[str, int] = {}
    for vi in (*g.input, *g.output, *g.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for t in g.initializer:
        types[t.name] = t.data_type
    return types


def _hoist_constants(graph: onnx.GraphProto) -> None:
    """Constant nodes with a tensor value become initializers, so one rule types all weights."""
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(node.attribute[0].t)
            t.name = node.output[0]
            graph.initializer.append(t)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)


def _raise_opset_for_fp16_qdq(model: onnx.ModelProto, keep: set[str]) -> int | None:
    """Opset 19 when Q/DQ nodes will carry float16; returns the old opset if it was raised."""
    qdq = {"QuantizeLinear", "DequantizeLinear"} - keep
    if not any(n.op_type in qdq for n in model.graph.node):
        return None
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < QDQ_FP16_OPSET:
            old = op.version
            op.version = QDQ_FP16_OPSET
            return old
    return None


def _to_fp16(t: onnx.TensorProto, name: str) -> tuple[onnx.TensorProto, int]:
    arr = numpy_helper.to_array(t)
    clipped = int(np.count_nonzero(np.abs(arr) > _FP16_MAX))
    out = numpy_helper.from_array(np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16), name)
    return out, clipped


def _check_qdq_scales(graph: onnx.GraphProto, src: Path) -> None:
    """Refuse Q/DQ scales that float16 cannot hold as normal numbers (they would become 0 or
    subnormal, which TensorRT rejects): quantize with `min_scale=FP16_MIN_NORMAL` instead, so
    the int8 values are computed for the scale actually stored."""
    inits = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type in _QDQ_OPS and len(node.input) > 1 and node.input[1] in inits:
            scale = np.abs(numpy_helper.to_array(inits[node.input[1]]))
            if scale.size and float(scale.min()) < FP16_MIN_NORMAL:
                raise Fp16ConversionError(
                    f"{src}: node {node.name!r} has a Q/DQ scale {float(scale.min()):.3g} below float16's "
                    f"normal range ({FP16_MIN_NORMAL:.4g}); quantize with min_scale={FP16_MIN_NORMAL:.4g}"
                )


def convert_fp16(
    src: str | Path,
    dst: str | Path,
    *,
    keep_float32_ops: tuple[str, ...] | list[str] = DEFAULT_KEEP_FLOAT32,
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> Path:
    """Write the FP16 version of the FP32 ONNX `src` to `dst` and check it; returns `dst`.

    Ops named in `keep_float32_ops` compute in float32 (inputs cast up, outputs cast down);
    everything else that computes on floats runs in float16. Graph inputs/outputs stay float32.
    Weights beyond float16's range are clipped (counted in the model metadata `eyecare.fp16_clipped`).
    """
    src, dst = Path(src), Path(dst)
    keep = set(keep_float32_ops)
    types = _float_types(src)
    model = onnx.load(os.fspath(src))
    g = model.graph
    for node in g.node:
        if node.op_type in ("If", "Loop", "Scan"):
            raise Fp16ConversionError(
                f"{src}: node {node.name!r} has a subgraph ({node.op_type}); not supported"
            )
    _hoist_constants(g)
    if not keep & set(_QDQ_OPS):
        _check_qdq_scales(g, src)
    bumped = _raise_opset_for_fp16_qdq(model, keep)

    inits = {t.name: t for t in g.initializer}
    graph_inputs = {vi.name for vi in g.input}

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == FLOAT

    def wants_fp16(node: onnx.NodeProto) -> bool:
        return node.op_type not in keep

    # Which precision each float initializer is read in.
    init_uses: dict[str, set[int]] = defaultdict(set)
    for node in g.node:
        fixed = _FLOAT32_PARAM_INPUTS.get(node.op_type, ())
        for i, name in enumerate(node.input):
            if name in inits and inits[name].data_type == FLOAT:
                init_uses[name].add(FLOAT16 if wants_fp16(node) and i not in fixed else FLOAT)

    new_inits: list[onnx.TensorProto] = []
    fp16_name: dict[str, str] = {}
    clipped = 0
    for t in g.initializer:
        uses = init_uses.get(t.name, set())
        if t.data_type != FLOAT or FLOAT16 not in uses:
            new_inits.append(t)
            continue
        name = t.name if FLOAT not in uses else f"{t.name}__fp16"
        half, n = _to_fp16(t, name)
        clipped += n
        fp16_name[t.name] = name
        new_inits.append(half)
        if FLOAT in uses:
            new_inits.append(t)
    del g.initializer[:]
    g.initializer.extend(new_inits)

    # Element type of each float tensor after conversion (graph inputs stay float32).
    now: dict[str, int] = {name: FLOAT for name in graph_inputs if is_float(name)}
    casts: dict[tuple[str, int], str] = {}
    nodes: list[onnx.NodeProto] = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            out = f"{name}__to_{'fp16' if to == FLOAT16 else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [out], name=f"Cast_{out}", to=to))
            casts[key] = out
            now[out] = to
        return casts[key]

    for node in g.node:
        to = FLOAT16 if wants_fp16(node) else FLOAT
        fixed = _FLOAT32_PARAM_INPUTS.get(node.op_type, ())
        for i, name in enumerate(node.input):
            if not is_float(name):
                continue
            want = FLOAT if i in fixed else to
            if name in inits:
                if want == FLOAT16:
                    node.input[i] = fp16_name[name]
                continue
            have = now.get(name, FLOAT)
            if have != want:
                node.input[i] = cast(name, want)
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i == FLOAT and to == FLOAT16:
                    a.i = FLOAT16
        elif node.op_type == "ConstantOfShape" and to == FLOAT16:
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == FLOAT:
                    a.t.CopyFrom(_to_fp16(a.t, a.t.name)[0])
        elif node.op_type in ("RandomNormal", "RandomUniform", "EyeLike") or any(
            a.type == onnx.AttributeProto.GRAPH for a in node.attribute
        ):
            raise Fp16ConversionError(
                f"{src}: node {node.name!r} ({node.op_type}) is not supported by the FP16 pass"
            )
        for out in node.output:
            if is_float(out):
                now[out] = to
        nodes.append(node)

    # Graph outputs stay float32: the last producer writes `<name>__fp16`, a Cast restores the name.
    for vi in g.output:
        if is_float(vi.name) and now.get(vi.name) == FLOAT16:
            inner = f"{vi.name}__fp16"
            for node in nodes:
                node.output[:] = [inner if o == vi.name else o for o in node.output]
                node.input[:] = [inner if o == vi.name else o for o in node.input]
            nodes.append(helper.make_node("Cast", [inner], [vi.name], name=f"Cast_{vi.name}_fp32", to=FLOAT))

    del g.node[:]
    g.node.extend(nodes)
    del g.value_info[:]
    props = {p.key: p.value for p in model.metadata_props}
    quantized = props.get("eyecare.precision", "").startswith("int8")
    props.update(
        {
            # a Q/DQ graph stays "int8" (its GEMMs are int8), now on an FP16 base
            "eyecare.precision": props["eyecare.precision"] if quantized else "fp16",
            **({"eyecare.base": "fp16"} if quantized else {}),
            "eyecare.fp16_keep_float32": ",".join(sorted(keep)),
            "eyecare.fp16_clipped": str(clipped),
            **({"eyecare.fp16_opset_raised": f"{bumped}->{QDQ_FP16_OPSET}"} if bumped else {}),
        }
    )
    helper.set_model_props(model, props)
    save_onnx(model, dst, external_data_threshold=external_data_threshold)
    onnx.checker.check_model(os.fspath(dst))
    inferred = onnx.shape_inference.infer_shapes(
        onnx.load(os.fspath(dst), load_external_data=False), strict_mode=True
    )
    del inferred
    return dst
