"""Visual token reduction: fewer visual tokens for the LLM to read (numpy, between vision and LLM).

On a CPU the image prefill is ~90% of time to first token and runs near the matmul limit, so
the lever left is how many visual tokens the LLM reads. A `TokenBudget` keeps K tokens of an
image's visual sequence (a count, or a fraction of the image's full sequence). Methods:

- `pool`: bilinear resize of the global view's token grid and of the merged patch map by one
  common factor, exactly the operation `anyres_max_N` compression already applies (so it stays
  in distribution); at a factor of 1/2 on an even grid it is 2x2 average pooling. One newline
  after each row of the pooled map, as the unreduced layout has.
- `diverse`: greedy max-min cosine diversity over the post-connector token embeddings (the
  DivPrune idea, written from the paper's description): start from the token least similar to
  the image's mean token, then repeatedly add the candidate whose highest cosine similarity to
  the tokens already kept is lowest. Candidates are the global view's tokens and the
  (compressed) map's cells; the map's row newlines are all kept, each after its row, so the
  model still sees the row structure and the count is known before the image is encoded.

Kept tokens stay in their original order and take consecutive (compacted) positions in the
LLM's batch: a reduced prefix is then an ordinary prefix for llama.cpp (KV reuse, n_ctx sized
from the budget) and the model reads the sequence in the layout it was trained on, only
shorter.

Deterministic: no randomness, ties go to the lowest index. `kept_tokens(plan, budget)` is the
count `reduce_image` returns, computed from the plan alone (`inspect` and n_ctx use it). A
budget at or above the full count returns `layout_image`'s output unchanged (bit-identical).
The training model mirrors this in `eyecare_edge.training.reduce` (parity test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from eyecare_edge.layout import bilinear_resize, layout_image, layout_parts
from eyecare_edge.preprocess import PreprocessConfig, TilePlan

METHODS = ("pool", "diverse")


@dataclass(frozen=True)
class TokenBudget:
    """How many visual tokens per image the LLM reads, and how they are chosen.

    visual_tokens: None = all; an int >= 1 = at most that many per image; a float in (0, 1] =
    that fraction of the image's full sequence (1.0 = all).
    """

    visual_tokens: int | float | None = None
    method: str = "pool"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown token reduction {self.method!r}; known: {', '.join(METHODS)}")
        k = self.visual_tokens
        if k is None:
            return
        if isinstance(k, bool) or not isinstance(k, (int, float)):
            raise ValueError(f"visual_tokens must be a count or a fraction, got {k!r}")
        if isinstance(k, int) and k < 1:
            raise ValueError(f"visual_tokens must be >= 1, got {k}")
        if isinstance(k, float) and not 0.0 < k <= 1.0:
            raise ValueError(f"a visual_tokens fraction must be in (0, 1], got {k}")

    @property
    def is_full(self) -> bool:
        return self.visual_tokens is None or self.visual_tokens == 1.0

    def target(self, full: int) -> int:
        """The kept-token target for an image whose full sequence has `full` tokens."""
        k = self.visual_tokens
        if k is None:
            return full
        if isinstance(k, float):
            return min(full, max(1, math.floor(k * full)))
        return min(full, k)

    def to_dict(self) -> dict:
        return {"visual_tokens": self.visual_tokens, "method": self.method}

    @classmethod
    def from_dict(cls, d: dict | None) -> TokenBudget:
        d = d or {}
        return cls(d.get("visual_tokens"), d.get("method", "pool"))


def parse_visual_tokens(text: str | int | float | None) -> int | float | None:
    """'800' -> 800, '0.25' or '25%' -> 0.25, 'all'/'full' -> 1.0 (every token), None -> None."""
    if text is None or isinstance(text, (int, float)):
        return text
    s = str(text).strip().lower()
    if s in ("all", "full", "100%"):
        return 1.0
    try:
        if s.endswith("%"):
            return float(s[:-1]) / 100.0
        return float(s) if any(c in s for c in ".e") else int(s)
    except ValueError:
        raise ValueError(
            f"visual tokens {text!r}: give a count (800), a fraction (0.25) or a percentage (25%)"
        ) from None


# Named budgets for `export --budget` (tiles + kept tokens per image), measured with `eyecare-edge
# perf` (README, "Token budgets"): `balanced` is what the rule "fewest visual tokens within 1
# point of full-token closed-QA accuracy" picks on the demo bundle. On the demo model that reads
# drusen (vision stage trained to the end, issue 13): 25% pool, 91.8% vs 91.5% full (n=400), TTFT
# 0.26x full at eyecare-3.8b shapes; 15% pool lost 1.25 points (90.2%; drusen 69% vs 81%), 10%
# pool 12 points. On the previous, drusen-blind demo model the rule had picked 15% pool (87.0% vs
# 87.2%): small lesions pay first, so a model that sees them needs more tokens. `fast` targets
# <= 0.12x full TTFT with one patch tile (2 vision tiles instead of 7) and a quarter of its tokens
# (0.11x).
NAMED_BUDGETS: dict[str, dict] = {
    "full": {"max_tiles": None, "visual_tokens": None, "method": "pool"},
    "balanced": {"max_tiles": None, "visual_tokens": 0.25, "method": "pool"},
    "fast": {"max_tiles": 1, "visual_tokens": 0.25, "method": "pool"},
}


# -------------------------------------------------------------------------------- counting


def _rows(plan: TilePlan) -> int:
    """Newline tokens of the unreduced layout (one per map row; one for a single-tile image)."""
    return 1 if plan.mode == "single" else plan.compressed_map[0]


def _pool_sizes(plan: TilePlan, k: int) -> tuple[int, int, int]:
    """(global side, map rows, map cols) when pooling with global side k (factor k/n)."""
    n = round(plan.tokens_per_tile**0.5)
    if plan.mode == "single":
        return k, 0, 0
    ch, cw = plan.compressed_map
    return k, max(1, ch * k // n), max(1, cw * k // n)


def _pool_count(plan: TilePlan, k: int) -> int:
    g, mh, mw = _pool_sizes(plan, k)
    return g * g + (1 if plan.mode == "single" else mh * mw + mh)


def pool_side(plan: TilePlan, target: int) -> int:
    """The largest global-grid side whose pooled sequence fits `target` tokens (at least 1)."""
    n = round(plan.tokens_per_tile**0.5)
    for k in range(n, 0, -1):
        if _pool_count(plan, k) <= target:
            return k
    return 1


def kept_tokens(plan: TilePlan, budget: TokenBudget | None) -> int:
    """Tokens `reduce_image` returns for an image with `plan` under `budget` (no pixels needed)."""
    if budget is None or budget.is_full:
        return plan.visual_tokens
    target = budget.target(plan.visual_tokens)
    if target >= plan.visual_tokens:
        return plan.visual_tokens
    if budget.method == "pool":
        return _pool_count(plan, pool_side(plan, target))
    rows = _rows(plan)
    return max(1, target - rows) + rows


def max_kept_tokens(max_full: int, config: PreprocessConfig, budget: TokenBudget | None) -> int:
    """An upper bound on kept tokens per image when the unreduced bound is `max_full` (n_ctx)."""
    if budget is None or budget.is_full:
        return max_full
    n = config.tokens_per_side
    # the most map rows any plan can have (a budget never drops row newlines in `diverse`,
    # and `pool` never goes below a 1-token global view + a 1-cell map)
    rows = max((h // config.tile_size) * n for h, _ in config.allowed_pinpoints())
    k = budget.visual_tokens
    want = math.ceil(k * max_full) if isinstance(k, float) else int(k)  # type: ignore[arg-type]
    return min(max_full, max(want, rows + 2))


# -------------------------------------------------------------------------------- selecting


# Similarities are rounded to this step before comparing: near-duplicate tokens (the black
# surround of a fundus photo) then tie exactly and the lowest index wins, so ONNX Runtime, INT8
# vision and the torch model (whose embeddings differ by ~1e-6) keep the same tokens.
SIMILARITY_STEP = 1.0 / 1024


def _coarse(sims: np.ndarray) -> np.ndarray:
    """`sims` rounded to SIMILARITY_STEP (in units of the step), in place: at 3.6k tokens the
    matrix is 54 MB, and a rounded copy of it raised peak memory by ~200 MB (perf)."""
    sims *= np.float32(1 / SIMILARITY_STEP)
    return np.round(sims, out=sims)


def diverse_order(tokens: np.ndarray, count: int) -> np.ndarray:
    """Indices of `count` rows of `tokens` [N, d] chosen by greedy max-min cosine diversity,
    in the order chosen; ties (after rounding similarities to SIMILARITY_STEP) -> lowest index.

    All pairwise cosine similarities are computed once as one float32 matrix product (N^2 d:
    ~1 s for 3.6k tokens x 3072 on this project's 2-core CPU) and the greedy steps then read one
    row each; one matrix-vector product per step would re-read the whole [N, d] block per kept
    token (~3x slower at a 20% budget)."""
    n = tokens.shape[0]
    count = min(count, n)
    x = np.array(tokens, dtype=np.float32, order="C")  # a copy, normalised in place
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))
    first = int(np.argmin(_coarse(x @ x.mean(axis=0))))  # least like the image's average token
    sims = _coarse(x @ x.T)
    chosen = np.empty(count, dtype=np.int64)
    chosen[0] = first
    # highest similarity of each candidate to anything kept; kept ones are pinned at +inf
    nearest = sims[first].copy()
    nearest[first] = np.inf
    for i in range(1, count):
        j = int(np.argmin(nearest))
        chosen[i] = j
        np.maximum(nearest, sims[j], out=nearest)
        nearest[j] = np.inf
    return chosen


def diverse_index(global_tokens: np.ndarray, fmap: np.ndarray | None, count: int) -> np.ndarray:
    """Indices into the unreduced sequence (`layout_image`'s rows) of the tokens `diverse` keeps:
    `count` tokens by `diverse_order` among the global tokens and the map cells, plus every row
    newline, in sequence order (a single-tile image has no map: its one newline)."""
    g = global_tokens.shape[0]
    if fmap is None:
        picked = np.sort(diverse_order(global_tokens, count))
        return np.concatenate([picked, [g]])
    h, w, d = fmap.shape
    picked = diverse_order(np.concatenate([global_tokens, fmap.reshape(-1, d)], axis=0), count)
    keep = np.zeros(g + h * (w + 1), dtype=bool)
    cells = picked[picked >= g] - g
    keep[picked[picked < g]] = True
    keep[g + (cells // w) * (w + 1) + cells % w] = True
    keep[g + np.arange(h) * (w + 1) + w] = True  # every row's newline
    return np.flatnonzero(keep)


# -------------------------------------------------------------------------------- reducing


def reduce_image(
    embeds: np.ndarray, plan: TilePlan, newline: np.ndarray, budget: TokenBudget | None
) -> np.ndarray:
    """One image's tile embeddings [T, n, d] -> its reduced visual sequence [kept_tokens, d]."""
    want = kept_tokens(plan, budget)
    if budget is None or want >= plan.visual_tokens:
        return layout_image(embeds, plan, newline)
    d = embeds.shape[2]
    newline = np.asarray(newline, dtype=embeds.dtype).reshape(1, d)
    global_tokens, fmap = layout_parts(embeds, plan)
    n = round(plan.tokens_per_tile**0.5)
    if budget.method == "pool":
        k, mh, mw = _pool_sizes(plan, pool_side(plan, budget.target(plan.visual_tokens)))
        g = global_tokens.reshape(n, n, d)
        if k != n:
            g = bilinear_resize(g, k, k).astype(embeds.dtype, copy=False)
        parts = [g.reshape(k * k, d)]
        if fmap is None:
            parts.append(newline)
        else:
            if (mh, mw) != fmap.shape[:2]:
                fmap = bilinear_resize(fmap, mh, mw).astype(embeds.dtype, copy=False)
            parts.append(np.concatenate([fmap, np.broadcast_to(newline, (mh, 1, d))], axis=1).reshape(-1, d))
        out = np.concatenate(parts, axis=0)
    else:
        idx = diverse_index(global_tokens, fmap, want - _rows(plan))
        out = layout_image(embeds, plan, newline)[idx]
    if out.shape[0] != want:
        raise AssertionError(f"reduction produced {out.shape[0]} tokens, kept_tokens says {want}")
    return out
