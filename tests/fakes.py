"""Fake inference sessions for runtime tests: answers that follow the image, so a test knows what to expect."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from edgedx.card import ModelCard


class FakeSession:
    """What every fake engine shares with a real runtime session: where it came from, how it runs, no self-test."""

    path = Path("fake.onnx")
    sha256 = None
    device = "cpu"
    providers = ("fake",)
    precision = "fp32"
    pads_batches = False
    selftest = None

    def close(self) -> None:
        pass


class RedLevelSession(FakeSession):
    """A fake inference session (uint8 NHWC crops): p(positive class) = (mean red + 1) / 256 of each crop (binary),
    or the mean RGB shares (three classes); returned as log-probabilities, which the card's softmax turns back into
    them. Counts the crops it was given (``crops``)."""

    path = Path("fake model.onnx")

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.crops = 0

    def run(self, x: np.ndarray) -> np.ndarray:
        self.crops += len(x)
        rgb = x.reshape(len(x), -1, 3).mean(axis=1) + 1.0
        if self.card.n_classes == 2:
            p = np.clip(rgb[:, 0] / 256.0, 1e-4, 1 - 1e-4)
            probs = np.stack([1 - p, p], axis=1) if self.card.positive_index == 1 else np.stack([p, 1 - p], axis=1)
        else:
            probs = rgb / rgb.sum(axis=1, keepdims=True)
        return np.log(probs)


def fake_train(summary: dict[str, Any] | None = None) -> mock.MagicMock:
    """A stand-in for ``edgedx.training.train.train`` whose result the CLI can print (a multiclass run)."""
    fake = mock.MagicMock()
    fake.return_value.card.metrics = {"accuracy": 0.9, "balanced_accuracy": 0.8, "macro_auc": 0.95}
    fake.return_value.card.task = "multiclass"
    fake.return_value.summary = summary or {}
    fake.return_value.skipped = ()
    return fake
