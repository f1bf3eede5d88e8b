"""Progress bars for long transfers: rich on a terminal, nothing elsewhere (logs stay plain)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # rich is imported only when a bar is drawn: it costs ~40 ms at start-up
    from rich.console import Console


@contextmanager
def transfer_progress(
    description: str, total: int | None, *, enabled: bool, console: Console | None = None
) -> Iterator[Callable[[int], None]]:
    """Given a description, the bytes expected and whether progress is wanted, yield `update(bytes_done)`.

    A bar is drawn only when `enabled` and the console (stderr by default) is a terminal;
    otherwise `update` does nothing. The bar is removed when the block ends."""
    if not enabled or (console is None and not sys.stderr.isatty()):
        yield lambda completed: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    console = console or Console(stderr=True)
    if not console.is_terminal:
        yield lambda completed: None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total or None)

        def update(completed: int) -> None:
            progress.update(task, completed=completed)

        yield update


def progress_of(request, update: Callable[[int], None]) -> Callable[[int], None]:
    """Given an ArchiveRequest and a bar's `update(bytes_done)`, return the callback a backend gives its tool's
    progress: the tool's own count, or, when the request counts the bytes its source actually served
    (`bytes_served`, the bitmap method's view), that count, so clean segments the tool skips are not counted."""
    served = request.bytes_served
    if served is None:
        return update
    return lambda _tool_count: update(served())
