"""Scoring parasite detections on annotated fields, and choosing a field's operating point from the scores.

Why from candidates: every field is diagnosed once and keeps *all* its
candidates (:func:`edgedx.runtime.detections.field_candidates`: local maxima
of the crop grid after non-maximum suppression, at threshold 0) with their
scores. The detections at any tile threshold ``t`` are exactly the candidates
scoring ≥ ``t``, so a whole threshold sweep (FROC), the choice of the
threshold and of the field rule, and a cross-fit cost no further inference.

Matching (:func:`match`), highest score first: a detection is a **true
positive** when its box holds the centre of an annotated positive box not yet
matched (the nearest to the box centre when several); each positive is matched
once, so a second detection of the same parasite is a **false detection**. A
detection that holds no unmatched positive centre but a 'difficult' one is
**neither** (the annotator could not tell); difficult objects are never misses.

The figures a clinic asks for: parasites found against false detections per
field (FROC, and read at 0.5/1/2/4/8 false per field), field-level
sensitivity and specificity of a field rule with Wilson 95% intervals, and the
per-field parasitaemia and red-cell count errors against the annotations.
Numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgedx.card import ModelCard
from edgedx.errors import InputError
from edgedx.runtime.detections import DetectedBox
from edgedx.runtime.evaluate import wilson_interval
from edgedx.runtime.io.field_annotations import FieldTruth

FP_RATES = (0.5, 1.0, 2.0, 4.0, 8.0)  # false detections per field at which parasites found are read
TOP_P_KEPT = 16  # highest crop probabilities kept per field: enough for every top-k rule fitted here
COUNT_K = (2, 3, 4, 5, 6)  # count_at_least k tried by "auto" (k = 1 is the rule "any")
TOP_K = (1, 2, 3, 5)  # top_k_mean k tried
RULES = ("any", "count_at_least", "top_k_mean")  # simplest first: ties go to the earlier


@dataclass(frozen=True)
class FieldCandidates:
    """One annotated field as the model saw it, matched against its annotations once."""

    name: str
    scores: np.ndarray  # (n,) every candidate's score, highest first
    outcome: np.ndarray  # (n,) 1 true positive, 0 false detection, -1 neither (holds only a difficult object)
    found_at: np.ndarray  # (positives,) the score each annotated positive was found at; NaN: missed at every threshold
    top_p: np.ndarray  # the highest used crops' p(positive), descending
    n_cells: int | None = None  # red cells counted by the runtime (None: not counted)
    n_cells_annotated: int = 0  # red-cell plus positive boxes

    @property
    def n_positives(self) -> int:
        return int(len(self.found_at))

    @property
    def positive(self) -> bool:
        return self.n_positives > 0

    def n_at(self, threshold: float) -> int:
        """Detections at tile threshold ``threshold`` (right or wrong: what the runtime reports)."""
        return int(np.count_nonzero(self.scores >= threshold))


def match(candidates: Sequence[DetectedBox], truth: FieldTruth) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores, outcome, found_at)`` of one field's candidates against its truth (see the module docstring)."""
    ordered = sorted(candidates, key=lambda d: -d.score)  # stable: equal scores keep the runtime's order
    positives, difficult = truth.positives, truth.difficult
    found_at = np.full(len(positives), np.nan)
    outcome = np.zeros(len(ordered), np.int8)
    for i, d in enumerate(ordered):
        def inside(c: np.ndarray) -> np.ndarray:
            return (d.x <= c[:, 0]) & (c[:, 0] < d.x + d.w) & (d.y <= c[:, 1]) & (c[:, 1] < d.y + d.h)

        free = inside(positives) & np.isnan(found_at)
        if free.any():
            centre = np.array([d.x + d.w / 2, d.y + d.h / 2])
            k = np.flatnonzero(free)[np.argmin(np.linalg.norm(positives[free] - centre, axis=1))]
            found_at[k], outcome[i] = d.score, 1
        elif inside(difficult).any():
            outcome[i] = -1
    return np.array([d.score for d in ordered], np.float64), outcome, found_at


def field_candidates_of(
    candidates: Sequence[DetectedBox], tile_p: np.ndarray, truth: FieldTruth, n_cells: int | None = None, *, keep: int = TOP_P_KEPT,
) -> FieldCandidates:
    """A field's candidates (threshold 0), its crops' p(positive) (NaN: skipped) and counted cells, scored against ``truth``."""
    scores, outcome, found_at = match(candidates, truth)
    p = np.asarray(tile_p, np.float64)
    top = np.sort(p[np.isfinite(p)])[::-1][: max(keep, TOP_P_KEPT)]
    return FieldCandidates(truth.name, scores, outcome, found_at, top, n_cells, truth.n_cells)


