"""Bundle manifest: write/read round trip, verification, tamper detection, `info --verify`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from eyecare_edge.bundle import (
    BundleError,
    Manifest,
    PromptSpec,
    add_file,
    read_manifest,
    require_valid,
    verify_bundle,
    write_manifest,
)
from eyecare_edge.cli import main
from eyecare_edge.preprocess import preset_preprocess


@pytest.fixture()
def bundle(tmp_path):
    root = tmp_path / "bundle"
    root.mkdir()
    np.save(root / "image_newline.npy", np.arange(8, dtype=np.float32))
    (root / "vision_fp32.onnx").write_bytes(b"\x08\x07" + bytes(range(200)))
    (root / "llm_f16.gguf").write_bytes(b"GGUF" + bytes(1000))
    m = Manifest(
        model={"preset": "tiny", "llm_arch": "llama", "n_embd": 8, "llm_layers": 2, "vision_layers": 2},
        preprocess=preset_preprocess("tiny").to_dict(),
        prompt=PromptSpec(template="chatml", system="You are helpful.", stop_strings=["<|im_end|>"]),
        source={"path": "ckpt", "digest": "abc"},
    )
    add_file(root, m, "image_newline.npy", role="extra", precision="fp32")
    add_file(root, m, "vision_fp32.onnx", role="vision", precision="fp32")
    add_file(root, m, "llm_f16.gguf", role="llm", precision="f16", n_tensors=3)
    m.validation["vision_fp32_vs_torch"] = {"max_abs": 1.2e-6, "cosine_min": 0.99999, "passed": True}
    write_manifest(root, m)
    return root


def test_round_trip(bundle):
    m = read_manifest(bundle)
    assert [f.format for f in m.files] == ["npy", "onnx", "gguf"]
    assert m.find("llm", precision="f16").extra == {"n_tensors": 3}
    assert m.preprocess_config() == preset_preprocess("tiny")
    assert m.prompt.stop_strings == ["<|im_end|>"]
    assert verify_bundle(bundle) == []
    again = Manifest.from_dict(json.loads((bundle / "manifest.json").read_text()))
    assert again.digest() == m.digest()


def test_tampered_file_is_caught(bundle):
    data = bytearray((bundle / "llm_f16.gguf").read_bytes())
    data[10] ^= 0xFF
    (bundle / "llm_f16.gguf").write_bytes(bytes(data))
    problems = verify_bundle(bundle)
    assert [(p.path, "sha256" in p.reason) for p in problems] == [("llm_f16.gguf", True)]
    with pytest.raises(BundleError, match="llm_f16.gguf"):
        require_valid(bundle, read_manifest(bundle))


def test_missing_truncated_and_foreign_files(bundle):
    (bundle / "vision_fp32.onnx").unlink()
    (bundle / "llm_f16.gguf").write_bytes(b"GGUF")
    (bundle / "weights.pkl").write_bytes(b"\x80\x04")
    reasons = {p.path: p.reason for p in verify_bundle(bundle)}
    assert reasons["vision_fp32.onnx"] == "missing"
    assert reasons["llm_f16.gguf"].startswith("size 4 differs")
    assert "not an allowed bundle file" in reasons["weights.pkl"]


def test_unreadable_and_unknown_manifests(tmp_path, bundle):
    with pytest.raises(BundleError, match="no manifest.json"):
        read_manifest(tmp_path)
    data = json.loads((bundle / "manifest.json").read_text())
    data["format_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format_version 99"):
        read_manifest(bundle)
    (bundle / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        read_manifest(bundle)


def test_info_cli(bundle):
    runner = CliRunner()
    ok = runner.invoke(main, ["info", str(bundle), "--verify"])
    assert ok.exit_code == 0, ok.output
    assert "verified 3 files" in ok.output and "vision_fp32_vs_torch" in ok.output
    js = json.loads(runner.invoke(main, ["info", str(bundle), "--json", "--verify"]).output)
    assert js["verify"]["ok"] and len(js["digest"]) == 64
    (bundle / "vision_fp32.onnx").write_bytes(b"changed")
    bad = runner.invoke(main, ["info", str(bundle), "--verify"])
    assert bad.exit_code == 1
    assert "vision_fp32.onnx" in bad.output
