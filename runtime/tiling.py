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

from edgedx.card import CropPolicy
from edgedx.errors import ImageReadError
from edgedx.runtime.foreground import estimate_background, foreground_fraction

PredictFn = Callable[[np.ndarray], np.ndarray]
_EPS = 1e-12


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
    """Cuts the tiles of one image lazily: slices of the resampled array, or regions of a lazy source."""

    def __init__(self, image: ImageInput, policy: CropPolicy) -> None:
        self.policy = policy
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

    def tile(self, y: int, x: int) -> np.ndarray:
        th, tw = self.grid.tile
        if self._scaled is not None:
            window = self._scaled[y : y + th, x : x + tw]
        else:
            window = self._region(y, x, min(th, self.grid.height - y), min(tw, self.grid.width - x))
        return _pad(window, th, tw, self.policy)

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


def content_fraction(layout: CropLayout) -> float:
    """Share of the predicted crops' pixels that are image, not padding (1.0 when every crop lies inside the image)."""
    grid = layout.grid
    th, tw = grid.tile
    inside = [min(th, grid.height - y) * min(tw, grid.width - x) for k, (y, x) in enumerate(grid.positions()) if layout.used[k]]
    return float(sum(inside)) / (len(inside) * th * tw) if inside else 0.0


class ImageCrops:
    """The splitter: one image + a crop policy → its grid and the crops to predict, lazily.

    Iterating yields ``(grid index, tile)`` for every tile with enough
    foreground (all of them when the policy does not filter). If no tile has
    enough, every tile is yielded after all (judging on every crop beats not
    judging at all) and ``fallback`` is set. ``used`` and ``foreground`` are
    complete once the iteration ends.
    """

    def __init__(self, image: ImageInput, policy: CropPolicy) -> None:
        self.policy = policy
        self._reader = _TileReader(image, policy)
        self.grid = self._reader.grid
        self.used = np.zeros(self.grid.n_tiles, bool)
        self.foreground = np.ones(self.grid.n_tiles)
        self.fallback = False

    def __iter__(self) -> Iterator[tuple[int, np.ndarray]]:
        grid, policy, reader = self.grid, self.policy, self._reader
        for index, (y, x) in enumerate(grid.positions()):
            tile = reader.tile(y, x)
            if policy.min_foreground > 0:  # judged on the image's own pixels, never on edge padding
                vh, vw = min(tile.shape[0], grid.height - y), min(tile.shape[1], grid.width - x)
                self.foreground[index] = foreground_fraction(tile[None, :vh, :vw], reader.background)[0]
                if self.foreground[index] < policy.min_foreground:
                    continue
            self.used[index] = True
            yield index, tile
        if not self.used.any():
            self.fallback = True
            self.used[:] = True
            for index, (y, x) in enumerate(grid.positions()):
                yield index, reader.tile(y, x)

    def layout(self) -> CropLayout:
        """The splitter's decisions, once the crops have been iterated."""
        return CropLayout(self.grid, self.used, self.foreground, self.fallback)


def split_tiles(image: ImageInput, policy: CropPolicy) -> tuple[np.ndarray, ImageCrops]:
    """All crops of one image to predict, stacked in grid order (tile ``k`` is at ``flatnonzero(used)[k]``)."""
    crops = ImageCrops(image, policy)
    th, tw = policy.tile_size
    tiles = [tile for _, tile in crops]
    return (np.stack(tiles) if tiles else np.zeros((0, th, tw, 3), np.uint8)), crops


def iter_tile_batches(scaled: np.ndarray, grid: TileGrid, policy: CropPolicy, batch_size: int) -> Iterator[np.ndarray]:
    """Yield (n, th, tw, C) uint8 batches of the tiles of an already-resampled image, in row-major order."""
    th, tw = grid.tile
    positions = grid.positions()
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        yield np.stack([_pad(scaled[y : y + th, x : x + tw], th, tw, policy) for y, x in chunk])


