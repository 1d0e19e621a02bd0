"""Image-quality measures for the gate before diagnosis: deterministic, cheap, explainable in one sentence each.

Why these four: an out-of-focus field, a blown-out or black exposure, a stain
or colour cast unlike the training images, and an image too small for the
model's scale are the ways a phone or scanner image fails in the field while
the classifier still answers confidently. Each is one number a person can
check (``measure_quality``), compared against limits taken from percentiles of
the training images and stored in the card (:class:`edgedx.card.QualityLimits`).

Measured on the image at the model's scale (after the card's crop-policy
resampling, before cropping), so focus compares like with like whatever the
camera resolution.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from edgedx.card import QualityLimits

MEASURES = ("focus", "clipped", "brightness", "colour", "short_side")


def measure_quality(image: np.ndarray) -> dict[str, float]:
    """The quality measures of an (H, W, 3) uint8 RGB image.

    focus: variance of the Laplacian of the grey image (low: blurred);
    clipped: fraction of pixels with any channel at 0 or 255 (high: over- or
    under-exposed); brightness: mean grey level 0–255; colour: mean HSV
    saturation 0–255 (stain strength / colour cast); short_side: pixels.
    """
    rgb = np.ascontiguousarray(image, dtype=np.uint8)
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    focus = float(cv2.Laplacian(grey, cv2.CV_64F, ksize=3).var())
    clipped = float(np.mean(np.any((rgb == 0) | (rgb == 255), axis=2)))
    saturation = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
    return {
        "focus": round(focus, 3),
        "clipped": round(clipped, 5),
        "brightness": round(float(grey.mean()), 3),
        "colour": round(float(saturation.mean()), 3),
        "short_side": float(min(rgb.shape[:2])),
    }


def quality_limits(measures: list[dict[str, float]], *, margin: float = 0.5) -> QualityLimits:
    """Limits from the training images' measures: a little outside the range that held 98% of them.

    focus_min: ``margin`` × the 1st percentile; clipped_max: the 99th percentile
    plus 0.05; brightness and colour: the 1st–99th percentile range widened by
    ``margin`` × its width on each side; min_short_side: ``margin`` × the 1st
    percentile. ``reference`` keeps the 1st, 5th, 50th, 95th and 99th
    percentiles of every measure for drift monitoring.
    """
    from edgedx.card import QualityLimits

    if not measures:
        return QualityLimits()
    values = {m: np.array([float(x[m]) for x in measures]) for m in MEASURES}
    pct = {m: {str(q): round(float(np.percentile(v, q)), 4) for q in (1, 5, 50, 95, 99)} for m, v in values.items()}

    def widened(m: str) -> tuple[float, float]:
        lo, hi = pct[m]["1"], pct[m]["99"]
        pad = margin * (hi - lo)
        return (round(max(0.0, lo - pad), 3), round(min(255.0, hi + pad), 3))

    return QualityLimits(
        focus_min=round(margin * pct["focus"]["1"], 3),
        clipped_max=round(min(1.0, pct["clipped"]["99"] + 0.05), 4),
        brightness_range=widened("brightness"),
        colour_range=widened("colour"),
        min_short_side=int(margin * pct["short_side"]["1"]),
        reference={"n_images": len(measures), "percentiles": pct},
    )
