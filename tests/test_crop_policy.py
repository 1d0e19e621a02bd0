"""Crop policies mean the same thing in training and in deployment: modes, training crops, validation = diagnose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgedx.card import CropPolicy, ModelCard
from edgedx.errors import CardError, InputError
from edgedx.runtime.model import resolve_crop
from edgedx.runtime.tiling import ResampledImage, plan_tiles, random_tile, rescale, resampled_size, sliding_window_predict


def test_resampled_size_per_mode() -> None:
    fit = CropPolicy((32, 32), (16, 16), mode="fit")
    assert resampled_size(237, 511, fit) == (32, 32) and plan_tiles(237, 511, fit).n_tiles == 1
    side = CropPolicy((32, 32), (16, 16), mode="shorter_side", shorter_side=40)
    assert resampled_size(237, 511, side) == (40, round(511 * 40 / 237))  # the shorter side is exact
    assert resampled_size(3000, 2000, side) == (60, 40)
    grid = plan_tiles(3000, 2000, side)
    assert grid.shape == (3, 2) and grid.row_starts[-1] == 60 - 32 and grid.source_size == (3000, 2000)
    scale = CropPolicy((32, 32), (16, 16), scale=0.5)
    assert resampled_size(237, 511, scale) == (118, 256) or resampled_size(237, 511, scale) == (119, 256)
    assert rescale(np.zeros((237, 511, 3), np.uint8), side).shape == (40, round(511 * 40 / 237), 3)


def test_fit_squashes_both_axes_and_factors_say_so() -> None:
    grid = plan_tiles(100, 400, CropPolicy((20, 20), (20, 20), mode="fit"))
    assert grid.factors == (0.2, 0.05)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"mode": "shorter_side"}, "crop.shorter_side"),
        ({"mode": "fit", "shorter_side": 8}, "only used with crop.mode 'shorter_side'"),
        ({"mode": "fit", "scale": 0.5}, "only used with crop.mode 'scale'"),
        ({"mode": "slide"}, "crop.mode"),
    ],
)
def test_inconsistent_crop_settings_are_named(changes: dict, message: str) -> None:
    with pytest.raises(CardError, match=message):
        CropPolicy((8, 8), (4, 4), **changes)


def test_overrides_switch_the_mode_they_name() -> None:
    base = CropPolicy((32, 32), (16, 16), mode="shorter_side", shorter_side=64)
    assert resolve_crop(base, {"scale": 0.5}) == CropPolicy((32, 32), (16, 16), scale=0.5)
    assert resolve_crop(CropPolicy((32, 32), (16, 16), mode="fit"), {"shorter_side": 48}).mode == "shorter_side"
    assert resolve_crop(base, {"mode": "fit"}) == CropPolicy((32, 32), (16, 16), mode="fit")


def test_describe_names_the_rule() -> None:
    assert CropPolicy((8, 8), (4, 4), mode="fit").describe().startswith("fit: whole image resized to 8×8")
    assert "shorter side resized to 12 px" in CropPolicy((8, 8), (4, 4), mode="shorter_side", shorter_side=12).describe()
    assert "resampled by 0.5" in CropPolicy((8, 8), (4, 4), scale=0.5).describe()


def test_random_training_crops_are_windows_the_splitter_could_cut() -> None:
    policy = CropPolicy((16, 16), (8, 8), mode="shorter_side", shorter_side=20, padding="constant", pad_value=7)
    image = np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8)
    resampled = ResampledImage.of(image, policy)
    scaled = resampled.pixels
    assert scaled.shape[:2] == resampled_size(50, 90, policy)
    rng = np.random.default_rng(1)
    for _ in range(20):
        crop = random_tile(resampled, policy, rng)
        assert crop.shape == (16, 16, 3)
        hits = [(y, x) for y in range(scaled.shape[0] - 15) for x in range(scaled.shape[1] - 15) if np.array_equal(scaled[y : y + 16, x : x + 16], crop)]
        assert hits
    small = ResampledImage(np.full((10, 12, 3), 200, np.uint8), (10, 12))
    padded = random_tile(small, CropPolicy((16, 16), (8, 8), pad_value=7), rng)
    assert (padded[:10, :12] == 200).all() and (padded[10:] == 7).all() and (padded[:, 12:] == 7).all()


def test_a_resampled_image_gives_the_same_crops_as_the_original() -> None:
    policy = CropPolicy((16, 16), (8, 8), mode="shorter_side", shorter_side=24, min_foreground=0.1)
    image = np.random.default_rng(2).integers(0, 256, (61, 97, 3), dtype=np.uint8)

    def model(tiles: np.ndarray) -> np.ndarray:
        p = tiles.reshape(len(tiles), -1).mean(axis=1) / 255.0
        return np.stack([1 - p, p], axis=1)

    whole = sliding_window_predict(image, model, policy)
    kept = sliding_window_predict(ResampledImage.of(image, policy), model, policy)
    np.testing.assert_array_equal(whole.tile_probabilities, kept.tile_probabilities)
    assert whole.grid == kept.grid


def test_crop_choice_parsing() -> None:
    from edgedx.training.crops import CropChoice

    assert CropChoice.parse("shorter-side:224") == CropChoice("shorter_side", 224.0)
    assert CropChoice.parse("scale") == CropChoice("scale") and CropChoice.parse("fit") == CropChoice("fit")
    for bad, message in (("slide", "unknown crop policy"), ("fit:3", "unknown crop policy"), ("scale:x", "not a number"), ("shorter_side:1.5", "integer")):
        with pytest.raises(InputError, match=message):
            CropChoice.parse(bad)


def _mixed_folder(root: Path) -> Path:
    """Images of very different sizes and aspect ratios in two classes (brightness tells them apart)."""
    from edgedx.runtime.io.image_io import write_image

    rng = np.random.default_rng(3)
    sizes = [(237, 511), (768, 1024), (2000, 3000), (97, 64), (300, 300), (451, 129)]
    for cls, level in (("dark", 70), ("light", 180)):
        (root / cls).mkdir(parents=True)
        for k, (h, w) in enumerate(sizes):
            small = rng.normal(level, 40, (max(2, h // 16), max(2, w // 16), 3))
            import cv2

            image = cv2.resize(np.clip(small, 0, 255).astype(np.uint8), (w, h), interpolation=cv2.INTER_LINEAR)
            write_image(root / cls / f"{k}.png", image)
    return root


def test_auto_picks_fit_for_mixed_sizes_and_scale_for_one_size(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from edgedx.training.crops import plan_crop_policy
    from edgedx.training.sources import load_source

    mixed = load_source(_mixed_folder(tmp_path / "mixed"))
    planned = plan_crop_policy(mixed, "auto", (32, 32), 0.5)
    assert planned.policy.mode == "fit" and "different sizes" in planned.reason
    assert plan_crop_policy(mixed, "shorter_side", (32, 32), 0.5).policy.shorter_side == 32


def test_validation_and_diagnosis_agree_on_images_of_mixed_sizes(tmp_path: Path) -> None:
    """What training validates (images decoded and resampled once, at training) is what diagnose computes from the files."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    import json

    from edgedx.export.pipeline import export_checkpoint
    from edgedx.runtime import load_model
    from edgedx.training.checkpoint import build_model, load_checkpoint
    from edgedx.training.crops import decode_all, plan_crop_policy
    from edgedx.training.sources import load_source
    from edgedx.training.train import TrainConfig, train
    from edgedx.training.validation import diagnose_probabilities, predict_resampled

    data = _mixed_folder(tmp_path / "mixed data")
    config = TrainConfig(arch="resnet10t", weights="none", epochs=1, input_size=32, batch_size=4, crop="shorter_side:40", positive_class="light",
                         val_fraction=0.5, gradcam_samples=0, plots=False)
    result = train(data, tmp_path / "run", config)
    card = result.card
    assert card.crop.mode == "shorter_side" and card.crop.shorter_side == 40
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["crop"]["policy"] == card.crop.describe()

    ckpt = load_checkpoint(result.checkpoint)
    model = build_model(ckpt)
    source = load_source(data)
    decoded = decode_all(source, plan_crop_policy(source, config.crop, (32, 32), 0.5).policy, strict=True, progress=lambda *a: None)
    paths = [Path(p) for p in decoded.data.ids]
    at_validation = predict_resampled(model, card, decoded.images, np.arange(len(paths)), batch_size=4, device="cpu")
    _, at_diagnosis, failed = diagnose_probabilities(model, card, list(enumerate(paths)), batch_size=4)
    assert not failed
    np.testing.assert_allclose(at_validation, at_diagnosis, atol=1e-5, rtol=0)
    assert max(plan_tiles(*img.source_size, card.crop).n_tiles for img in decoded.images) > 1  # really sliding crops

    # and the exported artefact, as a user runs it, within the fp32 export tolerance
    onnx_model = load_model(export_checkpoint(result.checkpoint, tmp_path / "export").onnx_path)
    deployed = np.stack([d.sliding.probabilities for d in onnx_model.diagnose_many(paths)])
    np.testing.assert_allclose(deployed, at_validation, atol=1e-4, rtol=0)
    val_ids = set(json.loads((tmp_path / "run" / "split.json").read_text())["val"])
    assert card.metrics["n"] == len(val_ids)


def test_training_says_what_to_change_when_its_own_images_would_be_refused(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from edgedx.runtime.io.image_io import write_image
    from edgedx.training.train import TrainConfig, train

    rng = np.random.default_rng(5)
    for cls, level in (("normal", 60), ("tumour", 190)):
        (tmp_path / "tiny" / cls).mkdir(parents=True)
        for i in range(4):
            write_image(tmp_path / "tiny" / cls / f"{i}.png", np.clip(rng.normal(level, 20, (2, 2, 3)), 0, 255).astype(np.uint8))
    config = TrainConfig(arch="resnet10t", weights="none", epochs=1, input_size=64, batch_size=4, crop="fit", gradcam_samples=0, plots=False)
    with pytest.raises(InputError, match=r"would be refused when diagnosed \(.*enlarged 32× per side.*\); 2 of 2 are\. Train with a smaller --input-size"):
        train(tmp_path / "tiny", tmp_path / "run", config)
