"""One command per dataset: train with its recipe, export verified artefacts, evaluate the deployed one.

    python benchmarks/real_data/recipe.py breastmnist            # the full recipe (minutes on 2 cores)
    python benchmarks/real_data/recipe.py breastmnist --epochs 1 # a quick check that the chain runs

Training uses ``RECIPES`` from ``benchmarks/train_real_data.py`` (validation-only model
selection and thresholds); the export builds fp32 + fp16 ONNX verified against PyTorch
on the validation split; the fp32 artefact is then scored by ``edgedx evaluate``'s
library call on that same split (bootstrap intervals, HTML report). Data come from
$EDGEDX_DATA or ../shared/data and never enter the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from evaluate_exports import AIMS, aim_met, validation_data  # noqa: E402
from _env import git_rev  # noqa: E402
from train_real_data import RECIPES, data_root, isic_manifest  # noqa: E402

from edgedx.errors import ParityError  # noqa: E402
from edgedx.export.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from edgedx.runtime import load_model  # noqa: E402
from edgedx.runtime.evaluate import evaluate  # noqa: E402
from edgedx.training.train import TrainConfig, train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(RECIPES))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "edgedx-recipes")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (for a quick check)")
    args = parser.parse_args()
    root = data_root()
    if not root.is_dir():
        raise SystemExit(f"no data at {root}: set EDGEDX_DATA to the folder holding bloodmnist/, pneumoniamnist/, ...")
    recipe = RECIPES[args.dataset]
    run = args.out / args.dataset
    run.mkdir(parents=True, exist_ok=True)
    source = isic_manifest(root, run) if args.dataset == "isic_mel_nv" else root / recipe["source"]
    config = TrainConfig(weights="imagenet", seed=0, gradcam_samples=8, **recipe["config"])
    if args.epochs is not None:
        config = dataclasses.replace(config, epochs=args.epochs)
    started = time.perf_counter()
    result = train(source, run / "run", config)
    trained_s = time.perf_counter() - started
    try:
        export = export_checkpoint(result.checkpoint, run / "export", ExportOptions(precisions=("fp32", "fp16")))
        artefacts = export.artefacts
    except ParityError as exc:  # fp16 may be refused; the fp32 artefact is still there to evaluate
        print(f"export: {exc}")
        artefacts = json.loads((run / "export" / "export_report.json").read_text())["artefacts"]
    model_path = run / "export" / "model.onnx"
    card = load_model(model_path).card
    report = evaluate(model_path, validation_data(run / "run", card), split="val", out=run / "evaluation")
    m = report.metrics
    summary = {
        "dataset": args.dataset, "epochs": config.epochs, "train_minutes": round(trained_s / 60, 1),
        "artefacts": {a["path"]: a["parity"]["passed"] for a in artefacts},
        "n_val": m["n"], "accuracy": m["accuracy"], "accuracy_at_0.5": (m.get("at_0.5") or {}).get("accuracy"),
        "auc": m.get("auc", m.get("macro_auc")), "ci95": m.get("ci95"), "aim": AIMS[args.dataset], "aim_met": aim_met(args.dataset, m),
        "report": str(run / "evaluation" / "report.html"),
    }
    summary.update(machine=f"{platform.machine()} {os.cpu_count()} cores", git=git_rev(), time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "real_data_recipes.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(summary) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
