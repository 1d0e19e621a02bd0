"""Bad and odd image files: each bad one is one precise ImageReadError, each odd-but-valid one loads right.

Unit tests call read_image; the last test runs a whole folder of them through
diagnose_paths, as a clinic's unattended batch would.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from edgedx.runtime.io import image_io
from edgedx.runtime.io.image_io import (
    BUILTIN_MAX_PIXELS,
    MAX_PIXELS_ENV,
    decode_image,
    default_max_pixels,
    read_image,
    set_default_max_pixels,
    sniff_format,
    write_image,
)

from edgedx.errors import ImageReadError, InputError

Image = pytest.importorskip("PIL.Image")
ImageOps = pytest.importorskip("PIL.ImageOps")


@pytest.fixture(autouse=True)
def _default_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts from the built-in pixel limit: no env var, no --max-pixels override."""
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    monkeypatch.setattr(image_io, "_max_pixels_override", None)


def rgb_pattern(height: int = 30, width: int = 40, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus a little noise: compresses like an image, asymmetric in both axes."""
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(seed).integers(0, 12, (height, width, 3))
    return np.clip(np.stack([x * 6, y * 8, 255 - x * 3 - y * 2], axis=-1) + noise, 0, 255).astype(np.uint8)


def pil_bytes(image: object, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)  # type: ignore[attr-defined]
    return buf.getvalue()


def pil_rgb(data: bytes) -> np.ndarray:
    """Pillow's reading, as a viewer shows it: EXIF orientation applied, converted to RGB."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def cv_bytes(suffix: str, bgr: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, encoded = cv2.imencode(suffix, bgr, params or [])
    assert ok
    return encoded.tobytes()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_with_header(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width x height: a decompression bomb's header, without the bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + png_chunk(b"IEND", b"")


def jpeg_bytes(rgb: np.ndarray, **params: int) -> bytes:
    flags = [cv2.IMWRITE_JPEG_QUALITY, 92] + [v for kv in params.items() for v in (getattr(cv2, kv[0]), kv[1])]
    return cv_bytes(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), flags)


def write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def no_decoding(*_: object, **__: object) -> None:
    raise AssertionError("cv2.imdecode was called: the header check must refuse this before decoding")


# -- sniffing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 8, "png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "jpeg"),
        (b"BM" + b"\x00" * 12 + struct.pack("<I", 40) + b"\x00" * 8, "bmp"),
        (b"II*\x00\x08\x00\x00\x00", "tiff"),
        (b"MM\x00*\x00\x00\x00\x08", "tiff"),
        (b"II+\x00\x08\x00\x00\x00", "tiff"),  # BigTIFF
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", None),  # a RIFF that is audio, not WebP
        (b"GIF89a\x01\x00\x01\x00", "gif"),
        (b"\x00\x00\x00\x0cjP  \r\n\x87\n\x00\x00", "jp2"),
        (b"\xff\x4f\xff\x51\x00\x2f", "jp2"),
        (b"P6\n# comment\n4 3\n255\n", "pnm"),
        (b"P5 4 3 255 ", "pnm"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3", "pdf"),
        (b"PK\x03\x04\x14\x00\x06\x00", "zip"),
        (b"\x00" * 128 + b"DICM\x02\x00\x00\x00", "dicom"),
        (b"\x1f\x8b\x08\x00\x00\x00\x00\x00", "gzip"),
        (b"  <!DOCTYPE html>\n<html><body>Access denied</body></html>", "html"),
        (b"\xef\xbb\xbf<?xml version='1.0'?><root/>", "xml"),
        (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "xml"),
        ("Probe 17, Blutausstrich µ, 血液\n".encode(), "text"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", "heic"),
        (b"BMP is a format", "text"),  # starts with "BM" but has no BMP header: plain text
        (bytes(range(256)), None),  # binary, unknown
        (b"RIFF\x84", None),  # cut WebP: one invalid UTF-8 byte in five is not "mostly printable"
        (b"", None),
    ],
)
def test_sniff_format(head: bytes, expected: str | None) -> None:
    assert sniff_format(head) == expected
    assert sniff_format(np.frombuffer(head, np.uint8)) == expected  # the array read_image holds


# -- not images at all ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("report.jpg", b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\n", "is a PDF document, not an image; export the page as PNG/TIFF first"),
        ("slide 3.png", b"\x00" * 128 + b"DICM" + b"\x02\x00\x00\x00UL" * 8, "is a DICOM file; EdgeDx reads PNG/JPEG/TIFF — convert it (e.g. with dcmj2pnm)"),
        ("batch.tif", b"PK\x03\x04" + b"\x00" * 40, "is a ZIP archive (or a zipped Office document), not an image; unzip it"),
        ("scan.png.gz.png", b"\x1f\x8b\x08\x00" + b"\x00" * 30, "is gzip-compressed, not an image; decompress it first (gunzip)"),
        ("download.jpg", b"<!DOCTYPE html><html><head><title>Login</title></head></html>", "is an HTML page, not an image"),
        ("metadata.png", b'<?xml version="1.0"?>\n<slide id="3"/>\n', "is an XML document, not an image"),
        ("notes ü.png", b"Probe 17: Plasmodium?\nrecheck\n", "not a decodable image — it is a text file (30 bytes)"),
        ("field.png", b"version https://git-lfs.github.com/spec/v1\noid sha256:0f3c\nsize 812345\n", "not a decodable image — it is a Git LFS pointer (a small text file), not the image; fetch it with `git lfs pull`"),
    ],
)
def test_non_image_content_is_named(tmp_path: Path, name: str, content: bytes, fragment: str) -> None:
    path = write(tmp_path, name, content)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(info.value).startswith(f"{path}: {fragment}")


