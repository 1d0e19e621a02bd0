"""The run folder: what a training run leaves there, under which names, and reading its held-out images back.

One module knows the layout, so training (which writes it), export (which
calibrates and verifies on the run's own images) and a person reading a run
agree on it::

    model.pt      the best epoch's weights with the final card (the product)
    last.pt       everything needed to continue exactly (--resume)
    split.json    which item went to which split: paths relative to the folder, ``file.npz:val[3]`` for npz items
    metrics.json  every epoch's validation metrics, the operating point, the test split
    card.json     the final card, readable without torch
    summary.json  what to check first: data, classes, crop policy, warnings
    plots/, gradcam/

Cross-validation keeps one such folder per fold (``fold_1``, ...) and
``cv_summary.json`` beside them. Reading the images back needs the data
source the card records (:class:`RecordedSource`); a path relative to where
training ran is also tried beside the run, so export works from any directory.

Torch-free: export and tools read a run without training's dependencies.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgedx.card import ModelCard
from edgedx.errors import CardError, EdgeDxError, ImageReadError, InputError
from edgedx.runtime.io.labelled import resolve_id
from edgedx.runtime.io.manifest import ManifestLayout
from edgedx.training.sources import TrainingData, load_source
from edgedx.training.splits import save_splits

if TYPE_CHECKING:
    from edgedx.training.config import TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "model.pt"
LAST_NAME = "last.pt"
SPLIT_NAME = "split.json"
METRICS_NAME = "metrics.json"
SUMMARY_NAME = "summary.json"
CARD_NAME = "card.json"
PLOTS_DIR = "plots"
GRADCAM_DIR = "gradcam"
CV_SUMMARY_NAME = "cv_summary.json"
PREDICTIONS_NAME = "val_predictions.npz"  # the final weights' merged validation probabilities: a fold's out-of-fold share
SNAPSHOT_DIR = "epochs"  # each epoch's weights while a cross-validation still has to choose the epoch


class SplitUnavailable(Exception):
    """Why a run's split could not be read back (callers turn it into an error naming the option that fixes it)."""


def check_run_folder(out: Path, config: TrainConfig) -> None:
    """A run folder that already holds a run is continued (--resume) or replaced (--overwrite), never silently overwritten."""
    if config.resume or config.overwrite:
        return
    previous = [name for name in (CHECKPOINT_NAME, LAST_NAME) if (out / name).is_file()]
    if previous:
        raise InputError(
            f"{out} already holds a training run ({', '.join(previous)}); continue it with --resume, start it again "
            "with --overwrite, or choose another --out"
        )


