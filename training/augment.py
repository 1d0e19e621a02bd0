"""Augmentation on uint8 RGB images, before the card's preprocessing.

Only label-preserving geometry here: microscopy and dermoscopy have no canonical
orientation, so flips and 90° rotations are safe. (X-ray laterality presets come
with the training issue; ``none`` disables augmentation.)
"""

from __future__ import annotations

import numpy as np

PRESETS = ("flips90", "none")


def augment(image: np.ndarray, preset: str, rng: np.random.Generator) -> np.ndarray:
    """One random, label-preserving variant of ``image`` (H, W, 3)."""
    if preset == "none":
        return image
    if preset != "flips90":
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {PRESETS}")
    if rng.random() < 0.5:
        image = image[:, ::-1]
    if rng.random() < 0.5:
        image = image[::-1]
    if image.shape[0] == image.shape[1]:
        image = np.rot90(image, int(rng.integers(4)))
    return np.ascontiguousarray(image)
