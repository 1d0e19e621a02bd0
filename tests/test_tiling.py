"""Sliding crops, checked with analytic fake models (no real model anywhere)."""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import pytest

from edgedx.card import CropPolicy, ModelCard, Provenance
from edgedx.errors import CardError
from edgedx.runtime.tiling import (
    SlidingResult,
    TileGrid,
    axis_starts,
    coverage_map,
    iter_tile_batches,
    merge_mean,
    plan_tiles,
    rescale,
    scaled_size,
    sliding_window_predict,
)

H, W = 237, 511  # odd sizes on purpose: nothing divides evenly


def make_card(tile: int | tuple[int, int] = 64, stride: int | tuple[int, int] = 32, **crop: Any) -> ModelCard:
    """A binary card whose crop policy is the one under test."""
    tile_size = (tile, tile) if isinstance(tile, int) else tile
    strides = (stride, stride) if isinstance(stride, int) else stride
    return ModelCard(
        arch="x",
        task="binary",
        class_names=("negative", "positive"),
        positive_class="positive",
        input_size=tile_size,
        crop=CropPolicy(tile_size=tile_size, stride=strides, **crop),
        provenance=Provenance(edgedx_version="0", created_at="2026-01-01T00:00:00+00:00"),
    )


def n_starts(length: int, tile: int, stride: int) -> int:
    """Closed form of the number of tiles along one axis."""
    return 1 if length <= tile else math.ceil((length - tile) / stride) + 1


def position_image(height: int, width: int) -> np.ndarray:
    """An RGB uint8 image whose pixel encodes its own (y, x) (valid up to 4096 x 4096)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([y % 256, x % 256, (y // 256) * 16 + x // 256], axis=-1).astype(np.uint8)


def decode_position(pixel: np.ndarray) -> tuple[int, int]:
    c0, c1, c2 = (int(v) for v in pixel)
    return c0 + 256 * (c2 // 16), c1 + 256 * (c2 % 16)


def reference_tiles(scaled: np.ndarray, grid: TileGrid, pad_value: int) -> np.ndarray:
    """The expected tiles, cut independently from a bottom/right padded copy of the image."""
    th, tw = grid.tile
    ph, pw = max(0, th - scaled.shape[0]), max(0, tw - scaled.shape[1])
    padded = np.pad(scaled, ((0, ph), (0, pw), (0, 0)), mode="constant", constant_values=pad_value)
    return np.stack([padded[y : y + th, x : x + tw] for y, x in grid.positions()])


class RecordingModel:
    """A fake ``predict``: records every batch and tile, answers the decoded top-left (y, x)."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.ndim == 4 and batch.shape[-1] == 3 and batch.dtype == np.uint8
        self.batches.append(batch.copy())
        return np.array([decode_position(tile[0, 0]) for tile in batch], dtype=np.float64)

    @property
    def tiles(self) -> np.ndarray:
        return np.concatenate(self.batches)


def mean_intensity_model(batch: np.ndarray) -> np.ndarray:
    """Probabilities [m, 1 - m] with m the tile's mean intensity / 255."""
    m = batch.reshape(len(batch), -1).astype(np.float64).mean(axis=1) / 255.0
    return np.stack([m, 1.0 - m], axis=1)


# -- axis_starts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "tile", "stride", "expected"),
    [
        (100, 32, 16, [0, 16, 32, 48, 64, 68]),
        (32, 32, 16, [0]),
        (10, 32, 16, [0]),
        (1, 32, 32, [0]),
        (96, 32, 32, [0, 32, 64]),  # stride == tile divides exactly: no extra flush tile
        (96, 32, 16, [0, 16, 32, 48, 64]),
        (97, 32, 32, [0, 32, 64, 65]),
        (33, 32, 1, [0, 1]),
        (40, 32, 8, [0, 8]),
        (41, 32, 8, [0, 8, 9]),
    ],
)
def test_axis_starts_hand_cases(length: int, tile: int, stride: int, expected: list[int]) -> None:
    assert axis_starts(length, tile, stride) == expected


