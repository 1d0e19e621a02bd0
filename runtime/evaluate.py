"""Metrics of a deployed model on a labelled folder, through the production path.

Each image is diagnosed exactly as ``edgedx diagnose`` would (same crops, same
preprocessing from the card), so the numbers describe the artefact you ship.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.card import ModelCard
from edgedx.errors import EdgeDxError, InputError
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.io.labelled import load_labelled
from edgedx.runtime.io.manifest import ManifestLayout
from edgedx.runtime.metrics import classification_metrics, roc_auc
from edgedx.runtime.model import Model, decide, load_model


@dataclass(frozen=True)
class EvaluationReport:
    """What :func:`evaluate` found. ``misclassified`` holds one record per image whose decision at the
    card's threshold differs from its label, most confidently wrong first (see :func:`misclassified`)."""

    model: str
    data: str
    threshold: float | None
    metrics: dict[str, Any]
    failed: tuple[str, ...]
    misclassified: tuple[dict[str, Any], ...] = ()

    @property
    def n_misclassified(self) -> int:
        return len(self.misclassified)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "threshold": self.threshold,
            "metrics": self.metrics,
            "failed": list(self.failed),
            "n_misclassified": self.n_misclassified,
            "misclassified": [dict(m) for m in self.misclassified],
        }


def evaluate(
    model: str | Path | Model,
    data: str | Path,
    *,
    split: str = "val",
    device: str = "cpu",
    batch_size: int = 32,
    bootstrap: int = 1000,
    out: str | Path | None = None,
    seed: int = 0,
    layout: ManifestLayout = ManifestLayout(),
    progress: ProgressFn = no_progress,
) -> EvaluationReport:
    """Diagnose every labelled image through the production path and score the decisions.

    ``data`` is an ImageFolder, a CSV manifest or a MedMNIST ``.npz`` (``split``
    picks its part; ``layout`` names a manifest's columns, image folder and
    suffix). Metrics are at the card's threshold, and also at 0.5 for
    binary models; ``bootstrap`` resamples give 95% intervals. ``out`` writes
    ``evaluation.json``, the ROC / confusion-matrix / radar plots and a one-page
    ``report.html``.
    """
    loaded = model if isinstance(model, Model) else load_model(model, device=device, batch_size=batch_size)
    model = (loaded.session.path or "in-memory model") if isinstance(model, Model) else model
    card = loaded.card
    if card.task == "multilabel":
        raise InputError("evaluate needs a binary or multiclass model; this card is multilabel")
    labelled = load_labelled(data, card.class_names, split=split, layout=layout)
    y_true: list[int] = []
    probs: list[np.ndarray] = []
    kept: list[int] = []  # the labelled index of each scored image (failed ones are not scored)
    failed: list[str] = []
    total = len(labelled)
    progress("evaluate", 0, total)
    for done, (i, result) in enumerate(loaded.stream(enumerate(labelled.images)), 1):
        if isinstance(result, EdgeDxError):
            failed.append(str(result))
        else:
            kept.append(i)
            y_true.append(int(labelled.labels[i]))
            probs.append(result.sliding.probabilities)
        progress("evaluate", done, total)
    if not y_true:
        raise InputError(f"no image in {data} could be read")
    truth = np.asarray(y_true)
    p_all = np.stack(probs)
    metrics = score(truth, p_all, card, card.threshold)
    if card.task == "binary":
        metrics["at_0.5"] = score(truth, p_all, card, 0.5)
    if bootstrap > 0:
        metrics.update(intervals(truth, p_all, card, metrics, n=bootstrap, seed=seed))
    wrong = misclassified(truth, p_all, card, [labelled.names[i] for i in kept])
    report = EvaluationReport(str(model), labelled.source, card.threshold, metrics, tuple(failed), tuple(record for _, record in wrong))
    if out is not None:
        from edgedx.runtime.outputs.report_html import write_evaluation

        write_evaluation(Path(out), report, card, truth, p_all, thumbnails=[labelled.images[kept[row]] for row, _ in wrong])
    return report


