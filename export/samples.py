"""Real images for calibration and verification, as ``diagnose`` would be given them.

Int8 calibration and parity are only as good as the images behind them, so
they come from the run itself: the training or validation split recorded in
``split.json`` beside the checkpoint, reloaded from the source named in the
card's provenance (an ImageFolder, a CSV manifest or a MedMNIST ``.npz``;
absolute, or relative to the run folder or the directory training ran in). A
user can give a folder instead (``--calibration DIR``, ``--verify-data DIR``).

Images stay whole (files stay files): verification runs them through the
runtime's own read → crop → merge path, and calibration uses the crops that
path cuts. Nothing is squashed to the input size here.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.card import ModelCard
from edgedx.errors import EdgeDxError, ImageReadError, InputError
from edgedx.runtime.datasets import list_image_folder
from edgedx.runtime.image_io import is_image_path, read_image, to_rgb_uint8
from edgedx.runtime.labelled import resolve_id
from edgedx.runtime.manifest import ManifestLayout
from edgedx.runtime.tiling import split_tiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Samples:
    """Whole images (file paths or RGB arrays) with labels when known (class indices into the card's names)."""

    items: list[Path | np.ndarray]
    labels: np.ndarray | None
    source: str

    def __len__(self) -> int:
        return len(self.items)


class SplitUnavailable(Exception):
    """Why a run's split could not be reloaded (turned into an error naming the option that fixes it)."""


def split_samples(checkpoint: Path, card: ModelCard, split: str, *, limit: int, seed: int = 0) -> Samples:
    """Up to ``limit`` images of one split of the run that produced ``checkpoint``, with their labels.

    Raises :class:`SplitUnavailable` saying why when the run's ``split.json`` or
    its data source cannot be found: callers then name ``--verify-data`` or
    ``--calibration`` instead of silently verifying on less.
    """
    split_file = checkpoint.parent / "split.json"
    if not split_file.is_file():
        raise SplitUnavailable(f"{split_file} is missing (the checkpoint was moved out of its run folder)")
    try:
        ids = [os.path.normpath(resolve_id(i, split_file.parent)) for i in json.loads(split_file.read_text(encoding="utf-8")).get(split, [])]
    except (OSError, ValueError) as exc:
        raise SplitUnavailable(f"cannot read {split_file}: {exc}") from None
    if not ids:
        raise SplitUnavailable(f"{split_file} lists no {split} images")
    data = reload_source(card, checkpoint.parent)
    position = {os.path.normpath(item): i for i, item in enumerate(data.ids)}  # a source given as ../data has ".." in its ids
    items: list[Path | np.ndarray] = []
    labels: list[int] = []
    for k in np.random.default_rng(seed).permutation(len(ids)):
        i = position.get(ids[k])
        if i is None:
            continue
        try:
            items.append(data.item(i))
        except ImageReadError as exc:
            log.info("skipping %s", exc)
            continue
        labels.append(int(data.targets[i]) if data.targets.ndim == 1 else -1)
        if len(items) == limit:
            break
    if not items:
        raise SplitUnavailable(f"none of the {len(ids)} {split} images of {split_file} is in the data source {data.source} any more")
    known = bool(labels) and min(labels) >= 0
    return Samples(items, np.asarray(labels) if known else None, f"{split} split of {split_file.parent} ({data.source})")


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


def reload_source(card: ModelCard, run_dir: Path) -> Any:  # TrainingData, imported lazily (training is above export's inputs)
    """The run's data source, loaded the way training loaded it.

    The card records the source as training saw it. A relative path is tried
    as recorded (relative to the current directory) and relative to the run
    folder and its parents, so an export run from another directory finds it.
    """
    summary = card.provenance.data_summary or {}
    recorded = summary.get("source")
    if not recorded:
        raise SplitUnavailable("the card records no training data source")
    options = card.provenance.training or {}
    columns = options.get("label_columns")
    source = resolve_source(str(recorded), run_dir)
    if source is None:
        raise SplitUnavailable(f"the training data {recorded} is not found (tried as given and beside {run_dir})")
    layout = ManifestLayout.from_dict(options)
    return _load_source_once(str(source), layout, tuple(columns) if columns else None, card.class_names, card.task)


def resolve_source(recorded: str, run_dir: Path) -> Path | None:
    """An existing path for a recorded data source: absolute, relative to the cwd, or to the run folder and above."""
    path = Path(recorded)
    if path.is_absolute():
        return path if path.exists() else None
    for base in (Path.cwd(), run_dir.resolve(), *run_dir.resolve().parents):
        if (base / path).exists():
            return (base / path).resolve()
    return None


@functools.lru_cache(maxsize=2)
def _load_source_once(source: str, layout: ManifestLayout, label_columns: tuple[str, ...] | None, class_names: tuple[str, ...], task: str):  # noqa: ANN202
    """Verification (val) and calibration (train) read the same source: load it once per export."""
    from edgedx.training.sources import load_source

    try:
        return load_source(source, layout=layout, label_columns=label_columns, class_names=class_names, task=task)
    except EdgeDxError as exc:
        raise SplitUnavailable(f"cannot reload the training data {source}: {exc}") from None
