"""Read images from disk as RGB uint8, the one in-memory format of EdgeDx.

OpenCV decodes from bytes (``np.fromfile`` + ``cv2.imdecode``) so paths with
spaces or non-ASCII characters work on every OS. Grey, RGBA and 16-bit images
are converted to 8-bit RGB; JPEG EXIF orientation is applied as a viewer would.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from edgedx.errors import ImageReadError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pgm", ".ppm"})


def is_image_path(path: Path) -> bool:
    """By suffix only; decoding decides for real."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_image(path: str | Path) -> np.ndarray:
    """Return the image at ``path`` as an (H, W, 3) uint8 RGB array.

    Raises :class:`ImageReadError` with the reason (missing, empty, not an image).
    """
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except FileNotFoundError:
        raise ImageReadError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageReadError(f"{path}: is a directory, not an image") from None
    except PermissionError:
        raise ImageReadError(f"{path}: permission denied") from None
    except OSError as exc:
        raise ImageReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    image = decode_image(data)
    if image is None:
        raise ImageReadError(f"{path}: not a decodable image (corrupt, truncated, or not an image format)")
    return image


def decode_image(data: np.ndarray) -> np.ndarray | None:
    """Decode encoded image bytes to RGB uint8, or None when OpenCV cannot decode them."""
    image = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if image is None:
        return None
    return to_rgb_uint8(image, bgr=True)


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