def test_unknown_binary_names_its_first_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, "mystery.bmp", bytes([7, 1, 2, 3, 250, 251, 0, 9]) * 16)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(info.value) == (
        f"{path}: not a decodable image (unrecognised content starting with bytes 07 01 02 03 fa fb 00 09, 128 bytes); "
        "EdgeDx reads PNG, JPEG, TIFF, BMP, WebP, GIF, JPEG 2000 and PNM images"
    )


# -- truncation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("progressive", [0, 1])
def test_truncated_jpeg(tmp_path: Path, progressive: int) -> None:
    whole = jpeg_bytes(rgb_pattern(64, 80), IMWRITE_JPEG_PROGRESSIVE=progressive)
    cut = whole[: int(len(whole) * 0.6)]
    path = write(tmp_path, "still copying.jpg", cut)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(info.value) == (
        f"{path}: truncated JPEG: the file ends before the image data does ({len(cut)} bytes; was it still being copied?)"
    )


def test_jpeg_missing_only_its_end_marker_is_truncated(tmp_path: Path) -> None:
    whole = jpeg_bytes(rgb_pattern())
    assert whole.endswith(b"\xff\xd9")
    path = write(tmp_path, "no eoi.jpg", whole[:-2])
    with pytest.raises(ImageReadError, match="truncated JPEG"):
        read_image(path)


def test_thumbnail_end_marker_does_not_hide_a_truncated_jpeg(tmp_path: Path) -> None:
    # an EXIF block carrying a whole thumbnail JPEG (with its own SOS and EOI) before the main image
    thumb = jpeg_bytes(rgb_pattern(8, 8))
    app1 = b"\xff\xe1" + struct.pack(">H", len(thumb) + 8) + b"Exif\x00\x00" + thumb
    main = jpeg_bytes(rgb_pattern(64, 80))
    whole = main[:2] + app1 + main[2:]
    assert read_image(write(tmp_path, "with thumb.jpg", whole)).shape == (64, 80, 3)
    path = write(tmp_path, "with thumb cut.jpg", whole[: len(whole) - 300])
    with pytest.raises(ImageReadError, match="truncated JPEG"):
        read_image(path)


