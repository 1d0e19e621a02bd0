"""The image-quality gate before diagnosis: degraded images are rejected with their reasons and never reach the
model; limits can be overridden or the gate turned off; every writer copes with a reject record.

Tiny synthetic data only: limits from 30 synthetic smears (``edgedx.synthetic.render_field``), a fake session
(p(positive) = the crop's mean red level) that counts the crops it is given, and, for the CLI and Ray, a
four-node ONNX model with the same rule.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from edgedx.card import ONNX_METADATA_KEY, Abstention, CropPolicy, ModelCard, Provenance, QualityLimits
from edgedx.errors import InputError
from edgedx.runtime.batch import diagnose_paths
from edgedx.runtime.io.image_io import write_image
from edgedx.runtime.model import Model, load_model
from edgedx.runtime.options import DiagnoseOptions
from edgedx.runtime.outputs.overlay import diagnosis_overlay, render_rejection
from edgedx.runtime.outputs.records import read_records
from edgedx.runtime.quality import LIMIT_NAMES, measure_quality, quality_limits
from edgedx.runtime.scale import model_view
from edgedx.synthetic import render_field
from fakes import RedLevelSession as RedSession

TILE = 32
POLICY = CropPolicy(tile_size=(TILE, TILE), stride=(TILE, TILE))
PROVENANCE = Provenance(edgedx_version="0", created_at="2026-01-01T00:00:00+00:00")


def field(seed: int, height: int = 96, width: int = 128) -> np.ndarray:
    return render_field(np.random.default_rng(seed), height, width).image


def training_limits(policy: CropPolicy = POLICY) -> QualityLimits:
    """Limits as training makes them: the measures of 30 smears at the model's scale."""
    return quality_limits([measure_quality(f, model_view(f, policy).pixels) for f in (field(s) for s in range(30))])


def make_card(*, limits: QualityLimits | None = None, abstention: Abstention | None = None, **changes: Any) -> ModelCard:
    fields: dict[str, Any] = {
        "arch": "fake", "task": "binary", "class_names": ("uninfected", "parasitized"), "positive_class": "parasitized",
        "input_size": (TILE, TILE), "crop": POLICY, "provenance": PROVENANCE, "input_format": "uint8_nhwc", "threshold": 0.5,
        "quality": limits or QualityLimits(), "abstention": abstention or Abstention(), **changes,
    }
    return ModelCard(**fields)


