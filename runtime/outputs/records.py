"""Write one diagnosis record per input, as JSON Lines or CSV by the file suffix.

Records are flushed as they are written, so a long batch leaves every finished
result on disk even if it is stopped; :func:`completed_inputs` reads them back
(dropping a half-written last line) so a resumed batch neither loses nor
repeats a record.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from edgedx.errors import InputError
from edgedx.runtime.outputs.names import csv_text, json_line, json_lines

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "jsonl", ".csv": "csv"}
CSV_COLUMNS = (
    "input", "frame", "time_s", "label", "decision", "n_crops", "tiles_used", "tiles_skipped",
    "read_ms", "diagnose_ms", "error", "input_sha256", "overlay", "tile_map", "threshold", "rule",
    "prediction_set", "crop_dispersion", "refer_reasons", "reject_reasons", "quality_passed", "quality_measures",
    "image_um_per_px", "scale_factor",
)
FRAME_COLUMNS = ("frame", "time_s")  # only when a video or camera is among the inputs: still images have no frame
# only for a detection-enabled card (RecordWriter(detection=True)): other cards' files keep their columns.
# detections: JSON [[x, y, w, h, score], ...] in original pixels (one cell, parseable, never a formula)
DETECTION_COLUMNS = (
    "n_detections", "detections", "field_positive", "field_rule", "n_cells", "parasitaemia_percent", "parasitaemia_ci95", "decided_by",
)


def output_format(path: Path) -> str:
    """``jsonl`` or ``csv`` from the suffix, or an error saying which suffixes work."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"output {path} must end in .jsonl or .csv (got {path.suffix or 'no suffix'!r})")
    return fmt


def empty_record(input_name: str) -> dict[str, Any]:
    """Every field a record has, so JSONL and CSV consumers see the same keys whether or not it failed."""
    return {
        "input": input_name, "label": None, "decision": None, "probabilities": None, "top_k": None,
        "n_crops": None, "tiles_used": None, "tiles_skipped": None, "timings_ms": None, "error": None,
        "input_sha256": None,  # the version of the file that was diagnosed (a rewritten file is diagnosed again)
        "overlay": None, "tile_map": None,  # file names of this input's outputs, when written
        "threshold": None, "rule": None,  # the operating threshold and the decision in words
        # why a result went to a person ("refer") or was never diagnosed ("reject"; label and probabilities null)
        "prediction_set": None, "crop_dispersion": None, "refer_reasons": None, "reject_reasons": None,
        "quality": None,  # the quality gate's measures, "passed" (true/false, null when off) and "gate"
        "scale": None,  # image and trained µm/px, where the image's came from, the factor applied, a note
    }


class RecordWriter:
    """Context manager writing records (see :func:`empty_record`); ``append`` continues an existing file.

    CSV files get the ``frame`` and ``time_s`` columns only when ``frames``
    (videos or cameras among the inputs), and :data:`DETECTION_COLUMNS` only
    when ``detection`` (the card's detection is enabled); a continued CSV keeps
    the columns of its header.
    """

    def __init__(
        self, path: str | Path, class_names: tuple[str, ...], *, append: bool = False, frames: bool = False, detection: bool = False,
    ) -> None:
        self.path = Path(path)
        self.format = output_format(self.path)
        self.class_names = class_names
        self.append = append
        base = CSV_COLUMNS if frames else tuple(c for c in CSV_COLUMNS if c not in FRAME_COLUMNS)
        self.columns = (*base, *DETECTION_COLUMNS) if detection else base
        self._file: IO[str] | None = None
        self._csv: Any = None

    def __enter__(self) -> RecordWriter:
        exists = self.append and self.path.is_file() and self.path.stat().st_size > 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a" if exists else "w", encoding="utf-8", newline="")
        except OSError as exc:
            raise InputError(f"cannot write output {self.path}: {exc.strerror or exc}") from None
        if self.format == "csv":
            self._csv = csv.writer(self._file)
            if exists:
                self.columns = _header_columns(self.path, self.columns)
            else:
                self._csv.writerow([*self.columns, *(f"p_{n}" for n in self.class_names)])
        return self

    def write(self, record: dict[str, Any]) -> None:
        assert self._file is not None, "use RecordWriter as a context manager"
        try:
            if self.format == "jsonl":
                self._file.write(json_line(record) + "\n")
            else:
                self._csv.writerow(self._row(record))
            self._file.flush()
        except OSError as exc:  # disk full, share gone: stop with the path; finished records stay on disk
            raise InputError(
                f"cannot write results to {self.path}: {exc.strerror or exc}; the records written so far are kept — "
                "free space (or fix the location) and run the same command again to continue"
            ) from None

    def _row(self, record: dict[str, Any]) -> list[Any]:
        probs = record.get("probabilities") or {}
        timings = record.get("timings_ms") or {}
        quality = record.get("quality") or {}
        scale = record.get("scale") or {}
        row = {
            **{k: record.get(k) for k in CSV_COLUMNS},
            "label": _cell(record.get("label")),
            "decision": _cell(record.get("decision")),
            "read_ms": timings.get("read"),
            "diagnose_ms": timings.get("diagnose"),
            "prediction_set": _cell(record.get("prediction_set")),
            "refer_reasons": _reasons(record.get("refer_reasons")),
            "reject_reasons": _reasons(record.get("reject_reasons")),
            "quality_passed": quality.get("passed"),
            "quality_measures": "; ".join(f"{k}={v:g}" for k, v in quality.items() if isinstance(v, (int, float)) and not isinstance(v, bool)) or None,
            "image_um_per_px": scale.get("image_um_per_px"),
            "scale_factor": scale.get("factor"),
            **_detection_cells(record),
        }
        return [("" if row[k] is None else csv_text(row[k])) for k in self.columns] + [probs.get(n, "") for n in self.class_names]

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._file is None:
            return
        try:
            self._file.close()
        except OSError as error:  # the data that failed to flush is the record already reported
            if exc is None:
                raise InputError(f"cannot write results to {self.path}: {error.strerror or error}") from None