@pytest.mark.parametrize("where", ["inside IDAT", "before IEND", "inside IHDR"])
def test_truncated_png(tmp_path: Path, where: str) -> None:
    whole = cv_bytes(".png", rgb_pattern(48, 64))
    cut = {"inside IDAT": len(whole) // 2, "before IEND": len(whole) - 12, "inside IHDR": 20}[where]
    path = write(tmp_path, "cut.png", whole[:cut])
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(info.value) == f"{path}: truncated PNG: the file ends before the image data does ({cut} bytes; was it still being copied?)"


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_trailing_bytes_after_the_end_still_load(tmp_path: Path, suffix: str) -> None:
    rgb = rgb_pattern()
    whole = cv_bytes(suffix, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    expected = read_image(write(tmp_path, f"clean{suffix}", whole))
    # cameras and scanners append data after EOI/IEND; these bytes even hold markers of either format
    trailer = b"\x00\x00" + b"\xff\xda\x00\x08" + b"IDAT" + b"\xff\xd8" + bytes(range(64))
    padded = read_image(write(tmp_path, f"trailer{suffix}", whole + trailer))
    np.testing.assert_array_equal(padded, expected)


# -- suffix and content disagree -------------------------------------------------------------------


@pytest.fixture
def fresh_mismatch_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suffix warning is once per process: start each test as a new run."""
    from edgedx.runtime.io import image_io

    monkeypatch.setattr(image_io, "_MISMATCHES_SEEN", set())


def test_png_named_jpg_decodes_by_content_and_warns_once_per_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fresh_mismatch_warnings: None
) -> None:
    rgb = rgb_pattern()
    paths = [write(tmp_path, f"really a png {i}.jpg", cv_bytes(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))) for i in range(3)]
    with caplog.at_level(logging.INFO, logger="edgedx.runtime.io.image_io"):
        images = [read_image(p) for p in paths]
    np.testing.assert_array_equal(images[2], rgb)  # lossless PNG: exact
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"{paths[0]}: the content is PNG but the suffix says JPEG; decoding it as PNG (further files like this are logged with -v only)"
    ]
    quiet = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "suffix says" in r.getMessage()]
    assert quiet == [f"{p}: the content is PNG but the suffix says JPEG; decoding it as PNG" for p in paths[1:]]


def test_jpeg_named_tif_decodes_by_content(tmp_path: Path, caplog: pytest.LogCaptureFixture, fresh_mismatch_warnings: None) -> None:
    data = jpeg_bytes(rgb_pattern())
    with caplog.at_level(logging.WARNING, logger="edgedx.runtime.io.image_io"):
        image = read_image(write(tmp_path, "scan.tif", data))
    np.testing.assert_array_equal(image, read_image(write(tmp_path, "scan.jpg", data)))
    assert any("the content is JPEG but the suffix says TIFF" in m for m in caplog.messages)


# -- the pixel limit --------------------------------------------------------------------------------


def test_decompression_bomb_header_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "bomb.png", png_with_header(40000, 30000))
    monkeypatch.setattr(image_io.cv2, "imdecode", no_decoding)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(info.value) == (
        f"{path}: 40000×30000 = 1200 megapixels exceeds the limit of 250 megapixels; "
        "if the image is trusted raise it with --max-pixels or EDGEDX_MAX_IMAGE_PIXELS"
    )


def _webp_vp8x(rgb: np.ndarray) -> bytes:
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 200, np.uint8)])
    return pil_bytes(Image.fromarray(rgba, "RGBA"), "WEBP", quality=90)  # alpha in lossy WebP: a VP8X file


def _pam(rgb: np.ndarray) -> bytes:
    h, w = rgb.shape[:2]
    return f"P7\nWIDTH {w}\nHEIGHT {h}\nDEPTH 3\nMAXVAL 255\nTUPLTYPE RGB\nENDHDR\n".encode() + rgb.tobytes()


def _tiff(rgb: np.ndarray) -> bytes:
    tifffile = pytest.importorskip("tifffile")
    buf = io.BytesIO()
    tifffile.imwrite(buf, rgb, photometric="rgb")
    return buf.getvalue()


HEADER_WRITERS = {
    "png": lambda rgb: pil_bytes(Image.fromarray(rgb), "PNG"),
    "jpeg": lambda rgb: pil_bytes(Image.fromarray(rgb), "JPEG", quality=90),
    "bmp": lambda rgb: pil_bytes(Image.fromarray(rgb), "BMP"),
    "gif": lambda rgb: pil_bytes(Image.fromarray(rgb), "GIF"),
    "webp VP8": lambda rgb: pil_bytes(Image.fromarray(rgb), "WEBP", quality=90),
    "webp VP8L": lambda rgb: pil_bytes(Image.fromarray(rgb), "WEBP", lossless=True),
    "webp VP8X": _webp_vp8x,
    "pnm P6": lambda rgb: pil_bytes(Image.fromarray(rgb), "PPM"),
    "pnm P7": _pam,
    "tiff": _tiff,
    "jp2": lambda rgb: pil_bytes(Image.fromarray(rgb), "JPEG2000"),
}


@pytest.mark.parametrize("fmt", sorted(HEADER_WRITERS))
def test_header_size_is_read_without_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    rgb = rgb_pattern(10, 12)  # 12 wide, 10 high: a swapped parse would say 10×12
    data = HEADER_WRITERS[fmt](rgb)
    if fmt.startswith("webp"):
        assert data[12:16].decode() == fmt.split()[1].ljust(4)  # the chunk this case is meant to test
    path = write(tmp_path, f"small.{fmt.split()[0]}", data)
    assert read_image(path, max_pixels=120).shape == (10, 12, 3)  # exactly at the limit: allowed
    monkeypatch.setattr(image_io.cv2, "imdecode", no_decoding)
    with pytest.raises(ImageReadError) as info:
        read_image(path, max_pixels=119)
    assert f"{path}: 12×10 = 0.00012 megapixels exceeds the limit of 0.000119 megapixels" in str(info.value)


def test_format_without_a_parsed_header_is_checked_after_decoding(tmp_path: Path) -> None:
    rgb = rgb_pattern(10, 12)
    path = write(tmp_path, "sun raster.ras", cv_bytes(".ras", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)))
    assert sniff_format(path.read_bytes()) is None
    np.testing.assert_array_equal(read_image(path, max_pixels=120), rgb)
    with pytest.raises(ImageReadError, match="12×10 = 0.00012 megapixels exceeds the limit"):
        read_image(path, max_pixels=100)


def test_zero_size_header_is_corrupt(tmp_path: Path) -> None:
    path = write(tmp_path, "zero.png", png_with_header(0, 30))
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(info.value) == f"{path}: corrupt PNG header: it says the image is 0×30 pixels; re-export or re-copy the file"


def test_opencv_own_pixel_limit_is_an_image_read_error(tmp_path: Path) -> None:
    # our limit raised above OpenCV's (2**30 pixels unless OPENCV_IO_MAX_IMAGE_PIXELS): OpenCV raises cv2.error
    path = write(tmp_path, "bomb.png", png_with_header(40000, 30000))
    with pytest.raises(ImageReadError) as info:
        read_image(path, max_pixels=2_000_000_000)
    assert "over OpenCV's own pixel limit" in str(info.value) and "OPENCV_IO_MAX_IMAGE_PIXELS" in str(info.value)


def test_any_cv2_error_becomes_an_image_read_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "odd.png", cv_bytes(".png", rgb_pattern()))

    def failing(*_: object) -> None:
        raise cv2.error("OpenCV(5.0.0) grfmt_png.cpp:1: error: (-2:Unspecified error) broken filter")

    monkeypatch.setattr(image_io.cv2, "imdecode", failing)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(info.value).startswith(f"{path}: corrupt PNG: OpenCV failed decoding it (")
    assert "broken filter" in str(info.value)


def test_out_of_memory_while_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "big.png", cv_bytes(".png", rgb_pattern()))

    def no_memory(*_: object) -> None:
        raise cv2.error("OpenCV(5.0.0) alloc.cpp:73: error: (-4:Insufficient memory) Failed to allocate 3600 bytes")

    monkeypatch.setattr(image_io.cv2, "imdecode", no_memory)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(info.value).startswith(f"{path}: not enough memory to decode a 40×30 image; close other programs")


def test_limit_from_env_and_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "field.png", cv_bytes(".png", rgb_pattern(10, 12)))
    assert default_max_pixels() == BUILTIN_MAX_PIXELS == 250_000_000
    monkeypatch.setenv(MAX_PIXELS_ENV, " 100 ")
    assert default_max_pixels() == 100
    with pytest.raises(ImageReadError, match="exceeds the limit of 0.0001 megapixels"):
        read_image(path)
    assert read_image(path, max_pixels=120).shape == (10, 12, 3)  # the keyword beats the env var
    set_default_max_pixels(1000)  # the CLI's --max-pixels beats the env var
    try:
        assert default_max_pixels() == 1000
        assert read_image(path).shape == (10, 12, 3)
    finally:
        set_default_max_pixels(None)
    assert default_max_pixels() == 100
    monkeypatch.setenv(MAX_PIXELS_ENV, "")
    assert default_max_pixels() == BUILTIN_MAX_PIXELS  # set but empty counts as unset


@pytest.mark.parametrize("value", ["lots", "0", "-5", "1.5e8"])
def test_bad_env_limit_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(MAX_PIXELS_ENV, value)
    path = write(tmp_path, "field.png", cv_bytes(".png", rgb_pattern()))
    with pytest.raises(InputError) as info:
        read_image(path)
    assert MAX_PIXELS_ENV in str(info.value) and "positive" in str(info.value)


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "100"])
def test_bad_limit_arguments(value: object) -> None:
    with pytest.raises(InputError, match="must be a positive whole number of pixels"):
        set_default_max_pixels(value)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="max_pixels must be a positive whole number"):
        read_image("anything.png", max_pixels=value)  # type: ignore[arg-type]


def test_decode_image_takes_bytes_and_keeps_its_contract() -> None:
    rgb = rgb_pattern(10, 12)
    png = cv_bytes(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(decode_image(png), rgb)
    assert decode_image(b"%PDF-1.4 not pixels") is None
    assert decode_image(png[: len(png) // 2]) is None  # truncated: not decodable
    with pytest.raises(ImageReadError, match="image bytes: 12×10 = 0.00012 megapixels exceeds the limit"):
        decode_image(png, max_pixels=100)  # refused, which is not the same as undecodable


# -- odd but valid: compared with Pillow ------------------------------------------------------------


def _grey(h: int = 10, w: int = 12) -> np.ndarray:
    return rgb_pattern(h, w)[..., 1]


ODD_VALID = {
    "grey 8-bit PNG": lambda: pil_bytes(Image.fromarray(_grey(), "L"), "PNG"),
    "grey+alpha PNG": lambda: pil_bytes(Image.fromarray(np.dstack([_grey(), _grey()[::-1]]), "LA"), "PNG"),
    "RGBA PNG": lambda: pil_bytes(Image.fromarray(np.dstack([rgb_pattern(10, 12), _grey()]), "RGBA"), "PNG"),
    "palette PNG": lambda: pil_bytes(Image.fromarray(rgb_pattern(10, 12)).quantize(12), "PNG"),
    "grey GIF": lambda: pil_bytes(Image.fromarray(_grey(), "L"), "GIF"),
    "CMYK TIFF": lambda: pil_bytes(Image.fromarray(rgb_pattern(10, 12, 4)).convert("CMYK"), "TIFF"),
}


@pytest.mark.parametrize("case", sorted(ODD_VALID))
def test_odd_but_valid_images_match_pillow_exactly(tmp_path: Path, case: str) -> None:
    data = ODD_VALID[case]()
    image = read_image(write(tmp_path, f"{case}.{'gif' if 'GIF' in case else 'tif' if 'TIFF' in case else 'png'}", data))
    expected = pil_rgb(data)
    assert image.shape == expected.shape and image.dtype == np.uint8
    if case == "CMYK TIFF":
        # libtiff (OpenCV) and Pillow both do R = (255 - C)(255 - K)/255 but round differently: at most 1 apart
        assert np.abs(image.astype(int) - expected).max() <= 1
    else:  # lossless formats, no colour maths beyond copying grey into three channels: exact
        np.testing.assert_array_equal(image, expected)


def test_16_bit_grey_png_scales_to_8_bits(tmp_path: Path) -> None:
    grey16 = (rgb_pattern(10, 12)[..., 0].astype(np.int64) * 250 + np.arange(12) * 7).astype(np.uint16)  # all 16 bits used
    data = pil_bytes(Image.fromarray(grey16), "PNG")  # mode I;16
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    image = read_image(write(tmp_path, "grey16.png", data))
    # Pillow's convert("RGB") clips 16-bit values at 255 instead of scaling them, so the reference is
    # Pillow's raw 16-bit read scaled by 255/65535, the one scale EdgeDx uses everywhere (lazy TIFFs too)
    raw = np.asarray(Image.open(io.BytesIO(data)), dtype=np.float64)
    expected = np.floor(raw * 255.0 / 65535.0 + 0.5).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(image[..., c], expected)


def test_16_bit_rgb_tiff(tmp_path: Path) -> None:
    tifffile = pytest.importorskip("tifffile")
    rgb16 = np.random.default_rng(1).integers(0, 65536, (10, 12, 3), dtype=np.uint16)
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, rgb16, photometric="rgb")
    image = read_image(path)
    # Pillow reads 16-bit RGB TIFF as 8-bit RGB by taking the high byte (v >> 8); EdgeDx rounds v * 255/65535:
    # the two differ by at most 1
    assert np.abs(image.astype(int) - pil_rgb(path.read_bytes())).max() <= 1
    np.testing.assert_array_equal(image, np.floor(rgb16 * (255.0 / 65535.0) + 0.5).astype(np.uint8))


def test_cmyk_jpeg(tmp_path: Path) -> None:
    data = pil_bytes(Image.fromarray(rgb_pattern(16, 24, 5)).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = read_image(write(tmp_path, "cmyk.jpg", data))
    # the same JPEG decode, then CMYK→RGB in OpenCV and in Pillow with different rounding: at most 2 apart
    assert image.shape == (16, 24, 3)
    assert np.abs(image.astype(int) - pil_rgb(data)).max() <= 2


@pytest.mark.parametrize("orientation", [3, 6])
def test_exif_rotated_jpeg_as_a_viewer_shows_it(tmp_path: Path, orientation: int) -> None:
    stored = np.zeros((16, 32, 3), np.uint8)
    stored[:8, :16] = 255  # one white quadrant: every rotation and flip moves it somewhere else
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = pil_bytes(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    image = read_image(write(tmp_path, f"rotated {orientation}.jpg", data))
    expected = pil_rgb(data)
    assert image.shape == expected.shape == ((16, 32, 3) if orientation == 3 else (32, 16, 3))
    # both decode the same JPEG with libjpeg(-turbo); only IDCT rounding could differ
    assert np.abs(image.astype(int) - expected).max() <= 2
    white = (slice(8, 16), slice(16, 32)) if orientation == 3 else (slice(0, 16), slice(8, 16))  # rotated 180° / 90° cw
    assert image[white].min() >= 200


# -- the file system --------------------------------------------------------------------------------


def test_permission_denied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "locked.png", cv_bytes(".png", rgb_pattern()))

    def denied(*_: object, **__: object) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(np, "fromfile", denied)
    with pytest.raises(ImageReadError) as info:
        read_image(path)
    assert str(info.value) == f"{path}: permission denied; give the user running EdgeDx read access to it"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode; the monkeypatched test covers this")
def test_permission_denied_for_real(tmp_path: Path) -> None:
    path = write(tmp_path, "locked.png", cv_bytes(".png", rgb_pattern()))
    path.chmod(0)
    try:
        with pytest.raises(ImageReadError, match="permission denied"):
            read_image(path)
    finally:
        path.chmod(0o644)


def test_file_vanishing_after_listing(tmp_path: Path) -> None:
    from edgedx.runtime.io.inputs import expand_inputs

    write(tmp_path, "a.png", cv_bytes(".png", rgb_pattern()))
    gone = write(tmp_path, "b.png", cv_bytes(".png", rgb_pattern()))
    listed = expand_inputs([tmp_path])
    gone.unlink()  # moved away by the scanner software after the folder was listed
    assert read_image(listed[0]).shape == (30, 40, 3)
    with pytest.raises(ImageReadError) as info:
        read_image(listed[1])
    assert str(info.value).startswith(f"{gone}: file not found")


@pytest.mark.parametrize("name", ["blut ausstrich µ 1.png", "血液.jpg", "über  zwei Leerzeichen .tif"])
def test_names_with_spaces_and_non_ascii(tmp_path: Path, name: str) -> None:
    rgb = rgb_pattern()
    path = tmp_path / "Ordner mit Ä" / name
    path.parent.mkdir()
    write_image(path, rgb)
    image = read_image(path)
    tolerance = 0 if path.suffix != ".jpg" else 12  # lossy JPEG at OpenCV's default quality 95
    assert image.shape == rgb.shape and np.abs(image.astype(int) - rgb).max() <= tolerance


# -- a whole folder through the batch ---------------------------------------------------------------


def test_batch_records_each_bad_file_and_goes_on(trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgedx.runtime.batch import diagnose_paths
    from edgedx.runtime.outputs.records import read_records

    from edgedx.synthetic import render_field

    tifffile = pytest.importorskip("tifffile")
    folder = tmp_path / "clinic drop ü"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for k in range(3):
        write_image(folder / f"field {k}.png", render_field(rng, 96, 128, infected_fraction=0.3).image)
    write_image(folder / "random.jpg", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    field = render_field(rng, 64, 80, infected_fraction=0.3).image
    field_jpeg = jpeg_bytes(field)
    whole_png = cv_bytes(".png", cv2.cvtColor(field, cv2.COLOR_RGB2BGR))
    buf = io.BytesIO()
    tifffile.imwrite(buf, field.astype(np.uint16) * 257, photometric="rgb")
    exif = Image.Exif()
    exif[0x0112] = 6
    bad = {
        "empty.png": (b"", "empty file (0 bytes)"),
        "cut.jpg": (field_jpeg[: len(field_jpeg) // 2], "truncated JPEG: the file ends before the image data does"),
        "cut.png": (whole_png[: len(whole_png) // 2], "truncated PNG: the file ends before the image data does"),
        "notes.png": (b"Probe 17: recheck tomorrow\n", "it is a text file"),
        "report.jpg": (b"%PDF-1.5\n%\xb5\xb5\n1 0 obj\n", "is a PDF document, not an image"),
        "huge.png": (cv_bytes(".png", np.zeros((250, 240, 3), np.uint8)), "240×250 = 0.06 megapixels exceeds the limit of 0.05 megapixels"),
        # read fine, but its one crop would be 98.5% padding: no confident answer from 15 pixels
        "tiny 5x3.png": (cv_bytes(".png", field[:3, :5]), "fills 1.5% of its 32×32 crops, the rest is padding"),
    }
    odd = {
        "png named.jpg": whole_png,
        "grey.png": pil_bytes(Image.fromarray(field[..., 1], "L"), "PNG"),
        "rgba.png": pil_bytes(Image.fromarray(np.dstack([field, field[..., 0]]), "RGBA"), "PNG"),
        "palette.png": pil_bytes(Image.fromarray(field).quantize(64), "PNG"),
        "grey16.png": pil_bytes(Image.fromarray(field[..., 0].astype(np.uint16) * 257), "PNG"),
        "rgb16.tif": buf.getvalue(),
        "cmyk.jpg": pil_bytes(Image.fromarray(field).convert("CMYK"), "JPEG", quality=95),
        "cmyk.tif": pil_bytes(Image.fromarray(field).convert("CMYK"), "TIFF"),
        "exif rotated.jpg": pil_bytes(Image.fromarray(field), "JPEG", quality=95, exif=exif.tobytes()),
        "small 25x20.png": cv_bytes(".png", field[:20, :25]),  # smaller than a crop, but half of it: padded and diagnosed
        "血液 µ.jpg": field_jpeg,
    }
    for name, (data, _) in bad.items():
        write(folder, name, data)
    for name, data in odd.items():
        write(folder, name, data)
    monkeypatch.setenv(MAX_PIXELS_ENV, "50000")  # fields are 12,288 pixels, huge.png 60,000

    # the gate is off: this test is about files that cannot be read; a synthetic field near the learned focus limit
    # would be a reject (tested in test_quality_gate.py)
    summary = diagnose_paths(inputs=[folder], model=trained.onnx, out=tmp_path / "out.jsonl", quality="off")

    records = read_records(tmp_path / "out.jsonl")
    by_name = {Path(r["input"]).name: r for r in records}
    good = {f"field {k}.png" for k in range(3)} | {"random.jpg"} | set(odd)
    assert len(records) == len(by_name) == len(good) + len(bad)  # one record per file
    assert set(by_name) == good | set(bad)
    for name, (_, fragment) in bad.items():
        record = by_name[name]
        assert record["label"] is None and record["error"] is not None, name
        assert fragment in record["error"] and str(folder / name) in record["error"], (name, record["error"])
    for name in good:
        assert by_name[name]["error"] is None and by_name[name]["label"] is not None, (name, by_name[name]["error"])
    assert summary.n_inputs == len(records) and summary.n_failed == len(bad)
