"""The runtime-only install (`pip install eyecare-edge[cpu]`, what a camera PC or a Jetson gets)
answers `inspect`, `ask` and `screen` and stays lean (issue 20).

`.ci/run` builds that venv in a fresh directory after the main install and exports its path as
`EYECARE_RUNTIME_VENV`; the bundle is the tiny one of `runtime_fixtures` (built here with torch,
then only read by the runtime venv's own `eyecare-edge`). Without the variable the test fails in
CI (`CI` set) and skips with a reason elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from runtime_fixtures import runtime_assets

# At most this many distributions, eyecare-edge included (measured: 14 with onnxruntime 1.32 and
# llama-cpp-python 0.3.36; it was 33 while the bench's text metrics were runtime dependencies).
MAX_PACKAGES = 15
# The venv's own seeds, not resolved by the install.
SEEDS = {"pip", "setuptools", "wheel"}
FORBIDDEN = {"torch", "transformers", "rouge-score", "sacrebleu", "nltk", "onnx", "gguf"}
FAST = ["--threads", "1", "--vision-threads", "1"]


@pytest.fixture(scope="module")
def venv() -> Path:
    path = os.environ.get("EYECARE_RUNTIME_VENV")
    if not path:
        why = "EYECARE_RUNTIME_VENV is not set (.ci/run builds the runtime-only venv and sets it)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return Path(path)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return runtime_assets(tmp_path_factory)


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess:
    # The runtime venv's own interpreter and console script; none of this process's packages leak in.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(venv / "bin" / "eyecare-edge"), *args], capture_output=True, text=True, env=env, timeout=600
    )


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-")


def test_runtime_venv_is_lean(venv):
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        check=True,
    )
    names = {_normalise(p["name"]) for p in json.loads(listed.stdout)} - SEEDS
    assert "eyecare-edge" in names and "onnxruntime" in names and "llama-cpp-python" in names, names
    assert len(names) <= MAX_PACKAGES, sorted(names)
    assert not names & FORBIDDEN, sorted(names & FORBIDDEN)


def test_runtime_venv_answers_inspect_ask_screen(venv, assets, tmp_path):
    image = str(assets.images[0])
    r = _run(venv, "inspect", image, "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]
    assert row["path"] == image and row["visual_tokens"] > 0

    r = _run(venv, "ask", str(assets.bundle), image, "-q", "What is shown?", "--max-tokens", "8", "--json", *FAST)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["answer"].strip() and out["n_image_tokens"] > 0

    results = tmp_path / "screen.jsonl"
    r = _run(
        venv, "screen", str(assets.bundle), *map(str, assets.images[:2]), "-o", str(results),
        "--max-tokens", "8", "--no-progress", *FAST,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    assert len(lines) == 2 and all(line["error"] is None and line["answer"].strip() for line in lines)