def test_axis_starts_properties_match_closed_form() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        tile = int(rng.integers(1, 80))
        stride = int(rng.integers(1, tile + 1))
        length = int(rng.integers(1, 400))
        starts = axis_starts(length, tile, stride)
        assert len(starts) == n_starts(length, tile, stride), (length, tile, stride)
        assert starts[0] == 0
        assert starts[-1] == max(0, length - tile)  # flush with the far edge
        steps = np.diff(starts)
        assert np.all(steps > 0) and np.all(steps[:-1] == stride) and np.all(steps <= stride)


# -- plan_tiles ---------------------------------------------------------------------------


def test_plan_tiles_odd_image() -> None:
    image = np.zeros((H, W, 3), np.uint8)
    policy = make_card(64, 32).crop
    grid = plan_tiles(image.shape[0], image.shape[1], policy)
    assert (grid.height, grid.width) == (H, W)
    assert grid.shape == (n_starts(H, 64, 32), n_starts(W, 64, 32)) == (7, 15)
    assert grid.n_tiles == 105 == len(grid.positions())
    assert grid.row_starts[-1] == H - 64 and grid.col_starts[-1] == W - 64
    assert grid.row_starts[:3] == (0, 32, 64)
    assert grid.tile == (64, 64) and grid.factors == (1.0, 1.0)
    # row-major: x varies fastest
    positions = grid.positions()
    assert positions[:2] == [(0, 0), (0, 32)] and positions[15] == (32, 0) and positions[-1] == (H - 64, W - 64)


def test_plan_tiles_rectangular_tile_and_stride() -> None:
    grid = plan_tiles(H, W, make_card((40, 100), (20, 90)).crop)
    assert grid.shape == (n_starts(H, 40, 20), n_starts(W, 100, 90))
    assert grid.row_starts[-1] == H - 40 and grid.col_starts[-1] == W - 100
    assert grid.col_starts[:2] == (0, 90)


def test_plan_tiles_with_scale() -> None:
    policy = make_card(48, 24, scale=0.5).crop
    sh, sw = scaled_size(H, W, 0.5)
    assert sh in (118, 119) and sw in (255, 256)
    grid = plan_tiles(H, W, policy)
    assert (grid.height, grid.width) == (sh, sw)
    assert grid.shape == (n_starts(sh, 48, 24), n_starts(sw, 48, 24))
    assert grid.row_starts[-1] == sh - 48 and grid.col_starts[-1] == sw - 48
    assert grid.source_size == (H, W) and grid.factors == (sh / H, sw / W)
    # the resampled image has exactly the planned size
    scaled = rescale(np.zeros((H, W, 3), np.uint8), policy)
    assert scaled.shape == (sh, sw, 3)


@pytest.mark.parametrize("scale", [0.5, 0.37, 1.0, 1.5, 2.0])
def test_rescale_agrees_with_plan(scale: float) -> None:
    policy = make_card(16, 8, scale=scale).crop
    image = position_image(37, 53)
    scaled = rescale(image, policy)
    grid = plan_tiles(37, 53, policy)
    assert scaled.shape == (grid.height, grid.width, 3)
    assert scaled.dtype == np.uint8
    if scale == 1.0:
        assert scaled is image


def test_scaled_size_never_zero() -> None:
    assert scaled_size(3, 5, 0.01) == (1, 1)
    assert scaled_size(100, 50, 0.5) == (50, 25)


def test_plan_tiles_image_smaller_than_tile() -> None:
    grid = plan_tiles(20, 30, make_card(64, 32).crop)
    assert grid.n_tiles == 1 and grid.shape == (1, 1) and grid.positions() == [(0, 0)]
    assert (grid.height, grid.width) == (20, 30)
    grid = plan_tiles(20, 300, make_card(64, 32).crop)  # smaller in one axis only
    assert grid.shape == (1, n_starts(300, 64, 32))


