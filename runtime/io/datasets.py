"""Labelled image folders (ImageFolder layout), shared by training and evaluation.

``root/<class name>/**/<image>``: one sub-folder per class, class order sorted by
name (so indices are reproducible across machines).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgedx.errors import InputError
from edgedx.runtime.io.image_io import is_image_path


@dataclass(frozen=True)
class LabelledImages:
    """Image paths with integer labels into ``class_names``."""

    class_names: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: tuple[int, ...]

    def counts(self) -> dict[str, int]:
        return {name: self.labels.count(i) for i, name in enumerate(self.class_names)}


def list_image_folder(root: str | Path, *, min_classes: int = 2) -> LabelledImages:
    """Scan an ImageFolder directory; every class folder must hold at least one image."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"data folder not found: {root}")
    if not root.is_dir():
        raise InputError(f"data must be a folder with one sub-folder per class, got a file: {root}")
    class_dirs = sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)
    if len(class_dirs) < min_classes:
        raise InputError(
            f"{root} has {len(class_dirs)} class folder(s) ({', '.join(d.name for d in class_dirs) or 'none'}); "
            f"put the images of each class in its own sub-folder, at least {min_classes} classes"
        )
    paths: list[Path] = []
    labels: list[int] = []
    for index, folder in enumerate(class_dirs):
        images = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p))
        if not images:
            raise InputError(f"class folder {folder} contains no images; remove it or add images")
        paths.extend(images)
        labels.extend([index] * len(images))
    return LabelledImages(tuple(d.name for d in class_dirs), tuple(paths), tuple(labels))
