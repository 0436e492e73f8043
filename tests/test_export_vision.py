"""Vision export: FP32 ONNX vs torch on a dynamic tile axis, external data, FP16 cast, validation."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from eyecare_edge.export.onnx_fp16 import convert_fp16
from eyecare_edge.export.onnx_vision import (
    INPUT_NAME,
    OUTPUT_NAME,
    TILE_AXIS,
    data_file_name,
    export_vision_onnx,
    onnx_files,
    save_image_newline,
    save_onnx,
)
from eyecare_edge.export.vision_validate import compare_embeddings, failed_checks, validate_vision
from eyecare_edge.training.modeling import EyecareGPTForConditionalGeneration
from eyecare_edge.training.presets import build_config, tiny_llama_config


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = build_config(
        "tiny", text_config=tiny_llama_config(512, bos_token_id=None, eos_token_id=2, pad_token_id=1)
    )
    return EyecareGPTForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    """FP32 and FP16 ONNX of the tiny model, exported once for the module."""
    d = tmp_path_factory.mktemp("vision")
    fp32 = export_vision_onnx(tiny_model, d / "vision_fp32.onnx")
    fp16 = convert_fp16(fp32, d / "vision_fp16.onnx")
    return {"fp32": fp32, "fp16": fp16}


def _tiles(n: int, size: int = 112, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (n, 3, size, size)).astype(np.float32)


def _torch(model, tiles: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.encode_tiles(torch.from_numpy(tiles)).numpy()


def _run(path, tiles):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT_NAME: tiles})[0]


@pytest.mark.parametrize("n_tiles", [1, 3, 7])
def test_fp32_onnx_matches_torch_on_any_tile_count(tiny_model, exported, n_tiles):
    tiles = _tiles(n_tiles, seed=n_tiles)
    out = _run(exported["fp32"], tiles)
    ref = _torch(tiny_model, tiles)
    assert out.shape == ref.shape == (n_tiles, 64, 256)
    assert np.abs(out - ref).max() <= 1e-4


def test_graph_interface(exported):
    m = onnx.load(str(exported["fp32"]))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 18
    (inp,), (out,) = m.graph.input, m.graph.output
    assert (inp.name, out.name) == (INPUT_NAME, OUTPUT_NAME)
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == [TILE_AXIS, 3, 112, 112]
    assert out_dims == [TILE_AXIS, 64, 256]
    props = {p.key: p.value for p in m.metadata_props}
    assert props["eyecare.tokens_per_tile"] == "64" and props["eyecare.embed_dim"] == "256"
    # Only the vision parts are in the graph: no LLM embedding table (512 x 256).
    assert not any(list(t.dims) == [512, 256] for t in m.graph.initializer)
    # Eager attention: explicit MatMul/Softmax, no fused attention op.
    ops = {n.op_type for n in m.graph.node}
    assert {"Softmax", "LayerNormalization", "Conv"} <= ops and "Attention" not in ops
    assert onnx_files(exported["fp32"]) == [exported["fp32"]]


def test_external_data_when_over_threshold(tiny_model, tmp_path):
    path = export_vision_onnx(tiny_model, tmp_path / "vision_fp32.onnx", external_data_threshold=1000)
    data = tmp_path / data_file_name(path)
    assert data.name == "vision_fp32.onnx.data" and data.stat().st_size > 1_000_000
    assert path.stat().st_size < 100_000  # the graph only
    assert onnx_files(path) == [path, data]
    tiles = _tiles(3)
    assert np.abs(_run(path, tiles) - _torch(tiny_model, tiles)).max() <= 1e-4
    # The FP16 pass reads external data and writes its own when told to.
    fp16 = convert_fp16(path, tmp_path / "vision_fp16.onnx", external_data_threshold=1000)
    assert (tmp_path / "vision_fp16.onnx.data").is_file()
    assert compare_embeddings(_run(path, tiles), _run(fp16, tiles))["cosine_min"] >= 0.999
    # Re-saving below the threshold removes the stale data file.
    save_onnx(onnx.load(str(path)), path)
    assert not data.exists()
    assert np.abs(_run(path, tiles) - _torch(tiny_model, tiles)).max() <= 1e-4


def test_export_rejects_bad_arguments(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="opset"):
        export_vision_onnx(tiny_model, tmp_path / "v.onnx", opset=17)
    with pytest.raises(ValueError, match="sample_tiles"):
        export_vision_onnx(tiny_model, tmp_path / "v.onnx", sample_tiles=1)


def _elem_types(path) -> dict[str, int]:
    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = m.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in (*g.input, *g.output, *g.value_info)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def test_fp16_keeps_sensitive_ops_in_float32(exported):
    m = onnx.load(str(exported["fp16"]))
    types = _elem_types(exported["fp16"])
    f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
    # Interface unchanged: the runtime feeds and reads float32 for every precision.
    assert types[INPUT_NAME] == f32 and types[OUTPUT_NAME] == f32
    by_op: dict[str, list] = {}
    for node in m.graph.node:
        by_op.setdefault(node.op_type, []).append(node)
    for node in by_op["LayerNormalization"]:
        assert all(types[x] == f32 for x in node.input if x), node.name
        assert all(types[y] == f32 for y in node.output), node.name
    # Softmax in FP16, fed straight by the score MatMul (query pre-scaled): TensorRT's fused attention.
    producer = {o: n for n in m.graph.node for o in n.output}
    assert by_op["Softmax"]
    for node in by_op["Softmax"]:
        assert types[node.input[0]] == f16 and types[node.output[0]] == f16, node.name
        assert producer[node.input[0]].op_type == "MatMul", node.name
    # Every MatMul (weight GEMMs and attention) computes in float16 with float16 weights.
    for node in by_op["MatMul"]:
        assert all(types[x] == f16 for x in node.input), node.name
    assert types[by_op["Conv"][0].input[1]] == f16
    props = {p.key: p.value for p in m.metadata_props}
    assert props["eyecare.precision"] == "fp16" and props["eyecare.fp16_clipped"] == "0"


def test_fp16_close_to_fp32(exported):
    tiles = _tiles(4, seed=5)
    fig = compare_embeddings(_run(exported["fp32"], tiles), _run(exported["fp16"], tiles))
    assert fig["cosine_min"] >= 0.999
    assert fig["cosine_centered_min"] >= 0.999


def test_fp16_custom_keep_list_changes_the_graph(exported, tmp_path):
    out = convert_fp16(exported["fp32"], tmp_path / "all16.onnx", keep_float32_ops=())
    types = _elem_types(out)
    m = onnx.load(str(out))
    ln = next(n for n in m.graph.node if n.op_type == "LayerNormalization")
    assert types[ln.input[0]] == onnx.TensorProto.FLOAT16


def test_save_image_newline(tiny_model, tmp_path):
    path = save_image_newline(tiny_model, tmp_path / "image_newline.npy")
    vec = np.load(path, allow_pickle=False)
    assert vec.dtype == np.float32 and vec.shape == (256,)
    np.testing.assert_array_equal(vec, tiny_model.image_newline.detach().numpy())


def test_compare_embeddings_figures():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(2, 5, 8)).astype(np.float32)
    same = compare_embeddings(ref, ref.copy())
    assert same["max_abs"] == 0 and same["cosine_min"] == pytest.approx(1.0)
    flipped = ref.copy()
    flipped[0, 0] *= -1  # one token reversed: its cosine is -1, the others 1
    fig = compare_embeddings(ref, flipped)
    assert fig["cosine_min"] == pytest.approx(-1.0)
    assert fig["cosine_mean"] == pytest.approx((9 - 1) / 10)
    assert fig["max_abs"] == pytest.approx(2 * np.abs(ref[0, 0]).max(), rel=1e-6)
    bad = ref.copy()
    bad[1, 1, 1] = np.nan
    assert compare_embeddings(ref, bad)["cosine_min"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        compare_embeddings(ref, ref[:1])


def test_validate_vision_passes_and_names_failing_checks(tiny_model, exported):
    tiles = _tiles(3, seed=9)
    results = validate_vision(tiny_model, exported, tiles)
    assert results["fp32"]["reference"] == "torch" and results["fp16"]["reference"] == "onnx_fp32"
    assert results["fp32"]["max_abs"] <= 1e-4
    assert all(r["passed"] for r in results.values()), failed_checks(results)
    assert failed_checks(results) == []
    assert results["fp16"]["ort_cpu_s_per_tile"] > 0
    assert results["fp16"]["baseline_cosine_centered_mean"] < results["fp16"]["cosine_centered_mean"]
    strict = validate_vision(tiny_model, exported, tiles, tolerances={"fp16": {"max_abs": 1e-9}})
    assert not strict["fp16"]["passed"] and strict["fp32"]["passed"]
    (line,) = failed_checks(strict)
    assert line.startswith("vision_fp16: max_abs") and "onnx_fp32" in line
    with pytest.raises(ValueError, match="tolerance"):
        validate_vision(tiny_model, {"bf16": exported["fp16"]}, tiles)


def test_fp16_pass_on_a_qdq_graph_gives_int8_gemms_with_fp16_elsewhere(exported, tmp_path):
    """The TensorRT INT8 input: the S8S8 Q/DQ graph cast to FP16 (opset raised to 19)."""

    from eyecare_edge.export.exporter import tensorrt_int8_onnx
    from eyecare_edge.export.onnx_fp16 import FP16_MIN_NORMAL

    calib = [_tiles(6, seed=11)]
    mixed = tensorrt_int8_onnx(exported["fp32"], tmp_path / "vision_int8.onnx", calib).path
    m = onnx.load(str(mixed))
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) == 19
    types = _elem_types(mixed)
    inits = {t.name: t for t in m.graph.initializer}
    f16 = onnx.TensorProto.FLOAT16
    for node in m.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert types[node.input[1]] == f16, node.name  # scale
            assert onnx.numpy_helper.to_array(inits[node.input[1]]).min() >= FP16_MIN_NORMAL, node.name
            zp = onnx.numpy_helper.to_array(inits[node.input[2]])
            assert zp.dtype == np.int8 and not zp.any()
        if node.op_type == "QuantizeLinear":
            assert types[node.input[0]] == f16
        if node.op_type == "LayerNormalization":
            assert types[node.input[0]] == onnx.TensorProto.FLOAT
        if node.op_type == "Softmax":
            assert types[node.input[0]] == f16
    props = {p.key: p.value for p in m.metadata_props}
    assert props["eyecare.precision"] == "int8" and props["eyecare.base"] == "fp16"
    tiles = _tiles(2, seed=12)
    fig = compare_embeddings(_run(exported["fp32"], tiles), _run(mixed, tiles))
    assert fig["cosine_mean"] >= 0.99
