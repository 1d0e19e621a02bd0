"""Peak memory diagnosing one very large image: lazy tiled TIFF vs the image decoded whole.

One 16384 x 16384 RGB image (768 MiB decoded) is written as a tiled, zlib-compressed TIFF in
/tmp, tile by tile from a generator, so the writer never holds it whole. Its content is a mosaic
of real 1280 x 960 microscope fields ($EDGEDX_DATA/malaria_fields_iml/images), so the tiles
compress like real data. Every case then runs in a fresh Python process, which prints its own
peak RSS, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux) read at its end, with
nothing subtracted:

- ``baseline``: import EdgeDx and load the model, nothing else;
- ``tiff_lazy``: ``load_model(model, crop=...).diagnose(path)``: the TIFF is read lazily, region by
  region (``open_source`` -> ``TiledTiffSource``);
- ``array``: the TIFF decoded whole with ``tifffile.imread`` (a (16384, 16384, 3) uint8 array),
  then ``diagnose(array)``; its peak after decoding, before diagnosing, is recorded too.

The cases run ``--rounds`` times, alternating, and the medians are reported. The TIFF is deleted
at the end. The crops are the card's 64-px tiles at ``--stride`` (default 64 = the tile: 65,536
tiles; the card's stride 32 would be 261,121 tiles, over four minutes per case on 2 cores).
Memory, not speed, is measured here.

    flock /tmp/edgedx-bench.lock python benchmarks/peak_memory.py [--size 16384] [--stride 64] [--rounds 2]

Target: peak RSS <= 2 x the decoded image + 300 MB. Prints a markdown table and appends a JSON line
to benchmarks/results/peak_memory.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from _env import cpu_model, default_images, git_rev, version  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
ONNX = Path("/tmp/edgedx-real-export/malaria_cells_iml/model.onnx")
MAKE_MODEL = (
    "python benchmarks/train_real_data.py --datasets malaria_cells_iml && "
    "python benchmarks/export_real_data.py --datasets malaria_cells_iml"
)
TIFF_TILE = 256
MiB = 1 << 20
CASES = ("tiff_lazy", "array")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- the cases, each in its own process ---------------------------------------------------------
def case_write(args: argparse.Namespace) -> dict:
    """Write the big TIFF tile by tile; only the source fields and one tile are ever in memory."""
    import tifffile
    from edgedx.runtime.io.image_io import read_image

    folder = args.images or default_images()
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:6] if folder.is_dir() else []
    if paths:
        fields = np.stack([read_image(p) for p in paths])  # (n, 960, 1280, 3)
        content = f"mosaic of {len(paths)} real fields from {folder}"
    else:  # no real data: a deterministic textured pattern
        rng = np.random.default_rng(0)
        fields = rng.integers(0, 256, (1, 512, 512, 3), dtype=np.uint8)
        content = "random texture (no real fields found)"
    n, fh, fw = fields.shape[:3]
    per_row = -(-args.size // fw)

    def tiles():
        for y in range(0, args.size, TIFF_TILE):
            ys = np.arange(y, y + TIFF_TILE)
            for x in range(0, args.size, TIFF_TILE):
                xs = np.arange(x, x + TIFF_TILE)
                which = ((ys // fh)[:, None] * per_row + (xs // fw)[None, :]) % n
                yield fields[which, (ys % fh)[:, None], (xs % fw)[None, :]]

    started = time.perf_counter()
    tifffile.imwrite(
        args.tiff, data=tiles(), shape=(args.size, args.size, 3), dtype="uint8", photometric="rgb",
        tile=(TIFF_TILE, TIFF_TILE), compression="zlib", bigtiff=True,
    )
    return {"seconds": time.perf_counter() - started, "file_bytes": os.path.getsize(args.tiff), "content": content}


def case_run(args: argparse.Namespace) -> dict:
    from edgedx.runtime import load_model

    model = load_model(args.model, threads=args.threads, batch_size=args.batch_size, crop={"stride": (args.stride, args.stride)})
    out: dict = {"after_load_peak_bytes": peak_rss_bytes()}
    if args.case == "baseline":
        return out
    started = time.perf_counter()
    if args.case == "tiff_lazy":
        from edgedx.runtime.io.image_io import pixel_limit

        with pixel_limit(1 << 31):  # a 16k² slide is over the default 250 MP limit: this run raises it on purpose (--max-pixels)
            diagnosis = model.diagnose(args.tiff)
    else:
        import tifffile

        image = tifffile.imread(args.tiff)
        out["decode_seconds"] = time.perf_counter() - started
        out["after_decode_peak_bytes"] = peak_rss_bytes()
        out["after_decode_rss_bytes"] = current_rss_bytes()
        out["array_shape"] = list(image.shape)
        started = time.perf_counter()  # seconds: the diagnosis only, as in the lazy case (which reads as it goes)
        diagnosis = model.diagnose(image)
    out["seconds"] = time.perf_counter() - started
    out["tiles"] = diagnosis.n_crops
    out["probabilities"] = diagnosis.probabilities
    return out


def child(args: argparse.Namespace) -> None:
    result = case_write(args) if args.case == "write" else case_run(args)
    result["case"] = args.case
    result["peak_rss_bytes"] = peak_rss_bytes()  # at the very end, nothing subtracted
    print(json.dumps(result))


def spawn(args: argparse.Namespace, case: str) -> dict:
    command = [
        sys.executable, __file__, "--case", case, "--tiff", str(args.tiff), "--model", str(args.model),
        "--size", str(args.size), "--stride", str(args.stride), "--threads", str(args.threads), "--batch-size", str(args.batch_size),
    ]
    if args.images:
        command += ["--images", str(args.images)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"case {case} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(b: float) -> str:
    return f"{b / MiB:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ONNX)
    parser.add_argument("--images", type=Path, default=None, help="fields for the mosaic (default: $EDGEDX_DATA/malaria_fields_iml/images)")
    parser.add_argument("--size", type=int, default=16384, help="the image is SIZE x SIZE RGB")
    parser.add_argument("--stride", type=int, default=64, help="crop stride (the tile is the card's 64 px)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tiff", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=("write", "baseline", *CASES), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        child(args)
        return
    if not args.model.is_file():
        print(f"missing {args.model}; make the real-data malaria model with:\n    {MAKE_MODEL}", file=sys.stderr)
        raise SystemExit(2)

    decoded = args.size * args.size * 3
    target = 2 * decoded + 300_000_000
    args.tiff = Path("/tmp") / f"edgedx-peak-memory-{os.getpid()}.tif"
    try:
        print(f"writing {args.size}x{args.size} RGB tiled TIFF to {args.tiff} ...", flush=True)
        written = spawn(args, "write")
        print(f"  {written['file_bytes'] / MiB:.0f} MiB on disk in {written['seconds']:.0f} s, writer peak RSS {mib(written['peak_rss_bytes'])} MiB", flush=True)
        runs: dict[str, list[dict]] = {"baseline": [], **{c: [] for c in CASES}}
        for r in range(args.rounds):
            order = ("baseline", *CASES) if r % 2 == 0 else ("baseline", *CASES[::-1])
            for case in order:
                result = spawn(args, case)
                runs[case].append(result)
                extra = f", {result['tiles']} tiles in {result['seconds']:.0f} s" if "tiles" in result else ""
                print(f"round {r + 1}/{args.rounds} {case}: peak RSS {mib(result['peak_rss_bytes'])} MiB{extra}", flush=True)
    finally:
        args.tiff.unlink(missing_ok=True)

    def med(case: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[case])

    baseline = med("baseline", "peak_rss_bytes")
    summary = {}
    for case in CASES:
        peak = med(case, "peak_rss_bytes")
        summary[case] = {
            "peak_rss_bytes": peak,
            "peak_rss_min_max": [min(r["peak_rss_bytes"] for r in runs[case]), max(r["peak_rss_bytes"] for r in runs[case])],
            "over_baseline_bytes": peak - baseline,
            "peak_over_decoded": peak / decoded,
            "seconds": med(case, "seconds"),
            "tiles": runs[case][0]["tiles"],
            "target_met": peak <= target,
        }
    summary["array"]["after_decode_peak_bytes"] = med("array", "after_decode_peak_bytes")
    p_lazy, p_array = runs["tiff_lazy"][0]["probabilities"], runs["array"][0]["probabilities"]
    same = all(abs(p_lazy[k] - p_array[k]) <= 1e-6 for k in p_lazy)

    row = {
        "model": str(args.model),
        "image": [args.size, args.size, 3],
        "decoded_bytes": decoded,
        "target_bytes": target,
        "target": "peak RSS <= 2 x decoded image + 300 MB",
        "tiff": {"tile": [TIFF_TILE, TIFF_TILE], "compression": "zlib", **{k: written[k] for k in ("file_bytes", "seconds", "content", "peak_rss_bytes")}},
        "crop": {"tile": [64, 64], "stride": [args.stride, args.stride]},
        "threads": args.threads,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "baseline_peak_rss_bytes": baseline,
        "cases": summary,
        "runs": runs,
        "same_probabilities": same,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "versions": {k: version(k) for k in ("onnxruntime", "numpy", "tifffile", "opencv-python-headless")} | {"python": platform.python_version()},
        "git": git_rev(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    names = {"tiff_lazy": "tiled TIFF, read lazily (`diagnose(path)`)", "array": "decoded whole (`tifffile.imread`, `diagnose(array)`)"}
    print()
    print(f"{args.size}x{args.size} RGB = {mib(decoded)} MiB decoded; target peak <= 2 x decoded + 300 MB = {mib(target)} MiB; "
          f"{summary['tiff_lazy']['tiles']} crops of 64 px at stride {args.stride}; {args.rounds} rounds, medians")
    print()
    print("| case | peak RSS MiB | over baseline MiB | peak / decoded image | diagnose s | target |")
    print("|---|---|---|---|---|---|")
    print(f"| baseline (import EdgeDx, load model) | {mib(baseline)} | 0 | {baseline / decoded:.2f} | — | — |")
    for case in CASES:
        s = summary[case]
        lo, hi = s["peak_rss_min_max"]
        print(f"| {names[case]} | {mib(s['peak_rss_bytes'])} ({mib(lo)}–{mib(hi)}) | {mib(s['over_baseline_bytes'])} | "
              f"{s['peak_over_decoded']:.2f} | {s['seconds']:.0f} | {'met' if s['target_met'] else 'NOT met'} |")
    print()
    print(f"array case, peak after decoding and before diagnosing: {mib(summary['array']['after_decode_peak_bytes'])} MiB; "
          f"same probabilities lazy vs array: {same} ({p_lazy})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "peak_memory.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
