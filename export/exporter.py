"""`export_bundle`: one entry from an EyecareGPT checkpoint to a validated bundle.

Formats are a table (`eyecare_edge.formats.export_formats()`); each produced file is validated against the
checkpoint right after export, the figures go into the manifest, and a tolerance breach fails the
export naming the check (unless `validate=False`). TensorRT engines are not made here: they are
built on the target GPU (`eyecare-edge build-engine`), never shipped between machines.

Memory: the torch model is needed by the ONNX and GGUF writers and for the reference figures; it
is released before llama.cpp loads GGUFs for validation, so a 3.8B export holds one model at a time.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from eyecare_edge.training.digest import checkpoint_digest

from eyecare_edge.bundle import Manifest, PromptSpec, add_file, write_manifest
from eyecare_edge.errors import EyecareError
from eyecare_edge.formats import export_formats, format_names
from eyecare_edge.preprocess import PreprocessConfig, apply_budget, preprocess_image
from eyecare_edge.prompts import REPORT_PROMPT, get_template
from eyecare_edge.reduce import NAMED_BUDGETS

VISION_FORMATS = format_names("vision")
LLM_FORMATS = format_names("llm")
# the GGUF writer emits these; the other LLM types are quantized from one of them by llama.cpp
UNQUANTIZED_LLM = tuple(f.name for f in export_formats() if f.role == "llm" and f.written)
# fp16: the GPU format (TensorRT FP16 engines, ONNX Runtime CUDA) — a default bundle must run on a
# GPU workstation's fast path, not silently on its CPU. int8: TensorRT's INT8 input (FP16 base);
# int8_u8s8: the CPU's fast path. All from the table (`eyecare_edge.formats`, column `default`).
DEFAULT_VISION = format_names("vision", default=True)
DEFAULT_LLM = format_names("llm", default=True)
CALIBRATION_CACHE = Path(tempfile.gettempdir()) / "eyecare-edge-calibration"


class ExportError(EyecareError):
    """Export could not finish; the message says which step and why."""


@dataclass
class ExportOptions:
    vision: tuple[str, ...] = DEFAULT_VISION
    llm: tuple[str, ...] = DEFAULT_LLM
    # Folder of images, bench JSONL or LLaVA JSON; None = the sample images shipped with the package.
    calibration: Path | None = None
    calibration_images: int = 16
    validation_images: int = 2
    max_tiles: int | None = None
    anyres_max: int | None = None
    budget: str | None = None
    validate: bool = True
    threads: int | None = None


@dataclass
class StepRow:
    """One line of the summary table."""

    file: str
    size: int
    seconds: float
    figure: str = ""


@dataclass
class ExportResult:
    bundle: Path
    manifest: Manifest
    rows: list[StepRow] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


class ExportFailed(ExportError):
    """A validation check failed; the bundle was written, with the failing figures, for inspection."""

    def __init__(self, result: ExportResult) -> None:
        super().__init__("validation failed: " + " | ".join(result.failed))
        self.result = result


# --------------------------------------------------------------------------------------------
# small pure helpers
# --------------------------------------------------------------------------------------------


def _normalise_formats(options: ExportOptions) -> None:
    for name, have, known in (("vision", options.vision, VISION_FORMATS), ("llm", options.llm, LLM_FORMATS)):
        unknown = [x for x in have if x not in known]
        if unknown:
            raise ExportError(f"unknown {name} format(s) {unknown}; known: {', '.join(known)}")
    if options.vision and "fp32" not in options.vision:
        # every other vision variant is derived from, and validated against, the FP32 graph
        options.vision = ("fp32", *options.vision)


def bundle_preprocess(base: PreprocessConfig, options: ExportOptions) -> PreprocessConfig:
    """The checkpoint's preprocessing with the export's token budget applied."""
    if options.budget in NAMED_BUDGETS:  # tiles here; kept tokens go to manifest.budget
        tiles = NAMED_BUDGETS[options.budget]["max_tiles"]
        pre = base.replace(max_tiles=tiles) if tiles is not None else base
    else:
        pre = apply_budget(base, options.budget) if options.budget else base
    changes = {
        k: v
        for k, v in (("max_tiles", options.max_tiles), ("anyres_max", options.anyres_max))
        if v is not None
    }
    return pre.replace(**changes) if changes else pre


def bundle_budget(options: ExportOptions) -> dict:
    """The token budget `export --budget NAME` bakes into the manifest (empty: every token)."""
    b = NAMED_BUDGETS.get(options.budget or "")
    if b is None or b["visual_tokens"] is None:
        return {}
    return {"name": options.budget, "visual_tokens": b["visual_tokens"], "method": b["method"]}


def model_info(cfg) -> dict:
    tc, vc = cfg.text_config, cfg.vision_config
    return {
        "arch": "eyecare_gpt",
        "preset": cfg.preset,
        "llm_arch": tc.model_type,
        "n_embd": tc.hidden_size,
        "llm_layers": tc.num_hidden_layers,
        "vocab_size": tc.vocab_size,
        # Phi-3.5 LongRoPE: keep n_ctx <= the original context for HF-equal behaviour (ANCHORS.md)
        "context_length": getattr(tc, "original_max_position_embeddings", None) or tc.max_position_embeddings,
        "vision_hidden": vc.hidden_size,
        "vision_layers": vc.num_hidden_layers,
        "tokens_per_tile": cfg.preprocess_config().tokens_per_tile,
        "ldc_layers": {
            "fine": cfg.ldc_fine_layers,
            "coarse": cfg.ldc_coarse_layers,
            "last": cfg.ldc_last_layer,
        },
    }


def _fmt(figures: dict, keys: tuple[str, ...]) -> str:
    return ", ".join(f"{k}={figures[k]:.4g}" for k in keys if isinstance(figures.get(k), (int, float)))


def _jsonable(figures: dict) -> dict:
    return {k: v.item() if isinstance(v, (np.floating, np.integer)) else v for k, v in figures.items()}


def default_calibration_source() -> Path:
    from eyecare_edge.examples import EXAMPLES_DIR

    return EXAMPLES_DIR


def held_out_images(source: Path, used: list[str], n: int) -> list[np.ndarray]:
    """Validation images that calibration did not use (reusing used ones when the source is small)."""
    from eyecare_edge.calibration.data import image_paths

    from eyecare_edge.images import ImageError, load_image

    paths = image_paths(source)
    used_set = set(used)
    ordered = [p for p in paths if str(p) not in used_set] + [p for p in paths if str(p) in used_set]
    picked: list[np.ndarray] = []
    for p in ordered:
        try:
            picked.append(load_image(p).rgb)
        except ImageError:
            continue
        if len(picked) == n:
            break
    if not picked:
        raise ExportError(f"{source}: no decodable image to validate with")
    return picked


# --------------------------------------------------------------------------------------------
# the steps
# --------------------------------------------------------------------------------------------


@dataclass
class _Ctx:
    """State shared by the steps of one export."""

    root: Path
    options: ExportOptions
    pre: PreprocessConfig
    manifest: Manifest
    progress: Callable[[str], None]
    calib_source: Path
    rows: list[StepRow] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    calib_used: list[str] = field(default_factory=list)

    def record(self, rel: str, role: str, precision: str, seconds: float, **extra) -> StepRow:
        entry = add_file(self.root, self.manifest, rel, role=role, precision=precision, **extra)
        row = StepRow(rel, entry.size, seconds)
        self.rows = [r for r in self.rows if r.file != rel] + [row]
        return row

    def add_validation(self, name: str, figures: dict) -> None:
        self.manifest.validation[name] = _jsonable(figures)
        if not figures.get("passed", True):
            self.failed.append(f"{name}: " + "; ".join(figures.get("failed", [])))


def tensorrt_int8_onnx(fp32_onnx: Path, dst: Path, tiles, **quantize_kwargs):
    """`vision_int8.onnx`, TensorRT's INT8 input: the S8S8 Q/DQ graph on an FP16 base.

    A strongly typed TensorRT build of a Q/DQ graph on an FP32 base runs attention, LayerNorm and
    GELU in FP32; on an FP16 base only the FP16 pass's keep-list (LayerNorm, reductions) is FP32.
    Every scale is floored at float16's smallest normal (the int8 values computed for it), so
    none becomes 0 or subnormal in FP16, which TensorRT rejects. Returns the QuantizeResult with
    `path` = `dst`; the ranges file lands beside `dst` as for any INT8 variant.
    """
    from eyecare_edge.calibration.qdq import quantize_vision_int8, ranges_path_for
    from eyecare_edge.export.onnx_fp16 import FP16_MIN_NORMAL, convert_fp16

    dst = Path(dst)
    work = Path(tempfile.mkdtemp(prefix="eyecare-qdq-"))
    try:
        res = quantize_vision_int8(
            fp32_onnx, work / dst.name, tiles, symmetric_activations=True, min_scale=FP16_MIN_NORMAL,
            **quantize_kwargs,
        )  # fmt: skip
        convert_fp16(res.path, dst)
        shutil.copyfile(res.ranges_path, ranges_path_for(dst))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res.path, res.ranges_path = dst, ranges_path_for(dst)
    return res


def _export_vision(ctx: _Ctx, model) -> dict[str, Path]:
    from eyecare_edge.calibration.data import CalibrationReport, calibration_tiles, data_digest
    from eyecare_edge.calibration.qdq import quantize_vision_int8
    from eyecare_edge.export.onnx_fp16 import convert_fp16
    from eyecare_edge.export.onnx_vision import data_file_name, export_vision_onnx

    opts, root = ctx.options, ctx.root
    paths: dict[str, Path] = {}
    seconds: dict[str, float] = {}
    extra: dict[str, dict] = {}
    t = time.perf_counter()
    ctx.progress("vision: exporting FP32 ONNX (SigLIP + dense connector + projector)")
    paths["fp32"] = export_vision_onnx(model, root / "vision_fp32.onnx")
    seconds["fp32"] = time.perf_counter() - t
    if "fp16" in opts.vision:
        t = time.perf_counter()
        ctx.progress("vision: converting to FP16 (LayerNorm and reductions kept in FP32)")
        paths["fp16"] = convert_fp16(paths["fp32"], root / "vision_fp16.onnx")
        seconds["fp16"] = time.perf_counter() - t
    int8 = [p for p in ("int8", "int8_u8s8") if p in opts.vision]
    if int8:
        report = CalibrationReport(str(ctx.calib_source))
        digest = data_digest(ctx.calib_source, ctx.pre, max_images=opts.calibration_images)
        tiles = None
        for precision in int8:
            t = time.perf_counter()
            ctx.progress(f"vision: INT8 {precision} (calibration: {ctx.calib_source})")
            if tiles is None:
                tiles = list(
                    calibration_tiles(
                        ctx.calib_source, ctx.pre, max_images=opts.calibration_images, report=report
                    )
                )
            tensorrt = precision == "int8"
            dst = root / f"vision_{precision}.onnx"
            kwargs = {"cache_dir": CALIBRATION_CACHE, "data_digest": digest, "threads": opts.threads}
            if tensorrt:
                res = tensorrt_int8_onnx(paths["fp32"], dst, tiles, **kwargs)
            else:
                res = quantize_vision_int8(paths["fp32"], dst, tiles, symmetric_activations=False, **kwargs)
            paths[precision] = dst
            seconds[precision] = time.perf_counter() - t
            extra[precision] = {
                **({"base": "fp16"} if tensorrt else {}),
                "calibration": {
                    "source": str(ctx.calib_source),
                    "images": len(report.images),
                    "skipped": report.n_skipped,
                    "tiles": res.n_calibration_tiles,
                    "cache_hit": res.cache_hit,
                    "settings": res.settings,
                }
            }
        ctx.calib_used = list(report.images)
    for precision, path in paths.items():
        data = path.parent / data_file_name(path)
        if data.exists():
            ctx.record(data.name, "vision", precision, 0.0)
        ctx.record(path.name, "vision", precision, seconds[precision], **extra.get(precision, {}))
    return paths


def _validate_vision(ctx: _Ctx, model, paths: dict[str, Path]) -> None:
    from eyecare_edge.export.vision_validate import validate_vision

    ctx.progress("vision: validating every variant against torch on held-out images")
    images = held_out_images(ctx.calib_source, ctx.calib_used, ctx.options.validation_images)
    tiles = np.concatenate([preprocess_image(im, ctx.pre).tiles for im in images])[:12]
    figures = validate_vision(model, paths, tiles, threads=ctx.options.threads)
    for precision, figs in figures.items():
        ctx.add_validation(f"vision_{precision}", figs)
        keys = (
            ("max_abs", "cosine_min")
            if precision == "fp32"
            else (
                ("qdq_exact_cosine_mean", "cosine_mean") if precision.startswith("int8") else ("cosine_min",)
            )
        )
        next(r for r in ctx.rows if r.file == paths[precision].name).figure = _fmt(figs, keys)


def _write_llm(ctx: _Ctx, model, tokenizer, tmp_dir: Path) -> tuple[dict[str, Path], str | None]:
    """The unquantized GGUFs asked for, plus the source of the quantized ones (in tmp if not asked)."""
    from eyecare_edge.export.gguf_writer import write_llm_gguf

    asked = [q for q in ctx.options.llm if q in UNQUANTIZED_LLM]
    quantized = [q for q in ctx.options.llm if q not in UNQUANTIZED_LLM]
    source = "f32" if "f32" in asked else ("f16" if quantized or "f16" in asked else None)
    written: dict[str, Path] = {}
    for q in asked + ([source] if source and source not in asked else []):
        t = time.perf_counter()
        ctx.progress(f"llm: writing GGUF {q.upper()}")
        dst = (ctx.root if q in asked else tmp_dir) / f"llm_{q}.gguf"
        write_llm_gguf(
            model.language_model,
            tokenizer,
            dst,
            out_type=q,
            name=f"eyecare-{model.config.preset or 'model'}",
            chat_template=getattr(tokenizer, "chat_template", None),
        )
        written[q] = dst
        if q in asked:
            ctx.record(dst.name, "llm", q, time.perf_counter() - t)
    return written, source


def _quantize_llm(ctx: _Ctx, written: dict[str, Path], source: str | None) -> None:
    from eyecare_edge.export.gguf_quantize import quantize_gguf

    for q in ctx.options.llm:
        if q in written:
            continue
        t = time.perf_counter()
        ctx.progress(f"llm: quantizing {source.upper()} -> {q.upper()} (llama.cpp)")
        dst = quantize_gguf(written[source], ctx.root / f"llm_{q}.gguf", q, n_threads=ctx.options.threads)
        written[q] = dst
        ctx.record(dst.name, "llm", q, time.perf_counter() - t)


def _validate_llm(ctx: _Ctx, written: dict[str, Path], probes, probe_texts: list[str], tokenizer) -> None:
    from eyecare_edge.export.llm_validate import tokenizer_agreement, validate_gguf

    first = True
    for q in ctx.options.llm:
        ctx.progress(f"llm: validating {q.upper()} against the torch logits")
        figs = validate_gguf(written[q], q, probes, n_threads=ctx.options.threads)
        if first:  # one file suffices: all variants share the vocabulary written once
            mismatched = tokenizer_agreement(written[q], tokenizer, probe_texts)
            figs["tokenizer_mismatches"] = len(mismatched)
            if mismatched:
                figs["passed"] = False
                figs["failed"] = [
                    *figs["failed"],
                    f"GGUF tokenizer differs from the checkpoint's on {mismatched[:3]}",
                ]
            first = False
        ctx.add_validation(f"llm_{q}", figs)
        next(r for r in ctx.rows if r.file == written[q].name).figure = _fmt(
            figs, ("max_abs_rel", "kl_mean", "top1")
        )


def export_bundle(
    ckpt: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    progress: Callable[[str], None] = lambda msg: None,
) -> ExportResult:
    """Export `ckpt` to the bundle directory `out` (created; files of an earlier export replaced).

    Raises ExportFailed (with the written result) when a validation check fails.
    """
    from eyecare_edge.export.llm_validate import build_probes, probe_texts, special_whitespace
    from eyecare_edge.export.onnx_vision import save_image_newline
    from eyecare_edge.training.checkpoint import load_checkpoint

    options = options or ExportOptions()
    _normalise_formats(options)
    ckpt, root = Path(ckpt), Path(out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    progress(f"loading checkpoint {ckpt}")
    model, tokenizer = load_checkpoint(ckpt)
    cfg = model.config
    pre = bundle_preprocess(cfg.preprocess_config(), options)
    cfg.preprocess = pre.to_dict()  # validation sees what the runtime will see
    template = get_template(cfg.chat_template_name)
    rstrip, lstrip = special_whitespace(tokenizer)
    manifest = Manifest(
        model=model_info(cfg),
        preprocess=pre.to_dict(),
        prompt=PromptSpec(
            template=template.name,
            system=cfg.system_prompt if cfg.system_prompt is not None else template.default_system,
            stop_strings=list(template.stop_strings),
            report_prompt=REPORT_PROMPT,
            rstrip_specials=rstrip,
            lstrip_specials=lstrip,
        ),
        source={"checkpoint": str(ckpt.resolve()), "digest": checkpoint_digest(ckpt)},
        budget=bundle_budget(options),
    )
    calib = Path(options.calibration) if options.calibration else default_calibration_source()
    ctx = _Ctx(root, options, pre, manifest, progress, calib)

    save_image_newline(model, root / "image_newline.npy")
    ctx.record("image_newline.npy", "extra", "fp32", 0.0)
    if options.vision:
        paths = _export_vision(ctx, model)
        if options.validate:
            _validate_vision(ctx, model, paths)

    tmp_dir = Path(tempfile.mkdtemp(prefix="eyecare-export-"))
    try:
        written, source = _write_llm(ctx, model, tokenizer, tmp_dir) if options.llm else ({}, None)
        probes, texts = [], []
        if options.validate and options.llm:
            ctx.progress("llm: torch reference logits (text and injected-image prompts)")
            images = held_out_images(calib, ctx.calib_used, 1)
            probes = build_probes(model, tokenizer, images)
            texts = probe_texts(cfg)
        del model  # free torch memory before llama.cpp maps the GGUFs
        gc.collect()
        _quantize_llm(ctx, written, source)
        if options.validate and options.llm:
            _validate_llm(ctx, written, probes, texts, tokenizer)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

    manifest.validation["export"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "validated": options.validate,
        # nothing checked is nothing passed: an unvalidated bundle records None, not True
        "passed": (not ctx.failed) if options.validate else None,
    }
    write_manifest(root, manifest)
    result = ExportResult(root, manifest, ctx.rows, ctx.failed)
    if ctx.failed and options.validate:
        raise ExportFailed(result)
    return result
