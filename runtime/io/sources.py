"""Image sources: read regions of an image without holding all of it in memory.

A whole-slide scan or a stitched microscope field can have billions of pixels;
decoding it whole needs gigabytes. When such an image is a *tiled* TIFF, the
file already stores it as small independently compressed tiles, so a region can
be read by decoding only the tiles it touches. :func:`open_source` returns a
lazy :class:`TiledTiffSource` for those (and for large strip-based TIFFs, whose
strips are decoded the same way), and an in-memory :class:`ArraySource` for
every other image, decoded with :func:`edgedx.runtime.io.image_io.read_image`.

Every source returns RGB uint8 regions, the one in-memory format of EdgeDx.
``tifffile`` is imported only when a TIFF is opened, so this module imports
without it.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
from collections import OrderedDict
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from edgedx.errors import ImageReadError, MissingDependencyError
from edgedx.runtime.io.image_io import check_pixels, check_regular_file, default_max_pixels, read_image, read_image_hashed, to_rgb_uint8

logger = logging.getLogger(__name__)
_S = TypeVar("_S", bound="_Closing")

IN_MEMORY_PIXELS = 100_000_000  # a strip TIFF larger than this is read strip by strip instead of decoded whole
DEFAULT_CACHE_TILES = 64

TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
JPEG_COMPRESSIONS = frozenset({6, 7, 33007, 34892})  # old JPEG, JPEG, ALT_JPEG, lossy JPEG (DNG)

# Photometric interpretations whose decoded samples map to RGB the way to_rgb_uint8 expects.
_MINISWHITE, _MINISBLACK, _RGB, _PALETTE, _YCBCR = 0, 1, 2, 3, 6

CONVERT_HINT = (
    "convert it to a tiled TIFF first, e.g. `vips tiffsave in.jpg out.tif --tile --tile-width 256 "
    "--tile-height 256 --compression deflate --bigtiff`, or in Python: "
    "`tifffile.imwrite('out.tif', image, tile=(256, 256), compression='zlib', bigtiff=True)`"
)


@runtime_checkable
class ImageSource(Protocol):
    """An image that hands out RGB uint8 regions on demand.

    ``read(y, x, h, w)`` returns the (h', w', 3) region whose top-left pixel is
    (y, x), clipped to the image: h' = min(h, height - y), w' = min(w, width - x).
    ``y``/``x`` must lie inside the image and ``h``/``w`` be >= 1 (ValueError
    otherwise), so a caller never silently gets an empty crop.
    """

    height: int
    width: int

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray: ...

    def close(self) -> None: ...


def _clip_region(y: int, x: int, h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """Validate a region request and return its clipped bounds (y0, x0, y1, x1)."""
    for name, value in (("y", y), ("x", x), ("h", h), ("w", w)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"region {name} must be an integer, got {value!r}")
    y, x, h, w = int(y), int(x), int(h), int(w)
    if not (0 <= y < height and 0 <= x < width):
        raise ValueError(
            f"region origin (y={y}, x={x}) lies outside the {height}x{width} image; "
            f"use 0 <= y < {height} and 0 <= x < {width}"
        )
    if h < 1 or w < 1:
        raise ValueError(f"region size must be at least 1x1, got h={h}, w={w}")
    return y, x, min(y + h, height), min(x + w, width)


class _Closing:
    """Context-manager support shared by the sources: ``with open_source(p) as src: ...``."""

    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ArraySource(_Closing):
    """An image already decoded into memory; regions are views, so reading costs nothing."""

    def __init__(self, image: np.ndarray, *, sha256: str | None = None) -> None:
        self.sha256 = sha256  # of the file bytes it was decoded from, when it came from a file
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"ArraySource needs an (H, W, 3) uint8 RGB array, got shape {image.shape} dtype {image.dtype}; "
                "convert it with edgedx.runtime.io.image_io.to_rgb_uint8 first"
            )
        if image.shape[0] < 1 or image.shape[1] < 1:
            raise ValueError(f"ArraySource needs a non-empty image, got shape {image.shape}")
        self._image: np.ndarray | None = image
        self.height = int(image.shape[0])
        self.width = int(image.shape[1])

    @property
    def image(self) -> np.ndarray:
        """The whole image (for callers that want it and know it fits in memory)."""
        if self._image is None:
            raise ValueError("this ArraySource is closed; open the image again")
        return self._image

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        y0, x0, y1, x1 = _clip_region(y, x, h, w, self.height, self.width)
        return self.image[y0:y1, x0:x1]

    def close(self) -> None:
        self._image = None

    def __repr__(self) -> str:
        return f"ArraySource({self.height}x{self.width})"


def _import_tifffile() -> ModuleType:
    """tifffile, imported only when a TIFF is opened so the runtime imports without it."""
    try:
        import tifffile
    except ImportError:
        raise MissingDependencyError("tifffile", "cpu", "Reading large TIFF images lazily") from None
    return tifffile


def _check_file(path: Path) -> None:
    """Raise ImageReadError in read_image's words when ``path`` cannot be an image file (never opening a pipe or device)."""
    size = check_regular_file(path).st_size
    if size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")


