"""Image-quality measures for the gate before diagnosis: deterministic, cheap, explainable in one sentence each.

Why these: an out-of-focus field, a blown-out or black exposure, a stain or
colour cast unlike the training images, an image too small for the model's
scale and a JPEG compressed to blocks are the ways a phone or scanner image
fails in the field while the classifier still answers confidently. Each is
one number a person can check (:func:`measure_quality`), compared against
limits taken from percentiles of the training images (:func:`quality_limits`,
stored in the card as :class:`edgedx.card.QualityLimits`), and a failed check
is said in words (:func:`quality_reasons`).

Where each is measured, and why:

- clipped, brightness, colour, short_side: on the image at the model's scale
  (after the physical rescale and the card's crop-policy resampling, before
  cropping: :func:`edgedx.runtime.scale.model_view`), the pixels the crops
  are cut from, so they compare like with like whatever the camera;
- focus: one octave finer than the model's scale (twice its resampling,
  never finer than the file). A blur that softens the model's pixels starts
  there; at the model's scale itself a 3-pixel camera blur of a 1024-pixel
  dermoscopy image shrunk 4.6× is within the spread of sharp training images
  (benchmarks/quality_gate.py measured both);
- blockiness: on the decoded file, before any resampling, because JPEG's
  8×8 blocks lie on the file's pixel grid and resampling smears them.

Focus is a ratio (the Laplacian's variance over that of the image blurred by
σ = 1 px), not the Laplacian's variance itself: the variance grows with the
square of the contrast, so a dark or faint image looked "blurred" and the
training images' focus spread over two decades; the ratio says only how much
detail is finer than one pixel, and a dark image is then said to be dark.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from edgedx.errors import InputError

if TYPE_CHECKING:
    from edgedx.card import CropPolicy, QualityLimits

MEASURES = ("focus", "clipped", "brightness", "colour", "short_side", "blockiness")
# the gate's limits: the card's QualityLimits fields, and blockiness_max (kept in QualityLimits.reference, see quality_limits)
LIMIT_NAMES = ("focus_min", "clipped_max", "brightness_range", "colour_range", "min_short_side", "blockiness_max")
RANGE_LIMITS = ("brightness_range", "colour_range")
FOCUS_OCTAVE = 2.0  # focus is measured at this multiple of the model's resampling (capped at the file's pixels)
# detail below this Laplacian variance is noise, not focus: 8-bit rounding alone gives 80/12 ≈ 6.7 through OpenCV's
# 3×3 Laplacian (kernel 2,0,2 / 0,-8,0 / 2,0,2); without the floor a blurred flat image's rounding noise looked sharp
FOCUS_FLOOR = 10.0
JPEG_BLOCK = 8
BLOCKINESS_WINDOW = 1024  # blockiness looks at the central window of this many pixels (aligned to the block grid)


def measure_quality(image: np.ndarray, scaled: np.ndarray | None = None) -> dict[str, float]:
    """The quality measures of an (H, W, 3) uint8 RGB image as decoded, and ``scaled``, the same image at the
    model's scale (default: ``image`` is already at the model's scale).

    focus: Laplacian variance over that after a σ = 1 blur, at twice the
    model's scale (≈1 blurred, larger sharper); clipped: fraction of pixels
    with any channel at 0 or 255; brightness: the grey level of the image's
    bright parts (95th percentile, 0–255: glass, skin, lung), which follows the
    exposure whatever the content (a mean drops with a dark lesion); colour:
    mean HSV saturation 0–255 (stain strength, colour cast); short_side: the
    shorter side at the model's scale in pixels of real detail (an enlarged
    image counts its own pixels); blockiness: mean step across JPEG's 8×8
    block edges over the mean step elsewhere (≈1 natural, >1.5 blocky).
    """
    source = np.ascontiguousarray(image, dtype=np.uint8)
    at = source if scaled is None else np.ascontiguousarray(scaled, dtype=np.uint8)
    grey = cv2.cvtColor(at, cv2.COLOR_RGB2GRAY)
    bright = int(np.searchsorted(np.cumsum(np.bincount(grey.ravel(), minlength=256)), 0.95 * grey.size))  # 95th percentile
    clipped = 1.0 - cv2.countNonZero(cv2.inRange(at, (1, 1, 1), (254, 254, 254))) / grey.size  # any channel at 0 or 255
    saturation = cv2.cvtColor(at, cv2.COLOR_RGB2HSV)[:, :, 1]
    return {
        "focus": round(focus(_finer(source, at.shape[:2])), 4),
        "clipped": round(clipped, 5),
        "brightness": float(bright),
        "colour": round(float(saturation.mean()), 3),
        "short_side": float(min(*at.shape[:2], *source.shape[:2])),
        "blockiness": round(blockiness(source), 4),
    }


def measure_at_model_scale(image: np.ndarray, policy: CropPolicy, factor: float = 1.0) -> dict[str, float]:
    """The measures the runtime's gate takes of a decoded (H, W, 3) RGB image: the image resampled to the model's
    scale exactly as ``diagnose`` resamples it (:func:`edgedx.runtime.scale.model_view`, with the physical
    ``factor``), and the decoded pixels themselves for focus and blockiness. Training must measure its images
    with this, on the decoded files, so the limits compare like with like."""
    from edgedx.runtime.scale import model_view

    return measure_quality(image, model_view(image, policy, factor).pixels)


def _finer(source: np.ndarray, scaled: tuple[int, int]) -> np.ndarray:
    """The image one octave finer than the model's scale, never finer than the file: where focus is judged."""
    target = (min(source.shape[0], round(FOCUS_OCTAVE * scaled[0])), min(source.shape[1], round(FOCUS_OCTAVE * scaled[1])))
    if target == source.shape[:2]:
        return source
    return cv2.resize(source, (target[1], target[0]), interpolation=cv2.INTER_AREA)


