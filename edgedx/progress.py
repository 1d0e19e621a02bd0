"""The progress protocol between the library (which never prints) and the CLI (which draws bars)."""

from __future__ import annotations

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called as work advances; ``total`` 0 means unknown."""


def no_progress(stage: str, done: int, total: int) -> None:
    """The default: library calls report nothing."""
