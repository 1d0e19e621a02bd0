"""Read images from disk as RGB uint8, the one in-memory format of EdgeDx.

OpenCV decodes from bytes (``np.fromfile`` + ``cv2.imdecode``) so paths with
spaces or non-ASCII characters work on every OS. Grey, RGBA and 16-bit images
are converted to 8-bit RGB; JPEG EXIF orientation is applied as a viewer would.

A clinic runs EdgeDx unattended on whole folders, so every bad file must end as
one :class:`ImageReadError` that says what is wrong with *that* file, never as
a crash or a silently wrong image. Before OpenCV sees the bytes they are
sniffed by content (a PDF or DICOM named ``.jpg`` is named as such), checked for
truncation (a JPEG or PNG still being copied), and sized from the header, so a
decompression bomb is refused before any pixel memory is allocated. The pixel
limit is the ``max_pixels`` keyword, else :func:`set_default_max_pixels` (the
CLI's ``--max-pixels``), else ``EDGEDX_MAX_IMAGE_PIXELS``, else 250 megapixels.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgedx.errors import ImageReadError, InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pgm", ".ppm", ".pnm", ".gif"})

MAX_PIXELS_ENV = "EDGEDX_MAX_IMAGE_PIXELS"
BUILTIN_MAX_PIXELS = 250_000_000  # 750 MB as decoded RGB: far above any microscope field, far below a bomb
_max_pixels_override: int | None = None

# Formats OpenCV decodes, and content that is not an image at all (refused with its own message).
IMAGE_FORMATS = frozenset({"png", "jpeg", "bmp", "tiff", "webp", "gif", "jp2", "pnm", "avif"})
FORMAT_NAMES = {
    "png": "PNG", "jpeg": "JPEG", "bmp": "BMP", "tiff": "TIFF", "webp": "WebP", "gif": "GIF",
    "jp2": "JPEG 2000", "pnm": "PNM", "avif": "AVIF",
}
_SUFFIX_FORMATS = {
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".jpe": "jpeg", ".jfif": "jpeg", ".bmp": "bmp", ".dib": "bmp",
    ".tif": "tiff", ".tiff": "tiff", ".webp": "webp", ".gif": "gif", ".jp2": "jp2", ".j2k": "jp2", ".jpx": "jp2",
    ".pgm": "pnm", ".ppm": "pnm", ".pbm": "pnm", ".pnm": "pnm", ".pam": "pnm", ".avif": "avif",
}
_NON_IMAGE_MESSAGES = {
    "pdf": "is a PDF document, not an image; export the page as PNG/TIFF first",
    "dicom": "is a DICOM file; EdgeDx reads PNG/JPEG/TIFF — convert it (e.g. with dcmj2pnm)",
    "zip": "is a ZIP archive (or a zipped Office document), not an image; unzip it and point EdgeDx at the images inside",
    "gzip": "is gzip-compressed, not an image; decompress it first (gunzip)",
    "html": "is an HTML page, not an image (often an error or login page saved by a download); download the image itself",
    "xml": "is an XML document, not an image; point EdgeDx at the image itself",
    "heic": "is a HEIC/HEIF photo, which OpenCV cannot decode; export it as JPEG or PNG first",
}
_SUPPORTED = "EdgeDx reads PNG, JPEG, TIFF, BMP, WebP, GIF, JPEG 2000 and PNM images"

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_STANDALONE = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})  # markers without a length field
_BMP_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})


class UndecodableImageError(ImageReadError):
    """The bytes are not a decodable image: not an image, truncated or corrupt.

    The other ImageReadErrors refuse a readable image (too many pixels) or a
    file that cannot be opened; decode_image returns None only for this one.
    """


def is_image_path(path: Path) -> bool:
    """By suffix only; decoding decides for real."""
    return path.suffix.lower() in IMAGE_SUFFIXES


# -- the pixel limit ------------------------------------------------------------------------
def set_default_max_pixels(n: int | None) -> None:
    """Set the process-wide pixel limit (the CLI's ``--max-pixels``); ``None`` goes back to env/built-in.

    It wins over ``EDGEDX_MAX_IMAGE_PIXELS``, as a command-line flag should.
    """
    global _max_pixels_override
    _max_pixels_override = None if n is None else _check_limit(n, "--max-pixels")


@contextmanager
def pixel_limit(max_pixels: int | None) -> Iterator[None]:
    """Apply ``max_pixels`` (None: leave it) to every image read inside the block, then restore the previous limit."""
    global _max_pixels_override
    if max_pixels is None:
        yield
        return
    previous = _max_pixels_override
    set_default_max_pixels(max_pixels)
    try:
        yield
    finally:
        _max_pixels_override = previous


def default_max_pixels() -> int:
    """The limit used when ``max_pixels`` is not given: set_default_max_pixels, else the env var, else 250 MP."""
    if _max_pixels_override is not None:
        return _max_pixels_override
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return BUILTIN_MAX_PIXELS
    try:
        value = int(raw)
    except ValueError:
        raise InputError(
            f"{MAX_PIXELS_ENV}={raw!r} is not a whole number of pixels; set it to a positive integer "
            f"such as {BUILTIN_MAX_PIXELS} or unset it"
        ) from None
    return _check_limit(value, MAX_PIXELS_ENV)


def _check_limit(n: Any, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise InputError(f"{what} must be a positive whole number of pixels, got {n!r}; e.g. {BUILTIN_MAX_PIXELS}")
    return int(n)


def _resolve_limit(max_pixels: int | None) -> int:
    return default_max_pixels() if max_pixels is None else _check_limit(max_pixels, "max_pixels")


def _megapixels(n: int) -> str:
    return f"{n / 1e6:.0f}" if n >= 10_000_000 else f"{n / 1e6:.3g}"


def check_pixels(name: str, width: int, height: int, limit: int) -> None:
    if width * height > limit:
        raise ImageReadError(
            f"{name}: {width}×{height} = {_megapixels(width * height)} megapixels exceeds the limit of "
            f"{_megapixels(limit)} megapixels; if the image is trusted raise it with --max-pixels or {MAX_PIXELS_ENV}"
        )


# -- reading --------------------------------------------------------------------------------
def read_image(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """Return the image at ``path`` as an (H, W, 3) uint8 RGB array.

    Raises :class:`ImageReadError` with the reason: missing, unreadable, empty,
    not a regular file (a pipe or device is never opened), not an image (PDF,
    DICOM, text, ...), truncated, corrupt, or over ``max_pixels`` (default
    :func:`default_max_pixels`), checked from the header before decoding. A
    wrong suffix is only logged: the content decides.
    """
    path = Path(path)
    limit = _resolve_limit(max_pixels)
    return _decode(read_file_bytes(path), str(path), limit, suffix=path.suffix.lower(), path=path)


def read_image_hashed(path: str | Path, *, max_pixels: int | None = None) -> tuple[np.ndarray, str]:
    """:func:`read_image` plus the sha256 of exactly the bytes that were decoded (for the audit log: read once)."""
    path = Path(path)
    limit = _resolve_limit(max_pixels)
    data = read_file_bytes(path)
    digest = hashlib.sha256(memoryview(data)).hexdigest()
    try:
        return _decode(data, str(path), limit, suffix=path.suffix.lower(), path=path), digest
    except ImageReadError as exc:
        exc.sha256 = digest  # which bytes failed, for the audit log
        raise


_NOT_REGULAR = ((stat.S_ISFIFO, "named pipe"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"))


def check_regular_file(path: Path) -> os.stat_result:
    """Stat ``path`` (following links) and refuse anything but a regular file before it is opened:
    opening a pipe blocks forever and a device such as /dev/zero never ends."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise _os_error(path, exc) from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageReadError(f"{path}: is a directory, not an image")
    for test, kind in _NOT_REGULAR:
        if test(st.st_mode):
            raise ImageReadError(f"{path}: is a {kind}, not an image file; EdgeDx never opens pipes, devices or sockets")
    return st


def _os_error(path: Path, exc: OSError) -> ImageReadError:
    """An OS error while reading ``path``, in words that say what to do."""
    if isinstance(exc, FileNotFoundError):
        return ImageReadError(f"{path}: file not found (was it moved or deleted after the folder was listed?)")
    if isinstance(exc, IsADirectoryError):
        return ImageReadError(f"{path}: is a directory, not an image")
    if isinstance(exc, PermissionError):
        return ImageReadError(f"{path}: permission denied; give the user running EdgeDx read access to it")
    return ImageReadError(f"{path}: cannot read ({exc.strerror or exc})")


def read_file_bytes(path: Path) -> np.ndarray:
    """The bytes of a regular file, read once."""
    check_regular_file(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise _os_error(path, exc) from None
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    return data


def decode_image(data: np.ndarray | bytes, *, max_pixels: int | None = None) -> np.ndarray | None:
    """Decode encoded image bytes to RGB uint8, or None when they are not a decodable image.

    An image over ``max_pixels`` still raises :class:`ImageReadError`: it is
    refused, not undecodable. Use :func:`read_image` to learn why bytes fail.
    """
    limit = _resolve_limit(max_pixels)
    array = np.frombuffer(data, np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data)
    if array.size == 0:
        return None
    try:
        return _decode(array.reshape(-1).view(np.uint8), "image bytes", limit)
    except UndecodableImageError:
        return None


_MISMATCHES_SEEN: set[tuple[str, str]] = set()


def _warn_mismatch(name: str, kind: str, expected: str) -> None:
    """A folder of 10,000 PNGs saved as .jpg is one fact, not 10,000 warnings: warn once per kind, then log quietly."""
    key = (kind, expected)
    message = "%s: the content is %s but the suffix says %s; decoding it as %s"
    args = (name, FORMAT_NAMES[kind], FORMAT_NAMES[expected], FORMAT_NAMES[kind])
    if key in _MISMATCHES_SEEN:
        log.info(message, *args)
        return
    _MISMATCHES_SEEN.add(key)
    log.warning(message + " (further files like this are logged with -v only)", *args)


def _decode(data: np.ndarray, name: str, limit: int, *, suffix: str = "", path: Path | None = None) -> np.ndarray:
    """The checks, in order: what it is, whether it is whole, how big it says it is; then decode."""
    kind = sniff_format(data)
    if kind in _NON_IMAGE_MESSAGES:
        raise UndecodableImageError(f"{name}: {_NON_IMAGE_MESSAGES[kind]}")
    if kind == "text":
        raise UndecodableImageError(f"{name}: {_describe_text(data)}")
    expected = _SUFFIX_FORMATS.get(suffix)
    if kind is not None and expected is not None and kind != expected:
        _warn_mismatch(name, kind, expected)
    size: tuple[int, int] | None = None
    if kind in ("jpeg", "png"):
        buf = data.tobytes()
        size, complete = _jpeg_layout(buf) if kind == "jpeg" else _png_layout(buf)
        if not complete:
            raise UndecodableImageError(
                f"{name}: truncated {FORMAT_NAMES[kind]}: the file ends before the image data does "
                f"({data.size} bytes; was it still being copied?)"
            )
    elif kind is not None:
        size = _header_size(kind, data, path)
    if size is not None:
        width, height = size
        if width < 1 or height < 1:
            raise UndecodableImageError(
                f"{name}: corrupt {FORMAT_NAMES.get(kind or '', 'image')} header: it says the image is "
                f"{width}×{height} pixels; re-export or re-copy the file"
            )
        check_pixels(name, width, height, limit)
    try:
        image = _imdecode(data, name, kind)
    except MemoryError:
        raise _out_of_memory(name, size) from None
    check_pixels(name, int(image.shape[1]), int(image.shape[0]), limit)  # formats without a parsed header
    try:
        return to_rgb_uint8(image, bgr=True)
    except MemoryError:
        raise _out_of_memory(name, size) from None
    except ImageReadError as exc:  # its reasons do not name the file
        raise UndecodableImageError(f"{name}: {exc}") from None


def _out_of_memory(name: str, size: tuple[int, int] | None) -> ImageReadError:
    """An image within the pixel limit that this machine still cannot hold while decoding."""
    what = f"a {size[0]}×{size[1]} image" if size else "it"
    return ImageReadError(
        f"{name}: not enough memory to decode {what}; close other programs, or lower --max-pixels / "
        f"{MAX_PIXELS_ENV} so that such images are refused up front"
    )


def _imdecode(data: np.ndarray, name: str, kind: str | None) -> np.ndarray:
    """cv2.imdecode, with its exceptions and its silent None turned into a message naming the file."""
    try:
        image = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        if "CV_IO_MAX_IMAGE_PIXELS" in reason:
            raise ImageReadError(
                f"{name}: the image is over OpenCV's own pixel limit; if it is trusted raise that with the "
                "environment variable OPENCV_IO_MAX_IMAGE_PIXELS (read when OpenCV is imported)"
            ) from None
        if "Insufficient memory" in reason:
            raise MemoryError(reason) from None
        format_name = FORMAT_NAMES.get(kind or "", "image")
        raise UndecodableImageError(f"{name}: corrupt {format_name}: OpenCV failed decoding it ({reason})") from None
    if image is None or image.size == 0:
        if kind is None:
            head = " ".join(f"{b:02x}" for b in data[:8].tolist())
            raise UndecodableImageError(
                f"{name}: not a decodable image (unrecognised content starting with bytes {head}, {data.size} bytes); "
                f"{_SUPPORTED}"
            )
        raise UndecodableImageError(
            f"{name}: corrupt {FORMAT_NAMES[kind]}: not a decodable image ({data.size} bytes); "
            "re-export or re-copy the file"
        )
    return image


# -- sniffing by content --------------------------------------------------------------------
def sniff_format(data: bytes | np.ndarray) -> str | None:
    """What the bytes are, from their magic numbers: an image format, a known non-image, or None.

    Images: png, jpeg, bmp, tiff, webp, gif, jp2, pnm, avif. Non-images: pdf,
    zip, dicom, gzip, html, xml, heic, text (mostly printable UTF-8).
    """
    head = bytes(data[:4096]) if isinstance(data, (bytes, bytearray, memoryview)) else np.asarray(data[:4096], np.uint8).tobytes()
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "jp2"
    if head[:2] == b"BM" and len(head) >= 18 and struct.unpack("<I", head[14:18])[0] in _BMP_HEADER_SIZES:
        return "bmp"
    if len(head) >= 3 and head[0:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "pnm"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "avif"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis"):
            return "heic"
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        return "gzip"
    if head[128:132] == b"DICM":
        return "dicom"
    return _sniff_text(head)


def _sniff_text(head: bytes) -> str | None:
    """html, xml or text when the head decodes as mostly printable UTF-8; None for binary."""
    if not head or b"\x00" in head:
        return None
    text = head.decode("utf-8", errors="replace")
    if len(head) == 4096:
        text = text[:-2]  # the cut may split a multi-byte character
    if not text:
        return None
    printable = sum((ch.isprintable() and ch != "\ufffd") or ch in "\t\n\r\f\v" for ch in text)
    if printable < 0.95 * len(text):
        return None
    start = text.lstrip("\ufeff \t\r\n").lower()
    if start.startswith(("<!doctype html", "<html")) or "<html" in start[:512]:
        return "html"
    if start.startswith(("<?xml", "<svg")):
        return "xml"
    return "text"


def _describe_text(data: np.ndarray) -> str:
    head = data[:200].tobytes().decode("utf-8", errors="replace").lstrip("\ufeff")
    if head.startswith("version https://git-lfs"):
        return "not a decodable image — it is a Git LFS pointer (a small text file), not the image; fetch it with `git lfs pull`"
    # what the file is, never what it says: a link to /etc/passwd must not end up in a report
    return f"not a decodable image — it is a text file ({data.size:,} bytes); point EdgeDx at the image itself"


# -- layout and size from the header, without decoding ---------------------------------------
def _jpeg_layout(buf: bytes) -> tuple[tuple[int, int] | None, bool]:
    """((width, height) from SOFn or None, whether the file is whole).

    Walks the marker segments to the first SOS; the entropy-coded data after it
    cannot contain FF D9 (an FF there is stuffed as FF 00), so an FF D9 after it
    is the EOI. Bytes after the EOI are allowed (cameras append data there).
    """
    n, pos = len(buf), 2
    size: tuple[int, int] | None = None
    while True:
        pos = buf.find(b"\xff", pos)  # libjpeg skips stray bytes between segments too
        if pos < 0:
            return size, False
        while pos < n and buf[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return size, False
        code = buf[pos]
        pos += 1
        if code == 0xD9:
            return size, True  # EOI before any scan: whole, if useless; the decoder says so
        if code in _JPEG_STANDALONE or code == 0x00:
            continue
        if pos + 2 > n:
            return size, False
        length = (buf[pos] << 8) | buf[pos + 1]
        if length < 2:
            return size, True  # corrupt, not short: the decoder refuses it
        end = pos + length
        if end > n:
            return size, False
        if code in _JPEG_SOF and length >= 7 and size is None:
            height, width = struct.unpack(">HH", buf[pos + 3 : pos + 7])
            size = (width, height) if height else None  # height 0: given later in a DNL marker
        if code == 0xDA:
            return size, buf.rfind(b"\xff\xd9", end) >= 0
        pos = end


def _png_layout(buf: bytes) -> tuple[tuple[int, int] | None, bool]:
    """((width, height) from IHDR or None, whether the chunks run whole up to IEND)."""
    n, pos = len(buf), 8
    size: tuple[int, int] | None = None
    while True:
        if pos + 8 > n:
            return size, False
        length, ctype = struct.unpack(">I4s", buf[pos : pos + 8])
        if length > 0x7FFFFFFF:
            return size, True  # corrupt, not short: the decoder refuses it
        end = pos + 12 + length
        if ctype == b"IHDR" and length >= 8 and size is None and pos + 16 <= n:
            width, height = struct.unpack(">II", buf[pos + 8 : pos + 16])
            size = (width, height)
        if end > n:
            return size, False
        if ctype == b"IEND":
            return size, True
        pos = end


def _header_size(kind: str, data: np.ndarray, path: Path | None) -> tuple[int, int] | None:
    """(width, height) the header of a BMP/GIF/WebP/PNM/JPEG 2000/TIFF claims, or None when unknown."""
    try:
        if kind == "tiff":
            return _tiff_size(data, path)
        head = data[:4096].tobytes()
        parser = {"bmp": _bmp_size, "gif": _gif_size, "webp": _webp_size, "pnm": _pnm_size, "jp2": _jp2_size}.get(kind)
        return parser(head) if parser is not None else None
    except (struct.error, ValueError, IndexError):
        return None  # a header too short or garbled to size: the decoder decides, and the size is checked after


def _bmp_size(head: bytes) -> tuple[int, int]:
    if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit unsigned
        return struct.unpack("<HH", head[18:22])
    width, height = struct.unpack("<ii", head[18:26])
    return width, abs(height)  # negative height: rows stored top-down


def _gif_size(head: bytes) -> tuple[int, int]:
    return struct.unpack("<HH", head[6:10])


def _webp_size(head: bytes) -> tuple[int, int] | None:
    chunk, body = head[12:16], head[20:]
    if chunk == b"VP8 " and body[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", body[6:10])
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and body[:1] == b"\x2f":
        bits = struct.unpack("<I", body[1:5])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(body) >= 10:
        return int.from_bytes(body[4:7], "little") + 1, int.from_bytes(body[7:10], "little") + 1
    return None


def _pnm_size(head: bytes) -> tuple[int, int] | None:
    if head[1:2] == b"7":  # PAM: "WIDTH n" / "HEIGHT n" lines
        fields = dict(line.split(None, 1) for line in head.split(b"ENDHDR")[0].splitlines()[1:] if b" " in line)
        return int(fields[b"WIDTH"]), int(fields[b"HEIGHT"])
    tokens: list[bytes] = []
    for line in head[2:].splitlines():
        tokens += line.split(b"#", 1)[0].split()
        if len(tokens) >= 2:
            return int(tokens[0]), int(tokens[1])
    return None


def _jp2_size(head: bytes) -> tuple[int, int] | None:
    if head.startswith(b"\xff\x4f\xff\x51"):  # raw codestream: SIZ marker right after SOC
        xsiz, ysiz, xo, yo = struct.unpack(">IIII", head[8:24])
        return xsiz - xo, ysiz - yo
    at = head.find(b"ihdr")
    if at < 0:
        return None
    height, width = struct.unpack(">II", head[at + 4 : at + 12])
    return width, height


def _tiff_size(data: np.ndarray, path: Path | None) -> tuple[int, int] | None:
    """The first page's size via tifffile, which reads the IFD only (no pixels); None without tifffile."""
    try:
        import tifffile
    except ImportError:
        return None
    source: Any = str(path) if path is not None else io.BytesIO(data.tobytes())
    try:
        with tifffile.TiffFile(source) as tif:
            page = tif.pages[0].keyframe
            return int(page.imagewidth), int(page.imagelength)
    except Exception:  # noqa: BLE001 - any parse failure of a garbled header: let the decoder decide
        return None


# -- physical scale -------------------------------------------------------------------------
_UM_PER_UNIT = {2: 25_400.0, 3: 10_000.0}  # TIFF ResolutionUnit: 2 inch, 3 centimetre (1: none, no physical size)


def tiff_um_per_px(path: str | Path) -> float | None:
    """Micrometres per pixel from a TIFF's tags, or None when the file does not say (or is not a TIFF).

    Why the tags: a scanner or slide scanner writes its sampling there, and the
    runtime resamples the image so objects have the size they had in training
    (:mod:`edgedx.runtime.scale`). XResolution/YResolution are pixels per
    ResolutionUnit (inch: µm/px = 25400 / dpi; centimetre: 10000 / ppcm); a
    unit of "none" gives no physical size. An Aperio ``MPP = x`` in the image
    description is used first (whole-slide scans state it there). Only the IFD
    is read, never the pixels.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            if f.read(4) not in _TIFF_MAGICS:
                return None
        import tifffile

        with tifffile.TiffFile(str(path)) as tif:
            page = tif.pages[0]
            return _aperio_mpp(page) or _resolution_um(page)
    except Exception as exc:  # noqa: BLE001 - a garbled IFD: the scale is unknown, the decoder reports the damage
        log.debug("%s: no resolution read from the TIFF tags (%s)", path, exc)
        return None


def _aperio_mpp(page: Any) -> float | None:
    """``MPP = 0.2520`` in an Aperio SVS description (micrometres per pixel at full resolution)."""
    found = re.search(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+)", str(getattr(page, "description", "") or ""))
    value = float(found.group(1)) if found else 0.0
    return value if value > 0 else None


def _resolution_um(page: Any) -> float | None:
    """µm/px from XResolution, YResolution and ResolutionUnit; the mean of the two when they differ (logged)."""
    tags = page.tags
    unit_tag = tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # the TIFF default is inch
    per_unit = _UM_PER_UNIT.get(unit)
    values = []
    for name in ("XResolution", "YResolution"):
        tag = tags.get(name)
        if tag is None:
            continue
        num, den = tag.value if isinstance(tag.value, tuple) else (tag.value, 1)
        if num and den and float(num) / float(den) > 0:
            values.append(float(num) / float(den))
    if per_unit is None or not values:
        return None
    if max(values) > 1.01 * min(values):
        log.warning("TIFF pixels are not square (%s per unit); using their mean resolution", " × ".join(f"{v:g}" for v in values))
    return per_unit / (sum(values) / len(values))


# -- pixels ---------------------------------------------------------------------------------
def to_rgb_uint8(image: np.ndarray, *, bgr: bool = False) -> np.ndarray:
    """Any 2-D/3-D array (grey, grey+alpha, 3 or 4 channels, 8/16-bit or float in [0, 1]) as RGB uint8.

    ``bgr`` says the colour channels are in OpenCV's order (as decoded).
    """
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) * (255.0 / 65535.0) + 0.5).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageReadError(f"unsupported pixel type {image.dtype}; expected 8- or 16-bit integers or floats in [0, 1]")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
        raise ImageReadError(f"unsupported image shape {image.shape}; expected (H, W) or (H, W, 1|2|3|4)")
    channels = image.shape[2]
    if channels in (1, 2):
        return cv2.cvtColor(np.ascontiguousarray(image[:, :, 0]), cv2.COLOR_GRAY2RGB)
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB if bgr else cv2.COLOR_RGBA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if bgr else np.ascontiguousarray(image)


def write_image(path: str | Path, rgb: np.ndarray) -> Path:
    """Write an RGB uint8 image; the format follows the suffix (``.png`` for overlays)."""
    path = Path(path)
    ok, encoded = cv2.imencode(path.suffix or ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ImageReadError(f"{path}: OpenCV cannot encode an image with suffix {path.suffix!r}")
    encoded.tofile(path)
    return path
