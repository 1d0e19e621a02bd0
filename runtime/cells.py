"""Counting red cells on a thin-smear field, and parasitaemia with its uncertainty.

Parasitaemia (parasites per 100 red cells) is what a clinic acts on, and it
needs the denominator: how many red cells the field holds. The cell model does
not give it (it judges crops, not cells), so the cells are counted here by a
classical, documented method that needs no training and no GPU:

1. **Stain-sensitive channel, at a fixed cell size.** Bright-field thin smears
   show red cells darker than the glass, most of all in green (haemoglobin and
   Giemsa absorb green). The green channel is resampled so an expected cell
   is :data:`WORK_DIAMETER` pixels across: the later steps then have fixed
   settings and cost the same on any field.
2. **Foreground.** Otsu's threshold splits cells from glass; a field without
   two grey levels (blank glass, a black frame) has no cells and says so. A
   small opening removes specks; holes (a red cell's pale centre) are filled.
3. **The field's own cell size.** The expected diameter is a prior (from the
   card, :func:`expected_cell_diameter`); the field's single cells (blobs
   round and compact: 0.70-0.86 of their bounding box, aspect within 20%) give
   the measured one (their median area), when there are at least 5. A wrong
   prior by ±30% then changes the count little.
4. **Circles.** Smear cells touch and overlap, so blobs are split with the
   Hough circle transform (edges voting for centres, radius 0.35-0.65 of a
   cell, centres at least 0.7 of a cell apart); a circle whose centre lies on
   glass is the gap between cells, not a cell, and is dropped. On the IML
   fields this beat distance-transform peaks and blob area over single-cell
   area (both merge the crowded clusters: see benchmarks/field_counting.py).

All work is OpenCV and numpy on whole arrays, no Python loop over pixels or
cells: about 10-20 ms for a 1280×960 field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edgedx.errors import InputError

RED_CELL_UM = 7.5  # the diameter of a normal human red cell, micrometres
WORK_DIAMETER = 32.0  # pixels per cell diameter the count runs at: the Hough settings below are for this size
MIN_CONTRAST = 12.0  # grey levels between Otsu's two classes below which the field holds no cells
MIN_SINGLE_CELLS = 5  # single cells needed to trust the field's own cell size over the prior
HOUGH_EDGE = 60  # Canny's upper threshold on the blurred green channel (grey levels)
HOUGH_VOTES = 15  # accumulator votes a circle of WORK_DIAMETER needs (about a third of its circumference)
HOUGH_RADII = (0.35, 0.65)  # of a cell diameter: circle radii searched
HOUGH_MIN_DIST = 0.7  # of a cell diameter: closer centres are one cell (overlapping cells are still two)
MAX_ENLARGEMENT = 4.0  # a field whose cells are tiny is enlarged at most this much (a count from blur is a guess)
METHOD = "hough-circles on otsu-green"


@dataclass(frozen=True)
class CellCount:
    """The red cells of one field: how many, by which method, at what cell size, and a note (the size's prior, why none)."""

    count: int | None  # None: not counted (``note`` says why)
    method: str
    diameter_px: float  # the cell diameter counted at (the field's own when measured): pixels of the image counted; a record's: the file's
    foreground: float  # share of the field that is cells
    note: str | None = None

    def to_record(self) -> dict[str, Any]:
        diameter = round(self.diameter_px, 1) if math.isfinite(self.diameter_px) else None
        record: dict[str, Any] = {"count": self.count, "method": self.method, "diameter_px": diameter, "foreground": round(self.foreground, 4)}
        if self.note:
            record["note"] = self.note
        return record


def expected_cell_diameter(tile_size: tuple[int, int], scale_factor: float = 1.0, trained_um_per_px: float | None = None) -> tuple[float, str]:
    """A red cell's diameter in pixels of the model's view (the resampled image the crops are cut from), and why.

    With the training images' physical scale (the card's ``um_per_px``) it is
    :data:`RED_CELL_UM` over that, times the crop policy's ``scale_factor``.
    Without one, the assumption is the cell model's: it was trained on crops
    that each hold one cell, resampled to the crop size, so a cell spans about
    one crop (the mean of its height and width). Divide by the grid's factors
    for pixels of the image as read.
    """
    if trained_um_per_px is not None and trained_um_per_px > 0:
        return RED_CELL_UM / trained_um_per_px * scale_factor, f"{RED_CELL_UM:g} µm at the card's {trained_um_per_px:g} µm/px"
    return (tile_size[0] + tile_size[1]) / 2.0, "one cell per training crop (the card's crop size)"


def count_red_cells(image_rgb: np.ndarray, cell_diameter_px: float) -> CellCount:
    """The red cells on an (H, W, 3) RGB (or (H, W) grey) uint8 field whose cells are about ``cell_diameter_px`` across
    (a prior: the field's own single cells correct it, see the module docstring)."""
    if not (cell_diameter_px > 2 and math.isfinite(cell_diameter_px)):
        raise InputError(f"expected red-cell diameter must be more than 2 pixels, got {cell_diameter_px!r}; pass the cells' size in this image")
    grey = _resample(_stain_channel(np.asarray(image_rgb)), WORK_DIAMETER / cell_diameter_px)
    mask, contrast = _cells_mask(grey)
    if mask is None:
        return CellCount(0, METHOD, cell_diameter_px, 0.0, f"no cells: the field has no contrast (Otsu classes {contrast:.0f} grey levels apart)")
    measured = _single_cell_diameter(mask)
    diameter = cell_diameter_px
    if measured is not None and abs(measured / WORK_DIAMETER - 1) > 0.1:  # re-run at the field's own cell size
        grey = _resample(grey, WORK_DIAMETER / measured)
        mask, _ = _cells_mask(grey)
        diameter = cell_diameter_px * measured / WORK_DIAMETER
    assert mask is not None  # the same pixels, resampled: still two grey levels
    count = _circles(grey, mask)
    return CellCount(count, METHOD, diameter, float(np.count_nonzero(mask)) / mask.size, None if count else "no cells found")


def _resample(grey: np.ndarray, factor: float) -> np.ndarray:
    """``grey`` resampled by ``factor`` (area averaging when shrinking), enlarged at most :data:`MAX_ENLARGEMENT`."""
    factor = min(factor, MAX_ENLARGEMENT)
    size = (max(1, round(grey.shape[1] * factor)), max(1, round(grey.shape[0] * factor)))
    if size == (grey.shape[1], grey.shape[0]):
        return grey
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)


