"""Metrics of a deployed model on a labelled folder, through the production path.

Each image is diagnosed exactly as ``edgedx diagnose`` would (same crops, same
preprocessing from the card), so the numbers describe the artefact you ship.

Beyond accuracy, whether its probabilities and its "refer" can be trusted
(:func:`trust_report`): ECE, Brier and a reliability diagram before (the
network's own probabilities, the card's temperature undone) and after (as
deployed); how often the prediction sets hold the true class against the
coverage the card promises; how often it refers, and what referring buys
(accuracy, sensitivity, specificity on the cases not referred vs all). Images
the quality gate rejects are not scored; they are counted and listed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgedx.card import ModelCard
from edgedx.errors import EdgeDxError, InputError
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.detections import field_candidates, positive_tile_p
from edgedx.runtime.fitting import uncalibrated
from edgedx.runtime.io.field_annotations import FieldAnnotations, read_field_annotations
from edgedx.runtime.io.slide_manifest import SlideManifest, read_slide_manifest
from edgedx.runtime.io.integrity import atomic_write_bytes
from edgedx.runtime.io.labelled import LabelledSet, load_labelled
from edgedx.runtime.io.manifest import ManifestLayout
from edgedx.runtime.metrics import classification_metrics, roc_auc, selective_metrics
from edgedx.runtime.model import Model, decide, load_model
from edgedx.runtime.trust import brier_score, expected_calibration_error, reliability

if TYPE_CHECKING:  # detection_metrics imports wilson_interval from here: imported where used, not at module load
    from edgedx.runtime.detection_metrics import FieldCandidates

REFER, REJECT = "refer", "reject"


@dataclass(frozen=True)
class EvaluationReport:
    """What :func:`evaluate` found. ``misclassified`` holds one record per image whose decision at the
    card's threshold differs from its label, most confidently wrong first (see :func:`misclassified`)."""

    model: str
    data: str
    threshold: float | None
    metrics: dict[str, Any]
    failed: tuple[str, ...]
    misclassified: tuple[dict[str, Any], ...] = ()
    calibration: dict[str, Any] = field(default_factory=dict)  # ECE, Brier, reliability before/after (:func:`trust_report`)
    abstention: dict[str, Any] = field(default_factory=dict)  # coverage, refer rate, metrics on not-referred vs all
    rejected: tuple[dict[str, Any], ...] = ()  # images the quality gate rejected: not scored, listed with the reasons

    @property
    def n_misclassified(self) -> int:
        return len(self.misclassified)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": self.data,
            "threshold": self.threshold,
            "metrics": self.metrics,
            "calibration": self.calibration,
            "abstention": self.abstention,
            "n_rejected": len(self.rejected),
            "rejected": [dict(r) for r in self.rejected],
            "failed": list(self.failed),
            "n_misclassified": self.n_misclassified,
            "misclassified": [dict(m) for m in self.misclassified],
        }


