"""An append-only, hash-chained audit log: which image, which model, which settings, when, what result.

A clinic must be able to show, months later, that a given result came from a
given image and a given model. Each line is one JSON object with the sha256 of
the input (the file bytes that were decoded, or a frame's pixels), of the model
file, the card's schema version and provenance, every setting that shapes a
result (crop policy, threshold, refer band), the time in UTC and the result.

Evidence, not just a log:

- **Hash chain.** Each line carries ``prev_sha256``, the sha256 of the line
  before it (64 zeros for the first). :func:`verify_audit` (``edgedx audit
  verify FILE``) finds an edited, deleted, inserted or reordered line. An edit
  of the very last line is found once another line follows it; ``verify``
  prints the head hash so it can be kept elsewhere.
- **Torn lines.** A write cut off (full disk, power cut) leaves a partial last
  line; it is cut off when the log is next opened, and the next entry records
  how many bytes were dropped, so nothing is glued onto it and nothing is silent.
- **Names kept out** (``names="hash"``): file names often carry patient names. The
  entry holds a keyed hash (HMAC-SHA256) of the name, with a secret created
  beside the log on first use (``AUDIT.key``, readable by its owner only), so a
  short name cannot be found by hashing guesses; the name is also scrubbed from
  the error text. The same key gives the same hash, so one file's entries can
  still be linked.

Lines are appended, flushed and fsynced one by one; the log is never rewritten.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np

from edgedx.card import ModelCard, now_iso
from edgedx.errors import InputError
from edgedx.runtime.io.integrity import sha256_file
from edgedx.runtime.outputs.names import json_line, json_lines

log = logging.getLogger(__name__)

GENESIS = "0" * 64
NAME_MODES = ("path", "hash")
KEY_SUFFIX = ".key"


def sha256_pixels(image: np.ndarray) -> str:
    """Hash of a decoded frame: shape and dtype are included so two layouts never collide."""
    a = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{a.shape}|{a.dtype}|".encode())
    digest.update(a.data)
    return digest.hexdigest()


def line_sha256(line: str) -> str:
    """The chain's link: sha256 of one line's UTF-8 bytes, without its newline."""
    return hashlib.sha256(line.encode("utf-8")).hexdigest()


class AuditLog:
    """Context manager appending one chained line per diagnosis to ``path``."""

    def __init__(
        self,
        path: str | Path,
        model_path: str | Path,
        card: ModelCard,
        *,
        names: str = "path",
        model_sha256: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        if names not in NAME_MODES:
            raise InputError(f"unknown audit name mode {names!r}; choose path (file names) or hash (a keyed hash of each name, for privacy)")
        self.names = names
        self.path = Path(path)
        self.model = str(model_path)
        # the session's hash when the caller has it: a run reads its model file once
        self.model_sha256 = model_sha256 or (sha256_file(model_path) if Path(model_path).is_file() else None)
        self.card = card
        self.settings = dict(settings or {})
        self._file: IO[str] | None = None
        self._prev = GENESIS
        self._repaired = 0
        self._key: bytes | None = None

    def __enter__(self) -> AuditLog:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._repaired, self._prev = _repair_and_tail(self.path)
            self._file = self.path.open("a", encoding="utf-8", newline="\n")
            if self.names == "hash":
                self._key = _name_key(self.path)
        except OSError as exc:
            raise InputError(f"cannot open audit log {self.path}: {exc.strerror or exc}") from None
        if self._repaired:
            log.warning("%s ended in a torn line (%d bytes, an interrupted write); it was cut off and the next entry says so", self.path, self._repaired)
        return self

    def append(self, record: dict[str, Any], *, input_sha256: str | None) -> None:
        assert self._file is not None, "use AuditLog as a context manager"
        name = record.get("input")
        entry = {
            "time": now_iso(),
            **self._name(name),
            "frame": record.get("frame"),
            "input_sha256": input_sha256,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "card_schema_version": self.card.schema_version,
            "card_created_at": self.card.provenance.created_at,
            "arch": self.card.arch,
            "threshold": self.card.threshold,
            "settings": self.settings,
            "result": {k: record.get(k) for k in ("label", "decision", "probabilities")},
            "error": self._scrub(record.get("error"), name),
        }
        if self._repaired:
            entry["repaired_torn_line_bytes"] = self._repaired
            self._repaired = 0
        entry["prev_sha256"] = self._prev
        line = json_line(entry)
        try:
            self._file.write(line + "\n")
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError as exc:
            raise InputError(
                f"cannot write the audit log {self.path}: {exc.strerror or exc}; the results written so far are kept — "
                "free space and run the same command again (a torn line is repaired then)"
            ) from None
        self._prev = line_sha256(line)

    def _name(self, name: Any) -> dict[str, Any]:
        """The input's name, or with ``names="hash"`` its keyed hash (file names often carry patient names)."""
        if self.names == "path" or name is None:
            return {"input": name}
        assert self._key is not None
        digest = hmac.new(self._key, str(name).encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()
        return {"input": None, "input_name_hmac": digest}

    def _scrub(self, error: Any, name: Any) -> Any:
        """With hashed names, the name (full, folder-less and stem) is taken out of the error text too."""
        if self.names == "path" or not isinstance(error, str) or not name:
            return error
        text = str(name)
        for part in sorted({text, Path(text).name, Path(text).stem} - {""}, key=len, reverse=True):
            error = error.replace(part, "<input>")
        return error

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._file is not None:
            self._file.close()


def _repair_and_tail(path: Path) -> tuple[int, str]:
    """Cut a torn last line off (returning its length) and return the hash of the last complete line."""
    if not path.exists():
        return 0, GENESIS
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0, GENESIS
        tail_start = max(0, size - (1 << 20))  # entries are ~1 kB: the last complete one is in the last MiB
        f.seek(tail_start)
        tail = f.read()
        cut = tail.rfind(b"\n") + 1
        torn = len(tail) - cut
        if torn:
            f.truncate(tail_start + cut)
            f.flush()
            os.fsync(f.fileno())
        lines = tail[:cut].rstrip(b"\n").split(b"\n") if cut else []
    if not lines or not lines[-1]:
        return torn, GENESIS
    return torn, hashlib.sha256(lines[-1]).hexdigest()


def _name_key(audit: Path) -> bytes:
    """The secret for hashing names, beside the log; created on first use, readable by its owner only."""
    key_file = audit.with_name(audit.name + KEY_SUFFIX)
    try:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        text = key_file.read_text(encoding="ascii").strip()
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise InputError(f"{key_file} is not an EdgeDx audit key (64 hex digits); restore it from a backup, or move it away to start a new key") from None
    key = secrets.token_bytes(32)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(key.hex() + "\n")
    log.info("created the audit name key %s: keep it with the log (it links hashed names to files)", key_file)
    return key


@dataclass(frozen=True)
class AuditVerification:
    """What :func:`verify_audit` found."""

    path: Path
    n_lines: int
    n_unchained: int  # lines written before EdgeDx chained its log (no prev_sha256)
    head_sha256: str  # hash of the last line: keep it elsewhere to catch an edit of the last line
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_audit(path: str | Path) -> AuditVerification:
    """Walk the chain: every line must parse and name the hash of the line before it."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"audit log not found: {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read audit log {path}: {exc.strerror or exc}") from None
    problems: list[str] = []
    if data and not data.endswith(b"\n"):
        torn = len(data) - data.rfind(b"\n") - 1
        problems.append(f"the last line is torn ({torn} bytes after the last newline): an interrupted write")
    text = data.decode("utf-8", errors="replace")
    prev, n, unchained = GENESIS, 0, 0
    for number, line in json_lines(text):
        n += 1
        try:
            entry = json.loads(line)
            linked = entry.get("prev_sha256") if isinstance(entry, dict) else None
        except ValueError:
            if not (number == text.count("\n") + 1 and problems):  # the torn tail is already reported
                problems.append(f"line {number} is not a JSON entry: edited or damaged")
            prev = line_sha256(line)
            continue
        if linked is None:
            unchained += 1
        elif linked != prev:
            problems.append(f"line {number} does not follow the line before it (its prev_sha256 is {linked[:12]}…, expected {prev[:12]}…): a line was edited, deleted, inserted or moved just before it")
        prev = line_sha256(line)
    return AuditVerification(path, n, unchained, prev, problems)

