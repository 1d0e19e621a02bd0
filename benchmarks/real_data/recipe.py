"""One command per dataset: train with its recipe, export verified artefacts, evaluate the deployed one.

    python benchmarks/real_data/recipe.py breastmnist            # the full recipe (minutes on 2 cores)
    python benchmarks/real_data/recipe.py breastmnist --epochs 1 # a quick check that the chain runs

Training uses ``RECIPES`` from ``benchmarks/train_real_data.py`` (validation-only model
selection and thresholds: the numbers this script reports were tuned on the split they are
reported on; ``real_data/oof_recipe.py`` is the path that chooses out of fold and reports
the held-out split); the export builds fp32 + fp16 ONNX verified against PyTorch
on the validation split; the fp32 artefact is then scored by ``edgedx evaluate``'s
library call on that same split (bootstrap intervals, HTML report). Data come from
$EDGEDX_DATA or ../shared/data and never enter the repository.

Then the evidence that the card describes the deployed path: the card's validation
metrics against ``evaluate``'s metrics of the fp32 ONNX on the same images (AUC and
accuracy within 0.005), and every validation image diagnosed twice — the trained
PyTorch model behind the runtime (``diagnose_probabilities``) and the ONNX artefact
(``load_model(...).stream``) — with the decisions at the card's threshold compared
(at least 99.5% identical). One JSON line per run goes to
benchmarks/results/card_vs_evaluate.jsonl and a table row is printed.
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
from _env import cpu_model, git_rev  # noqa: E402
from train_real_data import RECIPES, data_root, isic_manifest  # noqa: E402

import numpy as np  # noqa: E402

from edgedx.errors import ParityError  # noqa: E402
from edgedx.export.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from edgedx.runtime import load_model  # noqa: E402
from edgedx.runtime.evaluate import evaluate  # noqa: E402
from edgedx.runtime.io.labelled import load_labelled  # noqa: E402
from edgedx.runtime.model import decide  # noqa: E402
from edgedx.training.checkpoint import build_model, load_checkpoint  # noqa: E402
from edgedx.training.train import TrainConfig, train  # noqa: E402
from edgedx.training.validation import diagnose_probabilities  # noqa: E402

# The aims: card metrics = evaluate of the fp32 ONNX on the same validation images.
METRIC_TOLERANCE = 0.005
MIN_IDENTICAL = 0.995


def _auc(m: dict) -> float | None:
    return m.get("auc", m.get("macro_auc"))


def card_vs_evaluate(dataset: str, epochs: int, checkpoint: Path, model_path: Path, data: Path, card_metrics: dict, eval_metrics: dict, batch_size: int) -> dict:
    """Card metrics vs evaluate metrics, and per-image decisions of the PyTorch and ONNX paths."""
    ckpt = load_checkpoint(checkpoint)
    onnx = load_model(model_path, batch_size=batch_size)
    labelled = load_labelled(data, onnx.card.class_names, split="val")
    items = list(enumerate(labelled.images))
    started = time.perf_counter()
    keys_t, probs_t, failed_t = diagnose_probabilities(build_model(ckpt), ckpt.card, items, batch_size=batch_size)
    torch_s = time.perf_counter() - started
    started = time.perf_counter()
    onnx_rows = {k: r for k, r in onnx.stream(items)}
    onnx_s = time.perf_counter() - started
    failed_o = [k for k, r in onnx_rows.items() if not hasattr(r, "sliding")]
    rejected = [k for k, r in onnx_rows.items() if hasattr(r, "sliding") and r.rejected]  # the quality gate: never diagnosed
    common = [k for k in keys_t if k not in failed_o and k not in rejected]
    p_t = probs_t[[keys_t.index(k) for k in common]] if len(common) != len(keys_t) else probs_t
    p_o = np.stack([onnx_rows[k].sliding.probabilities for k in common])
    same = [decide(a, ckpt.card) == decide(b, onnx.card) for a, b in zip(p_t, p_o)]
    identical = float(np.mean(same)) if same else 0.0
    card_auc, eval_auc = _auc(card_metrics), _auc(eval_metrics)
    d_acc = abs(card_metrics["accuracy"] - eval_metrics["accuracy"])
    d_auc = abs(card_auc - eval_auc) if card_auc is not None and eval_auc is not None else None
    row = {
        "dataset": dataset, "epochs": epochs, "crop_policy": onnx.card.crop.describe(),
        "n": len(labelled), "n_card": card_metrics.get("n"), "n_evaluate": eval_metrics.get("n"), "n_compared": len(common),
        "failed": {"torch": [str(k) for k, _ in failed_t], "onnx": [str(k) for k in failed_o]},
        "rejected_by_quality_gate": len(rejected),
        "threshold": {"card": card_metrics.get("threshold", ckpt.card.threshold), "checkpoint": ckpt.card.threshold, "onnx": onnx.card.threshold},
        "card_accuracy": card_metrics["accuracy"], "evaluate_accuracy": eval_metrics["accuracy"], "abs_delta_accuracy": d_acc,
        "card_auc": card_auc, "evaluate_auc": eval_auc, "abs_delta_auc": d_auc,
        "identical_decisions": identical, "n_different": int(len(same) - sum(same)),
        "max_abs_delta_p": float(np.max(np.abs(p_t - p_o))) if len(common) else None,
        "aims": {"metric_tolerance": METRIC_TOLERANCE, "min_identical": MIN_IDENTICAL},
        "seconds": {"torch_path": round(torch_s, 1), "onnx_path": round(onnx_s, 1)},
    }
    row["passed"] = bool(
        d_acc <= METRIC_TOLERANCE and (d_auc is None or d_auc <= METRIC_TOLERANCE) and identical >= MIN_IDENTICAL
        and row["n_card"] == row["n_evaluate"] == len(common) == len(labelled) - len(rejected)
    )
    if row["n_card"] != row["n_evaluate"]:  # the card counted images diagnose refuses to decide, or the reverse
        row["why_not"] = (f"the quality gate rejects {len(rejected)} of {len(labelled)} validation images; the card's metrics "
                          f"count {row['n_card']}, evaluate scored {row['n_evaluate']}")
    row.update(cpu=cpu_model(), git=git_rev(), time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return row


def with_field_mining(config: TrainConfig, mining: dict, root: Path, run: Path) -> TrainConfig:
    """The recipe's mining step: ``mining['fields']`` TRAINING fields (seeded; never a validation field) with their
    annotations, ``rounds`` rounds of ``epochs`` epochs, the centred positive tiles too when ``positives``."""
    from hard_negatives_malaria import mining_set, training_fields  # a sibling benchmark's field selection

    images, annotations = mining_set(root, training_fields(root, mining["fields"], seed=0), run)
    return dataclasses.replace(
        config, hard_negatives=str(images), hard_negative_annotations=str(annotations), hard_negative_rounds=mining["rounds"],
        hard_negative_epochs=mining["epochs"], mine_positives=mining["positives"],
    )


def fit_validation_fields(model_path: Path, root: Path, out: Path, neighbour_context: float | None = None) -> dict:
    """The malaria recipe ships with field operating points chosen on the validation *fields* (``edgedx fit-fields``):
    the crop threshold for ≤ 1 false detection per field and the field rule, cross-fitted figures beside the fitted,
    under the recipe's neighbour context (chosen on training fields by benchmarks/neighbour_context.py)."""
    from field_localisation import validation_fields  # a sibling benchmark's field selection (benchmarks/ is on the path)

    from edgedx.export.fit_fields import FitFieldsOptions, fit_fields
    from edgedx.runtime.io.field_annotations import read_field_annotations

    fields = root / "malaria_fields_iml"
    truth = read_field_annotations(fields / "annotations.json").subset(validation_fields(root))
    report = fit_fields(model_path, fields / "images", truth, out, FitFieldsOptions(overwrite=True, neighbour_context=neighbour_context))
    return {"artefact": report.output, "detection": report.detection,
            "cross_fitted": report.cross_fitted}


