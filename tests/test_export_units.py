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
from edgedx.errors import InputError, ParityError  # noqa: E402
from edgedx.export import parity as parity_mod  # noqa: E402
from edgedx.export.parity import compare_logits, parity_crops, parity_inputs  # noqa: E402
from edgedx.export.precision import parse_precisions  # noqa: E402


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
    assert report.top1_agreement == pytest.approx(2 / 3) and report.decision_agreement == pytest.approx(2 / 3)
    assert report.max_abs_diff == pytest.approx(0.1, abs=1e-6)
    assert report.max_rel_diff == pytest.approx(0.1 / 0.4, rel=1e-5)
    assert 0 < report.max_prob_delta < 0.1
    assert any("logits differ" in f for f in report.failures) and any("top-1 agreement" in f for f in report.failures)


def test_reduced_precisions_are_judged_by_agreement_and_probability_change() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(0, 3, (200, 2))
    # fp16-like noise: logits off by 1e-2, far above the fp32 tolerance, probabilities barely move
    noisy = ref + rng.normal(0, 1e-2, ref.shape)
    assert not compare_logits(ref, noisy, card(), "fp32").passed
    fp16 = compare_logits(ref, noisy, card(), "fp16")
    assert fp16.passed, fp16.failures
    # int8-like: a few borderline samples flip (2 of 200) and one probability moves a lot: still acceptable
    coarse = ref + rng.normal(0, 0.05, ref.shape)
    near = np.argsort(np.abs(ref[:, 1] - ref[:, 0]))[:2]
    coarse[near] = coarse[near][:, ::-1]
    int8 = compare_logits(ref, coarse, card(), "int8")
    assert int8.passed, int8.failures
    assert int8.top1_agreement == pytest.approx(0.99)
    # but not when one in five decisions changes
    bad = ref.copy()
    bad[::5] = bad[::5][:, ::-1]
    worse = compare_logits(ref, bad, card(), "int8")
    assert not worse.passed and any("decision agreement" in f for f in worse.failures)


