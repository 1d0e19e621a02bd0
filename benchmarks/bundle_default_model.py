"""Make the bundled default model: the ISIC melanoma-vs-nevus recipe's fp16 export, with its use stated.

    python benchmarks/train_real_data.py --datasets isic_mel_nv      # /tmp/edgedx-real/isic_mel_nv/model.pt
    python benchmarks/export_real_data.py --datasets isic_mel_nv     # fp32/fp16/int8, verified
    python benchmarks/bundle_default_model.py                        # → runtime/models/isic_mel_nv.fp16.onnx

The ISIC images are CC0 and the EfficientNet-Lite0 ImageNet weights Apache-2.0,
so the derived model may be redistributed; no image is included. fp16 is
bundled because it passed its parity tolerance (int8 did not) at half the size.
The card keeps its validation metrics; its intended use is made specific.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import onnx

from edgedx.card import ONNX_METADATA_KEY, ModelCard
from edgedx.export.onnx_export import embed_metadata
from edgedx.runtime.io.integrity import write_checksum

TARGET = Path(__file__).resolve().parents[1] / "runtime" / "models" / "isic_mel_nv.fp16.onnx"
INTENDED_USE = (
    "research and demonstration only; not a medical device. Melanoma vs nevus on dermoscopy images "
    "(ISIC archive, CC0); trained on 291 and validated on 97 images (validation AUC 0.84), operating "
    "threshold chosen for 0.95 validation sensitivity. Do not use for patient care."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=Path(tempfile.gettempdir()) / "edgedx-real-export" / "isic_mel_nv")
    args = parser.parse_args()
    source = args.export / "model.fp16.onnx"
    report = json.loads((args.export / "export_report.json").read_text(encoding="utf-8"))
    entry = next(a for a in report["artefacts"] if a["path"] == source.name)
    if not entry["parity"]["passed"]:
        raise SystemExit(f"{source} did not pass its parity check; not bundling it")
    graph = onnx.load(str(source))
    meta = {p.key: p.value for p in graph.metadata_props}
    card = ModelCard.from_json(meta[ONNX_METADATA_KEY]).replace(intended_use=INTENDED_USE)
    embed_metadata(graph, {ONNX_METADATA_KEY: card.to_json(indent=None)})
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(TARGET))
    write_checksum(TARGET)  # the runtime verifies the shipped file against it
    print(f"{TARGET} ({TARGET.stat().st_size / 1e6:.1f} MB): parity max prob delta {entry['parity']['max_prob_delta']:.3g}, "
          f"validation AUC {card.metrics.get('auc')}")


if __name__ == "__main__":
    main()
