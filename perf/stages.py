"""The stages of a perf run after the default pipeline: vision backends, llama.cpp weight types,
token budgets (max tiles), closed-QA accuracy per budget and the llama.cpp settings sweep. Each
measurement is a child (`runner.Runner.child`); a failure is recorded and the run goes on."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from eyecare_edge.perf.inputs import budget_list, same_budget
from eyecare_edge.perf.options import PerfOptions
from eyecare_edge.perf.runner import Runner

# llama.cpp settings tried by --sweep (on the default weight type): label -> (LLMOptions changes,
# environment of the child). OMP_WAIT_POLICY=PASSIVE: llama.cpp's CPU build synchronises its
# threads with OpenMP barriers, which spin while a sibling thread is descheduled.
SWEEP: dict[str, tuple[dict, dict]] = {
    "default": ({}, {}),
    # the default's KV cache on the CPU is K in Q8_0, V in F16 (`pipeline.plan.choose_kv_cache`)
    "kv f16, no flash": ({"kv_type": "f16", "flash_attn": False}, {}),
    "repack off": ({"repack": False}, {}),
    "flash attention": ({"flash_attn": True}, {}),
    "flash + q8_0 KV": ({"flash_attn": True, "kv_type": "q8_0"}, {}),
    "ubatch 512": ({"n_ubatch": 512}, {}),
    "batch/ubatch 1024": ({"n_batch": 1024, "n_ubatch": 1024}, {}),
    "repack off + flash": ({"repack": False, "flash_attn": True}, {}),
    "1 thread": ({"n_threads": 1}, {}),
    "OMP passive": ({}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "GOMP_SPINCOUNT=10000": ({}, {"GOMP_SPINCOUNT": "10000"}),
    "OMP passive + repack off": ({"repack": False}, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "OMP passive + repack off + flash": (
        {"repack": False, "flash_attn": True},
        {"OMP_WAIT_POLICY": "PASSIVE"},
    ),
}


def measure_vision_backends(
    runner: Runner, bundle: Path, manifest, threads: int, box: float, gpu: bool, gpu_why: str
) -> list[dict]:
    from eyecare_edge.perf.runtime import openvino_capabilities

    have = set(manifest.precisions("vision", "onnx"))
    rows: list[dict] = []
    plan: list[tuple[str, str, str, str | None]] = []
    for p in ("fp32", "int8", "int8_u8s8"):
        if p in have:
            plan.append((f"ONNX Runtime CPU {p.upper()}", "ort-cpu", p, None))
    caps = openvino_capabilities()
    if not caps:
        rows.append(
            {
                "system": "OpenVINO",
                "skipped": "openvino is not installed (pip install 'eyecare-edge[openvino]')",
            }
        )
    else:
        if "fp32" in have:
            plan.append(("OpenVINO FP32", "openvino", "fp32", "f32"))
            if "BF16" in caps:
                plan.append(("OpenVINO BF16", "openvino", "fp32", "bf16"))
            else:
                rows.append(
                    {
                        "system": "OpenVINO BF16",
                        "skipped": f"this CPU has no BF16 in OpenVINO (capabilities {caps})",
                    }
                )
        for p in ("int8", "int8_u8s8"):
            if p in have:
                plan.append((f"OpenVINO {p.upper()}", "openvino", p, None))
    if gpu:
        for backend, p in (("tensorrt", "fp16"), ("tensorrt", "int8"), ("ort-cuda", "fp16")):
            if p in have:
                plan.append(
                    (
                        f"{'TensorRT' if backend == 'tensorrt' else 'ONNX Runtime CUDA'} {p.upper()}",
                        backend,
                        p,
                        None,
                    )
                )
    else:
        rows.append({"system": "GPU vision (TensorRT / ONNX Runtime CUDA)", "skipped": gpu_why})
    for name, backend, precision, hint in plan:
        row = runner.child(
            name,
            "eyecare_edge.perf.runtime:measure_vision",
            {
                "bundle": str(bundle),
                "backend": backend,
                "precision": precision,
                "threads": threads,
                "time_box_s": box,
                "ov_hint": hint,
            },
        )
        row["kind"] = "gpu" if backend in ("tensorrt", "ort-cuda") else "cpu"
        rows.append(row)
    return rows


def _max_prompt(llm_shape, pipeline: dict, box: float) -> int | None:
    """Prompt positions a llama.cpp variant may prefill within the box, predicted from the
    default run's prefill rate (None: all of them)."""
    from eyecare_edge.costs import largest_prefix

    n = pipeline.get("n_prompt")
    ms = pipeline.get("timings", {}).get("prefill_ms")
    if not n or not ms:
        return None
    flops_per_s = llm_shape.prefill_flops(n) / (ms / 1000.0)
    p = largest_prefix(llm_shape, n, flops_per_s, box)
    return None if p >= n else p


