"""Property-based checks (hypothesis) of the sliding-crop invariants in ``edgedx.runtime.tiling``.

test_tiling.py and test_runtime_full.py pin hand-picked cases; here image sizes (1..300 a side,
plus big odd sizes scaled down), tile sizes, strides, scales, padding modes, aggregations and batch
sizes are drawn at random, and every result is compared with an independent reference: tiles cut
by explicit index arithmetic from a ``cv2.resize`` of the image, answers from analytic numpy
"models" whose output the test can compute itself. Pixel data come from a drawn seed, so every
example is reproducible from hypothesis' report alone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import pytest

pytest.importorskip("hypothesis")

from hypothesis import given, settings
from hypothesis import strategies as st

from edgedx.card import CropPolicy
from edgedx.runtime.foreground import estimate_background, foreground_fraction
from edgedx.runtime.tiling import (
    SlidingResult,
    TileGrid,
    aggregate,
    axis_starts,
    coverage_map,
    iter_tile_batches,
    plan_tiles,
    rescale,
    scaled_size,
    sliding_window_many,
    sliding_window_predict,
)

# No example database: each run explores afresh (hypothesis still keeps a small cache in .hypothesis/).
PROPERTY = settings(max_examples=30, deadline=None, database=None)
HEAVY = settings(max_examples=25, deadline=None, database=None)  # several tiling runs or a reference cut per example
CHEAP = settings(max_examples=60, deadline=None, database=None)  # pure-numpy properties, no tiling

AGGREGATIONS = ("mean", "mean_logits", "max", "top_k_mean", "noisy_or")
PADDINGS = ("constant", "reflect", "replicate")
ODD_SIZES = ((237, 511), (511, 237), (1, 1), (1, 300), (300, 1), (2, 3), (63, 65))
TOL = {"rtol": 1e-9, "atol": 1e-9}


# -- strategies ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """An image size (before scaling) and the crop policy to cut it with."""

    height: int
    width: int
    policy: CropPolicy
    seed: int


@st.composite
def image_sizes(draw: st.DrawFn, max_side: int = 300) -> tuple[int, int, float]:
    """(height, width, scale): any size up to ``max_side`` a side at scale 0.1..2, or a big odd size scaled down."""
    if max_side >= 300 and draw(st.integers(0, 4)) == 0:
        h, w = draw(st.sampled_from(ODD_SIZES))
    else:
        h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    if max(h, w) > 300:  # keep the big odd images cheap: only scaled down
        scale = draw(st.one_of(st.sampled_from((0.5, 0.37, 0.25)), st.floats(0.1, 0.6)))
    else:
        scale = draw(st.one_of(st.just(1.0), st.sampled_from((0.5, 0.37, 1.5, 2.0)), st.floats(0.1, 2.0)))
    return h, w, scale


def draw_axis(draw: st.DrawFn, length: int, bounded: bool) -> tuple[int, int]:
    """(tile, stride) along one axis of ``length`` scaled pixels, stride <= tile.

    ``bounded`` keeps at most ~26 tiles per axis and the tiles' total pixels within ~4x the
    image, so a tiling run stays in milliseconds; unbounded draws any tile 1..128, stride 1..tile.
    """
    if not bounded:
        tile = draw(st.integers(1, 128))
        return tile, draw(st.integers(1, tile))
    low = max(1, math.ceil(length / 24))
    tile = draw(st.integers(low, low + 96))
    stride = draw(st.integers(max(1, math.ceil((length - tile) / 24), math.ceil(tile / 4)), tile))
    return tile, stride


@st.composite
def cases(
    draw: st.DrawFn, bounded: bool = True, max_side: int = 300, min_foreground: bool = False
) -> Case:
    """A random image size and a random valid crop policy for it."""
    h, w, scale = draw(image_sizes(max_side))
    sh, sw = scaled_size(h, w, scale)
    th, sy = draw_axis(draw, sh, bounded)
    tw, sx = draw_axis(draw, sw, bounded)
    policy = CropPolicy(
        tile_size=(th, tw),
        stride=(sy, sx),
        scale=scale,
        padding=draw(st.sampled_from(PADDINGS)),
        pad_value=draw(st.integers(0, 255)),
        aggregation=draw(st.sampled_from(AGGREGATIONS)),
        top_k=draw(st.integers(1, 6)),
        centre_weighting=draw(st.sampled_from(("none", "gaussian"))),
        min_foreground=draw(st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1.0))) if min_foreground else 0.0,
    )
    return Case(h, w, policy, draw(st.integers(0, 2**32 - 1)))


def noise_image(case: Case) -> np.ndarray:
    return np.random.default_rng(case.seed).integers(0, 256, (case.height, case.width, 3), dtype=np.uint8)


def slide_image(case: Case) -> np.ndarray:
    """A microscope-like field: uniform glass with a few stained rectangles (some images have none)."""
    rng = np.random.default_rng(case.seed)
    image = np.empty((case.height, case.width, 3), np.uint8)
    image[:] = rng.integers(170, 256, 3)
    for _ in range(int(rng.integers(0, 4))):
        y0, y1 = sorted(rng.integers(0, case.height + 1, 2))
        x0, x1 = sorted(rng.integers(0, case.width + 1, 2))
        image[y0:y1, x0:x1] = rng.integers(0, 256, 3)
    return image


# -- independent references ----------------------------------------------------------------------


def reference_scaled(image: np.ndarray, scale: float) -> np.ndarray:
    """The image resampled the documented way: INTER_AREA down, INTER_LINEAR up, to round(size * scale)."""
    if scale == 1.0:
        return image
    h, w = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    mode = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(image, (w, h), interpolation=mode).reshape(h, w, -1)


def source_index(start: int, tile: int, length: int, padding: str) -> np.ndarray:
    """Source index of each tile pixel along one axis; -1 where constant padding applies."""
    i = start + np.arange(tile)
    if padding == "replicate":
        return np.minimum(i, length - 1)
    if padding == "reflect":  # mirrored with the edge pixel repeated (numpy's "symmetric")
        k = i % (2 * length)
        return np.where(k < length, k, 2 * length - 1 - k)
    return np.where(i < length, i, -1)


def reference_tiles(scaled: np.ndarray, grid: TileGrid, policy: CropPolicy) -> np.ndarray:
    """(n_tiles, th, tw, 3) tiles cut by explicit index arithmetic, padded per the policy."""
    th, tw = grid.tile
    tiles = []
    for y, x in grid.positions():
        rows = source_index(y, th, scaled.shape[0], policy.padding)
        cols = source_index(x, tw, scaled.shape[1], policy.padding)
        tile = scaled[np.clip(rows, 0, None)][:, np.clip(cols, 0, None)].copy()
        tile[(rows[:, None] < 0) | (cols[None, :] < 0)] = policy.pad_value
        tiles.append(tile)
    return np.stack(tiles)


def covering(starts: tuple[int, ...], tile: int, length: int) -> np.ndarray:
    """(length, n_starts) bool: which tiles along one axis cover each pixel."""
    p = np.arange(length)[:, None]
    s = np.asarray(starts)[None, :]
    return (s <= p) & (p < s + tile)


# -- analytic models -----------------------------------------------------------------------------


def features(batch: np.ndarray) -> np.ndarray:
    """(N, 6): mean colour and top-left pixel of each tile, in [-1, 1]; depends on content and position."""
    assert batch.ndim == 4 and batch.shape[-1] == 3 and batch.dtype == np.uint8, batch.shape
    mean = batch.reshape(len(batch), -1, 3).mean(axis=1)
    return np.concatenate([mean, batch[:, 0, 0, :].astype(np.float64)], axis=1) / 127.5 - 1.0


def softmax_model(n_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """Multi-class probabilities: a softmax of fixed linear logits of the tile's features."""
    weights = np.cos(np.arange(6 * n_classes, dtype=np.float64)).reshape(6, n_classes) * 3.0

    def predict(batch: np.ndarray) -> np.ndarray:
        z = features(batch) @ weights
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    return predict


