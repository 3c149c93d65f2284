"""Shared pieces of the command layer: error mapping and the Rich progress adapter."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from sia_cli.errors import INTERRUPTED, SiaError, interrupted_code
from sia_cli.runs.distributed import launched_rank

console = Console()
err_console = Console(stderr=True)


def main_process() -> bool:
    """Under torchrun only rank 0 speaks: N copies of every table would bury the one that matters."""
    return launched_rank() == 0


def fail(message: str, code: int = 2, shared: bool = False) -> typer.Exit:
    if shared and not main_process():
        return typer.Exit(code)
    if not main_process():
        message = f"rank {launched_rank()}: {message}"
    # User text may contain `[...]` or `:name:`; never let Rich read it as markup or emoji.
    err_console.print("error: " + message, style="bold red", markup=False, emoji=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(command: Callable) -> Callable:
    """Map engine errors to one line on stderr and an exit code, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except SiaError as exc:
            if exc.exit_code == INTERRUPTED:  # Ctrl-C or SIGTERM; under torchrun rank 0 alone says it
                raise fail(str(exc), interrupted_code(), shared=True) from None
            raise fail(str(exc), exc.exit_code, exc.shared) from None
        except KeyboardInterrupt:  # while starting: loading models, checking inputs
            raise fail("interrupted", interrupted_code(), shared=True) from None
        except FileNotFoundError as exc:
            raise fail(f"file not found: {exc.filename}") from None
        except PermissionError as exc:
            raise fail(f"permission denied: {exc.filename}") from None
        except OSError as exc:
            raise fail(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from None
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug of ours: still one line, the traceback on request
            if os.environ.get("SIA_DEBUG"):
                raise
            raise fail(f"internal error: {type(exc).__name__}: {exc} (set SIA_DEBUG=1 for the traceback)", 3) from None

    return wrapper


def print_warnings(report: dict) -> None:
    """A report's warnings, one line each, on stderr where a CI log shows them beside errors;
    after --align, first what it made of the photos."""
    aligned = report.get("alignment")
    if aligned:
        console.print(f"--align: {aligned['photos']} photos -> {aligned['faces']} faces, "
                      f"{len(aligned['skipped'])} skipped", markup=False, highlight=False)
    for line in report.get("warnings") or []:
        err_console.print("warning: " + line, style="yellow", markup=False, emoji=False, highlight=False,
                          soft_wrap=True)


def progress_enabled(no_progress: bool) -> bool:
    return not no_progress and sys.stderr.isatty() and main_process()


@contextlib.contextmanager
def rich_progress(enabled: bool = True) -> Iterator[Callable]:
    """Yield a progress callback `(task, done, total, info)` drawing Rich bars on stderr."""
    if not enabled:
        yield lambda *args, **kwargs: None
        return
    bars = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=err_console,
        transient=False,
    )
    ids: dict[str, int] = {}

    def update(task: str, done: int, total: int, info: dict | None = None) -> None:
        if task not in ids:
            ids[task] = bars.add_task(task, total=total, info="")
        text = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (info or {}).items())
        bars.update(ids[task], completed=done, total=total, info=text)

    with bars:
        yield update