class TileBatcher:
    """The batcher: fills model batches with tiles from any number of images and hands each row back.

    ``add`` queues one tile for an owner; a full batch runs at once, ``flush``
    runs a short one. With ``pad_batches`` a short batch is padded with blank
    tiles to ``batch_size`` (GPU engines then never see a new shape): the one
    place where batches are padded.
    """

    def __init__(self, predict: PredictFn, batch_size: int, *, pad_batches: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.predict = predict
        self.batch_size = batch_size
        self.pad_batches = pad_batches
        self._pending: list[tuple[Callable[[int, np.ndarray], None], int, np.ndarray]] = []

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, deliver: Callable[[int, np.ndarray], None], index: int, tile: np.ndarray) -> None:
        """Queue ``tile``; ``deliver(index, probabilities)`` is called when its batch has run."""
        self._pending.append((deliver, index, tile))
        if len(self._pending) == self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        tiles = np.stack([t for _, _, t in self._pending])
        n = len(tiles)
        if self.pad_batches and n < self.batch_size:
            tiles = np.concatenate([tiles, np.zeros((self.batch_size - n, *tiles.shape[1:]), tiles.dtype)])
        out = np.asarray(self.predict(tiles))
        if out.ndim != 2 or out.shape[0] != len(tiles):
            raise ValueError(f"predict returned shape {out.shape} for {len(tiles)} tiles; expected {len(tiles)} rows of class probabilities")
        pending, self._pending = self._pending, []
        for (deliver, index, _), row in zip(pending, out[:n]):
            deliver(index, row)

    def predict_all(self, tiles: np.ndarray) -> np.ndarray:
        """(N, th, tw, 3) tiles → (N, C) rows, ``batch_size`` per model call (padded like any batch)."""
        rows: list[np.ndarray | None] = [None] * len(tiles)

        def keep(index: int, row: np.ndarray) -> None:
            rows[index] = row

        for index, tile in enumerate(tiles):
            self.add(keep, index, tile)
        self.flush()
        return np.stack(rows) if len(tiles) else np.zeros((0, 0))  # type: ignore[arg-type]


@dataclass(frozen=True)
class SlidingResult:
    """Merged probabilities plus the per-tile evidence behind them.

    ``tile_probabilities`` has one row per grid tile (row-major); rows of
    skipped (background) tiles are NaN. ``used`` marks the tiles that were
    predicted and merged; ``foreground`` is each tile's foreground fraction
    (all ones when the policy does not filter).
    """

    probabilities: np.ndarray  # (C,)
    tile_probabilities: np.ndarray  # (n_tiles, C)
    grid: TileGrid
    used: np.ndarray | None = None  # (n_tiles,) bool
    foreground: np.ndarray | None = None  # (n_tiles,) float
    foreground_fallback: bool = False  # no tile reached min_foreground, so all were used
    content: float = 1.0  # share of the predicted crops' pixels that are image, not padding

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
    """The merger: one image's (n_tiles, C) tile probabilities (NaN where skipped) → its :class:`SlidingResult`."""
    merged = aggregate(tile_probabilities[layout.used], policy, activation=activation, positive_index=positive_index)
    return SlidingResult(merged, tile_probabilities, layout.grid, layout.used, layout.foreground, layout.fallback, content_fraction(layout))


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

    def receive(self, index: int, row: np.ndarray) -> None:
        """A tile's probabilities, delivered by the batcher."""
        if self.probs is None:
            self.probs = np.full((self.crops.grid.n_tiles, len(row)), np.nan)  # type: ignore[union-attr]
        self.probs[index] = row
        self.outstanding -= 1
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
) -> Iterator[SlidingOutcome]:
    """Sliding crops over a stream of images: split → batch → merge, with model batches filled across images.

    ``items`` yields ``(key, image)``; an exception instead of an image (it could
    not be read) passes through as an outcome with ``error`` set. Results come
    out in input order as soon as an image's last tile is predicted. At most one
    batch of tiles is held at a time. ``pad_batches`` pads a short final batch
    with blank tiles so the model only ever sees ``batch_size`` (GPU engines then
    never re-tune for a new shape). ``flush_each`` runs the batch at the end of
    every image, for live sources (a hot folder, a camera) where the next image
    may be minutes away and a result must not wait for it.
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
            crops = ImageCrops(image, policy)
        except ImageReadError as exc:  # e.g. a resampled size that cannot be allocated: this image only
            queue.append(_Pending(key, None, error=exc))
            yield from finished()
            continue
        state = _Pending(key, crops)
        queue.append(state)
        for index, tile in state.crops:  # type: ignore[union-attr]
            state.outstanding += 1
            batcher.add(state.receive, index, tile)
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
) -> SlidingResult:
    """Split one image (H, W, 3) per ``policy``, run ``predict`` on tile batches, merge."""
    [outcome] = sliding_window_many(
        [(0, image)], predict, policy, batch_size=batch_size, activation=activation,
        positive_index=positive_index, pad_batches=pad_batches,
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
