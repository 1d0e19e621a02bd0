"""Physical scale: resample an image so objects have the size, in pixels, they had in training.

Why: a model trained on fields sampled at 0.25 µm/px saw a red cell about 30
pixels wide; the same cell from a 0.5 µm/px scanner is 15 pixels wide, and the
model answers just as confidently about a shape it never saw. When the card
knows the training images' micrometres per pixel (``card.um_per_px``) and the
image's is known (``--um-per-px``, else the file's TIFF resolution tags), the
image is resampled by ``image_um_per_px / trained_um_per_px`` before the crop
policy, so a cell is as many pixels wide as in training.

Only crop mode ``scale`` keeps physical size: ``fit`` and ``shorter_side``
resize every image to a fixed pixel size whatever its sampling, so there the
factor would change nothing and is not applied (the record's note says so).
In mode ``scale`` the factor and the card's resampling are one resampling
(:func:`model_view`): area averaging when shrinking, linear when enlarging,
never two interpolations in a row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from edgedx.card import CropPolicy
from edgedx.errors import ImageReadError, InputError
from edgedx.runtime.tiling import ImageRegionSource, ResampledImage, resampled_size

# a file's tag further than this from the training scale is more likely a default (72 dpi) than the scanner's sampling
MAX_FILE_FACTOR = 16.0
SCALE_SOURCES = ("option", "file", "none")


def check_um_per_px(value: Any, what: str = "--um-per-px") -> float | None:
    """A micrometres-per-pixel value, or None; a non-positive or non-finite one is refused naming it."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a positive number of micrometres per pixel, got {value!r}") from None
    if not (number > 0 and math.isfinite(number)):
        raise InputError(
            f"{what} must be a positive number of micrometres per pixel, got {value!r}; "
            "for a scanner given in dots per inch use 25400 / DPI (e.g. 0.25 for 101600 dpi)"
        )
    return number


@dataclass(frozen=True)
class ScalePlan:
    """What the runtime does about one image's physical scale, and why, in the record's words."""

    image_um_per_px: float | None
    trained_um_per_px: float | None
    source: str  # option | file | none: where the image's scale came from
    factor: float  # applied to the image's size before the crop policy; 1.0 when none is applied
    note: str

    def to_record(self) -> dict[str, Any]:
        return {
            "image_um_per_px": None if self.image_um_per_px is None else round(self.image_um_per_px, 6),
            "trained_um_per_px": self.trained_um_per_px, "source": self.source, "factor": round(self.factor, 6), "note": self.note,
        }


def plan_scale(image_um: float | None, source: str, trained_um: float | None, policy: CropPolicy) -> ScalePlan:
    """The factor for an image sampled at ``image_um`` (from ``source``) under a card trained at ``trained_um``.

    Either unknown: diagnosed as given, and the note says which. A file tag
    more than :data:`MAX_FILE_FACTOR` times off the training scale is not
    applied (many programs write 72 dpi by default); ``--um-per-px`` is
    trusted as given.
    """
    if image_um is None and trained_um is None:
        return ScalePlan(None, None, "none", 1.0, "the image's scale and the model's training scale are unknown: diagnosed as given")
    if image_um is None:
        return ScalePlan(None, trained_um, "none", 1.0, "the image's scale is unknown: diagnosed as given")
    if trained_um is None:
        return ScalePlan(image_um, None, source, 1.0, "the model's training scale is unknown: diagnosed as given")
    factor = image_um / trained_um
    if policy.mode != "scale":
        size = f"{policy.tile_size[0]}×{policy.tile_size[1]}" if policy.mode == "fit" else f"a shorter side of {policy.shorter_side} px"
        return ScalePlan(image_um, trained_um, source, 1.0, f"not resampled for scale: crop mode '{policy.mode}' resizes every image to {size} whatever its µm/px")
    if source == "file" and not 1 / MAX_FILE_FACTOR <= factor <= MAX_FILE_FACTOR:
        return ScalePlan(
            image_um, trained_um, source, 1.0,
            f"not resampled: the file's resolution tag says {image_um:g} µm/px, {factor:.3g}× the training scale ({trained_um:g} µm/px), "
            "more likely a default tag than the scanner's sampling; give --um-per-px if it is right",
        )
    if factor == 1.0:
        return ScalePlan(image_um, trained_um, source, 1.0, f"the image's scale matches training ({trained_um:g} µm/px)")
    return ScalePlan(
        image_um, trained_um, source, factor,
        f"resampled by {factor:.4g} (image {image_um:g} µm/px, trained {trained_um:g} µm/px) so objects keep their trained size",
    )