def focus(rgb: np.ndarray) -> float:
    """Var(Laplacian) / var(Laplacian after a σ = 1 px Gaussian blur) of the grey image: how much of its detail is
    finer than a pixel. Independent of contrast and exposure; 1 when the image holds no such detail at all."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float32)
    sharp = _variance(cv2.Laplacian(grey, cv2.CV_32F, ksize=3))
    soft = _variance(cv2.Laplacian(cv2.GaussianBlur(grey, (0, 0), 1.0), cv2.CV_32F, ksize=3))
    return (sharp + FOCUS_FLOOR) / (soft + FOCUS_FLOOR)


def _variance(values: np.ndarray) -> float:
    _, std = cv2.meanStdDev(values)  # one pass in OpenCV: a third of numpy's time on a camera frame
    return float(std[0, 0]) ** 2


def blockiness(rgb: np.ndarray) -> float:
    """Mean absolute grey step across the 8-pixel JPEG block edges over the mean step inside blocks, both
    directions averaged, on the central :data:`BLOCKINESS_WINDOW` pixels (grid-aligned). A heavily compressed
    JPEG flattens each block and steps at its edges; natural detail does not care where the edges are."""
    grey = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
    h, w = grey.shape
    wh, ww = min(h, BLOCKINESS_WINDOW), min(w, BLOCKINESS_WINDOW)
    y0, x0 = (h - wh) // 2 // JPEG_BLOCK * JPEG_BLOCK, (w - ww) // 2 // JPEG_BLOCK * JPEG_BLOCK
    window = grey[y0 : y0 + wh, x0 : x0 + ww]
    ratios = []
    for axis in (1, 0):
        if window.shape[axis] <= 2 * JPEG_BLOCK:  # fewer than two blocks along this axis: nothing to compare
            continue
        ahead = window[:, 1:] if axis == 1 else window[1:]
        behind = window[:, :-1] if axis == 1 else window[:-1]
        # mean absolute step between neighbours, per column (axis 1) or per row (axis 0) of steps
        steps = cv2.absdiff(ahead, behind).sum(axis=1 - axis, dtype=np.int64) / window.shape[1 - axis]
        edge = np.arange(len(steps)) % JPEG_BLOCK == JPEG_BLOCK - 1  # between pixel 7 and 8 of each block
        ratios.append((float(steps[edge].mean()) + 1.0) / (float(steps[~edge].mean()) + 1.0))
    return float(np.mean(ratios)) if ratios else 1.0


def quality_limits(measures: list[dict[str, float]], *, margin: float = 0.5) -> QualityLimits:
    """Limits from the training images' measures: a little outside the range that held 98% of them.

    Each rule widens the 1st–99th percentile range on the side a degraded
    image falls, in the measure's own terms, so about 1% of images like the
    training ones or fewer are rejected while a clearly degraded one is:

    - focus_min ``1 + (1 − margin/3) × (p1 − 1)``: focus is a ratio whose
      floor is 1, and the sharp detail of the least sharp 1% may shrink by a
      sixth (at margin 0.5);
    - clipped_max: the 99th percentile plus 0.05;
    - brightness_range: the 1st–99th percentile range widened by ``2 ×
      margin`` stops (×2 and ÷2 at 0.5), because exposure is multiplicative;
    - colour_range: the 1st–99th percentile range widened by ``margin`` ×
      its width on each side, at least 8 levels (a greyscale set's range is
      otherwise 0–0 and a JPEG's faint chroma noise would fail it);
    - min_short_side: ``margin`` × the 1st percentile;
    - blockiness_max: the 99th percentile plus ``margin`` × the 1st–99th
      width, at least 0.25. The card's QualityLimits has no field for it: it
      is kept in ``reference["blockiness_max"]`` and read by :func:`card_limits`.

    ``reference`` keeps the 1st, 5th, 50th, 95th and 99th percentiles of
    every measure for drift monitoring. benchmarks/quality_gate.py judges
    these rules on real images held out from the fit.
    """
    from edgedx.card import QualityLimits

    if not measures:
        return QualityLimits()
    present = [m for m in MEASURES if all(m in x for x in measures)]  # measures from an older EdgeDx lack blockiness
    values = {m: np.array([float(x[m]) for x in measures]) for m in present}
    pct = {m: {str(q): round(float(np.percentile(v, q)), 4) for q in (1, 5, 50, 95, 99)} for m, v in values.items()}
    lo, hi = pct["colour"]["1"], pct["colour"]["99"]
    pad = max(8.0, margin * (hi - lo))
    stops = 2.0 ** (2 * margin)
    reference: dict[str, Any] = {"n_images": len(measures), "percentiles": pct}
    if "blockiness" in pct:
        width = pct["blockiness"]["99"] - pct["blockiness"]["1"]
        reference["blockiness_max"] = round(pct["blockiness"]["99"] + max(0.25, margin * width), 4)
    return QualityLimits(
        focus_min=round(1.0 + (1.0 - margin / 3) * max(0.0, pct["focus"]["1"] - 1.0), 4),
        clipped_max=round(min(1.0, pct["clipped"]["99"] + 0.05), 4),
        brightness_range=(round(pct["brightness"]["1"] / stops, 3), round(min(255.0, pct["brightness"]["99"] * stops), 3)),
        colour_range=(round(max(0.0, lo - pad), 3), round(min(255.0, hi + pad), 3)),
        min_short_side=int(margin * pct["short_side"]["1"]),
        reference=reference,
    )


def card_limits(limits: QualityLimits) -> dict[str, Any]:
    """The gate's limits from a card, by :data:`LIMIT_NAMES` (None: that check is off)."""
    values: dict[str, Any] = {name: getattr(limits, name) for name in LIMIT_NAMES if name != "blockiness_max"}
    values["blockiness_max"] = (limits.reference or {}).get("blockiness_max")
    return values


def has_limits(limits: Mapping[str, Any]) -> bool:
    return any(v is not None for v in limits.values())


def parse_limit(name: str, value: Any) -> Any:
    """One override (``focus_min=30``, ``brightness_range=40,220``, ``colour_range=off``) checked, as the gate uses it."""
    if name not in LIMIT_NAMES:
        raise InputError(f"unknown quality limit {name!r}; known: {', '.join(LIMIT_NAMES)}")
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none", "")):
        return None
    if name in RANGE_LIMITS:
        parts = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, Sequence) else [value]
        try:
            low, high = (float(p) for p in parts)
        except (TypeError, ValueError):
            raise InputError(f"quality limit {name} needs LOW,HIGH (e.g. {name}=40,220), got {value!r}") from None
        if not 0 <= low <= high <= 255:
            raise InputError(f"quality limit {name} needs 0 <= LOW <= HIGH <= 255, got {value!r}")
        return (low, high)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"quality limit {name} needs a number (e.g. {name}=30) or off, got {value!r}") from None
    if not number >= 0 or (name == "clipped_max" and number > 1):
        raise InputError(f"quality limit {name} must be {'within [0, 1]' if name == 'clipped_max' else '0 or more'}, got {value!r}")
    return int(number) if name == "min_short_side" else number


