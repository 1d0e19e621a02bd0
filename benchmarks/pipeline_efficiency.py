"""Whole-field efficiency: tiles/s through the real ``diagnose`` path against tiles/s of the model alone.

Issue 19, item 5: a 1280×960 field's tiles/s through ``diagnose`` should reach
90% of model-only tiles/s on the chosen path (ONNX Runtime fp32 on the CPU).

    flock /tmp/edgedx-bench.lock python benchmarks/pipeline_efficiency.py --model EXPORT/model.onnx \\
        [--images DIR] [--limit 6] [--batch-size 32] [--threads N] [--rounds 5] [--tiling]

Variants, on the same fields, the same model session and the same batch size:

- ``model-only``: the session's ``run`` on crop batches preprocessed in advance:
  every tile of the fields, in the very batches ``diagnose`` forms (tiles of
  consecutive fields share a batch), so both sides run the same tensors;
- ``diagnose``: :func:`edgedx.runtime.diagnose.diagnose` with
  :class:`~edgedx.runtime.options.DiagnoseOptions` as ``edgedx diagnose`` builds
  them, the file paths as inputs: decoding, hashing, tiling, preprocessing,
  inference, merging and the results file (a fresh one in a temporary folder
  each round), overlays and maps off as by default. The model is loaded once
  (its load time is printed apart) and handed over, so both sides use one session;
- ``tiling-only`` (``--tiling``): decode, cut and preprocess each field with
  ``iter_tile_batches`` and run it, one field at a time: the old pipeline
  number of this script, without hashing, merging or records.

Timing: one warm-up call each, then ``--rounds`` rounds, the variants in an
order rotated every round; a round in which other processes took more than
``--max-other`` of the machine is discarded and run again (at most
``--retries`` times; see ``_env.interleaved``); ``--quiet-wait S`` first waits
up to S seconds before each round for the other load to drop below that. The table gives the median
tiles/s per variant and the ratio of the medians with the min–max of the
per-round ratios. The CPU model and its flags are printed beside it; a JSON
line per run is appended to ``benchmarks/results/pipeline_efficiency.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import (  # noqa: E402
    ROOT, cpu_flags, cpu_line, cpu_model, default_images, git_rev, interleaved, most_other, ratio_stats, version, wait_for_quiet,
)

from edgedx.runtime import load_model  # noqa: E402
from edgedx.runtime.diagnose import diagnose  # noqa: E402
from edgedx.runtime.io.image_io import read_image  # noqa: E402
from edgedx.runtime.model import Model  # noqa: E402
from edgedx.runtime.options import DiagnoseOptions  # noqa: E402
from edgedx.runtime.preprocess import model_input  # noqa: E402
from edgedx.runtime.tiling import iter_tile_batches, plan_tiles, rescale, split_tiles  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "pipeline_efficiency.jsonl"
TARGET = 0.90


def model_batches(model: Model, paths: list[Path], batch_size: int) -> list[np.ndarray]:
    """Every tile of the fields, preprocessed, in the batches ``diagnose`` forms (consecutive fields share one)."""
    tiles = np.concatenate([split_tiles(read_image(p), model.crop)[0] for p in paths])
    return [model_input(tiles[i : i + batch_size], model.card) for i in range(0, len(tiles), batch_size)]


def variants(model: Model, paths: list[Path], batches: list[np.ndarray], batch_size: int, tiling: bool) -> dict[str, Callable[[], None]]:
    """The timed calls; each covers all the fields once."""
    session = model.session

    def model_only() -> None:
        for x in batches:
            session.run(x)

    def through_diagnose() -> None:
        with tempfile.TemporaryDirectory(prefix="edgedx-bench-") as tmp:
            done = diagnose(paths, DiagnoseOptions(model=model, out=Path(tmp) / "results.jsonl", batch_size=batch_size))
            assert done.summary.n_ok == len(paths), done.summary

    def tiling_only() -> None:
        policy = model.crop
        for p in paths:
            image = read_image(p)
            grid = plan_tiles(image.shape[0], image.shape[1], policy)
            for batch in iter_tile_batches(rescale(image, policy), grid, policy, batch_size):
                session.run(model_input(batch, model.card))

    calls = {"model-only": model_only, "diagnose": through_diagnose}
    if tiling:
        calls["tiling-only"] = tiling_only
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, default=None, help="default: $EDGEDX_DATA/malaria_fields_iml/images")
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own, as edgedx diagnose)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiling", action="store_true", help="also time the old tiling-only path")
    parser.add_argument("--max-other", type=float, default=0.15, help="discard a round when other processes took more of the machine")
    parser.add_argument("--retries", type=int, default=3, help="discarded rounds allowed in all")
    parser.add_argument("--quiet-wait", type=float, default=0.0, help="before each round, wait up to this many seconds for other load below --max-other")
    parser.add_argument("--note", default=None, help="said in the JSON line (e.g. which code was measured)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON lines file to append to")
    args = parser.parse_args()
    folder = args.images or default_images()
    if not folder.is_dir():
        raise SystemExit(f"no images at {folder}: pass --images DIR or set EDGEDX_DATA to the folder holding malaria_fields_iml/")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[: args.limit]
    started = time.perf_counter()
    model = load_model(args.model, threads=args.threads, batch_size=args.batch_size)
    load_s = time.perf_counter() - started
    batches = model_batches(model, paths, args.batch_size)
    n_tiles = sum(len(x) for x in batches)
    calls = variants(model, paths, batches, args.batch_size, args.tiling)
    rates, other, discarded = interleaved(
        calls, n_tiles, rounds=args.rounds, seconds=0.0, warmup=0.0, settle=0.2, max_other=args.max_other, retries=args.retries,
        before_round=(lambda: wait_for_quiet(args.quiet_wait, threshold=args.max_other)) if args.quiet_wait > 0 else None,
    )
    row = report(args, model, paths, n_tiles, rates, other, discarded, load_s)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    print(f"\nappended a line to {args.results}")


def report(
    args: argparse.Namespace, model: Model, paths: list[Path], n_tiles: int, rates: dict[str, list[float]],
    other: dict[str, list[float | None]], discarded: int, load_s: float,
) -> dict[str, object]:
    """Print the table (CPU beside it) and return the JSON line."""
    base = rates["model-only"]
    shape = list(read_image(paths[0]).shape[:2])
    print(f"{cpu_line()}; ONNX Runtime {version('onnxruntime')}, {model.session.providers[0]}, threads {args.threads or 'default'}")
    print(f"{len(paths)} fields {shape[1]}×{shape[0]}, {n_tiles} tiles of {model.crop.tile_size[0]} px (stride {model.crop.stride[0]}), "
          f"batch {args.batch_size}, {len(base)} rounds ({discarded} discarded), most other load {_pct(most_other(other))}; model load {load_s:.2f} s\n")
    print("| variant | tiles/s (median) | min–max | ÷ model-only (min–max per round) |")
    print("|---|---|---|---|")
    ratios = {}
    for name, values in rates.items():
        stats = ratio_stats(values, base)
        ratios[name] = stats
        print(f"| {name} | {statistics.median(values):.0f} | {min(values):.0f}–{max(values):.0f} | "
              f"{stats['ratio']:.3f} ({stats['ratio_min']:.3f}–{stats['ratio_max']:.3f}) |")
    eff = ratios["diagnose"]
    print(f"\ndiagnose efficiency {eff['ratio']:.3f} (target ≥ {TARGET:.2f}: {'met' if eff['ratio'] >= TARGET else 'not met'})")
    return {
        "model": str(args.model), "images": len(paths), "image_size": shape, "tiles": n_tiles,
        "tile_size": list(model.crop.tile_size), "stride": list(model.crop.stride), "batch_size": args.batch_size,
        "threads": args.threads, "rounds": len(base), "discarded": discarded, "most_other_load": most_other(other),
        "tiles_per_s": {name: statistics.median(v) for name, v in rates.items()},
        "tiles_per_s_per_round": rates,
        "model_only_tiles_per_s": statistics.median(base), "diagnose_tiles_per_s": statistics.median(rates["diagnose"]),
        "efficiency": eff["ratio"], "efficiency_min": eff["ratio_min"], "efficiency_max": eff["ratio_max"],
        "efficiency_per_round": eff["ratio_per_round"],
        "tiling_only_efficiency": ratios["tiling-only"]["ratio"] if "tiling-only" in ratios else None,
        "model_load_s": load_s, "note": args.note, "cpu": cpu_model(), **cpu_flags(), "cores": os.cpu_count(),
        "providers": list(model.session.providers), "onnxruntime": version("onnxruntime"), "commit": git_rev(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


if __name__ == "__main__":
    main()
