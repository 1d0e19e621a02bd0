"""Before diagnosis, per image: the physical scale, then the image-quality gate.

Why here, between reading and cutting: an image the gate rejects must never
reach the model (a confident answer about a black or blurred field is worse
than none), and the gate must judge the pixels the crops are cut from. So
each image is resampled once to the model's scale (:func:`edgedx.runtime.scale.model_view`:
the physical factor and the card's crop-policy resampling in one step), the
measures are taken there (:mod:`edgedx.runtime.quality`), and the splitter is
handed that same resampled image, never resampling it again. Runs in the
reader thread, so it overlaps inference.

An image read region by region (a tiled TIFF) is never decoded whole: its
measures come from the central 2048×2048 pixels of the file.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edgedx.card import CropPolicy, ModelCard
from edgedx.errors import InputError
from edgedx.runtime.io.image_io import tiff_um_per_px
from edgedx.runtime.quality import card_limits, has_limits, measure_quality, parse_limit, quality_reasons
from edgedx.runtime.scale import ScaledSource, check_um_per_px, model_view, plan_scale
from edgedx.runtime.tiling import ImageRegionSource, ResampledImage, TileGrid, plan_tiles

QUALITY_MODES = ("card", "off")
REGION_SAMPLE = 2048  # file pixels per side measured of an image read region by region


@dataclass(frozen=True)
class GateSettings:
    """The checked quality-gate and scale settings of a run: what every image is held to."""

    mode: str = "off"  # card | off
    limits: dict[str, Any] = field(default_factory=dict)  # the limits in force (the card's, overridden), by name
    overrides: dict[str, Any] = field(default_factory=dict)
    um_per_px: float | None = None  # --um-per-px: the images' scale, instead of their files' tags
    card_has_limits: bool = False

    @classmethod
    def check(cls, card: ModelCard, quality: str = "card", limits: Mapping[str, Any] | None = None, um_per_px: Any = None) -> GateSettings:
        """``quality`` "card" (its limits, with ``limits`` overriding them by name) or "off"; unknown limit names,
        bad values and a non-positive ``um_per_px`` are refused naming them."""
        if quality not in QUALITY_MODES:
            raise InputError(f"--quality must be card or off, got {quality!r}")
        overrides = {name: parse_limit(name, value) for name, value in (limits or {}).items()}
        in_card = card_limits(card.quality)
        return cls(quality, {**in_card, **overrides}, overrides, check_um_per_px(um_per_px), has_limits(in_card))

    @property
    def on(self) -> bool:
        return self.mode == "card" and has_limits(self.limits)

    def describe(self) -> str:
        """The record's ``quality.gate``: why the gate ran or not, in words."""
        if self.mode == "off":
            return "off: --quality off"
        if not self.on:
            return "off: the card has no limits" if not self.overrides else "off: every limit is off"
        if not self.overrides:
            return "card"
        changed = ", ".join(f"{k}={_limit_text(v)}" for k, v in self.overrides.items())
        return f"card, with {changed}" if self.card_has_limits else f"--quality-limit {changed} (the card has none)"


def _limit_text(value: Any) -> str:
    if value is None:
        return "off"
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else f"{value:g}"


@dataclass(frozen=True)
class Prepared:
    """One image after the scale and the gate: what the splitter cuts (None when rejected) and what the record says."""

    image: Any
    scale: dict[str, Any]
    quality: dict[str, Any]
    reasons: tuple[str, ...] = ()
    grid: TileGrid | None = None  # the grid the image would have had: a rejected image's record keeps its size
    source: Any = None  # a lazily read source to close once its tiles are cut

    @property
    def rejected(self) -> bool:
        return bool(self.reasons)


