"""Tile embeddings -> the visual token sequence the LLM reads (LLaVA-OneVision layout, numpy).

Kept out of the exported vision graph on purpose: it depends on the image's size, and leaving it
here keeps the graph static-shaped (tiles on the batch axis) for ONNX Runtime and TensorRT. The
training model mirrors these steps in torch; a parity test holds the two together.

Steps for an anyres image: global tile's tokens; patch tiles merged into one (rows·n, cols·n) map;
padding rows/cols removed; `anyres_max_N` bilinear compression; one `image_newline` after each
row; flattened row-major after the global tokens. A single-tile image (multi-image prompts) is its
tokens plus one newline.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from eyecare_edge.preprocess import TilePlan, unpadded_map


def _axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights along one axis, as torch's bilinear (align_corners=False)."""
    # torch computes scale * (dst + 0.5) - 0.5 with a fused multiply-add (one rounding);
    # doing it in float64 and rounding once to float32 reproduces that.
    scale = np.float64(np.float32(n_in / n_out))
    src = (scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.floor(src).astype(np.int64)
    i0 = np.minimum(i0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = (src - i0).astype(np.float32)
    return i0, i1, lam


def resize_rows_into(row: Callable[[int], np.ndarray], in_h: int, in_w: int, out: np.ndarray) -> np.ndarray:
    """Bilinear resize of an (in_h, in_w, D) map given row by row (`row(i)` -> [in_w, D]) into
    `out` [out_h, out_w, D], one output row at a time.

    Row by row, so the memory it needs is a few rows, not copies of the whole map: at
    eyecare-3.8b shapes a 7-tile image's map is ~45 MB and the whole-map version held ~270 MB of
    temporaries at once (tracemalloc, `Pipeline.encode_images` on a 3504x2336 photo). Same
    association as torch's CPU kernel: blend along width within each source row, then blend the
    two rows (keeps results equal to ~1e-7, not just ~1e-5)."""
    out_h, out_w = out.shape[:2]
    y0, y1, ly = _axis(in_h, out_h)
    x0, x1, lx = _axis(in_w, out_w)
    wx0, wx1 = (1 - lx)[:, None], lx[:, None]
    for i in range(out_h):
        top = row(int(y0[i])).astype(np.float32, copy=False)
        bottom = row(int(y1[i])).astype(np.float32, copy=False)
        r0 = top[x0] * wx0
        r0 += top[x1] * wx1
        r1 = bottom[x0] * wx0
        r1 += bottom[x1] * wx1
        r0 *= np.float32(1 - ly[i])
        r1 *= ly[i]
        r0 += r1
        out[i] = r0
    return out


def bilinear_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize an (H, W, D) map like `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`."""
    out = np.empty((out_h, out_w, x.shape[2]), dtype=np.float32)
    return resize_rows_into(lambda i: x[i], x.shape[0], x.shape[1], out)


def _check(embeds: np.ndarray, plan: TilePlan) -> None:
    t, n, _ = embeds.shape
    if t != plan.n_tiles or n != plan.tokens_per_tile:
        raise ValueError(
            f"embeddings {embeds.shape} do not match the plan ({plan.n_tiles} tiles x {plan.tokens_per_tile} tokens)"
        )


def _fill_map(embeds: np.ndarray, plan: TilePlan, out: np.ndarray) -> np.ndarray:
    """Write the unpadded, `anyres_max`-compressed patch map [ch, cw, d] into `out` (a view is
    fine), reading the merged (rows*side, cols*side) map of the patch tiles one row at a time
    instead of materialising it."""
    side = round(embeds.shape[1] ** 0.5)
    rows, cols = plan.grid
    d = embeds.shape[2]
    tiles = embeds[1:].reshape(rows, cols, side, side, d)
    top, bottom, left, right = unpadded_map(plan.image_size, (rows * side, cols * side))

    def row(i: int) -> np.ndarray:  # row i of the unpadded map, [right - left, d]
        r = top + i
        return tiles[r // side, :, r % side].reshape(cols * side, d)[left:right]

    ch, cw = plan.compressed_map
    if (ch, cw) == (bottom - top, right - left):
        for i in range(ch):
            out[i] = row(i)
        return out
    return resize_rows_into(row, bottom - top, right - left, out)


def layout_parts(embeds: np.ndarray, plan: TilePlan) -> tuple[np.ndarray, np.ndarray | None]:
    """The two token groups of one image before newlines: the global view's tokens [n, d] and
    the unpadded, `anyres_max`-compressed patch map [ch, cw, d] (None for a single-tile image)."""
    _check(embeds, plan)
    if plan.mode == "single":
        return embeds[0], None
    ch, cw = plan.compressed_map
    return embeds[0], _fill_map(embeds, plan, np.empty((ch, cw, embeds.shape[2]), dtype=embeds.dtype))


def layout_image(embeds: np.ndarray, plan: TilePlan, newline: np.ndarray) -> np.ndarray:
    """One image's tile embeddings [T, n, d] -> its visual token sequence [plan.visual_tokens, d],
    written straight into the one output array."""
    _check(embeds, plan)
    _, n, d = embeds.shape
    newline = np.asarray(newline, dtype=embeds.dtype).reshape(d)
    ch, cw = (0, 0) if plan.mode == "single" else plan.compressed_map
    count = n + 1 if plan.mode == "single" else n + ch * (cw + 1)
    if count != plan.visual_tokens:
        raise AssertionError(f"layout produces {count} tokens, plan says {plan.visual_tokens}")
    out = np.empty((count, d), dtype=embeds.dtype)
    out[:n] = embeds[0]
    if plan.mode == "single":
        out[n] = newline
        return out
    grid = out[n:].reshape(ch, cw + 1, d)
    grid[:, cw] = newline
    _fill_map(embeds, plan, grid[:, :cw])
    return out


def layout_images(embeds: list[np.ndarray], plans: list[TilePlan], newline: np.ndarray) -> list[np.ndarray]:
    return [layout_image(e, p, newline) for e, p in zip(embeds, plans, strict=True)]
