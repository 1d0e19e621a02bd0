"""Lazy image sources: tiled TIFFs are read tile by tile, never decoded whole."""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgedx.errors import ImageReadError, MissingDependencyError
from edgedx.runtime.io.image_io import read_image, to_rgb_uint8, write_image
from edgedx.runtime.io.sources import ArraySource, ImageSource, TiledTiffSource, open_source, source_pixels

tifffile = pytest.importorskip("tifffile")

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    path = tmp_path / "scans with space"
    path.mkdir()
    return path


def reference(path: Path) -> np.ndarray:
    """The whole first page decoded by tifffile, converted the runtime's way."""
    return to_rgb_uint8(tifffile.imread(path))


def regions(height: int, width: int) -> Iterator[tuple[int, int, int, int]]:
    """Regions inside one tile, across tile boundaries, at and beyond the right/bottom edges."""
    fixed = [
        (0, 0, 1, 1),
        (0, 0, height, width),  # the whole image
        (0, 0, 10_000, 10_000),  # clipped to the image
        (5, 7, 20, 30),  # inside the first tile
        (60, 60, 10, 10),  # across a tile corner
        (63, 63, 2, 2),
        (30, 100, 100, 200),  # across several tiles
        (height - 1, width - 1, 5, 5),  # the last pixel
        (max(0, height - 17), max(0, width - 40), 17, 40),  # flush with the bottom-right corner
        (height - 3, 0, 50, width),  # a bottom strip, clipped
        (0, width - 2, height, 9),  # a right strip, clipped
    ]
    yield from ((y, x, h, w) for y, x, h, w in fixed if 0 <= y < height and 0 <= x < width)
    for _ in range(20):
        y, x = int(RNG.integers(0, height)), int(RNG.integers(0, width))
        yield y, x, int(RNG.integers(1, 150)), int(RNG.integers(1, 150))


def assert_regions_match(source: ImageSource, expected: np.ndarray) -> None:
    assert (source.height, source.width) == expected.shape[:2]
    for y, x, h, w in regions(source.height, source.width):
        got = source.read(y, x, h, w)
        want = expected[y : y + h, x : x + w]
        assert got.dtype == np.uint8 and got.shape == want.shape, (y, x, h, w)
        np.testing.assert_array_equal(got, want, err_msg=f"region {(y, x, h, w)}")


# -- correctness against a whole decode ---------------------------------------------------------
CASES = {
    "rgb": {"shape": (237, 511, 3), "dtype": np.uint8, "kw": {"tile": (64, 64)}},
    "rgb deflate predictor": {
        "shape": (237, 511, 3), "dtype": np.uint8, "kw": {"tile": (64, 64), "compression": "zlib", "predictor": True},
    },
    "grey 16-bit": {"shape": (300, 129), "dtype": np.uint16, "kw": {"tile": (64, 64), "compression": "zlib"}},
    "rgba": {
        "shape": (150, 201, 4), "dtype": np.uint8,
        "kw": {"tile": (64, 32), "photometric": "rgb", "extrasamples": "unassalpha"},
    },
    "rgb 16-bit": {"shape": (100, 90, 3), "dtype": np.uint16, "kw": {"tile": (32, 48)}},
    "grey float": {"shape": (77, 130), "dtype": np.float32, "kw": {"tile": (16, 16)}},
    "strips": {"shape": (237, 511, 3), "dtype": np.uint8, "kw": {"rowsperstrip": 16}},
    "strips deflate grey": {"shape": (99, 70), "dtype": np.uint8, "kw": {"rowsperstrip": 10, "compression": "zlib"}},
}


