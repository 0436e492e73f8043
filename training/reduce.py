"""Torch mirror of `eyecare_edge.reduce` (visual token reduction), differentiable through the kept tokens.

Sizes and the kept count come from `eyecare_edge.reduce` (one implementation); `pool`'s resize is
`F.interpolate` as in `training.layout`. `diverse` selects with the runtime's own numpy
`diverse_index` on detached values (the choice is discrete, so it carries no gradient anyway) and
gathers in torch, so training and the bundle keep the very same tokens. `tests/test_reduce.py`
holds this file equal to the numpy version.
"""

from __future__ import annotations

import torch
from eyecare_edge.training.layout import bilinear, layout_image, layout_parts

from eyecare_edge.preprocess import TilePlan
from eyecare_edge.reduce import TokenBudget, _pool_sizes, _rows, diverse_index, kept_tokens, pool_side


def reduce_image(
    embeds: torch.Tensor, plan: TilePlan, newline: torch.Tensor, budget: TokenBudget | None
) -> torch.Tensor:
    """[T, n, d] tile embeddings -> [kept_tokens(plan, budget), d]."""
    want = kept_tokens(plan, budget)
    if budget is None or want >= plan.visual_tokens:
        return layout_image(embeds, plan, newline)
    d = embeds.shape[2]
    newline = newline.to(embeds.dtype).reshape(1, d)
    global_tokens, fmap = layout_parts(embeds, plan)
    n = round(plan.tokens_per_tile**0.5)
    if budget.method == "pool":
        k, mh, mw = _pool_sizes(plan, pool_side(plan, budget.target(plan.visual_tokens)))
        g = global_tokens.reshape(n, n, d)
        if k != n:
            g = bilinear(g, k, k)
        parts = [g.reshape(k * k, d)]
        if fmap is None:
            parts.append(newline)
        else:
            if (mh, mw) != tuple(fmap.shape[:2]):
                fmap = bilinear(fmap, mh, mw)
            parts.append(torch.cat([fmap, newline.expand(mh, 1, d)], dim=1).reshape(-1, d))
        return torch.cat(parts, dim=0)
    idx = diverse_index(
        global_tokens.detach().float().cpu().numpy(),
        None if fmap is None else fmap.detach().float().cpu().numpy(),
        want - _rows(plan),
    )
    return layout_image(embeds, plan, newline)[torch.from_numpy(idx).to(embeds.device)]
