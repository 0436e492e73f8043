"""Choosing the next token from a row of logits: greedy, or temperature, top-k and top-p with a
seeded numpy Generator (see `sample_token` for why not llama.cpp's sampler chain)."""

from __future__ import annotations

import numpy as np

# Top candidates examined before falling back to a full sort in nucleus sampling.
_TOP_P_CANDIDATES = 256


def sample_token(
    logits: np.ndarray,
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    rng: np.random.Generator,
) -> int:
    """Pick the next token from one row of logits: argmax when temperature <= 0, else
    temperature -> top-k -> top-p (nucleus) -> draw, in float64.

    Done in numpy rather than llama.cpp's sampler chain: the result depends only on the logits
    and the seed (not on a native sampler's state or version), it needs no native objects to
    create and free per request, and it costs well under a millisecond per token next to a
    decode step of tens of milliseconds.
    """
    if temperature <= 0.0:
        return int(np.argmax(logits))
    x = logits.astype(np.float64) / temperature
    n = x.shape[0]
    if 0 < top_k < n:
        idx = np.argpartition(-x, top_k - 1)[:top_k]
    else:
        idx = None
    if top_p < 1.0:
        if idx is None:
            # The nucleus is almost always within the few hundred best tokens: check that
            # exactly (mass of the candidates vs. the whole) before paying for a full sort.
            m = min(_TOP_P_CANDIDATES, n)
            cand = np.argpartition(-x, m - 1)[:m] if m < n else np.arange(n)
            xmax = x[cand].max()
            total = np.exp(x - xmax).sum()
            cand_mass = np.exp(x[cand] - xmax).sum() / total
            idx = cand if cand_mass >= top_p else np.arange(n)
        vals = x[idx]
        order = np.argsort(-vals, kind="stable")
        idx, vals = idx[order], vals[order]
        p = np.exp(vals - vals[0])
        if idx.shape[0] < n and top_k <= 0:
            p_total = np.exp(x - vals[0]).sum()  # normalise over the whole vocabulary
        else:
            p_total = p.sum()
        cum = np.cumsum(p) / p_total
        keep = int(np.searchsorted(cum, top_p)) + 1
        idx, p = idx[:keep], p[:keep]
    else:
        if idx is None:
            idx = np.arange(n)
        p = np.exp(x[idx] - x[idx].max())
    cdf = np.cumsum(p)
    choice = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    return int(idx[min(choice, idx.shape[0] - 1)])
