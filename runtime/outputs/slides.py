"""One line per slide: its fields' decisions, detections and pooled parasitaemia, and the slide's decision.

Why: a clinic treats a patient, not a field. A thin smear is read over many
fields, and a sparse infection shows on a few of them only, so the slide's
answer pools its fields: the card's ``slide_rule`` over the fields' decisions
(:func:`edgedx.runtime.detections.slide_decision`) and one parasitaemia over
all counted cells (Σ parasites / Σ red cells × 100, with its Wilson interval:
far tighter than any one field's).

Fields belong to the slide a ``--slides`` manifest gives them
(:mod:`edgedx.runtime.io.slide_manifest`), else to their parent folder (one
folder per slide, as a scanner or a microscope camera saves them); video and
camera frames to their stream. Each line says which (``grouped_by``). Written from the records file itself at the end of a run, so a resumed
run's summary covers every record, the earlier ones included.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterable
from pathlib import Path, PurePath
from typing import Any

from edgedx.card import ModelCard
from edgedx.runtime.cells import parasitaemia
from edgedx.runtime.detections import slide_decision
from edgedx.runtime.io.integrity import atomic_path
from edgedx.runtime.io.slide_manifest import SlideManifest
from edgedx.runtime.outputs.records import output_format, read_records

FRAME_MARK = "#frame="
log = logging.getLogger(__name__)


def slides_path(out: Path) -> Path:
    """``OUT.slides.jsonl`` beside the records file (as ``OUT.run.json``)."""
    return out.with_name(out.name + ".slides.jsonl")


def slide_of(input_name: str) -> str:
    """The slide an input belongs to: a frame's stream, else the file's parent folder ("." for a bare name)."""
    if FRAME_MARK in input_name:
        return input_name.split(FRAME_MARK, 1)[0]
    return str(PurePath(input_name).parent)


def grouping(input_name: str, manifest: SlideManifest | None) -> tuple[str, str]:
    """(slide id, how it was found: manifest, stream or folder) for one record's input."""
    listed = manifest.slide_of(input_name) if manifest is not None and FRAME_MARK not in input_name else None
    if listed is not None:
        return listed, "manifest"
    return slide_of(input_name), "stream" if FRAME_MARK in input_name else "folder"


def field_rows(out: Path) -> list[dict[str, Any]]:
    """Per record of ``out`` (JSONL or CSV): input, whether it was diagnosed, its field decision, detections, cells."""
    if output_format(out) == "jsonl":
        return [_from_json(r) for r in read_records(out)]
    with out.open(encoding="utf-8", newline="") as f:
        return [_from_csv(r) for r in csv.DictReader(f)]


def _from_json(record: dict[str, Any]) -> dict[str, Any]:
    rate = record.get("parasitaemia") or {}
    cells = record.get("cells") or {}
    return {
        "input": str(record.get("input")), "decision": record.get("decision"), "error": record.get("error"),
        "field_positive": (record.get("field_decision") or {}).get("positive"), "n_detections": record.get("n_detections"),
        "n_cells": rate.get("n_cells", cells.get("count")),
    }


def _from_csv(row: dict[str, str]) -> dict[str, Any]:
    def number(key: str) -> int | None:
        text = (row.get(key) or "").strip()
        return int(float(text)) if text else None

    positive = (row.get("field_positive") or "").strip()
    return {
        "input": row.get("input", ""), "decision": row.get("decision") or None, "error": row.get("error") or None,
        "field_positive": None if not positive else positive == "True", "n_detections": number("n_detections"), "n_cells": number("n_cells"),
    }


def summarise_slide(slide_id: str, rows: Iterable[dict[str, Any]], card: ModelCard) -> dict[str, Any]:
    """One slide's line: fields diagnosed, rejected and failed; positive fields; detections; pooled parasitaemia over
    the fields whose cells were counted; the slide decision by the card's slide rule."""
    rows = list(rows)
    diagnosed = [r for r in rows if r["field_positive"] is not None]
    counted = [r for r in diagnosed if r["n_cells"] is not None]
    settings = card.detection
    positive, rule = slide_decision([bool(r["field_positive"]) for r in diagnosed], settings.slide_rule, settings.slide_k)
    pos = card.positive_index
    assert pos is not None  # a detection card has a positive class
    line: dict[str, Any] = {
        "slide_id": slide_id, "n_fields": len(diagnosed), "n_rejected": sum(r["decision"] == "reject" for r in rows),
        "n_failed": sum(bool(r["error"]) for r in rows), "n_positive_fields": sum(bool(r["field_positive"]) for r in diagnosed),
        "n_detections": sum(int(r["n_detections"] or 0) for r in diagnosed),
        "parasitaemia": None, "n_fields_counted": len(counted),
        "label": card.class_names[pos] if positive else card.class_names[1 - pos],
        "slide_decision": {"positive": positive, "rule": rule},
    }
    if counted:
        line["parasitaemia"] = parasitaemia(sum(int(r["n_detections"] or 0) for r in counted), sum(int(r["n_cells"]) for r in counted))
    return line


def write_slide_summary(out: Path, card: ModelCard, manifest: SlideManifest | None = None) -> Path:
    """``OUT.slides.jsonl``: one :func:`summarise_slide` line per slide, in order of first appearance, written atomically.

    With ``manifest`` its slide ids group the fields it lists; a field it does not list keeps its folder, and a
    warning counts them (a slide split in two by a forgotten row would otherwise pass unseen)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in field_rows(out):
        groups.setdefault(grouping(row["input"], manifest), []).append(row)
    if manifest is not None:
        unlisted = sum(len(rows) for (_, how), rows in groups.items() if how == "folder")
        if unlisted:
            log.warning("%d fields are not in --slides %s: each is grouped with its folder instead (grouped_by 'folder')", unlisted, manifest.source)
    lines = []
    for (slide, how), rows in groups.items():
        lines.append(json.dumps({**summarise_slide(slide, rows, card), "grouped_by": how}, ensure_ascii=False) + "\n")
    target = slides_path(out)
    with atomic_path(target) as tmp:
        tmp.write_text("".join(lines), encoding="utf-8")
    return target
