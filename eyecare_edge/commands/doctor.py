"""`eyecare-edge doctor [BUNDLE] [--json]`: what this machine can run, why not, and how to fix it."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("doctor")
@click.argument("bundle", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object: every backend with available and reason."
)
def doctor(bundle: Path | None, as_json: bool) -> None:
    """Check this machine: CPU, llama.cpp build, GPU, TensorRT, ONNX Runtime; with BUNDLE, which
    vision backend and LLM device it would get. Each missing piece comes with the command that fixes it.

    \b
    Examples:
      eyecare-edge doctor
      eyecare-edge doctor bundles/eyecare-3.8b --json
    Exit codes: 0 report printed; 1 the bundle cannot be read.
    """
    from eyecare_edge.doctor import diagnose, format_text

    report = diagnose(bundle)  # BundleError: exit 1
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    for line in format_text(report):
        click.echo(line)
