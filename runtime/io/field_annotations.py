"""Reading whole-field object annotations (the IML malaria layout) into per-field truth.

Why a reader of its own: field-level operating points (which crop probability
makes a parasite candidate, when a field is positive) must be chosen and
judged on annotated *fields*, not on the single-cell crops the model was
trained on (:mod:`edgedx.export.fit_fields`, :func:`edgedx.runtime.evaluate.evaluate_fields`).

The layout is one JSON list with an entry per image::

    [{"image_name": "PA171690.JPG",
      "objects": [{"type": "ring", "bbox": {"x": "402", "y": "531", "w": "80", "h": "77"}}, ...]}, ...]

(the IML files give the numbers as strings; both are read). Each object is one
of three kinds, by its ``type``:

- **positive** (``positive_types``, default the four parasite stages): what a
  detection should find; a field with one is a positive field;
- **difficult** (``difficult_types``): the annotator could not tell. Neither
  counted as a miss nor, when a detection holds one, as a false detection;
- **red cell** (``red_cell_types``): counted for the cell-count and
  parasitaemia denominators (with the positive boxes: infected cells are cells).

Any other type is kept in ``objects`` and otherwise ignored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.errors import InputError

log = logging.getLogger(__name__)

PARASITE_TYPES = ("ring", "trophozoite", "schizont", "gametocyte")
DIFFICULT_TYPES = ("difficult",)
RED_CELL_TYPES = ("red blood cell",)


@dataclass(frozen=True)
class AnnotatedObject:
    """One annotated box in the image's own pixels: x, y of its top-left corner, width, height."""

    kind: str
    x: float
    y: float
    w: float
    h: float

    @property
    def centre(self) -> tuple[float, float]:
        return self.x + self.w / 2, self.y + self.h / 2


@dataclass(frozen=True)
class FieldTruth:
    """One annotated field: the centres of its positive and difficult boxes, and its annotated red cells."""

    name: str
    positives: np.ndarray  # (n, 2) x, y centres of the positive boxes
    difficult: np.ndarray  # (m, 2) centres of the difficult boxes
    n_red_cells: int  # boxes of a red-cell type
    objects: tuple[AnnotatedObject, ...] = ()

    @property
    def n_positives(self) -> int:
        return int(len(self.positives))

    @property
    def positive(self) -> bool:
        """A positive field: at least one positive (non-difficult) object is annotated."""
        return self.n_positives > 0

    @property
    def n_cells(self) -> int:
        """Annotated cells: red-cell boxes plus positive boxes (an infected cell is a cell too)."""
        return self.n_red_cells + self.n_positives


@dataclass(frozen=True)
class FieldAnnotations:
    """Every annotated field of a file, by image name, and the type lists that decided what counts."""

    source: str
    fields: Mapping[str, FieldTruth]
    positive_types: tuple[str, ...] = PARASITE_TYPES
    difficult_types: tuple[str, ...] = DIFFICULT_TYPES
    red_cell_types: tuple[str, ...] = RED_CELL_TYPES

    def __len__(self) -> int:
        return len(self.fields)

    @property
    def names(self) -> list[str]:
        return sorted(self.fields)

    def subset(self, names: Iterable[str]) -> FieldAnnotations:
        """Only the named fields (a validation selection); a name not annotated is refused, naming it."""
        wanted = list(names)
        missing = [n for n in wanted if n not in self.fields]
        if missing:
            raise InputError(f"{len(missing)} field(s) are not in {self.source}, e.g. {missing[0]!r}; name annotated images only")
        return FieldAnnotations(self.source, {n: self.fields[n] for n in wanted}, self.positive_types, self.difficult_types, self.red_cell_types)