def test_labelled_set_reports_accuracy_and_auc_deltas() -> None:
    ref = np.array([[2.0, -1.0], [-1.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 1, 0, 1])
    same = compare_logits(ref, ref, card(), "int8", labels=labels)
    assert same.labelled == {
        "n": 4, "reference_accuracy": 1.0, "accuracy": 1.0, "accuracy_delta": 0.0,
        "reference_auc": 1.0, "auc": 1.0, "auc_delta": 0.0,
    }
    worse = ref.copy()
    worse[2] = [0.0, 1.0]  # one negative now called positive
    report = compare_logits(ref, worse, card(), "int8", labels=labels)
    assert report.labelled["accuracy"] == 0.75 and report.labelled["accuracy_delta"] == -0.25
    assert report.labelled["auc"] < 1.0
    # on 4 images one image is 25%: the accuracy rule tolerates it, the agreement rule does not
    assert not any("accuracy fell" in f for f in report.failures)
    assert any("decision agreement at the operating threshold 0.750" in f for f in report.failures)
    # one changed image in 40 is tolerated for int8 (a single image is 2.5%), two are not
    ref40 = np.tile(ref, (10, 1))
    labels40 = np.tile(labels, 10)
    one = ref40.copy()
    one[2] = [0.0, 1.0]
    assert compare_logits(ref40, one, card(), "int8", labels=labels40).labelled["accuracy_delta"] == pytest.approx(-0.025)
    assert not any("accuracy fell" in f for f in compare_logits(ref40, one, card(), "int8", labels=labels40).failures)
    two = one.copy()
    two[6] = [0.0, 1.0]
    failures = compare_logits(ref40, two, card(), "int8", labels=labels40).failures
    assert any("accuracy fell from 1.000 to 0.950 on 40 labelled images (tolerance 0.03)" in f for f in failures)


def test_parity_crops_and_inputs_include_given_images() -> None:
    given = np.full((2, 8, 8, 3), 255, np.uint8)
    crops = parity_crops(card(), 5, images=given)
    assert crops.shape == (5, 8, 8, 3) and crops.dtype == np.uint8
    np.testing.assert_array_equal(crops[:2], given)
    assert crops[2:].std() > 10  # the random images vary
    assert len(parity_crops(card(), 1, images=given)) == 2  # real images are never dropped
    x = parity_inputs(card(), 5, images=given)
    assert x.shape == (5, 3, 8, 8) and x.dtype == np.float32
    expected = (1.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x[0, :, 0, 0], expected, rtol=1e-5)


def test_parse_precisions() -> None:
    assert parse_precisions("int8, FP16") == ("fp32", "fp16", "int8")
    assert parse_precisions("fp32") == ("fp32",)
    with pytest.raises(InputError, match="unknown precision 'bf16'"):
        parse_precisions("bf16")


def test_export_fails_loudly_and_quarantines_on_parity_failure(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgedx.export import pipeline

    def broken_compare(reference, candidate, card, precision, **kwargs):
        ref = np.zeros((4, 2))
        return compare_logits(ref, ref + 0.5, card, precision)

    monkeypatch.setattr(pipeline, "compare_outputs", broken_compare)
    out = tmp_path / "export"
    with pytest.raises(ParityError, match=r"model.onnx \(fp32 onnx\) refused: logits differ by up to 0.5.*nothing was derived from it"):
        pipeline.export_checkpoint(trained.checkpoint, out, pipeline.ExportOptions(precisions=("fp32", "fp16")))
    assert not (out / "model.onnx").exists()
    assert (out / "model.onnx.failed").exists()
    assert not (out / "model.fp16.onnx").exists()  # nothing is derived from a failing graph
    report = json.loads((out / "export_report.json").read_text())
    [entry] = report["artefacts"]
    assert entry["parity"]["passed"] is False and entry["quarantined_as"] == "model.onnx.failed"
    assert parity_mod.TOLERANCES["fp32"].atol == entry["parity"]["tolerance"]["atol"]


def test_a_refused_variant_leaves_the_passing_artefacts_and_names_the_next_step(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate both ways on one export, with the comparison injected: no CPU's fp16/int8 rounding decides it."""
    from edgedx.errors import PartialExportError
    from edgedx.export import pipeline

    real_compare = pipeline.compare_outputs

    def fp16_refused(reference, candidate, card, precision, **kwargs):
        if precision != "fp16":
            return real_compare(reference, candidate, card, precision, **kwargs)
        ref = np.zeros((20, 2))
        flipped = ref.copy()
        flipped[:3] = [-1.0, 1.0]
        return compare_logits(ref, flipped, card, precision)

    monkeypatch.setattr(pipeline, "compare_outputs", fp16_refused)
    out = tmp_path / "export"
    with pytest.raises(PartialExportError) as info:
        pipeline.export_checkpoint(trained.checkpoint, out, pipeline.ExportOptions(precisions=("fp32", "fp16")))
    message = str(info.value)
    assert "passed model.onnx" in message and "model.fp16.onnx (fp16 onnx) refused: top-1 agreement 0.850 < 0.98" in message
    assert "Next: ship model.onnx" in message and "fp16 is optional" in message
    assert (out / "model.onnx").is_file() and (out / "model.onnx.sha256").is_file()  # the passing artefact stays, deployable
    assert (out / "model.fp16.onnx.failed").is_file() and not (out / "model.fp16.onnx").exists()
    report = json.loads((out / "export_report.json").read_text())
    assert [a["parity"]["passed"] for a in report["artefacts"]] == [True, False]

    monkeypatch.setattr(pipeline, "compare_outputs", real_compare)  # a later export that passes
    pipeline.export_checkpoint(trained.checkpoint, out, pipeline.ExportOptions(precisions=("fp32",)))
    assert not list(out.glob("*.failed"))  # no stale refusals beside the new artefacts


def test_export_progress_never_passes_its_total(trained: Trained, tmp_path: Path) -> None:
    from edgedx.export.pipeline import ExportOptions, export_checkpoint

    seen: list[tuple[int, int]] = []
    export_checkpoint(trained.checkpoint, tmp_path / "out", ExportOptions(), progress=lambda stage, done, total, info="": seen.append((done, total)))
    assert seen and all(done <= total for done, total in seen) and seen[-1][0] == seen[-1][1]
