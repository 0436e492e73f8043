"""Validation of the exported vision graphs on held-out tiles: ONNX FP32 vs torch, the rest vs FP32.

The figures go into the bundle manifest; export stops (exit 1, naming the check) when one is
outside its tolerance. Cosines are per visual token (one row of `d` values), reported as the
minimum and the mean; the same cosines after subtracting the reference's mean token
("centered") are reported too, because with random weights every token shares a large common
component (tokens of *different* tiles of the tiny model have cosine ~0.89, of a random-weight
so400m ~0.99), which would let a plain cosine look better than the variant is. That baseline —
the same metric between different tiles — is reported with every variant.

INT8 is judged two ways. `qdq_exact_*` runs the Q/DQ graph with ONNX Runtime's graph
optimisations off, so every DequantizeLinear is computed in float: the arithmetic the Q/DQ graph
specifies, which is what TensorRT computes (int8 GEMMs accumulate exactly in int32). `cosine_*`
runs it as the CPU runtime does, with ORT's fused integer kernels, whose u8 x s8 int16
intermediate sums saturate on x86 without VNNI. The S8S8 `int8` variant (built by TensorRT)
is checked on the exact figures, the U8S8 `int8_u8s8` variant (run by ORT on CPU) on the fused.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from eyecare_edge import formats

# torch is imported inside the functions that run it: `compare_embeddings` serves the
# torch-free `build-engine` command too.

# precision -> {metric: minimum or maximum}, from the formats table (why each bound: its docstring).
# "max_abs_rel" is max_abs divided by max(1, max |reference|).
DEFAULT_TOLERANCES: dict[str, dict[str, float]] = formats.tolerances("vision")
_UPPER_BOUNDS = {"max_abs", "max_abs_rel", "mean_abs", "error_vs_spread", "qdq_exact_error_vs_spread"}


def _row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(both_zero, 1.0, dot / (na * nb))
    return np.nan_to_num(cos, nan=0.0)


def compare_embeddings(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    """Differences of `test` from `ref` ([T, n, d] each): absolute error and per-token cosine."""
    ref, test = np.asarray(ref), np.asarray(test)
    if ref.shape != test.shape:
        raise ValueError(f"embeddings differ in shape: reference {ref.shape}, test {test.shape}")
    if not np.isfinite(test).all():
        return {
            "max_abs": float("inf"),
            "mean_abs": float("inf"),
            "max_abs_rel": float("inf"),
            "cosine_min": 0.0,
            "cosine_mean": 0.0,
            "cosine_centered_min": 0.0,
            "cosine_centered_mean": 0.0,
            "error_vs_spread": float("inf"),
        }
    diff = np.abs(ref.astype(np.float64) - test.astype(np.float64))
    cos = _row_cosines(ref, test)
    # RMS error over the RMS difference between *different* tiles (tokens when there is one tile):
    # the plain cosine of a deep random tower is ~0.99 between unrelated tiles, so it cannot tell
    # a correct INT8 graph from one that answers for the wrong tile; this ratio is ~1.4 for that.
    other = np.roll(ref, 1, axis=0) if ref.shape[0] > 1 else np.roll(ref, 1, axis=1)
    spread = float(np.sqrt(np.mean((ref.astype(np.float64) - other) ** 2)))
    rms = float(np.sqrt(np.mean(diff**2)))
    mean_token = ref.reshape(-1, ref.shape[-1]).mean(axis=0)
    centered = _row_cosines(ref - mean_token, test - mean_token)
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "max_abs_rel": float(diff.max() / max(1.0, float(np.abs(ref).max()))),
        "cosine_min": float(cos.min()),
        "cosine_mean": float(cos.mean()),
        "cosine_centered_min": float(centered.min()),
        "cosine_centered_mean": float(centered.mean()),
        "error_vs_spread": rms / spread if spread > 0 else (0.0 if rms == 0 else float("inf")),
    }


def run_torch(model, tiles: np.ndarray, *, batch_tiles: int = 2) -> np.ndarray:
    """`encode_tiles` in float32 torch, batch by batch."""
    import torch
    from eyecare_edge.export.onnx_vision import vision_encoder

    enc = vision_encoder(model)
    outs = []
    with torch.no_grad():
        for i in range(0, tiles.shape[0], batch_tiles):
            outs.append(enc(torch.from_numpy(np.ascontiguousarray(tiles[i : i + batch_tiles]))).numpy())
    return np.concatenate(outs, axis=0)


def onnx_session(path: str | Path, *, exact: bool = False, threads: int | None = None):
    """An ONNX Runtime CPU session; `exact` turns graph optimisations off (no fused Q/DQ kernels)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if exact:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(
    path: str | Path,
    tiles: np.ndarray,
    *,
    batch_tiles: int = 2,
    exact: bool = False,
    threads: int | None = None,
) -> tuple[np.ndarray, float]:
    """Embeddings of `tiles` from the ONNX at `path` and the seconds per tile it took (warm)."""
    sess = onnx_session(path, exact=exact, threads=threads)
    feed = sess.get_inputs()[0].name
    sess.run(None, {feed: tiles[:1]})  # warm-up: first run allocates and packs weights
    outs = []
    t0 = time.perf_counter()
    for i in range(0, tiles.shape[0], batch_tiles):
        outs.append(sess.run(None, {feed: tiles[i : i + batch_tiles]})[0])
    seconds = (time.perf_counter() - t0) / tiles.shape[0]
    return np.concatenate(outs, axis=0), seconds


