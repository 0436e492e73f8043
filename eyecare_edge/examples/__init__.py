"""Small openly licensed sample images shipped with the package (see PROVENANCE.md)."""

from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent


def example_images() -> list[Path]:
    """The shipped sample images (fundus and OCT), sorted by name."""
    return sorted(p for p in EXAMPLES_DIR.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
