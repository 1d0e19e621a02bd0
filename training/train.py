"""Fine-tune a timm CNN on an ImageFolder and write a checkpoint with its card.

The images go through :func:`edgedx.runtime.preprocess.preprocess_batch` with
the same card that the deployed model will carry, so training and deployment
see identical inputs. The best epoch (by validation balanced accuracy) is kept
as a copy of the weights, never an alias of the live model.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import edgedx
from edgedx.card import CropPolicy, ModelCard, Normalization, Provenance, now_iso
from edgedx.errors import ImageReadError, InputError
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.datasets import LabelledImages, list_image_folder
from edgedx.runtime.image_io import read_image
from edgedx.runtime.metrics import classification_metrics
from edgedx.runtime.preprocess import preprocess_batch, resize_to, to_probabilities
from edgedx.training.augment import PRESETS, augment
from edgedx.training.checkpoint import save_checkpoint
from edgedx.training.models import DEFAULT_ARCH, check_arch, create_model, default_input_size, default_normalization, load_weights

log = logging.getLogger(__name__)

NEGATIVE_NAMES = ("normal", "negative", "benign", "uninfected", "healthy", "nevus", "no_finding", "no finding", "absent")
CHECKPOINT_NAME = "model.pt"


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    card: ModelCard
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    skipped: tuple[str, ...]


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/val indices with each class split in the same proportion (at least one val image per class)."""
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val fraction must be between 0 and 1, got {val_fraction}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        if len(members) < 2:
            raise InputError(f"class index {cls} has {len(members)} image; each class needs at least 2 to split train/val")
        n_val = min(len(members) - 1, max(1, round(len(members) * val_fraction)))
        val_idx.extend(members[:n_val])
        train_idx.extend(members[n_val:])
    return np.sort(np.asarray(train_idx)), np.sort(np.asarray(val_idx))


def pick_positive_class(class_names: tuple[str, ...], requested: str | None) -> str:
    """The class a binary model screens for: as requested, else the one not named like a negative, else the last."""
    if requested is not None:
        if requested not in class_names:
            raise InputError(f"positive class {requested!r} is not one of the class folders {list(class_names)}")
        return requested
    negatives = [n for n in class_names if n.lower().lstrip("0123456789_-") in NEGATIVE_NAMES]
    if len(negatives) == 1:
        return next(n for n in class_names if n not in negatives)
    return class_names[-1]


@dataclass
class LoadedImages:
    """Decoded images at the model's input size, with what was skipped and each image's scale factor."""

    images: list[np.ndarray]
    labels: list[int]
    paths: list[Path]
    skipped: list[str]
    scales: list[float]


def load_images(labelled: LabelledImages, size: tuple[int, int], progress: ProgressFn) -> LoadedImages:
    """Decode and resize every image once (uint8 at the model's input size); skip unreadable ones.

    ``scales`` records how much each image was shrunk or enlarged, so the card's
    crop policy can resample whole images the same way at diagnosis.
    """
    loaded = LoadedImages([], [], [], [], [])
    total = len(labelled.paths)
    for i, (path, label) in enumerate(zip(labelled.paths, labelled.labels), 1):
        try:
            rgb = read_image(path)
        except ImageReadError as exc:
            loaded.skipped.append(str(exc))
            log.warning("skipping %s", exc)
            continue
        loaded.scales.append(math.sqrt(size[0] / rgb.shape[0] * size[1] / rgb.shape[1]))
        loaded.images.append(resize_to(rgb, size[0], size[1], "area"))
        loaded.labels.append(label)
        loaded.paths.append(path)
        progress("load images", i, total)
    return loaded