def evaluate(
    model: str | Path | Model,
    data: str | Path,
    *,
    split: str = "val",
    device: str = "cpu",
    batch_size: int = 32,
    bootstrap: int = 1000,
    out: str | Path | None = None,
    seed: int = 0,
    layout: ManifestLayout = ManifestLayout(),
    progress: ProgressFn = no_progress,
    annotations: str | Path | FieldAnnotations | None = None,
    slides: str | Path | None = None,
) -> EvaluationReport | FieldEvaluationReport:
    """Diagnose every labelled image through the production path and score the decisions.

    With ``annotations`` (an IML-layout annotations.json, or one read already)
    ``data`` is a folder of whole fields instead, scored object by object and
    field by field at the card's detection settings (:func:`evaluate_fields`),
    and slide by slide (``slides``: a ``path,slide_id`` manifest; else each
    field's folder).

    ``data`` is an ImageFolder, a CSV manifest or a MedMNIST ``.npz`` (``split``
    picks its part; ``layout`` names a manifest's columns, image folder and
    suffix). Metrics are at the card's threshold, and also at 0.5 for
    binary models; ``bootstrap`` resamples give 95% intervals. ``out`` writes
    ``evaluation.json``, the ROC / confusion-matrix / radar plots and a one-page
    ``report.html``.
    """
    if annotations is not None:
        return evaluate_fields(model, data, annotations, device=device, batch_size=batch_size, out=out, progress=progress, slides=slides)
    if slides is not None:
        raise InputError("--slides groups annotated fields into slides: give --annotations A.json with it, or leave out --slides")
    loaded = model if isinstance(model, Model) else load_model(model, device=device, batch_size=batch_size)
    model = (loaded.session.path or "in-memory model") if isinstance(model, Model) else model
    card = loaded.card
    if card.task == "multilabel":
        raise InputError("evaluate needs a binary or multiclass model; this card is multilabel")
    labelled = load_labelled(data, card.class_names, split=split, layout=layout)
    seen = diagnose_labelled(loaded, labelled, progress)
    if not seen.kept:
        why = f"; the quality gate rejected {len(seen.rejected)}" if seen.rejected else ""
        raise InputError(f"no image in {data} could be scored ({len(seen.failed)} unreadable{why})")
    truth, p_all = np.asarray(seen.truth), np.stack(seen.probs)
    metrics = score(truth, p_all, card, card.threshold)
    if card.task == "binary":
        metrics["at_0.5"] = score(truth, p_all, card, 0.5)
    if bootstrap > 0:
        metrics.update(intervals(truth, p_all, card, metrics, n=bootstrap, seed=seed))
    trust = trust_report(truth, p_all, np.stack(seen.raw), seen.records, card)
    wrong = misclassified(truth, p_all, card, [labelled.names[i] for i in seen.kept])
    report = EvaluationReport(
        str(model), labelled.source, card.threshold, metrics, tuple(seen.failed), tuple(record for _, record in wrong),
        trust["calibration"], trust["abstention"], tuple(seen.rejected),
    )
    if out is not None:
        from edgedx.runtime.outputs.report_html import write_evaluation

        write_evaluation(Path(out), report, card, truth, p_all, thumbnails=[labelled.images[seen.kept[row]] for row, _ in wrong])
    return report


@dataclass
class Diagnosed:
    """What :func:`diagnose_labelled` saw: per scored image its label, probabilities as deployed and as the network
    gives them, and its record; the images that could not be read; the images the quality gate rejected."""

    truth: list[int] = field(default_factory=list)
    probs: list[np.ndarray] = field(default_factory=list)
    raw: list[np.ndarray] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # the labelled index of each scored image
    failed: list[str] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


def diagnose_labelled(loaded: Model, labelled: LabelledSet, progress: ProgressFn = no_progress) -> Diagnosed:
    """Every labelled image through ``loaded.stream`` (diagnose's path); a rejected image is listed, not scored."""
    card, seen, total = loaded.card, Diagnosed(), len(labelled)
    progress("evaluate", 0, total)
    for done, (i, result) in enumerate(loaded.stream(enumerate(labelled.images)), 1):
        progress("evaluate", done, total)
        if isinstance(result, EdgeDxError):
            seen.failed.append(str(result))
            continue
        record = result.to_record()
        if record.get("decision") == REJECT:
            seen.rejected.append({"image": labelled.names[i], "reasons": list(record.get("reject_reasons") or [])})
            continue
        seen.kept.append(i)
        seen.truth.append(int(labelled.labels[i]))
        seen.probs.append(result.sliding.probabilities)
        seen.raw.append(uncalibrated(result.sliding, card, loaded.crop))
        seen.records.append(record)
    return seen


def trust_report(
    truth: np.ndarray, probs: np.ndarray, raw: np.ndarray, records: list[dict[str, Any]], card: ModelCard
) -> dict[str, dict[str, Any]]:
    """``calibration`` and ``abstention`` sections of a report, for the scored (not rejected) images.

    ``probs`` as deployed (the card's temperature applied), ``raw`` the network's
    own; ``records`` the diagnosis records (their ``decision``, ``prediction_set``
    and ``refer_reasons``), in the same order as ``truth``.
    """
    task, pos = card.task, card.positive_index

    def figures(p: np.ndarray) -> dict[str, Any]:
        return {"ece": expected_calibration_error(p, truth, task, pos), "brier": brier_score(p, truth, task),
                "reliability": reliability(p, truth, task, pos)}

    calibration = {
        "method": card.calibration.method, "temperature": list(card.calibration.temperature), "n": int(len(truth)),
        "before": figures(raw), "after": figures(probs), "fitted_on": dict(card.calibration.fitted_on),
    }
    return {"calibration": calibration, "abstention": abstention_report(truth, probs, records, card)}