def scaled_source_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """The image's size at the training scale (what the crop policy then resamples)."""
    if factor == 1.0:
        return height, width
    return max(1, round(height * factor)), max(1, round(width * factor))


def model_view(image: np.ndarray, policy: CropPolicy, factor: float = 1.0) -> ResampledImage:
    """The image as the crops are cut from it: the physical ``factor`` and the crop policy's resampling in one step.

    With ``factor`` 1 this is exactly what the splitter does itself
    (:meth:`ResampledImage.of`); the splitter accepts the result in place of
    the image and cuts the same crops from it. Refuses a size over the pixel
    limit before allocating it.
    """
    height, width = int(image.shape[0]), int(image.shape[1])
    virtual = scaled_source_size(height, width, factor)
    size = resampled_size(*virtual, policy)
    _check_size(size, (height, width), policy, factor)
    if size == (height, width):
        return ResampledImage(image, virtual)
    shrinking = size[0] <= height and size[1] <= width
    resized = cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return ResampledImage(resized[..., None] if resized.ndim == 2 else resized, virtual)


def _check_size(size: tuple[int, int], source: tuple[int, int], policy: CropPolicy, factor: float) -> None:
    from edgedx.runtime.io.image_io import default_max_pixels

    limit = default_max_pixels()
    if size[0] * size[1] > limit:
        physical = factor != 1.0
        why = f"the physical scale (×{factor:.3g}) and the crop policy ({policy.describe()})" if physical else f"the crop policy ({policy.describe()})"
        raise ImageReadError(
            f"resampling this {source[1]}×{source[0]} image by {why} would make it {size[1]}×{size[0]} = "
            f"{size[0] * size[1] / 1e6:.0f} megapixels, over the limit of {limit / 1e6:.0f}; {'check --um-per-px or ' if physical else ''}lower --scale"
        )


class ScaledSource:
    """A region-by-region image (a tiled TIFF) seen at the training scale: ``factor`` × its size, read lazily.

    The crop policy then resamples it again region by region (two
    interpolations, the price of never decoding a whole slide).
    """

    def __init__(self, source: ImageRegionSource, factor: float) -> None:
        self.source = source
        self.factor = factor
        self.height, self.width = scaled_source_size(source.height, source.width, factor)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(h', w', 3) uint8 of the scaled image, clipped to it: the source pixels behind it, resampled."""
        y1, x1 = min(self.height, y + h), min(self.width, x + w)
        y, x = max(0, y), max(0, x)
        if y1 <= y or x1 <= x:
            return np.zeros((0, 0, 3), np.uint8)
        f, src = self.factor, self.source
        sy0, sx0 = int(math.floor(y / f)), int(math.floor(x / f))
        sy1 = min(src.height, max(sy0 + 1, int(math.ceil(y1 / f))))
        sx1 = min(src.width, max(sx0 + 1, int(math.ceil(x1 / f))))
        region = src.read(sy0, sx0, sy1 - sy0, sx1 - sx0)
        interpolation = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
        resized = cv2.resize(region, (x1 - x, y1 - y), interpolation=interpolation)
        return resized[..., None] if resized.ndim == 2 else resized

    def close(self) -> None:
        if hasattr(self.source, "close"):
            self.source.close()
