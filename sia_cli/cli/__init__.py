"""The `sia` command line: one short module per command, wired here."""

from __future__ import annotations

import importlib
import signal
import sys

from sia_cli import errors

try:  # importing torch takes seconds: Ctrl-C meanwhile is one line, not an import traceback
    import typer
    from typer.core import TyperGroup

    try:  # recent Typer vendors Click; older releases use the click package
        from typer._click import exceptions as click_exceptions
    except ImportError:
        from click import exceptions as click_exceptions
except KeyboardInterrupt:
    sys.stderr.write("error: interrupted while starting\n")
    sys.exit(130)


def _usage_hint(ctx) -> str:
    """`see sia COMMAND --help`, named as the user types it whatever the program name (python -m sia_cli)."""
    names = []
    while ctx is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    names[-1] = "sia"
    return f"see {' '.join(reversed([n for n in names if n]))} --help"


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, a word where a number goes, an unreadable --config) as one
    line on stderr, exit 2, like every other error: not Click's multi-line usage box."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_exceptions.NoArgsIsHelpError as exc:  # bare `sia`: the help, as before
            exc.show()
            sys.exit(exc.exit_code)
        except click_exceptions.ClickException as exc:
            message = " ".join(exc.format_message().split()).rstrip(".")
            hint = _usage_hint(getattr(exc, "ctx", None)) if isinstance(exc, click_exceptions.UsageError) else ""
            sys.stderr.write(f"error: {message}{'; ' + hint if hint else ''}\n")
            sys.exit(exc.exit_code)
        except typer.Abort:
            sys.stderr.write("error: aborted\n")
            sys.exit(1)
        # A command's Exit comes back as its code; a command that returns normally gives None.
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="sia",
    cls=OneLineErrors,
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
COMMANDS = ["diagnose", "attack", "augment", "harden", "align", "sdar", "synth", "train_gan"]

try:
    for _name in COMMANDS:
        _module = importlib.import_module(f"sia_cli.cli.{_name}")
        app.command(_name.replace("_", "-"))(getattr(_module, _name))
except KeyboardInterrupt:
    sys.stderr.write("error: interrupted while starting\n")
    sys.exit(130)


def _terminate(signum, frame) -> None:
    """SIGTERM (CI cancellation, docker stop, Slurm) stops a run as Ctrl-C does: the same one
    line, partial report and resume; the exit code says which signal it was (143)."""
    errors.STOPPED_BY["signal"] = signal.SIGTERM
    raise KeyboardInterrupt


def main() -> None:
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, _terminate)
    app()
