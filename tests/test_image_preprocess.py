"""Image reading, card-driven preprocessing, output activations and the decision rule."""

from __future__ import annotations

import math
import struct
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgedx.card import CropPolicy, ModelCard, Normalization, Provenance
from edgedx.errors import EdgeDxError, ImageReadError
from edgedx.runtime.io.image_io import decode_image, is_image_path, read_image, to_rgb_uint8, write_image
from edgedx.runtime.model import decide
from edgedx.runtime.preprocess import model_input, preprocess_batch, resize_to, to_probabilities

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def make_card(task: str = "binary", input_size: tuple[int, int] = (4, 5), **overrides: Any) -> ModelCard:
    """A small valid card; ``overrides`` replace any field."""
    defaults: dict[str, Any] = {
        "binary": {"class_names": ("neg", "pos"), "positive_class": "pos"},
        "multiclass": {"class_names": ("a", "b", "c")},
        "multilabel": {"class_names": ("a", "b", "c"), "output_activation": "sigmoid"},
    }[task]
    fields: dict[str, Any] = {
        "arch": "x",
        "task": task,
        "input_size": input_size,
        "crop": CropPolicy(tile_size=input_size, stride=input_size),
        "provenance": Provenance(edgedx_version="0", created_at="2026-01-01T00:00:00+00:00"),
        "normalization": Normalization(kind="mean_std", pixel_scale=1 / 255, mean=MEAN, std=STD),
        **defaults,
        **overrides,
    }
    return ModelCard(**fields)


def write_with_cv2(path: Path, image: np.ndarray, params: list[int] | None = None) -> Path:
    """Encode with OpenCV (channels in OpenCV's order) and write bytes, so non-ASCII paths work."""
    ok, encoded = cv2.imencode(path.suffix, image, params or [])
    assert ok
    encoded.tofile(str(path))
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "images with space ü 图像"
    path.mkdir()
    return path


def rgb_gradient(height: int = 6, width: int = 7) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([y * 40, x * 30, 255 - y * 10 - x * 5], axis=-1).astype(np.uint8)


# -- read_image -------------------------------------------------------------------------


def test_read_grey_png(folder: Path) -> None:
    grey = (np.arange(6 * 7).reshape(6, 7) * 6).astype(np.uint8)
    path = write_with_cv2(folder / "grey é.png", grey)
    image = read_image(path)
    assert image.shape == (6, 7, 3) and image.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], grey)


