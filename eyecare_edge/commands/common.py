"""Small helpers shared by several commands (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from eyecare_edge.errors import EyecareError
from eyecare_edge.preprocess import PreprocessConfig, preset_preprocess
from eyecare_edge.presets import DEFAULT_PRESET


def resolve_preprocess(
    *,
    preset: str | None = None,
    checkpoint: Path | None = None,
    bundle: Path | None = None,
    max_tiles: int | None = None,
) -> PreprocessConfig:
    """The preprocessing of a preset, a checkpoint's config.json or a bundle's manifest."""
    if sum(x is not None for x in (preset, checkpoint, bundle)) > 1:
        raise click.UsageError("give at most one of --preset, --checkpoint, --bundle")
    if checkpoint is not None:
        cfg_file = checkpoint / "config.json"
        try:
            pre = json.loads(cfg_file.read_text())["preprocess"]
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise EyecareError(f"{cfg_file}: no EyecareGPT preprocessing found ({e})") from e
        config = PreprocessConfig.from_dict(pre)
    elif bundle is not None:
        from eyecare_edge.bundle import read_manifest

        config = read_manifest(bundle).preprocess_config()  # BundleError: exit 1
    else:
        try:
            config = preset_preprocess(preset or DEFAULT_PRESET)
        except ValueError as e:
            raise click.UsageError(str(e)) from e
    if max_tiles is not None:
        config = config.replace(max_tiles=max_tiles)
    return config
