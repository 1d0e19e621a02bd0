"""Real images for calibration and verification, at the model's input size.

Int8 calibration and parity are only as good as the images behind them, so
they come from the run itself: the training or validation split recorded in
``split.json`` beside the checkpoint, reloaded from the source named in the
card's provenance (an ImageFolder, a CSV manifest or a MedMNIST ``.npz``).
A user can give a folder instead (``--calibration DIR``, ``--verify-data DIR``).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgedx.card import ModelCard
from edgedx.errors import EdgeDxError, ImageReadError, InputError
from edgedx.runtime.datasets import list_image_folder
from edgedx.runtime.image_io import is_image_path, read_image
from edgedx.runtime.preprocess import resize_to

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Samples:
    """(N, H, W, 3) uint8 RGB crops at the card's input size, with labels when known."""

    images: np.ndarray
    labels: np.ndarray | None  # class indices into the card's class_names (single-label tasks)
    source: str

    def __len__(self) -> int:
        return len(self.images)


def split_samples(checkpoint: Path, card: ModelCard, split: str, *, limit: int, seed: int = 0) -> Samples | None:
    """Up to ``limit`` images of one split of the run that produced ``checkpoint``.

    Returns None when the run's ``split.json`` is missing or none of its images
    can be read any more (the data moved): callers then fall back to a folder
    the user gives, or to synthetic images for parity only.
    """
    split_file = checkpoint.parent / "split.json"
    if limit < 1 or not split_file.is_file():
        return None
    try:
        ids = list(json.loads(split_file.read_text(encoding="utf-8")).get(split, []))
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s (%s); no %s images for export", split_file, exc, split)
        return None
    if not ids:
        return None
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    data = _reload_source(card)
    labels: list[int] | None = None
    crops: list[np.ndarray] = []
    if data is not None:
        position = {item: i for i, item in enumerate(data.ids)}
        labels = []
        for k in order:
            i = position.get(ids[k])
            if i is None:
                continue
            try:
                crops.append(_fit(data.load(i), card))
            except ImageReadError as exc:
                log.info("skipping %s", exc)
                continue
            labels.append(int(data.targets[i]) if data.targets.ndim == 1 else -1)
            if len(crops) == limit:
                break
    if not crops:  # the source moved or could not be loaded: ids of ImageFolder/CSV runs are paths
        labels = None
        for k in order:
            try:
                crops.append(_fit(read_image(ids[k]), card))
            except (ImageReadError, InputError) as exc:
                log.info("skipping %s", exc)
                continue
            if len(crops) == limit:
                break
    if not crops:
        log.warning("none of the %s images listed in %s can be read", split, split_file)
        return None
    known = labels is not None and len(labels) == len(crops) and min(labels) >= 0
    return Samples(np.stack(crops), np.asarray(labels) if known else None, f"{split} split of {split_file.parent}")


def folder_samples(folder: str | Path, card: ModelCard, *, limit: int, labelled: bool, seed: int = 0) -> Samples:
    """Images of a user's folder; ``labelled`` requires one sub-folder per class of the card."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    labels: list[int] | None
    if labelled:
        found = list_image_folder(root)
        missing = sorted(set(found.class_names) - set(card.class_names))
        if missing:
            raise InputError(
                f"{root} has class folder(s) {missing} that the model does not know; "
                f"the model's classes are {list(card.class_names)}: name the sub-folders after them"
            )
        paths = list(found.paths)
        labels = [card.class_names.index(found.class_names[i]) for i in found.labels]
    else:
        paths = sorted(p for p in root.rglob("*") if p.is_file() and is_image_path(p))
        labels = None
    if not paths:
        raise InputError(f"no images in {root}; give a folder of .png/.jpg/.tif images")
    order = np.random.default_rng(seed).permutation(len(paths))[:limit] if len(paths) > limit else np.arange(len(paths))
    crops, kept = [], []
    for k in order:
        try:
            crops.append(_fit(read_image(paths[k]), card))
            kept.append(k)
        except ImageReadError as exc:
            log.warning("skipping %s", exc)
    if not crops:
        raise InputError(f"none of the images in {root} could be read")
    return Samples(np.stack(crops), None if labels is None else np.asarray([labels[k] for k in kept]), str(root))


def _fit(rgb: np.ndarray, card: ModelCard) -> np.ndarray:
    """A whole training-style image at input size, as training resizes it."""
    height, width = card.input_size
    return resize_to(rgb, height, width, card.interpolation)


def _reload_source(card: ModelCard):  # noqa: ANN202 - TrainingData, imported lazily
    """The run's data source, loaded the way training loaded it, or None if it is gone."""
    summary = card.provenance.data_summary or {}
    source = summary.get("source")
    if not source:
        return None
    options = card.provenance.training or {}
    columns = options.get("label_columns")
    return _load_source_once(
        str(source), options.get("label_column") or "label", tuple(columns) if columns else None, card.class_names, card.task
    )


@functools.lru_cache(maxsize=2)
def _load_source_once(source: str, label_column: str, label_columns: tuple[str, ...] | None, class_names: tuple[str, ...], task: str):  # noqa: ANN202
    """Verification (val) and calibration (train) read the same source: load it once per export."""
    from edgedx.training.sources import load_source

    try:
        return load_source(source, label_column=label_column, label_columns=label_columns, class_names=class_names, task=task)
    except EdgeDxError as exc:
        log.warning("cannot reload the training data %s (%s)", source, exc)
        return None
