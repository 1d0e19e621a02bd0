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


STEP_LOGGER = "edgedx.steps"
"""One line per finished step of long work (an epoch, an export stage): the record that stays after the bar.

The library logs these at INFO to this logger; the CLI shows them without
``-v``, above the progress bar on a terminal and as plain lines when output is
a file (``nohup edgedx train ... > train.log``), so a log shows every epoch.
"""
