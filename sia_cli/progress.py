"""The engine reports progress through a plain callback so it never depends on Rich."""

from typing import Callable, Protocol


class Progress(Protocol):
    def __call__(self, task: str, done: int, total: int, info: dict | None = None) -> None: ...


def silent(task: str, done: int, total: int, info: dict | None = None) -> None:
    """Default callback: report nothing."""


ProgressFn = Callable[..., None]
