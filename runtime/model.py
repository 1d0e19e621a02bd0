"""A deployable model: inference session + card-driven preprocessing + sliding crops.

This is the object a microscope or scanner application embeds::

    from edgedx.runtime import load_model
    model = load_model("model.onnx")
    result = model.diagnose("field.jpg")   # or an (H, W, 3) uint8 RGB array
    print(result.label, result.probabilities)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.card import CropPolicy, ModelCard
from edgedx.errors import CardError, EdgeDxError, ImageReadError, InputError, InsufficientContentError
from edgedx.runtime.detections import FieldFindings, find_on_field, fitted_rule_words
from edgedx.runtime.gate import GateSettings, Prepared
from edgedx.runtime.gate import prepare as gate_image
from edgedx.runtime.io.image_io import to_rgb_uint8
from edgedx.runtime.preprocess import model_input, pixelwise, preprocess_batch, preprocess_field, to_probabilities
from edgedx.runtime.io.sources import ArraySource, open_source
from edgedx.runtime.tiling import CropLayout, ImageRegionSource, ResampledImage, SlidingResult, content_fraction, sliding_window_many
from edgedx.runtime.trust import crop_dispersion, prediction_set
from edgedx.runtime.tta import tta_run
from edgedx.runtime.backends.session import ENGINE_SUFFIXES, Session, is_engine_file, open_session

MAX_ENLARGEMENT = 16  # per side: a crop must hold at least 1/256 of its pixels' worth of the image


@dataclass(frozen=True)
class Diagnosis:
    """The result for one image: decision, probabilities and the tiles behind them.

    ``decision`` is the label, "refer" (``refer_reasons`` say why: the refer
    band, a prediction set of more or fewer than one class, crops that
    disagree) or "reject": the quality gate stopped the image before the
    model (``reject_reasons``; then ``label`` is None, ``probabilities`` empty
    and ``sliding`` only the grid the image would have had, all NaN).
    """

    label: str | list[str] | None
    probabilities: dict[str, float]
    n_crops: int
    sliding: SlidingResult
    decision: str | list[str] | None = None  # the label, "refer" or "reject"
    top_k: tuple[tuple[str, float], ...] = ()
    timings_ms: dict[str, float] = field(default_factory=dict)
    input_sha256: str | None = None  # of the file bytes that were decoded and diagnosed, when read from a file
    threshold: float | None = None  # the operating threshold the decision was taken at
    rule: str | None = None  # the decision in words: "p(melanoma) = 0.480 ≥ threshold 0.310 → melanoma"
    prediction_set: tuple[str, ...] | None = None  # the conformal set, when the card has a qhat (binary, multiclass)
    crop_dispersion: float | None = None  # the crops' disagreement, when the card has a limit and there are 2+ crops
    refer_reasons: tuple[str, ...] = ()
    reject_reasons: tuple[str, ...] = ()
    quality: dict[str, Any] | None = None  # the gate's measures, "passed" and "gate"
    scale: dict[str, Any] | None = None  # the physical scale: image and trained µm/px, source, factor, note
    findings: FieldFindings | None = None  # a detection-enabled card's detections, field decision, cells, parasitaemia
    decided_by: str | None = None  # a fitted field rule took the decision (not the merged probability): which, fitted where

    @property
    def rejected(self) -> bool:
        """The quality gate stopped the image: no model output exists for it."""
        return bool(self.reject_reasons)

    @property
    def tiles_used(self) -> int:
        return self.sliding.n_used

    @property
    def tiles_skipped(self) -> int:
        return self.sliding.n_skipped

    def to_record(self) -> dict[str, Any]:
        """The record's fields (see :func:`edgedx.runtime.outputs.records.empty_record`); a reject has no label,
        no probabilities and no crops. A detection-enabled card's diagnoses add their findings
        (:meth:`edgedx.runtime.detections.FieldFindings.to_record`); other records keep exactly these keys."""
        rejected = self.rejected
        record: dict[str, Any] = {
            "label": None if rejected else self.label,
            "decision": REJECT if rejected else self.label if self.decision is None else self.decision,
            "probabilities": None if rejected else self.probabilities,
            "top_k": [{"class": c, "probability": p} for c, p in self.top_k],
            "n_crops": self.n_crops,
            "tiles_used": 0 if rejected else self.tiles_used,
            "tiles_skipped": 0 if rejected else self.tiles_skipped,
            "timings_ms": self.timings_ms,
            "input_sha256": self.input_sha256,
            "threshold": self.threshold,
            "rule": self.rule,
            "prediction_set": None if self.prediction_set is None else list(self.prediction_set),
            "crop_dispersion": self.crop_dispersion,
            "refer_reasons": list(self.refer_reasons),
            "reject_reasons": list(self.reject_reasons),
            "quality": self.quality,
            "scale": self.scale,
        }
        if self.findings is not None and not rejected:
            record.update(self.findings.to_record())
            if self.decided_by is not None:
                record["decided_by"] = self.decided_by
        return record


REFER = "refer"
REJECT = "reject"


def decide(probabilities: np.ndarray, card: ModelCard) -> str | list[str]:
    """The label at the card's operating threshold.

    binary: the positive class when its probability reaches the threshold
    (0.5 when the card has none); multiclass: the most probable class;
    multilabel: every class at or above the threshold.
    """
    threshold = 0.5 if card.threshold is None else card.threshold
    names = card.class_names
    if card.task == "binary":
        pos = card.positive_index
        assert pos is not None  # the card guarantees a positive class for binary tasks
        return names[pos] if probabilities[pos] >= threshold else names[1 - pos]
    if card.task == "multilabel":
        return [n for n, p in zip(names, probabilities) if p >= threshold]
    return names[int(np.argmax(probabilities))]


def field_rule_decision(card: ModelCard, findings: FieldFindings, probabilities: np.ndarray) -> tuple[str, str, str]:
    """``(label, rule, decided_by)`` of a field decided by the card's fitted field rule (``detection.fitted_on`` set).

    Why not the merged probability: a few parasites among hundreds of cells
    barely move the mean of the crops, so a whole field's p(parasitized) says
    little; the field rule (detections or the highest crops), fitted on
    annotated fields, does. The probabilities stay in the record as they are.
    """
    pos = card.positive_index
    assert pos is not None  # a detection card is binary with a positive class
    names = card.class_names
    label = names[pos] if findings.field_positive else names[1 - pos]
    p = float(probabilities[pos])
    rule = f"{findings.field_rule} → {label} (the whole image's p({names[pos]}) = {p:.3f} is not what decides a field)"
    return label, rule, fitted_rule_words(card)


def decision_rule(probabilities: np.ndarray, card: ModelCard, label: str | list[str], refer_band: tuple[float, float] | None = None) -> str:
    """What the decision means, in words a clinician reads without the card: which probability, which threshold."""
    names = card.class_names
    threshold = 0.5 if card.threshold is None else card.threshold
    if card.task == "binary":
        pos = names[card.positive_index]  # type: ignore[index]
        p = float(probabilities[card.positive_index])  # type: ignore[index]
        text = f"p({pos}) = {p:.3f} {'≥' if p >= threshold else '<'} threshold {threshold:.3f} → {label}"
        if refer_band is not None and refer_band[0] <= p < refer_band[1]:
            text += f"; inside the refer band [{refer_band[0]:g}, {refer_band[1]:g}) → refer to a person"
        return text
    if card.task == "multilabel":
        return f"every class with p ≥ threshold {threshold:.3f}: {', '.join(label) if label else 'none'}"
    return f"the most probable class: {label} (p = {float(np.max(probabilities)):.3f})"


def check_refer_band(band: tuple[float, float] | None, card: ModelCard) -> tuple[float, float] | None:
    """A refer band ``(low, high)`` for a binary model: positive probabilities in ``[low, high)`` go to a person."""
    if band is None:
        return None
    low, high = (float(v) for v in band)
    if card.task != "binary":
        raise InputError(f"a refer band needs a binary model; this one is {card.task}")
    if not 0.0 <= low < high <= 1.0:
        raise InputError(f"refer band must satisfy 0 <= low < high <= 1, got {low:g},{high:g}")
    return low, high


def resolve_crop(base: CropPolicy, override: CropPolicy | Mapping[str, Any] | None) -> CropPolicy:
    """The card's crop policy with per-call overrides (``{"aggregation": "max", "stride": (32, 32)}``).

    The test-time views (``tta``) are the card's and no override changes them: the card's threshold, temperature
    and metrics were measured with exactly those views, and would no longer be true without them."""
    if override is None:
        return base
    if isinstance(override, CropPolicy):
        _keep_tta(base, override.tta)
        return override
    unknown = sorted(set(override) - {f.name for f in dataclasses.fields(CropPolicy)})
    if unknown:
        raise InputError(f"unknown crop setting(s) {unknown}; known: {', '.join(f.name for f in dataclasses.fields(CropPolicy))}")
    if override.get("tta") is not None:
        _keep_tta(base, override["tta"])
    changes = {k: v for k, v in override.items() if v is not None and k != "tta"}  # the card's views, checked above
    # a scale or a shorter side names its resampling mode; the other mode's setting no longer applies
    if "scale" in changes and "mode" not in changes:
        changes.update(mode="scale", shorter_side=None)
    elif "shorter_side" in changes and "mode" not in changes:
        changes.update(mode="shorter_side", scale=1.0)
    elif changes.get("mode") == "fit":
        changes.setdefault("scale", 1.0)
        changes.setdefault("shorter_side", None)
    try:
        return dataclasses.replace(base, **changes)
    except CardError as exc:
        raise InputError(str(exc).replace("model card field", "crop setting")) from None


def _keep_tta(base: CropPolicy, requested: Any) -> None:
    """Refuse test-time views other than the card's, naming the way: the card decides them, at training."""
    views = (requested,) if isinstance(requested, str) else tuple(requested)
    if views != tuple(base.tta):
        card = ", ".join(base.tta) or "none"
        raise InputError(
            f"test-time views cannot be changed at diagnosis (asked for {', '.join(views) or 'none'}; the card's: {card}): "
            "the card's threshold, temperature and metrics were measured with its own views. "
            "Train with another --tta to change them"
        )


