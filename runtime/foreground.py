"""A cheap foreground statistic for skipping background tiles.

Whole microscope fields have empty glass between cells, and scanners leave black
borders; tiles of nothing but that waste inference and dilute a mean. A pixel is
background when it is near black (value < ``DARK``) or bright and colourless
(value > ``BRIGHT`` and saturation < ``PALE``), as empty brightfield glass is.
Grey images (X-ray, OCT) have no saturation, so only their black borders count
as background unless they are nearly white.
"""

from __future__ import annotations

import numpy as np

DARK = 25
BRIGHT = 200
PALE = 20


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


def foreground_fraction(tiles: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 tiles → (N,) fraction of foreground pixels in each."""
    tiles = np.asarray(tiles)
    if tiles.ndim != 4:
        raise ValueError(f"expected (N, H, W, 3) tiles, got shape {tiles.shape}")
    return foreground_mask(tiles).mean(axis=(1, 2))
