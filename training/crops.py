"""The crop policy a model is trained with, and the training images resampled by it.

Why: the card's crop policy is how ``diagnose`` turns an image of any size into
model inputs. Training uses the same policy, so the crops it learns from and the
crops it is validated on are the crops the deployed model sees:

- ``fit``: the whole image resized to the input (lesion photographs, chest X-rays);
- ``shorter_side:N``: resized so the shorter side is N, then cut into sliding crops;
- ``scale[:F]``: resampled by a fixed factor F (microscopy: cells keep their
  trained size), then cut; without F, the median factor that brings the training
  images to the input size;
- ``auto`` (the default): ``scale`` when every training image has one size (crops
  of cells, MedMNIST), else ``fit``. The choice and its reason are logged and
  written to the run summary.

Each image is decoded once and kept only as resampled by the policy
(:class:`~edgedx.runtime.tiling.ResampledImage`); training draws random crops
from it by the splitter's rule and validation runs the splitter itself.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from edgedx.card import CropPolicy
from edgedx.errors import ImageReadError, InputError
from edgedx.progress import ProgressFn
from edgedx.runtime.tiling import ResampledImage
from edgedx.training.sources import TrainingData

log = logging.getLogger(__name__)

CROP_CHOICES = ("auto", "fit", "shorter_side[:N]", "scale[:F]")


@dataclass(frozen=True)
class CropChoice:
    """``--crop`` parsed: a mode and its optional number."""

    mode: str  # auto | fit | shorter_side | scale
    value: float | None = None

    @classmethod
    def parse(cls, text: str) -> CropChoice:
        name, _, number = str(text).strip().replace("-", "_").partition(":")
        if name not in ("auto", "fit", "shorter_side", "scale") or (number and name in ("auto", "fit")):
            raise InputError(f"unknown crop policy {text!r}; choose one of {', '.join(CROP_CHOICES)}")
        if not number:
            return cls(name)
        try:
            value = float(number)
        except ValueError:
            raise InputError(f"crop policy {text!r}: {number!r} is not a number") from None
        if not (value > 0 and math.isfinite(value)) or (name == "shorter_side" and value != int(value)):
            raise InputError(f"crop policy {text!r}: give a positive {'integer' if name == 'shorter_side' else 'number'} after the colon")
        return cls(name, value)


@dataclass(frozen=True)
class PlannedPolicy:
    policy: CropPolicy
    reason: str


def plan_crop_policy(data: TrainingData, choice: str, size: tuple[int, int], stride_fraction: float) -> PlannedPolicy:
    """The card's crop policy for training on ``data`` at input ``size``; reads image sizes from headers when needed."""
    parsed = CropChoice.parse(choice)
    stride = (max(1, round(size[0] * stride_fraction)), max(1, round(size[1] * stride_fraction)))
    base = {"tile_size": size, "stride": stride}
    if parsed.mode == "fit":
        return PlannedPolicy(CropPolicy(**base, mode="fit"), "as given with --crop fit")
    if parsed.mode == "shorter_side":
        side = int(parsed.value) if parsed.value else min(size)
        return PlannedPolicy(CropPolicy(**base, mode="shorter_side", shorter_side=side), f"as given with --crop shorter_side:{side}")
    if parsed.mode == "scale" and parsed.value:
        return PlannedPolicy(CropPolicy(**base, scale=round(parsed.value, 6)), f"as given with --crop scale:{parsed.value:g}")
    sizes = _sizes(data)
    if not sizes:
        raise InputError(f"no readable image in {data.source}")
    factor = round(float(np.median([math.sqrt(size[0] / h * size[1] / w) for h, w in sizes])), 6)
    if parsed.mode == "scale":
        return PlannedPolicy(CropPolicy(**base, scale=factor), f"as given with --crop scale: the median factor {factor:g}")
    distinct = sorted(set(sizes))
    if len(distinct) == 1:
        (h, w), = distinct
        return PlannedPolicy(
            CropPolicy(**base, scale=factor),
            f"auto: every training image is {h}×{w}, so crops keep that scale (factor {factor:g}); bigger images are cut into sliding crops",
        )
    return PlannedPolicy(
        CropPolicy(**base, mode="fit"),
        f"auto: training images have {len(distinct)} different sizes, so each whole image is resized to the input "
        "(use --crop shorter_side:N or scale:F for sliding crops)",
    )


def _sizes(data: TrainingData) -> list[tuple[int, int]]:
    sizes = []
    for i in range(len(data)):
        try:
            sizes.append(data.size(i))
        except ImageReadError:
            continue  # reported when the images are decoded
    return sizes


@dataclass
class DecodedImages:
    """The data decoded once and resampled by the card's crop policy, plus what was skipped."""

    data: TrainingData  # only the readable items
    images: list[ResampledImage]
    skipped: list[str]


def decode_all(data: TrainingData, policy: CropPolicy, *, strict: bool, progress: ProgressFn) -> DecodedImages:
    """Read every item once and keep it resampled by ``policy``; an unreadable one is skipped and listed, or fatal with ``strict``."""
    images, kept, skipped = [], [], []
    for i in range(len(data)):
        try:
            rgb = data.load(i)
        except ImageReadError as exc:
            if strict:
                raise InputError(f"unreadable training image (strict mode): {exc}") from None
            skipped.append(str(exc))
            log.warning("skipping %s", exc)
            continue
        images.append(ResampledImage.of(rgb, policy))
        kept.append(i)
        progress("load images", i + 1, len(data))
    if not kept:
        raise InputError(f"no readable image in {data.source}")
    return DecodedImages(data.subset(np.asarray(kept)), images, skipped)
