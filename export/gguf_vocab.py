"""HF tokenizer -> llama.cpp tokenizer metadata (the `tokenizer.ggml.*` keys of a GGUF).

A GGUF carries its own tokenizer, and the runtime tokenizes prompts with it (llama.cpp), while
training tokenized with the HF tokenizer. Both must give the same ids, so this module reads the
tokenizer's own definition (`tokenizer.json`, via `backend_tokenizer`) rather than guessing:

* byte-level BPE (GPT-2, SmolLM2, Qwen2, Llama-3, our `tiny` preset) -> llama.cpp model `gpt2`
  with merges; llama.cpp cannot run an arbitrary pre-tokenizer regex, it knows a fixed list of
  named ones (`tokenizer.ggml.pre`), so the HF pre-tokenizer is matched against a small table of
  the ones we support and anything else is refused (silently picking a near miss would give
  different token ids on some text, which no later test might notice).
* BPE with byte fallback and a `▁` space marker (Phi-3 / Phi-3.5, Llama-2 style) -> llama.cpp
  model `llama` (SentencePiece). llama.cpp's SPM tokenizer merges by token score, not by merge
  rank, so scores are derived from the merge ranks (earlier merge -> higher score).

Vocabulary rows the model has beyond the tokenizer (Phi-3.5: 32064 rows, 32011 tokens) are
filled with `[PAD<i>]` tokens of type UNUSED, as llama.cpp requires one token per row.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gguf

# llama.cpp token types (gguf.TokenType), as plain ints for the GGUF array.
NORMAL = int(gguf.TokenType.NORMAL)
UNKNOWN = int(gguf.TokenType.UNKNOWN)
CONTROL = int(gguf.TokenType.CONTROL)
USER_DEFINED = int(gguf.TokenType.USER_DEFINED)
UNUSED = int(gguf.TokenType.UNUSED)
BYTE = int(gguf.TokenType.BYTE)

# The split regexes of the pre-tokenizers llama.cpp knows by name (`llama-vocab.cpp`). Written
# here as the HF `tokenizer.json` spells them, so a tokenizer is matched on its own definition.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Canonical pre-tokenizer signature -> llama.cpp `tokenizer.ggml.pre`.
#   ("bytelevel",)                      ByteLevel(use_regex=True): the GPT-2 regex
#   ("digits", "bytelevel")             Digits(individual) then ByteLevel(use_regex=True)
#   ("split:<regex>", "bytelevel-raw")  Split(regex, isolated) then ByteLevel(use_regex=False)
BPE_PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    ("bytelevel",): "gpt-2",
    ("split:" + _GPT2_REGEX, "bytelevel-raw"): "gpt-2",
    ("digits", "bytelevel"): "smollm",
    ("split:" + _QWEN2_REGEX, "bytelevel-raw"): "qwen2",
    ("split:" + _LLAMA3_REGEX, "bytelevel-raw"): "llama-bpe",
}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_SPACE_MARK = "\u2581"  # ▁, SentencePiece's visible space


@dataclass(frozen=True)
class GgufVocab:
    """Everything llama.cpp needs to tokenize exactly like the HF tokenizer."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str  # tokenizer.ggml.pre
    tokens: list[str]  # one per embedding row
    token_types: list[int]
    scores: list[float] | None  # SentencePiece-style only
    merges: list[str] | None  # byte-level BPE only, "a b" per merge, rank order
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | list[dict[str, str]] | None
    n_tokenizer: int  # tokens the tokenizer defines; the rest are padding

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    """The `tokenizer.json` document behind a fast HF tokenizer (the single source of truth)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no `backend_tokenizer`: the GGUF writer needs a fast "
            "(tokenizers-backed) tokenizer, e.g. AutoTokenizer.from_pretrained(...) or "
            "PreTrainedTokenizerFast(tokenizer_object=...)"
        )
    return json.loads(backend.to_str())


def _pre_tokenizer_signature(pre: dict[str, Any] | None) -> tuple[str, ...]:
    """Flatten an HF pre-tokenizer definition into the canonical form used by BPE_PRE_TOKENIZERS."""
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(part for sub in pre.get("pretokenizers", []) for part in _pre_tokenizer_signature(sub))
    if kind == "ByteLevel":
        if pre.get("add_prefix_space", False):
            # llama.cpp never inserts a leading space for byte-level BPE.
            return ("bytelevel+prefix",)
        return ("bytelevel",) if pre.get("use_regex", True) else ("bytelevel-raw",)
    if kind == "Digits":
        return ("digits",) if pre.get("individual_digits", False) else ("digits-grouped",)
    if kind == "Split":
        pattern = pre.get("pattern", {})
        regex = pattern.get("Regex", pattern.get("String"))
        behavior = str(pre.get("behavior", "")).lower()
        if behavior != "isolated" or pre.get("invert", False):
            return (f"split[{behavior},invert={pre.get('invert', False)}]:{regex}",)
        return (f"split:{regex}",)
    return (f"{kind}:{json.dumps(pre, sort_keys=True)}",)


def bpe_pre_tokenizer_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for an HF byte-level pre-tokenizer definition.

    Raises ValueError naming the definition when llama.cpp has no equivalent we know of.
    """
    signature = _pre_tokenizer_signature(pre_tokenizer)
    name = BPE_PRE_TOKENIZERS.get(signature)
    if name is None:
        known = sorted(set(BPE_PRE_TOKENIZERS.values()))
        raise ValueError(
            "unsupported byte-level BPE pre-tokenizer "
            f"{json.dumps(pre_tokenizer)[:400]}: llama.cpp identifies pre-tokenizers by name and this "
            f"definition matches none of the ones this writer knows ({', '.join(known)}). Add its "
            "llama.cpp name to export/gguf_vocab.py:BPE_PRE_TOKENIZERS only after checking that "
            "llama.cpp splits text the same way."
        )
    return name


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for merge in model.get("merges") or []:
        if isinstance(merge, str):
            left, sep, right = merge.partition(" ")
            if not sep:
                raise ValueError(f"malformed BPE merge {merge!r} in tokenizer.json")
        else:
            left, right = merge
        pairs.append((left, right))
    return pairs


