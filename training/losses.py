"""Class-imbalance handling: weighted losses, a balanced sampler, and the evidence.

Weights follow the usual recipes for small imbalanced medical sets:

- binary and multi-label, per label: ``w_pos = N_neg / N`` and ``w_neg = N_pos / N``,
  so positives and negatives carry equal total weight;
- multi-class: inverse frequency, ``w_c = N / (C * N_c)`` (scikit-learn's "balanced").

:func:`loss_shares` reports each class's share of the training loss before and
after weighting (at initialisation every sample costs about the same, so the
share is proportional to ``weight x count``); the run summary shows it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from edgedx.errors import InputError

IMBALANCE_MODES = ("weighted", "sampler", "none")


def class_weights(targets: np.ndarray, task: str, n_classes: int) -> np.ndarray:
    """Per-class weights (binary/multiclass: (C,)); per-label (w_neg, w_pos) pairs for multilabel: (C, 2)."""
    n = len(targets)
    if task == "multilabel":
        pos = targets.sum(axis=0).astype(np.float64)
        return np.stack([pos / n, (n - pos) / n], axis=1)  # column 0: weight of a negative, 1: of a positive
    counts = np.bincount(targets, minlength=n_classes).astype(np.float64)
    missing = [i for i, c in enumerate(counts) if c == 0]
    if missing:
        raise InputError(f"class index(es) {missing} have no training images; every class needs some to weight the loss")
    if task == "binary":
        return counts[::-1] / n  # w_c = N_other / N
    return n / (n_classes * counts)


def loss_shares(targets: np.ndarray, task: str, class_names: tuple[str, ...], weights: np.ndarray | None) -> dict[str, Any]:
    """Each class's share of the total training loss, unweighted and weighted (fractions summing to 1)."""
    if task == "multilabel":
        n = len(targets)
        pos = targets.sum(axis=0).astype(np.float64)
        out = {}
        for i, name in enumerate(class_names):
            before = np.array([n - pos[i], pos[i]]) / n
            after = before if weights is None else before * weights[i] / max((before * weights[i]).sum(), 1e-12)
            out[name] = {"negative_before": before[0], "positive_before": before[1], "negative_after": after[0], "positive_after": after[1]}
        return out
    counts = np.bincount(targets, minlength=len(class_names)).astype(np.float64)
    before = counts / counts.sum()
    after = before if weights is None else counts * weights / (counts * weights).sum()
    return {name: {"before": float(b), "after": float(a)} for name, b, a in zip(class_names, before, after)}


class TaskLoss(nn.Module):
    """Cross-entropy (binary/multiclass, optional class weights) or summed per-label weighted BCE (multilabel)."""

    def __init__(self, task: str, weights: np.ndarray | None) -> None:
        super().__init__()
        self.task = task
        w = None if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.register_buffer("weights", w, persistent=False)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.task != "multilabel":
            return nn.functional.cross_entropy(logits, target, weight=self.weights)
        per_element = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.weights is not None:
            per_element = per_element * (target * self.weights[:, 1] + (1 - target) * self.weights[:, 0])
        return per_element.sum(dim=1).mean()  # one sigmoid per label, losses summed


def balanced_order(targets: np.ndarray, task: str, rng: np.random.Generator) -> np.ndarray:
    """An epoch of indices drawn with replacement so every class is equally likely (multilabel: by rarest positive label)."""
    if task == "multilabel":
        freq = targets.mean(axis=0)
        rarity = np.where(targets.any(axis=1), (targets / np.maximum(freq, 1e-12)).max(axis=1), 1.0 / max(1 - freq.max(), 1e-12))
        p = rarity / rarity.sum()
    else:
        counts = np.bincount(targets)
        p = 1.0 / counts[targets]
        p = p / p.sum()
    return rng.choice(len(targets), size=len(targets), replace=True, p=p)