def read_field_annotations(
    path: str | Path,
    *,
    positive_types: Sequence[str] = PARASITE_TYPES,
    difficult_types: Sequence[str] = DIFFICULT_TYPES,
    red_cell_types: Sequence[str] = RED_CELL_TYPES,
) -> FieldAnnotations:
    """The fields of an IML-layout ``annotations.json`` (see the module docstring).

    A malformed file is refused naming the entry (its index and image) and what
    is wrong; a type that is both positive and difficult is refused; positive
    types that occur nowhere in the file are logged (probably misspelt).
    """
    path = Path(path)
    positive, difficult, red = tuple(positive_types), tuple(difficult_types), tuple(red_cell_types)
    if not positive:
        raise InputError("no positive types given: name the annotation types a detection should find (e.g. ring, trophozoite)")
    both = sorted(set(positive) & set(difficult))
    if both:
        raise InputError(f"type(s) {both} are both positive and difficult; a difficult box is neither a hit nor a miss, so drop them from one list")
    entries = _load_list(path)
    fields: dict[str, FieldTruth] = {}
    for index, entry in enumerate(entries):
        truth = _field(entry, index, path, positive, difficult, red)
        if truth.name in fields:
            raise InputError(f"{path}: entry {index} annotates {truth.name!r} again; merge its objects into one entry per image")
        fields[truth.name] = truth
    seen = {o.kind for f in fields.values() for o in f.objects}
    if fields and not seen & set(positive):
        log.warning("%s: none of the positive types %s occurs; the types found are %s", path, list(positive), sorted(seen))
    return FieldAnnotations(str(path), fields, positive, difficult, red)


def _load_list(path: Path) -> list[Any]:
    """The file's top-level list, or an error naming the file and the fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"annotations file not found: {path}; pass --annotations PATH/annotations.json") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read annotations {path}: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"annotations {path} is not JSON ({exc}); it must be a list of {{image_name, objects}} entries") from None
    if not isinstance(data, list):
        raise InputError(f"annotations {path} must be a JSON list of {{image_name, objects}} entries, got a {type(data).__name__}")
    return data


def _field(entry: Any, index: int, path: Path, positive: tuple[str, ...], difficult: tuple[str, ...], red: tuple[str, ...]) -> FieldTruth:
    """One entry as a field's truth; a malformed entry names its index and image."""
    if not isinstance(entry, dict) or not isinstance(entry.get("image_name"), str) or not entry["image_name"]:
        raise InputError(f"{path}: entry {index} has no 'image_name' (a file name); each entry is {{image_name, objects: [...]}}")
    name = entry["image_name"]
    objects = entry.get("objects")
    if not isinstance(objects, list):
        raise InputError(f"{path}: entry {index} ({name!r}) has no 'objects' list; an image without objects has \"objects\": []")
    boxes = tuple(_object(o, f"{path}: entry {index} ({name!r}) object {k}") for k, o in enumerate(objects))
    pos = np.array([b.centre for b in boxes if b.kind in positive], np.float64).reshape(-1, 2)
    hard = np.array([b.centre for b in boxes if b.kind in difficult], np.float64).reshape(-1, 2)
    return FieldTruth(name, pos, hard, sum(b.kind in red for b in boxes), boxes)


def _object(item: Any, where: str) -> AnnotatedObject:
    """One object's type and box; numbers may be strings (as IML writes them)."""
    if not isinstance(item, dict) or not isinstance(item.get("type"), str) or not isinstance(item.get("bbox"), dict):
        raise InputError(f"{where} needs a 'type' (text) and a 'bbox' {{x, y, w, h}}, got {item!r}")
    try:
        x, y, w, h = (float(item["bbox"][k]) for k in ("x", "y", "w", "h"))
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{where}: bbox must hold numbers x, y, w, h, got {item['bbox']!r}") from None
    if not all(np.isfinite((x, y, w, h))) or w <= 0 or h <= 0:
        raise InputError(f"{where}: bbox {item['bbox']!r} needs finite x, y and positive w, h")
    return AnnotatedObject(item["type"], x, y, w, h)
