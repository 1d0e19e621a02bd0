"""A cheap foreground statistic for skipping background tiles.

Whole microscope fields have empty glass between cells, and scanners leave black
borders; tiles of nothing but that waste inference and dilute a mean. Glass is
often tinted by the illumination (on the malaria fields it is about RGB
179,210,179), so the preferred test is relative: :func:`estimate_background`
takes the median colour of the brightest 30% of an image, and a pixel is
foreground when some channel differs from it by more than ``BG_DELTA``, or when
it is not near black. Without an estimate (a lazily read gigapixel image) a
fixed rule is used: background is near black (value < ``DARK``) or bright and
colourless (value > ``BRIGHT`` and saturation < ``PALE``).
"""

from __future__ import annotations

import numpy as np

DARK = 25
BRIGHT = 200
PALE = 20
BG_DELTA = 30


def foreground_mask(rgb: np.ndarray) -> np.ndarray:
    """(…, H, W, 3) uint8 RGB → (…, H, W) bool: True where there is something to look at."""
    x = np.asarray(rgb)
    if x.shape[-1] != 3:
        raise ValueError(f"expected RGB pixels (..., 3), got shape {x.shape}")
    hi = x.max(axis=-1).astype(np.int16)
    lo = x.min(axis=-1).astype(np.int16)
    # HSV saturation on the 0..255 scale: (max - min) / max
    saturation = np.where(hi > 0, (hi - lo) * 255 // np.maximum(hi, 1), 0)
    background = (hi < DARK) | ((hi > BRIGHT) & (saturation < PALE))
    return ~background


def estimate_background(image: np.ndarray, *, step: int = 8) -> np.ndarray:
    """(3,) background colour of an RGB image: the median of its brightest 30% (subsampled every ``step`` px)."""
    pixels = np.asarray(image)[::step, ::step].reshape(-1, 3).astype(np.int16)
    value = pixels.max(axis=1)
    return np.median(pixels[value >= np.percentile(value, 70)], axis=0)


def foreground_fraction(tiles: np.ndarray, background: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 tiles → (N,) fraction of foreground pixels in each.

    With ``background`` (an RGB colour), a pixel is foreground when it differs
    from it by more than ``BG_DELTA`` in some channel and is not near black.
    """
    tiles = np.asarray(tiles)
    if tiles.ndim != 4:
        raise ValueError(f"expected (N, H, W, 3) tiles, got shape {tiles.shape}")
    if background is None:
        return foreground_mask(tiles).mean(axis=(1, 2))
    x = tiles.astype(np.int16)
    differs = np.abs(x - np.asarray(background, np.int16)).max(axis=-1) > BG_DELTA
    return (differs & (x.max(axis=-1) >= DARK)).mean(axis=(1, 2))
