"""The model's work in numbers: FLOPs, weight bytes per token, bounds and depth extrapolation.

A perf run cuts the depth of a preset (`--llm-layers K`) but keeps its width, so each layer costs
what it costs in the full model. A cost then splits into a part that grows with depth (the
decoder or encoder layers, their attention and KV cache) and a part that does not (token
embeddings, the LM head, SigLIP's patch embedding, the projector, preprocessing, Python). The
extrapolation model is

    t_full = t_measured * W(L_full) / W(K),    W(L) = fixed_work + L * layer_work,

where the work W is FLOPs for compute-bound phases (vision per tile, prefill) and bytes read per
token for the memory-bound decode. The fixed share is therefore not guessed: it is the share of
the work the fixed parts do. This holds as long as the achieved FLOP/s (or GB/s) of the fixed
parts is close to that of the layers, which is true for the big matrix products that dominate
both; a figure's fraction of its bound is unchanged by the extrapolation by construction.

Everything here is plain arithmetic on dataclasses (tested without models), except
`gguf_weight_bytes`, which reads a GGUF's tensor table to get the exact per-layer bytes of a
quantized file (Q4_K_M mixes 4- and 6-bit tensors, so a formula would be off).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace

# Full depths of the presets with published shapes: (LLM decoder layers, SigLIP blocks kept).
PRESET_FULL_DEPTH: dict[str, tuple[int, int]] = {"eyecare-3.8b": (32, 26), "eyecare-7b": (28, 26)}
BYTES_PER_PARAM: dict[str, float] = {
    "fp32": 4.0,
    "f32": 4.0,
    "float32": 4.0,
    "fp16": 2.0,
    "f16": 2.0,
    "float16": 2.0,
    "bf16": 2.0,
    "bfloat16": 2.0,
    "int8": 1.0,
    "int8_u8s8": 1.0,
    "q8_0": 34 / 32,
}
_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class LLMShape:
    """A decoder-only LLM's widths and depth (gated MLP: gate, up and down projections)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        attn = self.hidden * (self.hidden + 2 * self.kv_dim) + self.hidden * self.hidden
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        head = 0 if self.tied_embeddings else self.head_params
        return self.layers * self.layer_params + self.embed_params + head + self.hidden

    def with_layers(self, layers: int) -> LLMShape:
        return replace(self, layers=layers)

    def attention_flops(self, n_tokens: int, start: int = 0) -> float:
        """QK^T and AV of one layer for n_tokens new positions after `start` cached ones
        (causal: position i attends to i + 1 keys)."""
        pairs = n_tokens * start + n_tokens * (n_tokens + 1) / 2
        return 4.0 * self.heads * self.head_dim * pairs

    def prefill_flops(self, n_tokens: int) -> float:
        """One forward pass over n_tokens (logits for the last position only, as llama.cpp and
        transformers' generate compute them)."""
        layer = 2.0 * n_tokens * self.layer_params + self.attention_flops(n_tokens)
        return self.layers * layer + 2.0 * self.hidden * self.vocab

    def decode_flops(self, context: int) -> float:
        """One generated token at `context` positions already in the cache."""
        layer = 2.0 * self.layer_params + self.attention_flops(1, context)
        return self.layers * layer + 2.0 * self.hidden * self.vocab

    def kv_bytes(self, positions: int, bytes_per_value: float, layers: int | None = None) -> float:
        """Size of the K and V caches for `positions` positions."""
        n = self.layers if layers is None else layers
        return n * 2.0 * self.kv_dim * positions * bytes_per_value


@dataclass(frozen=True)
class VisionShape:
    """A ViT tower (SigLIP) plus the dense connector's projector, per 2-D tile."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    connector_in: int
    out_dim: int

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layer_params(self) -> int:
        return 4 * self.hidden * self.hidden + 2 * self.hidden * self.intermediate

    @property
    def fixed_params(self) -> int:
        patch = 3 * self.patch_size * self.patch_size * self.hidden
        projector = self.connector_in * self.out_dim + self.out_dim * self.out_dim
        return patch + self.tokens * self.hidden + projector

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.fixed_params

    def with_layers(self, layers: int) -> VisionShape:
        return replace(self, layers=layers)

    def flops_per_tile(self) -> float:
        t = self.tokens
        patch = 2.0 * t * 3 * self.patch_size * self.patch_size * self.hidden
        projector = 2.0 * t * (self.connector_in * self.out_dim + self.out_dim * self.out_dim)
        layer = 2.0 * t * self.layer_params + 4.0 * self.hidden * t * t
        return self.layers * layer + patch + projector


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes of an LLM as one system stores them.

    per_layer: one decoder layer (every byte is read once per decoded token). fixed_per_token:
    read per token outside the layers (LM head, final norm, one embedding row). resident: all
    weights outside the layers (embedding table included).
    """

    per_layer: float
    fixed_per_token: float
    resident_fixed: float

    def total(self, layers: int) -> float:
        return layers * self.per_layer + self.resident_fixed

    def per_token(self, layers: int) -> float:
        return layers * self.per_layer + self.fixed_per_token


def torch_weight_bytes(shape: LLMShape, dtype: str) -> WeightBytes:
    """Weight bytes of the transformers model in `dtype` (every parameter in that type)."""
    s = BYTES_PER_PARAM[dtype]
    head = shape.embed_params if shape.tied_embeddings else shape.head_params
    resident = shape.embed_params + (0 if shape.tied_embeddings else shape.head_params) + shape.hidden
    return WeightBytes(
        per_layer=shape.layer_params * s,
        fixed_per_token=(head + 2 * shape.hidden) * s,
        resident_fixed=resident * s,
    )


