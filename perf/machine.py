"""This machine's limits and state: memory bandwidth, FP32 matmul FLOP/s, CPU features, load.

The bounds of `costs` divide work by these figures: decode reads every weight once per token, so
its speed is bounded by memory bandwidth; prefill multiplies big matrices, so its speed is bounded
by matrix-multiply FLOP/s. The probes use numpy only (BF16 FLOP/s needs torch and is measured by
`reference.matmul_gflops` in a child process).

The probes measure what a kernel reaches here, which is a lower bound of the hardware's peak: a
fraction of the bound above 1.0 means the probe was beaten, not that physics was. On a machine
shared with other work the figures move; `load_average` is recorded at the start and the end of a
run so a reader can judge the noise.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from eyecare_edge.prefill_estimate import measure_numpy_matmul

# CPU features that decide which kernels the backends can use (x86 names from /proc/cpuinfo).
INTERESTING_FLAGS = (
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
    "asimd",
    "sve",
)
PACKAGES = (
    "numpy",
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "llama_cpp_python",
    "torch",
    "transformers",
)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The INTERESTING_FLAGS this CPU reports (empty where /proc/cpuinfo is unavailable)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    have: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            have.update(line.split(":", 1)[1].split())
            break
    return [f for f in INTERESTING_FLAGS if f in have]


def has_native_bf16(flags: list[str]) -> bool:
    """Whether BF16 matrix math runs in hardware (AVX-512 BF16 or AMX); without it, frameworks
    emulate BF16 and it is slower than FP32."""
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def memory_total_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not Unix
        return []


def package_versions() -> dict[str, str]:
    """Installed versions, read from package metadata (nothing is imported)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def llama_system_info() -> str:
    """llama.cpp's own summary of the CPU features it was built for ("AVX2 = 1 | ...")."""
    try:
        import llama_cpp.llama_cpp as lib
    except ImportError:
        return ""
    raw = lib.llama_print_system_info()
    return (raw.decode() if isinstance(raw, bytes) else str(raw)).strip()


def _best_rate(work: float, fn, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        dt = time.perf_counter() - t
        if dt > 0:
            best = max(best, work / dt)
    return best


def measure_bandwidth(size_bytes: int = 512 << 20, threads: int = 1, repeats: int = 5) -> float:
    """Memory read bandwidth in GB/s: the best of `repeats` passes of a SIMD reduction (uint8
    max) over a buffer far larger than the caches, split over `threads` threads (numpy releases
    the GIL in reductions)."""
    buf = np.ones(size_bytes, dtype=np.uint8)  # written once, so every page is resident
    parts = np.array_split(buf, max(threads, 1))
    with ThreadPoolExecutor(max(threads, 1)) as pool:

        def one_pass() -> None:
            list(pool.map(np.max, parts))

        one_pass()  # warm: page tables, thread start
        return _best_rate(buf.nbytes / 1e9, one_pass, repeats)


@dataclass
class MachineInfo:
    """What a report says about the machine. bandwidth_gb_s: best of the 1-thread and
    all-thread probes; matmul_gflops: filled per precision by whoever measured it."""

    cpu: str
    flags: list[str]
    logical_cpus: int
    physical_cores: int
    memory_bytes: int
    load_average_start: list[float]
    bandwidth_gb_s: float = 0.0
    bandwidth_by_threads: dict[str, float] = field(default_factory=dict)
    matmul_gflops: dict[str, float] = field(default_factory=dict)
    llama_cpp: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    load_average_end: list[float] = field(default_factory=list)

    @property
    def native_bf16(self) -> bool:
        return has_native_bf16(self.flags)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["native_bf16"] = self.native_bf16
        return d


def probe_machine(threads: int, *, bandwidth_bytes: int = 512 << 20, quick: bool = False) -> MachineInfo:
    """Describe this machine and measure its bandwidth and numpy FP32 matmul rate.

    quick: smaller buffers and fewer repeats (tests)."""
    from eyecare_edge.llm import physical_cores

    info = MachineInfo(
        cpu=cpu_model(),
        flags=cpu_flags(),
        logical_cpus=os.cpu_count() or 1,
        physical_cores=physical_cores(),
        memory_bytes=memory_total_bytes(),
        load_average_start=load_average(),
        llama_cpp=llama_system_info(),
        versions=package_versions(),
    )
    reprobe(info, threads, bandwidth_bytes=bandwidth_bytes, quick=quick)
    return info


def reprobe(
    info: MachineInfo, threads: int, *, bandwidth_bytes: int = 512 << 20, quick: bool = False
) -> None:
    """Measure bandwidth and numpy FP32 matmul again and keep the best figures: on a shared
    machine one probe can land in a busy moment, and a bound must not be set too low. Called at
    the start and at the end of a run."""
    size = (32 << 20) if quick else bandwidth_bytes
    repeats = 2 if quick else 5
    for t in sorted({1, max(threads, 1)}):
        bw = round(measure_bandwidth(size, t, repeats), 2)
        info.bandwidth_by_threads[str(t)] = max(bw, info.bandwidth_by_threads.get(str(t), 0.0))
    info.bandwidth_gb_s = max(info.bandwidth_by_threads.values())
    shape = (64, 256, 256) if quick else (512, 3072, 3072)
    gf = round(measure_numpy_matmul(*shape, repeats=2 if quick else 3), 1)
    info.matmul_gflops["fp32_numpy"] = max(gf, info.matmul_gflops.get("fp32_numpy", 0.0))
