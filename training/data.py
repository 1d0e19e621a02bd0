"""A run's data: the labelled source, the class to screen for, the crop policy, the decoded images and the split.

The first step of a run, as ``load_data`` is in torchvision's reference
scripts. Every rank builds exactly the same thing from the seed (the
patient-level split included), so the ranks agree without talking; only rank
0 writes ``split.json``. Torch-free.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgedx.errors import InputError
from edgedx.progress import ProgressFn
from edgedx.runtime.tiling import ResampledImage
from edgedx.training.augment import NO_TTA_BECAUSE
from edgedx.training.crops import DecodedImages, PlannedPolicy, decode_all, plan_crop_policy
from edgedx.training.run import RunFolder
from edgedx.training.sources import TrainingData, load_source
from edgedx.training.splits import check_no_leakage, fold_split, split_indices

if TYPE_CHECKING:
    from edgedx.training.config import TrainConfig

log = logging.getLogger(__name__)

NEGATIVE_NAMES = ("normal", "negative", "benign", "uninfected", "healthy", "nevus", "no_finding", "no finding", "absent")


def pick_positive_class(class_names: tuple[str, ...], requested: str | None) -> str:
    """The class a binary model screens for: as requested, else the one not named like a negative.

    Never a guess: the threshold is tuned for sensitivity to this class, so with
    folder names like ``MEL``/``NV`` a silent pick could tune a melanoma screen
    for nevi. When neither name is recognisably negative (``normal``,
    ``benign``, ``nevus``, ``uninfected``, ...), the user must say.
    """
    if requested is not None:
        if requested not in class_names:
            raise InputError(f"positive class {requested!r} is not one of the classes {list(class_names)}")
        return requested
    negatives = [n for n in class_names if n.lower().lstrip("0123456789_-") in NEGATIVE_NAMES]
    if len(negatives) == 1:
        return next(n for n in class_names if n not in negatives)
    raise InputError(
        f"which class should this model screen for? Neither of {list(class_names)} is named like a negative "
        f"({', '.join(NEGATIVE_NAMES[:6])}, ...), and the operating threshold is tuned for sensitivity to the positive "
        f"class: give --positive-class {class_names[0]} or --positive-class {class_names[1]}"
    )


@dataclass(frozen=True)
class Source:
    """The labelled source as listed (nothing decoded yet) and, for a binary task, the class it screens for."""

    data: TrainingData
    positive: str | None


def load_data(data: str | Path, config: TrainConfig) -> Source:
    """List the source (ImageFolder, CSV manifest or MedMNIST ``.npz``) and settle the positive class, before any decoding."""
    source = load_source(
        data,
        layout=config.layout(),
        label_columns=list(config.label_columns) if config.label_columns else None,
        class_names=list(config.class_names) if config.class_names else None,
        task=config.task,
    )
    positive = pick_positive_class(source.class_names, config.positive_class) if source.task == "binary" else None
    return Source(source, positive)


@dataclass(frozen=True)
class RunData:
    """What the epochs read: the readable images, decoded once and resampled by the crop policy, and the split."""

    decoded: DecodedImages
    splits: dict[str, np.ndarray]
    planned: PlannedPolicy

    @property
    def data(self) -> TrainingData:
        return self.decoded.data

    @property
    def targets(self) -> np.ndarray:
        return self.decoded.data.targets

    @property
    def train_idx(self) -> np.ndarray:
        return self.splits["train"]

    @property
    def val_idx(self) -> np.ndarray:
        return self.splits["val"]

    @property
    def test_idx(self) -> np.ndarray:
        """Empty unless ``--test-fraction`` (or the source's own split column) held a test split out."""
        return self.splits.get("test", np.zeros(0, dtype=np.int64))


def with_training_items(
    run_data: RunData, pixels: Sequence[np.ndarray], ids: Sequence[str], label: int, *, source_sizes: Sequence[tuple[int, int]] | None = None
) -> RunData:
    """A new RunData with ``pixels`` (already at the crop policy's scale, e.g. mined tiles) appended to the TRAINING
    split only, each labelled class ``label``.

    Why appended at the end and to training only: every existing position (the
    validation and test indices, the predictions written for them) stays the
    same, so the threshold and the card's metrics are measured on exactly the
    images a run without the extra items uses. An item's patient id is its own
    id (a crop of an unlabelled field belongs to no training patient).
    ``source_sizes``: each item's (height, width) before resampling (default:
    its own size), kept with its pixels.
    """
    data, n = run_data.data, len(run_data.data)
    k = len(pixels)
    if len(ids) != k:
        raise InputError(f"{k} extra items but {len(ids)} ids; give one id per item")
    if data.task == "multilabel" or not 0 <= label < len(data.class_names):
        raise InputError(f"extra training items need a single class index of {list(data.class_names)}, got {label}")
    if not k:
        return run_data
    assert data.index is not None
    offset = int(data.index.max()) + 1 if n else 0
    extra = [np.ascontiguousarray(p) for p in pixels]
    loader, locator = data.loader, data.locator

    def load(j: int) -> np.ndarray:
        return extra[j - offset].copy() if j >= offset else loader(j)

    def locate(j: int) -> Path:
        if j >= offset:
            raise InputError(f"{ids[j - offset]} was added in training (a mined crop) and has no file of its own")
        assert locator is not None
        return locator(j)

    grown = TrainingData(
        class_names=data.class_names, task=data.task, ids=[*data.ids, *ids],
        targets=np.concatenate([data.targets, np.full(k, label, dtype=data.targets.dtype)]),
        patient_ids=None if data.patient_ids is None else [*data.patient_ids, *ids],
        splits=None if data.splits is None else [*data.splits, *(["train"] * k)],
        source=data.source, loader=load, index=np.concatenate([data.index, offset + np.arange(k, dtype=np.int64)]),
        locator=None if locator is None else locate,
    )
    sizes = source_sizes if source_sizes is not None else [(int(p.shape[0]), int(p.shape[1])) for p in extra]
    images = [*run_data.decoded.images, *(ResampledImage(p, (int(h), int(w))) for p, (h, w) in zip(extra, sizes))]
    decoded = DecodedImages(grown, images, list(run_data.decoded.skipped))
    splits = {**run_data.splits, "train": np.concatenate([run_data.train_idx, n + np.arange(k, dtype=np.int64)])}
    return RunData(decoded, splits, run_data.planned)


def build_data(
    source: TrainingData, config: TrainConfig, size: tuple[int, int], *,
    fold: tuple[int, int] | None, run: RunFolder, main: bool, progress: ProgressFn,
) -> RunData:
    """Choose the crop policy for the model's input ``size``, decode every image once, split by patient.

    ``main`` is rank 0, the only one that logs the policy and writes
    ``split.json``. The split is written before an empty validation split is
    refused, so the refusal can be checked against the file.
    """
    planned = with_test_views(plan_crop_policy(source, config.crop, size, config.stride_fraction), config, main=main)
    if main:
        log.info("crop policy: %s (%s)", planned.policy.describe(), planned.reason)
    decoded = decode_all(source, planned.policy, strict=config.strict, progress=progress)
    _check_two_classes(decoded.data)
    splits = _split(decoded.data, config, fold)
    check_no_leakage(decoded.data, splits)
    if main:
        run.write_split(decoded.data, splits, seed=config.seed)
    if len(splits["val"]) == 0:
        raise InputError("the validation split is empty; raise --val-fraction or add images")
    return RunData(decoded, splits, planned)


def with_test_views(planned: PlannedPolicy, config: TrainConfig, *, main: bool) -> PlannedPolicy:
    """The crop policy with ``--tta``'s test-time views (``crop.tta``), before the card is built from it.

    Why here: the card's crop policy is this one, so every epoch's validation,
    the temperature, the threshold and the card's metrics are measured with the
    views ``diagnose`` will run. A quarter turn needs the planned tile to be square.
    """
    (th, tw) = planned.policy.tile_size
    views = config.test_views(square=th == tw)
    if main and config.tta.strip() == "modality" and not views and config.augmentation in NO_TTA_BECAUSE:
        log.info("--tta modality: %s", NO_TTA_BECAUSE[config.augmentation])
    return replace(planned, policy=replace(planned.policy, tta=views))


def _check_two_classes(data: TrainingData) -> None:
    """A single-label classifier needs readable images of at least two classes."""
    present = np.flatnonzero(data.class_matrix().any(axis=0))
    if data.task != "multilabel" and len(present) < 2:
        empty = [n for i, n in enumerate(data.class_names) if i not in present]
        raise InputError(
            f"only one class has readable images in {data.source} (none readable for: {', '.join(empty)}); "
            "a classifier needs at least two"
        )


def _split(data: TrainingData, config: TrainConfig, fold: tuple[int, int] | None) -> dict[str, np.ndarray]:
    """The patient-level split from the seed (every rank computes the same), or fold ``i`` of ``k``."""
    if fold is None:
        return split_indices(data, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed)
    return fold_split(data, fold[1], fold[0], seed=config.seed, test_fraction=config.test_fraction)
