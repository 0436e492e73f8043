"""GPU backend choice and fallback on a CPU machine: the real choice/fallback code of `vision`
(with its `tensorrt`, `engines`) and `llm`, with only the hardware faked (a fake `tensorrt` module, a fake CUDA
driver, monkeypatched ONNX Runtime provider lists, a fake llama.cpp offload flag).

What is proven: `auto`'s order and a recorded reason per skip; every failure type a GPU backend
raises while loading (a null builder's TypeError, out of memory, no GPU, a TensorRT that is too
old, a missing onnxruntime in the engine check) falls back under `auto` and fails with its cause
under an explicit request; none escapes the CLI as a traceback; the device index reaches ORT-CUDA
and the builder's CUDA context; `set_input_shape`'s refusal is an error; offload defaults.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from gpu_fakes import FakeDriver, current_device, fake_tensorrt
from runtime_fixtures import FAST, copy_bundle, runtime_assets

from eyecare_edge import llm as llm_mod
from eyecare_edge.bundle import add_file, read_manifest, write_manifest
from eyecare_edge.llm import binding as llm_binding
from eyecare_edge.llm import device as llm_device
from eyecare_edge.versions import at_least, version_tuple
from eyecare_edge.vision import VisionError, candidates, engine_build, engines, open_vision
from eyecare_edge.vision import tensorrt as trt_rt


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return runtime_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def gpu_bundle(assets, tmp_path_factory):
    """The runtime bundle plus an FP16 vision ONNX (what a default export holds)."""
    from eyecare_edge.export.onnx_fp16 import convert_fp16

    root = copy_bundle(assets.bundle, tmp_path_factory.mktemp("gpu") / "b")
    m = read_manifest(root)
    if m.find("vision", format="onnx", precision="fp16") is None:
        convert_fp16(root / "vision_fp32.onnx", root / "vision_fp16.onnx")
        add_file(root, m, "vision_fp16.onnx", role="vision", precision="fp16")
        write_manifest(root, m)
    return root


# --- the pretend GPU machine ---------------------------------------------------------------------


@pytest.fixture
def gpu_machine(monkeypatch):
    """A pretend GPU machine: fake CUDA driver; no TensorRT until a test installs a fake one."""
    FakeDriver.log = []
    monkeypatch.setattr(trt_rt, "CudaDriver", FakeDriver)
    monkeypatch.setitem(sys.modules, "tensorrt", None)

    def install(trt):
        monkeypatch.setitem(sys.modules, "tensorrt", trt)

    return install


def no_cuda_ort(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


def reasons(choice) -> dict[str, str]:
    return {s.split(":", 1)[0]: s.split(":", 1)[1].strip() for s in choice.skipped}


# --- order and reasons -------------------------------------------------------------------------


def test_candidates_order():
    assert candidates("auto", "auto") == [
        ("tensorrt", "fp16"),
        ("tensorrt", "int8"),
        ("ort-cuda", "fp16"),
        ("ort-cuda", "fp32"),
        ("ort-cpu", "auto"),
    ]
    assert candidates("tensorrt", "auto") == [("tensorrt", "fp16"), ("tensorrt", "int8")]
    assert candidates("ort-cuda", "fp32") == [("ort-cuda", "fp32")]
    assert candidates("auto", "int8") == [("tensorrt", "int8"), ("ort-cuda", "int8"), ("ort-cpu", "int8")]
    assert candidates("openvino", "auto") == [("openvino", "auto")]


def test_auto_on_a_cpu_machine_records_a_reason_per_skip(gpu_bundle, monkeypatch):
    no_cuda_ort(monkeypatch)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    choice = open_vision(gpu_bundle, read_manifest(gpu_bundle), threads=1)
    why = reasons(choice)
    assert list(why) == ["tensorrt fp16", "tensorrt int8", "ort-cuda fp16", "ort-cuda fp32"]
    assert all("TensorRT is not installed" in why[k] for k in ("tensorrt fp16", "tensorrt int8"))
    assert all("no CUDA provider" in why[k] and "eyecare-edge[gpu]" in why[k] for k in why if "cuda" in k)
    assert choice.encoder.name == "onnxruntime-cpu" and choice.where == "CPU"


def test_order_on_a_gpu_machine_with_every_gpu_path_failing(gpu_bundle, gpu_machine, monkeypatch):
    """TensorRT present (fake) but its builder returns null; ONNX Runtime claims CUDA but the
    session comes up on the CPU provider only (what a CPU onnxruntime does with a CUDA request)."""
    import onnxruntime as ort

    gpu_machine(fake_tensorrt(builder="null"))
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    choice = open_vision(gpu_bundle, read_manifest(gpu_bundle), threads=1)
    why = reasons(choice)
    assert list(why) == ["tensorrt fp16", "tensorrt int8", "ort-cuda fp16", "ort-cuda fp32"]
    assert "could not create a builder on Fake GPU 0" in why["tensorrt fp16"]
    assert "could not initialise CUDA" in why["ort-cuda fp16"]
    assert choice.encoder.name == "onnxruntime-cpu"
    assert not list(gpu_bundle.glob("*.engine"))  # nothing half-built left behind


# --- every failure type falls back (auto) or fails with its cause (explicit) --------------------


@pytest.mark.parametrize(
    "trt_kwargs,cause",
    [
        ({"builder": "typeerror"}, "factory function returned nullptr"),
        ({"builder": "null"}, "could not create a builder"),
        ({"build": "memory"}, "CUDA out of memory"),
        ({"build": "none"}, "failed to build an engine"),
        ({"version": "8.6.1"}, "TensorRT 8.6.1 is too old: eyecare-edge needs TensorRT >= 10"),
    ],
)
def test_tensorrt_failures_fall_back_or_fail_loudly(gpu_bundle, gpu_machine, monkeypatch, trt_kwargs, cause):
    no_cuda_ort(monkeypatch)
    gpu_machine(fake_tensorrt(**trt_kwargs))
    manifest = read_manifest(gpu_bundle)
    choice = open_vision(gpu_bundle, manifest, threads=1)
    assert choice.encoder.name == "onnxruntime-cpu"
    assert cause in reasons(choice)["tensorrt fp16"] and cause in reasons(choice)["tensorrt int8"]
    with pytest.raises(VisionError, match="vision backend tensorrt cannot run here") as err:
        open_vision(gpu_bundle, manifest, backend="tensorrt", precision="fp16")
    assert cause in str(err.value)
    assert not list(gpu_bundle.glob("*.engine"))


def test_no_gpu_and_wrong_device_index(gpu_bundle, gpu_machine, monkeypatch):
    no_cuda_ort(monkeypatch)
    gpu_machine(fake_tensorrt())
    choice = open_vision(gpu_bundle, read_manifest(gpu_bundle), device=5, threads=1)
    assert "GPU 5 is not usable: no GPU 5: the CUDA driver sees 2 GPU(s)" in reasons(choice)["tensorrt fp16"]
    monkeypatch.setattr(FakeDriver, "n", 0)
    with pytest.raises(VisionError, match="GPU 0 is not usable"):
        open_vision(gpu_bundle, read_manifest(gpu_bundle), backend="tensorrt")


def test_missing_onnxruntime_in_the_engine_check(gpu_bundle, gpu_machine, monkeypatch):
    """The engine builds, but the check against the FP32 ONNX needs onnxruntime, absent here:
    a TensorRTError (a VisionError) naming the package, and the unchecked engine is removed."""
    gpu_machine(fake_tensorrt())

    class Runner:
        def __init__(self, path, device=0):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def __call__(self, tiles):
            return np.zeros((tiles.shape[0], 4, 8), np.float32)

    monkeypatch.setattr(engine_build, "EngineRunner", Runner)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(VisionError, match=r"onnxruntime is not installed .*eyecare-edge\[cpu\]") as err:
        open_vision(gpu_bundle, read_manifest(gpu_bundle), backend="tensorrt", precision="fp16")
    assert "tensorrt fp16: checking the new fp16 engine" in str(err.value)
    assert not list(gpu_bundle.glob("*.engine"))
    # the build-engine command's path: ensure_engine itself raises the TensorRTError
    with pytest.raises(trt_rt.TensorRTError, match="onnxruntime is not installed"):
        engines.ensure_engine(gpu_bundle, read_manifest(gpu_bundle), "int8")


def test_tensorrt_error_is_a_vision_error():
    assert issubclass(trt_rt.TensorRTError, VisionError)
    assert issubclass(trt_rt.CudaError, VisionError) and issubclass(trt_rt.EngineBuildError, RuntimeError)


# --- the device index ----------------------------------------------------------------------------


def test_builder_runs_in_the_requested_gpus_context(gpu_bundle, gpu_machine, tmp_path):
    seen: dict = {}
    gpu_machine(fake_tensorrt(seen=seen))
    info = engine_build.build_engine(
        gpu_bundle / "vision_fp16.onnx", tmp_path / "e.engine", max_tiles=4, opt_tiles=2, device=1
    )
    assert seen["builder_device"] == 1 and info.gpu_name == "Fake GPU 1"
    assert current_device() is None  # the context was released after the build


def test_ort_cuda_gets_the_device_id(gpu_bundle, monkeypatch, gpu_machine):
    import onnxruntime as ort

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    asked: list = []
    real = ort.InferenceSession

    class Session(real):
        """The real CPU session, reporting the CUDA provider it was asked for (no GPU here)."""

        def __init__(self, path, opts=None, providers=None, **kw):
            asked.append(providers)
            super().__init__(path, opts, providers=["CPUExecutionProvider"])

        def get_providers(self):
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", Session)
    choice = open_vision(gpu_bundle, read_manifest(gpu_bundle), backend="ort-cuda", device=1, threads=1)
    assert asked[0][0] == ("CUDAExecutionProvider", {"device_id": 1})
    assert choice.encoder.precision == "fp16" and choice.where == "GPU 1"
    assert "onnxruntime-cuda fp16 on GPU 1" in choice.describe()


def test_set_input_shape_refusal_is_an_error():
    runner = object.__new__(trt_rt.EngineRunner)
    runner._trt = types.SimpleNamespace(nptype=lambda dt: np.float32)
    runner._drv = FakeDriver()
    runner._ctx = object()
    runner.input, runner.output = "pixel_values", "image_embeds"
    runner.engine = types.SimpleNamespace(
        get_tensor_dtype=lambda name: "float",
        get_tensor_profile_shape=lambda name, i: [(1, 3, 8, 8), (2, 3, 8, 8), (4, 3, 8, 8)],
    )
    runner.context = types.SimpleNamespace(set_input_shape=lambda name, shape: False)
    enc = object.__new__(trt_rt.TensorRTVision)
    enc.runner, enc.max_tiles, enc.precision = runner, 8, "fp16"
    import threading

    enc._lock = threading.Lock()
    with pytest.raises(VisionError, match=r"refused input shape \(8, 3, 8, 8\)"):
        enc.encode(np.zeros((8, 3, 8, 8), np.float32))


# --- versions and LLM offload defaults -----------------------------------------------------------


def test_version_floors(monkeypatch):
    assert version_tuple("10.3.0.26") == (10, 3, 0, 26) and version_tuple("0.3.35+cu124") == (0, 3, 35)
    assert at_least("0.3.36", "0.3.35") and not at_least("0.3.16", "0.3.35") and at_least("10", "10.0")
    assert not at_least("", "10") and at_least("11.0.0", "10")
    import llama_cpp

    monkeypatch.setattr(llama_cpp, "__version__", "0.3.16")
    with pytest.raises(llm_mod.LLMError, match=r"0.3.16 is too old: eyecare-edge needs >= 0.3.35"):
        llm_mod.check_binding_version()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("8.6.1"))
    ok, why = trt_rt.tensorrt_available()
    assert not ok and "TensorRT >= 10" in why and "JetPack 6" in why


def test_offload_defaults(monkeypatch):
    from eyecare_edge.pipeline import PipelineOptions

    assert PipelineOptions().n_gpu_layers is None and PipelineOptions().flash_attn is None
    assert llm_mod.LLMOptions().n_gpu_layers is None and llm_mod.LLMOptions().flash_attn is None
    monkeypatch.setattr(llm_device, "gpu_offload_supported", lambda: True)
    assert llm_mod.resolve_gpu_layers(None) == -1 and llm_mod.resolve_gpu_layers(0) == 0
    assert (
        llm_mod.resolve_flash_attn(None, -1) == "auto" and llm_mod.resolve_flash_attn(None, 0) == "disabled"
    )
    assert llm_mod.resolve_flash_attn(False, -1) == "disabled"
    llm_mod.LLMOptions(kv_type="q8_0").validate()  # flash auto on a GPU can quantize V
    monkeypatch.setattr(llm_device, "gpu_offload_supported", lambda: False)
    assert llm_mod.resolve_gpu_layers(None) == 0 and llm_mod.resolve_flash_attn(None, 0) == "disabled"
    with pytest.raises(llm_mod.LLMError, match="needs flash_attn"):
        llm_mod.LLMOptions(kv_type="q8_0").validate()
    llm_mod.LLMOptions(kv_type="q8_0/f16").validate()  # a quantized K alone needs no flash attention


def test_llm_says_where_it_runs(assets):
    from eyecare_edge.pipeline import choose_llm

    m = read_manifest(assets.bundle)
    path = assets.bundle / choose_llm(m, "q4_k_m").path
    with llm_mod.LlamaCppLM(path, llm_mod.LLMOptions(n_ctx=256, n_threads=1)) as lm:
        if llm_mod.gpu_offload_supported():
            assert lm.gpu_layers == -1 and lm.describe_device().startswith("GPU (all")
        else:
            assert lm.gpu_layers == 0 and lm.flash_attn == "disabled"
            assert lm.describe_device() == (
                "CPU (this llama.cpp build has no GPU offload, flash attention disabled)"
            )


# --- the CLI: no traceback for any failure type ----------------------------------------------------


def test_ask_falls_back_and_says_where_each_half_ran(assets, gpu_bundle, gpu_machine, monkeypatch):
    from click.testing import CliRunner

    from eyecare_edge.cli import main

    no_cuda_ort(monkeypatch)
    gpu_machine(fake_tensorrt(build="memory"))
    image = str(assets.images[0])
    args = ["ask", str(gpu_bundle), image, "-q", "Which eye?", "--max-tokens", "2", "--threads", "1"]
    args += ["--vision-threads", "1"]
    res = CliRunner().invoke(main, [*args, "--verbose"])
    assert res.exit_code == 0, res.output
    assert "vision: onnxruntime-cpu" in res.stderr and "on CPU" in res.stderr
    assert "skipped tensorrt fp16: " in res.stderr and "failed building on Fake GPU 0" in res.stderr
    assert "CUDA out of memory" in res.stderr and "llm: llama.cpp" in res.stderr
    assert "n_ubatch 256, KV q8_0/f16" in res.stderr  # the LLM stays on this CPU: its defaults
    for fail in (fake_tensorrt(build="memory"), fake_tensorrt(builder="typeerror"), fake_tensorrt("8.6.1")):
        gpu_machine(fail)
        res = CliRunner().invoke(main, [*args, "--vision", "tensorrt"])
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
        assert res.stderr.splitlines()[-1].startswith("error: vision backend tensorrt cannot run here")
        assert "Traceback" not in res.output


def test_pipeline_describe_names_both_devices(assets, monkeypatch):
    from eyecare_edge.pipeline import Pipeline

    no_cuda_ort(monkeypatch)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with Pipeline.load(assets.bundle, **FAST) as pipe:
        line = pipe.describe()
    assert "vision: onnxruntime-cpu" in line and " on CPU " in line and "llm: llama.cpp" in line
    assert ("on CPU (" in line.split("llm:")[1]) or ("on GPU (" in line.split("llm:")[1])


def test_llm_falls_back_to_the_cpu_when_automatic_offload_fails(assets, monkeypatch):
    """A GPU build whose offloaded load fails (out of GPU memory): the model loads on the CPU and
    says why; an explicit n_gpu_layers request fails instead."""
    from eyecare_edge.pipeline import choose_llm

    lib = llm_binding.lib
    real = lib.llama_model_load_from_file
    asked: list[int] = []

    def load(path, params):
        asked.append(params.n_gpu_layers)
        return None if params.n_gpu_layers != 0 else real(path, params)

    monkeypatch.setattr(llm_device, "gpu_offload_supported", lambda: True)
    monkeypatch.setattr(lib, "llama_model_load_from_file", load)
    path = assets.bundle / choose_llm(read_manifest(assets.bundle), "q4_k_m").path
    with llm_mod.LlamaCppLM(path, llm_mod.LLMOptions(n_ctx=256, n_threads=1)) as lm:
        assert asked == [-1, 0] and lm.gpu_layers == 0 and lm.flash_attn == "disabled"
        assert lm.describe_device().startswith("CPU (loading with every layer on the GPU failed")
        assert lm.tokenize("eye")  # a working model
    with pytest.raises(llm_mod.LLMError, match="could not load"):
        llm_mod.LlamaCppLM(path, llm_mod.LLMOptions(n_ctx=256, n_threads=1, n_gpu_layers=-1))
