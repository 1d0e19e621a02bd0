"""Hard-negative mining on the malaria recipe: parasites found per false detection on the validation fields, with and without.

    python benchmarks/hard_negatives_malaria.py [--mining-fields 60] [--rounds 1] [--variants plain,mined,positives] [--out /tmp/edgedx-hardneg]

1. The malaria-cell recipe (``RECIPES['malaria_cells_iml']``) is trained twice with the same seed:
   as committed, and with ``--hard-negatives`` over TRAINING fields only (fields whose cells are in
   the cell set's train split; a subset of ``--mining-fields`` of them, seeded, to keep the run short),
   their annotations telling the miner which tiles hold a parasite. The mined model trains
   ``--rounds`` × 2 epochs more than the plain one; the plain one is also run with the same
   number of extra epochs, so the comparison is mining, not training length. The ``positives``
   variant mines the same way and also adds the tiles centred on annotated parasites of those
   training fields as positives (``--mine-positives``; ``--positive-margin 0``: every tile that
   holds a parasite centre, the tile-level truth the tile AUC is scored on).
2. Each is exported (fp32) and ``edgedx fit-fields``' library call runs on the 52 VALIDATION fields
   (no validation field is mined): FROC (parasites found at 0.5/1/2/4/8 false detections per
   field) and the 2-fold cross-fitted operating point.

Appends one JSON line to benchmarks/results/hard_negatives_malaria.jsonl and prints a table
with the CPU model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "real_data"))
from _env import cpu_model, git_rev  # noqa: E402
from field_localisation import load_boxes, run_pass, score_pass, validation_fields  # noqa: E402
from train_real_data import RECIPES, data_root  # noqa: E402

from edgedx.export.fit_fields import FitFieldsOptions, fit_fields  # noqa: E402
from edgedx.export.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from edgedx.runtime import load_model  # noqa: E402
from edgedx.runtime.io.field_annotations import read_field_annotations  # noqa: E402
from edgedx.training.train import TrainConfig, train  # noqa: E402

RESULTS = HERE / "results"


def training_fields(root: Path, n: int, seed: int) -> list[str]:
    """Fields with cells in the cell set's train split and none in val, ``n`` of them at random (seeded)."""
    npz = np.load(root / "malaria_cells_iml" / "malaria_cells_iml.npz")
    train = {str(s).split(":")[0] for s in npz["train_source"]}
    val = {str(s).split(":")[0] for s in npz["val_source"]}
    names = sorted(train - val)
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(names, size=min(n, len(names)), replace=False).tolist())


def mining_set(root: Path, names: list[str], folder: Path) -> tuple[Path, Path]:
    """A folder of links to the mining fields and an annotations file holding only their entries."""
    images = folder / "mining_fields"
    images.mkdir(parents=True, exist_ok=True)
    for name in names:
        link = images / name
        if not link.exists():
            link.symlink_to(root / "malaria_fields_iml" / "images" / name)
    records = json.loads((root / "malaria_fields_iml" / "annotations.json").read_text(encoding="utf-8"))
    subset = [r for r in records if r["image_name"] in set(names)]
    annotations = folder / "mining_annotations.json"
    annotations.write_text(json.dumps(subset), encoding="utf-8")
    return images, annotations


def trained_and_scored(name: str, config: TrainConfig, root: Path, out: Path, truth) -> dict:  # noqa: ANN001
    """Train, export fp32, fit the field operating points on the validation fields; the figures."""
    started = time.perf_counter()
    result = train(root / "malaria_cells_iml" / "malaria_cells_iml.npz", out / name / "run", config)
    minutes = (time.perf_counter() - started) / 60
    model = export_checkpoint(result.checkpoint, out / name / "export", ExportOptions(precisions=("fp32",))).onnx_path
    report = fit_fields(model, root / "malaria_fields_iml" / "images", truth, out / name / "fields", FitFieldsOptions(overwrite=True))
    tiles = tile_scores(model, root)
    return {
        "tile_auc": tiles["tile_auc"], "tile_auc_clear_negatives": tiles["tile_auc_clear_negatives"],
        "tile_auc_loss_by_centre_margin": tiles["tile_auc_loss_by_centre_margin"],
        "name": name, "train_minutes": round(minutes, 1), "epochs": config.epochs, "val_cell_auc": result.card.metrics.get("macro_auc"),
        "hard_negatives": result.summary.get("hard_negatives"), "froc": report.froc, "cross_fitted": report.cross_fitted,
        "tile_threshold": report.detection["tile_threshold"],
    }


def tile_scores(model: Path, root: Path) -> dict:
    """field_localisation.py's tile figures for ``model`` on the validation fields at the card's own crop policy: a
    tile is positive when it holds a parasite box centre (the issue's tile AUC). The quality gate is off: this scores
    the model's tiles on every field (fit-fields above keeps the gate, as diagnose does)."""
    loaded = load_model(model, quality="off")
    run = run_pass(loaded, validation_fields(root), root / "malaria_fields_iml" / "images", load_boxes(root), {}, set())
    return score_pass(run, loaded.card.crop, loaded.card)["tiles"]


