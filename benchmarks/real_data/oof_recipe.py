"""The recipe path with every choice made out of fold, and the held-out result beside it.

    python benchmarks/real_data/oof_recipe.py breastmnist                 # 5 folds, the recipe's epochs
    python benchmarks/real_data/oof_recipe.py isic_mel_nv --folds 5
    python benchmarks/real_data/oof_recipe.py breastmnist --epochs 2 --folds 2   # a quick check that the chain runs

What happens, and what each number may be used for:

1. ``edgedx train --folds K`` on the training images only. The source's own
   val split (MedMNIST, malaria cells) or, for ISIC, a seeded patient-level
   quarter (``--test-fraction 0.25``) is held out of every fold and every choice.
2. The epoch is the best of the folds' mean validation curve; the threshold is
   fitted on the pooled out-of-fold predictions (with its interval). These
   out-of-fold figures were used for selection: the table says so.
3. The K fold models are averaged into one network and exported as one
   verified ONNX (``edgedx export CV_DIR``).
4. ``edgedx evaluate`` scores on the held-out split: the ensemble ONNX and
   fold 1's model alone (the ensemble's effect), at each card's own threshold,
   with bootstrap intervals. That is the result.

One JSON line per run goes to benchmarks/results/oof_recipes.jsonl and a table row is printed.
Data come from $EDGEDX_DATA or ../shared/data and never enter the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from _env import cpu_model, git_rev  # noqa: E402
from train_real_data import RECIPES, data_root, isic_manifest  # noqa: E402

from edgedx.export.ensemble import export_folds  # noqa: E402
from edgedx.export.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from edgedx.runtime.evaluate import evaluate  # noqa: E402
from edgedx.training.train import TrainConfig, train  # noqa: E402

HELD_OUT_FRACTION = 0.25  # sources without their own val split (ISIC): the quarter the old recipe validated on


def held_out_data(cv: Path, source: Path) -> tuple[Path, str]:
    """What ``evaluate`` reads for the held-out split: the .npz's own val arrays, or fold 1's run folder, whose
    ``split.json`` names the test items every fold held out."""
    return (source, "val") if source.suffix == ".npz" else (cv / "fold_1", "test")


def scored(model: Path, data: Path, split: str, out: Path) -> dict:
    """``evaluate``'s headline metrics with intervals at the artefact's own threshold."""
    m = evaluate(model, data, split=split, out=out).metrics
    keep = ("n", "accuracy", "balanced_accuracy", "auc", "macro_auc", "sensitivity", "specificity", "threshold", "ci95")
    return {k: m[k] for k in keep if k in m} | {"at_0.5": {k: v for k, v in (m.get("at_0.5") or {}).items() if k in keep}}


def run(dataset: str, folds: int, epochs: int | None, out: Path) -> dict:
    recipe = RECIPES[dataset]
    root = data_root()
    folder = out / dataset
    folder.mkdir(parents=True, exist_ok=True)
    source = isic_manifest(root, folder) if dataset == "isic_mel_nv" else root / recipe["source"]
    config = TrainConfig(weights="imagenet", seed=0, gradcam_samples=0, plots=False, overwrite=True, **recipe["config"])
    if source.suffix != ".npz":
        config = dataclasses.replace(config, test_fraction=HELD_OUT_FRACTION)
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)
    started = time.perf_counter()
    cv = train(source, folder / "cv", config, folds=folds)
    train_s = time.perf_counter() - started
    options = ExportOptions(precisions=("fp32",))
    ensemble = export_folds(folder / "cv", folder / "export_ensemble", options).onnx_path
    single = export_checkpoint(folder / "cv" / "fold_1" / "model.pt", folder / "export_fold1", options).onnx_path
    data, split = held_out_data(folder / "cv", source)
    summary = cv.summary
    row = {
        "dataset": dataset, "folds": folds, "epochs": config.epochs, "recipe": {k: v for k, v in recipe["config"].items() if k != "class_names"},
        "epoch_selection": summary["epoch_selection"],
        "out_of_fold": {k: summary["out_of_fold"][k] for k in ("n", "ci95", "threshold", "threshold_choice", "used_for")}
        | {"metrics": {k: summary["out_of_fold"]["metrics"].get(k) for k in ("accuracy", "balanced_accuracy", "auc", "macro_auc", "sensitivity", "specificity")}},
        "held_out_each_fold": summary.get("held_out_spread"),
        "held_out_ensemble": scored(ensemble, data, split, folder / "eval_ensemble"),
        "held_out_fold1": scored(single, data, split, folder / "eval_fold1"),
        "warnings": summary.get("warnings", []),
        "train_minutes": round(train_s / 60, 1), "cpu": cpu_model(), "git": git_rev(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "oof_recipes.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _ci(m: dict, key: str) -> str:
    ci95 = m.get("ci95") or {}
    value, ci = m.get(key), ci95.get(key)
    if value is None and key == "auc":  # multiclass: the macro AUC stands in
        value, ci = m.get("macro_auc"), ci or ci95.get("macro_auc")
    return "n/a" if value is None else f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def table_row(r: dict) -> str:
    oof = r["out_of_fold"]["metrics"] | {"ci95": r["out_of_fold"]["ci95"]}
    ens, one = r["held_out_ensemble"], r["held_out_fold1"]
    ss = lambda m: "" if m.get("sensitivity") is None else f"; sens {m['sensitivity']:.3f} / spec {m['specificity']:.3f} at {m['threshold']:.3g}"  # noqa: E731
    return (f"| {r['dataset']} | {r['folds']} | {r['epoch_selection']['chosen']} of {r['epochs']} | {_ci(oof, 'accuracy')} / {_ci(oof, 'auc')} | "
            f"{_ci(ens, 'accuracy')} / {_ci(ens, 'auc')}{ss(ens)} | {_ci(one, 'accuracy')} / {_ci(one, 'auc')} | {r['train_minutes']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(RECIPES))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (a quick check)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "edgedx-oof")
    args = parser.parse_args()
    if not data_root().is_dir():
        raise SystemExit(f"no data at {data_root()}: set EDGEDX_DATA to the folder holding bloodmnist/, breastmnist/, ...")
    row = run(args.dataset, args.folds, args.epochs, args.out)
    print(f"cpu: {row['cpu']}")
    print("| dataset | folds | epoch (out of fold) | out-of-fold acc / AUC [95% CI] (used for selection) | held-out ensemble acc / AUC [95% CI] | held-out fold-1 model acc / AUC | train min |")
    print("|---|---|---|---|---|---|---|")
    print(table_row(row))
    for w in row["warnings"]:
        print(f"warning: {w}")


if __name__ == "__main__":
    main()
