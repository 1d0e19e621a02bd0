"""Neighbour context (crop.neighbour_context): the blend, the merge that applies it, the card that carries it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from edgedx.card import Calibration, CropPolicy, ModelCard, Provenance
from edgedx.errors import CardError, InputError
from edgedx.runtime.fitting import crop_logits, uncalibrated
from edgedx.runtime.neighbours import blend_neighbours, neighbour_max, with_neighbour_context
from edgedx.runtime.preprocess import to_probabilities
from edgedx.runtime.tiling import CropLayout, TileGrid, merge, plan_tiles

PROV = Provenance("0", "2026-01-01T00:00:00+00:00")


def card(task: str = "binary", w: float = 0.4, **changes) -> ModelCard:
    names = {"binary": ("uninfected", "parasitized"), "multiclass": ("a", "b", "c")}[task]
    return ModelCard(arch="x", task=task, class_names=names, positive_class="parasitized" if task == "binary" else None,
                     input_size=(16, 16), crop=CropPolicy((16, 16), (8, 8), neighbour_context=w), provenance=PROV, **changes)


def test_an_edge_cut_object_is_lifted_and_a_lone_spike_is_damped() -> None:
    """Row 0: a crop seeing half an object (0.4) beside one seeing it whole (0.98); row 2: a lone bright crop (0.9)."""
    p = np.array([[0.1, 0.4, 0.98, 0.1, 0.1],
                  [0.1, 0.1, 0.1, 0.1, 0.1],
                  [0.1, 0.1, 0.1, 0.1, 0.9]])
    q = blend_neighbours(p.ravel(), p.shape, 0.45).reshape(p.shape)
    assert q[0, 1] == pytest.approx(0.55 * 0.4 + 0.45 * 0.98)  # lifted above the lone spike
    assert q[2, 4] == pytest.approx(0.55 * 0.9 + 0.45 * 0.1)
    assert q[0, 1] > q[2, 4] and q[0, 2] == pytest.approx(0.55 * 0.98 + 0.45 * 0.4)
    assert q[0, 2] > q[0, 1]  # below 0.5 the object's best crop stays the local maximum
    assert q[1, 0] == pytest.approx(0.55 * 0.1 + 0.45 * 0.4)  # the diagonal counts


def test_skipped_crops_are_no_neighbours_and_a_crop_without_neighbours_keeps_its_value() -> None:
    nan = np.nan
    p = np.array([[0.7, nan, 0.2],
                  [nan, nan, nan],
                  [0.3, nan, 0.99]])
    q = blend_neighbours(p.ravel(), p.shape, 0.45).reshape(p.shape)
    np.testing.assert_array_equal(np.isnan(q), np.isnan(p))  # skipped stay skipped
    np.testing.assert_allclose(q[~np.isnan(p)], p[~np.isnan(p)])  # no used neighbour: unchanged
    assert np.isnan(neighbour_max(p.ravel(), p.shape)).reshape(p.shape)[0, 0]
    one = blend_neighbours(np.array([0.8]), (1, 1), 0.45)  # a one-crop image (mode fit, single-cell validation)
    assert one.tolist() == [0.8]


def test_weight_zero_is_the_identity_and_bad_weights_or_shapes_are_refused() -> None:
    p = np.random.default_rng(0).random(12)
    np.testing.assert_array_equal(blend_neighbours(p, (3, 4), 0.0), p)
    for bad in (-0.1, 0.5, 1.0, np.nan):
        with pytest.raises(ValueError, match="within"):
            blend_neighbours(p, (3, 4), bad)
    with pytest.raises(ValueError, match="grid"):
        blend_neighbours(p, (5, 4), 0.3)
    with pytest.raises(ValueError, match="binary"):
        with_neighbour_context(np.ones((12, 3)) / 3, (3, 4), 0.3, 1)


@pytest.mark.parametrize("pos", [0, 1])
def test_the_pair_is_completed_around_the_positive_column(pos: int) -> None:
    p = np.random.default_rng(1).random(6)
    rows = np.empty((6, 2))
    rows[:, pos], rows[:, 1 - pos] = p, 1 - p
    out = with_neighbour_context(rows, (2, 3), 0.4, pos)
    np.testing.assert_allclose(out[:, pos], blend_neighbours(p, (2, 3), 0.4))
    np.testing.assert_allclose(out.sum(axis=1), 1.0)


def grid_result(w: float, aggregation: str = "max"):
    policy = CropPolicy((16, 16), (8, 8), aggregation=aggregation, neighbour_context=w)
    grid = plan_tiles(31, 47, policy)  # odd size: the last row and column are edge-aligned
    rng = np.random.default_rng(2)
    p = rng.random(grid.n_tiles) * 0.5
    p[3] = 0.95
    used = np.ones(grid.n_tiles, bool)
    used[[0, 7]] = False
    rows = np.stack([1 - p, p], axis=1)
    rows[~used] = np.nan
    layout = CropLayout(grid, used, np.ones(grid.n_tiles), False)
    return merge(layout, rows, policy, activation="softmax", positive_index=1), rows, grid, used


def test_merge_blends_before_aggregating_and_keeps_each_crops_own_answer() -> None:
    result, rows, grid, used = grid_result(0.4)
    assert isinstance(grid, TileGrid) and grid.shape[0] * grid.shape[1] == len(rows)
    expected = with_neighbour_context(rows, grid.shape, 0.4, 1)
    np.testing.assert_allclose(result.tile_probabilities, expected, equal_nan=True)
    np.testing.assert_array_equal(result.own_tile_probabilities, rows)
    assert result.probabilities[1] == pytest.approx(np.nanmax(expected[used, 1]))
    plain, *_ = grid_result(0.0)
    assert plain.own_tile_probabilities is None and plain.probabilities[1] == pytest.approx(0.95)
    assert result.probabilities[1] < plain.probabilities[1]  # the lone 0.95 crop is damped by its dimmer neighbours
    stale = rows.copy()
    stale[~used] = (0.0, 1.0)  # a caller that left values in skipped rows: they are still nobody's neighbour
    again = merge(CropLayout(grid, used, np.ones(grid.n_tiles), False), stale, CropPolicy((16, 16), (8, 8), aggregation="max", neighbour_context=0.4),
                  positive_index=1)
    np.testing.assert_allclose(again.tile_probabilities, expected, equal_nan=True)
    with pytest.raises(ValueError, match="positive_index"):
        merge(CropLayout(grid, used, np.ones(grid.n_tiles), False), rows, CropPolicy((16, 16), (8, 8), neighbour_context=0.4))


def test_the_card_carries_it_and_refuses_it_where_it_has_no_meaning() -> None:
    c = card(w=0.4)
    assert ModelCard.from_json(c.to_json()) == c and "blended 0.4" in c.crop.describe()
    older = c.to_dict()
    older["schema_version"] = 6
    del older["crop"]["neighbour_context"]
    assert ModelCard.from_dict(older).crop.neighbour_context == 0.0  # before 7: no blending
    for bad in (0.5, 1.0, -0.1, float("nan")):
        with pytest.raises(CardError, match="crop.neighbour_context.*within"):
            CropPolicy((16, 16), (8, 8), neighbour_context=bad)
    with pytest.raises(CardError, match="binary.*multiclass"):
        card("multiclass", w=0.4)
    from edgedx.runtime.model import check_tile_fits

    with pytest.raises(InputError, match="multiclass model"):  # a per-run override on a model it does not fit
        check_tile_fits(CropPolicy((16, 16), (8, 8), neighbour_context=0.4), card("multiclass", w=0.0))


def test_uncalibrated_blends_the_crops_own_answers_without_the_temperature() -> None:
    """evaluate's "before calibration" figures: the temperature undone on each crop's own answer, then blended, as diagnose
    would have blended the uncalibrated crops; not the temperature undone on blended rows."""
    hot = card(w=0.4, calibration=Calibration("temperature", (2.5,)))
    policy = dataclasses.replace(hot.crop, aggregation="max")
    grid = plan_tiles(31, 47, policy)
    logits = np.random.default_rng(3).normal(0, 3, (grid.n_tiles, 2))
    used = np.ones(grid.n_tiles, bool)
    layout = CropLayout(grid, used, np.ones(grid.n_tiles), False)
    calibrated = merge(layout, to_probabilities(logits, hot), policy, positive_index=1)
    raw = merge(layout, to_probabilities(logits, hot.replace(calibration=Calibration())), policy, positive_index=1)
    np.testing.assert_allclose(uncalibrated(calibrated, hot, policy), raw.probabilities, atol=1e-9)


def test_per_crop_fits_refuse_a_blended_card(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="neighbour_context 0.4.*before edgedx fit-fields"):
        crop_logits(lambda x: np.zeros((len(x), 2)), card(w=0.4), [("a", np.zeros((32, 32, 3), np.uint8))])


def test_recalibrate_refuses_a_blended_card_before_reading_the_site(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from edgedx.export.recalibrate import recalibrate
    from test_recalibrate import red_model

    blended = card(w=0.4, threshold=0.5)
    parent = red_model(tmp_path / "red model.onnx", blended)
    with pytest.raises(InputError, match="neighbour_context 0.4.*then run fit-fields again"):
        recalibrate(parent, tmp_path / "no site yet", tmp_path / "out")
    assert not (tmp_path / "out").exists()
