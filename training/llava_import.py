"""Import a LLaVA-convention checkpoint (released EyecareGPT, LLaVA-NeXT, Dense Connector) as ours.

`eyecare-edge init --from-llava DIR -o CKPT` runs `import_llava`. A LLaVA-family directory holds
one `config.json` (the LLM's config plus `mm_*` fields), weights in safetensors shards (or pickle
`.bin` files), and the tokenizer. We read it in three steps, each a pure function of the files:

1. settings (`llava_config`, `llava_tower`): `mm_*` fields -> our `EyecareGPTConfig` (SigLIP tower
   depth and selected layer, Dense-Connector groups, anyres pinpoints and `anyres_max_N`, LLM type
   and chat template);
2. plan (`llava_plan`): every source tensor goes through the key table (`llava_keys`) to a target
   tensor, or is dropped for a documented reason, or is *unmapped*; every target tensor must be
   fed. Unmapped and missing tensors fail the import with their names (unless `allow_missing`);
3. write (here): tensors are read lazily, one at a time (`llava_tensors`: safetensors `safe_open`,
   mmapped `.bin`), a PEFT LoRA adapter is merged into each as it streams by (`llava_lora`), and
   the model is assembled on the meta device with `load_state_dict(assign=True)`, so a 7B import
   holds one copy of the weights.

Conventions verified against the code bases (LLaVA-NeXT `llava_arch.py`, `mm_utils.py`,
`siglip_encoder.py`; Dense Connector `dense_connector.py`; HealthGPT `peft/tuners/lora.py`):
- LLaVA's SigLIP tower deletes its last block and reads `hidden_states[-1]` of what is left; for
  a complete stored tower `mm_vision_select_layer = -2` picks the same hidden state.
- `image_grid_pinpoints` entries are [width, height] (`select_best_resolution` unpacks
  `width, height`); the string form "(1x1),...,(3x3)" lists (width, height) multiples of the tile.
  We store (height, width).
- Dense Connector DCI concatenates [selected layer, mean(h[0..12]), mean(h[13..25])] for SigLIP
  (27 hidden states) - the order of our LDC, so the projector's columns need no permutation.
  SCI concatenates [selected, h[7], h[15]]: an LDC with one-layer groups. STI appends pooled
  tokens along the token axis (not 729 tokens per tile), which our layout cannot express.
- HealthGPT's H-LoRA routes each token through a softmax mix of LoRA experts: refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from eyecare_edge.training.llava_config import parse_pinpoints
from eyecare_edge.training.llava_keys import LLAVA_KEY_TABLE
from eyecare_edge.training.llava_plan import ImportPlan, plan_import
from eyecare_edge.training.llava_tensors import LlavaImportError
from eyecare_edge.training.modeling import EyecareGPTForConditionalGeneration
from eyecare_edge.training.tokenizer import JINJA_TEMPLATES
from torch import nn


def _materialize_missing(model: nn.Module, missing: list[str], dtype: torch.dtype) -> None:
    """Give tensors no source fed their fresh-model initialisation (only with allow_missing)."""
    owners: dict[str, list[str]] = {}
    for name in missing:
        owner, _, attr = name.rpartition(".")
        owners.setdefault(owner, []).append(attr)
    for owner_name, attrs in owners.items():
        owner = model.get_submodule(owner_name) if owner_name else model
        kept = {n: p for n, p in owner.named_parameters(recurse=False) if n not in attrs}
        for attr in attrs:
            old = getattr(owner, attr)
            setattr(
                owner,
                attr,
                nn.Parameter(torch.empty(old.shape, dtype=dtype), requires_grad=old.requires_grad),
            )
        model._init_weights(owner)
        for n, p in kept.items():
            setattr(owner, n, p)


def import_llava(
    llava_dir: str | Path,
    out_dir: str | Path,
    *,
    dry_run: bool = False,
    allow_pickle: bool = False,
    allow_missing: bool = False,
    dtype: str = "float32",
    echo: Callable[[str], object] = print,
    vision_dir: str | Path | None = None,
    base_dir: str | Path | None = None,
) -> Path | None:
    """Import a LLaVA-convention checkpoint into an EyecareGPT checkpoint at `out_dir`.

    Returns the checkpoint path, or None for a dry run (which prints the mapping and the resulting
    config, writes nothing, and still raises when the import would fail). `vision_dir`/`base_dir` supply a SigLIP tower or base LLM that the
    checkpoint leaves out. Raises `LlavaImportError` with a message naming files and tensors.
    """
    from eyecare_edge.training.checkpoint import _dtype, save_checkpoint

    plan = plan_import(llava_dir, allow_pickle=allow_pickle, vision_dir=vision_dir, base_dir=base_dir)
    problem = plan.problems(allow_missing)
    if dry_run:
        echo(plan.report())
        echo("resulting config:")
        echo(json.dumps(plan.config.to_dict(), indent=2, sort_keys=True, default=str))
        if problem:  # a dry run that finds the import would fail exits like the import would
            raise LlavaImportError(problem)
        return None
    if problem:
        raise LlavaImportError(problem)
    tdtype = _dtype(dtype)
    tokenizer = plan.tokenizer
    if tokenizer.chat_template is None:
        tokenizer.chat_template = JINJA_TEMPLATES[plan.config.chat_template_name]

    from accelerate import init_empty_weights

    with init_empty_weights():
        model = EyecareGPTForConditionalGeneration(plan.config)
    state = {}
    for m in plan.mapped:
        t = plan.store.load(m.source)
        if plan.adapter is not None:
            t = plan.adapter.apply(m.source, t)
        state[m.target] = t.to(tdtype).contiguous()
    model.load_state_dict(state, strict=False, assign=True)
    del state
    if plan.missing:
        _materialize_missing(model, plan.missing, tdtype)
        echo(f"initialised {len(plan.missing)} missing tensors (--allow-missing)")
    if plan.tied:
        model.language_model.tie_weights()
    model.config.dtype = tdtype
    model.eval()
    out = save_checkpoint(model, tokenizer, out_dir)
    echo(
        f"imported {len(plan.mapped)} tensors ({len(plan.dropped)} dropped on purpose"
        + (f", {len(plan.unmapped)} unmapped ignored" if plan.unmapped else "")
        + f") from {plan.llava_dir} into {out} [{plan.config.chat_template_name}, dtype {dtype}]"
    )
    for n in plan.notes:
        echo(f"  - {n}")
    return out


__all__ = [
    "LLAVA_KEY_TABLE",
    "ImportPlan",
    "LlavaImportError",
    "import_llava",
    "parse_pinpoints",
    "plan_import",
]
