"""Sliding-crop diagnosis of whole images: EdgeDx vs MONAI's sliding_window_inference.

Same fields, same crops, same preprocessing, same batch size, same thread count,
one run, variants interleaved round by round:

- ``edgedx``: ``Model.diagnose(path)``, one field at a time (ONNX Runtime, torch-free);
- ``edgedx_many``: ``Model.diagnose_many(paths)`` (tiles of consecutive fields share batches);
- ``monai_torch``: ``monai.inferers.sliding_window_inference`` driving the PyTorch model
  (the checkpoint the ONNX file was exported from), the usual MONAI deployment;
- ``monai_ort``: the same MONAI call driving the same ONNX Runtime session EdgeDx uses, which
  separates the sliding-window machinery from the inference engine.

Every variant starts from the JPEG path and ends with the field's p(positive class), so decoding
(``read_image``), preprocessing (``preprocess_batch``: on each tile batch for EdgeDx, on the whole
image for MONAI; it is pointwise for a mean/std card, so the numbers are the same), inference and
merging are all timed.

    pip install monai       # for this benchmark only; EdgeDx does not depend on it
    flock /tmp/edgedx-bench.lock python benchmarks/monai_sliding.py [--limit 6] [--rounds 5]

**How MONAI's output is made comparable.** MONAI merges window *maps*. The predictor returns each
window's class probabilities broadcast to a (n, C, tile/stride, tile/stride) map (2 x 2 for 64-px
tiles at stride 32), so each output cell is one stride x stride block of the image and MONAI
merges at zoom 1/stride (supported since MONAI 1.0: the predictor's output may be smaller than the
ROI). With ``mode="constant"`` a block's merged value is the mean over the windows covering it.
The image-level EdgeDx value is the mean over windows, so the MONAI value is the coverage-weighted
mean of the merged map: sum_b count_b * M_b / (cells per window * windows), which equals the mean
of the window probabilities exactly (each window adds its p to count_b * M_b once per cell it
covers). The plain mean of the merged map weights windows by the pixels they alone cover (the
edge windows count more) and is reported too. A separate, untimed check runs MONAI with
``with_coord=True`` and compares every window's position and probability with EdgeDx's tiles.

Prints a markdown table and appends a JSON line to benchmarks/results/monai_sliding.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from _env import cpu_model, default_images, git_rev, version  # noqa: E402

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = Path("/tmp/edgedx-real/malaria_cells_iml/model.pt")
ONNX = Path("/tmp/edgedx-real-export/malaria_cells_iml/model.onnx")
MAKE_MODEL = (
    "python benchmarks/train_real_data.py --datasets malaria_cells_iml && "
    "python benchmarks/export_real_data.py --datasets malaria_cells_iml"
)
VARIANTS = ("edgedx", "edgedx_many", "monai_torch", "monai_ort")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ONNX, help="the EdgeDx export (ONNX)")
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="the PyTorch checkpoint it was exported from")
    parser.add_argument("--images", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    try:
        from monai.data.utils import dense_patch_slices
        from monai.inferers import sliding_window_inference
    except ImportError:
        print("MONAI is not installed. It is needed for this benchmark only (not an EdgeDx dependency):\n    pip install monai", file=sys.stderr)
        raise SystemExit(2) from None
    import torch
    from edgedx.runtime import load_model
    from edgedx.runtime.io.image_io import read_image
    from edgedx.runtime.preprocess import preprocess_batch, to_probabilities
    from edgedx.runtime.tiling import plan_tiles
    from edgedx.training.checkpoint import build_model, load_checkpoint

    missing = [p for p in (args.model, args.checkpoint) if not p.is_file()]
    if missing:
        print(f"missing {', '.join(map(str, missing))}; make the real-data malaria model with:\n    {MAKE_MODEL}", file=sys.stderr)
        raise SystemExit(2)
    folder = args.images or default_images()
    if not folder.is_dir():
        raise SystemExit(f"no images at {folder}: pass --images DIR or set EDGEDX_DATA to the folder holding malaria_fields_iml/")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[: args.limit]
    if not paths:
        raise SystemExit(f"no .jpg/.png images in {folder}")

    torch.set_num_threads(args.threads)
    model = load_model(args.model, threads=args.threads, batch_size=args.batch_size)
    card = model.card
    policy = model.crop
    if policy.scale != 1.0 or policy.min_foreground > 0 or policy.aggregation != "mean":
        raise SystemExit(f"this comparison needs scale 1.0, no foreground filter and mean aggregation; the card has {policy}")
    if card.normalization.kind == "per_image" or card.input_format != "float32_nchw" or tuple(card.input_size) != tuple(policy.tile_size):
        raise SystemExit("this comparison needs a float32_nchw card with pointwise (mean/std) normalisation and input size = tile size")
    pos = card.positive_index if card.positive_index is not None else card.n_classes - 1
    net = build_model(load_checkpoint(args.checkpoint))
    (th, tw), (sh, sw) = policy.tile_size, policy.stride
    roi = (th, tw)
    overlap = (1.0 - sh / th, 1.0 - sw / tw)
    if any(int(r * (1 - o)) != s for r, o, s in zip(roi, overlap, (sh, sw))) or th % sh or tw % sw:
        raise SystemExit(f"stride {policy.stride} must divide tile {policy.tile_size} for an exact MONAI overlap and zoom")
    cells = (th // sh, tw // sw)  # output cells per window: one per stride x stride block

    # -- window placement: EdgeDx's plan_tiles vs MONAI's dense_patch_slices -------------------
    sizes = sorted({read_image(p).shape[:2] for p in paths})
    for h, w in sizes:
        if (h - th) % sh or (w - tw) % sw:
            raise SystemExit(f"field size {h}x{w}: the last window is not on the stride grid, so MONAI's zoom-1/stride merge is inexact")
    placement = {}
    for h, w in sizes + [(1000, 1001), (97, 64), (65, 200), (64, 64)]:
        ours = plan_tiles(h, w, policy).positions()
        theirs = [(s[0].start, s[1].start) for s in dense_patch_slices((h, w), roi, (sh, sw))]
        placement[f"{h}x{w}"] = {"windows": len(ours), "identical": ours == theirs}
    if not all(v["identical"] for v in placement.values()):
        raise SystemExit(f"window placement differs: {placement}")

    def coverage(h: int, w: int) -> np.ndarray:
        count = np.zeros((h // sh, w // sw))
        for y, x in plan_tiles(h, w, policy).positions():
            count[y // sh : y // sh + cells[0], x // sw : x // sw + cells[1]] += 1
        return count

    counts = {s: coverage(*s) for s in sizes}

    def torch_predictor(x: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(net(x).float(), dim=1)
        return p[:, :, None, None].repeat(1, 1, *cells)  # a contiguous map: MONAI scales it in place

    def ort_predictor(x: torch.Tensor) -> torch.Tensor:
        p = to_probabilities(model.session.run(x.numpy()), card).astype(np.float32)
        return torch.from_numpy(p)[:, :, None, None].repeat(1, 1, *cells)

    def whole_image_input(image: np.ndarray) -> torch.Tensor:
        """(1, 3, H, W) float32: the card's preprocessing on the whole image (pointwise, so equal per window).

        preprocess_batch resizes crops to the card's input size, so it gets a copy of the card whose
        input size is the image's: same colour order and normalisation, no resize.
        """
        whole = dataclasses.replace(card, input_size=tuple(image.shape[:2]))
        return torch.from_numpy(preprocess_batch(image[None], whole))

    def monai_field(path: Path, predictor) -> tuple[float, float]:
        image = read_image(path)
        x = whole_image_input(image)
        with torch.inference_mode():
            merged = sliding_window_inference(x, roi, args.batch_size, predictor, overlap=overlap, mode="constant")
        m = merged[0, pos].numpy().astype(np.float64)
        count = counts[image.shape[:2]]
        return float((m * count).sum() / (cells[0] * cells[1] * len(plan_tiles(*image.shape[:2], policy).positions()))), float(m.mean())

    def run(variant: str, paths: list[Path] = paths) -> list[float]:
        if variant == "edgedx":
            return [model.diagnose(p).sliding.probabilities[pos] for p in paths]
        if variant == "edgedx_many":
            return [d.sliding.probabilities[pos] for d in model.diagnose_many(paths)]
        predictor = torch_predictor if variant == "monai_torch" else ort_predictor
        return [monai_field(p, predictor)[0] for p in paths]

    # -- untimed checks: per-window positions and probabilities, and the field values ----------
    edgedx_results = [model.diagnose(p) for p in paths]
    n_tiles = sum(d.n_crops for d in edgedx_results)
    window_check = {"max_tile_prob_diff_torch": 0.0, "positions_identical": True}
    monai_plain, monai_weighted = [], []
    for p, d in zip(paths, edgedx_results):
        seen: list[tuple[tuple[int, int], np.ndarray]] = []

        def recording(x: torch.Tensor, coords, _seen=seen) -> torch.Tensor:
            out = torch_predictor(x)
            _seen += [((c[2].start, c[3].start), row[:, 0, 0].numpy().copy()) for c, row in zip(coords, out)]
            return out

        x = whole_image_input(read_image(p))
        with torch.inference_mode():
            sliding_window_inference(x, roi, args.batch_size, recording, overlap=overlap, mode="constant", with_coord=True)
        window_check["positions_identical"] &= [c for c, _ in seen] == d.sliding.grid.positions()
        tiles = np.stack([q for _, q in seen])
        window_check["max_tile_prob_diff_torch"] = max(window_check["max_tile_prob_diff_torch"], float(np.abs(tiles - d.sliding.tile_probabilities).max()))
        weighted, plain = monai_field(p, torch_predictor)
        monai_weighted.append(weighted)
        monai_plain.append(plain)
        assert abs(weighted - tiles[:, pos].mean()) < 1e-5, (weighted, tiles[:, pos].mean())  # the reduction is exact
    p_edgedx = [float(d.sliding.probabilities[pos]) for d in edgedx_results]
    p_ort = [monai_field(p, ort_predictor)[0] for p in paths]
    diff_torch = max(abs(a - b) for a, b in zip(p_edgedx, monai_weighted))
    diff_ort = max(abs(a - b) for a, b in zip(p_edgedx, p_ort))
    diff_plain = max(abs(a - b) for a, b in zip(p_edgedx, monai_plain))

    # -- timed, interleaved rounds ---------------------------------------------------------------
    for v in VARIANTS:  # warm-up: one field each
        run(v, paths[:1])
    seconds: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for v in order:
            start = time.perf_counter()
            out = run(v)
            seconds[v].append(time.perf_counter() - start)
            assert len(out) == len(paths)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{v} {n_tiles / seconds[v][-1]:.0f} tiles/s" for v in VARIANTS), flush=True)

    rate = {v: [n_tiles / s for s in seconds[v]] for v in VARIANTS}
    med = {v: statistics.median(rate[v]) for v in VARIANTS}

    def ratio(a: str, b: str) -> dict[str, float]:
        per_round = [x / y for x, y in zip(rate[a], rate[b])]
        return {"median_ratio": med[a] / med[b], "min": min(per_round), "max": max(per_round)}

    ratios = {
        "edgedx_vs_monai_torch": ratio("edgedx", "monai_torch"),
        "edgedx_many_vs_monai_torch": ratio("edgedx_many", "monai_torch"),
        "edgedx_vs_monai_ort": ratio("edgedx", "monai_ort"),
        "monai_ort_vs_monai_torch": ratio("monai_ort", "monai_torch"),
    }
    target_met = ratios["edgedx_vs_monai_torch"]["median_ratio"] >= 2.0
    h, w = sizes[0]
    row = {
        "model": str(args.model),
        "checkpoint": str(args.checkpoint),
        "images": len(paths),
        "image_sizes": [list(s) for s in sizes],
        "tiles": n_tiles,
        "tile_size": list(roi),
        "stride": [sh, sw],
        "monai_overlap": list(overlap),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "rounds": args.rounds,
        "seconds": seconds,
        "tiles_per_s": rate,
        "median_tiles_per_s": med,
        "ratios": ratios,
        "target": "edgedx >= 2x monai_torch tiles/s",
        "target_met": target_met,
        "placement": placement,
        "window_check": window_check,
        "p_positive": {"edgedx": p_edgedx, "monai_torch_weighted": monai_weighted, "monai_torch_plain_mean": monai_plain, "monai_ort_weighted": p_ort},
        "max_field_diff": {"monai_torch": diff_torch, "monai_ort": diff_ort, "monai_torch_plain_mean": diff_plain},
        "equal_outputs": diff_torch <= 1e-3,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "versions": {k: version(k) for k in ("torch", "monai", "onnxruntime", "numpy", "timm")} | {"python": platform.python_version()},
        "git": git_rev(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    names = {
        "edgedx": "EdgeDx `diagnose` (ONNX Runtime)",
        "edgedx_many": "EdgeDx `diagnose_many` (ONNX Runtime)",
        "monai_torch": "MONAI `sliding_window_inference` + PyTorch",
        "monai_ort": "MONAI `sliding_window_inference` + ONNX Runtime",
    }
    print()
    print(f"{len(paths)} fields {w}x{h}, {n_tiles} windows ({th}x{tw}, stride {sh}; MONAI overlap {overlap[0]}), "
          f"batch {args.batch_size}, {args.threads} threads, {args.rounds} interleaved rounds")
    print()
    print("| variant | median tiles/s | min–max tiles/s | median s (all fields) |")
    print("|---|---|---|---|")
    for v in VARIANTS:
        print(f"| {names[v]} | {med[v]:.0f} | {min(rate[v]):.0f}–{max(rate[v]):.0f} | {statistics.median(seconds[v]):.2f} |")
    print()
    print("| ratio | ratio of medians | min–max over rounds |")
    print("|---|---|---|")
    for k, r in ratios.items():
        print(f"| {k} | {r['median_ratio']:.2f} | {r['min']:.2f}–{r['max']:.2f} |")
    print()
    print(f"window positions identical to plan_tiles: {all(v['identical'] for v in placement.values()) and window_check['positions_identical']} "
          f"({', '.join(k + ': ' + str(v['windows']) for k, v in placement.items())})")
    print(f"max |tile p| diff EdgeDx (ONNX) vs MONAI (PyTorch), every window: {window_check['max_tile_prob_diff_torch']:.2e}")
    print(f"max |field p| diff vs EdgeDx: MONAI+PyTorch {diff_torch:.2e}, MONAI+ORT {diff_ort:.2e}, "
          f"MONAI+PyTorch plain map mean {diff_plain:.2e}; equal outputs (<= 1e-3): {row['equal_outputs']}")
    print(f"target EdgeDx >= 2x MONAI+PyTorch: {'met' if target_met else 'NOT met'} ({ratios['edgedx_vs_monai_torch']['median_ratio']:.2f}x)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "monai_sliding.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
