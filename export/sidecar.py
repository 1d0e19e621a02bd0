"""A card sidecar beside every artefact (``model.onnx.card.json``): the contract for clients that cannot read ONNX metadata.

Why: onnxruntime-node/-web and OpenCV DNN expose no ONNX custom metadata, so
an integrator had to parse protobuf (or the ``.ort`` flatbuffer) by hand to
find the card. The sidecar carries the card, which file it belongs to (name,
sha256, format, precision) and the self-test vectors in a plain form (raw
uint8 crops, reference probabilities as numbers) that any language reads. The
runtime refuses a sidecar that belongs to another file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgedx.card import ModelCard, sidecar_path
from edgedx.runtime.io.integrity import atomic_write_bytes, sha256_file
from edgedx.runtime.selftest import SelfTestVectors

SIDECAR_FORMAT = 1


def write_card_sidecar(
    path: Path, card: ModelCard, fmt: str, precision: str, vectors: SelfTestVectors | None, int8_flavour: dict[str, Any] | None = None,
) -> Path:
    """Write ``<artefact>.card.json`` beside ``path`` (after the artefact's last byte is written: it holds its sha256).

    An int8 file's sidecar says its flavour: how it is quantised and which engines it is meant for.
    """
    flavour = {"int8_flavour": int8_flavour} if int8_flavour else {}
    document = {
        "format": SIDECAR_FORMAT,
        "artefact": {"file": path.name, "sha256": sha256_file(path), "format": fmt, "precision": precision, **flavour},
        "card": card.to_dict(),
        **({"selftest": vectors.to_plain()} if vectors is not None else {}),
    }
    target = sidecar_path(path)
    atomic_write_bytes(target, (json.dumps(document, indent=1, allow_nan=False) + "\n").encode("utf-8"))
    return target
