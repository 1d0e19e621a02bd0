"""``edgedx export``: checkpoint → verified ONNX with batch norm folded and the card inside.

Convert, then verify, and return the evidence: the report records batch-norm
counts, parity numbers, sizes, hashes and versions. A model that fails parity is
not left where it could be deployed by mistake.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import edgedx
from edgedx.card import ONNX_METADATA_KEY, ModelCard
from edgedx.errors import ImageReadError, ParityError
from edgedx.export.bn_fold import assert_no_batchnorm, count_batchnorms, fold_batchnorms
from edgedx.export.onnx_export import DEFAULT_OPSET, embed_metadata, torch_to_onnx
from edgedx.export.parity import verify_onnx
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.image_io import read_image
from edgedx.runtime.preprocess import resize_to
from edgedx.training.checkpoint import build_model, file_sha256, load_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_SHA_KEY = "edgedx.checkpoint_sha256"
REPORT_NAME = "export_report.json"


@dataclass(frozen=True)
class ExportReport:
    onnx_path: Path
    report_path: Path
    data: dict[str, Any]

    @property
    def parity(self) -> dict[str, Any]:
        return self.data["parity"]["fp32"]

    @property
    def batchnorm(self) -> dict[str, int]:
        return self.data["batchnorm"]


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    parity_samples: int = 16,
    progress: ProgressFn = no_progress,
) -> ExportReport:
    """Write ``out/<checkpoint stem>.onnx`` and ``out/export_report.json``; raise ParityError on mismatch."""
    started = time.perf_counter()
    progress("export", 0, 4)
    ckpt = load_checkpoint(checkpoint)
    card = ckpt.card
    model = build_model(ckpt)
    bn_modules = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())

    graph = torch_to_onnx(model, card, opset=opset)
    progress("export", 1, 4)
    left_by_exporter = count_batchnorms(graph)
    graph, bn = fold_batchnorms(graph)
    assert_no_batchnorm(graph)
    sha = file_sha256(ckpt.path) if ckpt.path else ""
    embed_metadata(graph, {ONNX_METADATA_KEY: card.to_json(indent=None), CHECKPOINT_SHA_KEY: sha})
    graph.producer_name = "edgedx"
    graph.producer_version = edgedx.__version__
    graph.doc_string = f"EdgeDx {card.task} classifier ({card.arch}); classes: {', '.join(card.class_names)}"
    onnx.checker.check_model(graph, full_check=True)
    progress("export", 2, 4)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / f"{Path(checkpoint).stem}.onnx"
    onnx.save(graph, onnx_path)
    real = validation_crops(ckpt.path, card, limit=parity_samples // 2) if ckpt.path else None
    parity = verify_onnx(model, onnx_path, card, n_samples=parity_samples, images=real)
    progress("export", 3, 4)

    data = {
        "edgedx_version": edgedx.__version__,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha,
        "artefacts": [
            {"path": onnx_path.name, "format": "onnx", "precision": "fp32", "bytes": onnx_path.stat().st_size, "sha256": file_sha256(onnx_path)}
        ],
        "opset": opset,
        "batchnorm": {
            "in_model": bn_modules,
            "folded_by_exporter": max(0, bn_modules - left_by_exporter),
            "folded_into_conv": bn.folded_into_conv,
            "converted_to_affine": bn.converted_to_affine,
            "remaining": count_batchnorms(graph),
        },
        "parity": {"fp32": {**parity.to_dict(), "n_validation_images": 0 if real is None else len(real)}},
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, **_ort_version()},
        "card": card.to_dict(),
        "seconds": round(time.perf_counter() - started, 2),
    }
    report_path = out / REPORT_NAME
    report_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    progress("export", 4, 4)
    if not parity.passed:
        failed = onnx_path.with_name(onnx_path.name + ".failed")
        onnx_path.replace(failed)
        raise ParityError(
            f"exported model does not match PyTorch: max abs diff {parity.max_abs_diff:.3g} "
            f"(tolerance {parity.atol:g} + {parity.rtol:g}·|x|), top-1 agreement {parity.top1_agreement:.3f}; "
            f"kept as {failed} for inspection, see {report_path}"
        )
    log.info("exported %s (parity max abs diff %.2g)", onnx_path, parity.max_abs_diff)
    return ExportReport(onnx_path, report_path, data)


def validation_crops(checkpoint: Path, card: ModelCard, *, limit: int) -> np.ndarray | None:
    """Up to ``limit`` validation images of the run (from ``split.json`` beside the checkpoint), at input size.

    Parity on real images is the evidence that matters; random images fill the
    rest of the sample. Missing or unreadable files are skipped.
    """
    split = checkpoint.parent / "split.json"
    if limit < 1 or not split.is_file():
        return None
    crops = []
    for path in json.loads(split.read_text(encoding="utf-8")).get("val", [])[:limit]:
        try:
            crops.append(read_image(path))
        except ImageReadError as exc:
            log.info("parity: skipping %s", exc)
    if not crops:
        return None
    height, width = card.input_size
    return np.stack([resize_to(c, height, width, card.interpolation) for c in crops])  # RGB; parity preprocesses


def _ort_version() -> dict[str, str]:
    try:
        import onnxruntime
    except ImportError:
        return {}
    return {"onnxruntime": onnxruntime.__version__}
