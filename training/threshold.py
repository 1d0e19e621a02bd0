"""Scoring validation predictions and choosing the operating threshold a deployed model uses.

Binary models screen for one class: the threshold is chosen on validation
data for a target sensitivity (:func:`operating_point`), in the middle of the
widest gap that keeps it (:func:`margin_threshold`). What a clinic must hear
before exporting comes from the same numbers (:func:`quality_warnings`).
Torch-free: every input is a numpy array of merged per-image probabilities.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from edgedx.card import ModelCard, ThresholdChoice, ThresholdSource
from edgedx.runtime.evaluate import wilson_interval
from edgedx.runtime.metrics import classification_metrics, threshold_for_sensitivity
from edgedx.runtime.outputs.plots import where_taken

WEAK_AUC = 0.6
NEAR_ZERO = 0.05


def score(y: np.ndarray, probs: np.ndarray, card: ModelCard, *, threshold: float | None = None) -> dict[str, Any]:
    """The full metric set. Binary decisions at ``threshold`` (argmax when None); multilabel per label at 0.5."""
    if card.task == "multilabel":
        per_label = {}
        for i, name in enumerate(card.class_names):
            p = np.stack([1 - probs[:, i], probs[:, i]], axis=1)
            cut = 0.5 if threshold is None else threshold
            per_label[name] = classification_metrics(
                y[:, i].astype(int), p, ("absent", name), y_pred=(probs[:, i] >= cut).astype(int)
            ).to_dict()
        keys = ("accuracy", "balanced_accuracy", "macro_auc")
        means = {k: nanmean([m[k] for m in per_label.values()]) for k in keys}
        return {**means, "n": len(y), "per_label": per_label}
    y_pred = None
    if card.task == "binary" and threshold is not None:
        pos = card.positive_index
        y_pred = np.where(probs[:, pos] >= threshold, pos, 1 - pos)
    return classification_metrics(y, probs, card.class_names, y_pred=y_pred, positive_index=card.positive_index or 1).to_dict()


def quality_warnings(final: dict[str, Any], card: ModelCard) -> list[str]:
    """What a clinic must hear before exporting: a model that barely separates the classes, or one that never
    (or always) calls a class at its operating point. Validation numbers, so they are warnings, not refusals."""
    binary = card.task == "binary"
    metrics = final["metrics"]["at_threshold"] if binary else final["metrics"]
    where = where_taken(card.task, card.threshold)
    warnings = []
    auc = metrics.get("macro_auc")
    if auc is not None and auc <= WEAK_AUC:
        warnings.append(f"validation AUC is {auc:.3f} (≤ {WEAK_AUC}; 0.5 is chance): the model barely separates the classes")
    rows = metrics.get("per_class") or {}
    if binary:
        rows = {card.positive_class: rows.get(card.positive_class, {})}
    for name, row in rows.items():
        for key in ("sensitivity", "specificity"):
            value = row.get(key) if isinstance(row, dict) else None
            if value is not None and value <= NEAR_ZERO:
                meaning = "it almost never calls" if key == "sensitivity" else "it calls almost everything"
                warnings.append(f"validation {key} for {name} is {value:.3f} {where}: {meaning} {name}")
    return warnings


def margin_threshold(truth: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The operating threshold for at least ``target`` sensitivity, with the widest margin.

    ``threshold_for_sensitivity`` gives the highest threshold reaching the
    target, which maximises specificity. Every threshold down to the highest
    negative below it keeps that specificity while catching more positives, so
    we go down to that gap and sit in its middle: between the highest such
    negative and the lowest positive above it. Validation specificity is
    unchanged, sensitivity can only rise, and the threshold is not glued to one
    validation case (less brittle on new images and on whole-image means).
    """
    top = float(threshold_for_sensitivity(truth, scores, target))
    negatives = scores[(truth == 0) & (scores < top)]
    if negatives.size == 0:
        below = scores[scores < top]
        return (top + float(below.max())) / 2.0 if below.size else top
    highest_negative = float(negatives.max())
    lowest_positive_above = float(scores[(truth == 1) & (scores > highest_negative)].min())
    return (highest_negative + lowest_positive_above) / 2.0


def operating_point(y: np.ndarray, probs: np.ndarray, card: ModelCard, target: float) -> dict[str, Any]:
    """Binary: the threshold reaching ``target`` sensitivity on validation data, and the metrics there."""
    if card.task != "binary":
        metrics = score(y, probs, card)
        return {"threshold": card.threshold, "metrics": metrics, "card_metrics": headline(metrics)}
    pos = card.positive_index
    assert pos is not None
    truth = (y == pos).astype(int)
    threshold = margin_threshold(truth, probs[:, pos], target) if truth.any() else 0.5
    at = score(y, probs, card, threshold=threshold)
    at_half = score(y, probs, card, threshold=0.5)
    row = at["per_class"][card.class_names[pos]]
    card_metrics = {
        **headline(at),
        "target_sensitivity": target,
        "threshold": threshold,
        "sensitivity": row["sensitivity"],
        "specificity": row["specificity"],
        "precision": row["precision"],
        "f1": row["f1"],
        "auc": at["macro_auc"],
    }
    return {"threshold": threshold, "metrics": {"at_threshold": at, "at_0.5": at_half}, "card_metrics": card_metrics}


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers a card's ``metrics`` carries from a full metric set."""
    return {k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_auc") if k in metrics}


def nanmean(values: list[Any]) -> float | None:
    """The mean of the values that exist (None and NaN left out); None when none does."""
    finite = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(finite)) if finite else None


