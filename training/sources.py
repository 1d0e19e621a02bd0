"""Every labelled data source EdgeDx trains on, as one structure.

Why: training, splitting and evaluation should not care whether the images came
from an ImageFolder, a CSV manifest or a MedMNIST ``.npz``. :func:`load_source`
turns each into a :class:`TrainingData`: class names, task, one target per item,
optional patient ids and predefined splits, and a ``load(i)`` that returns the
item as RGB uint8 (the one in-memory image format of EdgeDx).

Sources:

* a folder: ImageFolder layout (``root/<class>/**/<image>``), read by
  :func:`edgedx.runtime.io.datasets.list_image_folder`; binary with 2 classes,
  else multiclass; no patient ids, no predefined split.
* a ``.csv`` manifest: one row per image with columns ``path`` (relative to the
  CSV's folder, or absolute; a column named ``image``, ``file`` or ``filename``
  is accepted instead, looked up in that order), ``label`` (class names); a
  :class:`~edgedx.runtime.io.manifest.ManifestLayout` names other columns, an
  image folder and a missing suffix (ISIC's ``labels.csv``); optional ``patient_id`` and ``split``
  (``train``/``val``/``test``). Multi-label manifests name their 0/1 columns
  with ``label_columns``.
* a ``.npz`` in MedMNIST layout: ``{split}_images`` (N, H, W) or (N, H, W, 3)
  uint8 and ``{split}_labels`` (N,), (N, 1) or (N, C) for the splits present.

Numpy, csv and the runtime's image I/O only (no torch): cheap to import and test.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from edgedx.errors import InputError
from edgedx.runtime.io.datasets import list_image_folder
from edgedx.runtime.io.image_io import read_image, to_rgb_uint8
from edgedx.runtime.io.manifest import ManifestLayout, ManifestRow, read_manifest_rows
from edgedx.runtime.io.sources import source_pixels

log = logging.getLogger(__name__)

Task = Literal["binary", "multiclass", "multilabel"]
TASKS: tuple[str, ...] = ("binary", "multiclass", "multilabel")
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test")
PATIENT_COLUMN = "patient_id"
SPLIT_COLUMN = "split"
_ONE_VALUES = frozenset({"1", "1.0"})
_ZERO_VALUES = frozenset({"0", "0.0"})

Loader = Callable[[int], np.ndarray]


@dataclass(eq=False)
class TrainingData:
    """Labelled items of one source, loaded lazily one image at a time.

    ``targets`` is (N,) int64 class indices for binary/multiclass and (N, C)
    float32 of 0/1 for multilabel. ``loader`` reads the item at a position of
    the original source and ``index`` maps this object's positions to it, so a
    :meth:`subset` shares the loader (and an npz's in-memory arrays) instead of
    copying images.
    """

    class_names: tuple[str, ...]
    task: Task
    ids: list[str]
    targets: np.ndarray
    patient_ids: list[str] | None
    splits: list[str] | None
    source: str
    loader: Loader = field(repr=False, kw_only=True)
    index: np.ndarray | None = field(default=None, repr=False, kw_only=True)
    locator: Callable[[int], Path] | None = field(default=None, repr=False, kw_only=True)  # file-backed sources

    def __post_init__(self) -> None:
        """Catch misaligned fields early: every later step indexes them together."""
        self.class_names = tuple(self.class_names)
        self.targets = np.asarray(self.targets)
        n = len(self.ids)
        if self.task not in TASKS:
            raise InputError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.task == "multilabel":
            if self.targets.ndim != 2 or self.targets.shape != (n, len(self.class_names)):
                raise InputError(
                    f"multilabel targets must have shape ({n}, {len(self.class_names)}), got {self.targets.shape}"
                )
        elif self.targets.shape != (n,):
            raise InputError(f"{self.task} targets must have shape ({n},), got {self.targets.shape}")
        for name in ("patient_ids", "splits"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise InputError(f"{name} has {len(value)} entries for {n} items; give one per item")
        if self.splits is not None:
            bad = sorted(set(self.splits) - set(SPLIT_NAMES))
            if bad:
                raise InputError(f"split value {bad[0]!r} is not one of train, val, test")
        if self.index is None:
            self.index = np.arange(n, dtype=np.int64)
        elif len(self.index) != n:
            raise InputError(f"index has {len(self.index)} entries for {n} items")

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> np.ndarray:
        """RGB uint8 (H, W, 3) of item ``i``; raises ImageReadError for an unreadable file."""
        assert self.index is not None
        return self.loader(int(self.index[i]))

    def item(self, i: int) -> Path | np.ndarray:
        """What ``diagnose`` would be given for item ``i``: its file (read by the runtime's own path), else its pixels."""
        assert self.index is not None
        return self.locator(int(self.index[i])) if self.locator is not None else self.load(i)

    def size(self, i: int) -> tuple[int, int]:
        """(height, width) of item ``i`` as loaded, from the file header when there is a file (no decoding)."""
        assert self.index is not None
        if self.locator is not None:
            return source_pixels(self.locator(int(self.index[i])))
        image = self.load(i)
        return int(image.shape[0]), int(image.shape[1])

    def subset(self, indices: Sequence[int] | np.ndarray) -> TrainingData:
        """The same classes and task restricted to ``indices`` (ints or a boolean mask), fields kept aligned."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            if idx.shape != (len(self),):
                raise InputError(f"a boolean mask must have {len(self)} entries, got {idx.shape}")
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise InputError(f"subset index out of range for {len(self)} items")
        assert self.index is not None
        return TrainingData(
            class_names=self.class_names,
            task=self.task,
            ids=[self.ids[i] for i in idx],
            targets=self.targets[idx],
            patient_ids=None if self.patient_ids is None else [self.patient_ids[i] for i in idx],
            splits=None if self.splits is None else [self.splits[i] for i in idx],
            source=self.source,
            loader=self.loader,
            index=self.index[idx],
            locator=self.locator,
        )

    def class_counts(self) -> dict[str, int]:
        """Items per class; for multilabel, positives per label (an item may count for several)."""
        return dict(zip(self.class_names, (int(c) for c in self.class_matrix().sum(axis=0))))

    def class_matrix(self) -> np.ndarray:
        """(N, C) int64 0/1 membership: one-hot classes, or the multilabel targets."""
        c = len(self.class_names)
        if self.task == "multilabel":
            return (self.targets > 0.5).astype(np.int64)
        out = np.zeros((len(self), c), np.int64)
        out[np.arange(len(self)), self.targets.astype(np.int64)] = 1
        return out


def load_source(
    path: str | Path,
    *,
    layout: ManifestLayout = ManifestLayout(),
    label_columns: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    task: str | None = None,
) -> TrainingData:
    """Load a folder, ``.csv`` manifest or MedMNIST ``.npz`` as :class:`TrainingData`.

    ``layout`` says how a CSV manifest names its images and class column
    (:class:`~edgedx.runtime.io.manifest.ManifestLayout`); ``label_columns``
    names the 0/1 columns of a multi-label CSV. ``class_names`` fixes the class
    order (or names an npz's integer labels); ``task`` forces binary,
    multiclass or multilabel where the labels allow it.
    """
    if task is not None and task not in TASKS:
        raise InputError(f"task {task!r} is not one of {', '.join(TASKS)}")
    path = Path(path)
    if not path.exists():
        raise InputError(
            f"data not found: {path}; give a folder with one sub-folder per class, a .csv manifest or a .npz file"
        )
    if path.is_dir():
        if label_columns is not None:
            raise InputError(f"label_columns is for CSV manifests; {path} is a folder with one sub-folder per class")
        data = _load_image_folder(path, class_names)
    elif path.suffix.lower() == ".csv":
        data = _load_csv(path, layout, label_columns, class_names)
    elif path.suffix.lower() == ".npz":
        if label_columns is not None:
            raise InputError(f"label_columns is for CSV manifests, not the .npz file {path}")
        data = _load_npz(path, class_names)
    else:
        raise InputError(
            f"cannot read labelled data from {path} (suffix {path.suffix!r}); "
            "give a folder with one sub-folder per class, a .csv manifest or a .npz file"
        )
    data = _force_task(data, task)
    log.info("loaded %d items from %s: a %s task with classes %s", len(data), path, data.task, ", ".join(data.class_names))
    return data


def _single_label_task(n_classes: int) -> Task:
    return "binary" if n_classes == 2 else "multiclass"


def _force_task(data: TrainingData, task: str | None) -> TrainingData:
    """Apply a requested task, or explain why the labels do not allow it."""
    if task is None or task == data.task:
        return data
    n = len(data.class_names)
    if data.task == "multilabel":
        raise InputError(
            f"task {task!r} needs one class per item, but {data.source} has multi-label targets "
            f"({n} labels: {', '.join(data.class_names)}); use task 'multilabel'"
        )
    if task == "multilabel":
        raise InputError(
            f"task 'multilabel' needs one 0/1 target per label (CSV label_columns, or (N, C) npz labels), "
            f"but {data.source} has one class per item; use task {data.task!r}"
        )
    if task == "binary" and n != 2:
        raise InputError(
            f"task 'binary' needs exactly 2 classes, but {data.source} has {n}: {', '.join(data.class_names)}; "
            "use task 'multiclass'"
        )
    data.task = cast(Task, task)
    return data


def _file_loader(paths: Sequence[Path]) -> Loader:
    """Read item ``i`` from disk; paths are kept, images are not."""
    frozen = tuple(paths)
    return lambda i: read_image(frozen[i])


def _load_image_folder(root: Path, class_names: Sequence[str] | None) -> TrainingData:
    listed = list_image_folder(root)
    paths = [p.absolute() for p in listed.paths]
    labels = np.asarray(listed.labels, np.int64)
    names = listed.class_names
    if class_names is not None:
        labels, names = _reorder(labels, names, class_names, f"the class folders of {root}")
    return TrainingData(
        class_names=names,
        task=_single_label_task(len(names)),
        ids=[str(p) for p in paths],
        targets=labels,
        patient_ids=None,
        splits=None,
        source=str(root),
        loader=_file_loader(paths),
        locator=tuple(paths).__getitem__,
    )


def _reorder(
    labels: np.ndarray, found: tuple[str, ...], wanted: Sequence[str], where: str
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Re-index labels to the user's class order; the two name sets must be equal."""
    wanted = tuple(str(n) for n in wanted)
    if len(set(wanted)) != len(wanted):
        raise InputError(f"class_names has duplicates: {list(wanted)}; give each class once")
    if set(wanted) != set(found):
        raise InputError(
            f"class_names {list(wanted)} do not match {where} ({', '.join(found)}); give exactly those names"
        )
    mapping = np.asarray([wanted.index(n) for n in found], np.int64)
    return mapping[labels], wanted


# --------------------------------------------------------------------------- CSV


def _cell(row: dict[str | None, Any], column: str) -> str:
    value = row.get(column)
    return value.strip() if isinstance(value, str) else ""


_Row = ManifestRow


def _load_csv(
    csv_path: Path, layout: ManifestLayout, label_columns: Sequence[str] | None, class_names: Sequence[str] | None
) -> TrainingData:
    """A CSV manifest as :class:`TrainingData`; checks run file, header, paths, patients, splits, then labels."""
    name = csv_path.name
    layout.check_image_dir()
    header, rows = read_manifest_rows(csv_path)
    path_column = layout.find_path_column(header, name)
    label_columns = _check_label_columns(header, name, layout, label_columns)
    if not rows:
        raise InputError(f"manifest {csv_path} has a header but no rows; add one row per image")
    paths = _csv_image_paths(rows, path_column, csv_path, layout)
    patient_ids = _csv_patient_ids(rows, header, name)
    splits = _csv_splits(rows, header, name)
    task: Task
    if label_columns is not None:
        names, targets = _csv_multilabel_targets(rows, label_columns, class_names, csv_path)
        task = "multilabel"
    else:
        names, targets = _csv_single_label_targets(rows, layout.label_column, class_names, csv_path)
        task = _single_label_task(len(names))
    return TrainingData(
        class_names=names,
        task=task,
        ids=[str(p) for p in paths],
        targets=targets,
        patient_ids=patient_ids,
        splits=splits,
        source=str(csv_path),
        loader=_file_loader(paths),
        locator=tuple(paths).__getitem__,
    )


def _check_label_columns(
    header: Sequence[str], name: str, layout: ManifestLayout, label_columns: Sequence[str] | None
) -> list[str] | None:
    """The multi-label 0/1 columns as strings, or None after checking the single class column: all before any row."""
    if label_columns is None:
        layout.check_label_column(header, name)
        return None
    label_columns = [str(c) for c in label_columns]
    if len(label_columns) < 2:
        raise InputError(
            f"label_columns names {len(label_columns)} column(s) {label_columns}; a multi-label manifest needs "
            "at least 2 (for one label use label_column)"
        )
    for col in label_columns:
        if col not in header:
            raise InputError(f"label column {col!r} not in {name}; columns are: {', '.join(header)}")
    return label_columns


def _csv_image_paths(rows: Sequence[_Row], path_column: str, csv_path: Path, layout: ManifestLayout) -> list[Path]:
    """Absolute image paths (ids must not depend on the working directory), each listed once, not all missing."""
    name = csv_path.name
    paths: list[Path] = []
    for line, row in rows:
        value = _cell(row, path_column)
        if not value:
            raise InputError(f"empty {path_column!r} on line {line} of {name}; every row needs an image path")
        paths.append(layout.image_path(value, csv_path))
    _check_no_repeats(paths, [line for line, _ in rows], name)
    _check_files_exist(paths, csv_path, layout)
    return paths


def _csv_patient_ids(rows: Sequence[_Row], header: Sequence[str], name: str) -> list[str] | None:
    """One patient id per row when the column exists: a blank one would let a patient straddle train and test."""
    if PATIENT_COLUMN not in header:
        return None
    patient_ids = []
    for line, row in rows:
        pid = _cell(row, PATIENT_COLUMN)
        if not pid:
            raise InputError(
                f"empty {PATIENT_COLUMN!r} on line {line} of {name}; fill in every patient id "
                "(or remove the column to split by image)"
            )
        patient_ids.append(pid)
    return patient_ids


def _csv_splits(rows: Sequence[_Row], header: Sequence[str], name: str) -> list[str] | None:
    """The predefined split of each row, lower-cased, when the column exists; any other value is a typo."""
    if SPLIT_COLUMN not in header:
        return None
    splits = []
    for line, row in rows:
        split = _cell(row, SPLIT_COLUMN).lower()
        if split not in SPLIT_NAMES:
            raise InputError(
                f"split {_cell(row, SPLIT_COLUMN)!r} on line {line} of {name} is not one of train, val, test; "
                "fix the value (or remove the split column to split automatically)"
            )
        splits.append(split)
    return splits


def _csv_multilabel_targets(
    rows: Sequence[_Row], label_columns: Sequence[str], class_names: Sequence[str] | None, csv_path: Path
) -> tuple[tuple[str, ...], np.ndarray]:
    """(N, C) float32 0/1 targets and the label names; a label no item has is warned about, not refused."""
    name = csv_path.name
    targets = np.zeros((len(rows), len(label_columns)), np.float32)
    for r, (line, row) in enumerate(rows):
        for c, col in enumerate(label_columns):
            value = _cell(row, col)
            if value in _ONE_VALUES:
                targets[r, c] = 1.0
            elif value not in _ZERO_VALUES:
                raise InputError(
                    f"label column {col!r} on line {line} of {name} holds {value!r}; multi-label columns hold 0 or 1"
                )
    names = tuple(label_columns)
    if class_names is not None:
        names = tuple(str(n) for n in class_names)
        if len(names) != len(label_columns) or len(set(names)) != len(names):
            raise InputError(
                f"class_names {list(names)} must give {len(label_columns)} distinct names, one per label column "
                f"({', '.join(label_columns)})"
            )
    for label, count in zip(names, targets.sum(axis=0)):
        if count == 0:
            log.warning("label %r has no positive item in %s", label, csv_path)
    return names, targets


def _csv_single_label_targets(
    rows: Sequence[_Row], label_column: str, class_names: Sequence[str] | None, csv_path: Path
) -> tuple[tuple[str, ...], np.ndarray]:
    """(N,) int64 class indices and the class order (given, else sorted); a classifier needs two classes present."""
    name = csv_path.name
    raw: list[str] = []
    for line, row in rows:
        value = _cell(row, label_column)
        if not value:
            raise InputError(f"empty label column {label_column!r} on line {line} of {name}; every row needs a class")
        raw.append(value)
    found = tuple(sorted(set(raw)))
    if class_names is not None:
        names = _check_csv_class_names(class_names, found, raw, rows, csv_path)
    else:
        names = found
    if len(found) < 2:
        raise InputError(
            f"{name} has only one class ({found[0]!r} in column {label_column!r}); "
            "a classifier needs at least two classes"
        )
    lookup = {n: i for i, n in enumerate(names)}
    return names, np.asarray([lookup[v] for v in raw], np.int64)


def _check_csv_class_names(
    class_names: Sequence[str], found: tuple[str, ...], raw: Sequence[str], rows: Sequence[_Row], csv_path: Path
) -> tuple[str, ...]:
    """The user's class order: every label must be in it (a typo otherwise); a class with no item only warns."""
    name = csv_path.name
    names = tuple(str(n) for n in class_names)
    if len(set(names)) != len(names):
        raise InputError(f"class_names has duplicates: {list(names)}; give each class once")
    unknown = [v for v in found if v not in names]
    if unknown:
        line = rows[raw.index(unknown[0])][0]
        raise InputError(
            f"label {unknown[0]!r} on line {line} of {name} is not in class_names {list(names)}; "
            "add it or fix the label"
        )
    for missing in sorted(set(names) - set(found)):
        log.warning("class %r has no item in %s", missing, csv_path)
    return names


def _check_no_repeats(paths: Sequence[Path], lines: Sequence[int], name: str) -> None:
    """One row per image: a file listed twice would count twice, could land in train and validation at once, or
    carry two labels."""
    first: dict[str, int] = {}
    for path, line in zip(paths, lines):
        key = os.path.normpath(str(path))
        if key in first:
            raise InputError(
                f"{path} is listed twice in {name} (lines {first[key]} and {line}); give each image one row "
                "(one label, one split), or use label columns for a multi-label image"
            )
        first[key] = line


def _check_files_exist(paths: Sequence[Path], csv_path: Path, layout: ManifestLayout) -> None:
    """A manifest whose files are all missing is a path-root mistake; a few missing ones are skipped later."""
    missing = [p for p in paths if not p.is_file()]
    if not missing:
        return
    if len(missing) == len(paths):
        raise InputError(
            f"none of the {len(paths)} image paths in {csv_path} exists (first: {missing[0]}); {layout.describe()}"
        )
    log.warning(
        "%d of %d images listed in %s do not exist (first: %s); they will be skipped",
        len(missing),
        len(paths),
        csv_path,
        missing[0],
    )


# --------------------------------------------------------------------------- npz


def _load_npz(npz_path: Path, class_names: Sequence[str] | None) -> TrainingData:
    """A MedMNIST ``.npz`` as :class:`TrainingData`, images kept in memory and shared by every subset."""
    name = npz_path.name
    present, images, labels = _read_npz_arrays(npz_path)
    try:
        _check_npz_shapes(present, images, labels, name)
        stacked = _stack_npz_labels(present, labels, name)
        names, targets, task = _npz_targets(stacked, class_names, name)
    except (AttributeError, IndexError, TypeError) as exc:  # members that are not arrays, or empty ones: a message, not a traceback
        raise InputError(
            f"{name} does not hold MedMNIST-style arrays ({type(exc).__name__}: {exc}); it needs <split>_images (N, H, W[, 3]) "
            "uint8 and <split>_labels (N,) or (N, 1) with N > 0"
        ) from None
    arrays = [images[s] for s in present]
    return TrainingData(
        class_names=names,
        task=task,
        ids=[f"{name}:{s}[{j}]" for s in present for j in range(len(images[s]))],
        targets=targets,
        patient_ids=None,
        splits=[s for s in present for _ in range(len(images[s]))],
        source=str(npz_path),
        loader=_npz_loader(arrays),
    )


def _read_npz_arrays(npz_path: Path) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The splits present (in train, val, test order) and their image and label arrays, each read once."""
    if not zipfile.is_zipfile(npz_path):
        raise InputError(f"{npz_path} is not a .npz archive (not a zip file); give a MedMNIST-style .npz")
    try:
        with np.load(npz_path, allow_pickle=False) as archive:
            present = _npz_splits(sorted(archive.files), npz_path.name)
            # Read each array once: NpzFile decompresses again on every access.
            images = {s: archive[f"{s}_images"] for s in present}
            labels = {s: archive[f"{s}_labels"] for s in present}
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{npz_path} is not a readable .npz file ({exc}); give a MedMNIST-style .npz") from None
    return present, images, labels


def _npz_splits(keys: Sequence[str], name: str) -> list[str]:
    """Splits with any MedMNIST array; each must have both images and labels, or items could not be paired."""
    present = [s for s in SPLIT_NAMES if f"{s}_images" in keys or f"{s}_labels" in keys]
    if not present:
        raise InputError(
            f"{name} has no MedMNIST arrays (train_images/train_labels, val_..., test_...); "
            f"keys present: {', '.join(keys) or 'none'}"
        )
    for s in present:
        for kind in ("images", "labels"):
            if f"{s}_{kind}" not in keys:
                raise InputError(
                    f"{name} has no '{s}_{kind}' array to go with its {s} split; keys present: {', '.join(keys)}"
                )
    return present


def _check_npz_shapes(
    present: Sequence[str], images: dict[str, np.ndarray], labels: dict[str, np.ndarray], name: str
) -> None:
    """uint8 grey or RGB images and one label row per image, checked per split so the error names the array."""
    for s in present:
        img, lab = images[s], labels[s]
        if img.dtype != np.uint8 or not (img.ndim == 3 or (img.ndim == 4 and img.shape[3] in (1, 3))):
            raise InputError(
                f"'{s}_images' in {name} has shape {img.shape} and type {img.dtype}; "
                "expected uint8 (N, H, W) or (N, H, W, 3)"
            )
        if lab.ndim not in (1, 2) or len(lab) != len(img):
            raise InputError(
                f"'{s}_labels' in {name} has shape {lab.shape} for {len(img)} images; "
                f"expected ({len(img)},), ({len(img)}, 1) or ({len(img)}, C)"
            )


def _stack_npz_labels(present: Sequence[str], labels: dict[str, np.ndarray], name: str) -> np.ndarray:
    """All splits' labels as one (N, width) int64 array: same width everywhere, whole numbers, none negative."""
    widths = {1 if labels[s].ndim == 1 else labels[s].shape[1] for s in present}
    if len(widths) > 1:
        raise InputError(f"label arrays in {name} have different widths {sorted(widths)}; they must agree")
    width = widths.pop()
    stacked = np.concatenate([labels[s].reshape(len(labels[s]), width) for s in present])
    if not np.issubdtype(stacked.dtype, np.integer):
        if not np.issubdtype(stacked.dtype, np.floating) or not np.all(stacked == np.round(stacked)):
            raise InputError(f"labels in {name} must be whole numbers, got {stacked.dtype} values")
    stacked = stacked.astype(np.int64)
    if stacked.size and stacked.min() < 0:
        raise InputError(f"labels in {name} must be >= 0, found {int(stacked.min())}")
    return stacked


def _npz_targets(
    stacked: np.ndarray, class_names: Sequence[str] | None, name: str
) -> tuple[tuple[str, ...], np.ndarray, Task]:
    """Class names, targets and task: one column holds class indices, several hold one 0/1 target per label."""
    width = stacked.shape[1]
    if width == 1:
        n_classes = int(stacked.max()) + 1 if stacked.size else 0
        found = f"the labels in {name} run 0..{n_classes - 1} ({n_classes} classes)"
        names = _npz_class_names(class_names, n_classes, found, "label")
        targets = stacked[:, 0]
        if len(np.unique(targets)) < 2:
            raise InputError(f"{name} has only one class (label {int(targets[0])}); a classifier needs at least two")
        return names, targets, _single_label_task(len(names))
    bad = np.argwhere((stacked != 0) & (stacked != 1))
    if len(bad):
        r, c = (int(v) for v in bad[0])
        raise InputError(
            f"multi-label targets in {name} must be 0 or 1; item {r}, label {c} holds {int(stacked[r, c])}"
        )
    names = _npz_class_names(class_names, width, f"the labels in {name} have {width} columns", "column")
    return names, stacked.astype(np.float32), "multilabel"


def _npz_loader(arrays: Sequence[np.ndarray]) -> Loader:
    """Item ``i`` of the splits laid end to end, found by offset so the arrays are never concatenated (copied)."""
    offsets = np.cumsum([0] + [len(a) for a in arrays])

    def load(i: int) -> np.ndarray:
        k = int(np.searchsorted(offsets, i, side="right")) - 1
        return to_rgb_uint8(arrays[k][i - int(offsets[k])])

    return load


def _npz_class_names(given: Sequence[str] | None, count: int, found: str, order: str) -> tuple[str, ...]:
    """``given`` names checked against the label count, or "0", "1", ... when none are given."""
    if given is None:
        return tuple(str(i) for i in range(count))
    names = tuple(str(n) for n in given)
    if len(names) != count or len(set(names)) != len(names):
        raise InputError(f"class_names gives {len(names)} names but {found}; give {count} distinct names in {order} order")
    return names
