"""HF causal LM (llama / phi3 / qwen2) -> GGUF file that llama.cpp runs.

Why our own writer: llama.cpp's `convert_hf_to_gguf.py` is not an installable package, reads a
checkpoint directory rather than the model we hold in memory, and refuses tokenizers whose
pre-tokenizer hash it has not seen (our `tiny` preset trains its own). The `gguf` package gives
the file format; this module decides what goes in it, following llama.cpp's conventions:

* tensor names from `gguf.TensorNameMap`; `llama` q/k weights permuted from HF's rotate-half
  layout to the interleaved pairs llama.cpp's `llama` RoPE expects (`phi3` and `qwen2` use NeoX
  RoPE in llama.cpp, which is HF's layout, so no permutation);
* `phi3` keeps the fused `qkv_proj` and `gate_up_proj`, and stores LongRoPE short/long factors
  as tensors plus the original context length and attention factor. llama.cpp picks short or
  long factors by the *allocated* context (`n_ctx`, which it rounds up to a multiple of 256),
  HF by the current sequence length: with `n_ctx` <= the original context (4096 for Phi-3.5)
  both use the short factors and agree; past it llama.cpp uses the long factors even for short
  prompts, where HF still uses the short ones;
* `qwen2` carries q/k/v biases; the Qwen2.5-VL language model fed 1-D positions is plain RoPE,
  so an `mrope_section` in its rope config is ignored;
* norms and 1-D tensors stay F32; tied embeddings write no `output.weight` (llama.cpp reuses
  `token_embd`); the vocabulary is padded to the embedding rows (see `gguf_vocab`).

Quantized types (Q8_0, Q4_K_M, ...) are made from the F32/F16 file by `gguf_quantize`.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from eyecare_edge.export.gguf_vocab import GgufVocab, add_vocab_to_gguf, vocab_from_hf_tokenizer

SUPPORTED_ARCHS: dict[str, gguf.MODEL_ARCH] = {
    "llama": gguf.MODEL_ARCH.LLAMA,
    "phi3": gguf.MODEL_ARCH.PHI3,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
}

_Q = gguf.GGMLQuantizationType
_FT = gguf.LlamaFileType
OUT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (_Q.F32, _FT.ALL_F32),
    "f16": (_Q.F16, _FT.MOSTLY_F16),
    "bf16": (_Q.BF16, _FT.MOSTLY_BF16),
}

# llama.cpp special-cases models whose general.name contains these (lower-cased): it then sets
# strip flags on tokens it looks up by text ("</s>", "<s>", ...) and fails on vocabularies
# without them. We refuse such names rather than rewrite them behind the caller's back.
_RESERVED_NAME = re.compile(r"phi-?3", re.IGNORECASE)


@dataclass(frozen=True)
class GgufWriteResult:
    path: Path
    arch: str
    n_tensors: int
    n_vocab: int
    size_bytes: int


@dataclass(frozen=True)
class LlmHparams:
    """The model shape as llama.cpp reads it (`{arch}.*` keys)."""

    arch: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int
    rms_eps: float
    rope_theta: float
    context_length: int


def _arch_of(config: Any) -> str:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHS:
        raise ValueError(
            f"unsupported model_type {model_type!r} for GGUF export; supported: {', '.join(SUPPORTED_ARCHS)}"
        )
    return model_type


def _check_name(name: str) -> str:
    if not name or not name.strip():
        raise ValueError("general.name must be a non-empty string")
    if _RESERVED_NAME.search(name):
        raise ValueError(
            f"general.name {name!r} contains 'phi3'/'phi-3': llama.cpp then applies Phi-3 token attributes by "
            "name and fails on vocabularies without '</s>'/'<s>'/'<unk>'/'<|endoftext|>'. Pick another name "
            "(the architecture is recorded separately as general.architecture)."
        )
    return name


def rope_parameters(config: Any) -> dict[str, Any]:
    """The RoPE settings of a config, for transformers 5 (`rope_parameters`) and 4 (`rope_theta`/`rope_scaling`)."""
    params = getattr(config, "rope_parameters", None)
    if params is None:
        params = dict(getattr(config, "rope_scaling", None) or {})
        if getattr(config, "rope_theta", None) is not None:
            params.setdefault("rope_theta", config.rope_theta)
    params = dict(params)
    if "rope_theta" not in params and isinstance(params.get("full_attention"), dict):
        params = dict(params["full_attention"])
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", 10000.0)
    if params["rope_type"] == "su":
        params["rope_type"] = "longrope"
    return params


def llm_hparams(config: Any, *, context_length: int | None = None) -> LlmHparams:
    arch = _arch_of(config)
    n_head = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_head)
    rope = rope_parameters(config)
    partial = float(rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0)
    return LlmHparams(
        arch=arch,
        n_layer=int(config.num_hidden_layers),
        n_embd=int(config.hidden_size),
        n_ff=int(config.intermediate_size),
        n_head=n_head,
        n_head_kv=int(getattr(config, "num_key_value_heads", None) or n_head),
        head_dim=head_dim,
        rope_dim=int(head_dim * partial),
        rms_eps=float(config.rms_norm_eps),
        rope_theta=float(rope["rope_theta"]),
        context_length=int(context_length or config.max_position_embeddings),
    )


def _check_supported_features(config: Any, hp: LlmHparams) -> None:
    """Refuse model options llama.cpp's graph for the arch would silently ignore."""
    if hp.arch == "llama" and (
        getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
    ):
        raise ValueError("llama models with attention_bias/mlp_bias are not supported by the GGUF writer")
    if hp.arch == "qwen2" and getattr(config, "use_sliding_window", False):
        raise ValueError(
            "qwen2 with use_sliding_window=True is not supported: llama.cpp's qwen2 has no sliding window"
        )
    window = getattr(config, "sliding_window", None) if hp.arch == "phi3" else None
    if window and window < hp.context_length:
        # llama.cpp runs Phi-3 with full attention; HF masks beyond the window.
        warnings.warn(
            f"phi3 sliding_window={window} < context {hp.context_length}: llama.cpp ignores the window, so outputs "
            "differ from HF for sequences longer than it",
            stacklevel=3,
        )


