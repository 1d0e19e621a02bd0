"""Counting on whole fields: parasites found and placed, red cells counted, parasitaemia, and what it costs.

The malaria-cell model (trained on single-cell crops of the IML fields) runs
over the 52 held-out validation fields (field_localisation.py's selection)
with its card's crop policy and detection switched on
(``card.replace(detection=Detection(enabled=True, count_cells=True))``), through
``Model.stream`` as ``diagnose`` runs it. Per field it is scored against the
annotations:

a. red cells: the count (edgedx.runtime.cells) vs the annotated 'red blood
   cell' boxes (and vs those plus the infected cells' boxes). The IML
   annotations miss cells on some fields (PA171694: 56 boxes on a field of
   about 150 cells), so the rows restricted to fields whose boxes cover most of
   the cell foreground say how much of the error is the annotation's;
b. parasites: a detection is a true positive when its box holds the centre of
   an annotated parasite box (ring, trophozoite, schizont, gametocyte), each
   parasite matched once (highest score first); detections holding only a
   'difficult' centre are neither. The tile threshold is swept (detections at
   a lower threshold are a superset: NMS removes a box only for a higher one,
   so one pass at threshold 0 gives every point): parasites found at 0.5, 1
   and 2 false detections per field, and at the card threshold;
c. parasitaemia: detections / counted cells × 100 at the card threshold (and at
   the ≤ 1 false detection per field threshold of b, chosen on these same
   fields: optimistic) vs annotated parasites / annotated red cells (incl.
   infected) × 100;
d. cost: detection + cell count in milliseconds, as a share of the field's
   diagnose time (first crop cut to last crop predicted).

    python benchmarks/field_counting.py [--model MODEL.onnx] [--data DIR] [--limit N] [--nms-iou 0.3] [--scale S] [--no-save]

Prints markdown tables (with the CPU) and appends one JSON line to
benchmarks/results/field_counting.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from _env import cpu_line, cpu_model, git_rev
from field_localisation import DIFFICULT, PARASITES, data_root, validation_fields

from edgedx.card import Detection
from edgedx.runtime.backends.session import open_session
from edgedx.runtime.detections import DetectedBox, detect
from edgedx.runtime.model import Model

RESULTS = Path(__file__).parent / "results"
MODELS = (
    Path("/tmp/edgedx-real-export/malaria_cells_iml/model.onnx"),
    Path("/tmp/edgedx-recipes/malaria_cells_iml/export3/model.onnx"),
    Path("/tmp/edgedx-recipes/malaria_cells_iml/export2/model.onnx"),
)
RED_CELL = "red blood cell"
FALSE_PER_FIELD = (0.5, 1.0, 2.0)
WELL_ANNOTATED = 0.85  # share of the cell foreground inside annotated boxes for a field to count as fully annotated


def annotations(root: Path) -> dict[str, list[tuple[str, float, float, float, float]]]:
    """image name → [(type, x, y, w, h)] of every annotated object, red cells included."""
    records = json.loads((root / "malaria_fields_iml" / "annotations.json").read_text(encoding="utf-8"))
    return {
        r["image_name"]: [(o["type"], *(float(o["bbox"][k]) for k in ("x", "y", "w", "h"))) for o in r["objects"]] for r in records
    }


def annotated_share(image_rgb: np.ndarray, boxes: list[tuple[str, float, float, float, float]]) -> float:
    """Share of the field's cell foreground (Otsu on green, at half size) inside the union of its annotated boxes."""
    green = cv2.resize(image_rgb[..., 1], None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)
    _, cells = cv2.threshold(cv2.GaussianBlur(green, (3, 3), 0), 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    inside = np.zeros_like(cells)
    for _, x, y, w, h in boxes:
        inside[int(y / 2) : int((y + h) / 2) + 1, int(x / 2) : int((x + w) / 2) + 1] = 1
    return float((cells & inside).sum() / max(1, cells.sum()))


def match(found: list[DetectedBox], boxes: list[tuple[str, float, float, float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Per detection (highest score first): 1 true positive, 0 false, -1 ignored (holds only a 'difficult' centre);
    and the score each parasite was found at (NaN: missed)."""
    parasites = np.array([(x + w / 2, y + h / 2) for t, x, y, w, h in boxes if t in PARASITES]).reshape(-1, 2)
    difficult = np.array([(x + w / 2, y + h / 2) for t, x, y, w, h in boxes if t == DIFFICULT]).reshape(-1, 2)
    found_at = np.full(len(parasites), np.nan)
    outcome = np.zeros(len(found), int)
    for i, d in enumerate(found):
        def inside(c: np.ndarray) -> np.ndarray:
            return (d.x <= c[:, 0]) & (c[:, 0] < d.x + d.w) & (d.y <= c[:, 1]) & (c[:, 1] < d.y + d.h)
        free = inside(parasites) & np.isnan(found_at)
        if free.any():
            centre = np.array([d.x + d.w / 2, d.y + d.h / 2])
            k = np.flatnonzero(free)[np.argmin(np.linalg.norm(parasites[free] - centre, axis=1))]
            found_at[k], outcome[i] = d.score, 1
        elif inside(difficult).any() and not inside(parasites).any():  # a 'difficult' object: neither right nor wrong
            outcome[i] = -1
    return outcome, found_at


def run(model: Model, fields: list[str], images: Path, boxes: dict[str, list], nms_iou: float) -> list[dict[str, Any]]:
    """Every field through Model.stream: its findings at the card threshold, every candidate (threshold 0), truth."""
    pos = model.card.positive_index
    assert pos is not None
    out = []
    for name, result in model.stream(((n, images / n) for n in fields), prefetch=2):
        if isinstance(result, BaseException):
            raise result
        if result.rejected:  # the card's quality gate: no findings to score
            print(f"{name}: rejected by the quality gate ({'; '.join(result.reject_reasons)}); left out", file=sys.stderr)
            continue
        found = result.findings
        assert found is not None and found.cells is not None
        every = detect(result.sliding, pos, 0.0, nms_iou)
        outcome, found_at = match(every, boxes[name])
        image = cv2.cvtColor(cv2.imread(str(images / name)), cv2.COLOR_BGR2RGB)
        kinds = [b[0] for b in boxes[name]]
        out.append({
            "name": name, "scores": np.array([d.score for d in every]), "outcome": outcome, "found_at": found_at,
            "n_detections": len(found.detections), "cells": found.cells.count, "parasitaemia": found.parasitaemia,
            "red_boxes": kinds.count(RED_CELL), "parasites": sum(k in PARASITES for k in kinds),
            "annotated_share": annotated_share(image, boxes[name]),
            "diagnose_ms": result.timings_ms["diagnose"], "detect_ms": result.timings_ms["detect"], "count_ms": result.timings_ms["count"],
        })
    return out


def count_errors(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """Mean absolute and relative error, bias and Pearson correlation of (counted, annotated) pairs."""
    if len(pairs) < 2:
        return {"n_fields": len(pairs)}
    counted, truth = np.array(pairs, float).T
    error = counted - truth
    return {
        "n_fields": len(pairs), "mae": float(np.abs(error).mean()), "mean_relative_error": float(np.mean(np.abs(error) / np.maximum(truth, 1))),
        "bias": float(error.mean()), "correlation": float(np.corrcoef(counted, truth)[0, 1]),
        "annotated_median": float(np.median(truth)), "counted_median": float(np.median(counted)),
    }


def cells_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    well = [r for r in rows if r["annotated_share"] >= WELL_ANNOTATED]
    return {
        "vs_red_cell_boxes": count_errors([(r["cells"], r["red_boxes"]) for r in rows]),
        "vs_red_cell_and_infected_boxes": count_errors([(r["cells"], r["red_boxes"] + r["parasites"]) for r in rows]),
        "well_annotated_vs_red_cell_and_infected_boxes": count_errors([(r["cells"], r["red_boxes"] + r["parasites"]) for r in well]),
        "annotated_share_median": float(np.median([r["annotated_share"] for r in rows])),
    }


def froc(rows: list[dict[str, Any]], card_threshold: float) -> dict[str, Any]:
    """Parasites found vs false detections per field over every threshold, read at fixed rates and at the card's."""
    scores = np.concatenate([r["scores"] for r in rows])
    outcome = np.concatenate([r["outcome"] for r in rows])
    found_at = np.concatenate([r["found_at"] for r in rows])
    n_fields, n_parasites = len(rows), len(found_at)

    def at(threshold: float) -> dict[str, Any]:
        false = int(((scores >= threshold) & (outcome == 0)).sum())
        return {"threshold": threshold, "parasites_found": int((found_at >= threshold).sum()), "false_per_field": false / n_fields}

    points = sorted(set(scores.tolist()) | {1.0}, reverse=True)
    rates = {}
    for rate in FALSE_PER_FIELD:  # the lowest threshold whose false detections stay within the rate
        ok = [t for t in points if at(t)["false_per_field"] <= rate]
        rates[str(rate)] = at(min(ok)) if ok else at(1.0)
    return {"parasites": n_parasites, "at_false_per_field": rates, "at_card_threshold": at(card_threshold),
            "found_at_any_threshold": int(np.isfinite(found_at).sum())}


def parasitaemia_report(rows: list[dict[str, Any]], threshold: float | None = None) -> dict[str, Any]:
    """Per-field parasitaemia (percent) vs annotated, for all, positive and negative fields: the record's (at the card
    threshold), or with ``threshold`` the detections at that tile threshold over the same cell count."""
    def estimate(r: dict[str, Any]) -> float | None:
        if threshold is None:
            return r["parasitaemia"]["percent"]
        return 100 * int((r["scores"] >= threshold).sum()) / r["cells"] if r["cells"] else None

    def errors(subset: list[dict[str, Any]]) -> dict[str, Any]:
        pairs = [(estimate(r), 100 * r["parasites"] / max(1, r["red_boxes"] + r["parasites"])) for r in subset if estimate(r) is not None]
        if not pairs:
            return {"n_fields": 0}
        est, truth = np.array(pairs).T
        return {"n_fields": len(pairs), "mae_points": float(np.abs(est - truth).mean()), "estimated_median": float(np.median(est)),
                "annotated_median": float(np.median(truth))}
    return {"all": errors(rows), "positive_fields": errors([r for r in rows if r["parasites"]]),
            "negative_fields": errors([r for r in rows if not r["parasites"]])}


def cost_report(rows: list[dict[str, Any]]) -> dict[str, Any]:
    extra = [r["detect_ms"] + r["count_ms"] for r in rows]
    share = [e / r["diagnose_ms"] for e, r in zip(extra, rows)]
    return {
        "diagnose_ms_median": statistics.median(r["diagnose_ms"] for r in rows), "detect_ms_median": statistics.median(r["detect_ms"] for r in rows),
        "count_ms_median": statistics.median(r["count_ms"] for r in rows), "extra_share_median": statistics.median(share), "extra_share_max": max(share),
    }


def fmt(x: Any, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def print_tables(report: dict[str, Any]) -> None:
    print(f"\nCPU: {report['cpu']}; model {report['model']}; {report['n_fields']} validation fields "
          f"({report['n_positive_fields']} with parasites); crops {report['crop']}; card threshold {report['card_threshold']:.3f}, "
          f"NMS IoU {report['nms_iou']}\n")
    print("(a) Red cells counted vs annotated, per field\n\n| annotated | fields | MAE | mean relative error | bias | correlation | median annotated / counted |\n|---|---|---|---|---|---|---|")
    for key, label in (("vs_red_cell_boxes", "'red blood cell' boxes"), ("vs_red_cell_and_infected_boxes", "red + infected cell boxes"),
                       ("well_annotated_vs_red_cell_and_infected_boxes", f"red + infected, fields ≥{WELL_ANNOTATED:.0%} annotated")):
        m = report["cells"][key]
        print(f"| {label} | {m['n_fields']} | {fmt(m.get('mae'), 1)} | {fmt(m.get('mean_relative_error'), 3)} | {fmt(m.get('bias'), 1)} | "
              f"{fmt(m.get('correlation'), 3)} | {fmt(m.get('annotated_median'), 0)} / {fmt(m.get('counted_median'), 0)} |")
    f = report["parasites"]
    print(f"\n(b) Parasites found ({f['parasites']} annotated; {f['found_at_any_threshold']} inside some candidate box at any threshold)\n")
    print("| operating point | tile threshold | parasites found | false detections per field |\n|---|---|---|---|")
    for rate, m in f["at_false_per_field"].items():
        print(f"| ≤ {rate} false per field | {m['threshold']:.3f} | {m['parasites_found']} / {f['parasites']} | {m['false_per_field']:.2f} |")
    m = f["at_card_threshold"]
    print(f"| card threshold | {m['threshold']:.3f} | {m['parasites_found']} / {f['parasites']} | {m['false_per_field']:.2f} |")
    print("\n(c) Parasitaemia per field (percent) vs annotated\n\n| tile threshold | fields | n | MAE (points) | median estimated / annotated |\n|---|---|---|---|---|")
    for at, rates in (("card", report["parasitaemia"]), ("≤ 1 false/field", report["parasitaemia_at_1_false_per_field"])):
        for key, m in rates.items():
            print(f"| {at} | {key.replace('_', ' ')} | {m['n_fields']} | {fmt(m.get('mae_points'), 3)} | "
                  f"{fmt(m.get('estimated_median'), 2)} / {fmt(m.get('annotated_median'), 2)} |")
    c = report["cost"]
    print("\n(d) Cost per field (median ms)\n\n| diagnose | detect + NMS | cell count | extra share median (max) |\n|---|---|---|---|")
    print(f"| {c['diagnose_ms_median']:.0f} | {c['detect_ms_median']:.2f} | {c['count_ms_median']:.1f} | "
          f"{100 * c['extra_share_median']:.2f}% ({100 * c['extra_share_max']:.2f}%) |")


def load(path: Path, threads: int | None, batch_size: int, nms_iou: float, scale: float | None) -> Model:
    """The exported model with its own card, detection and cell counting switched on (in memory only)."""
    session = open_session(path, "cpu", threads=threads)
    session.card = session.card.replace(detection=Detection(enabled=True, count_cells=True, nms_iou=nms_iou))  # type: ignore[misc]
    return Model(session, batch_size=batch_size, quality="card", crop=None if scale is None else {"scale": scale})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the first of " + ", ".join(map(str, MODELS)) + " that exists")
    parser.add_argument("--data", type=Path, default=None, help="folder holding malaria_fields_iml/ and malaria_cells_iml/ (default $EDGEDX_DATA or ../shared/data)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N validation fields")
    parser.add_argument("--nms-iou", type=float, default=0.3)
    parser.add_argument("--scale", type=float, default=None, help="override the card's crop scale (default: the card's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    path = args.model or next((m for m in MODELS if m.is_file()), None)
    if path is None or not path.is_file():
        sys.exit(f"no model: pass --model (tried {', '.join(map(str, MODELS))}); python benchmarks/real_data/recipe.py malaria_cells_iml, then export")
    root = data_root(args.data)
    fields = validation_fields(root)[: args.limit]
    boxes = annotations(root)
    model = load(path, args.threads, args.batch_size, args.nms_iou, args.scale)
    started = time.perf_counter()
    rows = run(model, fields, root / "malaria_fields_iml" / "images", boxes, args.nms_iou)
    card = model.card
    threshold = 0.5 if card.threshold is None else card.threshold
    parasites = froc(rows, threshold)
    report = {
        "model": str(path), "n_fields": len(rows), "n_positive_fields": sum(bool(r["parasites"]) for r in rows), "card_threshold": threshold,
        "nms_iou": args.nms_iou, "crop": model.crop.describe(), "cells": cells_report(rows), "parasites": parasites,
        "parasitaemia": parasitaemia_report(rows),
        "parasitaemia_at_1_false_per_field": parasitaemia_report(rows, parasites["at_false_per_field"]["1.0"]["threshold"]),
        "cost": cost_report(rows), "seconds": round(time.perf_counter() - started, 1),
        "cpu": cpu_line(), "cpu_model": cpu_model(), "git": git_rev(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print_tables(report)
    print(f"\n{report['seconds']:.0f} s")
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        with (RESULTS / "field_counting.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(report, allow_nan=False, default=str) + "\n")


if __name__ == "__main__":
    main()