def _check(figures: dict, limits: Mapping[str, float]) -> tuple[bool, list[str]]:
    failed = []
    for metric, bound in limits.items():
        value = figures[metric]
        ok = value <= bound if metric in _UPPER_BOUNDS else value >= bound
        if not ok:
            op = ">" if metric in _UPPER_BOUNDS else "<"
            failed.append(f"{metric} {value:.6g} {op} {bound:g}")
    return not failed, failed


def validate_vision(
    model,
    onnx_paths: Mapping[str, str | Path],
    tiles: np.ndarray,
    *,
    tolerances: Mapping[str, Mapping[str, float]] | None = None,
    batch_tiles: int = 2,
    threads: int | None = None,
) -> dict[str, dict]:
    """Figures per precision ("fp32", "fp16", "int8", "int8_u8s8") on held-out `tiles` [T,3,S,S].

    FP32 ONNX is compared with torch; the other precisions with the FP32 ONNX (with torch when no
    FP32 ONNX is given). Each result holds the figures, the reference, `check` (the limits),
    `passed` and `failed` (the checks outside tolerance, as text).
    """
    limits_by_precision = {**DEFAULT_TOLERANCES, **(tolerances or {})}
    tiles = np.ascontiguousarray(np.asarray(tiles, dtype=np.float32))
    if tiles.ndim != 4:
        raise ValueError(f"tiles must be [T, 3, S, S], got shape {tiles.shape}")
    unknown = set(onnx_paths) - set(limits_by_precision)
    if unknown:
        raise ValueError(
            f"no tolerance for precision(s) {sorted(unknown)}; known: {sorted(limits_by_precision)}"
        )
    t0 = time.perf_counter()
    torch_ref = run_torch(model, tiles, batch_tiles=batch_tiles)
    torch_s = (time.perf_counter() - t0) / tiles.shape[0]
    outputs: dict[str, np.ndarray] = {}
    results: dict[str, dict] = {}
    order = sorted(onnx_paths, key=lambda p: p != "fp32")  # fp32 first: the others compare with it
    for precision in order:
        path = Path(onnx_paths[precision])
        out, seconds = run_onnx(path, tiles, batch_tiles=batch_tiles, threads=threads)
        outputs[precision] = out
        if precision == "fp32":
            ref, ref_name = torch_ref, "torch"
        else:
            ref, ref_name = outputs.get("fp32", torch_ref), "onnx_fp32" if "fp32" in outputs else "torch"
        figures: dict = {
            "reference": ref_name,
            "n_tiles": int(tiles.shape[0]),
            **compare_embeddings(ref, out),
        }
        if precision.startswith("int8"):
            exact, _ = run_onnx(path, tiles, batch_tiles=batch_tiles, exact=True, threads=threads)
            for k, v in compare_embeddings(ref, exact).items():
                figures[f"qdq_exact_{k}"] = v
        if precision != "fp32":
            figures["cosine_mean_vs_torch"] = compare_embeddings(torch_ref, out)["cosine_mean"]
        if tiles.shape[0] > 1:
            # How alike *different* tiles are under the same metric: a variant's cosine means
            # something only well above this (random deep towers: ~0.99 plain, ~0.1 centered).
            other = compare_embeddings(ref, np.roll(ref, 1, axis=0))
            figures["baseline_cosine_mean"] = other["cosine_mean"]
            figures["baseline_cosine_centered_mean"] = other["cosine_centered_mean"]
        figures["ort_cpu_s_per_tile"] = seconds
        figures["torch_s_per_tile"] = torch_s
        limits = limits_by_precision[precision]
        passed, failed = _check(figures, limits)
        figures["check"] = ", ".join(
            f"{m} {'<=' if m in _UPPER_BOUNDS else '>='} {b:g}" for m, b in limits.items()
        )
        figures["passed"] = passed
        figures["failed"] = failed
        results[precision] = figures
    return results


def failed_checks(results: Mapping[str, Mapping]) -> list[str]:
    """One line per failing check, naming the variant: what export prints before exiting 1."""
    lines = []
    for precision, figures in results.items():
        for what in figures.get("failed", []):
            lines.append(f"vision_{precision}: {what} (vs {figures.get('reference')})")
    return lines
