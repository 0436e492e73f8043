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