# -- coverage -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "tile", "stride", "scale"),
    [
        (H, W, 64, 32, 1.0),
        (H, W, 48, 24, 0.5),
        (H, W, (40, 100), (40, 100), 1.0),  # stride == tile
        (H, W, (33, 17), (5, 17), 1.3),
        (20, 30, 64, 32, 1.0),
    ],
)
def test_every_pixel_is_covered(height: int, width: int, tile: Any, stride: Any, scale: float) -> None:
    grid = plan_tiles(height, width, make_card(tile, stride, scale=scale).crop)
    coverage = coverage_map(grid, np.ones(grid.n_tiles))
    assert coverage.shape == (grid.height, grid.width)
    assert np.all(coverage == 1.0)
    # independent count: no tile hangs outside the scaled image except through padding
    th, tw = grid.tile
    count = np.zeros((grid.height, grid.width), int)
    for y, x in grid.positions():
        assert 0 <= y and 0 <= x
        assert y + th <= grid.height or y == 0
        assert x + tw <= grid.width or x == 0
        count[y : y + th, x : x + tw] += 1
    assert count.min() >= 1


def test_coverage_map_is_the_mean_of_covering_tiles() -> None:
    # columns 0..11 and 8..19: pixels 8..11 are covered by both tiles
    grid = plan_tiles(10, 20, make_card((10, 12), (10, 8)).crop)
    assert grid.positions() == [(0, 0), (0, 8)]
    cmap = coverage_map(grid, np.array([1.0, 3.0]))
    assert np.all(cmap[:, :8] == 1.0)
    assert np.all(cmap[:, 8:12] == 2.0)
    assert np.all(cmap[:, 12:] == 3.0)


def test_stride_larger_than_tile_is_rejected_or_still_covers() -> None:
    try:
        policy = CropPolicy(tile_size=(32, 32), stride=(50, 50))
    except CardError:
        return
    grid = plan_tiles(100, 100, policy)
    assert np.all(coverage_map(grid, np.ones(grid.n_tiles)) == 1.0)


# -- exact tile content -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "tile", "stride", "scale", "pad_value"),
    [
        (H, W, 64, 32, 1.0, 0),
        (H, W, (40, 100), (25, 90), 1.0, 0),
        (300, 600, 64, 48, 1.0, 0),  # positions beyond 256 use the third channel
        (20, 30, 64, 32, 1.0, 7),  # smaller than the tile: padded bottom/right
        (20, 150, 32, 16, 1.0, 200),  # smaller in height only
    ],
)
def test_tiles_are_the_image_windows(
    height: int, width: int, tile: Any, stride: Any, scale: float, pad_value: int
) -> None:
    image = position_image(height, width)
    policy = make_card(tile, stride, scale=scale, pad_value=pad_value).crop
    model = RecordingModel()
    result = sliding_window_predict(image, model, policy, batch_size=7)
    grid = result.grid
    tiles = model.tiles
    th, tw = grid.tile
    assert tiles.shape == (grid.n_tiles, th, tw, 3)
    np.testing.assert_array_equal(tiles, reference_tiles(image, grid, pad_value))
    for tile_pixels, (y, x), answer in zip(tiles, grid.positions(), result.tile_probabilities):
        # every pixel inside the image decodes to its own position in the image
        vh, vw = min(th, height - y), min(tw, width - x)
        assert decode_position(tile_pixels[0, 0]) == (y, x)
        assert decode_position(tile_pixels[vh - 1, vw - 1]) == (y + vh - 1, x + vw - 1)
        assert np.all(tile_pixels[vh:] == pad_value) and np.all(tile_pixels[:, vw:] == pad_value)
        # the row of the result is the answer for this tile, in row-major order
        assert tuple(answer) == (y, x)