def test_read_rgb_png_keeps_channel_order(folder: Path) -> None:
    rgb = rgb_gradient()
    path = write_with_cv2(folder / "colour ß.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    image = read_image(str(path))
    assert image.shape == (6, 7, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, rgb)


def test_read_rgba_png(folder: Path) -> None:
    rgba = np.zeros((5, 8, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2] = 200, 100, 30
    rgba[..., 3] = np.linspace(0, 255, 8).astype(np.uint8)  # varying alpha
    rgba[0, 0, :3] = (1, 2, 3)
    path = write_with_cv2(folder / "rgba ñ.png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    image = read_image(path)
    assert image.shape == (5, 8, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, rgba[..., :3])


def test_read_16_bit_grey_png(folder: Path) -> None:
    grey16 = np.array([[0, 65535, 257 * 100], [257, 257 * 254, 32768]], np.uint16)
    path = write_with_cv2(folder / "grey16 ø.png", grey16)
    image = read_image(path)
    assert image.shape == (2, 3, 3) and image.dtype == np.uint8
    expected = np.array([[0, 255, 100], [1, 254, 128]], np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], expected)


def test_read_16_bit_colour_png(folder: Path) -> None:
    rgb16 = np.zeros((2, 2, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 257 * 10, 0
    path = write_with_cv2(folder / "rgb16.png", cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    image = read_image(path)
    assert image.dtype == np.uint8
    assert image[0, 0].tolist() == [255, 10, 0]


def test_read_rgb_jpeg(folder: Path) -> None:
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[:, :16] = (220, 40, 30)  # reddish left half
    rgb[:, 16:] = (20, 60, 210)  # bluish right half
    path = write_with_cv2(folder / "photo ç.jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 100])
    image = read_image(path)
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    # lossy, but far from the edge between the halves the colours survive closely
    assert np.abs(image[4:28, 2:10].astype(int) - (220, 40, 30)).max() <= 4
    assert np.abs(image[4:28, 22:30].astype(int) - (20, 60, 210)).max() <= 4


def test_write_image_then_read_is_red(folder: Path) -> None:
    red = np.zeros((4, 6, 3), np.uint8)
    red[..., 0] = 255
    path = write_image(folder / "red ø.png", red)
    assert path.is_file()
    np.testing.assert_array_equal(read_image(path), red)
    # the file really holds red (not two swaps that cancel): OpenCV sees it as B=0, G=0, R=255
    decoded_bgr = cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_COLOR)
    assert decoded_bgr[0, 0].tolist() == [0, 0, 255]


def test_write_image_jpeg_suffix(folder: Path) -> None:
    rgb = np.full((16, 16, 3), (10, 200, 90), np.uint8)
    path = write_image(folder / "out é.jpg", rgb)
    assert path.read_bytes()[:2] == b"\xff\xd8"  # a JPEG, as the suffix says
    assert np.abs(read_image(path).astype(int) - (10, 200, 90)).max() <= 3


def test_jpeg_exif_orientation_is_applied(folder: Path) -> None:
    # 16 high x 32 wide, left half white; EXIF orientation 6 = rotate 90 degrees clockwise to view
    rgb = np.zeros((16, 32, 3), np.uint8)
    rgb[:, :16] = 255
    ok, encoded = cv2.imencode(".jpg", rgb, [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    jpeg = encoded.tobytes()
    ifd = struct.pack(">H", 1) + struct.pack(">HHI", 0x0112, 3, 1) + struct.pack(">HH", 6, 0) + struct.pack(">I", 0)
    exif = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    app1 = b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif
    path = folder / "rotated é.jpg"
    path.write_bytes(jpeg[:2] + app1 + jpeg[2:])
    image = read_image(path)
    assert image.shape == (32, 16, 3)
    assert image[:12].min() >= 240  # the white half is now on top
    assert image[20:].max() <= 15


def test_empty_file(folder: Path) -> None:
    path = folder / "empty é.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_text_file_named_png(folder: Path) -> None:
    path = folder / "notes ü.png"
    path.write_text("this is not an image\n", encoding="utf-8")
    with pytest.raises(ImageReadError, match="not a decodable image") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_truncated_png(folder: Path) -> None:
    ok, encoded = cv2.imencode(".png", rgb_gradient(32, 32))
    path = folder / "truncated.png"
    path.write_bytes(encoded.tobytes()[:40])
    with pytest.raises(ImageReadError, match="truncated PNG"):
        read_image(path)


def test_missing_file(folder: Path) -> None:
    path = folder / "missing ø.png"
    with pytest.raises(ImageReadError, match="not found") as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_directory(folder: Path) -> None:
    path = folder / "a folder.png"
    path.mkdir()
    with pytest.raises(ImageReadError, match="directory") as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert issubclass(ImageReadError, EdgeDxError)


def test_decode_image_returns_none_for_junk() -> None:
    assert decode_image(np.frombuffer(b"definitely not an image", np.uint8)) is None


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.png", True),
        ("a.PNG", True),
        ("b c.JpEg", True),
        ("d.jpg", True),
        ("e.tif", True),
        ("f.TIFF", True),
        ("g.bmp", True),
        ("h.webp", True),
        ("dir.d/scan.Png", True),
        ("notes.txt", False),
        ("model.onnx", False),
        ("png", False),
        ("a.png.json", False),
        ("no_suffix", False),
    ],
)
def test_is_image_path(name: str, expected: bool) -> None:
    assert is_image_path(Path(name)) is expected


# -- to_rgb_uint8 -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_image_in_unit_range(dtype: type) -> None:
    image = np.array([[0.0, 0.5, 1.0], [-0.5, 2.0, 0.2]], dtype=dtype)
    out = to_rgb_uint8(image)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    expected = np.array([[0, 128, 255], [0, 255, 51]], np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], expected)


def test_float_colour_image() -> None:
    image = np.zeros((2, 2, 3), np.float32)
    image[..., 0] = 1.0
    image[..., 2] = 0.25
    out = to_rgb_uint8(image)
    assert out[0, 0].tolist() == [255, 0, 64]  # RGB order kept when bgr is False


def test_single_channel_and_grey_alpha() -> None:
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for image in (grey, grey[..., None], np.stack([grey, np.full_like(grey, 77)], axis=-1)):
        out = to_rgb_uint8(image)
        assert out.shape == (3, 4, 3) and out.dtype == np.uint8
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], grey)


def test_colour_order_flags() -> None:
    rgb = rgb_gradient()
    np.testing.assert_array_equal(to_rgb_uint8(rgb), rgb)
    np.testing.assert_array_equal(to_rgb_uint8(rgb[..., ::-1].copy(), bgr=True), rgb)
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 9, np.uint8)], axis=-1)
    np.testing.assert_array_equal(to_rgb_uint8(rgba), rgb)
    bgra = np.concatenate([rgb[..., ::-1], rgba[..., 3:]], axis=-1)
    np.testing.assert_array_equal(to_rgb_uint8(bgra, bgr=True), rgb)


