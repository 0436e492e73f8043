"""Shared pytest fixtures. Test-specific fixtures live in their own test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Real, openly licensed fundus/OCT images beside the checkout (see ../shared/data/README.md).
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample images not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random-weight `tiny` checkpoint (made once per test session)."""
    from eyecare_edge.training.checkpoint import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint exported with every CPU variant the runtime uses (once per session)."""
    from eyecare_edge.export.exporter import ExportOptions, export_bundle

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    options = ExportOptions(vision=("fp32", "int8", "int8_u8s8"), llm=("f32", "q8_0", "q4_k_m"), threads=2)
    export_bundle(tiny_checkpoint, out, options)
    return out
