"""The torch-free Pipeline against the PyTorch model it was exported from.

Parity (on a briefly trained tiny EyecareGPT, see runtime_fixtures.py): the visual token sequence
of FP32 ONNX + numpy layout equals the torch model's within 1e-4; greedy answers of FP32 ONNX +
F32 GGUF (F32 KV cache, no flash attention) equal `training.evaluate.generate_answer` on >= 98% of
the phantom bench items; on closed QA the model must first be shown to see (modality >= 90%, chance
33%), then FP32 + F32 chooses the reference's option on >= 98% and INT8 + Q4_K_M is within 2 points
of its accuracy; an unparseable answer never counts as agreement. KV reuse: five questions
about one image give exactly the answers of five fresh asks, faster. Plus the error paths and the
"no torch on import" rule.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from runtime_fixtures import FAST, copy_bundle, runtime_assets

from eyecare_edge.bundle import BundleError, add_file, read_manifest, write_manifest
from eyecare_edge.images import ImageError, load_image
from eyecare_edge.llm import LLMError
from eyecare_edge.pipeline import (
    Pipeline,
    choose_llm,
    default_n_ctx,
    max_visual_tokens,
)
from eyecare_edge.pipeline.plan import TEXT_ROOM
from eyecare_edge.preprocess import PreprocessConfig, grid_pinpoints, plan_image
from eyecare_edge.qa.loaders import load_bench

MAX_TOKENS = 48  # long enough for every closed answer and a sentence or two of the others


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return runtime_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def records(assets):
    return load_bench(assets.bench)


@pytest.fixture(scope="module")
def f32_pipe(assets):
    pipe = Pipeline.load(
        assets.bundle, llm="f32", vision_precision="fp32", kv_type="f32", flash_attn=False, **FAST
    )
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def torch_model(assets):
    import torch
    from eyecare_edge.training.checkpoint import load_checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = load_checkpoint(assets.checkpoint)
    model.eval()
    yield model, tokenizer
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def torch_answers(torch_model, records):
    from eyecare_edge.training.evaluate import generate_answer

    model, tokenizer = torch_model
    cache: dict[str, np.ndarray] = {}
    out = []
    for r in records:
        rgbs = [cache.setdefault(p, load_image(p).rgb) for p in r.images]
        out.append(generate_answer(model, tokenizer, rgbs, r.prompt_text(), max_new_tokens=MAX_TOKENS))
    return out


def _agreement(a: list[str], b: list[str]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def _same_option(a: str, b: str, options) -> bool:
    """Both answers commit to the same option letter; two unparseable answers do not agree."""
    from eyecare_edge.qa.answers import parse_choice

    x = parse_choice(a, options)
    return x is not None and x == parse_choice(b, options)


def test_unparseable_answers_never_agree():
    options = {"A": "Yes", "B": "No"}
    assert not _same_option("the image is blurry", "I cannot tell", options)
    assert _same_option("A", "A. Yes", options) and not _same_option("A", "B", options)


# ---------------------------------------------------------------------------------------------
# parity with the torch model
# ---------------------------------------------------------------------------------------------


def test_visual_sequence_equals_torch(f32_pipe, torch_model, records):
    import torch
    from eyecare_edge.training.evaluate import prompt_inputs

    model, tokenizer = torch_model
    paths = sorted({r.images[0] for r in records})[:4]
    worst = 0.0
    for path in paths:
        rgb = load_image(path).rgb
        inputs = prompt_inputs(model, tokenizer, [rgb], "x")
        with torch.no_grad():
            (ref,) = model.image_features(inputs.pixel_values, inputs.image_sizes, inputs.image_n_tiles)
        ref = ref.numpy()
        (got,) = f32_pipe.encode_images(path)
        assert got.shape == ref.shape
        worst = max(worst, float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max())))
    print(f"visual sequence vs torch: max |diff| / max(1, max |ref|) = {worst:.2e} over {len(paths)} images")
    assert worst <= 1e-4


def test_greedy_answers_equal_torch_f32(f32_pipe, records, torch_answers):
    got = [f32_pipe.ask(r.images, r.prompt_text(), max_tokens=MAX_TOKENS).text for r in records]
    agree = _agreement(got, torch_answers)
    print(
        f"FP32 ONNX + F32 GGUF vs torch: {agree:.1%} of {len(records)} bench items equal "
        f"({len(set(torch_answers))} different answers, up to {MAX_TOKENS} tokens)"
    )
    assert agree >= 0.98
    # the model is trained enough to say different things about different images and questions
    # (an untrained one gives 1-2; the fixture gave 15 before its connector started on the label
    # probes' directions and 13 after: closed answers became letters more often)
    assert len(set(torch_answers)) >= 12


def test_quantized_variants_against_torch(assets, records, torch_answers):
    """INT8 vision alone changes little; Q4_K_M changes long texts (errors compound over 48
    tokens) but not the option a closed answer commits to (see also
    test_closed_letters_parity_on_a_model_that_sees)."""

    closed = [i for i, r in enumerate(records) if r.task == "closed"]

    def answers(llm: str, vision: str, items: list[int]) -> list[str]:
        with Pipeline.load(assets.bundle, llm=llm, vision_precision=vision, **FAST) as pipe:
            return [
                pipe.ask(records[i].images, records[i].prompt_text(), max_tokens=MAX_TOKENS).text
                for i in items
            ]

    everything = list(range(len(records)))
    int8_f32 = _agreement(answers("f32", "int8", everything), torch_answers)
    figures = {}
    for vision in ("int8", "int8_u8s8"):
        got = answers("q4_k_m", vision, closed)
        ref = [torch_answers[i] for i in closed]
        choice = sum(
            _same_option(g, r, records[i].options) for g, r, i in zip(got, ref, closed, strict=True)
        ) / len(closed)
        figures[vision] = (_agreement(got, ref), choice)
    print(
        f"INT8 vision + F32 GGUF: {int8_f32:.1%} of {len(records)} items equal; "
        + "; ".join(
            f"{v} + Q4_K_M on {len(closed)} closed items: text {t:.1%}, chosen option {c:.1%}"
            for v, (t, c) in figures.items()
        )
    )
    assert int8_f32 >= 0.85
    for text, choice in figures.values():
        assert choice >= 0.90
        assert text >= 0.15  # a broken injection or layout gives ~0


def closed_parity(checkpoint, bundle, records, kinds: dict[str, str]) -> dict:
    """Closed-QA figures of a checkpoint and its bundle: per-item letters of torch (greedy),
    FP32 + F32 and INT8 + Q4_K_M; accuracy of each, and the share of items where a bundle chose
    the reference's option (an unparseable answer never agrees). Also used on a checkpoint with a
    re-randomised tower to show these checks fail on a model that does not see (issue 13 note)."""
    import torch
    from eyecare_edge.training.checkpoint import load_checkpoint
    from eyecare_edge.training.evaluate import generate_answer

    from eyecare_edge.qa.answers import parse_choice

    recs = [r for r in records if r.task == "closed"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, tokenizer = load_checkpoint(checkpoint)
        cache: dict[str, np.ndarray] = {}
        ref = [
            generate_answer(
                model, tokenizer, [cache.setdefault(p, load_image(p).rgb) for p in r.images], r.prompt_text(), 16
            )
            for r in recs
        ]
    finally:
        torch.set_num_threads(threads)
    letters = {"pytorch": [parse_choice(a, r.options) for a, r in zip(ref, recs, strict=True)]}
    for name, llm, vision, kv in (("f32", "f32", "fp32", "f32"), ("int8_q4", "q4_k_m", "int8", "f16")):
        with Pipeline.load(bundle, llm=llm, vision_precision=vision, kv_type=kv, **FAST) as pipe:
            letters[name] = [
                parse_choice(pipe.ask(r.images, r.prompt_text(), max_tokens=16).text, r.options) for r in recs
            ]
    truth = [r.answer.strip().upper() for r in recs]
    out: dict = {"n": len(recs), "answers": len(set(ref))}
    for name, got in letters.items():
        out[f"{name}_accuracy"] = sum(g == t for g, t in zip(got, truth, strict=True)) / len(recs)
        if name != "pytorch":
            out[f"{name}_same_option"] = sum(
                g is not None and g == p for g, p in zip(got, letters["pytorch"], strict=True)
            ) / len(recs)
    out["unparseable"] = sum(p is None for p in letters["pytorch"])
    modality = [i for i, r in enumerate(recs) if kinds.get(r.id) == "modality"]
    out["pytorch_modality_accuracy"] = sum(letters["pytorch"][i] == truth[i] for i in modality) / max(
        len(modality), 1
    )
    out["n_modality"] = len(modality)
    return out


def check_closed_parity(fig: dict) -> None:
    """The issue's criteria, on a model that must first be shown to see."""
    # the model reads the image where its tower learned to (modality: 100% after the vision
    # stage; chance 33%), and answers with letters, not unparseable text
    assert fig["pytorch_modality_accuracy"] >= 0.9, fig
    assert fig["unparseable"] <= 0.05 * fig["n"], fig
    # bundles: the reference's option on >= 98% (FP32 + F32); INT8 + Q4_K_M within 2 points
    assert fig["f32_same_option"] >= 0.98, fig
    assert abs(fig["f32_accuracy"] - fig["pytorch_accuracy"]) <= 0.01 + 1e-9, fig
    assert abs(fig["int8_q4_accuracy"] - fig["pytorch_accuracy"]) <= 0.02 + 1e-9, fig


