"""Heat-map overlays: where in the image the model saw the class it reports.

Why a colour bar: a clinician reading a PNG has no card and no legend; red means
nothing unless the strip under the image says red = 1 and shows where the
operating threshold lies. Why no map from one or two crops: their mean is one
or two flat colours over the whole image, which looks like localisation but is
only the image's probability painted everywhere; the banner says so instead.
Why boxes: a detection-enabled card counts objects (parasites), and a count is
only trusted once a person has seen each one; every detection is outlined with
its score so it can be confirmed by eye.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from edgedx.errors import InputError
from edgedx.runtime.tiling import SlidingResult, coverage_map

if TYPE_CHECKING:
    from edgedx.card import ModelCard
    from edgedx.runtime.detections import DetectedBox
    from edgedx.runtime.model import Diagnosis

log = logging.getLogger(__name__)

FONT = cv2.FONT_HERSHEY_SIMPLEX
MIN_WIDTH = 200  # narrower images are padded on the right so the caption, note and bar stay legible
MIN_CROPS_FOR_MAP = 3  # one or two kept crops give a flat colour, not a map
MARK = (255, 255, 255)  # the threshold mark: pure white never occurs in JET, so it always stands out
NOTE = (255, 220, 0)  # the "no map" note, yellow on the black banner
REJECTED = (255, 90, 90)  # a rejected image's reasons, red on the black banner
BOX = (255, 255, 255)  # a detection's outline: white on a black edge reads on any colour of the heat map
BOX_EDGE = (0, 0, 0)
# OpenCV's Hershey fonts draw only ASCII: the reasons' typography in plain letters
_ASCII = str.maketrans({"–": "-", "—": "-", "≥": ">=", "≤": "<=", "×": "x", "µ": "u", "→": "->", "σ": "sigma", "…": "..."})


@dataclass(frozen=True)
class BarLayout:
    """Where the colour bar lies inside its panel (pixels): value v in [0, 1] is at column ``x0 + v * (x1 - x0)``."""

    height: int  # of the whole panel
    x0: int
    x1: int
    y0: int  # the bar's top row
    y1: int  # the bar's bottom row (exclusive)
    font_scale: float

    def column(self, value: float) -> int:
        """The panel column of probability ``value`` (the rule the test checks the threshold mark against)."""
        return self.x0 + int(round(min(1.0, max(0.0, value)) * (self.x1 - self.x0)))


def bar_layout(width: int) -> BarLayout:
    """The geometry of a colour-bar panel ``width`` pixels wide; it grows with the width so it reads on big fields."""
    scale = min(2.0, max(0.4, width / 900.0))
    (_, text_h), base = cv2.getTextSize("0.5", FONT, scale, 1)
    line = text_h + base + 4
    margin = max(8, int(round(24 * scale)))
    y0 = line + 2  # a row for the scale's name above the bar
    bar_h = max(8, int(round(16 * scale)))
    return BarLayout(height=y0 + bar_h + line + 6, x0=margin, x1=width - 1 - margin, y0=y0, y1=y0 + bar_h, font_scale=scale)


def colour_bar(width: int, *, threshold: float | None = None, label: str = "probability") -> np.ndarray:
    """An RGB panel ``width`` wide: the JET strip from 0 (left) to 1 (right), "0" and "1" at its ends, ``label``
    above it and, when given, a white mark at ``threshold`` with its value, so a colour can be read as a number."""
    if threshold is not None and not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
        raise InputError(f"overlay threshold must be a probability in [0, 1], got {threshold!r}; pass the card's threshold or None")
    geo = bar_layout(width)
    panel = np.zeros((geo.height, width, 3), np.uint8)
    ramp = np.linspace(0, 255, geo.x1 - geo.x0 + 1).round().astype(np.uint8)[None, :]
    strip = cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    panel[geo.y0 : geo.y1, geo.x0 : geo.x1 + 1] = strip
    scale, grey = geo.font_scale, (220, 220, 220)
    below = geo.y1 + cv2.getTextSize("0", FONT, scale, 1)[0][1] + 4
    cv2.putText(panel, label, (geo.x0, geo.y0 - 4), FONT, scale, grey, 1, cv2.LINE_AA)
    cv2.putText(panel, "0", (geo.x0, below), FONT, scale, grey, 1, cv2.LINE_AA)
    one_w = cv2.getTextSize("1", FONT, scale, 1)[0][0]
    cv2.putText(panel, "1", (geo.x1 - one_w + 1, below), FONT, scale, grey, 1, cv2.LINE_AA)
    if threshold is not None:
        x = geo.column(threshold)
        half = max(1, int(round(2 * scale)))  # visible on a 4000-px field too
        cv2.rectangle(panel, (x - half, geo.y0 - 3), (x + half, geo.y1 + 2), MARK, thickness=-1)
        text = f"threshold {threshold:.2f}"
        text_w = cv2.getTextSize(text, FONT, scale, 1)[0][0]
        left = min(max(x - text_w // 2, geo.x0 + 2 * one_w + 4), geo.x1 - text_w - 2 * one_w - 4)
        cv2.putText(panel, text, (max(0, left), below), FONT, scale, MARK, 1, cv2.LINE_AA)
    return panel


def no_map_note(n_crops: int) -> str | None:
    """The banner note when the crops are too few for a map ("single crop - no map"), else None.

    ASCII only: OpenCV's Hershey fonts draw any other character as '?'."""
    if n_crops >= MIN_CROPS_FOR_MAP:
        return None
    return "single crop - no map" if n_crops == 1 else f"{n_crops} crops - no map"


