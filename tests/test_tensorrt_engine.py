"""TensorRT engines: pure helpers (profile, cache key, staleness, manifest entry) everywhere;
building and running engines only where TensorRT and an NVIDIA GPU are present."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from eyecare_edge.bundle import FileEntry, Manifest, PromptSpec, add_file, read_manifest, write_manifest
from eyecare_edge.preprocess import preset_preprocess
from eyecare_edge.vision import engine_build, engines
from eyecare_edge.vision import tensorrt as trt_rt

TRT_OK, TRT_DETAIL = trt_rt.tensorrt_available()


def _gpu_reason() -> str | None:
    if not TRT_OK:
        return f"TensorRT not available: {TRT_DETAIL}"
    try:
        trt_rt.gpu_info(0)
    except trt_rt.CudaError as e:
        return f"no NVIDIA GPU: {e}"
    return None


GPU_SKIP = _gpu_reason()
needs_gpu = pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")

SHA = "a" * 64


# --- pure helpers --------------------------------------------------------------------------------


def test_default_tile_counts_follow_the_preprocessing():
    full = preset_preprocess("eyecare-3.8b")
    opt, most = engines.default_tile_counts(full)
    assert most == 3 * 3 + 1  # largest 3x3 canvas + global view
    assert opt == 2 * 3 + 1  # a 3:2 fundus photo -> 2x3 canvas + global view
    assert engines.default_tile_counts(full.replace(max_tiles=4)) == (4 + 1, 4 + 1)
    assert engines.default_tile_counts(full.replace(max_tiles=1)) == (2, 2)


def test_profile_shapes():
    shapes = engine_build.profile_shapes(384, max_tiles=10, opt_tiles=7)
    assert shapes == {"min": (1, 3, 384, 384), "opt": (7, 3, 384, 384), "max": (10, 3, 384, 384)}
    with pytest.raises(ValueError):
        engine_build.profile_shapes(384, max_tiles=4, opt_tiles=7)
    with pytest.raises(ValueError):
        engine_build.profile_shapes(384, max_tiles=4, opt_tiles=2, min_tiles=0)


def test_engine_key_depends_on_every_input():
    base = dict(
        onnx_sha256=SHA,
        precision="fp16",
        trt_version="10.3.0",
        compute_capability="8.7",
        profile=engine_build.profile_shapes(384, max_tiles=10, opt_tiles=7),
    )
    key = engine_build.engine_key(**base)
    assert key == engine_build.engine_key(**base) and len(key) == 64
    changes = [
        {"onnx_sha256": "b" * 64},
        {"precision": "int8"},
        {"trt_version": "11.0.0"},
        {"compute_capability": "9.0"},
        {"profile": engine_build.profile_shapes(384, max_tiles=12, opt_tiles=7)},
    ]
    assert len({engine_build.engine_key(**{**base, **c}) for c in changes} | {key}) == len(changes) + 1


def test_file_names_are_bundle_files():
    from eyecare_edge.bundle import file_format

    name = engines.engine_file_name("fp16", compute_capability="8.7", trt_version="10.3.0")
    assert name == "vision_fp16.sm87.trt10.3.0.engine" and file_format(name) == "engine"
    cache = engines.timing_cache_file_name(compute_capability="8.7", trt_version="10.3.0")
    assert file_format(cache) == "trt_timing_cache"


def _info(tmp_path: Path) -> engine_build.EngineInfo:
    engine = tmp_path / engines.engine_file_name("fp16", compute_capability="8.7", trt_version="10.3.0")
    engine.write_bytes(b"plan")
    profile = engine_build.profile_shapes(384, max_tiles=10, opt_tiles=7)
    return engine_build.EngineInfo(
        path=engine,
        precision="fp16",
        trt_version="10.3.0",
        compute_capability="8.7",
        gpu_name="Orin",
        build_seconds=12.3,
        profile=profile,
        onnx_sha256=SHA,
        key=engine_build.engine_key(
            onnx_sha256=SHA, precision="fp16", trt_version="10.3.0", compute_capability="8.7", profile=profile
        ),
        timing_cache_path=None,
        size=4,
    )


def _manifest() -> Manifest:
    pre = preset_preprocess("eyecare-3.8b")
    return Manifest(
        model={"preset": "eyecare-3.8b"}, preprocess=pre.to_dict(), prompt=PromptSpec("phi3_instruct", None)
    )


def test_manifest_entry_round_trip_and_staleness(tmp_path):
    info = _info(tmp_path)
    m = _manifest()
    entry = add_file(
        tmp_path,
        m,
        info.path.name,
        role="vision",
        precision="fp16",
        trt_version=info.trt_version,
        compute_capability=info.compute_capability,
        extra=info.manifest_extra("vision_fp16.onnx"),
    )
    write_manifest(tmp_path, m)
    again = read_manifest(tmp_path).find("vision", format="engine", precision="fp16")
    assert again == entry and again.extra["max_tiles"] == 10 and again.extra["onnx_sha256"] == SHA
    here = dict(trt_version="10.3.0", compute_capability="8.7", onnx_sha256=SHA)
    assert not engines.is_engine_stale(again, **here)
    assert not engines.is_engine_stale(again.__dict__, **here)  # a plain dict from JSON works too
    assert engines.is_engine_stale(again, **{**here, "trt_version": "10.4.0"})
    assert engines.is_engine_stale(again, **{**here, "compute_capability": "8.6"})
    assert engines.is_engine_stale(again, **{**here, "onnx_sha256": "c" * 64})
    assert engines.is_engine_stale(again, **here, max_tiles=12)
    assert not engines.is_engine_stale(again, **here, max_tiles=10)
    assert engines.is_engine_stale(replace(again, format="onnx"), **here)
    assert engines.find_engine(m, "fp16", **here) == entry
    assert engines.find_engine(m, "int8", **here) is None
    assert engines.find_engine(m, "fp16", **{**here, "compute_capability": "9.0"}) is None


def test_engine_entries_do_not_change_the_bundle_digest(tmp_path):
    m = _manifest()
    before = m.digest()
    info = _info(tmp_path)
    add_file(
        tmp_path,
        m,
        info.path.name,
        role="vision",
        precision="fp16",
        trt_version="10.3.0",
        compute_capability="8.7",
        extra=info.manifest_extra("vision_fp16.onnx"),
    )
    assert m.digest() == before


def test_onnx_digest_covers_external_data(tmp_path):
    p = tmp_path / "vision_fp16.onnx"
    p.write_bytes(b"graph")
    d1 = engine_build.onnx_digest(p)
    (tmp_path / "vision_fp16.onnx.data").write_bytes(b"weights")
    d2 = engine_build.onnx_digest(p)
    (tmp_path / "vision_fp16.onnx.data").write_bytes(b"weights2")
    assert len({d1, d2, engine_build.onnx_digest(p)}) == 3


def test_check_tiles_are_deterministic_and_in_range():
    a = engine_build.check_tiles(112, 3)
    assert a.shape == (3, 3, 112, 112) and a.dtype == np.float32
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.1
    np.testing.assert_array_equal(a, engine_build.check_tiles(112, 3))
    assert not np.array_equal(a, engine_build.check_tiles(112, 3, seed=1))


# --- without TensorRT ----------------------------------------------------------------------------


def test_missing_tensorrt_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    ok, detail = trt_rt.tensorrt_available()
    assert not ok and "pip install tensorrt" in detail and "JetPack" in detail


def test_build_engine_command_exits_1_with_the_hint(monkeypatch, tmp_path):
    from eyecare_edge.cli import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    result = CliRunner().invoke(main, ["build-engine", str(tmp_path), "--precision", "fp16"])
    assert result.exit_code == 1
    assert "pip install tensorrt" in result.output


def test_build_engine_command_help():
    from eyecare_edge.cli import main

    result = CliRunner().invoke(main, ["build-engine", "--help"])
    assert result.exit_code == 0
    for opt in ("--precision", "--max-tiles", "--workspace"):
        assert opt in result.output


def test_build_engine_command_does_not_import_torch():
    import subprocess

    code = (
        "import sys; from eyecare_edge.cli import main\n"
        "from click.testing import CliRunner\n"
        "CliRunner().invoke(main, ['build-engine', '.'])\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- with TensorRT and a GPU ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A bundle with the tiny model's FP32, FP16 and INT8 vision ONNX (no LLM needed here)."""
    if GPU_SKIP is not None:
        pytest.skip(GPU_SKIP)
    import torch
    from eyecare_edge.export.exporter import tensorrt_int8_onnx
    from eyecare_edge.export.onnx_fp16 import convert_fp16
    from eyecare_edge.export.onnx_vision import export_vision_onnx
    from eyecare_edge.training.modeling import EyecareGPTForConditionalGeneration
    from eyecare_edge.training.presets import build_config, tiny_llama_config

    torch.manual_seed(0)
    cfg = build_config(
        "tiny", text_config=tiny_llama_config(512, bos_token_id=None, eos_token_id=2, pad_token_id=1)
    )
    model = EyecareGPTForConditionalGeneration(cfg).eval()
    d = tmp_path_factory.mktemp("bundle")
    fp32 = export_vision_onnx(model, d / "vision_fp32.onnx")
    convert_fp16(fp32, d / "vision_fp16.onnx")
    calib = [engine_build.check_tiles(112, 8, seed=3)]
    # TensorRT's INT8 input exactly as export ships it: S8S8 Q/DQ on the weight GEMMs, FP16 elsewhere.
    tensorrt_int8_onnx(fp32, d / "vision_int8.onnx", calib)
    m = Manifest(
        model={"preset": "tiny"},
        preprocess=cfg.preprocess_config().to_dict(),
        prompt=PromptSpec("chatml", None),
    )
    for p in ("fp32", "fp16", "int8"):
        add_file(d, m, f"vision_{p}.onnx", role="vision", precision=p)
    write_manifest(d, m)
    return d


