"""The PyTorch/transformers references: what a user gets running the checkpoint in FP32 or BF16,
and the bench's reference answerer (`reference_answerer`, handed to `bench.runner.run_system`).

torch is imported inside the functions only; they run in child processes (`eyecare_edge.perf.rss.run_in_child`), so
the command itself, and every other measurement, stay torch-free.

One `measure_reference` call is one end-to-end answer, timed by part:

    decode the image + preprocess + tokenize   (the one shared preprocessing, as training uses)
    vision: `encode_tiles` on one tile (per-tile figure), then `embed_inputs` on all tiles
    prefill: one forward of the LLM over the prompt embeddings, logits for the last position
    decode: greedy steps with the KV cache (the loop transformers' `generate` runs, without its
            bookkeeping, and without stopping at an end-of-text token: random weights would)

Time boxes: a reference slower than the box (BF16 on a CPU without BF16 hardware runs at a small
fraction of FP32) is measured on less work and scaled by the FLOP model of `eyecare_edge.costs`: the prefill on
the first P prompt positions, vision on one tile times the tile count, decode on fewer steps. The
result says what was measured (`prefill_tokens_measured`, `vision_composed`,
`decode_tokens_measured`), so a scaled figure is never mistaken for a measured one.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from eyecare_edge.training.digest import checkpoint_digest

from eyecare_edge.costs import largest_prefix, shapes_from_config
from eyecare_edge.formats import REFERENCE_DTYPES

DTYPES = REFERENCE_DTYPES
# (images, question, max_tokens) -> (text, timings): the shape of the bench's `Answerer`.
Answer = Callable[[list[np.ndarray], str, int], tuple[str, dict[str, float]]]


def _torch_dtype(name: str):
    import torch

    try:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    except KeyError:
        raise ValueError(f"unknown reference dtype {name!r}; known: {', '.join(DTYPES)}") from None


def _setup_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(max(int(threads), 1))
    with contextlib.suppress(RuntimeError):  # already set in this process
        torch.set_num_interop_threads(1)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def matmul_gflops(
    dtype: str,
    threads: int,
    *,
    m: int = 256,
    k: int = 3072,
    n: int = 3072,
    repeats: int = 3,
    device: str = "cpu",
) -> float:
    """GFLOP/s of torch's `linear` (what nn.Linear runs) on an (m, k) x (n, k)^T product."""
    import torch

    _setup_threads(threads)
    dt = _torch_dtype(dtype)
    with torch.inference_mode():
        a = torch.randn(m, k, dtype=dt, device=device)
        w = torch.randn(n, k, dtype=dt, device=device)
        torch.nn.functional.linear(a, w)
        _sync(device)
        best = 0.0
        for _ in range(repeats):
            t = time.perf_counter()
            torch.nn.functional.linear(a, w)
            _sync(device)
            best = max(best, 2.0 * m * k * n / (time.perf_counter() - t) / 1e9)
    return round(best, 2)