def random_image(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    if np.dtype(dtype).kind == "f":
        return RNG.random(shape).astype(dtype)
    return RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("case", list(CASES))
def test_regions_equal_whole_decode(folder: Path, case: str) -> None:
    spec = CASES[case]
    path = folder / f"{case}.tif"
    tifffile.imwrite(path, random_image(spec["shape"], spec["dtype"]), **spec["kw"])
    expected = reference(path)
    with TiledTiffSource(path, cache_tiles=4) as source:
        assert isinstance(source, ImageSource)
        assert source.segment_kind == ("strip" if "strips" in case else "tile")
        assert_regions_match(source, expected)


def test_planar_separate_tiles(folder: Path) -> None:
    path = folder / "planar.tif"
    image = random_image((3, 130, 70), np.uint8)
    tifffile.imwrite(path, image, tile=(32, 32), planarconfig="separate", photometric="rgb")
    with TiledTiffSource(path) as source:
        assert_regions_match(source, np.ascontiguousarray(image.transpose(1, 2, 0)))


def test_palette_and_min_is_white(folder: Path) -> None:
    index = random_image((50, 70), np.uint8)
    colormap = RNG.integers(0, 65535, (3, 256), dtype=np.uint16, endpoint=True)
    palette = folder / "palette.tif"
    tifffile.imwrite(palette, index, photometric="palette", colormap=colormap, tile=(16, 16))
    with TiledTiffSource(palette) as source:
        assert_regions_match(source, to_rgb_uint8(colormap.T[index]))  # 16-bit colour map scaled like pixels
    grey = random_image((40, 60), np.uint8)
    white = folder / "min is white.tif"
    tifffile.imwrite(white, grey, photometric="miniswhite", rowsperstrip=8)
    with open_source(white, in_memory_pixels=500) as source:  # lazy strips agree with libtiff's whole decode
        assert isinstance(source, TiledTiffSource)
        assert_regions_match(source, read_image(white))
        assert_regions_match(source, to_rgb_uint8(255 - grey))


def test_small_tiff_the_lazy_reader_refuses_is_decoded_whole(folder: Path) -> None:
    path = folder / "cmyk.tif"
    tifffile.imwrite(path, random_image((40, 60, 4), np.uint8), photometric="separated", tile=(16, 16))
    with pytest.raises(ImageReadError, match="photometric interpretation 5"):
        TiledTiffSource(path)
    with open_source(path) as source:  # small: OpenCV (libtiff) converts CMYK
        assert isinstance(source, ArraySource)
        assert_regions_match(source, read_image(path))
    with pytest.raises(ImageReadError, match="cannot be decoded whole") as info:
        open_source(path, in_memory_pixels=1_000)
    assert "re-save it as RGB" in str(info.value) and "tile=(256, 256)" in str(info.value)


def test_sixteen_bit_scales_by_257(folder: Path) -> None:
    path = folder / "grey16.tif"
    grey = np.array([[0, 257, 65535, 32896]], np.uint16)
    tifffile.imwrite(path, grey, tile=(16, 16))
    with TiledTiffSource(path) as source:
        np.testing.assert_array_equal(source.read(0, 0, 1, 4)[0, :, 0], [0, 1, 255, 128])


def test_pyramid_reads_level_zero(folder: Path) -> None:
    path = folder / "pyramid.tif"
    base = random_image((200, 300, 3), np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(base, tile=(64, 64), subifds=1)
        tif.write(base[::2, ::2], tile=(64, 64), subfiletype=1)
    assert source_pixels(path) == (200, 300)
    with open_source(path) as source:
        assert isinstance(source, TiledTiffSource)
        assert_regions_match(source, base)


# -- laziness -------------------------------------------------------------------------------------
def test_reads_only_intersecting_tiles_and_caches(folder: Path) -> None:
    path = folder / "rgb.tif"
    tifffile.imwrite(path, random_image((237, 511, 3), np.uint8), tile=(64, 64))
    expected = reference(path)
    with TiledTiffSource(path, cache_tiles=8) as source:
        assert source.n_segments == 4 * 8
        assert source.tiles_decoded == 0  # opening decodes nothing
        np.testing.assert_array_equal(source.read(10, 10, 20, 20), expected[10:30, 10:30])
        assert source.tiles_decoded == 1
        np.testing.assert_array_equal(source.read(100, 120, 40, 20), expected[100:140, 120:140])
        assert source.tiles_decoded == 1 + 4  # rows 1-2, columns 1-2
        source.read(100, 120, 40, 20)
        source.read(0, 0, 64, 64)
        assert source.tiles_decoded == 5  # both answered from the cache
        source.read(200, 450, 100, 100)  # bottom-right corner: rows 3, columns 7
        assert source.tiles_decoded == 6


def test_lru_cache_evicts_oldest_and_zero_disables(folder: Path) -> None:
    path = folder / "rgb.tif"
    tifffile.imwrite(path, random_image((128, 256, 3), np.uint8), tile=(64, 64))
    with TiledTiffSource(path, cache_tiles=2) as source:
        for x in (0, 64, 0, 128, 64):  # tiles a, b, a (hit), c (evicts b), b (miss)
            source.read(0, x, 1, 1)
        assert source.tiles_decoded == 4
    with TiledTiffSource(path, cache_tiles=0) as source:
        source.read(0, 0, 1, 1)
        source.read(0, 0, 1, 1)
        assert source.tiles_decoded == 2


def test_decode_calls_counted_by_wrapping_tifffile(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Independent of our counter: tifffile's decoder itself is called once per needed tile."""
    path = folder / "rgb.tif"
    tifffile.imwrite(path, random_image((256, 256, 3), np.uint8), tile=(64, 64), compression="zlib")
    with TiledTiffSource(path) as source:
        calls: list[int] = []
        real = source._decode

        def counting(data: bytes | None, index: int, **kwargs: object) -> object:
            calls.append(index)
            return real(data, index, **kwargs)

        monkeypatch.setattr(source, "_decode", counting)
        source.read(70, 70, 50, 50)  # inside tile (1, 1) = index 5
        source.read(70, 70, 100, 10)  # tiles (1, 1) cached and (2, 1) = index 9
        assert calls == [5, 9]


def test_strip_tiff_reads_only_intersecting_strips(folder: Path) -> None:
    path = folder / "strips.tif"
    tifffile.imwrite(path, random_image((237, 511, 3), np.uint8), rowsperstrip=16)
    expected = reference(path)
    with open_source(path, in_memory_pixels=50_000) as source:  # above what is decoded whole: lazy
        assert isinstance(source, TiledTiffSource) and source.segment_kind == "strip"
        np.testing.assert_array_equal(source.read(40, 100, 20, 50), expected[40:60, 100:150])
        assert source.tiles_decoded == 2  # strips 2 and 3 of 15


def test_large_tiled_tiff_is_read_lazily_with_little_memory(folder: Path) -> None:
    """8192 x 8192 RGB (201 MB decoded), written tile by tile: neither the test nor the source holds it."""
    size, tile = 8192, 256
    pattern = ((np.arange(tile)[:, None] * 3 + np.arange(tile)[None, :]) % 251).astype(np.uint8)

    def tiles() -> Iterator[np.ndarray]:
        for row in range(size // tile):
            for col in range(size // tile):
                block = np.empty((tile, tile, 3), np.uint8)
                block[..., 0], block[..., 1], block[..., 2] = row, col, pattern
                yield block

    path = folder / "gigapixel field.tif"
    tifffile.imwrite(
        path, data=tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile), compression="zlib",
        photometric="rgb",
    )
    assert source_pixels(path) == (size, size)

    tracemalloc.start()
    try:
        with open_source(path) as source:
            assert isinstance(source, TiledTiffSource)
            region = source.read(1000, 3000, 300, 300)
            decoded = source.tiles_decoded
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert decoded == 3 * 2  # tile rows 3-5, columns 11-12 of 32 x 32
    assert peak < 8_000_000, f"peak {peak / 1e6:.1f} MB: the image was not read lazily"
    ys, xs = np.mgrid[1000:1300, 3000:3300]
    np.testing.assert_array_equal(region[..., 0], ys // tile)
    np.testing.assert_array_equal(region[..., 1], xs // tile)
    np.testing.assert_array_equal(region[..., 2], pattern[ys % tile, xs % tile])


def test_concurrent_reads_are_consistent(folder: Path) -> None:
    path = folder / "rgb.tif"
    tifffile.imwrite(path, random_image((300, 400, 3), np.uint8), tile=(32, 32), compression="zlib")
    expected = reference(path)
    boxes = [tuple(int(v) for v in RNG.integers(0, 250, 4)) for _ in range(200)]
    errors: list[BaseException] = []
    with TiledTiffSource(path, cache_tiles=5) as source:

        def work(offset: int) -> None:
            try:
                for y, x, h, w in boxes[offset::4]:
                    got = source.read(y, x, h + 1, w + 1)
                    np.testing.assert_array_equal(got, expected[y : y + h + 1, x : x + w + 1])
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors, errors[0]


# -- open_source routing ----------------------------------------------------------------------------
def test_small_images_load_into_memory(folder: Path) -> None:
    rgb = random_image((40, 50, 3), np.uint8)
    png = write_image(folder / "field é.png", rgb)
    strips = folder / "small strips.tif"
    tifffile.imwrite(strips, rgb, rowsperstrip=8)
    for path in (png, strips):
        with open_source(path) as source:
            assert isinstance(source, ArraySource)
            assert source_pixels(path) == (40, 50)
            assert_regions_match(source, rgb)
            assert np.shares_memory(source.read(1, 1, 5, 5), source.image)  # a view, no copy


def test_tiled_tiff_is_lazy_even_when_small(folder: Path) -> None:
    path = folder / "tiny tiled.tiff"
    tifffile.imwrite(path, random_image((20, 30, 3), np.uint8), tile=(16, 16))
    with open_source(path, cache_tiles=3) as source:
        assert isinstance(source, TiledTiffSource) and source.cache_tiles == 3


def test_jpeg_header_size_follows_exif_orientation(folder: Path) -> None:
    ok, encoded = cv2.imencode(".jpg", np.zeros((16, 32, 3), np.uint8))
    assert ok
    jpeg = encoded.tobytes()
    ifd = struct.pack(">H", 1) + struct.pack(">HHI", 0x0112, 3, 1) + struct.pack(">HH", 6, 0) + struct.pack(">I", 0)
    exif = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    rotated = folder / "rotated.jpg"
    rotated.write_bytes(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + jpeg[2:])
    plain = folder / "plain.jpg"
    plain.write_bytes(jpeg)
    assert source_pixels(plain) == (16, 32)
    assert source_pixels(rotated) == (32, 16)
    with open_source(rotated) as source:
        assert (source.height, source.width) == (32, 16)


def test_one_pixel_limit_for_every_reader(folder: Path) -> None:
    """--max-pixels (or EDGEDX_MAX_IMAGE_PIXELS) is the one limit: PNGs, strip TIFFs and tiled TIFFs alike."""
    from edgedx.runtime.io.image_io import pixel_limit

    png = write_image(folder / "big scan.png", np.zeros((100, 120, 3), np.uint8))
    tiled = folder / "slide.tif"
    tifffile.imwrite(tiled, np.zeros((100, 120, 3), np.uint8), tile=(32, 32))
    strips = folder / "strips.tif"
    tifffile.imwrite(strips, np.zeros((100, 120, 3), np.uint8), rowsperstrip=16)
    for path in (png, tiled, strips):
        with pytest.raises(ImageReadError) as info:
            open_source(path, max_pixels=10_000)
        message = str(info.value)
        assert str(path) in message and "120×100 = 0.012 megapixels exceeds the limit of 0.01 megapixels" in message
        assert "--max-pixels" in message
        with pixel_limit(10_000), pytest.raises(ImageReadError, match="exceeds the limit"):
            open_source(path)  # the batch's --max-pixels reaches every reader
        with open_source(path, max_pixels=12_000) as source:  # exactly at the limit: read
            assert (source.height, source.width) == (100, 120)


def test_large_single_strip_tiff_is_refused(folder: Path) -> None:
    path = folder / "one strip.tif"
    tifffile.imwrite(path, np.zeros((100, 120, 3), np.uint8), rowsperstrip=100)
    with pytest.raises(ImageReadError, match="one TIFF strip holds 100x120"):
        open_source(path, in_memory_pixels=10_000)


# -- errors ---------------------------------------------------------------------------------------------
def test_missing_directory_empty_and_corrupt_files(folder: Path) -> None:
    missing = folder / "nope.tif"
    with pytest.raises(ImageReadError, match="file not found") as info:
        open_source(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ImageReadError, match="file not found"):
        source_pixels(missing)
    with pytest.raises(ImageReadError, match="is a directory"):
        open_source(folder)
    empty = folder / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty file"):
        open_source(empty)
    corrupt = folder / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00" + b"\xff" * 40)
    with pytest.raises(ImageReadError, match="not a readable TIFF") as info:
        open_source(corrupt)
    assert str(corrupt) in str(info.value)
    not_image = folder / "notes.png"
    not_image.write_bytes(b"hello, not an image")
    with pytest.raises(ImageReadError, match="not a decodable image"):
        open_source(not_image)


def test_truncated_tiles_name_the_file(folder: Path) -> None:
    path = folder / "truncated.tif"
    tifffile.imwrite(path, random_image((128, 128, 3), np.uint8), tile=(64, 64))
    data = path.read_bytes()
    with tifffile.TiffFile(path) as tif:
        last = int(tif.pages[0].dataoffsets[-1])
    path.write_bytes(data[: last + 10])
    with open_source(path) as source:
        source.read(0, 0, 64, 64)  # intact tiles still read
        with pytest.raises(ImageReadError, match="truncated TIFF") as info:
            source.read(64, 64, 64, 64)
    assert str(path) in str(info.value)


def test_compression_needing_imagecodecs_is_explained(folder: Path) -> None:
    try:
        import imagecodecs  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("imagecodecs is installed, so LZW decodes")
    path = folder / "lzw.tif"
    tifffile.imwrite(path, random_image((64, 64, 3), np.uint8), tile=(32, 32))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tif.pages[0].tags["Compression"].overwrite(5)  # claim LZW
    with pytest.raises(ImageReadError, match="imagecodecs") as info:
        TiledTiffSource(path)
    assert str(path) in str(info.value)


OUTSIDE = [(-1, 0, 5, 5), (0, -1, 5, 5), (237, 0, 1, 1), (0, 511, 1, 1), (0, 0, 0, 5), (0, 0, 5, -2)]


@pytest.mark.parametrize("region", OUTSIDE)
def test_out_of_range_regions_raise_value_error(folder: Path, region: tuple[int, int, int, int]) -> None:
    path = folder / "rgb.tif"
    image = random_image((237, 511, 3), np.uint8)
    tifffile.imwrite(path, image, tile=(64, 64))
    for source in (TiledTiffSource(path), ArraySource(image)):
        with source, pytest.raises(ValueError):
            source.read(*region)


def test_closed_sources_and_bad_arguments(folder: Path) -> None:
    path = folder / "rgb.tif"
    tifffile.imwrite(path, random_image((64, 64, 3), np.uint8), tile=(32, 32))
    source = open_source(path)
    source.close()
    source.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        source.read(0, 0, 1, 1)
    with pytest.raises(ValueError, match="max_pixels"):
        open_source(path, max_pixels=0)
    with pytest.raises(ValueError, match="cache_tiles"):
        TiledTiffSource(path, cache_tiles=-1)
    with pytest.raises(ValueError, match="uint8"):
        ArraySource(np.zeros((4, 4), np.uint8))
    with pytest.raises(TypeError, match="integer"), ArraySource(np.zeros((4, 4, 3), np.uint8)) as array:
        array.read(0.5, 0, 1, 1)  # type: ignore[arg-type]


def test_missing_tifffile_raises_missing_dependency(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = folder / "rgb.tif"
    tifffile.imwrite(path, np.zeros((8, 8, 3), np.uint8), tile=(16, 16))
    monkeypatch.setitem(sys.modules, "tifffile", None)  # makes `import tifffile` raise ImportError
    with pytest.raises(MissingDependencyError, match="tifffile"):
        open_source(path)


def test_module_imports_without_tifffile_or_torch() -> None:
    code = (
        "import sys; sys.modules['tifffile'] = None\n"
        "import edgedx.runtime.io.sources\n"
        "heavy = [m for m in ('torch', 'onnx', 'timm', 'tifffile') if sys.modules.get(m) is not None]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
