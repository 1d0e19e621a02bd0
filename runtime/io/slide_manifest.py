"""Which slide each field belongs to, from a CSV manifest (``path,slide_id``).

Why: a slide's fields are not always one folder. A microscope camera may save
every patient's fields into one day folder, and a LIMS exports the slide of
each file as a list. ``edgedx diagnose --slides MANIFEST.csv`` reads that
list; the slide summary (``OUT.slides.jsonl``) then pools each slide's fields
by its ``slide_id`` instead of by folder. Without ``path``-level inputs the
manifest's own paths are the inputs.

Paths are matched as absolute, normalised paths (relative ones in the manifest
are read from the manifest's folder, as for training manifests); a record
whose input the manifest does not list keeps its folder as its slide, and the
slide line says which grouping it came from (``grouped_by``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgedx.errors import InputError
from edgedx.runtime.io.manifest import read_manifest_rows

PATH_COLUMN = "path"
SLIDE_COLUMN = "slide_id"


def path_key(name: str | Path) -> str:
    """How a manifest path and a record's input are compared: absolute and normalised (not resolved: a symlinked
    share keeps the name the user gave)."""
    return os.path.normpath(os.path.abspath(str(name)))


@dataclass(frozen=True)
class SlideManifest:
    """The manifest's images in file order and the slide of each (keyed by :func:`path_key`)."""

    source: Path
    paths: tuple[Path, ...]
    slides: dict[str, str]

    def slide_of(self, input_name: str) -> str | None:
        """The slide the manifest gives ``input_name``, or None when it does not list it."""
        return self.slides.get(path_key(input_name))


def read_slide_manifest(csv_path: str | Path) -> SlideManifest:
    """Read ``path,slide_id`` rows; refuse a missing column, an empty slide id, or one path given two slides,
    naming the line and the fix."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise InputError(f"--slides {csv_path}: no such file; give a CSV with the columns {PATH_COLUMN},{SLIDE_COLUMN}")
    if not csv_path.read_bytes().strip():
        raise InputError(f"--slides {csv_path} is empty; it needs a header row ({PATH_COLUMN},{SLIDE_COLUMN}) and one row per field")
    header, rows = read_manifest_rows(csv_path)
    missing = [c for c in (PATH_COLUMN, SLIDE_COLUMN) if c not in header]
    if missing:
        raise InputError(
            f"--slides {csv_path} has no {' or '.join(missing)} column (its columns: {', '.join(header) or 'none'}); "
            f"name the image column {PATH_COLUMN} and the slide column {SLIDE_COLUMN}"
        )
    if not rows:
        raise InputError(f"--slides {csv_path} lists no fields; add one row per field image ({PATH_COLUMN},{SLIDE_COLUMN})")
    base = csv_path.parent.absolute()
    paths: list[Path] = []
    slides: dict[str, str] = {}
    for line, row in rows:
        raw, slide = str(row.get(PATH_COLUMN) or "").strip(), str(row.get(SLIDE_COLUMN) or "").strip()
        if not raw or not slide:
            empty = PATH_COLUMN if not raw else SLIDE_COLUMN
            raise InputError(f"--slides {csv_path} line {line}: the {empty} is empty; give every field its path and slide")
        path = Path(raw) if Path(raw).is_absolute() else base / raw
        key = path_key(path)
        if slides.get(key, slide) != slide:
            raise InputError(f"--slides {csv_path} line {line}: {raw} is listed under two slides ({slides[key]!r} and {slide!r}); keep one")
        if key not in slides:
            paths.append(Path(key))
        slides[key] = slide
    return SlideManifest(csv_path, tuple(paths), slides)
