"""Refer instead of diagnose: split-conformal prediction sets, crops that disagree and the refer band, each with its
reason in the record and the rule.

A fake session whose crop probabilities are the test's choice (binary: p(positive) = mean red / 256; three
classes: the mean RGB shares), so every set and dispersion below is known in advance.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from edgedx.card import Abstention, Calibration, CropPolicy, ModelCard, Provenance
from edgedx.runtime.model import Model
from edgedx.runtime.trust import crop_dispersion
from fakes import RedLevelSession as ColourSession

TILE = 16
PROVENANCE = Provenance(edgedx_version="0", created_at="2026-01-01T00:00:00+00:00")


def card(task: str = "binary", **changes: Any) -> ModelCard:
    fields: dict[str, Any] = {
        "binary": {"class_names": ("nevus", "melanoma"), "positive_class": "melanoma", "threshold": 0.5},
        "multiclass": {"class_names": ("red", "green", "blue")},
    }[task]
    return ModelCard(
        arch="fake", task=task, input_size=(TILE, TILE), crop=CropPolicy(tile_size=(TILE, TILE), stride=(TILE, TILE)),
        provenance=PROVENANCE, input_format="uint8_nhwc", **{**fields, **changes},
    )


def red(level: float, height: int = TILE, width: int = 2 * TILE) -> np.ndarray:
    """An image whose every crop has p(melanoma) ≈ ``level``."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = int(round(level * 256 - 1))
    return image


def halves(left: float, right: float) -> np.ndarray:
    """Two crops side by side with p(melanoma) ≈ ``left`` and ≈ ``right``."""
    return np.concatenate([red(left, width=TILE), red(right, width=TILE)], axis=1)


def record(model_card: ModelCard, image: np.ndarray, **settings: Any) -> dict[str, Any]:
    return Model(ColourSession(model_card), **settings).diagnose(image).to_record()


def test_a_prediction_set_of_two_classes_refers_with_its_reason() -> None:
    conformal = card(abstention=Abstention(coverage=0.95, qhat=0.6))
    unsure = record(conformal, red(0.55))
    assert unsure["prediction_set"] == ["melanoma", "nevus"] and unsure["decision"] == "refer" and unsure["label"] == "melanoma"
    assert unsure["refer_reasons"] == ["prediction set {melanoma, nevus} at 95% coverage"]
    assert unsure["rule"].endswith("; prediction set {melanoma, nevus} at 95% coverage → refer to a person")
    sure = record(conformal, red(0.9))
    assert sure["prediction_set"] == ["melanoma"] and sure["decision"] == "melanoma" and sure["refer_reasons"] == []


def test_an_empty_prediction_set_refers_too_and_multiclass_sets_work() -> None:
    empty = record(card(abstention=Abstention(coverage=0.9, qhat=0.2)), red(0.5))
    assert empty["prediction_set"] == [] and empty["refer_reasons"] == ["prediction set {} at 90% coverage"]
    three = card("multiclass", abstention=Abstention(coverage=0.8, qhat=0.7))
    mixed = np.full((TILE, TILE, 3), (120, 110, 0), np.uint8)  # red and green about equal, no blue
    result = record(three, mixed)
    assert result["prediction_set"] == ["red", "green"] and result["decision"] == "refer"
    clear = record(three, np.full((TILE, TILE, 3), (250, 10, 10), np.uint8))
    assert clear["prediction_set"] == ["red"] and clear["decision"] == "red"
    without_coverage = record(card(abstention=Abstention(qhat=0.6)), red(0.55))
    assert without_coverage["refer_reasons"] == ["prediction set {melanoma, nevus} at qhat 0.6"]


def test_crops_that_disagree_refer_and_the_dispersion_is_recorded() -> None:
    limited = card(abstention=Abstention(dispersion_limit=0.2))
    split = record(limited, halves(0.1, 0.9))
    assert split["crop_dispersion"] == pytest.approx(0.4, abs=0.01) and split["decision"] == "refer"
    assert split["refer_reasons"] == [f"crops disagree: dispersion {split['crop_dispersion']:.3g} > limit 0.2"]
    agree = record(limited, halves(0.8, 0.82))
    assert agree["crop_dispersion"] < 0.02 and agree["decision"] == "melanoma" and agree["prediction_set"] is None
    single = record(limited, red(0.9, width=TILE))
    assert single["crop_dispersion"] is None and single["decision"] == "melanoma"


def test_dispersion_uses_the_calibrated_crop_probabilities() -> None:
    temperature = 2.0
    calibrated = card(abstention=Abstention(dispersion_limit=0.9), calibration=Calibration("temperature", (temperature,)))
    result = record(calibrated, halves(0.1, 0.9))
    logits = np.log(np.array([[0.9, 0.1], [0.1, 0.9]]))  # approximately what the fake session returns for the two crops
    scaled = np.exp(logits / temperature)
    expected = crop_dispersion(scaled / scaled.sum(axis=1, keepdims=True), 1)
    assert result["crop_dispersion"] == pytest.approx(expected, abs=0.01) and result["crop_dispersion"] < 0.35


def test_the_refer_band_still_refers_and_reasons_add_up() -> None:
    plain = card()
    inside = record(plain, red(0.45), refer_band=(0.4, 0.6))
    assert inside["decision"] == "refer" and inside["refer_reasons"] == ["inside the refer band [0.4, 0.6)"]
    assert inside["rule"].endswith("inside the refer band [0.4, 0.6) → refer to a person")
    outside = record(plain, red(0.7), refer_band=(0.4, 0.6))
    assert outside["decision"] == "melanoma" and outside["refer_reasons"] == []
    every = card(abstention=Abstention(coverage=0.95, qhat=0.6, dispersion_limit=0.1))
    both = record(every, halves(0.3, 0.75), refer_band=(0.4, 0.6))
    assert [r.split(" ")[0] for r in both["refer_reasons"]] == ["prediction", "crops", "inside"]
    assert both["rule"].count(";") == 3 and both["rule"].endswith("; inside the refer band [0.4, 0.6) → refer to a person")


def test_a_card_without_rules_records_no_set_and_no_reasons() -> None:
    result = record(card(), halves(0.1, 0.9))
    assert result["prediction_set"] is None and result["crop_dispersion"] is None and result["refer_reasons"] == []
    assert result["reject_reasons"] == [] and result["decision"] == "melanoma"
