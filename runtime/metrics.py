"""Diagnostic metrics shared by training (validation) and evaluation (exported models).

One implementation, so the numbers written into a model card at training time and
the numbers reported for the shipped artefact are computed the same way. Only the
standard library and numpy are used: the runtime must not need torch or sklearn.

Conventions
-----------
* Labels are integer class indices in ``[0, n_classes)``; rows of a confusion
  matrix are the true class, columns the predicted class.
* A decision "positive at threshold t" means ``score >= t`` (as the runtime's
  ``decide`` does), so thresholds from :func:`threshold_for_sensitivity` and
  :func:`roc_curve` mean the same thing at deployment.
* Ratios whose denominator is zero (precision of a class never predicted,
  sensitivity of a class absent from the data, ...) are reported as ``0.0``
  rather than raising or returning nan, so a degenerate validation epoch still
  yields comparable numbers. AUC is the exception: it is ``nan`` when undefined,
  because 0.0 would read as "perfectly wrong".
* Bad input raises :class:`ValueError` with a message naming the bad value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "ClassificationMetrics",
    "classification_metrics",
    "confusion_matrix",
    "roc_auc",
    "roc_curve",
    "selective_metrics",
    "threshold_for_sensitivity",
]


# --------------------------------------------------------------------------- #
# Input validation
# --------------------------------------------------------------------------- #


def _as_labels(name: str, values: Any, n_classes: int) -> np.ndarray:
    """Integer labels as int64, refusing non-integers and labels outside ``[0, n_classes)``."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: metrics need at least one sample")
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    elif not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"{name} must hold integer class indices, got dtype {arr.dtype}")
        bad = ~np.isfinite(arr) | (arr != np.round(arr))
        if bad.any():
            raise ValueError(f"{name} must hold integer class indices, got {arr[np.argmax(bad)].item()!r}")
    out = arr.astype(np.int64)
    outside = (out < 0) | (out >= n_classes)
    if outside.any():
        raise ValueError(
            f"{name} contains label {int(out[np.argmax(outside)])}, outside [0, {n_classes}) "
            f"for {n_classes} class(es)"
        )
    return out