def _banner(width: int, image_height: int, caption: str, note: str | None) -> np.ndarray:
    """The black caption banner: the caption wrapped to the image's width (a clipped "thresh…" hides the very
    number the overlay must show), and the note on a line of its own so a long caption never hides it."""
    line_h = max(18, image_height // 16)
    scale = line_h / 30.0
    lines = _wrap(caption, width - 8, scale)
    rows = [(text, (255, 255, 255)) for text in lines] + ([(note, NOTE)] if note else [])
    banner = np.zeros((line_h * len(rows), width, 3), np.uint8)
    for k, (text, colour) in enumerate(rows):
        cv2.putText(banner, text, (4, k * line_h + int(line_h * 0.75)), FONT, scale, colour, 1, cv2.LINE_AA)
    return banner


def _wrap(text: str, width: int, scale: float) -> list[str]:
    """Words on as few lines as fit ``width`` pixels at ``scale`` (a word wider than a line gets a line alone)."""
    lines: list[str] = []
    for word in text.split():
        candidate = f"{lines[-1]} {word}" if lines else word
        if lines and cv2.getTextSize(candidate, FONT, scale, 1)[0][0] <= width:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines or [""]


def _heat_wash(image: np.ndarray, sliding: SlidingResult, class_index: int, weighting: str) -> np.ndarray:
    """The image with the per-tile probability of ``class_index`` blended in (JET, red = high)."""
    heat = np.nan_to_num(coverage_map(sliding.grid, sliding.tile_probabilities[:, class_index], weighting=weighting), nan=0.0)
    heat = cv2.resize(heat.astype(np.float32), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    coloured = cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    coloured = cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB)
    alpha = (0.15 + 0.45 * np.clip(heat, 0, 1))[..., None]
    return (image.astype(np.float32) * (1 - alpha) + coloured.astype(np.float32) * alpha).astype(np.uint8)


def draw_detections(image: np.ndarray, detections: Sequence[DetectedBox]) -> np.ndarray:
    """A copy of ``image`` with each detection's box (original pixels) outlined and its score written above it.

    Line width and text grow with the image so they stay visible on a 4000-px field."""
    out = np.array(image, dtype=np.uint8, copy=True, order="C")
    if not detections:
        return out
    side = min(out.shape[:2])
    thick = max(1, int(round(side / 400)))
    scale = max(0.35, side / 1600)
    for d in detections:
        top_left, bottom_right = (d.x, d.y), (d.x + d.w - 1, d.y + d.h - 1)
        cv2.rectangle(out, top_left, bottom_right, BOX_EDGE, thick + 2)
        cv2.rectangle(out, top_left, bottom_right, BOX, thick)
        text = f"{d.score:.2f}"
        (_, text_h), _ = cv2.getTextSize(text, FONT, scale, 1)
        at = (d.x + thick, d.y - thick - 2 if d.y - thick - 2 >= text_h else d.y + d.h - thick - 2)
        cv2.putText(out, text, at, FONT, scale, BOX_EDGE, thick + 2, cv2.LINE_AA)
        cv2.putText(out, text, at, FONT, scale, BOX, thick, cv2.LINE_AA)
    return out


def render_overlay(
    image: np.ndarray,
    sliding: SlidingResult,
    class_index: int,
    caption: str,
    *,
    weighting: str = "none",
    threshold: float | None = None,
    scale_label: str = "probability",
    detections: Sequence[DetectedBox] = (),
) -> np.ndarray:
    """Caption banner, the image with the per-tile probability of ``class_index`` blended in, and a colour bar.

    Each pixel shows the mean probability of the tiles covering it, mapped back
    from the scaled image to the original size (skipped background tiles show
    no colour). With fewer than :data:`MIN_CROPS_FOR_MAP` kept crops the image
    is left as it is and the banner says why. ``threshold`` (the card's, for
    the class shown) is marked on the bar; ``scale_label`` names the scale
    ("p(melanoma)"). Images narrower than :data:`MIN_WIDTH` are padded on the
    right with black; the image itself is never resized. ``detections`` (boxes
    in the image's pixels) are outlined with their scores (:func:`draw_detections`).
    """
    note = no_map_note(sliding.n_used)
    if note is None:
        shown = _heat_wash(image, sliding, class_index, weighting)
    else:
        log.debug("overlay without a heat map: %s (%d of %d crops kept)", note, sliding.n_used, sliding.n_tiles)
        shown = np.ascontiguousarray(image, dtype=np.uint8)
    if detections:
        shown = draw_detections(shown, detections)
    width = max(MIN_WIDTH, shown.shape[1])
    if width > shown.shape[1]:
        shown = np.pad(shown, ((0, 0), (0, width - shown.shape[1]), (0, 0)))
    banner = _banner(width, image.shape[0], caption, note)
    return np.vstack([banner, shown, colour_bar(width, threshold=threshold, label=scale_label)])


def ascii_text(text: str) -> str:
    """``text`` as the Hershey fonts can draw it (en dashes, ≥, µ… spelt in ASCII; anything else becomes '?')."""
    return text.translate(_ASCII).encode("ascii", "replace").decode("ascii")


def render_rejection(image: np.ndarray, reasons: Sequence[str]) -> np.ndarray:
    """A rejected image: the image as it is under a banner that says it was not diagnosed and why, one reason per
    line (wrapped to the width); no heat map and no colour bar, because no probability exists to show."""
    shown = np.ascontiguousarray(image, dtype=np.uint8)
    width = max(MIN_WIDTH, shown.shape[1])
    if width > shown.shape[1]:
        shown = np.pad(shown, ((0, 0), (0, width - shown.shape[1]), (0, 0)))
    line_h = max(18, image.shape[0] // 16)
    scale = line_h / 30.0
    rows = [(text, (255, 255, 255)) for text in _wrap("REJECTED by the quality gate - not diagnosed", width - 8, scale)]
    for reason in reasons:
        rows += [(text, REJECTED) for text in _wrap(ascii_text(reason), width - 8, scale)]
    banner = np.zeros((line_h * len(rows), width, 3), np.uint8)
    for k, (text, colour) in enumerate(rows):
        cv2.putText(banner, text, (4, k * line_h + int(line_h * 0.75)), FONT, scale, colour, 1, cv2.LINE_AA)
    return np.vstack([banner, shown])


def diagnosis_overlay(image: np.ndarray, result: Diagnosis, card: ModelCard, *, weighting: str = "none") -> np.ndarray:
    """The overlay of one result: a rejected image's banner of reasons (:func:`render_rejection`); else the heat map
    of the positive class (binary) or of the most probable class, captioned with the decision, that class's
    probability and the threshold the decision was taken at (marked on the colour bar; none for argmax)."""
    if result.rejected:
        return render_rejection(image, result.reject_reasons)
    probs = result.probabilities
    index = card.positive_index if card.task == "binary" else card.class_names.index(max(probs, key=probs.__getitem__))
    name = card.class_names[index]  # type: ignore[index]
    label = result.decision if result.decision is not None else result.label
    caption = f"{', '.join(label) if isinstance(label, list) else label}  p({name})={probs[name]:.2f}"
    if result.threshold is not None:
        caption += f"  threshold {result.threshold:.2f}"
    found = result.findings
    if found is not None:
        caption += f"  {found.field_rule}"
        rate = found.parasitaemia or {}
        if rate.get("percent") is not None:
            caption += f"; {rate['n_parasites']} per {rate['n_cells']} red cells = {rate['percent']:.2f}% (95% CI {rate['ci95'][0]:.2f}-{rate['ci95'][1]:.2f}%)"
    return render_overlay(
        image, result.sliding, index, ascii_text(caption), weighting=weighting, threshold=result.threshold, scale_label=f"p({name})",
        detections=() if found is None else found.detections,
    )