def test_closed_letters_parity_on_a_model_that_sees(assets, records):
    """Closed QA, every closed bench item of the fixture: letters, not text; see check_closed_parity."""
    from eyecare_edge.bench.by_kind import kinds_from_truth

    fig = closed_parity(assets.checkpoint, assets.bundle, records, kinds_from_truth(assets.phantom / "truth.jsonl"))
    print(f"closed parity: {fig}")
    check_closed_parity(fig)


def test_closed_parity_fails_on_a_checkpoint_whose_tower_does_not_see(assets, records, tmp_path):
    """The same checks on the fixture checkpoint with its tower re-randomised (connector and LLM
    kept), exported the same way: the bundle still copies its reference, but the reference no
    longer reads the image, so check_closed_parity must fail (parity alone proves nothing)."""
    import torch
    from eyecare_edge.export.exporter import ExportOptions, export_bundle
    from eyecare_edge.training.checkpoint import load_checkpoint, save_checkpoint

    from eyecare_edge.bench.by_kind import kinds_from_truth

    model, tokenizer = load_checkpoint(assets.checkpoint, dtype="float32")
    torch.manual_seed(1)
    with torch.no_grad():
        for m in model.vision_tower.modules():
            if m is not model.vision_tower and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    blind = save_checkpoint(model, tokenizer, tmp_path / "blind")
    bundle = tmp_path / "blind-bundle"
    export_bundle(blind, bundle, ExportOptions(vision=("fp32", "int8"), llm=("f32", "q4_k_m"), validate=False, threads=1))
    fig = closed_parity(blind, bundle, records, kinds_from_truth(assets.phantom / "truth.jsonl"))
    print(f"closed parity, re-randomised tower: {fig}")
    with pytest.raises(AssertionError):
        check_closed_parity(fig)