@pytest.mark.parametrize(
    "image", [np.zeros((2, 2), np.int32), np.zeros((2, 2, 5), np.uint8), np.zeros((2, 2, 3, 1), np.uint8)]
)
def test_unsupported_arrays(image: np.ndarray) -> None:
    with pytest.raises(ImageReadError):
        to_rgb_uint8(image)


# -- preprocess_batch -----------------------------------------------------------------------


def test_mean_std_exact_numbers() -> None:
    card = make_card(input_size=(4, 5))
    crops = np.zeros((2, 4, 5, 3), np.uint8)
    crops[0, 1, 2] = (10, 128, 250)
    crops[1, 3, 4] = (255, 0, 77)
    x = preprocess_batch(crops, card)
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    for n, y, xx, pixel in ((0, 1, 2, (10, 128, 250)), (1, 3, 4, (255, 0, 77)), (0, 0, 0, (0, 0, 0))):
        hand = [(v / 255.0 - m) / s for v, m, s in zip(pixel, MEAN, STD)]
        np.testing.assert_allclose(x[n, :, y, xx], hand, rtol=0, atol=1e-5)
    # a literal, computed by hand: (10 / 255 - 0.485) / 0.229
    assert x[0, 0, 1, 2] == pytest.approx(-1.946656, abs=1e-5)
    assert x[0, 2, 1, 2] == pytest.approx((250 / 255 - 0.406) / 0.225, abs=1e-5)


def test_single_value_normalisation_broadcasts() -> None:
    card = make_card(normalization=Normalization(kind="mean_std", pixel_scale=1.0, mean=(100.0,), std=(50.0,)))
    crops = np.full((1, 4, 5, 3), (0, 100, 250), np.uint8)
    x = preprocess_batch(crops, card)
    np.testing.assert_allclose(x[0, :, 0, 0], [-2.0, 0.0, 3.0], rtol=0, atol=1e-6)


def test_bgr_card_reverses_channels() -> None:
    crops = np.zeros((1, 4, 5, 3), np.uint8)
    crops[0, 2, 3] = (10, 128, 250)  # RGB
    x = preprocess_batch(crops, make_card(colour_order="BGR"))
    hand = [(v / 255.0 - m) / s for v, m, s in zip((250, 128, 10), MEAN, STD)]  # model channel 0 is blue
    np.testing.assert_allclose(x[0, :, 2, 3], hand, rtol=0, atol=1e-5)
    assert x.flags["C_CONTIGUOUS"]
    rgb = preprocess_batch(crops, make_card(colour_order="RGB"))
    assert not np.allclose(rgb, x)


def test_per_image_normalisation() -> None:
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 128, (3, 8, 9, 3), dtype=np.uint8)
    crops[2] = 0  # a blank (zero-padded) crop
    card = make_card(input_size=(8, 9), normalization=Normalization(kind="per_image"))
    x = preprocess_batch(crops, card)
    assert x.shape == (3, 3, 8, 9) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    np.testing.assert_allclose(x[:2].mean(axis=(2, 3)), 0.0, atol=1e-5)
    np.testing.assert_allclose(x[:2].std(axis=(2, 3)), 1.0, atol=1e-4)
    assert np.all(x[2] == 0.0)
    # per image: an affine brightness change of one image gives the same input
    brighter = crops.copy()
    brighter[0] = crops[0] * 2 + 1
    y = preprocess_batch(brighter, card)
    np.testing.assert_allclose(y[0], x[0], atol=1e-4)
    np.testing.assert_array_equal(y[1], x[1])


@pytest.mark.parametrize("value", [60, 200])
def test_per_image_flat_crop_is_zero(value: int) -> None:
    card = make_card(input_size=(8, 9), normalization=Normalization(kind="per_image"))
    x = preprocess_batch(np.full((1, 8, 9, 3), value, np.uint8), card)
    np.testing.assert_allclose(x, 0.0, atol=1e-3)