def weight_bytes_from_tensors(sizes: Mapping[str, int], n_layers: int, hidden: int) -> WeightBytes:
    """WeightBytes of a GGUF from its tensor sizes (name -> bytes), llama.cpp's tensor names."""
    layer_total = sum(v for k, v in sizes.items() if _BLOCK.match(k))
    fixed = {k: v for k, v in sizes.items() if not _BLOCK.match(k)}
    head = fixed.get("output.weight")
    embd = fixed.get("token_embd.weight", 0)
    vocab_rows = max(embd / max(hidden, 1), 1.0)
    if head is None:  # tied: the LM head reads the embedding table
        head = embd
    per_token = head + fixed.get("output_norm.weight", 0) + embd / vocab_rows
    return WeightBytes(
        per_layer=layer_total / max(n_layers, 1),
        fixed_per_token=float(per_token),
        resident_fixed=float(sum(fixed.values())),
    )


def largest_prefix(
    shape: LLMShape, n_tokens: int, flops_per_s: float, box_s: float, minimum: int = 128
) -> int:
    """The longest prompt prefix whose predicted prefill time fits `box_s` (at least `minimum`,
    at most n_tokens)."""
    if flops_per_s <= 0 or shape.prefill_flops(n_tokens) / flops_per_s <= box_s:
        return n_tokens
    lo, hi = min(minimum, n_tokens), n_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if shape.prefill_flops(mid) / flops_per_s <= box_s:
            lo = mid
        else:
            hi = mid - 1
    return lo


def gguf_weight_bytes(path: str | os.PathLike[str], n_layers: int, hidden: int) -> WeightBytes:
    """WeightBytes of a GGUF file, from its tensor table (header only; the data is not read;
    the runtime's own reader, so no `gguf` package is needed)."""
    from eyecare_edge.gguf_header import read_gguf_header

    header = read_gguf_header(path)
    return weight_bytes_from_tensors(
        {name: info.n_bytes for name, info in header.tensors.items()}, n_layers, hidden
    )


def vision_weight_bytes(shape: VisionShape, precision: str) -> tuple[float, float]:
    """(bytes per encoder layer, bytes outside the layers) of a vision graph in `precision`;
    INT8 graphs keep the patch embedding, norms and projector bias in FP32."""
    s = BYTES_PER_PARAM[precision]
    return shape.layer_params * s, shape.fixed_params * s


# ------------------------------------------------------------------------- extrapolation


def scale_time(measured: float, work_measured: float, work_full: float) -> float:
    """A time (or any cost proportional to the work) at full depth."""
    if work_measured <= 0:
        raise ValueError("work at the measured depth must be positive")
    return measured * work_full / work_measured


def scale_rate(measured: float, work_measured: float, work_full: float) -> float:
    """A rate of the same units (tokens/s, tiles/s) at full depth: time scales up, rate down."""
    if work_full <= 0:
        raise ValueError("work at full depth must be positive")
    return measured * work_measured / work_full


# ------------------------------------------------------------------------- bounds


def decode_bound_tok_s(bandwidth_gb_s: float, bytes_per_token: float) -> float:
    """Tokens/s if every weight byte streamed from memory at the measured bandwidth."""
    return bandwidth_gb_s * 1e9 / bytes_per_token if bytes_per_token > 0 else 0.0


def prefill_bound_tok_s(peak_gflops: float, flops: float, n_tokens: int) -> float:
    """Tokens/s of a prefill whose FLOPs ran at the measured peak matmul rate."""
    return n_tokens * peak_gflops * 1e9 / flops if flops > 0 else 0.0


def fraction(measured: float | None, bound: float | None) -> float | None:
    if not measured or not bound:
        return None
    return measured / bound


# ------------------------------------------------------------------------- shapes


def shapes_from_config(config: Mapping) -> tuple[LLMShape, VisionShape]:
    """LLM and vision shapes from an EyecareGPT checkpoint's config.json (a plain dict)."""
    tc, vc = config["text_config"], config["vision_config"]
    heads = int(tc["num_attention_heads"])
    llm = LLMShape(
        hidden=int(tc["hidden_size"]),
        intermediate=int(tc["intermediate_size"]),
        layers=int(tc["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(tc.get("num_key_value_heads") or heads),
        vocab=int(tc["vocab_size"]),
        tied_embeddings=bool(tc.get("tie_word_embeddings", False)),
    )
    groups = 1 + bool(config.get("ldc_fine_layers")) + bool(config.get("ldc_coarse_layers"))
    vision = VisionShape(
        hidden=int(vc["hidden_size"]),
        intermediate=int(vc["intermediate_size"]),
        layers=int(vc["num_hidden_layers"]),
        heads=int(vc["num_attention_heads"]),
        image_size=int(vc["image_size"]),
        patch_size=int(vc["patch_size"]),
        connector_in=groups * int(vc["hidden_size"]),
        out_dim=llm.hidden,
    )
    return llm, vision


def full_depth(preset: str | None, llm_layers: int, vision_layers: int) -> tuple[int, int]:
    """The depths to extrapolate to: the preset's published depths, else the measured ones."""
    if preset in PRESET_FULL_DEPTH:
        return PRESET_FULL_DEPTH[preset]
    return llm_layers, vision_layers


def shape_dict(shape: LLMShape | VisionShape) -> dict:
    d = asdict(shape)
    d["params"] = shape.params
    d["layer_params"] = shape.layer_params
    return d
