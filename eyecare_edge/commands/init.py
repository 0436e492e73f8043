"""`eyecare-edge init`: write an EyecareGPT checkpoint from a preset (and local pretrained parts)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from eyecare_edge.presets import PRESETS


@click.command("init")
@click.option("--preset", type=click.Choice(list(PRESETS)), help="Model size to build.")
@click.option(
    "--vision",
    "vision_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Local SigLIP directory (e.g. siglip-so400m-patch14-384) for the vision tower.",
)
@click.option(
    "--llm",
    "llm_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Local causal-LM directory (e.g. Phi-3.5-mini-instruct) with its tokenizer.",
)
@click.option(
    "--from-llava",
    "llava_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Import a LLaVA-convention checkpoint (released EyecareGPT, LLaVA-NeXT, Dense Connector).",
)
@click.option(
    "-o",
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Checkpoint directory to write.",
)
@click.option(
    "--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"])
)
@click.option("--seed", default=0, show_default=True, help="Seed for randomly initialised parts.")
@click.option(
    "--llm-layers", type=int, default=None, help="Cut the LLM to K layers (random-weight benchmarks)."
)
@click.option("--vision-layers", type=int, default=None, help="Cut the vision tower to K layers.")
@click.option(
    "--dry-run", is_flag=True, help="With --from-llava: print the mapping and config, write nothing."
)
@click.option(
    "--allow-pickle", is_flag=True, help="With --from-llava: also read .bin files (weights_only=True)."
)
@click.option("--allow-missing", is_flag=True, help="With --from-llava: tolerate missing/unmapped tensors.")
def init(
    preset,
    vision_dir,
    llm_dir,
    llava_dir,
    out_dir,
    dtype,
    seed,
    llm_layers,
    vision_layers,
    dry_run,
    allow_pickle,
    allow_missing,
) -> None:
    """Write a checkpoint (config, safetensors, tokenizer, chat template).

    \b
    Examples:
      eyecare-edge init --preset tiny -o ckpt/tiny
      eyecare-edge init --preset eyecare-3.8b --vision ~/models/siglip-so400m-patch14-384 \\
          --llm ~/models/Phi-3.5-mini-instruct -o ckpt/eyecare-3.8b-init
      eyecare-edge init --from-llava ~/models/EyecareGPT-3.8B -o ckpt/eyecare-3.8b
    """
    t0 = time.perf_counter()
    if llava_dir is not None:
        if preset or vision_dir or llm_dir:
            raise click.UsageError("--from-llava cannot be combined with --preset/--vision/--llm")
        from eyecare_edge.training.llava_import import import_llava

        import_llava(
            llava_dir,
            out_dir,
            dry_run=dry_run,
            allow_pickle=allow_pickle,
            allow_missing=allow_missing,
            dtype=dtype,
            echo=click.echo,
        )
        return
    if preset is None:
        raise click.UsageError("give --preset (or --from-llava DIR)")
    if dry_run or allow_pickle or allow_missing:
        raise click.UsageError("--dry-run/--allow-pickle/--allow-missing only apply to --from-llava")
    from eyecare_edge.training.checkpoint import init_checkpoint

    path = init_checkpoint(  # CheckpointError: exit 1
        preset,
        out_dir,
        vision_dir=vision_dir,
        llm_dir=llm_dir,
        dtype=dtype,
        seed=seed,
        llm_layers=llm_layers,
        vision_layers=vision_layers,
    )
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    click.echo(
        f"wrote {preset} checkpoint to {path} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s"
    )
