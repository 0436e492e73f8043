"""Measurements of our runtime: vision backends, llama.cpp weight types and settings, the Pipeline.

Each function here is one system measured in one child process (see `rss`); each returns a
plain dict. No torch.

- `measure_vision`: one backend x precision, milliseconds per 384^2 tile (best of a few runs
  after a warm-up, batch of one tile: what a single-image request pays per tile).
- `measure_llm`: one GGUF with given llama.cpp settings: prefill of the real prompt (the image's
  visual rows from our own vision encoder, saved by `measure_pipeline`, between the template's
  text) and greedy decode steps.
- `measure_pipeline`: `Pipeline.load` + `Pipeline.ask` end to end, as an integrator calls it,
  with optional token-budget overrides; it can save the visual sequence it computed.
- `closed_qa_accuracy`: closed-QA accuracy of a bundle under each token budget.

Decode steps are timed with the same `llama_decode` of one token that `LlamaCppLM.generate`
runs, but without stopping at an end-of-generation token: random weights emit one whenever they
like, and a speed figure needs a fixed count.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from eyecare_edge.costs import LLMShape

DEFAULT_QUESTION = "Describe the findings in this fundus photograph."


def random_tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Normalised-range tiles [n, 3, size, size] (kernel speed does not depend on the pixels)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, size=(n, 3, size, size)).astype(np.float32)


def _timed_best(fn, reps: int, time_box_s: float) -> tuple[float, int]:
    """Best wall time of up to `reps` calls, stopping early when the box is spent."""
    best, done, t_start = float("inf"), 0, time.perf_counter()
    while done < reps:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        done += 1
        if time.perf_counter() - t_start + best > time_box_s:
            break
    return best, done


class _OpenVinoHinted:
    """OpenVINO on CPU with an explicit inference precision (f32 or bf16): `vision.OpenVinoVision`
    leaves the choice to OpenVINO (bf16 where the CPU has it), so both are measured here."""

    def __init__(self, onnx_path: Path, hint: str, threads: int) -> None:
        import openvino as ov

        core = ov.Core()
        config = {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": hint,
        }
        self.model = core.compile_model(str(onnx_path), "CPU", config)
        self.request = self.model.create_infer_request()
        self.name = "openvino-cpu"
        self.precision = hint

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        result = self.request.infer({"pixel_values": np.ascontiguousarray(tiles, dtype=np.float32)})
        return np.asarray(result[self.model.outputs[0]])


def openvino_capabilities() -> list[str]:
    """OpenVINO's CPU capabilities (FP32, INT8, BF16, FP16...), empty when not installed."""
    try:
        import openvino as ov
    except ImportError:
        return []
    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def measure_vision(
    bundle: str,
    backend: str,
    precision: str,
    threads: int,
    reps: int = 3,
    time_box_s: float = 60.0,
    ov_hint: str | None = None,
) -> dict:
    """Milliseconds per tile of one vision backend (ort-cpu, openvino, ort-cuda, tensorrt)."""
    from eyecare_edge.bundle import read_manifest
    from eyecare_edge.vision import open_vision

    manifest = read_manifest(bundle)
    tile = manifest.preprocess_config().tile_size
    t = time.perf_counter()
    if backend == "openvino" and ov_hint is not None:
        entry = manifest.find("vision", format="onnx", precision=precision)
        if entry is None:
            raise ValueError(f"bundle has no {precision} vision ONNX")
        encoder = _OpenVinoHinted(Path(bundle) / entry.path, ov_hint, threads)
        label = f"{precision} (inference {ov_hint})"
    else:
        choice = open_vision(bundle, manifest, precision=precision, backend=backend, threads=threads)
        encoder = choice.encoder
        label = encoder.precision
    load_s = time.perf_counter() - t
    x = random_tiles(1, tile)
    t = time.perf_counter()
    encoder.encode(x)  # warm-up: first-run allocations, kernel selection
    first_s = time.perf_counter() - t
    best, done = _timed_best(lambda: encoder.encode(x), reps, max(time_box_s - first_s, 0.0))
    return {
        "backend": backend,
        "name": getattr(encoder, "name", backend),
        "precision": label,
        "load_s": load_s,
        "first_ms": 1000.0 * first_s,
        "ms_per_tile": 1000.0 * best,
        "reps": done,
        "threads": threads,
    }