def _stain_channel(image: np.ndarray) -> np.ndarray:
    """The green channel of an RGB field (a grey image as it is), uint8."""
    if image.ndim == 3 and image.shape[2] >= 3:
        channel = image[..., 1]
    elif image.ndim == 3 and image.shape[2] == 1:
        channel = image[..., 0]
    elif image.ndim == 2:
        channel = image
    else:
        raise InputError(f"count_red_cells needs an (H, W, 3) RGB or (H, W) grey image, got shape {image.shape}")
    return np.ascontiguousarray(channel, dtype=np.uint8)


def _cells_mask(grey: np.ndarray) -> tuple[np.ndarray | None, float]:
    """Cells (darker than glass) as a filled 0/255 mask at :data:`WORK_DIAMETER`, or None when the field has no two
    grey levels; and the gap between Otsu's class means."""
    blurred = cv2.GaussianBlur(grey, (3, 3), 0)
    _, mask = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    n_dark = cv2.countNonZero(mask)
    if 0 < n_dark < mask.size:  # one class empty: a flat field, no two grey levels
        contrast = cv2.mean(blurred, mask=cv2.bitwise_not(mask))[0] - cv2.mean(blurred, mask=mask)[0]
    else:
        contrast = 0.0
    if contrast < MIN_CONTRAST:
        return None, contrast
    k = max(1, int(round(WORK_DIAMETER / 8)))
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(mask)
    cv2.drawContours(filled, contours, -1, 255, thickness=cv2.FILLED)
    return filled, contrast


def _single_cell_diameter(mask: np.ndarray) -> float | None:
    """The median diameter (pixels) of the blobs that look like one cell, or None when fewer than
    :data:`MIN_SINGLE_CELLS` do: a disc fills π/4 of its bounding box and is as wide as it is tall."""
    _, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    w, h, area = (stats[1:, i].astype(np.float64) for i in (cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT, cv2.CC_STAT_AREA))
    expected = math.pi * WORK_DIAMETER**2 / 4
    fill = area / np.maximum(w * h, 1)
    single = (area > 0.3 * expected) & (area < 3 * expected) & (fill > 0.70) & (fill < 0.86) & (np.abs(np.log(w / np.maximum(h, 1))) < 0.2)
    if np.count_nonzero(single) < MIN_SINGLE_CELLS:
        return None
    return 2 * math.sqrt(float(np.median(area[single])) / math.pi)


def _circles(grey: np.ndarray, mask: np.ndarray) -> int:
    """Hough circles of a cell's size whose centre lies on a cell (not on the glass between cells)."""
    blurred = cv2.GaussianBlur(grey, (5, 5), 0)
    found = cv2.HoughCircles(
        blurred, cv2.HOUGH_GRADIENT, dp=1, minDist=HOUGH_MIN_DIST * WORK_DIAMETER, param1=HOUGH_EDGE, param2=HOUGH_VOTES,
        minRadius=int(HOUGH_RADII[0] * WORK_DIAMETER), maxRadius=int(math.ceil(HOUGH_RADII[1] * WORK_DIAMETER)),
    )
    if found is None:
        return 0
    x = np.clip(np.rint(found[0, :, 0]).astype(np.intp), 0, mask.shape[1] - 1)
    y = np.clip(np.rint(found[0, :, 1]).astype(np.intp), 0, mask.shape[0] - 1)
    return int(np.count_nonzero(mask[y, x]))


def parasitaemia(n_parasites: int, n_cells: int, *, z: float = 1.959963984540054) -> dict[str, Any]:
    """Parasites per 100 red cells with its Wilson 95% interval (a proportion near 0 needs Wilson, not p ± 1.96·se).

    No cells: ``percent`` and ``ci95`` are None and ``note`` says why (there is no denominator, not a 0%).
    """
    if n_parasites < 0 or n_cells < 0:
        raise InputError(f"parasitaemia needs counts of at least 0, got {n_parasites} parasites and {n_cells} cells")
    record: dict[str, Any] = {"percent": None, "ci95": None, "n_parasites": int(n_parasites), "n_cells": int(n_cells)}
    if n_cells == 0:
        record["note"] = "no red cells counted: parasitaemia is undefined on this field"
        return record
    p = min(1.0, n_parasites / n_cells)
    denom = 1 + z * z / n_cells
    centre = (p + z * z / (2 * n_cells)) / denom
    half = z * math.sqrt(p * (1 - p) / n_cells + z * z / (4 * n_cells * n_cells)) / denom
    record["percent"] = round(100 * p, 4)
    record["ci95"] = [round(100 * max(0.0, centre - half), 4), round(100 * min(1.0, centre + half), 4)]
    if n_parasites > n_cells:
        record["note"] = f"more parasites ({n_parasites}) than red cells counted ({n_cells}): check the count"
    return record
