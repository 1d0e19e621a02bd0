"""An append-only audit log: which image, which model, which card, when, what result.

A clinic must be able to show, months later, that a given result came from a
given image and a given model. Each line is one JSON object with the sha256 of
the input (file bytes, or frame pixels) and of the model file (with
``names="hash"`` the file name is replaced by its sha256, for privacy), the card's
schema version and provenance, the time in UTC and the result. Lines are
appended, flushed and fsynced one by one; the log is never rewritten.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from edgedx.card import ModelCard, now_iso
from edgedx.errors import InputError
from edgedx.runtime.integrity import sha256_file
from edgedx.runtime.names import json_line


def sha256_pixels(image: np.ndarray) -> str:
    """Hash of a decoded frame: shape and dtype are included so two layouts never collide."""
    a = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{a.shape}|{a.dtype}|".encode())
    digest.update(a.data)
    return digest.hexdigest()


NAME_MODES = ("path", "hash")


class AuditLog:
    """Context manager appending one line per diagnosis to ``path``."""

    def __init__(
        self, path: str | Path, model_path: str | Path, card: ModelCard, *, names: str = "path", model_sha256: str | None = None
    ) -> None:
        if names not in NAME_MODES:
            raise InputError(f"unknown audit name mode {names!r}; choose path (file names) or hash (sha256 of each name, for privacy)")
        self.names = names
        self.path = Path(path)
        self.model = str(model_path)
        # the session's hash when the caller has it: a run reads its model file once
        self.model_sha256 = model_sha256 or (sha256_file(model_path) if Path(model_path).is_file() else None)
        self.card = card
        self._file: IO[str] | None = None

    def __enter__(self) -> AuditLog:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        except OSError as exc:
            raise InputError(f"cannot open audit log {self.path}: {exc.strerror or exc}") from None
        return self

    def append(self, record: dict[str, Any], *, input_sha256: str | None) -> None:
        assert self._file is not None, "use AuditLog as a context manager"
        entry = {
            "time": now_iso(),
            **self._name(record.get("input")),
            "frame": record.get("frame"),
            "input_sha256": input_sha256,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "card_schema_version": self.card.schema_version,
            "card_created_at": self.card.provenance.created_at,
            "arch": self.card.arch,
            "threshold": self.card.threshold,
            "result": {k: record.get(k) for k in ("label", "decision", "probabilities")},
            "error": record.get("error"),
        }
        self._file.write(json_line(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def _name(self, name: Any) -> dict[str, Any]:
        """The input's name, or with ``names="hash"`` its sha256 (file names often carry patient names)."""
        if self.names == "path" or name is None:
            return {"input": name}
        return {"input": None, "input_name_sha256": hashlib.sha256(str(name).encode("utf-8", "surrogateescape")).hexdigest()}

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._file is not None:
            self._file.close()
