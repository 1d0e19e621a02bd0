"""Fitting a card's temperature and abstention rules on labelled images, through the path ``diagnose`` runs.

Why a module of its own: training fits on its validation split, a site
recalibration refits on a clinic's own labelled images, and ``evaluate`` and
the benchmarks report the same figures. All of them must merge crops exactly as
``diagnose`` does, or a temperature fitted here would be wrong there. Torch-free:
the model is any callable from model input to logits (a PyTorch model behind
``TorchSession.run``, an ONNX session's ``run``).

The order, each step on the output of the one before:

1. :func:`crop_logits`: every image is split by the card's crop policy (the
   runtime's own splitter and batcher, foreground filter included) and each
   predicted crop's raw logits are kept (averaged over the card's test-time
   views, :mod:`edgedx.runtime.tta`, as ``diagnose`` averages them). The model
   runs once per view.
2. :func:`merged_probabilities`: the image probabilities ``diagnose`` gives with a
   card: :func:`~edgedx.runtime.preprocess.to_probabilities` per crop (the card's
   temperature applied to the logits), merged by the crop policy's
   :func:`~edgedx.runtime.tiling.aggregate`. Cheap, so a temperature search
   recomputes it dozens of times.
3. :func:`fit_calibration`: the temperature(s) minimising the NLL of those merged
   probabilities, with ECE and Brier before (the network's own) and after.
4. (training chooses its operating threshold on the calibrated probabilities)
5. :func:`fit_abstention`: split-conformal ``qhat`` for a coverage, and the crop
   dispersion limit (a quantile over the images that have several crops).

Every figure this module stores comes from the images it was fitted on, so
``fitted_on`` names them: they describe the fit, they are not a result.
:func:`trust_figures` gives the same figures on other images (a test split).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.card import Abstention, Calibration, CropPolicy, ModelCard
from edgedx.errors import EdgeDxError, ImageReadError, InputError, InsufficientContentError
from edgedx.runtime.io.image_io import read_image, to_rgb_uint8
from edgedx.runtime.metrics import selective_metrics
from edgedx.runtime.neighbours import with_neighbour_context
from edgedx.runtime.preprocess import model_input, to_probabilities
from edgedx.runtime.tiling import ImageRegionSource, ResampledImage, SlidingResult, aggregate, sliding_window_many
from edgedx.runtime.tta import tta_run
from edgedx.runtime.trust import (
    brier_score,
    conformal_qhat,
    crop_dispersion,
    dispersion_limit,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    prediction_set,
)

DISPERSION_QUANTILE = 0.98  # about 2% of images like the fitting ones are referred for crop disagreement
_TINY = 1e-300


@dataclass(frozen=True)
class CropLogits:
    """Each image's raw crop logits, for the crops ``diagnose`` predicts and merges (skipped background crops left out).

    ``logits[i]`` is (crops, model outputs) for ``keys[i]``; ``failed`` holds the
    inputs ``diagnose`` would not answer, with their errors.
    """

    keys: tuple[Hashable, ...]
    logits: tuple[np.ndarray, ...]
    failed: tuple[tuple[Hashable, EdgeDxError], ...] = ()

    def __len__(self) -> int:
        return len(self.logits)

    def subset(self, rows: Sequence[int] | np.ndarray) -> CropLogits:
        """The images at ``rows`` (e.g. one half of a fit/report split)."""
        return CropLogits(tuple(self.keys[int(i)] for i in rows), tuple(self.logits[int(i)] for i in rows), self.failed)

    @property
    def n_crops(self) -> np.ndarray:
        """Crops merged per image (1 for a ``fit`` policy; more for sliding crops: the dispersion rule needs 2+)."""
        return np.asarray([len(z) for z in self.logits], np.int64)


def crop_logits(
    run: Callable[[np.ndarray], np.ndarray], card: ModelCard, images: Iterable[tuple[Hashable, Any]], *,
    batch_size: int = 32, policy: CropPolicy | None = None,
) -> CropLogits:
    """Split every image by ``policy`` (default the card's) and keep each predicted crop's logits from ``run``.

    ``images`` yields ``(key, image)``: a path, an RGB array, a
    :class:`~edgedx.runtime.tiling.ResampledImage` (training's decoded images)
    or a lazy region source. The runtime's splitter and batcher carry the rows
    ``run`` returns into each image's grid; here those rows are logits, so
    nothing is merged yet. An image whose crops are mostly padding (below the
    policy's ``min_content``) is refused as ``diagnose`` refuses it. ``run`` is
    the raw engine: the card's test-time views are averaged in here
    (:func:`~edgedx.runtime.tta.tta_run`, as :class:`~edgedx.runtime.model.Model`
    does), so the logits fitted on are the ones ``diagnose`` turns into probabilities.
    """
    policy = card.crop if policy is None else policy
    refuse_blended(policy)
    carrier = dataclasses.replace(policy, aggregation="mean")  # the splitter's merge of logit rows is discarded
    engine = tta_run(run, card)

    def predict(tiles: np.ndarray) -> np.ndarray:
        return np.asarray(engine(model_input(tiles, card)), np.float64)

    keys: list[Hashable] = []
    logits: list[np.ndarray] = []
    failed: list[tuple[Hashable, EdgeDxError]] = []
    for outcome in sliding_window_many(_readable(images), predict, carrier, batch_size=batch_size, activation="sigmoid"):
        if outcome.error is not None or outcome.result is None:
            error = outcome.error
            failed.append((outcome.key, error if isinstance(error, EdgeDxError) else ImageReadError(str(error))))
        elif policy.min_content > 0 and outcome.result.content < policy.min_content:
            failed.append((outcome.key, InsufficientContentError(
                f"{outcome.key}: its crops are {outcome.result.content:.1%} image, below the minimum {policy.min_content:.0%}")))
        else:
            keys.append(outcome.key)
            logits.append(used_rows(outcome.result))
    return CropLogits(tuple(keys), tuple(logits), tuple(failed))


def refuse_blended(policy: CropPolicy) -> None:
    """The per-crop fits (temperature, abstention, thresholds) re-merge single crops' outputs, which cannot reproduce a
    merge of crops blended with their neighbours: refuse such a card and name the order that works."""
    if policy.neighbour_context:
        raise InputError(
            f"this card blends each crop with its neighbours (crop.neighbour_context {policy.neighbour_context:g}), which the "
            "per-crop fits (temperature, abstention, thresholds) cannot reproduce from single crops: fit them on the model "
            "before edgedx fit-fields set the blend, then run fit-fields again"
        )


def _readable(images: Iterable[tuple[Hashable, Any]]) -> Iterator[tuple[Hashable, Any]]:
    """``(key, image the splitter takes or the ImageReadError)``: paths decoded, arrays made RGB uint8."""
    for key, image in images:
        try:
            if isinstance(image, (str, Path)):
                yield key, read_image(image)
            elif isinstance(image, (ResampledImage, ImageRegionSource, BaseException)):
                yield key, image
            else:
                yield key, to_rgb_uint8(np.asarray(image))
        except ImageReadError as exc:
            yield key, exc


def used_rows(sliding: SlidingResult) -> np.ndarray:
    """The rows of the crops that were predicted and merged (background crops skipped by the foreground filter are not)."""
    rows = sliding.tile_probabilities
    return rows if sliding.used is None else rows[np.asarray(sliding.used, bool)]


def merged_probabilities(logits: Sequence[np.ndarray], card: ModelCard, policy: CropPolicy | None = None) -> np.ndarray:
    """(n, C) image probabilities exactly as ``diagnose`` computes them with ``card`` (its temperature included):
    ``to_probabilities`` on the crop logits (row by row, as on a model batch), then the crop policy's merge.

    A single crop merged by ``mean`` is its own row (the mean of one value is
    that value), so it skips the call; every other image goes through
    :func:`~edgedx.runtime.tiling.aggregate`.
    """
    policy = card.crop if policy is None else policy
    if not len(logits):
        return np.zeros((0, card.n_classes))
    positive = card.positive_index if card.task == "binary" else None
    counts = np.asarray([len(z) for z in logits])
    crops = to_probabilities(np.concatenate(logits), card)
    if policy.aggregation == "mean" and (counts == 1).all():
        return crops
    rows = [
        part[0] if len(part) == 1 and policy.aggregation == "mean"
        else aggregate(part, policy, activation=card.output_activation, positive_index=positive)
        for part in np.split(crops, np.cumsum(counts)[:-1])
    ]
    return np.stack(rows)


def raw_card(card: ModelCard) -> ModelCard:
    """The card without its temperature: probabilities as the network gives them ("before")."""
    return card if card.calibration.method == "none" else card.replace(calibration=Calibration())


def with_temperature(card: ModelCard, temperature: Sequence[float], fitted_on: dict[str, Any] | None = None) -> ModelCard:
    """The card dividing logits by ``temperature`` (one value, or one per label for multilabel)."""
    return card.replace(calibration=Calibration("temperature", tuple(float(t) for t in temperature), dict(fitted_on or {})))


def calibration_figures(before: np.ndarray, after: np.ndarray, labels: np.ndarray, card: ModelCard) -> dict[str, float]:
    """ECE (10 equal-width bins), Brier and NLL of the network's own probabilities and of the calibrated ones."""
    task, pos = card.task, card.positive_index
    return {
        "ece_before": round(expected_calibration_error(before, labels, task, pos), 5),
        "ece_after": round(expected_calibration_error(after, labels, task, pos), 5),
        "brier_before": round(brier_score(before, labels, task), 5),
        "brier_after": round(brier_score(after, labels, task), 5),
        "nll_before": round(negative_log_likelihood(before, labels, task), 5),
        "nll_after": round(negative_log_likelihood(after, labels, task), 5),
    }


@dataclass(frozen=True)
class Calibrated:
    """A fitted calibration and the merged probabilities before (the network's own) and after it."""

    calibration: Calibration
    before: np.ndarray
    after: np.ndarray


def fit_calibration(
    crops: CropLogits, labels: np.ndarray, card: ModelCard, *, method: str = "temperature", split: str = "val",
    policy: CropPolicy | None = None,
) -> Calibrated:
    """Fit the temperature on ``crops`` (class indices, or (n, C) 0/1 for multilabel) through the deployed merge.

    ``method`` "none" leaves the card uncalibrated (``Calibration()``). ``split``
    names the images in ``fitted_on``; its ECE and Brier figures are the fit's,
    measured on the images it was fitted on.
    """
    base = raw_card(card)
    before = merged_probabilities(crops.logits, base, policy)
    if method == "none":
        return Calibrated(Calibration(), before, before)
    if method != "temperature":
        raise ValueError(f"unknown calibration method {method!r}; choose temperature or none")

    def probabilities_at(temperature: tuple[float, ...]) -> np.ndarray:
        return merged_probabilities(crops.logits, with_temperature(base, temperature), policy)

    temperature = fit_temperature(probabilities_at, labels, card.task, card.n_classes)
    after = probabilities_at(temperature)
    merged_by = (policy or card.crop).aggregation
    fitted_on = {"split": split, "n": len(crops), "merged_by": merged_by, **calibration_figures(before, after, labels, card)}
    return Calibrated(Calibration("temperature", temperature, fitted_on), before, after)


def dispersion_index(card: ModelCard) -> int | None:
    """Which class's crop probabilities the dispersion rule watches: the positive class of a binary model, else
    the class whose crops disagree most (see :func:`~edgedx.runtime.trust.crop_dispersion`)."""
    return card.positive_index if card.task == "binary" else None


def crop_dispersions(crops: CropLogits | Sequence[np.ndarray], card: ModelCard) -> np.ndarray:
    """Each image's crop dispersion with ``card``'s calibrated crop probabilities; NaN for a single-crop image,
    which cannot disagree with itself and must not pull the limit down."""
    index = dispersion_index(card)
    logits = crops.logits if isinstance(crops, CropLogits) else crops
    return np.asarray([crop_dispersion(to_probabilities(z, card), index) if len(z) > 1 else np.nan for z in logits], np.float64)


def fit_abstention(
    crops: CropLogits, labels: np.ndarray, card: ModelCard, *, coverage: float = 0.95, quantile: float = DISPERSION_QUANTILE,
    split: str = "val", policy: CropPolicy | None = None,
) -> Abstention:
    """Split-conformal ``qhat`` for ``coverage`` on ``card``'s (calibrated) merged probabilities, and the crop
    dispersion limit at ``quantile`` of the images with several crops (None when every image is one crop).

    Multilabel models get no prediction sets (a set per label is not one set of
    classes), which ``fitted_on`` states; their dispersion rule still applies.
    """
    probs = merged_probabilities(crops.logits, card, policy)
    dispersions = crop_dispersions(crops, card)
    several = dispersions[np.isfinite(dispersions)]
    limit = dispersion_limit(several, quantile) if several.size else None
    fitted_on: dict[str, Any] = {"split": split, "n": len(crops), "n_several_crops": int(several.size), "dispersion_quantile": quantile}
    if limit is None:
        fitted_on["dispersion"] = "every image is one crop: no crop-disagreement rule"
    if card.task == "multilabel":
        fitted_on["prediction_sets"] = "none for multilabel models: each label is its own decision"
        return Abstention(None, None, None if limit is None else round(limit, 6), fitted_on)
    qhat = round(conformal_qhat(probs, labels, coverage), 6)
    fitted = card.replace(abstention=Abstention(coverage, qhat, limit))
    figures, _ = abstention_figures(probs, labels, dispersions, fitted)
    fitted_on.update({f"{k}_on_{split}": v for k, v in figures.items()})
    return Abstention(coverage, qhat, None if limit is None else round(limit, 6), fitted_on)


def abstention_figures(
    probs: np.ndarray, labels: np.ndarray, dispersions: np.ndarray, card: ModelCard
) -> tuple[dict[str, Any], np.ndarray]:
    """Coverage of the card's prediction sets (share holding the true class), their mean size and the share
    referred (a set of other than one class, or crop dispersion above the limit); and which images were referred."""
    rule = card.abstention
    referred = np.zeros(len(probs), bool)
    figures: dict[str, Any] = {}
    if rule.qhat is not None and len(probs):
        sets = [prediction_set(p, rule.qhat, card.class_names) for p in probs]
        truth = [card.class_names[int(y)] for y in labels]
        figures["coverage"] = round(float(np.mean([t in s for t, s in zip(truth, sets)])), 5)
        figures["mean_set_size"] = round(float(np.mean([len(s) for s in sets])), 4)
        referred |= np.asarray([len(s) != 1 for s in sets], bool)
    if rule.dispersion_limit is not None:
        referred |= np.nan_to_num(dispersions, nan=0.0) > rule.dispersion_limit
    figures["refer_rate"] = round(float(referred.mean()), 5) if len(referred) else None
    return figures, referred


def trust_figures(crops: CropLogits, labels: np.ndarray, card: ModelCard, *, policy: CropPolicy | None = None) -> dict[str, Any]:
    """The fitted card judged on other images (a test split, a report half): ECE/Brier before → after, coverage of
    the prediction sets, refer rate, and accuracy (sensitivity, specificity) on the cases not referred vs all."""
    from edgedx.runtime.model import decide

    before = merged_probabilities(crops.logits, raw_card(card), policy)
    after = merged_probabilities(crops.logits, card, policy)
    figures: dict[str, Any] = {"n": len(crops), **calibration_figures(before, after, labels, card)}
    if card.task == "multilabel":
        return figures
    abstained, referred = abstention_figures(after, labels, crop_dispersions(crops, card), card)
    figures.update(abstained)
    figures["coverage_target"] = card.abstention.coverage
    predicted = np.asarray([card.class_names.index(decide(p, card)) for p in after])  # type: ignore[arg-type]
    figures.update(selective_metrics(np.asarray(labels, int), predicted, ~referred, positive_index=card.positive_index))
    return figures


def undo_temperature(tile_probabilities: np.ndarray, card: ModelCard) -> np.ndarray:
    """Crop probabilities as the network gives them, from the calibrated ones a diagnosis holds.

    Why: ``evaluate`` sees only what ``diagnose`` produced, and its "before"
    figures need the network's own probabilities. softmax(T·log p) is the
    softmax of the logits (log p differs from logits/T by a constant per crop);
    for a sigmoid, T·logit(p) is the logit. A binary sigmoid model is taken to
    have one output, the positive class's.
    """
    p = np.asarray(tile_probabilities, np.float64)
    if card.calibration.method != "temperature":
        return p
    t = np.asarray(card.calibration.temperature, np.float64)
    if card.output_activation == "softmax":
        return to_probabilities(np.log(np.maximum(p, _TINY)) * t, card, calibrated=False)
    if card.task == "binary":
        p = p[:, [card.positive_index]]
    q = np.clip(p, _TINY, 1.0 - 1e-16)
    return to_probabilities((np.log(q) - np.log1p(-q)) * t, card, calibrated=False)


def uncalibrated(sliding: SlidingResult, card: ModelCard, policy: CropPolicy | None = None) -> np.ndarray:
    """A diagnosis's merged probabilities without the card's temperature, merged by the same policy."""
    if card.calibration.method != "temperature":
        return np.asarray(sliding.probabilities, np.float64)
    policy = card.crop if policy is None else policy
    positive = card.positive_index if card.task == "binary" else None
    if sliding.own_tile_probabilities is None or positive is None:
        return aggregate(undo_temperature(used_rows(sliding), card), policy, activation=card.output_activation, positive_index=positive)
    # blended crops: undo the temperature on each crop's own answer, then blend and merge as diagnose did
    used = np.ones(sliding.n_tiles, bool) if sliding.used is None else np.asarray(sliding.used, bool)
    own = np.full_like(sliding.own_tile_probabilities, np.nan)
    own[used] = undo_temperature(sliding.own_tile_probabilities[used], card)
    blended = with_neighbour_context(own, sliding.grid.shape, policy.neighbour_context, positive)
    return aggregate(blended[used], policy, activation=card.output_activation, positive_index=positive)