def _head(path: Path, n: int) -> bytes:
    try:
        with path.open("rb") as fh:
            return fh.read(n)
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied") from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read ({exc.strerror or exc})") from None


def is_tiff(path: Path) -> bool:
    """By content (the TIFF magic), so .svs/.ndpi scans and misnamed files go the right way."""
    return _head(path, 4) in TIFF_MAGICS


def _open_tiff(path: Path) -> Any:
    """Open a TiffFile, turning any parsing failure into an ImageReadError naming the file."""
    tifffile = _import_tifffile()
    try:
        return tifffile.TiffFile(str(path))
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied") from None
    except Exception as exc:  # noqa: BLE001 - TiffFileError, struct errors on truncated headers, ...
        raise ImageReadError(f"{path}: not a readable TIFF (corrupt or truncated: {exc})") from None


def _level0_page(tif: Any, path: Path) -> Any:
    """The full-resolution page: the first page of level 0 of the first series.

    Level 0 of a pyramid is its largest level; thumbnails, labels and lower
    levels of whole-slide formats (SVS, OME) live in other series or levels.
    """
    try:
        series = tif.series[0].levels[0]
        page = series.pages[0]
    except Exception:  # noqa: BLE001 - odd files without series still have pages
        page = None
    if page is None:
        if not len(tif.pages):
            raise ImageReadError(f"{path}: not a readable TIFF (no image in it; corrupt or truncated)")
        page = tif.pages[0]
    return page


