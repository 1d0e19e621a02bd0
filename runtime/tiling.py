"""Sliding crops: split images into tiles, predict them with any callable, merge.

The window logic knows nothing about the model (as MONAI's splitter/merger):
``predict`` is any function from a batch of (N, th, tw, 3) uint8 RGB tiles to
(N, C) class probabilities. That keeps the tiling testable with analytic fakes
and reusable with any backend.

One implementation, in three pieces that everything calls (training
validation, export verification, ``evaluate``, ``diagnose``, ``bench`` and the
Ray engine): the splitter :class:`ImageCrops` (image + policy → grid, crops,
foreground mask), the batcher :class:`TileBatcher` (fills model batches across
images, pads the last one), the merger :func:`merge` (aggregation → result and
tile map); :func:`sliding_window_many` composes them.

The policy (see :class:`edgedx.card.CropPolicy`): resample the image per the
policy's mode (``fit``, ``shorter_side`` or ``scale``); tiles start every ``stride`` pixels; the last tile of each row and
column is aligned to the far edge so every pixel is covered; an image smaller
than a tile is padded (bottom/right) by the policy's padding mode; tiles with
too little foreground are skipped; the used tiles' probabilities are merged by
the policy's aggregation (:func:`aggregate`).

:func:`sliding_window_many` fills each model batch with tiles from as many
images as it takes, so small images do not leave a GPU idle, and can pad the
last batch so the model always sees one shape. Tiles are produced lazily: an
in-memory image is resampled once and sliced; an :class:`ImageRegionSource`
(a huge tiled TIFF) is read region by region and never decoded whole.

Tiles move in blocks, not one by one: the splitter cuts a batch's worth of
windows with one gather from a strided view of the resampled image, and the
batcher hands each block's rows back in one call (per-tile Python was a third
of a field's overhead). With ``prepare`` (the model's per-pixel preprocessing,
see :func:`edgedx.runtime.preprocess.pixelwise`) an in-memory field whose crops
overlap is preprocessed once and the crops are cut from the result, bit for bit
what preprocessing each crop gives; ``predict`` then receives prepared batches.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from edgedx.card import CropPolicy
from edgedx.errors import ImageReadError
from edgedx.runtime.foreground import estimate_background, foreground_fraction
from edgedx.runtime.neighbours import with_neighbour_context

PredictFn = Callable[[np.ndarray], np.ndarray]
# per-pixel preprocessing: (..., h, w, 3) uint8 → (..., C, h, w) model input, the same numbers for a field and a crop
Prepare = Callable[[np.ndarray], np.ndarray]
Deliver = Callable[[np.ndarray, np.ndarray], None]  # (grid indices, their rows of probabilities)
_EPS = 1e-12
# a field whose prepared copy (float32) would be larger is prepared batch by batch instead: memory stays bounded
PREPARED_FIELD_BYTES = 64 << 20


@runtime_checkable
class ImageRegionSource(Protocol):
    """An image read region by region (a huge tiled TIFF), never decoded whole."""

    height: int
    width: int

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(h', w', 3) uint8 RGB region, clipped to the image."""
        ...


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
    """Where the tiles of one image lie, in the coordinates of the resampled image."""

    height: int  # of the resampled image
    width: int
    tile: tuple[int, int]
    row_starts: tuple[int, ...]
    col_starts: tuple[int, ...]
    source_size: tuple[int, int]  # (height, width) of the image before resampling

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) of the tile grid."""
        return len(self.row_starts), len(self.col_starts)

    @property
    def n_tiles(self) -> int:
        return len(self.row_starts) * len(self.col_starts)

    @property
    def factors(self) -> tuple[float, float]:
        """(y, x) resampling factors from the source image to the grid's image (they differ under ``fit``)."""
        return self.height / self.source_size[0], self.width / self.source_size[1]

    def positions(self) -> list[tuple[int, int]]:
        """Top-left (y, x) of every tile, row-major."""
        return [(y, x) for y in self.row_starts for x in self.col_starts]

    def starts(self) -> tuple[np.ndarray, np.ndarray]:
        """(ys, xs): the top-left corners of every tile as two arrays, row-major (as :meth:`positions`)."""
        rows, cols = np.asarray(self.row_starts, np.intp), np.asarray(self.col_starts, np.intp)
        return np.repeat(rows, len(cols)), np.tile(cols, len(rows))