def _header_columns(path: Path, default: tuple[str, ...]) -> tuple[str, ...]:
    """The record columns of an existing CSV's header (a run continued from a file with or without frame columns)."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return default
    known = tuple(c for c in header if c in CSV_COLUMNS or c in DETECTION_COLUMNS)
    return known if "input" in known else default


def _detection_cells(record: dict[str, Any]) -> dict[str, Any]:
    """A detection record's CSV cells: the boxes as one JSON list of [x, y, w, h, score], counts and the rule as text."""
    boxes = record.get("detections")
    field = record.get("field_decision") or {}
    cells = record.get("cells") or {}
    rate = record.get("parasitaemia") or {}
    ci = rate.get("ci95")
    return {
        "n_detections": record.get("n_detections"),
        "detections": None if boxes is None else json.dumps([[*d["box"], d["score"]] for d in boxes], separators=(",", ":")),
        "field_positive": field.get("positive"),
        "field_rule": field.get("rule"),
        "n_cells": cells.get("count"),
        "parasitaemia_percent": rate.get("percent"),
        "parasitaemia_ci95": None if ci is None else f"{ci[0]:g}-{ci[1]:g}",
        "decided_by": record.get("decided_by"),
    }


def _cell(value: Any) -> Any:
    return ";".join(value) if isinstance(value, list) else value


def _reasons(value: Any) -> str | None:
    """Reasons in one cell, "; " between them (a reason may hold commas: "prediction set {a, b}"); None when none."""
    return "; ".join(value) if value else None


def record_key(name: str, path: str | Path) -> str:
    """How an input's name appears in the ``input`` field read back from ``path`` (CSV cells are made safe)."""
    return csv_text(name) if output_format(Path(path)) == "csv" else name


def completed_inputs(path: str | Path) -> set[str]:
    """The ``input`` of every complete record in an output file (empty when it does not exist), as
    :func:`record_key` writes it."""
    return set(completed_versions(path))


def completed_versions(path: str | Path) -> dict[str, set[str | None]]:
    """For every input with a complete record in ``path``: the ``input_sha256`` of each version diagnosed
    (None for records without one: failed reads, frames, files written by older EdgeDx).

    A last line cut off by an interruption is removed from the file, so the
    resumed batch writes that input's record again, once.
    """
    path = Path(path)
    fmt = output_format(path)
    if not path.is_file():
        return {}
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        log.warning("%s ends in a partial record (interrupted run); dropping it before resuming", path)
        with path.open("r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
        data = data[:cut]
    text = data.decode("utf-8")
    done: dict[str, set[str | None]] = {}
    if fmt == "jsonl":
        for n, line in json_lines(text):
            try:
                record = json.loads(line)
                done.setdefault(record["input"], set()).add(record.get("input_sha256"))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise InputError(f"{path} line {n} is not an EdgeDx record; resume needs the file this command wrote") from None
        return done
    rows = list(csv.reader(io.StringIO(text)))
    if rows and rows[0][:1] != ["input"]:
        raise InputError(f"{path} has no EdgeDx header row; resume needs the file this command wrote")
    column = rows[0].index("input_sha256") if rows and "input_sha256" in rows[0] else None
    for row in rows[1:]:
        if row:
            done.setdefault(row[0], set()).add((row[column] or None) if column is not None and column < len(row) else None)
    return done


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read back a JSON Lines output (for tests and downstream tools)."""
    return [json.loads(line) for _, line in json_lines(Path(path).read_text(encoding="utf-8"))]