# ---------------------------------------------------------------------------------------------
# KV reuse
# ---------------------------------------------------------------------------------------------


def _questions_for_one_image(records, n: int = 5):
    by_image: dict[str, list] = {}
    for r in records:
        by_image.setdefault(r.images[0], []).append(r)
    path, recs = max(by_image.items(), key=lambda kv: len(kv[1]))
    assert len(recs) >= n
    return path, [r.prompt_text() for r in recs[:n]]


def test_kv_reuse_gives_identical_answers_faster(f32_pipe, records):
    path, questions = _questions_for_one_image(records)
    image = f32_pipe.decode(path)[0]  # decoded once: the comparison is about the model side

    fresh, t_fresh = [], 0.0
    for q in questions:
        f32_pipe.forget_images()
        t = time.perf_counter()
        fresh.append(f32_pipe.ask(image, q, max_tokens=MAX_TOKENS))
        t_fresh += time.perf_counter() - t
    f32_pipe.forget_images()
    reused, t_reused = [], 0.0
    for q in questions:
        t = time.perf_counter()
        reused.append(f32_pipe.ask(image, q, max_tokens=MAX_TOKENS))
        t_reused += time.perf_counter() - t

    assert [a.cached_prefix for a in fresh] == [False] * 5
    assert [a.cached_prefix for a in reused] == [False] + [True] * 4
    assert [a.text for a in reused] == [a.text for a in fresh]
    assert [a.n_prompt_tokens for a in reused] == [a.n_prompt_tokens for a in fresh]
    assert [a.n_generated for a in reused] == [a.n_generated for a in fresh]
    assert all(a.timings["vision_ms"] == 0.0 and a.timings["preprocess_ms"] == 0.0 for a in reused[1:])
    print(f"5 questions, one image: fresh {1000 * t_fresh:.0f} ms, with KV reuse {1000 * t_reused:.0f} ms")
    assert t_reused < t_fresh