def misclassified(truth: np.ndarray, probs: np.ndarray, card: ModelCard, names: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """``(row, record)`` of every image whose decision at the card's threshold (:func:`decide`, as diagnose
    takes it) differs from its label, the most confidently wrong first.

    Why this order: the top of the list is where a reviewer finds label errors
    and the model's blind spots. Binary: by the distance of p(positive class)
    from the threshold; multiclass (argmax): by how far p(predicted) is above
    p(true). ``record`` holds image, true, predicted, probability (of the
    positive class for binary, of the predicted class for multiclass),
    probability_of (that class) and threshold (None for argmax).
    """
    classes = card.class_names
    binary = card.task == "binary"
    threshold = (0.5 if card.threshold is None else float(card.threshold)) if binary else None
    found: list[tuple[float, int, dict[str, Any]]] = []
    for row, (y, p) in enumerate(zip(truth, probs)):
        predicted = classes.index(decide(p, card))  # type: ignore[arg-type]
        if predicted == int(y):
            continue
        shown = card.positive_index if binary else predicted
        assert shown is not None  # a binary card always has a positive class
        margin = abs(float(p[shown]) - threshold) if threshold is not None else float(p[predicted] - p[int(y)])
        record = {
            "image": names[row], "true": classes[int(y)], "predicted": classes[predicted],
            "probability": round(float(p[shown]), 6), "probability_of": classes[shown], "threshold": threshold,
        }
        found.append((margin, row, record))
    found.sort(key=lambda item: (-item[0], item[1]))
    return [(row, record) for _, row, record in found]


def evaluate_folder(model: str | Path | Model, data: str | Path, **kwargs: Any) -> EvaluationReport:
    """:func:`evaluate` without intervals (kept for callers of the first version)."""
    kwargs.setdefault("bootstrap", 0)
    return evaluate(model, data, **kwargs)


def score(truth: np.ndarray, probs: np.ndarray, card: ModelCard, threshold: float | None) -> dict[str, Any]:
    """Classification metrics with decisions at ``threshold`` (binary) or argmax (multiclass)."""
    decided = card if threshold == card.threshold else card.replace(threshold=threshold)
    preds = np.asarray([card.class_names.index(decide(p, decided)) for p in probs])  # type: ignore[arg-type]
    metrics = classification_metrics(truth, probs, card.class_names, y_pred=preds, positive_index=card.positive_index or 1).to_dict()
    metrics["threshold"] = threshold
    if card.task == "binary":
        pos = card.positive_index
        metrics["auc"] = _none_if_nan(roc_auc((truth == pos).astype(int), probs[:, pos]))
        stats = metrics["per_class"][card.class_names[pos]]  # type: ignore[index]
        metrics.update(sensitivity=stats["sensitivity"], specificity=stats["specificity"], precision=stats["precision"], f1=stats["f1"])
    return metrics


CI_KEYS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "auc")


def bootstrap_intervals(truth: np.ndarray, probs: np.ndarray, card: ModelCard, *, n: int = 1000, seed: int = 0) -> dict[str, list[float] | None]:
    """95% percentile bootstrap intervals (resampling images) for the headline metrics."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in CI_KEYS}
    for _ in range(n):
        idx = rng.integers(0, len(truth), len(truth))
        m = score(truth[idx], probs[idx], card, card.threshold)
        for key in CI_KEYS:
            value = m.get(key, m.get("macro_auc") if key == "auc" else None)
            if value is not None and np.isfinite(value):
                samples[key].append(float(value))
    return {k: ([float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= n // 2 else None) for k, v in samples.items()}


PROPORTIONS = ("accuracy", "sensitivity", "specificity", "precision")
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> list[float] | None:
    """Wilson score 95% interval of a proportion: sensible at 0/n and n/n, where a bootstrap gives [1, 1]."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)  # exact ends, not 0.9999999999999999
    return [low, high]


def proportion_counts(metrics: dict[str, Any], card: ModelCard) -> dict[str, tuple[int, int]]:
    """(successes, n) behind each proportion, from the confusion matrix at the card's threshold."""
    confusion = np.asarray(metrics["confusion"], dtype=np.int64)
    counts = {"accuracy": (int(np.trace(confusion)), int(confusion.sum()))}
    if card.task == "binary":
        pos = card.positive_index
        neg = 1 - pos  # type: ignore[operator]
        tp, fn, fp, tn = (int(confusion[pos, pos]), int(confusion[pos, neg]), int(confusion[neg, pos]), int(confusion[neg, neg]))
        counts.update(sensitivity=(tp, tp + fn), specificity=(tn, tn + fp), precision=(tp, tp + fp))
    return counts


def intervals(truth: np.ndarray, probs: np.ndarray, card: ModelCard, metrics: dict[str, Any], *, n: int, seed: int) -> dict[str, Any]:
    """95% intervals: Wilson for proportions (with their n), bootstrap (resampling images) for AUC, F1, balanced accuracy."""
    boot = bootstrap_intervals(truth, probs, card, n=n, seed=seed)
    ci: dict[str, list[float] | None] = {}
    method: dict[str, str] = {}
    sizes: dict[str, int] = {}
    counts = proportion_counts(metrics, card)
    for key in CI_KEYS:
        if key in counts:
            k, total = counts[key]
            ci[key], method[key], sizes[key] = wilson_interval(k, total), "wilson", total
        else:
            ci[key], method[key], sizes[key] = boot.get(key), "bootstrap", len(truth)
    return {"ci95": ci, "ci95_method": method, "ci95_n": sizes}


def _none_if_nan(x: float) -> float | None:
    return None if np.isnan(x) else float(x)
