"""Labelled evaluation data in the three layouts training reads, without torch.

An ImageFolder (one sub-folder per class), a CSV manifest (``path,label[,split]``,
paths relative to the CSV) or a MedMNIST-style ``.npz`` (``<split>_images``,
``<split>_labels``, integer labels in the model's class order). Labels become
indices into the *model's* class names, so a folder may hold only some classes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgedx.errors import InputError
from edgedx.runtime.io.datasets import list_image_folder
from edgedx.runtime.io.manifest import ManifestLayout, read_manifest_rows


@dataclass(frozen=True)
class LabelledSet:
    names: list[str]  # what each record is called (a path, or "file.npz:val[3]")
    images: list[Path | np.ndarray]
    labels: np.ndarray  # (N,) indices into the model's class names
    source: str

    def __len__(self) -> int:
        return len(self.names)


def load_labelled(
    data: str | Path, class_names: tuple[str, ...], *, split: str = "val", layout: ManifestLayout = ManifestLayout()
) -> LabelledSet:
    """Read ``data`` (folder, .csv, .npz, or a training run folder) for a model with ``class_names``.

    ``layout`` says how a CSV manifest names its images and classes (the same
    options ``train`` takes). A run folder (it holds ``split.json``) gives exactly that run's ``split``
    (``val`` or ``test``): the images training held out, never its training images.
    """
    path = Path(data)
    if not path.exists():
        raise InputError(f"evaluation data not found: {path}")
    if path.is_dir() and (path / "split.json").is_file():
        return _run_split(path, class_names, split)
    if path.is_dir():
        return _folder(path, class_names)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv(path, class_names, split, layout)
    if suffix == ".npz":
        return _npz(path, class_names, split)
    raise InputError(f"evaluation data must be a folder, a .csv manifest or a .npz file, got {path}")


def _folder(root: Path, class_names: tuple[str, ...]) -> LabelledSet:
    found = list_image_folder(root, min_classes=1)
    unknown = [c for c in found.class_names if c not in class_names]
    if unknown:
        raise InputError(
            f"class folder(s) {unknown} in {root} are not classes of this model ({list(class_names)}); "
            "name the sub-folders after the model's classes"
        )
    labels = np.asarray([class_names.index(found.class_names[i]) for i in found.labels], np.int64)
    return LabelledSet([str(p) for p in found.paths], list(found.paths), labels, str(root))


def _csv(path: Path, class_names: tuple[str, ...], split: str, layout: ManifestLayout) -> LabelledSet:
    columns, rows = read_manifest_rows(path)  # the reader training uses: same encoding, BOM and blank-line rules
    if not rows:
        raise InputError(f"{path} has no rows")
    layout.check_image_dir()
    path_column = layout.find_path_column(columns, path.name)
    layout.check_label_column(columns, path.name)
    label_column = layout.label_column
    if "split" in columns and split != "all":
        rows = [(n, r) for n, r in rows if (r.get("split") or "").strip().lower() == split]  # "Val" is val, as in training
        if not rows:
            raise InputError(f"{path} has no rows with split '{split}'; choose another with --split")
    elif split != "all":
        raise InputError(
            f"{path} has no split column, so --split {split} cannot pick its {split} rows: every row, training images "
            f"included, would be scored. Give --split all to score every row on purpose, or evaluate the run's own held-out "
            "images: edgedx evaluate MODEL RUN_DIR --split val (or test)"
        )
    names, images, labels = [], [], []
    for n, row in rows:
        label = (row.get(label_column) or "").strip()
        if label not in class_names:
            raise InputError(f"{path} line {n}: label {label!r} is not a class of this model ({list(class_names)})")
        value = (row.get(path_column) or "").strip()
        if not value:
            raise InputError(f"{path} line {n}: empty {path_column!r}; every row needs an image path")
        image = layout.image_path(value, path).resolve()
        names.append(str(image))
        images.append(image)
        labels.append(class_names.index(label))
    return LabelledSet(names, images, np.asarray(labels, np.int64), str(path))


_NPZ_ID = re.compile(r"^(?P<file>.+\.npz):(?P<split>\w+)\[(?P<index>\d+)\]$")
SPLIT_PATHS_NOTE = "image paths are relative to this run folder"


def portable_id(item_id: str, run: Path) -> str:
    """An image path as ``split.json`` stores it: relative to the run folder, so a run moved with its data still reads.

    ``.npz`` entries (``file.npz:val[3]``) stay as they are; a path on another
    drive (Windows) stays absolute.
    """
    if _NPZ_ID.match(item_id) or not os.path.isabs(item_id):
        return item_id
    try:
        return Path(os.path.relpath(item_id, run.absolute())).as_posix()
    except ValueError:
        return item_id


def resolve_id(item_id: str, run: Path) -> str:
    """The absolute path of a ``split.json`` entry (older runs stored absolute paths; those pass unchanged)."""
    if _NPZ_ID.match(item_id) or os.path.isabs(item_id):
        return item_id
    return os.path.normpath(run.absolute() / item_id)


def _run_split(run: Path, class_names: tuple[str, ...], split: str) -> LabelledSet:
    """The images of one split of a training run, with the labels training used (from its split.json)."""
    try:
        record = json.loads((run / "split.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{run / 'split.json'} is not a readable split file ({exc})") from None
    ids, labels = record.get(split), record.get(f"{split}_labels")
    if split == "val" and record.get("val_held_out") is False:
        raise InputError(
            f"{run / 'split.json'} is a fold ensemble's, and its 'val' images trained the ensemble's members: scoring them is not a "
            "result. Train with --folds K and --test-fraction (or a source with its own val/test split) and evaluate --split test"
        )
    if not ids:
        held = [k for k in ("val", "test") if record.get(k)]
        raise InputError(f"the run {run} has no {split!r} split; it holds {held}: choose one with --split (test exists with train --test-fraction)")
    if labels is None or len(labels) != len(ids):
        raise InputError(f"{run / 'split.json'} has no labels (written by an older EdgeDx); evaluate its data source instead")
    unknown = sorted(set(labels) - set(class_names))
    if unknown:
        raise InputError(f"the run's classes {unknown} are not classes of this model ({list(class_names)}); is it the same model?")
    images: list[Path | np.ndarray] = []
    arrays: dict[tuple[str, str], np.ndarray] = {}
    ids = [resolve_id(item, run) for item in ids]
    for item in ids:
        match = _NPZ_ID.match(item)
        if match is None:
            images.append(Path(item))
            continue
        key = (match["file"], match["split"])
        if key not in arrays:
            arrays[key] = _npz_images(_run_source(run), match["file"], match["split"])
        images.append(arrays[key][int(match["index"])])
    return LabelledSet(list(ids), images, np.asarray([class_names.index(n) for n in labels], np.int64), f"{run} ({split} split of the run)")


def _run_source(run: Path) -> Path:
    try:
        card = json.loads((run / "card.json").read_text(encoding="utf-8"))
        return Path(card["provenance"]["data_summary"]["source"])
    except (OSError, ValueError, KeyError, TypeError):
        raise InputError(f"{run / 'card.json'} does not name the run's data source; evaluate the .npz itself with --split") from None


def _npz_images(source: Path, name: str, split: str) -> np.ndarray:
    if source.name != name or not source.is_file():
        raise InputError(f"the run's images are in {name}, but its data source {source} is not there any more; evaluate the .npz itself")
    with np.load(source, allow_pickle=False) as archive:
        return archive[f"{split}_images"]


def _npz(path: Path, class_names: tuple[str, ...], split: str) -> LabelledSet:
    with np.load(path, allow_pickle=False) as archive:
        keys = set(archive.files)
        if f"{split}_images" not in keys or f"{split}_labels" not in keys:
            splits = sorted({k.rsplit("_", 1)[0] for k in keys if k.endswith("_images")})
            raise InputError(f"{path.name} has no '{split}' split; it has {splits or 'none'}: choose one with --split")
        images = archive[f"{split}_images"]
        labels = archive[f"{split}_labels"]
    labels = labels.reshape(len(labels), -1)
    if labels.shape[1] != 1:
        raise InputError(f"{path.name} has multi-label targets; evaluate supports one class per image")
    labels = labels[:, 0].astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise InputError(
            f"{path.name} labels run {labels.min()}..{labels.max()} but the model has {len(class_names)} classes {list(class_names)}"
        )
    names = [f"{path.name}:{split}[{i}]" for i in range(len(images))]
    return LabelledSet(names, list(images), labels, f"{path} ({split})")
