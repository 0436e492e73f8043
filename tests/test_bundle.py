"""Bundle manifest: write/read round trip, verification, tamper detection, the digest memo,
`info --verify`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from click.testing import CliRunner

from eyecare_edge import bundle as bundle_mod
from eyecare_edge.bundle import (
    BundleError,
    DigestMemo,
    Manifest,
    PromptSpec,
    add_file,
    read_manifest,
    require_valid,
    sha256_files,
    verify_bundle,
    verify_files,
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
    with pytest.raises(BundleError, match="llm_f16.gguf: sha256 differs"):
        require_valid(bundle, read_manifest(bundle).files)


def test_missing_truncated_and_foreign_files(bundle):
    (bundle / "vision_fp32.onnx").unlink()
    (bundle / "llm_f16.gguf").write_bytes(b"GGUF")
    (bundle / "weights.pkl").write_bytes(b"\x80\x04")
    reasons = {p.path: p.reason for p in verify_bundle(bundle)}
    assert reasons["vision_fp32.onnx"] == "missing"
    assert reasons["llm_f16.gguf"].startswith("size 4 differs")
    assert "not an allowed bundle file" in reasons["weights.pkl"]


def test_digest_memo_rehashes_only_changed_files(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    memo = DigestMemo()
    calls: list[int] = []

    def compute() -> str:
        calls.append(1)
        return str(len(calls))

    assert memo.digest([f], compute) == "1"
    assert memo.digest([f], compute) == "1" and len(calls) == 1
    f.write_bytes(b"b" * 1001)
    assert memo.digest([f], compute) == "2"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert memo.digest([f], compute) == "3"
    assert memo.sha256(f) == memo.sha256(f)


@pytest.fixture()
def hashed(monkeypatch) -> list[str]:
    """The names of the files `bundle.sha256_file` hashes, in order (the memo's only way to hash)."""
    seen: list[str] = []
    real = bundle_mod.sha256_file

    def counting(path, **kw):
        seen.append(os.path.basename(path))
        return real(path, **kw)

    monkeypatch.setattr(bundle_mod, "sha256_file", counting)
    return seen


def test_verifier_hashes_each_file_version_once(bundle, hashed):
    entries = read_manifest(bundle).files
    memo = DigestMemo()
    assert verify_files(bundle, entries, memo=memo) == []
    assert sorted(hashed) == ["image_newline.npy", "llm_f16.gguf", "vision_fp32.onnx"]
    hashed.clear()
    assert verify_files(bundle, entries, memo=memo) == []
    assert hashed == []  # unchanged files: remembered, not read again
    # rewritten with the same bytes: hashed again (a new version on disk), still valid
    onnx = bundle / "vision_fp32.onnx"
    data = onnx.read_bytes()
    onnx.write_bytes(data + b"x")
    onnx.write_bytes(data)
    st = onnx.stat()
    os.utime(onnx, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert verify_files(bundle, entries, memo=memo) == []
    assert hashed == ["vision_fp32.onnx"]


def test_verifier_refuses_a_file_tampered_after_it_was_verified(bundle, hashed):
    entries = read_manifest(bundle).files
    require_valid(bundle, entries)  # verified (and remembered in the process memo)
    gguf = bundle / "llm_f16.gguf"
    st = gguf.stat()
    # same size, mtime set back: only a new inode (replaced by rename) tells it changed
    tampered = bytearray(gguf.read_bytes())
    tampered[10] ^= 0xFF
    (bundle / "tmp.gguf").write_bytes(bytes(tampered))
    os.replace(bundle / "tmp.gguf", gguf)
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
    hashed.clear()
    with pytest.raises(BundleError, match=r"llm_f16.gguf: sha256 differs") as err:
        require_valid(bundle, entries)
    assert "image_newline.npy" not in str(err.value) and "vision_fp32.onnx" not in str(err.value)
    assert hashed == ["llm_f16.gguf"]


def test_sha256_files_is_names_then_bytes_in_order(tmp_path):
    import hashlib

    a, b = tmp_path / "a.onnx", tmp_path / "a.onnx.data"
    a.write_bytes(b"graph")
    b.write_bytes(b"weights")
    expected = hashlib.sha256(b"a.onnx" + b"graph" + b"a.onnx.data" + b"weights").hexdigest()
    assert sha256_files([a, b]) == expected != sha256_files([b, a])


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
