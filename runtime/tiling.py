"""Sliding crops: split an image into tiles, predict them with any callable, merge.

The window logic knows nothing about the model (as MONAI's splitter/merger):
``predict`` is any function from a batch of (N, th, tw, 3) uint8 RGB tiles to
(N, C) class probabilities. That keeps the tiling testable with analytic fakes
and reusable with any backend.

The classic policy (see :class:`edgedx.card.CropPolicy`): resample the image by
``scale``; tiles start every ``stride`` pixels; the last tile of each row and
column is aligned to the far edge so every pixel is covered; an image smaller
than a tile is zero-padded (bottom/right); probabilities are averaged over tiles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from edgedx.card import CropPolicy

PredictFn = Callable[[np.ndarray], np.ndarray]


def axis_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride``, the last one flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one image lie, in the coordinates of the scaled image."""

    height: int  # of the scaled image
    width: int
    tile: tuple[int, int]
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the tile grid."""
        return len(self.row_starts), len(self.col_starts)

    @property
    def n_tiles(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    def positions(self) -> list[tuple[int, int]]:
        """Top-left (y, x) of every tile, row-major."""
        return [(y, x) for y in self.row_starts for x in self.col_starts]


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Image size after resampling by ``scale`` (at least one pixel)."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def plan_tiles(height: int, width: int, policy: CropPolicy) -> TileGrid:
    """The tile grid for an image of ``height`` x ``width`` (before scaling)."""
    sh, sw = scaled_size(height, width, policy.scale)
    th, tw = policy.tile_size
    rows = axis_starts(sh, th, policy.stride[0])
    cols = axis_starts(sw, tw, policy.stride[1])
    return TileGrid(sh, sw, (th, tw), tuple(rows), tuple(cols), policy.scale)


def rescale(image: np.ndarray, policy: CropPolicy) -> np.ndarray:
    """Resample the image so objects have the size the model was trained on."""
    if policy.scale == 1.0:
        return image
    sh, sw = scaled_size(image.shape[0], image.shape[1], policy.scale)
    mode = cv2.INTER_AREA if policy.scale < 1.0 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (sw, sh), interpolation=mode)
    return resized[..., None] if resized.ndim == 2 else resized  # OpenCV drops a single channel axis


def iter_tile_batches(scaled: np.ndarray, grid: TileGrid, policy: CropPolicy, batch_size: int) -> Iterator[np.ndarray]:
    """Yield (n, th, tw, 3) uint8 batches of tiles, lazily, in row-major order."""
    th, tw = grid.tile
    positions = grid.positions()
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        batch = np.full((len(chunk), th, tw, scaled.shape[2]), policy.pad_value, dtype=scaled.dtype)
        for i, (y, x) in enumerate(chunk):
            window = scaled[y : y + th, x : x + tw]
            batch[i, : window.shape[0], : window.shape[1]] = window
        yield batch


@dataclass(frozen=True)
class SlidingResult:
    """Merged probabilities plus the per-tile evidence behind them."""

    probabilities: np.ndarray  # (C,)
    tile_probabilities: np.ndarray  # (n_tiles, C), row-major over grid
    grid: TileGrid

    @property
    def n_tiles(self) -> int:
        return self.grid.n_tiles

    def tile_map(self, class_index: int) -> np.ndarray:
        """(rows, cols) map of one class's tile probabilities: localisation for free."""
        return self.tile_probabilities[:, class_index].reshape(self.grid.shape)


def merge_mean(tile_probabilities: np.ndarray) -> np.ndarray:
    """The classic aggregation: the mean of class probabilities over all tiles."""
    return tile_probabilities.mean(axis=0)


def sliding_window_predict(
    image: np.ndarray, predict: PredictFn, policy: CropPolicy, *, batch_size: int = 32
) -> SlidingResult:
    """Split ``image`` (H, W, 3) per ``policy``, run ``predict`` on tile batches, merge."""
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    grid = plan_tiles(image.shape[0], image.shape[1], policy)
    scaled = rescale(image, policy)
    outputs = [np.asarray(predict(batch)) for batch in iter_tile_batches(scaled, grid, policy, batch_size)]
    tile_probs = np.concatenate(outputs, axis=0)
    if tile_probs.shape[0] != grid.n_tiles:
        raise ValueError(f"predict returned {tile_probs.shape[0]} rows for {grid.n_tiles} tiles")
    return SlidingResult(merge_mean(tile_probs), tile_probs, grid)


def coverage_map(grid: TileGrid, values: np.ndarray) -> np.ndarray:
    """Per-pixel mean of the tile values covering each pixel of the scaled image.

    Used for heat-map overlays; pixels covered by no tile (never, under the
    classic policy) are 0.
    """
    total = np.zeros((grid.height, grid.width), np.float64)
    count = np.zeros((grid.height, grid.width), np.float64)
    th, tw = grid.tile
    for value, (y, x) in zip(values, grid.positions()):
        total[y : y + th, x : x + tw] += value
        count[y : y + th, x : x + tw] += 1.0
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)