def test_new_image_or_settings_reset_the_prefix(f32_pipe, records):
    paths = sorted({r.images[0] for r in records})[:2]
    f32_pipe.forget_images()
    a = f32_pipe.ask(paths[0], "What is shown?", max_tokens=4)
    b = f32_pipe.ask(paths[1], "What is shown?", max_tokens=4)
    c = f32_pipe.ask(paths[1], "Anything else?", max_tokens=4)
    both = f32_pipe.ask(paths, "Compare them.", max_tokens=4)
    both_again = f32_pipe.ask(list(reversed(paths)), "Compare them.", max_tokens=4)
    assert (a.cached_prefix, b.cached_prefix, c.cached_prefix) == (False, False, True)
    assert (both.cached_prefix, both_again.cached_prefix) == (False, False)
    # multi-image mode: one tile (tokens_per_tile) + one newline per image
    per_image = f32_pipe.preprocess.tokens_per_tile + 1
    assert both.n_image_tokens == 2 * per_image


def test_threads_sharing_a_pipeline_get_the_sequential_answers(f32_pipe, records):
    items = [(r.images, r.prompt_text()) for r in records[:6]]
    expected = [f32_pipe.ask(img, q, max_tokens=8).text for img, q in items]
    got: dict[int, str] = {}

    def worker(k: int) -> None:
        for i in range(k, len(items), 3):
            got[i] = f32_pipe.ask(items[i][0], items[i][1], max_tokens=8).text

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(items))] == expected


# ---------------------------------------------------------------------------------------------
# answers, streams, reports, inputs
# ---------------------------------------------------------------------------------------------


def test_stream_report_and_input_kinds(f32_pipe, assets, records):
    path = records[0].images[0]
    pieces: list[str] = []
    answer = f32_pipe.ask(path, "Describe the image.", max_tokens=20, stream=pieces.append)
    assert "".join(pieces).strip() == answer.text
    assert answer.n_generated >= 1 and answer.stop_reason in ("eog", "stop_string", "max_tokens")
    t = answer.timings
    assert set(t) >= {
        "decode_ms",
        "preprocess_ms",
        "vision_ms",
        "prefill_ms",
        "generate_ms",
        "first_token_ms",
        "total_ms",
    }
    assert answer.n_prompt_tokens > answer.n_image_tokens > 0

    # the same image as a path, bytes and an RGB array gives the same answer
    data = Path(path).read_bytes()
    rgb = load_image(path).rgb
    texts = {f32_pipe.ask(src, "Describe the image.", max_tokens=20).text for src in (path, data, rgb)}
    assert texts == {answer.text}

    report = f32_pipe.report(path, max_tokens=8)
    manual = f32_pipe.ask(path, read_manifest(assets.bundle).prompt.report_prompt, max_tokens=8)
    assert report.text == manual.text

    text_only = f32_pipe.ask([], "What is diabetic retinopathy?", max_tokens=8)
    assert text_only.n_image_tokens == 0 and text_only.n_prompt_tokens > 10