def appended(line: dict) -> dict:
    """``line`` with the CPU, git revision and time, appended to results/hard_negatives_malaria.jsonl."""
    line = {**line, "cpu": cpu_model(), "git": git_rev(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "hard_negatives_malaria.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(line, allow_nan=False) + "\n")
    return line


def variants(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def tiles_only(args: argparse.Namespace, root: Path) -> None:
    """The tile AUC of models a run before this one trained (rows written before the tile figures were part of a row)."""
    rows = []
    for name in variants(args.variants):
        model = args.out / name / "export" / "model.onnx"
        if not model.is_file():
            raise SystemExit(f"no exported model for {name} at {model}: run without --tiles-only first")
        tiles = tile_scores(model, root)
        keys = ("tile_auc", "tile_auc_clear_negatives", "tile_positive", "tile_negative", "tile_auc_loss_by_centre_margin")
        rows.append({"name": name, "model": str(model), **{k: tiles[k] for k in keys}})
    line = appended({"tiles_only": True, "rows": rows})
    print(f"cpu: {line['cpu']}; 52 validation fields")
    print("| model | tile AUC | tile AUC, negatives clear of parasite boxes | positive / negative tiles |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['tile_auc']:.4f} | {r['tile_auc_clear_negatives']:.4f} | {r['tile_positive']} / {r['tile_negative']} |")
    print_margin_split(rows)


def print_margin_split(rows: list[dict]) -> None:
    """1 − tile AUC split by how far inside the tile the parasite centre lies (field_localisation.auc_loss_by_margin)."""
    print("\n| model | centre inside the tile by (fraction of the side) | positive tiles | median p | share of 1 − AUC |")
    print("|---|---|---|---|---|")
    for r in rows:
        for b in r["tile_auc_loss_by_centre_margin"]:
            median = "—" if b["median_p"] is None else f"{b['median_p']:.3f}"
            print(f"| {r['name']} | {b['margin_from']:.3g}–{b['margin_to']:.3g} | {b['positive_tiles']} | {median} | {b['auc_loss']:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mining-fields", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgedx-hardneg"))
    parser.add_argument("--variants", default="plain,mined", help="comma-separated: plain, mined, positives (rows of earlier runs stay in the JSONL)")
    parser.add_argument("--positive-margin", type=float, default=0.125,
                        help="the positives variant: how far inside a tile a parasite centre must lie to mine it (0: every tile holding one)")
    parser.add_argument("--tiles-only", action="store_true", help="no training: the tile figures of each variant's model already exported under --out")
    args = parser.parse_args()
    root = data_root()
    if args.tiles_only:
        return tiles_only(args, root)
    recipe = RECIPES["malaria_cells_iml"]
    base = TrainConfig(weights="imagenet", seed=0, gradcam_samples=0, plots=False, overwrite=True, **recipe["config"])
    extra = 2 * args.rounds
    images, annotations = mining_set(root, training_fields(root, args.mining_fields, seed=0), args.out)
    truth = read_field_annotations(root / "malaria_fields_iml" / "annotations.json").subset(validation_fields(root))
    plain = dataclasses.replace(base, epochs=base.epochs + extra)  # as many epochs as the mined run in all
    mined = dataclasses.replace(base, hard_negatives=str(images), hard_negative_annotations=str(annotations),
                                hard_negative_rounds=args.rounds, hard_negative_epochs=2)
    positives = dataclasses.replace(mined, mine_positives=True, mine_positive_margin=args.positive_margin)
    configs = {"plain": plain, "mined": mined, "positives": positives}
    names = variants(args.variants)
    unknown = sorted(set(names) - set(configs))
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(configs)}")
    rows = [trained_and_scored(name, configs[name], root, args.out, truth) for name in names]
    line = appended({"mining_fields": args.mining_fields, "rounds": args.rounds, "positive_margin": args.positive_margin, "rows": rows})
    scored = rows[0]["froc"][0]["n_positives"] if rows and rows[0]["froc"] else "?"
    print(f"cpu: {line['cpu']}; 52 validation fields, {scored} parasites on the fields the quality gate passed; mining on {args.mining_fields} training fields")
    print("| model | epochs | val cell AUC | tile AUC | found at 0.5 / 1 / 2 / 4 / 8 false per field | cross-fitted at 1 false/field: found, false/field | train min |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        froc = " / ".join(str(p["found"]) for p in r["froc"])
        cf = r["cross_fitted"] or {}
        print(f"| {r['name']} | {r['epochs']}{' + mining' if r['hard_negatives'] else ''} | {r['val_cell_auc']:.4f} | {r['tile_auc']:.4f} | {froc} | "
              f"{cf.get('found', 'n/a')}, {cf.get('false_per_field', float('nan')):.2f} | {r['train_minutes']} |")
    print_margin_split(rows)


if __name__ == "__main__":
    main()