def test_other_sized_crops_are_resized() -> None:
    rng = np.random.default_rng(1)
    crops = rng.integers(0, 256, (2, 12, 15, 3), dtype=np.uint8)
    card = make_card(input_size=(4, 5), interpolation="area")
    x = preprocess_batch(crops, card)
    assert x.shape == (2, 3, 4, 5) and x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
    resized = np.stack([cv2.resize(c, (5, 4), interpolation=cv2.INTER_AREA) for c in crops])
    np.testing.assert_array_equal(x, preprocess_batch(resized, card))
    # a uniform crop stays uniform at any size
    uniform = np.full((1, 7, 3, 3), (10, 128, 250), np.uint8)
    u = preprocess_batch(uniform, card)
    hand = [(v / 255.0 - m) / s for v, m, s in zip((10, 128, 250), MEAN, STD)]
    np.testing.assert_allclose(u[0].reshape(3, -1), np.repeat(np.array(hand)[:, None], 20, axis=1), atol=1e-5)


def test_resize_to() -> None:
    image = rgb_gradient(6, 8)
    assert resize_to(image, 6, 8, "area") is image
    np.testing.assert_array_equal(
        resize_to(image, 3, 4, "area"), cv2.resize(image, (4, 3), interpolation=cv2.INTER_AREA)
    )
    # enlarging with "area" falls back to linear
    np.testing.assert_array_equal(
        resize_to(image, 12, 16, "area"), cv2.resize(image, (16, 12), interpolation=cv2.INTER_LINEAR)
    )
    np.testing.assert_array_equal(
        resize_to(image, 12, 16, "nearest"), cv2.resize(image, (16, 12), interpolation=cv2.INTER_NEAREST)
    )
    assert resize_to(image, 5, 9, "cubic").shape == (5, 9, 3)


@pytest.mark.parametrize(
    "shape", [(4, 5, 3), (1, 4, 5), (1, 4, 5, 4), (1, 4, 5, 1), (4, 5)]
)
def test_preprocess_bad_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="shape"):
        preprocess_batch(np.zeros(shape, np.uint8), make_card())


# -- model_input ------------------------------------------------------------------------


def test_model_input_float_card_is_preprocess() -> None:
    crops = np.random.default_rng(2).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    card = make_card()
    np.testing.assert_array_equal(model_input(crops, card), preprocess_batch(crops, card))


def test_model_input_uint8_nhwc() -> None:
    crops = np.random.default_rng(3).integers(0, 256, (2, 12, 14, 3), dtype=np.uint8)
    card = make_card(input_size=(6, 7), input_format="uint8_nhwc", interpolation="linear")
    out = model_input(crops, card)
    assert out.shape == (2, 6, 7, 3) and out.dtype == np.uint8 and out.flags["C_CONTIGUOUS"]
    expected = np.stack([cv2.resize(c, (7, 6), interpolation=cv2.INTER_LINEAR) for c in crops])
    np.testing.assert_array_equal(out, expected)
    # same size: passed through unchanged (no scaling, no normalisation)
    same = crops[:, :6, :7]
    np.testing.assert_array_equal(model_input(same, card), same)
    # BGR card: the graph takes RGB and reorders the channels itself
    bgr = model_input(same, card.replace(colour_order="BGR"))
    assert bgr.flags["C_CONTIGUOUS"] and bgr.dtype == np.uint8
    np.testing.assert_array_equal(bgr, same)


# -- to_probabilities ----------------------------------------------------------------------


def test_softmax_rows() -> None:
    card = make_card("multiclass")
    logits = np.array([[0.0, math.log(2), math.log(3)], [5.0, 5.0, 5.0], [1000.0, -1000.0, 0.0], [-1000.0, -1000.0, 1000.0]])
    p = to_probabilities(logits, card)
    assert p.shape == (4, 3) and np.all(np.isfinite(p))
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(p[0], [1 / 6, 2 / 6, 3 / 6], atol=1e-12)
    np.testing.assert_allclose(p[1], [1 / 3] * 3, atol=1e-12)
    np.testing.assert_allclose(p[2], [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(p[3], [0.0, 0.0, 1.0], atol=1e-12)
    # float32 logits from a runtime work the same
    np.testing.assert_allclose(to_probabilities(logits.astype(np.float32), card), p, atol=1e-6)


def test_binary_two_logit_softmax() -> None:
    p = to_probabilities(np.array([[0.0, math.log(3)]]), make_card("binary"))
    np.testing.assert_allclose(p, [[0.25, 0.75]], atol=1e-12)


def test_sigmoid_multilabel() -> None:
    card = make_card("multilabel")
    p = to_probabilities(np.array([[0.0, math.log(3), -math.log(3)], [20.0, -20.0, 0.0]]), card)
    np.testing.assert_allclose(p[0], [0.5, 0.75, 0.25], atol=1e-12)
    np.testing.assert_allclose(p[1], [1 / (1 + math.exp(-20)), 1 / (1 + math.exp(20)), 0.5], atol=1e-12)
    assert not np.allclose(p.sum(axis=1), 1.0)  # independent labels, not a distribution


def test_sigmoid_large_logits_values() -> None:
    card = make_card("multilabel")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        p = to_probabilities(np.array([[1000.0, -1000.0, 0.0]]), card)
    np.testing.assert_array_equal(p, [[1.0, 0.0, 0.5]])


def test_sigmoid_large_logits_do_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = to_probabilities(np.array([[1000.0, -1000.0, 0.0]]), make_card("multilabel"))
    np.testing.assert_array_equal(p, [[1.0, 0.0, 0.5]])


@pytest.mark.parametrize("shape", [(3, 1), (3,)])
def test_binary_single_logit_positive_class_second(shape: tuple[int, ...]) -> None:
    card = make_card("binary", class_names=("neg", "pos"), positive_class="pos", output_activation="sigmoid")
    logits = np.array([math.log(3), 0.0, -math.log(3)]).reshape(shape)
    p = to_probabilities(logits, card)
    np.testing.assert_allclose(p, [[0.25, 0.75], [0.5, 0.5], [0.75, 0.25]], atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 1), (3,)])
