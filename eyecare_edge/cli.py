"""The `eyecare-edge` command line.

Every sub-command lives in its own module under `eyecare_edge/commands/` and is imported only when
it is invoked, so `eyecare-edge ask` on a Jetson never touches torch, and `--help` stays instant.
Heavy rooms (training, export) are imported inside the command functions themselves.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from eyecare_edge import __version__
from eyecare_edge.errors import EyecareError

# name -> "module:attribute"; the order is the order `--help` lists them in.
COMMANDS: dict[str, str] = {
    "demo": "eyecare_edge.commands.demo:demo",
    "synth": "eyecare_edge.commands.synth:synth",
    "init": "eyecare_edge.commands.init:init",
    "train": "eyecare_edge.commands.train:train",
    "export": "eyecare_edge.commands.export:export",
    "build-engine": "eyecare_edge.commands.build_engine:build_engine",
    "doctor": "eyecare_edge.commands.doctor:doctor",
    "info": "eyecare_edge.commands.info:info",
    "inspect": "eyecare_edge.commands.inspect:inspect_images",
    "ask": "eyecare_edge.commands.ask:ask",
    "screen": "eyecare_edge.commands.screen:screen",
    "serve": "eyecare_edge.commands.serve:serve",
    "bench": "eyecare_edge.commands.bench:bench",
    "perf": "eyecare_edge.commands.perf:perf",
}


class LazyGroup(click.Group):
    """A click group that imports a sub-command's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if _module_exists(COMMANDS[name])]

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        return getattr(importlib.import_module(module_name), attr)

    def invoke(self, ctx: click.Context) -> object:
        """Run the sub-command; an `EyecareError` becomes `error: …` and its exit code (1, 2 or 3)."""
        try:
            return super().invoke(ctx)
        except EyecareError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)


def _module_exists(target: str) -> bool:
    return importlib.util.find_spec(target.split(":")[0]) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="eyecare-edge")
def main() -> None:
    """EyecareGPT on clinic workstations, Jetson devices and fundus cameras.

    Typical flow: `init` or `train` a checkpoint, `export` it to a bundle, then `ask`,
    `screen` or `bench` with the bundle. `eyecare-edge demo` runs all of it on phantom data.
    """


if __name__ == "__main__":
    main()
