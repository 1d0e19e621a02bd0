"""Physical scale: an image is resampled so objects keep the size (in pixels) they had in training, from
--um-per-px or the file's TIFF resolution tags; the record says what was done and, when a scale is missing, why
nothing was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgedx.card import CropPolicy, ModelCard, Provenance
from edgedx.errors import InputError
from edgedx.runtime.diagnose import diagnose
from edgedx.runtime.io.image_io import tiff_um_per_px, write_image
from edgedx.runtime.model import Model
from edgedx.runtime.options import DiagnoseOptions
from edgedx.runtime.outputs.records import read_records
from edgedx.runtime.scale import model_view, plan_scale

from test_quality_gate import RedSession, make_card, tiny_onnx, training_limits

TILE = 32
PROVENANCE = Provenance(edgedx_version="0", created_at="2026-01-01T00:00:00+00:00")


def card(um_per_px: float | None = 0.5, **changes: Any) -> ModelCard:
    return make_card(um_per_px=um_per_px, **changes)


def smear(height: int = 128, width: int = 128) -> np.ndarray:
    rng = np.random.default_rng(0)
    return cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 1.0)


def write_tiff(path: Path, image: np.ndarray, *, um_per_px: float | None = None, dpi: float | None = None, tile: int | None = None) -> Path:
    tifffile = pytest.importorskip("tifffile")
    extra: dict[str, Any] = {"tile": (tile, tile)} if tile else {}
    if um_per_px is not None:
        extra.update(resolution=(10_000 / um_per_px, 10_000 / um_per_px), resolutionunit="CENTIMETER")
    elif dpi is not None:
        extra.update(resolution=(dpi, dpi), resolutionunit="INCH")
    tifffile.imwrite(str(path), image, photometric="rgb", **extra)
    return path


def test_the_option_resamples_by_image_over_trained_scale() -> None:
    image = smear()
    at_trained = Model(RedSession(card())).diagnose(image)
    assert at_trained.n_crops == 16 and at_trained.scale["note"] == "the image's scale is unknown: diagnosed as given"  # type: ignore[index]
    finer = Model(RedSession(card()), um_per_px=0.25).diagnose(image)  # pixels half the trained size: shrunk by 2
    assert finer.scale == {
        "image_um_per_px": 0.25, "trained_um_per_px": 0.5, "source": "option", "factor": 0.5,
        "note": "resampled by 0.5 (image 0.25 µm/px, trained 0.5 µm/px) so objects keep their trained size",
    }
    assert finer.n_crops == 4 and finer.sliding.grid.source_size == (64, 64)
    coarser = Model(RedSession(card()), um_per_px=1.0).diagnose(image)  # pixels twice the trained size: enlarged by 2
    assert coarser.scale["factor"] == 2.0 and coarser.n_crops == 64  # type: ignore[index]


def test_shrinking_averages_and_enlarging_interpolates_in_one_resampling() -> None:
    image, policy = smear(), CropPolicy(tile_size=(TILE, TILE), stride=(TILE, TILE), scale=0.5)
    shrunk = model_view(image, policy, 0.5)  # 0.5 × 0.5: one INTER_AREA resampling to 32×32
    assert shrunk.source_size == (64, 64)
    assert np.array_equal(shrunk.pixels, cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA))
    enlarged = model_view(image, policy, 4.0)  # 4 × 0.5 = 2: one INTER_LINEAR resampling to 256×256
    assert np.array_equal(enlarged.pixels, cv2.resize(image, (256, 256), interpolation=cv2.INTER_LINEAR))
    same = model_view(image, policy, 1.0)
    assert np.array_equal(same.pixels, cv2.resize(image, (64, 64), interpolation=cv2.INTER_AREA)) and same.source_size == (128, 128)


def test_the_tiff_resolution_tags_give_the_scale(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "slide scan 1.tif", smear(), um_per_px=0.25)
    assert tiff_um_per_px(path) == pytest.approx(0.25)
    result = Model(RedSession(card())).diagnose(path)
    assert result.scale["source"] == "file" and result.scale["image_um_per_px"] == pytest.approx(0.25)  # type: ignore[index]
    assert result.scale["factor"] == pytest.approx(0.5) and result.n_crops == 4  # type: ignore[index]
    told = Model(RedSession(card()), um_per_px=0.5).diagnose(path)  # the option wins over the file
    assert told.scale["source"] == "option" and told.scale["factor"] == 1.0 and told.n_crops == 16  # type: ignore[index]
    assert "matches training" in told.scale["note"]  # type: ignore[index]
    dpi = write_tiff(tmp_path / "scanner 600 dpi.tif", smear(), dpi=600)
    assert tiff_um_per_px(dpi) == pytest.approx(25_400 / 600)
    assert tiff_um_per_px(write_tiff(tmp_path / "no tags.tif", smear())) is None
    png = tmp_path / "a.png"
    write_image(png, smear())
    assert tiff_um_per_px(png) is None


def test_a_default_72_dpi_tag_is_not_trusted_and_a_fit_card_ignores_scale(tmp_path: Path) -> None:
    path = write_tiff(tmp_path / "export 72 dpi.tif", smear(), dpi=72)
    result = Model(RedSession(card())).diagnose(path)
    assert result.scale["factor"] == 1.0 and "more likely a default tag" in result.scale["note"] and result.n_crops == 16  # type: ignore[index]
    fit = card(crop=CropPolicy(tile_size=(TILE, TILE), stride=(TILE, TILE), mode="fit"))
    whole = Model(RedSession(fit), um_per_px=0.25).diagnose(smear())
    assert whole.scale["factor"] == 1.0 and "crop mode 'fit' resizes every image to 32×32" in whole.scale["note"]  # type: ignore[index]


def test_missing_scales_are_said_in_words() -> None:
    assert plan_scale(None, "none", 0.5, card().crop).note == "the image's scale is unknown: diagnosed as given"
    unknown_model = Model(RedSession(card(um_per_px=None)), um_per_px=0.25).diagnose(smear())
    assert unknown_model.scale["note"] == "the model's training scale is unknown: diagnosed as given"  # type: ignore[index]
    assert unknown_model.scale["factor"] == 1.0 and unknown_model.scale["image_um_per_px"] == 0.25  # type: ignore[index]
    neither = plan_scale(None, "none", None, card().crop)
    assert neither.note == "the image's scale and the model's training scale are unknown: diagnosed as given"


@pytest.mark.parametrize("bad", [0, -0.25, float("nan"), float("inf")])
def test_non_positive_scales_are_refused_naming_the_value(bad: float) -> None:
    with pytest.raises(InputError, match=rf"--um-per-px must be a positive number of micrometres per pixel, got {bad!r}"):
        Model(RedSession(card()), um_per_px=bad)
    with pytest.raises(InputError, match="--um-per-px must be a positive number"):
        DiagnoseOptions(model=Path("m.onnx"), out=Path("o.jsonl"), um_per_px=bad).validate(["a.png"])


def test_a_tiled_tiff_is_scaled_and_judged_region_by_region(tmp_path: Path) -> None:
    from edgedx.runtime.io.sources import open_source
    from edgedx.runtime.tiling import ResampledImage

    path = write_tiff(tmp_path / "tiled scan.tif", smear(256, 256), um_per_px=0.25, tile=64)
    source = open_source(path)
    try:
        assert not isinstance(source, ResampledImage) and not hasattr(source, "image")  # read lazily
    finally:
        source.close()
    gated = card(quality=training_limits(card().crop))
    result = Model(RedSession(gated), quality="card", quality_limits={"focus_min": "off", "colour_range": "off"}).diagnose(path)
    assert result.scale["factor"] == pytest.approx(0.5) and result.n_crops == 16  # type: ignore[index]
    assert "central 2048×2048 px of the file" in result.quality["gate"] and result.quality["short_side"] == 128  # type: ignore[index]


def test_diagnose_with_um_per_px_loads_the_model_with_it(tmp_path: Path) -> None:
    model = tiny_onnx(tmp_path / "tiny.onnx", card())
    images = tmp_path / "in"
    images.mkdir()
    write_image(images / "x.png", smear())
    out = tmp_path / "o.jsonl"
    diagnose([str(images)], DiagnoseOptions(model=model, out=out, um_per_px=0.25))
    [record] = read_records(out)
    assert record["scale"]["source"] == "option" and record["scale"]["factor"] == 0.5 and record["n_crops"] == 4
    with pytest.raises(InputError, match="this Model was loaded already"):
        diagnose([str(images)], DiagnoseOptions(model=Model(RedSession(card())), out=tmp_path / "p.jsonl", um_per_px=0.25))
