"""Counting the positive class on a whole field: one detection per object despite overlapping crops, boxes in the
image's own pixels, red cells counted, parasitaemia with its interval, and records, CSV and overlays that show them.

Tiny synthetic images only (seconds): planted spots, dark discs on light glass, a fake session whose p(positive) is
a crop's red level.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgedx.card import CropPolicy, Detection, ModelCard, Provenance
from edgedx.errors import CardError, EdgeDxError, InputError
from edgedx.runtime.cells import count_red_cells, expected_cell_diameter, parasitaemia
from edgedx.runtime.detections import (
    DetectedBox,
    detect,
    field_decision,
    local_maxima,
    non_maximum_suppression,
    slide_decision,
)
from edgedx.runtime.model import Model
from edgedx.runtime.outputs.overlay import bar_layout, diagnosis_overlay, draw_detections
from edgedx.runtime.outputs.records import DETECTION_COLUMNS, RecordWriter, empty_record
from edgedx.runtime.tiling import sliding_window_predict
from fakes import RedLevelSession

PROVENANCE = Provenance(edgedx_version="0", created_at="2026-01-01T00:00:00+00:00")
SPOT = 20  # planted spots, original pixels


def spot_field(centres: list[tuple[int, int]], size: tuple[int, int] = (300, 400)) -> np.ndarray:
    """A black field with pure-red SPOT×SPOT squares centred at (x, y)."""
    image = np.zeros((*size, 3), np.uint8)
    for x, y in centres:
        image[y - SPOT // 2 : y + SPOT // 2, x - SPOT // 2 : x + SPOT // 2, 0] = 255
    return image


def red_share(tiles: np.ndarray) -> np.ndarray:
    """Fake predict: p(positive) = share of the spot's pixels inside the tile (1 when the whole spot is in it)."""
    at_half = (SPOT // 2) ** 2  # a spot's pixels at scale 0.5
    p = np.clip((tiles[..., 0] > 127).reshape(len(tiles), -1).sum(axis=1) / at_half, 0, 1)
    return np.stack([1 - p, p], axis=1)


POLICY = CropPolicy(tile_size=(32, 32), stride=(8, 8), scale=0.5)  # crops overlap 4× per axis; scale ≠ 1


# -- detect: one per object, in original pixels ---------------------------------------------------


def test_one_detection_per_spot_despite_overlapping_crops_with_boxes_in_original_pixels() -> None:
    centres = [(80, 70), (300, 200)]
    sliding = sliding_window_predict(spot_field(centres), red_share, POLICY)
    assert (sliding.tile_probabilities[:, 1] >= 0.5).sum() > 2 * len(centres)  # many crops see each spot
    found = detect(sliding, 1, 0.5, 0.3)
    assert len(found) == len(centres)
    for d in found:  # 32-px crops at scale 0.5 are 64 px of the original, holding a whole spot
        assert (d.w, d.h) == (64, 64) and 0 <= d.x and d.x + d.w <= 400 and 0 <= d.y and d.y + d.h <= 300
        assert any(d.x <= x - SPOT // 2 and x + SPOT // 2 <= d.x + d.w and d.y <= y - SPOT // 2 and y + SPOT // 2 <= d.y + d.h for x, y in centres)
    scores = [d.score for d in found]
    assert scores == sorted(scores, reverse=True)


def test_nothing_above_the_threshold_finds_nothing() -> None:
    sliding = sliding_window_predict(spot_field([]), red_share, POLICY)
    assert detect(sliding, 1, 0.5, 0.3) == []
    with pytest.raises(InputError, match="threshold"):
        detect(sliding, 1, 1.5, 0.3)


def test_boxes_at_the_edge_are_clipped_to_the_image() -> None:
    sliding = sliding_window_predict(spot_field([(12, 12)], size=(50, 70)), red_share, POLICY)
    [d] = detect(sliding, 1, 0.5, 0.3)
    assert d.x >= 0 and d.y >= 0 and d.x + d.w <= 70 and d.y + d.h <= 50


def test_tied_neighbours_give_one_candidate() -> None:
    values = np.array([[0.1, 0.9, 0.9, 0.1], [0.1, 0.2, 0.2, 0.1], [np.nan, 0.1, 0.1, 0.95]])
    peaks = local_maxima(values)
    assert peaks.sum() == 2 and peaks[0, 1] and peaks[2, 3]


def test_nms_keeps_the_higher_of_two_overlapping_boxes_and_both_far_apart() -> None:
    overlapping = np.array([[0, 0, 10, 10], [1, 1, 11, 11]], float)
    assert non_maximum_suppression(overlapping, np.array([0.6, 0.9]), 0.3).tolist() == [1]
    far = np.array([[0, 0, 10, 10], [50, 50, 60, 60]], float)
    assert non_maximum_suppression(far, np.array([0.6, 0.9]), 0.3).tolist() == [1, 0]


def test_field_and_slide_rules_say_what_they_mean() -> None:
    boxes = [DetectedBox(0, 0, 8, 8, 0.9), DetectedBox(20, 0, 8, 8, 0.8)]
    assert field_decision(boxes, np.array([0.9, 0.8]), "any", 1, 0.62, name="parasitized") == (
        True, "positive field: 2 parasitized candidates at p ≥ 0.62 (rule: at least 1)")
    positive, text = field_decision(boxes, np.array([0.9, 0.8]), "count_at_least", 3, 0.62)
    assert not positive and "at least 3" in text
    positive, text = field_decision([], np.array([0.9, 0.7, np.nan, 0.1]), "top_k_mean", 2, 0.62, 0.75)
    assert positive and "0.800" in text
    assert slide_decision([False, True, False], "any_field", 1)[0]
    assert not slide_decision([False, True, False], "count_at_least", 2)[0]


# -- red cells and parasitaemia -----------------------------------------------------------------------


def discs(centres: list[tuple[int, int]], size: tuple[int, int], diameter: int = 30, seed: int = 0) -> np.ndarray:
    """Dark pinkish discs with a paler centre on light glass, with a little noise, RGB."""
    image = np.full((*size, 3), (205, 215, 200), np.uint8)
    for x, y in centres:
        cv2.circle(image, (x, y), diameter // 2, (150, 120, 140), -1, cv2.LINE_AA)
        cv2.circle(image, (x, y), diameter // 6, (175, 150, 165), -1, cv2.LINE_AA)
    noise = np.random.default_rng(seed).normal(0, 3, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def test_separate_discs_are_counted() -> None:
    centres = [(40 + 55 * i, 40 + 55 * j) for i in range(7) for j in range(5)]
    n = count_red_cells(discs(centres, (300, 420)), 30).count
    assert n is not None and abs(n - len(centres)) <= 0.1 * len(centres)


def test_touching_discs_are_split() -> None:
    centres = [(40 + 90 * i + dx, 40 + 60 * j) for i in range(4) for j in range(4) for dx in (0, 29)]  # pairs that touch
    n = count_red_cells(discs(centres, (260, 400)), 30).count
    assert n is not None and abs(n - len(centres)) <= 0.1 * len(centres)


def test_a_wrong_size_prior_is_corrected_by_the_field() -> None:
    centres = [(40 + 55 * i, 40 + 55 * j) for i in range(7) for j in range(5)]
    n = count_red_cells(discs(centres, (300, 420)), 40).count  # 33% too large
    assert n is not None and abs(n - len(centres)) <= 0.1 * len(centres)


def test_blank_glass_has_no_cells_and_says_why() -> None:
    counted = count_red_cells(np.full((200, 300, 3), 210, np.uint8), 30)
    assert counted.count == 0 and "no contrast" in (counted.note or "")
    assert count_red_cells(np.zeros((100, 100), np.uint8), 30).count == 0
    with pytest.raises(InputError, match="diameter"):
        count_red_cells(np.zeros((10, 10, 3), np.uint8), 0)


def test_expected_diameter_from_the_card() -> None:
    assert expected_cell_diameter((64, 64))[0] == 64
    assert expected_cell_diameter((64, 64), 0.5, 0.25)[0] == pytest.approx(7.5 / 0.25 * 0.5)


def test_parasitaemia_with_a_wilson_interval() -> None:
    rate = parasitaemia(5, 100)
    assert rate["percent"] == 5.0 and rate["n_parasites"] == 5 and rate["n_cells"] == 100
    assert rate["ci95"] == pytest.approx([2.1544, 11.1758], abs=1e-3)
    assert parasitaemia(0, 50)["ci95"][0] == 0.0 and parasitaemia(0, 50)["ci95"][1] == pytest.approx(7.1348, abs=1e-3)
    none = parasitaemia(3, 0)
    assert none["percent"] is None and none["ci95"] is None and "no red cells" in none["note"]


# -- the card ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"tile_threshold": 1.5}, "detection.tile_threshold"),
        ({"field_threshold": -0.1}, "detection.field_threshold"),
        ({"nms_iou": 0.0}, "detection.nms_iou"),
        ({"field_k": 0}, "detection.field_k"),
        ({"slide_k": 2.5}, "detection.slide_k"),
        ({"field_rule": "most"}, "detection.field_rule"),
        ({"slide_rule": "all"}, "detection.slide_rule"),
        ({"count_cells": True}, "detection.count_cells"),
    ],
)
def test_detection_settings_are_checked_naming_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(CardError, match=field.replace(".", r"\.")) as info:
        Detection(**changes)
    assert isinstance(info.value, EdgeDxError)


def test_a_schema_4_card_reads_with_detection_off() -> None:
    data = json.loads(make_card().to_json())
    data["schema_version"] = 4
    for added in ("ensemble", "threshold_choice", "detection"):
        del data[added]
    del data["crop"]["tta"]
    assert ModelCard.from_dict(data).detection == Detection()


# -- records, CSV, overlay ------------------------------------------------------------------------------


def make_card(detection: Detection | None = None) -> ModelCard:
    """A binary card for the red-level fake: p(parasitized) = a crop's mean red; 16-px crops every 8 px."""
    return ModelCard(
        arch="fake", task="binary", class_names=("uninfected", "parasitized"), positive_class="parasitized", threshold=0.5,
        input_size=(16, 16), crop=CropPolicy(tile_size=(16, 16), stride=(8, 8)), provenance=PROVENANCE,
        input_format="uint8_nhwc", detection=detection or Detection(),
    )


def red_squares() -> np.ndarray:
    image = np.zeros((64, 96, 3), np.uint8)
    image[8:24, 8:24, 0] = 255
    image[40:56, 64:80, 0] = 255
    return image


BASE_KEYS = {
    "label", "decision", "probabilities", "top_k", "n_crops", "tiles_used", "tiles_skipped", "timings_ms", "input_sha256",
    "threshold", "rule", "prediction_set", "crop_dispersion", "refer_reasons", "reject_reasons", "quality", "scale",
}


def test_a_detection_card_records_its_detections_and_field_decision() -> None:
    model = Model(RedLevelSession(make_card(Detection(enabled=True, count_cells=True))))
    result = model.diagnose(red_squares())
    record = result.to_record()
    assert record["n_detections"] == 2 and len(record["detections"]) == 2
    assert sorted(tuple(d["box"]) for d in record["detections"]) == [(8, 8, 16, 16), (64, 40, 16, 16)]
    assert record["field_decision"]["positive"] and record["field_decision"]["rule"].startswith("positive field: 2 parasitized")
    assert record["cells"]["method"] and "count" in record["cells"]
    assert record["parasitaemia"]["n_parasites"] == 2
    assert {"detect", "count"} <= set(record["timings_ms"])
    assert json.loads(json.dumps(record)) == record  # plain JSON


def test_boxes_land_in_the_file_pixels_when_the_physical_scale_resamples_the_image() -> None:
    card = make_card(Detection(enabled=True, count_cells=True)).replace(um_per_px=0.5)
    twice = cv2.resize(red_squares(), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)  # 0.25 µm/px: halved before the crops
    result = Model(RedLevelSession(card), um_per_px=0.25).diagnose(twice)
    assert result.scale is not None and result.scale["factor"] == 0.5
    assert sorted(tuple(d.box) for d in result.findings.detections) == [(16, 16, 32, 32), (128, 80, 32, 32)]  # type: ignore[union-attr]


def test_records_of_a_card_without_detection_are_unchanged() -> None:
    record = Model(RedLevelSession(make_card())).diagnose(red_squares()).to_record()
    assert set(record) == BASE_KEYS and set(record["timings_ms"]) == {"read", "diagnose"}


def test_csv_has_detection_columns_only_when_asked(tmp_path: Path) -> None:
    model = Model(RedLevelSession(make_card(Detection(enabled=True, count_cells=True))))
    record = {**empty_record("field.png"), **model.diagnose(red_squares()).to_record()}
    with RecordWriter(tmp_path / "with.csv", model.card.class_names, detection=True) as writer:
        writer.write(record)
    with RecordWriter(tmp_path / "without.csv", model.card.class_names) as writer:
        writer.write(record)
    [row] = list(csv.DictReader((tmp_path / "with.csv").open(encoding="utf-8")))
    assert row["n_detections"] == "2" and row["field_positive"] == "True"
    assert sorted(b[:4] for b in json.loads(row["detections"])) == [[8, 8, 16, 16], [64, 40, 16, 16]]
    header = next(csv.reader((tmp_path / "without.csv").open(encoding="utf-8")))
    assert not set(DETECTION_COLUMNS) & set(header)


def test_overlay_outlines_each_detection() -> None:
    image = np.full((120, 160, 3), 90, np.uint8)
    box = DetectedBox(40, 30, 50, 40, 0.93)
    drawn = draw_detections(image, [box])
    changed = np.any(drawn != image, axis=2)
    assert changed[30, 40:90].any() and changed[30:70, 40].any() and changed[69, 40:90].any()  # the outline
    assert not changed[45:60, 55:75].any()  # not the inside: the object stays visible
    model = Model(RedLevelSession(make_card(Detection(enabled=True))))
    result = model.diagnose(red_squares())
    assert result.findings is not None and len(result.findings.detections) == 2
    shown = {}
    for name, diagnosis in (("boxes", result), ("plain", Model(RedLevelSession(make_card())).diagnose(red_squares()))):
        canvas = diagnosis_overlay(red_squares(), diagnosis, model.card)
        bar = bar_layout(canvas.shape[1]).height
        shown[name] = canvas[canvas.shape[0] - bar - 64 : canvas.shape[0] - bar, :96]  # the image between banner and bar
    changed = np.any(shown["boxes"] != shown["plain"], axis=2)
    assert changed[8, 8:24].any() and changed[40:56, 64].any() and not changed[30:36, 30:60].any()


def test_the_slide_rule_is_chosen_where_one_stray_field_would_flag_a_clean_slide() -> None:
    from edgedx.runtime.detection_metrics import choose_slide_rule, slide_point

    # slides P1, P2 infected (2 and 3 positive fields found); N1, N2 clean but N1 has one field flagged by debris
    ids = ["P1"] * 3 + ["P2"] * 3 + ["N1"] * 3 + ["N2"] * 2
    truth = np.array([1, 1, 0, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    decided = np.array([1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0], bool)
    n = len(ids)
    rows = {"truth": truth, "decided": decided, "positives": truth.astype(np.int64), "detections": decided.astype(np.int64),
            "cells": np.full(n, 100.0), "cells_annotated": np.full(n, 100.0)}
    (rule, k), note = choose_slide_rule(rows, ids)  # type: ignore[misc]
    assert (rule, k) == ("count_at_least", 2)
    assert note["by_k"]["1"]["specificity"] == 0.5 and note["by_k"]["2"]["balanced_accuracy"] == 1.0 and note["by_k"]["3"]["sensitivity"] == 0.5
    point = slide_point(rows, ids, rule, k)
    assert (point["n_slides"], point["n_positive_slides"], point["sensitivity"], point["specificity"]) == (4, 2, 1.0, 1.0)
    assert point["parasitaemia_mae_points"] == pytest.approx(np.mean([0, 0, 100 / 300, 0]))
    assert choose_slide_rule({**rows, "truth": np.ones(n, bool)}, ids) is None  # every slide infected: nothing to choose on
