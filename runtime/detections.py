"""Counting the positive class on a whole field: one box per object, from overlapping sliding crops.

A cell classifier run over a field in overlapping crops (stride < tile) sees
one parasite in several crops, each with a high p(parasitized). Counting the
crops above the threshold would count that parasite four or nine times. So a
crop becomes a candidate only where it is a local maximum of the tile map
among its 8 grid neighbours, and candidates whose boxes still overlap (a
parasite between two maxima, ties) are merged by greedy non-maximum
suppression, highest score first: one object, one detection.

Boxes are in the coordinates of the image as it was read (the grid's
resampling factors undone), so a person can find each one on the original
field. Numpy only: this runs on every field, after the model, and costs a
millisecond for a thousand crops.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgedx.card import CropPolicy, ModelCard
from edgedx.errors import InputError
from edgedx.runtime.cells import CellCount, count_red_cells, expected_cell_diameter, parasitaemia
from edgedx.runtime.tiling import ImageRegionSource, ResampledImage, SlidingResult, TileGrid

# the 8 neighbours of a grid cell, as (row, column) offsets
_NEIGHBOURS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


@dataclass(frozen=True)
class DetectedBox:
    """One detection: a box in original image pixels (x, y from the top-left; w, h) and its crop's probability."""

    x: int
    y: int
    w: int
    h: int
    score: float

    @property
    def box(self) -> tuple[int, int, int, int]:
        return self.x, self.y, self.w, self.h

    def to_record(self) -> dict[str, Any]:
        """The record's form: ``{"box": [x, y, w, h], "score": p}``."""
        return {"box": [self.x, self.y, self.w, self.h], "score": round(self.score, 6)}


def local_maxima(values: np.ndarray) -> np.ndarray:
    """(rows, cols) bool: cells at least as high as each of their 8 neighbours (NaN never is, and never beats one).

    A plateau of equal neighbours keeps the cell that comes first in row-major
    order against each neighbour it ties with, so two tied crops of one object
    give one candidate, not two.
    """
    v = np.where(np.isfinite(values), values, -np.inf)
    rows, cols = v.shape
    padded = np.pad(v, 1, constant_values=-np.inf)
    keep = np.isfinite(v)
    for dy, dx in _NEIGHBOURS:
        other = padded[1 + dy : 1 + dy + rows, 1 + dx : 1 + dx + cols]
        earlier = dy < 0 or (dy == 0 and dx < 0)  # the neighbour precedes this cell in row-major order
        keep &= (v > other) if earlier else (v >= other)
    return keep


def tile_boxes(grid: TileGrid, index: np.ndarray, image_factor: float = 1.0) -> np.ndarray:
    """(n, 4) float boxes x0, y0, x1, y1 of the tiles ``index`` (row-major), in original image pixels and clipped to
    the image: the tile's extent in the resampled image (its padded part dropped) divided by the grid's factors and by
    ``image_factor``, the physical resampling done before the grid (the record's ``scale.factor``; 1: none)."""
    ys, xs = grid.starts()
    ys, xs = ys[index].astype(np.float64), xs[index].astype(np.float64)
    th, tw = grid.tile
    fy, fx = (f * image_factor for f in grid.factors)
    sh, sw = (round(s / image_factor) for s in grid.source_size)
    y1 = np.minimum(ys + th, grid.height)
    x1 = np.minimum(xs + tw, grid.width)
    return np.stack([
        np.clip(xs / fx, 0, sw), np.clip(ys / fy, 0, sh), np.clip(x1 / fx, 0, sw), np.clip(y1 / fy, 0, sh),
    ], axis=1)


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Intersection over union of one x0, y0, x1, y1 box with each row of ``boxes``."""
    w = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = w * h
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def non_maximum_suppression(boxes: np.ndarray, scores: np.ndarray, max_iou: float) -> np.ndarray:
    """Indices of the boxes kept, highest score first: each box removes the lower-scored ones overlapping it by more
    than ``max_iou`` (one object seen by several crops is kept once). Equal scores keep the earlier box."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    kept: list[int] = []
    while len(order):
        best, order = order[0], order[1:]
        kept.append(int(best))
        if len(order):
            order = order[iou(boxes[best], boxes[order]) <= max_iou]
    return np.asarray(kept, np.intp)


