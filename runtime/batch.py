"""Batch diagnosis: many inputs → one record each, the batch goes on past bad images."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from edgedx.errors import ImageReadError
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.image_io import read_image, write_image
from edgedx.runtime.inputs import expand_inputs
from edgedx.runtime.model import Diagnosis, Model, load_model
from edgedx.runtime.overlay import render_overlay
from edgedx.runtime.records import RecordWriter, output_format

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiagnoseSummary:
    """What a batch did; the records themselves are in ``out``."""

    out: Path
    n_inputs: int
    n_failed: int
    label_counts: dict[str, int]
    seconds: float
    overlays: tuple[Path, ...] = field(default=())

    @property
    def n_ok(self) -> int:
        return self.n_inputs - self.n_failed


def diagnose_paths(
    inputs: Sequence[str | Path],
    model: str | Path | Model,
    out: str | Path,
    *,
    device: str = "cpu",
    batch_size: int = 32,
    overlays: str | Path | None = None,
    progress: ProgressFn = no_progress,
) -> DiagnoseSummary:
    """Diagnose every image in ``inputs`` (files, folders, globs) and write ``out``.

    Inputs, the output suffix and the model are all checked before any image is
    read. An image that cannot be read gets a record with ``error`` set and the
    batch continues.
    """
    out = Path(out)
    output_format(out)
    paths = expand_inputs(inputs)
    loaded = model if isinstance(model, Model) else load_model(model, device=device, batch_size=batch_size)
    card = loaded.card
    overlay_dir = Path(overlays) if overlays is not None else None
    if overlay_dir is not None:
        overlay_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    labels: Counter[str] = Counter()
    failed = 0
    start = time.perf_counter()
    progress("diagnose", 0, len(paths))
    with RecordWriter(out, card.class_names) as writer:
        for done, path in enumerate(paths, 1):
            record: dict = {"input": str(path), "label": None, "probabilities": None, "n_crops": None, "error": None}
            try:
                image = read_image(path)
                result = loaded.diagnose(image)
            except ImageReadError as exc:
                failed += 1
                record["error"] = str(exc)
                log.warning("skipped %s", exc)
            else:
                record.update(result.to_record())
                labels.update(result.label if isinstance(result.label, list) else [result.label])
                if overlay_dir is not None:
                    written.append(_write_overlay(overlay_dir, path, image, result, loaded, written))
            writer.write(record)
            progress("diagnose", done, len(paths))
    seconds = time.perf_counter() - start
    log.info("diagnosed %d inputs (%d failed) in %.1fs → %s", len(paths), failed, seconds, out)
    return DiagnoseSummary(out, len(paths), failed, dict(labels), seconds, tuple(written))


def _write_overlay(folder: Path, source: Path, image, result: Diagnosis, model: Model, taken: list[Path]) -> Path:
    """One PNG per input, named after it (numbered when two inputs share a name)."""
    card = model.card
    index = card.positive_index if card.task == "binary" else card.class_names.index(_top_label(result))
    caption = f"{_caption_label(result)}  p({card.class_names[index]})={result.probabilities[card.class_names[index]]:.2f}"
    target = folder / f"{source.stem}.overlay.png"
    n = 1
    while target in taken:
        target = folder / f"{source.stem}.{n}.overlay.png"
        n += 1
    return write_image(target, render_overlay(image, result.sliding, index, caption))


def _top_label(result: Diagnosis) -> str:
    return max(result.probabilities, key=result.probabilities.__getitem__)


def _caption_label(result: Diagnosis) -> str:
    return ", ".join(result.label) if isinstance(result.label, list) else result.label
