"""Token budgets in the runtime (on the briefly trained tiny bundle of runtime_fixtures.py).

A budget of 100% is bit-identical to no reduction; the kept-token count is what `inspect`
predicts; KV reuse gives the answers a fresh evaluation gives; the sequence equals the torch
mirror's; a budget baked into the manifest applies unless overridden; n_ctx follows the budget.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from runtime_fixtures import FAST, copy_bundle, runtime_assets

from eyecare_edge.bundle import read_manifest, write_manifest
from eyecare_edge.cli import main
from eyecare_edge.images import load_image
from eyecare_edge.pipeline import Pipeline, default_n_ctx
from eyecare_edge.pipeline.plan import CPU_KV_CACHE, CPU_UBATCH, choose_kv_cache, choose_ubatch
from eyecare_edge.qa.loaders import load_bench
from eyecare_edge.reduce import TokenBudget

EXACT = {"llm": "f32", "vision_precision": "fp32", "kv_type": "f32", **FAST}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return runtime_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def records(assets):
    return load_bench(assets.bench)


@pytest.fixture(scope="module")
def full_pipe(assets):
    with Pipeline.load(assets.bundle, **EXACT) as pipe:
        yield pipe


def _one_image(records):
    by_image: dict[str, list[str]] = {}
    for r in records:
        if len(r.images) == 1:
            by_image.setdefault(r.images[0], []).append(r.prompt_text())
    path, qs = max(by_image.items(), key=lambda kv: len(kv[1]))
    return path, qs[:3]


def test_full_budget_is_bit_identical_to_no_reduction(assets, full_pipe, records):
    path, qs = _one_image(records)
    with Pipeline.load(assets.bundle, visual_tokens="all", token_reduction="diverse", **EXACT) as pipe:
        assert pipe.encode_images(path)[0].tobytes() == full_pipe.encode_images(path)[0].tobytes()
        assert pipe.lm.n_ctx == full_pipe.lm.n_ctx
        full_pipe.forget_images()
        assert pipe.ask(path, qs[0], max_tokens=16).text == full_pipe.ask(path, qs[0], max_tokens=16).text


@pytest.mark.parametrize("method", ["pool", "diverse"])
def test_kept_tokens_match_inspect_and_kv_reuse_is_exact(assets, records, method):
    path, qs = _one_image(records)
    with Pipeline.load(assets.bundle, visual_tokens=0.3, token_reduction=method, **EXACT) as pipe:
        r = CliRunner().invoke(
            main,
            [
                "inspect",
                path,
                "--bundle",
                str(assets.bundle),
                "--visual-tokens",
                "0.3",
                "--token-reduction",
                method,
                "--json",
            ],
        )
        assert r.exit_code == 0, r.output
        row = json.loads(r.output)[0]
        assert row["kept_tokens"] < row["visual_tokens"]
        (seq,) = pipe.encode_images(path)
        assert seq.shape[0] == row["kept_tokens"]
        fresh = []
        for q in qs:
            pipe.forget_images()
            fresh.append(pipe.ask(path, q, max_tokens=16))
        pipe.forget_images()
        reused = [pipe.ask(path, q, max_tokens=16) for q in qs]
        assert [a.cached_prefix for a in reused] == [False] + [True] * (len(qs) - 1)
        assert [a.text for a in reused] == [a.text for a in fresh]
        assert all(a.n_image_tokens == row["kept_tokens"] for a in reused)


def test_reduced_sequence_equals_the_torch_mirror(assets, records):
    import torch
    from eyecare_edge.training.checkpoint import load_checkpoint
    from eyecare_edge.training.evaluate import prompt_inputs
    from eyecare_edge.training.reduce import reduce_image as reduce_torch

    model, tokenizer = load_checkpoint(assets.checkpoint)
    model.eval()
    paths = sorted({r.images[0] for r in records})[:4]
    pipes = {
        m: Pipeline.load(assets.bundle, visual_tokens=0.3, token_reduction=m, **EXACT)
        for m in ("pool", "diverse")
    }
    try:
        for path in paths:
            inputs = prompt_inputs(model, tokenizer, [load_image(path).rgb], "x")
            (plan,) = model.plans_for(inputs.image_sizes, inputs.image_n_tiles)
            for method, pipe in pipes.items():
                with torch.no_grad():
                    (ref,) = model.image_features(
                        inputs.pixel_values,
                        inputs.image_sizes,
                        inputs.image_n_tiles,
                        TokenBudget(0.3, method),
                    )
                    tiles = model.encode_tiles(inputs.pixel_values)
                    again = reduce_torch(tiles, plan, model.image_newline, TokenBudget(0.3, method))
                assert torch.equal(ref, again)
                ref = ref.numpy()
                (got,) = pipe.encode_images(path)
                assert got.shape == ref.shape
                assert float(np.abs(got - ref).max() / max(1.0, np.abs(ref).max())) <= 1e-4, (path, method)
    finally:
        for pipe in pipes.values():
            pipe.close()


def test_baked_budget_applies_unless_overridden_and_sizes_n_ctx(assets, tmp_path, full_pipe):
    bundle = copy_bundle(assets.bundle, tmp_path / "b")
    m = read_manifest(bundle)
    digest = m.digest()
    m.budget = {"name": "fast", "visual_tokens": 0.2, "method": "diverse"}
    write_manifest(bundle, m)
    assert read_manifest(bundle).digest() != digest
    with Pipeline.load(bundle, **EXACT) as pipe:
        assert pipe.budget == TokenBudget(0.2, "diverse")
        assert "visual tokens 0.2 (diverse)" in pipe.describe()
    with Pipeline.load(bundle, visual_tokens="all", **EXACT) as pipe:
        assert pipe.budget.is_full
    pre = m.preprocess_config()
    assert default_n_ctx(m, pre, TokenBudget(40)) <= default_n_ctx(m, pre)
    cfg = pre.replace(tile_size=384, patch_size=14, pinpoints=((384, 384), (768, 1152)), max_tiles=None)
    m.model["context_length"] = 8192
    assert default_n_ctx(m, cfg, TokenBudget(0.2)) < default_n_ctx(m, cfg)
    with pytest.raises(Exception, match="fraction"):
        Pipeline.load(bundle, visual_tokens=2.5, **EXACT)


def test_auto_kv_cache_is_a_q8_0_k_cache_on_the_cpu_and_answers_like_f16(assets, records):
    assert CPU_KV_CACHE == "q8_0/f16"
    assert choose_kv_cache("auto", None, on_gpu=False) == ("q8_0/f16", None)  # no flash attention needed
    assert choose_kv_cache("auto", True, on_gpu=False) == ("q8_0/f16", True)
    assert choose_kv_cache("auto", None, on_gpu=True) == ("f16", None)  # llama.cpp's GPU choice
    assert choose_kv_cache("f32", None, on_gpu=False) == ("f32", None)  # asked for: kept
    assert choose_kv_cache("q8_0", True, on_gpu=False) == ("q8_0", True)
    # an F32 GGUF is the exact pair with PyTorch: its own cache, no flash attention unless asked
    assert choose_kv_cache("auto", None, on_gpu=False, llm_precision="f32") == ("f32", False)
    assert choose_kv_cache("auto", True, on_gpu=True, llm_precision="f32") == ("f32", True)
    with Pipeline.load(assets.bundle, llm="f32", **FAST) as pipe:
        assert (pipe.lm.options.kv_type, pipe.lm.options.flash_attn) == ("f32", False)
    from eyecare_edge.qa.answers import parse_choice

    closed = [r for r in records if r.task == "closed" and len(r.images) == 1][:8]
    letters = {}
    for kv_type, want in (("auto", ("q8_0/f16", None)), ("f16", ("f16", None))):
        with Pipeline.load(assets.bundle, kv_type=kv_type, **FAST) as pipe:
            assert (pipe.lm.options.kv_type, pipe.lm.options.flash_attn) == want
            # auto's Q8_0 K falls back to F16 on a head size it cannot take (test_gguf_writer.py)
            assert pipe.lm.options.kv_fallback == ("f16" if kv_type == "auto" else None)
            assert pipe.describe().endswith(f"KV {want[0]}")  # and no "+ flash attention"
            answers = [pipe.ask(r.images, r.prompt_text(), max_tokens=16) for r in closed]
            assert all(a.stop_reason in ("eog", "stop_string") for a in answers)
            letters[want[0]] = [parse_choice(a.text, r.options) for a, r in zip(answers, closed, strict=True)]
    # the quantized K cache picks the option the F16 cache picks, and the (trained) model does pick one
    assert None not in letters["f16"] and letters["q8_0/f16"] == letters["f16"], letters


def test_ubatch_is_smaller_on_the_cpu_and_reaches_llama_cpp(assets):
    assert choose_ubatch(None, 512, on_gpu=False) == CPU_UBATCH == 256
    assert choose_ubatch(None, 128, on_gpu=False) == 128  # never above n_batch
    assert choose_ubatch(None, 512, on_gpu=True) == 512
    assert choose_ubatch(64, 512, on_gpu=False) == 64  # asked for: kept
    with Pipeline.load(assets.bundle, **FAST) as pipe:
        assert (pipe.lm.n_batch, pipe.lm.n_ubatch) == (512, CPU_UBATCH)  # as llama.cpp reports them
    with Pipeline.load(assets.bundle, n_ubatch=512, **FAST) as pipe:
        assert pipe.lm.n_ubatch == 512


def test_position_schemes_measurement_is_exact_at_full_budget(assets):
    from eyecare_edge.perf.positions import position_fidelity

    full = position_fidelity(str(assets.checkpoint), str(assets.bench), fraction=1.0, limit=1, threads=1)
    assert full["n"] == 1
    schemes = ("compact", "original", "compact, no newlines")
    assert set(full["rows"]) == {f"{m} {s}" for m in ("pool", "diverse") for s in schemes} | {"full"}
    for name, row in full["rows"].items():
        if name.endswith("no newlines"):  # fewer rows than the full sequence: not exact by design
            continue
        assert row["mean_kl"] == pytest.approx(0.0, abs=1e-5), name
        assert row["top1_agreement"] == 1.0


def test_export_named_budgets_bake_tiles_and_kept_tokens():
    from eyecare_edge.export.exporter import ExportOptions, bundle_budget, bundle_preprocess

    from eyecare_edge.preprocess import apply_budget, preset_preprocess
    from eyecare_edge.reduce import NAMED_BUDGETS

    base = preset_preprocess("eyecare-3.8b")
    assert bundle_budget(ExportOptions(budget="full")) == {} and bundle_budget(ExportOptions()) == {}
    assert bundle_preprocess(base, ExportOptions(budget="full")) == base
    for name in ("balanced", "fast"):
        b = NAMED_BUDGETS[name]
        assert bundle_budget(ExportOptions(budget=name)) == {
            "name": name,
            "visual_tokens": b["visual_tokens"],
            "method": b["method"],
        }
        assert bundle_preprocess(base, ExportOptions(budget=name)).max_tiles == b["max_tiles"]
    # the training budget `minimal` is still a preprocessing-only budget
    assert bundle_preprocess(base, ExportOptions(budget="minimal")) == apply_budget(base, "minimal")
    assert bundle_budget(ExportOptions(budget="minimal")) == {}