def test_binary_single_logit_positive_class_first(shape: tuple[int, ...]) -> None:
    card = make_card("binary", class_names=("pos", "neg"), positive_class="pos", output_activation="sigmoid")
    logits = np.array([math.log(3), 0.0, -math.log(3)]).reshape(shape)
    p = to_probabilities(logits, card)
    np.testing.assert_allclose(p, [[0.75, 0.25], [0.5, 0.5], [0.25, 0.75]], atol=1e-12)
    assert decide(p[0], card) == "pos" and decide(p[2], card) == "neg"


@pytest.mark.parametrize(
    ("task", "overrides", "n_outputs"),
    [
        ("multiclass", {}, 2),
        ("multiclass", {}, 4),
        ("multilabel", {}, 2),
        ("binary", {}, 1),  # softmax over one logit is meaningless
        ("binary", {}, 3),
        ("binary", {"output_activation": "sigmoid"}, 3),
    ],
)
def test_wrong_output_count(task: str, overrides: dict[str, Any], n_outputs: int) -> None:
    with pytest.raises(ValueError, match="outputs"):
        to_probabilities(np.zeros((2, n_outputs)), make_card(task, **overrides))


# -- decide ----------------------------------------------------------------------------------


def test_decide_binary_at_card_threshold() -> None:
    card = make_card("binary", threshold=0.3)
    assert decide(np.array([0.7, 0.3]), card) == "pos"  # exactly at the threshold: positive
    assert decide(np.array([0.70001, 0.29999]), card) == "neg"
    assert decide(np.array([0.1, 0.9]), card) == "pos"
    first = make_card("binary", class_names=("pos", "neg"), positive_class="pos", threshold=0.8)
    assert decide(np.array([0.8, 0.2]), first) == "pos"
    assert decide(np.array([0.79, 0.21]), first) == "neg"
    assert isinstance(decide(np.array([0.8, 0.2]), first), str)


def test_decide_binary_default_threshold() -> None:
    card = make_card("binary", threshold=None)
    assert decide(np.array([0.5, 0.5]), card) == "pos"
    assert decide(np.array([0.51, 0.49]), card) == "neg"
    assert decide(np.array([0.2, 0.8]), card) == "pos"


def test_decide_multiclass_argmax() -> None:
    card = make_card("multiclass", threshold=0.9)  # the threshold plays no part
    assert decide(np.array([0.2, 0.5, 0.3]), card) == "b"
    assert decide(np.array([0.1, 0.2, 0.7]), card) == "c"
    assert decide(np.array([0.4, 0.3, 0.3]), card) == "a"


def test_decide_multilabel() -> None:
    card = make_card("multilabel", threshold=0.4)
    assert decide(np.array([0.4, 0.39, 0.9]), card) == ["a", "c"]
    assert decide(np.array([0.1, 0.2, 0.3]), card) == []
    assert decide(np.array([1.0, 1.0, 1.0]), card) == ["a", "b", "c"]
    default = make_card("multilabel", threshold=None)
    assert decide(np.array([0.5, 0.49, 0.51]), default) == ["a", "c"]


# -- the runtime's pure parts stay torch- and onnxruntime-free ---------------------------------


def test_runtime_imports_no_heavy_packages() -> None:
    code = (
        "import sys\n"
        "import edgedx.card, edgedx.runtime.io.image_io, edgedx.runtime.preprocess\n"
        "import edgedx.runtime.tiling, edgedx.runtime.model\n"
        "heavy = [m for m in ('torch', 'timm', 'onnx', 'onnxruntime', 'tensorrt') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
