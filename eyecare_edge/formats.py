"""The table of export formats: every file a bundle may hold, what runs it and how it is checked.

One row per format (Ultralytics' `export_formats()` is the model). The exporter, both validators,
the CLI's choices and defaults, and `perf` read their lists from here, so adding a format is one
row. Plain data: no numpy, no torch, safe to import anywhere (a camera PC's `--help` included).

Tolerances are what export checks each file against (vision: against the FP32 ONNX, FP32 against
torch; LLM: logits against torch on the probe prompts). Why these bounds:
- vision fp32 must reproduce torch; fp16 keeps every token's direction (cosine_min 0.999);
  the INT8 graphs are judged by their mean cosine *and* by `error_vs_spread` (RMS error over the
  RMS difference between different tiles): a deep random tower's unrelated tiles already have a
  plain cosine ~0.99, so the ratio is what tells a wrong answer from a right one (measured:
  int8 0.06, u8s8 0.09, one broken weight scale 2.2, the wrong tile 1.0).
- LLM f32 must reproduce torch (F32 KV, no flash attention: ~1e-6); 16-bit types and Q8_0 must
  keep the model's choices; 4/5/6-bit types are bounded loosely (4-bit LLMs lose ~1-1.5
  benchmark points; see ANCHORS.md) and judged by the bench instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

Role = Literal["vision", "llm"]
Prefer = Literal["cpu", "gpu", "any"]

# Vision backends, in the order `--vision` lists them after "auto" (which pairs `auto` tries, and
# in which order, is `vision.AUTO_ORDER`).
VISION_BACKENDS = ("tensorrt", "ort-cuda", "ort-cpu", "openvino")
GPU_BACKENDS = ("tensorrt", "ort-cuda")
LLM_BACKEND = "llama.cpp"
# llama.cpp KV caches: name -> (element type of K, element type of V). llama.cpp quantizes V only
# inside its flash-attention kernel, so a quantized V needs flash attention; a quantized K does not
# ("q8_0/f16": K in Q8_0, V in F16, no flash attention needed). f16 is what `LLMOptions` takes
# unless told. `--kv-type` and the Pipeline also take "auto" (their default: the CPU takes
# "q8_0/f16", `pipeline.plan.choose_kv_cache` says why).
KV_CACHES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "f16": ("f16", "f16"),
        "f32": ("f32", "f32"),
        "q8_0": ("q8_0", "q8_0"),
        "bf16": ("bf16", "bf16"),
        "q8_0/f16": ("q8_0", "f16"),
    }
)
KV_CACHE_TYPES = tuple(KV_CACHES)
# Bytes per cached value of each element type (Q8_0: 32 values in 34 bytes).
KV_ELEMENT_BYTES: Mapping[str, float] = MappingProxyType(
    {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
)
DEFAULT_KV_CACHE_TYPE = "f16"
KV_CACHE_CHOICES = ("auto", *KV_CACHE_TYPES)


def kv_cache_value_bytes(kv_type: str) -> float:
    """Mean bytes per cached value (of K and V) of a KV cache name in KV_CACHES."""
    k, v = KV_CACHES[kv_type]
    return (KV_ELEMENT_BYTES[k] + KV_ELEMENT_BYTES[v]) / 2


def kv_cache_needs_flash(kv_type: str) -> bool:
    """Whether llama.cpp needs flash attention for this cache: its V is quantized."""
    return KV_CACHES[kv_type][1] not in ("f32", "f16", "bf16")


# transformers dtypes the PyTorch reference runs in (`perf --references`, training/reference.py).
REFERENCE_DTYPES = ("fp32", "bf16", "fp16")

# The loose bound of the 4/5/6-bit GGUF types (see the module docstring).
LOW_BIT_LLM_TOLERANCE: Mapping[str, float] = MappingProxyType({"top1": 0.5, "kl_mean": 1.0})
_KEEPS_CHOICES: Mapping[str, float] = MappingProxyType({"top1": 0.9, "kl_mean": 0.05})


def _frozen(d: Mapping[str, float]) -> Mapping[str, float]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class ExportFormat:
    """One format a bundle may hold.

    name: what `--vision`/`--llm` and the manifest call it. file: the bundle file's name.
    backends: the runtimes that run it. prefer: where it is the fast path (cpu, gpu, or any).
    tolerance: metric -> bound the export check applies (upper bound for error metrics, lower
    bound for agreement metrics; the validators know which). engine_check: (figure, minimum) a
    TensorRT engine built from this ONNX must reach against the FP32 ONNX, None if no engine.
    default: `export` writes it unless told otherwise. measured: `perf` builds and measures it
    by default (bf16 too: the CPU's BF16 speed is a question perf answers). written: an LLM type
    the GGUF writer emits directly (the others are quantized from F32/F16 by llama.cpp).
    """

    name: str
    role: Role
    description: str
    backends: tuple[str, ...]
    prefer: Prefer
    tolerance: Mapping[str, float]
    default: bool
    measured: bool
    written: bool = False
    engine_check: tuple[str, float] | None = None
    file: str = field(init=False)

    def __post_init__(self) -> None:
        suffix = "onnx" if self.role == "vision" else "gguf"
        object.__setattr__(self, "file", f"{self.role}_{self.name}.{suffix}")
        object.__setattr__(self, "tolerance", _frozen(self.tolerance))


_VISION_ROWS = (
    ExportFormat(
        "fp32",
        "vision",
        "the reference; the others derive from it and are checked against it",
        ("ort-cpu", "ort-cuda", "openvino"),
        "cpu",
        {"max_abs_rel": 1e-4, "cosine_min": 0.9999},
        default=True,
        measured=True,
    ),
    ExportFormat(
        "fp16",
        "vision",
        "GPU: TensorRT, ONNX Runtime CUDA",
        ("tensorrt", "ort-cuda"),
        "gpu",
        {"cosine_min": 0.999},
        default=True,
        measured=True,
        engine_check=("cosine_min", 0.999),
    ),
    ExportFormat(
        "int8",
        "vision",
        "symmetric Q/DQ on an FP16 base, for TensorRT",
        ("tensorrt", "ort-cpu", "openvino"),
        "gpu",
        {"qdq_exact_cosine_mean": 0.99, "qdq_exact_error_vs_spread": 0.35},
        default=True,
        measured=True,
        engine_check=("cosine_mean", 0.99),
    ),
    ExportFormat(
        "int8_u8s8",
        "vision",
        "the CPU's fast path: ONNX Runtime, OpenVINO",
        ("ort-cpu", "openvino"),
        "cpu",
        {"cosine_mean": 0.99, "error_vs_spread": 0.35},
        default=True,
        measured=True,
    ),
)


def _llm(name: str, description: str, tolerance: Mapping[str, float], **flags: bool) -> ExportFormat:
    flags = {"default": False, "measured": False, **flags}
    return ExportFormat(name, "llm", description, (LLM_BACKEND,), "any", tolerance, **flags)


_LLM_ROWS = (
    _llm("f32", "unquantized; must reproduce torch", {"max_abs_rel": 1e-3, "top1": 1.0}, written=True),
    _llm(
        "f16",
        "16-bit; the source of the quantized types",
        _KEEPS_CHOICES,
        written=True,
        default=True,
        measured=True,
    ),
    _llm("bf16", "16-bit brain float", _KEEPS_CHOICES, written=True, measured=True),
    _llm("q8_0", "8-bit llama.cpp quantization", _KEEPS_CHOICES, default=True, measured=True),
    _llm("q6_k", "6-bit k-quant", LOW_BIT_LLM_TOLERANCE),
    _llm("q5_k_m", "5-bit k-quant", LOW_BIT_LLM_TOLERANCE),
    _llm(
        "q4_k_m",
        "4-bit k-quant: the default CPU/Jetson LLM",
        LOW_BIT_LLM_TOLERANCE,
        default=True,
        measured=True,
    ),
    _llm("q4_0", "4-bit legacy quant", LOW_BIT_LLM_TOLERANCE),
)

_TABLE: tuple[ExportFormat, ...] = _VISION_ROWS + _LLM_ROWS


def export_formats() -> tuple[ExportFormat, ...]:
    """Every format a bundle may hold, vision rows first, each role in its listing order."""
    return _TABLE


def format_names(role: Role, *, default: bool | None = None, measured: bool | None = None) -> tuple[str, ...]:
    """The names of one role's formats, optionally only the export defaults / perf's measured set."""
    return tuple(
        f.name
        for f in _TABLE
        if f.role == role
        and (default is None or f.default == default)
        and (measured is None or f.measured == measured)
    )


def get_format(role: Role, name: str) -> ExportFormat:
    """The row of `name`; a ValueError naming the known ones otherwise."""
    for f in _TABLE:
        if f.role == role and f.name == name:
            return f
    raise ValueError(f"unknown {role} format {name!r}; known: {', '.join(format_names(role))}")


def tolerances(role: Role) -> dict[str, dict[str, float]]:
    """format name -> its export check (fresh dicts: callers may override entries)."""
    return {f.name: dict(f.tolerance) for f in _TABLE if f.role == role}
