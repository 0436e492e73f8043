"""The runtime's language model: a GGUF run by llama.cpp through llama-cpp-python's low-level API.

Why the low-level API and not `llama_cpp.Llama`: a VLM prompt is text *and* image embeddings.
llama.cpp's own multimodal path (mtmd) lays out anyres tokens differently from the model we
train, so we inject the visual rows ourselves, the way mtmd does it internally: a `llama_batch`
with `embd` rows (`llama_batch_init(n, n_embd, 1)`) at explicit positions, text and embeddings
in separate decodes, every decode at most `n_batch` rows.

One `LlamaCppLM` owns one model, one context (one sequence, id 0) and two reusable batches
(tokens; embedding rows, allocated on first use). Its state is `n_past`, the number of positions
in the KV cache. Several questions about the same image pay for the image once:

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

import codecs
import contextlib
import ctypes
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eyecare_edge.errors import EyecareError
from eyecare_edge.grammar import GrammarConstraint, GrammarError

try:  # the runtime can still be imported (bundle checks, CLI help) where llama.cpp is absent
    # llama.cpp's OpenMP workers spin between operations by default; on a busy 2-8 core clinic
    # PC one descheduled spinner stalls every step (measured: Q4_K_M decode 4 tok/s spinning vs
    # 22-27 tok/s with passive waits, prefill equal or better). Set before the library loads
    # OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp.llama_cpp as _lib
except ImportError as exc:  # pragma: no cover - exercised only on machines without llama-cpp-python
    _lib = None
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

# ggml_type values for the KV cache (ggml.h; the bindings do not export BF16).
KV_TYPES: dict[str, int] = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}
STOP_REASONS = ("eog", "stop_string", "max_tokens", "context_full")
_GGUF_MAGIC = b"GGUF"
# Top candidates examined before falling back to a full sort in nucleus sampling.
_TOP_P_CANDIDATES = 256


class LLMError(EyecareError):
    """A model that cannot be loaded or a request the context cannot serve."""


@dataclass
class LLMOptions:
    """Settings of the model and its context; the perf work tunes these by measurement.

    n_gpu_layers: layers offloaded to a GPU build of llama.cpp; None (default) = every layer when
    `llama_supports_gpu_offload()` (a CUDA/Metal/Vulkan build), else 0; -1 = all; 0 = CPU only.
    flash_attn: None (default) = auto: llama.cpp's own per-device choice when layers are offloaded,
    off on the CPU (measured there: no gain, see perf.run.PROPOSED); True/False force it.
    n_threads / n_threads_batch: None means the number of physical cores this process may use
    (SMT siblings share the FMA units that decode and prefill saturate). kv_type: element type
    of the K and V caches; "q8_0" needs flash attention (llama.cpp quantizes V only inside its
    flash-attention kernel). repack: llama.cpp's weight repacking for CPU kernels
    (`use_extra_bufts`); measured on a 2-core AVX-512 CPU, turning it off prefilled 3.6k
    embedding rows 2.5x faster, so it is an option rather than a constant. seed: the sampling
    seed used when `generate(seed=None)`, so a deployed bundle answers reproducibly.
    """

    n_ctx: int = 4096
    n_batch: int = 512
    n_ubatch: int = 512
    n_threads: int | None = None
    n_threads_batch: int | None = None
    n_gpu_layers: int | None = None
    kv_type: str = "f16"
    flash_attn: bool | None = None
    use_mmap: bool = True
    repack: bool = False
    seed: int = 0
    verbose: bool = False

    def validate(self) -> None:
        if self.kv_type not in KV_TYPES:
            raise LLMError(f"kv_type {self.kv_type!r} is not one of {', '.join(KV_TYPES)}")
        fa = resolve_flash_attn(self.flash_attn, resolve_gpu_layers(self.n_gpu_layers))
        if self.kv_type == "q8_0" and fa == "disabled":  # auto on the CPU is disabled too
            raise LLMError(
                "kv_type 'q8_0' needs flash_attn=True (llama.cpp quantizes V only with flash attention)"
            )
        for name in ("n_ctx", "n_batch", "n_ubatch"):
            if getattr(self, name) < 1:
                raise LLMError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_ubatch > self.n_batch:
            raise LLMError(f"n_ubatch ({self.n_ubatch}) must not exceed n_batch ({self.n_batch})")
        for name in ("n_threads", "n_threads_batch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise LLMError(f"{name} must be >= 1 or None, got {value}")


@dataclass
class Generation:
    """One generated answer.

    tokens: every sampled token except an end-of-generation token (it includes the tokens of a
    stop string, which `text` does not). n_prompt: positions in the context when sampling
    started. timings: milliseconds per phase: `prefill_ms` (evaluating `prompt=`),
    `first_token_ms` (call start to first sampled token: time to first token), `sample_ms`
    (all sampling), `decode_ms` (feeding generated tokens back), `total_ms`.
    """

    text: str
    tokens: list[int]
    stop_reason: str
    n_prompt: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first per second after the first (time to first token excluded)."""
        n = len(self.tokens) - 1
        ms = self.timings.get("total_ms", 0.0) - self.timings.get("first_token_ms", 0.0)
        return 1000.0 * n / ms if n > 0 and ms > 0 else 0.0


