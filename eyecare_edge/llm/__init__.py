"""The runtime's language model: a GGUF run by llama.cpp through llama-cpp-python's low-level API
(the class and its contract: `lm.py`'s docstring).

The package is layered the way llama-cpp-python puts a friendly class over a thin ctypes layer:

- `binding`: loading llama-cpp-python (`lib`), its version floor, process-wide state, `LLMError`;
- `device`: threads, GPU offload, flash attention, the CPU fallback of an automatic offload;
- `options`: the formats (`LLMOptions`, `Generation`, `PromptPart`);
- `batch`: a reusable `llama_batch` of token ids or embedding rows;
- `context`: one model + context without locks: vocabulary, evaluation, logits, KV cache
  (rewind, clear, save, restore);
- `sampling` and `stream`: pure rules for the next token and for releasing safe text;
- `lm`: `LlamaCppLM`, the thread-safe class the pipeline uses (generate with stop strings,
  streaming and grammars).

Import the public names from here (`from eyecare_edge.llm import LlamaCppLM, LLMOptions`);
patch `eyecare_edge.llm.device.gpu_offload_supported` to change what the build can do.
"""

from eyecare_edge.llm.binding import KV_TYPES, LLMError, binding_version, check_binding_version
from eyecare_edge.llm.device import (
    gpu_offload_supported,
    physical_cores,
    resolve_flash_attn,
    resolve_gpu_layers,
)
from eyecare_edge.llm.lm import LlamaCppLM
from eyecare_edge.llm.options import STOP_REASONS, Generation, LLMOptions, PromptPart
from eyecare_edge.llm.sampling import sample_token
from eyecare_edge.llm.stream import TextStream

__all__ = [
    "KV_TYPES",
    "STOP_REASONS",
    "Generation",
    "LLMError",
    "LLMOptions",
    "LlamaCppLM",
    "PromptPart",
    "TextStream",
    "binding_version",
    "check_binding_version",
    "gpu_offload_supported",
    "physical_cores",
    "resolve_flash_attn",
    "resolve_gpu_layers",
    "sample_token",
]
