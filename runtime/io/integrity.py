"""File integrity: sha256 checksums beside model files and writes that never leave half a file.

A model copied to a scanner PC over a flaky share can arrive truncated; one
edited by mistake still loads and gives wrong answers. Export writes
``model.onnx.sha256`` (``sha256sum`` format, so ``sha256sum -c`` works too)
beside every artefact, and the runtime refuses a file that no longer matches
before it builds a session. Outputs are written to a temporary name in the same
folder and renamed, so an interrupted run never leaves a half-written file
under the real name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgedx.errors import InputError, ModelError

log = logging.getLogger(__name__)

CHECKSUM_SUFFIX = ".sha256"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (models and scans can be large)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def write_checksum(path: str | Path) -> Path:
    """Write ``<path>.sha256`` in ``sha256sum`` format; returns the checksum file."""
    path = Path(path)
    target = checksum_path(path)
    atomic_write_bytes(target, f"{sha256_file(path)}  {path.name}\n".encode())
    return target


def expected_sha256(path: str | Path) -> tuple[str, Path] | None:
    """The recorded sha256 of a model file and where it was recorded, or None when nothing records it.

    Looks at ``<path>.sha256`` first, then at an ``export_report.json`` in the
    same folder that lists the file.
    """
    path = Path(path)
    sidecar = checksum_path(path)
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace").split()
        if not text or len(text[0]) != 64 or any(c not in "0123456789abcdef" for c in text[0].lower()):
            raise ModelError(f"{sidecar} is not a sha256 checksum file; delete it or export the model again")
        return text[0].lower(), sidecar
    report = path.with_name("export_report.json")
    if report.is_file():
        try:
            artefacts = json.loads(report.read_text(encoding="utf-8")).get("artefacts", [])
        except (ValueError, AttributeError):
            return None
        for entry in artefacts if isinstance(artefacts, list) else []:
            if isinstance(entry, dict) and entry.get("path") == path.name and isinstance(entry.get("sha256"), str):
                return entry["sha256"].lower(), report
    return None


def verify_model_file(path: str | Path) -> str:
    """The model file's sha256, after refusing a file whose bytes differ from its recorded sha256.

    Sessions keep the result, so a run hashes its model once (run manifest, audit log).
    """
    path = Path(path)
    got = sha256_file(path)
    recorded = expected_sha256(path)
    if recorded is None:
        log.debug("%s: no recorded sha256 beside it; integrity not checked", path)
        return got
    want, where = recorded
    if got != want:
        raise ModelError(
            f"{path} does not match the sha256 recorded in {where.name} ({got[:12]}… ≠ {want[:12]}…, "
            f"{path.stat().st_size} bytes): the file is truncated or was changed after export; copy it again "
            "from the export folder (or re-export), never edit it in place"
        )
    return got


def atomic_write_bytes(path: str | Path, data: bytes | memoryview) -> Path:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``, on failure removed.

    Use it for writers that want a file name (``np.save``, ``cv2.imencode`` +
    ``tofile``): readers and a resumed run see the old file or the new one, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")  # suffix kept: writers pick the format by it
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
