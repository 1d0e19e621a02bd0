"""Site recalibration: refit an exported model's temperature, operating threshold and abstention on local cases.

Why: a model validated on one lab's images meets another lab's stain, camera
and illumination. Its ranking of cases usually survives such a shift better
than its probability scale does, so a threshold chosen for 95% sensitivity at
home can miss positives at a new site while the AUC barely moves. 50–500
labelled local cases are enough to put the operating point back where the
card says it is, without retraining: the network (graph and weights) is
untouched; only the card (temperature, threshold, conformal qhat, crop
dispersion limit) and the self-test vectors' reference change, in a **new**
file whose ``provenance.lineage`` names its parent by sha256. The parent stays
byte-identical.

Everything is measured through the deployed path: each site image goes
through ``Model.stream`` (the card's crop policy, preprocessing and merge),
and the crops' uncalibrated outputs are recovered from the probabilities it
gives (:func:`raw_logits`), so refitting the temperature re-merges exactly as
``diagnose`` will with the new card. The threshold is chosen by the rule
training uses (:func:`edgedx.training.threshold.margin_threshold`) for the
card's target sensitivity.

Honesty: the new values are fitted on the site data. With ``holdout`` (default
0.3 when there are at least 100 cases) they are fitted on the rest and the old
and new operating points are reported on the held-out cases only; with fewer
cases both are reported on the cases they were fitted on, and the report says so.

Self-test vectors: their reference probabilities came from the fp32 PyTorch
model through the old card, and this step has no PyTorch. Recomputing them
from the file's own outputs would hide an fp16/int8 file's rounding, so they
are *converted* instead: temperature is a per-model rescaling of the logits
applied before the activation, so the reference logits are recovered from the
stored probabilities (softmax: ``log p``, which differs from the logits by a
constant per row that softmax ignores; sigmoid: the logit, from both columns
of a one-output binary model) and the activation is applied again at the new
temperature: ``p' = softmax(log p · T_old / T_new)``. This is exact up to the
float32 rounding of the stored values; the int8 files' exact-arithmetic
probabilities are converted the same way. The new file must then pass its own
self-test (``edgedx verify``) here, or it is removed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

import edgedx
from edgedx.card import ONNX_METADATA_KEY, Abstention, Calibration, CropPolicy, ModelCard, now_iso, sidecar_path
from edgedx.errors import EdgeDxError, InputError, ModelError
from edgedx.export.onnx_export import embed_metadata
from edgedx.export.sidecar import write_card_sidecar
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.evaluate import proportion_counts, score, wilson_interval
from edgedx.runtime.io.integrity import atomic_path, atomic_write_bytes, checksum_path, sha256_file, write_checksum
from edgedx.runtime.io.labelled import load_labelled
from edgedx.runtime.io.manifest import ManifestLayout
from edgedx.runtime.model import Model, load_model, resolve_model_path
from edgedx.runtime.preprocess import model_input, to_probabilities
from edgedx.runtime.selftest import SELFTEST_KEY, SelfTestReport, SelfTestVectors, verify_artefact
from edgedx.runtime.fitting import crop_dispersions, merged_probabilities, refuse_blended, with_temperature
from edgedx.runtime.trust import (
    T_RANGE, brier_score, conformal_qhat, dispersion_limit, expected_calibration_error, fit_temperature,
    prediction_set,
)
from edgedx.training.threshold import margin_threshold

log = logging.getLogger(__name__)

MIN_CASES = 50  # fewer labelled cases cannot place a threshold or a temperature usefully
DEFAULT_HOLDOUT = 0.3
HOLDOUT_FROM = 100  # below this many cases everything goes to fitting (default)
DEFAULT_TARGET = 0.95  # training's default target sensitivity, for cards that record none
FEW_POSITIVES = 20  # below this many positive fitting cases the threshold moves in coarse steps
REPORT_NAME = "recalibration_report.json"
SAME_CASES = "fitted and reported on the same cases"
DISPERSION_QUANTILE = 0.98  # training's: about 2% of multi-crop images like the fitting ones are referred
_TINY = 1e-300  # log of a probability that underflowed: far below anything a temperature brings back


@dataclass(frozen=True)
class RecalibrateOptions:
    """Every choice of a recalibration, validated once.

    ``holdout``: share of the cases held out to report the operating points on
    (None: 0.3 from 100 cases, else 0). ``target_sensitivity`` / ``coverage`` /
    ``dispersion_quantile`` (the share of multi-crop site images the refitted
    crop-disagreement limit keeps; only for cards that have a limit): None
    takes the card's.
    ``site`` names the site in the output file (default: the data's name);
    ``name`` is the whole output file name. ``split``/``layout``: which rows of
    a CSV manifest and how it names its columns (as ``evaluate``).
    """

    holdout: float | None = None
    target_sensitivity: float | None = None
    coverage: float | None = None
    dispersion_quantile: float | None = None
    site: str | None = None
    name: str | None = None
    split: str = "all"
    layout: ManifestLayout = ManifestLayout()
    device: str = "cpu"
    batch_size: int = 32
    bootstrap: int = 1000
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.holdout is not None and not 0.0 <= self.holdout < 1.0:
            raise InputError(f"--holdout must be within [0, 1) (a share of the site cases held out for reporting), got {self.holdout:g}")
        if self.target_sensitivity is not None and not 0.0 < self.target_sensitivity <= 1.0:
            raise InputError(f"--target-sensitivity must be within (0, 1], got {self.target_sensitivity:g}")
        if self.coverage is not None and not 0.0 < self.coverage < 1.0:
            raise InputError(f"--coverage must be within (0, 1), got {self.coverage:g}")
        if self.dispersion_quantile is not None and not 0.0 < self.dispersion_quantile <= 1.0:
            raise InputError(f"dispersion quantile must be within (0, 1], got {self.dispersion_quantile:g}")
        if self.batch_size < 1 or self.bootstrap < 0:
            raise InputError(f"batch size must be ≥ 1 and bootstrap ≥ 0, got {self.batch_size} and {self.bootstrap}")
        if self.name is not None and (not self.name.endswith(".onnx") or any(c in self.name for c in "/\\")):
            raise InputError(f"--name {self.name!r} must be a file name ending in .onnx (it is written inside OUT)")


@dataclass(frozen=True)
class SiteOutputs:
    """The local cases as the deployed path saw them: each readable image's crop logits (uncalibrated) and label."""

    names: list[str]
    labels: np.ndarray  # (N,) indices into the model's class names
    logits: list[np.ndarray]  # per image: (used crops, outputs) raw network outputs, as the graph gives them
    width: int  # outputs per crop (1 for a one-logit binary sigmoid graph)
    failed: list[str]
    rejected: list[str]  # refused by the runtime's quality gate: deployment would not diagnose them either
    source: str


@dataclass(frozen=True)
class Refit:
    """The values fitted on the site cases (None: the card has no such rule)."""

    temperature: tuple[float, ...]
    threshold: float | None
    target_sensitivity: float | None
    coverage: float | None
    qhat: float | None
    dispersion_limit: float | None
    dispersion_quantile: float | None = None


@dataclass(frozen=True)
class RecalibrationReport:
    """What :func:`recalibrate` wrote and measured: old against new on the site data, with 95% intervals."""

    parent: str
    parent_sha256: str
    output: str
    output_sha256: str
    report_path: str
    site: dict[str, Any]
    fitted_on: int
    evaluated_on: int
    holdout: float
    note: str
    old: dict[str, Any]
    new: dict[str, Any]
    operating_points: dict[str, Any]
    abstention: dict[str, Any]
    selftest: dict[str, Any]
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "warnings": list(self.warnings)}


