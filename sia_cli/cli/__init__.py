"""The `sia` command line: one short module per command, wired here."""

from __future__ import annotations

import importlib
import importlib.util

import typer

app = typer.Typer(
    name="sia",
    help="Semantic Image Attack: find which semantic attributes (bangs, eyeglasses, hair colour...) "
    "make a vision model fail, and write adversaries, a sensitivity histogram and reports.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

def _version(value: bool) -> None:
    if value:
        from sia_cli import __version__

        typer.echo(f"sia {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Semantic Image Attack: which semantic attributes make a vision model fail."""


# Module `sia_cli.cli.<name>` defines a function of the same name; the command is named with dashes.
COMMANDS = ["diagnose", "attack", "augment", "sdar", "synth", "train_gan", "backbones"]

for _name in COMMANDS:
    if importlib.util.find_spec(f"sia_cli.cli.{_name}") is not None:
        _module = importlib.import_module(f"sia_cli.cli.{_name}")
        app.command(_name.replace("_", "-"))(getattr(_module, _name))


def main() -> None:
    app()