def _ort(path, tiles):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": tiles}
    )[0]


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize(
    "precision,limit", [("fp16", ("cosine_min", 0.999)), ("int8", ("cosine_mean", 0.99))]
)
def test_engine_builds_and_matches_onnx_fp32(tiny_bundle, tmp_path, precision, limit):
    from eyecare_edge.export.vision_validate import compare_embeddings

    cache = tmp_path / "t.trtcache"
    info = engine_build.build_engine(
        tiny_bundle / f"vision_{precision}.onnx",
        tmp_path / "v.engine",
        max_tiles=8,
        opt_tiles=5,
        workspace_gb=1,
        timing_cache_path=cache,
    )
    assert info.precision == precision and info.path.stat().st_size == info.size > 0
    assert (
        info.trt_version == trt_rt.trt_version() and info.compute_capability == trt_rt.gpu_info().compute_capability
    )
    assert cache.stat().st_size > 0
    tiles = engine_build.check_tiles(112, 3)
    with trt_rt.EngineRunner(info.path) as run:
        for n in (1, 3):
            out = run(tiles[:n])
            fig = compare_embeddings(_ort(tiny_bundle / "vision_fp32.onnx", tiles[:n]), out)
            assert fig[limit[0]] >= limit[1], fig
    # A second build with the kept timing cache works (and is usually faster).
    again = engine_build.build_engine(
        tiny_bundle / f"vision_{precision}.onnx",
        tmp_path / "v2.engine",
        max_tiles=8,
        opt_tiles=5,
        workspace_gb=1,
        timing_cache_path=cache,
    )
    assert again.key == info.key


@pytest.mark.gpu
@needs_gpu
def test_build_engine_command_records_and_reuses_the_engine(tiny_bundle):
    from eyecare_edge.cli import main

    runner = CliRunner()
    first = runner.invoke(main, ["build-engine", str(tiny_bundle), "--precision", "fp16", "--json"])
    assert first.exit_code == 0, first.output
    m = read_manifest(tiny_bundle)
    entry = m.find("vision", format="engine", precision="fp16")
    assert entry is not None and entry.trt_version == trt_rt.trt_version()
    assert entry.compute_capability == trt_rt.gpu_info().compute_capability
    assert m.find("extra", format="trt_timing_cache") is not None
    assert m.validation["engine_fp16"]["passed"]
    second = runner.invoke(main, ["build-engine", str(tiny_bundle), "--precision", "fp16"])
    assert second.exit_code == 0 and "up to date" in second.output
    assert isinstance(entry, FileEntry)