class TiledTiffSource(_Closing):
    """A TIFF page read lazily, one tile (or strip) at a time.

    Only the segments (tiles, or strips of ``rowsperstrip`` rows) that intersect a
    requested region are read from disk and decoded, so memory stays at a few
    tiles however large the image is. Decoded segments are kept, already as RGB
    uint8, in an LRU cache of ``cache_tiles`` entries because sliding crops
    overlap and neighbouring crops share tiles. ``tiles_decoded`` counts the
    decodes (for tests and profiling).

    Pixel conversion is :func:`edgedx.runtime.io.image_io.to_rgb_uint8`, applied per
    tile (it is pointwise, so the result equals converting the whole image): grey
    becomes RGB, alpha and extra samples are dropped, floats in [0, 1] are scaled
    to 0..255. 16-bit images are divided by 257 (65535 -> 255): a contrast
    stretch by whole-image percentiles would need every pixel before the first
    region, which defeats reading lazily, so a fixed scale is used (the same one
    read_image uses for small images, so lazy and in-memory reads agree).

    Reads are thread-safe: file access happens under one lock; decoding runs
    outside it so threads decode different tiles in parallel.
    """

    def __init__(self, path: str | Path, *, cache_tiles: int = DEFAULT_CACHE_TILES) -> None:
        if isinstance(cache_tiles, bool) or not isinstance(cache_tiles, int) or cache_tiles < 0:
            raise ValueError(f"cache_tiles must be an integer >= 0 (0 disables the cache), got {cache_tiles!r}")
        self.path = Path(path)
        _check_file(self.path)
        self._tif = _open_tiff(self.path)
        try:
            self._setup(_level0_page(self._tif, self.path))
        except BaseException:
            self._tif.close()
            raise
        self.cache_tiles = cache_tiles
        self.tiles_decoded = 0
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._file_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._closed = False
        logger.debug(
            "%s: lazy %dx%d %s source, %s segments of %dx%d, cache %d",
            self.path, self.height, self.width, self.dtype, self.segment_kind,
            self.segment_shape[0], self.segment_shape[1], cache_tiles,
        )

    # -- layout ---------------------------------------------------------------------------
    def _setup(self, page: Any) -> None:
        """Work out the segment grid and refuse, with the reason, what cannot be read lazily."""
        key = page.keyframe  # a TiffFrame shares its keyframe's layout and decoder
        path = self.path
        self.height = int(key.imagelength)
        self.width = int(key.imagewidth)
        if self.height < 1 or self.width < 1:
            raise ImageReadError(f"{path}: empty TIFF image ({self.height}x{self.width})")
        if int(getattr(key, "imagedepth", 1) or 1) != 1:
            raise ImageReadError(f"{path}: volumetric TIFF (ImageDepth {key.imagedepth}) is not a 2-D image")
        if key.dtype is None:
            raise ImageReadError(
                f"{path}: unsupported TIFF sample format ({key.bitspersample}-bit, SampleFormat {key.sampleformat}); "
                "save it as 8- or 16-bit integers"
            )
        self.dtype = np.dtype(key.dtype)
        if self.dtype not in (np.uint8, np.uint16, np.float16, np.float32, np.float64):
            raise ImageReadError(
                f"{path}: unsupported TIFF pixel type {self.dtype}; expected 8- or 16-bit integers or floats in [0, 1]"
            )
        self.compression = int(key.compression)
        if self.compression != 1:
            tifffile = _import_tifffile()
            try:
                tifffile.TIFF.DECOMPRESSORS[self.compression]
            except KeyError as exc:
                fix = (
                    "needs the 'imagecodecs' package: pip install imagecodecs, or re-save the TIFF with deflate"
                    if "imagecodecs" in str(exc)
                    else "is not supported; re-save the TIFF with deflate compression"
                )
                raise ImageReadError(
                    f"{path}: TIFF compression {self.compression} ({_compression_name(self.compression)}) {fix}"
                ) from None
        self.photometric = int(key.photometric)
        samples = self._samples = int(key.samplesperpixel)
        if self.photometric == _YCBCR and self.compression not in JPEG_COMPRESSIONS:
            raise ImageReadError(f"{path}: YCbCr TIFF without JPEG compression is not supported; re-save it as RGB")
        if self.photometric not in (_MINISWHITE, _MINISBLACK, _RGB, _PALETTE, _YCBCR):
            raise ImageReadError(
                f"{path}: TIFF photometric interpretation {self.photometric} (e.g. CMYK or Lab) is not supported; "
                "re-save it as RGB or greyscale"
            )
        if self.photometric == _PALETTE:
            colormap = key.colormap
            if colormap is None:
                raise ImageReadError(f"{path}: palette TIFF without a colour map")
            cmap = np.asarray(colormap, dtype=np.float32).T  # (entries, 3)
            if cmap.max() > 255:  # 16-bit colour map (the TIFF standard); some writers store 8-bit values
                cmap = cmap * (255.0 / 65535.0)
            self._palette: np.ndarray | None = np.ascontiguousarray((cmap + 0.5).astype(np.uint8))
        else:
            self._palette = None
        self._rgb_samples = self.photometric in (_RGB, _YCBCR) and samples >= 3

        if key.is_tiled:
            self.segment_kind = "tile"
            seg_h, seg_w = int(key.tilelength), int(key.tilewidth)
            if int(getattr(key, "tiledepth", 1) or 1) != 1:
                raise ImageReadError(f"{path}: volumetric TIFF tiles (TileDepth {key.tiledepth}) are not supported")
        else:
            self.segment_kind = "strip"
            rows = int(key.rowsperstrip or self.height)
            seg_h, seg_w = min(max(rows, 1), self.height), self.width
        self.segment_shape = (seg_h, seg_w)
        self._grid = (math.ceil(self.height / seg_h), math.ceil(self.width / seg_w))
        self._planes = samples if int(key.planarconfig) == 2 else 1  # separate planes: one segment per sample
        self._offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        self._counts = np.asarray(page.databytecounts, dtype=np.int64)
        expected = self._grid[0] * self._grid[1] * self._planes
        if self._offsets.size < expected or self._counts.size < expected:
            raise ImageReadError(
                f"{path}: TIFF lists {self._offsets.size} data segments, expected {expected} "
                f"for a {self.height}x{self.width} image in {seg_h}x{seg_w} {self.segment_kind}s (corrupt file)"
            )
        self._decode = key.decode
        self._decode_kwargs: dict[str, Any] = {}
        if self.compression in JPEG_COMPRESSIONS:
            self._decode_kwargs = {"jpegtables": page.jpegtables, "jpegheader": key.jpegheader}
        self._nodata = key.nodata

    @property
    def segment_pixels(self) -> int:
        """Pixels in one tile or strip: the unit of decoding and of memory."""
        return self.segment_shape[0] * self.segment_shape[1]

    @property
    def n_segments(self) -> int:
        return self._grid[0] * self._grid[1]

    # -- reading --------------------------------------------------------------------------
    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        if self._closed:
            raise ValueError(f"{self.path}: source is closed; open it again with open_source()")
        y0, x0, y1, x1 = _clip_region(y, x, h, w, self.height, self.width)
        seg_h, seg_w = self.segment_shape
        out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
        for row in range(y0 // seg_h, (y1 - 1) // seg_h + 1):
            for col in range(x0 // seg_w, (x1 - 1) // seg_w + 1):
                tile = self._segment(row, col)
                ty, tx = row * seg_h, col * seg_w
                iy0, iy1 = max(y0, ty), min(y1, ty + tile.shape[0])
                ix0, ix1 = max(x0, tx), min(x1, tx + tile.shape[1])
                if iy1 > iy0 and ix1 > ix0:
                    out[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] = tile[iy0 - ty : iy1 - ty, ix0 - tx : ix1 - tx]
        return out

    def _segment(self, row: int, col: int) -> np.ndarray:
        """One tile/strip as RGB uint8, clipped to the image; from the cache when there."""
        key = (row, col)
        with self._state_lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        tile = self._decode_segment(row, col)
        with self._state_lock:
            self.tiles_decoded += 1
            if self.cache_tiles > 0:
                self._cache[key] = tile
                self._cache.move_to_end(key)
                while len(self._cache) > self.cache_tiles:
                    self._cache.popitem(last=False)
        return tile

    def _decode_segment(self, row: int, col: int) -> np.ndarray:
        seg_h, seg_w = self.segment_shape
        valid_h = min(seg_h, self.height - row * seg_h)
        valid_w = min(seg_w, self.width - col * seg_w)
        per_plane = self.n_segments
        planes = []
        for plane in range(self._planes):
            index = plane * per_plane + row * self._grid[1] + col
            data = self._read_bytes(index)
            try:
                decoded = self._decode(data, index, **self._decode_kwargs)[0]
            except Exception as exc:  # noqa: BLE001 - codec errors, corrupt segments
                raise ImageReadError(
                    f"{self.path}: cannot decode TIFF {self.segment_kind} {index} "
                    f"(row {row}, column {col}): {exc}"
                ) from None
            if decoded is None:  # empty segment (byte count 0): the nodata value, as tifffile fills it
                samples = 1 if self._planes > 1 else self._samples
                decoded = np.full((1, valid_h, valid_w, samples), self._nodata or 0, self.dtype)
            planes.append(np.asarray(decoded)[0, :valid_h, :valid_w])
        array = planes[0] if len(planes) == 1 else np.concatenate(planes, axis=-1)
        return self._to_rgb(array, valid_h, valid_w)

    def _read_bytes(self, index: int) -> bytes | None:
        offset, count = int(self._offsets[index]), int(self._counts[index])
        if count <= 0 or offset <= 0:
            return None
        with self._file_lock:
            if self._closed:
                raise ValueError(f"{self.path}: source is closed; open it again with open_source()")
            fh = self._tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
        if len(data) != count:
            raise ImageReadError(
                f"{self.path}: truncated TIFF: {self.segment_kind} {index} needs {count} bytes at offset {offset}, "
                f"file has {len(data)}"
            )
        return data

    def _to_rgb(self, array: np.ndarray, valid_h: int, valid_w: int) -> np.ndarray:
        """Decoded samples (h, w, s) -> RGB uint8 exactly as to_rgb_uint8 converts a whole image."""
        if array.shape[0] < valid_h or array.shape[1] < valid_w:  # short JPEG tile: pad as tifffile does
            padded = np.zeros((valid_h, valid_w, array.shape[2]), array.dtype)
            padded[: array.shape[0], : array.shape[1]] = array
            array = padded
        if self._palette is not None:
            return np.ascontiguousarray(self._palette[array[..., 0]])
        if self.photometric == _MINISWHITE:
            array = _invert(array[..., :1])
        elif self._rgb_samples:
            array = array[..., :3]  # RGB(A): drop alpha and extra samples
        elif array.shape[2] > 2:
            array = array[..., :1]  # grey with extra samples: keep the grey one
        if array.dtype == np.float16:
            array = array.astype(np.float32)
        if array.dtype.byteorder not in ("=", "|"):
            array = array.astype(array.dtype.newbyteorder("="))
        return to_rgb_uint8(np.ascontiguousarray(array))

    # -- lifetime -------------------------------------------------------------------------
    def close(self) -> None:
        with self._file_lock:
            if self._closed:
                return
            self._closed = True
            self._tif.close()
        with self._state_lock:
            self._cache.clear()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.tiles_decoded} decoded"
        return (
            f"TiledTiffSource({str(self.path)!r}, {self.height}x{self.width}, "
            f"{self.segment_kind} {self.segment_shape[0]}x{self.segment_shape[1]}, {state})"
        )


def _invert(array: np.ndarray) -> np.ndarray:
    """MinIsWhite: 0 is white, so flip to the usual 0 = black."""
    if array.dtype.kind == "f":
        return 1.0 - array
    return np.iinfo(array.dtype).max - array


def _compression_name(code: int) -> str:
    try:
        tifffile = _import_tifffile()
        return str(tifffile.COMPRESSION(code).name)
    except Exception:  # noqa: BLE001 - unknown codes have no name
        return "unknown"


# -- headers -------------------------------------------------------------------------------
def source_pixels(path: str | Path) -> tuple[int, int]:
    """(height, width) of the image ``open_source`` would return, from the file header.

    TIFF, PNG and JPEG (EXIF orientation applied, as read_image does) are sized
    without decoding any pixels; other formats are decoded, since OpenCV offers
    no header-only read.
    """
    path = Path(path)
    _check_file(path)
    if is_tiff(path):
        with _open_tiff(path) as tif:
            key = _level0_page(tif, path).keyframe
            return int(key.imagelength), int(key.imagewidth)
    head = _head(path, 1 << 16)
    size = _png_size(head) or _jpeg_size(path, head)
    if size is not None:
        return size
    image, _ = read_image_hashed(path)  # a failure then carries the hash of the bytes that failed
    return int(image.shape[0]), int(image.shape[1])


def _png_size(head: bytes) -> tuple[int, int] | None:
    if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR" or len(head) < 24:
        return None
    width, height = struct.unpack(">II", head[16:24])
    return (int(height), int(width)) if height and width else None


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_size(path: Path, head: bytes) -> tuple[int, int] | None:
    """Walk the JPEG markers up to the frame header; swap for EXIF orientations 5-8 (rotated 90°)."""
    if head[:2] != b"\xff\xd8":
        return None
    try:
        with path.open("rb") as fh:
            fh.seek(2)
            orientation = 1
            while True:
                byte = fh.read(1)
                if not byte:
                    return None
                if byte != b"\xff":
                    continue
                marker = fh.read(1)
                while marker == b"\xff":  # fill bytes
                    marker = fh.read(1)
                if not marker:
                    return None
                code = marker[0]
                if code in (0x01, *range(0xD0, 0xD8)):
                    continue  # markers without a length
                if code in (0xD9, 0xDA):
                    return None  # end of image / start of scan before a frame header
                raw = fh.read(2)
                if len(raw) < 2:
                    return None
                length = struct.unpack(">H", raw)[0] - 2
                if length < 0:
                    return None
                body = fh.read(length)
                if code == 0xE1 and body[:6] == b"Exif\x00\x00":
                    orientation = _exif_orientation(body[6:]) or orientation
                elif code in _SOF_MARKERS and len(body) >= 5:
                    height, width = struct.unpack(">HH", body[1:5])
                    if not height or not width:
                        return None  # height in a DNL marker: let the decoder size it
                    return (int(width), int(height)) if orientation in (5, 6, 7, 8) else (int(height), int(width))
    except OSError:
        return None


def _exif_orientation(tiff: bytes) -> int | None:
    """The Orientation tag (0x0112) of IFD0 in an EXIF block, or None."""
    try:
        order = {b"II": "<", b"MM": ">"}[tiff[:2]]
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        for i in range(count):
            entry = tiff[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, kind = struct.unpack(order + "HH", entry[:4])
            if tag == 0x0112 and kind == 3:
                return int(struct.unpack(order + "H", entry[8:10])[0])
    except (KeyError, struct.error, IndexError):
        return None
    return None


# -- entry point ---------------------------------------------------------------------------
def open_source(
    path: str | Path, *, max_pixels: int | None = None, in_memory_pixels: int = IN_MEMORY_PIXELS, cache_tiles: int = DEFAULT_CACHE_TILES
) -> ImageSource:
    """Open an image for region reads, lazily when it is a tiled or large TIFF.

    - a tiled TIFF, or a strip TIFF above ``max_pixels``: a lazy
      :class:`TiledTiffSource` that decodes only the tiles/strips a region touches;
    - any other image: decoded whole with read_image into an :class:`ArraySource`.
      Above ``max_pixels`` that would need gigabytes, so it is refused with an
      ImageReadError that says how to convert the image to a tiled TIFF.
    """
    for name, value in (("max_pixels", max_pixels), ("in_memory_pixels", in_memory_pixels)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    limit = default_max_pixels() if max_pixels is None else max_pixels
    path = Path(path)
    _check_file(path)
    if is_tiff(path):
        return _open_tiff_source(path, limit, in_memory_pixels, cache_tiles)
    height, width = source_pixels(path)
    check_pixels(str(path), width, height, limit)  # the one limit, in the words every reader uses
    image, digest = read_image_hashed(path, max_pixels=limit)
    return ArraySource(image, sha256=digest)


def _open_tiff_source(path: Path, limit: int, max_pixels: int, cache_tiles: int) -> ImageSource:
    """``limit``: the pixel limit every image obeys (lazy or not); ``max_pixels``: the largest decoded whole."""
    with _open_tiff(path) as tif:
        key = _level0_page(tif, path).keyframe
        tiled = bool(key.is_tiled)
        height, width = int(key.imagelength), int(key.imagewidth)
    pixels = height * width
    check_pixels(str(path), width, height, limit)  # tiled TIFFs too: reading is lazy, diagnosing every crop is not free
    if not tiled and pixels <= max_pixels:
        try:
            image, digest = read_image_hashed(path, max_pixels=limit)
            return ArraySource(image, sha256=digest)
        except ImageReadError as exc:  # a TIFF flavour OpenCV cannot decode: tifffile may
            logger.debug("%s: OpenCV cannot decode it (%s); reading it with tifffile", path, exc)
    try:
        source = TiledTiffSource(path, cache_tiles=cache_tiles)
    except ImageReadError as exc:
        if pixels > max_pixels:
            raise ImageReadError(
                f"{exc}; it has {pixels:,} pixels, more than can be decoded whole ({max_pixels:,}), so it cannot be "
                f"decoded whole either: {CONVERT_HINT}"
            ) from None
        return ArraySource(_decode_whole_tiff(path, exc, tried_opencv=not tiled))
    if source.segment_kind == "strip" and source.segment_pixels > max_pixels:
        strip = source.segment_shape
        source.close()
        raise ImageReadError(
            f"{path}: one TIFF strip holds {strip[0]}x{strip[1]} = {strip[0] * strip[1]:,} pixels, more than "
            f"{max_pixels:,}, and any region decodes whole strips; {CONVERT_HINT}"
        )
    logger.debug("%s: reading %s lazily", path, source)
    return source


def _decode_whole_tiff(path: Path, reason: ImageReadError, *, tried_opencv: bool) -> np.ndarray:
    """Last resort for small TIFFs the lazy reader refuses: OpenCV (libtiff), then tifffile's whole decode.

    OpenCV goes first because libtiff decodes LZW and JPEG without the optional
    ``imagecodecs`` package that tifffile needs for them.
    """
    logger.warning("%s: cannot read it lazily (%s); decoding it whole", path, reason)
    if not tried_opencv:
        try:
            return read_image(path)
        except ImageReadError as exc:
            logger.debug("%s: OpenCV cannot decode it either (%s)", path, exc)
    with _open_tiff(path) as tif:
        try:
            return to_rgb_uint8(np.asarray(_level0_page(tif, path).asarray()))
        except Exception:  # noqa: BLE001 - the lazy reader's reason is the useful one
            raise reason from None