def jsonable(value: Any) -> Any:
    """Plain JSON values (numpy scalars and arrays, tuples, NaN → null)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, value: Any) -> None:
    """The run's JSON files: indented, NaN as null, one trailing newline."""
    path.write_text(json.dumps(jsonable(value), indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class HeldOut:
    """Whole images of one split (file paths, arrays for ``.npz`` items), with class indices when single-label."""

    items: list[Path | np.ndarray]
    labels: np.ndarray | None
    source: str  # "val split of RUN (DATA)", for reports


@dataclass(frozen=True)
class RecordedSource:
    """How training read its data, as the card records it: ``data_summary.source`` and the training options.

    Written by :func:`edgedx.training.build.build_card` (the source resolved to
    an absolute path, the options as ``TrainConfig`` fields); older cards may
    hold a relative source and lack layout keys, which take their defaults.
    """

    source: str
    layout: ManifestLayout
    label_columns: tuple[str, ...] | None

    @classmethod
    def of(cls, card: ModelCard) -> RecordedSource:
        recorded = (card.provenance.data_summary or {}).get("source")
        if not recorded:
            raise SplitUnavailable("the card records no training data source")
        options: Mapping[str, Any] = card.provenance.training or {}
        columns = options.get("label_columns")
        return cls(str(recorded), ManifestLayout.from_dict(options), tuple(columns) if columns else None)


class RunFolder:
    """One training run's folder: the names of its files, writing them, and reading its split back."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT_NAME

    @property
    def last(self) -> Path:
        return self.path / LAST_NAME

    @property
    def split_file(self) -> Path:
        return self.path / SPLIT_NAME

    @property
    def plots(self) -> Path:
        return self.path / PLOTS_DIR

    @property
    def gradcam(self) -> Path:
        return self.path / GRADCAM_DIR

    def fold(self, i: int) -> RunFolder:
        """The run folder of cross-validation fold ``i`` (0-based; named from 1)."""
        return RunFolder(self.path / f"fold_{i + 1}")

    def snapshot(self, epoch: int) -> Path:
        return self.path / SNAPSHOT_DIR / f"epoch_{epoch}.pt"

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS_NAME

    def write_predictions(self, idx: np.ndarray, targets: np.ndarray, probs: np.ndarray, uncalibrated: np.ndarray) -> None:
        """The validation items (indices into the decoded source), their labels and merged probabilities."""
        with open(self.predictions, "wb") as handle:
            np.savez(handle, idx=idx, targets=targets, probs=probs, uncalibrated=uncalibrated)

    def check_free(self, config: TrainConfig) -> None:
        """See :func:`check_run_folder`."""
        check_run_folder(self.path, config)

    def create(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)

    # -- writing (rank 0 only) ----------------------------------------------------------------

    def write_split(self, data: TrainingData, splits: Mapping[str, np.ndarray], *, seed: int) -> None:
        save_splits(self.split_file, data, splits, seed=seed)

    def write_metrics(self, report: Mapping[str, Any]) -> None:
        write_json(self.path / METRICS_NAME, report)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        write_json(self.path / SUMMARY_NAME, summary)

    def write_card(self, card: ModelCard) -> None:
        (self.path / CARD_NAME).write_text(card.to_json() + "\n", encoding="utf-8")

    def write_cv_summary(self, summary: Mapping[str, Any]) -> None:
        write_json(self.path / CV_SUMMARY_NAME, summary)

    # -- reading back -------------------------------------------------------------------------

    def card(self) -> ModelCard:
        """The run's final card (``card.json``)."""
        try:
            return ModelCard.load(self.path / CARD_NAME)
        except CardError as exc:
            raise SplitUnavailable(str(exc)) from None

    def split_ids(self, split: str) -> list[str]:
        """Normalised absolute paths (or ``file.npz:val[3]`` ids) of one split's items, as training recorded them."""
        split_file = self.split_file
        if not split_file.is_file():
            raise SplitUnavailable(f"{split_file} is missing (the checkpoint was moved out of its run folder)")
        try:
            recorded = json.loads(split_file.read_text(encoding="utf-8")).get(split, [])
            ids = [os.path.normpath(resolve_id(i, self.path)) for i in recorded]
        except (OSError, ValueError) as exc:
            raise SplitUnavailable(f"cannot read {split_file}: {exc}") from None
        if not ids:
            raise SplitUnavailable(f"{split_file} lists no {split} images")
        return ids

    def data_source(self, card: ModelCard) -> TrainingData:
        """The run's data source, loaded the way training loaded it (once per process: export reads it twice)."""
        recorded = RecordedSource.of(card)
        source = resolve_source(recorded.source, self.path)
        if source is None:
            raise SplitUnavailable(f"the training data {recorded.source} is not found (tried as given and beside {self.path})")
        return _load_source_once(str(source), recorded.layout, recorded.label_columns, card.class_names, card.task)

    def split_images(self, split: str, *, limit: int, seed: int = 0, card: ModelCard | None = None) -> HeldOut:
        """Up to ``limit`` images of one split, in a seeded random order, with their labels.

        ``card`` is the run's card (default: ``card.json``). Raises
        :class:`SplitUnavailable` saying why when ``split.json`` or the data
        source cannot be found, so callers can name the option that gives
        images instead of silently using fewer.
        """
        ids = self.split_ids(split)
        data = self.data_source(card if card is not None else self.card())
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
            raise SplitUnavailable(
                f"none of the {len(ids)} {split} images of {self.split_file} is in the data source {data.source} any more"
            )
        known = bool(labels) and min(labels) >= 0
        return HeldOut(items, np.asarray(labels) if known else None, f"{split} split of {self.path} ({data.source})")


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
def _load_source_once(
    source: str, layout: ManifestLayout, label_columns: tuple[str, ...] | None, class_names: tuple[str, ...], task: str
) -> TrainingData:
    """Verification (val) and calibration (train) read the same source: load it once per export."""
    try:
        return load_source(source, layout=layout, label_columns=label_columns, class_names=class_names, task=task)
    except EdgeDxError as exc:
        raise SplitUnavailable(f"cannot reload the training data {source}: {exc}") from None