def check_tile_fits(policy: CropPolicy, card: ModelCard) -> None:
    """A crop larger than the model input would be shrunk before the model sees it: objects would look
    smaller than in training, and the result would be wrong without any error. Refuse it and name the fix."""
    (th, tw), (ih, iw) = policy.tile_size, card.input_size
    if th > ih or tw > iw:
        factor = max(th / ih, tw / iw)
        raise InputError(
            f"tile {th}×{tw} is larger than the model input {ih}×{iw}: each crop would be shrunk {factor:.3g}× "
            f"and objects would look smaller than in training; keep the tile at most {ih}×{iw} and use "
            f"--scale {policy.scale / factor:.3g} to cover more of the image per crop instead"
        )
    if policy.neighbour_context and (card.task != "binary" or card.positive_index is None):
        raise InputError(
            f"neighbour context {policy.neighbour_context:g} blends a binary model's positive-class crops; this is a "
            f"{card.task} model: leave it at 0"
        )


class Model:
    """Thread-safe: it holds no per-call state and ONNX Runtime's ``run`` is thread-safe.

    ``crop`` overrides the card's crop policy (tile, stride, scale, padding,
    aggregation, foreground filter) for every call; ``refer_band`` marks
    binary results whose positive probability falls inside it as "refer", as
    the card's abstention rules (prediction sets, crop dispersion) do.
    On GPU devices the last tile batch of a stream is padded to ``batch_size``
    so the engine sees one shape and never re-tunes.

    ``quality`` "card" holds every image to the card's quality limits
    (``quality_limits`` overriding them by name) before the model sees it,
    and a failing image gets a "reject" (:mod:`edgedx.runtime.gate`):
    :func:`load_model`'s default, what an application gets. This
    constructor's default is "off", for the callers that must compare every
    image on two engines (export verification, training validation).
    ``um_per_px`` is the images' physical scale (else their TIFF tags).
    """

    def __init__(
        self,
        session: Session,
        *,
        batch_size: int = 32,
        crop: CropPolicy | Mapping[str, Any] | None = None,
        refer_band: tuple[float, float] | None = None,
        top_k: int = 3,
        pad_batches: bool | None = None,
        quality: str = "off",
        quality_limits: Mapping[str, Any] | None = None,
        um_per_px: float | None = None,
    ) -> None:
        settings = CheckedSettings.check(
            session.card, batch_size=batch_size, crop=crop, refer_band=refer_band, quality=quality, quality_limits=quality_limits,
            um_per_px=um_per_px,
        )
        self.session = session
        self.card = session.card
        self.verification: Any = None  # the self-test report when loaded with verify=True
        self.batch_size = batch_size
        self.crop = settings.crop
        self.refer_band = settings.refer_band
        self.gate = settings.gate
        self.top_k = max(1, min(top_k, self.card.n_classes))
        self.pad_batches = session.pads_batches if pad_batches is None else pad_batches
        # the engine with the card's test-time views (logits averaged; ``session.run`` itself when there are none):
        # every prediction goes through it once, while ``session`` stays the raw engine its self-test judges
        self.run = tta_run(session.run, self.card)

    def predict_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB crops → (N, C) probabilities (the card's test-time views averaged in)."""
        logits = self.run(model_input(tiles, self.card))
        return to_probabilities(logits, self.card)

    def predict_prepared(self, x: np.ndarray) -> np.ndarray:
        """A batch already preprocessed (:meth:`prepare`) → (N, C) probabilities (the card's test-time views averaged in)."""
        return to_probabilities(self.run(np.ascontiguousarray(x)), self.card)

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """The card's per-pixel preprocessing of a whole (H, W, 3) field or an (N, h, w, 3) batch of crops (the tiler
        preprocesses a field once and cuts its crops from that; see :func:`edgedx.runtime.preprocess.pixelwise`)."""
        return preprocess_field(pixels, self.card) if pixels.ndim == 3 else preprocess_batch(pixels, self.card)

    def diagnose(self, image: np.ndarray | str | Path, *, crop: CropPolicy | Mapping[str, Any] | None = None) -> Diagnosis:
        """Diagnose one whole image (path or RGB array) with sliding crops."""
        [(_, result)] = list(self.stream([(0, image)], crop=crop, prefetch=0))  # one image: no reader thread
        if isinstance(result, BaseException):
            raise result
        return result

    def diagnose_many(self, images: Iterable[np.ndarray | str | Path], *, crop: CropPolicy | Mapping[str, Any] | None = None, prefetch: int = 4) -> Iterator[Diagnosis]:
        """Diagnose a stream of images in order, tiles of several images sharing each model batch.

        Paths are decoded in a background thread while the model runs. The first
        unreadable image raises :class:`ImageReadError`; use :meth:`stream` to get
        errors as results instead.
        """
        for _, result in self.stream(enumerate(images), crop=crop, prefetch=prefetch):
            if isinstance(result, BaseException):
                raise result
            yield result

    def stream(
        self,
        items: Iterable[tuple[Hashable, np.ndarray | str | Path | ImageRegionSource | ResampledImage]],
        *,
        crop: CropPolicy | Mapping[str, Any] | None = None,
        prefetch: int = 4,
        live: bool = False,
    ) -> Iterator[tuple[Hashable, Diagnosis | EdgeDxError]]:
        """``(key, image)`` in → ``(key, Diagnosis or the ImageReadError)`` out, in order.

        ``live`` (a hot folder, a camera): each image's result comes out as soon
        as it is ready instead of when the next images fill the batch.
        """
        policy = resolve_crop(self.crop, crop)
        card = self.card
        if crop is not None:
            check_tile_fits(policy, card)  # a per-call tile larger than the input would shrink objects silently
        read_ms: dict[Hashable, float] = {}
        hashes: dict[Hashable, str | None] = {}
        names: dict[Hashable, str] = {}  # file inputs, to name them in a refusal
        opened: dict[Hashable, Any] = {}  # lazy sources opened here, closed when their image is done
        judged: dict[Hashable, Prepared] = {}  # each image's scale and quality, for its record

        def named() -> Iterator[tuple[Hashable, Any]]:
            for key, image in items:
                if isinstance(image, (str, Path)):
                    names[key] = str(image)
                yield key, image

        def decoded() -> Iterator[tuple[Hashable, Any]]:
            gate = partial(gate_image, card=card, policy=policy, settings=self.gate)
            for key, image, ms, digest in prefetched(named(), prefetch, gate):
                read_ms[key] = ms
                hashes[key] = digest
                if isinstance(image, Prepared):  # a rejected image goes through as an error: in order, never cut
                    judged[key], source, image = image, image.source, self._unless_rejected(image, policy, names.get(key))
                    if source is not None:
                        opened[key] = source
                elif hasattr(image, "close") and not isinstance(image, BaseException):
                    opened[key] = image
                yield key, image

        fieldwise = pixelwise(card, policy.tile_size)  # preprocess each field once, not every overlapping crop
        outcomes = sliding_window_many(
            decoded(), self.predict_prepared if fieldwise else self.predict_tiles, policy, batch_size=self.batch_size,
            activation=card.output_activation, positive_index=card.positive_index if card.task == "binary" else None,
            pad_batches=self.pad_batches, flush_each=live, prepare=self.prepare if fieldwise else None,
        )
        for outcome in outcomes:
            ms = read_ms.pop(outcome.key, 0.0)
            digest = hashes.pop(outcome.key, None)
            source = opened.pop(outcome.key, None)
            if source is not None:
                source.close()
            timings = {"read": round(ms, 2), "diagnose": round(outcome.seconds * 1000, 2)}
            result = self._result(outcome, judged.pop(outcome.key, None), names.pop(outcome.key, None), policy, timings)
            yield outcome.key, dataclasses.replace(result, input_sha256=digest) if digest and isinstance(result, Diagnosis) else result

    def _unless_rejected(self, seen: Prepared, policy: CropPolicy, name: str | None) -> Any:
        """What goes to the splitter: the prepared image, or in its place (in order, never cut) its rejection; an
        image that is nearly all padding is refused as it was before the gate existed (the content check first)."""
        if not seen.rejected:
            return seen.image
        assert seen.grid is not None
        n = seen.grid.n_tiles
        layout = CropLayout(seen.grid, np.ones(n, bool), np.ones(n), False)
        whole = SlidingResult(np.zeros(self.card.n_classes), np.zeros((n, self.card.n_classes)), seen.grid, content=content_fraction(layout))
        problem = self.content_problem(whole, policy.min_content)
        if problem is not None:
            return InsufficientContentError(f"{name}: {problem}" if name else problem)
        return _Rejected(seen)

    def _result(self, outcome: Any, seen: Prepared | None, name: str | None, policy: CropPolicy, timings: dict[str, float]) -> Diagnosis | EdgeDxError:
        """One image's outcome as a result: its rejection, its read error, a refusal (too little content), or its
        diagnosis with the scale and quality it was judged at."""
        if isinstance(outcome.error, _Rejected):
            return self.rejection(outcome.error.prepared, timings)
        if outcome.error is not None:
            return outcome.error
        problem = self.content_problem(outcome.result, policy.min_content)
        if problem is not None:
            return InsufficientContentError(f"{name}: {problem}" if name else problem)
        diagnosis = self.to_diagnosis(outcome.result, timings, prepared=seen, policy=policy)
        return diagnosis if seen is None else dataclasses.replace(diagnosis, quality=seen.quality, scale=seen.scale)

    def content_problem(self, sliding: SlidingResult, minimum: float | None = None) -> str | None:
        """Why no result should be given for this image, or None: crops that are nearly all padding, or an image
        enlarged so far that a crop holds almost none of its pixels, would give a confident answer from no content.
        ``minimum`` is the run's ``min_content`` (a per-call crop override included); default the model's."""
        minimum = self.crop.min_content if minimum is None else minimum
        if minimum <= 0:
            return None
        grid = sliding.grid
        (h, w), (th, tw) = grid.source_size, grid.tile
        covered = sliding.content
        if covered < minimum:
            return (
                f"the image ({w}×{h} px, {grid.width}×{grid.height} after resampling) fills {covered:.1%} of its {th}×{tw} crops, "
                f"the rest is padding; below the minimum {minimum:.0%}, a result would be a guess. "
                "Check the image (or --scale), or lower --min-content"
            )
        fy, fx = grid.factors
        if fy * fx > MAX_ENLARGEMENT ** 2:
            return (
                f"the image ({w}×{h} px) is enlarged {math.sqrt(fy * fx):.0f}× per side to fill its {th}×{tw} crops "
                f"(more than {MAX_ENLARGEMENT}×): a result would be a guess from a few pixels. Check the image, or lower --min-content to 0"
            )
        return None

    def to_diagnosis(
        self, sliding: SlidingResult, timings: dict[str, float], *, prepared: Prepared | None = None, policy: CropPolicy | None = None,
    ) -> Diagnosis:
        """Merged tiles → the decision, its refer reasons and top-k (shared by the local and Ray engines); with a
        detection-enabled card also the field's findings (``prepared``: the image the crops were cut from, for the cell
        count, and its physical scale factor, to put boxes in the file's pixels; ``policy``: the run's crop policy,
        default the model's), their milliseconds added to ``timings``."""
        card = self.card
        findings = None
        if card.detection.enabled:
            image, factor = (None, 1.0) if prepared is None else (prepared.image, float((prepared.scale or {}).get("factor") or 1.0))
            findings = find_on_field(card, policy or self.crop, sliding, image, image_factor=factor)
            timings = {**timings, **findings.timings_ms}
        probs = sliding.probabilities
        label = decide(probs, card)
        pset, dispersion, reasons = self.abstain(probs, sliding)
        rule = decision_rule(probs, card, label)
        decided_by = None
        if findings is not None and card.detection.fitted_on and card.task == "binary":
            label, rule, decided_by = field_rule_decision(card, findings, probs)
        if reasons:
            rule += "; " + "; ".join(reasons) + " → refer to a person"
        order = np.argsort(-probs, kind="stable")[: self.top_k]
        return Diagnosis(
            label=label,
            probabilities={n: round(float(p), 6) for n, p in zip(card.class_names, probs)},
            n_crops=sliding.n_used,
            sliding=sliding,
            decision=REFER if reasons else label,
            top_k=tuple((card.class_names[i], round(float(probs[i]), 6)) for i in order),
            timings_ms=timings,
            threshold=None if card.task == "multiclass" else (0.5 if card.threshold is None else card.threshold),
            rule=rule,
            prediction_set=pset,
            crop_dispersion=dispersion,
            refer_reasons=tuple(reasons),
            findings=findings,
            decided_by=decided_by,
        )

    def abstain(self, probs: np.ndarray, sliding: SlidingResult) -> tuple[tuple[str, ...] | None, float | None, list[str]]:
        """Why a result goes to a person instead of standing as a diagnosis: (the prediction set, the crops'
        dispersion, the reasons in words). A split-conformal set of other than one class (the card's ``qhat``: the
        model cannot tell at the promised coverage); crops whose calibrated probabilities of the positive class
        (another task: of any class) spread more than the card's limit; the run's refer band."""
        card, rules = self.card, self.card.abstention
        reasons: list[str] = []
        pset = None
        if rules.qhat is not None and card.task in ("binary", "multiclass"):
            pset = tuple(prediction_set(probs, rules.qhat, card.class_names))
            if len(pset) != 1:
                at = f"{rules.coverage * 100:g}% coverage" if rules.coverage is not None else f"qhat {rules.qhat:g}"
                reasons.append(f"prediction set {{{', '.join(pset)}}} at {at}")
        dispersion = None
        if rules.dispersion_limit is not None and sliding.n_used >= 2:
            used = np.ones(sliding.n_tiles, bool) if sliding.used is None else np.asarray(sliding.used, bool)
            index = card.positive_index if card.task == "binary" else None
            own = sliding.tile_probabilities if sliding.own_tile_probabilities is None else sliding.own_tile_probabilities  # the limit speaks of single crops
            dispersion = round(crop_dispersion(own[used], index), 6)
            if dispersion > rules.dispersion_limit:
                reasons.append(f"crops disagree: dispersion {dispersion:.3g} > limit {rules.dispersion_limit:.3g}")
        if self.refer_band is not None:  # the run's own band last: the rule ends with it, as before the card had rules
            p = float(probs[card.positive_index])  # type: ignore[index]
            if self.refer_band[0] <= p < self.refer_band[1]:
                reasons.append(f"inside the refer band [{self.refer_band[0]:g}, {self.refer_band[1]:g})")
        return pset, dispersion, reasons

    def rejection(self, seen: Prepared, timings: dict[str, float]) -> Diagnosis:
        """A rejected image's result: the gate's reasons and measures, no model output; its ``sliding`` is the grid
        the image would have had, every tile NaN and unused, so writers that draw or save maps still work."""
        n_classes, grid = self.card.n_classes, seen.grid
        assert grid is not None  # the gate keeps the grid of every image it rejects
        n = grid.n_tiles
        sliding = SlidingResult(np.full(n_classes, np.nan), np.full((n, n_classes), np.nan), grid, np.zeros(n, bool), np.ones(n), False, 0.0)
        return Diagnosis(
            label=None, probabilities={}, n_crops=0, sliding=sliding, decision=REJECT, timings_ms=timings,
            rule="image quality gate: " + "; ".join(seen.reasons) + " → reject (not diagnosed: take the image again)",
            reject_reasons=seen.reasons, quality=seen.quality, scale=seen.scale,
        )


class _Rejected(Exception):
    """Carries a rejected image through the splitter in its place, so results keep their order and no crop is cut."""

    def __init__(self, prepared: Prepared) -> None:
        super().__init__("; ".join(prepared.reasons))
        self.prepared = prepared


Gate = Callable[[Any, "str | Path | None"], Prepared]


def prefetched(
    items: Iterable[tuple[Hashable, Any]], depth: int, gate: Gate | None = None,
) -> Iterator[tuple[Hashable, Any, float, str | None]]:
    """Decode paths ``depth`` images ahead in one background thread, so reading overlaps inference.

    Yields ``(key, RGB array | lazy source | ImageReadError, read milliseconds,
    sha256 of the file bytes decoded or None)`` in input order; arrays are converted to RGB uint8. OpenCV and ONNX Runtime
    release the GIL, so the two really run at once. With ``gate`` (``gate(image, path)``, see
    :func:`edgedx.runtime.gate.prepare`) each image is scaled and judged in the same thread and comes out as its
    :class:`~edgedx.runtime.gate.Prepared`.
    """
    load = partial(_load, gate=gate)
    if depth < 1:
        for key, image in items:
            yield (key, *load(image))
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgedx-read") as pool:
        window: deque[tuple[Hashable, Future]] = deque()
        for key, image in items:
            window.append((key, pool.submit(load, image)))
            if len(window) > depth:
                k, future = window.popleft()
                yield (k, *future.result())
        while window:
            k, future = window.popleft()
            yield (k, *future.result())


def _load(image: Any, gate: Gate | None = None) -> tuple[Any, float, str | None]:
    started = time.perf_counter()
    digest = None
    try:
        if isinstance(image, (str, Path)):
            loaded: Any = open_source(image)
            if isinstance(loaded, ArraySource):
                digest = loaded.sha256
                loaded = loaded.image  # in memory anyway: resample once and slice (exact, fastest)
        elif isinstance(image, (ImageRegionSource, ResampledImage)):
            loaded = image
        elif isinstance(image, EdgeDxError):  # an input that failed upstream (a lost camera) keeps its error
            loaded = image
        else:
            loaded = to_rgb_uint8(np.asarray(image))
        if gate is not None and not isinstance(loaded, EdgeDxError):
            loaded = gate(loaded, image if isinstance(image, (str, Path)) else None)
    except ImageReadError as exc:
        loaded = exc
    return loaded, (time.perf_counter() - started) * 1000, digest


@dataclass(frozen=True)
class CheckedSettings:
    """A card's run settings after the user's overrides, checked: what a :class:`Model` runs with.

    Separate from :class:`Model` so a driver that holds no engine (Ray's, which
    only plans the work) checks the same rules without a stand-in session.
    """

    crop: CropPolicy
    refer_band: tuple[float, float] | None
    gate: GateSettings = field(default_factory=GateSettings)

    @classmethod
    def check(
        cls,
        card: ModelCard,
        *,
        batch_size: int = 32,
        crop: CropPolicy | Mapping[str, Any] | None = None,
        refer_band: tuple[float, float] | None = None,
        quality: str = "off",
        quality_limits: Mapping[str, Any] | None = None,
        um_per_px: float | None = None,
    ) -> CheckedSettings:
        if batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {batch_size}")
        policy = resolve_crop(card.crop, crop)
        check_tile_fits(policy, card)
        return cls(policy, check_refer_band(refer_band, card), GateSettings.check(card, quality, quality_limits, um_per_px))


MODEL_SUFFIXES = (".onnx", ".ort", *ENGINE_SUFFIXES)
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt")


def resolve_model_path(path: str | Path) -> Path:
    """What a user means by ``--model``: a file; an export folder (its ``model.onnx``, or its one model file); a
    bundled model's name (``isic_mel_nv``). A training checkpoint is refused with the export command."""
    path = Path(path)
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        raise InputError(
            f"{path} is a training checkpoint; the runtime runs exported models: edgedx export {path} --out EXPORT_DIR, "
            "then --model EXPORT_DIR/model.onnx"
        )
    if path.is_dir():
        if (path / "model.onnx").is_file():
            return path / "model.onnx"
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in MODEL_SUFFIXES and p.is_file())
        if len(found) == 1:
            return found[0]
        names = ", ".join(p.name for p in found) or "none"
        raise InputError(f"{path} is a folder with {len(found)} model files ({names}); name one with --model {path}/FILE")
    if not path.exists() and not path.suffix and len(path.parts) == 1:
        from edgedx.runtime.bundled import bundled_model_path

        return bundled_model_path(str(path))  # a bundled model by name, or an error listing them
    return path


