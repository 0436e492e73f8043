"""The thin layer over llama.cpp's ctypes API: one GGUF model and one context of a single
sequence (id 0), its vocabulary, evaluation in batches of at most `n_batch` rows (text tokens
and injected embedding rows in separate decodes), the logits of the last position, and the KV
cache (rewind to a mark, clear, save and restore).

Nothing here locks; `LlamaCppLM` (lm.py) owns one `LlamaContext` and serialises every call.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from eyecare_edge.formats import KV_CACHES
from eyecare_edge.gguf_header import GGML_TYPES
from eyecare_edge.llm.batch import Batch, array_view
from eyecare_edge.llm.binding import (
    KV_TYPES,
    LLMError,
    backend_init,
    check_binding_version,
    check_gguf_file,
    lib,
    set_log_level,
)
from eyecare_edge.llm.device import load_model, physical_cores
from eyecare_edge.llm.options import LLMOptions, PromptPart


class LlamaContext:
    """A loaded GGUF and its context. State: `n_past` (positions in the KV cache; the next
    evaluation starts there) and `has_logits` (whether the last position's logits are current:
    false after load, clear, rewind and restore). Batches: one for tokens, one for embedding
    rows (allocated on first use)."""

    def __init__(self, path: Path, opts: LLMOptions) -> None:
        self.path = path
        self.model = None
        self.ctx = None
        self.tok_batch: Batch | None = None
        self.emb_batch: Batch | None = None
        check_binding_version()
        check_gguf_file(path)
        set_log_level(opts.verbose)
        backend_init()

        mparams = lib.llama_model_default_params()
        mparams.load_mode = lib.LLAMA_LOAD_MODE_MMAP if opts.use_mmap else lib.LLAMA_LOAD_MODE_NONE
        mparams.use_extra_bufts = opts.repack
        self.model, self.placement = load_model(path, mparams, opts.n_gpu_layers, opts.flash_attn)
        if self.model is None:
            raise LLMError(f"{path}: llama.cpp could not load this GGUF (unsupported or corrupt model)")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(lib.llama_model_n_embd_inp(self.model))
        self.n_layer = int(lib.llama_model_n_layer(self.model))
        self.kv_type = self._usable_kv_type(opts)

        threads = opts.n_threads or physical_cores()
        threads_batch = opts.n_threads_batch or threads
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = opts.n_ctx
        cparams.n_batch = opts.n_batch
        cparams.n_ubatch = opts.n_ubatch
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads_batch
        cparams.flash_attn_type = {
            "enabled": lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "disabled": lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
            "auto": lib.LLAMA_FLASH_ATTN_TYPE_AUTO,
        }[self.placement.flash_attn]
        type_k, type_v = KV_CACHES[self.kv_type]
        cparams.type_k, cparams.type_v = KV_TYPES[type_k], KV_TYPES[type_v]
        cparams.embeddings = False
        cparams.no_perf = True
        ctx = lib.llama_init_from_model(self.model, cparams)
        if not ctx:
            self.free()
            raise LLMError(
                f"{path}: llama.cpp could not create a context "
                f"(n_ctx={opts.n_ctx}, n_batch={opts.n_batch}, kv_type={self.kv_type}, "
                f"flash_attn={self.placement.flash_attn}, n_gpu_layers={self.placement.gpu_layers})"
            )
        self.ctx = ctx
        self.memory = lib.llama_get_memory(ctx)
        self.n_ctx = int(lib.llama_n_ctx(ctx))
        self.n_batch = int(lib.llama_n_batch(ctx))
        self.n_ubatch = int(lib.llama_n_ubatch(ctx))
        self.tok_batch = Batch(self.n_batch, 0)
        self.n_past = 0
        self.has_logits = False
        self._eog: frozenset[int] | None = None  # found on first use: a vocabulary scan
        self._pieces: list[bytes] | None = None

    def _meta(self, key: str) -> str | None:
        """A GGUF metadata value as llama.cpp read it (None when absent)."""
        buf = ctypes.create_string_buffer(256)
        n = lib.llama_model_meta_val_str(self.model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def head_size_k(self) -> int:
        """Values per attention head in the K cache: `{arch}.attention.key_length`, else
        n_embd / n_head."""
        arch = self._meta("general.architecture") or ""
        key_length = self._meta(f"{arch}.attention.key_length")
        if key_length and key_length.isdigit():
            return int(key_length)
        return int(lib.llama_model_n_embd(self.model)) // max(int(lib.llama_model_n_head(self.model)), 1)

    def _usable_kv_type(self, opts: LLMOptions) -> str:
        """opts.kv_type, or opts.kv_fallback where this model cannot take it: llama.cpp views a
        quantized K cache per head, and a head size its blocks do not divide aborts the process
        (a GGML_ASSERT in ggml_view, measured with a head size of 80 and a Q8_0 K), so it is
        refused here with the reason instead."""
        k = KV_CACHES[opts.kv_type][0]
        block = GGML_TYPES[KV_TYPES[k]][1]
        head = self.head_size_k()
        if head % block == 0:
            return opts.kv_type
        if opts.kv_fallback is not None:
            return opts.kv_fallback
        self.free()
        raise LLMError(
            f"{self.path}: kv_type {opts.kv_type!r} keeps K in {k}, whose {block}-value blocks do not "
            f"divide this model's attention head size ({head}); use kv_type 'f16'"
        )

    def free(self) -> None:
        """Free the batches, the context and the model, in that order, exactly once."""
        for batch in (self.emb_batch, self.tok_batch):
            if batch is not None:
                batch.free()
        self.emb_batch = self.tok_batch = None
        if self.ctx is not None:
            lib.llama_free(self.ctx)
            self.ctx = None
        if self.model is not None:
            lib.llama_model_free(self.model)
            self.model = None

    def is_open(self, need_ctx: bool = True) -> bool:
        return self.model is not None and (not need_ctx or self.ctx is not None)

    # ------------------------------------------------------------------ vocabulary

    def eog_tokens(self) -> frozenset[int]:
        if self._eog is None:
            is_eog = lib.llama_vocab_is_eog
            self._eog = frozenset(t for t in range(self.n_vocab) if is_eog(self.vocab, t))
        return self._eog

    def is_eog(self, token: int) -> bool:
        return bool(lib.llama_vocab_is_eog(self.vocab, token))

    def tokenize(self, text: str, add_bos: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (lib.llama_token * cap)()
        n = lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, parse_special)
        if n < 0:
            cap = -n
            buf = (lib.llama_token * cap)()
            n = lib.llama_tokenize(self.vocab, data, len(data), buf, cap, add_bos, parse_special)
            if n < 0:
                raise LLMError(f"{self.path}: tokenization failed for a text of {len(data)} bytes")
        return list(buf[:n])

    def piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = lib.llama_token_to_piece(self.vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, special)
        return buf.raw[: max(n, 0)]

    def token_pieces(self) -> list[bytes]:
        """Every token's bytes (special tokens rendered), built once per model: the grammar's
        UTF-8 guard reads them (see `GrammarConstraint`)."""
        if self._pieces is None:
            self._pieces = [self.piece(t, True) for t in range(self.n_vocab)]
        return self._pieces

    def detokenize(self, tokens: Sequence[int], special: bool) -> str:
        arr = (lib.llama_token * max(len(tokens), 1))(*tokens)
        cap = 8 * len(tokens) + 16
        buf = ctypes.create_string_buffer(cap)
        n = lib.llama_detokenize(self.vocab, arr, len(tokens), buf, cap, False, special)
        if n < 0:
            cap = -n
            buf = ctypes.create_string_buffer(cap)
            n = lib.llama_detokenize(self.vocab, arr, len(tokens), buf, cap, False, special)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ checks

    def check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.n_vocab):
            bad = int(ids[(ids < 0) | (ids >= self.n_vocab)][0])
            raise LLMError(f"token id {bad} is outside the vocabulary [0, {self.n_vocab})")
        return ids.astype(np.int32)

    def check_embeddings(self, embeds: np.ndarray, what: str = "embeddings") -> np.ndarray:
        arr = np.asarray(embeds)
        if arr.ndim != 2 or arr.shape[1] != self.n_embd:
            raise LLMError(
                f"{what} have shape {tuple(arr.shape)}; expected [n, {self.n_embd}] (n_embd of {self.path.name})"
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise LLMError(f"{what} have dtype {arr.dtype}; expected float32")
        arr = np.ascontiguousarray(arr, dtype=np.float32)  # no copy when it already is
        # One float64 sum finds NaN/inf without a temporary mask the size of the image rows.
        if not np.isfinite(arr.sum(dtype=np.float64)):
            raise LLMError(f"{what} contain NaN or infinite values")
        return arr

    def check_room(self, n: int, what: str) -> None:
        if self.n_past + n > self.n_ctx:
            raise LLMError(f"{n} {what} do not fit: {self.n_past} positions used + {n} > n_ctx {self.n_ctx}")

    # ------------------------------------------------------------------ evaluation

    def eval_parts(self, parts: Sequence[PromptPart] | PromptPart) -> int:
        """Validate every part (widths, total length vs. n_ctx), then evaluate them in order;
        a bad prompt leaves the context untouched. Returns the positions appended."""
        if isinstance(parts, (str, np.ndarray)):
            parts = [parts]
        prepared: list[tuple[str, np.ndarray]] = []
        total = 0
        for i, part in enumerate(parts):
            if isinstance(part, str):
                ids = np.asarray(self.tokenize(part, False, True), dtype=np.int32)
                if ids.size:
                    prepared.append(("tokens", ids))
                    total += ids.size
            elif isinstance(part, np.ndarray):
                rows = self.check_embeddings(part, what=f"prompt part {i}")
                if rows.shape[0]:
                    prepared.append(("embeds", rows))
                    total += rows.shape[0]
            else:
                raise LLMError(f"prompt part {i} is a {type(part).__name__}; expected str or numpy.ndarray")
        self.check_room(total, "prompt positions")
        for kind, data in prepared:
            if kind == "tokens":
                self.eval_ids(data)
            else:
                self.eval_rows(data)
        return total

    def decode(self, batch: Batch, start: int) -> None:
        rc = lib.llama_decode(self.ctx, batch.batch)
        if rc != 0:
            # Drop whatever part of this call reached the cache, so n_past stays the truth.
            lib.llama_memory_seq_rm(self.memory, 0, start, -1)
            self.n_past = start
            self.has_logits = False
            reason = {1: "no free KV slot", 2: "aborted", -1: "invalid batch"}.get(rc, "fatal error")
            raise LLMError(f"llama_decode failed ({rc}: {reason}) at position {start}")

    def eval_ids(self, ids: np.ndarray) -> None:
        self._feed(self.tok_batch, self.tok_batch.token, ids)

    def eval_rows(self, rows: np.ndarray) -> None:
        if self.emb_batch is None:
            self.emb_batch = Batch(self.n_batch, self.n_embd)
        self._feed(self.emb_batch, self.emb_batch.embd, rows)

    def _feed(self, batch: Batch, slots: np.ndarray, values: np.ndarray) -> None:
        """Decode `values` (token ids or embedding rows) through `batch`'s `slots` view, a batch
        at a time; logits are kept for the last position only."""
        start = self.n_past
        n = values.shape[0]
        for lo in range(0, n, batch.capacity):
            hi = min(lo + batch.capacity, n)
            slots[: hi - lo] = values[lo:hi]
            batch.prepare(hi - lo, self.n_past, want_logits=hi == n)
            self.decode(batch, start)
            self.n_past += hi - lo
        if n:
            self.has_logits = True

    def eval_token(self, token: int) -> None:
        """Feed one generated token back (the decode step of generation)."""
        self.tok_batch.token[0] = token
        self.tok_batch.prepare(1, self.n_past, want_logits=True)
        self.decode(self.tok_batch, self.n_past)
        self.n_past += 1
        self.has_logits = True

    def logits_view(self) -> np.ndarray:
        """The last position's logits, a view into llama.cpp's buffer (valid until the next decode)."""
        if not self.has_logits:
            raise LLMError(
                "no logits: nothing evaluated since load/reset/rewind (evaluate at least one token first)"
            )
        ptr = lib.llama_get_logits_ith(self.ctx, -1)
        if not ptr:
            raise LLMError("llama.cpp returned no logits for the last position")
        return array_view(ptr, (self.n_vocab,))

    # ------------------------------------------------------------------ KV cache

    def rewind(self, n_past: int) -> None:
        if not 0 <= n_past <= self.n_past:
            raise LLMError(f"cannot rewind to {n_past}: {self.n_past} positions in the context")
        if n_past == self.n_past:
            return
        if not lib.llama_memory_seq_rm(self.memory, 0, n_past, -1):
            raise LLMError(f"llama.cpp could not remove positions >= {n_past} from the KV cache")
        self.n_past = n_past
        self.has_logits = False

    def clear(self) -> None:
        lib.llama_memory_clear(self.memory, True)
        self.n_past = 0
        self.has_logits = False

    def save_state(self) -> bytearray:
        size = int(lib.llama_state_seq_get_size(self.ctx, 0))
        blob = bytearray(size)
        if size:
            buf = (ctypes.c_uint8 * size).from_buffer(blob)
            n = int(lib.llama_state_seq_get_data(self.ctx, buf, size, 0))
            del buf  # release the export of `blob` before it is resized or returned
            if n == 0:
                raise LLMError("llama.cpp could not copy the KV cache state")
            del blob[n:]
        return blob

    def load_state(self, blob: bytearray, n_past: int) -> None:
        self.clear()
        if n_past > self.n_ctx:
            raise LLMError(f"a saved state of {n_past} positions does not fit n_ctx {self.n_ctx}")
        if not blob:
            if n_past:
                raise LLMError(f"an empty saved state cannot hold {n_past} positions")
            return
        buf = (ctypes.c_uint8 * len(blob)).from_buffer(blob)
        ok = int(lib.llama_state_seq_set_data(self.ctx, buf, len(blob), 0))
        del buf
        restored = int(lib.llama_memory_seq_pos_max(self.memory, 0)) + 1 if ok else -1
        if restored != n_past:
            lib.llama_memory_clear(self.memory, True)
            raise LLMError(
                f"llama.cpp could not restore a saved state of {n_past} positions "
                f"(restored {max(restored, 0)}; from a different model or context settings?)"
            )
        self.n_past = n_past