def _rotary_module(model: torch.nn.Module) -> torch.nn.Module | None:
    for module in model.modules():
        if isinstance(getattr(module, "inv_freq", None), torch.Tensor) and hasattr(
            module, "attention_scaling"
        ):
            return module
    return None


def _default_inv_freq(hp: LlmHparams) -> torch.Tensor:
    exponent = torch.arange(0, hp.rope_dim, 2, dtype=torch.float64) / hp.rope_dim
    return 1.0 / (hp.rope_theta**exponent)


def _rope_extras(
    model: torch.nn.Module, config: Any, hp: LlmHparams, writer: gguf.GGUFWriter
) -> list[tuple[str, np.ndarray]]:
    """Write RoPE scaling keys; return extra tensors (rope factors) to store.

    Static scalings are read off the model's own rotary module (its `inv_freq`), so the GGUF
    reproduces exactly what the HF model computes rather than re-deriving a formula.
    """
    rope = rope_parameters(config)
    rope_type = rope["rope_type"]
    extras: list[tuple[str, np.ndarray]] = []
    if hp.arch == "phi3":
        orig = rope.get(
            "original_max_position_embeddings", getattr(config, "original_max_position_embeddings", None)
        )
        if orig is not None:
            writer.add_rope_scaling_orig_ctx_len(int(orig))
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
        if rope_type == "default":
            return extras
        if rope_type != "longrope":
            raise ValueError(f"phi3 rope_type {rope_type!r} is not supported (default or longrope)")
        short, long = rope.get("short_factor"), rope.get("long_factor")
        if short is None or long is None or orig is None:
            raise ValueError(
                "phi3 longrope config needs short_factor, long_factor and original_max_position_embeddings"
            )
        if len(short) != hp.rope_dim // 2 or len(long) != hp.rope_dim // 2:
            raise ValueError(
                f"phi3 longrope factors must have {hp.rope_dim // 2} entries, got short={len(short)} long={len(long)}"
            )
        rotary = _rotary_module(model)
        if rotary is None:
            raise ValueError(
                "phi3 longrope model without a rotary-embedding module; cannot read its attention scaling"
            )
        writer.add_rope_scaling_attn_factors(float(rotary.attention_scaling))
        extras.append(
            (gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight", np.asarray(long, np.float32))
        )
        extras.append(
            (
                gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight",
                np.asarray(short, np.float32),
            )
        )
        return extras

    if rope_type == "default":
        return extras
    if hp.arch == "qwen2" and rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        return extras
    if hp.arch == "llama" and rope_type in ("linear", "llama3"):
        # Position-independent scalings: llama.cpp divides each frequency by a stored factor.
        rotary = _rotary_module(model)
        if rotary is None or float(rotary.attention_scaling) != 1.0:
            raise ValueError(
                f"llama rope_type {rope_type!r}: no rotary module with unit attention scaling found"
            )
        factors = (_default_inv_freq(hp) / rotary.inv_freq.detach().to(torch.float64).cpu()).to(torch.float32)
        extras.append((gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", factors.numpy()))
        return extras
    raise ValueError(
        f"{hp.arch} rope_type {rope_type!r} is not supported by the GGUF writer "
        "(llama: default/linear/llama3; phi3: default/longrope; qwen2: default/linear)"
    )


def _permute_for_llama_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half order (first half / second half of each head) -> interleaved pairs.

    Within each head, HF pairs dimension i with i + d/2; llama.cpp's `llama` RoPE pairs 2i with
    2i + 1. Reordering the output rows of W_q / W_k this way leaves q.k unchanged.
    """
    rows = weight.shape[0]
    head_dim = rows // n_head
    return weight.reshape(n_head, 2, head_dim // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _is_tied(model: torch.nn.Module) -> bool:
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    return out is not None and inp is not None and out.weight.data_ptr() == inp.weight.data_ptr()


def _hf_tensors(model: torch.nn.Module, hp: LlmHparams) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, tensor) for every model weight, in state-dict order, transformed for llama.cpp."""
    arch = SUPPORTED_ARCHS[hp.arch]
    name_map = gguf.get_tensor_name_map(arch, hp.n_layer)
    allowed = {
        gguf.TENSOR_NAMES[t].format(bid=b)
        for t in gguf.MODEL_TENSORS[arch]
        for b in range(max(hp.n_layer, 1))
    }
    tied = _is_tied(model)
    unknown: list[str] = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        if hf_name.endswith(("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")):
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None or gguf_name.rsplit(".", 1)[0] not in allowed:
            unknown.append(hf_name)
            continue
        if hp.arch == "llama" and hf_name.endswith("self_attn.q_proj.weight"):
            tensor = _permute_for_llama_rope(tensor, hp.n_head)
        elif hp.arch == "llama" and hf_name.endswith("self_attn.k_proj.weight"):
            tensor = _permute_for_llama_rope(tensor, hp.n_head_kv)
        yield gguf_name, tensor
    if unknown:
        raise ValueError(
            f"{len(unknown)} {hp.arch} weights have no GGUF name: {unknown[:6]}; export the plain causal LM "
            "(merge LoRA adapters first, e.g. peft's merge_and_unload)"
        )


def _encode(
    name: str, tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType
) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """Tensor -> array in the stored type. Norms and 1-D tensors stay F32, as llama.cpp requires."""
    data = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
    if data.ndim <= 1 or name.endswith("_norm.weight") or qtype == _Q.F32:
        return data, _Q.F32
    if qtype == _Q.F16:
        return data.astype(np.float16), _Q.F16
    return gguf.quants.quantize(data, qtype), qtype


def _n_vocab(model: torch.nn.Module) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def write_llm_gguf(
    model: torch.nn.Module,
    tokenizer: Any,
    out_path: str | Path,
    *,
    out_type: str = "f32",
    name: str = "eyecare-llm",
    chat_template: str | None = None,
    context_length: int | None = None,
) -> GgufWriteResult:
    """Write `model` + `tokenizer` as a GGUF llama.cpp loads; F32 / F16 / BF16 weights.

    `context_length` sets `{arch}.context_length` (default: the config's max_position_embeddings).
    `chat_template` overrides the tokenizer's own template. Raises ValueError for unsupported
    architectures, rope types, tokenizers or a reserved `name`.
    """
    config = model.config
    arch = _arch_of(config)
    _check_name(name)
    key = out_type.lower()
    if key not in OUT_TYPES:
        raise ValueError(
            f"unsupported out_type {out_type!r}; choose one of {', '.join(OUT_TYPES)} (then quantize_gguf)"
        )
    qtype, file_type = OUT_TYPES[key]
    hp = llm_hparams(config, context_length=context_length)
    _check_supported_features(config, hp)
    vocab: GgufVocab = vocab_from_hf_tokenizer(tokenizer, _n_vocab(model), chat_template=chat_template)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    # use_temp_file: each tensor goes to a spooled temp file as it is added, so a 7B model never
    # sits in memory twice (torch weights + converted copies).
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[SUPPORTED_ARCHS[arch]], use_temp_file=True)
    n_tensors = 0
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_vocab_size(vocab.n_vocab)
        writer.add_context_length(hp.context_length)
        writer.add_embedding_length(hp.n_embd)
        writer.add_feed_forward_length(hp.n_ff)
        writer.add_block_count(hp.n_layer)
        writer.add_head_count(hp.n_head)
        writer.add_head_count_kv(hp.n_head_kv)
        writer.add_layer_norm_rms_eps(hp.rms_eps)
        writer.add_rope_freq_base(hp.rope_theta)
        writer.add_rope_dimension_count(hp.rope_dim)
        if hp.head_dim * hp.n_head != hp.n_embd:
            writer.add_key_length(hp.head_dim)
            writer.add_value_length(hp.head_dim)
        extras = _rope_extras(model, config, hp, writer)
        add_vocab_to_gguf(writer, vocab)

        with torch.no_grad():
            for gguf_name, tensor in _hf_tensors(model, hp):
                data, stored = _encode(gguf_name, tensor, qtype)
                writer.add_tensor(gguf_name, data, raw_dtype=stored)
                n_tensors += 1
        for gguf_name, data in extras:
            writer.add_tensor(gguf_name, data, raw_dtype=_Q.F32)
            n_tensors += 1

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        out.unlink(missing_ok=True)  # never leave a truncated GGUF that looks like a model
        raise
    writer.close()
    return GgufWriteResult(
        path=out, arch=arch, n_tensors=n_tensors, n_vocab=vocab.n_vocab, size_bytes=out.stat().st_size
    )