def tiny_onnx(path: Path, card: ModelCard) -> Path:
    """A real ONNX file with ``card`` embedded: uint8 NHWC crops → logits with p(positive) = sigmoid((red − 128) / 16)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.array([[0, 1 / 16], [0, 0], [0, 0]], np.float32), "w")
    bias = numpy_helper.from_array(np.array([0, -8], np.float32), "b")
    nodes = [
        helper.make_node("Cast", ["input"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f"], ["m"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["m", "w"], ["mw"]),
        helper.make_node("Add", ["mw", "b"], ["logits"]),
    ]
    h, w = card.input_size
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.UINT8, ["n", h, w, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])], initializer=[weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {ONNX_METADATA_KEY: card.to_json()})
    onnx.save(model, str(path))
    return path


def degraded(image: np.ndarray, how: str) -> np.ndarray:
    if how == "blurred":
        return cv2.GaussianBlur(image, (0, 0), 3.0)
    if how == "over-exposed":
        return np.clip(image.astype(np.float32) * 4, 0, 255).astype(np.uint8)
    assert how == "dark"
    return np.round(image.astype(np.float32) * 0.25).astype(np.uint8)


@pytest.fixture(scope="module")
def limits() -> QualityLimits:
    return training_limits()


# -- the gate ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("how", "reason"), [("blurred", "out of focus"), ("over-exposed", "over/under-exposed"), ("dark", "too dark")])
def test_a_degraded_image_is_rejected_with_its_reason_and_never_reaches_the_model(limits: QualityLimits, how: str, reason: str) -> None:
    session = RedSession(make_card(limits=limits))
    model = Model(session, quality="card")
    clean = model.diagnose(field(100))
    assert clean.decision != "reject" and clean.quality is not None and clean.quality["passed"] is True
    crops = session.crops
    result = model.diagnose(degraded(field(100), how))
    assert session.crops == crops  # no inference on a rejected image
    record = result.to_record()
    assert record["decision"] == "reject" and record["label"] is None and record["probabilities"] is None
    assert record["n_crops"] == 0 and record["prediction_set"] is None and record["refer_reasons"] == []
    assert any(r.startswith(reason + ":") for r in record["reject_reasons"]), record["reject_reasons"]
    assert record["quality"]["passed"] is False and record["quality"]["gate"] == "card"
    assert set(record["quality"]) >= {"focus", "clipped", "brightness", "colour", "short_side", "blockiness"}
    assert record["rule"].startswith("image quality gate: ") and "reject" in record["rule"]


@pytest.mark.parametrize("shape", [(1, 1), (1, 40), (40, 1), (17, 17), (16, 300)])
def test_measures_of_tiny_and_thin_images(shape: tuple[int, int]) -> None:
    image = np.full((*shape, 3), 120, np.uint8)
    measures = measure_quality(image)
    assert measures["blockiness"] == 1.0 and measures["short_side"] == min(shape) and measures["focus"] == 1.0


def test_reasons_name_the_measure_and_the_limit(limits: QualityLimits) -> None:
    model = Model(RedSession(make_card(limits=limits)), quality="card")
    [reason] = model.diagnose(degraded(field(101), "dark")).reject_reasons
    low, high = limits.brightness_range  # type: ignore[misc]
    assert reason.startswith("too dark: brightness ") and f"outside {low:.0f}–{high:.0f}" in reason
    tiny = model.diagnose(field(102, 40, 40))
    assert any(r.startswith("too small at the model's scale: 40 px < ") for r in tiny.reject_reasons), tiny.reject_reasons
    from edgedx.errors import InsufficientContentError

    with pytest.raises(InsufficientContentError, match="fills"):  # nearly all padding: refused as before the gate
        model.diagnose(field(102, 4, 4))


def test_overrides_and_off(limits: QualityLimits) -> None:
    card = make_card(limits=limits)
    blurred, dark = degraded(field(103), "blurred"), degraded(field(103), "dark")
    relaxed = Model(RedSession(card), quality="card", quality_limits={"focus_min": "off", "brightness_range": "0,255"})
    for image in (blurred, dark):
        result = relaxed.diagnose(image)
        assert result.decision != "reject" and result.quality["passed"] is True  # type: ignore[index]
        assert result.quality["gate"] == "card, with focus_min=off, brightness_range=0,255"  # type: ignore[index]
    strict = Model(RedSession(card), quality="card", quality_limits={"focus_min": 1000})
    assert strict.diagnose(field(103)).reject_reasons[0].startswith("out of focus: sharpness ")
    off = Model(RedSession(card), quality="off").diagnose(blurred)
    assert off.decision != "reject" and off.quality == {"passed": None, "gate": "off: --quality off"}


def test_a_card_without_limits_says_the_gate_is_off() -> None:
    result = load_or_fake(make_card()).diagnose(degraded(field(104), "dark"))
    assert result.decision != "reject" and result.quality == {"passed": None, "gate": "off: the card has no limits"}


def load_or_fake(card: ModelCard) -> Model:
    return Model(RedSession(card), quality="card")


def test_unknown_or_bad_limits_are_refused_naming_the_valid_ones() -> None:
    with pytest.raises(InputError, match="unknown quality limit 'sharpness'; known: " + ", ".join(LIMIT_NAMES)):
        DiagnoseOptions(model=Path("m.onnx"), out=Path("o.jsonl"), quality_limits={"sharpness": "3"}).validate(["a.png"])
    with pytest.raises(InputError, match="brightness_range needs LOW,HIGH"):
        DiagnoseOptions(model=Path("m.onnx"), out=Path("o.jsonl"), quality_limits={"brightness_range": "40"}).validate(["a.png"])
    with pytest.raises(InputError, match="--quality must be card or off, got 'strict'"):
        DiagnoseOptions(model=Path("m.onnx"), out=Path("o.jsonl"), quality="strict").validate(["a.png"])
    with pytest.raises(InputError, match="clipped_max must be within"):
        Model(RedSession(make_card()), quality="card", quality_limits={"clipped_max": 2})


def test_cli_passes_the_gate_options_and_refuses_a_bad_one() -> None:
    from unittest import mock

    from edgedx.cli import app

    runner = CliRunner()
    with mock.patch("edgedx.runtime.diagnose.diagnose") as run:
        run.return_value.summary.label_counts = {"a": 1, None: 2}
        run.return_value.summary.n_ok, run.return_value.summary.n_failed, run.return_value.summary.n_resumed = 3, 0, 0
        run.return_value.summary.seconds, run.return_value.summary.overlays = 0.1, ()
        result = runner.invoke(app, [
            "diagnose", "a.png", "--out", "o.jsonl", "--quality-limit", "focus_min=3", "--quality-limit", "brightness_range=40,220",
            "--um-per-px", "0.25",
        ])
    assert result.exit_code == 0, result.output
    options = run.call_args.args[1]
    assert options.quality == "card" and options.quality_limits == {"focus_min": "3", "brightness_range": "40,220"}
    assert options.um_per_px == 0.25
    assert "1 diagnosed (1 a), 2 rejected by the quality gate" in result.output
    bad = runner.invoke(app, ["diagnose", "a.png", "--out", "o.jsonl", "--quality-limit", "sharpness=3"])
    assert isinstance(bad.exception, InputError) and "unknown quality limit 'sharpness'; known: focus_min" in str(bad.exception)
    bad = runner.invoke(app, ["diagnose", "a.png", "--out", "o.jsonl", "--quality-limit", "focus_min"])
    assert isinstance(bad.exception, InputError) and "--quality-limit needs NAME=VALUE" in str(bad.exception)


# -- writers -------------------------------------------------------------------------------------


def folder_of_three(root: Path) -> Path:
    """A clean smear, a blurred one and a dark one (names with spaces)."""
    folder = root / "scanner out"
    folder.mkdir()
    write_image(folder / "a clean.png", field(105))
    write_image(folder / "b blurred.png", degraded(field(106), "blurred"))
    write_image(folder / "c dark.png", degraded(field(107), "dark"))
    return folder


def test_jsonl_and_csv_records_of_a_rejected_image(tmp_path: Path, limits: QualityLimits) -> None:
    folder = folder_of_three(tmp_path)
    model = Model(RedSession(make_card(limits=limits)), quality="card")
    summary = diagnose_paths([folder], model, tmp_path / "out.jsonl")
    assert summary.n_failed == 0 and summary.label_counts.get(None) == 2
    records = {Path(r["input"]).name: r for r in read_records(tmp_path / "out.jsonl")}
    assert records["a clean.png"]["quality"]["passed"] is True and records["a clean.png"]["reject_reasons"] == []
    for name in ("b blurred.png", "c dark.png"):
        assert records[name]["decision"] == "reject" and records[name]["error"] is None and records[name]["input_sha256"]
    diagnose_paths([folder], model, tmp_path / "out.csv")
    rows = {Path(r["input"]).name: r for r in csv.DictReader((tmp_path / "out.csv").open(encoding="utf-8", newline=""))}
    dark = rows["c dark.png"]
    assert dark["decision"] == "reject" and dark["label"] == "" and dark["p_parasitized"] == "" and dark["quality_passed"] == "False"
    assert dark["reject_reasons"].startswith("too dark: brightness") and "brightness=" in dark["quality_measures"]
    assert rows["a clean.png"]["quality_passed"] == "True" and rows["a clean.png"]["p_parasitized"] != ""


def test_overlay_of_a_rejected_image_is_the_image_under_its_reasons(limits: QualityLimits) -> None:
    card = make_card(limits=limits)
    image = degraded(field(108), "dark")
    result = Model(RedSession(card), quality="card").diagnose(image)
    picture = diagnosis_overlay(image, result, card)
    assert picture.shape[1] == max(200, image.shape[1]) and picture.shape[0] > image.shape[0]
    assert np.array_equal(picture[-image.shape[0] :, : image.shape[1]], image)  # no heat map, no colour bar
    banner = picture[: -image.shape[0]]
    assert (banner[..., 0] > 200).any() and np.array_equal(picture, render_rejection(image, result.reject_reasons))
    normal = Model(RedSession(card), quality="card").diagnose(field(108))
    assert diagnosis_overlay(field(108), normal, card).shape[0] > picture.shape[0] - 1  # caption, image and colour bar


def test_evaluate_counts_a_rejected_image_and_does_not_score_it(tmp_path: Path, limits: QualityLimits) -> None:
    from edgedx.runtime.evaluate import evaluate

    data = tmp_path / "labelled"
    for label, seeds in (("uninfected", (110, 111)), ("parasitized", (112, 113))):
        (data / label).mkdir(parents=True)
        for seed in seeds:
            write_image(data / label / f"{seed}.png", field(seed))
    write_image(data / "parasitized" / "dark.png", degraded(field(114), "dark"))
    report = evaluate(Model(RedSession(make_card(limits=limits)), quality="card"), data, bootstrap=0)
    assert [Path(r["image"]).name for r in report.rejected] == ["dark.png"] and not report.failed
    assert report.rejected[0]["reasons"][0].startswith("too dark")


# -- a real ONNX file: the CLI end to end, and Ray -------------------------------------------------


def test_cli_end_to_end_rejects_writes_the_reasons_and_honours_off(tmp_path: Path, limits: QualityLimits) -> None:
    from edgedx.cli import app

    model = tiny_onnx(tmp_path / "tiny model.onnx", make_card(limits=limits, input_format="uint8_nhwc"))
    folder = folder_of_three(tmp_path)
    runner = CliRunner()
    result = runner.invoke(app, ["diagnose", str(folder), "--model", str(model), "--out", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 0, result.output
    assert "2 rejected by the quality gate" in " ".join(result.output.split())
    decisions = sorted(r["decision"] for r in read_records(tmp_path / "o.jsonl"))
    assert decisions.count("reject") == 2
    result = runner.invoke(app, ["diagnose", str(folder), "--model", str(model), "--out", str(tmp_path / "off.jsonl"), "--quality", "off"])
    assert result.exit_code == 0, result.output
    assert all(r["decision"] != "reject" and r["quality"]["gate"] == "off: --quality off" for r in read_records(tmp_path / "off.jsonl"))


@pytest.mark.slow
def test_ray_rejects_the_same_images_as_the_local_engine(tmp_path: Path, limits: QualityLimits) -> None:
    pytest.importorskip("ray")
    from edgedx.runtime.ray_engine import diagnose_ray, read_ray_records

    model = tiny_onnx(tmp_path / "tiny.onnx", make_card(limits=limits, abstention=Abstention(coverage=0.9, qhat=0.6)))
    folder = folder_of_three(tmp_path)
    diagnose_paths([folder], load_model(model), tmp_path / "local.jsonl")
    diagnose_ray([folder], model, tmp_path / "shards.jsonl", actors=1, batch_size=4)
    local = {r["input"]: r for r in read_records(tmp_path / "local.jsonl")}
    remote = {r["input"]: r for r in read_ray_records(tmp_path / "shards.jsonl")}
    assert set(local) == set(remote)
    for name, record in local.items():
        other = remote[name]
        for key in ("decision", "label", "reject_reasons", "refer_reasons", "prediction_set", "scale"):
            assert json.dumps(other[key]) == json.dumps(record[key]), (name, key)
        assert (other["quality"] or {}).get("passed") == (record["quality"] or {}).get("passed")


def test_training_fits_the_card_on_the_validation_images_its_gate_passes(limits: QualityLimits) -> None:
    """diagnose never decides a rejected image, so training leaves the validation images its gate rejects out of the
    card's fits and names them; the gate it measures with is diagnose's own (the same images, the same verdicts)."""
    pytest.importorskip("torch")
    from types import SimpleNamespace

    from edgedx.training.calibration import gate_split, gate_warning

    images = [field(200 + i) for i in range(6)]
    images[2], images[4] = degraded(images[2], "blurred"), degraded(images[4], "dark")
    ids = [f"smear {i}.png" for i in range(6)]
    data = SimpleNamespace(decoded=SimpleNamespace(data=SimpleNamespace(load=lambda i: images[i], ids=ids)))
    card = make_card(limits=limits)
    rejected, kept = gate_split(data, np.arange(6), card)
    model = Model(RedSession(card), quality="card")
    assert [r["image"] for r in rejected] == [ids[i] for i, im in enumerate(images) if model.diagnose(im).rejected] == [ids[2], ids[4]]
    assert kept.tolist() == [0, 1, 3, 5]
    assert rejected[0]["reasons"][0].startswith("out of focus") and rejected[1]["reasons"][0].startswith("too dark")
    [warning] = gate_warning(rejected, 6)
    assert "rejects 2 of 6 validation images" in warning and "fitted on the other 4" in warning
    none, every = gate_split(data, np.arange(6), make_card())  # no limits: nothing rejected
    assert none == [] and every.tolist() == list(range(6)) and gate_warning([], 6) == ()
