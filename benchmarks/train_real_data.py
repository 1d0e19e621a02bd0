"""Train EdgeDx on each real dataset in ../shared/data with a documented recipe; record validation metrics.

    python benchmarks/train_real_data.py [--datasets bloodmnist,breastmnist] [--out /tmp/edgedx-real]

Data: $EDGEDX_DATA (default ../shared/data). Checkpoints go to --out (never the
repository); one JSON line per dataset is appended to
benchmarks/results/train_real_data.jsonl and a table is printed. Metrics are on
each dataset's *validation* split (the official test splits are not available
here), selected and thresholded on validation only. Published numbers in
../shared/README.md are test-set numbers: compare with care.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from edgedx.training.train import TrainConfig, train

RESULTS = Path(__file__).parent / "results"
BLOOD = ("basophil", "eosinophil", "erythroblast", "immature_granulocytes", "lymphocyte", "monocyte", "neutrophil", "platelet")

# One recipe per dataset: ImageNet-pretrained EfficientNet-Lite0 (offline weights),
# small inputs upsampled from 28 px (MedMNIST) or cell crops, a modality preset,
# class-weighted loss, best epoch by validation balanced accuracy (AUC for binary).
# ``crop`` (TrainConfig) is the card's crop policy per modality, used in training and
# diagnose alike; ``crop_why`` says why in one line (documentation, not a TrainConfig field).
RECIPES: dict[str, dict] = {
    "bloodmnist": {
        "source": "bloodmnist/bloodmnist.npz",
        "config": dict(input_size=64, epochs=12, batch_size=64, lr=2e-3, backbone_lr_factor=0.5, augmentation="microscopy", class_names=BLOOD, monitor="accuracy", crop="scale"),
        "crop_why": "microscopy: cells keep the size they were trained at (fixed factor, sliding crops), whatever the field size",
        "published": "ACC 0.958 (ResNet-18, 28 px, scratch); 0.989 (MedMNIST+, pretrained ResNet-18, 224 px) — test set",
    },
    "pneumoniamnist": {
        "source": "pneumoniamnist/pneumoniamnist.npz",
        "config": dict(input_size=64, epochs=5, batch_size=64, lr=2e-3, augmentation="xray", class_names=("normal", "pneumonia"), monitor="auc", crop="fit"),
        "crop_why": "chest X-ray: the diagnosis needs the whole film, so the whole image is resized to the input",
        "published": "ACC 0.854 (scratch, 28 px); 0.911 (MedMNIST+, 224 px) — test set",
    },
    "breastmnist": {
        "source": "breastmnist/breastmnist.npz",
        "config": dict(input_size=96, epochs=20, batch_size=32, lr=2e-3, backbone_lr_factor=1.0, augmentation="oct", class_names=("malignant", "benign_normal"), positive_class="malignant", monitor="accuracy", crop="fit"),
        "crop_why": "ultrasound: the lesion and its surroundings make the call, so the whole frame is resized to the input",
        "published": "ACC 0.863 (scratch, 28 px); 0.872 (MedMNIST+, 224 px) — test set",
    },
    "malaria_cells_iml": {
        "source": "malaria_cells_iml/malaria_cells_iml.npz",
        "config": dict(input_size=64, epochs=4, batch_size=64, lr=2e-3, augmentation="microscopy", class_names=("uninfected", "parasitized"), monitor="auc", crop="scale"),
        "crop_why": "microscopy: a fixed factor keeps cells (and parasites) at their trained pixel size on crops or whole fields",
        # real_data/recipe.py: hard negatives and centred positives mined from the TRAINING fields (never a validation
        # field), chosen by hard_negatives_malaria.py on the validation fields' FROC (benchmarks/README.md)
        "field_mining": {"fields": 241, "rounds": 3, "epochs": 2, "positives": True},
        # real_data/recipe.py's fit-fields step: each crop blended 0.45 with its brightest grid neighbour, the weight
        # neighbour_context.py chose on 60 TRAINING fields (tile AUC, without losing detections there)
        "neighbour_context": 0.45,
        "published": "P. falciparum, patient split (Rajaraman 2018): acc 0.959, sens 0.947, spec 0.972, AUC 0.991 — other data",
    },
    "isic_mel_nv": {
        "source": "isic_mel_nv/labels.csv",
        "config": dict(input_size=192, epochs=10, batch_size=16, lr=1e-3, augmentation="dermoscopy", positive_class="melanoma", label_column="diagnosis", monitor="auc", val_fraction=0.25, crop="fit"),
        "crop_why": "dermoscopy: one lesion per photograph, so the whole image is resized to the input; sliding crops (shorter_side:192) were also run, full recipe, on the same validation split: AUC 0.804 against 0.833 for fit, a choice made on validation data",
        "published": "—",
    },
}


def data_root() -> Path:
    return Path(os.environ.get("EDGEDX_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def isic_manifest(root: Path, folder: Path) -> Path:
    """The ISIC labels.csv names images without suffix; write a manifest with real paths (outside the repo)."""
    manifest = folder / "isic_manifest.csv"
    with (root / "isic_mel_nv" / "labels.csv").open(newline="") as src, manifest.open("w", newline="") as dst:
        writer = csv.writer(dst)
        writer.writerow(["path", "diagnosis"])
        for row in csv.DictReader(src):
            writer.writerow([str(root / "isic_mel_nv" / "images" / f"{row['image']}.jpg"), row["diagnosis"]])
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(RECIPES))
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "edgedx-real")
    args = parser.parse_args()
    root = data_root()
    if not root.is_dir():
        raise SystemExit(f"no data at {root}: set EDGEDX_DATA to the folder holding bloodmnist/, pneumoniamnist/, ...")
    args.out.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.datasets.split(","):
        recipe = RECIPES[name]
        source = isic_manifest(root, args.out) if name == "isic_mel_nv" else root / recipe["source"]
        config = TrainConfig(weights="imagenet", seed=0, gradcam_samples=8, **recipe["config"])
        started = time.perf_counter()
        result = train(source, args.out / name, config)
        minutes = (time.perf_counter() - started) / 60
        m = result.card.metrics
        row = {
            "dataset": name,
            "split": "val",
            "arch": config.arch,
            "recipe": {k: v for k, v in recipe["config"].items() if k != "class_names"},
            "n_val": m.get("n"),
            "accuracy": m.get("accuracy"),
            "accuracy_at_0.5": result.best_metrics["at_0.5"]["accuracy"] if "at_0.5" in result.best_metrics else m.get("accuracy"),
            "balanced_accuracy": m.get("balanced_accuracy"),
            "auc": m.get("macro_auc"),
            "threshold": result.card.threshold,
            "sensitivity": m.get("sensitivity"),
            "specificity": m.get("specificity"),
            "best_epoch": result.best_epoch,
            "minutes": round(minutes, 1),
            "published": recipe["published"],
            "machine": f"{platform.machine()} {os.cpu_count()} cores",
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        rows.append(row)
        with (RESULTS / "train_real_data.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(f"\n{'dataset':<18} {'acc@0.5':>7} {'acc@thr':>7} {'bal.acc':>7} {'AUC':>6} {'sens':>6} {'spec':>6} {'min':>5}")
    for r in rows:
        f = lambda v: "  n/a" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{r['dataset']:<18} {f(r['accuracy_at_0.5']):>7} {f(r['accuracy']):>7} {f(r['balanced_accuracy']):>7} {f(r['auc']):>6} {f(r['sensitivity']):>6} {f(r['specificity']):>6} {r['minutes']:>5}")


if __name__ == "__main__":
    main()
