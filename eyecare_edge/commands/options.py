"""The CLI flags several commands share, as one table of `Flag` rows that click options are built from.

Each pipeline flag is named after the `PipelineOptions` field it sets (`--threads` sets
`n_threads`), so `pipeline_options` fills the dataclass by field name and a flag left unset leaves
the dataclass default. Choices come from the formats table (`eyecare_edge.formats`) and
`reduce.METHODS`; the defaults `--help` shows are read from `PipelineOptions` itself
(`eyecare_edge.pipeline.options` loads neither llama.cpp nor OpenCV, so `--help` stays quick).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, fields, replace
from typing import Any

import click

from eyecare_edge.formats import KV_CACHE_CHOICES, VISION_BACKENDS, format_names
from eyecare_edge.pipeline.options import PipelineOptions
from eyecare_edge.pipeline.plan import TEXT_ROOM
from eyecare_edge.reduce import METHODS

# The dataclass defaults the flags show (and leave in place when a flag is not given).
DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(PipelineOptions) if f.default is not MISSING}

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


@dataclass(frozen=True)
class Flag:
    """One command-line flag. field: the options-dataclass field it sets (its keyword argument
    too, unless `negates`: `--no-verify` arrives as `no_verify` and sets `verify` to its opposite).
    default None means "unset": the dataclass (or the command) decides."""

    field: str
    decls: tuple[str, ...]
    help: str | None = None
    type: Any = None
    default: Any = None
    show_default: bool = False
    is_flag: bool = False
    negates: bool = False

    @property
    def param(self) -> str:
        return f"no_{self.field}" if self.negates else self.field

    def option(self, *, param: str | None = None, **changes: Any) -> Decorator:
        """The click option; `param` renames the keyword argument, `changes` replace fields (help...)."""
        f = replace(self, **changes) if changes else self
        kwargs: dict[str, Any] = {"help": f.help, "show_default": f.show_default}
        if f.is_flag:
            kwargs["is_flag"] = True  # a plain flag: False unless given
        else:
            kwargs["default"] = f.default
            if f.type is not None:
                kwargs["type"] = f.type
        return click.option(*f.decls, param or f.param, **kwargs)

    def value(self, given: Any) -> Any:
        """The dataclass value of what the command received."""
        return (not given) if self.negates else given


def _flags(*rows: Flag) -> dict[str, Flag]:
    return {r.field: r for r in rows}


# What `ask`, `screen` and `serve` pass to `Pipeline.load`, in `--help` order.
PIPELINE_FLAGS: dict[str, Flag] = _flags(
    Flag(
        "vision",
        ("--vision",),
        "Vision backend; auto takes the fastest that loads and says which.",
        click.Choice(["auto", *VISION_BACKENDS]),
        DEFAULTS["vision"],
        True,
    ),
    Flag(
        "vision_precision",
        ("--vision-precision",),
        "Vision graph precision (auto: fp16 on GPU, fastest validated INT8 on CPU).",
        click.Choice(["auto", *format_names("vision")]),
        DEFAULTS["vision_precision"],
        True,
    ),
    Flag(
        "llm",
        ("--llm",),
        f"GGUF precision in the bundle (auto, or one of {', '.join(format_names('llm'))}).",
        None,
        DEFAULTS["llm"],
        True,
    ),
    Flag("n_threads", ("--threads",), "llama.cpp threads [physical cores].", click.IntRange(min=1)),
    Flag(
        "vision_threads", ("--vision-threads",), "Vision CPU threads [physical cores].", click.IntRange(min=1)
    ),
    Flag(
        "n_ctx",
        ("--n-ctx",),
        f"Context size [largest budgeted image + {TEXT_ROOM}, to a multiple of 256].",
        click.IntRange(min=256),
    ),
    Flag(
        "n_gpu_layers",
        ("--gpu-layers",),
        "LLM layers on the GPU (-1 all, 0 none) [all when llama.cpp is a GPU build].",
        int,
    ),
    Flag(
        "device",
        ("--device",),
        "GPU ordinal for TensorRT / ONNX Runtime CUDA.",
        click.IntRange(min=0),
        DEFAULTS["device"],
        True,
    ),
    Flag(
        "kv_type",
        ("--kv-type",),
        "llama.cpp KV cache type, K/V where they differ [auto: q8_0/f16 on the CPU (K in Q8_0, V in "
        "F16), f16 on a GPU, f32 for an F32 GGUF] (q8_0 needs flash attention).",
        click.Choice(KV_CACHE_CHOICES),
        DEFAULTS["kv_type"],
        True,
    ),
    Flag(
        "flash_attn",
        ("--flash-attn/--no-flash-attn",),
        "Flash attention [auto: llama.cpp's choice on a GPU, off on the CPU].",
    ),
    Flag("fundus_crop", ("--crop-fov",), "Crop fundus photos to their circular field of view.", is_flag=True),
    Flag(
        "max_tiles", ("--max-tiles",), "Token budget: at most N patch tiles per image.", click.IntRange(min=1)
    ),
    Flag(
        "visual_tokens",
        ("--visual-tokens",),
        "Visual tokens per image: a count (800), a fraction (0.25 or 25%), or 'all' "
        "[the bundle's budget]; n_ctx follows.",
    ),
    Flag(
        "token_reduction",
        ("--token-reduction",),
        "How kept visual tokens are chosen [the bundle's, else pool].",
        click.Choice(METHODS),
    ),
    Flag(
        "max_pixels",
        ("--max-pixels",),
        "Refuse images larger than this (header check).",
        click.IntRange(min=1),
    ),
    Flag(
        "verify",
        ("--no-verify",),
        "Skip the sha256 check of the bundle files (verified at install time).",
        is_flag=True,
        negates=True,
    ),
    Flag(
        "build_engine",
        ("--no-engine-build",),
        "Never build a TensorRT engine on first use.",
        is_flag=True,
        negates=True,
    ),
)

# The generation limit `ask` and `screen` share.
MAX_TOKENS = Flag(
    "max_tokens", ("--max-tokens",), "Most tokens per answer [report 512, else 256].", click.IntRange(min=1)
)


def options(*flags: Decorator) -> Decorator:
    """Apply click option decorators in the order given (the order `--help` lists them)."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for option in reversed(flags):
            f = option(f)
        return f

    return apply


def runtime_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Add every pipeline flag to a command (they arrive as keyword arguments)."""
    return options(*(flag.option() for flag in PIPELINE_FLAGS.values()))(f)


def pipeline_options(values: Mapping[str, Any]) -> PipelineOptions:
    """PipelineOptions from the keyword arguments `runtime_options` added; unset flags (None)
    keep the dataclass's defaults; a bad `--visual-tokens` is a usage error (exit 2). Anything
    else in `values` is a programming error."""
    rest = dict(values)
    chosen = {}
    for flag in PIPELINE_FLAGS.values():
        given = rest.pop(flag.param)
        if given is not None:
            chosen[flag.field] = flag.value(given)
    if rest:
        raise TypeError(f"unexpected options {sorted(rest)}")
    if "visual_tokens" in chosen:  # checked now: a typo should not cost a model load (or a server start)
        from eyecare_edge.reduce import parse_visual_tokens

        try:
            parse_visual_tokens(chosen["visual_tokens"])
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--visual-tokens") from e
    return PipelineOptions(**chosen)