@dataclass(frozen=True)
class FieldRule:
    """When a field is positive: ``any`` detection, at least ``k`` (``count_at_least``), or the mean of the ``k``
    highest crop probabilities reaching ``threshold`` (``top_k_mean``): the card's ``field_rule``/``field_k``/``field_threshold``."""

    rule: str = "any"
    k: int = 1
    threshold: float | None = None  # top_k_mean only

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise InputError(f"unknown field rule {self.rule!r}; use any, count_at_least or top_k_mean")
        if self.rule == "top_k_mean" and self.threshold is None:
            raise InputError("a top_k_mean field rule needs its threshold (the mean crop probability a positive field reaches)")

    def decide(self, field: FieldCandidates, tile_threshold: float) -> bool:
        """Whether ``field`` is positive, exactly as :func:`edgedx.runtime.detections.field_decision` decides it."""
        if self.rule == "any":
            return field.n_at(tile_threshold) >= 1
        if self.rule == "count_at_least":
            return field.n_at(tile_threshold) >= self.k
        top = field.top_p[: self.k]
        return bool(len(top)) and float(top.mean()) >= float(self.threshold)  # type: ignore[arg-type]

    @property
    def order(self) -> tuple[int, int]:
        """Simplicity: any < count_at_least < top_k_mean, then the smaller k."""
        return RULES.index(self.rule), self.k

    def to_dict(self) -> dict[str, Any]:
        return {"field_rule": self.rule, "field_k": self.k, "field_threshold": self.threshold}


@dataclass(frozen=True)
class Froc:
    """Parasites found against mean false detections per field, at every distinct candidate score (descending)."""

    thresholds: np.ndarray
    found: np.ndarray
    false_per_field: np.ndarray
    n_positives: int
    n_fields: int

    def point(self, threshold: float) -> dict[str, Any]:
        """Parasites found and false detections per field at one tile threshold."""
        i = int(np.searchsorted(-self.thresholds, -threshold, side="right")) - 1  # the lowest listed threshold ≥ threshold
        found = int(self.found[i]) if i >= 0 else 0
        false = float(self.false_per_field[i]) if i >= 0 else 0.0
        return {
            "threshold": float(threshold), "found": found, "n_positives": self.n_positives,
            "sensitivity": found / self.n_positives if self.n_positives else None, "false_per_field": false,
        }

    def at_rate(self, fp_per_field: float) -> dict[str, Any]:
        """The lowest tile threshold whose false detections per field stay within ``fp_per_field``, and its point.
        ``reached`` False: even the highest candidate score gives more (the point is then at threshold 1)."""
        ok = np.flatnonzero(self.false_per_field <= fp_per_field + 1e-12)
        if len(ok):
            return {**self.point(float(self.thresholds[ok[-1]])), "reached": True}
        top = self.point(1.0)
        return {**top, "reached": top["false_per_field"] <= fp_per_field}

    def table(self, rates: Iterable[float] = FP_RATES) -> list[dict[str, Any]]:
        return [{"fp_per_field": float(r), **self.at_rate(r)} for r in rates]

    def curve(self) -> list[list[float]]:
        """``[threshold, found, false per field]`` where another parasite is first found (the FROC's corners), and the end."""
        if not len(self.thresholds):
            return []
        step = np.flatnonzero(np.diff(np.concatenate([[0], self.found])) > 0)
        keep = sorted({*step.tolist(), len(self.thresholds) - 1})
        return [[float(self.thresholds[i]), int(self.found[i]), round(float(self.false_per_field[i]), 4)] for i in keep]


def froc(fields: Sequence[FieldCandidates]) -> Froc:
    """The FROC of ``fields`` (needs at least one field)."""
    if not fields:
        raise InputError("no annotated fields to score: check that FIELDS_DIR holds the images annotations.json names")
    scores = np.concatenate([f.scores for f in fields])
    outcome = np.concatenate([f.outcome for f in fields])
    found_at = np.concatenate([f.found_at for f in fields])
    thresholds = np.unique(scores)[::-1]
    false_sorted = np.sort(scores[outcome == 0])
    found_sorted = np.sort(found_at[np.isfinite(found_at)])
    false = len(false_sorted) - np.searchsorted(false_sorted, thresholds, side="left")
    found = len(found_sorted) - np.searchsorted(found_sorted, thresholds, side="left")
    return Froc(thresholds, found.astype(np.int64), false / len(fields), int(len(found_at)), len(fields))