def train(
    data: str | Path,
    out: str | Path,
    *,
    arch: str = DEFAULT_ARCH,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-3,
    input_size: int | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    weights: str = "imagenet",
    augmentation: str = "flips90",
    positive_class: str | None = None,
    stride_fraction: float = 0.5,
    progress: ProgressFn = no_progress,
) -> TrainResult:
    """Train on the ImageFolder ``data`` and write ``out/model.pt`` (best epoch, card inside).

    Also writes ``out/metrics.json`` (per-epoch history and the best epoch) and
    ``out/split.json`` (which file went to train and val).
    """
    if epochs < 1:
        raise InputError(f"epochs must be at least 1, got {epochs}")
    if batch_size < 1:
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    if augmentation not in PRESETS:
        raise InputError(f"unknown augmentation {augmentation!r}; choose one of {', '.join(PRESETS)}")
    if not 0.0 < stride_fraction <= 1.0:
        raise InputError(f"stride fraction must be in (0, 1], got {stride_fraction}")
    check_arch(arch)
    labelled = list_image_folder(data)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)

    class_names = labelled.class_names
    task = "binary" if len(class_names) == 2 else "multiclass"
    positive = pick_positive_class(class_names, positive_class) if task == "binary" else None
    model = create_model(arch, len(class_names))
    weights_used = load_weights(model, arch, weights)
    size = (input_size, input_size) if input_size else default_input_size(model)
    mean, std = default_normalization(model)

    loaded = load_images(labelled, size, progress)
    images, skipped = loaded.images, loaded.skipped
    y = np.asarray(loaded.labels)
    if len(np.unique(y)) < 2:
        raise InputError(f"only one class has readable images in {data}; a classifier needs at least two")
    train_idx, val_idx = stratified_split(y, val_fraction, seed)
    (out / "split.json").write_text(
        json.dumps(
            {
                "seed": seed,
                "class_names": list(class_names),
                "train": [str(loaded.paths[i].resolve()) for i in train_idx],
                "val": [str(loaded.paths[i].resolve()) for i in val_idx],
            },
            indent=1,
        ),
        encoding="utf-8",
    )

    scale = float(np.median(loaded.scales))
    tile = size
    stride = (max(1, round(tile[0] * stride_fraction)), max(1, round(tile[1] * stride_fraction)))
    card = ModelCard(
        arch=arch,
        task=task,
        class_names=class_names,
        positive_class=positive,
        threshold=0.5 if task == "binary" else None,
        input_size=size,
        normalization=Normalization(kind="mean_std", mean=mean, std=std),
        crop=CropPolicy(tile_size=tile, stride=stride, scale=round(scale, 6)),
        provenance=Provenance(
            edgedx_version=edgedx.__version__,
            created_at=now_iso(),
            data_summary={
                "source": str(data),
                "n_images": len(images),
                "class_counts": {n: int((y == i).sum()) for i, n in enumerate(class_names)},
                "n_train": len(train_idx),
                "n_val": len(val_idx),
                "n_skipped": len(skipped),
                "patient_ids": False,
            },
            split_seed=seed,
            weights=weights_used,
            training={
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "optimizer": "AdamW",
                "schedule": "cosine",
                "augmentation": augmentation,
                "val_fraction": val_fraction,
            },
        ),
    )

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_idx) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    history: list[dict[str, Any]] = []
    best: tuple[float, float] | None = None
    best_state: dict[str, torch.Tensor] = {}
    best_epoch = 0
    best_metrics: dict[str, Any] = {}
    checkpoint = out / CHECKPOINT_NAME
    total_steps = epochs * steps_per_epoch
    step = 0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        order = rng.permutation(train_idx)
        running = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            if len(idx) < 2 and len(order) > 1:  # batch norm cannot train on a single sample
                continue
            batch = np.stack([augment(images[i], augmentation, rng) for i in idx])
            x = torch.from_numpy(preprocess_batch(batch, card))
            target = torch.from_numpy(y[idx]).long()
            loss = loss_fn(model(x), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running += loss.item() * len(idx)
            step += 1
            progress("train", step, total_steps)
        val_loss, metrics = evaluate_split(model, images, y, val_idx, card, batch_size)
        row = {
            "epoch": epoch,
            "train_loss": running / len(train_idx),
            "val_loss": val_loss,
            "val_accuracy": metrics["accuracy"],
            "val_balanced_accuracy": metrics["balanced_accuracy"],
            "val_macro_auc": metrics["macro_auc"],
            "seconds": round(time.perf_counter() - start, 2),
        }
        history.append(row)
        log.info("epoch %d: %s", epoch, row)
        score = (metrics["balanced_accuracy"], -val_loss)
        if best is None or score > best:
            best, best_epoch, best_metrics = score, epoch, metrics
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            card = card.replace(metrics=_card_metrics(metrics, best_epoch))
            save_checkpoint(checkpoint, card, best_state, split_seed=seed, epoch=epoch)

    (out / "metrics.json").write_text(
        json.dumps({"best_epoch": best_epoch, "best": best_metrics, "history": history}, indent=2), encoding="utf-8"
    )
    (out / "card.json").write_text(card.to_json() + "\n", encoding="utf-8")
    return TrainResult(checkpoint, card, best_epoch, best_metrics, history, tuple(skipped))


@torch.inference_mode()
def evaluate_split(
    model: nn.Module, images: list[np.ndarray], y: np.ndarray, idx: np.ndarray, card: ModelCard, batch_size: int
) -> tuple[float, dict[str, Any]]:
    """Validation loss and metrics (probabilities through the runtime's activation)."""
    model.eval()
    logits = []
    for b in range(0, len(idx), batch_size):
        chunk = idx[b : b + batch_size]
        x = torch.from_numpy(preprocess_batch(np.stack([images[i] for i in chunk]), card))
        logits.append(model(x))
    out = torch.cat(logits)
    loss = float(nn.functional.cross_entropy(out, torch.from_numpy(y[idx]).long()))
    probs = to_probabilities(out.numpy(), card)
    return loss, classification_metrics(y[idx], probs, card.class_names).to_dict()


def _card_metrics(metrics: dict[str, Any], epoch: int) -> dict[str, Any]:
    """The validation numbers worth carrying with the model."""
    keep = {k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_auc") if k in metrics}
    return {"split": "val", "epoch": epoch, **keep}
