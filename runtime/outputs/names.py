"""Input names that survive every output: JSON Lines, CSV, the audit log and the watcher's state.

Why: file names are bytes on Linux. A share written by an older scanner holds
Latin-1 names (``M\\xfcller.png``) that are not valid UTF-8; Python keeps them as
strings with lone surrogates (PEP 383), which a UTF-8 writer refuses. Names
must also never turn into spreadsheet formulas, and a name holding U+2028 must
not split a JSON line in two.

- JSON (records, audit, state): :func:`json_line` writes a lone surrogate as the
  JSON escape ``\\udcfc``; ``json.loads`` gives back the exact string, and
  ``os.fsencode`` of it the original bytes. Every other character is written as
  itself (UTF-8).
- CSV: :func:`csv_text` shows undecodable bytes as ``\\xfc`` (readable, valid
  UTF-8) and neutralises a cell that a spreadsheet would run as a formula
  (starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return) with a
  leading apostrophe, as OWASP advises. JSON Lines stay exact.
- Reading JSON Lines: :func:`json_lines` splits on ``\\n`` only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def json_line(value: Any) -> str:
    """One JSON document on one line, valid UTF-8 whatever bytes the names held."""
    text = json.dumps(value, ensure_ascii=False)
    return text.encode("utf-8", "backslashreplace").decode("utf-8")  # only lone surrogates are escaped


def json_lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a JSON Lines text, split on newlines only (U+2028 inside a name is not a line end)."""
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield number, line


def printable_name(name: str) -> str:
    """A name as valid UTF-8 text: bytes that were not UTF-8 appear as ``\\xNN``."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def csv_text(value: Any) -> Any:
    """A CSV cell that no spreadsheet runs as a formula and that any UTF-8 reader can read; non-strings unchanged."""
    if not isinstance(value, str):
        return value
    text = printable_name(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text