def _probe_added_specials(tokenizer: Any, bos_id: int | None, eos_id: int | None) -> tuple[bool, bool]:
    """Whether encoding adds BOS / EOS, read off the tokenizer's behaviour (post-processor)."""
    backend = tokenizer.backend_tokenizer
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    add_bos = bos_id is not None and len(full) > len(plain) and full[0] == bos_id and plain[:1] != [bos_id]
    add_eos = eos_id is not None and len(full) > len(plain) and full[-1] == eos_id and plain[-1:] != [eos_id]
    return add_bos, add_eos


def _special_id(tokenizer: Any, attr: str) -> int | None:
    value = getattr(tokenizer, attr, None)
    return int(value) if value is not None else None


def _is_spm_style(doc: dict[str, Any]) -> bool:
    return bool(doc["model"].get("byte_fallback", False))


def _spm_add_space_prefix(doc: dict[str, Any]) -> bool:
    """Whether the tokenizer prepends `▁` to text, and check that it marks spaces with `▁`.

    llama.cpp's SentencePiece path always writes spaces as `▁`, and (with add_space_prefix) puts
    one `▁` in front of every text run, also after a special token -- what an HF `Prepend("▁")`
    normalizer does, as it runs on each run between added tokens.
    """
    normalizer = doc.get("normalizer") or {}
    parts = (
        normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    )
    prepend = any(p.get("type") == "Prepend" and p.get("prepend") == _SPACE_MARK for p in parts)
    replace = any(
        p.get("type") == "Replace"
        and p.get("content") == _SPACE_MARK
        and p.get("pattern", {}).get("String") == " "
        for p in parts
    )
    pre = doc.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("replacement", _SPACE_MARK) == _SPACE_MARK:
        replace = True
        prepend = prepend or pre.get("prepend_scheme", "always") in ("always", "first")
    elif pre:
        raise ValueError(
            f"unsupported pre-tokenizer {json.dumps(pre)[:300]} for a byte-fallback (SentencePiece-style) "
            "tokenizer: llama.cpp's SentencePiece tokenizer applies none"
        )
    if not replace:
        raise ValueError(
            "byte-fallback BPE tokenizer that does not mark spaces with '\u2581' (no Replace(' ', '\u2581') "
            "normalizer or Metaspace pre-tokenizer): llama.cpp's SentencePiece tokenizer would not match it"
        )
    return prepend


def _spm_scores(vocab: Mapping[str, int], pairs: list[tuple[str, str]], added: set[str]) -> dict[str, float]:
    """Token scores for llama.cpp's SentencePiece merge loop, from the HF merge ranks.

    llama.cpp repeatedly merges the adjacent pair whose concatenation is the vocabulary token with
    the highest score. Giving each merged token the negated rank of the first merge that makes it
    reproduces the HF BPE order when the merges list every split of a token (as tokenizers
    converted from SentencePiece do). A multi-character token no merge makes is never produced
    by HF but can be by llama.cpp; it gets the lowest score (used last) and a warning.
    """
    scores: dict[str, float] = {}
    for rank, (left, right) in enumerate(pairs):
        merged = left + right
        if merged in vocab and merged not in scores:
            scores[merged] = -float(rank + 1)
    orphans = [
        t for t in vocab if len(t) > 1 and t not in scores and t not in added and not _BYTE_TOKEN.fullmatch(t)
    ]
    if orphans:
        warnings.warn(
            f"{len(orphans)} multi-character tokens (e.g. {orphans[:5]}) are made by no BPE merge: HF never "
            "produces them, llama.cpp's SentencePiece tokenizer may",
            stacklevel=3,
        )
    for token in orphans:
        scores[token] = -float(len(pairs) + 1)
    return scores


