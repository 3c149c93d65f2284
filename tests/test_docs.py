"""The command line documents itself: every command and option has help, defaults are shown."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from sia_cli.cli import app

COMMANDS = typer.main.get_command(app).commands  # name -> click command, as registered


def help_text(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    # Rich draws boxes and wraps long lines: compare on single spaces, without the box edges.
    return " ".join(result.output.replace("│", " ").split())


def test_the_core_commands_are_registered():
    assert {"attack", "synth", "train-gan"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name):
    assert (COMMANDS[name].help or "").strip(), f"`sia {name}` has no docstring"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_and_argument_has_help(name):
    undocumented = [
        param.opts[0] for param in COMMANDS[name].params
        if not (getattr(param, "help", None) or "").strip() and "--help" not in param.opts
    ]
    assert not undocumented, f"`sia {name}`: no help for {', '.join(undocumented)}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_option_help_is_shown_in_full(name):
    # Rich reads `[word ...]` in help text as markup and drops it: the text must survive as written.
    text = help_text(name)
    for param in COMMANDS[name].params:
        written = " ".join((getattr(param, "help", None) or "").split())
        assert written in text, f"`sia {name} --help` garbles the help of {param.opts[0]}"


def test_top_level_help_lists_every_command():
    text = help_text()
    missing = [name for name in COMMANDS if name not in text]
    assert not missing, f"`sia --help` does not list {missing}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_command_help_runs(name):
    assert COMMANDS[name].help.strip().split("\n")[0][:40] in help_text(name)


def test_attack_help_shows_the_papers_defaults():
    text = help_text("attack")
    for shown in ("[default: 1.5/255]", "[default: 0.25/255]", "[default: 200]", "--method", "--protect",
                  "--force", "--attrs-file", "synth-faces-64"):
        assert shown in text, shown
    for method in ("sia", "attr", "image", "pgd", "fgsm", "spt"):
        assert method in text
