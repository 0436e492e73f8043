"""The pipeline's formats: how a bundle is run (`PipelineOptions`, every field also a keyword of
`Pipeline.load`) and one answer (`Answer`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from eyecare_edge.image_source import DEFAULT_MAX_PIXELS


@dataclass
class PipelineOptions:
    """How `Pipeline.load` runs a bundle. Every field is also a keyword of `Pipeline.load`.

    vision: vision backend: auto | tensorrt | ort-cuda | ort-cpu | openvino.
    vision_precision: auto | fp32 | fp16 | int8 | int8_u8s8 (auto: fp16 on GPUs, the fastest
        validated INT8 variant on CPUs, else fp32).
    llm: GGUF precision in the bundle (q4_k_m, q8_0, f16, f32, ...) or auto (see LLM_AUTO_ORDER).
    n_ctx: context positions; None = the largest image plan after the token budget + TEXT_ROOM
        (512), to a multiple of 256, capped at the model's trained context (and at 4096 for
        Phi-3.5, see ANCHORS.md; `plan.default_n_ctx`).
    n_threads / vision_threads: CPU threads of llama.cpp and of the vision backend (None: the
        physical cores). n_gpu_layers: LLM layers offloaded to a GPU build of llama.cpp (None: all
        when the build can offload, else 0; -1 all; 0 CPU only).
    kv_type, flash_attn, n_batch, n_ubatch, repack: llama.cpp settings (see `LLMOptions`;
        flash_attn None = auto: llama.cpp's choice on a GPU, off on the CPU). kv_type "auto": on
        the CPU K in Q8_0 and V in F16 ("q8_0/f16"), on a GPU F16, with an F32 GGUF F32
        (`plan.choose_kv_cache`). n_ubatch None: 256 on the CPU, n_batch on a GPU
        (`plan.choose_ubatch`; the CPU value measured, see plan.py).
    fundus_crop: crop colour fundus photos to their circular field of view before tiling.
    max_tiles: token budget: at most this many patch tiles per image (None: the bundle's).
    visual_tokens: visual tokens the LLM reads per image: a count (800), a fraction of the
        image's full sequence (0.25, or "25%"), "all"; None: the bundle's budget (`export
        --budget`), else all. token_reduction: how they are chosen, pool | diverse (None: the
        bundle's, else pool). See `eyecare_edge.reduce`. n_ctx follows the budget.
    max_pixels: decoding limit (width x height x frames, checked on the header).
    verify: check the sha256 of each loaded file against the manifest.
    device: GPU ordinal for TensorRT / ONNX Runtime CUDA. build_engine: allow a first-use
        TensorRT engine build into the bundle. seed: sampling seed when temperature > 0.
    """

    vision: str = "auto"
    vision_precision: str = "auto"
    llm: str = "auto"
    n_ctx: int | None = None
    n_threads: int | None = None
    vision_threads: int | None = None
    n_gpu_layers: int | None = None
    kv_type: str = "auto"
    flash_attn: bool | None = None
    n_batch: int = 512
    n_ubatch: int | None = None
    repack: bool = False
    fundus_crop: bool = False
    max_tiles: int | None = None
    visual_tokens: int | float | str | None = None
    token_reduction: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    verify: bool = True
    device: int = 0
    build_engine: bool = True
    seed: int = 0


@dataclass
class Answer:
    """One answer. timings are milliseconds: decode_ms (reading and decoding the images),
    preprocess_ms (FOV crop, tiling), vision_ms (tile embeddings + layout; 0 when the image
    prefix was reused; layout_ms of it: laying out and reducing the visual tokens),
    prefill_ms (image prefix, when not reused, plus the question text), generate_ms (sampling
    the answer after prefill), first_token_ms (call start to the first token), total_ms.
    cached_prefix: whether the image prefix came from the KV cache.
    """

    text: str
    n_image_tokens: int
    n_prompt_tokens: int
    n_generated: int
    stop_reason: str
    cached_prefix: bool
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed after the first token."""
        ms = self.timings.get("generate_ms", 0.0)
        return 1000.0 * (self.n_generated - 1) / ms if self.n_generated > 1 and ms > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timings"] = {k: round(v, 2) for k, v in self.timings.items()}
        return d
