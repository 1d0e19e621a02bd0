"""Choices made on out-of-fold predictions, and the figures a cross-validation reports.

Why: a recipe tuned on one small validation split (BreastMNIST: 78 images, 21
malignant) fits its epoch and threshold to those images and does not hold up on
new ones. With ``--folds K`` every training image is predicted once by the fold
model that did not train on it, so:

- the epoch is the best of the folds' *mean* validation curve
  (:func:`choose_epoch`), one epoch count for every fold;
- the operating threshold is fitted on the pooled out-of-fold predictions
  (hundreds of positives, not 21) with its bootstrap interval and the
  alternatives (:func:`edgedx.training.threshold.choose_threshold`);
- the fold spread (mean, sd, min-max of each fold's metric) is the expected
  generalisation interval, and the pooled out-of-fold metrics carry bootstrap
  intervals. Both were used for selection, and the summary says so;
- the held-out split (the source's own val/test, or ``--test-fraction``) is in
  no fold and no choice: the per-fold figures on it, and the ensemble's, are
  the result.

Torch-free, numpy only: every input is merged per-image probabilities written by
the folds (``val_predictions.npz``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from edgedx.card import Abstention, ModelCard, ThresholdChoice
from edgedx.errors import InputError
from edgedx.runtime.evaluate import bootstrap_intervals, score
from edgedx.runtime.trust import conformal_qhat
from edgedx.training.run import RunFolder
from edgedx.training.threshold import choose_threshold

log = logging.getLogger(__name__)

SPREAD_METRICS = ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity")
# what the out-of-fold figures describe, stated beside them: the fold ensemble that ships averages all K models, so its
# own probabilities (and its sensitivity/specificity at this threshold) are measured on held-out data, not here
PREDICTED_BY = (
    "each image by the one fold model that did not train on it; the fold ensemble averages all of them, so its own "
    "sensitivity and specificity at this threshold are the held-out figures (cv_summary.json, edgedx evaluate)"
)


@dataclass(frozen=True)
class Pooled:
    """Every fold's validation items, once each: indices into the decoded source, labels, calibrated probabilities, fold."""

    idx: np.ndarray
    targets: np.ndarray
    probs: np.ndarray
    fold: np.ndarray


def metric_key(monitor: str) -> str:
    """The key of ``--monitor``'s value in a metric set ("auc" is stored as the macro AUC)."""
    return "macro_auc" if monitor == "auc" else monitor


def monitored_value(row: dict[str, Any], monitor: str) -> float:
    """An epoch row's value of the monitored metric (higher is better: the loss is negated); NaN when undefined."""
    if monitor == "loss":
        return -float(row["val_loss"])
    value = row.get("val", {}).get(metric_key(monitor))
    return float("nan") if value is None else float(value)


def choose_epoch(histories: Sequence[Sequence[dict[str, Any]]], monitor: str) -> tuple[int, list[float | None]]:
    """The epoch whose mean (over folds) monitored validation value is highest, earliest on ties, and the mean curve.

    Only epochs every fold reached count, so each fold model exists at the chosen epoch.
    """
    last = min(len(h) for h in histories)
    if last == 0:
        raise InputError("no fold finished an epoch: nothing to choose from; raise --epochs")
    curves = np.array([[monitored_value(row, monitor) for row in h[:last]] for h in histories], np.float64)
    with np.errstate(all="ignore"):
        mean = np.nanmean(curves, axis=0) if np.isfinite(curves).any() else np.full(last, np.nan)
    if not np.isfinite(mean).any():
        raise InputError(
            f"no fold has a validation {monitor.replace('_', ' ')} at any epoch (a validation fold with one class has no AUC): "
            "nothing to choose the epoch on; use another --monitor or fewer --folds"
        )
    best = int(np.nanargmax(mean))
    return best + 1, [None if not np.isfinite(v) else round(float(v), 6) for v in mean]


def pool_predictions(folds: Sequence[RunFolder]) -> Pooled:
    """The folds' ``val_predictions.npz``, concatenated; every item must appear once (folds partition the pool)."""
    parts = []
    for i, run in enumerate(folds):
        if not run.predictions.is_file():
            raise InputError(f"{run.predictions} is missing: fold {i} did not finish; run the cross-validation again with --overwrite")
        with np.load(run.predictions, allow_pickle=False) as saved:
            parts.append((saved["idx"], saved["targets"], saved["probs"], np.full(len(saved["idx"]), i)))
    idx, targets, probs, fold = (np.concatenate([p[j] for p in parts]) for j in range(4))
    if len(np.unique(idx)) != len(idx):
        raise InputError("the folds' validation items overlap: the folds were not written by one cross-validation; run it again with --overwrite")
    order = np.argsort(idx, kind="stable")
    return Pooled(idx[order], targets[order], probs[order], fold[order])


