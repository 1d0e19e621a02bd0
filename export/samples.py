"""Real images for calibration and verification, as ``diagnose`` would be given them.

Int8 calibration and parity are only as good as the images behind them, so
they come from the run itself: the training or validation split of the run
folder beside the checkpoint (:class:`edgedx.training.run.RunFolder` reads its
``split.json`` and reloads the source the card names). A user can give a folder
instead (``--calibration DIR``, ``--verify-data DIR``).

Images stay whole (files stay files): verification runs them through the
runtime's own read → crop → merge path, and calibration uses the crops that
path cuts. Nothing is squashed to the input size here.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgedx.card import ModelCard
from edgedx.errors import ImageReadError, InputError
from edgedx.runtime.io.datasets import list_image_folder
from edgedx.runtime.io.image_io import is_image_path, read_image, to_rgb_uint8
from edgedx.runtime.tiling import split_tiles
from edgedx.training.run import RunFolder, SplitUnavailable, resolve_source
from edgedx.training.sources import TrainingData

__all__ = ["Samples", "SplitUnavailable", "calibration_crops", "folder_samples", "reload_source", "resolve_source", "split_samples"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Samples:
    """Whole images (file paths or RGB arrays) with labels when known (class indices into the card's names)."""

    items: list[Path | np.ndarray]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.items)


def split_samples(checkpoint: Path, card: ModelCard, split: str, *, limit: int, seed: int = 0) -> Samples:
    """Up to ``limit`` images of one split of the run that produced ``checkpoint``, with their labels.

    Raises :class:`SplitUnavailable` saying why when the run's ``split.json`` or
    its data source cannot be found: callers then name ``--verify-data`` or
    ``--calibration`` instead of silently verifying on less. The run folder
    (:class:`~edgedx.training.run.RunFolder`) knows where its images are.
    """
    held = RunFolder(checkpoint.parent).split_images(split, limit=limit, seed=seed, card=card)
    return Samples(held.items, held.labels, held.source)


def folder_samples(folder: str | Path, card: ModelCard, *, limit: int, labelled: bool, seed: int = 0) -> Samples:
    """Images of a user's folder; ``labelled`` requires one sub-folder per class of the card."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"image folder not found: {root}")
    labels: list[int] | None
    if labelled:
        found = list_image_folder(root, min_classes=1)
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
    return Samples([paths[k] for k in order], None if labels is None else np.asarray([labels[k] for k in order]), str(root))


def calibration_crops(samples: Samples, card: ModelCard, *, limit: int, seed: int = 0) -> np.ndarray:
    """Up to ``limit`` crops cut by the card's policy (the crops ``diagnose`` feeds the model), spread over the images."""
    rng = np.random.default_rng(seed)
    per_image = max(1, math.ceil(limit / max(1, len(samples))))
    crops: list[np.ndarray] = []
    for item in samples.items:
        try:
            image = read_image(item) if isinstance(item, Path) else to_rgb_uint8(np.asarray(item))
        except ImageReadError as exc:
            log.warning("skipping %s", exc)
            continue
        tiles, _ = split_tiles(image, card.crop)
        chosen = rng.permutation(len(tiles))[:per_image]
        crops.extend(tiles[chosen])
        if len(crops) >= limit:
            break
    if not crops:
        raise InputError(f"none of the calibration images in {samples.source} could be read")
    return np.stack(crops[:limit])


def reload_source(card: ModelCard, run_dir: Path) -> TrainingData:
    """The run's data source, loaded the way training loaded it (see :meth:`RunFolder.data_source`)."""
    return RunFolder(run_dir).data_source(card)
