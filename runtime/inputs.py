"""Expand what a user types (files, folders, globs) into an ordered list of images."""

from __future__ import annotations

import glob
from collections.abc import Iterable
from pathlib import Path

from edgedx.errors import InputError
from edgedx.runtime.image_io import is_image_path

_GLOB_CHARS = frozenset("*?[")


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders searched recursively for image files, globs expanded.

    Order is stable (as given; sorted within folders and globs) and duplicates
    are dropped. A path that does not exist, a glob that matches nothing, or a
    folder without images is an :class:`InputError` raised before any work.
    """
    found: dict[Path, None] = {}
    for raw in inputs:
        text = str(raw)
        path = Path(text)
        if path.is_dir():
            images = sorted(p for p in path.rglob("*") if p.is_file() and is_image_path(p))
            if not images:
                raise InputError(f"folder {path} contains no image files ({', '.join(_suffix_hint())})")
            found.update(dict.fromkeys(images))
        elif path.exists():
            found[path] = None
        elif any(c in text for c in _GLOB_CHARS):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise InputError(f"pattern {text!r} matches no files")
            found.update(dict.fromkeys(files))
        else:
            raise InputError(f"input not found: {path}")
    if not found:
        raise InputError("no inputs given")
    return list(found)


def _suffix_hint() -> list[str]:
    return [".png", ".jpg", ".tif", "..."]