def detect(sliding: SlidingResult, positive_index: int, threshold: float, nms_iou: float, *, image_factor: float = 1.0) -> list[DetectedBox]:
    """The objects of class ``positive_index`` on one field: used crops with p ≥ ``threshold`` that are local maxima
    of the tile map, as boxes in original image pixels, after non-maximum suppression at ``nms_iou``; highest first.

    Skipped crops (background) are never candidates and never suppress one. ``image_factor``: the physical
    resampling applied before the grid (see :func:`tile_boxes`).
    """
    if not (image_factor > 0 and math.isfinite(image_factor)):
        raise InputError(f"image_factor must be a positive number (the record's scale.factor), got {image_factor}")
    if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
        raise InputError(f"detection threshold must be within [0, 1], got {threshold}; use the card's threshold")
    if not 0.0 < nms_iou <= 1.0:
        raise InputError(f"detection nms_iou must be within (0, 1], got {nms_iou}; 0.3 merges the crops of one object")
    if not 0 <= positive_index < sliding.tile_probabilities.shape[1]:
        raise InputError(f"positive class index {positive_index} is not one of the {sliding.tile_probabilities.shape[1]} classes")
    p = sliding.tile_probabilities[:, positive_index].astype(np.float64)
    if sliding.used is not None:
        p = np.where(np.asarray(sliding.used, bool), p, np.nan)
    with np.errstate(invalid="ignore"):
        candidate = (local_maxima(p.reshape(sliding.grid.shape)).reshape(-1)) & (p >= threshold)
    index = np.flatnonzero(candidate)
    if not len(index):
        return []
    boxes = tile_boxes(sliding.grid, index, image_factor)
    scores = p[index]
    kept = non_maximum_suppression(boxes, scores, nms_iou)
    return [_as_box(boxes[k], float(scores[k])) for k in kept]


def field_candidates(sliding: SlidingResult, positive_index: int, nms_iou: float, *, image_factor: float = 1.0) -> list[DetectedBox]:
    """Every candidate of one field: :func:`detect` at threshold 0, highest score first.

    Why this serves any threshold: local maxima do not depend on the threshold,
    and non-maximum suppression removes a box only for a higher-scored one, so
    the detections at threshold ``t`` are exactly these candidates with score
    ≥ ``t``. A threshold sweep (FROC, fitting a field's operating point) then
    needs one model pass per field, not one per threshold.
    """
    return detect(sliding, positive_index, 0.0, nms_iou, image_factor=image_factor)


def positive_tile_p(sliding: SlidingResult, positive_index: int) -> np.ndarray:
    """The crops' p(positive class), NaN for the crops skipped as background (they never count in a field rule)."""
    tile_p = sliding.tile_probabilities[:, positive_index].astype(np.float64)
    if sliding.used is not None:
        tile_p = np.where(np.asarray(sliding.used, bool), tile_p, np.nan)
    return tile_p


def _as_box(xyxy: np.ndarray, score: float) -> DetectedBox:
    """Whole pixels that cover the box: floor of the start, ceiling of the end."""
    x0, y0 = int(math.floor(xyxy[0])), int(math.floor(xyxy[1]))
    return DetectedBox(x0, y0, int(math.ceil(xyxy[2])) - x0, int(math.ceil(xyxy[3])) - y0, score)


def field_decision(
    detections: Sequence[DetectedBox], tile_p: np.ndarray, rule: str, k: int, threshold: float, field_threshold: float | None = None,
    name: str = "positive",
) -> tuple[bool, str]:
    """Whether a field is positive by the card's field rule, and that in a sentence a microscopist reads without the card.

    ``any``: one detection; ``count_at_least``: ``k`` or more; ``top_k_mean``:
    the mean of the ``k`` highest used crop probabilities (``tile_p``, NaN for
    skipped crops) reaches ``field_threshold`` (default ``threshold``).
    """
    n = len(detections)
    found = f"{n} {name} candidate{'' if n == 1 else 's'} at p ≥ {threshold:.2f}"
    if rule == "any":
        positive = n >= 1
        return positive, f"{'positive' if positive else 'negative'} field: {found} (rule: at least 1)"
    if rule == "count_at_least":
        positive = n >= k
        return positive, f"{'positive' if positive else 'negative'} field: {found} (rule: at least {k})"
    if rule == "top_k_mean":
        cut = threshold if field_threshold is None else field_threshold
        p = np.sort(np.asarray(tile_p, np.float64)[np.isfinite(tile_p)])[::-1][:k]
        mean = float(p.mean()) if len(p) else float("nan")
        positive = bool(len(p)) and mean >= cut
        return positive, (
            f"{'positive' if positive else 'negative'} field: mean of the {len(p)} highest crops p = {mean:.3f} "
            f"{'≥' if positive else '<'} {cut:.2f}; {found} (rule: top-{k} mean)"
        )
    raise InputError(f"unknown field rule {rule!r}; use any, count_at_least or top_k_mean")


def fitted_rule_words(card: ModelCard) -> str:
    """The card's field rule and where it was fitted, for a record's ``decided_by``:
    "field rule: at least 2 parasitized candidates at p ≥ 0.99, fitted on 52 validation fields"."""
    settings, pos = card.detection, card.positive_index
    name = card.class_names[pos] if pos is not None else "positive"
    threshold = settings.tile_threshold if settings.tile_threshold is not None else card.threshold
    threshold = 0.5 if threshold is None else threshold
    if settings.field_rule == "top_k_mean":
        cut = settings.field_threshold if settings.field_threshold is not None else card.threshold
        what = f"mean of the {settings.field_k} highest crops' p({name}) ≥ {threshold if cut is None else cut:.4g}"
    else:
        k = 1 if settings.field_rule == "any" else settings.field_k
        what = f"at least {k} {name} candidate{'' if k == 1 else 's'} at p ≥ {threshold:.4g}"
    fitted = settings.fitted_on
    n, source = fitted.get("n_fields"), fitted.get("source", "annotated fields")
    return f"field rule: {what}, fitted on {f'{n} ' if n else ''}{source}"


