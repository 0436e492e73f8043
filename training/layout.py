"""Torch mirror of `eyecare_edge.layout` (tile embeddings -> visual token sequence), differentiable.

The plan and every size come from `eyecare_edge.preprocess` (the one implementation); only the
tensor operations are repeated here so gradients flow in training. `tests/test_layout.py` holds
this file equal to the numpy version.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eyecare_edge.preprocess import TilePlan, unpadded_map


def layout_parts(embeds: torch.Tensor, plan: TilePlan) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Global view's tokens [n, d] and the compressed patch map [ch, cw, d] (None: single tile)."""
    t, n, d = embeds.shape
    if t != plan.n_tiles or n != plan.tokens_per_tile:
        raise ValueError(
            f"embeddings {tuple(embeds.shape)} do not match the plan ({plan.n_tiles} x {plan.tokens_per_tile})"
        )
    if plan.mode == "single":
        return embeds[0], None
    side = round(n**0.5)
    rows, cols = plan.grid
    merged = (
        embeds[1:]
        .reshape(rows, cols, side, side, d)
        .permute(0, 2, 1, 3, 4)
        .reshape(rows * side, cols * side, d)
    )
    top, bottom, left, right = unpadded_map(plan.image_size, (rows * side, cols * side))
    fmap = merged[top:bottom, left:right]
    ch, cw = plan.compressed_map
    if (ch, cw) != tuple(fmap.shape[:2]):
        fmap = bilinear(fmap, ch, cw)
    return embeds[0], fmap


def bilinear(x: torch.Tensor, out_h: int, out_w: int) -> torch.Tensor:
    """[H, W, d] map resized like `eyecare_edge.layout.bilinear_resize`."""
    y = F.interpolate(x.permute(2, 0, 1)[None], size=(out_h, out_w), mode="bilinear", align_corners=False)
    return y[0].permute(1, 2, 0)


def layout_image(embeds: torch.Tensor, plan: TilePlan, newline: torch.Tensor) -> torch.Tensor:
    """[T, n, d] tile embeddings -> [plan.visual_tokens, d]."""
    global_tokens, fmap = layout_parts(embeds, plan)
    d = embeds.shape[2]
    newline = newline.to(embeds.dtype).reshape(1, d)
    if fmap is None:
        return torch.cat([global_tokens, newline], dim=0)
    ch, cw = fmap.shape[:2]
    with_newlines = torch.cat([fmap, newline.expand(ch, 1, d)], dim=1)
    return torch.cat([global_tokens, with_newlines.reshape(ch * (cw + 1), d)], dim=0)
