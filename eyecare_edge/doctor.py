"""What this machine can run, and why not: the first thing a clinic's IT person runs.

`diagnose(bundle=None)` looks, without loading a model, at the CPU (features, cores), the llama.cpp
build (CUDA/Metal/CPU, AVX-512/VNNI, from `llama_print_system_info`), NVIDIA GPUs (nvidia-smi,
else the CUDA driver through ctypes, so it works on a Jetson without nvidia-smi), TensorRT, ONNX
Runtime (version, providers) and OpenVINO. Every backend gets `available` true/false, the reason,
and the exact command that would fix it on *this* machine (x86_64 workstation or Jetson). With a
bundle it also says which vision backend and precision `auto` would take and where the LLM would
run — a static plan: the first load may still fall back (a TensorRT build that runs out of
memory), and `eyecare-edge ask --verbose` shows the actual choice.

Runtime module: no torch; every probe is an import or a cheap library call, each guarded so a
broken install is reported, never raised.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eyecare_edge.versions import LLAMA_CPP_PYTHON_MIN, at_least

CPU_FEATURES = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "avx_vnni",
    "asimd",
)
LLAMA_GPU_BACKENDS = ("CUDA", "Metal", "Vulkan", "HIP", "SYCL", "CANN", "OpenCL")


@dataclass
class Backend:
    """One thing this machine can or cannot run. fix: the command that makes it available (None
    when nothing installable helps, e.g. no GPU)."""

    name: str
    kind: str  # "vision" | "llm"
    available: bool
    reason: str
    fix: str | None = None


@dataclass
class Report:
    machine: dict
    cpu: dict
    llama_cpp: dict
    gpu: dict
    tensorrt: dict
    onnxruntime: dict
    openvino: dict
    backends: list[Backend] = field(default_factory=list)
    bundle: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# --- the machine ---------------------------------------------------------------------------------


def is_jetson() -> bool:
    """A Jetson (L4T): /etc/nv_tegra_release, or the device-tree model says so."""
    if Path("/etc/nv_tegra_release").exists():
        return True
    try:
        return "jetson" in Path("/proc/device-tree/model").read_text(errors="ignore").lower()
    except OSError:
        return False


def machine_info() -> dict:
    return {
        "platform": platform.platform(),
        "arch": platform.machine(),
        "python": platform.python_version(),
        "jetson": is_jetson(),
    }


def cpu_info() -> dict:
    from eyecare_edge.llm import physical_cores

    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="ignore").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware") and not model:
                model = value.strip()
            elif key in ("flags", "features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count() or 1
    return {
        "model": model or platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": physical_cores(),
        "threads_default": physical_cores(),
        "features": {f: f in flags for f in CPU_FEATURES},
    }


def parse_system_info(text: str) -> dict:
    """`llama_print_system_info()` -> the backends it lists and the CPU features compiled in,
    e.g. "CUDA : ARCHS = 870 | ... | CPU : AVX2 = 1 | AVX512 = 1 | ..." -> {"backends": ["CUDA", "CPU"], ...}."""
    backends = [b for b in (*LLAMA_GPU_BACKENDS, "CPU") if f"{b} :" in text]
    features = {}
    for part in text.replace("|", "\n").splitlines():
        key, sep, value = part.rpartition("=")
        key = key.split(":")[-1].strip()
        if sep and key.isupper() and value.strip() in ("0", "1"):
            features[key] = value.strip() == "1"
    return {"backends": backends, "features": features}


def llama_info() -> dict:
    from eyecare_edge.llm import binding, device

    if binding.lib is None:
        return {"installed": False, "reason": f"llama-cpp-python is not installed ({binding.IMPORT_ERROR})"}
    version = binding.binding_version()
    try:
        text = binding.lib.llama_print_system_info().decode(errors="replace")
    except Exception as e:  # an old binding without it
        text = f"unavailable ({e})"
    parsed = parse_system_info(text)
    gpu = [b for b in parsed["backends"] if b != "CPU"]
    return {
        "installed": True,
        "version": version,
        "meets_floor": at_least(version, LLAMA_CPP_PYTHON_MIN),
        "floor": LLAMA_CPP_PYTHON_MIN,
        "gpu_offload": device.gpu_offload_supported(),
        "build": "+".join(gpu) if gpu else "CPU",
        "cpu_features": {
            k: parsed["features"].get(k, False) for k in ("AVX2", "AVX512", "AVX512_VNNI", "AVX512_BF16")
        },
        "system_info": text.strip(),
    }


def _nvidia_smi() -> list[dict] | None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    query = "index,name,compute_cap,driver_version,memory.total"
    try:
        out = subprocess.run(
            [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    devices = []
    for line in out.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 5:
            idx, name, cc, driver, mem = cells
            devices.append(
                {"index": int(idx), "name": name, "compute_capability": cc, "driver": driver,
                 "memory_mb": int(float(mem)) if mem.replace(".", "").isdigit() else None}
            )  # fmt: skip
    return devices


def gpu_report() -> dict:
    """NVIDIA GPUs from nvidia-smi, else from the CUDA driver library (libcuda) via ctypes."""
    devices = _nvidia_smi()
    if devices:
        return {"present": True, "source": "nvidia-smi", "devices": devices}
    from eyecare_edge.vision import tensorrt as trt_rt

    try:
        drv = trt_rt.CudaDriver()
        driver = drv.driver_version()
        devices = [
            {"index": i, "name": drv.name(i), "compute_capability": drv.compute_capability(i),
             "driver": f"CUDA {driver}", "memory_mb": None}
            for i in range(drv.count())
        ]  # fmt: skip
    except trt_rt.TensorRTError as e:
        return {"present": False, "source": None, "devices": [], "reason": str(e)}
    if not devices:
        return {
            "present": False,
            "source": "cuda-driver",
            "devices": [],
            "reason": "the CUDA driver sees no GPU",
        }
    return {"present": True, "source": "cuda-driver", "devices": devices}


def tensorrt_report() -> dict:
    from eyecare_edge.vision import tensorrt as trt_rt

    ok, detail = trt_rt.tensorrt_available()
    return {"available": ok, "version": detail if ok else None, "reason": None if ok else detail}


def onnxruntime_report() -> dict:
    try:
        import onnxruntime as ort
    except Exception as e:
        return {"installed": False, "reason": str(e), "providers": []}
    return {
        "installed": True,
        "version": str(getattr(ort, "__version__", "?")),
        "providers": list(ort.get_available_providers()),
    }


def openvino_report() -> dict:
    try:
        import openvino as ov
    except Exception as e:
        return {"installed": False, "reason": str(e)}
    return {"installed": True, "version": str(getattr(ov, "__version__", "?"))}


# --- fixes -------------------------------------------------------------------------------------


def install_commands(jetson: bool, arch: str) -> dict[str, str]:
    """The commands that install each piece on this kind of machine (see README)."""
    arch87 = " -DCMAKE_CUDA_ARCHITECTURES=87" if jetson else ""
    x86 = arch in ("x86_64", "AMD64")
    return {
        "llama-cuda": (
            f'CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_CUDA=on{arch87}" '
            f"pip install --no-cache-dir --force-reinstall 'llama-cpp-python>={LLAMA_CPP_PYTHON_MIN}'"
        ),
        "llama-cpu": (
            f"CMAKE_ARGS=\"-DLLAVA_BUILD=OFF\" pip install --no-cache-dir -U 'llama-cpp-python>={LLAMA_CPP_PYTHON_MIN}'"
        ),
        "tensorrt": (
            "sudo apt install python3-libnvinfer python3-libnvinfer-dev, then use a venv made with "
            "`python3 -m venv --system-site-packages` (JetPack 6.1+ ships TensorRT 10.3)"
            if jetson
            else "pip install 'tensorrt>=10'"
            if x86
            else "no TensorRT wheel for this platform on PyPI"
        ),
        "ort-cuda": (
            "pip uninstall -y onnxruntime && pip install 'eyecare-edge[gpu]'"
            if x86 and not jetson
            else "none on PyPI for this platform (no aarch64 onnxruntime-gpu): use TensorRT from JetPack"
        ),
        "ort-cpu": "pip install 'eyecare-edge[cpu]'",
        "openvino": "pip install 'eyecare-edge[openvino]'",
    }


def backends(report: Report) -> list[Backend]:
    """Every backend with available true/false, the reason and the fix."""
    from eyecare_edge.vision import backend_ready

    fixes = install_commands(report.machine["jetson"], report.machine["arch"])
    gpu = report.gpu["present"]
    no_gpu = f"no NVIDIA GPU: {report.gpu.get('reason', 'none found')}"
    out = []
    for name in ("tensorrt", "ort-cuda", "ort-cpu", "openvino"):
        ok, why = backend_ready(name, 0)
        if ok:
            out.append(Backend(name, "vision", True, f"ready ({why})"))
        elif name in ("tensorrt", "ort-cuda") and not gpu:
            # nothing to install helps without a GPU: say that rather than send IT to NVIDIA's index
            out.append(Backend(name, "vision", False, f"{no_gpu} ({_first_sentence(why)})"))
        else:
            out.append(Backend(name, "vision", False, _first_sentence(why), fixes[name]))
    lc = report.llama_cpp
    if not lc.get("installed"):
        out.append(
            Backend("llama.cpp", "llm", False, lc["reason"], fixes["llama-cuda" if gpu else "llama-cpu"])
        )
        return out
    floor_ok = lc["meets_floor"]
    out.append(
        Backend(
            "llama.cpp-cpu", "llm", floor_ok,
            f"llama-cpp-python {lc['version']}, CPU features {', '.join(k for k, v in lc['cpu_features'].items() if v) or 'baseline'}"
            if floor_ok else f"llama-cpp-python {lc['version']} is older than {lc['floor']}",
            None if floor_ok else fixes["llama-cpu"],
        )
    )  # fmt: skip
    if lc["gpu_offload"]:
        out.append(
            Backend("llama.cpp-gpu", "llm", floor_ok, f"{lc['build']} build: all layers offloaded", None)
        )
    else:
        why = "this llama.cpp build is CPU-only" + ("" if gpu else f"; {no_gpu}")
        out.append(Backend("llama.cpp-gpu", "llm", False, why, fixes["llama-cuda"] if gpu else None))
    return out


def _first_sentence(text: str) -> str:
    """The reason without its install advice (the `fix` field carries the command)."""
    head = text.split(". ", 1)[0].split(": pip ", 1)[0]
    return head.rstrip(".")


# --- a bundle's plan -----------------------------------------------------------------------------


def bundle_plan(bundle: str | os.PathLike[str], available: dict[str, Backend], llama: dict) -> dict:
    """Which vision (backend, precision) `auto` would take and where the LLM would run, from the
    manifest and the backends' readiness (nothing loaded; see the module docstring)."""
    from eyecare_edge.bundle import read_manifest
    from eyecare_edge.pipeline import choose_llm
    from eyecare_edge.pipeline.options import PipelineOptions
    from eyecare_edge.pipeline.plan import choose_kv_cache, choose_ubatch, default_n_ctx, token_budget
    from eyecare_edge.vision import candidates, cpu_precision_order, validated

    m = read_manifest(bundle)
    have = set(m.precisions("vision", "onnx"))
    plan, chosen = [], None
    for name, p in candidates("auto", "auto"):
        b = available[name]
        if p == "auto":
            order = cpu_precision_order(m)
            p, why = (order[0], None) if order else ("-", "no validated CPU vision ONNX in the bundle")
        else:
            why = None if p in have else f"bundle has no {p} vision ONNX"
            if why is None and not validated(m, p):
                why = f"export recorded a failed check for {p}"
        if why is None and not b.available:
            why = b.reason
        plan.append({"backend": name, "precision": p, "usable": why is None, "reason": why})
        if why is None and chosen is None:
            chosen = {"backend": name, "precision": p, "device": "GPU 0" if name != "ort-cpu" else "CPU"}
    llm_entry = choose_llm(m, "auto")
    offload = bool(llama.get("gpu_offload"))
    n_ctx = default_n_ctx(m, m.preprocess_config(), token_budget(m))
    kv_type, flash = choose_kv_cache("auto", None, on_gpu=offload, llm_precision=llm_entry.precision)
    return {
        "path": str(bundle),
        "vision_onnx": sorted(have),
        "vision": chosen,
        "vision_plan": plan,
        "llm": {
            "precision": llm_entry.precision,
            "file": llm_entry.path,
            "device": f"GPU ({llama.get('build')}, all layers)" if offload else "CPU",
            "n_gpu_layers": -1 if offload else 0,
            "n_ctx": n_ctx,
            "kv_type": kv_type,
            "n_ubatch": choose_ubatch(None, PipelineOptions.n_batch, offload),
            "flash_attn": "enabled" if flash else "auto" if offload and flash is None else "disabled",
        },
    }


