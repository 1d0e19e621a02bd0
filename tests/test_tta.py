"""Test-time augmentation (issue 20, item 3): views declared in the card's crop policy, logits averaged at the engine
call, so training validation, export verification and ``diagnose`` all run them, and nothing runs them twice."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest

from edgedx.card import Calibration, CropPolicy, ModelCard, Provenance
from edgedx.errors import CardError, InputError
from edgedx.runtime.fitting import crop_logits, merged_probabilities
from edgedx.runtime.model import Model, resolve_crop
from edgedx.runtime.preprocess import model_input, to_probabilities
from edgedx.runtime.tta import tta_run, view
from tests.fakes import FakeSession, fake_train

PROVENANCE = Provenance("0", "2026-01-01T00:00:00+00:00")
ALL_VIEWS = ("hflip", "vflip", "rot180", "rot90", "rot270")


def make_card(tta: tuple[str, ...] = (), *, input_format: str = "float32_nchw", size: int = 8, **changes: Any) -> ModelCard:
    return ModelCard(
        arch="fake", task="binary", class_names=("benign", "malignant"), positive_class="malignant", threshold=0.5,
        input_size=(size, size), crop=CropPolicy((size, size), (size, size), tta=tta), provenance=PROVENANCE,
        input_format=input_format, **changes,
    )


class Recording:
    """A fake engine whose logits read two corners of the crop: (top-left, top-right) summed over channels, so each
    view gives other numbers. Keeps a copy of every batch it was given."""

    def __init__(self, layout: str) -> None:
        self.layout = layout
        self.seen: list[np.ndarray] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.seen.append(np.array(x))
        x = x.astype(np.float64)
        if self.layout == "float32_nchw":
            return np.stack([x[:, :, 0, 0].sum(axis=1), x[:, :, 0, -1].sum(axis=1)], axis=1).astype(np.float32)
        return np.stack([x[:, 0, 0, :].sum(axis=1), x[:, 0, -1, :].sum(axis=1)], axis=1).astype(np.float32)


def corners_batch(layout: str, n: int = 3) -> np.ndarray:
    """n crops of 2×2 pixels a b / c d = 1 2 / 3 4 (times the crop's number), the same value in every channel."""
    plane = np.array([[1.0, 2.0], [3.0, 4.0]])
    crops = np.stack([plane * (k + 1) for k in range(n)])  # (n, 2, 2)
    if layout == "float32_nchw":
        return np.repeat(crops[:, None], 3, axis=1).astype(np.float32)
    return np.repeat(crops[..., None], 3, axis=3).astype(np.uint8)


def test_no_views_is_the_engine_itself() -> None:
    run = Recording("float32_nchw")
    assert tta_run(run, make_card()) is run


@pytest.mark.parametrize("layout", ["float32_nchw", "uint8_nhwc"])
def test_each_view_is_one_call_at_the_same_batch_size_and_the_logits_are_averaged(layout: str) -> None:
    card = make_card(ALL_VIEWS, input_format=layout, size=2)
    run = Recording(layout)
    x = corners_batch(layout)
    out = tta_run(run, card)(x)
    assert len(run.seen) == 1 + len(ALL_VIEWS)
    assert all(seen.shape == x.shape and seen.dtype == x.dtype for seen in run.seen)
    assert all(seen.flags["C_CONTIGUOUS"] for seen in run.seen)
    h, w = (2, 3) if layout == "float32_nchw" else (1, 2)
    expected_views = [x, np.flip(x, w), np.flip(x, h), np.flip(x, (h, w)), np.rot90(x, 1, (h, w)), np.rot90(x, 3, (h, w))]
    for seen, want in zip(run.seen, expected_views):
        assert np.array_equal(seen, want)
    # by hand, a b / c d = 1 2 / 3 4: (top-left, top-right) of identity (a, b), hflip (b, a), vflip (c, d),
    # rot180 (d, c), rot90 (b, d), rot270 (c, a); three channels each, crop k scaled by k + 1
    a, b, c, d = 1.0, 2.0, 3.0, 4.0
    by_hand = np.array([a + b + c + d + b + c, b + a + d + c + d + a]) / 6 * 3
    np.testing.assert_allclose(out, np.stack([by_hand * (k + 1) for k in range(3)]), rtol=0, atol=1e-12)


def test_views_on_both_layouts_are_the_same_pixels() -> None:
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    for name in ALL_VIEWS:
        assert np.array_equal(view(nhwc, name, "uint8_nhwc").transpose(0, 3, 1, 2), view(nchw, name, "float32_nchw"))


def test_quarter_turns_need_a_square_input() -> None:
    card = dataclasses.replace(make_card(("rot90",), size=8), input_size=(8, 10))
    with pytest.raises(CardError, match="quarter turns need a square input"):
        tta_run(Recording("float32_nchw"), card)


class Engine(FakeSession):
    """A fake session on float32 NCHW input; ``fn`` maps the batch to logits."""

    def __init__(self, card: ModelCard, fn: Any) -> None:
        self.card, self.fn, self.calls = card, fn, 0

    def run(self, x: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.fn(x)


def pooled(x: np.ndarray) -> np.ndarray:
    """Global average pooling then a linear head: blind to any flip or turn."""
    m = x.mean(axis=(2, 3))
    return np.stack([m[:, 0] - m[:, 1], m[:, 2] * 0.5], axis=1)


def leftish(x: np.ndarray) -> np.ndarray:
    """Brightness of the left half minus the right half: a flip changes its answer."""
    w = x.shape[3]
    left, right = x[..., : w // 2].mean(axis=(1, 2, 3)), x[..., w // 2 :].mean(axis=(1, 2, 3))
    return np.stack([right - left, 2.0 * (left - right) + x[:, 0, :2, :].mean(axis=(1, 2))], axis=1)


def image(seed: int = 0, size: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 256, (size, size, 3)).astype(np.uint8)
    out[:, : size // 2] //= 3  # a dark left half
    return out


def test_an_invariant_model_gives_the_same_result_with_views_and_a_sided_one_does_not() -> None:
    plain, views = make_card(), make_card(("hflip", "vflip", "rot180", "rot90"))
    picture = image()
    same = [Model(Engine(c, pooled)).diagnose(picture).sliding.probabilities for c in (plain, views)]
    np.testing.assert_allclose(same[0], same[1], rtol=0, atol=1e-7)  # float32 means summed in another pixel order
    sided = [Model(Engine(c, leftish)).diagnose(picture).sliding.probabilities for c in (plain, views)]
    assert np.abs(sided[0] - sided[1]).max() > 0.05


def test_diagnose_is_the_mean_of_the_logits_then_the_temperature_and_the_activation() -> None:
    card = make_card(("hflip", "vflip"), calibration=Calibration("temperature", (1.7,)))
    picture = image(seed=3)
    engine = Engine(card, leftish)
    got = Model(engine).diagnose(picture)
    assert engine.calls == 3  # one crop, one batch: the crop and two views
    x = model_input(picture[None], card)
    each = [leftish(v).astype(np.float64) for v in (x, x[..., ::-1], x[..., ::-1, :])]  # the crop, hflip, vflip
    logits = (each[0] + each[1] + each[2]) / 3
    np.testing.assert_allclose(got.sliding.probabilities, to_probabilities(logits, card)[0], rtol=0, atol=1e-12)
    averaged_probabilities = np.mean([to_probabilities(z, card) for z in each], axis=0)
    assert np.abs(got.sliding.probabilities - averaged_probabilities[0]).max() > 1e-4  # logits, not probabilities


def test_crop_logits_for_fitting_agree_with_diagnose() -> None:
    """Training's fits (crop_logits → merged_probabilities) compute exactly what diagnose gives, views included."""
    card = dataclasses.replace(
        make_card(("hflip", "rot180")), crop=CropPolicy((8, 8), (4, 4), tta=("hflip", "rot180"), aggregation="mean"),
        calibration=Calibration("temperature", (0.8,)),
    )
    pictures = [image(seed=s, size=12) for s in range(3)]
    engine = Engine(card, leftish)
    crops = crop_logits(engine.run, card, enumerate(pictures), batch_size=5)
    plain = crop_logits(engine.run, dataclasses.replace(card, crop=dataclasses.replace(card.crop, tta=())), enumerate(pictures), batch_size=5)
    assert [len(z) for z in crops.logits] == [4, 4, 4]
    assert not np.allclose(np.concatenate(crops.logits), np.concatenate(plain.logits))
    fitted = merged_probabilities(crops.logits, card)
    model = Model(Engine(card, leftish), batch_size=5)
    diagnosed = np.stack([model.diagnose(p).sliding.probabilities for p in pictures])
    np.testing.assert_allclose(fitted, diagnosed, rtol=0, atol=1e-12)


def test_a_crop_override_cannot_change_the_cards_views() -> None:
    base = CropPolicy((8, 8), (4, 4), tta=("hflip",))
    with pytest.raises(InputError, match=r"test-time views cannot be changed at diagnosis.*Train with another --tta"):
        resolve_crop(base, {"tta": ()})
    with pytest.raises(InputError, match="the card's: hflip"):
        resolve_crop(base, {"tta": ["hflip", "vflip"]})
    with pytest.raises(InputError, match="cannot be changed"):
        resolve_crop(base, dataclasses.replace(base, tta=()))
    assert resolve_crop(base, {"tta": ["hflip"], "aggregation": "max"}) == dataclasses.replace(base, aggregation="max")
    assert resolve_crop(base, {"stride": (8, 8)}).tta == ("hflip",)
    with pytest.raises(InputError, match="cannot be changed"):
        Model(Engine(make_card(("hflip",)), pooled), crop={"tta": ("vflip",)})


# ---------------------------------------------------------------------------------------------------------------
# Training: --tta off | modality | a list
# ---------------------------------------------------------------------------------------------------------------

def test_training_views_by_preset_and_by_name() -> None:
    from edgedx.training.config import TrainConfig

    assert TrainConfig().test_views(square=True) == ()
    assert TrainConfig(tta="modality", augmentation="xray").test_views(square=True) == ()
    assert TrainConfig(tta="modality", augmentation="oct").test_views(square=True) == ("hflip",)
    assert TrainConfig(tta="modality", augmentation="dermoscopy").test_views(square=True) == ALL_VIEWS
    assert TrainConfig(tta="modality", augmentation="microscopy").test_views(square=False) == ("hflip", "vflip", "rot180")
    assert TrainConfig(tta=" hflip, vflip ").test_views(square=True) == ("hflip", "vflip")
    assert TrainConfig(tta="vflip", augmentation="xray").test_views(square=True) == ("vflip",)
    with pytest.raises(InputError, match=r"--tta hflip with --augmentation xray.*laterality.*--tta off"):
        TrainConfig(tta="hflip", augmentation="xray").validate()
    with pytest.raises(InputError, match="laterality"):
        TrainConfig(tta="vflip,rot180", augmentation="xray").validate()
    with pytest.raises(InputError, match=r"unknown test-time view 'flip'.*hflip, vflip, rot180, rot90, rot270"):
        TrainConfig(tta="flip").validate()
    with pytest.raises(InputError, match=r"--tta modality.*--augmentation"):
        TrainConfig(tta="modality").validate()
    with pytest.raises(InputError, match="twice"):
        TrainConfig(tta="hflip,hflip").validate()
    with pytest.raises(InputError, match="rot90 turns the non-square crop"):
        TrainConfig(tta="hflip,rot90").test_views(square=False)


def test_the_planned_policy_carries_the_views_and_says_why_xray_has_none(caplog: pytest.LogCaptureFixture) -> None:
    from edgedx.training.config import TrainConfig
    from edgedx.training.crops import PlannedPolicy
    from edgedx.training.data import with_test_views

    planned = PlannedPolicy(CropPolicy((16, 16), (8, 8)), "test")
    assert with_test_views(planned, TrainConfig(tta="hflip,vflip"), main=True).policy.tta == ("hflip", "vflip")
    with caplog.at_level(logging.INFO, logger="edgedx.training.data"):
        assert with_test_views(planned, TrainConfig(tta="modality", augmentation="xray"), main=True).policy.tta == ()
    assert "no test-time views for chest X-rays" in caplog.text and "laterality" in caplog.text
    wide = PlannedPolicy(CropPolicy((16, 24), (8, 8)), "test")
    assert with_test_views(wide, TrainConfig(tta="modality", augmentation="dermoscopy"), main=False).policy.tta == ("hflip", "vflip", "rot180")
    with pytest.raises(InputError, match="non-square"):
        with_test_views(wide, TrainConfig(tta="rot270"), main=False)


def test_cli_train_passes_tta_through(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from edgedx.cli import app
    from edgedx.training.train import TrainConfig

    fake = fake_train()
    with mock.patch("edgedx.training.train.train", fake):
        result = CliRunner().invoke(app, ["train", str(tmp_path), "--out", "run", "--augment", "oct", "--tta", "modality"])
    assert result.exit_code == 0, result.output
    assert fake.call_args.args[2] == TrainConfig(augmentation="oct", tta="modality")


# ---------------------------------------------------------------------------------------------------------------
# End to end: train with views, export (parity and self-test), diagnose; and the Node client's views
# ---------------------------------------------------------------------------------------------------------------

def test_train_export_and_diagnose_with_views(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    pytest.importorskip("onnxruntime")
    from edgedx.export.pipeline import ExportOptions, export_checkpoint
    from edgedx.runtime import load_model
    from edgedx.runtime.io.image_io import write_image
    from edgedx.training.train import TrainConfig, train

    rng = np.random.default_rng(0)
    for cls, value in (("dark", 50), ("light", 200)):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(10):
            picture = np.clip(rng.normal(value, 20, (19, 23, 3)), 0, 255).astype(np.uint8)
            picture[:, :8] //= 2  # a darker left edge: flips change what the network sees
            write_image(tmp_path / "data" / cls / f"{i}.png", picture)
    config = TrainConfig(
        arch="resnet10t", weights="none", input_size=16, batch_size=8, epochs=1, gradcam_samples=0, plots=False,
        positive_class="light", tta="hflip,vflip",
    )
    result = train(tmp_path / "data", tmp_path / "run", config)
    assert result.card.crop.tta == ("hflip", "vflip")
    assert result.card.provenance.training["tta"] == "hflip,vflip"
    exported = export_checkpoint(result.checkpoint, tmp_path / "export", ExportOptions(precisions=("fp32",)))
    assert exported.parity["passed"], exported.parity
    model = load_model(exported.onnx_path, verify=True)  # the self-test: the engine alone, as its vectors were made
    assert model.verification.passed and model.card.crop.tta == ("hflip", "vflip")
    diagnosis = model.diagnose(tmp_path / "data" / "light" / "0.png")
    assert diagnosis.label in ("dark", "light") and set(diagnosis.probabilities) == {"dark", "light"}


def test_node_client_averages_the_same_views(tmp_path: Path) -> None:
    """examples/node/verify.mjs: the vectors' probabilities with the card's views averaged in equal the runtime's."""
    contract = pytest.importorskip("test_integration_contract")
    node = contract.node_or_skip()
    from edgedx.export.sidecar import write_card_sidecar
    from edgedx.runtime import load_model
    from edgedx.runtime.selftest import SelfTestVectors, Tolerances

    for layout, embed in (("float32_nchw", False), ("uint8_nhwc", True)):
        folder = tmp_path / layout
        folder.mkdir()
        crop = CropPolicy((32, 32), (16, 16), tta=("hflip", "vflip", "rot90"))
        card = contract.make_card("multiclass", crop=crop, calibration=Calibration("temperature", (1.3,)))
        path = contract.write_model(folder / "m.onnx", card, embed=embed, seed=5)
        model = load_model(path, quality="off")
        crops = np.stack([contract.field_image(32, 32, seed=s) for s in range(5)])
        raw = to_probabilities(model.session.run(model_input(crops, model.card)), model.card).astype(np.float32)
        write_card_sidecar(path, model.card, "onnx", "fp32", SelfTestVectors(crops, raw, "fp32", Tolerances(1e-3, 1.0), "test"))
        result, report = contract.run_node(node, path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert report["passed"] and report["tta_views"] == ["hflip", "vflip", "rot90"] and "test-time views" in result.stdout
        expected = model.predict_tiles(crops)  # the runtime's own path: views averaged, then temperature, softmax
        assert np.abs(expected - raw).max() > 1e-3  # the views matter for this model
        np.testing.assert_allclose(report["tta_probabilities"], expected, rtol=0, atol=1e-5)
        assert json.loads((folder / "m.onnx.card.json").read_text())["card"]["crop"]["tta"] == ["hflip", "vflip", "rot90"]