def measure_reference(
    ckpt: str,
    dtype: str,
    image: str,
    question: str,
    n_decode: int = 64,
    threads: int = 2,
    time_box_s: float = 60.0,
    device: str = "cpu",
    vision_reps: int = 3,
) -> dict:
    """One end-to-end answer of the transformers model in `dtype`; see the module docstring."""
    import torch
    from eyecare_edge.training.checkpoint import load_checkpoint
    from eyecare_edge.training.evaluate import prompt_inputs

    from eyecare_edge.images import load_image

    _setup_threads(threads)
    llm_shape, vision_shape = shapes_from_config(json.loads((Path(ckpt) / "config.json").read_text()))
    probe = matmul_gflops(dtype, threads, device=device)
    rate = probe * 1e9
    out: dict = {
        "system": f"transformers {dtype.upper()}",
        "dtype": dtype,
        "device": device,
        "threads": threads,
        "matmul_gflops": probe,
        "torch": torch.__version__,
    }
    t = time.perf_counter()
    model, tokenizer = load_checkpoint(ckpt, dtype=dtype)
    model.to(device)
    out["load_s"] = time.perf_counter() - t
    lm = model.language_model
    out["attn_implementation"] = getattr(lm.config, "_attn_implementation", None)

    with torch.inference_mode():
        t = time.perf_counter()
        rgb = load_image(image).rgb
        inputs = prompt_inputs(model, tokenizer, [rgb], question)
        out["decode_preprocess_ms"] = 1000.0 * (time.perf_counter() - t)
        ids = inputs.input_ids
        n_prompt = int(ids.shape[1])
        n_tiles = int(inputs.pixel_values.shape[0])
        n_image = int((ids == model.config.image_token_index).sum())
        out.update(n_prompt=n_prompt, n_tiles=n_tiles, n_image_tokens=n_image)

        # vision, per tile
        tile = inputs.pixel_values[:1]
        predicted = vision_shape.flops_per_tile() / rate
        reps = int(max(1, min(vision_reps, time_box_s // max(predicted, 1e-9))))
        if predicted * (reps + 1) <= time_box_s:
            model.encode_tiles(tile)  # warm-up: allocator, kernels
            _sync(device)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            tile_out = model.encode_tiles(tile)
            _sync(device)
            best = min(best, time.perf_counter() - t)
        out["vision_ms_per_tile"] = 1000.0 * best
        out["vision_reps"] = reps

        # vision + layout + splicing for the whole image, or one tile's time x the tile count
        if best * n_tiles <= time_box_s:
            t = time.perf_counter()
            embeds = model.embed_inputs(ids, inputs.pixel_values, inputs.image_sizes, inputs.image_n_tiles)
            _sync(device)
            out["vision_ms"] = 1000.0 * (time.perf_counter() - t)
            out["vision_composed"] = False
        else:
            out["vision_ms"] = 1000.0 * best * n_tiles
            out["vision_composed"] = True
            embeds = _embeds_with_tile(model, ids, tile_out)

        # prefill over the prompt (or its first P positions), logits for the last position
        p = largest_prefix(llm_shape, n_prompt, rate, time_box_s)
        t = time.perf_counter()
        res = lm(inputs_embeds=embeds[:, :p], use_cache=True, logits_to_keep=1)
        token = res.logits[:, -1].argmax(-1)
        _sync(device)
        measured = time.perf_counter() - t
        cache = res.past_key_values
        full = measured * llm_shape.prefill_flops(n_prompt) / llm_shape.prefill_flops(p)
        out.update(
            prefill_tokens_measured=p,
            prefill_ms_measured=1000.0 * measured,
            prefill_ms=1000.0 * full,
            prefill_tok_s=n_prompt / full,
        )

        # greedy decode steps, until n_decode or the time box
        steps, t0 = 0, time.perf_counter()
        while steps < n_decode - 1:
            res = lm(input_ids=token.view(1, 1), past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = res.past_key_values
            token = res.logits[:, -1].argmax(-1)
            _sync(device)
            steps += 1
            elapsed = time.perf_counter() - t0
            if steps >= 2 and elapsed * (steps + 1) / steps > time_box_s:
                break
        decode_s = time.perf_counter() - t0
        out.update(
            decode_tokens_measured=steps,
            decode_context=p,
            decode_tok_s=steps / decode_s if decode_s > 0 else 0.0,
        )
    step_ms = 1000.0 / out["decode_tok_s"] if out["decode_tok_s"] else 0.0
    out["ttft_ms"] = out["decode_preprocess_ms"] + out["vision_ms"] + out["prefill_ms"]
    out["total_ms"] = out["ttft_ms"] + (n_decode - 1) * step_ms
    return out


def _embeds_with_tile(model, input_ids, tile_embeds):
    """Prompt embeddings whose image positions hold one measured tile's embeddings, repeated:
    the values a prefill sees when the vision was too slow to run on every tile."""

    mask = input_ids == model.config.image_token_index
    text = model.get_input_embeddings()(input_ids.masked_fill(mask, 0))
    n = int(mask.sum())
    rows = tile_embeds.reshape(-1, tile_embeds.shape[-1])
    reps = -(-n // rows.shape[0])
    fill = rows.repeat(reps, 1)[:n].to(text.dtype)
    return text.masked_scatter(mask.unsqueeze(-1), fill.unsqueeze(0).expand(1, -1, -1).contiguous())


def closed_qa_accuracy_torch(
    ckpt: str, bench: str, budgets: list[dict], limit: int | None, threads: int
) -> list[dict]:
    """Closed-QA accuracy of a PyTorch checkpoint under each token budget
    (`{"name", "max_tiles", "anyres_max"}`), on a bench file."""
    from eyecare_edge.training.checkpoint import load_checkpoint
    from eyecare_edge.training.evaluate import evaluate_closed_qa

    _setup_threads(threads)
    model, tokenizer = load_checkpoint(ckpt)
    base = model.config.preprocess_config()
    rows = []
    for b in budgets:
        changes = {k: b[k] for k in ("max_tiles", "anyres_max") if b.get(k) is not None}
        try:
            model.config.preprocess = base.replace(**changes).to_dict()
        except ValueError as e:
            rows.append({"name": b["name"], "skipped": f"budget does not fit this checkpoint ({e})"})
            continue
        res = evaluate_closed_qa(model, tokenizer, bench, limit=limit)
        rows.append(
            {"name": b["name"], "accuracy": res["accuracy"], "n": res["n"], "correct": res["correct"]}
        )
    model.config.preprocess = base.to_dict()
    return rows


def reference_answerer(checkpoint: str | Path, *, preprocess: dict | None = None) -> tuple[Answer, str]:
    """The PyTorch checkpoint's greedy answers and its digest: the bench's reference system, an
    `eyecare_edge.bench.runner.Answerer` the bench is given (imports torch when called).

    `preprocess` (a bundle's) makes the reference see the same tiles and token budget as the
    bundle, so the comparison measures the export alone.
    """
    from eyecare_edge.training.checkpoint import load_checkpoint
    from eyecare_edge.training.evaluate import generate_answer

    model, tokenizer = load_checkpoint(checkpoint)
    if preprocess is not None:
        model.config.preprocess = dict(preprocess)

    def answer(images: list[np.ndarray], question: str, max_tokens: int) -> tuple[str, dict[str, float]]:
        return generate_answer(model, tokenizer, images, question, max_new_tokens=max_tokens), {}

    return answer, checkpoint_digest(Path(checkpoint))
