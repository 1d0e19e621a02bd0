"""Make the bundled default model: the ISIC melanoma-vs-nevus fold ensemble, fp16, with its use and its numbers stated.

    python benchmarks/real_data/oof_recipe.py isic_mel_nv --folds 3          # /tmp/edgedx-oof/isic_mel_nv/cv
    edgedx export /tmp/edgedx-oof/isic_mel_nv/cv --out /tmp/edgedx-oof/isic_mel_nv/export_bundle --precision fp32,fp16
    python benchmarks/bundle_default_model.py                                # → runtime/models/isic_mel_nv.fp16.onnx

Every choice (epoch, threshold) was made out of fold on the training images;
the held-out quarter that no fold saw is scored here on the very file that
ships (fp16, ONNX Runtime, the card's crops), and those numbers go into the
card's intended use beside the out-of-fold ones, so ``edgedx models`` shows
what the model did on images nobody tuned on. The ISIC images are CC0 and the
EfficientNet-Lite0 ImageNet weights Apache-2.0, so the derived model may be
redistributed; no image is included. fp16 is bundled because it passes its
parity tolerance at half the size; the self-test vectors export embedded stay
in the file, so ``edgedx verify`` works on it wherever it is installed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import onnx

from edgedx.card import ONNX_METADATA_KEY, ModelCard
from edgedx.export.onnx_export import embed_metadata
from edgedx.runtime.evaluate import evaluate
from edgedx.runtime.io.integrity import write_checksum

TARGET = Path(__file__).resolve().parents[1] / "runtime" / "models" / "isic_mel_nv.fp16.onnx"
OOF = Path(tempfile.gettempdir()) / "edgedx-oof" / "isic_mel_nv"


def _ci(values: list[float] | None) -> str:
    return f" [{values[0]:.2f}, {values[1]:.2f}]" if values else ""


def intended_use(card: ModelCard, held_out: dict, n_rejected: int) -> str:
    """The card's use in words: what it was trained on, how its threshold was chosen, and what it did on held-out images
    (those the quality gate refused are counted, not hidden)."""
    m, choice = card.metrics, card.threshold_choice
    chosen, youden = choice.fitted_on["chosen"], choice.fitted_on["alternatives"]["youden"]
    h_ci = held_out.get("ci95", {})
    return (
        "research and demonstration only; not a medical device. Melanoma vs nevus on dermoscopy images (ISIC archive, "
        f"CC0). An average of {card.ensemble.members} fold models trained on {m['n']} images; out-of-fold AUC {m['auc']:.2f}{_ci(m['ci95'].get('auc'))}. "
        f"Threshold {card.threshold:.3f} (95% interval {choice.interval[0]:.3f}-{choice.interval[1]:.3f}) chosen out of fold for "
        f"{choice.fitted_on['target_sensitivity']:.2f} sensitivity: out-of-fold sensitivity {chosen['sensitivity']:.2f}, "
        f"specificity {chosen['specificity']:.2f}; the Youden point {youden['threshold']:.3f} trades "
        f"{youden['sensitivity']:.2f} sensitivity for {youden['specificity']:.2f} specificity. "
        f"Held out ({held_out['n']} images no fold saw, scored on this file"
        f"{f'; {n_rejected} more refused by the quality gate' if n_rejected else ''}): AUC {held_out['auc']:.2f}{_ci(h_ci.get('auc'))}, "
        f"sensitivity {held_out['sensitivity']:.2f}{_ci(h_ci.get('sensitivity'))}, specificity {held_out['specificity']:.2f}"
        f"{_ci(h_ci.get('specificity'))} at the threshold. Do not use for patient care."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, default=OOF / "export_bundle", help="the fold ensemble's export folder")
    parser.add_argument("--held-out", type=Path, default=OOF / "cv" / "fold_1", help="a run folder whose split.json names the held-out images")
    args = parser.parse_args()
    report = json.loads((args.export / "export_report.json").read_text(encoding="utf-8"))
    entry = next((a for a in report["artefacts"] if a["precision"] == "fp16" and a["format"] == "onnx"), None)
    if entry is None or not entry["parity"]["passed"]:
        raise SystemExit(f"{args.export}: no fp16 ONNX that passed its parity check; not bundling")
    source = args.export / entry["path"]
    graph = onnx.load(str(source))
    card = ModelCard.from_json({p.key: p.value for p in graph.metadata_props}[ONNX_METADATA_KEY])
    if card.threshold_choice.source != "out_of_fold":
        raise SystemExit(f"{source}: its threshold was not chosen out of fold; export a cross-validation folder (edgedx export CV_DIR)")
    scored = evaluate(source, args.held_out, split="test", out=args.export / "eval_bundle")
    card = card.replace(intended_use=intended_use(card, scored.metrics, len(scored.rejected)))
    embed_metadata(graph, {ONNX_METADATA_KEY: card.to_json(indent=None)})  # the self-test vectors' key is kept as it was
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(TARGET))
    write_checksum(TARGET)  # the runtime verifies the shipped file against it
    print(f"{TARGET} ({TARGET.stat().st_size / 1e6:.1f} MB): parity max prob delta {entry['parity']['max_prob_delta']:.3g}")
    print(card.intended_use)


if __name__ == "__main__":
    main()