PromptPart = str | np.ndarray


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(path.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(len(cores), 1)


@functools.cache
def _backend_init() -> None:
    """llama.cpp's process-wide backend initialisation, done once."""
    _lib.llama_backend_init()


def _set_log_level(verbose: bool) -> None:
    # llama-cpp-python routes llama.cpp's log through this logger (process-wide, like
    # `llama_cpp.Llama(verbose=...)` does); quiet means errors only.
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)


def gpu_offload_supported() -> bool:
    """True when this llama.cpp build can offload layers to a GPU (CUDA, Metal, Vulkan...)."""
    return _lib is not None and bool(_lib.llama_supports_gpu_offload())


def resolve_gpu_layers(n_gpu_layers: int | None) -> int:
    """The n_gpu_layers llama.cpp gets: None -> all layers (-1) when the build can offload, else 0."""
    if n_gpu_layers is None:
        return -1 if gpu_offload_supported() else 0
    return n_gpu_layers


def resolve_flash_attn(flash_attn: bool | None, n_gpu_layers: int) -> str:
    """"enabled", "disabled" or "auto" (llama.cpp decides per device): None means auto when layers
    go to a GPU and disabled on the CPU."""
    if flash_attn is not None:
        return "enabled" if flash_attn else "disabled"
    return "auto" if n_gpu_layers != 0 and gpu_offload_supported() else "disabled"


def binding_version() -> str:
    import llama_cpp

    return str(getattr(llama_cpp, "__version__", "unknown"))


def check_binding_version() -> None:
    """LLMError when llama-cpp-python is older than the floor whose API this module calls."""
    from eyecare_edge.versions import LLAMA_CPP_PYTHON_MIN, LLAMA_CPP_UPGRADE, at_least

    version = binding_version()
    if not at_least(version, LLAMA_CPP_PYTHON_MIN) or not hasattr(_lib, "LLAMA_LOAD_MODE_MMAP"):
        raise LLMError(
            f"llama-cpp-python {version} is too old: eyecare-edge needs >= {LLAMA_CPP_PYTHON_MIN} "
            f"(llama_model_params.load_mode); {LLAMA_CPP_UPGRADE}"
        )


def _check_gguf_file(path: Path) -> None:
    if not path.exists():
        raise LLMError(f"{path}: no such file")
    if not path.is_file():
        raise LLMError(f"{path}: not a file")
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic != _GGUF_MAGIC:
        raise LLMError(f"{path}: not a GGUF file (starts with {magic!r}, expected {_GGUF_MAGIC!r})")


def _array_view(pointer, shape: tuple[int, ...]) -> np.ndarray:
    return np.ctypeslib.as_array(pointer, shape=shape)


