"""The table of named model sizes, as the runtime needs them (no torch).

`training/presets.py` builds each preset's torch-side `EyecareGPTConfig` from this table, and the
runtime (`inspect --preset`, `preprocess.preset_preprocess`, the CLI's `--preset` choices) reads
names, descriptions and tiling from here without loading torch.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PRESET = "eyecare-3.8b"


@dataclass(frozen=True)
class Preset:
    """One model size. tile_size/patch_size: the vision tower's input tile and patch (the
    preprocessing follows them); pretrained_llm: the LLM has released weights whose shapes the
    preset reproduces (`init --llm DIR` loads them), as opposed to a random or packaged one."""

    name: str
    description: str
    chat_template: str
    tile_size: int
    patch_size: int = 14
    anyres_max: int = 4
    pretrained_llm: bool = False


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny",
            "random SigLIP (112-px tiles) + random 4-layer Llama; a few MB; for tests and the demo",
            "chatml",
            tile_size=112,
        ),
        Preset(
            "smol", "random small SigLIP (384-px tiles) + real SmolLM2-135M-Instruct", "chatml", tile_size=384
        ),
        Preset(
            "eyecare-3.8b",
            "SigLIP-so400m/14@384 + Phi-3.5-mini (EyecareGPT-3.8B shapes)",
            "phi3_instruct",
            tile_size=384,
            pretrained_llm=True,
        ),
        Preset(
            "eyecare-7b",
            "SigLIP-so400m/14@384 + Qwen2.5-7B LLM (EyecareGPT-7B shapes)",
            "qwen_2",
            tile_size=384,
            pretrained_llm=True,
        ),
    )
}


def preset_names() -> tuple[str, ...]:
    """The preset names, smallest first (the order `--preset` lists them in)."""
    return tuple(PRESETS)


def get_preset(name: str) -> Preset:
    """The row of `name`; a ValueError naming the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}") from None
