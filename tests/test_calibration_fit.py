"""Temperature, threshold and abstention fitted on validation through the deployed path (issue 22, training side).

The fitting arithmetic (edgedx.runtime.fitting) is checked torch-free against
the runtime's own Model; then tiny training runs check what the card stores,
that the threshold was chosen on the calibrated probabilities, and the options.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgedx.card import Abstention, Calibration, CropPolicy, ModelCard, Provenance, QualityLimits
from edgedx.errors import InputError
from edgedx.runtime.fitting import (
    CropLogits,
    crop_logits,
    fit_abstention,
    fit_calibration,
    merged_probabilities,
    raw_card,
    trust_figures,
    uncalibrated,
    with_temperature,
)
from edgedx.runtime.model import Model
from edgedx.runtime.trust import T_RANGE
from tests.fakes import FakeSession

PROVENANCE = Provenance("0", "2026-01-01T00:00:00+00:00")


class LogitSession(FakeSession):
    """A deterministic 'network': the logits are a fixed linear map of each crop's mean colour (float32)."""

    path = None

    def __init__(self, card: ModelCard, weights: np.ndarray) -> None:
        self.card = card
        self.weights = weights

    def run(self, x: np.ndarray) -> np.ndarray:
        return (x.reshape(len(x), 3, -1).mean(axis=2) @ self.weights).astype(np.float32)  # float32 NCHW input


def card(task: str = "binary", **changes: Any) -> ModelCard:
    fields: dict[str, Any] = {
        "binary": {"class_names": ("neg", "pos"), "positive_class": "pos", "threshold": 0.4},
        "multiclass": {"class_names": ("a", "b", "c")},
        "multilabel": {"class_names": ("a", "b"), "output_activation": "sigmoid", "threshold": 0.5},
    }[task]
    crop = CropPolicy(tile_size=(8, 8), stride=(4, 4), aggregation="mean")
    return ModelCard(arch="fake", task=task, input_size=(8, 8), crop=crop, provenance=PROVENANCE, **{**fields, **changes})