def fold_spread(per_fold: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, sd, min and max over folds of each of :data:`SPREAD_METRICS` that the folds report."""
    spread: dict[str, Any] = {}
    for key in SPREAD_METRICS:
        values = [m.get(key, m.get("macro_auc") if key == "auc" else None) for m in per_fold]
        finite = np.array([float(v) for v in values if v is not None and np.isfinite(v)])
        if finite.size:
            sd = float(np.std(finite, ddof=1)) if finite.size > 1 else 0.0
            spread[key] = {"mean": float(finite.mean()), "sd": sd, "min": float(finite.min()), "max": float(finite.max()), "n_folds": int(finite.size)}
    return spread


def out_of_fold_report(pooled: Pooled, card: ModelCard, target: float, *, seed: int = 0) -> tuple[dict[str, Any], ModelCard, list[str]]:
    """Threshold, metrics with bootstrap intervals and conformal ``qhat`` on the pooled out-of-fold predictions.

    Returns the report, ``card`` with the out-of-fold threshold, threshold
    choice, metrics and abstention set, and warnings in words.
    """
    y, probs = pooled.targets, pooled.probs
    if card.task == "multilabel":
        note = "multilabel: each fold keeps its own per-label decisions; no pooled threshold"
        return {"n": int(len(y)), "note": note}, card.replace(threshold_choice=ThresholdChoice("out_of_fold", None, {"note": note})), []
    choice, warnings = choose_threshold(y, probs, card, target, source="out_of_fold", seed=seed)
    choice = dataclasses.replace(choice, fitted_on={**choice.fitted_on, "predicted_by": PREDICTED_BY})
    threshold = choice.fitted_on["chosen"]["threshold"] if "chosen" in choice.fitted_on else card.threshold
    fitted = card.replace(threshold=threshold, threshold_choice=choice)
    metrics = score(y, probs, fitted, threshold if card.task == "binary" else None)
    intervals = bootstrap_intervals(y, probs, fitted, n=500, seed=seed)
    report: dict[str, Any] = {
        "n": int(len(y)), "metrics": metrics, "ci95": intervals, "threshold": threshold,
        "threshold_choice": {"source": choice.source, "interval": choice.interval, **choice.fitted_on},
        "used_for": "selection (epoch, threshold, prediction sets): a description of the fit, not a result",
    }
    abstention = card.abstention
    if card.task != "multilabel" and abstention.coverage is not None:
        qhat = round(conformal_qhat(probs, y.astype(int), abstention.coverage), 6)
        abstention = Abstention(abstention.coverage, qhat, abstention.dispersion_limit, {
            **abstention.fitted_on, "split": "out_of_fold", "n": int(len(y)), "qhat_from": "pooled out-of-fold probabilities",
            "dispersion_limit_from": "fold 0's validation split",
        })
    headline = {k: metrics.get(k) for k in ("n", "accuracy", "balanced_accuracy", "macro_auc", "sensitivity", "specificity", "auc") if k in metrics}
    fitted = fitted.replace(abstention=abstention, metrics={"split": "out_of_fold", **headline, "threshold": threshold, "ci95": intervals})
    return report, fitted, warnings


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What the console and the log say after a cross-validation: selection figures labelled as such, then the result."""
    lines = []
    sel = summary.get("epoch_selection", {})
    if sel.get("method") == "out_of_fold":
        lines.append(f"epoch {sel['chosen']} chosen on the folds' mean validation {sel['monitor'].replace('_', ' ')} (every fold at that epoch)")
    oof = summary.get("out_of_fold")
    if oof:
        m, ci = oof["metrics"], oof["ci95"]
        auc = m.get("auc", m.get("macro_auc"))
        auc_ci = ci.get("auc")
        line = f"out-of-fold (n {oof['n']}, used for selection): accuracy {m['accuracy']:.3f}"
        if auc is not None:
            line += f", AUC {auc:.3f}" + (f" [{auc_ci[0]:.3f}, {auc_ci[1]:.3f}]" if auc_ci else "")
        if m.get("sensitivity") is not None:
            line += f"; at threshold {oof['threshold']:.3g}: sensitivity {m['sensitivity']:.3f}, specificity {m['specificity']:.3f}"
        lines.append(line)
    for key, row in summary.get("held_out_spread", {}).items():
        lines.append(f"held-out test split, each fold model ({row['n_folds']} folds): {key} {row['mean']:.3f} ± {row['sd']:.3f} (min {row['min']:.3f}, max {row['max']:.3f})")
    return lines
