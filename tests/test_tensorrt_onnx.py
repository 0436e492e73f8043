"""The ONNX a GPU gets: export defaults include FP16; attention with the query pre-scaled (exact);
the shipped INT8 file is TensorRT's input (Q/DQ on an FP16 base, scales in FP16's normal range)
and still passes the export's checks against torch."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from eyecare_edge.calibration.qdq_graph import activation_qparams, quantize_weight
from eyecare_edge.calibration.ranges import TensorRange
from eyecare_edge.export.onnx_attention import attention_layout, prescale_attention_queries
from eyecare_edge.export.onnx_fp16 import FP16_MIN_NORMAL, Fp16ConversionError, convert_fp16
from onnx import TensorProto, helper, numpy_helper

from eyecare_edge.bundle import read_manifest
from eyecare_edge.vision import cpu_precision_order


def _attention_graph(reuse_scores: bool = False) -> onnx.ModelProto:
    """softmax((Q @ K^T) * s) @ V, the form SigLIP's eager attention exports to."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("MatMul", ["q", "kt"], ["scores"], name="qk"),
        helper.make_node("Mul", ["scores", "s"], ["scaled"], name="scale"),
        helper.make_node("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["out"], name="pv"),
    ]
    outputs = [helper.make_tensor_value_info("out", f, [2, 5, 4])]
    if reuse_scores:  # the scores are used elsewhere too: the rewrite must leave it alone
        nodes.append(helper.make_node("Identity", ["scores"], ["scores_copy"], name="copy"))
        outputs.append(helper.make_tensor_value_info("scores_copy", f, [2, 5, 5]))
    graph = helper.make_graph(
        nodes,
        "attn",
        [
            helper.make_tensor_value_info("q", f, [2, 5, 4]),
            helper.make_tensor_value_info("kt", f, [2, 4, 5]),
            helper.make_tensor_value_info("v", f, [2, 5, 4]),
        ],
        outputs,
        [numpy_helper.from_array(np.array(0.5, np.float32), "s")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["out"], feeds)[0]


def test_prescale_moves_the_scale_onto_q_exactly():
    rng = np.random.default_rng(0)
    feeds = {k: rng.normal(size=shape).astype(np.float32) for k, shape in
             (("q", (2, 5, 4)), ("kt", (2, 4, 5)), ("v", (2, 5, 4)))}  # fmt: skip
    model = _attention_graph()
    before = _run(model, feeds)
    assert attention_layout(model) == {"mul": 1}
    assert prescale_attention_queries(model) == 1
    onnx.checker.check_model(model)
    assert attention_layout(model) == {"matmul": 1}
    producer = {o: n for n in model.graph.node for o in n.output}
    assert producer[producer["probs"].input[0]].input[0].startswith("q__prescaled")
    np.testing.assert_allclose(_run(model, feeds), before, rtol=1e-6, atol=1e-7)
    shared = _attention_graph(reuse_scores=True)
    assert prescale_attention_queries(shared) == 0 and attention_layout(shared) == {"mul": 1}


def test_scales_are_floored_for_fp16_and_weights_rounded_for_the_floor():
    w = np.array([[1e-4, 0.5], [-2e-4, -0.25]], np.float32)  # column 0: a nearly-dead channel
    q, scale = quantize_weight(w, 1, per_channel=True, min_scale=FP16_MIN_NORMAL)
    assert scale[0] == np.float32(FP16_MIN_NORMAL) and np.float16(scale[0]) > 0
    assert q[:, 0].tolist() == [2, -3]  # rounded for the scale actually stored
    assert scale[1] == pytest.approx(0.5 / 127)
    tiny = TensorRange(-1e-6, 1e-6)
    assert activation_qparams(tiny, symmetric=True, min_scale=FP16_MIN_NORMAL).scale == FP16_MIN_NORMAL
    assert activation_qparams(tiny, symmetric=True).scale == pytest.approx(1e-6 / 127)


def test_fp16_pass_refuses_a_scale_fp16_cannot_hold(tmp_path):
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [
            helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"], name="q"),
            helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["y"], name="dq"),
        ],
        "qdq",
        [helper.make_tensor_value_info("x", f, [1, 4])],
        [helper.make_tensor_value_info("y", f, [1, 4])],
        [
            numpy_helper.from_array(np.array(1e-6, np.float32), "s"),
            numpy_helper.from_array(np.array(0, np.int8), "zp"),
        ],
    )
    src = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), src)
    with pytest.raises(Fp16ConversionError, match="below float16's normal range"):
        convert_fp16(src, tmp_path / "out.onnx")


