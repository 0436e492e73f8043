"""Create, save and load EyecareGPT checkpoints (HF directories: config, safetensors, tokenizer).

`init_checkpoint` is what `eyecare-edge init` runs: a preset's config, optionally with the vision
tower and/or the LLM taken from local pretrained directories (no hub), random weights elsewhere.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from eyecare_edge.training.config import EyecareGPTConfig
from eyecare_edge.training.modeling import EyecareGPTForConditionalGeneration
from eyecare_edge.training.presets import build_config, tiny_llama_config
from eyecare_edge.training.tokenizer import JINJA_TEMPLATES, train_bpe_tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

from eyecare_edge.errors import EyecareError
from eyecare_edge.presets import PRESETS

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class CheckpointError(EyecareError):
    """A checkpoint directory that cannot be read or built; the message names the path."""


def _dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; known: {', '.join(DTYPES)}") from None


def phantom_corpus(n: int = 300, seed: int = 0) -> list[str]:
    """Question, option and report texts of the phantom generator, for training a tokenizer."""
    from eyecare_edge.phantom import phantom_texts

    return phantom_texts(n, seed)


def _pad_vocab(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def _local_vision(vision_dir: Path, layers: int | None) -> tuple[object, dict[str, torch.Tensor]]:
    """A local SigLIP directory -> (our tower config, tower state dict) with the last block dropped."""
    try:
        sv = SiglipVisionModel.from_pretrained(vision_dir, torch_dtype=torch.float32)
    except Exception as e:  # transformers raises many types for a bad directory
        raise CheckpointError(f"{vision_dir}: cannot load a SigLIP vision model ({e})") from e
    cfg = sv.config
    keep = cfg.num_hidden_layers - 1 if layers is None else layers
    cfg.num_hidden_layers = keep
    cfg.vision_use_head = False
    state = {k: v for k, v in sv.state_dict().items() if k.startswith(("embeddings.", "encoder."))}
    state = {
        k: v for k, v in state.items() if not k.startswith("encoder.layers.") or int(k.split(".")[2]) < keep
    }
    return cfg, state


def init_checkpoint(
    preset: str,
    out_dir: str | Path,
    *,
    vision_dir: str | Path | None = None,
    llm_dir: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    seed: int = 0,
    llm_layers: int | None = None,
    vision_layers: int | None = None,
    tokenizer_texts: Iterable[str] | None = None,
) -> Path:
    """Write a checkpoint for `preset` to `out_dir` and return its path.

    `llm_layers`/`vision_layers` cut depth at full width (random-weight benchmarks of big shapes).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    out = Path(out_dir)
    torch.manual_seed(seed)
    tdtype = _dtype(dtype)
    template = PRESETS[preset].chat_template

    vision_cfg, vision_state = (None, None)
    if vision_dir is not None:
        vision_cfg, vision_state = _local_vision(Path(vision_dir), vision_layers)

    llm_model, text_cfg = None, None
    if llm_dir is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(llm_dir)
            text_cfg = AutoConfig.from_pretrained(llm_dir)
        except Exception as e:
            raise CheckpointError(f"{llm_dir}: cannot load an LLM config/tokenizer ({e})") from e
        if llm_layers is not None:
            text_cfg.num_hidden_layers = llm_layers
        llm_model = AutoModelForCausalLM.from_pretrained(llm_dir, config=text_cfg, torch_dtype=tdtype)
    elif preset == "smol":
        from eyecare_edge.training.smol import load_smollm2

        llm_model, tokenizer = load_smollm2(dtype=tdtype)
        text_cfg = llm_model.config
    else:
        texts = list(tokenizer_texts) if tokenizer_texts is not None else phantom_corpus()
        tokenizer = train_bpe_tokenizer(
            texts, vocab_size=4096 if preset == "tiny" else 8192, chat_template=template
        )
        if preset == "tiny":
            text_cfg = tiny_llama_config(
                _pad_vocab(len(tokenizer)),
                bos_token_id=None,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )

    config = build_config(
        preset,
        text_config=text_cfg,
        vision_config=vision_cfg,
        llm_layers=llm_layers if llm_model is None else None,
        vision_layers=vision_layers if vision_dir is None else None,
    )
    if llm_dir is None and preset in ("eyecare-3.8b", "eyecare-7b"):
        tc = config.text_config
        if len(tokenizer) > tc.vocab_size:
            raise CheckpointError(
                f"tokenizer has {len(tokenizer)} tokens, more than the LLM's {tc.vocab_size}"
            )
        tc.eos_token_id = tokenizer.eos_token_id
        tc.pad_token_id = tokenizer.pad_token_id
        tc.bos_token_id = None

    config.vision_tower_random = vision_dir is None
    with torch.device("cpu"):
        model = EyecareGPTForConditionalGeneration(config).to(tdtype)
    if vision_state is not None:
        missing, unexpected = model.vision_tower.load_state_dict(vision_state, strict=False)
        if unexpected or [k for k in missing if "position_ids" not in k]:
            raise CheckpointError(
                f"{vision_dir}: SigLIP weights do not fit (missing {missing}, unexpected {unexpected})"
            )
    if llm_model is not None:
        model.language_model.load_state_dict(llm_model.state_dict(), strict=True)
    if tokenizer.chat_template is None and template in JINJA_TEMPLATES:
        tokenizer.chat_template = JINJA_TEMPLATES[template]
    save_checkpoint(model, tokenizer, out)
    return out


def save_checkpoint(model: EyecareGPTForConditionalGeneration, tokenizer, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def read_config(ckpt: str | Path) -> EyecareGPTConfig:
    """The checkpoint's config alone (cheap: no weights), with a clear error for a bad directory."""
    path = Path(ckpt)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: not an EyecareGPT checkpoint (no config.json)")
    model_type = json.loads(cfg_file.read_text()).get("model_type")
    if model_type != EyecareGPTConfig.model_type:
        raise CheckpointError(f"{path}: config.json has model_type {model_type!r}, expected 'eyecare_gpt'")
    return EyecareGPTConfig.from_pretrained(path)


def load_checkpoint(ckpt: str | Path, *, dtype: str | torch.dtype = "float32"):
    """(model in eval mode, tokenizer) from a checkpoint directory."""
    read_config(ckpt)
    model = EyecareGPTForConditionalGeneration.from_pretrained(ckpt, torch_dtype=_dtype(dtype))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    return model, tokenizer
