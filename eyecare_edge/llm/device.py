"""Where the language model runs: threads, GPU offload, flash attention, and the CPU fallback
when an automatic offload fails to load.

Callers (and tests) that change what the build can do patch `gpu_offload_supported` here: every
decision below reads it from this module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from eyecare_edge.cpus import physical_cores as physical_cores  # re-exported for callers
from eyecare_edge.llm.binding import lib


def gpu_offload_supported() -> bool:
    """True when this llama.cpp build can offload layers to a GPU (CUDA, Metal, Vulkan...)."""
    return lib is not None and bool(lib.llama_supports_gpu_offload())


def resolve_gpu_layers(n_gpu_layers: int | None) -> int:
    """The n_gpu_layers llama.cpp gets: None -> all layers (-1) when the build can offload, else 0."""
    if n_gpu_layers is None:
        return -1 if gpu_offload_supported() else 0
    return n_gpu_layers


def offloads(n_gpu_layers: int) -> bool:
    """True when llama.cpp will put layers on a GPU: some were asked for and the build can."""
    return n_gpu_layers != 0 and gpu_offload_supported()


def resolve_flash_attn(flash_attn: bool | None, n_gpu_layers: int) -> str:
    """"enabled", "disabled" or "auto" (llama.cpp decides per device): None means auto when layers
    go to a GPU and disabled on the CPU."""
    if flash_attn is not None:
        return "enabled" if flash_attn else "disabled"
    return "auto" if offloads(n_gpu_layers) else "disabled"


@dataclass
class Placement:
    """Where a loaded model's layers went. gpu_layers: what llama.cpp was given (-1 = all);
    flash_attn: "enabled" | "disabled" | "auto"; fallback: why the model runs on the CPU although
    offload was automatic (None when it did not fall back)."""

    gpu_layers: int
    flash_attn: str
    fallback: str | None = None


def load_model(path: Path, mparams, n_gpu_layers: int | None, flash_attn: bool | None):
    """Load the GGUF with `mparams` on the device the options ask for; returns (model pointer or
    None, Placement). An automatic offload (n_gpu_layers=None) that fails to load (GPU out of
    memory, driver mismatch) is retried on the CPU and says so; an explicit request is not."""
    gpu_layers = resolve_gpu_layers(n_gpu_layers)
    placement = Placement(gpu_layers, resolve_flash_attn(flash_attn, gpu_layers))
    mparams.n_gpu_layers = gpu_layers
    model = lib.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
    if not model and gpu_layers != 0 and n_gpu_layers is None:
        placement.fallback = "loading with every layer on the GPU failed (out of GPU memory?)"
        logging.getLogger("eyecare_edge.llm").warning("%s: %s; loading on the CPU", path, placement.fallback)
        placement.gpu_layers = mparams.n_gpu_layers = 0
        placement.flash_attn = resolve_flash_attn(flash_attn, 0)
        model = lib.llama_model_load_from_file(str(path).encode("utf-8"), mparams)
    return (model or None), placement


def offloaded_layers(gpu_layers: int, n_layer: int) -> int:
    """Repeating layers llama.cpp put on a GPU (0 on a CPU-only build or with n_gpu_layers=0)."""
    if not offloads(gpu_layers):
        return 0
    return n_layer if gpu_layers < 0 else min(gpu_layers, n_layer)


def describe_placement(placement: Placement, n_layer: int) -> str:
    """E.g. "GPU (all 32 layers offloaded, flash attention auto)" or
    "CPU (this llama.cpp build has no GPU offload, flash attention disabled)"."""
    n = offloaded_layers(placement.gpu_layers, n_layer)
    fa = f"flash attention {placement.flash_attn}"
    if n:
        share = f"all {n}" if n == n_layer else f"{n}/{n_layer}"
        return f"GPU ({share} layers offloaded, {fa})"
    why = "n_gpu_layers=0" if gpu_offload_supported() else "this llama.cpp build has no GPU offload"
    return f"CPU ({placement.fallback or why}, {fa})"