def abstention_report(truth: np.ndarray, probs: np.ndarray, records: list[dict[str, Any]], card: ModelCard) -> dict[str, Any]:
    """Coverage of the records' prediction sets (share holding the true class), the refer rate and its reasons, and
    accuracy (sensitivity, specificity) on the cases not referred against all cases, decided at the card's threshold."""
    rule = card.abstention
    names = card.class_names
    with_sets = [(names[int(y)], r["prediction_set"]) for y, r in zip(truth, records) if r.get("prediction_set") is not None]
    referred = np.asarray([r.get("decision") == REFER for r in records], bool)
    reasons = Counter(reason_kind(reason) for r, ref in zip(records, referred) if ref for reason in (r.get("refer_reasons") or []))
    predicted = np.asarray([names.index(decide(p, card)) for p in probs])  # type: ignore[arg-type]
    return {
        "coverage_target": rule.coverage, "qhat": rule.qhat, "dispersion_limit": rule.dispersion_limit,
        "n_with_sets": len(with_sets),
        "empirical_coverage": float(np.mean([t in s for t, s in with_sets])) if with_sets else None,
        "mean_set_size": float(np.mean([len(s) for _, s in with_sets])) if with_sets else None,
        "n_referred": int(referred.sum()), "refer_rate": float(referred.mean()) if len(referred) else None,
        "refer_reasons": dict(reasons),
        **selective_metrics(truth, predicted, ~referred, positive_index=card.positive_index if card.task == "binary" else None),
    }


def reason_kind(reason: Any) -> str:
    """A refer reason without its numbers, for counting: "prediction set {a, b} at 95% coverage" → "prediction set",
    "crops disagree: dispersion 0.21 > limit 0.12" → "crops disagree"."""
    return re.split(r"[:{\[(]", str(reason), maxsplit=1)[0].strip() or str(reason)


def trust_lines(report: EvaluationReport) -> list[str]:
    """One line each: calibration before → after, prediction-set coverage, refer rate and what it buys, rejects.

    A section that is missing or not a mapping (a report built by hand, or by an older caller) gives no line."""
    cal = report.calibration if isinstance(report.calibration, dict) else {}
    ab = report.abstention if isinstance(report.abstention, dict) else {}
    rejected = report.rejected if isinstance(report.rejected, (tuple, list)) else ()
    lines = []
    if cal:
        temps = ", ".join(f"{t:.3g}" for t in cal["temperature"]) or "none on the card"
        lines.append(
            f"calibration (temperature {temps}): ECE {_f(cal['before']['ece'])} → {_f(cal['after']['ece'])}, Brier "
            f"{_f(cal['before']['brier'])} → {_f(cal['after']['brier'])} (before: the network's own probabilities; after: as deployed)"
        )
    if ab and ab.get("empirical_coverage") is not None:
        target = "none on the card" if ab["coverage_target"] is None else f"{ab['coverage_target']:.0%}"
        lines.append(
            f"prediction sets: the true class is in the set for {ab['empirical_coverage']:.1%} of {ab['n_with_sets']} images "
            f"(target {target}; mean set size {ab['mean_set_size']:.2f})"
        )
    elif ab:
        lines.append("prediction sets: none (the card has no conformal qhat, or the records carry no prediction_set)")
    if ab:
        kept, every = ab["not_referred"], ab["all"]
        line = f"refer: {ab['n_referred']} of {every['n']} ({_pct(ab['refer_rate'])}); accuracy {_f(kept['accuracy'])} on the {kept['n']} not referred vs {_f(every['accuracy'])} on all"
        if "sensitivity" in every:
            line += (f"; sensitivity {_f(kept['sensitivity'])} vs {_f(every['sensitivity'])}, "
                     f"specificity {_f(kept['specificity'])} vs {_f(every['specificity'])}")
        lines.append(line)
    lines.append(f"reject (image quality): {len(rejected)} image(s), not scored")
    return lines