def test_bad_inputs_raise_clear_errors(f32_pipe, assets, tmp_path):
    path = assets.images[0]
    with pytest.raises(ValueError, match="placeholder"):
        f32_pipe.ask(path, "<image> and <image>?", max_tokens=4)
    bad = tmp_path / "note.jpg"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="note.jpg"):
        f32_pipe.ask(bad, "What is shown?")
    with pytest.raises(ImageError, match="cannot read"):
        f32_pipe.ask(tmp_path / "missing.png", "What is shown?")
    with pytest.raises(ImageError, match="uint8"):
        f32_pipe.ask(np.zeros((8, 8, 3), np.float32), "What is shown?")
    with pytest.raises(LLMError, match="do not fit"):
        f32_pipe.ask(path, "word " * 5000, max_tokens=4)
    # the pipeline still works after a failed ask
    again = f32_pipe.ask(path, "Describe the image.", max_tokens=4)
    assert again.n_image_tokens > 0 and again.stop_reason in ("eog", "max_tokens")


def test_multi_frame_source_is_refused_for_ask(f32_pipe, tmp_path):
    import io

    from PIL import Image

    frames = [Image.fromarray(np.full((32, 32, 3), v, np.uint8)) for v in (40, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    path = tmp_path / "two.tif"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ImageError, match="2 frames"):
        f32_pipe.ask(path, "What is shown?")
    decoded = f32_pipe.decode(path)
    assert [d.frame for d in decoded] == [0, 1]
    a0 = f32_pipe.ask(decoded[0], "What is shown?", max_tokens=2)
    a1 = f32_pipe.ask(decoded[1], "What is shown?", max_tokens=2)
    assert not a1.cached_prefix and a0.n_image_tokens == a1.n_image_tokens


# ---------------------------------------------------------------------------------------------
# loading: verification, precisions, widths, context size
# ---------------------------------------------------------------------------------------------


def test_load_verifies_only_loaded_files_and_names_the_bad_one(assets, tmp_path):
    bundle = copy_bundle(assets.bundle, tmp_path / "b")
    # a corrupt Q4_K_M file does not stop an F32 pipeline from loading ...
    q4 = bundle / "llm_q4_k_m.gguf"
    data = bytearray(q4.read_bytes())
    data[-100] ^= 0xFF
    q4.write_bytes(bytes(data))
    Pipeline.load(bundle, llm="f32", vision_precision="fp32", **FAST).close()
    # ... but a Q4_K_M pipeline is refused, naming the file
    with pytest.raises(BundleError, match="llm_q4_k_m.gguf: sha256 differs"):
        Pipeline.load(bundle, llm="q4_k_m", **FAST)
    # a changed newline vector (same size) is caught; verify=False trusts the install-time check
    nl = bundle / "image_newline.npy"
    arr = np.load(nl)
    np.save(nl, arr + 1.0)
    with pytest.raises(BundleError, match="image_newline.npy"):
        Pipeline.load(bundle, llm="f32", vision_precision="fp32", **FAST)
    Pipeline.load(bundle, llm="f32", vision_precision="fp32", verify=False, **FAST).close()


def test_missing_precision_and_width_mismatch(assets, tmp_path):
    with pytest.raises(BundleError, match=r"no q8_0 GGUF \(it has: f32, q4_k_m\)"):
        Pipeline.load(assets.bundle, llm="q8_0", **FAST)
    bundle = copy_bundle(assets.bundle, tmp_path / "b")
    manifest = read_manifest(bundle)
    np.save(bundle / "image_newline.npy", np.zeros(64, np.float32))
    add_file(bundle, manifest, "image_newline.npy", role="extra", precision="fp32")
    write_manifest(bundle, manifest)
    with pytest.raises(BundleError, match="n_embd 256, but image_newline has 64 values"):
        Pipeline.load(bundle, llm="f32", vision_precision="fp32", **FAST)
    with pytest.raises(TypeError, match="unknown Pipeline option"):
        Pipeline.load(assets.bundle, n_thread=1)


def test_choose_llm_auto_prefers_q4_k_m_and_skips_failed(assets):
    manifest = read_manifest(assets.bundle)
    assert choose_llm(manifest, "auto").precision == "q4_k_m"
    manifest.validation["llm_q4_k_m"] = {"passed": False}
    assert choose_llm(manifest, "auto").precision == "f32"


@pytest.mark.parametrize("side", [112, 384])
def test_max_visual_tokens_bounds_every_plan(side):
    config = PreprocessConfig(tile_size=side, pinpoints=grid_pinpoints(side), anyres_max=4)
    bound = max_visual_tokens(config)
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(16, 6 * side, size=(400, 2))]
    sizes += [(h, w) for h, w in config.pinpoints] + [(h + 1, w - 1) for h, w in config.pinpoints]
    most = max(plan_image(s, config).visual_tokens for s in sizes)
    assert most <= bound <= most * 1.25


