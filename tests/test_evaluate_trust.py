"""evaluate's trust figures (issue 22): calibration before → after, conformal coverage, refer and reject.

A tiny ONNX model (global mean colour → logits, overconfident on purpose) gets
its temperature and qhat fitted through the deployed path on one set of images
(as training or a site recalibration would) and is evaluated on another.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgedx.card import ONNX_METADATA_KEY, CropPolicy, ModelCard, Provenance
from edgedx.runtime.evaluate import EvaluationReport, evaluate, trust_lines, trust_report
from edgedx.runtime.fitting import crop_logits, fit_abstention, fit_calibration, merged_probabilities
from edgedx.runtime.io.image_io import write_image
from edgedx.runtime.model import Model, load_model
from edgedx.runtime.trust import expected_calibration_error, prediction_set

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

CLASSES = ("neg", "pos")
BASE = ModelCard(
    arch="tiny-mean", task="binary", class_names=CLASSES, positive_class="pos", threshold=0.5, input_size=(8, 8),
    crop=CropPolicy(tile_size=(8, 8), stride=(4, 4)), provenance=Provenance("0", "2026-01-01T00:00:00+00:00"),
)


def tiny_onnx(path: Path, card: ModelCard) -> Path:
    """GlobalAveragePool → Gemm: logit(pos) − logit(neg) = 12 × the crop's mean normalised red. Overconfident."""
    from onnx import TensorProto, helper, numpy_helper

    weights = np.zeros((3, 2), np.float32)
    weights[0] = (-6.0, 6.0)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])],
        initializer=[numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.array([0.0, -0.6], np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.metadata_props.add(key=ONNX_METADATA_KEY, value=card.to_json(indent=None))
    onnx.save(model, str(path))
    return path


def labelled_folder(root: Path, n: int, seed: int) -> Path:
    """12×12 images whose red level depends on the class, overlapping: a model sure of itself is often wrong."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        label = i % 2
        red = np.clip(rng.normal(150 if label else 105, 30), 0, 255)
        image = np.clip(rng.normal((red, 110, 110), 12, (12, 12, 3)), 0, 255).astype(np.uint8)
        (root / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        write_image(root / CLASSES[label] / f"{i:03d}.png", image)
    return root


def fitted_model(tmp_path: Path) -> tuple[Path, Path, ModelCard]:
    """(uncalibrated .onnx, calibrated .onnx with qhat, its card): fitted on one folder through the deployed path."""
    from edgedx.runtime.io.labelled import load_labelled

    raw_path = tiny_onnx(tmp_path / "raw.onnx", BASE)
    fit = load_labelled(labelled_folder(tmp_path / "fit", 300, seed=1), CLASSES)
    crops = crop_logits(load_model(raw_path).session.run, BASE, list(enumerate(fit.images)))
    calibration = fit_calibration(crops, fit.labels, BASE, split="site").calibration
    card = BASE.replace(calibration=calibration)
    card = card.replace(abstention=fit_abstention(crops, fit.labels, card, coverage=0.9, split="site"))
    return raw_path, tiny_onnx(tmp_path / "calibrated.onnx", card), card


def test_evaluate_reports_calibration_coverage_refer_and_reject(tmp_path: Path) -> None:
    raw_path, calibrated_path, card = fitted_model(tmp_path)
    assert card.calibration.temperature[0] > 1.5 and card.abstention.qhat is not None  # it was overconfident
    data = labelled_folder(tmp_path / "new cases", 200, seed=2)
    report = evaluate(calibrated_path, data, bootstrap=0, out=tmp_path / "out")
    cal = report.calibration
    assert cal["method"] == "temperature" and cal["temperature"] == list(card.calibration.temperature) and cal["n"] == 200
    assert cal["fitted_on"]["split"] == "site"
    # "before" is the network's own: exactly what the same graph gives with no temperature on its card
    uncalibrated = evaluate(raw_path, data, bootstrap=0)
    assert cal["before"]["ece"] == pytest.approx(uncalibrated.calibration["after"]["ece"], abs=1e-9)
    assert cal["before"]["brier"] == pytest.approx(uncalibrated.calibration["after"]["brier"], abs=1e-9)
    assert cal["after"]["ece"] < cal["before"]["ece"] and cal["after"]["brier"] < cal["before"]["brier"]
    assert sum(r["n"] for r in cal["after"]["reliability"]) == 200
    ab = report.abstention
    assert ab["coverage_target"] == 0.9 and ab["qhat"] == card.abstention.qhat
    assert ab["all"]["n"] == 200 and ab["all"]["accuracy"] == pytest.approx(report.metrics["accuracy"])
    assert ab["all"]["sensitivity"] == pytest.approx(report.metrics["sensitivity"])
    if ab["n_with_sets"]:  # the records carry the runtime's prediction sets: coverage is the share holding the truth
        probs = merged_probabilities(
            crop_logits(load_model(calibrated_path).session.run, card, [(i, p) for i, p in enumerate(sorted(data.rglob("*.png")))]).logits, card)
        truth = [CLASSES[int(p.parent.name == "pos")] for p in sorted(data.rglob("*.png"))]
        sets = [prediction_set(p, card.abstention.qhat, CLASSES) for p in probs]
        assert ab["empirical_coverage"] == pytest.approx(np.mean([t in s for t, s in zip(truth, sets)]))
    saved = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert saved["calibration"]["after"]["ece"] == pytest.approx(cal["after"]["ece"]) and saved["n_rejected"] == 0
    assert {"empirical_coverage", "refer_rate", "not_referred", "all"} <= set(saved["abstention"])
    assert (tmp_path / "out" / "reliability.png").stat().st_size > 1000
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "Calibration and referral" in page and 'alt="reliability"' in page
    lines = trust_lines(report)
    assert lines[0].startswith(f"calibration (temperature {card.calibration.temperature[0]:.3g}): ECE")
    assert any(line.startswith("prediction sets:") for line in lines) and any(line.startswith("refer: ") for line in lines)
    assert lines[-1] == "reject (image quality): 0 image(s), not scored"


def test_the_cli_prints_a_line_for_each(tmp_path: Path) -> None:
    from conftest import run_edgedx

    _, calibrated_path, card = fitted_model(tmp_path)
    data = labelled_folder(tmp_path / "new", 40, seed=3)
    proc = run_edgedx("evaluate", str(calibrated_path), str(data), "--bootstrap", "0")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"calibration (temperature {card.calibration.temperature[0]:.3g}): ECE" in out and "as deployed" in out
    assert "prediction sets: " in out and "refer: " in out and "reject (image quality): 0 image(s), not scored" in out


# -- records: the runtime's own (prediction_set, refer_reasons, decision refer/reject) ---------------------------------


class Rejected:
    """A diagnosis the quality gate stopped: no label, no probabilities, the reasons (the record's contract)."""

    def __init__(self, reasons: list[str]) -> None:
        self.reasons = reasons

    def to_record(self) -> dict[str, Any]:
        return {"label": None, "decision": "reject", "probabilities": None, "prediction_set": None, "reject_reasons": self.reasons}


class GatedModel(Model):
    """The tiny model, with every third image rejected as a quality gate would."""

    def stream(self, items: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
        for key, result in super().stream(items, **kwargs):
            yield key, (Rejected(["focus 3.0 below the limit 40.0"]) if int(key) % 3 == 0 else result)


def test_rejected_images_are_counted_listed_and_not_scored(tmp_path: Path) -> None:
    _, calibrated_path, _ = fitted_model(tmp_path)
    model = load_model(calibrated_path)
    gated = GatedModel(model.session)
    data = labelled_folder(tmp_path / "new", 30, seed=4)
    report = evaluate(gated, data, bootstrap=0, out=tmp_path / "out")
    assert len(report.rejected) == 10 and report.metrics["n"] == 20 and report.calibration["n"] == 20
    assert report.rejected[0]["reasons"] == ["focus 3.0 below the limit 40.0"] and report.rejected[0]["image"].endswith("000.png")
    assert report.to_dict()["n_rejected"] == 10 and trust_lines(report)[-1] == "reject (image quality): 10 image(s), not scored"
    assert "10 image(s) rejected by the image-quality gate" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")


def test_trust_report_reads_the_records_decisions_and_sets() -> None:
    """Coverage from the records' prediction sets, refer rate from their decisions, metrics on the rest vs all."""
    card = dataclasses.replace(BASE, threshold=0.5)
    truth = np.array([1, 1, 0, 0, 1, 0])
    p_pos = np.array([0.9, 0.45, 0.2, 0.6, 0.55, 0.1])
    probs = np.stack([1 - p_pos, p_pos], axis=1)
    sets = [["pos"], ["neg", "pos"], ["neg"], ["pos"], [], ["neg"]]  # 3 and 4 miss the true class; 1 and 4 are refers
    records = [
        {"decision": "refer" if len(s) != 1 else ("pos" if p >= 0.5 else "neg"), "prediction_set": s,
         "refer_reasons": ["prediction set"] if len(s) != 1 else []}
        for s, p in zip(sets, p_pos)
    ]
    report = trust_report(truth, probs, probs, records, card)
    ab = report["abstention"]
    assert ab["n_with_sets"] == 6 and ab["empirical_coverage"] == pytest.approx(4 / 6) and ab["mean_set_size"] == pytest.approx(1.0)
    assert ab["n_referred"] == 2 and ab["refer_rate"] == pytest.approx(2 / 6) and ab["refer_reasons"] == {"prediction set": 2}
    # decisions at 0.5: right, wrong (0.45 < 0.5), right, wrong (0.6), right, right
    assert ab["all"] == {"n": 6, "accuracy": pytest.approx(4 / 6), "sensitivity": pytest.approx(2 / 3), "specificity": pytest.approx(2 / 3)}
    assert ab["not_referred"] == {"n": 4, "accuracy": pytest.approx(3 / 4), "sensitivity": 1.0, "specificity": pytest.approx(2 / 3)}
    cal = report["calibration"]
    assert cal["method"] == "none" and cal["before"] == cal["after"]  # no temperature on the card: the same numbers
    assert cal["after"]["ece"] == pytest.approx(expected_calibration_error(probs, truth, "binary", 1))
    empty = EvaluationReport("m", "d", 0.5, {}, (), calibration=cal, abstention={**ab, "n_with_sets": 0, "empirical_coverage": None})
    assert any(line.startswith("prediction sets: none") for line in trust_lines(empty))
