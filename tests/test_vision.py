"""Vision backends: the `auto` choice and its reasons, every CPU precision against FP32, file checks
before loading, and the TensorRT runtime: its find/build/record/reuse logic
(TensorRT and the GPU replaced by fakes), and on a CUDA machine a real engine build and run."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from runtime_fixtures import copy_bundle, runtime_assets

from eyecare_edge.bundle import BundleError, read_manifest, require_valid
from eyecare_edge.images import load_image
from eyecare_edge.preprocess import preprocess_image
from eyecare_edge.vision import (
    VisionError,
    cpu_precision_order,
    engine_build,
    engines,
    open_vision,
    validate_tiles,
)
from eyecare_edge.vision import tensorrt as trt_rt


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return runtime_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def manifest(assets):
    return read_manifest(assets.bundle)


@pytest.fixture(scope="module")
def tiles(assets, manifest):
    rgb = load_image(assets.images[0]).rgb
    return preprocess_image(rgb, manifest.preprocess_config()).tiles


def _cosine_mean(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.mean())


def _has_cuda_ort() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


def test_auto_takes_the_fastest_cpu_variant_and_says_why(assets, manifest, tiles):
    choice = open_vision(assets.bundle, manifest, threads=1)
    if not _has_cuda_ort() and not trt_rt.tensorrt_available()[0]:
        assert choice.encoder.name == "onnxruntime-cpu" and choice.encoder.precision == "int8_u8s8"
        assert [s.split(":")[0] for s in choice.skipped] == [
            "tensorrt fp16",
            "tensorrt int8",
            "ort-cuda fp16",
            "ort-cuda fp32",
        ]
        line = choice.describe()
        assert "\n" not in line and "TensorRT is not installed" in line and "ort-cuda" in line
        assert "on CPU" in line and choice.where == "CPU"
    out = choice.encoder.encode(tiles)
    assert out.shape == (tiles.shape[0], manifest.model["tokens_per_tile"], manifest.model["n_embd"])
    assert out.dtype == np.float32 and choice.encoder.width == manifest.model["n_embd"]


def test_every_cpu_precision_agrees_with_fp32(assets, manifest, tiles):
    ref = open_vision(assets.bundle, manifest, precision="fp32", backend="ort-cpu", threads=1).encoder.encode(
        tiles
    )
    for precision in ("int8", "int8_u8s8"):
        enc = open_vision(assets.bundle, manifest, precision=precision, backend="ort-cpu", threads=1).encoder
        assert enc.precision == precision
        assert _cosine_mean(enc.encode(tiles), ref) > 0.99


def test_cpu_order_skips_variants_that_failed_validation(manifest):
    # the int8 file is TensorRT's (FP16 base): never the CPU's automatic choice
    assert cpu_precision_order(manifest) == ["int8_u8s8", "fp32"]
    failed = dataclasses.replace(manifest, validation={"vision_int8_u8s8": {"passed": False}})
    assert cpu_precision_order(failed) == ["fp32"]


def test_bad_requests_name_the_problem(assets, manifest):
    with pytest.raises(VisionError, match="unknown vision backend 'cuda'"):
        open_vision(assets.bundle, manifest, backend="cuda")
    with pytest.raises(VisionError, match="unknown vision precision 'int4'"):
        open_vision(assets.bundle, manifest, precision="int4")
    with pytest.raises(VisionError, match=r"no fp16 vision ONNX \(it has: fp32, int8, int8_u8s8\)"):
        open_vision(assets.bundle, manifest, precision="fp16", backend="ort-cpu")
    if not trt_rt.tensorrt_available()[0]:
        with pytest.raises(VisionError, match="TensorRT is not installed"):
            open_vision(assets.bundle, manifest, backend="tensorrt")
    if not _has_cuda_ort():
        with pytest.raises(VisionError, match="no CUDA provider"):
            open_vision(assets.bundle, manifest, backend="ort-cuda", precision="fp32")
    with pytest.raises(VisionError, match=r"tiles must be \[T>=1, 3, S, S\]"):
        validate_tiles(np.zeros((3, 112, 112), np.float32))


def test_files_are_checked_before_loading(assets, tmp_path):
    bundle = copy_bundle(assets.bundle, tmp_path / "b")
    manifest = read_manifest(bundle)
    onnx = bundle / "vision_int8_u8s8.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0x01
    onnx.write_bytes(bytes(data))
    seen: list[str] = []

    def check(entries):
        seen.extend(e.path for e in entries)
        require_valid(bundle, entries)

    with pytest.raises(BundleError, match="vision_int8_u8s8.onnx: sha256 differs"):
        open_vision(bundle, manifest, backend="ort-cpu", check=check)
    assert seen == ["vision_int8_u8s8.onnx"]
    onnx.unlink()
    with pytest.raises(BundleError, match="vision_int8_u8s8.onnx: missing"):
        open_vision(bundle, manifest, backend="ort-cpu", check=check)
    # the other precisions are untouched and still load
    open_vision(bundle, manifest, precision="fp32", backend="ort-cpu", check=check)


# ---------------------------------------------------------------------------------------------
# TensorRT runtime: orchestration with TensorRT and the GPU replaced by fakes
# ---------------------------------------------------------------------------------------------


class FakeTensorRT:
    """Stands in for TensorRT, the GPU and the builder; records what was built."""

    def __init__(self, monkeypatch, *, version="10.3.0", cc="8.7", passes=True) -> None:
        self.built: list[Path] = []
        self.version, self.cc, self.passes = version, cc, passes
        monkeypatch.setattr(engines, "tensorrt_available", lambda: (True, self.version))
        monkeypatch.setattr(engines, "trt_version", lambda: self.version)
        monkeypatch.setattr(engines, "gpu_info", lambda device=0: trt_rt.GpuInfo("Fake Orin", self.cc))
        monkeypatch.setattr(engines, "build_engine", self.build)
        monkeypatch.setattr(engines, "validate_engine", self.validate)

    def build(self, onnx_path, engine_path, *, max_tiles, opt_tiles, timing_cache_path, precision, **kw):
        engine_path = Path(engine_path)
        engine_path.write_bytes(b"engine " + self.version.encode() + os.urandom(8))
        Path(timing_cache_path).write_bytes(b"cache")
        self.built.append(engine_path)
        shapes = engine_build.profile_shapes(112, max_tiles=max_tiles, opt_tiles=opt_tiles)
        digest = engine_build.onnx_digest(onnx_path)
        return engine_build.EngineInfo(
            path=engine_path,
            precision=precision,
            trt_version=self.version,
            compute_capability=self.cc,
            gpu_name="Fake Orin",
            build_seconds=0.1,
            profile=shapes,
            onnx_sha256=digest,
            key="k",
            timing_cache_path=Path(timing_cache_path),
            size=engine_path.stat().st_size,
        )

    def validate(self, bundle, manifest, engine_path, precision, *, opt_tiles, device=0):
        ok = self.passes
        return {
            "cosine_min": 0.9999 if ok else 0.5,
            "passed": ok,
            "failed": [] if ok else ["cosine_min 0.5 < 0.999"],
        }


def test_ensure_engine_builds_records_reuses_and_rebuilds_when_stale(assets, tmp_path, monkeypatch):
    bundle = copy_bundle(assets.bundle, tmp_path / "b")
    fake = FakeTensorRT(monkeypatch)
    manifest = read_manifest(bundle)
    messages: list[str] = []
    check = lambda entries: require_valid(bundle, entries)  # noqa: E731

    first = engines.ensure_engine(bundle, manifest, "int8", check=check, progress=messages.append)
    assert first.status == "built" and len(fake.built) == 1 and "once per GPU" in messages[0]
    assert first.entry.path == "vision_int8.sm87.trt10.3.0.engine"
    on_disk = read_manifest(bundle)
    engine = on_disk.find("vision", format="engine", precision="int8")
    assert engine.trt_version == "10.3.0" and engine.compute_capability == "8.7"
    assert engine.extra["max_tiles"] == engines.default_tile_counts(on_disk.preprocess_config())[1]
    assert on_disk.find("extra", format="trt_timing_cache") is not None
    assert on_disk.validation["engine_int8"]["passed"] is True
    assert on_disk.digest() == manifest.digest()  # engines are not part of the bundle's identity

    again = engines.ensure_engine(bundle, on_disk, "int8", check=check)
    assert again.status == "up-to-date" and len(fake.built) == 1

    # a changed engine file is not trusted: rebuilt
    (bundle / engine.path).write_bytes(b"tampered")
    assert engines.ensure_engine(bundle, read_manifest(bundle), "int8", check=check).status == "built"
    # another TensorRT version: the old engine is stale, a second one is built beside it
    fake.version = "10.7.0"
    res = engines.ensure_engine(bundle, read_manifest(bundle), "int8", check=check)
    assert res.status == "built" and res.entry.path.endswith("trt10.7.0.engine")
    assert len(read_manifest(bundle).precisions("vision", "engine")) == 2
    with pytest.raises(trt_rt.TensorRTError, match="eyecare-edge build-engine"):
        fake.version = "10.8.0"
        engines.ensure_engine(bundle, read_manifest(bundle), "int8", build=False)


def test_ensure_engine_refusals(assets, tmp_path, monkeypatch):
    bundle = copy_bundle(assets.bundle, tmp_path / "b")
    with pytest.raises(trt_rt.TensorRTError, match="not 'fp32'"):
        engines.ensure_engine(bundle, read_manifest(bundle), "fp32")
    if not trt_rt.tensorrt_available()[0]:
        with pytest.raises(trt_rt.TensorRTError, match="TensorRT is not installed"):
            engines.ensure_engine(bundle, read_manifest(bundle), "int8")
    fake = FakeTensorRT(monkeypatch, passes=False)
    with pytest.raises(trt_rt.TensorRTError, match=r"no fp16 vision ONNX .*vision_fp16.onnx"):
        engines.ensure_engine(bundle, read_manifest(bundle), "fp16")
    with pytest.raises(trt_rt.EngineBuildError, match="fails its check .* engine discarded"):
        engines.ensure_engine(bundle, read_manifest(bundle), "int8")
    assert not list(bundle.glob("*.engine")) and len(fake.built) == 1
    assert read_manifest(bundle).validation["engine_int8"]["passed"] is False


def test_build_lock_is_exclusive_and_outside_the_bundle(tmp_path):
    bundle = tmp_path / "b"
    bundle.mkdir()
    assert engines._lock_path(bundle).parent != bundle
    order: list[str] = []
    with engines._BuildLock(bundle):

        def other() -> None:
            with engines._BuildLock(bundle):
                order.append("other")

        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.2)
        order.append("first")
    t.join(5)
    assert order == ["first", "other"]


def test_embedding_agreement():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, 5, 8)).astype(np.float32)
    same = engine_build.embedding_agreement(a, a)
    assert same["cosine_min"] == pytest.approx(1.0) and same["max_abs"] == 0.0
    flipped = a.copy()
    flipped[0, 0] *= -1
    figs = engine_build.embedding_agreement(a, flipped)
    assert figs["cosine_min"] == pytest.approx(-1.0) and figs["cosine_mean"] == pytest.approx(0.8)
    assert engine_build.embedding_agreement(a, np.full_like(a, np.nan))["cosine_mean"] == 0.0


# ---------------------------------------------------------------------------------------------
# on a CUDA machine
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
def test_ort_cuda_matches_cpu(assets, manifest, tiles):
    if not _has_cuda_ort():
        pytest.skip("ONNX Runtime has no CUDA provider here (onnxruntime-gpu not installed or no GPU)")
    ref = open_vision(assets.bundle, manifest, precision="fp32", backend="ort-cpu").encoder.encode(tiles)
    gpu = open_vision(assets.bundle, manifest, precision="fp32", backend="ort-cuda").encoder
    assert gpu.name == "onnxruntime-cuda"
    assert _cosine_mean(gpu.encode(tiles), ref) > 0.9999


@pytest.mark.gpu
def test_tensorrt_engine_built_on_first_use_and_run(assets, tmp_path, tiles):
    ok, why = trt_rt.tensorrt_available()
    if not ok:
        pytest.skip(f"no TensorRT: {why[:80]}")
    try:
        trt_rt.gpu_info()
    except trt_rt.CudaError as e:
        pytest.skip(f"no CUDA GPU: {e}")
    from eyecare_edge.export.onnx_fp16 import convert_fp16

    from eyecare_edge.bundle import add_file, write_manifest

    bundle = copy_bundle(assets.bundle, tmp_path / "b")
    manifest = read_manifest(bundle)
    convert_fp16(bundle / "vision_fp32.onnx", bundle / "vision_fp16.onnx")
    add_file(bundle, manifest, "vision_fp16.onnx", role="vision", precision="fp16")
    write_manifest(bundle, manifest)
    choice = open_vision(bundle, manifest, backend="tensorrt")
    assert choice.encoder.name == "tensorrt" and choice.encoder.precision == "fp16"
    ref = open_vision(bundle, manifest, precision="fp32", backend="ort-cpu").encoder.encode(tiles)
    many = np.concatenate([tiles] * (choice.encoder.max_tiles // tiles.shape[0] + 2))
    out = choice.encoder.encode(many)  # more tiles than the profile: chunked
    assert out.shape[0] == many.shape[0]
    assert _cosine_mean(out[: tiles.shape[0]], ref) > 0.999
    choice.encoder.close()
    assert engines.ensure_engine(bundle, read_manifest(bundle), "fp16").status == "up-to-date"
