"""Freed C-heap memory goes back to the OS (`eyecare_edge.heap`), and the ONNX Runtime encoder
releases it after building its session and before each CPU run (where the measured peaks were),
without ONNX Runtime's memory pattern."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

import numpy as np
import pytest
from runtime_fixtures import runtime_assets

from eyecare_edge import heap
from eyecare_edge.bundle import read_manifest
from eyecare_edge.images import load_image
from eyecare_edge.preprocess import preprocess_image

GLIBC = platform.libc_ver()[0] == "glibc"


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's; elsewhere release_free_heap is a no-op")
def test_freed_heap_memory_leaves_the_rss_only_when_released():
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    size, n = 64 * 1024, 1600  # 100 MiB in blocks below glibc's mmap threshold: heap memory
    blocks = [libc.malloc(size) for _ in range(n)]
    sentinel = libc.malloc(size)  # allocated last, so free() cannot trim the heap's top by itself
    try:
        for b in blocks:
            libc.memset(b, 1, size)
        touched = _rss()
        for b in blocks:
            libc.free(b)
        kept = _rss()
        assert heap.release_free_heap() is True
        released = _rss()
    finally:
        libc.free(sentinel)
    assert touched - kept < 20 * 2**20  # freed, but glibc kept the pages
    assert kept - released > 80 * 2**20  # handed back to the OS


def test_without_malloc_trim_it_is_a_no_op(monkeypatch):
    monkeypatch.setattr(heap, "_malloc_trim", lambda: None)
    assert heap.release_free_heap() is False


def test_the_onnx_runtime_encoder_releases_after_its_build_and_before_each_run(tmp_path_factory, monkeypatch):
    from eyecare_edge.vision import onnxruntime as ort_vision

    assets = runtime_assets(tmp_path_factory)
    manifest = read_manifest(assets.bundle)
    tiles = preprocess_image(load_image(assets.images[0]).rgb, manifest.preprocess_config()).tiles
    calls = []
    monkeypatch.setattr(ort_vision, "release_free_heap", lambda: calls.append("release") or True)
    entry = manifest.find("vision", format="onnx", precision="fp32")
    enc = ort_vision.OnnxRuntimeVision(assets.bundle / entry.path, precision="fp32", threads=1)
    assert calls == ["release"]
    assert enc.session.get_session_options().enable_mem_pattern is False  # one tile's peak, not a plan
    out = enc.encode(np.concatenate([tiles, tiles]))
    assert calls == ["release", "release"] and out.shape[0] == 2 * len(tiles)  # once a call, not a tile
