"""The formats and presets tables, and everything that must read its lists from them."""

from __future__ import annotations

import click
import pytest

from eyecare_edge.formats import (
    GPU_BACKENDS,
    KV_CACHE_TYPES,
    KV_CACHES,
    KV_ELEMENT_BYTES,
    LLM_BACKEND,
    VISION_BACKENDS,
    export_formats,
    format_names,
    get_format,
    kv_cache_needs_flash,
    kv_cache_value_bytes,
    tolerances,
)
from eyecare_edge.presets import DEFAULT_PRESET, PRESETS, get_preset, preset_names


def _choices(command: click.Command, name: str) -> list[str]:
    param = next(p for p in command.params if p.name == name)
    assert isinstance(param.type, click.Choice), name
    return list(param.type.choices)


def _default(command: click.Command, name: str):
    return next(p for p in command.params if p.name == name).default


@pytest.mark.parametrize("fmt", export_formats(), ids=lambda f: f"{f.role}-{f.name}")
def test_each_format_is_consistent(fmt):
    if fmt.role == "vision":
        assert fmt.file == f"vision_{fmt.name}.onnx"
        assert fmt.backends and set(fmt.backends) <= set(VISION_BACKENDS)
        assert not fmt.written
    else:
        assert fmt.file == f"llm_{fmt.name}.gguf"
        assert fmt.backends == (LLM_BACKEND,) and fmt.prefer == "any" and fmt.engine_check is None
    if fmt.prefer == "gpu":
        assert set(fmt.backends) & set(GPU_BACKENDS)
    if fmt.prefer == "cpu":
        assert {"ort-cpu", "openvino"} & set(fmt.backends)
    # TensorRT builds engines from exactly the formats whose engines have a check
    assert (fmt.engine_check is not None) == ("tensorrt" in fmt.backends)
    assert fmt.tolerance and all(isinstance(v, float) for v in fmt.tolerance.values())
    with pytest.raises(TypeError):
        fmt.tolerance["top1"] = 0.0  # the table cannot be changed by a caller
    assert get_format(fmt.role, fmt.name) is fmt


def test_table_names_and_defaults():
    for role in ("vision", "llm"):
        names = format_names(role)
        assert len(set(names)) == len(names)
        assert set(format_names(role, default=True)) <= set(format_names(role, measured=True))
    assert format_names("vision", default=True) == ("fp32", "fp16", "int8", "int8_u8s8")
    assert format_names("llm", default=True) == ("f16", "q8_0", "q4_k_m")
    assert format_names("llm", measured=True) == ("f16", "bf16", "q8_0", "q4_k_m")
    with pytest.raises(ValueError, match="unknown llm format 'q3'; known: f32"):
        get_format("llm", "q3")
    t = tolerances("vision")
    t["fp32"]["cosine_min"] = 0.0  # a copy: the table keeps its bound
    assert get_format("vision", "fp32").tolerance["cosine_min"] == 0.9999


def test_exporter_and_validators_read_the_table():
    from eyecare_edge.export import exporter, llm_validate, vision_validate

    assert format_names("vision") == exporter.VISION_FORMATS
    assert format_names("llm") == exporter.LLM_FORMATS
    assert exporter.UNQUANTIZED_LLM == ("f32", "f16", "bf16")
    assert exporter.ExportOptions().vision == format_names("vision", default=True)
    assert exporter.ExportOptions().llm == format_names("llm", default=True)
    assert tolerances("vision") == vision_validate.DEFAULT_TOLERANCES
    assert tolerances("llm") == llm_validate.LLM_TOLERANCES
    ok, failed = llm_validate.check({"top1": 0.6, "kl_mean": 0.5}, "q4_k_m")
    assert ok and not failed
    ok, failed = llm_validate.check({"top1": 0.6, "kl_mean": 0.5}, "q8_0")
    assert not ok and failed == ["top1 0.6 < 0.9", "kl_mean 0.5 > 0.05"]