def prompt_pieces(manifest, question: str) -> tuple[str, str]:
    """The bundle's chat prompt for one image, split at the image: (text before, text after)."""
    from eyecare_edge.prompts import IMAGE_PLACEHOLDER, Message, get_template, render, with_image_placeholders

    text = render(
        get_template(manifest.prompt.template),
        [Message("user", with_image_placeholders(question, 1))],
        system=manifest.prompt.system,
    )
    head, sep, tail = text.partition(IMAGE_PLACEHOLDER)
    if not sep:
        raise ValueError("the rendered prompt has no image placeholder")
    return head, tail


def _decode_steps(lm, n_steps: int, time_box_s: float) -> tuple[int, float]:
    """Greedy one-token decodes (argmax of the last logits, fed back), ignoring end tokens."""
    steps, t0 = 0, time.perf_counter()
    while steps < n_steps:
        token = int(np.argmax(lm.last_logits()))
        lm.eval_tokens([token])
        steps += 1
        elapsed = time.perf_counter() - t0
        if steps >= 2 and elapsed * (steps + 1) / steps > time_box_s:
            break
    return steps, time.perf_counter() - t0


def measure_llm(
    bundle: str,
    precision: str,
    visual_npy: str,
    shape: dict,
    question: str = DEFAULT_QUESTION,
    n_decode: int = 64,
    options: dict | None = None,
    max_prompt: int | None = None,
    time_box_s: float = 60.0,
) -> dict:
    """Prefill tok/s of the image prompt and decode tok/s of one GGUF under llama.cpp settings.

    max_prompt: evaluate only the first max_prompt prompt positions (a time box) and scale the
    prefill time to the whole prompt with the FLOP model (`shape` is the LLMShape at this depth)."""
    from eyecare_edge.bundle import read_manifest
    from eyecare_edge.llm import LlamaCppLM, LLMOptions
    from eyecare_edge.pipeline import choose_llm

    manifest = read_manifest(bundle)
    entry = choose_llm(manifest, precision)
    visual = np.load(visual_npy)
    head, tail = prompt_pieces(manifest, question)
    llm_shape = LLMShape(**shape)
    opts = dict(options or {})
    t = time.perf_counter()
    lm = LlamaCppLM(Path(bundle) / entry.path, LLMOptions(**opts))
    load_s = time.perf_counter() - t
    try:
        n_head, n_tail = len(lm.tokenize(head)), len(lm.tokenize(tail))
        n_prompt = n_head + visual.shape[0] + n_tail
        measured_prompt = n_prompt if max_prompt is None else max(min(max_prompt, n_prompt), n_head + 1)
        rows = min(visual.shape[0], measured_prompt - n_head)
        parts: list = [head, visual[:rows]]
        if rows == visual.shape[0]:
            parts.append(tail)
        t = time.perf_counter()
        n_eval = lm.eval_prompt(parts)
        prefill_measured = time.perf_counter() - t
        prefill_s = prefill_measured * llm_shape.prefill_flops(n_prompt) / llm_shape.prefill_flops(n_eval)
        steps, decode_s = _decode_steps(lm, n_decode - 1, time_box_s)
    finally:
        lm.close()
    return {
        "precision": entry.precision,
        "file": entry.path,
        "file_bytes": entry.size,
        "options": {**LLMOptions(**opts).__dict__},
        "load_s": load_s,
        "n_prompt": n_prompt,
        "prefill_tokens_measured": n_eval,
        "prefill_ms": 1000.0 * prefill_s,
        "prefill_tok_s": n_prompt / prefill_s,
        "decode_tokens_measured": steps,
        "decode_tok_s": steps / decode_s if decode_s > 0 else 0.0,
    }


