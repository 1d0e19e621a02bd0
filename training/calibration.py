"""The step after the epochs: what the best epoch's card says, fitted on validation through the deployed path.

The order matters and is fixed:

0. the image-quality limits from the training images (step 5 below), and with
   them the validation images the card's gate passes: ``diagnose`` never
   decides the others, so every later step fits and reports on these only
   (the rejected ones are named in metrics.json, ``quality_gate_on_val``);
1. validation crop logits, split and (later) merged per image as ``diagnose``
   does (:func:`edgedx.runtime.fitting.crop_logits`);
2. the temperature (``--calibrate temperature``; per label for multilabel),
   minimising the NLL of the merged image probabilities with the temperature
   applied to each crop's logits: the runtime applies it there too;
3. the operating threshold, by the existing rule, on the CALIBRATED
   probabilities: those are the numbers the deployed model compares with it;
4. the split-conformal ``qhat`` at ``--coverage`` (binary and multiclass) and
   the crop-dispersion limit (98th percentile of validation images with
   several crops);
5. image-quality limits from the training images at the model's scale
   (``--no-quality-gate`` leaves them out) and ``--um-per-px``.

Every figure from steps 2-4 was measured on the images it was fitted on, so
it is reported as "fitted on validation"; with a test split
(``--test-fraction``), the same figures on it are the result.
Cross-validation fits each fold on its own held-out fold: out-of-fold by
construction.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgedx.card import Abstention, CropPolicy, ModelCard, QualityLimits
from edgedx.errors import InputError
from edgedx.runtime.fitting import CropLogits, fit_abstention, fit_calibration, merged_probabilities, trust_figures
from edgedx.runtime.gate import GateSettings, prepare
from edgedx.runtime.io.image_io import to_rgb_uint8
from edgedx.runtime.quality import measure_at_model_scale, quality_limits
from edgedx.runtime.trust import T_RANGE
from edgedx.training.data import RunData
from edgedx.training.loop import Fitting
from edgedx.training.threshold import choose_threshold, operating_point, score
from edgedx.training.validation import resampled_crop_logits

log = logging.getLogger(__name__)

QUALITY_SAMPLE = 500  # training images decoded again and measured for the quality limits: percentiles need no more


@dataclass(frozen=True)
class FittedCard:
    """The final card (temperature, threshold, metrics, abstention, quality limits) and what it was fitted from."""

    card: ModelCard
    operating: dict[str, Any]  # :func:`edgedx.training.threshold.operating_point`'s result, on calibrated probabilities
    val_probs: np.ndarray  # calibrated, merged per image
    val_uncalibrated: np.ndarray  # the network's own, merged per image
    fitted: dict[str, Any]  # metrics.json's "calibration", "abstention" and "quality" sections
    warnings: tuple[str, ...] = ()  # fits the validation split was too small or too clean to make
    val_idx: np.ndarray | None = None  # the validation images fitted on: those the quality gate passes


def crop_logits_of(f: Fitting, idx: np.ndarray) -> CropLogits:
    """The crop logits of the images ``idx`` with the current weights (every rank computes all of them)."""
    return resampled_crop_logits(f.model, f.card, f.data.decoded.images, idx, batch_size=f.config.batch_size, device=f.ctx.device)


def fit_card(f: Fitting, epoch: int) -> FittedCard:
    """Steps 1-5 of the module docstring on the best epoch's weights (already loaded into ``f.model``), on the
    validation images the card's quality gate passes: ``diagnose`` never decides the others, so a figure that
    counted them would not be the deployed path's (the limits come from training images only)."""
    data, config = f.data, f.config
    quality = training_quality_limits(data, f.card.crop) if config.quality_gate else QualityLimits()
    gated, kept = gate_split(data, data.val_idx, f.card.replace(quality=quality))
    if not len(kept):
        raise InputError(f"the quality gate fitted on the training images rejects all {len(data.val_idx)} validation images "
                         f"(e.g. {gated[0]['reasons'][0]}): they are unlike the training images; check the split, or train with --no-quality-gate")
    y = data.targets[kept]
    val = crop_logits_of(f, kept)
    calibrated = fit_calibration(val, y, f.card, method=config.calibrate, split="val")
    card = f.card.replace(calibration=calibrated.calibration, quality=quality)
    operating = operating_point(y, calibrated.after, card, config.target_sensitivity)
    metrics = {"split": "val", "epoch": epoch, **operating["card_metrics"], "rejected_by_quality_gate": len(gated)}
    card = card.replace(threshold=operating["threshold"], metrics=metrics)
    choice, costly = choose_threshold(y, calibrated.after, card, config.target_sensitivity, source="validation", seed=config.seed)
    card = card.replace(threshold_choice=choice, abstention=fit_abstention(val, y, card, coverage=config.coverage, split="val"))
    fitted = {
        "calibration": {"method": card.calibration.method, "temperature": list(card.calibration.temperature), **card.calibration.fitted_on},
        "abstention": abstention_section(card.abstention),
        "quality_gate": config.quality_gate,
        "quality_gate_on_val": {"n": len(data.val_idx), "n_rejected": len(gated), "rejected": gated[:20]},
    }
    warnings = (*fit_warnings(card, len(val)), *gate_warning(gated, len(data.val_idx)), *costly)
    return FittedCard(card, operating, calibrated.after, calibrated.before, fitted, warnings, kept)


