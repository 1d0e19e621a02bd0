"""Write one diagnosis record per input, as JSON Lines or CSV by the file suffix.

Records are flushed as they are written, so a long batch leaves every finished
result on disk even if it is stopped.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from edgedx.errors import InputError

FORMATS = {".jsonl": "jsonl", ".csv": "csv"}


def output_format(path: Path) -> str:
    """``jsonl`` or ``csv`` from the suffix, or an error saying which suffixes work."""
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"output {path} must end in .jsonl or .csv (got {path.suffix or 'no suffix'!r})")
    return fmt


class RecordWriter:
    """Context manager writing records ``{input, label, probabilities, n_crops, error}``."""

    def __init__(self, path: str | Path, class_names: tuple[str, ...]) -> None:
        self.path = Path(path)
        self.format = output_format(self.path)
        self.class_names = class_names
        self._file: IO[str] | None = None
        self._csv: Any = None

    def __enter__(self) -> RecordWriter:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8", newline="")
        except OSError as exc:
            raise InputError(f"cannot write output {self.path}: {exc.strerror or exc}") from None
        if self.format == "csv":
            self._csv = csv.writer(self._file)
            self._csv.writerow(["input", "label", "n_crops", "error", *(f"p_{n}" for n in self.class_names)])
        return self

    def write(self, record: dict[str, Any]) -> None:
        assert self._file is not None, "use RecordWriter as a context manager"
        if self.format == "jsonl":
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            label = record["label"]
            probs = record["probabilities"] or {}
            self._csv.writerow(
                [
                    record["input"],
                    ";".join(label) if isinstance(label, list) else (label or ""),
                    record["n_crops"] if record["n_crops"] is not None else "",
                    record["error"] or "",
                    *(probs.get(n, "") for n in self.class_names),
                ]
            )
        self._file.flush()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._file is not None:
            self._file.close()


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read back a JSON Lines output (for tests and downstream tools)."""
    with Path(path).open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