def test_tiles_of_a_scaled_image_are_windows_of_the_rescaled_image() -> None:
    image = np.random.default_rng(1).integers(0, 256, (H, W, 3), dtype=np.uint8)
    policy = make_card(48, 24, scale=0.5).crop
    model = RecordingModel()
    sliding_window_predict(image, model, policy, batch_size=16)
    sh, sw = scaled_size(H, W, 0.5)
    expected_scaled = cv2.resize(image, (sw, sh), interpolation=cv2.INTER_AREA)
    grid = plan_tiles(H, W, policy)
    np.testing.assert_array_equal(model.tiles, reference_tiles(expected_scaled, grid, 0))


def test_iter_tile_batches_is_lazy_and_ordered() -> None:
    image = position_image(100, 130)
    policy = make_card(32, 16, pad_value=9).crop
    grid = plan_tiles(100, 130, policy)
    batches = iter_tile_batches(image, grid, policy, 10)
    assert not isinstance(batches, (list, tuple))
    sizes = []
    collected = []
    for batch in batches:
        sizes.append(len(batch))
        collected.append(batch)
    assert sizes == [10] * (grid.n_tiles // 10) + ([grid.n_tiles % 10] if grid.n_tiles % 10 else [])
    np.testing.assert_array_equal(np.concatenate(collected), reference_tiles(image, grid, 9))


@pytest.mark.parametrize("shape", [(H, W), (20, 30), (64, 64)])
def test_batch_size_does_not_change_results(shape: tuple[int, int]) -> None:
    image = position_image(*shape)
    policy = make_card(64, 32).crop
    results = {}
    for batch_size in (1, 7, 1000):
        model = RecordingModel()
        results[batch_size] = (sliding_window_predict(image, model, policy, batch_size=batch_size), model)
        n = results[batch_size][0].n_tiles
        assert len(model.batches) == math.ceil(n / batch_size)
        assert all(len(b) <= batch_size for b in model.batches)
    ref, ref_model = results[1]
    for batch_size in (7, 1000):
        res, model = results[batch_size]
        np.testing.assert_array_equal(model.tiles, ref_model.tiles)
        np.testing.assert_array_equal(res.tile_probabilities, ref.tile_probabilities)
        np.testing.assert_array_equal(res.probabilities, ref.probabilities)
        assert res.grid == ref.grid


# -- merge ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "tile", "stride"), [(H, W, 64, 32), (20, 30, 64, 32), (H, W, 50, 45)])
def test_merged_probability_is_the_mean_over_tiles(height: int, width: int, tile: int, stride: int) -> None:
    image = np.random.default_rng(height + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    policy = make_card(tile, stride, pad_value=0).crop
    result = sliding_window_predict(image, mean_intensity_model, policy, batch_size=9)
    assert isinstance(result, SlidingResult)
    # independent computation: cut every window (zero padded) and average the means
    th, tw = tile, tile
    padded = np.zeros((max(height, th), max(width, tw), 3))
    padded[:height, :width] = image
    means = [
        padded[y : y + th, x : x + tw].mean() / 255.0
        for y in axis_starts(height, th, stride)
        for x in axis_starts(width, tw, stride)
    ]
    assert result.n_tiles == len(means)
    np.testing.assert_allclose(result.tile_probabilities[:, 0], means, rtol=0, atol=1e-12)
    expected = np.mean(means)
    np.testing.assert_allclose(result.probabilities, [expected, 1.0 - expected], rtol=0, atol=1e-12)
    assert result.probabilities.shape == (2,)
    assert abs(result.probabilities.sum() - 1.0) < 1e-12


def test_tile_map_is_row_major_over_the_grid() -> None:
    image = position_image(H, W)
    result = sliding_window_predict(image, RecordingModel(), make_card(64, 32).crop)
    grid = result.grid
    ys, xs = result.tile_map(0), result.tile_map(1)
    assert ys.shape == xs.shape == grid.shape == (7, 15)
    for r, y in enumerate(grid.row_starts):
        for c, x in enumerate(grid.col_starts):
            assert (ys[r, c], xs[r, c]) == (y, x)
    assert np.all(np.diff(ys, axis=0) > 0) and np.all(np.diff(xs, axis=1) > 0)


def test_tile_map_localises_a_bright_patch() -> None:
    image = np.zeros((128, 256, 3), np.uint8)
    image[64:, 192:] = 255  # bottom-right 64 x 64 block
    result = sliding_window_predict(image, mean_intensity_model, make_card(64, 64).crop)
    bright = result.tile_map(0)
    assert bright.shape == (2, 4)
    assert bright[1, 3] == 1.0
    assert np.count_nonzero(bright) == 1
    assert result.probabilities[0] == pytest.approx(1 / 8)


def test_merge_mean() -> None:
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [1.0, 0.0]])
    np.testing.assert_allclose(merge_mean(probs), [0.6, 0.4])
    np.testing.assert_array_equal(merge_mean(probs[:1]), probs[0])


