"""The rows of perf.json as dataclasses: one class per kind of row, so the report's arithmetic, its
ratios and its table read named, typed fields instead of dicts through chains of `.get()`.

perf.json keeps its keys: `Row.to_json` flattens a row (its groups of keys that appear together,
like a row's full-depth figures, are nested dataclasses here) and leaves out the keys marked
`ABSENT_WHEN_NONE` when they hold None, exactly where the report used to leave them out;
`Row.from_json` reads such a dict back (the table is drawn from the JSON, which may come from disk).
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from typing import Any

_ABSENT = "absent_when_none"
_JSON = "json"
# Field metadata: the key is left out of perf.json when the field holds None (an error, a group
# not measured); or the key is not a Python name (`from`).
ABSENT_WHEN_NONE = {_ABSENT: True}
FROM = {_JSON: "from"}


def _row_class(hint: Any) -> type[Row] | None:
    """The Row subclass a field holds (a group of keys), or None for a plain value."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next((t for t in options if isinstance(t, type) and issubclass(t, Row)), None)


@cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class Row:
    """Base of every perf.json row and group of keys (see the module docstring)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if isinstance(value, Row):
                out.update(value.to_json())
            elif value is not None or not f.metadata.get(_ABSENT):
                out[f.metadata.get(_JSON) or f.name] = value
        return out

    @classmethod
    def json_keys(cls) -> set[str]:
        keys: set[str] = set()
        for f in fields(cls):  # type: ignore[arg-type]
            group = _row_class(_field_types(cls)[f.name])
            keys |= group.json_keys() if group else {f.metadata.get(_JSON) or f.name}
        return keys

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Any:
        kwargs: dict[str, Any] = {}
        for f in fields(cls):  # type: ignore[arg-type]
            group = _row_class(_field_types(cls)[f.name])
            if group is not None:
                if not (f.metadata.get(_ABSENT) and not group.json_keys() & d.keys()):
                    kwargs[f.name] = group.from_json(d)
                continue
            key = f.metadata.get(_JSON) or f.name
            if key in d:
                kwargs[f.name] = d[key]
            elif f.default is MISSING and f.default_factory is MISSING:
                kwargs[f.name] = None
        return cls(**kwargs)


@dataclass
class Failed(Row):
    """A system that failed or was skipped: its name, and why (vision and LLM sections)."""

    system: str | None
    kind: str | None = field(default=None, metadata=ABSENT_WHEN_NONE)
    skipped: str | None = field(default=None, metadata=ABSENT_WHEN_NONE)
    error: str | None = field(default=None, metadata=ABSENT_WHEN_NONE)


# ---------------------------------------------------------------------------------------- vision


@dataclass
class TileFigures(Row):
    """A vision row's figures beyond the measured ms per tile."""

    ms_per_tile_full: float
    gflops: float
    fraction_of_peak: float | None


@dataclass
class TorchVision(Row):
    """The reference's vision tower (torch eager) per tile."""

    system: str
    kind: str
    dtype: str
    ms_per_tile: float
    figures: TileFigures | None = field(default=None, metadata=ABSENT_WHEN_NONE)


@dataclass
class BackendVision(Row):
    """A runtime vision backend (ONNX Runtime, OpenVINO, TensorRT) per tile."""

    system: str
    kind: str
    backend: str
    precision: str
    ms_per_tile: float
    load_s: float | None
    peak_rss_bytes: float | None
    figures: TileFigures | None = field(default=None, metadata=ABSENT_WHEN_NONE)


VisionRow = TorchVision | BackendVision | Failed


def parse_vision(d: dict[str, Any]) -> VisionRow:
    if "ms_per_tile" not in d:
        return Failed.from_json(d)
    return BackendVision.from_json(d) if "backend" in d else TorchVision.from_json(d)


# ------------------------------------------------------------------------------------------- LLM


@dataclass
class PrefillFigures(Row):
    prefill_tok_s: float
    prefill_tok_s_full: float
    prefill_bound_tok_s: float
    prefill_fraction_of_bound: float | None


@dataclass
class DecodeBounds(Row):
    """Decode at full depth and against the bandwidth bound (needs the weight bytes per token)."""

    decode_tok_s_full: float
    decode_bytes_per_token: float
    decode_bytes_per_token_full: float
    decode_bound_tok_s: float
    decode_bound_tok_s_full: float
    decode_fraction_of_bound: float | None


@dataclass
class DecodeFigures(Row):
    decode_tok_s: float
    bounds: DecodeBounds | None = field(default=None, metadata=ABSENT_WHEN_NONE)


@dataclass
class LLMFigures(Row):
    """Prefill and decode figures of one system; each group only when it was measured."""

    prefill: PrefillFigures | None = field(default=None, metadata=ABSENT_WHEN_NONE)
    decode: DecodeFigures | None = field(default=None, metadata=ABSENT_WHEN_NONE)


@dataclass
class LLMRun(Row):
    """One LLM system on the image prompt: the reference (transformers) or a llama.cpp GGUF."""

    system: str
    kind: str
    weights: str
    n_prompt: int
    prefill_tokens_measured: int | None
    decode_tokens_measured: int | None
    weight_bytes: float | None
    weight_bytes_full: float | None
    peak_rss_bytes: float | None
    figures: LLMFigures