class ChunkedVision:
    """A vision encoder fed `chunk` tiles at a time (a setting proposed by this benchmark).

    On a CPU one 384^2 tile is already 729 rows per matrix product, enough to fill the kernels,
    while ONNX Runtime's memory arena grows with the batch: encoding a 7-tile image in one call
    raised peak RSS by ~0.8 GB per call at the cut depth for no speed gain."""

    def __init__(self, encoder, chunk: int) -> None:
        self.encoder, self.chunk = encoder, max(int(chunk), 1)
        self.name, self.precision, self.width = encoder.name, encoder.precision, encoder.width

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        parts = [self.encoder.encode(tiles[i : i + self.chunk]) for i in range(0, tiles.shape[0], self.chunk)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def _rebuilt(pipe, *, anyres_max: int | None = None, vision_chunk: int | None = None):
    """The same loaded pipeline with another compression cap and/or a chunked vision encoder,
    through Pipeline's public constructor (PipelineOptions has neither)."""
    from eyecare_edge.pipeline import Pipeline
    from eyecare_edge.vision import VisionChoice

    pre = pipe.preprocess if anyres_max is None else pipe.preprocess.replace(anyres_max=anyres_max)
    vision = pipe.vision
    if vision_chunk:
        vision = VisionChoice(ChunkedVision(vision.encoder, vision_chunk), vision.skipped)
    return Pipeline(
        pipe.bundle,
        pipe.manifest,
        pipe.options,
        pre,
        vision,
        pipe.lm,
        pipe.newline,
        pipe.llm_entry,
        pipe.budget,
    )


def _load_pipeline(bundle: str, options: dict, anyres_max: int | None, vision_chunk: int | None = None):
    from eyecare_edge.pipeline import Pipeline

    t = time.perf_counter()
    pipe = Pipeline.load(bundle, **options)
    load_s = time.perf_counter() - t
    if (anyres_max is not None and anyres_max != pipe.preprocess.anyres_max) or vision_chunk:
        pipe = _rebuilt(pipe, anyres_max=anyres_max, vision_chunk=vision_chunk)
    return pipe, load_s


def loaded_files(pipe) -> dict[str, int]:
    """Bundle files this pipeline loaded (GGUF, vision graph and its data, newline), with sizes."""
    from eyecare_edge.vision import newline_entry, onnx_files

    m = pipe.manifest
    files = {pipe.llm_entry.path: pipe.llm_entry.size}
    nl = newline_entry(m)
    files[nl.path] = nl.size
    enc = pipe.vision.encoder
    entry = m.find("vision", format="onnx", precision=enc.precision)
    if entry is not None and "tensorrt" not in enc.name:
        for f in onnx_files(m, entry):
            files[f.path] = f.size
    for f in m.files:  # TensorRT: the engine it ran
        if f.format == "engine" and "tensorrt" in enc.name and f.precision == enc.precision:
            files[f.path] = f.size
    return files


def measure_pipeline(
    bundle: str,
    image: str,
    question: str = DEFAULT_QUESTION,
    n_decode: int = 64,
    options: dict | None = None,
    anyres_max: int | None = None,
    save_visual: str | None = None,
    time_box_s: float = 60.0,
    vision_chunk: int | None = None,
    repeats: int = 1,
) -> dict:
    """`Pipeline.load` + one `ask` about `image`, timed by the pipeline itself. repeats > 1:
    the image is asked about again (its KV prefix forgotten) and the fastest TTFT is kept, for
    figures that have to be compared on a machine shared with other work.

    The vision backend is warmed first (a full `encode_images` when save_visual is given, which
    also saves the visual sequence for `measure_llm`; else one tile), so TTFT is that of a loaded
    service, not of its first request. The LLM is not warmed (neither is the reference's)."""
    from eyecare_edge.images import load_image
    from eyecare_edge.preprocess import plan_image

    pipe, load_s = _load_pipeline(bundle, options or {}, anyres_max, vision_chunk)
    try:
        t = time.perf_counter()
        if save_visual is not None:
            (seq,) = pipe.encode_images(image)
            np.save(save_visual, np.ascontiguousarray(seq, dtype=np.float32))
        else:
            pipe.vision.encoder.encode(random_tiles(1, pipe.preprocess.tile_size))
        warm_s = time.perf_counter() - t
        answer = pipe.ask(image, question, max_tokens=n_decode)
        ttfts = [answer.timings["first_token_ms"]]
        for _ in range(max(int(repeats), 1) - 1):
            pipe.forget_images()
            again = pipe.ask(image, question, max_tokens=n_decode)
            ttfts.append(again.timings["first_token_ms"])
            if again.timings["first_token_ms"] < answer.timings["first_token_ms"]:
                answer = again
        rgb_shape = load_image(image).rgb.shape[:2]
        plan = plan_image(rgb_shape, pipe.preprocess)
        out = {
            "describe": pipe.describe(),
            "vision_backend": pipe.vision.encoder.name,
            "vision_device": pipe.vision.where,
            "vision_skipped": list(pipe.vision.skipped),
            "llm_device": pipe.lm.describe_device(),
            "llm_flash_attn": pipe.lm.flash_attn,  # as llama.cpp got it: enabled | disabled | auto
            "vision_precision": pipe.vision.encoder.precision,
            "llm_precision": pipe.llm_entry.precision,
            "n_ctx": pipe.lm.n_ctx,
            "n_batch": pipe.lm.n_batch,
            # with kv_type/flash_attn/n_ubatch as llama.cpp got them (the Pipeline resolves auto and None)
            "options": {
                **{k: v for k, v in pipe.options.__dict__.items() if not k.startswith("_")},
                "kv_type": pipe.lm.options.kv_type,
                "n_ubatch": pipe.lm.n_ubatch,
                "flash_attn": pipe.lm.options.flash_attn,
            },
            "preprocess": {"max_tiles": pipe.preprocess.max_tiles, "anyres_max": pipe.preprocess.anyres_max},
            "vision_chunk": vision_chunk,
            "load_s": load_s,
            "warm_s": warm_s,
            "n_tiles": plan.n_tiles,
            "n_image_tokens": answer.n_image_tokens,
            "n_prompt": answer.n_prompt_tokens,
            "n_generated": answer.n_generated,
            "stop_reason": answer.stop_reason,
            "timings": answer.timings,
            "ttft_ms_repeats": ttfts,
            "loaded_files": loaded_files(pipe),
        }
        if n_decode > 1:
            if answer.n_generated >= n_decode:
                out["decode_tok_s"] = answer.tokens_per_s
                out["decode_tokens_measured"] = answer.n_generated - 1
            else:  # stopped early (random weights): time the missing steps the same way
                steps, secs = _decode_steps(pipe.lm, n_decode - 1, time_box_s)
                out["decode_tok_s"] = steps / secs if secs > 0 else 0.0
                out["decode_tokens_measured"] = steps
        return out
    finally:
        pipe.close()


def closed_qa_accuracy(
    bundle: str,
    bench: str,
    budgets: list[dict],
    limit: int | None = None,
    options: dict | None = None,
    max_tokens: int = 16,
) -> list[dict]:
    """Closed-QA accuracy (and mean TTFT) of a bundle under each budget `{"name", "max_tiles",
    "anyres_max"}`; answers parsed with the bench's `parse_choice`."""
    from eyecare_edge.bench.metrics import accuracy_with_ci
    from eyecare_edge.qa.answers import parse_choice
    from eyecare_edge.qa.loaders import load_bench

    records = [r for r in load_bench(bench) if r.task == "closed"]
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError(f"{bench}: no closed-QA records")
    rows = []
    for b in budgets:
        opts = dict(options or {})
        if b.get("max_tiles") is not None:
            opts["max_tiles"] = b["max_tiles"]
        try:
            pipe, _ = _load_pipeline(bundle, opts, b.get("anyres_max"))
        except Exception as e:  # a budget the bundle's pinpoints cannot satisfy
            rows.append({"name": b["name"], "skipped": f"{type(e).__name__}: {e}"})
            continue
        hits, ttft = [], []
        try:
            for r in records:
                ans = pipe.ask(r.images, r.prompt_text(), max_tokens=max_tokens)
                hits.append(parse_choice(ans.text, r.options) == r.answer)
                ttft.append(ans.timings.get("first_token_ms", 0.0))
        finally:
            pipe.close()
        acc, lo, hi = accuracy_with_ci(hits)
        rows.append(
            {
                "name": b["name"],
                "accuracy": acc,
                "ci_low": lo,
                "ci_high": hi,
                "n": len(records),
                "correct": int(sum(hits)),
                "mean_ttft_ms": float(np.mean(ttft)),
            }
        )
    return rows