def quality_reasons(measures: Mapping[str, float], limits: Mapping[str, Any]) -> list[str]:
    """Every failed check in words, with the measure and the limit: ``["out of focus: 1.31 < 2.10", ...]``."""
    reasons = []
    if limits.get("focus_min") is not None and measures["focus"] < limits["focus_min"]:
        reasons.append(f"out of focus: sharpness {measures['focus']:.2f} < {limits['focus_min']:.2f}")
    if limits.get("clipped_max") is not None and measures["clipped"] > limits["clipped_max"]:
        reasons.append(f"over/under-exposed: {measures['clipped']:.0%} clipped pixels > {limits['clipped_max']:.0%}")
    low_high = limits.get("brightness_range")
    if low_high is not None and not low_high[0] <= measures["brightness"] <= low_high[1]:
        word = "too dark" if measures["brightness"] < low_high[0] else "too bright"
        reasons.append(f"{word}: brightness {measures['brightness']:.0f} outside {low_high[0]:.0f}–{low_high[1]:.0f}")
    low_high = limits.get("colour_range")
    if low_high is not None and not low_high[0] <= measures["colour"] <= low_high[1]:
        reasons.append(f"colour unlike the training images: saturation {measures['colour']:.0f} outside {low_high[0]:.0f}–{low_high[1]:.0f}")
    if limits.get("min_short_side") is not None and measures["short_side"] < limits["min_short_side"]:
        reasons.append(f"too small at the model's scale: {measures['short_side']:.0f} px < {limits['min_short_side']}")
    if limits.get("blockiness_max") is not None and measures.get("blockiness", 1.0) > limits["blockiness_max"]:
        reasons.append(f"compression artefacts: JPEG blockiness {measures['blockiness']:.2f} > {limits['blockiness_max']:.2f}")
    return reasons
