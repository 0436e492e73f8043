"""GGUF writer: tiny llama / phi3 / qwen2 models written by us, run by llama.cpp, compared with torch.

Models are built from configs (hidden 256, FFN 512/768: k-quant friendly) with tokenizers trained
here with `tokenizers`. Weights are re-initialised (HF's default init gives near-flat logits), and
the output layer is then fitted by least squares to the next tokens of a small synthetic corpus:
a random model's top-2 logits are almost tied everywhere, so any quantization flips them, while a
trained LM's are not. The ridge readout gives the peaked logits of a trained model in ~1 s,
without a training loop; top-1 agreement and KL are measured on prompts from that corpus plus
odd strings.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from eyecare_edge.export.gguf_eval import (
    llama_cpp_logits,
    llama_cpp_tokenize,
    max_abs_diff,
    mean_kl,
    top1_agreement,
)
from eyecare_edge.export.gguf_quantize import KNOWN_QTYPES, ftype_for, gguf_tensor_types, quantize_gguf
from eyecare_edge.export.gguf_vocab import BYTE, CONTROL, UNUSED, bpe_pre_tokenizer_name
from eyecare_edge.export.gguf_writer import write_llm_gguf
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from eyecare_edge.gguf_header import read_gguf_header, tensor_bytes

SP = "\u2581"
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# Strings whose ids llama.cpp must reproduce: specials, <image>, unicode, digits, whitespace runs.
ODD_STRINGS = [
    "<|im_start|>user\nDescribe the <image> please.<|im_end|>\n<|im_start|>assistant\n",
    "digits 1234567 and 3.14159, 2025-06-01",
    "  leading and trailing spaces   ",
    "tabs\tand\t\tnewlines\n\n\nend",
    "a  b   c    d     e",
    "café naïve résumé Ærø 視神經乳頭 🚀👁️ µm",
    "I'll say it's DONE, they've REALLY gone",
    "<image>\n<image>",
]

FINDINGS = [
    "drusen",
    "haemorrhages",
    "cotton wool spots",
    "subretinal fluid",
    "a pale optic disc",
    "microaneurysms",
]
PLACES = ["near the macula", "in the superior arcade", "temporal to the fovea", "around the optic disc"]


def _report(rng: random.Random, user: str, assistant: str, end: str) -> str:
    return (
        f"{user}Describe the <image> for me.{end}{assistant}The fundus shows {rng.choice(FINDINGS)} "
        f"{rng.choice(PLACES)}, cup-to-disc ratio 0.{rng.randint(1, 9)}, IOP {rng.randint(10, 30)} mmHg.{end}"
    )


def chatml_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [_report(rng, "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>\n") for _ in range(n)]


def phi3_sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [_report(rng, "<|user|>\n", "<|assistant|>\n", "<|end|>\n") for _ in range(n)]


def _training_text() -> list[str]:
    return chatml_sentences(200, 1) + phi3_sentences(200, 2) + ODD_STRINGS * 3


# ---------------------------------------------------------------- tokenizers


def bytelevel_tokenizer(style: str, vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """Byte-level BPE with ChatML specials + <image>, in one of the pre-tokenizer styles llama.cpp names."""
    tok = Tokenizer(models.BPE())
    if style == "gpt-2":  # our `tiny` preset: GPT-2 ByteLevel
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    elif style == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    elif style in ("qwen2", "llama-bpe"):
        split = QWEN2_SPLIT if style == "qwen2" else LLAMA3_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise AssertionError(style)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CHATML_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer)
    tok.add_special_tokens(["<image>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )


def spm_tokenizer(vocab_size: int = 500) -> PreTrainedTokenizerFast:
    """Phi-3-style tokenizer: BPE with byte fallback, '▁' for spaces, merges listing every split (as HF's SentencePiece conversion does)."""
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Sequence([normalizers.Prepend(SP), normalizers.Replace(" ", SP)])
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="never")
    learner.train_from_iterator(
        _training_text(), trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    )
    specials = ("<unk>", "<s>", "</s>")
    vocab = {piece: i for i, piece in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for piece, _ in sorted(learner.get_vocab().items(), key=lambda kv: kv[1]):
        vocab.setdefault(piece, len(vocab))
    merges = [
        (piece[:k], piece[k:])
        for piece in vocab
        if piece not in specials and not BYTE_PIECE.fullmatch(piece)
        for k in range(1, len(piece))
        if piece[:k] in vocab and piece[k:] in vocab
    ]
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SP), normalizers.Replace(" ", SP)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SP, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(
        ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<image>"]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
    )