# -- errors ---------------------------------------------------------------------------------


def test_predict_with_wrong_row_count_raises() -> None:
    image = np.zeros((100, 100, 3), np.uint8)
    policy = make_card(32, 16).crop

    def one_row_too_many(batch: np.ndarray) -> np.ndarray:
        return np.full((len(batch) + 1, 2), 0.5)

    def drops_a_row(batch: np.ndarray) -> np.ndarray:
        return np.full((max(0, len(batch) - 1), 2), 0.5)

    for predict in (one_row_too_many, drops_a_row):
        with pytest.raises(ValueError, match="rows"):
            sliding_window_predict(image, predict, policy, batch_size=8)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_below_one_raises(batch_size: int) -> None:
    calls = []
    with pytest.raises(ValueError, match="batch_size"):
        sliding_window_predict(np.zeros((64, 64, 3), np.uint8), calls.append, make_card(32, 16).crop, batch_size=batch_size)
    assert calls == []


@pytest.mark.parametrize("shape", [(64, 64), (1, 64, 64, 3), (64,)])
def test_non_3d_image_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="image"):
        sliding_window_predict(np.zeros(shape, np.uint8), mean_intensity_model, make_card(32, 16).crop)


# -- a field preprocessed once (runtime/preprocess.pixelwise) gives exactly the crops of per-crop preprocessing --


def _prepare_for(card: ModelCard):  # noqa: ANN202  (the Model's own rule, without a session)
    from edgedx.runtime.preprocess import preprocess_batch, preprocess_field

    return lambda pixels: preprocess_field(pixels, card) if pixels.ndim == 3 else preprocess_batch(pixels, card)


