"""Run a training stage (`align` or `sft`) with the HF Trainer: one process, DDP or DeepSpeed.

`run_training(TrainOptions)` (options: `training.train_options`) is what `eyecare-edge train`
calls, in every process that torchrun starts. It loads the checkpoint, sets the stage's trainable
parts (`training.stages`), builds the dataset (`training.data`) and lets `transformers.Trainer` do
the loop: cosine schedule with warmup, gradient accumulation, gradient checkpointing, bf16 where
the GPU has it, checkpoints every `save_steps` with optimizer state, resume from the last one,
`trainer_state.json` with the loss history. At the end the main process writes the final
checkpoint into `out` as a plain HF directory (LoRA merged) that `load_checkpoint` and
`eyecare-edge export` read.

The TrainingArguments are built before the model is loaded: with a DeepSpeed ZeRO-3 config this
makes `from_pretrained` partition the weights while loading instead of materialising the whole
model in every process.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from eyecare_edge.training.batching import LengthMixedSampler
from eyecare_edge.training.checkpoint import load_checkpoint, read_config
from eyecare_edge.training.collate import EyecareCollator, pop_meta
from eyecare_edge.training.data import EyecareDataset, SkipLog, filter_tasks, read_conversations
from eyecare_edge.training.encoding import IGNORE_INDEX
from eyecare_edge.training.precision import mixed_precision
from eyecare_edge.training.stages import configure_stage, merge_lora_state_dict
from eyecare_edge.training.train_options import TrainingError, TrainOptions, TrainResult
from torch.utils.data import Sampler
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from eyecare_edge.preprocess import apply_budget

log = logging.getLogger("eyecare_edge.training")


# --- TrainingArguments -----------------------------------------------------------------------------


def training_arguments_kwargs(opts: TrainOptions, *, progress: bool = True) -> dict[str, Any]:
    """The TrainingArguments for `opts`, as keyword arguments (pure: testable without a run)."""
    on_gpu = torch.cuda.is_available()
    use_cpu = not on_gpu and opts.deepspeed is None
    # TrainingArguments takes bf16 without a GPU only with use_cpu: DeepSpeed on a CUDA-less machine
    # keeps `auto` at fp32 (an explicit --precision bf16 gets transformers' own error)
    bf16, fp16 = mixed_precision(opts.precision, on_gpu=on_gpu, cpu_bf16=use_cpu)
    epochs = opts.epochs if opts.epochs is not None else 1.0
    return {
        "output_dir": str(opts.out),
        "per_device_train_batch_size": opts.batch_size,
        "gradient_accumulation_steps": opts.grad_accum,
        "learning_rate": opts.learning_rate,
        "weight_decay": opts.weight_decay,
        "lr_scheduler_type": "cosine",
        "warmup_steps": opts.warmup if opts.warmup < 1 else int(opts.warmup),
        "max_steps": opts.max_steps if opts.max_steps is not None else -1,
        "num_train_epochs": float(epochs),
        "logging_steps": opts.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": opts.save_steps,
        "save_total_limit": opts.save_total_limit,
        "seed": opts.seed,
        "bf16": bf16,
        "fp16": fp16,
        "activation_checkpointing": opts.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if opts.gradient_checkpointing else None,
        # Our forward takes tensors the Trainer does not know (pixel_values, image_sizes, ...).
        "remove_unused_columns": False,
        "label_names": ["labels"],
        "report_to": "none",
        "dataloader_num_workers": opts.num_workers,
        "dataloader_pin_memory": torch.cuda.is_available(),
        # Every trainable part is used in every step (all samples carry images); the vision tower,
        # when frozen, has no gradients at all, so DDP need not search for unused parameters.
        "ddp_find_unused_parameters": False,
        "deepspeed": opts.deepspeed,
        # Without use_cpu, TrainingArguments on a CUDA-less machine under torchrun initialises the
        # process group but trains every process alone (DistributedType.NO); with it, accelerate
        # sets up MULTI_CPU DDP over gloo.
        "use_cpu": use_cpu,
        "disable_tqdm": not progress,
        "save_only_model": False,
    }


# --- the Trainer ---------------------------------------------------------------------------------


class EyecareTrainer(Trainer):
    """HF Trainer that pops our bookkeeping keys, counts samples and skips, and can give the
    connector and the tower their own learning rates (LLaVA's `mm_projector_lr`, LLaVA-NeXT's
    `mm_vision_tower_lr`)."""

    def __init__(
        self,
        *args: Any,
        skips: SkipLog,
        connector_lr: float | None = None,
        vision_lr: float | None = None,
        batching: str = "random",
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.skips = skips
        self.batching = batching
        # Parts with their own rate; the rest (the LLM above all) take `learning_rate`.
        self.part_lrs = {
            k: v for k, v in (("connector", connector_lr), ("vision", vision_lr)) if v is not None
        }
        self.samples_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Next-token cross-entropy on the supervised positions only.

        Logits are computed only where the next token is supervised (`logits_to_keep` with the
        positions): a few answer tokens per turn against hundreds of image and prompt positions,
        which saves the LM head's compute and the [batch, length, vocab] logits memory. The loss
        is the same as the model's own (mean over supervised tokens; normalised by
        `num_items_in_batch` under gradient accumulation, as the Trainer expects).
        """
        meta = pop_meta(inputs)
        if model.training:
            self.samples_seen += len(meta.get("sample_ids", ()))
        for sample_id, reason in meta.get("skipped", ()):
            self.skips.add(sample_id, reason)
        labels = inputs.pop("labels")
        targets = labels[:, 1:]
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
        logits = outputs.logits
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets[:, keep].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss / (targets != IGNORE_INDEX).sum().clamp(min=1)
        return (loss, outputs) if return_outputs else loss

    def _get_train_sampler(self, train_dataset: EyecareDataset | None = None) -> Sampler | None:
        """`length-mixed`: lengths grouped within each modality, every batch keeping the mix
        (training.batching); `random`: the Trainer's own sampler."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.batching != "length-mixed":
            return super()._get_train_sampler(train_dataset)
        groups = [c.modality for c in dataset.items]
        # the size the DataLoader cuts by (per device, or per process under nn.DataParallel)
        self.length_sampler = LengthMixedSampler(
            dataset.lengths, groups, self._train_batch_size, self.args.seed
        )
        return self.length_sampler

    def create_optimizer(self, model=None):
        """One parameter group per (part, weight decay) when the connector or the tower has its
        own learning rate; the LLM (and any part without one) takes `learning_rate`."""
        opt_model = self.model if model is None else model
        if self.optimizer is None and self.part_lrs:
            decay = set(self.get_decay_parameter_names(opt_model))
            groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
            for name, p in opt_model.named_parameters():
                if p.requires_grad:
                    groups.setdefault((_part(name), name in decay), []).append(p)
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            param_groups = [
                {
                    "params": ps,
                    "weight_decay": self.args.weight_decay if dec else 0.0,
                    "lr": self.part_lrs.get(part, self.args.learning_rate),
                }
                for (part, dec), ps in groups.items()
            ]
            self.optimizer = cls(param_groups, **kwargs)
        return super().create_optimizer(model)


def _part(name: str) -> str:
    """Which part of EyecareGPT a parameter belongs to (DDP/DeepSpeed may prefix the names)."""
    if name.startswith(("connector.", "image_newline")) or ".connector." in name or ".image_newline" in name:
        return "connector"
    if name.startswith("vision_tower.") or ".vision_tower." in name:
        return "vision"
    return "llm"


class _SamplerEpoch(TrainerCallback):
    """Tell the length-mixed sampler which epoch begins. accelerate's `set_epoch` does not reach
    a sampler wrapped for a resumed multi-process run (skip + shard + batch), which would then
    replay epoch 0's order for the rest of the resumed epoch."""

    def __init__(self, trainer: EyecareTrainer) -> None:
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        sampler = getattr(self.trainer, "length_sampler", None)
        if sampler is not None:
            sampler.set_epoch(epoch_of(state.epoch))
        return control