def scaled_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """Image size after resampling by ``scale`` (at least one pixel)."""
    return max(1, round(height * scale)), max(1, round(width * scale))


def resampled_size(height: int, width: int, policy: CropPolicy) -> tuple[int, int]:
    """The size an image of ``height`` x ``width`` is resampled to before it is cut, per ``policy.mode``."""
    if policy.mode == "fit":
        return policy.tile_size
    if policy.mode == "shorter_side":
        side = int(policy.shorter_side)  # type: ignore[arg-type]  # the card guarantees it in this mode
        if height <= width:
            return side, max(1, round(width * side / height))
        return max(1, round(height * side / width)), side
    return scaled_size(height, width, policy.scale)


def plan_tiles(height: int, width: int, policy: CropPolicy) -> TileGrid:
    """The tile grid for an image of ``height`` x ``width`` (before resampling)."""
    sh, sw = resampled_size(height, width, policy)
    th, tw = policy.tile_size
    rows = axis_starts(sh, th, policy.stride[0])
    cols = axis_starts(sw, tw, policy.stride[1])
    return TileGrid(sh, sw, (th, tw), tuple(rows), tuple(cols), (height, width))


def _interpolation(source: tuple[int, int], target: tuple[int, int]) -> int:
    """Area averaging when shrinking in both axes; linear otherwise (area degenerates when enlarging)."""
    return cv2.INTER_AREA if target[0] <= source[0] and target[1] <= source[1] else cv2.INTER_LINEAR


def rescale(image: np.ndarray, policy: CropPolicy) -> np.ndarray:
    """Resample the image per the policy's mode, so objects have the size the model was trained on."""
    size = resampled_size(image.shape[0], image.shape[1], policy)
    if size == image.shape[:2]:
        return image
    resized = cv2.resize(image, (size[1], size[0]), interpolation=_interpolation(image.shape[:2], size))
    return resized[..., None] if resized.ndim == 2 else resized  # OpenCV drops a single channel axis


@dataclass(frozen=True)
class ResampledImage:
    """An image already resampled by :func:`rescale` for a policy, with the size it had before.

    Training resamples each image once and keeps only this (small) array; the
    splitter accepts it in place of the original and cuts exactly the same crops.
    """

    pixels: np.ndarray
    source_size: tuple[int, int]

    @classmethod
    def of(cls, image: np.ndarray, policy: CropPolicy) -> ResampledImage:
        return cls(rescale(image, policy), (int(image.shape[0]), int(image.shape[1])))


def _pad(window: np.ndarray, th: int, tw: int, policy: CropPolicy) -> np.ndarray:
    """Pad a window smaller than the tile at the bottom/right per the policy's padding mode."""
    dh, dw = th - window.shape[0], tw - window.shape[1]
    if dh == 0 and dw == 0:
        return window
    widths = ((0, dh), (0, dw), (0, 0))
    if policy.padding == "constant":
        return np.pad(window, widths, mode="constant", constant_values=policy.pad_value)
    # "symmetric" mirrors including the edge pixel and, unlike "reflect", works for 1-pixel images
    return np.pad(window, widths, mode="symmetric" if policy.padding == "reflect" else "edge")


def random_tile(image: ResampledImage, policy: CropPolicy, rng: np.random.Generator) -> np.ndarray:
    """One training crop drawn by the deployment rule: a tile-sized window of the resampled image at a random
    position (the whole image under ``fit``), padded like the splitter pads."""
    th, tw = policy.tile_size
    scaled = image.pixels
    y = int(rng.integers(0, max(0, scaled.shape[0] - th) + 1))
    x = int(rng.integers(0, max(0, scaled.shape[1] - tw) + 1))
    return _pad(scaled[y : y + th, x : x + tw], th, tw, policy)


ImageInput = np.ndarray | ResampledImage | ImageRegionSource


