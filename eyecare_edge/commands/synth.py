"""`eyecare-edge synth`: write phantom (synthetic) fundus/OCT images with training and bench files.

Needs only numpy and OpenCV: the generator lives in the torch-free phantom room
(`eyecare_edge.phantom`), so this command works on a runtime-only install too.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from eyecare_edge.errors import EyecareError


@click.command(
    epilog=(
        "\b\nExample:\n"
        "  eyecare-edge synth --out work/phantom --n 400 --seed 0\n"
        "  -> work/phantom/{images/, train.json, bench.jsonl, truth.jsonl, README.txt}"
    )
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, dir_okay=True, writable=True, path_type=Path),
    help="Output folder; receives images/, train.json, bench.jsonl, truth.jsonl and README.txt.",
)
@click.option(
    "--n", "n", type=click.IntRange(1, 999_999), default=400, show_default=True, help="Number of images."
)
@click.option(
    "--seed",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Random seed (same seed: identical files).",
)
@click.option(
    "--bench-fraction",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.2,
    show_default=True,
    help="Share of images held out for bench.jsonl (split by image).",
)
@click.option(
    "--fundus-fraction",
    type=click.FloatRange(0.0, 1.0),
    default=0.6,
    show_default=True,
    help="Share of colour-fundus images; the rest are OCT B-scans.",
)
@click.option(
    "--single-turn",
    is_flag=True,
    help="One training sample per closed question instead of one multi-turn conversation per image.",
)
@click.option(
    "--image-scale",
    type=float,
    default=1.0,
    show_default=True,
    help="Multiply every image's size (fundus 400-1000 px wide, OCT 300-800 px at 1; 0.25 to 2); "
    "the ground truth is the same at any scale.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def synth(
    out_dir: Path,
    n: int,
    seed: int,
    bench_fraction: float,
    fundus_fraction: float,
    single_turn: bool,
    image_scale: float,
    as_json: bool,
) -> None:
    """Write phantom (synthetic, labelled as such) fundus and OCT data with exact ground truth.

    Colour-fundus photographs (optic disc side = laterality, vessels, macula, haemorrhages, hard
    exudates, microaneurysms, cotton-wool spots, drusen; DR grade derived from the lesions) and OCT
    B-scans (normal, fluid pocket, drusen) in varied sizes, with an Eyecare-100K-style train.json and
    an Eyecare-Bench-style bench.jsonl (closed, open and report items), split by image.
    """
    from eyecare_edge.phantom import make_phantom_dataset
    from eyecare_edge.phantom.dataset import check_image_scale

    try:  # the one value click does not range-check, checked before anything is written
        check_image_scale(image_scale)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--image-scale") from e
    try:
        ds = make_phantom_dataset(
            out_dir,
            n,
            seed,
            bench_fraction=bench_fraction,
            fundus_fraction=fundus_fraction,
            multi_turn=not single_turn,
            image_scale=image_scale,
        )
    except OSError as e:
        raise EyecareError(f"could not write phantom data to {out_dir}: {e}") from e
    if as_json:
        click.echo(
            json.dumps(
                {
                    "out": str(ds.root),
                    "images": ds.n_images,
                    "fundus": ds.n_fundus,
                    "oct": ds.n_oct,
                    "train_images": ds.n_train_images,
                    "bench_images": ds.n_bench_images,
                    "train_samples": ds.n_train_samples,
                    "bench_items": ds.bench_counts,
                    "seconds": round(ds.seconds, 2),
                    "synthetic": True,
                }
            )
        )
    else:
        click.echo(ds.summary())
