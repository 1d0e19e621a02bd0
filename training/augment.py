"""Augmentation presets by modality, on uint8 RGB images before the card's preprocessing.

Each preset only makes changes that keep the label true for its modality:

- ``dermoscopy``: lesions have no canonical orientation: flips, any rotation,
  slight zoom, colour jitter (lighting and camera differences).
- ``microscopy``: smears and tissue have no up or down: flips, 90° rotations,
  stain/colour jitter, occasional focus blur.
- ``xray``: no horizontal flip (laterality matters: the heart is on the left);
  small rotation and shift, brightness/contrast/gamma.
- ``oct``: retinal layers run top to bottom, so no vertical flip or large
  rotation; horizontal flip (left/right eye), small rotation, speckle noise,
  brightness/contrast.
- ``none``.

The preset's name goes into the card's provenance. :func:`tta_views` maps each
preset to the test-time views (``--tta modality``) that keep the label true for
the same reasons: the flips and turns its training augmentation already makes.
"""

from __future__ import annotations

import cv2
import numpy as np

from edgedx.errors import InputError

PRESETS = ("dermoscopy", "microscopy", "xray", "oct", "none")

# why a preset takes no test-time views, said in the run's log (--tta modality)
NO_TTA_BECAUSE = {
    "xray": (
        "no test-time views for chest X-rays: a left-right flip swaps laterality (the heart is on the left), "
        "and vertical flips or rotations make films no scanner produces"
    ),
}


def tta_views(preset: str, square: bool) -> tuple[str, ...]:
    """The test-time views (``edgedx.card.TTA_VIEWS``) that ``--tta modality`` takes for an augmentation preset.

    Only what the preset's own augmentation makes is label-preserving: dermoscopy
    and microscopy have no canonical orientation (every flip and turn; quarter
    turns only for a square tile, which they would put on its side), OCT only a
    left-right flip (layers run top to bottom), chest X-rays none
    (:data:`NO_TTA_BECAUSE`). ``none`` says nothing about the images, so there is
    nothing to choose from: the user must name a preset or the views.
    """
    if preset in ("dermoscopy", "microscopy"):
        return ("hflip", "vflip", "rot180", "rot90", "rot270") if square else ("hflip", "vflip", "rot180")
    if preset == "oct":
        return ("hflip",)
    if preset == "xray":
        return ()
    if preset == "none":
        raise InputError(
            "--tta modality takes its views from the --augmentation preset, and it is none: pass --augmentation "
            "dermoscopy, microscopy, xray or oct, or name the views (--tta hflip,vflip), or --tta off"
        )
    raise InputError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")


def augment(image: np.ndarray, preset: str, rng: np.random.Generator) -> np.ndarray:
    """One random, label-preserving variant of ``image`` (H, W, 3) uint8 for ``preset``."""
    if preset == "none":
        return image
    if preset == "microscopy":
        image = _flip(image, rng, horizontal=True, vertical=True)
        if image.shape[0] == image.shape[1]:
            image = np.rot90(image, int(rng.integers(4)))
        image = _colour(image, rng, brightness=0.1, contrast=0.1, saturation=0.15, hue=6)
        if rng.random() < 0.2:
            image = cv2.GaussianBlur(np.ascontiguousarray(image), (0, 0), rng.uniform(0.3, 1.0))
    elif preset == "dermoscopy":
        image = _flip(image, rng, horizontal=True, vertical=True)
        image = _affine(image, rng, degrees=180, shift=0.05, zoom=(1.0, 1.15))
        image = _colour(image, rng, brightness=0.15, contrast=0.15, saturation=0.15, hue=5)
    elif preset == "xray":
        image = _affine(image, rng, degrees=7, shift=0.05, zoom=(0.95, 1.08))
        image = _colour(image, rng, brightness=0.1, contrast=0.15, saturation=0.0, hue=0, gamma=0.15)
    elif preset == "oct":
        image = _flip(image, rng, horizontal=True, vertical=False)
        image = _affine(image, rng, degrees=5, shift=0.03, zoom=(1.0, 1.05))
        image = _colour(image, rng, brightness=0.1, contrast=0.1, saturation=0.0, hue=0)
        if rng.random() < 0.3:
            speckle = rng.normal(1.0, 0.08, size=image.shape[:2])[..., None]
            image = np.clip(image * speckle, 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    return np.ascontiguousarray(image)


def _flip(image: np.ndarray, rng: np.random.Generator, *, horizontal: bool, vertical: bool) -> np.ndarray:
    if horizontal and rng.random() < 0.5:
        image = image[:, ::-1]
    if vertical and rng.random() < 0.5:
        image = image[::-1]
    return image


def _affine(image: np.ndarray, rng: np.random.Generator, *, degrees: float, shift: float, zoom: tuple[float, float]) -> np.ndarray:
    """Rotate about the centre, zoom and shift; edges are reflected so no black corners appear."""
    h, w = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-degrees, degrees), rng.uniform(*zoom))
    matrix[:, 2] += rng.uniform(-shift, shift, size=2) * (w, h)
    return cv2.warpAffine(np.ascontiguousarray(image), matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


def _colour(
    image: np.ndarray, rng: np.random.Generator, *, brightness: float, contrast: float, saturation: float, hue: float, gamma: float = 0.0
) -> np.ndarray:
    """Brightness, contrast, saturation, hue (degrees) and gamma jitter, in float then back to uint8."""
    x = image.astype(np.float32)
    if saturation or hue:
        hsv = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue, hue) / 2.0) % 180.0  # OpenCV hue is 0..180
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - saturation, 1 + saturation), 0, 255)
        x = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
    x = x * rng.uniform(1 - brightness, 1 + brightness)
    if gamma:
        x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** rng.uniform(1 - gamma, 1 + gamma)
    return np.clip(x, 0, 255).astype(np.uint8)
