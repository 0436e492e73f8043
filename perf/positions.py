"""Which positions kept visual tokens get, decided by measurement (PyTorch; run as a perf child or alone).

A reduced image can sit in the LLM's sequence in two ways:

- `compact`: kept tokens take consecutive positions, the text after the image follows at once
  (what llama.cpp gets from an ordinary batch; n_ctx and the KV cache shrink with the budget);
- `original`: each kept token keeps the position it had in the unreduced sequence (`diverse`:
  its own index; `pool`: positions spread evenly over the unreduced span) and the text after the
  image continues where the unreduced image would have ended (RoPE sees the full geometry);
- `compact, no newlines`: as `compact` without the row newlines (where newlines go: after each
  (pooled) row, as trained, or nowhere).

For each closed question of a bench, the answer's first-token distribution under each scheme is
compared with the full-token one: KL(full || reduced) and whether the top token agrees, plus
closed-QA accuracy by the letters' logits. Lower KL / higher agreement = the scheme the model
reads more like the image it was trained on.

    python -m eyecare_edge.perf.positions CKPT BENCH.jsonl [--limit N] [--fraction 0.25]
"""

from __future__ import annotations

import json
import sys

import numpy as np

from eyecare_edge.reduce import TokenBudget, _rows, diverse_index, kept_tokens


def _kept_positions(plan, budget: TokenBudget, full: int, idx: np.ndarray | None) -> np.ndarray:
    """Positions (relative to the image start) of the kept tokens under `original`."""
    if idx is not None:
        return idx.astype(np.int64)
    k = kept_tokens(plan, budget)
    return np.floor(np.arange(k) * (full / k)).astype(np.int64)


def _last_logits(model, before, seq, after, start: int, pos_img, span: int):
    """Logits at the last prompt position with the image rows at `start + pos_img`; the text
    after the image continues at `start + span`."""
    import torch

    x = torch.cat([before, seq.to(before.dtype), after])[None]
    pos = torch.cat([torch.arange(start), start + pos_img, start + span + torch.arange(after.shape[0])])[None]
    return model.language_model(inputs_embeds=x, position_ids=pos).logits[0, -1].float()


def position_fidelity(
    ckpt: str, bench: str, fraction: float = 0.25, limit: int | None = 40, threads: int | None = None
) -> dict:
    """KL / top-1 agreement with the full-token answer, and letter accuracy, per method x scheme."""
    import torch
    from eyecare_edge.training.checkpoint import load_checkpoint
    from eyecare_edge.training.evaluate import prompt_inputs
    from eyecare_edge.training.layout import layout_parts as layout_parts_torch
    from eyecare_edge.training.reduce import reduce_image

    from eyecare_edge.images import load_image
    from eyecare_edge.qa.loaders import load_bench

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_checkpoint(ckpt)
    model.eval()
    records = [r for r in load_bench(bench) if r.task == "closed" and len(r.images) == 1]
    if limit is not None:
        records = records[:limit]
    emb = model.get_input_embeddings()
    image_id = model.config.image_token_index
    stats: dict[str, dict[str, list[float]]] = {}
    with torch.no_grad():
        for r in records:
            inputs = prompt_inputs(model, tokenizer, [load_image(r.images[0]).rgb], r.prompt_text())
            ids = inputs.input_ids[0]
            (plan,) = model.plans_for(inputs.image_sizes, inputs.image_n_tiles)
            tiles = model.encode_tiles(inputs.pixel_values)
            slots = torch.nonzero(ids == image_id).flatten()
            start, end = int(slots[0]), int(slots[-1]) + 1
            before, after = emb(ids[:start]), emb(ids[end:])
            full_seq = reduce_image(tiles, plan, model.image_newline, None)
            n_full = full_seq.shape[0]
            letters = {k: tokenizer(k, add_special_tokens=False)["input_ids"][-1] for k in r.options}

            def logits(seq, pos_img, span, before=before, after=after, start=start):
                return _last_logits(model, before, seq, after, start, pos_img, span)

            ref = logits(full_seq, torch.arange(n_full), n_full)
            ref_lp = torch.log_softmax(ref, -1)
            for method in ("pool", "diverse"):
                budget = TokenBudget(fraction, method)
                seq = reduce_image(tiles, plan, model.image_newline, budget)
                idx = None
                if method == "diverse":
                    g, fmap = layout_parts_torch(tiles, plan)
                    idx = diverse_index(
                        g.float().numpy(),
                        None if fmap is None else fmap.float().numpy(),
                        kept_tokens(plan, budget) - _rows(plan),
                    )
                nl = torch.all(seq == model.image_newline.to(seq.dtype), dim=1)
                bare = seq[~nl]
                schemes = {
                    "compact": (seq, torch.arange(seq.shape[0]), seq.shape[0]),
                    "original": (seq, torch.from_numpy(_kept_positions(plan, budget, n_full, idx)), n_full),
                    "compact, no newlines": (bare, torch.arange(bare.shape[0]), bare.shape[0]),
                }
                for scheme, (rows, pos, span) in schemes.items():
                    out = logits(rows, pos, span)
                    lp = torch.log_softmax(out, -1)
                    kl = float(torch.sum(ref_lp.exp() * (ref_lp - lp)))
                    s = stats.setdefault(f"{method} {scheme}", {"kl": [], "top1": [], "correct": []})
                    s["kl"].append(kl)
                    s["top1"].append(float(int(out.argmax()) == int(ref.argmax())))
                    best = max(letters, key=lambda k: float(out[letters[k]]))
                    s["correct"].append(float(best == r.answer))
            s = stats.setdefault("full", {"kl": [], "top1": [], "correct": []})
            best = max(letters, key=lambda k: float(ref[letters[k]]))
            s["correct"].append(float(best == r.answer))
    return {
        "fraction": fraction,
        "n": len(records),
        "rows": {
            k: {
                "mean_kl": float(np.mean(v["kl"])) if v["kl"] else 0.0,
                "top1_agreement": float(np.mean(v["top1"])) if v["top1"] else 1.0,
                "letter_accuracy": float(np.mean(v["correct"])),
            }
            for k, v in stats.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("bench")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--fraction", type=float, default=0.25)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args(argv)
    print(json.dumps(position_fidelity(a.checkpoint, a.bench, a.fraction, a.limit, a.threads), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