class _TileReader:
    """Cuts the tiles of one image: windows of the resampled array, or regions of a lazy source.

    An in-memory image is cut with one gather per block from a strided view of
    it (padded first when it is smaller than a tile: the only case with
    padding, and padding the image pads each tile the same). With ``prepare``
    and overlapping crops the field is preprocessed once (:data:`PREPARED_FIELD_BYTES`
    at most) and the model's tiles are cut from that.
    """

    def __init__(self, image: ImageInput, policy: CropPolicy, prepare: Prepare | None = None) -> None:
        self.policy = policy
        self.prepare = prepare
        self._source: ImageRegionSource | None = None
        if isinstance(image, ResampledImage):
            self.grid = plan_tiles(*image.source_size, policy)
            if image.pixels.shape[:2] != (self.grid.height, self.grid.width):
                raise ValueError(f"resampled image is {image.pixels.shape[:2]}, the policy makes {(self.grid.height, self.grid.width)}")
            self._scaled: np.ndarray | None = image.pixels
        elif isinstance(image, np.ndarray):
            if image.ndim != 3:
                raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
            self.grid = plan_tiles(image.shape[0], image.shape[1], policy)
            _check_resampled_size(self.grid, policy)
            self._scaled = rescale(image, policy)
        else:
            self.grid = plan_tiles(image.height, image.width, policy)
            self._scaled = None
            self._source = image
        # the image's own glass colour; a lazily read image uses the fixed rule instead
        self.background = estimate_background(self._scaled) if policy.min_foreground > 0 and self._scaled is not None else None
        self._windows: np.ndarray | None = None  # (rows, cols, th, tw, C) view: the window at every pixel
        self._prepared: np.ndarray | None = None  # (rows, cols, C', th, tw) view of the field prepared once
        if self._scaled is not None:
            (th, tw), grid = self.grid.tile, self.grid
            whole = _pad(self._scaled, max(th, grid.height), max(tw, grid.width), policy)  # the same array unless smaller than a tile
            self._windows = sliding_window_view(whole, (th, tw), axis=(0, 1)).transpose(0, 1, 3, 4, 2)
            if prepare is not None and _prepare_whole(grid, policy):
                self._prepared = np.moveaxis(sliding_window_view(prepare(whole), (th, tw), axis=(1, 2)), 0, 2)

    def tile(self, y: int, x: int) -> np.ndarray:
        """One (th, tw, C) tile, padded as the policy says."""
        if self._windows is not None:
            return self._windows[y, x]
        th, tw = self.grid.tile
        window = self._region(y, x, min(th, self.grid.height - y), min(tw, self.grid.width - x))
        return _pad(window, th, tw, self.policy)

    def tiles(self, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
        """(n, th, tw, C) uint8 tiles at (ys, xs): one gather in memory, region by region from a lazy source."""
        if self._windows is not None:
            return self._windows[ys, xs]
        if not len(ys):
            return np.zeros((0, *self.grid.tile, 3), np.uint8)
        return np.stack([self.tile(int(y), int(x)) for y, x in zip(ys, xs)])

    def model_tiles(self, ys: np.ndarray, xs: np.ndarray, raw: np.ndarray | None = None) -> np.ndarray:
        """What ``predict`` takes for these tiles: cut from the prepared field, or the raw tiles (``raw`` if already
        cut), prepared now when there is a ``prepare``."""
        if self._prepared is not None:
            return self._prepared[ys, xs]
        raw = self.tiles(ys, xs) if raw is None else raw
        return raw if self.prepare is None else self.prepare(raw)

    def _region(self, y: int, x: int, vh: int, vw: int) -> np.ndarray:
        """The source pixels behind scaled window (y, x, vh, vw), resampled to exactly (vh, vw)."""
        source = self._source
        assert source is not None
        fy, fx = self.grid.factors
        if fy == 1.0 and fx == 1.0:
            return source.read(y, x, vh, vw)
        y0, x0 = int(math.floor(y / fy)), int(math.floor(x / fx))
        y1 = min(source.height, max(y0 + 1, int(math.ceil((y + vh) / fy))))
        x1 = min(source.width, max(x0 + 1, int(math.ceil((x + vw) / fx))))
        region = source.read(y0, x0, y1 - y0, x1 - x0)
        resized = cv2.resize(region, (vw, vh), interpolation=_interpolation(self.grid.source_size, (self.grid.height, self.grid.width)))
        return resized[..., None] if resized.ndim == 2 else resized


def _check_resampled_size(grid: TileGrid, policy: CropPolicy) -> None:
    """An in-memory image is resampled whole: refuse a size that cannot be allocated before trying."""
    from edgedx.runtime.io.image_io import default_max_pixels

    limit = default_max_pixels()
    if grid.height * grid.width > limit:
        (h, w) = grid.source_size
        raise ImageReadError(
            f"resampling this {w}×{h} image by the crop policy ({policy.describe()}) would make it {grid.width}×{grid.height} = "
            f"{grid.width * grid.height / 1e6:.0f} megapixels, over the limit of {limit / 1e6:.0f}; lower --scale"
        )


def _prepare_whole(grid: TileGrid, policy: CropPolicy) -> bool:
    """Preprocess the field once only where crops overlap (else each pixel is prepared once either way) and the
    prepared copy stays within :data:`PREPARED_FIELD_BYTES`."""
    overlapping = policy.stride[0] < grid.tile[0] or policy.stride[1] < grid.tile[1]
    return overlapping and max(grid.height, grid.tile[0]) * max(grid.width, grid.tile[1]) * 3 * 4 <= PREPARED_FIELD_BYTES


def content_fraction(layout: CropLayout) -> float:
    """Share of the predicted crops' pixels that are image, not padding (1.0 when every crop lies inside the image)."""
    grid = layout.grid
    th, tw = grid.tile
    ys, xs = grid.starts()
    used = np.asarray(layout.used, bool)
    inside = np.minimum(th, grid.height - ys[used]) * np.minimum(tw, grid.width - xs[used])
    return float(inside.sum()) / (len(inside) * th * tw) if len(inside) else 0.0


class ImageCrops:
    """The splitter: one image + a crop policy → its grid and the crops to predict, lazily.

    :meth:`blocks` yields ``(grid indices, tiles)`` for the tiles with enough
    foreground (all of them when the policy does not filter), a block at a
    time. If no tile has enough, every tile is yielded after all (judging on
    every crop beats not judging at all) and ``fallback`` is set. ``used`` and
    ``foreground`` are complete once the iteration ends. With ``prepare`` the
    tiles are the model's prepared input (see :class:`_TileReader`), else RGB
    uint8 (n, th, tw, 3).
    """

    def __init__(self, image: ImageInput, policy: CropPolicy, prepare: Prepare | None = None) -> None:
        self.policy = policy
        self._reader = _TileReader(image, policy, prepare)
        self.grid = self._reader.grid
        self.used = np.zeros(self.grid.n_tiles, bool)
        self.foreground = np.ones(self.grid.n_tiles)
        self.fallback = False

    def blocks(self, size: int | Callable[[], int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(grid indices, tiles)`` in row-major order, at most ``size`` tiles per block (a callable: asked before each
        block, so a batcher can have blocks that fill exactly the room left in its batch)."""
        grid, policy, reader = self.grid, self.policy, self._reader
        ys, xs = grid.starts()
        # judged on the image's own pixels, never on edge padding: only an image smaller than a tile is padded
        vh, vw = min(grid.tile[0], grid.height), min(grid.tile[1], grid.width)
        for index in _ranges(grid.n_tiles, size):
            raw = None
            if policy.min_foreground > 0:
                raw = reader.tiles(ys[index], xs[index])
                self.foreground[index] = foreground_fraction(raw[:, :vh, :vw], reader.background)
                keep = self.foreground[index] >= policy.min_foreground
                index, raw = index[keep], raw[keep]
                if not len(index):
                    continue
            self.used[index] = True
            yield index, reader.model_tiles(ys[index], xs[index], raw)
        if not self.used.any():
            self.fallback = True
            self.used[:] = True
            for index in _ranges(grid.n_tiles, size):
                yield index, reader.model_tiles(ys[index], xs[index])

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(grid index, tile)`` one at a time (the blocks of :meth:`blocks`, unpacked)."""
        for index, tiles in self.blocks(256):
            yield from zip(index.tolist(), tiles)

    def layout(self) -> CropLayout:
        """The splitter's decisions, once the crops have been iterated."""
        return CropLayout(self.grid, self.used, self.foreground, self.fallback)


def _ranges(n: int, size: int | Callable[[], int]) -> Iterator[np.ndarray]:
    """``arange(n)`` in consecutive pieces of ``size`` (or ``size()``, asked before each piece) elements."""
    start = 0
    while start < n:
        step = max(1, size() if callable(size) else size)
        yield np.arange(start, min(n, start + step))
        start += step


def split_tiles(image: ImageInput, policy: CropPolicy) -> tuple[np.ndarray, ImageCrops]:
    """All crops of one image to predict, stacked in grid order (tile ``k`` is at ``flatnonzero(used)[k]``)."""
    crops = ImageCrops(image, policy)
    th, tw = policy.tile_size
    tiles = [block for _, block in crops.blocks(256)]
    return (np.concatenate(tiles) if tiles else np.zeros((0, th, tw, 3), np.uint8)), crops


def iter_tile_batches(scaled: np.ndarray, grid: TileGrid, policy: CropPolicy, batch_size: int) -> Iterator[np.ndarray]:
    """Yield (n, th, tw, C) uint8 batches of the tiles of an already-resampled image, in row-major order."""
    th, tw = grid.tile
    positions = grid.positions()
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        yield np.stack([_pad(scaled[y : y + th, x : x + tw], th, tw, policy) for y, x in chunk])


class TileBatcher:
    """The batcher: fills model batches with tiles from any number of images and hands each row back.

    ``add`` queues a block of tiles for an owner, split across batches where it
    does not fit; a full batch runs at once, ``flush`` runs a short one. With
    ``pad_batches`` a short batch is padded with blank tiles to ``batch_size``
    (GPU engines then never see a new shape): the one place where batches are padded.
    """

    def __init__(self, predict: PredictFn, batch_size: int, *, pad_batches: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.predict = predict
        self.batch_size = batch_size
        self.pad_batches = pad_batches
        self._pending: list[tuple[Deliver, np.ndarray, np.ndarray]] = []
        self._count = 0

    def __len__(self) -> int:
        """Tiles queued for the next batch."""
        return self._count

    @property
    def room(self) -> int:
        """Tiles the next batch still takes: a block of this size is predicted without being copied again."""
        return self.batch_size - self._count

    def add(self, deliver: Deliver, indices: np.ndarray, tiles: np.ndarray) -> None:
        """Queue ``tiles`` (``indices`` name them to their owner); ``deliver(indices, probabilities)`` is called for
        each part of the block, in order, as its batch runs."""
        start = 0
        while start < len(tiles):
            take = min(self.room, len(tiles) - start)
            self._pending.append((deliver, indices[start : start + take], tiles[start : start + take]))
            self._count += take
            start += take
            if self._count == self.batch_size:
                self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        parts = [t for _, _, t in self._pending]
        tiles = parts[0] if len(parts) == 1 else np.concatenate(parts)
        n = len(tiles)
        if self.pad_batches and n < self.batch_size:
            tiles = np.concatenate([tiles, np.zeros((self.batch_size - n, *tiles.shape[1:]), tiles.dtype)])
        out = np.asarray(self.predict(tiles))
        if out.ndim != 2 or out.shape[0] != len(tiles):
            raise ValueError(f"predict returned shape {out.shape} for {len(tiles)} tiles; expected {len(tiles)} rows of class probabilities")
        pending, self._pending, self._count = self._pending, [], 0
        at = 0
        for deliver, indices, _ in pending:
            deliver(indices, out[at : at + len(indices)])
            at += len(indices)

    def predict_all(self, tiles: np.ndarray) -> np.ndarray:
        """(N, th, tw, 3) tiles → (N, C) rows, ``batch_size`` per model call (padded like any batch)."""
        rows: list[np.ndarray] = []
        self.add(lambda _, block: rows.append(block), np.arange(len(tiles)), tiles)  # parts come back in order
        self.flush()
        return np.concatenate(rows) if rows else np.zeros((0, 0))


@dataclass(frozen=True)
class SlidingResult:
    """Merged probabilities plus the per-tile evidence behind them.

    ``tile_probabilities`` has one row per grid tile (row-major); rows of
    skipped (background) tiles are NaN. ``used`` marks the tiles that were
    predicted and merged; ``foreground`` is each tile's foreground fraction
    (all ones when the policy does not filter). With ``crop.neighbour_context``
    the ``tile_probabilities`` are the blended ones that were merged and
    ``own_tile_probabilities`` each crop's own (what a temperature or a
    crop-disagreement limit fitted on single crops speaks of).
    """

    probabilities: np.ndarray  # (C,)
    tile_probabilities: np.ndarray  # (n_tiles, C)
    grid: TileGrid
    used: np.ndarray | None = None  # (n_tiles,) bool
    foreground: np.ndarray | None = None  # (n_tiles,) float
    foreground_fallback: bool = False  # no tile reached min_foreground, so all were used
    content: float = 1.0  # share of the predicted crops' pixels that are image, not padding
    own_tile_probabilities: np.ndarray | None = None  # each crop's own answer where crop.neighbour_context blended them; else None

    @property
    def n_tiles(self) -> int:
        return self.grid.n_tiles

    @property
    def n_used(self) -> int:
        return self.n_tiles if self.used is None else int(self.used.sum())

    @property
    def n_skipped(self) -> int:
        return self.n_tiles - self.n_used

    def tile_map(self, class_index: int) -> np.ndarray:
        """(rows, cols) map of one class's tile probabilities (NaN where skipped): localisation for free."""
        return self.tile_probabilities[:, class_index].reshape(self.grid.shape)


def merge_mean(tile_probabilities: np.ndarray) -> np.ndarray:
    """The classic aggregation: the mean of class probabilities over all tiles."""
    return tile_probabilities.mean(axis=0)


def aggregate(
    tile_probabilities: np.ndarray,
    policy: CropPolicy,
    *,
    activation: str = "softmax",
    positive_index: int | None = None,
) -> np.ndarray:
    """Merge (n, C) tile probabilities into one (C,) vector per ``policy.aggregation``.

    ``mean_logits`` is computed from probabilities exactly: a softmax's log
    probabilities differ from its logits by a per-tile constant, and a sigmoid's
    logit is its input. For ``max``, ``top_k_mean`` and ``noisy_or`` a binary
    task (``positive_index`` given) aggregates the positive class and completes
    the pair; sigmoid outputs (multi-label) are aggregated per class; softmax
    multi-class results are renormalised to sum to 1.
    """
    p = np.asarray(tile_probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] == 0:
        raise ValueError(f"expected (n_tiles >= 1, C) probabilities, got shape {p.shape}")
    if activation not in ("softmax", "sigmoid"):
        raise ValueError(f"unknown activation {activation!r}; expected softmax or sigmoid")
    if positive_index is not None and not (p.shape[1] == 2 and positive_index in (0, 1)):
        raise ValueError(f"positive_index {positive_index!r} needs two-class probabilities, got {p.shape[1]} classes")
    how = policy.aggregation
    if how == "mean":
        return p.mean(axis=0)
    if how == "mean_logits":
        q = np.clip(p, _EPS, 1.0 - _EPS)
        if activation == "sigmoid":
            z = np.log(q) - np.log1p(-q)
            return 0.5 * (1.0 + np.tanh(0.5 * z.mean(axis=0)))
        z = np.log(q).mean(axis=0)
        e = np.exp(z - z.max())
        return e / e.sum()
    if positive_index is not None and p.shape[1] == 2:
        out = np.empty(2)
        out[positive_index] = _reduce(p[:, positive_index : positive_index + 1], how, policy.top_k)[0]
        out[1 - positive_index] = 1.0 - out[positive_index]
        return out
    merged = _reduce(p, how, policy.top_k)
    if activation == "softmax":
        total = merged.sum()
        return merged / total if total > 0 else np.full_like(merged, 1.0 / len(merged))
    return merged


def _reduce(p: np.ndarray, how: str, top_k: int) -> np.ndarray:
    if how == "max":
        return p.max(axis=0)
    if how == "top_k_mean":
        k = min(top_k, p.shape[0])
        return np.sort(p, axis=0)[-k:].mean(axis=0)
    if how == "noisy_or":
        return -np.expm1(np.log1p(-np.clip(p, 0.0, 1.0 - _EPS)).sum(axis=0))
    raise ValueError(f"unknown aggregation {how!r}")


@dataclass(frozen=True)
class CropLayout:
    """What the splitter decided for one image: its grid, which tiles were predicted, their foreground."""

    grid: TileGrid
    used: np.ndarray  # (n_tiles,) bool
    foreground: np.ndarray  # (n_tiles,) float
    fallback: bool  # no tile reached min_foreground, so all were used


def merge(
    layout: CropLayout,
    tile_probabilities: np.ndarray,
    policy: CropPolicy,
    *,
    activation: str = "softmax",
    positive_index: int | None = None,
) -> SlidingResult:
    """The merger: one image's (n_tiles, C) tile probabilities (NaN where skipped) → its :class:`SlidingResult`.

    With ``policy.neighbour_context`` the positive column is first blended with each crop's brightest grid
    neighbour (:mod:`edgedx.runtime.neighbours`); the result's ``tile_probabilities`` are the blended ones, so
    the merge, the detections and the heat map all read the same crops."""
    own = None
    if policy.neighbour_context:
        if positive_index is None:
            raise ValueError("crop.neighbour_context needs a binary model's positive_index")
        own = np.where(layout.used[:, None], tile_probabilities, np.nan)  # a skipped crop is nobody's neighbour
        tile_probabilities = with_neighbour_context(own, layout.grid.shape, policy.neighbour_context, positive_index)
    merged = aggregate(tile_probabilities[layout.used], policy, activation=activation, positive_index=positive_index)
    return SlidingResult(merged, tile_probabilities, layout.grid, layout.used, layout.foreground, layout.fallback, content_fraction(layout), own)


@dataclass
class _Pending:
    """One image in flight: its tiles are being predicted, possibly alongside other images' tiles."""

    key: Any
    crops: ImageCrops | None
    error: BaseException | None = None
    probs: np.ndarray | None = None
    outstanding: int = 0
    enqueued_all: bool = False
    started: float = field(default_factory=time.perf_counter)
    seconds: float = 0.0

    @property
    def done(self) -> bool:
        return self.error is not None or (self.enqueued_all and self.outstanding == 0)

    def receive(self, indices: np.ndarray, rows: np.ndarray) -> None:
        """Some tiles' probabilities, delivered by the batcher."""
        if self.probs is None:
            self.probs = np.full((self.crops.grid.n_tiles, rows.shape[1]), np.nan)  # type: ignore[union-attr]
        self.probs[indices] = rows
        self.outstanding -= len(indices)
        if self.done:
            self.seconds = time.perf_counter() - self.started


@dataclass(frozen=True)
class SlidingOutcome:
    """What :func:`sliding_window_many` yields per input, in input order."""

    key: Any
    result: SlidingResult | None
    error: BaseException | None
    seconds: float  # from the first tile cut to the last tile predicted


def sliding_window_many(
    items: Iterable[tuple[Hashable, ImageInput | BaseException]],
    predict: PredictFn,
    policy: CropPolicy,
    *,
    batch_size: int = 32,
    activation: str = "softmax",
    positive_index: int | None = None,
    pad_batches: bool = False,
    flush_each: bool = False,
    prepare: Prepare | None = None,
) -> Iterator[SlidingOutcome]:
    """Sliding crops over a stream of images: split → batch → merge, with model batches filled across images.

    ``items`` yields ``(key, image)``; an exception instead of an image (it could
    not be read) passes through as an outcome with ``error`` set. Results come
    out in input order as soon as an image's last tile is predicted. At most one
    batch of tiles is held at a time. ``pad_batches`` pads a short final batch
    with blank tiles so the model only ever sees ``batch_size`` (GPU engines then
    never re-tune for a new shape). ``flush_each`` runs the batch at the end of
    every image, for live sources (a hot folder, a camera) where the next image
    may be minutes away and a result must not wait for it. ``prepare``: the
    model's per-pixel preprocessing; ``predict`` then takes what it returns
    (fields preprocessed once, see :class:`ImageCrops`) instead of uint8 tiles.
    """
    batcher = TileBatcher(predict, batch_size, pad_batches=pad_batches)
    queue: deque[_Pending] = deque()

    def finished() -> Iterator[SlidingOutcome]:
        while queue and queue[0].done:
            state = queue.popleft()
            if state.error is not None or state.crops is None:
                yield SlidingOutcome(state.key, None, state.error, 0.0)
                continue
            assert state.probs is not None
            result = merge(state.crops.layout(), state.probs, policy, activation=activation, positive_index=positive_index)
            yield SlidingOutcome(state.key, result, None, state.seconds)

    for key, image in items:
        if isinstance(image, BaseException):
            queue.append(_Pending(key, None, error=image))
            yield from finished()
            continue
        try:
            crops = ImageCrops(image, policy, prepare)
        except ImageReadError as exc:  # e.g. a resampled size that cannot be allocated: this image only
            queue.append(_Pending(key, None, error=exc))
            yield from finished()
            continue
        state = _Pending(key, crops)
        queue.append(state)
        for indices, tiles in crops.blocks(lambda: batcher.room):  # blocks that fill the batch: no copy to join them
            state.outstanding += len(indices)
            batcher.add(state.receive, indices, tiles)
        state.enqueued_all = True
        if flush_each:
            batcher.flush()
        if state.done:
            state.seconds = time.perf_counter() - state.started
        yield from finished()
    batcher.flush()
    yield from finished()


def sliding_window_predict(
    image: ImageInput,
    predict: PredictFn,
    policy: CropPolicy,
    *,
    batch_size: int = 32,
    activation: str = "softmax",
    positive_index: int | None = None,
    pad_batches: bool = False,
    prepare: Prepare | None = None,
) -> SlidingResult:
    """Split one image (H, W, 3) per ``policy``, run ``predict`` on tile batches, merge."""
    [outcome] = sliding_window_many(
        [(0, image)], predict, policy, batch_size=batch_size, activation=activation,
        positive_index=positive_index, pad_batches=pad_batches, prepare=prepare,
    )
    assert outcome.result is not None
    return outcome.result


def centre_weights(tile: tuple[int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian importance of each pixel of a tile (MONAI's default sigma: 1/8 of the tile)."""
    axes = []
    for n in tile:
        c = (n - 1) / 2.0
        sigma = max(sigma_scale * n, 1e-3)
        axes.append(np.exp(-0.5 * ((np.arange(n) - c) / sigma) ** 2))
    w = np.outer(axes[0], axes[1])
    return np.maximum(w / w.max(), 1e-3)  # never exactly 0, so an edge covered by one tile still gets its value


def coverage_map(grid: TileGrid, values: np.ndarray, *, weighting: str = "none") -> np.ndarray:
    """Per-pixel (weighted) mean of the tile values covering each pixel of the scaled image.

    Used for heat-map overlays. NaN values (skipped tiles) contribute nothing;
    pixels covered by no used tile are NaN. ``weighting="gaussian"`` blends
    overlapping tiles with more weight at each tile's centre.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(values) != grid.n_tiles:
        raise ValueError(f"{len(values)} values for a grid of {grid.n_tiles} tiles")
    if weighting not in ("none", "gaussian"):
        raise ValueError(f"unknown weighting {weighting!r}; expected none or gaussian")
    total = np.zeros((grid.height, grid.width), np.float64)
    count = np.zeros((grid.height, grid.width), np.float64)
    th, tw = grid.tile
    w = centre_weights((th, tw)) if weighting == "gaussian" else np.ones((th, tw))
    for value, (y, x) in zip(values, grid.positions()):
        if not np.isfinite(value):
            continue
        vh, vw = min(th, grid.height - y), min(tw, grid.width - x)
        total[y : y + vh, x : x + vw] += value * w[:vh, :vw]
        count[y : y + vh, x : x + vw] += w[:vh, :vw]
    return np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)
