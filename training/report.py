"""What a finished run tells a reader: ``summary.json``'s contents, the plots and the Grad-CAM overlays.

The files themselves are named and written by :class:`edgedx.training.run.RunFolder`;
this module decides what goes in them. Plots and overlays are evidence, not the
product: a failing overlay is logged and the run kept.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from edgedx.card import ModelCard
from edgedx.runtime.outputs.plots import where_taken
from edgedx.training.calibration import trust_lines
from edgedx.training.data import RunData
from edgedx.training.loop import Fitting
from edgedx.training.losses import loss_shares
from edgedx.training.splits import summary as split_summary
from edgedx.training.threshold import headline, nanmean

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Final:
    """The best epoch judged on validation: the card with its threshold and metrics, and what it came from."""

    card: ModelCard
    operating: dict[str, Any]  # :func:`edgedx.training.threshold.operating_point`'s result
    val_probs: np.ndarray  # calibrated, as the deployed model gives them
    warnings: list[str]
    report: dict[str, Any]  # the contents of metrics.json
    val_uncalibrated: np.ndarray | None = None  # the network's own (the reliability diagram's "before")
    val_idx: np.ndarray | None = None  # the validation images behind val_probs (those the quality gate passes); None: all


def run_summary(f: Fitting, final: Final) -> dict[str, Any]:
    """``summary.json``: the data, the class balance the loss saw, the set-up, the crop policy and the warnings."""
    data, config, ctx, card = f.data, f.config, f.ctx, final.card
    task, class_names, train_targets = data.data.task, data.data.class_names, data.targets[data.train_idx]
    report = final.report
    return {
        "data": data.data.source,
        "task": task,
        "class_counts_train": {n: c for n, c in zip(class_names, _counts(train_targets, task, len(class_names)))},
        "loss_shares": loss_shares(train_targets, task, class_names, f.setup.class_weights),
        "imbalance": config.imbalance,
        "splits": split_summary(data.data, data.splits),
        "skipped": data.decoded.skipped,
        "weights": card.provenance.weights,
        "strategy": str(f.setup.strategy),
        "trainable_parameters": int(sum(p.numel() for p in f.model.parameters() if p.requires_grad)),
        "device": str(ctx.device),
        "world_size": ctx.world,
        "batch_norm": "synchronised" if ctx.synced_batchnorm else ("per process" if ctx.distributed else "single process"),
        "crop": {"policy": card.crop.describe(), "reason": data.planned.reason, "validated_as": "diagnose: sliding crops merged per image"},
        "warnings": final.warnings,
        "calibration": report.get("calibration"),
        "abstention": report.get("abstention"),
        "quality_limits": _quality_summary(card) if report.get("quality_gate") else None,
        "um_per_px": card.um_per_px,
        "trust_lines": trust_lines(report, report.get("test")) if "calibration" in report else [],
        **({"test": {**headline(report["test"]), "trust": report["test"].get("trust")}} if "test" in report else {}),
    }


def _quality_summary(card: ModelCard) -> dict[str, Any]:
    """The card's quality limits without the percentile table (that stays in the card)."""
    q = card.quality
    return {"focus_min": q.focus_min, "clipped_max": q.clipped_max, "brightness_range": q.brightness_range,
            "colour_range": q.colour_range, "min_short_side": q.min_short_side, "n_images": q.reference.get("n_images")}


def write_plots(folder: Path, history: list[dict[str, Any]], y: np.ndarray, final: Final, monitor: str) -> None:
    """Learning curves, ROC with the operating point, confusion matrix, the six-metric radar and reliability."""
    from edgedx.runtime.outputs import plots

    card, probs = final.card, final.val_probs
    curve_metric = {"auc": "val_macro_auc", "loss": "val_loss"}.get(monitor, f"val_{monitor}")
    threshold_free = monitor in ("auc", "loss")
    plots.plot_learning_curves(
        history, folder / "learning_curves.png", metric=curve_metric, where="" if threshold_free else where_taken(card.task, 0.5)
    )
    binary = card.task == "binary"
    where = where_taken(card.task, card.threshold)
    plots.plot_roc(
        y, probs, card.class_names, folder / "roc.png",
        positive_index=card.positive_index, operating_threshold=(0.5 if card.threshold is None else card.threshold) if binary else None,
    )
    metrics = final.operating["metrics"]["at_threshold"] if binary else final.operating["metrics"]
    if card.task == "multilabel":
        per_label = [plots.six_metrics(m, name) for name, m in metrics["per_label"].items()]
        six = {k: nanmean([p[k] for p in per_label]) for k in per_label[0]}
    else:
        plots.plot_confusion_matrix(metrics["confusion"], card.class_names, folder / "confusion_matrix.png", where=where)
        six = plots.six_metrics(metrics, card.positive_class)
    plots.plot_radar(six, folder / "radar.png", title=f"{card.arch}, validation", where=where)
    if final.val_uncalibrated is not None:
        _plot_reliability(folder, y, final)


def _plot_reliability(folder: Path, y: np.ndarray, final: Final) -> None:
    """Reliability before and after the temperature, on the validation images it was fitted on (and titled so)."""
    from edgedx.runtime.outputs import plots
    from edgedx.runtime.trust import reliability

    card, before = final.card, final.val_uncalibrated
    assert before is not None
    pos = card.positive_index
    plots.plot_reliability(
        reliability(before, y, card.task, pos), reliability(final.val_probs, y, card.task, pos), folder / "reliability.png",
        **plots.reliability_labels(card.task, card.positive_class), where="validation, fitted on it",
        calibrated=card.calibration.method != "none",
    )


def write_gradcam(folder: Path, model: nn.Module, data: RunData, card: ModelCard, n: int) -> list[Path]:
    """Grad-CAM overlays for the first ``n`` validation images; a failure is logged, the run is kept."""
    from edgedx.training.gradcam import save_gradcam_examples

    val_idx, decoded = data.val_idx, data.decoded
    chosen = val_idx[: min(n, len(val_idx))]
    labels = None if card.task == "multilabel" else [card.class_names[int(decoded.data.targets[i])] for i in chosen]
    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", f"val_{k:02d}_{Path(decoded.data.ids[i]).stem}")[:80] for k, i in enumerate(chosen)]
    try:
        return save_gradcam_examples(
            model.cpu(), [decoded.images[i].pixels for i in chosen], card, folder, names=names, labels=labels, max_images=n
        )
    except Exception as exc:  # Grad-CAM is evidence, not the product: never lose a finished run over it
        log.warning("Grad-CAM overlays failed for %s: %s", card.arch, exc)
        return []


def _counts(targets: np.ndarray, task: str, n: int) -> list[int]:
    if task == "multilabel":
        return [int(v) for v in targets.sum(axis=0)]
    return [int(v) for v in np.bincount(targets, minlength=n)]
