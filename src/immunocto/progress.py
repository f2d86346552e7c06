"""Progress reporting that library code can call without knowing who draws it.

Library functions take ``progress: Progress | None``; the CLI passes a rich-backed one,
tests pass nothing. A task is named, started with a total, and advanced.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, task: str, total: int, unit: str = "tiles") -> None:
        """Begin (or restart) ``task`` with ``total`` steps."""

    def advance(self, task: str, steps: int = 1) -> None:
        """Mark ``steps`` more steps of ``task`` as done."""


class NullProgress:
    """A :class:`Progress` that reports nothing."""

    def start(self, task: str, total: int, unit: str = "tiles") -> None:
        return None

    def advance(self, task: str, steps: int = 1) -> None:
        return None
