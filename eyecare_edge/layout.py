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

import numpy as np

from eyecare_edge.preprocess import TilePlan, unpadded_map


def bilinear_resize(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize an (H, W, D) map like `torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`."""
    in_h, in_w = x.shape[:2]

    def axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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

    y0, y1, ly = axis(in_h, out_h)
    x0, x1, lx = axis(in_w, out_w)
    xf = x.astype(np.float32, copy=False)
    # Same association as torch's CPU kernel: blend along width within each source row, then
    # blend the two rows (keeps results equal to ~1e-7, not just ~1e-5).
    wx0, wx1 = (1 - lx)[None, :, None], lx[None, :, None]
    top, bottom = xf[y0], xf[y1]  # gather each source row set once
    row0 = top[:, x0] * wx0
    row0 += top[:, x1] * wx1
    row1 = bottom[:, x0] * wx0
    row1 += bottom[:, x1] * wx1
    row0 *= (1 - ly)[:, None, None]
    row1 *= ly[:, None, None]
    row0 += row1
    return row0


def layout_parts(embeds: np.ndarray, plan: TilePlan) -> tuple[np.ndarray, np.ndarray | None]:
    """The two token groups of one image before newlines: the global view's tokens [n, d] and
    the unpadded, `anyres_max`-compressed patch map [ch, cw, d] (None for a single-tile image)."""
    t, n, d = embeds.shape
    if t != plan.n_tiles or n != plan.tokens_per_tile:
        raise ValueError(
            f"embeddings {embeds.shape} do not match the plan ({plan.n_tiles} tiles x {plan.tokens_per_tile} tokens)"
        )
    if plan.mode == "single":
        return embeds[0], None
    side = round(n**0.5)
    rows, cols = plan.grid
    merged = (
        embeds[1:]
        .reshape(rows, cols, side, side, d)
        .transpose(0, 2, 1, 3, 4)
        .reshape(rows * side, cols * side, d)
    )
    top, bottom, left, right = unpadded_map(plan.image_size, merged.shape[:2])
    fmap = merged[top:bottom, left:right]
    ch, cw = plan.compressed_map
    if (ch, cw) != fmap.shape[:2]:
        fmap = bilinear_resize(fmap, ch, cw).astype(embeds.dtype, copy=False)
    return embeds[0], fmap


def layout_image(embeds: np.ndarray, plan: TilePlan, newline: np.ndarray) -> np.ndarray:
    """One image's tile embeddings [T, n, d] -> its visual token sequence [plan.visual_tokens, d]."""
    global_tokens, fmap = layout_parts(embeds, plan)
    d = embeds.shape[2]
    newline = np.asarray(newline, dtype=embeds.dtype).reshape(1, d)
    if fmap is None:
        return np.concatenate([global_tokens, newline], axis=0)
    ch, cw = fmap.shape[:2]
    with_newlines = np.concatenate([fmap, np.broadcast_to(newline, (ch, 1, d))], axis=1)
    out = np.concatenate([global_tokens, with_newlines.reshape(ch * (cw + 1), d)], axis=0)
    if out.shape[0] != plan.visual_tokens:
        raise AssertionError(f"layout produced {out.shape[0]} tokens, plan says {plan.visual_tokens}")
    return out


def layout_images(embeds: list[np.ndarray], plans: list[TilePlan], newline: np.ndarray) -> list[np.ndarray]:
    return [layout_image(e, p, newline) for e, p in zip(embeds, plans, strict=True)]
