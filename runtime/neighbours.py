"""Neighbour context on the crop grid: each crop's positive-class probability blended with its brightest neighbour's.

Why: with overlapping crops (stride half the tile) one object lights the two to
four crops that hold it. A crop that cuts it at its edge sees only part of it
and scores low, although its neighbour sees it whole; a lone bright crop whose
neighbours see nothing is more often clutter (a platelet, stain debris) than a
parasite. The crop's own answer cannot tell these apart; its neighbours can.

``q = (1 − w)·p + w·max(p of the eight grid neighbours that were predicted)``;
a crop with no predicted neighbour (a one-crop image, an island among skipped
background crops) keeps its own ``p``, so ``mode: fit`` and single-cell
validation are unchanged. Skipped crops (NaN) stay NaN and never count as a
neighbour. ``w`` is the card's ``crop.neighbour_context``; 0 turns it off. It
stays below 0.5: two neighbouring crops a > b become (1 − w)·a + w·b and
(1 − w)·b + w·a, which swap order past 0.5, and a detection (a local maximum of
the map) would then sit on the crop beside the object's best one.

On the IML malaria fields (the 3-round mined model, ``benchmarks/neighbour_context.py``)
w = 0.45 was chosen on 60 training fields; on the 52 validation fields it lifted
the tile AUC from 0.965 to 0.990 and kept the detections (66 of 71 parasites at
one false detection per field, 67 without; 65 cross-fitted either way).
docs/integration.md §7.1 is the contract.
"""

from __future__ import annotations

import numpy as np

from edgedx.card import MAX_NEIGHBOUR_CONTEXT

OFFSETS = tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0))


def neighbour_max(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Per crop (row-major, NaN where skipped), the highest value among its eight grid neighbours that are not NaN;
    NaN where it has none."""
    rows, cols = shape
    grid = np.asarray(values, dtype=np.float64).reshape(rows, cols)
    padded = np.full((rows + 2, cols + 2), -np.inf)
    padded[1:-1, 1:-1] = np.where(np.isnan(grid), -np.inf, grid)
    best = np.full((rows, cols), -np.inf)
    for dy, dx in OFFSETS:
        np.maximum(best, padded[1 + dy : rows + 1 + dy, 1 + dx : cols + 1 + dx], out=best)
    return np.where(np.isfinite(best), best, np.nan).ravel()


def blend_neighbours(values: np.ndarray, shape: tuple[int, int], weight: float) -> np.ndarray:
    """``(1 − weight)·values + weight·neighbour_max`` per crop; a crop without a predicted neighbour keeps its value."""
    if not 0.0 <= weight < MAX_NEIGHBOUR_CONTEXT:
        raise ValueError(f"neighbour context weight must be within [0, {MAX_NEIGHBOUR_CONTEXT:g}), got {weight}")
    own = np.asarray(values, dtype=np.float64).ravel()
    if own.size != shape[0] * shape[1]:
        raise ValueError(f"{own.size} crop values do not fill a {shape[0]}×{shape[1]} grid")
    if weight == 0.0:
        return own.copy()
    best = neighbour_max(own, shape)
    best = np.where(np.isnan(best), own, best)
    return (1.0 - weight) * own + weight * best


def with_neighbour_context(tile_probabilities: np.ndarray, shape: tuple[int, int], weight: float, positive_index: int) -> np.ndarray:
    """A binary model's (n, 2) crop probabilities with the positive column blended (:func:`blend_neighbours`) and the
    other column its complement, as the reductions of :func:`edgedx.runtime.tiling.aggregate` complete a pair."""
    p = np.asarray(tile_probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 2 or positive_index not in (0, 1):
        raise ValueError(f"neighbour context needs a binary model's (n, 2) probabilities and its positive index, got {p.shape}, {positive_index!r}")
    out = p.copy()
    out[:, positive_index] = blend_neighbours(p[:, positive_index], shape, weight)
    out[:, 1 - positive_index] = 1.0 - out[:, positive_index]
    return out