def proportion(k: int, n: int) -> dict[str, Any]:
    """``k / n`` with its Wilson 95% interval and counts (None when ``n`` is 0)."""
    return {"value": k / n if n else None, "ci95": wilson_interval(k, n), "counts": [int(k), int(n)]}


def field_rates(truth: np.ndarray, decided: np.ndarray) -> dict[str, Any]:
    """Field-level sensitivity and specificity (Wilson 95% intervals) and balanced accuracy (None without both kinds)."""
    truth, decided = np.asarray(truth, bool), np.asarray(decided, bool)
    sens = proportion(int(np.sum(truth & decided)), int(truth.sum()))
    spec = proportion(int(np.sum(~truth & ~decided)), int((~truth).sum()))
    both = sens["value"] is not None and spec["value"] is not None
    return {
        "n_fields": int(len(truth)), "n_positive_fields": int(truth.sum()),
        "sensitivity": sens["value"], "sensitivity_ci95": sens["ci95"], "sensitivity_counts": sens["counts"],
        "specificity": spec["value"], "specificity_ci95": spec["ci95"], "specificity_counts": spec["counts"],
        "balanced_accuracy": (sens["value"] + spec["value"]) / 2 if both else None,
    }


def per_field(fields: Sequence[FieldCandidates], tile_threshold: float, rule: FieldRule) -> dict[str, np.ndarray]:
    """Each field's figures at one operating point (arrays in field order, so two halves of a cross-fit concatenate)."""
    def column(values: Iterable[Any], dtype: Any = np.float64) -> np.ndarray:
        return np.fromiter(values, dtype, count=len(fields))

    return {
        "positives": column((f.n_positives for f in fields), np.int64),
        "found": column((int(np.count_nonzero(f.found_at >= tile_threshold)) for f in fields), np.int64),
        "false": column((int(np.count_nonzero((f.scores >= tile_threshold) & (f.outcome == 0))) for f in fields), np.int64),
        "detections": column((f.n_at(tile_threshold) for f in fields), np.int64),
        "truth": column((f.positive for f in fields), bool),
        "decided": column((rule.decide(f, tile_threshold) for f in fields), bool),
        "cells": column((np.nan if f.n_cells is None else f.n_cells for f in fields)),
        "cells_annotated": column((f.n_cells_annotated for f in fields)),
    }


