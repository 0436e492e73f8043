"""Which mixed precision a training run uses: one rule for the Trainer stages and the vision stage."""

from __future__ import annotations

import torch


def cpu_has_native_bf16() -> bool:
    """True on CPUs with BF16 dot-product instructions (AVX-512 BF16 or AMX), where oneDNN runs
    bf16 matmuls natively; elsewhere CPU autocast emulates them and is slower than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def mixed_precision(precision: str, *, on_gpu: bool, cpu_bf16: bool = True) -> tuple[bool, bool]:
    """(bf16, fp16) flags for a run on the GPU or not. `auto` means bf16 on a GPU that has it, and
    on a CPU with native BF16 (`cpu_has_native_bf16`) when the run may autocast there
    (`cpu_bf16`); fp32 elsewhere. Measured on a 2-core AMD EPYC with AVX-512 BF16, 30 sft steps
    of the demo (batch 8): fp32 30.8 s, bf16 autocast 23.9 s, loss 1.912 vs 1.916."""
    if precision == "auto":
        if on_gpu:
            return bool(torch.cuda.is_bf16_supported()), False
        return cpu_bf16 and cpu_has_native_bf16(), False
    return precision == "bf16", precision == "fp16"