def measure_llm_variants(runner, opts, bundle, manifest, visual_npy, llm_shape, box) -> list[dict]:
    have = manifest.precisions("llm", "gguf")
    default = runner.state.pipeline
    rows = []
    for q in opts.llm_variants:
        name = f"llama.cpp {q.upper()}"
        if q not in have:
            rows.append({"system": name, "precision": q, "skipped": f"the bundle has no {q} GGUF"})
            continue
        if default.get("llm_precision") == q and "error" not in default:
            t = default["timings"]
            rows.append(
                {
                    "system": name,
                    "precision": q,
                    "from": "eyecare-edge default",
                    "n_prompt": default["n_prompt"],
                    "prefill_tokens_measured": default["n_prompt"],
                    "prefill_ms": t["prefill_ms"],
                    "prefill_tok_s": default["n_prompt"] / (t["prefill_ms"] / 1000.0),
                    "decode_tok_s": default.get("decode_tok_s"),
                    "decode_tokens_measured": default.get("decode_tokens_measured"),
                    "file_bytes": default["loaded_files"].get(f"llm_{q}.gguf")
                    or next((f.size for f in manifest.files if f.role == "llm" and f.precision == q), None),
                    "peak_rss_bytes": default.get("peak_rss_bytes"),
                    "options": {
                        k: default["options"].get(k)
                        for k in ("n_batch", "n_ubatch", "repack", "flash_attn", "kv_type", "n_threads")
                    },
                }
            )
            continue
        if not visual_npy.exists():
            rows.append(
                {"system": name, "precision": q, "skipped": "no visual rows (the default run failed)"}
            )
            continue
        args = _llm_args(opts, bundle, q, visual_npy, llm_shape, box, _llm_options(opts, default))
        args["max_prompt"] = _max_prompt(llm_shape, default, box)
        rows.append(runner.child(name, "eyecare_edge.perf.runtime:measure_llm", args))
    return rows


def _llm_args(opts: PerfOptions, bundle, q: str, visual_npy, llm_shape, box: float, options: dict) -> dict:
    """`measure_llm`'s keyword arguments for GGUF `q` on the default run's visual rows."""
    return {
        "bundle": str(bundle),
        "precision": q,
        "visual_npy": str(visual_npy),
        "shape": asdict(llm_shape),
        "question": opts.question,
        "n_decode": opts.n_decode,
        "options": options,
        "max_prompt": None,
        "time_box_s": box,
    }


def _llm_options(opts: PerfOptions, default: dict, **changes) -> dict:
    """The default pipeline's llama.cpp settings (same n_ctx, batch, threads), plus changes."""
    o = default.get("options", {})
    base = {
        "n_ctx": default.get("n_ctx") or 4096,
        "n_batch": o.get("n_batch", 512),
        "n_ubatch": o.get("n_ubatch") or o.get("n_batch", 512),
        "n_threads": opts.threads,
        "kv_type": o.get("kv_type", "f16"),
        "flash_attn": o.get("flash_attn", False),
        "repack": o.get("repack", True),
    }
    base.update(changes)
    if base["n_ubatch"] > base["n_batch"]:
        base["n_ubatch"] = base["n_batch"]
    return base


