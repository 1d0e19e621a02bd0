"""Calibration and abstention arithmetic: temperature scaling, calibration error, split-conformal sets, crop dispersion.

numpy only, so training (fitting on validation), export (site recalibration)
and the runtime (applying, evaluating, monitoring) share one implementation.

Why temperature scaling: one parameter per model (per label for multilabel)
keeps the ranking of every image, so AUC and the threshold's order are
unchanged while the probabilities become honest (Guo et al., 2017). It is
fitted on images merged through the card's crop policy, the path ``diagnose``
runs, not on single crops.

Why split-conformal sets: a prediction set that contains the true class for
at least ``coverage`` of future images from the same distribution, with no
model assumptions (Angelopoulos & Bates, 2021); a set with more than one
class (or none) is an honest "refer".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

T_RANGE = (0.05, 20.0)  # temperatures searched; outside it a model is broken, not miscalibrated


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray, task: str) -> float:
    """Mean NLL of (N, C) probabilities: the class index per image (binary/multiclass) or (N, C) 0/1 (multilabel)."""
    p = np.clip(np.asarray(probs, np.float64), 1e-12, 1 - 1e-12)
    if task == "multilabel":
        y = np.asarray(labels, np.float64)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return float(-np.mean(np.log(p[np.arange(len(p)), np.asarray(labels, int)])))


def fit_temperature(
    probabilities_at: Callable[[tuple[float, ...]], np.ndarray], labels: np.ndarray, task: str, n_classes: int,
) -> tuple[float, ...]:
    """The temperature(s) minimising NLL of ``probabilities_at(temperatures)`` (image probabilities through the
    deployed merge) on ``labels``: one for binary/multiclass, one per label for multilabel (each label's
    probability depends only on its own temperature, so they are fitted one at a time)."""
    if task != "multilabel":
        best = _golden(lambda t: negative_log_likelihood(probabilities_at((t,)), labels, task))
        return (best,)
    y = np.asarray(labels, np.float64)
    temps = [1.0] * n_classes
    for k in range(n_classes):
        def loss(t: float, k: int = k) -> float:
            trial = tuple(t if i == k else temps[i] for i in range(n_classes))
            return negative_log_likelihood(probabilities_at(trial)[:, k : k + 1], y[:, k : k + 1], "multilabel")

        temps[k] = _golden(loss)
    return tuple(temps)


def _golden(loss: Callable[[float], float], iterations: int = 40) -> float:
    """Minimise ``loss`` over log-temperature in T_RANGE: a coarse grid, then golden-section search around its best."""
    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    grid = np.linspace(lo, hi, 25)
    values = [loss(math.exp(g)) for g in grid]
    i = int(np.argmin(values))
    a, b = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(math.exp(c)), loss(math.exp(d))
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(math.exp(d))
    return round(math.exp((a + b) / 2), 4)


def _confidence_and_hit(probs: np.ndarray, labels: np.ndarray, task: str, positive: int | None) -> tuple[np.ndarray, np.ndarray]:
    """What calibration is measured on: binary p(positive) vs is-positive; multiclass top confidence vs
    top-is-right; multilabel every (image, label) probability vs its label."""
    p = np.asarray(probs, np.float64)
    if task == "binary":
        pos = 1 if positive is None else positive
        return p[:, pos], (np.asarray(labels, int) == pos).astype(float)
    if task == "multilabel":
        return p.ravel(), np.asarray(labels, np.float64).ravel()
    return p.max(axis=1), (p.argmax(axis=1) == np.asarray(labels, int)).astype(float)


def reliability(probs: np.ndarray, labels: np.ndarray, task: str, positive: int | None = None, bins: int = 10) -> list[dict[str, float]]:
    """Equal-width bins of confidence: mean confidence, observed frequency and count per non-empty bin."""
    conf, hit = _confidence_and_hit(probs, labels, task, positive)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            rows.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "confidence": float(conf[mask].mean()),
                         "observed": float(hit[mask].mean()), "n": int(mask.sum())})
    return rows


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, task: str, positive: int | None = None, bins: int = 10) -> float:
    """ECE: the count-weighted mean |observed − confidence| over the reliability bins."""
    rows = reliability(probs, labels, task, positive, bins)
    total = sum(r["n"] for r in rows)
    return float(sum(r["n"] * abs(r["observed"] - r["confidence"]) for r in rows) / total) if total else float("nan")


def brier_score(probs: np.ndarray, labels: np.ndarray, task: str) -> float:
    """Mean squared error of the probabilities against one-hot (or multilabel 0/1) truth, averaged over classes."""
    p = np.asarray(probs, np.float64)
    if task == "multilabel":
        y = np.asarray(labels, np.float64)
    else:
        y = np.zeros_like(p)
        y[np.arange(len(p)), np.asarray(labels, int)] = 1.0
    return float(np.mean(np.sum((p - y) ** 2, axis=1) / p.shape[1]))


def conformal_qhat(probs: np.ndarray, labels: np.ndarray, coverage: float) -> float:
    """Split-conformal threshold on the score 1 − p(true class): the ⌈(n+1)·coverage⌉-th smallest score.

    With n calibration images, a new image's set {c : 1 − p(c) ≤ qhat} holds
    its true class with probability at least ``coverage``; with too few images
    for that level (⌈(n+1)·coverage⌉ > n) qhat is 1 (every class: always refer).
    """
    p = np.asarray(probs, np.float64)
    scores = np.sort(1.0 - p[np.arange(len(p)), np.asarray(labels, int)])
    rank = math.ceil((len(scores) + 1) * coverage)
    return 1.0 if rank > len(scores) or not len(scores) else float(scores[rank - 1])


def prediction_set(probabilities: Sequence[float], qhat: float, class_names: Sequence[str]) -> list[str]:
    """The classes whose score 1 − p is within ``qhat``, most probable first."""
    order = np.argsort(-np.asarray(probabilities, np.float64))
    return [class_names[i] for i in order if 1.0 - probabilities[i] <= qhat + 1e-12]


def crop_dispersion(crop_probs: np.ndarray, index: int | None) -> float:
    """How much an image's crops disagree: the standard deviation over crops of the probability of class
    ``index`` (the positive class), or with None the largest such deviation over the classes; 0 for one crop."""
    p = np.asarray(crop_probs, np.float64)
    if len(p) < 2:
        return 0.0
    if index is not None:
        return float(p[:, index].std())
    return float(p.std(axis=0).max())


def dispersion_limit(dispersions: np.ndarray, quantile: float = 0.98) -> float | None:
    """The dispersion above which an image is referred: the ``quantile`` of validation images' dispersions
    (so about 1 − quantile of cases like the validation ones are referred for it); None without images."""
    d = np.asarray(dispersions, np.float64)
    d = d[np.isfinite(d)]
    return float(np.quantile(d, quantile)) if len(d) else None