def diagnose(bundle: str | os.PathLike[str] | None = None) -> Report:
    report = Report(
        machine=machine_info(),
        cpu=cpu_info(),
        llama_cpp=llama_info(),
        gpu=gpu_report(),
        tensorrt=tensorrt_report(),
        onnxruntime=onnxruntime_report(),
        openvino=openvino_report(),
    )
    report.backends = backends(report)
    if bundle is not None:
        report.bundle = bundle_plan(bundle, {b.name: b for b in report.backends}, report.llama_cpp)
    return report


def format_text(report: Report) -> list[str]:
    """The human-readable report: one line per fact, then each backend with its fix."""
    m, c, lc, g = report.machine, report.cpu, report.llama_cpp, report.gpu
    feats = ", ".join(k for k, v in c["features"].items() if v) or "none of " + ", ".join(CPU_FEATURES)
    lines = [
        f"machine: {m['platform']} ({m['arch']}{', Jetson' if m['jetson'] else ''}), Python {m['python']}",
        f"cpu: {c['model']}; {c['physical_cores']} physical cores, {c['usable_cpus']} usable CPUs; {feats}",
    ]
    if lc.get("installed"):
        lines.append(
            f"llama.cpp: llama-cpp-python {lc['version']} ({lc['build']} build, GPU offload "
            f"{'yes' if lc['gpu_offload'] else 'no'}); compiled CPU features: "
            + (", ".join(k for k, v in lc["cpu_features"].items() if v) or "baseline")
        )
    else:
        lines.append(f"llama.cpp: {lc['reason']}")
    if g["present"]:
        for d in g["devices"]:
            lines.append(
                f"gpu {d['index']}: {d['name']}, compute capability {d['compute_capability']}, driver {d['driver']}"
                + (f", {d['memory_mb']} MiB" if d.get("memory_mb") else "")
            )
    else:
        lines.append(f"gpu: none ({g.get('reason')})")
    t, o = report.tensorrt, report.onnxruntime
    lines.append(f"tensorrt: {t['version'] if t['available'] else 'not available'}")
    lines.append(
        f"onnxruntime: {o['version']} providers {', '.join(o['providers'])}"
        if o["installed"]
        else "onnxruntime: not installed"
    )
    lines.append("backends:")
    for b in report.backends:
        lines.append(f"  [{'x' if b.available else ' '}] {b.name:<14} {b.reason}")
        if b.fix:
            lines.append(f"      fix: {b.fix}")
    if report.bundle is not None:
        v, lm = report.bundle["vision"], report.bundle["llm"]
        where = f"{v['backend']} {v['precision']} on {v['device']}" if v else "nothing usable"
        lines.append(
            f"bundle {report.bundle['path']}: vision {where}; llm {lm['precision']} on {lm['device']}"
        )
    return lines
