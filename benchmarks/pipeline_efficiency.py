"""Whole-image pipeline efficiency: tiles/s through diagnose vs tiles/s of the model alone.

Same model, same crops, same machine, one run: the ratio says how much of the
time decoding, tiling, preprocessing and merging add on top of inference.

    python benchmarks/pipeline_efficiency.py --model edgedx-demo/export/model.onnx \
        [--images DIR] [--limit 6] [--threads 2]

Images default to the real whole microscope fields in $EDGEDX_DATA (default
../shared/data)/malaria_fields_iml/images. Prints a table and writes JSON to
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path


from edgedx.runtime import load_model
from edgedx.runtime.io.image_io import read_image
from edgedx.runtime.preprocess import model_input
from edgedx.runtime.tiling import iter_tile_batches, plan_tiles, rescale

RESULTS = Path(__file__).parent / "results"


def default_images() -> Path:
    data = Path(os.environ.get("EDGEDX_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    return data / "malaria_fields_iml" / "images"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    folder = args.images or default_images()
    if not folder.is_dir():
        raise SystemExit(f"no images at {folder}: pass --images DIR or set EDGEDX_DATA to the folder holding malaria_fields_iml/")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[: args.limit]
    model = load_model(args.model, threads=args.threads, batch_size=args.batch_size)
    card = model.card

    # Model only: the exact tiles of these images, preprocessed in advance.
    inputs = []
    for p in paths:
        image = read_image(p)
        grid = plan_tiles(image.shape[0], image.shape[1], card.crop)
        inputs += [model_input(b, card) for b in iter_tile_batches(rescale(image, card.crop), grid, card.crop, args.batch_size)]
    n_tiles = sum(len(x) for x in inputs)
    model.session.run(inputs[0])  # warm-up
    start = time.perf_counter()
    for x in inputs:
        model.session.run(x)
    model_s = time.perf_counter() - start

    # Whole pipeline: decode → tile → preprocess → infer → merge, one image at a time.
    start = time.perf_counter()
    counted = sum(model.diagnose(p).n_crops for p in paths)
    pipeline_s = time.perf_counter() - start
    assert counted == n_tiles, (counted, n_tiles)

    # The same through diagnose_many: tiles of consecutive images share batches, decoding runs ahead.
    start = time.perf_counter()
    counted = sum(r.n_crops for r in model.diagnose_many(paths))
    stream_s = time.perf_counter() - start
    assert counted == n_tiles, (counted, n_tiles)

    row = {
        "model": str(args.model),
        "images": len(paths),
        "image_size": list(read_image(paths[0]).shape[:2]),
        "tiles": n_tiles,
        "tile_size": list(card.crop.tile_size),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "model_only_tiles_per_s": n_tiles / model_s,
        "pipeline_tiles_per_s": n_tiles / pipeline_s,
        "efficiency": model_s / pipeline_s,
        "stream_tiles_per_s": n_tiles / stream_s,
        "stream_efficiency": model_s / stream_s,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "providers": list(model.session.providers),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(f"{'images':>6} {'tiles':>6} {'model tiles/s':>14} {'diagnose tiles/s':>17} {'efficiency':>10} {'diagnose_many tiles/s':>22} {'efficiency':>10}")
    print(
        f"{row['images']:>6} {n_tiles:>6} {row['model_only_tiles_per_s']:>14.0f} {row['pipeline_tiles_per_s']:>17.0f} "
        f"{row['efficiency']:>10.2f} {row['stream_tiles_per_s']:>22.0f} {row['stream_efficiency']:>10.2f}"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "pipeline_efficiency.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
