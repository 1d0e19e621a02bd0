"""Aggregations, foreground filter, padding, cross-image batching, lazy sources, records, audit, resume."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from edgedx.card import CropPolicy
from edgedx.errors import InputError
from edgedx.runtime.foreground import estimate_background, foreground_fraction
from edgedx.runtime.tiling import aggregate, coverage_map, plan_tiles, sliding_window_many, sliding_window_predict


def policy(**changes) -> CropPolicy:
    return dataclasses.replace(CropPolicy((4, 4), (2, 2)), **changes)


def brightness_model(batch: np.ndarray) -> np.ndarray:
    """Analytic fake: p(positive) = mean red value / 255 of the tile."""
    p = batch[..., 0].reshape(len(batch), -1).mean(axis=1) / 255.0
    return np.stack([1 - p, p], axis=1)


# -- aggregation -------------------------------------------------------------------------


def test_aggregations_on_a_sparse_finding() -> None:
    p_pos = np.array([0.02, 0.05, 0.9, 0.03, 0.6])
    tiles = np.stack([1 - p_pos, p_pos], axis=1)
    expect = {
        "mean": p_pos.mean(),
        "max": 0.9,
        "top_k_mean": (0.9 + 0.6) / 2,
        "noisy_or": 1 - np.prod(1 - p_pos),
    }
    for how, value in expect.items():
        merged = aggregate(tiles, policy(aggregation=how, top_k=2), positive_index=1)
        assert merged[1] == pytest.approx(value) and merged.sum() == pytest.approx(1.0), how
    logit = np.log(p_pos / (1 - p_pos)).mean()
    merged = aggregate(tiles, policy(aggregation="mean_logits"), positive_index=1)
    assert merged[1] == pytest.approx(1 / (1 + math.exp(-logit)))  # softmax of mean logits, from probabilities


def test_mean_logits_is_exact_for_softmax_and_sigmoid() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (7, 4))
    soft = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    z = logits.mean(axis=0)
    expected = np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(aggregate(soft, policy(aggregation="mean_logits")), expected, rtol=1e-9)
    sig = 1 / (1 + np.exp(-logits))
    np.testing.assert_allclose(
        aggregate(sig, policy(aggregation="mean_logits"), activation="sigmoid"), 1 / (1 + np.exp(-z)), rtol=1e-9
    )


def test_multiclass_max_is_renormalised_and_multilabel_is_not() -> None:
    tiles = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    merged = aggregate(tiles, policy(aggregation="max"))
    np.testing.assert_allclose(merged, np.array([0.7, 0.2, 0.8]) / 1.7)
    np.testing.assert_allclose(aggregate(tiles, policy(aggregation="max"), activation="sigmoid"), [0.7, 0.2, 0.8])


def test_top_k_larger_than_tile_count_uses_all() -> None:
    tiles = np.array([[0.8, 0.2], [0.4, 0.6]])
    assert aggregate(tiles, policy(aggregation="top_k_mean", top_k=10), positive_index=1)[1] == pytest.approx(0.4)


# -- padding, foreground, maps -----------------------------------------------------------------


@pytest.mark.parametrize(("mode", "row"), [("constant", [1, 2, 3, 9]), ("reflect", [1, 2, 3, 3]), ("replicate", [1, 2, 3, 3])])
def test_padding_modes_for_images_smaller_than_a_tile(mode: str, row: list[int]) -> None:
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0] = [[1, 2, 3], [4, 5, 6]]
    seen: list[np.ndarray] = []

    def record(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.copy())
        return np.full((len(batch), 2), 0.5)

    sliding_window_predict(image, record, policy(padding=mode, pad_value=9))
    tile = seen[0][0, ..., 0]
    assert tile.shape == (4, 4) and list(tile[0]) == row
    if mode == "reflect":
        assert list(tile[:, 0]) == [1, 4, 4, 1]  # mirrored downwards, edge included


def test_foreground_fraction_ignores_glass_and_black_borders() -> None:
    glass = np.full((1, 8, 8, 3), 235, np.uint8)
    border = np.zeros((1, 8, 8, 3), np.uint8)
    stained = np.zeros((1, 8, 8, 3), np.uint8)
    stained[..., :] = (180, 90, 140)  # Giemsa purple
    grey_tissue = np.full((1, 8, 8, 3), 120, np.uint8)
    half = glass.copy()
    half[:, :, :4] = (180, 90, 140)
    got = foreground_fraction(np.concatenate([glass, border, stained, grey_tissue, half]))
    np.testing.assert_allclose(got, [0, 0, 1, 1, 0.5])


def test_tinted_glass_is_background_relative_to_the_image() -> None:
    field = np.zeros((64, 64, 3), np.uint8)
    field[:] = (179, 210, 179)  # greenish illumination: fails the fixed "colourless" rule
    field[:16, :16] = (160, 90, 150)  # one stained cell
    assert foreground_fraction(field[None, 32:, 32:])[0] == 1.0  # fixed rule: tinted glass looks like something
    background = estimate_background(field)
    np.testing.assert_array_equal(background, [179, 210, 179])
    got = foreground_fraction(np.stack([field[32:, 32:], field[:32, :32], field[8:40, 8:40]]), background)
    np.testing.assert_allclose(got, [0.0, 0.25, 64 / 1024])


def test_background_tiles_are_skipped_counted_and_nan_in_the_map() -> None:
    image = np.full((8, 12, 3), 235, np.uint8)  # empty glass
    image[:4, :4] = (200, 40, 90)  # one stained corner
    calls: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return brightness_model(batch)

    result = sliding_window_predict(image, model, policy(tile_size=(4, 4), stride=(4, 4), min_foreground=0.5))
    assert result.n_tiles == 6 and result.n_used == 1 and result.n_skipped == 5 and sum(calls) == 1
    tile_map = result.tile_map(1)
    assert tile_map[0, 0] == pytest.approx(200 / 255) and np.isnan(tile_map).sum() == 5
    assert result.probabilities[1] == pytest.approx(200 / 255)
    heat = coverage_map(result.grid, result.tile_probabilities[:, 1])
    assert np.isnan(heat[4:, :]).all() and heat[0, 0] == pytest.approx(200 / 255)
    # nothing but glass: every tile is used rather than no decision at all
    empty = sliding_window_predict(np.full((8, 12, 3), 235, np.uint8), model, policy(tile_size=(4, 4), stride=(4, 4), min_foreground=0.5))
    assert empty.foreground_fallback and empty.n_used == 6


def test_gaussian_centre_weighting_favours_each_tile_centre() -> None:
    grid = plan_tiles(4, 6, policy(tile_size=(4, 4), stride=(2, 2)))
    assert grid.positions() == [(0, 0), (0, 2)]
    flat = coverage_map(grid, np.array([0.0, 1.0]))
    weighted = coverage_map(grid, np.array([0.0, 1.0]), weighting="gaussian")
    assert flat[1, 2] == pytest.approx(0.5) and flat[1, 3] == pytest.approx(0.5)
    assert weighted[1, 2] < 0.5 < weighted[1, 3]  # column 2 is nearer tile 0's centre, column 3 tile 1's
    assert weighted[0, 0] == 0.0 and weighted[0, 5] == 1.0


# -- cross-image batching --------------------------------------------------------------------


def test_tiles_of_several_images_share_fixed_size_batches() -> None:
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((5, 7), (4, 4), (11, 3), (6, 9))]
    shapes: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        shapes.append(len(batch))
        return brightness_model(batch)

    outcomes = list(sliding_window_many(list(enumerate(images)), model, policy(), batch_size=5, pad_batches=True))
    assert [o.key for o in outcomes] == [0, 1, 2, 3]
    assert set(shapes) == {5}  # always the same shape, the last batch padded
    total = sum(o.result.n_tiles for o in outcomes)
    assert len(shapes) == math.ceil(total / 5) < len(images) + 2  # tiles packed across images
    for image, outcome in zip(images, outcomes):
        alone = sliding_window_predict(image, brightness_model, policy(), batch_size=2)
        np.testing.assert_allclose(outcome.result.tile_probabilities, alone.tile_probabilities)
        np.testing.assert_allclose(outcome.result.probabilities, alone.probabilities)


def test_a_read_error_passes_through_in_order() -> None:
    from edgedx.errors import ImageReadError

    image = np.zeros((4, 4, 3), np.uint8)
    bad = ImageReadError("x.png: cannot be decoded")
    outcomes = list(sliding_window_many([("a", image), ("b", bad), ("c", image)], brightness_model, policy()))
    assert [o.key for o in outcomes] == ["a", "b", "c"]
    assert outcomes[1].error is bad and outcomes[1].result is None and outcomes[2].result is not None


def test_a_lazy_source_gives_the_same_tiles_as_the_array(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    from edgedx.runtime.io.sources import open_source

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (237, 511, 3), dtype=np.uint8)
    path = tmp_path / "big field.tif"
    tifffile.imwrite(path, image, tile=(64, 64))
    crop = CropPolicy((48, 48), (40, 40))
    with open_source(path) as source:
        lazy = sliding_window_predict(source, brightness_model, crop)
    np.testing.assert_allclose(lazy.tile_probabilities, sliding_window_predict(image, brightness_model, crop).tile_probabilities)
    scaled = dataclasses.replace(crop, scale=0.5)
    with open_source(path) as source:
        lazy_scaled = sliding_window_predict(source, brightness_model, scaled)
    whole = sliding_window_predict(image, brightness_model, scaled)
    assert lazy_scaled.grid == whole.grid
    np.testing.assert_allclose(lazy_scaled.tile_probabilities, whole.tile_probabilities, atol=0.02)  # resampled per region


# -- model: overrides, refer band, top-k, records, audit, resume --------------------------------------


def test_crop_overrides_are_checked() -> None:
    from edgedx.runtime.model import resolve_crop

    base = CropPolicy((32, 32), (16, 16))
    assert resolve_crop(base, {"aggregation": "max", "stride": (8, 8)}) == dataclasses.replace(base, aggregation="max", stride=(8, 8))
    with pytest.raises(InputError, match="unknown crop setting"):
        resolve_crop(base, {"stirde": (8, 8)})
    with pytest.raises(InputError, match="crop setting 'crop.stride'"):
        resolve_crop(base, {"stride": (64, 64)})


def test_resume_drops_a_partial_last_record(tmp_path: Path) -> None:
    from edgedx.runtime.outputs.records import completed_inputs

    out = tmp_path / "out put.jsonl"
    out.write_text('{"input": "a.png", "label": "x"}\n{"input": "b.png", "label": "y"}\n{"input": "c.p', encoding="utf-8")
    assert completed_inputs(out) == {"a.png", "b.png"}
    assert out.read_text(encoding="utf-8").endswith('"y"}\n')
    csv_out = tmp_path / "o.csv"
    csv_out.write_text("input,label\na.png,x\nb.png,y\nc.pn", encoding="utf-8")
    assert completed_inputs(csv_out) == {"a.png", "b.png"}
    assert completed_inputs(tmp_path / "missing.jsonl") == set()
    (tmp_path / "foreign.jsonl").write_text("not json\n", encoding="utf-8")
    with pytest.raises(InputError, match="not an EdgeDx record"):
        completed_inputs(tmp_path / "foreign.jsonl")


def test_card_schema_1_is_read_with_default_crop_settings() -> None:
    from edgedx.card import SCHEMA_VERSION, ModelCard, Provenance

    card = ModelCard(
        arch="x", task="binary", class_names=("a", "b"), positive_class="b", input_size=(8, 8),
        crop=CropPolicy((8, 8), (4, 4)), provenance=Provenance("0", "2026-01-01T00:00:00+00:00"),
    )
    data = card.to_dict()
    data["schema_version"] = 1
    for key in ("top_k", "centre_weighting", "min_foreground", "mode", "shorter_side", "min_content", "tta", "neighbour_context"):
        del data["crop"][key]
    old = ModelCard.from_dict(data)
    assert old == card and old.schema_version == SCHEMA_VERSION == 7
    assert old.crop.mode == "scale"  # every card before schema 3 resampled by its fixed scale


def test_flush_each_gives_each_result_before_the_next_image_arrives() -> None:
    image = np.zeros((4, 4, 3), np.uint8)
    arrived: list[str] = []

    def source():
        for key in ("a", "b"):
            arrived.append(key)
            yield key, image

    stream = sliding_window_many(source(), brightness_model, policy(), batch_size=8, flush_each=True)
    first = next(stream)
    assert first.key == "a" and arrived == ["a"]  # not held back waiting for "b" to fill the batch
    assert [o.key for o in stream] == ["b"]
    batched = sliding_window_many(source(), brightness_model, policy(), batch_size=8)
    arrived.clear()
    assert next(batched).key == "a" and arrived == ["a", "b"]  # without it, tiles wait for a full batch


@pytest.mark.parametrize("pad_value", [0, 128, 235])
def test_edge_padding_never_counts_as_foreground(pad_value: int) -> None:
    """A 20-px-high strip: each tile is mostly padding. Stained pixels decide, not the padding colour."""
    image = np.full((20, 128, 3), 235, np.uint8)
    image[:, :32] = (200, 40, 90)
    crop = policy(tile_size=(32, 32), stride=(32, 32), min_foreground=0.5, pad_value=pad_value)
    result = sliding_window_predict(image, lambda b: np.tile([0.5, 0.5], (len(b), 1)), crop)
    np.testing.assert_allclose(result.foreground, [1.0, 0.0, 0.0, 0.0])
    assert result.used.tolist() == [True, False, False, False]


def test_coverage_map_and_aggregate_refuse_mismatched_inputs() -> None:
    grid = plan_tiles(64, 64, policy(tile_size=(32, 32), stride=(32, 32)))
    with pytest.raises(ValueError, match="2 values for a grid of 4 tiles"):
        coverage_map(grid, np.ones(2))
    with pytest.raises(ValueError, match="unknown weighting 'gausian'"):
        coverage_map(grid, np.ones(4), weighting="gausian")
    with pytest.raises(ValueError, match="unknown activation 'sigmod'"):
        aggregate(np.full((3, 2), 0.5), policy(), activation="sigmod")
    with pytest.raises(ValueError, match="positive_index 1 needs two-class"):
        aggregate(np.full((3, 3), 1 / 3), policy(aggregation="max"), positive_index=1)
