"""Visual token reduction: counts known from the plan, deterministic, numpy (runtime) == torch (training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eyecare_edge.training.reduce import reduce_image as reduce_image_torch

from eyecare_edge.layout import layout_image
from eyecare_edge.preprocess import plan_image, preset_preprocess
from eyecare_edge.reduce import (
    NAMED_BUDGETS,
    TokenBudget,
    diverse_order,
    kept_tokens,
    max_kept_tokens,
    parse_visual_tokens,
    reduce_image,
)

SIZES = [(2336, 3504), (496, 768), (1411, 1411), (4000, 1000), (97, 1500), (112, 112)]
BUDGETS = [
    TokenBudget(0.5, "pool"),
    TokenBudget(0.25, "pool"),
    TokenBudget(0.1, "pool"),
    TokenBudget(40, "pool"),
    TokenBudget(2, "pool"),
    TokenBudget(0.25, "diverse"),
    TokenBudget(0.1, "diverse"),
    TokenBudget(40, "diverse"),
    TokenBudget(2, "diverse"),
]


def _case(plan, d=16, seed=0):
    rng = np.random.default_rng(seed)
    e = rng.standard_normal((plan.n_tiles, plan.tokens_per_tile, d)).astype(np.float32)
    return e, rng.standard_normal(d).astype(np.float32)


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"{b.method}-{b.visual_tokens}")
def test_kept_count_is_known_from_the_plan_and_numpy_equals_torch(budget):
    config = preset_preprocess("tiny")
    for i, size in enumerate(SIZES):
        for single in (False, True):
            plan = plan_image(size, config, single=single)
            e, nl = _case(plan, seed=i)
            ours = reduce_image(e, plan, nl, budget)
            want = kept_tokens(plan, budget)
            assert ours.shape == (want, 16)
            target = budget.target(plan.visual_tokens)
            # within the target, unless it is below the floor (a 1-token global view + a small
            # map for pool; one token + every row newline for diverse)
            assert want <= target or target < plan.compressed_map[0] + 16
            assert want <= max_kept_tokens(plan.visual_tokens, config, budget)
            theirs = reduce_image_torch(torch.from_numpy(e), plan, torch.from_numpy(nl), budget).numpy()
            np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)
            # deterministic: the same input gives the same bytes
            assert reduce_image(e.copy(), plan, nl, budget).tobytes() == ours.tobytes()


def test_full_budget_is_bit_identical_to_no_reduction():
    config = preset_preprocess("eyecare-3.8b")
    plan = plan_image((2336, 3504), config)
    e, nl = _case(plan, d=8)
    full = layout_image(e, plan, nl).tobytes()
    for b in (None, TokenBudget(), TokenBudget(1.0, "diverse"), TokenBudget(plan.visual_tokens, "pool")):
        assert reduce_image(e, plan, nl, b).tobytes() == full
        assert kept_tokens(plan, b) == plan.visual_tokens


def test_pool_at_half_is_2x2_average_pooling_and_keeps_row_newlines():
    config = preset_preprocess("tiny")  # 8x8 tokens per tile
    plan = plan_image((112, 112), config)  # 1 patch tile: 8x8 map, no compression
    e, nl = _case(plan, d=4)
    out = reduce_image(e, plan, nl, TokenBudget(16 + 16 + 4, "pool"))
    assert out.shape[0] == 36
    g = e[0].reshape(4, 2, 4, 2, 4).mean(axis=(1, 3)).reshape(16, 4)
    np.testing.assert_allclose(out[:16], g, atol=1e-6)
    m = e[1].reshape(4, 2, 4, 2, 4).mean(axis=(1, 3))
    rows = out[16:].reshape(4, 5, 4)
    np.testing.assert_allclose(rows[:, :4], m, atol=1e-6)
    np.testing.assert_array_equal(rows[:, 4], np.broadcast_to(nl, (4, 4)))


def test_diverse_keeps_distinct_tokens_in_order_with_every_row_newline():
    # 4 distinct directions, each repeated: a budget of 4 picks one of each
    base = np.eye(4, dtype=np.float32)
    tokens = np.repeat(base, 5, axis=0) + 0.01 * np.random.default_rng(0).standard_normal((20, 4)).astype(
        np.float32
    )
    picked = diverse_order(tokens, 4)
    assert sorted(set(picked // 5)) == [0, 1, 2, 3]
    config = preset_preprocess("tiny")
    plan = plan_image((112, 224), config)
    e, nl = _case(plan, d=8)
    out = reduce_image(e, plan, nl, TokenBudget(30, "diverse"))
    rows = plan.compressed_map[0]
    is_nl = np.all(out == nl, axis=1)
    assert is_nl.sum() == rows and is_nl[-1]
    # kept tokens are rows of the full sequence, in their original order
    full = layout_image(e, plan, nl)
    idx = [int(np.flatnonzero(np.all(full == row, axis=1))[0]) for row in out[~is_nl]]
    assert idx == sorted(idx)


def test_budget_values_and_parsing():
    assert parse_visual_tokens("800") == 800
    assert parse_visual_tokens("25%") == 0.25
    assert parse_visual_tokens("0.1") == 0.1
    assert parse_visual_tokens("all") == 1.0 and parse_visual_tokens(None) is None
    with pytest.raises(ValueError, match="count"):
        parse_visual_tokens("lots")
    with pytest.raises(ValueError, match="fraction"):
        TokenBudget(1.5)
    with pytest.raises(ValueError, match=">= 1"):
        TokenBudget(0)
    with pytest.raises(ValueError, match="unknown token reduction"):
        TokenBudget(0.5, "magic")
    assert set(NAMED_BUDGETS) == {"full", "balanced", "fast"}
    assert TokenBudget.from_dict(TokenBudget(0.2, "diverse").to_dict()) == TokenBudget(0.2, "diverse")
