"""Calibration data for INT8: tiles made by the one shared preprocessing from real images.

A calibration source is a folder of images (searched recursively), a single image, or a
benchmark / training file that `eyecare_edge.qa.loaders.load_bench` reads (Eyecare-Bench JSONL,
LLaVA/Eyecare-100K JSON): its records' images are used, each once.

Selection is deterministic: candidates sorted by path, shuffled with `seed`, then the first
`max_images` that decode (after skipping `start` decodable ones, so a held-out set for
validation can be taken from the same source without overlap). An image that does not decode is
skipped with a `CalibrationImageSkipped` warning and counted in the `CalibrationReport`: one bad
file in a folder of thousands must not stop an export.

Each image gives all its anyres tiles (global view + canvas tiles) from `preprocess_image`, so
the ranges are measured on exactly the pixels the runtime will feed. The data digest hashes the
settings and the *contents* of the images used (not their paths), so the Q/DQ cache survives a
moved folder and notices an edited image.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eyecare_edge.bundle import sha256_file
from eyecare_edge.errors import EyecareError
from eyecare_edge.images import SUPPORTED_SUFFIXES, ImageError, load_images
from eyecare_edge.preprocess import PreprocessConfig, preprocess_image

DIGEST_VERSION = 1
_BENCH_SUFFIXES = {".json", ".jsonl"}


class CalibrationImageSkipped(UserWarning):
    """An image of the calibration source could not be used (named in the message)."""


class CalibrationDataError(EyecareError, ValueError):
    """The calibration source itself is unusable (missing, empty, unreadable file list)."""


@dataclass
class CalibrationReport:
    """What a pass over a calibration source used and skipped."""

    source: str
    n_candidates: int = 0
    images: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    n_tiles: int = 0

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


def image_paths(source: str | os.PathLike[str]) -> list[Path]:
    """All candidate images of `source`, sorted (folder), or in record order (bench file)."""
    src = Path(source)
    if not src.exists():
        raise CalibrationDataError(f"{src}: calibration source not found")
    if src.is_dir():
        paths = sorted(
            (p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in SUPPORTED_SUFFIXES),
            key=lambda p: p.relative_to(src).as_posix(),
        )
    elif src.suffix.lower() in _BENCH_SUFFIXES:
        from eyecare_edge.qa.loaders import load_bench

        try:
            records = load_bench(src)
        except ValueError as e:
            raise CalibrationDataError(f"{src}: not a readable bench/training file ({e})") from e
        seen: dict[str, None] = {}
        for rec in records:
            for p in rec.images:
                seen.setdefault(p, None)
        paths = [Path(p) for p in seen]
    else:
        paths = [src]
    if not paths:
        raise CalibrationDataError(
            f"{src}: no images found (looked for {', '.join(sorted(SUPPORTED_SUFFIXES))})"
        )
    return paths


def _shuffled(paths: list[Path], seed: int) -> list[Path]:
    order = np.random.default_rng(seed).permutation(len(paths))
    return [paths[i] for i in order]


@dataclass
class _Pick:
    path: Path
    rgb: np.ndarray


def _decodable(
    source: str | os.PathLike[str], *, max_images: int, seed: int, start: int, report: CalibrationReport
) -> Iterator[_Pick]:
    """The selected images, decoded (first frame of multi-frame files), bad ones skipped and counted."""
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    candidates = _shuffled(image_paths(source), seed)
    report.n_candidates = len(candidates)
    good = 0
    for path in candidates:
        if good >= start + max_images:
            break
        try:
            frames = load_images(path)
        except (ImageError, OSError) as e:
            reason = e.reason if isinstance(e, ImageError) else str(e)
            report.skipped.append((str(path), reason))
            warnings.warn(
                f"{path}: skipped for calibration ({reason})", CalibrationImageSkipped, stacklevel=3
            )
            continue
        good += 1
        if good > start:
            yield _Pick(path, frames[0].rgb)


def calibration_tiles(
    source: str | os.PathLike[str],
    preprocess_config: PreprocessConfig,
    *,
    max_images: int = 16,
    seed: int = 0,
    start: int = 0,
    report: CalibrationReport | None = None,
) -> Iterator[np.ndarray]:
    """Normalised float32 tiles [T_i, 3, S, S], one array per selected image, lazily.

    Pass a `CalibrationReport` to learn which images were used and which were skipped (and why).
    Raises CalibrationDataError when the source has no image at all, and when none decodes.
    """
    report = report if report is not None else CalibrationReport(str(source))
    for pick in _decodable(source, max_images=max_images, seed=seed, start=start, report=report):
        tiles = preprocess_image(pick.rgb, preprocess_config).tiles
        report.images.append(str(pick.path))
        report.n_tiles += int(tiles.shape[0])
        yield tiles
    if not report.images:
        raise CalibrationDataError(
            f"{source}: no usable calibration image ({report.n_skipped} of {report.n_candidates} skipped)"
        )


def data_digest(
    source: str | os.PathLike[str],
    preprocess_config: PreprocessConfig,
    *,
    max_images: int = 16,
    seed: int = 0,
    start: int = 0,
    report: CalibrationReport | None = None,
) -> str:
    """sha256 identifying the tiles `calibration_tiles` yields for the same arguments.

    It covers the preprocessing, the selection settings and the contents of the images used, in
    order. Decoding decides which images are used (a corrupt file is skipped), so this decodes the
    selected images once but does not preprocess them.
    """
    report = report if report is not None else CalibrationReport(str(source))
    h = hashlib.sha256()
    settings = {
        "version": DIGEST_VERSION,
        "preprocess": preprocess_config.to_dict(),
        "max_images": max_images,
        "seed": seed,
        "start": start,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for pick in _decodable(source, max_images=max_images, seed=seed, start=start, report=report):
        report.images.append(str(pick.path))
        h.update(sha256_file(pick.path).encode())
    if not report.images:
        raise CalibrationDataError(
            f"{source}: no usable calibration image ({report.n_skipped} of {report.n_candidates} skipped)"
        )
    return h.hexdigest()


def tiles_digest(tiles: list[np.ndarray]) -> str:
    """sha256 of tile arrays themselves (shape, dtype, bytes): the digest when tiles come from elsewhere."""
    h = hashlib.sha256(f"tiles-v{DIGEST_VERSION}".encode())
    for t in tiles:
        a = np.ascontiguousarray(t)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()