# ---------------------------------------------------------------- models


def _rows(tokenizer: PreTrainedTokenizerFast) -> int:
    """Embedding rows: the tokenizer size rounded up to 64, so vocabulary padding is exercised."""
    return (len(tokenizer) + 63) // 64 * 64


def build_model(
    arch: str, tokenizer: PreTrainedTokenizerFast, *, tied: bool = False, seed: int = 0
) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(
        vocab_size=_rows(tokenizer),
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(intermediate_size=512, max_position_embeddings=1024, **common))
    elif arch == "llama-rope-llama3":
        rope = {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        model = LlamaForCausalLM(
            LlamaConfig(intermediate_size=512, max_position_embeddings=1024, rope_parameters=rope, **common)
        )
    elif arch == "phi3":
        head_dim = 64
        gen = torch.Generator().manual_seed(seed)
        rope = {
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "short_factor": (1.0 + 0.5 * torch.rand(head_dim // 2, generator=gen)).tolist(),
            "long_factor": (1.0 + 7.0 * torch.rand(head_dim // 2, generator=gen)).tolist(),
            # >= 256: llama.cpp rounds n_ctx up to a multiple of 256 before choosing short/long factors.
            "original_max_position_embeddings": 256,
        }
        model = Phi3ForCausalLM(
            Phi3Config(
                intermediate_size=768,
                max_position_embeddings=1024,
                original_max_position_embeddings=256,
                rope_parameters=rope,
                **common,
            )
        )
    elif arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(intermediate_size=768, max_position_embeddings=1024, **common))
    else:
        raise AssertionError(arch)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            elif param.ndim == 1:  # qwen2 q/k/v biases
                param.normal_(0.0, 0.5)
            else:
                param.normal_(0.0, 0.08)
    model.eval()
    if not tied:
        fit_readout(model, tokenizer)
    return model


def corpus_for(tokenizer: PreTrainedTokenizerFast, n: int, seed: int) -> list[str]:
    return phi3_sentences(n, seed) if "<|user|>" in tokenizer.get_added_vocab() else chatml_sentences(n, seed)


def fit_readout(model: torch.nn.Module, tokenizer: PreTrainedTokenizerFast) -> None:
    """Least-squares output layer mapping final hidden states to their next tokens (see module doc)."""
    batch = [tokenizer(text)["input_ids"] for text in corpus_for(tokenizer, 96, seed=10)]
    length = max(len(ids) for ids in batch)
    x = torch.tensor([ids + [0] * (length - len(ids)) for ids in batch])
    with torch.no_grad():
        hidden = model.model(x).last_hidden_state.double()
    feats = torch.cat([hidden[i, : len(ids) - 1] for i, ids in enumerate(batch)])
    nexts = torch.cat([torch.tensor(ids[1:]) for ids in batch])
    target = torch.full((len(nexts), model.config.vocab_size), -1.0, dtype=torch.float64)
    target[torch.arange(len(nexts)), nexts] = 4.0
    gram = feats.T @ feats + 0.1 * torch.eye(feats.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(gram, feats.T @ target).T
    with torch.no_grad():
        model.lm_head.weight.copy_(weight.float())


def torch_logits(model: torch.nn.Module, prompts: list[list[int]]) -> list[np.ndarray]:
    with torch.no_grad():
        return [model(torch.tensor([ids])).logits[0].float().numpy() for ids in prompts]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The test machine's cores are shared: one thread avoids oversubscription stalls (~15x here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@dataclass
class Exported:
    arch: str
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerFast
    f32: Path
    prompts: list[list[int]]
    reference: list[np.ndarray]


TOKENIZER_FOR = {"llama": "gpt-2", "llama-rope-llama3": "gpt-2", "qwen2": "qwen2", "phi3": "spm"}


def _tokenizer(kind: str) -> PreTrainedTokenizerFast:
    return spm_tokenizer() if kind == "spm" else bytelevel_tokenizer(kind)


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Exported]:
    cache: dict[str, Exported] = {}

    def get(arch: str) -> Exported:
        if arch not in cache:
            tokenizer = _tokenizer(TOKENIZER_FOR[arch])
            model = build_model(arch, tokenizer)
            out = tmp_path_factory.mktemp(arch) / f"{arch}-f32.gguf"
            write_llm_gguf(model, tokenizer, out, out_type="f32", name="eyecare-test")
            texts = corpus_for(tokenizer, 6, seed=99) + ODD_STRINGS
            prompts = [tokenizer(text)["input_ids"] for text in texts]
            cache[arch] = Exported(arch, model, tokenizer, out, prompts, torch_logits(model, prompts))
        return cache[arch]

    return get


def _llama(path: Path, prompts: list[list[int]], **kw) -> list[np.ndarray]:
    return llama_cpp_logits(path, prompts, n_threads=1, **kw)


ARCHS = ["llama", "phi3", "qwen2"]


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("arch", [*ARCHS, "llama-rope-llama3"])
def test_f32_logits_match_torch(exported, arch):
    ex = exported(arch)
    got = _llama(ex.f32, ex.prompts)
    diff = max_abs_diff(ex.reference, got)
    print(
        f"\n[{arch}] F32 max|diff| = {diff:.2e} (logit scale {max(np.abs(r).max() for r in ex.reference):.1f})"
    )
    assert diff < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_f16_logits_close(exported, arch, tmp_path):
    ex = exported(arch)
    path = write_llm_gguf(
        ex.model, ex.tokenizer, tmp_path / "f16.gguf", out_type="f16", name="eyecare-test"
    ).path
    types = set(gguf_tensor_types(path).values())
    assert types == {"F16", "F32"}
    got = _llama(path, ex.prompts)
    diff = max_abs_diff(ex.reference, got)
    agree = top1_agreement(ex.reference, got)
    print(f"\n[{arch}] F16 max|diff| = {diff:.2e}, top-1 agreement {agree:.4f}")
    assert diff < 0.05
    assert agree >= 0.99


def test_bf16_logits_close(exported, tmp_path):
    ex = exported("llama")
    path = write_llm_gguf(
        ex.model, ex.tokenizer, tmp_path / "bf16.gguf", out_type="bf16", name="eyecare-test"
    ).path
    assert set(gguf_tensor_types(path).values()) == {"BF16", "F32"}
    got = _llama(path, ex.prompts)
    diff, agree = max_abs_diff(ex.reference, got), top1_agreement(ex.reference, got)
    print(f"\n[llama] BF16 max|diff| = {diff:.2e}, top-1 agreement {agree:.4f}")
    assert diff < 0.2
    assert agree >= 0.98


@pytest.mark.parametrize("arch", ARCHS)
def test_q8_0_top1_agreement(exported, arch, tmp_path):
    ex = exported(arch)
    q8 = quantize_gguf(ex.f32, tmp_path / "q8_0.gguf", "q8_0", n_threads=1)
    assert "Q8_0" in set(gguf_tensor_types(q8).values())
    got = _llama(q8, ex.prompts)
    agree, kl = top1_agreement(ex.reference, got), mean_kl(ex.reference, got)
    print(f"\n[{arch}] Q8_0 top-1 agreement {agree:.4f}, mean KL {kl:.2e}")
    assert agree >= 0.95
    assert kl < 0.01


@pytest.mark.parametrize("arch", ARCHS)
def test_q4_k_m_contains_q4_k_and_error_is_bounded(exported, arch, tmp_path):
    ex = exported(arch)
    q4 = quantize_gguf(ex.f32, tmp_path / "q4_k_m.gguf", "Q4_K_M", n_threads=1)
    types = gguf_tensor_types(q4)
    n_q4k = sum(t == "Q4_K" for t in types.values())
    assert n_q4k >= 4, types
    assert all(types[n] == "F32" for n in types if n.endswith("norm.weight"))
    got = _llama(q4, ex.prompts)
    agree, kl = top1_agreement(ex.reference, got), mean_kl(ex.reference, got)
    print(f"\n[{arch}] Q4_K_M: {n_q4k} Q4_K tensors, top-1 agreement {agree:.4f}, mean KL {kl:.3f}")
    # 4-bit: an error bound, not exact tokens (Q4_K_M vs F16 on real LLMs: KL ~0.03).
    assert agree >= 0.80
    assert kl < 0.1


# ---------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_tokenizes_like_hf(exported, arch):
    ex = exported(arch)
    texts = [*ODD_STRINGS, *corpus_for(ex.tokenizer, 4, seed=5)]
    if arch == "phi3":
        texts += ["<|user|>\nHi<|end|>\n<|assistant|>\n", "<s>start </s>"]
    ours = llama_cpp_tokenize(ex.f32, texts)
    for text, ids in zip(texts, ours, strict=True):
        assert ids == ex.tokenizer(text, add_special_tokens=False)["input_ids"], text


@pytest.mark.parametrize("style", ["gpt-2", "smollm", "qwen2", "llama-bpe"])
def test_bytelevel_pre_tokenizer_styles(style, tmp_path):
    tokenizer = bytelevel_tokenizer(style, vocab_size=400)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=_rows(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    path = write_llm_gguf(LlamaForCausalLM(config), tokenizer, tmp_path / "m.gguf").path
    reader = gguf.GGUFReader(path)
    assert reader.get_field("tokenizer.ggml.pre").contents() == style
    assert reader.get_field("tokenizer.ggml.model").contents() == "gpt2"
    for text, ids in zip(ODD_STRINGS, llama_cpp_tokenize(path, ODD_STRINGS), strict=True):
        assert ids == tokenizer(text, add_special_tokens=False)["input_ids"], (style, text)


def test_vocab_metadata(exported):
    ex = exported("llama")
    reader = gguf.GGUFReader(ex.f32)
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    rows = ex.model.get_input_embeddings().weight.shape[0]
    assert len(tokens) == len(types) == rows > len(ex.tokenizer)
    assert all(t == UNUSED for t in types[len(ex.tokenizer) :])
    vocab = ex.tokenizer.get_vocab()
    for special in [*CHATML_SPECIALS, "<image>"]:
        assert types[vocab[special]] == CONTROL
        assert tokens[vocab[special]] == special
    assert reader.get_field("tokenizer.ggml.eos_token_id").contents() == vocab["<|im_end|>"]
    assert reader.get_field("tokenizer.ggml.add_bos_token").contents() is False
    assert reader.get_field("general.name").contents() == "eyecare-test"


def test_spm_vocab_metadata(exported):
    ex = exported("phi3")
    reader = gguf.GGUFReader(ex.f32)
    assert reader.get_field("tokenizer.ggml.model").contents() == "llama"
    types = reader.get_field("tokenizer.ggml.token_type").contents()
    assert [types[i] for i in range(3, 259)] == [BYTE] * 256
    assert reader.get_field("tokenizer.ggml.add_space_prefix").contents() is True
    assert len(reader.get_field("tokenizer.ggml.scores").contents()) == len(types)


def test_chat_template_written(tmp_path):
    tokenizer = bytelevel_tokenizer("gpt-2", vocab_size=300)
    config = LlamaConfig(
        vocab_size=_rows(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    path = write_llm_gguf(
        LlamaForCausalLM(config), tokenizer, tmp_path / "m.gguf", chat_template=template
    ).path
    assert gguf.GGUFReader(path).get_field("tokenizer.chat_template").contents() == template


# ---------------------------------------------------------------- phi3 / rope / tied


def test_phi3_longrope_metadata(exported):
    ex = exported("phi3")
    reader = gguf.GGUFReader(ex.f32)
    rope = ex.model.config.rope_parameters
    tensors = {t.name: t for t in reader.tensors}
    np.testing.assert_allclose(tensors["rope_factors_short.weight"].data, rope["short_factor"], rtol=1e-6)
    np.testing.assert_allclose(tensors["rope_factors_long.weight"].data, rope["long_factor"], rtol=1e-6)
    assert reader.get_field("phi3.rope.scaling.original_context_length").contents() == 256
    attn = reader.get_field("phi3.rope.scaling.attn_factor").contents()
    assert attn == pytest.approx(float(np.sqrt(1 + np.log(1024 / 256) / np.log(256))), rel=1e-6)
    assert "blk.0.attn_qkv.weight" in tensors
    assert tuple(tensors["blk.0.ffn_up.weight"].shape) == (256, 2 * 768)  # fused gate_up


def test_phi3_long_factor_regime_matches_when_both_switch(exported):
    """Past the original context HF switches to the long factors by sequence length, llama.cpp by n_ctx.

    With a prompt longer than 256 tokens and n_ctx 512 both use the long factors and agree.
    """
    ex = exported("phi3")
    ids = [tok for text in phi3_sentences(20, seed=7) for tok in ex.tokenizer(text)["input_ids"]][:300]
    assert len(ids) == 300
    reference = torch_logits(ex.model, [ids])
    diff = max_abs_diff(reference, _llama(ex.f32, [ids], n_ctx=512))
    print(f"\n[phi3] long-factor regime F32 max|diff| = {diff:.2e}")
    assert diff < 1e-4


def test_tied_embeddings_write_no_output_tensor(tmp_path):
    tokenizer = bytelevel_tokenizer("qwen2", vocab_size=400)
    model = build_model("qwen2", tokenizer, tied=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    path = write_llm_gguf(model, tokenizer, tmp_path / "tied.gguf").path
    names = set(gguf_tensor_types(path))
    assert "output.weight" not in names and "token_embd.weight" in names
    prompts = [tokenizer(t)["input_ids"] for t in ODD_STRINGS[:4]]
    assert max_abs_diff(torch_logits(model, prompts), _llama(path, prompts)) < 1e-4


# ---------------------------------------------------------------- bad input


def test_general_name_containing_phi3_is_refused(exported, tmp_path):
    ex = exported("phi3")
    for name in ("eyecare-phi3-mini", "Phi-3.5-mini"):
        with pytest.raises(ValueError, match="phi3"):
            write_llm_gguf(ex.model, ex.tokenizer, tmp_path / "x.gguf", name=name)
    assert not (tmp_path / "x.gguf").exists()


def test_unsupported_model_type_is_refused(tmp_path):
    tokenizer = bytelevel_tokenizer("gpt-2", vocab_size=300)
    config = MistralConfig(
        vocab_size=_rows(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    with pytest.raises(ValueError, match="'mistral'"):
        write_llm_gguf(MistralForCausalLM(config), tokenizer, tmp_path / "x.gguf")


def test_bad_out_type_and_small_embedding_are_refused(tmp_path):
    tokenizer = bytelevel_tokenizer("gpt-2", vocab_size=300)
    small = LlamaConfig(
        vocab_size=len(tokenizer) - 10,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    with pytest.raises(ValueError, match="embedding rows"):
        write_llm_gguf(LlamaForCausalLM(small), tokenizer, tmp_path / "x.gguf")
    ok = LlamaConfig(
        vocab_size=_rows(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    with pytest.raises(ValueError, match="out_type"):
        write_llm_gguf(LlamaForCausalLM(ok), tokenizer, tmp_path / "x.gguf", out_type="q4_k_m")


def test_unknown_pre_tokenizer_is_refused():
    with pytest.raises(ValueError, match="pre-tokenizer"):
        bpe_pre_tokenizer_name({"type": "Whitespace"})
    with pytest.raises(ValueError, match="pre-tokenizer"):
        bpe_pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True})
    assert (
        bpe_pre_tokenizer_name({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}) == "gpt-2"
    )


def test_quantize_type_names(tmp_path):
    assert ftype_for("Q4_K_M") == ftype_for("q4_k_m") == KNOWN_QTYPES["q4_k_m"]
    assert ftype_for("bf16") == KNOWN_QTYPES["bf16"]
    with pytest.raises(ValueError, match="q8_0"):  # the message lists the known names
        ftype_for("q3_z")
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        quantize_gguf(tmp_path / "missing.gguf", tmp_path / "out.gguf", "q8_0")
    with pytest.raises(FileNotFoundError, match=r"missing\.gguf"):
        gguf_tensor_types(tmp_path / "missing.gguf")


def test_header_reader_type_table_matches_gguf_package():
    # The runtime reader keeps its own copy of gguf's type table (the runtime lacks `gguf`).
    from eyecare_edge.gguf_header import GGML_TYPES, GGUF_DEFAULT_ALIGNMENT

    expected = {int(q): (q.name, *gguf.GGML_QUANT_SIZES[q]) for q in gguf.GGMLQuantizationType}
    assert expected == GGML_TYPES
    assert gguf.GGUF_DEFAULT_ALIGNMENT == GGUF_DEFAULT_ALIGNMENT


def test_header_reader_matches_gguf_reader(exported):
    ex = exported("phi3")
    header, reader = read_gguf_header(ex.f32), gguf.GGUFReader(ex.f32)
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert header.metadata[key] == pytest.approx(field.contents()), key
    assert list(header.tensors) == [t.name for t in reader.tensors]
    for tensor in reader.tensors:
        info = header.tensors[tensor.name]
        assert info.shape == tuple(int(d) for d in tensor.shape)
        assert info.type_name == tensor.tensor_type.name
        assert np.array_equal(tensor_bytes(ex.f32, info), np.asarray(tensor.data).view(np.uint8).reshape(-1))


# ---------------------------------------------------------------- KV cache on odd head sizes


def test_a_quantized_k_cache_on_heads_its_blocks_do_not_divide_is_refused_not_an_abort(exported, tmp_path):
    """llama.cpp aborts the process (GGML_ASSERT in ggml_view) when a Q8_0 K cache meets a head
    size that is not a multiple of 32. The context refuses such a model with the reason, or takes
    `kv_fallback` (the Pipeline's auto: F16); a head size of 64 keeps the Q8_0 K."""
    from eyecare_edge.llm import LlamaCppLM, LLMError, LLMOptions

    tokenizer = _tokenizer("gpt-2")
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=_rows(tokenizer),
            hidden_size=240,
            num_hidden_layers=1,
            num_attention_heads=3,  # head size 80
            num_key_value_heads=3,
            intermediate_size=256,
            max_position_embeddings=512,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    path = tmp_path / "head80-f32.gguf"
    write_llm_gguf(model, tokenizer, path, out_type="f32", name="eyecare-test")
    base = dict(n_ctx=256, n_threads=1)
    for asked in (dict(kv_type="q8_0/f16"), dict(kv_type="q8_0", flash_attn=True)):
        with pytest.raises(LLMError, match=r"head size \(80\); use kv_type 'f16'"):
            LlamaCppLM(path, LLMOptions(**base, **asked))
    with LlamaCppLM(path, LLMOptions(**base, kv_type="q8_0/f16", kv_fallback="f16")) as lm:
        assert lm.options.kv_type == "f16"
        assert len(lm.generate(4, prompt=["hello there"]).tokens) >= 1
    with LlamaCppLM(exported("llama").f32, LLMOptions(**base, kv_type="q8_0/f16", kv_fallback="f16")) as lm:
        assert lm.options.kv_type == "q8_0/f16"  # head size 64: two Q8_0 blocks
