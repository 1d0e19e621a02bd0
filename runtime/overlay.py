"""Heat-map overlays: where in the image the model saw the class it reports."""

from __future__ import annotations

import cv2
import numpy as np

from edgedx.runtime.tiling import SlidingResult, coverage_map


def render_overlay(
    image: np.ndarray, sliding: SlidingResult, class_index: int, caption: str, *, weighting: str = "none"
) -> np.ndarray:
    """The image with the per-tile probability of ``class_index`` blended in (red = high).

    Each pixel shows the mean probability of the tiles covering it, mapped back
    from the scaled image to the original size (skipped background tiles show
    no colour); the caption goes on a banner.
    """
    heat = np.nan_to_num(coverage_map(sliding.grid, sliding.tile_probabilities[:, class_index], weighting=weighting), nan=0.0)
    heat = cv2.resize(heat.astype(np.float32), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    coloured = cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    coloured = cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB)
    alpha = (0.15 + 0.45 * np.clip(heat, 0, 1))[..., None]
    blended = (image.astype(np.float32) * (1 - alpha) + coloured.astype(np.float32) * alpha).astype(np.uint8)
    banner_h = max(18, image.shape[0] // 16)
    banner = np.zeros((banner_h, image.shape[1], 3), np.uint8)
    scale = banner_h / 30.0
    cv2.putText(banner, caption, (4, int(banner_h * 0.75)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return np.vstack([banner, blended])