def _f(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def misclassified(truth: np.ndarray, probs: np.ndarray, card: ModelCard, names: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """``(row, record)`` of every image whose decision at the card's threshold (:func:`decide`, as diagnose
    takes it) differs from its label, the most confidently wrong first.

    Why this order: the top of the list is where a reviewer finds label errors
    and the model's blind spots. Binary: by the distance of p(positive class)
    from the threshold; multiclass (argmax): by how far p(predicted) is above
    p(true). ``record`` holds image, true, predicted, probability (of the
    positive class for binary, of the predicted class for multiclass),
    probability_of (that class) and threshold (None for argmax).
    """
    classes = card.class_names
    binary = card.task == "binary"
    threshold = (0.5 if card.threshold is None else float(card.threshold)) if binary else None
    found: list[tuple[float, int, dict[str, Any]]] = []
    for row, (y, p) in enumerate(zip(truth, probs)):
        predicted = classes.index(decide(p, card))  # type: ignore[arg-type]
        if predicted == int(y):
            continue
        shown = card.positive_index if binary else predicted
        assert shown is not None  # a binary card always has a positive class
        margin = abs(float(p[shown]) - threshold) if threshold is not None else float(p[predicted] - p[int(y)])
        record = {
            "image": names[row], "true": classes[int(y)], "predicted": classes[predicted],
            "probability": round(float(p[shown]), 6), "probability_of": classes[shown], "threshold": threshold,
        }
        found.append((margin, row, record))
    found.sort(key=lambda item: (-item[0], item[1]))
    return [(row, record) for _, row, record in found]


def evaluate_folder(model: str | Path | Model, data: str | Path, **kwargs: Any) -> EvaluationReport:
    """:func:`evaluate` without intervals (kept for callers of the first version)."""
    kwargs.setdefault("bootstrap", 0)
    return evaluate(model, data, **kwargs)


def score(truth: np.ndarray, probs: np.ndarray, card: ModelCard, threshold: float | None) -> dict[str, Any]:
    """Classification metrics with decisions at ``threshold`` (binary) or argmax (multiclass)."""
    decided = card if threshold == card.threshold else card.replace(threshold=threshold)
    preds = np.asarray([card.class_names.index(decide(p, decided)) for p in probs])  # type: ignore[arg-type]
    metrics = classification_metrics(truth, probs, card.class_names, y_pred=preds, positive_index=card.positive_index or 1).to_dict()
    metrics["threshold"] = threshold
    if card.task == "binary":
        pos = card.positive_index
        metrics["auc"] = _none_if_nan(roc_auc((truth == pos).astype(int), probs[:, pos]))
        stats = metrics["per_class"][card.class_names[pos]]  # type: ignore[index]
        metrics.update(sensitivity=stats["sensitivity"], specificity=stats["specificity"], precision=stats["precision"], f1=stats["f1"])
    return metrics


CI_KEYS = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "auc")


def bootstrap_intervals(truth: np.ndarray, probs: np.ndarray, card: ModelCard, *, n: int = 1000, seed: int = 0) -> dict[str, list[float] | None]:
    """95% percentile bootstrap intervals (resampling images) for the headline metrics."""
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {k: [] for k in CI_KEYS}
    for _ in range(n):
        idx = rng.integers(0, len(truth), len(truth))
        m = score(truth[idx], probs[idx], card, card.threshold)
        for key in CI_KEYS:
            value = m.get(key, m.get("macro_auc") if key == "auc" else None)
            if value is not None and np.isfinite(value):
                samples[key].append(float(value))
    return {k: ([float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) >= n // 2 else None) for k, v in samples.items()}


PROPORTIONS = ("accuracy", "sensitivity", "specificity", "precision")
Z95 = 1.959963984540054


def wilson_interval(successes: int, n: int, z: float = Z95) -> list[float] | None:
    """Wilson score 95% interval of a proportion: sensible at 0/n and n/n, where a bootstrap gives [1, 1]."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)  # exact ends, not 0.9999999999999999
    return [low, high]


def proportion_counts(metrics: dict[str, Any], card: ModelCard) -> dict[str, tuple[int, int]]:
    """(successes, n) behind each proportion, from the confusion matrix at the card's threshold."""
    confusion = np.asarray(metrics["confusion"], dtype=np.int64)
    counts = {"accuracy": (int(np.trace(confusion)), int(confusion.sum()))}
    if card.task == "binary":
        pos = card.positive_index
        neg = 1 - pos  # type: ignore[operator]
        tp, fn, fp, tn = (int(confusion[pos, pos]), int(confusion[pos, neg]), int(confusion[neg, pos]), int(confusion[neg, neg]))
        counts.update(sensitivity=(tp, tp + fn), specificity=(tn, tn + fp), precision=(tp, tp + fp))
    return counts


def intervals(truth: np.ndarray, probs: np.ndarray, card: ModelCard, metrics: dict[str, Any], *, n: int, seed: int) -> dict[str, Any]:
    """95% intervals: Wilson for proportions (with their n), bootstrap (resampling images) for AUC, F1, balanced accuracy."""
    boot = bootstrap_intervals(truth, probs, card, n=n, seed=seed)
    ci: dict[str, list[float] | None] = {}
    method: dict[str, str] = {}
    sizes: dict[str, int] = {}
    counts = proportion_counts(metrics, card)
    for key in CI_KEYS:
        if key in counts:
            k, total = counts[key]
            ci[key], method[key], sizes[key] = wilson_interval(k, total), "wilson", total
        else:
            ci[key], method[key], sizes[key] = boot.get(key), "bootstrap", len(truth)
    return {"ci95": ci, "ci95_method": method, "ci95_n": sizes}


def _none_if_nan(x: float) -> float | None:
    return None if np.isnan(x) else float(x)


# -- whole fields with object annotations ------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnotatedFields:
    """What :func:`diagnose_fields` saw: each scored field's candidates matched against its annotations, and the
    annotated fields not scored (no file in the folder, unreadable, rejected by the quality gate)."""

    fields: list[FieldCandidates]
    data: str
    missing: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"n_scored": len(self.fields), "n_missing": len(self.missing), "n_failed": len(self.failed), "n_rejected": len(self.rejected)}

    def slide_ids(self, manifest: SlideManifest | None) -> tuple[list[str], str | list[str]]:
        """Each scored field's slide, as ``diagnose`` groups them (the manifest's ``slide_id``, else the folder), and
        how they were grouped (one word, or the sorted words when fields were grouped both ways)."""
        from edgedx.runtime.outputs.slides import grouping

        groups = [grouping(str(Path(self.data) / f.name), manifest) for f in self.fields]
        hows = sorted({how for _, how in groups})
        return [slide for slide, _ in groups], hows[0] if len(hows) == 1 else hows


def diagnose_fields(loaded: Model, fields: str | Path, annotations: FieldAnnotations, *, keep: int = 1, progress: ProgressFn = no_progress) -> AnnotatedFields:
    """Every annotated image in the folder ``fields`` through ``loaded.stream`` (diagnose's crops, preprocessing and
    quality gate), kept as all its candidates (threshold 0, the card's NMS), its crops' p(positive) (``keep`` highest
    at least) and, with the card's ``count_cells``, its counted red cells. ``loaded.card`` must have detection on."""
    from edgedx.runtime.detection_metrics import field_candidates_of

    card, folder = loaded.card, Path(fields)
    if not folder.is_dir():
        raise InputError(f"fields folder not found: {folder}; pass the folder holding the annotated images")
    present = [n for n in annotations.names if (folder / n).is_file()]
    if not present:
        example = annotations.names[0] if len(annotations) else "none"
        raise InputError(f"none of the {len(annotations)} images named in {annotations.source} (e.g. {example!r}) is in {folder}; "
                         "pass the folder that holds them (IML: malaria_fields_iml/images)")
    pos = card.positive_index
    assert pos is not None and card.detection.enabled  # the callers check both
    scored = set(present)
    seen = AnnotatedFields([], str(folder), [n for n in annotations.names if n not in scored])
    progress("fields", 0, len(present))
    for done, (name, result) in enumerate(loaded.stream((n, folder / n) for n in present), 1):
        progress("fields", done, len(present))
        if isinstance(result, EdgeDxError):
            seen.failed.append(str(result))
        elif result.rejected:
            seen.rejected.append({"image": name, "reasons": list(result.reject_reasons)})
        else:
            factor = float((result.scale or {}).get("factor") or 1.0)
            found = field_candidates(result.sliding, pos, card.detection.nms_iou, image_factor=factor)
            cells = result.findings.cells if result.findings is not None else None
            count = None if cells is None else cells.count
            seen.fields.append(field_candidates_of(found, positive_tile_p(result.sliding, pos), annotations.fields[str(name)], count, keep=keep))
    return seen


@dataclass(frozen=True)
class FieldEvaluationReport:
    """What :func:`evaluate_fields` found at the card's detection settings, with the FROC over every threshold."""

    model: str
    data: str
    annotations: str
    detection: dict[str, Any]  # the card's detection settings, as judged
    point: dict[str, Any]  # detection_metrics.operating_point at those settings
    froc: list[dict[str, Any]]  # parasites found at 0.5/1/2/4/8 false detections per field
    curve: list[list[float]]  # [threshold, found, false per field] at each corner of the FROC
    per_field: list[dict[str, Any]]
    counts: dict[str, int]
    failed: tuple[str, ...] = ()
    rejected: tuple[dict[str, Any], ...] = ()
    slides: dict[str, Any] | None = None  # detection_metrics.slide_point at the card's slide rule, with how fields were grouped

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "failed": list(self.failed), "rejected": [dict(r) for r in self.rejected]}


def evaluate_fields(
    model: str | Path | Model, fields: str | Path, annotations: str | Path | FieldAnnotations, *, device: str = "cpu",
    batch_size: int = 32, out: str | Path | None = None, progress: ProgressFn = no_progress, slides: str | Path | None = None,
) -> FieldEvaluationReport:
    """Score a detection-enabled model on annotated whole fields, through diagnose's path: field-level sensitivity and
    specificity at the card's field rule, parasites found against false detections per field (FROC), parasitaemia and
    red-cell count errors per field, and slide sensitivity/specificity at the card's slide rule (fields grouped by the
    ``slides`` manifest, else by folder). ``out`` writes ``evaluation.json``. A card with detection off is refused: its
    field operating point must first be fitted on annotated fields (``edgedx fit-fields``)."""
    from edgedx.runtime.detection_metrics import card_rule, froc, operating_point, per_field

    manifest = read_slide_manifest(slides) if slides is not None else None  # a bad manifest fails before any field is read
    loaded = model if isinstance(model, Model) else load_model(model, device=device, batch_size=batch_size)
    name = str((loaded.session.path or "in-memory model") if isinstance(model, Model) else model)
    card = loaded.card
    if not card.detection.enabled:
        raise InputError(
            f"{name}: the card has detection off, so its crops are not turned into parasite detections and field decisions; "
            "fit them on annotated fields first: edgedx fit-fields MODEL FIELDS_DIR --annotations A.json -o OUT, then evaluate the model it writes"
        )
    truth = annotations if isinstance(annotations, FieldAnnotations) else read_field_annotations(annotations)
    seen = diagnose_fields(loaded, fields, truth, keep=card.detection.field_k, progress=progress)
    if not seen.fields:
        raise InputError(f"no annotated field in {fields} could be scored ({len(seen.failed)} unreadable, {len(seen.rejected)} rejected)")
    threshold, rule = card_rule(card)
    rows = per_field(seen.fields, threshold, rule)
    curve = froc(seen.fields)
    table = [{k: v for k, v in row.items() if k != "n_positives"} for row in curve.table()]
    listed = [{"image": f.name, **{k: _plain(v[i]) for k, v in rows.items()}} for i, f in enumerate(seen.fields)]
    report = FieldEvaluationReport(
        name, seen.data, truth.source, dataclasses.asdict(card.detection), operating_point(seen.fields, threshold, rule), table,
        curve.curve(), listed, seen.counts(), tuple(seen.failed), tuple(seen.rejected), _slides(rows, seen, card, manifest),
    )
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(Path(out) / "evaluation.json", (json.dumps(report.to_dict(), indent=2, default=_plain) + "\n").encode("utf-8"))
    return report


def _slides(rows: dict[str, np.ndarray], seen: AnnotatedFields, card: Any, manifest: SlideManifest | None) -> dict[str, Any]:
    """The scored fields grouped into slides as ``diagnose`` groups them (manifest, else folder), scored at the card's
    slide rule; says how they were grouped."""
    from edgedx.runtime.detection_metrics import slide_point

    ids, grouped_by = seen.slide_ids(manifest)
    return {"grouped_by": grouped_by, **slide_point(rows, ids, card.detection.slide_rule, card.detection.slide_k)}


def _plain(value: Any) -> Any:
    """NaN-free JSON for numpy scalars (a cell count not taken is NaN in the rows: null here)."""
    if isinstance(value, np.generic):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value
