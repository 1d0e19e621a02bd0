"""Choosing what a model says: the class it screens for, the operating threshold, the warnings before export.

Torch-free (edgedx.training.data and edgedx.training.threshold work on numpy arrays of merged probabilities).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgedx.card import CropPolicy, ModelCard, Provenance
from edgedx.errors import InputError
from edgedx.training.data import pick_positive_class
from edgedx.training.threshold import operating_point, quality_warnings


def test_positive_class_choice() -> None:
    assert pick_positive_class(("melanoma", "nevus"), None) == "melanoma"
    assert pick_positive_class(("normal", "pneumonia"), None) == "pneumonia"
    assert pick_positive_class(("parasitized", "uninfected"), None) == "parasitized"
    with pytest.raises(InputError, match=r"which class should this model screen for\? Neither of \['MEL', 'NV'\].*--positive-class MEL or --positive-class NV"):
        pick_positive_class(("MEL", "NV"), None)  # ISIC's own names: never a silent pick
    assert pick_positive_class(("a", "b"), "a") == "a"
    with pytest.raises(InputError, match="'c' is not one of"):
        pick_positive_class(("a", "b"), "c")


def test_operating_point_reaches_target() -> None:
    card = ModelCard(
        arch="x", task="binary", class_names=("neg", "pos"), positive_class="pos", threshold=0.5, input_size=(8, 8),
        crop=CropPolicy((8, 8), (4, 4)), provenance=Provenance("0", "2026-01-01T00:00:00+00:00"),
    )
    scores = np.array([0.1, 0.2, 0.35, 0.4, 0.6, 0.7, 0.8, 0.9, 0.3, 0.55])
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 0])
    probs = np.stack([1 - scores, scores], axis=1)
    point = operating_point(y, probs, card, target=1.0)
    assert point["threshold"] <= 0.3 and point["card_metrics"]["sensitivity"] == 1.0
    assert point["threshold"] > 0.2  # the highest threshold that still catches every positive
    assert point["threshold"] == pytest.approx(0.25)  # centred between the lowest positive (0.3) and the next score (0.2)
    point = operating_point(y, probs, card, target=0.8)
    assert point["threshold"] == pytest.approx((0.6 + 0.55) / 2) and point["card_metrics"]["sensitivity"] == 0.8
    assert point["card_metrics"]["specificity"] == 1.0
    # Perfectly separated scores: target 0.8 still catches every positive, centred in the gap.
    separated = np.array([0.1, 0.2, 0.3, 0.9, 0.95, 0.97, 0.99, 0.995])
    truth = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    point = operating_point(truth, np.stack([1 - separated, separated], axis=1), card, target=0.8)
    assert point["threshold"] == pytest.approx(0.6)
    assert point["card_metrics"]["sensitivity"] == 1.0 and point["card_metrics"]["specificity"] == 1.0


def test_a_useless_model_is_warned_about() -> None:
    card = ModelCard(
        arch="x", task="binary", class_names=("MEL", "NV"), positive_class="MEL", threshold=0.2, input_size=(8, 8),
        crop=CropPolicy((8, 8), (4, 4)), provenance=Provenance("0", "2026-01-01T00:00:00+00:00"),
    )
    final = {"metrics": {"at_threshold": {"macro_auc": 0.44, "per_class": {
        "MEL": {"sensitivity": 1.0, "specificity": 0.0}, "NV": {"sensitivity": 0.0, "specificity": 1.0}}}}}
    warnings = quality_warnings(final, card)
    assert warnings == [
        "validation AUC is 0.440 (≤ 0.6; 0.5 is chance): the model barely separates the classes",
        "validation specificity for MEL is 0.000 at threshold 0.20: it calls almost everything MEL",
    ]
    good = {"metrics": {"at_threshold": {"macro_auc": 0.93, "per_class": {"MEL": {"sensitivity": 0.95, "specificity": 0.7}}}}}
    assert quality_warnings(good, card) == []
    multi = card.replace(task="multiclass", class_names=("a", "b", "c"), positive_class=None, threshold=None)
    never = {"metrics": {"macro_auc": 0.8, "per_class": {"a": {"sensitivity": 0.9, "specificity": 0.9}, "b": {"sensitivity": 0.0, "specificity": 1.0},
                                                        "c": {"sensitivity": 0.8, "specificity": 0.9}}}}
    assert quality_warnings(never, multi) == ["validation sensitivity for b is 0.000 at argmax: it almost never calls b"]
