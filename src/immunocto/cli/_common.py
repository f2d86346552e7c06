"""What every command shares: error reporting, logging set-up, progress bars."""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from immunocto.errors import ImmunoctoError, is_out_of_space, out_of_space

#: Diagnostics go to stderr so stdout stays clean for results.
err_console = Console(stderr=True)
console = Console()

STATE: dict[str, Any] = {"verbose": 0}

F = TypeVar("F", bound=Callable[..., Any])


def setup_logging(verbose: int) -> None:
    """WARNING by default, INFO with ``-v``, DEBUG with ``-vv``; only immunocto's loggers."""
    STATE["verbose"] = verbose
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logger = logging.getLogger("immunocto")
    logger.setLevel(level)
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        handler = RichHandler(console=err_console, show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)


def fail(message: str, code: int = 2) -> None:
    """Print one red line to stderr and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


#: Library arguments whose command-line flag is not ``--argument-with-dashes``.
FLAGS = {
    "keep": "--v1-keep",
    "rule": "--v1-rule",
    "support": "--v1-support",
    "checkpoint": "--sam-checkpoint",
}


def _local_paths(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Path arguments given as ``file://`` URLs become paths; other URLs (``s3://``...) a
    clear error naming the option (:func:`immunocto._fs.local_path`)."""
    from immunocto._fs import local_path

    def one(name: str, v: Any) -> Any:
        if isinstance(v, Path):
            return local_path(v, name.replace("_", "-"))
        if isinstance(v, tuple | list) and v and all(isinstance(x, Path) for x in v):
            return type(v)(one(name, x) for x in v)
        return v

    return {k: one(k, v) for k, v in kwargs.items()}


def handle_errors(func: F) -> F:
    """User errors -> one line and a non-zero exit (traceback too with ``-v``)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **_local_paths(kwargs))
        except ImmunoctoError as err:
            if STATE["verbose"]:
                traceback.print_exc(file=sys.stderr)
            fail(err.for_cli(FLAGS))
        except OSError as err:  # out of space outside an atomic write (a worker's part file)
            if not is_out_of_space(err):
                raise
            if STATE["verbose"]:
                traceback.print_exc(file=sys.stderr)
            fail(str(out_of_space(err)))
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class RichProgress:
    """:class:`immunocto.progress.Progress` drawn as rich progress bars (one per task)."""

    def __init__(self) -> None:
        self._bars = Progress(
            TextColumn("[bold blue]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TextColumn("[cyan]{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err_console,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichProgress:
        self._bars.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.__exit__(*exc)

    def start(self, task: str, total: int, unit: str = "tiles") -> None:
        if task in self._tasks:
            self._bars.reset(self._tasks[task], total=total)
        else:
            self._tasks[task] = self._bars.add_task(task, total=total, unit=unit, rate="")

    def advance(self, task: str, steps: int = 1) -> None:
        tid = self._tasks.get(task)
        if tid is None:
            return
        self._bars.advance(tid, steps)
        info = self._bars.tasks[self._bars.task_ids.index(tid)]
        speed = info.speed
        if speed:
            self._bars.update(tid, rate=f"{speed:.2f} {info.fields['unit']}/s")