def binary_model(batch: np.ndarray) -> np.ndarray:
    """[1 - p, p] with p a sigmoid of the tile's features."""
    p = 1.0 / (1.0 + np.exp(-3.0 * features(batch) @ np.array([1.0, -0.5, 0.3, 0.8, 0.2, -0.6])))
    return np.stack([1.0 - p, p], axis=1)


class Recorder:
    """Wraps a model and keeps every batch it was given."""

    def __init__(self, model: Callable[[np.ndarray], np.ndarray]) -> None:
        self.model = model
        self.batches: list[np.ndarray] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.copy())
        return self.model(batch)

    @property
    def rows(self) -> int:
        return sum(len(b) for b in self.batches)


def assert_consistent(result: SlidingResult, policy: CropPolicy, **how: object) -> None:
    """The merged vector is the aggregation of the used tiles' rows, and skipped rows are NaN."""
    assert result.used is not None
    assert result.n_used + result.n_skipped == result.n_tiles == len(result.tile_probabilities)
    assert np.isfinite(result.tile_probabilities[result.used]).all()
    assert np.isnan(result.tile_probabilities[~result.used]).all()
    np.testing.assert_allclose(
        result.probabilities, aggregate(result.tile_probabilities[result.used], policy, **how), **TOL
    )


# -- planning and cutting ------------------------------------------------------------------------


