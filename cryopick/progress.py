"""Rich progress bars and console output that ``--quiet`` silences."""

from __future__ import annotations

import contextlib
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


class _NullProgress:
    """Stands in for rich.Progress when quiet: same calls, no output."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        return None

    def advance(self, *args, **kwargs) -> None:
        return None


@contextlib.contextmanager
def progress_bar(quiet: bool = False, extra: str = "") -> Iterator[Progress | _NullProgress]:
    """A progress bar on stderr; ``extra`` is a format string of task fields shown after the bar."""
    if quiet:
        yield _NullProgress()
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    if extra:
        columns.append(TextColumn(extra))
    with Progress(*columns, console=console, transient=False) as progress:
        yield progress


def info(message: str, quiet: bool = False) -> None:
    if not quiet:
        console.print(message)


def warn(message: str) -> None:
    """Warnings are printed even when quiet: they say something went wrong."""
    console.print(f"[yellow]warning:[/yellow] {message}", highlight=False)