@dataclass
class LlamaRun(LLMRun):
    """A llama.cpp row also says which bundle or file it came from."""

    source: str | None = field(metadata=FROM)


LLMRow = LLMRun | LlamaRun | Failed


def parse_llm(d: dict[str, Any]) -> LLMRow:
    if "error" in d or "skipped" in d:
        return Failed.from_json(d)
    return LlamaRun.from_json(d) if "from" in d else LLMRun.from_json(d)


# ------------------------------------------------------------------------------ end to end, budgets


@dataclass
class TtftParts(Row):
    """Time to first token split into the part depth does not change, vision and prefill (ms);
    `other_ms` (what the pipeline's first-token time holds beyond them) for the pipeline only."""

    decode_preprocess_ms: float
    vision_ms: float
    prefill_ms: float
    other_ms: float | None = field(default=None, metadata=ABSENT_WHEN_NONE)

    def total(self) -> float:
        return self.decode_preprocess_ms + self.vision_ms + self.prefill_ms + (self.other_ms or 0.0)


@dataclass
class EndToEnd(Row):
    """One image, one answer of n_decode tokens, measured and at full depth."""

    system: str
    n_prompt: int
    n_tiles: int | None
    parts: TtftParts
    ttft_ms: float
    ttft_ms_full: float
    total_ms: float | None
    total_ms_full: float | None
    vision_composed: bool
    peak_rss_bytes: float | None


@dataclass
class PipelineEndToEnd(EndToEnd):
    """Our Pipeline's row: its own prefill/decode figures, where it ran and with which settings."""

    figures: LLMFigures = field(default_factory=LLMFigures)
    describe: Any = None
    settings: dict[str, Any] | None = None
    total_ms_answer: float | None = field(default=None, metadata=ABSENT_WHEN_NONE)


@dataclass
class EndToEndFailed(Row):
    system: str
    error: str | None


E2ERow = EndToEnd | PipelineEndToEnd | EndToEndFailed


def parse_e2e(d: dict[str, Any]) -> E2ERow:
    if "error" in d:
        return EndToEndFailed.from_json(d)
    return PipelineEndToEnd.from_json(d) if "describe" in d else EndToEnd.from_json(d)


@dataclass
class BudgetSpeed(Row):
    n_tiles: int
    n_image_tokens: int
    n_prompt: int
    ttft_ms: float | None
    ttft_ms_full: float
    parts: TtftParts


@dataclass
class BudgetAccuracy(Row):
    accuracy: float | None
    accuracy_n: int | None
    accuracy_ci: list[float] | None
    accuracy_skipped: str | None = field(default=None, metadata=ABSENT_WHEN_NONE)


@dataclass
class BudgetRow(Row):
    """A named token budget (max tiles, anyres_max) run with the default settings."""

    name: str
    max_tiles: int | None
    anyres_max: int | None
    source: str | None = field(metadata=FROM)
    speed: BudgetSpeed | None = field(default=None, metadata=ABSENT_WHEN_NONE)
    error: str | None = field(default=None, metadata=ABSENT_WHEN_NONE)
    skipped: str | None = field(default=None, metadata=ABSENT_WHEN_NONE)
    accuracy: BudgetAccuracy | None = field(default=None, metadata=ABSENT_WHEN_NONE)


@dataclass
class SweepRow(Row):
    """One llama.cpp setting of `--sweep`."""

    setting: str | None
    prefill_tok_s: float | None
    decode_tok_s: float | None
    peak_rss_bytes: float | None
    error: str | None = field(default=None, metadata=ABSENT_WHEN_NONE)
    skipped: str | None = field(default=None, metadata=ABSENT_WHEN_NONE)


@dataclass
class TargetRow(Row):
    target: str
    key: str
    value: float | None
    op: str
    threshold: float
    met: bool | None
    skipped: str | None = field(default=None, metadata=ABSENT_WHEN_NONE)


# ---------------------------------------------------------------------------------------- memory


@dataclass
class RssFigures(Row):
    """A runtime's peak RSS against the bundle files it loaded, measured and at full depth."""

    loaded_files: dict[str, float]
    loaded_bytes: float
    peak_rss_bytes: float
    baseline_rss_bytes: float | None
    peak_rss_over_bundle: float | None
    loaded_bytes_full: float
    peak_rss_bytes_full: float
    peak_rss_over_bundle_full: float | None
    kv_bytes_per_layer: float
    n_ctx: int | None


@dataclass
class ReferenceRss(Row):
    peak_rss_bytes: float
    peak_rss_bytes_full: float


@dataclass
class Memory:
    """perf.json's `memory`: the default pipeline's figures with the references' peak RSS beside
    them, and (when `--proposed` ran) the proposed settings' figures ({} when that run failed)."""

    default: RssFigures | None
    references: dict[str, ReferenceRss]
    proposed_ran: bool = False
    proposed: RssFigures | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.default is not None:
            out = self.default.to_json()
            out["references"] = {k: v.to_json() for k, v in self.references.items()}
        if self.proposed_ran:
            out["proposed"] = self.proposed.to_json() if self.proposed else {}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Memory:
        default = RssFigures.from_json(d) if "peak_rss_bytes" in d else None
        refs = {k: ReferenceRss.from_json(v) for k, v in (d.get("references") or {}).items()}
        proposed = d.get("proposed")
        return cls(default, refs, proposed is not None, RssFigures.from_json(proposed) if proposed else None)
