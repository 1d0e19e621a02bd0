"""A deliverable for the vendor: one archive with the verified artefacts, their contract and how to check them.

Why: a scanner vendor or app developer receives files from a clinic engineer by
mail or a share, and must be able to tell that nothing was lost or swapped on
the way, what the model is for, and how to prove it on their hardware. The
bundle (``<stem>.edgedx-bundle.zip``) holds every verified artefact with its
checksum and card sidecar (self-test vectors inside), the export report, a
one-page README and ``MANIFEST.json`` with the sha256 of every file;
``edgedx verify BUNDLE`` checks the manifest and replays each artefact's
self-test on the machine it runs on.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

from edgedx.card import ModelCard, sidecar_path
from edgedx.runtime.io.integrity import checksum_path, sha256_file
from edgedx.runtime.selftest import BUNDLE_SUFFIX, MANIFEST


def write_bundle(out: Path, stem: str, report: dict[str, Any], card: ModelCard, files: list[Path]) -> Path:
    """Zip the verified ``files`` (with their checksum and sidecar files), the report, a README and the manifest."""
    members: list[Path] = []
    for path in files:
        members += [p for p in (path, checksum_path(path), sidecar_path(path)) if p.is_file()]
    members.append(out / "export_report.json")
    readme = bundle_readme(stem, report, card, [p.name for p in files])
    target = out / f"{stem}{BUNDLE_SUFFIX}"
    manifest = {p.name: sha256_file(p) for p in members}
    manifest["README.md"] = hashlib.sha256(readme.encode("utf-8")).hexdigest()
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in members:
            archive.write(path, path.name)
        archive.writestr("README.md", readme)
        archive.writestr(MANIFEST, json.dumps({"format": 1, "sha256": manifest}, indent=1) + "\n")
    return target


def bundle_readme(stem: str, report: dict[str, Any], card: ModelCard, files: list[str]) -> str:
    """One page: what the model is for, the contract in brief, which file to use where, how to verify."""
    threshold = (
        f"p({card.positive_class}) ≥ {card.threshold:.4g} → {card.positive_class}" if card.task == "binary" and card.threshold is not None
        else "the most probable class" if card.task == "multiclass" else f"every class with p ≥ {card.threshold}"
    )
    ships = "\n".join(f"- {r['target']}: `{r['file'] or '—'}` ({r['why']})" for r in report.get("recommendations") or [])
    return f"""# {stem}: {card.arch}, {card.task} ({', '.join(card.class_names)})

## Intended use
{card.intended_use}

## Contract (full text: each `<file>.card.json`)
- Input: RGB crops cut by the crop policy `{card.crop.describe()}`, resized to {card.input_size[0]}×{card.input_size[1]} (H×W),
  layout `{card.input_format}`, normalisation `{card.normalization.kind}`.
- Output: logits in class order {list(card.class_names)}, activation `{card.output_activation}`; crops merged by
  `{card.crop.aggregation}`.
- Decision: {threshold}.

## Files
{chr(10).join(f'- `{name}`' for name in files)}
- `export_report.json`: parity of each file against the fp32 PyTorch model, on the run's validation images.
- `MANIFEST.json`: the sha256 of every file in this bundle.

## Which file where
{ships}

## Verify on your machine
`pip install edgedx` and run `edgedx verify {stem}{BUNDLE_SUFFIX} [--device cpu|cuda|tensorrt]`: it checks every
file against the manifest and replays each model's self-test vectors (real crops with the reference
probabilities, in the `selftest` block of each `.card.json`) on this machine. Without EdgeDx, feed the
vectors' crops to your implementation and compare with `reference` within `tolerances`.
"""