def fields(n: int, seed: int = 0) -> list[tuple[int, np.ndarray]]:
    """Odd-sized noisy fields (several overlapping crops each, some background)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.integers(0, 256, (rng.integers(9, 20), rng.integers(9, 20), 3)).astype(np.uint8)
        image[: image.shape[0] // 3] = 255  # a bright band: the foreground filter may skip crops there
        out.append((i, image))
    return out


@pytest.mark.parametrize("aggregation", ["mean", "mean_logits", "max", "top_k_mean", "noisy_or"])
@pytest.mark.parametrize("task", ["binary", "multiclass", "multilabel"])
def test_merged_probabilities_are_diagnose_s_own_at_any_temperature(task: str, aggregation: str) -> None:
    """One model run, any temperature afterwards: the same numbers Model.diagnose gives with that card."""
    base = card(task)
    base = base.replace(crop=dataclasses.replace(base.crop, aggregation=aggregation, min_foreground=0.3))
    weights = np.random.default_rng(1).normal(0, 6, (3, base.n_classes))
    images = fields(12)
    crops = crop_logits(LogitSession(base, weights).run, base, images, batch_size=7)
    assert len(crops) == 12 and not crops.failed and (crops.n_crops >= 1).all()
    temps = (0.5, 2.0) if task == "multilabel" else (0.5,)
    for t in (temps, (2.5,) * len(temps)):
        calibrated = with_temperature(base, t)
        deployed = Model(LogitSession(calibrated, weights), batch_size=5)
        diagnosed = [d for d in deployed.diagnose_many([im for _, im in images], prefetch=0)]
        np.testing.assert_allclose(merged_probabilities(crops.logits, calibrated), [d.sliding.probabilities for d in diagnosed], atol=1e-6)
        raw = merged_probabilities(crops.logits, raw_card(calibrated))  # "before": the temperature undone from a diagnosis
        np.testing.assert_allclose([uncalibrated(d.sliding, calibrated) for d in diagnosed], raw, atol=1e-6)


def synthetic(n: int, task: str, truth_t: tuple[float, ...], seed: int = 0) -> tuple[CropLogits, np.ndarray]:
    """Single-crop logits whose labels are drawn from softmax/sigmoid(logits / truth_t): truth_t is the right temperature."""
    rng = np.random.default_rng(seed)
    k = {"binary": 2, "multiclass": 3, "multilabel": len(truth_t)}[task]
    z = rng.normal(0, 4, (n, k))
    if task == "multilabel":
        p = 1 / (1 + np.exp(-z / np.asarray(truth_t)))
        y = (rng.random((n, k)) < p).astype(int)
    else:
        e = np.exp(z / truth_t[0] - (z / truth_t[0]).max(axis=1, keepdims=True))
        p = e / e.sum(axis=1, keepdims=True)
        y = np.asarray([rng.choice(k, p=row) for row in p])
    return CropLogits(tuple(range(n)), tuple(z[i : i + 1] for i in range(n))), y


@pytest.mark.parametrize(("task", "truth_t"), [("binary", (2.5,)), ("multiclass", (0.6,)), ("multilabel", (0.5, 3.0))])
def test_the_fit_finds_the_temperature_that_generated_the_labels(task: str, truth_t: tuple[float, ...]) -> None:
    crops, y = synthetic(4000, task, truth_t)
    fitted = fit_calibration(crops, y, card(task), split="val")
    cal = fitted.calibration
    assert cal.method == "temperature" and len(cal.temperature) == len(truth_t)  # one per label for multilabel
    for got, want in zip(cal.temperature, truth_t):
        assert got == pytest.approx(want, rel=0.12)
    on = cal.fitted_on
    assert {"split", "n", "ece_before", "ece_after", "brier_before", "brier_after", "nll_before", "nll_after"} <= set(on)
    assert on["split"] == "val" and on["n"] == 4000
    assert on["nll_after"] < on["nll_before"] and on["ece_after"] < on["ece_before"] and on["brier_after"] <= on["brier_before"]
    np.testing.assert_allclose(fitted.after, merged_probabilities(crops.logits, card(task).replace(calibration=cal)))


def test_calibrate_none_leaves_the_card_uncalibrated() -> None:
    crops, y = synthetic(200, "binary", (2.0,))
    fitted = fit_calibration(crops, y, card(), method="none")
    assert fitted.calibration == Calibration()
    np.testing.assert_array_equal(fitted.before, fitted.after)
    with pytest.raises(ValueError, match="'platt'"):
        fit_calibration(crops, y, card(), method="platt")


def test_conformal_sets_cover_new_cases_and_the_dispersion_rule_needs_several_crops() -> None:
    fit, y_fit = synthetic(3000, "multiclass", (1.0,), seed=1)
    new, y_new = synthetic(3000, "multiclass", (1.0,), seed=2)
    c = card("multiclass")
    rule = fit_abstention(fit, y_fit, c, coverage=0.9)
    assert rule.coverage == 0.9 and 0 < rule.qhat < 1
    assert rule.dispersion_limit is None and "one crop" in rule.fitted_on["dispersion"]  # single-crop images
    assert rule.fitted_on["coverage_on_val"] >= 0.9 and rule.fitted_on["n"] == 3000
    held_out = trust_figures(new, y_new, c.replace(abstention=rule))
    assert held_out["coverage"] == pytest.approx(0.9, abs=0.02)  # on cases it was not fitted on
    assert held_out["all"]["n"] == 3000 and held_out["not_referred"]["n"] == round(3000 * (1 - held_out["refer_rate"]))
    assert held_out["not_referred"]["accuracy"] > held_out["all"]["accuracy"]  # referring the doubtful cases buys accuracy

    several = crop_logits(LogitSession(card(), np.random.default_rng(0).normal(0, 3, (3, 2))).run, card(), fields(60), batch_size=16)
    labels = np.arange(60) % 2
    rule = fit_abstention(several, labels, card(), coverage=0.8)
    assert rule.dispersion_limit is not None and rule.fitted_on["n_several_crops"] == 60
    multilabel, y_ml = synthetic(300, "multilabel", (1.0, 1.0))
    rule = fit_abstention(multilabel, y_ml, card("multilabel"))
    assert rule.qhat is None and rule.coverage is None and "multilabel" in rule.fitted_on["prediction_sets"]


# -- training runs -----------------------------------------------------------------------------------------


needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("timm") is None, reason="training needs torch and timm"
)
FAST = dict(
    arch="resnet10t", weights="none", input_size=16, batch_size=8, epochs=2, lr=3e-3, gradcam_samples=0, plots=False,
    positive_class="light", val_fraction=0.3, test_fraction=0.2,
)


def overlapping_folder(root: Path, n: int = 32) -> Path:
    """Dark vs light noisy images whose brightness overlaps: not separable, so the temperature has something to fit."""
    from edgedx.runtime.io.image_io import write_image

    rng = np.random.default_rng(0)
    for cls, value in (("dark", 115), ("light", 140)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            level = value + rng.normal(0, 15)  # each image's own brightness: the classes overlap
            write_image(root / cls / f"{i}.png", np.clip(rng.normal(level, 30, (19, 23, 3)), 0, 255).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """One binary run with a test split, plots and a physical scale (shared: a run takes seconds)."""
    from edgedx.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("calibrated")
    data = overlapping_folder(root / "data")
    return root, train(data, root / "run", TrainConfig(**{**FAST, "epochs": 1, "um_per_px": 0.25, "plots": True}))


@needs_torch
def test_the_run_stores_the_temperature_abstention_quality_and_scale(calibrated_run: tuple[Path, Any]) -> None:
    from edgedx.training.checkpoint import load_checkpoint

    root, result = calibrated_run
    c = result.card
    n_val = len(json.loads((root / "run" / "split.json").read_text())["val"])
    assert c.calibration.method == "temperature" and len(c.calibration.temperature) == 1
    assert T_RANGE[0] <= c.calibration.temperature[0] <= T_RANGE[1]
    on = c.calibration.fitted_on
    assert on["split"] == "val" and on["n"] == n_val
    assert all(isinstance(on[k], float) for k in ("ece_before", "ece_after", "brier_before", "brier_after"))
    assert on["nll_after"] <= on["nll_before"] + 1e-6  # the fit minimises NLL; T = 1 was a candidate
    assert c.abstention.coverage == 0.95 and c.abstention.qhat is not None and c.abstention.dispersion_limit is not None
    assert c.abstention.fitted_on["split"] == "val" and "coverage_on_val" in c.abstention.fitted_on
    assert c.quality.focus_min is not None and c.quality.brightness_range is not None and c.quality.reference["n_images"] == len(
        json.loads((root / "run" / "split.json").read_text())["train"])
    assert c.um_per_px == 0.25
    assert load_checkpoint(result.checkpoint).card == c  # the checkpoint carries it, as card.json does
    assert ModelCard.load(root / "run" / "card.json") == c
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    assert metrics["calibration"]["temperature"] == list(c.calibration.temperature) and metrics["abstention"]["qhat"] == c.abstention.qhat
    gated = metrics["quality_gate_on_val"]  # the validation images the card's own gate would reject, counted and named
    assert gated["n"] == n_val and gated["n_rejected"] == len(gated["rejected"]) and all(r["reasons"] for r in gated["rejected"])
    trust = metrics["test"]["trust"]  # the held-out split: the figures that count as a result
    assert {"ece_before", "ece_after", "coverage", "refer_rate", "all", "not_referred"} <= set(trust)
    lines = result.summary["trust_lines"]
    assert any("fitted on validation" in line and "ECE" in line for line in lines)
    assert any(line.startswith("held-out test split") for line in lines)
    assert (root / "run" / "plots" / "reliability.png").is_file()


@needs_torch
def test_the_threshold_was_chosen_on_the_calibrated_probabilities(calibrated_run: tuple[Path, Any]) -> None:
    """Applied to validation probabilities computed as deployed (the temperature on each crop), the card's threshold
    gives exactly the sensitivity and specificity the card states."""
    from edgedx.runtime.io.labelled import load_labelled
    from edgedx.training.checkpoint import build_model, load_checkpoint
    from edgedx.training.validation import diagnose_probabilities

    root, result = calibrated_run
    c = result.card
    ckpt = load_checkpoint(result.checkpoint)
    labelled = load_labelled(root / "run", c.class_names, split="val")
    deployed = c.replace(quality=QualityLimits(), abstention=Abstention())  # decisions aside: only probabilities are compared
    _, probs, failed = diagnose_probabilities(build_model(ckpt), deployed, list(enumerate(labelled.images)), batch_size=8)
    assert not failed
    pos = c.positive_index
    truth = labelled.labels == pos
    called = probs[:, pos] >= c.threshold
    assert float(called[truth].mean()) == pytest.approx(c.metrics["sensitivity"])
    assert float((~called[~truth]).mean()) == pytest.approx(c.metrics["specificity"])
    assert c.metrics["sensitivity"] >= 0.95
    _, raw, _ = diagnose_probabilities(build_model(ckpt), raw_card(deployed), list(enumerate(labelled.images)), batch_size=8)
    assert c.calibration.temperature[0] == 1.0 or not np.allclose(raw, probs)  # the temperature really is applied


@needs_torch
def test_calibrate_none_and_no_quality_gate(tmp_path: Path) -> None:
    from edgedx.training.train import TrainConfig, train

    data = overlapping_folder(tmp_path / "data", n=12)
    config = TrainConfig(**{**FAST, "epochs": 1, "test_fraction": 0.0, "calibrate": "none", "quality_gate": False})
    c = train(data, tmp_path / "run", config).card
    assert c.calibration == Calibration() and c.quality == QualityLimits() and c.um_per_px is None
    assert c.abstention.qhat is not None  # sets are fitted on the network's own probabilities then


@pytest.mark.parametrize(
    ("change", "message"),
    [({"um_per_px": 0.0}, "got 0.0"), ({"um_per_px": -2.0}, "got -2.0"), ({"coverage": 1.0}, "coverage must be in (0, 1), got 1.0"),
     ({"calibrate": "platt"}, "'platt'")],
)
def test_bad_settings_are_refused_naming_the_value(change: dict[str, Any], message: str) -> None:
    from edgedx.training.config import TrainConfig

    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**change).validate()


@needs_torch
def test_the_cli_takes_the_new_options_and_refuses_a_bad_scale(tmp_path: Path) -> None:
    from conftest import run_edgedx

    help_text = run_edgedx("train", "--help").stdout
    for option in ("--calibrate", "--coverage", "--no-quality-gate", "--um-per-px"):
        assert option in help_text
    data = overlapping_folder(tmp_path / "data", n=3)
    proc = run_edgedx("train", str(data), "--out", str(tmp_path / "run"), "--um-per-px", "0", "--arch", "resnet10t", "--weights", "none")
    assert proc.returncode != 0 and "--um-per-px" in proc.stderr and "got 0.0" in proc.stderr
    assert not (tmp_path / "run" / "model.pt").exists()


@needs_torch
def test_validation_images_the_gate_rejects_are_left_out_of_the_card_and_named(tmp_path: Path) -> None:
    """Two black validation images (one per class): diagnose would reject them as too dark, so the card's temperature,
    threshold and metrics are fitted on the other validation images, and the run says which were left out."""
    from edgedx.runtime.io.image_io import write_image
    from edgedx.training.train import TrainConfig, train

    folder = overlapping_folder(tmp_path / "data", n=20)
    rows = ["path,label,split"]
    for cls in ("dark", "light"):
        for i in range(20):
            rows.append(f"{folder / cls / f'{i}.png'},{cls},{'val' if i < 6 else 'train'}")
        black = tmp_path / "data" / f"black {cls}.png"
        write_image(black, np.zeros((19, 23, 3), np.uint8))
        rows.append(f"{black},{cls},val")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    result = train(manifest, tmp_path / "run", TrainConfig(**{**FAST, "epochs": 1, "test_fraction": 0.0}))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    gated = metrics["quality_gate_on_val"]
    assert gated["n"] == 14 and gated["n_rejected"] == 2
    assert sorted(Path(r["image"]).name for r in gated["rejected"]) == ["black dark.png", "black light.png"]
    assert all(any(reason.startswith("too dark") for reason in r["reasons"]) for r in gated["rejected"])
    c = result.card
    assert c.calibration.fitted_on["n"] == 12 and c.metrics["n"] == 12 and c.metrics["rejected_by_quality_gate"] == 2
    with np.load(tmp_path / "run" / "val_predictions.npz") as saved:
        assert len(saved["idx"]) == 12
    assert any("rejects 2 of 14 validation images" in w for w in result.summary["warnings"])