def epoch_of(progress: float | None) -> int:
    """The epoch a Trainer's `state.epoch` (a float: 1.5 is half-way through epoch 1) is in; at an
    epoch's start it can read 0.9999999 for 1."""
    return math.floor((progress or 0.0) + 1e-6)


class _LogLastStep(TrainerCallback):
    """Log at the last step too, so `trainer_state.json` ends with the final loss."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_log = True
        return control


# --- the run ---------------------------------------------------------------------------------------


def _default_max_length(init: str) -> int:
    cfg = read_config(init)
    n = getattr(cfg.text_config, "max_position_embeddings", None) or 4096
    # Phi-3.5 switches LongRoPE factors above 4096 (see ANCHORS.md): stay at or below it.
    return int(min(n, 4096))


def _gather_skips(skips: SkipLog) -> dict[str, str]:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return dict(skips.reasons)
    parts: list[dict[str, str] | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, dict(skips.reasons))
    merged: dict[str, str] = {}
    for p in parts:
        merged.update(p or {})
    return merged


def _sum_across_ranks(value: int) -> int:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    parts: list[int | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, int(value))
    return int(sum(p or 0 for p in parts))


def run_training(opts: TrainOptions, *, progress: bool = True) -> TrainResult:
    """Train one stage and write the final checkpoint to `opts.out` (main process)."""
    if opts.stage == "vision":
        from eyecare_edge.training.vision_stage import run_vision_stage

        return run_vision_stage(opts, progress=progress)
    t0 = time.perf_counter()
    out = Path(opts.out)
    if opts.max_length is None:
        opts.max_length = _default_max_length(opts.init)
    resume_from = None
    if opts.resume is not False and out.is_dir():
        resume_from = get_last_checkpoint(str(out))
    if opts.resume is True and resume_from is None:
        log.warning("--resume: no checkpoint-* directory in %s; starting from %s", out, opts.init)

    args = TrainingArguments(**training_arguments_kwargs(opts, progress=progress))
    is_main = args.process_index == 0

    model, tokenizer = load_checkpoint(opts.init, dtype=opts.dtype)
    model.train()
    if opts.budget is not None:
        model.config.preprocess = apply_budget(model.config.preprocess_config(), opts.budget).to_dict()
    plan = configure_stage(model, opts.stage, train_vision=opts.train_vision, lora=opts.lora)
    if opts.train_vision:  # a tower trained here is no longer init's random one
        model.config.vision_tower_random = False
    if is_main:
        log.info("%s", plan.describe())
    if tokenizer.pad_token_id is None:
        raise TrainingError(f"{opts.init}: the tokenizer has no pad token")

    conversations = read_conversations(opts.data, images_root=opts.images_root)
    if opts.tasks:
        conversations = filter_tasks(conversations, opts.tasks)
    if opts.max_samples is not None:
        conversations = conversations[: opts.max_samples]
    dataset = EyecareDataset(
        conversations,
        tokenizer,
        model.config,
        max_length=opts.max_length,
        cache_mb=opts.cache_mb,
        quiet=not is_main,
    )
    if len(dataset) == 0:
        raise TrainingError(
            f"{opts.data}: no usable samples ({len(dataset.skips)} of {dataset.n_records} skipped: "
            f"{dataset.skips.by_reason()})"
        )
    if is_main:
        log.info(
            "%d samples from %s (%d skipped before training)", len(dataset), opts.data, len(dataset.skips)
        )
        if args.world_size > 1:
            backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "deepspeed"
            log.info("distributed: %d processes, backend %s", args.world_size, backend)

    if opts.connector_init:
        from eyecare_edge.training.connector_init import init_connector_from_data
        from eyecare_edge.training.label_probes import load_probes

        tiles = [dataset.build(i)["pixel_values"] for i in range(min(32, len(dataset)))]
        probes = load_probes(opts.init)
        figures = init_connector_from_data(model, torch.cat(tiles), probes)
        if is_main:
            source = f"the label probes of {opts.init}" if probes is not None else "no label probes"
            log.info("connector init from %d samples' tiles and %s: %s", len(tiles), source, figures)

    if any(not c.images for c in dataset.items):
        # A text-only batch leaves the connector without gradients: let DDP look for that.
        args.ddp_find_unused_parameters = True

    trainer = EyecareTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=EyecareCollator(pad_token_id=int(tokenizer.pad_token_id)),
        processing_class=tokenizer,
        skips=dataset.skips,
        connector_lr=opts.connector_lr,
        vision_lr=opts.vision_lr,
        batching=opts.batching,
        callbacks=[_LogLastStep()],
    )
    trainer.add_callback(_SamplerEpoch(trainer))
    trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_state()

    # Full weights (ZeRO-3: gathered), LoRA folded in, written once as a plain checkpoint.
    state = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        if plan.lora_scaling:
            state = merge_lora_state_dict(state, plan.lora_scaling)
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        unwrapped.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)
    trainer.accelerator.wait_for_everyone()

    skips = _gather_skips(dataset.skips)
    samples_seen = _sum_across_ranks(trainer.samples_seen)
    history = [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
    reasons: dict[str, int] = {}
    for r in skips.values():
        key = r.split(":", 1)[0]
        reasons[key] = reasons.get(key, 0) + 1
    result = TrainResult(
        out=str(out),
        stage=opts.stage,
        global_step=int(trainer.state.global_step),
        samples_seen=samples_seen,
        skipped=len(skips),
        skip_reasons=reasons,
        final_loss=history[-1][1] if history else None,
        seconds=time.perf_counter() - t0,
        resumed_from=_step_of(resume_from),
        trainable=plan.describe(),
        world_size=args.world_size,
        n_samples=len(dataset),
        loss_history=history,
    )
    if trainer.is_world_process_zero():
        (out / "train_result.json").write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return result


def _step_of(checkpoint: str | None) -> int | None:
    if checkpoint is None:
        return None
    try:
        return int(Path(checkpoint).name.rsplit("-", 1)[-1])
    except ValueError:
        return None
