"""`eyecare-edge doctor`: on this CPU machine for real, and on pretend GPU machines (fake CUDA
driver, fake `tensorrt`, a fake `nvidia-smi` on PATH, monkeypatched ONNX Runtime providers)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from gpu_fakes import FakeDriver, fake_tensorrt

from eyecare_edge import doctor
from eyecare_edge.bundle import Manifest, PromptSpec, add_file, write_manifest
from eyecare_edge.cli import main
from eyecare_edge.llm import device as llm_device
from eyecare_edge.preprocess import preset_preprocess
from eyecare_edge.vision import tensorrt as trt_rt

ALL = {"tensorrt", "ort-cuda", "ort-cpu", "openvino", "llama.cpp-cpu", "llama.cpp-gpu"}


@pytest.fixture
def plan_bundle(tmp_path):
    """A manifest-only bundle (the plan reads the manifest, loads nothing): FP32/FP16/INT8 ONNX, a GGUF."""
    root = tmp_path / "b"
    root.mkdir()
    m = Manifest(
        model={"preset": "tiny"},
        preprocess=preset_preprocess("tiny").to_dict(),
        prompt=PromptSpec("chatml", None),
    )
    for rel, role, p in [
        ("vision_fp32.onnx", "vision", "fp32"),
        ("vision_fp16.onnx", "vision", "fp16"),
        ("vision_int8_u8s8.onnx", "vision", "int8_u8s8"),
        ("llm_q4_k_m.gguf", "llm", "q4_k_m"),
    ]:
        (root / rel).write_bytes(b"x")
        add_file(root, m, rel, role=role, precision=p)
    write_manifest(root, m)
    return root


def test_json_on_this_machine_lists_every_backend_with_a_reason():
    res = CliRunner().invoke(main, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert {b["name"] for b in out["backends"]} == ALL
    for b in out["backends"]:
        assert isinstance(b["available"], bool) and b["reason"], b
        if not b["available"] and b["fix"]:
            assert "pip install" in b["fix"] or "apt install" in b["fix"]
    ready = {b["name"]: b["available"] for b in out["backends"]}
    assert ready["ort-cpu"] and ready["llama.cpp-cpu"]
    assert out["cpu"]["physical_cores"] >= 1 and "avx2" in out["cpu"]["features"]
    assert out["llama_cpp"]["system_info"] and out["llama_cpp"]["meets_floor"]
    if not out["gpu"]["present"]:
        assert not ready["tensorrt"] and not ready["ort-cuda"] and not ready["llama.cpp-gpu"]
        # nothing to install helps without a GPU: no fix sends IT to NVIDIA's index
        assert all(b["fix"] is None for b in out["backends"] if b["name"] in ("tensorrt", "ort-cuda"))


def test_text_report_and_no_torch():
    code = (
        "import sys; from click.testing import CliRunner; from eyecare_edge.cli import main\n"
        "r = CliRunner().invoke(main, ['doctor']); assert r.exit_code == 0, r.output\n"
        "assert 'backends:' in r.output and 'llama.cpp' in r.output, r.output\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parse_system_info():
    cuda = "CUDA : ARCHS = 870 | USE_GRAPHS = 1 | CPU : NEON = 1 | ARM_FMA = 1 | AVX512 = 0 | OPENMP = 1 |"
    got = doctor.parse_system_info(cuda)
    assert got["backends"] == ["CUDA", "CPU"] and got["features"]["NEON"] and not got["features"]["AVX512"]
    assert doctor.parse_system_info("CPU : AVX2 = 1 | AVX512_VNNI = 1 |")["backends"] == ["CPU"]


def test_install_commands_per_machine():
    x86 = doctor.install_commands(jetson=False, arch="x86_64")
    jet = doctor.install_commands(jetson=True, arch="aarch64")
    assert "GGML_CUDA=on" in x86["llama-cuda"] and "ARCHITECTURES=87" not in x86["llama-cuda"]
    assert "-DCMAKE_CUDA_ARCHITECTURES=87" in jet["llama-cuda"] and ">=0.3.35" in jet["llama-cuda"]
    assert x86["tensorrt"] == "pip install 'tensorrt>=10'" and "python3-libnvinfer" in jet["tensorrt"]
    assert "--system-site-packages" in jet["tensorrt"]
    assert "eyecare-edge[gpu]" in x86["ort-cuda"] and "no aarch64 onnxruntime-gpu" in jet["ort-cuda"]


@pytest.fixture
def gpu_workstation(monkeypatch, tmp_path):
    """x86 workstation with one GPU (fake nvidia-smi on PATH, fake driver), CPU onnxruntime,
    a CPU-only llama.cpp build, TensorRT 10 (fake)."""
    import onnxruntime as ort

    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho '0, NVIDIA RTX 4000 Ada Generation, 8.9, 550.54.15, 20475'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}:{__import__('os').environ['PATH']}")
    FakeDriver.log = []
    monkeypatch.setattr(FakeDriver, "n", 1)
    monkeypatch.setattr(trt_rt, "CudaDriver", FakeDriver)
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt("10.3.0"))
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(llm_device, "gpu_offload_supported", lambda: False)
    monkeypatch.setattr(doctor, "is_jetson", lambda: False)


def test_gpu_workstation_with_cpu_only_pieces(gpu_workstation, plan_bundle):
    report = doctor.diagnose(plan_bundle)
    gpu = report.gpu
    assert gpu["source"] == "nvidia-smi" and gpu["devices"][0]["compute_capability"] == "8.9"
    assert gpu["devices"][0]["driver"] == "550.54.15" and gpu["devices"][0]["memory_mb"] == 20475
    by = {b.name: b for b in report.backends}
    assert by["tensorrt"].available and "10.3.0" in by["tensorrt"].reason
    assert not by["ort-cuda"].available and by["ort-cuda"].fix.startswith("pip uninstall -y onnxruntime")
    assert not by["llama.cpp-gpu"].available and "CPU-only" in by["llama.cpp-gpu"].reason
    assert "-DGGML_CUDA=on" in by["llama.cpp-gpu"].fix and "--force-reinstall" in by["llama.cpp-gpu"].fix
    plan = report.bundle
    assert plan["vision"] == {"backend": "tensorrt", "precision": "fp16", "device": "GPU 0"}
    steps = {(s["backend"], s["precision"]): s for s in plan["vision_plan"]}
    assert steps[("tensorrt", "int8")]["reason"] == "bundle has no int8 vision ONNX"
    assert plan["llm"]["device"] == "CPU" and plan["llm"]["precision"] == "q4_k_m"
    # what `Pipeline.load` would take on this CPU: K in Q8_0, V in F16, no flash attention
    llm = plan["llm"]
    assert (llm["kv_type"], llm["flash_attn"], llm["n_ubatch"]) == ("q8_0/f16", "disabled", 256)
    text = "\n".join(doctor.format_text(report))
    assert "gpu 0: NVIDIA RTX 4000 Ada Generation, compute capability 8.9" in text
    assert "vision tensorrt fp16 on GPU 0; llm q4_k_m on CPU" in text


def test_jetson_without_nvidia_smi_uses_the_cuda_driver(gpu_workstation, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(doctor, "is_jetson", lambda: True)
    monkeypatch.setattr(
        doctor,
        "machine_info",
        lambda: {"platform": "L4T", "arch": "aarch64", "python": "3.10", "jetson": True},
    )
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    monkeypatch.setattr(llm_device, "gpu_offload_supported", lambda: True)
    report = doctor.diagnose()
    assert report.gpu["source"] == "cuda-driver" and report.gpu["devices"][0]["driver"] == "CUDA 12.4"
    by = {b.name: b for b in report.backends}
    assert not by["tensorrt"].available and "python3-libnvinfer" in by["tensorrt"].fix
    assert "no aarch64 onnxruntime-gpu" in by["ort-cuda"].fix
    assert by["llama.cpp-gpu"].available


def test_doctor_on_a_bad_bundle_is_an_error_line(tmp_path):
    res = CliRunner().invoke(main, ["doctor", str(tmp_path)])
    assert res.exit_code == 1 and "manifest" in res.output.lower() and "Traceback" not in res.output