def slide_decision(field_positive: Sequence[bool], rule: str, k: int) -> tuple[bool, str]:
    """A slide's decision from its fields' (:func:`field_decision`): ``any_field`` positive, or ``count_at_least``
    ``k`` positive fields; with the sentence that says so."""
    n, total = int(sum(bool(f) for f in field_positive)), len(field_positive)
    need = 1 if rule == "any_field" else k
    if rule not in ("any_field", "count_at_least"):
        raise InputError(f"unknown slide rule {rule!r}; use any_field or count_at_least")
    positive = n >= need
    return positive, f"{'positive' if positive else 'negative'} slide: {n} of {total} fields positive (rule: at least {need})"


@dataclass(frozen=True)
class FieldFindings:
    """What a detection-enabled card adds to one field's result: the detections, the field's decision by the card's
    rule, and (with ``count_cells``) the red cells and the parasitaemia."""

    detections: tuple[DetectedBox, ...]
    threshold: float  # the crop probability a detection needed
    field_positive: bool
    field_rule: str  # the field's decision in words
    cells: CellCount | None = None
    parasitaemia: dict[str, Any] | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)  # "detect", "count"

    def to_record(self) -> dict[str, Any]:
        """The record's detection fields (see the README's record section): only a detection-enabled card has them."""
        record: dict[str, Any] = {
            "n_detections": len(self.detections),
            "detections": [d.to_record() for d in self.detections],
            "detection_threshold": round(self.threshold, 6),
            "field_decision": {"positive": self.field_positive, "rule": self.field_rule},
        }
        if self.cells is not None:
            record["cells"] = self.cells.to_record()
            record["parasitaemia"] = self.parasitaemia
        return record


def find_on_field(card: ModelCard, policy: CropPolicy, sliding: SlidingResult, image: Any = None, *, image_factor: float = 1.0) -> FieldFindings:
    """The card's detection settings applied to one field's crops (and, for the cell count, its pixels: the array the
    splitter cut, as read or already resampled; a region-by-region source or None is not counted, and says so).
    ``image_factor``: the physical resampling before the grid, undone so boxes are in the file's pixels."""
    settings = card.detection
    pos = card.positive_index
    assert pos is not None  # the card refuses detection without a positive class
    threshold = card.threshold if settings.tile_threshold is None else settings.tile_threshold
    threshold = 0.5 if threshold is None else threshold
    started = time.perf_counter()
    found = tuple(detect(sliding, pos, threshold, settings.nms_iou, image_factor=image_factor))
    tile_p = positive_tile_p(sliding, pos)
    field_threshold = settings.field_threshold if settings.field_threshold is not None else card.threshold
    positive, rule = field_decision(found, tile_p, settings.field_rule, settings.field_k, threshold, field_threshold, card.class_names[pos])
    timings = {"detect": round((time.perf_counter() - started) * 1000, 2)}
    if not settings.count_cells:
        return FieldFindings(found, threshold, positive, rule, timings_ms=timings)
    started = time.perf_counter()
    cells = _count_cells(card, policy, sliding.grid, image, image_factor)
    timings["count"] = round((time.perf_counter() - started) * 1000, 2)
    rate = None if cells.count is None else parasitaemia(len(found), cells.count)
    return FieldFindings(found, threshold, positive, rule, cells, rate, timings)


def _count_cells(card: ModelCard, policy: CropPolicy, grid: TileGrid, image: Any, image_factor: float) -> CellCount:
    """Red cells of the image the crops were cut from, with the expected cell size in that image's pixels; the
    record's diameter is in the file's pixels either way."""
    scale = policy.scale if policy.mode == "scale" else 1.0
    model_d, why = expected_cell_diameter(policy.tile_size, scale, card.um_per_px if policy.mode == "scale" else None)
    to_model = math.sqrt(grid.factors[0] * grid.factors[1])  # the crop policy's resampling, as the grid saw it
    if isinstance(image, ResampledImage):  # already at the model's view
        pixels, diameter, to_file = image.pixels, model_d, 1 / (to_model * image_factor)
    elif isinstance(image, np.ndarray):  # as read (no physical factor then): undo the grid's resampling
        pixels, diameter, to_file = image, model_d / to_model, 1.0
    else:
        why_not = "read region by region (a whole slide): count cells on fields" if isinstance(image, ImageRegionSource) else "no pixels given"
        return CellCount(None, "none", float("nan"), 0.0, f"not counted: {why_not}")
    counted = count_red_cells(pixels, diameter)
    prior = f"prior {diameter * to_file:.0f} px: {why}"
    note = f"{prior}; {counted.note}" if counted.note else prior
    return CellCount(counted.count, counted.method, counted.diameter_px * to_file, counted.foreground, note)
