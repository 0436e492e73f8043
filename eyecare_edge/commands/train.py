"""`eyecare-edge train`: one training stage (align or sft) on Eyecare-100K-style data.

The same command runs as one process, under `torchrun --nproc_per_node N` (DDP; gloo on CPU,
NCCL on GPUs) and with a DeepSpeed ZeRO config (`--deepspeed configs/deepspeed_zero2.json`).
torch and transformers are imported inside the command, never at module level.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

STAGES = ["vision", "align", "sft"]


@click.command(
    "train",
    epilog=(
        "\b\nExamples:\n"
        "  eyecare-edge train --init ckpt/tiny --data work/phantom/train.json --stage sft \\\n"
        "      --train-vision --max-steps 200 --lr 1e-3 -o ckpt/tiny-sft\n"
        "  torchrun --standalone --nproc_per_node 8 -m eyecare_edge.cli train --init ckpt/eyecare-3.8b-init \\\n"
        "      --data Eyecare-100K/train.json --images-root Eyecare-100K --stage align \\\n"
        "      --deepspeed configs/deepspeed_zero2.json -o ckpt/eyecare-3.8b-align\n"
        "  eyecare-edge train --config configs/train_tiny.yaml -o ckpt/tiny-sft\n"
        "  eyecare-edge train --init ckpt/tiny --data work/phantom/train_labels.jsonl --stage vision \\\n"
        "      --max-steps 200 -o ckpt/tiny-vision"
    ),
)
@click.option(
    "--init",
    type=click.Path(exists=True, file_okay=False),
    help="Checkpoint to start from (eyecare-edge init).",
)
@click.option(
    "--data",
    type=click.Path(exists=True, dir_okay=False),
    help="LLaVA JSON/JSONL (Eyecare-100K style) or bench JSONL.",
)
@click.option(
    "--images-root",
    type=click.Path(exists=True, file_okay=False),
    help="Folder image paths are relative to (default: the data file's folder).",
)
@click.option(
    "--stage",
    type=click.Choice(STAGES),
    help="vision: tower on image labels; align: connector only; sft: connector + LLM.",
)
@click.option("-o", "--out", type=click.Path(file_okay=False), help="Output directory (final checkpoint).")
@click.option("--max-steps", type=click.IntRange(1), help="Optimizer steps (instead of --epochs).")
@click.option("--epochs", type=click.FloatRange(0, min_open=True), help="Passes over the data (default 1).")
@click.option("--lr", type=float, help="Peak learning rate [align 1e-3; sft 2e-5, LoRA 2e-4].")
@click.option("--connector-lr", type=float, help="Separate learning rate for the connector.")
@click.option("--vision-lr", type=float, help="Separate learning rate for the tower (with --train-vision).")
@click.option("--batch-size", type=click.IntRange(1), help="Samples per device per step [4].")
@click.option("--grad-accum", type=click.IntRange(1), help="Gradient accumulation steps [1].")
@click.option("--lora-r", type=click.IntRange(1), help="sft with LoRA of this rank (merged on save).")
@click.option("--lora-alpha", type=float, help="LoRA alpha [2 x rank].")
@click.option("--train-vision/--freeze-vision", default=None, help="Also train the vision tower [frozen].")
@click.option(
    "--max-length", type=click.IntRange(16), help="Longer samples are skipped [LLM context, <= 4096]."
)
@click.option("--warmup", type=float, help="Warmup: share of steps (< 1) or steps (>= 1) [0.03].")
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing", default=None, help="Trade compute for memory."
)
@click.option(
    "--precision",
    type=click.Choice(["auto", "bf16", "fp16", "fp32"]),
    help="Mixed precision [auto: bf16 on a GPU with it and on a CPU with native BF16 (AVX-512 BF16, AMX); else fp32].",
)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Weights as loaded.")
@click.option("--save-steps", type=click.IntRange(1), help="Save a resumable checkpoint every N steps [500].")
@click.option("--logging-steps", type=click.IntRange(1), help="Log the loss every N steps [10].")
@click.option("--seed", type=int, help="Random seed [0].")
@click.option("--resume/--no-resume", default=None, help="Resume from OUT/checkpoint-* [auto: if present].")
@click.option(
    "--deepspeed", type=click.Path(exists=True, dir_okay=False), help="DeepSpeed config (configs/*.json)."
)
@click.option("--num-workers", type=click.IntRange(0), help="DataLoader worker processes [0].")
@click.option("--tasks", help="Only samples of these tasks, comma-separated: closed,open,report.")
@click.option("--max-samples", type=click.IntRange(1), help="Use at most N samples of the data file.")
@click.option(
    "--budget",
    type=click.Choice(["full", "balanced", "fast", "minimal"]),
    help="Token budget (tiles per image), stored in the trained checkpoint [the checkpoint's].",
)
@click.option("--path-column", help="--stage vision: the labels file's image path column [image|path|file].")
@click.option("--labels", help="--stage vision: label columns, comma-separated [all but path/id/split].")
@click.option(
    "--eval-fraction",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    help="--stage vision: share of images held out for vision_eval.json [0.15].",
)
@click.option(
    "--patch-init/--no-patch-init",
    default=None,
    help="--stage vision: PCA init of the patch embedding; for a RANDOM tower only (it overwrites "
    "the first layer). init's random tower also gets sin-cos positions, always.",
)
@click.option(
    "--token-loss-weight",
    type=click.FloatRange(0.0),
    help="--stage vision: weight of the per-token label loss, which teaches every visual token its "
    "image's labels (what the LLM reads) [1.0]; 0: pooled heads only.",
)
@click.option(
    "--head-pooling",
    type=click.Choice(["tiles", "tiles+global"]),
    help="--stage vision: what the label heads read: the mean over an image's tiles, or that mean "
    "beside the global view, which keeps where things are (laterality, disc side) [tiles+global].",
)
@click.option(
    "--batching",
    type=click.Choice(["random", "length-mixed"]),
    help="align/sft batch order: random, or length-mixed (lengths grouped within each modality, "
    "every batch keeping the mix: less padding) [random].",
)
@click.option("--threads", type=click.IntRange(1), help="torch CPU threads per process.")
@click.option(
    "--config",
    "config_file",
    type=click.Path(exists=True, dir_okay=False),
    help="YAML file whose keys are these options; options given here win.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(config_file, as_json, quiet, threads, **options) -> None:
    """Train one stage of EyecareGPT and write a checkpoint that `export` reads.

    \b
    vision: trains the vision tower on image-level labels (CSV/JSONL: path + categorical columns);
            writes OUT/vision_eval.json (held-out accuracy per label).
    align: trains the Layer-wise Dense Connector (projector + image_newline); vision and LLM frozen.
    sft:   trains connector + LLM (full, or LoRA with --lora-r); vision frozen unless --train-vision.
    Bad samples (missing/undecodable image, too long) are skipped with a warning and counted.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    import torch

    from eyecare_edge.errors import EyecareError
    from eyecare_edge.training.train import run_training
    from eyecare_edge.training.train_options import resolve_options

    if threads:
        torch.set_num_threads(threads)
    opts = resolve_options(config_file, **options)  # TrainingError, DataFormatError...: exit 1
    result = run_training(opts, progress=not quiet)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # one summary per run, from the main process
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        click.echo(result.summary())
    if not Path(result.out, "config.json").is_file():
        raise EyecareError(f"{result.out}: no final checkpoint was written")
