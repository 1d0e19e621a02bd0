"""Throughput of `diagnose --engine ray` against the local engine, same images, same model, one run.

    flock /tmp/edgedx-bench.lock python benchmarks/ray_vs_local.py [--model M.onnx] [--n 200] [--size 512] [--actors 1,2]

N synthetic microscope fields (edgedx.synthetic.render_field) are written to a
temporary folder and diagnosed by the local engine and by Ray Data with 1, 2, ...
actors, in turn. Ray is started once (its start-up is timed on its own, as a
cluster would already be running); each Ray run includes starting its actor
pool and loading the model in every actor. Every Ray run's records are checked
against the local run's (same decisions, probabilities within 1e-6). Prints a
table and writes benchmarks/results/ray_vs_local.json with the environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_model, git_rev, version
from edgedx.runtime.batch import diagnose_paths
from edgedx.runtime.bundled import bundled_model_path
from edgedx.runtime.io.image_io import write_image
from edgedx.runtime.model import load_model
from edgedx.runtime.ray_engine import diagnose_ray, read_ray_records
from edgedx.runtime.outputs.records import read_records

from edgedx.synthetic import render_field

RESULTS = Path(__file__).parent / "results" / "ray_vs_local.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="exported .onnx (default: the bundled model)")
    parser.add_argument("--n", type=int, default=200, help="images")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--actors", default="1,2", help="comma-separated actor counts to run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    model = args.model or bundled_model_path()
    cores = len(os.sched_getaffinity(0))
    card = load_model(model).card
    n_tiles = card_tiles(model, args.size)

    with tempfile.TemporaryDirectory(prefix="edgedx-ray-bench-") as tmp:
        root = Path(tmp)
        images = root / "images"
        images.mkdir()
        rng = np.random.default_rng(0)
        for k in range(args.n):
            write_image(images / f"field_{k:04d}.png", render_field(rng, args.size, args.size, infected_fraction=0.2).image)

        start = time.perf_counter()
        diagnose_paths([images], model, root / "local.jsonl", batch_size=args.batch_size)
        local_s = time.perf_counter() - start
        expected = sorted(read_records(root / "local.jsonl"), key=lambda r: r["input"])

        import ray

        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        start = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.ERROR, log_to_driver=False)
        init_s = time.perf_counter() - start
        runs = []
        try:
            for actors in (int(a) for a in args.actors.split(",")):
                cpus = min(1.0, (cores - 1) / actors)  # at least one core stays free for reading and tiling
                out = root / f"ray{actors}.jsonl"
                start = time.perf_counter()
                diagnose_ray([images], model, out, actors=actors, cpus_per_actor=cpus, batch_size=args.batch_size)
                seconds = time.perf_counter() - start
                agree = same_records(expected, read_ray_records(out))
                runs.append({"actors": actors, "cpus_per_actor": cpus, "seconds": round(seconds, 2),
                             "images_per_s": round(args.n / seconds, 2), "speedup_vs_local": round(local_s / seconds, 3),
                             "records_match_local": agree})
        finally:
            ray.shutdown()

    row = {
        "benchmark": "ray_vs_local",
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model.name, "task": card.task, "images": args.n, "size": args.size, "tiles_per_image": n_tiles,
        "batch_size": args.batch_size,
        "local": {"seconds": round(local_s, 2), "images_per_s": round(args.n / local_s, 2)},
        "ray_init_s": round(init_s, 2),
        "ray": runs,
        "environment": {
            "cpu": cpu_model(), "cores": cores, "platform": platform.platform(), "git": git_rev(),
            "versions": {k: version(k) for k in ("ray", "onnxruntime", "numpy", "pyarrow", "opencv-python-headless")}
            | {"python": platform.python_version()},
            "load_average_1m": round(os.getloadavg()[0], 2),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"{args.n} images of {args.size}×{args.size} ({n_tiles} tile(s) each), {model.name}, {cores} cores; Ray start {init_s:.1f}s")
    print(f"{'engine':<16}{'seconds':>9}{'images/s':>10}{'speed-up':>10}{'records = local':>17}")
    print(f"{'local':<16}{local_s:>9.1f}{args.n / local_s:>10.1f}{1.0:>10.2f}{'—':>17}")
    for run in runs:
        name = f"ray, {run['actors']} actor(s)"
        print(f"{name:<16}{run['seconds']:>9.1f}{run['images_per_s']:>10.1f}{run['speedup_vs_local']:>10.2f}{run['records_match_local']!s:>17}")
    print(f"→ {args.out}")


def card_tiles(model: Path, size: int) -> int:
    from edgedx.runtime.tiling import plan_tiles

    return plan_tiles(size, size, load_model(model).crop).n_tiles


def same_records(expected: list[dict], got: list[dict]) -> bool:
    """Same inputs, decisions, tile counts and errors; probabilities within 1e-6."""
    if [r["input"] for r in expected] != [r["input"] for r in got]:
        return False
    for a, b in zip(expected, got):
        if any(a[k] != b[k] for k in ("label", "decision", "n_crops", "tiles_used", "tiles_skipped", "error")):
            return False
        if a["probabilities"] is not None and any(abs(a["probabilities"][c] - b["probabilities"][c]) > 1e-6 for c in a["probabilities"]):
            return False
    return True


if __name__ == "__main__":
    main()
