"""Expand what a user types (files, folders, globs) into an ordered list of images."""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from edgedx.errors import InputError
from edgedx.runtime.io.image_io import is_image_path

log = logging.getLogger(__name__)

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
            images = folder_images(path)
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


def folder_images(folder: Path) -> list[Path]:
    """Every entry named like an image under ``folder``, recursively, sorted.

    Entries that are not regular files (a pipe, a socket, a dangling link, a
    link loop) are kept, so each gets a record saying what it is instead of
    vanishing; a sub-folder that cannot be read is named in a warning.
    """

    def unreadable(error: OSError) -> None:
        log.warning("cannot read folder %s (%s): its images are not diagnosed; give the user running EdgeDx access to it", error.filename, error.strerror or error)

    found = []
    for root, _, names in os.walk(folder, onerror=unreadable):
        for name in names:
            path = Path(root) / name
            if is_image_path(path):
                found.append(path)
    return sorted(found)


def _suffix_hint() -> list[str]:
    return [".png", ".jpg", ".tif", "..."]
