"""Grammar-constrained sampling and the cross-request image-prefix cache, on the trained tiny
bundle of `runtime_fixtures` (real llama.cpp, real ONNX Runtime)."""

from __future__ import annotations

import json

import pytest
from runtime_fixtures import FAST, runtime_assets

from eyecare_edge.grammar import GrammarError, json_schema_grammar
from eyecare_edge.llm import LLMError
from eyecare_edge.pipeline import Pipeline
from eyecare_edge.prefix_cache import PrefixCache, PrefixState

QUESTIONS = ["Describe the image.", "What is the diagnosis?", "Write the examination report."]
SCHEMA = {
    "type": "object",
    "properties": {
        "finding": {"type": "string", "enum": ["normal", "glaucoma", "diabetic retinopathy"]},
        "severity": {"type": "integer", "minimum": 0, "maximum": 4},
        "urgent": {"type": "boolean"},
    },
    "required": ["finding", "severity", "urgent"],
}
OPTIONS = {"llm": "f32", "vision_precision": "fp32", **FAST}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return runtime_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(assets):
    """Answers of a pipeline without a prefix cache (each image evaluated afresh)."""
    with Pipeline.load(assets.bundle, **OPTIONS) as pipe:
        return {
            (i, q): pipe.ask(img, q, max_tokens=24).text
            for i, img in enumerate(assets.images[:3])
            for q in QUESTIONS
        }


def _state(n: int) -> PrefixState:
    return PrefixState(bytearray(n), n_past=n, n_image_tokens=0)


def test_prefix_cache_is_lru_by_bytes():
    cache = PrefixCache(100)
    assert cache.put("a", _state(40)) and cache.put("b", _state(40))
    assert cache.get("a") is not None  # a is now the most recent
    assert cache.put("c", _state(40))  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.nbytes == 80 and len(cache) == 2
    assert not cache.put("huge", _state(101))  # larger than the budget: not kept, nothing evicted
    assert len(cache) == 2
    assert cache.put("a", _state(10))  # replacing an entry frees its old bytes
    assert cache.nbytes == 50
    assert cache.stats() == {
        "entries": 2,
        "bytes": 50,
        "max_bytes": 100,
        "hits": 3,
        "misses": 1,
        "evictions": 1,
    }
    with pytest.raises(ValueError):
        PrefixCache(-1)


def test_restored_prefixes_answer_exactly_like_fresh_ones(assets, reference):
    """Interleaved images (the case the KV's last prefix cannot serve) answer from the cache,
    identically, in this pipeline and in a second one sharing the cache."""
    cache = PrefixCache(64 << 20)
    images = assets.images[:3]
    with Pipeline.load(assets.bundle, **OPTIONS) as one, Pipeline.load(assets.bundle, **OPTIONS) as two:
        one.prefix_cache = two.prefix_cache = cache
        for q in QUESTIONS:
            for i, img in enumerate(images):
                answer = one.ask(img, q, max_tokens=24)
                assert answer.text == reference[(i, q)], (i, q)
                assert answer.cached_prefix == (q != QUESTIONS[0])
                if answer.cached_prefix:
                    assert answer.timings["vision_ms"] == 0.0 and "restore_ms" in answer.timings
        assert len(cache) == 3 and cache.hits == 6
        for i, img in enumerate(images):  # saved by `one`, restored by `two`
            answer = two.ask(img, QUESTIONS[1], max_tokens=24)
            assert answer.cached_prefix and answer.text == reference[(i, QUESTIONS[1])]
    # A pipeline with other settings (f32 KV) shares the cache object but none of its entries.
    with Pipeline.load(assets.bundle, kv_type="f32", **OPTIONS) as other:
        other.prefix_cache = cache
        misses = cache.misses
        answer = other.ask(images[0], QUESTIONS[0], max_tokens=24)
        assert not answer.cached_prefix and cache.misses == misses + 1