class _Batch:
    """A `llama_batch` of one sequence with numpy views on its arrays (no per-row Python loops)."""

    def __init__(self, capacity: int, n_embd: int) -> None:
        self.capacity = capacity
        self.n_embd = n_embd
        self.batch = _lib.llama_batch_init(capacity, n_embd, 1)
        self.pos = _array_view(self.batch.pos, (capacity,))
        self.logits = _array_view(self.batch.logits, (capacity,))
        _array_view(self.batch.n_seq_id, (capacity,))[:] = 1
        for i in range(capacity):
            self.batch.seq_id[i][0] = 0
        if n_embd:
            self.embd = _array_view(self.batch.embd, (capacity, n_embd))
            self.token = None
        else:
            self.embd = None
            self.token = _array_view(self.batch.token, (capacity,))

    def prepare(self, n: int, start_pos: int, want_logits: bool) -> None:
        self.batch.n_tokens = n
        self.pos[:n] = np.arange(start_pos, start_pos + n, dtype=np.int32)
        self.logits[:n] = 0
        if want_logits:
            self.logits[n - 1] = 1

    def free(self) -> None:
        if self.batch is not None:
            _lib.llama_batch_free(self.batch)
            self.batch = None
            self.pos = self.logits = self.embd = self.token = None


def _stop_prefix_len(text: str, start: int, stops: Sequence[str]) -> int:
    """Length of the longest suffix of text[start:] that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text) - start), best, -1):
            if text.endswith(stop[:k]):
                best = k
                break
    return best


class TextStream:
    """Turns token pieces (bytes) into text pieces that are safe to show.

    A piece is released once it is complete UTF-8 and cannot be the beginning of a stop string;
    on the first stop string the text is cut before it and the stream stops. The released
    pieces always concatenate to `text`, so a streaming client and the final answer agree.
    Pure Python (no llama.cpp) so the rules are tested on their own.
    """

    def __init__(self, stop_strings: Sequence[str] = ()) -> None:
        self.stops = [s for s in stop_strings if s]
        self.text = ""
        self.stopped = False
        self._emitted = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> str:
        """Add one token's bytes; return the newly safe text ("" if none)."""
        if self.stopped:
            raise ValueError("TextStream already stopped at a stop string")
        self.text += self._decoder.decode(piece)
        if not self.stops:
            return self._release(len(self.text))
        # Nothing released can be part of a stop string, so a match starts at or after it.
        hits = [i for i in (self.text.find(s, self._emitted) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._release(len(self.text))
        return self._release(len(self.text) - _stop_prefix_len(self.text, self._emitted, self.stops))

    def finish(self) -> str:
        """End of generation: release what was held back (a partial stop string is text now)."""
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        out = self.text[self._emitted : upto]
        self._emitted = upto
        return out


def sample_token(
    logits: np.ndarray,
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    rng: np.random.Generator,
) -> int:
    """Pick the next token from one row of logits: argmax when temperature <= 0, else
    temperature -> top-k -> top-p (nucleus) -> draw, in float64.

    Done in numpy rather than llama.cpp's sampler chain: the result depends only on the logits
    and the seed (not on a native sampler's state or version), it needs no native objects to
    create and free per request, and it costs well under a millisecond per token next to a
    decode step of tens of milliseconds.
    """
    if temperature <= 0.0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    n = x.shape[0]
    if 0 < top_k < n:
        idx = np.argpartition(-x, top_k - 1)[:top_k]
    else:
        idx = None
    if top_p < 1.0:
        if idx is None:
            # The nucleus is almost always within the few hundred best tokens: check that
            # exactly (mass of the candidates vs. the whole) before paying for a full sort.
            m = min(_TOP_P_CANDIDATES, n)
            cand = np.argpartition(-x, m - 1)[:m] if m < n else np.arange(n)
            xmax = x[cand].max()
            total = np.exp(x - xmax).sum()
            cand_mass = np.exp(x[cand] - xmax).sum() / total
            idx = cand if cand_mass >= top_p else np.arange(n)
        vals = x[idx]
        order = np.argsort(-vals, kind="stable")
        idx, vals = idx[order], vals[order]
        p = np.exp(vals - vals[0])
        if idx.shape[0] < n and top_k <= 0:
            p_total = np.exp(x - vals[0]).sum()  # normalise over the whole vocabulary
        else:
            p_total = p.sum()
        cum = np.cumsum(p) / p_total
        keep = int(np.searchsorted(cum, top_p)) + 1
        idx, p = idx[:keep], p[:keep]
    else:
        if idx is None:
            idx = np.arange(n)
        p = np.exp(x[idx] - x[idx].max())
    cdf = np.cumsum(p)
    choice = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(idx[min(choice, idx.shape[0] - 1)])


class LlamaCppLM:
    """A GGUF language model with a single-sequence context; see the module docstring."""

    def __init__(self, gguf_path: str | os.PathLike[str], options: LLMOptions | None = None) -> None:
        self._model = None
        self._ctx = None
        self._tok_batch: _Batch | None = None
        self._emb_batch: _Batch | None = None
        self._lock = threading.Lock()
        self._owner: int | None = None
        self._in_callback = False
        if _lib is None:
            raise LLMError(f"llama-cpp-python is not installed ({_IMPORT_ERROR})")
        self.path = Path(gguf_path)
        self.options = options or LLMOptions()
        self.options.validate()
        check_binding_version()
        _check_gguf_file(self.path)
        _set_log_level(self.options.verbose)
        _backend_init()

        opts = self.options
        mparams = _lib.llama_model_default_params()
        self.gpu_layers = resolve_gpu_layers(opts.n_gpu_layers)
        self.flash_attn = resolve_flash_attn(opts.flash_attn, self.gpu_layers)
        mparams.n_gpu_layers = self.gpu_layers
        mparams.load_mode = _lib.LLAMA_LOAD_MODE_MMAP if opts.use_mmap else _lib.LLAMA_LOAD_MODE_NONE
        mparams.use_extra_bufts = opts.repack
        self.fallback: str | None = None  # why the LLM runs on the CPU although offload was automatic
        self._model = _lib.llama_model_load_from_file(str(self.path).encode("utf-8"), mparams)
        if not self._model and self.gpu_layers != 0 and opts.n_gpu_layers is None:
            # Automatic offload failed (GPU out of memory, driver mismatch): say so, run on the CPU.
            self.fallback = "loading with every layer on the GPU failed (out of GPU memory?)"
            logging.getLogger(__name__).warning("%s: %s; loading on the CPU", self.path, self.fallback)
            self.gpu_layers = mparams.n_gpu_layers = 0
            self.flash_attn = resolve_flash_attn(opts.flash_attn, 0)
            self._model = _lib.llama_model_load_from_file(str(self.path).encode("utf-8"), mparams)
        if not self._model:
            self._model = None
            raise LLMError(f"{self.path}: llama.cpp could not load this GGUF (unsupported or corrupt model)")
        self._vocab = _lib.llama_model_get_vocab(self._model)
        self._n_vocab = int(_lib.llama_vocab_n_tokens(self._vocab))
        self._n_embd = int(_lib.llama_model_n_embd_inp(self._model))
        self._n_layer = int(_lib.llama_model_n_layer(self._model))

        threads = opts.n_threads or physical_cores()
        threads_batch = opts.n_threads_batch or threads
        cparams = _lib.llama_context_default_params()
        cparams.n_ctx = opts.n_ctx
        cparams.n_batch = opts.n_batch
        cparams.n_ubatch = opts.n_ubatch
        cparams.n_seq_max = 1
        cparams.n_threads = threads
        cparams.n_threads_batch = threads_batch
        cparams.flash_attn_type = {
            "enabled": _lib.LLAMA_FLASH_ATTN_TYPE_ENABLED,
            "disabled": _lib.LLAMA_FLASH_ATTN_TYPE_DISABLED,
            "auto": _lib.LLAMA_FLASH_ATTN_TYPE_AUTO,
        }[self.flash_attn]
        cparams.type_k = cparams.type_v = KV_TYPES[opts.kv_type]
        cparams.embeddings = False
        cparams.no_perf = True
        ctx = _lib.llama_init_from_model(self._model, cparams)
        if not ctx:
            self.close()
            raise LLMError(
                f"{self.path}: llama.cpp could not create a context "
                f"(n_ctx={opts.n_ctx}, n_batch={opts.n_batch}, kv_type={opts.kv_type}, flash_attn={self.flash_attn}, "
                f"n_gpu_layers={self.gpu_layers})"
            )
        self._ctx = ctx
        self._memory = _lib.llama_get_memory(ctx)
        self._n_ctx = int(_lib.llama_n_ctx(ctx))
        self._n_batch = int(_lib.llama_n_batch(ctx))
        self._tok_batch = _Batch(self._n_batch, 0)
        self._n_past = 0
        self._has_logits = False
        self._eog: frozenset[int] | None = None  # found on first use: a vocabulary scan

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
        for batch in (self._emb_batch, self._tok_batch):
            if batch is not None:
                batch.free()
        self._emb_batch = self._tok_batch = None
        if self._ctx is not None:
            _lib.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            _lib.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaCppLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_lock", None) is not None and _lib is not None:
            with contextlib.suppress(Exception):  # a finalizer must not raise (e.g. at shutdown)
                self.close()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[LlamaCppLM]:
        """Hold the instance's lock across several calls, e.g. `rewind` + `generate`, so that
        another thread cannot evaluate in between. Calls made inside run without re-locking."""
        with self._locked():
            yield self

    @contextlib.contextmanager
    def _locked(self, need_ctx: bool = True) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:  # already held by this thread: inside `exclusive()` or a callback
            if self._in_callback:
                raise LLMError("call into LlamaCppLM from its own on_text callback; not allowed")
            self._check_open(need_ctx)
            yield
            return
        with self._lock:
            self._owner = me
            try:
                self._check_open(need_ctx)
                yield
            finally:
                self._owner = None

    def _check_open(self, need_ctx: bool) -> None:
        if self._model is None or (need_ctx and self._ctx is None):
            raise LLMError(f"{self.path}: model is closed")

    # ------------------------------------------------------------------ properties

    @property
    def n_embd(self) -> int:
        """Width of an input embedding row."""
        return self._n_embd

    @property
    def offloaded_layers(self) -> int:
        """Repeating layers llama.cpp put on a GPU (0 on a CPU-only build or with n_gpu_layers=0)."""
        if not gpu_offload_supported() or self.gpu_layers == 0:
            return 0
        return self._n_layer if self.gpu_layers < 0 else min(self.gpu_layers, self._n_layer)

    def describe_device(self) -> str:
        """Where the LLM runs, e.g. "GPU (all 32 layers offloaded, flash attention auto)" or
        "CPU (this llama.cpp build has no GPU offload)"."""
        n = self.offloaded_layers
        fa = f"flash attention {self.flash_attn}"
        if n:
            share = f"all {n}" if n == self._n_layer else f"{n}/{self._n_layer}"
            return f"GPU ({share} layers offloaded, {fa})"
        why = "n_gpu_layers=0" if gpu_offload_supported() else "this llama.cpp build has no GPU offload"
        return f"CPU ({self.fallback or why}, {fa})"

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_batch(self) -> int:
        return self._n_batch

    @property
    def n_past(self) -> int:
        """Positions currently in the KV cache (the next evaluation starts here)."""
        return self._n_past

    @property
    def eos_tokens(self) -> frozenset[int]:
        """All end-of-generation tokens llama.cpp derived from the GGUF (EOS, EOT, <|im_end|>, ...)."""
        with self._locked(need_ctx=False):
            if self._eog is None:
                is_eog = _lib.llama_vocab_is_eog
                self._eog = frozenset(t for t in range(self._n_vocab) if is_eog(self._vocab, t))
            return self._eog

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation (llama.cpp's end-of-generation set for this GGUF)."""
        with self._locked(need_ctx=False):
            return bool(_lib.llama_vocab_is_eog(self._vocab, token))

    # ------------------------------------------------------------------ vocabulary

    def tokenize(self, text: str, *, add_bos: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of `text` with the GGUF's own tokenizer.

        parse_special=True turns the text of special tokens ("<|im_start|>") into their ids, as
        chat templates need. add_bos adds BOS only where the GGUF says the model wants one.
        """
        with self._locked(need_ctx=False):
            return self._tokenize(text, add_bos, parse_special)

    def _tokenize(self, text: str, add_bos: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 8
        buf = (_lib.llama_token * cap)()
        n = _lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, parse_special)
        if n < 0:
            cap = -n
            buf = (_lib.llama_token * cap)()
            n = _lib.llama_tokenize(self._vocab, data, len(data), buf, cap, add_bos, parse_special)
            if n < 0:
                raise LLMError(f"{self.path}: tokenization failed for a text of {len(data)} bytes")
        return list(buf[:n])

    def token_to_piece(self, token: int, *, special: bool = True) -> bytes:
        """The bytes of one token (bytes, since a token can hold part of a UTF-8 character).
        special=True renders control tokens as their text (so stop strings can match them)."""
        with self._locked(need_ctx=False):
            return self._piece(token, special)

    def _token_pieces(self) -> list[bytes]:
        """Every token's bytes (special tokens rendered), built once per model: the grammar's
        UTF-8 guard reads them (see `GrammarConstraint`)."""
        pieces = getattr(self, "_pieces_cache", None)
        if pieces is None:
            pieces = self._pieces_cache = [self._piece(t, True) for t in range(self._n_vocab)]
        return pieces

    def _piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = _lib.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = _lib.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        return buf.raw[: max(n, 0)]

    def detokenize(self, tokens: Sequence[int], *, special: bool = True) -> str:
        """Text of a token sequence (llama.cpp's detokenizer; invalid UTF-8 is replaced)."""
        with self._locked(need_ctx=False):
            arr = (_lib.llama_token * max(len(tokens), 1))(*tokens)
            cap = 8 * len(tokens) + 16
            buf = ctypes.create_string_buffer(cap)
            n = _lib.llama_detokenize(self._vocab, arr, len(tokens), buf, cap, False, special)
            if n < 0:
                cap = -n
                buf = ctypes.create_string_buffer(cap)
                n = _lib.llama_detokenize(self._vocab, arr, len(tokens), buf, cap, False, special)
            return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ evaluation

    def eval_tokens(self, tokens: Sequence[int]) -> None:
        """Append token ids at positions n_past.. (chunks of <= n_batch)."""
        with self._locked():
            ids = self._check_tokens(tokens)
            self._check_room(len(ids), "tokens")
            self._eval_ids(ids)

    def eval_embeddings(self, embeds: np.ndarray) -> None:
        """Append embedding rows [n, n_embd] (float32) at positions n_past.. (chunks of <= n_batch).

        A float32 C-contiguous array is used as is: each chunk is copied once, into the batch.
        Other dtypes/layouts are converted first (one extra copy).
        """
        with self._locked():
            rows = self._check_embeddings(embeds)
            self._check_room(rows.shape[0], "embedding rows")
            self._eval_rows(rows)

    def eval_prompt(self, parts: Sequence[PromptPart] | PromptPart) -> int:
        """Evaluate a prompt made of text chunks and embedding arrays, in order; return the
        number of positions appended.

        Text is tokenized with special tokens parsed and no BOS added (the chat template's text
        carries any BOS). Everything is validated (widths, total length vs. n_ctx) before the
        first decode, so a bad prompt leaves the context untouched.
        """
        with self._locked():
            return self._eval_parts(parts)

    def last_logits(self) -> np.ndarray:
        """float32 copy of the logits of the last evaluated position."""
        with self._locked():
            return self._logits_view().copy()

    def _eval_parts(self, parts: Sequence[PromptPart] | PromptPart) -> int:
        if isinstance(parts, (str, np.ndarray)):
            parts = [parts]
        prepared: list[tuple[str, np.ndarray]] = []
        total = 0
        for i, part in enumerate(parts):
            if isinstance(part, str):
                ids = np.asarray(self._tokenize(part, False, True), dtype=np.int32)
                if ids.size:
                    prepared.append(("tokens", ids))
                    total += ids.size
            elif isinstance(part, np.ndarray):
                rows = self._check_embeddings(part, what=f"prompt part {i}")
                if rows.shape[0]:
                    prepared.append(("embeds", rows))
                    total += rows.shape[0]
            else:
                raise LLMError(f"prompt part {i} is a {type(part).__name__}; expected str or numpy.ndarray")
        self._check_room(total, "prompt positions")
        for kind, data in prepared:
            if kind == "tokens":
                self._eval_ids(data)
            else:
                self._eval_rows(data)
        return total

    def _check_tokens(self, tokens: Sequence[int]) -> np.ndarray:
        ids = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self._n_vocab):
            bad = int(ids[(ids < 0) | (ids >= self._n_vocab)][0])
            raise LLMError(f"token id {bad} is outside the vocabulary [0, {self._n_vocab})")
        return ids.astype(np.int32)

    def _check_embeddings(self, embeds: np.ndarray, what: str = "embeddings") -> np.ndarray:
        arr = np.asarray(embeds)
        if arr.ndim != 2 or arr.shape[1] != self._n_embd:
            raise LLMError(
                f"{what} have shape {tuple(arr.shape)}; expected [n, {self._n_embd}] (n_embd of {self.path.name})"
            )
        if not np.issubdtype(arr.dtype, np.floating):
            raise LLMError(f"{what} have dtype {arr.dtype}; expected float32")
        arr = np.ascontiguousarray(arr, dtype=np.float32)  # no copy when it already is
        # One float64 sum finds NaN/inf without a temporary mask the size of the image rows.
        if not np.isfinite(arr.sum(dtype=np.float64)):
            raise LLMError(f"{what} contain NaN or infinite values")
        return arr

    def _check_room(self, n: int, what: str) -> None:
        if self._n_past + n > self._n_ctx:
            raise LLMError(
                f"{n} {what} do not fit: {self._n_past} positions used + {n} > n_ctx {self._n_ctx}"
            )

    def _decode(self, batch: _Batch, start: int) -> None:
        rc = _lib.llama_decode(self._ctx, batch.batch)
        if rc != 0:
            # Drop whatever part of this call reached the cache, so n_past stays the truth.
            _lib.llama_memory_seq_rm(self._memory, 0, start, -1)
            self._n_past = start
            self._has_logits = False
            reason = {1: "no free KV slot", 2: "aborted", -1: "invalid batch"}.get(rc, "fatal error")
            raise LLMError(f"llama_decode failed ({rc}: {reason}) at position {start}")

    def _eval_ids(self, ids: np.ndarray) -> None:
        batch = self._tok_batch
        start = self._n_past
        n = ids.shape[0]
        for lo in range(0, n, batch.capacity):
            hi = min(lo + batch.capacity, n)
            batch.token[: hi - lo] = ids[lo:hi]
            batch.prepare(hi - lo, self._n_past, want_logits=hi == n)
            self._decode(batch, start)
            self._n_past += hi - lo
        if n:
            self._has_logits = True

    def _eval_rows(self, rows: np.ndarray) -> None:
        if self._emb_batch is None:
            self._emb_batch = _Batch(self._n_batch, self._n_embd)
        batch = self._emb_batch
        start = self._n_past
        n = rows.shape[0]
        for lo in range(0, n, batch.capacity):
            hi = min(lo + batch.capacity, n)
            batch.embd[: hi - lo] = rows[lo:hi]
            batch.prepare(hi - lo, self._n_past, want_logits=hi == n)
            self._decode(batch, start)
            self._n_past += hi - lo
        if n:
            self._has_logits = True

    def _logits_view(self) -> np.ndarray:
        if not self._has_logits:
            raise LLMError(
                "no logits: nothing evaluated since load/reset/rewind (evaluate at least one token first)"
            )
        ptr = _lib.llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise LLMError("llama.cpp returned no logits for the last position")
        return _array_view(ptr, (self._n_vocab,))

    # ------------------------------------------------------------------ KV prefix reuse

    def mark(self) -> int:
        """The current n_past, to `rewind` to later."""
        with self._locked():
            return self._n_past

    def rewind(self, n_past: int) -> None:
        """Forget positions >= n_past (KV cells removed with llama_memory_seq_rm); the prefix
        stays. Its last position's logits are gone: evaluate at least one token next."""
        with self._locked():
            if not 0 <= n_past <= self._n_past:
                raise LLMError(f"cannot rewind to {n_past}: {self._n_past} positions in the context")
            if n_past == self._n_past:
                return
            if not _lib.llama_memory_seq_rm(self._memory, 0, n_past, -1):
                raise LLMError(f"llama.cpp could not remove positions >= {n_past} from the KV cache")
            self._n_past = n_past
            self._has_logits = False

    def reset(self) -> None:
        """Empty the context (all KV cells cleared)."""
        with self._locked():
            _lib.llama_memory_clear(self._memory, True)
            self._n_past = 0
            self._has_logits = False

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
        with self._locked(), self._grammar(grammar) as constraint:
            t0 = time.perf_counter()
            if prompt is not None:
                self._eval_parts(prompt)
            t_prefill = time.perf_counter()
            n_prompt = self._n_past
            rng = np.random.default_rng(self.options.seed if seed is None else seed)
            stream = TextStream(stop_strings)
            tokens: list[int] = []
            stop_reason = "max_tokens"
            sample_s = decode_s = 0.0
            first_token_s = 0.0
            while True:
                ts = time.perf_counter()
                logits = self._logits_view() if constraint is None else self._masked(constraint)
                tok = sample_token(logits, temperature=temperature, top_p=top_p, top_k=top_k, rng=rng)
                sample_s += time.perf_counter() - ts
                if not tokens:
                    first_token_s = time.perf_counter() - t0
                if _lib.llama_vocab_is_eog(self._vocab, tok):
                    stop_reason = "eog"
                    break
                tokens.append(tok)
                if constraint is not None:
                    constraint.accept(tok)
                self._emit(on_text, stream.feed(self._piece(tok, True)))
                if stream.stopped:
                    stop_reason = "stop_string"
                    break
                if len(tokens) >= max_tokens:
                    stop_reason = "max_tokens"
                    break
                if self._n_past >= self._n_ctx:
                    stop_reason = "context_full"
                    break
                td = time.perf_counter()
                self._tok_batch.token[0] = tok
                self._tok_batch.prepare(1, self._n_past, want_logits=True)
                self._decode(self._tok_batch, self._n_past)
                self._n_past += 1
                self._has_logits = True
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
    def _grammar(self, gbnf: str | None) -> Iterator[GrammarConstraint | None]:
        if gbnf is None:
            yield None
            return
        try:
            constraint = GrammarConstraint(self._vocab, gbnf, self._n_vocab, pieces=self._token_pieces())
        except GrammarError as e:
            raise LLMError(str(e)) from None
        try:
            yield constraint
        finally:
            constraint.free()

    def _masked(self, constraint: GrammarConstraint) -> np.ndarray:
        try:
            return constraint.mask(self._logits_view())
        except GrammarError as e:
            raise LLMError(str(e)) from None

    # ------------------------------------------------------------------ KV state save / restore

    def save_state(self) -> bytearray:
        """The context's KV cache (sequence 0, all `n_past` positions) as bytes, for
        `load_state` on this or another context of the same GGUF and settings: an image prefix
        evaluated once can be restored later instead of re-running vision and prefill.
        Size: about n_past x n_layer x 2 x kv width x element size (f16 Phi-3.5: ~0.4 MB a position)."""
        with self._locked():
            size = int(_lib.llama_state_seq_get_size(self._ctx, 0))
            blob = bytearray(size)
            if size:
                buf = (ctypes.c_uint8 * size).from_buffer(blob)
                n = int(_lib.llama_state_seq_get_data(self._ctx, buf, size, 0))
                del buf  # release the export of `blob` before it is resized or returned
                if n == 0:
                    raise LLMError("llama.cpp could not copy the KV cache state")
                del blob[n:]
            return blob

    def load_state(self, blob: bytearray, n_past: int) -> None:
        """Replace the context with a state from `save_state` that held `n_past` positions.
        Like after `rewind`, there are no logits: evaluate at least one token next."""
        with self._locked():
            _lib.llama_memory_clear(self._memory, True)
            self._n_past = 0
            self._has_logits = False
            if n_past > self._n_ctx:
                raise LLMError(f"a saved state of {n_past} positions does not fit n_ctx {self._n_ctx}")
            if not blob:
                if n_past:
                    raise LLMError(f"an empty saved state cannot hold {n_past} positions")
                return
            buf = (ctypes.c_uint8 * len(blob)).from_buffer(blob)
            ok = int(_lib.llama_state_seq_set_data(self._ctx, buf, len(blob), 0))
            del buf
            restored = int(_lib.llama_memory_seq_pos_max(self._memory, 0)) + 1 if ok else -1
            if restored != n_past:
                _lib.llama_memory_clear(self._memory, True)
                raise LLMError(
                    f"llama.cpp could not restore a saved state of {n_past} positions "
                    f"(restored {max(restored, 0)}; from a different model or context settings?)"
                )
            self._n_past = n_past

    def _emit(self, on_text: Callable[[str], None] | None, piece: str) -> None:
        if on_text is None or not piece:
            return
        self._in_callback = True
        try:
            on_text(piece)
        finally:
            self._in_callback = False
