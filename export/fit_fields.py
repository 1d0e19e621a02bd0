"""Field and slide operating points fitted on annotated validation fields: ``edgedx fit-fields``.

Why: a cell classifier's threshold is chosen on single-cell crops, one cell
centred in each. Over a whole field the same network sees crops that cut
cells in half, hold two, or hold glass and debris, so its crop threshold does
not make a field's detections what it promised for cells (on the 52 IML
validation fields the card's 0.877 gave 7 false detections per field and a
parasitaemia six times the annotated one). The operating points a clinic acts
on must be chosen where they will be used: on annotated *fields*.

What is fitted, from one pass of the deployed path over every field
(:func:`edgedx.runtime.evaluate.diagnose_fields`: the card's crops,
preprocessing and quality gate; all candidates kept, so no threshold needs a
second pass):

1. ``tile_threshold``: the lowest crop probability at which the fields have at
   most ``fp_per_field`` false detections per field on average (FROC);
2. the field rule: ``auto`` tries any detection, at least k detections, and the
   mean of the k highest crops against a threshold, and keeps the one with the
   best field-level balanced accuracy (ties: the simplest, then the more
   sensitive; :func:`edgedx.runtime.detection_metrics.choose_field_rule`);
3. the slide rule: fields are grouped into slides as ``diagnose`` groups them
   (``slides``: a ``path,slide_id`` manifest, else each field's folder); a slide
   is positive when any of its fields holds an annotated positive, and the
   number of positive fields a slide needs (1 to 5) is chosen for the best
   slide-level balanced accuracy. Without both positive and negative slides
   (the IML fields are one folder) it stays ``any_field`` with ``slide_k``
   (default 1), and ``fitted_on`` says why.

Honesty: figures read on the fields the operating point was chosen on are
optimistic. A 2-fold cross-fit (fields split in two halves, stratified by
positive/negative field and seeded; fitted on one half, reported on the other,
both ways, pooled) gives the figures to expect; ``detection.fitted_on`` keeps
both.

The result is a NEW artefact, as :mod:`edgedx.export.recalibrate` writes it:
the parent's graph with the new card (detection enabled, the fitted values,
``fitted_on``, a lineage step naming the parent by sha256), self-test vectors,
checksum and card sidecar, verified here before it is kept. The parent stays
byte-identical.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import edgedx
from edgedx.card import MAX_NEIGHBOUR_CONTEXT, Detection, ModelCard, now_iso
from edgedx.errors import InputError
from edgedx.export.recalibrate import output_width, verify_new, write_artefact
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.detection_metrics import (
    TOP_P_KEPT, FieldCandidates, FieldRule, choose_field_rule, choose_slide_rule, froc, operating_point, per_field, slide_point, slide_truth, summarise,
)
from edgedx.runtime.evaluate import AnnotatedFields, diagnose_fields
from edgedx.runtime.io.field_annotations import PARASITE_TYPES, FieldAnnotations, read_field_annotations
from edgedx.runtime.io.integrity import atomic_write_bytes, sha256_file
from edgedx.runtime.io.slide_manifest import SlideManifest, read_slide_manifest
from edgedx.runtime.model import load_model, resolve_model_path

log = logging.getLogger(__name__)

REPORT_NAME = "fit_fields_report.json"
MIN_FIELDS = 2  # fewer cannot place a threshold at a rate per field
MIN_CROSS_FIT = 4  # fields needed for a 2-fold cross-fit (two per half)
FEW_POSITIVE_FIELDS = 10  # below this, field sensitivity moves in coarse steps: said in the warnings
SOURCE = "validation fields"
NO_SLIDE_LABELS = ("{n} slide(s), {pos} positive (grouped by {how}): a slide rule cannot be chosen without both positive and negative "
                   "slides, so slide_rule {rule} with slide_k {k} is a default, not fitted; group the fields into slides with --slides MANIFEST.csv")


@dataclass(frozen=True)
class FitFieldsOptions:
    """Every choice of ``edgedx fit-fields``, validated once.

    ``fp_per_field``: the mean false detections per field the tile threshold
    allows; ``count_cells``: count red cells (parasitaemia in every record);
    ``field_rule``: auto, or the one rule whose k/threshold is fitted;
    ``slide_k``: positive fields a slide needs where the slides cannot be fitted
    (not both positive and negative slides);
    ``nms_iou`` None keeps the card's; ``positive_types``: the annotation types
    a detection should find; ``name``: the new file's name (default
    ``<stem>.fields.onnx``); ``neighbour_context``: the weight of each crop's
    brightest grid neighbour in its positive probability, written into the new
    card's crop policy before anything is fitted, so the operating points are
    chosen on the blended crops ``diagnose`` will read (None keeps the card's;
    choose it on other fields than these: benchmarks/neighbour_context.py).
    """

    fp_per_field: float = 1.0
    count_cells: bool = True
    field_rule: str = "auto"
    slide_k: int = 1
    nms_iou: float | None = None
    neighbour_context: float | None = None
    positive_types: tuple[str, ...] = PARASITE_TYPES
    name: str | None = None
    device: str = "cpu"
    batch_size: int = 32
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not (self.fp_per_field >= 0 and np.isfinite(self.fp_per_field)):
            raise InputError(f"--fp-per-field must be a number ≥ 0 (mean false detections per field), got {self.fp_per_field}")
        if self.field_rule not in ("auto", "any", "count_at_least", "top_k_mean"):
            raise InputError(f"--field-rule must be auto, any, count_at_least or top_k_mean, got {self.field_rule!r}")
        if isinstance(self.slide_k, bool) or self.slide_k < 1:
            raise InputError(f"--slide-k must be a positive integer (positive fields a slide needs), got {self.slide_k!r}")
        if self.nms_iou is not None and not 0.0 < self.nms_iou <= 1.0:
            raise InputError(f"nms_iou must be within (0, 1], got {self.nms_iou}; 0.3 merges the crops of one object")
        if self.neighbour_context is not None and not 0.0 <= self.neighbour_context < MAX_NEIGHBOUR_CONTEXT:
            raise InputError(f"--neighbour-context must be within [0, {MAX_NEIGHBOUR_CONTEXT:g}) (0: off; from 0.5 on detections leave "
                             f"the object's best crop), got {self.neighbour_context}")
        if self.batch_size < 1:
            raise InputError(f"batch size must be at least 1, got {self.batch_size}")
        if self.name is not None and (not self.name.endswith(".onnx") or any(c in self.name for c in "/\\")):
            raise InputError(f"--name {self.name!r} must be a file name ending in .onnx (it is written inside OUT)")


@dataclass(frozen=True)
class FieldFitReport:
    """What :func:`fit_fields` wrote and measured (also ``OUT/fit_fields_report.json``)."""

    parent: str
    parent_sha256: str
    output: str
    output_sha256: str
    report_path: str
    detection: dict[str, Any]  # the new card's detection settings, fitted_on included
    fitted: dict[str, Any]  # the operating point on every field it was chosen on (optimistic)
    cross_fitted: dict[str, Any] | None  # chosen on one half, reported on the other, pooled (None: too few fields)
    froc: list[dict[str, Any]]  # parasites found at 0.5/1/2/4/8 false detections per field, all fields
    curve: list[list[float]]
    counts: dict[str, int]
    selftest: dict[str, Any]
    seconds: float
    warnings: tuple[str, ...] = ()
    rule_choice: dict[str, Any] = dataclasses.field(default_factory=dict)  # each rule's best setting on all fields ("by_rule")
    neighbour_context: float = 0.0  # the new card's crop.neighbour_context, under which everything above was fitted

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "warnings": list(self.warnings)}


@dataclass(frozen=True)
class FieldChoice:
    """The fitted operating point: tile threshold, field rule, and what the rule choice said."""

    tile_threshold: float
    rule: FieldRule
    note: dict[str, Any]


def fit_fields(
    model_path: str | Path, fields: str | Path, annotations: str | Path | FieldAnnotations, out: str | Path,
    options: FitFieldsOptions = FitFieldsOptions(), *, progress: ProgressFn = no_progress, slides: str | Path | None = None,
) -> FieldFitReport:
    """Fit ``model_path``'s detection operating points on the annotated fields in ``fields`` and write a new
    artefact in ``out`` (see the module docstring); returns the report, also written as ``out/fit_fields_report.json``.

    ``annotations``: an IML-layout annotations.json, or one already read (a
    validation selection: :meth:`FieldAnnotations.subset`). ``slides``: a
    ``path,slide_id`` manifest grouping the fields into slides (else their
    folders). Refuses a model that is not a binary ONNX with a positive class,
    and fewer than 2 scorable fields.
    """
    started = time.perf_counter()
    manifest = read_slide_manifest(slides) if slides is not None else None
    parent = resolve_model_path(model_path)
    target = output_path(parent, Path(out), options)
    truth = annotations if isinstance(annotations, FieldAnnotations) else read_field_annotations(annotations, positive_types=options.positive_types)
    model = load_model(parent, device=options.device, batch_size=options.batch_size)
    card = model.card
    check_card(card, parent)
    nms = card.detection.nms_iou if options.nms_iou is None else options.nms_iou
    probe = Detection(enabled=True, nms_iou=nms, count_cells=options.count_cells)
    if options.neighbour_context is not None:  # the crops diagnose will read with the new card
        card = card.replace(crop=dataclasses.replace(card.crop, neighbour_context=options.neighbour_context))
        model.crop = dataclasses.replace(model.crop, neighbour_context=options.neighbour_context)
    model.card = card.replace(detection=probe)  # every candidate and the cell count, through diagnose's own path
    seen = diagnose_fields(model, fields, truth, keep=TOP_P_KEPT, progress=progress)
    if len(seen.fields) < MIN_FIELDS:
        raise InputError(f"only {len(seen.fields)} annotated field(s) of {fields} could be scored ({seen.counts()}); fit-fields needs at least {MIN_FIELDS}")
    choice = fit_point(seen.fields, options)
    fitted = operating_point(seen.fields, choice.tile_threshold, choice.rule)
    crossed = cross_fit(seen.fields, options)
    curve = froc(seen.fields)
    slide_fit = fit_slide_rule(seen, manifest, choice, options)
    detection = fitted_detection(probe, choice, fitted, crossed, seen, truth, options, slide_fit)
    new_card = card.replace(detection=detection, provenance=dataclasses.replace(
        card.provenance, lineage=(*card.provenance.lineage, lineage_entry(parent, model.session.sha256, card, detection, model.session.card.crop.neighbour_context)),
    ))
    write_artefact(parent, target, new_card, model.session.card, output_width(model))
    selftest = verify_new(target, parent, options.device, what="field-fitted")
    report_path = Path(out) / REPORT_NAME
    report = FieldFitReport(
        str(parent), model.session.sha256, str(target), sha256_file(target), str(report_path), dataclasses.asdict(detection),
        fitted, crossed, curve.table(), curve.curve(), seen.counts(), selftest.to_dict(), round(time.perf_counter() - started, 2),
        tuple(fit_warnings(seen, choice, crossed)), rule_choice=choice.note, neighbour_context=card.crop.neighbour_context,
    )
    atomic_write_bytes(report_path, (json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n").encode("utf-8"))
    log.info("fitted %s on %d fields → %s (tile threshold %.4g, %s)", parent.name, len(seen.fields), target, choice.tile_threshold, choice.rule)
    return report


def output_path(parent: Path, out: Path, options: FitFieldsOptions) -> Path:
    """``out/<parent stem>.fields.onnx`` (or ``options.name``); never the parent, never an existing file unasked."""
    if parent.suffix.lower() != ".onnx":
        raise InputError(f"fit-fields rewrites an ONNX file's card; {parent.name} is not one: fit the export's .onnx, then convert the new file")
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", options.name or f"{parent.stem}.fields.onnx")
    target = out / slug
    if target.resolve() == parent.resolve():
        raise InputError(f"the fitted model would overwrite {parent}: the parent is kept unchanged; choose another --name or OUT")
    if target.exists() and not options.overwrite:
        raise InputError(f"{target} already exists; pass --overwrite to replace it, or choose another --name or OUT")
    return target


def check_card(card: ModelCard, path: Path) -> None:
    """Detections are of one positive class: a binary card with a positive class, or nothing to fit."""
    if card.task != "binary" or card.positive_index is None:
        raise InputError(
            f"{path.name} is a {card.task} model; fit-fields fits parasite (positive-class) detections of a binary model with a "
            "positive class (train with --positive-class)"
        )


def fit_point(fields: Sequence[FieldCandidates], options: FitFieldsOptions) -> FieldChoice:
    """The tile threshold at ``options.fp_per_field`` false detections per field, then the field rule at it."""
    at = froc(fields).at_rate(options.fp_per_field)
    rule, note = choose_field_rule(fields, at["threshold"], options.field_rule)
    if not at["reached"]:
        note = {**note, "rate": f"no tile threshold keeps false detections within {options.fp_per_field:g} per field (at 1: {at['false_per_field']:.2f})"}
    return FieldChoice(float(at["threshold"]), rule, note)


def halves(fields: Sequence[FieldCandidates], seed: int) -> tuple[list[int], list[int]]:
    """Two halves of the field indices: positive fields shuffled (seeded), then negative ones, dealt alternately, so
    both halves hold both kinds when there are two of each."""
    rng = np.random.default_rng(seed)
    order = [int(i) for kind in (True, False) for i in rng.permutation([i for i, f in enumerate(fields) if f.positive == kind])]
    return sorted(order[0::2]), sorted(order[1::2])


def cross_fit(fields: Sequence[FieldCandidates], options: FitFieldsOptions) -> dict[str, Any] | None:
    """2-fold cross-fit: the operating point chosen on one half and read on the other, both ways, pooled over every
    field (each read at the point its other half chose). None with fewer than :data:`MIN_CROSS_FIT` fields."""
    if len(fields) < MIN_CROSS_FIT:
        return None
    parts = halves(fields, options.seed)
    rows, folds = [], []
    for held, fit in ((parts[0], parts[1]), (parts[1], parts[0])):
        choice = fit_point([fields[i] for i in fit], options)
        rows.append(per_field([fields[i] for i in held], choice.tile_threshold, choice.rule))
        folds.append({"tile_threshold": choice.tile_threshold, **choice.rule.to_dict(), "n_fitted_on": len(fit), "n_reported_on": len(held)})
    pooled = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
    return {**summarise(pooled), "folds": folds, "seed": options.seed,
            "note": "2-fold cross-fit: each half's figures at the operating point chosen on the other half, pooled"}


def compact(point: dict[str, Any]) -> dict[str, Any]:
    """The figures a card keeps of an operating point (the report has them all)."""
    field = point["field"]
    kept = {
        "found": point["found"], "n_parasites": point["n_parasites"], "false_per_field": point["false_per_field"],
        "field_sensitivity": field["sensitivity"], "field_sensitivity_ci95": field["sensitivity_ci95"],
        "field_specificity": field["specificity"], "field_specificity_ci95": field["specificity_ci95"],
        "field_balanced_accuracy": field["balanced_accuracy"],
    }
    if "parasitaemia" in point:
        kept["parasitaemia_mae_points"] = point["parasitaemia"]["mae_points"]
    if "cell_count" in point:
        kept["cell_count_mae"] = point["cell_count"]["mae"]
    return kept


def fit_slide_rule(seen: AnnotatedFields, manifest: SlideManifest | None, choice: FieldChoice, options: FitFieldsOptions) -> dict[str, Any]:
    """The slide rule chosen on the slides the fields form, at the fitted field operating point, or the default and
    why not: ``{"rule", "k", "fitted", ...}`` for ``detection.fitted_on["slides"]``."""
    ids, how = seen.slide_ids(manifest)
    rows = per_field(seen.fields, choice.tile_threshold, choice.rule)
    truth = slide_truth(rows, ids)
    base = {"grouped_by": how, "n_slides": len(truth), "n_positive_slides": sum(truth.values())}
    chosen = choose_slide_rule(rows, ids)
    if chosen is None:
        rule = "any_field" if options.slide_k == 1 else "count_at_least"
        why = NO_SLIDE_LABELS.format(n=len(truth), pos=base["n_positive_slides"], how=how if isinstance(how, str) else " and ".join(how), rule=rule, k=options.slide_k)
        return {**base, "rule": rule, "k": options.slide_k, "fitted": False, "why": why}
    (rule, k), note = chosen
    point = {key: v for key, v in slide_point(rows, ids, rule, k).items() if key != "per_slide"}
    return {**base, **point, "rule": rule, "k": k, "fitted": True, **note, "note": "chosen and read on the same slides: optimistic"}


def fitted_detection(
    probe: Detection, choice: FieldChoice, fitted: dict[str, Any], crossed: dict[str, Any] | None, seen: AnnotatedFields,
    truth: FieldAnnotations, options: FitFieldsOptions, slides: dict[str, Any],
) -> Detection:
    """The new card's detection: enabled, the fitted tile threshold and field rule, the slide rule (fitted, or the
    default and why), and where it all came from (``fitted_on``: fields, parasites, the fitted and the cross-fitted
    figures)."""
    fitted_on = {
        "source": SOURCE, "n_fields": len(seen.fields), "n_positive_fields": sum(f.positive for f in seen.fields),
        "n_parasites": fitted["n_parasites"], "data": seen.data, "annotations": truth.source, "positive_types": list(truth.positive_types),
        "fp_per_field": options.fp_per_field, "field_rule_asked": options.field_rule,
        "fitted": {**compact(fitted), "note": "chosen and read on the same fields: optimistic"},
        "cross_fitted": None if crossed is None else {**compact(crossed), "seed": options.seed, "note": crossed["note"]},
        "slides": slides, "date": now_iso(),
    }
    rule = choice.rule
    return dataclasses.replace(
        probe, tile_threshold=choice.tile_threshold, field_rule=rule.rule, field_k=rule.k,  # type: ignore[arg-type]
        field_threshold=rule.threshold, slide_rule=slides["rule"], slide_k=slides["k"], fitted_on=fitted_on,
    )


def lineage_entry(parent: Path, parent_sha256: str, card: ModelCard, detection: Detection, old_context: float) -> dict[str, Any]:
    """The provenance step the new card appends: the parent by sha256, the detection and the crops' neighbour context
    before and after (``card`` is the new crop policy's)."""
    before = dataclasses.asdict(card.detection)
    after = {k: v for k, v in dataclasses.asdict(detection).items() if k != "fitted_on"}
    return {
        "step": "fit-fields", "parent_sha256": parent_sha256, "parent_file": parent.name, "date": now_iso(),
        "edgedx_version": edgedx.__version__, "fields": {k: detection.fitted_on[k] for k in ("n_fields", "n_parasites", "data", "annotations")},
        "old": {k: v for k, v in before.items() if k != "fitted_on"}, "new": after,
        "neighbour_context": {"old": old_context, "new": card.crop.neighbour_context},
    }


def fit_warnings(seen: AnnotatedFields, choice: FieldChoice, crossed: dict[str, Any] | None) -> list[str]:
    """What a reader of the numbers must know: few positive fields, an unreachable rate, fields left out."""
    warnings = []
    positives = sum(f.positive for f in seen.fields)
    if positives < FEW_POSITIVE_FIELDS:
        warnings.append(f"the field rule rests on {positives} positive field(s): field sensitivity moves in steps of {1 / max(positives, 1):.2f}")
    warnings += [choice.note[k] for k in ("note", "rate") if k in choice.note]
    if crossed is None:
        warnings.append(f"fewer than {MIN_CROSS_FIT} fields: no cross-fit, the figures are read on the fields they were fitted on")
    for key, what in (("missing", "annotated but not in the folder"), ("failed", "unreadable"), ("rejected", "refused by the quality gate")):
        n = len(getattr(seen, key))
        if n:
            warnings.append(f"{n} annotated field(s) {what}: left out")
    return warnings
