"""`eyecare-edge export` end to end on the tiny checkpoint: files, manifest, validation, failure."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from eyecare_edge.export import llm_validate
from eyecare_edge.export.exporter import ExportFailed, ExportOptions, export_bundle
from eyecare_edge.export.gguf_quantize import gguf_tensor_types

from eyecare_edge.bundle import read_manifest, verify_bundle
from eyecare_edge.cli import main


def test_bundle_files_and_manifest(tiny_bundle, tiny_checkpoint):
    m = read_manifest(tiny_bundle)
    assert verify_bundle(tiny_bundle, m) == []
    assert sorted(m.precisions("vision", "onnx")) == ["fp32", "int8", "int8_u8s8"]
    assert sorted(m.precisions("llm", "gguf")) == ["f32", "q4_k_m", "q8_0"]
    assert m.find("extra", format="npy").path == "image_newline.npy"
    assert m.model["preset"] == "tiny" and m.model["n_embd"] == 256
    assert m.prompt.template == "chatml" and "<|im_end|>" in m.prompt.stop_strings
    assert m.preprocess["tile_size"] == 112
    assert len(m.source["digest"]) == 64
    cal = m.find("vision", precision="int8").extra["calibration"]
    assert cal["images"] >= 1 and cal["tiles"] >= 2
    # nothing but allowed formats, and no pickles
    assert all(f.format in ("onnx", "gguf", "npy") for f in m.files)


def test_validation_figures(tiny_bundle):
    v = read_manifest(tiny_bundle).validation
    assert v["vision_fp32"]["passed"] and v["vision_fp32"]["max_abs"] <= 1e-4
    assert v["vision_int8"]["qdq_exact_cosine_mean"] >= 0.99
    assert v["vision_int8_u8s8"]["cosine_mean"] >= 0.99
    assert v["llm_f32"]["max_abs"] <= 1e-4 and v["llm_f32"]["top1"] == 1.0
    assert v["llm_f32"]["tokenizer_mismatches"] == 0
    assert v["llm_q8_0"]["top1"] >= 0.9
    assert v["export"]["passed"]


def test_q4_k_m_really_holds_k_quants(tiny_bundle):
    types = gguf_tensor_types(tiny_bundle / "llm_q4_k_m.gguf")
    assert sum(t == "Q4_K" for t in types.values()) >= 4


def test_info_verify_catches_tampering(tiny_bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    assert CliRunner().invoke(main, ["info", str(copy), "--verify"]).exit_code == 0
    with open(copy / "vision_int8.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    r = CliRunner().invoke(main, ["info", str(copy), "--verify"])
    assert r.exit_code == 1 and "vision_int8.onnx" in r.output


def test_failed_check_is_named_and_exits_1(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(llm_validate.LLM_TOLERANCES, "f32", {"max_abs_rel": 0.0})
    options = ExportOptions(vision=(), llm=("f32",))
    with pytest.raises(ExportFailed, match="llm_f32: max_abs_rel"):
        export_bundle(tiny_checkpoint, tmp_path / "b1", options)
    r = CliRunner().invoke(
        main, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "b2"), "--vision", "", "--llm", "f32"]
    )
    assert r.exit_code == 1 and "llm_f32" in r.output
    # --no-validate writes the bundle without checks
    r = CliRunner().invoke(
        main,
        [
            "export",
            str(tiny_checkpoint),
            "-o",
            str(tmp_path / "b3"),
            "--vision",
            "",
            "--llm",
            "f32",
            "--no-validate",
        ],
    )
    assert r.exit_code == 0, r.output
    assert (
        json.loads((tmp_path / "b3/manifest.json").read_text())["validation"]["export"]["validated"] is False
    )


def test_bad_usage(tiny_checkpoint, tmp_path):
    r = CliRunner().invoke(
        main, ["export", str(tiny_checkpoint), "-o", str(tmp_path / "x"), "--llm", "q3_magic"]
    )
    assert r.exit_code == 1 and "unknown llm format" in r.output
    r = CliRunner().invoke(main, ["export", str(tmp_path), "-o", str(tmp_path / "y")])
    assert r.exit_code == 1 and "config.json" in r.output