def test_runtime_lists_equal_the_table():
    """Lists the runtime still keeps (vision, TensorRT, llama.cpp, perf) equal the table's until
    they read it (see the formats/presets note in ARCHITECTURE.md)."""
    from eyecare_edge.perf import build

    from eyecare_edge import llm, vision
    from eyecare_edge.vision import engine_build, engines

    assert format_names("vision") == vision.PRECISIONS
    assert set(vision.BACKENDS) == {"auto", *VISION_BACKENDS} and vision.GPU_BACKENDS == GPU_BACKENDS
    assert {t for pair in KV_CACHES.values() for t in pair} == set(llm.KV_TYPES) == set(KV_ELEMENT_BYTES)
    assert KV_CACHE_TYPES == tuple(KV_CACHES)
    checks = {f.name: f.engine_check for f in export_formats() if f.engine_check is not None}
    assert checks == engine_build.ENGINE_TOLERANCES
    assert set(engines.ENGINE_PRECISIONS) == set(checks)
    assert format_names("vision", default=True) == build.DEFAULT_VISION
    assert format_names("llm", measured=True) == build.DEFAULT_LLM


def test_kv_cache_bytes_and_flash_attention_follow_the_table():
    assert kv_cache_value_bytes("f16") == 2.0 and kv_cache_value_bytes("q8_0") == 34 / 32
    assert kv_cache_value_bytes("q8_0/f16") == pytest.approx((34 / 32 + 2.0) / 2)  # K and V apart
    # llama.cpp quantizes V only inside flash attention; a quantized K alone does not need it
    assert [name for name in KV_CACHES if kv_cache_needs_flash(name)] == ["q8_0"]


def test_click_choices_and_defaults_equal_the_tables():
    from eyecare_edge.commands.ask import ask
    from eyecare_edge.commands.bench import bench
    from eyecare_edge.commands.build_engine import build_engine
    from eyecare_edge.commands.export import export
    from eyecare_edge.commands.init import init
    from eyecare_edge.commands.inspect import inspect_images
    from eyecare_edge.commands.perf import perf
    from eyecare_edge.commands.screen import screen
    from eyecare_edge.commands.serve import serve
    from eyecare_edge.preprocess import BUDGETS
    from eyecare_edge.prompts import TASKS
    from eyecare_edge.reduce import METHODS, NAMED_BUDGETS

    for command in (ask, screen, serve):
        assert _choices(command, "vision") == ["auto", *VISION_BACKENDS]
        assert _choices(command, "vision_precision") == ["auto", *format_names("vision")]
        assert _choices(command, "kv_type") == ["auto", *KV_CACHE_TYPES]
        assert _choices(command, "token_reduction") == list(METHODS)
    assert _choices(bench, "token_reduction") == list(METHODS)
    assert _choices(inspect_images, "token_reduction") == list(METHODS)
    assert _choices(build_engine, "precision") == ["fp16", "int8"]
    assert _default(export, "vision") == ",".join(format_names("vision", default=True))
    assert _default(export, "llm") == ",".join(format_names("llm", default=True))
    assert _choices(export, "budget") == list(BUDGETS)
    assert _choices(inspect_images, "budget") == list(NAMED_BUDGETS)
    assert _default(perf, "llm_variants") == ",".join(format_names("llm", measured=True))
    assert _choices(perf, "preset") == _choices(init, "preset") == list(preset_names())
    assert _default(perf, "preset") == DEFAULT_PRESET
    assert sorted(_choices(screen, "task")) == sorted(TASKS)


def test_presets_table_is_what_preprocessing_and_training_read():
    from eyecare_edge.preprocess import preset_preprocess

    assert preset_names() == ("tiny", "smol", "eyecare-3.8b", "eyecare-7b") and DEFAULT_PRESET in PRESETS
    for p in PRESETS.values():
        pre = preset_preprocess(p.name)
        assert (pre.tile_size, pre.patch_size, pre.anyres_max) == (p.tile_size, p.patch_size, p.anyres_max)
    assert preset_preprocess("tiny").tile_size == 112
    with pytest.raises(ValueError, match="unknown preset 'huge'; known: tiny, smol"):
        get_preset("huge")
    pytest.importorskip("transformers")
    from eyecare_edge.training.presets import build_config

    cfg = build_config("eyecare-3.8b", llm_layers=1, vision_layers=2)
    assert cfg.chat_template_name == PRESETS["eyecare-3.8b"].chat_template
    assert cfg.preprocess_config() == preset_preprocess("eyecare-3.8b")
