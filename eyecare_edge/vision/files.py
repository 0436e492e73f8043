"""The bundle files the vision half reads: its ONNX (with external data) and `image_newline`.

Backends and the engine cache ask here which manifest entries they are about to load, so the
`check` callback (`eyecare_edge.bundle.require_valid`) sees exactly those files first.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from eyecare_edge.bundle import BundleError, FileEntry, Manifest
from eyecare_edge.vision.encoder import VisionError


def onnx_entry(manifest: Manifest, precision: str) -> FileEntry:
    """The vision ONNX of `precision`, or a VisionError saying what the bundle has instead."""
    entry = manifest.find("vision", format="onnx", precision=precision)
    if entry is None:
        have = ", ".join(manifest.precisions("vision", "onnx")) or "none"
        hint = " (re-export it: `eyecare-edge export` writes FP16 by default)" if precision == "fp16" else ""
        raise VisionError(f"bundle has no {precision} vision ONNX (it has: {have}){hint}")
    return entry


def onnx_files(manifest: Manifest, entry: FileEntry) -> list[FileEntry]:
    """An ONNX entry plus its external-data entry (`<name>.data`) when the manifest lists one."""
    data = entry.path + ".data"
    return [entry] + [f for f in manifest.files if f.path == data]


def newline_entry(manifest: Manifest) -> FileEntry:
    entry = manifest.find("extra", format="npy")
    if entry is None:
        raise BundleError("manifest lists no image_newline .npy")
    return entry


def load_newline(bundle: str | os.PathLike[str], manifest: Manifest) -> np.ndarray:
    """The learned `image_newline` vector, float32 [d]."""
    entry = newline_entry(manifest)
    try:
        newline = np.load(Path(bundle) / entry.path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise BundleError(f"{bundle}: {entry.path}: unreadable .npy ({e})") from e
    return np.ascontiguousarray(newline, dtype=np.float32).reshape(-1)
