"""Grammar-constrained generation: GBNF grammars (llama.cpp's format) and JSON schemas.

Screening software wants parseable JSON every time, not "usually". `LlamaCppLM.generate(grammar=)`
masks the logits it samples from with llama.cpp's grammar sampler before the project's own numpy
sampler picks a token (`llm.sample_token`), so greedy and seeded sampling behave exactly as
without a grammar except that tokens the grammar cannot accept get probability zero, and the
end-of-generation token is allowed only once the grammar is complete.

Why llama.cpp's grammar engine and not our own: it matches token pieces (multi-byte, partial
UTF-8) against the grammar's stacks in C++; re-implementing that in Python per token would cost
more than the decode step. Why keep sampling in numpy: `sample_token`'s result depends only on
the logits and the seed (see llm/sampling.py), which stays true with the mask applied.

JSON schemas are converted with llama-cpp-python's `json_schema_to_gbnf` (the port of
llama.cpp's json-schema-to-grammar). That port ignores numeric bounds (minimum / maximum /
exclusive*, multipleOf): a grammar built from `{"type": "integer", "minimum": 0, "maximum": 4}`
let the tiny test model answer -4. So bounded integers with at most `MAX_INT_ENUM` values are
rewritten to an enum first (enforced exactly), and any other numeric bound is refused with a
GrammarError rather than silently not enforced.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import re
from collections.abc import Sequence

import numpy as np

from eyecare_edge.errors import EyecareError

try:
    import llama_cpp.llama_cpp as _lib
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf
except ImportError:  # pragma: no cover - only where llama-cpp-python is absent
    _lib = None
    JSON_GBNF = None
    json_schema_to_gbnf = None


MAX_INT_ENUM = 256
_NUMERIC_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


class GrammarError(EyecareError, ValueError):
    """A grammar or JSON schema llama.cpp cannot use."""


def _bounded_ints(schema: dict, where: str) -> dict:
    """`schema` with small bounded integer ranges turned into enums (see the module docstring)."""
    bounds = {k: schema[k] for k in _NUMERIC_BOUNDS if k in schema}
    if not bounds or "enum" in schema or "const" in schema:
        return schema
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if isinstance(schema.get("exclusiveMinimum"), (int, float)) and not isinstance(
        schema["exclusiveMinimum"], bool
    ):
        lo = schema["exclusiveMinimum"] + 1
    if isinstance(schema.get("exclusiveMaximum"), (int, float)) and not isinstance(
        schema["exclusiveMaximum"], bool
    ):
        hi = schema["exclusiveMaximum"] - 1
    step = schema.get("multipleOf", 1)
    ok = (
        schema.get("type") == "integer"
        and all(isinstance(v, int) and not isinstance(v, bool) for v in (lo, hi, step))
        and step > 0
        and lo <= hi
        and (hi - lo) // step < MAX_INT_ENUM
    )
    if not ok:
        raise GrammarError(
            f"{where}: numeric bounds {bounds} cannot be enforced by the grammar (only integer ranges "
            f"with both ends and at most {MAX_INT_ENUM} values are); use an enum instead"
        )
    rest = {k: v for k, v in schema.items() if k not in (*_NUMERIC_BOUNDS, "type")}
    return {**rest, "enum": [v for v in range(lo, hi + 1) if v % step == 0]}


_SCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_VALUES = ("enum", "const", "default", "examples", "required")


def _lower(node: object, where: str = "schema") -> object:
    """Apply `_bounded_ints` to every sub-schema (not to property maps or literal values)."""
    if isinstance(node, list):
        return [_lower(v, f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    node = _bounded_ints(node, where)
    out: dict = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _lower(sub, f"{where}.{key}.{name}") for name, sub in value.items()}
        elif key in _VALUES:
            out[key] = value
        else:
            out[key] = _lower(value, f"{where}.{key}")
    return out


def json_schema_grammar(schema: dict | str) -> str:
    """The GBNF grammar (root rule `root`) of a JSON schema (a dict or its JSON text).

    Raises GrammarError naming what was wrong: not an object, or a construct the converter
    does not support.
    """
    if json_schema_to_gbnf is None:
        raise GrammarError("llama-cpp-python is not installed; JSON schemas need its grammar converter")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the JSON schema is not valid JSON ({e})") from None
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    schema = _lower(schema)
    try:
        return _astral_escapes(json_schema_to_gbnf(json.dumps(schema)))
    except (ValueError, KeyError, TypeError, AssertionError, NotImplementedError, RecursionError) as e:
        raise GrammarError(
            f"the JSON schema cannot be turned into a grammar ({type(e).__name__}: {e})"
        ) from None


# The converter writes literals (enum/const values, property names) with json.dumps, whose
# \uXXXX escapes GBNF reads as code points; a character beyond U+FFFF becomes a UTF-16 surrogate
# pair there, i.e. two lone surrogates, which llama.cpp encodes as invalid UTF-8. Found: an enum
# value "🙂 ok" came back as six U+FFFD, not in the enum. GBNF's \U takes 8 hex digits.
_SURROGATE_PAIR = re.compile(r"(?<!\\)((?:\\\\)*)\\u(d[89ab][0-9a-f]{2})\\u(d[c-f][0-9a-f]{2})", re.IGNORECASE)


def _astral_escapes(gbnf: str) -> str:
    """`\\ud83d\\ude42` -> `\\U0001F642` (an escaped backslash before it is left alone)."""

    def one(m: re.Match) -> str:
        hi, lo = int(m.group(2), 16), int(m.group(3), 16)
        return f"{m.group(1)}\\U{0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00):08X}"

    return _SURROGATE_PAIR.sub(one, gbnf)


def any_json_grammar() -> str:
    """GBNF for any JSON value (OpenAI's `response_format: {"type": "json_object"}`)."""
    if JSON_GBNF is None:
        raise GrammarError("llama-cpp-python is not installed; JSON output needs its grammar")
    return JSON_GBNF


class GrammarConstraint:
    """One generation's grammar state over a vocabulary of `n_vocab` tokens.

    `mask(logits)` returns the logits with every token the grammar cannot accept next set to
    -inf; `accept(token)` advances the grammar. One instance per generation (llama.cpp's
    grammar sampler keeps the parse stacks); `free()` releases it.

    `pieces` (each token's bytes) adds a UTF-8 guard on top of llama.cpp's matcher, which
    accepts *overlong* UTF-8: it sees a lead byte 0xF0 followed by 0x86 as a possible start of
    U+6B63 ("正"), so with an enum holding both "🙂 ok" and "正常眼底", sampling at temperature 1
    produced F0 86 AD A3 — four U+FFFD in the text, a value outside the enum (found with the
    tiny test model, seed 0). A token whose bytes would make the pending bytes invalid UTF-8 is
    masked too; pure-ASCII tokens are checked only while a multi-byte character is open.
    """

    def __init__(
        self,
        vocab: ctypes.c_void_p,
        gbnf: str,
        n_vocab: int,
        root: str = "root",
        pieces: Sequence[bytes] | None = None,
    ) -> None:
        if _lib is None:
            raise GrammarError("llama-cpp-python is not installed")
        self._smpl = _lib.llama_sampler_init_grammar(vocab, gbnf.encode("utf-8"), root.encode("utf-8"))
        if not self._smpl:
            self._smpl = None
            raise GrammarError(f"llama.cpp's GBNF parser refused the grammar (root rule {root!r})")
        self.n_vocab = n_vocab
        self._data = (_lib.llama_token_data * n_vocab)()
        self._view = np.ctypeslib.as_array(self._data)
        self._ids = np.arange(n_vocab, dtype=np.int32)
        self._array = _lib.llama_token_data_array(self._data, n_vocab, -1, False)
        self._pieces = pieces
        self._non_ascii = (
            None if pieces is None else np.fromiter((not p.isascii() for p in pieces), bool, len(pieces))
        )
        self._pending = b""  # bytes of a multi-byte character not yet complete

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A float32 copy of `logits` with the tokens the grammar rejects set to -inf.

        Raises GrammarError when the grammar accepts no token at all (a dead end: only possible
        with a grammar that cannot be completed).
        """
        view = self._view
        view["id"] = self._ids
        view["logit"] = logits
        view["p"] = 0.0
        self._array.data = self._data
        self._array.size = self.n_vocab
        self._array.selected = -1
        self._array.sorted = False
        _lib.llama_sampler_apply(self._smpl, ctypes.byref(self._array))
        n = int(self._array.size)
        out = np.full(self.n_vocab, -np.inf, dtype=np.float32)
        out[view["id"][:n]] = view["logit"][:n]
        if self._pieces is not None:
            self._mask_invalid_utf8(out)
        if not np.isfinite(out).any():
            raise GrammarError("the grammar accepts no token here (it cannot be completed)")
        return out

    def _mask_invalid_utf8(self, out: np.ndarray) -> None:
        allowed = np.isfinite(out)
        if not self._pending:
            allowed &= self._non_ascii  # ASCII after a complete character is always valid
        for tok in np.flatnonzero(allowed):
            if not _valid_utf8_prefix(self._pending + self._pieces[tok]):
                out[tok] = -np.inf

    def accept(self, token: int) -> None:
        _lib.llama_sampler_accept(self._smpl, int(token))
        if self._pieces is not None and 0 <= token < len(self._pieces):
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            decoder.decode(self._pending + self._pieces[token], final=False)
            self._pending = decoder.getstate()[0]

    def free(self) -> None:
        if self._smpl is not None:
            _lib.llama_sampler_free(self._smpl)
            self._smpl = None

    def __del__(self) -> None:
        if getattr(self, "_smpl", None) is not None and _lib is not None:
            self.free()


__all__ = ["GrammarConstraint", "GrammarError", "any_json_grammar", "json_schema_grammar"]


def _valid_utf8_prefix(data: bytes) -> bool:
    """Whether `data` is valid UTF-8 or a valid start of it (strict: no overlong forms, no
    surrogates, nothing above U+10FFFF)."""
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(data, final=False)
    except UnicodeDecodeError:
        return False
    return True