def gate_split(data: RunData, idx: np.ndarray, card: ModelCard) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The images ``idx`` the card's quality gate would reject (with why), judged by ``diagnose``'s own gate
    (:func:`edgedx.runtime.gate.prepare` on the decoded file), and the indices it passes. No limits on the card:
    none rejected."""
    settings = GateSettings.check(card)
    if not settings.on:
        return [], np.asarray(idx)
    source, rejected, passed = data.decoded.data, [], []
    for i in np.asarray(idx):
        reasons = list(prepare(_rgb(to_rgb_uint8(source.load(int(i)))), None, card, card.crop, settings).reasons)
        if reasons:
            rejected.append({"image": str(source.ids[int(i)]), "reasons": reasons})
        else:
            passed.append(int(i))
    return rejected, np.asarray(passed, dtype=np.asarray(idx).dtype)


def gate_warning(rejected: list[dict[str, Any]], n: int) -> tuple[str, ...]:
    """One warning when the gate rejects validation images: the card is fitted on the others, and says so."""
    if not rejected:
        return ()
    example = rejected[0]["reasons"][0]
    return (f"the card's quality gate rejects {len(rejected)} of {n} validation images (e.g. {example}); diagnose never decides "
            f"them, so the temperature, threshold, metrics and refer rules are fitted on the other {n - len(rejected)} "
            "(metrics.json quality_gate_on_val names them)",)


def fit_warnings(card: ModelCard, n: int) -> tuple[str, ...]:
    """What a reader must hear about the fit: a temperature at the edge of its search range (validation perfectly
    separated or too small: sharper and sharper always lowers its NLL) and too few images for the coverage asked."""
    warnings = []
    temps = card.calibration.temperature
    if any(t <= T_RANGE[0] * 1.001 or t >= T_RANGE[1] * 0.999 for t in temps):
        warnings.append(
            f"the temperature reached the edge of its search range ({', '.join(f'{t:g}' for t in temps)}): the {n} validation images are "
            "perfectly separated or too few to fit it, so the calibrated probabilities are not trustworthy; add validation images or "
            "train with --calibrate none"
        )
    coverage = card.abstention.coverage
    if card.abstention.qhat is not None and coverage is not None and card.abstention.qhat >= 1.0:
        needed = math.ceil(coverage / (1.0 - coverage) - 1e-9)
        warnings.append(
            f"{n} validation images are too few for {coverage:.0%} prediction sets (at least {needed} needed): every case would be "
            "referred; raise --val-fraction or lower --coverage"
        )
    return tuple(warnings)


def abstention_section(rule: Abstention) -> dict[str, Any]:
    """metrics.json's "abstention": the rule's values with where they were fitted."""
    return {"coverage": rule.coverage, "qhat": rule.qhat, "dispersion_limit": rule.dispersion_limit, **rule.fitted_on}


def training_quality_limits(data: RunData, policy: CropPolicy) -> QualityLimits:
    """Quality limits from the training images measured exactly as the runtime's gate measures them
    (:func:`measure_at_model_scale` on the decoded file: focus and blockiness need the file's own pixels, which
    training's resampled copies no longer have), at most :data:`QUALITY_SAMPLE` spread evenly over the split."""
    idx = data.train_idx
    if len(idx) > QUALITY_SAMPLE:
        idx = idx[np.linspace(0, len(idx) - 1, QUALITY_SAMPLE).round().astype(np.int64)]
    source = data.decoded.data
    return quality_limits([measure_at_model_scale(_rgb(to_rgb_uint8(source.load(int(i)))), policy) for i in idx])


def _rgb(pixels: np.ndarray) -> np.ndarray:
    """Three channels, as ``diagnose`` reads every image (a grey image is repeated)."""
    return np.repeat(pixels, 3, axis=2) if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels


def held_out(f: Fitting, card: ModelCard) -> dict[str, Any] | None:
    """The test split judged with the final card: its metrics at the card's threshold and, as the result the
    validation figures cannot be, ECE/Brier before → after, prediction-set coverage and refer rate."""
    if not len(f.data.test_idx):
        return None
    gated, idx = gate_split(f.data, f.data.test_idx, card)  # as diagnose would: a rejected image is not scored
    if not len(idx):
        return {"n": 0, "rejected_by_quality_gate": len(gated), "note": "the quality gate rejects every test image"}
    y = f.data.targets[idx]
    crops = crop_logits_of(f, idx)
    result = score(y, merged_probabilities(crops.logits, card), card, threshold=card.threshold)
    result["trust"] = trust_figures(crops, y, card)
    result["rejected_by_quality_gate"] = len(gated)
    return result


def trust_lines(fitted: dict[str, Any], test: dict[str, Any] | None) -> list[str]:
    """What the run log and the console say: temperature and ECE before → after (fitted on validation), the
    abstention rules, and on the test split the figures that count as a result."""
    cal, rule = fitted["calibration"], fitted["abstention"]
    lines = []
    if cal["method"] == "temperature":
        temps = ", ".join(f"{t:.3g}" for t in cal["temperature"])
        lines.append(
            f"calibration: temperature {temps}; ECE {cal['ece_before']:.3f} → {cal['ece_after']:.3f}, Brier {cal['brier_before']:.3f} → "
            f"{cal['brier_after']:.3f} (fitted on validation, n {cal['n']}: a description of the fit, not a result)"
        )
    else:
        lines.append("calibration: none (--calibrate none): probabilities are the network's own")
    if rule.get("qhat") is not None:
        lines.append(
            f"prediction sets for {rule['coverage']:.0%} coverage: qhat {rule['qhat']:.3f}; on validation coverage "
            f"{rule['coverage_on_val']:.3f}, refer rate {rule['refer_rate_on_val']:.3f} (fitted on validation)"
        )
    if rule.get("dispersion_limit") is not None:
        lines.append(f"crop-disagreement limit {rule['dispersion_limit']:.3f} (98th percentile of validation images with several crops)")
    trust = (test or {}).get("trust")
    if trust:
        line = f"held-out test split (n {trust['n']}), the result: ECE {trust['ece_before']:.3f} → {trust['ece_after']:.3f}"
        if trust.get("coverage") is not None:
            line += f", coverage {trust['coverage']:.3f} (target {trust['coverage_target']:.2f}), refer rate {trust['refer_rate']:.3f}"
        lines.append(line)
    return lines