def _binary_inputs(y_true_binary: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(labels as bool, scores as float64)`` for the binary-score functions."""
    y = np.asarray(y_true_binary)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(f"y_true_binary and scores must be 1-D, got shapes {y.shape} and {s.shape}")
    if y.shape != s.shape:
        raise ValueError(f"y_true_binary has shape {y.shape} but scores has shape {s.shape}; they must match")
    if y.size == 0:
        raise ValueError("y_true_binary is empty: metrics need at least one sample")
    if y.dtype != bool:
        if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
            raise ValueError(f"y_true_binary must hold 0/1 labels, got dtype {y.dtype}")
        bad = (y != 0) & (y != 1)
        if bad.any():
            raise ValueError(f"y_true_binary must hold only 0 and 1, got {y[np.argmax(bad)].item()!r}")
    nonfinite = ~np.isfinite(s)
    if nonfinite.any():
        i = int(np.argmax(nonfinite))
        raise ValueError(f"scores must be finite, got {s[i].item()!r} at index {i}")
    return y.astype(bool), s


def _ratio(num: float, den: float) -> float:
    """num / den, or 0.0 when den is zero (see the module docstring for why)."""
    return float(num) / float(den) if den else 0.0


# --------------------------------------------------------------------------- #
# Building blocks
# --------------------------------------------------------------------------- #


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs: rows = true class, columns = predicted class.

    ``n_classes`` is explicit so classes absent from this sample still get a row
    and column, keeping matrices from different splits the same shape.
    """
    if int(n_classes) < 1:
        raise ValueError(f"n_classes must be at least 1, got {n_classes}")
    n_classes = int(n_classes)
    t = _as_labels("y_true", y_true, n_classes)
    p = _as_labels("y_pred", y_pred, n_classes)
    if t.shape != p.shape:
        raise ValueError(f"y_true has shape {t.shape} but y_pred has shape {p.shape}; they must match")
    counts = np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return counts.reshape(n_classes, n_classes).astype(np.int64)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` with tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts).astype(np.float64)  # rank of the last member of each tie group
    mean_rank = last - (counts - 1) / 2.0
    return mean_rank[inverse.reshape(-1)]


def roc_auc(y_true_binary: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank (Mann–Whitney U) formula with average ranks for ties.

    Equals P(score_pos > score_neg) + 0.5 P(score_pos == score_neg), in
    O(n log n) instead of the O(n_pos * n_neg) pairwise count. Returns
    ``float('nan')`` when only one class is present (the area is undefined).
    """
    y, s = _binary_inputs(y_true_binary, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = float(_average_ranks(s)[y].sum())
    u = rank_sum - n_pos * (n_pos + 1) / 2.0
    return u / (float(n_pos) * float(n_neg))


def roc_curve(y_true_binary: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)`` for the decisions ``score >= threshold``.

    ``thresholds`` are the distinct scores in descending order, preceded by
    ``+inf`` so the curve starts at (0, 0); the last point (threshold = lowest
    score) is (1, 1). When one class is absent its rate is undefined and that
    array is all nan, matching :func:`roc_auc` returning nan.
    """
    y, s = _binary_inputs(y_true_binary, scores)
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    # Index of the last sample of each group of equal scores: every sample of a
    # tie group crosses the threshold together.
    last_of_group = np.r_[np.flatnonzero(np.diff(s_sorted) != 0), s_sorted.size - 1]
    tp = np.cumsum(y_sorted)[last_of_group].astype(np.float64)
    fp = (last_of_group + 1) - tp
    n_pos = float(y.sum())
    n_neg = float(y.size) - n_pos
    tp = np.r_[0.0, tp]
    fp = np.r_[0.0, fp]
    tpr = tp / n_pos if n_pos else np.full_like(tp, np.nan)
    fpr = fp / n_neg if n_neg else np.full_like(fp, np.nan)
    thresholds = np.r_[np.inf, s_sorted[last_of_group]]
    return fpr, tpr, thresholds


def threshold_for_sensitivity(y_true_binary: np.ndarray, scores: np.ndarray, target: float = 0.95) -> float:
    """Highest threshold t such that sensitivity (tpr of scores >= t) >= target; used to set the card's operating threshold on validation data.

    The highest such t keeps specificity as high as possible while meeting the
    sensitivity target. It is always the score of a positive sample: the
    k-th highest positive score, with k the fewest positives that reach the
    target. Raises ValueError when there are no positives (no threshold can
    be chosen) or the target is outside (0, 1].
    """
    if isinstance(target, bool) or not isinstance(target, numbers.Real) or not 0.0 < float(target) <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target!r}")
    y, s = _binary_inputs(y_true_binary, scores)
    pos_desc = np.sort(s[y])[::-1]
    n_pos = pos_desc.size
    if n_pos == 0:
        raise ValueError("y_true_binary has no positive sample: no threshold reaches a sensitivity target")
    # Same arithmetic as a caller's check tp / n_pos >= target, so float rounding
    # (e.g. 0.7 * 10 = 7.000000000000001) cannot push k one too high.
    achievable = np.arange(1, n_pos + 1, dtype=np.float64) / n_pos >= float(target)
    k = int(np.argmax(achievable))  # first k (0-based) whose tpr reaches the target; the last one always does
    return float(pos_desc[k])


# --------------------------------------------------------------------------- #
# Summary
# --------------------------------------------------------------------------- #


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


@dataclass(frozen=True)
class ClassificationMetrics:
    """Validation/evaluation summary; ``to_dict`` is what goes into JSON and the card."""

    n: int
    accuracy: float
    balanced_accuracy: float  # mean per-class recall over classes present in y_true
    per_class: dict[str, dict[str, float]]  # name -> sensitivity, specificity, precision, f1, support, auc
    macro_auc: float  # mean of defined per-class AUCs (binary: the positive class's AUC); nan if none
    confusion: list[list[int]]
    class_names: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy (nan -> None, since JSON has no nan)."""
        return {
            "n": self.n,
            "accuracy": _json_float(self.accuracy),
            "balanced_accuracy": _json_float(self.balanced_accuracy),
            "macro_auc": _json_float(self.macro_auc),
            "per_class": {
                name: {
                    k: (int(v) if k == "support" else _json_float(v)) for k, v in stats.items()
                }
                for name, stats in self.per_class.items()
            },
            "confusion": [list(row) for row in self.confusion],
            "class_names": list(self.class_names),
        }


def classification_metrics(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    *,
    y_pred: np.ndarray | None = None,
    positive_index: int = 1,
) -> ClassificationMetrics:
    """y_true int labels (n,), probabilities (n, C) rows summing to 1. y_pred defaults to argmax; callers pass y_pred when they decide at an operating threshold (binary).

    Per-class numbers are one-vs-rest. AUCs come from ``probabilities`` (the
    ranking), everything else from the decisions ``y_pred``. For a binary
    task ``macro_auc`` is the AUC of ``class_names[positive_index]`` (default 1;
    with complementary probabilities both classes' AUCs are equal anyway).
    Rows are not renormalised or checked to sum to 1.
    """
    names = _class_names(class_names)
    n_classes = len(names)
    truth, probs, pred = _checked_predictions(y_true, probabilities, y_pred, n_classes)
    if n_classes == 2 and not 0 <= positive_index < 2:
        raise ValueError(f"positive_index must be 0 or 1 for a binary task, got {positive_index}")

    cm = confusion_matrix(truth, pred, n_classes)
    tp_all = np.diag(cm)
    support_all = cm.sum(axis=1)
    per_class, aucs = _per_class_stats(cm, truth, probs, names)

    present = support_all > 0
    recalls = tp_all[present] / support_all[present]
    n = truth.size
    return ClassificationMetrics(
        n=n,
        accuracy=float(tp_all.sum()) / n,
        balanced_accuracy=float(recalls.mean()),
        per_class=per_class,
        macro_auc=float(_macro_auc(aucs, positive_index)),
        confusion=cm.tolist(),
        class_names=names,
    )


def _class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    """Class names as strings; refused when empty or repeated, since they key the per-class results."""
    names = tuple(str(c) for c in class_names)
    n_classes = len(names)
    if n_classes == 0:
        raise ValueError("class_names is empty: metrics need at least one class")
    if len(set(names)) != n_classes:
        dup = next(c for c in names if names.count(c) > 1)
        raise ValueError(f"class_names must be distinct, {dup!r} appears more than once in {list(names)}")
    return names


def _checked_predictions(
    y_true: Any, probabilities: Any, y_pred: Any, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated ``(truth, probabilities as float64, decisions)``; decisions default to the argmax.

    Checked together so a shape mismatch names all the arrays involved.
    """
    truth = _as_labels("y_true", y_true, n_classes)
    probs = np.asarray(probabilities, dtype=np.float64)
    n = truth.size
    if probs.shape != (n, n_classes):
        raise ValueError(
            f"probabilities has shape {probs.shape} but y_true has shape {truth.shape} and class_names has "
            f"{n_classes} entries; expected probabilities of shape ({n}, {n_classes})"
        )
    if not np.isfinite(probs).all():
        raise ValueError("probabilities contain nan or inf")
    if y_pred is None:
        pred = probs.argmax(axis=1).astype(np.int64)
    else:
        pred = _as_labels("y_pred", y_pred, n_classes)
        if pred.shape != truth.shape:
            raise ValueError(f"y_pred has shape {pred.shape} but y_true has shape {truth.shape}; they must match")
    return truth, probs, pred


def _per_class_stats(
    cm: np.ndarray, truth: np.ndarray, probs: np.ndarray, names: tuple[str, ...]
) -> tuple[dict[str, dict[str, float]], list[float]]:
    """One-vs-rest numbers per class (decisions from ``cm``, AUC from ``probs``) and the AUCs in class order."""
    n = truth.size
    tp_all = np.diag(cm)
    support_all = cm.sum(axis=1)
    predicted_all = cm.sum(axis=0)
    per_class: dict[str, dict[str, float]] = {}
    aucs: list[float] = []
    for c, name in enumerate(names):
        tp = int(tp_all[c])
        fn = int(support_all[c]) - tp
        fp = int(predicted_all[c]) - tp
        tn = n - tp - fn - fp
        sensitivity = _ratio(tp, tp + fn)
        precision = _ratio(tp, tp + fp)
        auc = roc_auc(truth == c, probs[:, c])
        per_class[name] = {
            "sensitivity": sensitivity,
            "specificity": _ratio(tn, tn + fp),
            "precision": precision,
            "f1": _ratio(2.0 * precision * sensitivity, precision + sensitivity),
            "support": int(support_all[c]),
            "auc": auc,
        }
        aucs.append(auc)
    return per_class, aucs


def _macro_auc(aucs: list[float], positive_index: int) -> float:
    """Binary: the positive class's AUC (both are equal for complementary scores); else the mean of the defined ones."""
    if len(aucs) == 2:
        return aucs[positive_index]
    defined = [a for a in aucs if not math.isnan(a)]
    return float(np.mean(defined)) if defined else float("nan")


# --------------------------------------------------------------------------- #
# Abstention
# --------------------------------------------------------------------------- #


def selective_metrics(
    truth: np.ndarray, predicted: np.ndarray, kept: np.ndarray, *, positive_index: int | None = None
) -> dict[str, Any]:
    """Accuracy (and, with ``positive_index``, sensitivity and specificity) on all cases and on the cases ``kept``
    (those not referred to a person), with how many each holds.

    Why both: referring the hard cases raises accuracy on the rest, and the
    clinic must see that gain next to its price (the share referred). Here an
    empty denominator gives None, not 0.0: "no case kept" is not "all wrong".
    """
    y, p = np.asarray(truth, np.int64), np.asarray(predicted, np.int64)
    keep = np.asarray(kept, bool)
    if not (len(y) == len(p) == len(keep)):
        raise ValueError(f"truth, predicted and kept must have one entry per case, got {len(y)}, {len(p)} and {len(keep)}")

    def share(num: int, den: int) -> float | None:
        return float(num) / den if den else None

    def block(mask: np.ndarray) -> dict[str, Any]:
        yt, yp = y[mask], p[mask]
        out: dict[str, Any] = {"n": int(mask.sum()), "accuracy": share(int((yt == yp).sum()), int(mask.sum()))}
        if positive_index is not None:
            pos, called = yt == positive_index, yp == positive_index
            out["sensitivity"] = share(int((pos & called).sum()), int(pos.sum()))
            out["specificity"] = share(int((~pos & ~called).sum()), int((~pos).sum()))
        return out

    return {"all": block(np.ones(len(y), bool)), "not_referred": block(keep)}
