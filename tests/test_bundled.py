"""The bundled default model: a real, verified export with its card, usable with no training."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from edgedx.errors import InputError  # noqa: E402
from edgedx.runtime import load_model  # noqa: E402
from edgedx.runtime.bundled import DEFAULT_MODEL, bundled_model_path, bundled_models  # noqa: E402


def test_the_default_model_is_bundled_with_a_complete_card() -> None:
    [model] = [m for m in bundled_models() if m.name == DEFAULT_MODEL]
    card = model.card
    assert card.task == "binary" and card.class_names == ("melanoma", "nevus") and card.positive_class == "melanoma"
    # every choice out of fold: the threshold with its interval, the metrics labelled as the fit they are
    assert card.threshold_choice.source == "out_of_fold" and card.threshold_choice.interval is not None
    assert card.threshold_choice.interval[0] <= card.threshold <= card.threshold_choice.interval[1]
    assert card.metrics["split"] == "out_of_fold" and card.metrics["auc"] > 0.75
    assert card.ensemble.members >= 2 and card.ensemble.combine == "mean_probability"
    assert "not a medical device" in card.intended_use and "Held out" in card.intended_use
    assert model.path.stat().st_size < 25e6  # a 3-member fp16 fold ensemble, about 7 MB a member


def test_the_default_model_proves_itself_here() -> None:
    """The shipped file carries self-test vectors; replaying them on this CPU passes its fp16 tolerances."""
    from edgedx.runtime.selftest import verify_artefact

    report = verify_artefact(bundled_model_path(), "cpu")
    assert report.passed and report.n >= 8, report.summary()


def test_the_default_model_diagnoses_an_odd_sized_image() -> None:
    model = load_model(bundled_model_path())
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (237, 511, 3), dtype=np.uint8)
    result = model.diagnose(image)
    assert result.label in ("melanoma", "nevus") and result.n_crops >= 1
    assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_an_unknown_bundled_name_lists_the_known_ones() -> None:
    with pytest.raises(InputError, match="isic_mel_nv"):
        bundled_model_path("chest")


def test_the_bundled_model_ships_with_its_checksum() -> None:
    from edgedx.runtime.io.integrity import expected_sha256, sha256_file, verify_model_file

    path = bundled_model_path()
    assert expected_sha256(path) == (sha256_file(path), path.with_name(path.name + ".sha256"))  # recorded, so checked
    assert verify_model_file(path) == sha256_file(path)