@pytest.mark.parametrize(
    ("shape", "crop"),
    [
        ((97, 131), {"stride": (24, 20)}),  # odd field, non-default stride, last tiles flush with the far edge
        ((97, 131), {"stride": (24, 20), "min_foreground": 0.3}),  # foreground filter: blocks with gaps
        ((20, 131), {"stride": (32, 12), "padding": "reflect"}),  # smaller than a tile in one axis: padded
        ((17, 23), {"stride": (16, 16), "padding": "constant", "pad_value": 7}),  # smaller in both
    ],
)
@pytest.mark.parametrize("colour_order", ["RGB", "BGR"])
def test_field_prepared_once_gives_the_crops_of_per_crop_preprocessing(shape: tuple[int, int], crop: dict, colour_order: str) -> None:
    """Why: diagnose normalises a field once and cuts its overlapping crops from it instead of normalising each crop
    (4x the work at stride half the tile); a result must not change by a bit, nor must the batches the model sees."""
    import dataclasses

    from edgedx.card import Normalization
    from edgedx.runtime.preprocess import pixelwise, preprocess_batch
    from edgedx.runtime.tiling import ImageCrops, split_tiles

    card = dataclasses.replace(
        make_card(32, **crop), colour_order=colour_order, normalization=Normalization(mean=(0.2, 0.5, 0.7), std=(0.3, 0.25, 0.2))
    )
    assert pixelwise(card, card.crop.tile_size)
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    image[: shape[0] // 2, : shape[1] // 3] = 235  # some pale background for the foreground filter
    raw, raw_crops = split_tiles(image, card.crop)
    expected = preprocess_batch(raw, card)
    crops = ImageCrops(image, card.crop, _prepare_for(card))
    blocks = list(crops.blocks(7))
    assert crops._reader._prepared is not None  # the whole-field path, not the per-batch one
    got = np.concatenate([tiles for _, tiles in blocks])
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    np.testing.assert_array_equal(np.concatenate([i for i, _ in blocks]), np.flatnonzero(raw_crops.used))
    np.testing.assert_array_equal(crops.used, raw_crops.used)
    np.testing.assert_array_equal(crops.foreground, raw_crops.foreground)

    seen: dict[str, list[np.ndarray]] = {"raw": [], "prepared": []}

    def model(kind: str):  # noqa: ANN202
        def predict(batch: np.ndarray) -> np.ndarray:
            x = preprocess_batch(batch, card) if kind == "raw" else batch
            seen[kind].append(x)
            p = x.reshape(len(x), -1).mean(axis=1, dtype=np.float64)
            p = 1.0 / (1.0 + np.exp(-p))
            return np.stack([1 - p, p], axis=1)

        return predict

    per_crop = sliding_window_predict(image, model("raw"), card.crop, batch_size=5, positive_index=1)
    once = sliding_window_predict(image, model("prepared"), card.crop, batch_size=5, positive_index=1, prepare=_prepare_for(card))
    assert len(seen["raw"]) == len(seen["prepared"])
    assert all(np.array_equal(a, b) for a, b in zip(seen["raw"], seen["prepared"]))  # the same batches, bit for bit
    np.testing.assert_array_equal(once.tile_probabilities, per_crop.tile_probabilities)
    np.testing.assert_array_equal(once.probabilities, per_crop.probabilities)


def test_large_or_non_overlapping_fields_are_prepared_batch_by_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prepared field costs 12 bytes a pixel: above the bound (and where crops do not overlap, when it saves nothing)
    each batch is prepared as it is cut; the numbers are the same either way."""
    from edgedx.runtime import tiling
    from edgedx.runtime.preprocess import preprocess_batch

    card = make_card(32, (24, 20))
    image = np.random.default_rng(2).integers(0, 256, (97, 131, 3), dtype=np.uint8)
    whole = np.concatenate([t for _, t in tiling.ImageCrops(image, card.crop, _prepare_for(card)).blocks(9)])
    monkeypatch.setattr(tiling, "PREPARED_FIELD_BYTES", 0)
    crops = tiling.ImageCrops(image, card.crop, _prepare_for(card))
    assert crops._reader._prepared is None
    batched = np.concatenate([t for _, t in crops.blocks(9)])
    assert np.array_equal(batched, whole)
    from edgedx.runtime.io.sources import ArraySource  # a lazily read image: region by region, prepared per batch

    lazy = np.concatenate([t for _, t in tiling.ImageCrops(ArraySource(image), card.crop, _prepare_for(card)).blocks(9)])
    assert np.array_equal(lazy, whole)
    flat = make_card(32, 32)
    assert tiling.ImageCrops(image, flat.crop, _prepare_for(flat))._reader._prepared is None
    assert np.array_equal(
        np.concatenate([t for _, t in tiling.ImageCrops(image, flat.crop, _prepare_for(flat)).blocks(4)]),
        preprocess_batch(tiling.split_tiles(image, flat.crop)[0], flat),
    )
