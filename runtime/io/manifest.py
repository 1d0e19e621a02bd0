"""How a CSV manifest names its images and classes: one layout that training and evaluation both read.

Why: data arrives as it was published. ISIC's own ``labels.csv`` has an
``image`` column of ids without a suffix (``ISIC_0000000``), the images sit in
a sibling folder (``images/ISIC_0000000.jpg``) and the class is in
``diagnosis``. Rather than asking a clinic engineer to rewrite the file, the
layout says which column holds the image, where the images are and which
suffix the ids lack; ``train`` and ``evaluate`` accept the same options
(``--path-column``, ``--image-dir``, ``--suffix``, ``--label-column``) and
the layout is recorded in the card so export reloads the data the same way.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from edgedx.errors import InputError

PATH_COLUMNS: tuple[str, ...] = ("path", "image", "file", "filename")
ManifestRow = tuple[int, dict[str | None, Any]]  # (line number in the file, the row's cells)


@dataclass(frozen=True)
class ManifestLayout:
    """Which column names the image, which the class, where relative paths start and what suffix ids lack.

    ``path_column`` None looks for ``path``, ``image``, ``file`` or ``filename``;
    ``image_dir`` None reads relative paths from the manifest's folder;
    ``suffix`` (e.g. ``.jpg``) is appended to a value that does not already
    end with it.
    """

    path_column: str | None = None
    label_column: str = "label"
    image_dir: str | None = None
    suffix: str = ""

    def __post_init__(self) -> None:
        suffix = self.suffix.strip()
        if suffix and not suffix.startswith("."):
            suffix = "." + suffix
        if suffix and (suffix == "." or any(c in suffix for c in "/\\")):
            raise InputError(f"--suffix {self.suffix!r} is not a file suffix; give one like .jpg")
        object.__setattr__(self, "suffix", suffix)
        if self.image_dir is not None:
            object.__setattr__(self, "image_dir", str(Path(self.image_dir).absolute()))
        for name, value in (("path column", self.path_column), ("label column", self.label_column)):
            if value is not None and not value.strip():
                raise InputError(f"the {name} is empty; give the name of a column of the manifest")

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> ManifestLayout:
        """The layout recorded in a card's training options (keys missing in older cards take the defaults)."""
        return cls(
            path_column=options.get("path_column") or None,
            label_column=options.get("label_column") or "label",
            image_dir=options.get("image_dir") or None,
            suffix=options.get("suffix") or "",
        )

    def check_image_dir(self) -> None:
        """An --image-dir that does not exist is a typo: say so before reading thousands of rows."""
        if self.image_dir is not None and not Path(self.image_dir).is_dir():
            raise InputError(f"--image-dir {self.image_dir} is not a folder; give the folder that holds the images")

    def find_path_column(self, header: Sequence[str], name: str) -> str:
        """The column of image paths or ids, named or found; the error lists the columns there are."""
        columns = ", ".join(header)
        if self.path_column is not None:
            if self.path_column not in header:
                raise InputError(f"path column {self.path_column!r} not in {name}; columns are: {columns}")
            return self.path_column
        found = next((c for c in PATH_COLUMNS if c in header), None)
        if found is None:
            raise InputError(
                f"no image path column in {name}; expected one named {', '.join(PATH_COLUMNS)} "
                f"(or name yours with --path-column); columns are: {columns}"
            )
        return found

    def check_label_column(self, header: Sequence[str], name: str) -> None:
        if self.label_column not in header:
            raise InputError(
                f"label column {self.label_column!r} not in {name}; name the class column with --label-column; "
                f"columns are: {', '.join(header)}"
            )

    def image_path(self, value: str, manifest: Path) -> Path:
        """The absolute path of one row's image: the value, plus the missing suffix, under the image folder."""
        path = Path(value)
        if self.suffix and not path.name.lower().endswith(self.suffix.lower()):
            path = path.with_name(path.name + self.suffix)
        if path.is_absolute():
            return path
        base = Path(self.image_dir) if self.image_dir is not None else manifest.parent.absolute()
        return base / path

    def describe(self) -> str:
        """For errors about missing files: where the paths were looked for."""
        where = f"the image folder {self.image_dir}" if self.image_dir else "the manifest's folder"
        extra = f", with {self.suffix} appended" if self.suffix else ""
        return f"relative paths are read from {where}{extra} (change with --image-dir / --suffix)"


def read_manifest_rows(csv_path: Path) -> tuple[list[str], list[ManifestRow]]:
    """The stripped header and the non-blank rows with their line numbers, so errors can point at a line.

    Training and evaluation read manifests through this one function: same BOM, blank-line and encoding rules.
    """
    # utf-8-sig: spreadsheets often save a byte-order mark before the header.
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            rows: list[ManifestRow] = []
            for row in reader:
                if not any(isinstance(v, str) and v.strip() for v in row.values()):
                    continue  # blank line
                rows.append((reader.line_num, cast(dict[str | None, Any], row)))
    except UnicodeDecodeError:
        raise InputError(f"{csv_path} is not UTF-8 text; save the manifest as a UTF-8 CSV") from None
    except csv.Error as exc:
        raise InputError(f"{csv_path} is not a readable CSV ({exc}); fix the file") from None
    if not header:
        raise InputError(f"manifest {csv_path} is empty; it needs a header row (path,label) and one row per image")
    return header, rows
