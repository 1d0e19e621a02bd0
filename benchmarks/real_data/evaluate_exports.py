"""Evaluate the exported artefacts of the real-data recipes on their validation splits, as deployed.

    python benchmarks/train_real_data.py          # checkpoints  → /tmp/edgedx-real/<dataset>/model.pt
    python benchmarks/export_real_data.py         # artefacts    → /tmp/edgedx-real-export/<dataset>/
    python benchmarks/real_data/evaluate_exports.py [--datasets ...] [--artefact model.onnx]

Each artefact goes through ``edgedx.runtime.evaluate.evaluate`` (the production
path: the card's crops and preprocessing, ONNX Runtime) on the validation split
the training run recorded: the ``val`` arrays of a MedMNIST-style .npz, or, for
a CSV source, a manifest of the ``val`` ids in ``split.json``. Metrics at the
card's threshold and at 0.5 with bootstrap 95% intervals; the HTML report of
each goes to --out. Prints a table against the issue's aims and appends JSON
lines to benchmarks/results/real_data_evaluation.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _env import cpu_model, git_rev  # noqa: E402

from edgedx.runtime import load_model  # noqa: E402
from edgedx.runtime.evaluate import evaluate  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results" / "real_data_evaluation.jsonl"
DATASETS = ("bloodmnist", "pneumoniamnist", "breastmnist", "malaria_cells_iml", "isic_mel_nv")
AIMS = {
    "bloodmnist": "accuracy ≥ 0.97",
    "pneumoniamnist": "accuracy ≥ 0.92 and AUC ≥ 0.97",
    "breastmnist": "accuracy ≥ 0.88",
    "malaria_cells_iml": "sensitivity ≥ 0.90 at specificity ≥ 0.95",
    "isic_mel_nv": "AUC ≥ 0.80",
}


def aim_met(name: str, m: dict) -> bool:
    at = [m, m.get("at_0.5") or {}]
    if name == "bloodmnist":
        return m["accuracy"] >= 0.97
    if name == "pneumoniamnist":
        return max(x.get("accuracy") or 0 for x in at) >= 0.92 and (m.get("auc") or 0) >= 0.97
    if name == "breastmnist":
        return max(x.get("accuracy") or 0 for x in at) >= 0.88
    if name == "malaria_cells_iml":
        return any((x.get("sensitivity") or 0) >= 0.90 and (x.get("specificity") or 0) >= 0.95 for x in at)
    return (m.get("auc") or 0) >= 0.80


def validation_data(run: Path, card) -> Path:  # noqa: ANN001
    """The .npz itself (its val arrays), or a CSV manifest of the run's val ids for a CSV/folder source."""
    source = Path(card.provenance.data_summary["source"])
    if source.suffix == ".npz":
        return source
    split = json.loads((run / "split.json").read_text(encoding="utf-8"))
    labels = {}
    with source.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            labels[str((source.parent / row["path"]).resolve())] = row[card.provenance.training.get("label_column") or "label"]
    manifest = Path(tempfile.mkdtemp(prefix="edgedx-val-")) / "val.csv"
    with manifest.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        for item in split["val"]:
            writer.writerow([item, labels[str(Path(item).resolve())]])
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=Path(tempfile.gettempdir()) / "edgedx-real")
    parser.add_argument("--exports", type=Path, default=Path(tempfile.gettempdir()) / "edgedx-real-export")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--artefact", default="model.onnx")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "edgedx-real-evaluation")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    rows = []
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        artefact = args.exports / name / args.artefact
        if not artefact.is_file():
            print(f"{name}: no {artefact}; run benchmarks/train_real_data.py and benchmarks/export_real_data.py first")
            continue
        card = load_model(artefact).card
        data = validation_data(args.runs / name, card)
        started = time.perf_counter()
        report = evaluate(artefact, data, split="val", bootstrap=args.bootstrap, out=args.out / name)
        m = report.metrics
        rows.append({
            "dataset": name, "artefact": str(artefact), "data": report.data, "n": m["n"], "threshold": report.threshold,
            "accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"], "auc": m.get("auc", m.get("macro_auc")),
            "sensitivity": m.get("sensitivity"), "specificity": m.get("specificity"), "at_0.5": m.get("at_0.5"),
            "ci95": m.get("ci95"), "aim": AIMS[name], "aim_met": aim_met(name, m), "seconds": round(time.perf_counter() - started, 1),
            "machine": cpu_model(), "commit": git_rev(),
        })
    print("| dataset | val n | accuracy at threshold [95% CI] | accuracy at 0.5 | AUC [95% CI] | sens / spec at threshold | aim | met |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ci = r["ci95"] or {}
        acc_ci = f" [{ci['accuracy'][0]:.3f}, {ci['accuracy'][1]:.3f}]" if ci.get("accuracy") else ""
        auc_ci = f" [{ci['auc'][0]:.3f}, {ci['auc'][1]:.3f}]" if ci.get("auc") else ""
        half = r["at_0.5"]["accuracy"] if r["at_0.5"] else None
        ss = "—" if r["sensitivity"] is None else f"{r['sensitivity']:.3f} / {r['specificity']:.3f}"
        print(
            f"| {r['dataset']} | {r['n']} | {r['accuracy']:.3f}{acc_ci} | {'—' if half is None else f'{half:.3f}'} | "
            f"{r['auc']:.3f}{auc_ci} | {ss} | {r['aim']} | {'yes' if r['aim_met'] else 'no'} |"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