def recalibrate(
    model_path: str | Path, site_data: str | Path, out: str | Path, options: RecalibrateOptions = RecalibrateOptions(),
    *, progress: ProgressFn = no_progress,
) -> RecalibrationReport:
    """Refit ``model_path``'s card on the labelled ``site_data`` and write a new artefact in ``out``.

    ``site_data`` is what ``evaluate`` reads: a folder with one sub-folder per
    class, or a CSV manifest. Refuses fewer than 50 readable cases, classes the
    model does not know, and a binary site set without positive fitting cases.
    Writes ``out/<stem>.<site>.onnx`` (with its ``.sha256`` and card sidecar)
    and ``out/recalibration_report.json``; the parent file is never written.
    """
    parent = resolve_model_path(model_path)
    if parent.suffix.lower() != ".onnx":
        raise InputError(
            f"recalibrate rewrites an ONNX file's card; {parent.name} is not one: recalibrate the export's .onnx, "
            "then convert the new file (edgedx export converts from a checkpoint only; use the .onnx directly)"
        )
    target = output_path(parent, site_data, Path(out), options)
    model = load_model(parent, device=options.device, batch_size=options.batch_size)
    card = model.card
    if card.task == "multilabel":
        raise InputError("recalibrate needs a binary or multiclass model; this card is multilabel")
    refuse_blended(card.crop)
    site = site_outputs(model, site_data, options, progress)
    holdout = checked_holdout(site, options)
    fit, held = split_cases(site.labels, holdout, options.seed)
    check_fit_cases(card, site, fit)
    refit, warnings = refit_card(card, site, fit, options)
    evaluated = held if len(held) else fit
    points, abstention = compare(card, refit, site, evaluated, options)
    entry = lineage_entry(parent, model.session.sha256, card, refit, site, fit, held)
    new_card = recalibrated_card(card, refit, entry, points, abstention, site, evaluated)
    write_artefact(parent, target, new_card, card, site.width)
    selftest = verify_new(target, parent, options.device)
    note = reporting_note(len(fit), len(held))
    warnings += site_warnings(site, card, fit, held)
    report_path = Path(out) / REPORT_NAME
    report = RecalibrationReport(
        str(parent), model.session.sha256, str(target), sha256_file(target), str(report_path), entry["site_data"],
        len(fit), len(evaluated), holdout, note, entry["old"], entry["new"], points, abstention, selftest.to_dict(), tuple(warnings),
    )
    atomic_write_bytes(report_path, (json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n").encode("utf-8"))
    log.info("recalibrated %s on %d site cases → %s (%s)", parent.name, len(site.labels), target, note)
    return report


def output_path(parent: Path, site_data: str | Path, out: Path, options: RecalibrateOptions) -> Path:
    """``out/<parent stem>.<site>.onnx`` (or ``options.name``); never the parent, never an existing file unasked."""
    site = options.site or Path(site_data).stem
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", site).strip("-") or "site"
    target = out / (options.name or f"{parent.stem}.{slug}.onnx")
    if target.resolve() == parent.resolve():
        raise InputError(f"the recalibrated model would overwrite {parent}: the parent is kept unchanged; choose another --name or OUT")
    if target.exists() and not options.overwrite:
        raise InputError(f"{target} already exists; pass --overwrite to replace it, or choose another --name or OUT")
    return target


def site_outputs(model: Model, site_data: str | Path, options: RecalibrateOptions, progress: ProgressFn) -> SiteOutputs:
    """Every site image through ``model.stream`` (the deployed crops, preprocessing and merge), kept as crop logits."""
    card = model.card
    labelled = load_labelled(site_data, card.class_names, split=options.split, layout=options.layout)
    width = output_width(model)
    names: list[str] = []
    labels: list[int] = []
    logits: list[np.ndarray] = []
    failed: list[str] = []
    rejected: list[str] = []
    progress("recalibrate", 0, len(labelled))
    for done, (i, result) in enumerate(model.stream(enumerate(labelled.images)), 1):
        if isinstance(result, EdgeDxError):
            failed.append(str(result))
        elif getattr(result, "decision", None) == "reject":
            rejected.append(labelled.names[i])
        else:
            sliding = result.sliding
            used = sliding.tile_probabilities if sliding.used is None else sliding.tile_probabilities[sliding.used]
            names.append(labelled.names[i])
            labels.append(int(labelled.labels[i]))
            logits.append(raw_logits(used, card, width))
        progress("recalibrate", done, len(labelled))
    return SiteOutputs(names, np.asarray(labels, np.int64), logits, width, failed, rejected, labelled.source)


def output_width(model: Model) -> int:
    """How many numbers the graph gives per crop (a binary sigmoid graph may give one): one blank crop, run once."""
    h, w = model.card.input_size
    outputs = np.asarray(model.session.run(model_input(np.zeros((1, h, w, 3), np.uint8), model.card)))
    return int(outputs.reshape(1, -1).shape[1])


def temperature_of(card: ModelCard) -> np.ndarray:
    """The card's temperature(s) as the divisor :func:`to_probabilities` uses (1 when uncalibrated)."""
    if card.calibration.method == "temperature":
        return np.asarray(card.calibration.temperature, np.float64)
    return np.ones(1)


def raw_logits(probabilities: np.ndarray, card: ModelCard, width: int) -> np.ndarray:
    """The network outputs behind probabilities ``card`` produced, up to what its activation ignores.

    softmax: ``log p`` (the logits less one constant per row, which softmax
    ignores); a one-output binary sigmoid: ``log p(pos) − log p(neg)`` from both
    columns (exact wherever 1 − p is representable, not only p); other sigmoids:
    each column's logit. Multiplied by the card's temperature, undoing it.
    """
    p = np.clip(np.asarray(probabilities, np.float64), _TINY, 1.0)
    if card.output_activation == "softmax":
        z = np.log(p)
    elif width == 1:
        pos = 1 if card.positive_index is None else card.positive_index
        z = (np.log(p[:, pos]) - np.log(p[:, 1 - pos]))[:, None]
    else:
        z = np.log(p) - np.log(np.clip(1.0 - p, _TINY, 1.0))
    return z * temperature_of(card)


def image_probabilities(logits: list[np.ndarray], card: ModelCard, policy: CropPolicy, temperature: Sequence[float]) -> np.ndarray:
    """(N, C) merged probabilities as ``diagnose`` computes them with ``temperature`` in the card."""
    return merged_probabilities(logits, with_temperature(card, temperature), policy)


def dispersions(logits: list[np.ndarray], card: ModelCard, temperature: Sequence[float]) -> np.ndarray:
    """Each image's crop disagreement at ``temperature`` (NaN for a one-crop image, as training fits the limit)."""
    return crop_dispersions(logits, with_temperature(card, temperature))


def checked_holdout(site: SiteOutputs, options: RecalibrateOptions) -> float:
    """The holdout share to use, after refusing too few cases (naming the count and the fix)."""
    n = len(site.labels)
    lost = f" ({len(site.failed)} unreadable, {len(site.rejected)} refused by the quality gate)" if site.failed or site.rejected else ""
    if n < MIN_CASES:
        raise InputError(
            f"{site.source} gives {n} usable labelled case(s){lost}; recalibration needs at least {MIN_CASES} "
            f"(100 or more to also report on held-out cases): add labelled local cases, one sub-folder per class"
        )
    holdout = options.holdout if options.holdout is not None else (DEFAULT_HOLDOUT if n >= HOLDOUT_FROM else 0.0)
    n_fit = n - round(n * holdout)
    if n_fit < MIN_CASES or (holdout > 0 and round(n * holdout) < 1):
        raise InputError(
            f"--holdout {holdout:g} of {n} cases leaves {n_fit} to fit on and {round(n * holdout)} to report on; fitting needs at "
            f"least {MIN_CASES} and a holdout at least one: use a smaller --holdout (0: {SAME_CASES}) or add cases"
        )
    return holdout


def split_cases(labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) indices, stratified by class so both parts hold every class in the site's proportions."""
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        held.extend(members[: round(len(members) * holdout)].tolist())
    mask = np.zeros(len(labels), bool)
    mask[held] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def check_fit_cases(card: ModelCard, site: SiteOutputs, fit: np.ndarray) -> None:
    """A threshold for a sensitivity needs positive cases, and a temperature needs more than one class."""
    present = set(site.labels[fit].tolist())
    if card.task == "binary" and card.positive_index not in present:
        raise InputError(
            f"none of the {len(fit)} fitting cases is {card.positive_class!r}: no threshold can reach a sensitivity "
            f"without positive cases; add labelled {card.positive_class} cases to {site.source}"
        )
    if len(present) < 2:
        raise InputError(f"every fitting case in {site.source} is one class; recalibration needs cases of at least two classes")


def target_sensitivity(card: ModelCard, options: RecalibrateOptions) -> tuple[float, str]:
    """The sensitivity the card's threshold was chosen for (metrics, then the training options), and where it came from."""
    if options.target_sensitivity is not None:
        return float(options.target_sensitivity), "given"
    for where, source in (("card metrics", card.metrics), ("training options", card.provenance.training)):
        value = source.get("target_sensitivity")
        if isinstance(value, (int, float)) and 0 < value <= 1:
            return float(value), where
    return DEFAULT_TARGET, "default (the card records none)"


def refit_card(card: ModelCard, site: SiteOutputs, fit: np.ndarray, options: RecalibrateOptions) -> tuple[Refit, list[str]]:
    """Temperature (NLL through the deployed merge), then the threshold for the target sensitivity (training's
    rule), the conformal qhat at the coverage and the dispersion limit, all on the fitting cases."""
    logits = [site.logits[i] for i in fit]
    y = site.labels[fit]

    def at(temperature: tuple[float, ...]) -> np.ndarray:
        return image_probabilities(logits, card, card.crop, temperature)

    temperature = fit_temperature(at, y, card.task, card.n_classes)
    probs = at(temperature)
    warnings = []
    if any(t <= T_RANGE[0] * 1.01 or t >= T_RANGE[1] * 0.99 for t in temperature):
        warnings.append(f"the fitted temperature {temperature} is at the edge of the range searched {T_RANGE}: the site outputs are far from calibrated; check the images and labels")
    threshold, target = card.threshold, None
    if card.task == "binary":
        target, where = target_sensitivity(card, options)
        if where.startswith("default"):
            warnings.append(f"the card records no target sensitivity; the threshold targets {target:g} (give --target-sensitivity)")
        threshold = margin_threshold((y == card.positive_index).astype(int), probs[:, card.positive_index], target)
    coverage = options.coverage if options.coverage is not None else card.abstention.coverage
    qhat = conformal_qhat(probs, y, coverage) if coverage is not None else None
    limit, quantile = card.abstention.dispersion_limit, None
    if limit is not None:
        quantile = float(options.dispersion_quantile or card.abstention.fitted_on.get("dispersion_quantile") or DISPERSION_QUANTILE)
        refitted = dispersion_limit(dispersions(logits, card, temperature), quantile)  # None: every site image is one crop
        if refitted is None:
            warnings.append("every site image is one crop: the crop-disagreement limit is kept as the card had it")
        limit = limit if refitted is None else refitted
    return Refit(temperature, threshold, target, coverage, qhat, limit, quantile), warnings


def operating_point(probs: np.ndarray, y: np.ndarray, card: ModelCard, threshold: float | None, options: RecalibrateOptions) -> dict[str, Any]:
    """Decisions at ``threshold`` on the evaluated cases: proportions with Wilson 95% intervals (and their counts),
    AUC, ECE with a bootstrap 95% interval (resampling cases), Brier score and mean top-class confidence."""
    metrics = score(y, probs, card, threshold)
    point: dict[str, Any] = {"threshold": threshold, "n": int(len(y))}
    for key, (k, n) in proportion_counts(metrics, card).items():
        point[key] = k / n if n else None
        point[f"{key}_ci95"] = wilson_interval(k, n)
        point[f"{key}_counts"] = [k, n]
    point["balanced_accuracy"] = metrics.get("balanced_accuracy")
    point["auc"] = metrics.get("auc", metrics.get("macro_auc"))
    positive = card.positive_index if card.task == "binary" else None
    point["ece"] = expected_calibration_error(probs, y, card.task, positive)
    point["ece_ci95"] = ece_interval(probs, y, card, options)
    point["brier"] = brier_score(probs, y, card.task)
    point["mean_confidence"] = float(probs.max(axis=1).mean())
    return point


def ece_interval(probs: np.ndarray, y: np.ndarray, card: ModelCard, options: RecalibrateOptions) -> list[float] | None:
    """95% percentile bootstrap interval of the ECE (resampling cases; the same resamples for old and new)."""
    if options.bootstrap <= 0 or len(y) < 2:
        return None
    rng = np.random.default_rng(options.seed)
    positive = card.positive_index if card.task == "binary" else None
    values = []
    for _ in range(options.bootstrap):
        idx = rng.integers(0, len(y), len(y))
        values.append(expected_calibration_error(probs[idx], y[idx], card.task, positive))
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def abstention_effect(probs: np.ndarray, spread: np.ndarray, y: np.ndarray, card: ModelCard, qhat: float | None, limit: float | None) -> dict[str, Any]:
    """What the refer rules do on the evaluated cases: prediction-set coverage and size, and the refer rates."""
    effect: dict[str, Any] = {"qhat": qhat, "dispersion_limit": limit}
    refer = np.zeros(len(y), bool)
    if qhat is not None:
        sets = [prediction_set(p, qhat, card.class_names) for p in probs]
        effect["set_coverage"] = float(np.mean([card.class_names[c] in s for c, s in zip(y, sets)]))
        effect["mean_set_size"] = float(np.mean([len(s) for s in sets]))
        by_set = np.asarray([len(s) != 1 for s in sets])
        effect["refer_rate_sets"] = float(by_set.mean())
        refer |= by_set
    if limit is not None:
        by_spread = np.nan_to_num(spread, nan=0.0) > limit
        effect["refer_rate_dispersion"] = float(by_spread.mean())
        refer |= by_spread
    effect["refer_rate"] = float(refer.mean()) if qhat is not None or limit is not None else None
    return effect


def compare(card: ModelCard, refit: Refit, site: SiteOutputs, evaluated: np.ndarray, options: RecalibrateOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """The old card's and the new card's operating points and refer rules on the evaluated cases."""
    logits = [site.logits[i] for i in evaluated]
    y = site.labels[evaluated]
    old_t = tuple(float(t) for t in temperature_of(card))
    p_old = image_probabilities(logits, card, card.crop, old_t)
    p_new = image_probabilities(logits, card, card.crop, refit.temperature)
    binary = card.task == "binary"
    old_threshold = (0.5 if card.threshold is None else card.threshold) if binary else card.threshold
    points = {
        "old": operating_point(p_old, y, card, old_threshold, options),
        "new": operating_point(p_new, y, card, refit.threshold, options),
    }
    abstention = {
        "old": abstention_effect(p_old, dispersions(logits, card, old_t), y, card, card.abstention.qhat, card.abstention.dispersion_limit),
        "new": abstention_effect(p_new, dispersions(logits, card, refit.temperature), y, card, refit.qhat, refit.dispersion_limit),
    }
    return points, abstention


def card_values(card: ModelCard) -> dict[str, Any]:
    """The values recalibration changes, as a card holds them."""
    return {
        "temperature": list(card.calibration.temperature) if card.calibration.method == "temperature" else None,
        "threshold": card.threshold,
        "coverage": card.abstention.coverage,
        "qhat": card.abstention.qhat,
        "dispersion_limit": card.abstention.dispersion_limit,
    }


def lineage_entry(
    parent: Path, parent_sha256: str, card: ModelCard, refit: Refit, site: SiteOutputs, fit: np.ndarray, held: np.ndarray,
) -> dict[str, Any]:
    """The provenance step the new card appends: the parent by sha256, the site data, the values before and after."""
    counts = Counter(card.class_names[i] for i in site.labels.tolist())
    new = {
        "temperature": list(refit.temperature), "threshold": refit.threshold, "coverage": refit.coverage,
        "qhat": refit.qhat, "dispersion_limit": refit.dispersion_limit, "target_sensitivity": refit.target_sensitivity,
    }
    return {
        "step": "recalibrate",
        "parent_sha256": parent_sha256,
        "parent_file": parent.name,
        "site_data": {
            "source": site.source, "n": int(len(site.labels)), "per_class": {c: counts.get(c, 0) for c in card.class_names},
            "n_fit": int(len(fit)), "n_held_out": int(len(held)), "n_unreadable": len(site.failed), "n_rejected": len(site.rejected),
        },
        "date": now_iso(),
        "edgedx_version": edgedx.__version__,
        "old": card_values(card),
        "new": new,
    }


def recalibrated_card(
    card: ModelCard, refit: Refit, entry: dict[str, Any], points: dict[str, Any], abstention: dict[str, Any],
    site: SiteOutputs, evaluated: np.ndarray,
) -> ModelCard:
    """The parent's card with the new temperature, threshold and refer rules, site metrics and the lineage step.

    The headline metrics become the site's (``measured_on`` says which cases);
    the training validation metrics are kept under ``before_recalibration``.
    """
    old, new = points["old"], points["new"]
    measured_on = f"{len(evaluated)} {'held-out' if entry['site_data']['n_held_out'] else 'fitting'} site cases of {site.source}"
    fitted_on = {"split": "site", "n": entry["site_data"]["n_fit"], "source": site.source, "date": entry["date"], "measured_on": measured_on}
    calibration = Calibration("temperature", refit.temperature, {
        **fitted_on, "merged_by": card.crop.aggregation, "ece_before": old["ece"], "ece_after": new["ece"],
        "brier_before": old["brier"], "brier_after": new["brier"], "mean_confidence_on_site": new["mean_confidence"],
    })
    rules, effect = card.abstention, abstention["new"]
    if refit.qhat is not None or refit.dispersion_limit is not None:
        rules = Abstention(refit.coverage, refit.qhat, refit.dispersion_limit, {
            **fitted_on, "dispersion_quantile": refit.dispersion_quantile, "refer_rate_on_site": effect["refer_rate"],
            **({"coverage_on_site": effect["set_coverage"], "mean_set_size_on_site": effect["mean_set_size"]} if "set_coverage" in effect else {}),
        })
    keys = ("n", "accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "precision", "ece", "brier", "mean_confidence")
    metrics = {
        "split": "site", **{k: new[k] for k in keys if k in new}, "macro_auc": new["auc"], "threshold": refit.threshold,
        "target_sensitivity": refit.target_sensitivity, "measured_on": measured_on, "before_recalibration": dict(card.metrics),
    }
    provenance = dataclasses.replace(card.provenance, lineage=(*card.provenance.lineage, entry))
    return card.replace(calibration=calibration, abstention=rules, threshold=refit.threshold, metrics=metrics, provenance=provenance)


def convert_probabilities(p: np.ndarray, old: ModelCard, new: ModelCard, width: int) -> np.ndarray:
    """Stored probabilities under ``old``'s temperature → the same outputs under ``new``'s (see the module docstring)."""
    return to_probabilities(raw_logits(p, old, width), new).astype(np.float32)


def convert_vectors(vectors: SelfTestVectors, old: ModelCard, new: ModelCard, width: int) -> SelfTestVectors:
    """The self-test vectors with their fp32 reference (and an int8 file's exact probabilities) at the new temperature."""
    exact = None if vectors.exact is None else convert_probabilities(vectors.exact, old, new, width)
    return dataclasses.replace(vectors, reference=convert_probabilities(vectors.reference, old, new, width), exact=exact)


def write_artefact(parent: Path, target: Path, card: ModelCard, old: ModelCard, width: int) -> SelfTestVectors | None:
    """The parent's graph with the new card and converted self-test vectors, written atomically under a new name,
    with its ``.sha256`` and card sidecar (the format, precision and int8 flavour are the parent's)."""
    graph = onnx.load(str(parent))
    metadata = {p.key: p.value for p in graph.metadata_props}
    entries = {ONNX_METADATA_KEY: card.to_json(indent=None)}
    vectors = None
    if metadata.get(SELFTEST_KEY):
        vectors = convert_vectors(SelfTestVectors.from_text(metadata[SELFTEST_KEY], str(parent)), old, card, width)
        entries[SELFTEST_KEY] = vectors.to_text()
    embed_metadata(graph, entries)
    with atomic_path(target) as tmp:
        onnx.save(graph, str(tmp))
    write_checksum(target)
    artefact = parent_sidecar(parent).get("artefact", {})
    precision = artefact.get("precision") or metadata.get("edgedx.precision", "fp32")
    write_card_sidecar(target, card, artefact.get("format", "onnx"), precision, vectors, artefact.get("int8_flavour"))
    return vectors


def parent_sidecar(parent: Path) -> dict[str, Any]:
    """The parent's card sidecar document, or {} when it has none (older exports)."""
    path = sidecar_path(parent)
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def verify_new(target: Path, parent: Path, device: str, what: str = "recalibrated") -> SelfTestReport:
    """``edgedx verify`` on the new file; one that does not reproduce its converted vectors is removed, not left.
    ``what`` names the step in the message (``edgedx fit-fields`` writes its artefacts through here too).

    The vectors are replayed on this machine's kernels: a file made for another target (an int8 flavour for VNNI
    on an AVX2 CPU) fails here whatever recalibration did, so the parent is replayed too and the message says which.
    """
    report = verify_artefact(target, device)
    if not report.passed:
        for path in (target, checksum_path(target), sidecar_path(target)):
            path.unlink(missing_ok=True)
        parent_passes = verify_artefact(parent, device).passed
        why = (
            "the parent passes here, so the new temperature magnifies this file's rounding beyond its tolerance: recalibrate "
            "the fp32 file" if parent_passes else
            f"the parent {parent.name} fails its self-test on this machine too (it is meant for another target): recalibrate "
            "it where it passes, or recalibrate the fp32 file"
        )
        raise ModelError(f"the {what} model failed its own self-test and was removed ({report.summary()}); {why}")
    return report


def reporting_note(n_fit: int, n_held: int) -> str:
    """Where the reported figures come from, in words the report leads with."""
    if n_held:
        return (
            f"temperature, threshold and refer rules fitted on {n_fit} site cases; the operating points are measured on the "
            f"other {n_held} held-out site cases, which the fit did not see"
        )
    return f"{SAME_CASES}: temperature, threshold and refer rules were fitted on these {n_fit} site cases, so the new operating point is optimistic"


def site_warnings(site: SiteOutputs, card: ModelCard, fit: np.ndarray, held: np.ndarray) -> list[str]:
    """What a reader of the numbers must know: few positives, unreadable or refused images, a small held-out part."""
    warnings = []
    if card.task == "binary":
        positives = int(np.sum(site.labels[fit] == card.positive_index))
        if positives < FEW_POSITIVES:
            warnings.append(f"the threshold rests on {positives} positive fitting case(s): sensitivity moves in steps of {1 / positives:.2f}")
    if site.failed:
        warnings.append(f"{len(site.failed)} site image(s) could not be read and were left out")
    if site.rejected:
        warnings.append(f"{len(site.rejected)} site image(s) were refused by the quality gate and left out, as diagnose would")
    if 0 < len(held) < MIN_CASES:
        warnings.append(f"only {len(held)} held-out cases: the reported intervals are wide")
    return warnings


def describe(point: dict[str, Any], keys: Sequence[str] = ("sensitivity", "specificity")) -> str:
    """``sensitivity 0.91 [0.80, 0.96]`` for each key present: for logs and the CLI."""
    parts = []
    for key in keys:
        if point.get(key) is not None:
            ci = point.get(f"{key}_ci95")
            parts.append(f"{key} {point[key]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""))
    return ", ".join(parts)

