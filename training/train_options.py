"""The options of `eyecare-edge train`: one dataclass, checked on creation, read from YAML and the CLI.

YAML keys and CLI options have the same names (dashes or underscores); the CLI wins over the file.
`training.train.run_training` takes the resulting `TrainOptions`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from eyecare_edge.training.stages import STAGES, LoraSettings

from eyecare_edge.errors import EyecareError
from eyecare_edge.preprocess import BUDGETS

TASKS = ("closed", "open", "report")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
# How align/sft form batches (training.batching): the Trainer's random order, or lengths grouped
# within each modality while every batch keeps the mix.
BATCHINGS = ("random", "length-mixed")
# What the vision stage's label heads read (training.vision_stage.pool_images): the mean over an
# image's tiles, or that mean beside the image's global view (tile 0), which keeps the layout.
HEAD_POOLINGS = ("tiles", "tiles+global")
# Recommended learning rates (LLaVA-NeXT / Dense Connector recipes for a 4B-8B LLM).
DEFAULT_LR = {"align": 1e-3, "sft": 2e-5, "sft-lora": 2e-4, "vision": 1e-3}
# `vision` (training.vision_stage) trains the tower on image-level labels, before align and sft.
ALL_STAGES = ("vision", *STAGES)


class TrainingError(EyecareError):
    """A run that cannot start or finish; the message says what to change."""


@dataclass
class TrainOptions:
    """Everything `eyecare-edge train` takes; YAML keys and CLI options have the same names."""

    init: str
    data: str
    out: str
    stage: str = "sft"
    images_root: str | None = None
    max_steps: int | None = None
    epochs: float | None = None  # neither max_steps nor epochs: 1 epoch
    lr: float | None = None  # None: DEFAULT_LR for the stage
    connector_lr: float | None = None  # None: lr
    # The tower's own rate when align/sft train it (`train_vision`; LLaVA-NeXT's
    # mm_vision_tower_lr); None: lr.
    vision_lr: float | None = None
    batch_size: int | None = None  # None: 4 for align/sft, 16 for vision (a step is one tower pass)
    grad_accum: int = 1
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    train_vision: bool = False
    max_length: int | None = None  # None: the LLM's context, at most 4096
    warmup: float = 0.03  # < 1: share of the steps; >= 1: steps
    weight_decay: float = 0.0
    gradient_checkpointing: bool = False
    precision: str = "auto"
    dtype: str = "float32"  # weights as loaded (bf16 halves memory for big models on GPU)
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    seed: int = 0
    resume: bool | None = None  # None: resume when `out` holds checkpoint-* directories
    deepspeed: str | None = None
    num_workers: int = 0
    tasks: list[str] | None = None
    max_samples: int | None = None
    cache_mb: float = 1024.0
    # Token budget (eyecare_edge.preprocess.BUDGETS) written into the trained checkpoint, so
    # export and the runtime use the same tiling; None keeps the checkpoint's own.
    budget: str | None = None
    # --stage vision only: the labels file's path column and label columns (None: detected), and
    # the share of images held out for vision_eval.json (a seeded split).
    path_column: str | None = None
    labels: list[str] | None = None
    eval_fraction: float = 0.15
    patch_init: bool = False  # PCA init of a random tower's patch embedding (vision_stage)
    # Weight of the per-token label loss that also trains the tower (every token predicts its
    # image's labels, training.label_probes); 0: the probes only read detached tokens.
    token_loss_weight: float = 1.0
    head_pooling: str = "tiles+global"  # --stage vision: HEAD_POOLINGS
    connector_init: bool = False  # align: data-dependent connector init (training.connector_init)
    batching: str = "random"  # align/sft batch order: BATCHINGS (training.batching)

    def __post_init__(self) -> None:
        if self.stage not in ALL_STAGES:
            raise TrainingError(f"unknown stage {self.stage!r}; expected one of {', '.join(ALL_STAGES)}")
        if self.batch_size is None:
            self.batch_size = 16 if self.stage == "vision" else 4
        if isinstance(self.labels, str):
            self.labels = [c.strip() for c in self.labels.split(",") if c.strip()]
        if not 0.0 <= self.eval_fraction < 1.0:
            raise TrainingError(f"--eval-fraction must be in [0, 1), got {self.eval_fraction}")
        if self.lora_r is not None and self.stage != "sft":
            raise TrainingError("--lora-r applies to the sft stage (align trains only the connector)")
        if self.lora_r is not None and self.lora_r < 1:
            raise TrainingError(f"--lora-r must be >= 1, got {self.lora_r}")
        if self.max_steps is not None and self.epochs is not None:
            raise TrainingError("give --max-steps or --epochs, not both")
        if self.vision_lr is not None and (self.stage == "vision" or not self.train_vision):
            raise TrainingError(
                "--vision-lr is the tower's rate when align/sft train it: add --train-vision "
                "(the vision stage's own rate is --lr)"
            )
        if self.stage == "vision" and self.precision == "fp16":
            raise TrainingError(
                "--precision fp16: the vision stage runs on the CPU, which autocasts to bf16 only; "
                "use bf16, fp32 or auto"
            )
        if self.token_loss_weight < 0:
            raise TrainingError(f"--token-loss-weight must be >= 0, got {self.token_loss_weight}")
        if self.head_pooling not in HEAD_POOLINGS:
            raise TrainingError(
                f"unknown head pooling {self.head_pooling!r}; expected one of {', '.join(HEAD_POOLINGS)}"
            )
        if self.batching not in BATCHINGS:
            raise TrainingError(f"unknown batching {self.batching!r}; expected one of {', '.join(BATCHINGS)}")
        if self.stage == "vision" and self.batching != "random":
            raise TrainingError("--batching orders align/sft conversations; the vision stage batches images")
        if self.stage != "vision" and self.head_pooling != "tiles+global":
            raise TrainingError("--head-pooling is the vision stage's (its label heads); align/sft have none")
        if self.precision not in PRECISIONS:
            raise TrainingError(
                f"unknown precision {self.precision!r}; expected one of {', '.join(PRECISIONS)}"
            )
        if self.tasks is not None:
            if isinstance(self.tasks, str):
                self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
            bad = [t for t in self.tasks if t not in TASKS]
            if bad or not self.tasks:
                raise TrainingError(f"unknown task(s) {bad}; expected some of {', '.join(TASKS)}")
        for name in ("batch_size", "grad_accum", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise TrainingError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.budget is not None and self.budget not in BUDGETS:
            raise TrainingError(f"unknown token budget {self.budget!r}; known: {', '.join(BUDGETS)}")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise TrainingError(f"DeepSpeed config not found: {self.deepspeed}")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        return DEFAULT_LR["sft-lora" if self.stage == "sft" and self.lora_r else self.stage]

    @property
    def lora(self) -> LoraSettings | None:
        return LoraSettings(self.lora_r, self.lora_alpha, self.lora_dropout) if self.lora_r else None


OPTION_NAMES = tuple(f.name for f in fields(TrainOptions))


def read_yaml_options(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Options from a YAML mapping; keys are the CLI option names (dashes or underscores)."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TrainingError(f"{p}: config file not found") from None
    except yaml.YAMLError as e:
        raise TrainingError(f"{p}: bad YAML ({e})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TrainingError(f"{p}: the config must be a mapping of option: value")
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(out) - set(OPTION_NAMES))
    if unknown:
        raise TrainingError(f"{p}: unknown option(s) {unknown}; known: {', '.join(OPTION_NAMES)}")
    return out


def resolve_options(config_file: str | os.PathLike[str] | None = None, **given: Any) -> TrainOptions:
    """Options from an optional YAML file overridden by the given (non-None) values: CLI wins."""
    merged = read_yaml_options(config_file) if config_file else {}
    merged.update({k: v for k, v in given.items() if v is not None})
    missing = [k for k in ("init", "data", "out") if merged.get(k) in (None, "")]
    if missing:
        raise TrainingError(f"missing required option(s): {', '.join('--' + m for m in missing)}")
    return TrainOptions(**merged)


@dataclass
class TrainResult:
    """What one training run did (every stage returns it; `train --json` prints it)."""

    out: str
    stage: str
    global_step: int
    samples_seen: int
    skipped: int
    skip_reasons: dict[str, int]
    final_loss: float | None
    seconds: float
    resumed_from: int | None
    trainable: str
    world_size: int = 1
    n_samples: int = 0
    loss_history: list[tuple[int, float]] = field(default_factory=list)

    def summary(self) -> str:
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        skipped = f"{self.skipped} skipped"
        if self.skip_reasons:
            skipped += " (" + ", ".join(f"{k}: {v}" for k, v in sorted(self.skip_reasons.items())) + ")"
        resumed = f", resumed from step {self.resumed_from}" if self.resumed_from else ""
        return (
            f"{self.stage}: {self.samples_seen} samples seen, {skipped}, {self.global_step} steps{resumed}, "
            f"final loss {loss}, {self.seconds:.1f} s -> {self.out}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
