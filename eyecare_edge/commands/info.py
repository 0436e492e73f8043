"""`eyecare-edge info`: print a bundle's manifest; `--verify` checks every file's size and digest."""

from __future__ import annotations

import json
from pathlib import Path

import click


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@click.command("info")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--verify", is_flag=True, help="Check every file against the manifest; exit 1 naming any that differs."
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest (and verification) as JSON.")
def info(bundle: Path, verify: bool, as_json: bool) -> None:
    """Show what a bundle holds: model, preprocessing, prompt, files, validation.

    \b
    Example:
      eyecare-edge info bundles/eyecare-3.8b --verify
    """
    from eyecare_edge.bundle import BundleError, read_manifest, verify_bundle

    m = read_manifest(bundle)  # BundleError: exit 1
    problems = verify_bundle(bundle, m) if verify else []
    if as_json:
        out = m.to_dict()
        out["digest"] = m.digest()
        if verify:
            out["verify"] = {
                "ok": not problems,
                "problems": [{"path": p.path, "reason": p.reason} for p in problems],
            }
        click.echo(json.dumps(out, indent=2))
    else:
        model = m.model
        click.echo(f"bundle   {bundle}  (format {m.format_version}, {m.producer}, {m.created})")
        click.echo(f"digest   {m.digest()[:16]}")
        click.echo(
            f"model    {model.get('preset') or '-'}: {model.get('llm_arch')} LLM, "
            f"{model.get('llm_layers')} layers x {model.get('n_embd')}; vision {model.get('vision_layers')} layers"
        )
        p = m.preprocess
        click.echo(
            f"tiles    {p['tile_size']} px, pinpoints up to {max(h for h, _ in p['pinpoints'])}x"
            f"{max(w for _, w in p['pinpoints'])}, anyres_max_{p['anyres_max']}, max_tiles {p['max_tiles']}"
        )
        click.echo(f"prompt   {m.prompt.template}; stop {m.prompt.stop_strings}")
        click.echo("files")
        for f in m.files:
            trt = f"  TensorRT {f.trt_version} sm{f.compute_capability}" if f.trt_version else ""
            click.echo(f"  {f.role:6s} {f.format:11s} {f.precision:8s} {_human(f.size):>9s}  {f.path}{trt}")
        if m.validation:
            click.echo("validation")
            for name, v in m.validation.items():
                passed = v.get("passed", True)
                status = "n/a " if passed is None else "ok  " if passed else "FAIL"
                figures = ", ".join(
                    f"{k}={x:.3g}" if isinstance(x, float) else f"{k}={x}"
                    for k, x in v.items()
                    if k not in ("passed",)
                )
                click.echo(f"  {status} {name}: {figures}")
        if verify:
            if problems:
                for pr in problems:
                    click.echo(f"MISMATCH {pr}", err=True)
            else:
                click.echo(f"verified {len(m.files)} files: all match")
    if problems:
        raise BundleError(f"{bundle}: {len(problems)} file(s) differ from the manifest")
