"""Torch mirror of `eyecare_edge.layout` (tile embeddings -> visual token sequence), differentiable.

The plan and every size come from `eyecare_edge.preprocess` (the one implementation); only the
tensor operations are repeated here so gradients flow in training. `tests/test_layout.py` holds
this file equal to the numpy version.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eyecare_edge.preprocess import TilePlan, unpadded_map


def layout_image(embeds: torch.Tensor, plan: TilePlan, newline: torch.Tensor) -> torch.Tensor:
    """[T, n, d] tile embeddings -> [plan.visual_tokens, d]."""
    t, n, d = embeds.shape
    if t != plan.n_tiles or n != plan.tokens_per_tile:
        raise ValueError(
            f"embeddings {tuple(embeds.shape)} do not match the plan ({plan.n_tiles} x {plan.tokens_per_tile})"
        )
    newline = newline.to(embeds.dtype).reshape(1, d)
    if plan.mode == "single":
        return torch.cat([embeds[0], newline], dim=0)
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
        fmap = F.interpolate(
            fmap.permute(2, 0, 1)[None], size=(ch, cw), mode="bilinear", align_corners=False
        )[0]
        fmap = fmap.permute(1, 2, 0)
    with_newlines = torch.cat([fmap, newline.expand(ch, 1, d)], dim=1)
    return torch.cat([embeds[0], with_newlines.reshape(ch * (cw + 1), d)], dim=0)
