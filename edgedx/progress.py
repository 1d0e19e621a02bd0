"""The progress protocol between the library (which never prints) and the CLI (which draws bars)."""

from __future__ import annotations

from typing import Protocol


class ProgressFn(Protocol):
    """``progress(stage, done, total, info)``: called as work advances.

    ``stage`` is stable for one bar (e.g. "train"); ``total`` 0 means unknown;
    ``info`` is live detail for the bar's text (e.g. "epoch 3/10 loss 0.21").
    """

    def __call__(self, stage: str, done: int, total: int, info: str = "") -> None: ...


def no_progress(stage: str, done: int, total: int, info: str = "") -> None:
    """The default: library calls report nothing."""