def test_default_export_has_fp16_everywhere_it_is_stated():
    from eyecare_edge.export.exporter import DEFAULT_VISION, ExportOptions

    from eyecare_edge.commands.export import export as export_command
    from eyecare_edge.perf.build import DEFAULT_VISION as PERF_VISION

    assert "fp16" in ExportOptions().vision and DEFAULT_VISION == PERF_VISION
    default = next(p.default for p in export_command.params if p.name == "vision")
    assert tuple(default.split(",")) == DEFAULT_VISION


def test_shipped_int8_file_is_tensorrts_input(tiny_bundle):
    """The INT8 file a default export ships (validated against torch during export)."""
    m = read_manifest(tiny_bundle)
    entry = m.find("vision", format="onnx", precision="int8")
    assert entry.extra["base"] == "fp16" and "int8" not in cpu_precision_order(m)
    path = tiny_bundle / entry.path
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    f16, f32 = TensorProto.FLOAT16, TensorProto.FLOAT
    props = {p.key: p.value for p in model.metadata_props}
    assert props["eyecare.precision"] == "int8" and props["eyecare.base"] == "fp16"
    n_dq_int8_weights = 0
    for node in g.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = inits[node.input[1]]
            assert scale.dtype == np.float16 and scale.min() >= FP16_MIN_NORMAL, node.name
            if node.op_type == "DequantizeLinear" and node.input[0] in inits:
                assert inits[node.input[0]].dtype == np.int8
                n_dq_int8_weights += 1
        elif node.op_type in ("MatMul", "Gemm", "Conv", "Softmax", "Add", "Mul", "Erf", "Gelu", "Tanh"):
            floats = [x for x in node.input if types.get(x) in (f16, f32)]
            assert all(types[x] == f16 for x in floats), (node.op_type, node.name)
        elif node.op_type == "LayerNormalization":
            assert types[node.input[0]] == f32
    assert n_dq_int8_weights >= 4 * m.model["vision_layers"]  # q, k, v, o (+ MLP) per layer
    assert attention_layout(model) == {"matmul": m.model["vision_layers"]}
    assert types[g.input[0].name] == f32 and types[g.output[0].name] == f32  # same interface
    # parity vs torch, checked by the export itself (today's tolerances, see vision_validate)
    assert (
        m.validation["vision_int8"]["passed"] and m.validation["vision_int8"]["qdq_exact_cosine_mean"] >= 0.99
    )
    assert m.validation["vision_fp32"]["passed"]  # the query pre-scaling kept FP32 == torch


def test_cpu_order_keeps_an_fp32_based_int8_from_older_bundles(tiny_bundle):
    m = read_manifest(tiny_bundle)
    old = dataclasses.replace(
        m, files=[dataclasses.replace(f, extra={}) if f.precision == "int8" else f for f in m.files]
    )
    assert cpu_precision_order(old)[:2] == ["int8_u8s8", "int8"]
    assert cpu_precision_order(m) == ["int8_u8s8", "fp32"]


def test_a_default_export_writes_fp16_vision(tiny_checkpoint, tmp_path):
    """Default vision formats (no LLM, no validation: only the files matter here)."""
    from eyecare_edge.export.exporter import ExportOptions, export_bundle

    res = export_bundle(tiny_checkpoint, tmp_path / "b", ExportOptions(llm=(), validate=False, threads=1))
    assert sorted(res.manifest.precisions("vision", "onnx")) == ["fp16", "fp32", "int8", "int8_u8s8"]
    assert (tmp_path / "b" / "vision_fp16.onnx").is_file()
    assert res.manifest.find("vision", format="onnx", precision="int8").extra["base"] == "fp16"
