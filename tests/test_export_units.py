"""Parity comparison and the export's refusal to leave a failing model deployable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import Trained

pytest.importorskip("torch")
pytest.importorskip("onnx")

from edgedx.card import CropPolicy, ModelCard, Provenance  # noqa: E402
from edgedx.errors import ParityError  # noqa: E402
from edgedx.export import parity as parity_mod  # noqa: E402
from edgedx.export.parity import compare_logits, parity_inputs  # noqa: E402


def card() -> ModelCard:
    return ModelCard(
        arch="x", task="binary", class_names=("neg", "pos"), positive_class="pos", threshold=0.5,
        input_size=(8, 8), crop=CropPolicy((8, 8), (4, 4)), provenance=Provenance("0", "2026-01-01T00:00:00+00:00"),
    )


def test_compare_logits_reports_the_evidence() -> None:
    ref = np.array([[2.0, -1.0], [0.5, 0.4], [-3.0, 3.0]], np.float32)
    same = compare_logits(ref, ref + 1e-6, card(), "fp32")
    assert same.passed and same.top1_agreement == 1.0 and same.max_abs_diff == pytest.approx(1e-6, rel=0.05)

    flipped = ref.copy()
    flipped[1] = [0.4, 0.5]  # second sample's top-1 changes
    report = compare_logits(ref, flipped, card(), "fp32")
    assert not report.passed
    assert report.top1_agreement == pytest.approx(2 / 3)
    assert report.max_abs_diff == pytest.approx(0.1, abs=1e-6)
    assert report.max_rel_diff == pytest.approx(0.1 / 0.4, rel=1e-5)
    assert 0 < report.max_prob_delta < 0.1


def test_parity_inputs_are_preprocessed_and_include_given_images() -> None:
    given = np.full((2, 8, 8, 3), 255, np.uint8)
    x = parity_inputs(card(), 5, images=given)
    assert x.shape == (5, 3, 8, 8) and x.dtype == np.float32
    expected = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x[0, :, 0, 0], expected, rtol=1e-5)
    assert x[2:].std() > 0.1  # the random images vary


def test_export_fails_loudly_and_quarantines_on_parity_failure(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgedx.export import pipeline

    def broken_verify(model, onnx_path, card, **kwargs):
        ref = np.zeros((4, 2))
        return compare_logits(ref, ref + 0.5, card, "fp32")

    monkeypatch.setattr(pipeline, "verify_onnx", broken_verify)
    out = tmp_path / "export"
    with pytest.raises(ParityError, match="does not match PyTorch: max abs diff 0.5"):
        pipeline.export_checkpoint(trained.checkpoint, out)
    assert not (out / "model.onnx").exists()
    assert (out / "model.onnx.failed").exists()
    report = json.loads((out / "export_report.json").read_text())
    assert report["parity"]["fp32"]["passed"] is False
    assert parity_mod.TOLERANCES["fp32"]["atol"] == report["parity"]["fp32"]["atol"]