@PROPERTY
@given(cases(bounded=False))
def test_plan_covers_every_pixel_with_in_bounds_tiles_of_the_tile_size(case: Case) -> None:
    policy = case.policy
    grid = plan_tiles(case.height, case.width, policy)
    sh, sw = grid.height, grid.width
    for size, original in ((sh, case.height), (sw, case.width)):
        assert size >= 1 and (abs(size - original * policy.scale) <= 0.5 or size == 1)
    assert rescale(np.zeros((case.height, case.width, 3), np.uint8), policy).shape == (sh, sw, 3)
    assert grid.tile == policy.tile_size and grid.source_size == (case.height, case.width)
    assert grid.row_starts == tuple(axis_starts(sh, policy.tile_size[0], policy.stride[0]))
    assert grid.col_starts == tuple(axis_starts(sw, policy.tile_size[1], policy.stride[1]))
    assert grid.shape == (len(grid.row_starts), len(grid.col_starts))
    assert grid.n_tiles == grid.shape[0] * grid.shape[1] == len(grid.positions())
    assert grid.positions() == [(y, x) for y in grid.row_starts for x in grid.col_starts]  # row-major
    for starts, length, tile, stride in (
        (grid.row_starts, sh, policy.tile_size[0], policy.stride[0]),
        (grid.col_starts, sw, policy.tile_size[1], policy.stride[1]),
    ):
        assert starts[0] == 0 and starts[-1] == max(0, length - tile)
        assert all(0 <= s and (s + tile <= length or (s == 0 and length < tile)) for s in starts)
        gaps = np.diff(starts)
        assert np.all(gaps > 0) and np.all(gaps[:-1] == stride) and np.all(gaps <= stride)
        assert len(starts) == (1 if length <= tile else math.ceil((length - tile) / stride) + 1)
        # a pixel is covered when its row and its column are: the grid is a product of the axes
        assert covering(starts, tile, length).any(axis=1).all()


@HEAVY
@given(cases())
def test_tiles_are_padded_windows_of_the_rescaled_image(case: Case) -> None:
    image = noise_image(case)
    policy = case.policy
    scaled = reference_scaled(image, policy.scale)
    np.testing.assert_array_equal(rescale(image, policy), scaled)
    model = Recorder(binary_model)
    result = sliding_window_predict(image, model, policy, batch_size=17)
    grid = result.grid
    expected = reference_tiles(scaled, grid, policy)
    tiles = np.concatenate(model.batches)
    assert tiles.shape == (grid.n_tiles, *policy.tile_size, 3) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(tiles, expected)
    np.testing.assert_array_equal(np.concatenate(list(iter_tile_batches(scaled, grid, policy, 5))), expected)
    # row i of the evidence is the model's answer for tile i, in row-major order
    np.testing.assert_allclose(result.tile_probabilities, binary_model(expected), **TOL)
    assert result.tile_map(1).shape == grid.shape
    np.testing.assert_array_equal(result.tile_map(1).ravel(), result.tile_probabilities[:, 1])