def prepare(image: Any, path: str | Path | None, card: ModelCard, policy: CropPolicy, settings: GateSettings) -> Prepared:
    """Scale ``image`` (an RGB array, a region source or an already resampled image) and judge it.

    The image's scale is ``settings.um_per_px``, else its file's TIFF tags.
    Nothing is resampled when the gate is off and no physical factor applies:
    the splitter then gets the image as it came.
    """
    if isinstance(image, ResampledImage):  # already at the model's scale (training, export): judged as it is
        plan = plan_scale(None, "none", card.um_per_px, policy)
        return _judged(image, image.pixels, image.pixels, plan.to_record(), settings, lambda: plan_tiles(*image.source_size, policy))
    image_um, source = (settings.um_per_px, "option") if settings.um_per_px is not None else (None, "none")
    if image_um is None and path is not None:
        image_um = tiff_um_per_px(path)
        source = "file" if image_um is not None else "none"
    plan = plan_scale(image_um, source, card.um_per_px, policy)
    if isinstance(image, np.ndarray):
        if not settings.on and plan.factor == 1.0:
            return Prepared(image, plan.to_record(), _off(settings))
        view = model_view(image, policy, plan.factor)
        return _judged(view, image, view.pixels, plan.to_record(), settings, lambda: plan_tiles(*view.source_size, policy))
    return _prepare_region(image, policy, plan.factor, plan.to_record(), settings)


def _off(settings: GateSettings) -> dict[str, Any]:
    return {"passed": None, "gate": settings.describe()}


def _judged(split: Any, source: np.ndarray, scaled: np.ndarray, scale: dict[str, Any], settings: GateSettings, grid: Any) -> Prepared:
    """Measure and compare; a rejected image keeps only its grid (for the record), never its pixels."""
    if not settings.on:
        return Prepared(split, scale, _off(settings))
    measures = measure_quality(source, scaled)
    reasons = tuple(quality_reasons(measures, settings.limits))
    quality = {**measures, "passed": not reasons, "gate": settings.describe()}
    if reasons:
        return Prepared(None, scale, quality, reasons, grid())
    return Prepared(split, scale, quality)


def _prepare_region(source: ImageRegionSource, policy: CropPolicy, factor: float, scale: dict[str, Any], settings: GateSettings) -> Prepared:
    """A region-by-region image: wrapped at the physical factor, judged on a central sample of the file."""
    scaled_source: Any = ScaledSource(source, factor) if factor != 1.0 else source
    closer = source if hasattr(source, "close") else None
    if not settings.on:
        return Prepared(scaled_source, scale, _off(settings), source=closer)
    try:
        grid = plan_tiles(scaled_source.height, scaled_source.width, policy)
        measures = _measure_region(source, grid)
    except BaseException:
        if closer is not None:
            closer.close()
        raise
    reasons = tuple(quality_reasons(measures, settings.limits))
    quality = {**measures, "passed": not reasons, "gate": f"{settings.describe()} (measured on the central {REGION_SAMPLE}×{REGION_SAMPLE} px of the file)"}
    if reasons:
        if closer is not None:
            closer.close()
        return Prepared(None, scale, quality, reasons, grid)
    return Prepared(scaled_source, scale, quality, source=closer)


def _measure_region(source: ImageRegionSource, grid: TileGrid) -> dict[str, float]:
    """The measures of the central :data:`REGION_SAMPLE` pixels of the file, resampled by the grid's factors; the
    short side is the whole image's (at the model's scale, in pixels of real detail, as :func:`measure_quality`)."""
    h, w = min(REGION_SAMPLE, source.height), min(REGION_SAMPLE, source.width)
    y0, x0 = (source.height - h) // 2 // 8 * 8, (source.width - w) // 2 // 8 * 8  # JPEG-tiled files keep their block grid
    region = np.ascontiguousarray(source.read(y0, x0, h, w))
    fy, fx = grid.height / source.height, grid.width / source.width
    size = (max(1, round(region.shape[0] * fy)), max(1, round(region.shape[1] * fx)))
    shrinking = fy <= 1 and fx <= 1
    scaled = region if size == region.shape[:2] else cv2.resize(region, (size[1], size[0]), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    measures = measure_quality(region, scaled)
    measures["short_side"] = float(min(grid.height, grid.width, source.height, source.width))
    return measures
