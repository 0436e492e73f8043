"""What one `eyecare-edge perf` run measures (its options, as data) and the raw results it fills
stage by stage (`RunState`, which `report.build_report` reads)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from eyecare_edge.perf.build import DEFAULT_LLM, DEFAULT_VISION
from eyecare_edge.perf.runtime import DEFAULT_QUESTION
from eyecare_edge.perf.tokens import TOKEN_FRACTIONS, TOKEN_METHODS

from eyecare_edge.formats import format_names
from eyecare_edge.presets import DEFAULT_PRESET

DEFAULT_WORKDIR = Path("~/.cache/eyecare-edge/perf").expanduser()
BUDGET_TILES = (1, 2, 4, 9)


@dataclass
class PerfOptions:
    """What one `eyecare-edge perf` run measures (the command's options, as data)."""

    preset: str = DEFAULT_PRESET
    bundle: Path | None = None
    checkpoint: Path | None = None
    image: Path | None = None
    llm_layers: int | None = 2
    vision_layers: int | None = 2
    workdir: Path = DEFAULT_WORKDIR
    threads: int | None = None
    n_decode: int = 64
    time_box_s: float = 30.0
    references: tuple[str, ...] = ("fp32", "bf16")
    llm_variants: tuple[str, ...] = format_names("llm", measured=True)
    vision_backends: bool = True
    budgets: tuple[int, ...] = BUDGET_TILES
    fast_budget: bool = True
    accuracy_bundle: Path | None = None
    accuracy_ckpt: Path | None = None
    accuracy_data: Path | None = None
    accuracy_limit: int | None = None
    sweep: bool = False
    proposed: bool = False
    question: str = DEFAULT_QUESTION
    seed: int = 0
    child_timeout_s: float = 1800.0
    quick_probe: bool = False
    build_vision: tuple[str, ...] = DEFAULT_VISION
    build_llm: tuple[str, ...] = DEFAULT_LLM
    calibration_images: int = 4
    # visual-token budgets x reduction methods (see perf/tokens.py); () = skip the table
    visual_tokens: tuple[float | int, ...] = TOKEN_FRACTIONS
    token_methods: tuple[str, ...] = TOKEN_METHODS
    kv_variants: bool = True
    token_repeats: int = 2  # asks per budget row, fastest kept (a shared 2-core machine is noisy)


@dataclass
class RunState:
    """Raw results, filled stage by stage; `report.build_report` reads it."""

    options: dict
    config: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)
    build: dict = field(default_factory=dict)
    vision: list[dict] = field(default_factory=list)
    pipeline: dict = field(default_factory=dict)
    proposed: dict = field(default_factory=dict)
    llm: list[dict] = field(default_factory=list)
    references: list[dict] = field(default_factory=list)
    budgets: list[dict] = field(default_factory=list)
    accuracy: dict = field(default_factory=dict)
    token_budgets: list[dict] = field(default_factory=list)
    token_accuracy: dict = field(default_factory=dict)
    sweep: list[dict] = field(default_factory=list)
    gpu: dict = field(default_factory=dict)
    gpu_one_tile: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