def summarise(rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """One operating point's figures from :func:`per_field` rows: parasites found (with its Wilson interval), false
    detections per field, field sensitivity/specificity, parasitaemia and cell-count errors per field."""
    n_fields = len(rows["truth"])
    parasites = proportion(int(rows["found"].sum()), int(rows["positives"].sum()))
    point: dict[str, Any] = {
        "n_fields": n_fields, "n_parasites": parasites["counts"][1], "found": parasites["counts"][0],
        "found_share": parasites["value"], "found_share_ci95": parasites["ci95"],
        "false_per_field": float(rows["false"].sum() / n_fields) if n_fields else None,
        "field": field_rates(rows["truth"], rows["decided"]),
    }
    counted = np.isfinite(rows["cells"])
    if counted.any():
        point["parasitaemia"] = parasitaemia_errors(rows)
        diff = rows["cells"][counted] - rows["cells_annotated"][counted]
        point["cell_count"] = {
            "n_fields": int(counted.sum()), "mae": float(np.abs(diff).mean()), "bias": float(diff.mean()),
            "mean_relative_error": float(np.mean(np.abs(diff) / np.maximum(rows["cells_annotated"][counted], 1))),
        }
    return point


def parasitaemia_errors(rows: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-field parasitaemia (detections / counted cells × 100) against the annotated (positives / annotated cells
    × 100): mean absolute error in percentage points, over all fields and the positive fields alone."""
    ok = np.isfinite(rows["cells"]) & (rows["cells"] > 0) & (rows["cells_annotated"] > 0)
    estimated = 100 * rows["detections"][ok] / rows["cells"][ok]
    annotated = 100 * rows["positives"][ok] / rows["cells_annotated"][ok]
    positive = rows["truth"][ok]

    def mae(mask: np.ndarray) -> float | None:
        return float(np.abs(estimated[mask] - annotated[mask]).mean()) if mask.any() else None

    return {
        "n_fields": int(ok.sum()), "mae_points": mae(np.ones(len(estimated), bool)), "mae_points_positive_fields": mae(positive),
        "mae_points_negative_fields": mae(~positive),
        "estimated_median": float(np.median(estimated)) if len(estimated) else None,
        "annotated_median": float(np.median(annotated)) if len(annotated) else None,
    }


def operating_point(fields: Sequence[FieldCandidates], tile_threshold: float, rule: FieldRule) -> dict[str, Any]:
    """:func:`summarise` of ``fields`` at one tile threshold and field rule."""
    return {"tile_threshold": float(tile_threshold), **rule.to_dict(), **summarise(per_field(fields, tile_threshold, rule))}


def card_rule(card: ModelCard) -> tuple[float, FieldRule]:
    """The tile threshold and field rule a card's detection settings mean, with the runtime's defaults
    (:func:`edgedx.runtime.detections.find_on_field`): no tile threshold → the card's threshold (0.5 without one); a
    top_k_mean rule without its own threshold → the card's threshold (else the tile threshold)."""
    settings = card.detection
    threshold = settings.tile_threshold if settings.tile_threshold is not None else card.threshold
    threshold = 0.5 if threshold is None else threshold
    cut = settings.field_threshold if settings.field_threshold is not None else card.threshold
    cut = threshold if cut is None else cut
    return float(threshold), FieldRule(settings.field_rule, settings.field_k, float(cut) if settings.field_rule == "top_k_mean" else None)


def choose_tile_threshold(fields: Sequence[FieldCandidates], fp_per_field: float) -> float:
    """The lowest tile threshold with at most ``fp_per_field`` mean false detections per field on ``fields``."""
    if not (fp_per_field >= 0 and math.isfinite(fp_per_field)):
        raise InputError(f"--fp-per-field must be a number ≥ 0 (mean false detections per field), got {fp_per_field}")
    return float(froc(fields).at_rate(fp_per_field)["threshold"])


def rule_candidates(fields: Sequence[FieldCandidates], rule: str) -> list[FieldRule]:
    """The rules ``rule`` ("auto", or one rule whose k and threshold are fitted) may take on ``fields``."""
    if rule not in ("auto", *RULES):
        raise InputError(f"--field-rule must be auto, any, count_at_least or top_k_mean, got {rule!r}")
    rules: list[FieldRule] = []
    if rule in ("auto", "any"):
        rules.append(FieldRule("any", 1))
    if rule in ("auto", "count_at_least"):
        rules += [FieldRule("count_at_least", k) for k in ((1, *COUNT_K) if rule == "count_at_least" else COUNT_K)]
    if rule in ("auto", "top_k_mean"):
        for k in TOP_K:
            means = np.unique([float(f.top_p[:k].mean()) for f in fields if len(f.top_p)])
            cuts = np.concatenate([means[:1], (means[1:] + means[:-1]) / 2])  # the lowest mean, then between neighbours
            rules += [FieldRule("top_k_mean", k, float(c)) for c in cuts]
    return rules


def choose_field_rule(fields: Sequence[FieldCandidates], tile_threshold: float, rule: str = "auto") -> tuple[FieldRule, dict[str, Any]]:
    """The field rule (and its k, threshold) with the highest field-level balanced accuracy on ``fields`` at
    ``tile_threshold``; ties go to the simplest rule (any < count_at_least < top_k_mean, smaller k), then to the more
    sensitive setting (the lower threshold). Without both positive and negative fields nothing can be chosen: the
    asked rule's simplest form is kept and the returned note says so."""
    truth = np.array([f.positive for f in fields], bool)
    options = rule_candidates(fields, rule)
    if not options:  # top_k_mean on fields without a single used crop
        raise InputError("no field has a used crop: nothing to fit a top_k_mean rule on; check the images and the crop policy")
    if truth.all() or not truth.any():
        kind = "positive" if truth.all() else "negative"
        return options[0], {"note": f"every field is {kind}: balanced accuracy is undefined, the simplest rule is kept, not fitted"}
    best: dict[str, tuple[FieldRule, dict[str, Any]]] = {}  # per rule: its best setting, by the same tie rules
    for candidate in options:  # in order of simplicity, so a later rule must be strictly better
        rates = field_rates(truth, np.array([candidate.decide(f, tile_threshold) for f in fields], bool))
        held = best.get(candidate.rule)
        if held is None or rates["balanced_accuracy"] > held[1]["balanced_accuracy"] + 1e-12:
            best[candidate.rule] = candidate, rates
    chosen, rates = next(iter(best.values()))  # the simplest family first: a later one must be strictly better
    for candidate, candidate_rates in best.values():
        if candidate_rates["balanced_accuracy"] > rates["balanced_accuracy"] + 1e-12:
            chosen, rates = candidate, candidate_rates
    by_rule = {
        r.rule: {**r.to_dict(), **{k: v[k] for k in ("balanced_accuracy", "sensitivity", "specificity")}} for r, v in best.values()
    }
    return chosen, {"balanced_accuracy": rates["balanced_accuracy"], "n_rules_tried": len(options), "by_rule": by_rule}


def slide_point(rows: dict[str, np.ndarray], slide_ids: Sequence[str], rule: str, k: int) -> dict[str, Any]:
    """Slides scored from their fields' :func:`per_field` rows (``slide_ids`` in the same order): a slide is truly
    positive when any of its fields holds an annotated positive, and decided by the card's slide ``rule`` over its
    fields' decisions (as ``OUT.slides.jsonl`` decides it); the pooled parasitaemia (Σ detections / Σ counted cells)
    against the annotated one (Σ positives / Σ annotated cells), in percentage points.

    Why pooled: a slide's parasitaemia is read over all its fields, so one field's error counts by its cells."""
    from edgedx.runtime.detections import slide_decision

    order: dict[str, list[int]] = {}
    for i, slide in enumerate(slide_ids):
        order.setdefault(slide, []).append(i)
    listed, truth, decided, errors = [], [], [], []
    for slide, index in order.items():
        idx = np.asarray(index)
        positive, why = slide_decision([bool(d) for d in rows["decided"][idx]], rule, k)
        row: dict[str, Any] = {"slide_id": slide, "n_fields": len(idx), "truth": bool(rows["truth"][idx].any()), "positive": positive,
                               "rule": why, "parasites": int(rows["positives"][idx].sum()), "detections": int(rows["detections"][idx].sum())}
        counted = idx[np.isfinite(rows["cells"][idx]) & (rows["cells_annotated"][idx] > 0)]
        if len(counted) and rows["cells"][counted].sum() > 0:
            estimated = 100 * rows["detections"][counted].sum() / rows["cells"][counted].sum()
            annotated = 100 * rows["positives"][counted].sum() / rows["cells_annotated"][counted].sum()
            row.update(parasitaemia_percent=float(estimated), parasitaemia_annotated_percent=float(annotated))
            errors.append(abs(estimated - annotated))
        listed.append(row)
        truth.append(row["truth"])
        decided.append(positive)
    rates = field_rates(np.array(truth, bool), np.array(decided, bool))
    rates["n_slides"], rates["n_positive_slides"] = rates.pop("n_fields"), rates.pop("n_positive_fields")
    return {
        **rates, "rule": rule, "k": k, "parasitaemia_mae_points": float(np.mean(errors)) if errors else None,
        "n_slides_counted": len(errors), "per_slide": listed,
    }


def slide_truth(rows: dict[str, np.ndarray], slide_ids: Sequence[str]) -> dict[str, bool]:
    """Each slide (in order of first field) and whether it is infected: any of its fields holds an annotated positive."""
    truth: dict[str, bool] = {}
    for slide, positive in zip(slide_ids, rows["truth"]):
        truth[slide] = truth.get(slide, False) or bool(positive)
    return truth


SLIDE_K = (1, 2, 3, 4, 5)  # positive fields a slide needs, tried by choose_slide_rule (1 is the rule any_field)


def choose_slide_rule(rows: dict[str, np.ndarray], slide_ids: Sequence[str]) -> tuple[tuple[str, int], dict[str, Any]] | None:
    """The slide rule with the best slide-level balanced accuracy over ``SLIDE_K`` (ties: the smaller k, which
    misses fewer infected slides), from the fields' decisions; None when the slides are not both positive and
    negative (a rule cannot be judged on one kind)."""
    truth = slide_truth(rows, slide_ids)
    if all(truth.values()) or not any(truth.values()):
        return None
    tried = {}
    for k in SLIDE_K:
        rule = "any_field" if k == 1 else "count_at_least"
        point = slide_point(rows, slide_ids, rule, k)
        tried[k] = {key: point[key] for key in ("sensitivity", "specificity", "balanced_accuracy")}
    best = max(SLIDE_K, key=lambda k: (tried[k]["balanced_accuracy"], -k))
    return ("any_field" if best == 1 else "count_at_least", best), {"by_k": {str(k): v for k, v in tried.items()}}  # str keys: as JSON gives them back
