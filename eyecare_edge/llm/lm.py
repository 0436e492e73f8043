"""`LlamaCppLM`, the runtime's language model: a GGUF run by llama.cpp through llama-cpp-python's
low-level API.

Why the low-level API and not `llama_cpp.Llama`: a VLM prompt is text *and* image embeddings.
llama.cpp's own multimodal path (mtmd) lays out anyres tokens differently from the model we
train, so we inject the visual rows ourselves, the way mtmd does it internally: a `llama_batch`
with `embd` rows (`llama_batch_init(n, n_embd, 1)`) at explicit positions, text and embeddings
in separate decodes, every decode at most `n_batch` rows.

One `LlamaCppLM` owns one `LlamaContext` (context.py: one model, one context of one sequence,
id 0, and two reusable batches: tokens; embedding rows, allocated on first use). Its state is
`n_past`, the number of positions in the KV cache. Several questions about the same image pay
for the image once:

    lm.eval_prompt([head_text, image_embeds])   # prefix: system turn + image rows
    mark = lm.mark()
    for q in questions:
        lm.rewind(mark)                         # drop everything after the prefix
        answer = lm.generate(256, prompt=[q_text])

`rewind` removes KV cells at positions >= mark (`llama_memory_seq_rm`), so the prefix stays and
the next evaluation continues at position `mark` exactly as a fresh evaluation would. After a
rewind the logits of the prefix's last position are *not* available (llama.cpp keeps logits only
for the last decode); the next evaluation must append at least one token, and `generate` refuses
to start without fresh logits. That is why `generate` takes the question as `prompt=`: a question
always appends text after the mark.

Thread safety: every public method that touches the model or context holds the instance's
`threading.Lock`, so one instance may be shared between threads; calls are serialised (one
generation at a time). A sequence of calls that must not interleave with another thread's
(`rewind` then `generate`) goes inside `with lm.exclusive():`. `generate` holds the lock while
it runs, including while it calls `on_text`; a callback that calls back into the same instance
gets an `LLMError` instead of a deadlock. For parallel answers, create one instance per thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from eyecare_edge.grammar import GrammarConstraint, GrammarError
from eyecare_edge.llm.binding import LLMError, lib, require_binding
from eyecare_edge.llm.context import LlamaContext
from eyecare_edge.llm.device import describe_placement, offloaded_layers
from eyecare_edge.llm.options import Generation, LLMOptions, PromptPart
from eyecare_edge.llm.sampling import sample_token
from eyecare_edge.llm.stream import TextStream


class LlamaCppLM:
    """A GGUF language model with a single-sequence context; see the module docstring."""

    def __init__(self, gguf_path: str | os.PathLike[str], options: LLMOptions | None = None) -> None:
        self._core: LlamaContext | None = None
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._in_callback = False
        require_binding()
        self.path = Path(gguf_path)
        self.options = options or LLMOptions()
        self.options.validate()
        self._core = LlamaContext(self.path, self.options)
        if self._core.kv_type != self.options.kv_type:  # kv_fallback taken: say so in the options
            self.options = replace(self.options, kv_type=self._core.kv_type)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Free the batches, the context and the model, in that order, exactly once."""
        if self._owner == threading.get_ident():  # inside `exclusive()`: the lock is ours
            if self._in_callback:
                raise LLMError("close() called from inside an on_text callback; not allowed")
            self._free()
            return
        with self._lock:
            self._free()

    def _free(self) -> None:
        if self._core is not None:
            self._core.free()

    def __enter__(self) -> LlamaCppLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None and lib is not None:
            with contextlib.suppress(Exception):  # a finalizer must not raise (e.g. at shutdown)
                self.close()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[LlamaCppLM]:
        """Hold the instance's lock across several calls, e.g. `rewind` + `generate`, so that
        another thread cannot evaluate in between. Calls made inside run without re-locking."""
        with self._locked():
            yield self

    @contextlib.contextmanager
    def _locked(self, need_ctx: bool = True) -> Iterator[LlamaContext]:
        me = threading.get_ident()
        if self._owner == me:  # already held by this thread: inside `exclusive()` or a callback
            if self._in_callback:
                raise LLMError("call into LlamaCppLM from its own on_text callback; not allowed")
            yield self._open_core(need_ctx)
            return
        with self._lock:
            self._owner = me
            try:
                yield self._open_core(need_ctx)
            finally:
                self._owner = None

    def _open_core(self, need_ctx: bool) -> LlamaContext:
        if self._core is None or not self._core.is_open(need_ctx):
            raise LLMError(f"{self.path}: model is closed")
        return self._core

    # ------------------------------------------------------------------ properties

    @property
    def gpu_layers(self) -> int:
        """The n_gpu_layers llama.cpp got (-1 = all; 0 after a fallback to the CPU)."""
        return self._core.placement.gpu_layers

    @property
    def flash_attn(self) -> str:
        """"enabled", "disabled" or "auto" (llama.cpp decides per device)."""
        return self._core.placement.flash_attn

    @property
    def fallback(self) -> str | None:
        """Why the LLM runs on the CPU although offload was automatic (None when it did not fall back)."""
        return self._core.placement.fallback

    @property
    def n_embd(self) -> int:
        """Width of an input embedding row."""
        return self._core.n_embd

    @property
    def offloaded_layers(self) -> int:
        """Repeating layers llama.cpp put on a GPU (0 on a CPU-only build or with n_gpu_layers=0)."""
        return offloaded_layers(self._core.placement.gpu_layers, self._core.n_layer)

    def describe_device(self) -> str:
        """Where the LLM runs, e.g. "GPU (all 32 layers offloaded, flash attention auto)" or
        "CPU (this llama.cpp build has no GPU offload)"."""
        return describe_placement(self._core.placement, self._core.n_layer)

    @property
    def n_vocab(self) -> int:
        return self._core.n_vocab

    @property
    def n_ctx(self) -> int:
        return self._core.n_ctx

    @property
    def n_batch(self) -> int:
        return self._core.n_batch

    @property
    def n_ubatch(self) -> int:
        """Rows llama.cpp computes at once (as the context got them)."""
        return self._core.n_ubatch

    @property
    def n_past(self) -> int:
        """Positions currently in the KV cache (the next evaluation starts here)."""
        return self._core.n_past

    @property
    def eos_tokens(self) -> frozenset[int]:
        """All end-of-generation tokens llama.cpp derived from the GGUF (EOS, EOT, <|im_end|>, ...)."""
        with self._locked(need_ctx=False) as core:
            return core.eog_tokens()

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation (llama.cpp's end-of-generation set for this GGUF)."""
        with self._locked(need_ctx=False) as core:
            return core.is_eog(token)

    # ------------------------------------------------------------------ vocabulary

    def tokenize(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text` with the GGUF's own tokenizer.

        parse_special=True turns the text of special tokens ("<|im_start|>") into their ids, as
        chat templates need. add_bos adds BOS only where the GGUF says the model wants one.
        """
        with self._locked(need_ctx=False) as core:
            return core.tokenize(text, add_bos, parse_special)

    def token_to_piece(self, token: int, *, special: bool = True) -> bytes:
        """The bytes of one token (bytes, since a token can hold part of a UTF-8 character).
        special=True renders control tokens as their text (so stop strings can match them)."""
        with self._locked(need_ctx=False) as core:
            return core.piece(token, special)

    def detokenize(self, tokens: Sequence[int], *, special: bool = True) -> str:
        """Text of a token sequence (llama.cpp's detokenizer; invalid UTF-8 is replaced)."""
        with self._locked(need_ctx=False) as core:
            return core.detokenize(tokens, special)

    # ------------------------------------------------------------------ evaluation

    def eval_tokens(self, tokens: Sequence[int]) -> None:
        """Append token ids at positions n_past.. (chunks of <= n_batch)."""
        with self._locked() as core:
            ids = core.check_tokens(tokens)
            core.check_room(len(ids), "tokens")
            core.eval_ids(ids)

    def eval_embeddings(self, embeds: np.ndarray) -> None:
        """Append embedding rows [n, n_embd] (float32) at positions n_past.. (chunks of <= n_batch).

        A float32 C-contiguous array is used as is: each chunk is copied once, into the batch.
        Other dtypes/layouts are converted first (one extra copy).
        """
        with self._locked() as core:
            rows = core.check_embeddings(embeds)
            core.check_room(rows.shape[0], "embedding rows")
            core.eval_rows(rows)

    def eval_prompt(self, parts: Sequence[PromptPart] | PromptPart) -> int:
        """Evaluate a prompt made of text chunks and embedding arrays, in order; return the
        number of positions appended.

        Text is tokenized with special tokens parsed and no BOS added (the chat template's text
        carries any BOS). Everything is validated (widths, total length vs. n_ctx) before the
        first decode, so a bad prompt leaves the context untouched.
        """
        with self._locked() as core:
            return core.eval_parts(parts)

    def last_logits(self) -> np.ndarray:
        """float32 copy of the logits of the last evaluated position."""
        with self._locked() as core:
            return core.logits_view().copy()

    # ------------------------------------------------------------------ KV prefix reuse

    def mark(self) -> int:
        """The current n_past, to `rewind` to later."""
        with self._locked() as core:
            return core.n_past

    def rewind(self, n_past: int) -> None:
        """Forget positions >= n_past (KV cells removed with llama_memory_seq_rm); the prefix
        stays. Its last position's logits are gone: evaluate at least one token next."""
        with self._locked() as core:
            core.rewind(n_past)

    def reset(self) -> None:
        """Empty the context (all KV cells cleared)."""
        with self._locked() as core:
            core.clear()

    def save_state(self) -> bytearray:
        """The context's KV cache (sequence 0, all `n_past` positions) as bytes, for
        `load_state` on this or another context of the same GGUF and settings: an image prefix
        evaluated once can be restored later instead of re-running vision and prefill.
        Size: about n_past x n_layer x 2 x kv width x element size (f16 Phi-3.5: ~0.4 MB a position)."""
        with self._locked() as core:
            return core.save_state()

    def load_state(self, blob: bytearray, n_past: int) -> None:
        """Replace the context with a state from `save_state` that held `n_past` positions.
        Like after `rewind`, there are no logits: evaluate at least one token next."""
        with self._locked() as core:
            core.load_state(blob, n_past)

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        max_tokens: int,
        *,
        prompt: Sequence[PromptPart] | PromptPart | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop_strings: Sequence[str] = (),
        on_text: Callable[[str], None] | None = None,
        grammar: str | None = None,
    ) -> Generation:
        """Evaluate `prompt` (if given, as `eval_prompt`) and sample up to `max_tokens` tokens.

        Greedy when temperature == 0; else temperature, top-k (0 = off), top-p, drawn with a
        numpy Generator seeded by `seed` (None: `options.seed`), so equal seeds give equal text.
        Stops on an end-of-generation token ("eog"), on the first occurrence of a stop string
        ("stop_string"; the string and anything after it are cut from the text), after
        max_tokens ("max_tokens"), or when the context is full ("context_full").

        on_text receives text pieces as soon as they are safe: complete UTF-8 characters that
        cannot be the start of a stop string. The pieces concatenate to `Generation.text`.

        grammar: a GBNF grammar (root rule `root`, see `eyecare_edge.grammar`); the logits are
        masked to the tokens it can accept before sampling, and generation ends only when it is
        complete (or at max_tokens / a full context). A grammar llama.cpp cannot parse raises
        LLMError before anything is evaluated.

        Afterwards the context holds the prompt and the generated tokens that were fed back:
        all of `tokens` after an "eog" stop, all but the last one otherwise (a token is fed back
        only to produce the next); `rewind(mark)` before the next question.
        """
        if max_tokens < 1:
            raise LLMError(f"max_tokens must be >= 1, got {max_tokens}")
        if temperature < 0.0 or not 0.0 < top_p <= 1.0 or top_k < 0:
            raise LLMError(f"bad sampling settings: temperature={temperature}, top_p={top_p}, top_k={top_k}")
        with self._locked() as core, self._grammar(core, grammar) as constraint:
            t0 = time.perf_counter()
            if prompt is not None:
                core.eval_parts(prompt)
            t_prefill = time.perf_counter()
            n_prompt = core.n_past
            rng = np.random.default_rng(self.options.seed if seed is None else seed)
            stream = TextStream(stop_strings)
            tokens: list[int] = []
            stop_reason = "max_tokens"
            sample_s = decode_s = 0.0
            first_token_s = 0.0
            while True:
                ts = time.perf_counter()
                logits = core.logits_view() if constraint is None else self._masked(core, constraint)
                tok = sample_token(logits, temperature=temperature, top_p=top_p, top_k=top_k, rng=rng)
                sample_s += time.perf_counter() - ts
                if not tokens:
                    first_token_s = time.perf_counter() - t0
                if core.is_eog(tok):
                    stop_reason = "eog"
                    break
                tokens.append(tok)
                if constraint is not None:
                    constraint.accept(tok)
                self._emit(on_text, stream.feed(core.piece(tok, True)))
                if stream.stopped:
                    stop_reason = "stop_string"
                    break
                if len(tokens) >= max_tokens:
                    stop_reason = "max_tokens"
                    break
                if core.n_past >= core.n_ctx:
                    stop_reason = "context_full"
                    break
                td = time.perf_counter()
                core.eval_token(tok)
                decode_s += time.perf_counter() - td
            self._emit(on_text, stream.finish())
            t_end = time.perf_counter()
        timings = {
            "prefill_ms": 1000.0 * (t_prefill - t0),
            "first_token_ms": 1000.0 * first_token_s,
            "sample_ms": 1000.0 * sample_s,
            "decode_ms": 1000.0 * decode_s,
            "total_ms": 1000.0 * (t_end - t0),
        }
        return Generation(
            text=stream.text, tokens=tokens, stop_reason=stop_reason, n_prompt=n_prompt, timings=timings
        )

    @contextlib.contextmanager
    def _grammar(self, core: LlamaContext, gbnf: str | None) -> Iterator[GrammarConstraint | None]:
        if gbnf is None:
            yield None
            return
        try:
            constraint = GrammarConstraint(core.vocab, gbnf, core.n_vocab, pieces=core.token_pieces())
        except GrammarError as e:
            raise LLMError(str(e)) from None
        try:
            yield constraint
        finally:
            constraint.free()

    def _masked(self, core: LlamaContext, constraint: GrammarConstraint) -> np.ndarray:
        try:
            return constraint.mask(core.logits_view())
        except GrammarError as e:
            raise LLMError(str(e)) from None


    def _emit(self, on_text: Callable[[str], None] | None, piece: str) -> None:
        if on_text is None or not piece:
            return
        self._in_callback = True
        try:
            on_text(piece)
        finally:
            self._in_callback = False