def test_json_schema_answers_parse_and_follow_the_schema(assets):
    grammar = json_schema_grammar(SCHEMA)
    with Pipeline.load(assets.bundle, **OPTIONS) as pipe:
        for i, img in enumerate(assets.images[:4]):
            for kwargs in ({}, {"temperature": 1.0, "top_p": 0.9, "seed": i}):
                answer = pipe.ask(img, QUESTIONS[0], max_tokens=80, grammar=grammar, **kwargs)
                assert answer.stop_reason == "eog", answer
                value = json.loads(answer.text)
                assert set(value) == {"finding", "severity", "urgent"}
                assert value["finding"] in SCHEMA["properties"]["finding"]["enum"]
                assert 0 <= value["severity"] <= 4 and isinstance(value["urgent"], bool)
        # Same seed, same constrained text; a plain GBNF grammar works too.
        a = pipe.ask(assets.images[0], QUESTIONS[0], max_tokens=80, grammar=grammar, temperature=1.0, seed=3)
        b = pipe.ask(assets.images[0], QUESTIONS[0], max_tokens=80, grammar=grammar, temperature=1.0, seed=3)
        assert a.text == b.text
        yes_no = pipe.ask(assets.images[0], QUESTIONS[1], max_tokens=8, grammar='root ::= "yes" | "no"')
        assert yes_no.text in ("yes", "no")
        # Unconstrained answers are unchanged by the feature.
        plain = pipe.ask(assets.images[0], QUESTIONS[0], max_tokens=24)
        with pytest.raises(LLMError, match="grammar"):
            pipe.ask(assets.images[0], QUESTIONS[0], grammar="root ::= nonsense (")
        assert pipe.ask(assets.images[0], QUESTIONS[0], max_tokens=24).text == plain.text


def test_numeric_bounds_are_enforced_or_refused():
    """llama-cpp-python's converter ignores numeric bounds: small integer ranges become enums,
    other bounds are refused rather than silently not enforced."""
    g = json_schema_grammar({"type": "integer", "minimum": 1, "exclusiveMaximum": 4})
    assert '"1" | "2" | "3"' in g and '"4"' not in g
    g = json_schema_grammar({"type": "integer", "minimum": 0, "maximum": 10, "multipleOf": 5})
    assert '"0" | "5" | "10"' in g
    for bad in (
        {"type": "number", "minimum": 0},
        {"type": "integer", "minimum": 0},
        {"type": "integer", "minimum": 0, "maximum": 10_000},
    ):
        with pytest.raises(GrammarError, match="cannot be enforced"):
            json_schema_grammar({"type": "object", "properties": {"x": bad}})
    # A property *named* like a keyword is a name, not a bound.
    assert "minimum-kv" in json_schema_grammar({"type": "object", "properties": {"minimum": {"type": "string"}}})


def test_bad_schemas_and_states_are_refused(assets):
    with pytest.raises(GrammarError, match="object"):
        json_schema_grammar("[1, 2]")
    with pytest.raises(GrammarError, match="not valid JSON"):
        json_schema_grammar("{nope")
    with Pipeline.load(assets.bundle, **OPTIONS) as pipe:
        with pytest.raises(LLMError, match="could not restore"):
            pipe.lm.load_state(bytearray(b"\x00" * 64), 10)
        assert pipe.lm.n_past == 0
        pipe.ask(assets.images[0], QUESTIONS[0], max_tokens=4)
        blob, n = pipe.lm.save_state(), pipe.lm.n_past
        pipe.lm.reset()
        pipe.lm.load_state(blob, n)
        assert pipe.lm.n_past == n


def test_grammar_never_lets_overlong_utf8_through(assets):
    """llama.cpp's matcher takes F0 86 as a possible start of U+6B63 ("正", E6 AD A3), which an
    enum holding "🙂 ..." and "正..." lets through at the same position: the text then held four
    U+FFFD. After a 0xF0 lead byte, only 0x90-0xBF may follow; the guard masks the rest."""
    import codecs

    import numpy as np

    from eyecare_edge.grammar import GrammarConstraint, _valid_utf8_prefix

    assert not _valid_utf8_prefix(b"\xf0\x86") and _valid_utf8_prefix(b"\xf0\x9f") and _valid_utf8_prefix(b"\xe6\xad")
    gbnf = r'root ::= "\"" ( "\U0001F642 ok" | "\u6b63\u5e38" ) "\""'
    with Pipeline.load(assets.bundle, **OPTIONS) as pipe:
        lm = pipe.lm
        pieces = lm._core.token_pieces()
        byte_token = {p[0]: t for t, p in enumerate(pieces) if len(p) == 1}
        if 0xF0 not in byte_token or 0x86 not in byte_token:
            pytest.skip("this vocabulary has no single-byte tokens for the case")
        for guard in (pieces,):  # (with guard=None, llama.cpp 0.3.36 alone allows F0 86)
            c = GrammarConstraint(lm._core.vocab, gbnf, lm.n_vocab, pieces=guard)
            try:
                for tok in (pieces.index(b'"'), byte_token[0xF0]):
                    c.accept(tok)
                allowed = np.isfinite(c.mask(np.zeros(lm.n_vocab, np.float32)))
                decoder = codecs.getincrementaldecoder("utf-8")("strict")
                bad = [t for t in np.flatnonzero(allowed) if not _valid_utf8_prefix(b"\xf0" + pieces[t])]
                assert not bad and not allowed[byte_token[0x86]] and allowed[byte_token[0x9F]]
                assert decoder.decode(b"\xf0\x9f") == ""  # a valid start, still open
            finally:
                c.free()
