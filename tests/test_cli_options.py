"""The shared CLI flags (`eyecare_edge/commands/options.py`) against the options dataclass."""

from __future__ import annotations

from dataclasses import MISSING, fields

import click
from click.testing import CliRunner

from eyecare_edge.cli import main
from eyecare_edge.commands.options import PIPELINE_FLAGS, pipeline_options, runtime_options
from eyecare_edge.pipeline import PipelineOptions


def _param(command: click.Command, flag: str) -> click.Option:
    return next(p for p in command.params if isinstance(p, click.Option) and flag in p.opts)


def test_every_flag_sets_a_field_and_its_default_is_the_dataclass_default():
    defaults = {f.name: f.default for f in fields(PipelineOptions) if f.default is not MISSING}
    for name, flag in PIPELINE_FLAGS.items():
        assert name == flag.field and flag.field in defaults, flag
        if flag.is_flag:
            assert flag.value(False) == defaults[flag.field], flag  # not given: the dataclass default
        elif flag.default is not None:
            assert flag.default == defaults[flag.field], flag


def test_unset_flags_keep_the_dataclass_defaults():
    @click.command()
    @runtime_options
    def probe(**runtime):
        click.echo(repr(pipeline_options(runtime)))

    plain = CliRunner().invoke(probe, [])
    assert plain.exit_code == 0, plain.output
    assert plain.output.strip() == repr(PipelineOptions())
    given = CliRunner().invoke(
        probe,
        ["--threads", "3", "--no-verify", "--no-flash-attn", "--max-pixels", "99", "--visual-tokens", "25%"],
    )
    assert given.exit_code == 0, given.output
    expected = PipelineOptions(
        n_threads=3, verify=False, flash_attn=False, max_pixels=99, visual_tokens="25%"
    )
    assert given.output.strip() == repr(expected)


def test_ask_screen_serve_share_the_same_flags():
    from eyecare_edge.commands.ask import ask
    from eyecare_edge.commands.screen import screen
    from eyecare_edge.commands.serve import serve

    for flag in PIPELINE_FLAGS.values():
        decl = flag.decls[0].split("/")[0]
        params = [_param(c, decl) for c in (ask, screen, serve)]
        assert {(tuple(p.opts), p.name, p.help, p.default, repr(p.type)) for p in params} == {
            (tuple(params[0].opts), params[0].name, params[0].help, params[0].default, repr(params[0].type))
        }, decl


def test_bench_perf_export_inspect_reuse_the_table_rows():
    from eyecare_edge.commands.bench import bench
    from eyecare_edge.commands.export import export
    from eyecare_edge.commands.inspect import inspect_images
    from eyecare_edge.commands.perf import perf

    assert _param(bench, "--threads").name == "threads" and _param(perf, "--threads").name == "threads"
    assert repr(_param(bench, "--threads").type) == repr(PIPELINE_FLAGS["n_threads"].type)
    assert _param(bench, "--visual-tokens").help == PIPELINE_FLAGS["visual_tokens"].help
    assert _param(export, "--max-tiles").help == _param(inspect_images, "--max-tiles").help


def test_bad_visual_tokens_is_usage_before_any_load(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"not read")
    r = CliRunner().invoke(main, ["ask", str(tmp_path), str(image), "-q", "x", "--visual-tokens", "lots"])
    assert r.exit_code == 2 and "--visual-tokens" in r.output and "count" in r.output, r.output