def load_model(
    path: str | Path,
    *,
    device: str = "cpu",
    threads: int | None = None,
    batch_size: int = 32,
    crop: CropPolicy | Mapping[str, Any] | None = None,
    refer_band: tuple[float, float] | None = None,
    verify: bool = False,
    quality: str = "card",
    quality_limits: Mapping[str, Any] | None = None,
    um_per_px: float | None = None,
) -> Model:
    """Load an exported model, ready to diagnose.

    ``.onnx`` and ``.ort`` files run on ONNX Runtime with the card from their
    metadata; ``.engine``/``.plan`` files are TensorRT engines with the card in
    the sidecar JSON beside them (``device`` must then be tensorrt, cuda or auto).
    ``device="auto"`` measures the verified candidates (the export folder's
    files × the engines installed) and takes the fastest (:mod:`edgedx.runtime.auto`).
    ``verify`` replays the artefact's self-test vectors on this machine first
    and refuses one that does not reproduce its export (the report is kept in
    ``Model.verification``). ``quality`` "card" (the default) holds every image
    to the card's quality limits, ``quality_limits`` overriding them by name;
    "off" diagnoses every image. ``um_per_px`` is the images' physical scale
    (default: each file's TIFF resolution tags), see :mod:`edgedx.runtime.scale`.
    """
    resolved = resolve_model_path(path)
    if device == "auto" and not is_engine_file(resolved):
        from edgedx.runtime.auto import choose

        choice = choose(resolved, batch_size=min(batch_size, 32))  # the fastest verified file × engine here, said
        resolved, device = choice.path, choice.device
    session = open_session(resolved, device, threads=threads)
    try:
        model = Model(
            session, batch_size=batch_size, crop=crop, refer_band=refer_band, quality=quality, quality_limits=quality_limits,
            um_per_px=um_per_px,
        )
    except EdgeDxError:
        session.close()
        raise
    if verify:
        from edgedx.runtime.selftest import verify_session

        model.verification = verify_session(session)
    return model