def vocab_from_hf_tokenizer(tokenizer: Any, n_vocab: int, *, chat_template: str | None = None) -> GgufVocab:
    """Build the llama.cpp tokenizer metadata for `tokenizer`, padded to `n_vocab` rows."""
    doc = tokenizer_json(tokenizer)
    model = doc["model"]
    if model.get("type") != "BPE":
        raise ValueError(
            f"unsupported tokenizer model {model.get('type')!r}: the GGUF writer handles BPE tokenizers "
            "(byte-level like GPT-2/Qwen2/SmolLM2, or byte-fallback like Phi-3)"
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = sorted(doc.get("added_tokens") or [], key=lambda t: t["id"])
    id_to_text: dict[int, str] = {i: t for t, i in vocab.items()}
    for entry in added:
        id_to_text[int(entry["id"])] = entry["content"]
    n_tokenizer = max(id_to_text) + 1 if id_to_text else 0
    if n_tokenizer > n_vocab:
        raise ValueError(
            f"the tokenizer defines token id {n_tokenizer - 1} but the model has only {n_vocab} embedding rows; "
            "resize the model's embeddings (model.resize_token_embeddings) before exporting"
        )

    stripping = [e["content"] for e in added if e.get("lstrip") or e.get("rstrip")]
    if stripping:
        # llama.cpp reads no strip flags from a GGUF; such a token would eat neighbouring
        # whitespace in HF but not in llama.cpp, so prompts around it may tokenize differently.
        warnings.warn(
            f"added tokens {stripping[:8]} strip adjacent whitespace in the HF tokenizer (lstrip/rstrip); "
            "llama.cpp cannot store that flag, so text next to them may tokenize differently",
            stacklevel=2,
        )
    spm = _is_spm_style(doc)
    unk_text = model.get("unk_token")
    added_by_id = {int(e["id"]): e for e in added}
    pairs = _merge_pairs(model)
    spm_scores = _spm_scores(vocab, pairs, {e["content"] for e in added}) if spm else {}

    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] = []
    taken = set(id_to_text.values())
    for i in range(n_vocab):
        text = id_to_text.get(i)
        if text is None:
            pad = f"[PAD{i}]"
            while pad in taken:  # never shadow a real token's text
                pad = f"[{pad}]"
            tokens.append(pad)
            types.append(UNUSED)
            scores.append(-1000.0)
            continue
        entry = added_by_id.get(i)
        if entry is not None:
            kind = CONTROL if entry.get("special", False) else USER_DEFINED
            if spm and text == unk_text:
                kind = UNKNOWN
            score = 0.0
        elif spm and text == unk_text:
            kind, score = UNKNOWN, 0.0
        elif spm and _BYTE_TOKEN.fullmatch(text):
            kind, score = BYTE, 0.0
        else:
            kind, score = NORMAL, spm_scores.get(text, 0.0)
        tokens.append(text)
        types.append(kind)
        scores.append(score)

    bos_id = _special_id(tokenizer, "bos_token_id")
    eos_id = _special_id(tokenizer, "eos_token_id")
    add_bos, add_eos = _probe_added_specials(tokenizer, bos_id, eos_id)
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = [{"name": k, "template": v} for k, v in template.items()]

    if spm:
        add_space_prefix = _spm_add_space_prefix(doc)
        return GgufVocab(
            model="llama",
            pre="default",
            tokens=tokens,
            token_types=types,
            scores=scores,
            merges=None,
            bos_id=bos_id,
            eos_id=eos_id,
            unk_id=_special_id(tokenizer, "unk_token_id"),
            pad_id=_special_id(tokenizer, "pad_token_id"),
            add_bos=add_bos,
            add_eos=add_eos,
            add_space_prefix=add_space_prefix,
            chat_template=template,
            n_tokenizer=n_tokenizer,
        )

    pre_tokenizer = doc.get("pre_tokenizer")
    decoder = doc.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        raise ValueError(
            f"unsupported BPE tokenizer: decoder {decoder.get('type')!r} without byte fallback; the GGUF writer "
            "handles byte-level BPE (ByteLevel decoder) and SentencePiece-style BPE (byte_fallback=True)"
        )
    pre = bpe_pre_tokenizer_name(pre_tokenizer)
    for left, right in pairs:
        if " " in left or " " in right:
            raise ValueError(
                f"byte-level BPE merge ({left!r}, {right!r}) contains a raw space; cannot store it"
            )
    return GgufVocab(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        token_types=types,
        scores=None,
        merges=[f"{a} {b}" for a, b in pairs],
        bos_id=bos_id,
        eos_id=eos_id,
        unk_id=_special_id(tokenizer, "unk_token_id"),
        pad_id=_special_id(tokenizer, "pad_token_id"),
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=False,
        chat_template=template,
        n_tokenizer=n_tokenizer,
    )


def add_vocab_to_gguf(writer: gguf.GGUFWriter, vocab: GgufVocab) -> None:
    """Write the `tokenizer.ggml.*` / `tokenizer.chat_template` keys."""
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for value, add in (
        (vocab.bos_id, writer.add_bos_token_id),
        (vocab.eos_id, writer.add_eos_token_id),
        (vocab.unk_id, writer.add_unk_token_id),
        (vocab.pad_id, writer.add_pad_token_id),
    ):
        if value is not None:
            add(value)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