@HEAVY
@given(case=cases(), slopes=st.tuples(st.floats(-0.8, 0.8), st.floats(-0.8, 0.8)))
def test_a_lazy_source_cuts_the_same_tiles(case: Case, slopes: tuple[float, float]) -> None:
    """Exactly the array's tiles at scale 1; at other scales the same grid, and on a smooth image the
    same pixels up to resampling rounding (a region resampled alone sees no neighbours at its edge)."""

    class ArraySource:
        def __init__(self, array: np.ndarray) -> None:
            self.array, self.height, self.width = array, array.shape[0], array.shape[1]

        def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
            return self.array[y : y + h, x : x + w]

    one = dataclasses.replace(case.policy, scale=1.0)
    image = noise_image(case)
    lazy, whole = Recorder(binary_model), Recorder(binary_model)
    lazy_result = sliding_window_predict(ArraySource(image), lazy, one, batch_size=9)
    whole_result = sliding_window_predict(image, whole, one, batch_size=9)
    assert lazy_result.grid == whole_result.grid
    np.testing.assert_array_equal(np.concatenate(lazy.batches), np.concatenate(whole.batches))
    np.testing.assert_array_equal(lazy_result.tile_probabilities, whole_result.tile_probabilities)

    # at most 0.8 grey levels per source pixel: a region misplaced by a few source pixels shows
    y, x = np.mgrid[0 : case.height, 0 : case.width]
    ramp = 128 + slopes[0] * (y - case.height / 2) + slopes[1] * (x - case.width / 2)
    smooth = np.clip(np.stack([ramp, 255 - ramp, ramp / 2], axis=-1), 0, 255).astype(np.uint8)
    lazy, whole = Recorder(binary_model), Recorder(binary_model)
    grid = sliding_window_predict(ArraySource(smooth), lazy, case.policy, batch_size=64).grid
    assert grid == sliding_window_predict(smooth, whole, case.policy, batch_size=64).grid
    assert grid == plan_tiles(case.height, case.width, case.policy)
    lazy_tiles, whole_tiles = np.concatenate(lazy.batches), np.concatenate(whole.batches)
    assert lazy_tiles.shape == whole_tiles.shape == (grid.n_tiles, *case.policy.tile_size, 3)
    assert np.abs(lazy_tiles.astype(np.int16) - whole_tiles).max() <= 3


# -- merging -------------------------------------------------------------------------------------


@PROPERTY
@given(case=cases(), n_classes=st.integers(2, 5))
def test_softmax_tiles_merge_to_a_distribution_and_mean_is_the_tile_mean(case: Case, n_classes: int) -> None:
    image = noise_image(case)
    model = softmax_model(n_classes)
    result = sliding_window_predict(image, model, case.policy, batch_size=32)
    merged = result.probabilities
    assert merged.shape == (n_classes,)
    assert np.all(merged >= 0) and np.all(merged <= 1) and merged.sum() == pytest.approx(1.0, abs=1e-9)
    assert_consistent(result, case.policy)
    expected_rows = model(reference_tiles(reference_scaled(image, case.policy.scale), result.grid, case.policy))
    np.testing.assert_allclose(result.tile_probabilities, expected_rows, **TOL)
    if case.policy.aggregation == "mean":
        np.testing.assert_allclose(merged, expected_rows.mean(axis=0), **TOL)


@st.composite
def constant_outputs(draw: st.DrawFn) -> tuple[np.ndarray, str, int | None]:
    """(p, activation, positive_index): a softmax distribution, a binary pair, or independent sigmoids."""
    kind = draw(st.sampled_from(("softmax", "binary", "sigmoid")))
    if kind == "sigmoid":
        p = np.array(draw(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5)))
        return p, "sigmoid", None
    n = 2 if kind == "binary" else draw(st.integers(2, 5))
    weights = np.array(draw(st.lists(st.integers(0, 20), min_size=n, max_size=n).filter(any)), np.float64)
    return weights / weights.sum(), "softmax", draw(st.sampled_from((0, 1))) if kind == "binary" else None