def measure_budgets(runner, opts, bundle, image, preprocess, default: dict, box: float) -> list[dict]:
    rows = []
    for b in budget_list(opts.budgets, opts.fast_budget):
        try:
            preprocess.replace(**{k: v for k, v in b.items() if k != "name" and v is not None})
        except ValueError as e:
            rows.append({**b, "skipped": f"does not fit the bundle's pinpoints ({e})"})
            continue
        if same_budget(b, preprocess) and "error" not in default:
            rows.append({**b, "from": "eyecare-edge default", **_ttft_fields(default)})
            continue
        res = runner.child(
            f"budget {b['name']}",
            "eyecare_edge.perf.runtime:measure_pipeline",
            {
                "bundle": str(bundle),
                "image": str(image),
                "question": opts.question,
                "n_decode": 1,
                "options": {
                    "n_threads": opts.threads,
                    "vision_threads": opts.threads,
                    **({"max_tiles": b["max_tiles"]} if b["max_tiles"] is not None else {}),
                },
                "anyres_max": b["anyres_max"],
                "time_box_s": box,
            },
        )
        rows.append({**b, **_ttft_fields(res)})
    return rows


def _ttft_fields(res: dict) -> dict:
    if "error" in res:
        return {"error": res["error"]}
    return {
        "n_tiles": res["n_tiles"],
        "n_image_tokens": res["n_image_tokens"],
        "n_prompt": res["n_prompt"],
        "timings": res["timings"],
        "peak_rss_bytes": res.get("peak_rss_bytes"),
    }


def measure_accuracy(runner: Runner, opts: PerfOptions, threads: int) -> dict:
    budgets = budget_list(opts.budgets, opts.fast_budget)
    if opts.accuracy_data is None or (opts.accuracy_bundle is None and opts.accuracy_ckpt is None):
        return {
            "skipped": "no --accuracy-data with --accuracy-bundle/--accuracy-ckpt given (a trained tiny "
            "phantom model and its bench.jsonl, e.g. from `eyecare-edge demo`)"
        }
    if opts.accuracy_bundle is not None:
        res = runner.child(
            "accuracy per budget (bundle)",
            "eyecare_edge.perf.runtime:closed_qa_accuracy",
            {
                "bundle": str(opts.accuracy_bundle),
                "bench": str(opts.accuracy_data),
                "budgets": budgets,
                "limit": opts.accuracy_limit,
                "options": {"n_threads": opts.threads, "vision_threads": opts.threads},
            },
        )
        source = str(opts.accuracy_bundle)
    else:
        res = runner.child(
            "accuracy per budget (PyTorch)",
            "eyecare_edge.training.reference:closed_qa_accuracy_torch",
            {
                "ckpt": str(opts.accuracy_ckpt),
                "bench": str(opts.accuracy_data),
                "budgets": budgets,
                "limit": opts.accuracy_limit,
                "threads": threads,
            },
        )
        source = str(opts.accuracy_ckpt)
    if "error" in res:
        return {"source": source, "data": str(opts.accuracy_data), "error": res["error"]}
    return {"source": source, "data": str(opts.accuracy_data), "rows": res.get("value", [])}


def measure_sweep(runner, opts, bundle, manifest, visual_npy, llm_shape, box) -> list[dict]:
    default = runner.state.pipeline
    q = default.get("llm_precision", "q4_k_m")
    if not visual_npy.exists():
        return [{"skipped": "no visual rows (the default run failed)"}]
    rows = []
    for label, (change, env) in SWEEP.items():
        args = _llm_args(opts, bundle, q, visual_npy, llm_shape, box, _llm_options(opts, default, **change))
        args["n_decode"] = min(opts.n_decode, 32)
        row = runner.child(f"sweep {label}", "eyecare_edge.perf.runtime:measure_llm", args, env=env)
        row["setting"] = label
        row["env"] = env
        rows.append(row)
    return rows
