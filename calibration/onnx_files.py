"""ONNX files with external data: their digest, and saving or copying them with the data file
named after the graph (`<name>.data`), so a model over 2 GB stays loadable."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from eyecare_edge.bundle import sha256_files


def model_sha256(path: str | Path) -> str:
    """sha256 over an ONNX file and its external-data file(s), in a fixed order: the same digest a
    TensorRT engine records as its `onnx_sha256` (`bundle.sha256_files`)."""
    path = Path(path)
    return sha256_files([path, *external_files(path)])


def external_files(path: Path) -> list[Path]:
    skeleton = onnx.load(os.fspath(path), load_external_data=False)
    locations = set()
    for t in skeleton.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            locations.update(e.value for e in t.external_data if e.key == "location")
    return [path.parent / loc for loc in sorted(locations)]


def save_onnx(model: onnx.ModelProto, path: Path, threshold: int) -> None:
    """Write `model`, weights in one `<name>.data` file when above `threshold` bytes."""
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    size = sum(
        int(np.prod(t.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in model.graph.initializer
    )
    if size > threshold:
        onnx.save_model(
            model,
            os.fspath(path),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, os.fspath(path))


def copy_onnx(src: Path, dst: Path, threshold: int) -> None:
    """Copy an ONNX file; with external data, re-save so the data file is named after `dst`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if external_files(src):
        save_onnx(onnx.load(os.fspath(src)), dst, threshold)
    else:
        stale = dst.with_name(dst.name + ".data")
        if stale.exists():
            stale.unlink()
        shutil.copyfile(src, dst)