def test_default_n_ctx_caps_at_trained_context_and_phi3(assets):
    manifest = read_manifest(assets.bundle)
    pre = manifest.preprocess_config()
    n = default_n_ctx(manifest, pre)
    assert n % 256 == 0 and n >= max_visual_tokens(pre) + TEXT_ROOM
    big = PreprocessConfig()  # 384-px tiles, anyres_max_4: ~3.7k tokens per image
    manifest.model.update(llm_arch="phi3", context_length=131072)
    assert default_n_ctx(manifest, big) == 4096
    manifest.model.update(llm_arch="qwen2", context_length=32768)
    # 729 global + 3529 cells (compression starts above 1.21 x 4 x 729) + 81 newlines + 512, to 256
    assert TEXT_ROOM == 512 and default_n_ctx(manifest, big) == 4864
    manifest.model.update(context_length=2048)
    assert default_n_ctx(manifest, big) == 2048


def test_pipeline_import_pulls_in_no_torch():
    code = (
        "import sys\n"
        "import eyecare_edge.pipeline, eyecare_edge.screening, eyecare_edge.vision, eyecare_edge.vision.engines\n"
        "import eyecare_edge.commands.ask, eyecare_edge.commands.screen\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate', 'onnx') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ask_cli_streams_and_prints_json(assets):
    from click.testing import CliRunner

    from eyecare_edge.cli import main

    image = str(assets.images[0])
    base = ["ask", str(assets.bundle), image, "--threads", "1", "--vision-threads", "1", "--llm", "f32"]
    r = CliRunner().invoke(main, [*base, "-q", "What is shown?", "--max-tokens", "8", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert (
        out["llm"] == "f32" and out["stop_reason"] in ("eog", "max_tokens") and "vision_ms" in out["timings"]
    )
    assert out["n_prompt_tokens"] > out["n_image_tokens"] > 0
    r = CliRunner().invoke(main, [*base, "-q", "What is shown?", "--max-tokens", "8"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == out["answer"]
    assert "vision: onnxruntime-cpu" in r.stderr and "first token" in r.stderr
    r = CliRunner().invoke(main, base)
    assert r.exit_code == 2 and "-q QUESTION or --report" in r.output
    r = CliRunner().invoke(main, [*base, "-q", "x", "--llm", "q8_0"])
    assert r.exit_code == 1 and "no q8_0 GGUF" in r.stderr