@PROPERTY
@given(case=cases(min_foreground=True), output=constant_outputs())
def test_a_constant_model_gives_back_its_constant(case: Case, output: tuple[np.ndarray, str, int | None]) -> None:
    """Every aggregation but noisy_or returns the constant; noisy_or returns 1 - (1 - p)^n_used."""
    p, activation, positive_index = output

    def constant(batch: np.ndarray) -> np.ndarray:
        return np.tile(p, (len(batch), 1))

    policy = case.policy
    result = sliding_window_predict(
        slide_image(case), constant, policy, activation=activation, positive_index=positive_index
    )
    assert_consistent(result, policy, activation=activation, positive_index=positive_index)
    expected = p
    if policy.aggregation == "noisy_or":
        expected = 1.0 - (1.0 - p) ** result.n_used
        if positive_index is not None:
            expected[1 - positive_index] = 1.0 - expected[positive_index]
        elif activation == "softmax":
            expected = expected / expected.sum()
        if result.n_used == 1:
            np.testing.assert_allclose(expected, p, **TOL)
    np.testing.assert_allclose(result.probabilities, expected, **TOL)


@st.composite
def tile_probabilities(draw: st.DrawFn, n_classes: int | None = None) -> tuple[np.ndarray, str]:
    """(n_tiles, C) rows: softmax distributions or independent sigmoids, with exact 0s and 1s possible."""
    n = draw(st.integers(1, 40))
    c = n_classes or draw(st.integers(2, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        z = rng.normal(0, draw(st.sampled_from((0.5, 3.0, 40.0))), (n, c))  # 40: saturated, rows of 0 and 1
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True), "softmax"
    p = rng.uniform(0, 1, (n, c))
    p[rng.uniform(size=(n, c)) < 0.1] = 0.0
    p[rng.uniform(size=(n, c)) < 0.1] = 1.0
    return p, "sigmoid"


@CHEAP
@given(data=tile_probabilities(), how=st.sampled_from(AGGREGATIONS), top_k=st.integers(1, 6), seed=st.integers(0, 2**32 - 1))
def test_aggregation_ignores_tile_order_and_follows_class_order(
    data: tuple[np.ndarray, str], how: str, top_k: int, seed: int
) -> None:
    p, activation = data
    policy = CropPolicy((4, 4), (2, 2), aggregation=how, top_k=top_k)
    merged = aggregate(p, policy, activation=activation)
    rng = np.random.default_rng(seed)
    rows, classes = rng.permutation(len(p)), rng.permutation(p.shape[1])
    np.testing.assert_allclose(aggregate(p[rows], policy, activation=activation), merged, **TOL)
    np.testing.assert_allclose(aggregate(p[:, classes], policy, activation=activation), merged[classes], **TOL)
    assert np.all(merged >= 0) and np.all(merged <= 1)
    if activation == "softmax":
        assert merged.sum() == pytest.approx(1.0, abs=1e-9)
    else:  # sigmoid classes are merged independently: each is the aggregation of its own column
        for k in range(p.shape[1]):
            np.testing.assert_allclose(aggregate(p[:, k : k + 1], policy, activation="sigmoid"), merged[k : k + 1], **TOL)
    if how in ("mean", "mean_logits", "max"):  # duplicating every tile changes nothing
        np.testing.assert_allclose(aggregate(np.concatenate([p, p]), policy, activation=activation), merged, **TOL)
    if how == "top_k_mean" and top_k >= len(p):
        np.testing.assert_allclose(merged, aggregate(p, dataclasses.replace(policy, aggregation="mean"), activation=activation), **TOL)


@CHEAP
@given(data=tile_probabilities(n_classes=2), top_k=st.integers(1, 6))
def test_binary_aggregations_are_ordered_for_the_positive_class(data: tuple[np.ndarray, str], top_k: int) -> None:
    """min <= mean <= top_k_mean <= max <= noisy_or, mean_logits within [min, max]; each a pair summing to 1."""
    pos = data[0][:, 1]
    p = np.stack([1.0 - pos, pos], axis=1)
    got = {}
    for how in AGGREGATIONS:
        policy = CropPolicy((4, 4), (2, 2), aggregation=how, top_k=top_k)
        merged = aggregate(p, policy, positive_index=1)
        assert merged.shape == (2,) and merged.sum() == pytest.approx(1.0, abs=1e-12)
        # the same task with the classes the other way round gives the mirrored answer
        np.testing.assert_allclose(aggregate(p[:, ::-1], policy, positive_index=0), merged[::-1], **TOL)
        got[how] = merged[1]
    eps = 1e-9
    assert pos.min() - eps <= got["mean"] <= got["top_k_mean"] + eps <= got["max"] + 2 * eps <= got["noisy_or"] + 3 * eps
    assert pos.min() - eps <= got["mean_logits"] <= pos.max() + eps
    assert got["max"] == pytest.approx(pos.max(), abs=1e-12)
    if top_k == 1:
        assert got["top_k_mean"] == pytest.approx(got["max"], abs=1e-12)


# -- batching ------------------------------------------------------------------------------------


@HEAVY
@given(case=cases(), pad_batches=st.booleans())
def test_batch_size_does_not_change_results(case: Case, pad_batches: bool) -> None:
    image = noise_image(case)
    model = softmax_model(3)
    results = {}
    for batch_size in (1, 3, 64):
        recorder = Recorder(model)
        results[batch_size] = sliding_window_predict(image, recorder, case.policy, batch_size=batch_size, pad_batches=pad_batches)
        sizes = {len(b) for b in recorder.batches}
        assert sizes == {batch_size} if pad_batches else max(sizes) <= batch_size
        assert len(recorder.batches) == math.ceil(results[batch_size].n_tiles / batch_size)
    ref = results[1]
    for batch_size in (3, 64):
        res = results[batch_size]
        assert res.grid == ref.grid
        np.testing.assert_allclose(res.tile_probabilities, ref.tile_probabilities, **TOL)
        np.testing.assert_allclose(res.probabilities, ref.probabilities, **TOL)


@PROPERTY
@given(
    case=cases(max_side=120),
    sizes=st.lists(st.tuples(st.integers(1, 120), st.integers(1, 120), st.booleans()), min_size=1, max_size=5),
    batch_size=st.sampled_from((1, 3, 64)) | st.integers(1, 40),
    pad_batches=st.booleans(),
    flush_each=st.booleans(),
)
def test_many_images_give_what_each_gives_alone(
    case: Case, sizes: list[tuple[int, int, bool]], batch_size: int, pad_batches: bool, flush_each: bool
) -> None:
    """Cross-image batches never mix images, and unreadable items pass through in order."""
    # case's policy is bounded for its own (<= 120 px) size; keep the others no larger than it
    dims = [(min(h, case.height), min(w, case.width), bad) for h, w, bad in sizes]
    rng = np.random.default_rng(case.seed)
    items: list[tuple[int, np.ndarray | BaseException]] = [
        (k, ValueError(f"item {k} is unreadable") if bad else rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for k, (h, w, bad) in enumerate(dims)
    ]
    model = softmax_model(4)
    outcomes = list(
        sliding_window_many(items, Recorder(model), case.policy, batch_size=batch_size, pad_batches=pad_batches, flush_each=flush_each)
    )
    assert [o.key for o in outcomes] == [k for k, _ in items]
    for (_, item), outcome in zip(items, outcomes):
        if isinstance(item, BaseException):
            assert outcome.error is item and outcome.result is None
            continue
        assert outcome.error is None and outcome.result is not None
        alone = sliding_window_predict(item, model, case.policy, batch_size=1)
        assert outcome.result.grid == alone.grid
        np.testing.assert_allclose(outcome.result.tile_probabilities, alone.tile_probabilities, **TOL)
        np.testing.assert_allclose(outcome.result.probabilities, alone.probabilities, **TOL)


# -- coverage maps -------------------------------------------------------------------------------


@PROPERTY
@given(
    case=cases(),
    value=st.floats(-1e3, 1e3),
    skip=st.floats(0.0, 1.0),
)
def test_coverage_map_is_the_mean_of_the_covering_tiles(case: Case, value: float, skip: float) -> None:
    grid = plan_tiles(case.height, case.width, case.policy)
    for weighting in ("none", "gaussian"):
        flat = coverage_map(grid, np.full(grid.n_tiles, value), weighting=weighting)
        assert flat.shape == (grid.height, grid.width)
        np.testing.assert_allclose(flat, value, rtol=1e-12, atol=1e-12)
    # random values, a share of them NaN (skipped tiles)
    rng = np.random.default_rng(case.seed)
    values = rng.uniform(-1, 1, grid.n_tiles)
    values[rng.uniform(size=grid.n_tiles) < skip] = np.nan
    rows = covering(grid.row_starts, grid.tile[0], grid.height).astype(np.float64)
    cols = covering(grid.col_starts, grid.tile[1], grid.width).astype(np.float64)
    table = values.reshape(grid.shape)
    finite = np.isfinite(table)
    count = rows @ finite.astype(np.float64) @ cols.T
    total = rows @ np.where(finite, table, 0.0) @ cols.T
    plain = coverage_map(grid, values)
    assert np.array_equal(np.isnan(plain), count == 0)
    np.testing.assert_allclose(plain[count > 0], (total / np.maximum(count, 1))[count > 0], rtol=1e-9, atol=1e-12)
    weighted = coverage_map(grid, values, weighting="gaussian")
    assert np.array_equal(np.isnan(weighted), count == 0)
    if finite.any():  # a weighted mean stays within the values it averages
        lo, hi = np.nanmin(values), np.nanmax(values)
        assert np.all(weighted[count > 0] >= lo - 1e-12) and np.all(weighted[count > 0] <= hi + 1e-12)


# -- foreground filter ---------------------------------------------------------------------------


def unpadded_fractions(scaled: np.ndarray, grid) -> np.ndarray:
    """Foreground of each tile's real pixels: edge padding is not image content and must not count."""
    background = estimate_background(scaled)
    th, tw = grid.tile
    return np.array([foreground_fraction(scaled[None, y : y + th, x : x + tw], background)[0] for y, x in grid.positions()])


@HEAVY
@given(case=cases(min_foreground=True), batch_size=st.integers(1, 50), pick=st.integers(0, 10**6))
def test_min_foreground_skips_exactly_the_background_tiles(case: Case, batch_size: int, pick: int) -> None:
    image = slide_image(case)
    policy = case.policy
    model = Recorder(binary_model)
    result = sliding_window_predict(image, model, policy, batch_size=batch_size, positive_index=1)
    scaled = reference_scaled(image, policy.scale)
    tiles = reference_tiles(scaled, result.grid, policy)
    assert result.used is not None and result.foreground is not None
    if policy.min_foreground > 0:
        np.testing.assert_allclose(result.foreground, unpadded_fractions(scaled, result.grid), atol=1e-12)
    else:
        assert np.all(result.foreground == 1.0)
    enough = result.foreground >= policy.min_foreground
    assert result.foreground_fallback == (not enough.any())
    np.testing.assert_array_equal(result.used, enough if enough.any() else np.ones_like(enough))
    assert model.rows == result.n_used  # skipped tiles never reach the model
    assert_consistent(result, policy, positive_index=1)
    np.testing.assert_allclose(result.tile_probabilities[result.used], binary_model(tiles[result.used]), **TOL)
    tile_map = result.tile_map(1)
    np.testing.assert_array_equal(np.isnan(tile_map), ~result.used.reshape(result.grid.shape))
    # "too little" is strictly less: a threshold equal to some tile's fraction keeps that tile
    fractions = unpadded_fractions(scaled, result.grid)
    positive = fractions[fractions > 0]
    if len(positive):
        at = float(positive[pick % len(positive)])
        boundary = sliding_window_predict(image, binary_model, dataclasses.replace(policy, min_foreground=at), batch_size=batch_size)
        assert not boundary.foreground_fallback
        np.testing.assert_array_equal(boundary.used, fractions >= at)


@PROPERTY
@given(case=cases(min_foreground=True), grey=st.integers(0, 255), threshold=st.floats(1e-6, 1.0))
def test_an_image_of_nothing_falls_back_to_every_tile(case: Case, grey: int, threshold: float) -> None:
    """Uniform glass (padding adds nothing new): no tile is foreground, so all are used rather than none."""
    policy = dataclasses.replace(case.policy, min_foreground=threshold, pad_value=grey)
    image = np.full((case.height, case.width, 3), grey, np.uint8)
    model = Recorder(binary_model)
    result = sliding_window_predict(image, model, policy, positive_index=1)
    assert np.all(result.foreground == 0.0)
    assert result.foreground_fallback and result.n_used == result.n_tiles and result.n_skipped == 0
    assert model.rows == result.n_tiles
    assert_consistent(result, policy, positive_index=1)
    assert not np.isnan(result.tile_map(0)).any()
