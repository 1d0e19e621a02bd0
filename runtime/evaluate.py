"""Metrics of a deployed model on a labelled folder, through the production path.

Each image is diagnosed exactly as ``edgedx diagnose`` would (same crops, same
preprocessing from the card), so the numbers describe the artefact you ship.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.errors import ImageReadError, InputError
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.datasets import list_image_folder
from edgedx.runtime.metrics import classification_metrics, roc_auc
from edgedx.runtime.model import Model, decide, load_model


@dataclass(frozen=True)
class EvaluationReport:
    model: str
    data: str
    threshold: float | None
    metrics: dict[str, Any]
    failed: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "threshold": self.threshold,
            "metrics": self.metrics,
            "failed": list(self.failed),
        }


def evaluate_folder(
    model: str | Path | Model, data: str | Path, *, device: str = "cpu", batch_size: int = 32, progress: ProgressFn = no_progress
) -> EvaluationReport:
    """Diagnose every image of an ImageFolder and score the decisions against the folder labels."""
    loaded = model if isinstance(model, Model) else load_model(model, device=device, batch_size=batch_size)
    model = getattr(loaded.session, "path", model) if isinstance(model, Model) else model
    card = loaded.card
    if card.task == "multilabel":
        raise InputError("evaluate on a labelled folder needs a binary or multiclass model; this card is multilabel")
    labelled = list_image_folder(data, min_classes=1)
    unknown = [c for c in labelled.class_names if c not in card.class_names]
    if unknown:
        raise InputError(
            f"class folder(s) {unknown} in {data} are not classes of this model ({list(card.class_names)}); "
            "name the sub-folders after the model's classes"
        )
    y_true: list[int] = []
    probs: list[np.ndarray] = []
    preds: list[int] = []
    failed: list[str] = []
    total = len(labelled.paths)
    progress("evaluate", 0, total)
    for i, (path, label) in enumerate(zip(labelled.paths, labelled.labels), 1):
        try:
            result = loaded.diagnose(path)
        except ImageReadError as exc:
            failed.append(str(exc))
        else:
            p = result.sliding.probabilities
            y_true.append(card.class_names.index(labelled.class_names[label]))
            probs.append(p)
            preds.append(card.class_names.index(decide(p, card)))  # type: ignore[arg-type]
        progress("evaluate", i, total)
    if not y_true:
        raise InputError(f"no image in {data} could be read")
    truth = np.asarray(y_true)
    p_all = np.stack(probs)
    metrics = classification_metrics(truth, p_all, card.class_names, y_pred=np.asarray(preds)).to_dict()
    if card.task == "binary":
        pos = card.positive_index
        metrics["auc"] = _none_if_nan(roc_auc((truth == pos).astype(int), p_all[:, pos]))
    return EvaluationReport(str(model), str(data), card.threshold, metrics, tuple(failed))


def _none_if_nan(x: float) -> float | None:
    return None if np.isnan(x) else float(x)
