"""Export the real-data models (from train_real_data.py) in fp32, fp16 and int8; record parity and accuracy deltas.

    python benchmarks/export_real_data.py [--runs /tmp/edgedx-real] [--datasets malaria_cells_iml,bloodmnist]

Each run folder holds a ``model.pt`` with its ``split.json``; every artefact is
verified against the fp32 PyTorch model on the whole validation split (up to
``--verify-samples``) and int8 is calibrated on ``--calibration-samples``
training images. Prints a table and appends one JSON line per artefact to
``benchmarks/results/export_real_data.jsonl``. A variant that fails its
tolerance is recorded as failed, not hidden.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

from edgedx.errors import ParityError
from edgedx.export.pipeline import REPORT_NAME, ExportOptions, export_checkpoint

RESULTS = Path(__file__).resolve().parent / "results" / "export_real_data.jsonl"
DATASETS = ("breastmnist", "isic_mel_nv", "pneumoniamnist", "malaria_cells_iml", "bloodmnist")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path(tempfile.gettempdir()) / "edgedx-real")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "edgedx-real-export")
    parser.add_argument("--verify-samples", type=int, default=2000)
    parser.add_argument("--calibration-samples", type=int, default=256)
    parser.add_argument("--mobile", action="store_true", help="also write and verify .ort files")
    args = parser.parse_args()

    rows = []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        checkpoint = args.runs / name / "model.pt"
        if not checkpoint.is_file():
            print(f"{name}: no checkpoint at {checkpoint}; run benchmarks/train_real_data.py first")
            continue
        options = ExportOptions(
            precisions=("fp32", "fp16", "int8"), mobile=args.mobile,
            verify_samples=args.verify_samples, calibration_samples=args.calibration_samples,
        )
        out = args.out / name
        try:
            export_checkpoint(checkpoint, out, options)
            error = None
        except ParityError as exc:
            error = str(exc)
        report = json.loads((out / REPORT_NAME).read_text(encoding="utf-8"))
        for artefact in report["artefacts"]:
            parity = artefact["parity"]
            labelled = parity["labelled"] or {}
            rows.append({
                "dataset": name,
                "arch": report["card"]["arch"],
                "input_size": report["card"]["input_size"],
                "artefact": artefact["path"],
                "precision": artefact["precision"],
                "format": artefact["format"],
                "mb": round(artefact["bytes"] / 1e6, 2),
                "export_s": artefact["seconds"],
                "n_val": parity["n_real"],
                "max_abs_diff": parity["max_abs_diff"],
                "top1_agreement": parity["top1_agreement"],
                "decision_agreement": parity["decision_agreement"],
                "max_prob_delta": parity["max_prob_delta"],
                "mean_prob_delta": parity["mean_prob_delta"],
                "accuracy": labelled.get("accuracy"),
                "accuracy_delta": labelled.get("accuracy_delta"),
                "auc": labelled.get("auc"),
                "auc_delta": labelled.get("auc_delta"),
                "passed": parity["passed"],
                "failures": parity["failures"],
                "calibration": report["calibration"],
                "versions": report["versions"],
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "error": error,
            })

    header = "| dataset | artefact | MB | val n | max abs diff | top-1 agree | decision agree | max / mean prob Δ | accuracy (Δ) | AUC (Δ) | passed |"
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        acc = "—" if r["accuracy"] is None else f"{r['accuracy']:.3f} ({r['accuracy_delta']:+.3f})"
        auc = "—" if r["auc"] is None else f"{r['auc']:.3f} ({r['auc_delta']:+.3f})"
        print(
            f"| {r['dataset']} | {r['artefact']} | {r['mb']:.1f} | {r['n_val']} | {r['max_abs_diff']:.2e} | "
            f"{r['top1_agreement']:.3f} | {r['decision_agreement']:.3f} | {r['max_prob_delta']:.3f} / {r['mean_prob_delta']:.4f} | "
            f"{acc} | {auc} | {'yes' if r['passed'] else 'NO: ' + '; '.join(r['failures'])} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"appended {len(rows)} lines to {RESULTS}")


if __name__ == "__main__":
    main()