COSTLY_SPECIFICITY = 0.2  # below this at the target sensitivity, the threshold calls nearly everything positive
THRESHOLD_BOOTSTRAP = 400


def choose_threshold(
    y: np.ndarray, probs: np.ndarray, card: ModelCard, target: float, *, source: ThresholdSource, seed: int = 0
) -> tuple[ThresholdChoice, list[str]]:
    """Where the binary operating threshold came from, how sure it is, and what it costs.

    Why: a threshold fitted on 21 positives can land anywhere; the card states
    the counts it came from, a bootstrap 95% interval of the threshold itself
    (the same rule refitted on resampled cases), sensitivity and specificity
    with Wilson intervals, and the alternatives a clinic would weigh (0.5 and
    the Youden point). When the target sensitivity costs nearly all specificity,
    the returned warning says so in words. Non-binary cards get ``source`` only.
    """
    if card.task != "binary":
        return ThresholdChoice(source, None, {"n": int(len(y))}), []
    pos = card.positive_index
    assert pos is not None
    truth = (np.asarray(y) == pos).astype(int)
    scores = np.asarray(probs, np.float64)[:, pos]
    if not truth.any() or truth.all():
        return ThresholdChoice(source, None, {"n": int(len(y)), "note": "one class only: no threshold fitted"}), []
    point = margin_threshold(truth, scores, target)
    youden = youden_threshold(truth, scores)
    fitted_on = {
        "n": int(len(truth)), "n_positive": int(truth.sum()), "n_negative": int((1 - truth).sum()), "target_sensitivity": target,
        "chosen": _at(truth, scores, point), "alternatives": {"0.5": _at(truth, scores, 0.5), "youden": _at(truth, scores, youden)},
    }
    interval = _bootstrap_threshold(truth, scores, target, seed)
    warnings = []
    spec = fitted_on["chosen"]["specificity"]
    if spec is not None and spec < COSTLY_SPECIFICITY:
        alt = fitted_on["alternatives"]
        warning = (
            f"sensitivity {target:.2f} costs nearly all specificity here: at threshold {point:.3g} specificity is {spec:.3f} "
            f"({source.replace('_', '-')}, {fitted_on['n_negative']} negatives), so nearly every {card.class_names[1 - pos]} case is called "
            f"{card.positive_class}. Alternatives: 0.5 → sensitivity {_fmt(alt['0.5']['sensitivity'])}, specificity {_fmt(alt['0.5']['specificity'])}; "
            f"Youden point {youden:.3g} → sensitivity {_fmt(alt['youden']['sensitivity'])}, specificity {_fmt(alt['youden']['specificity'])}. "
            "Choose another with --target-sensitivity, or read the alternatives in the card's threshold_choice"
        )
        fitted_on["warning"] = warning
        warnings.append(warning)
    return ThresholdChoice(source, interval, fitted_on), warnings


def youden_threshold(truth: np.ndarray, scores: np.ndarray) -> float:
    """The threshold maximising sensitivity + specificity - 1 (the highest such score: fewest false positives)."""
    pos, neg = max(int(truth.sum()), 1), max(int((1 - truth).sum()), 1)
    order = np.argsort(-scores, kind="stable")
    s, t = scores[order], truth[order]
    tp, fp = np.cumsum(t), np.cumsum(1 - t)
    last = np.r_[s[1:] != s[:-1], True]  # the counts at each distinct score, all ties included
    j = (tp[last] / pos) - (fp[last] / neg)
    return float(s[last][int(np.argmax(j))]) if s.size else 0.5


def _at(truth: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity and specificity at ``threshold`` with Wilson 95% intervals, and the counts behind them."""
    called = scores >= threshold
    tp, n_pos = int((called & (truth == 1)).sum()), int(truth.sum())
    tn, n_neg = int((~called & (truth == 0)).sum()), int((truth == 0).sum())
    return {
        "threshold": float(threshold),
        "sensitivity": tp / n_pos if n_pos else None, "sensitivity_ci95": wilson_interval(tp, n_pos),
        "specificity": tn / n_neg if n_neg else None, "specificity_ci95": wilson_interval(tn, n_neg),
    }


def _bootstrap_threshold(truth: np.ndarray, scores: np.ndarray, target: float, seed: int) -> tuple[float, float] | None:
    """The 2.5th and 97.5th percentiles of the threshold refitted on cases resampled with replacement."""
    rng = np.random.default_rng(seed)
    n, values = len(truth), []
    for _ in range(THRESHOLD_BOOTSTRAP):
        i = rng.integers(0, n, n)
        if 0 < truth[i].sum() < n:
            values.append(margin_threshold(truth[i], scores[i], target))
    if len(values) < THRESHOLD_BOOTSTRAP // 2:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return (round(float(low), 6), round(float(high), 6))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