def table_row(r: dict) -> str:
    f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    return (f"| {r['dataset']} | {r['crop_policy']} | {r['n']} | {f(r['card_accuracy'])} / {f(r['evaluate_accuracy'])} | "
            f"{f(r['card_auc'])} / {f(r['evaluate_auc'])} | {100 * r['identical_decisions']:.1f}% | {r['max_abs_delta_p']:.1e} | "
            f"{'yes' if r['passed'] else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(RECIPES))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "edgedx-recipes")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (for a quick check)")
    parser.add_argument("--crop", default=None, help="override the recipe's crop policy (fit, shorter_side:N, scale[:F]) to compare policies")
    parser.add_argument("--no-mining", action="store_true", help="leave out the recipe's field mining (malaria: hard negatives and centred positives)")
    args = parser.parse_args()
    root = data_root()
    if not root.is_dir():
        raise SystemExit(f"no data at {root}: set EDGEDX_DATA to the folder holding bloodmnist/, pneumoniamnist/, ...")
    recipe = RECIPES[args.dataset]
    run = args.out / args.dataset
    run.mkdir(parents=True, exist_ok=True)
    source = isic_manifest(root, run) if args.dataset == "isic_mel_nv" else root / recipe["source"]
    config = TrainConfig(weights="imagenet", seed=0, gradcam_samples=8, **recipe["config"])
    if args.crop is not None:
        config = dataclasses.replace(config, crop=args.crop)
    if args.epochs is not None:
        config = dataclasses.replace(config, epochs=args.epochs)
    if "field_mining" in recipe and not args.no_mining:
        config = with_field_mining(config, recipe["field_mining"], root, run)
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
    if args.dataset == "malaria_cells_iml":
        print(json.dumps(fit_validation_fields(model_path, root, run / "export_fields", recipe.get("neighbour_context")), indent=2))
    check = card_vs_evaluate(args.dataset, config.epochs, result.checkpoint, model_path, validation_data(run / "run", card),
                             result.card.metrics, m, config.batch_size)
    with (RESULTS / "card_vs_evaluate.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(check) + "\n")
    print("| dataset | crop policy | n | card acc / evaluate acc | card AUC / evaluate AUC | identical decisions | max abs dp | passed |")
    print(table_row(check))


if __name__ == "__main__":
    main()
