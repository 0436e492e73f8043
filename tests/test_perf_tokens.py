"""The budget x method table of `eyecare-edge perf`: rows, the default-budget rule, ratios, targets."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from eyecare_edge.perf.depth import Model
from eyecare_edge.perf.report import build_report
from eyecare_edge.perf.table import render_table
from eyecare_edge.perf.token_report import Candidate, choose_default
from eyecare_edge.perf.tokens import pipeline_overrides, question_type, token_grid
from test_perf import _raw

from eyecare_edge import costs
from eyecare_edge.cli import main
from eyecare_edge.reduce import NAMED_BUDGETS


def _speed(
    tokens: int, prefill_ms: float, vision_ms: float = 7000.0, rss: float = 1.5e9, n_ctx: int = 4096
) -> dict:
    timings = {
        "decode_ms": 100.0,
        "preprocess_ms": 900.0,
        "vision_ms": vision_ms,
        "prefill_ms": prefill_ms,
        "first_token_ms": 1000.0 + vision_ms + prefill_ms,
    }
    return {
        "n_tiles": 7,
        "n_image_tokens": tokens,
        "n_prompt": tokens + 35,
        "n_ctx": n_ctx,
        "options": {"kv_type": "f16"},
        "timings": timings,
        "loaded_files": {"llm_q4_k_m.gguf": 255e6, "vision_int8_u8s8.onnx": 55e6},
        "peak_rss_bytes": rss,
    }


def _acc(name: str, acc: float, lesion: float) -> dict:
    return {
        "name": name,
        "accuracy": acc,
        "ci_low": acc - 0.05,
        "ci_high": acc + 0.05,
        "n": 200,
        "per_type": {
            "fundus: haemorrhage/microaneurysm": {"accuracy": lesion, "ci_low": 0, "ci_high": 1, "n": 40}
        },
    }


def _token_raw() -> dict:
    grid = token_grid((0.25, 0.1), ("pool", "diverse"))
    speed = {
        "full": _speed(3677, 40000.0),
        "25% pool": _speed(841, 8000.0, n_ctx=2048, rss=0.9e9),
        "25% diverse": _speed(919, 8800.0, n_ctx=2048, rss=0.9e9),
        "10% pool": _speed(324, 3000.0, n_ctx=1536, rss=0.8e9),
        "10% diverse": _speed(367, 3400.0, n_ctx=1536, rss=0.8e9),
        "fast pool": _speed(360, 3300.0, vision_ms=3000.0, n_ctx=1536, rss=0.8e9),
        "fast diverse": _speed(400, 3700.0, vision_ms=3000.0, n_ctx=1536, rss=0.8e9),
    }
    rows = [{**g, "result": speed[g["name"]]} for g in grid]
    q8 = {**_speed(841, 8500.0, n_ctx=2048, rss=0.7e9), "decode_tok_s": 60.0, "llm_precision": "q4_k_m"}
    q8["options"] = {"kv_type": "q8_0", "flash_attn": True}
    rows.append({**grid[1], "kv": "kv q8_0 + flash", "result": q8})
    f16 = {**q8, "options": {"kv_type": "f16", "flash_attn": False}}  # same measured RSS
    rows.append({**grid[1], "kv": "kv f16", "result": f16})
    acc = {"full": 0.80, "25% pool": 0.795, "25% diverse": 0.79, "10% pool": 0.70, "10% diverse": 0.78}
    acc.update({"fast pool": 0.68, "fast diverse": 0.75})
    return _raw(
        token_budgets=rows,
        token_accuracy={"rows": [_acc(k, v, v - 0.1) for k, v in acc.items()]},
    )


def test_default_budget_rule_ratios_and_table():
    report = build_report(_token_raw())
    summary = report["token_budget_summary"]
    # within 1 point of 80%: 25% pool (79.5) and 25% diverse (79.0); fewest tokens wins
    assert summary["default"] == "25% pool"
    rows = {(r["name"], r.get("kv")): r for r in report["token_budgets"]}
    full, default = rows[("full", None)], rows[("25% pool", None)]
    r = report["ratios"]
    assert r["ttft_default_over_full"] == pytest.approx(default["ttft_ms_full"] / full["ttft_ms_full"])
    assert r["ttft_default_over_full"] < 0.3
    assert r["accuracy_delta_default_points"] == pytest.approx(-0.5)
    assert r["ttft_fast_over_full"] == pytest.approx(
        rows[("fast pool", None)]["ttft_ms_full"] / full["ttft_ms_full"]
    )
    # peak RSS at the default budget; the full-token figure is kept under its own name
    assert r["peak_rss_over_bundle"] == pytest.approx(default["peak_rss_over_bundle_full"])
    assert r["peak_rss_over_bundle_full_tokens"] > r["peak_rss_over_bundle"]
    # a smaller KV cache (n_ctx from the budget) makes the full-depth RSS smaller too
    assert default["peak_rss_bytes_full"] < full["peak_rss_bytes_full"]
    q8 = summary["kv_variants"]["25% pool"]["kv q8_0 + flash"]
    assert q8["decode_tok_s"] == 60.0 and 0 < q8["decode_tok_s_full"] < 60.0  # 2 of 32 layers measured
    # the same measured RSS extrapolates to less at full depth with a Q8_0 cache (34/32 bytes a
    # value against F16's 2 in every missing layer)
    assert q8["peak_rss_bytes_full"] < summary["kv_variants"]["25% pool"]["kv f16"]["peak_rss_bytes_full"]
    # decode at the default budget: the KV variant row with the cache the default run got (f16)
    raw = _token_raw()
    model = Model(raw)
    wb = model.gguf["q4_k_m"]
    bound = costs.decode_bound_tok_s(model.bandwidth, model.decode_bytes(wb, 841 + 35, 2.0, full=False))
    assert r["decode_fraction_of_bound_default"] == pytest.approx(60.0 / bound)
    assert rows[("25% pool", "kv f16")]["decode_fraction_of_bound"] == pytest.approx(60.0 / bound)
    assert rows[("25% pool", "kv f16")]["kv_cache"] == "f16"
    assert rows[("25% pool", "kv q8_0 + flash")]["kv_cache"] == "q8_0 + flash"
    # a GPU default leaves flash attention to llama.cpp: no KV row is that run, so no figure
    raw["token_budgets"][1]["result"]["llm_flash_attn"] = "auto"  # the 25% pool row
    gpu = build_report(raw)
    assert gpu["ratios"]["decode_fraction_of_bound_default"] is None
    assert {(r["name"], r.get("kv")): r for r in gpu["token_budgets"]}[("25% pool", None)]["kv_cache"] == (
        "f16 + flash auto"
    )
    targets = {t["key"]: t for t in report["targets"]}
    assert targets["accuracy_delta_default_points"]["met"] is True
    assert targets["decode_fraction_of_bound_default"]["value"] == pytest.approx(60.0 / bound)
    text = render_table(report)
    assert "Visual-token budgets x reduction method" in text and "default budget: 25% pool" in text
    assert "fundus: haemorrhage/microaneurysm" in text


def test_a_tile_cut_the_accuracy_bundle_did_not_make_is_not_eligible():
    raw = _token_raw()
    for a in raw["token_accuracy"]["rows"]:
        if a["name"] == "fast pool":  # fewest tokens, within 1 point, but its tiles were not cut
            a.update(accuracy=0.80, tiles_as_budgeted=False)
    report = build_report(raw)
    assert report["token_budget_summary"]["default"] == "25% pool"
    assert "(tiles not cut)" in render_table(report)


def test_choose_default_without_accuracy_and_grid_helpers():
    assert choose_default([Candidate("full", n_image_tokens=10, accuracy=None)]) is None
    grid = token_grid((0.5,), ("pool",))
    assert [g["name"] for g in grid] == ["full", "50% pool", "fast pool"]
    assert pipeline_overrides(grid[0]) == {"visual_tokens": "all"}
    fast = next(g for g in grid if g["name"] == "fast pool")
    named = NAMED_BUDGETS["fast"]
    assert pipeline_overrides(fast, bundle_max_tiles=named["max_tiles"]) == {
        "visual_tokens": named["visual_tokens"],
        "token_reduction": "pool",
    }
    assert pipeline_overrides(fast, bundle_max_tiles=9)["max_tiles"] == named["max_tiles"]

    class R:
        modality, question, meta = "fundus", "Are retinal haemorrhages present in this fundus photograph?", {}

    assert question_type(R) == "fundus: haemorrhage/microaneurysm"
    R.meta = {"kind": "drusen"}
    assert question_type(R) == "fundus: drusen"


def test_perf_cli_rejects_bad_token_options():
    r = CliRunner().invoke(main, ["perf", "--visual-tokens", "lots"])
    assert r.exit_code == 2 and "count" in r.output
    r = CliRunner().invoke(main, ["perf", "--token-methods", "magic"])
    assert r.exit_code == 2 and "unknown method" in r.output
