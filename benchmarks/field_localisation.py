"""Whole-field localisation and field-level detection with a cell classifier's sliding crops.

The malaria-cell model was trained on single-cell crops cut out of the IML
whole fields. Here it runs over the held-out validation *fields* (those whose
cells are in the npz's val_source and none in train_source) with the card's
crop policy, once per pass, and the per-tile p(positive) are scored against
the annotated parasite boxes:

1. tiles: a tile is positive if it contains the centre of a parasite box
   (ring, trophozoite, schizont, gametocyte), negative if it contains no
   parasite-like centre; tiles whose only parasite-like centre is 'difficult'
   are left out. Tile AUC, counts, sensitivity/specificity at the card threshold,
   and 1 − AUC split by how far inside its tiles each parasite centre lies
   (a parasite the grid cuts in half makes a positive tile showing half of it).
2. fields: positive if any parasite is annotated. Every aggregation (mean,
   mean_logits, max, top_k_mean k=3, noisy_or) is computed from the same tile
   probabilities with edgedx.runtime.tiling.aggregate (no re-inference).

    python benchmarks/field_localisation.py [--model MODEL.onnx] [--data DIR] [--limit N]
        [--min-foreground 0,0.2] [--scale S] [--overlays [DIR]] [--no-save]

The default model is the real-data export of benchmarks/train_real_data.py +
export_real_data.py. Data come from --data, $EDGEDX_DATA or ../shared/data.
Prints markdown tables and appends one JSON line per (pass, aggregation) to
benchmarks/results/field_localisation.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from edgedx.runtime import load_model
from edgedx.runtime.io.image_io import read_image, write_image
from edgedx.runtime.metrics import roc_auc
from edgedx.runtime.outputs.overlay import render_overlay
from edgedx.runtime.tiling import aggregate

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODEL = Path("/tmp/edgedx-real-export/malaria_cells_iml/model.onnx")
DEFAULT_OVERLAYS = Path("/tmp/edgedx-field-localisation-overlays")
PARASITES = ("ring", "trophozoite", "schizont", "gametocyte")
DIFFICULT = "difficult"
AGGREGATIONS = ("mean", "mean_logits", "max", "top_k_mean", "noisy_or")
TOP_K = 3


def data_root(arg: Path | None) -> Path:
    if arg is not None:
        return arg
    return Path(os.environ.get("EDGEDX_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def validation_fields(root: Path) -> list[str]:
    """Fields with cells in the cell set's val_source and none in train_source."""
    npz = np.load(root / "malaria_cells_iml" / "malaria_cells_iml.npz")
    val = {str(s).split(":")[0] for s in npz["val_source"]}
    train = {str(s).split(":")[0] for s in npz["train_source"]}
    return sorted(val - train)


def load_boxes(root: Path) -> dict[str, list[tuple[str, float, float, float, float]]]:
    """image name → [(type, x, y, w, h)] in original pixels, red blood cells dropped."""
    records = json.loads((root / "malaria_fields_iml" / "annotations.json").read_text(encoding="utf-8"))
    out: dict[str, list[tuple[str, float, float, float, float]]] = {}
    for r in records:
        boxes = []
        for o in r["objects"]:
            if o["type"] in PARASITES or o["type"] == DIFFICULT:
                b = o["bbox"]
                boxes.append((o["type"], float(b["x"]), float(b["y"]), float(b["w"]), float(b["h"])))
        out[r["image_name"]] = boxes
    return out


def tile_labels(
    positions: np.ndarray, tile: tuple[int, int], scale: float, boxes: list,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]:
    """Per tile: contains a parasite centre; contains a 'difficult' centre; overlaps any parasite-like box.

    Also returns, per parasite, the mask of tiles holding its centre, and per
    tile how far inside it the deepest parasite centre it holds lies, as a
    fraction of the tile side (0.5 is the middle; -1: none). Why the last: a
    parasite the grid cuts in half makes a positive tile that shows half of it,
    and the tile AUC's loss is split by this margin (:func:`auc_loss_by_margin`).
    Box centres and extents are mapped into scaled coordinates with ``scale``.
    """
    th, tw = tile
    ys, xs = positions[:, 0], positions[:, 1]
    positive = np.zeros(len(positions), bool)
    difficult = np.zeros(len(positions), bool)
    touched = np.zeros(len(positions), bool)
    margin = np.full(len(positions), -1.0)
    per_parasite = []
    for kind, x, y, w, h in boxes:
        cx, cy = (x + w / 2) * scale, (y + h / 2) * scale
        inside = (ys <= cy) & (cy < ys + th) & (xs <= cx) & (cx < xs + tw)
        x0, y0, x1, y1 = x * scale, y * scale, (x + w) * scale, (y + h) * scale
        touched |= (ys < y1) & (y0 < ys + th) & (xs < x1) & (x0 < xs + tw)
        if kind == DIFFICULT:
            difficult |= inside
        else:
            positive |= inside
            per_parasite.append(inside)
            deep = np.minimum(np.minimum(cx - xs, xs + tw - cx) / tw, np.minimum(cy - ys, ys + th - cy) / th)
            margin = np.where(inside & (deep > margin), deep, margin)
    return positive, difficult, touched, per_parasite, margin


MARGIN_BINS = ((0.0, 1 / 16), (1 / 16, 1 / 8), (1 / 8, 1 / 4), (1 / 4, 0.51))


def auc_loss_by_margin(p: np.ndarray, y: np.ndarray, margin: np.ndarray) -> list[dict[str, Any]]:
    """1 − tile AUC split over the positive tiles by the margin bin of :func:`tile_labels`: each positive's share of negatives
    scoring above it (ties half), summed per bin and divided by all positives, so the bins' losses add up to 1 − AUC."""
    negatives = np.sort(p[~y])
    if not y.any() or not len(negatives):
        return []
    above = 1 - (np.searchsorted(negatives, p[y], "left") + np.searchsorted(negatives, p[y], "right")) / (2 * len(negatives))
    m = margin[y]
    rows = []
    for lo, hi in MARGIN_BINS:
        sel = (m >= lo) & (m < hi)
        rows.append({"margin_from": lo, "margin_to": min(hi, 0.5), "positive_tiles": int(sel.sum()),
                     "median_p": float(np.median(p[y][sel])) if sel.any() else None, "auc_loss": float(above[sel].sum() / y.sum())})
    return rows


def sens_spec(y: np.ndarray, score: np.ndarray, threshold: float) -> tuple[float, float]:
    y = np.asarray(y, bool)
    hit = np.asarray(score) >= threshold
    sens = float(hit[y].mean()) if y.any() else float("nan")
    spec = float((~hit[~y]).mean()) if (~y).any() else float("nan")
    return sens, spec


def run_pass(model: Any, fields: list[str], images: Path, boxes: dict, crop: dict[str, Any], keep: set[str]) -> dict[str, Any]:
    """One sliding-crop pass over every field: per-tile p(positive), labels and the kept SlidingResults."""
    card = model.card
    pos = card.positive_index
    started = time.perf_counter()
    per_field = []
    kept = {}
    for name, result in model.stream(((n, images / n) for n in fields), crop=crop):
        if isinstance(result, BaseException):
            raise result
        s = result.sliding
        positions = np.asarray(s.grid.positions(), dtype=np.float64)
        scale = float(np.sqrt(np.prod(s.grid.factors)))
        positive, difficult, touched, per_parasite, margin = tile_labels(positions, s.grid.tile, scale, boxes.get(name, []))
        used = np.ones(s.n_tiles, bool) if s.used is None else s.used.copy()
        per_field.append({
            "name": name,
            "p": s.tile_probabilities[:, pos].copy(),
            "probs": s.tile_probabilities.copy(),
            "used": used,
            "positive": positive,
            "difficult": difficult,
            "touched": touched,
            "margin": margin,
            "per_parasite": per_parasite,
            "n_parasites": len(per_parasite),
            "card_score": float(s.probabilities[pos]),
            "grid_shape": s.grid.shape,
            "foreground": s.foreground.copy() if s.foreground is not None and crop.get("min_foreground", 0) > 0 else None,  # all ones when not filtering
            "fallback": bool(s.foreground_fallback),
        })
        if name in keep:
            kept[name] = result
    return {"fields": per_field, "seconds": time.perf_counter() - started, "kept": kept}


FALSE_ALARMS_PER_FIELD = (0.5, 1, 2)


def score_pass(run: dict[str, Any], policy: Any, card: Any) -> dict[str, Any]:
    threshold = 0.5 if card.threshold is None else card.threshold
    pos = card.positive_index
    fields = run["fields"]
    # Tile level: used tiles only; 'difficult'-only tiles left out.
    p_all, y_all, clear_all, margin_all = [], [], [], []
    for f in fields:
        keep = f["used"] & ~(f["difficult"] & ~f["positive"])
        p_all.append(f["p"][keep])
        y_all.append(f["positive"][keep])
        margin_all.append(f["margin"][keep])
        clear_all.append((f["positive"] | ~f["touched"])[keep])  # positives, or negatives clear of every parasite-like box
    p = np.concatenate(p_all)
    y = np.concatenate(y_all)
    clear = np.concatenate(clear_all)
    tile_sens, tile_spec = sens_spec(y, p, threshold)
    # Parasites: found when some used tile holding its centre reaches the threshold.
    n_par = hit = 0
    for f in fields:
        for mask in f["per_parasite"]:
            m = mask & f["used"]
            n_par += 1
            hit += bool(m.any() and np.nanmax(f["p"][m]) >= threshold)
    # Parasites found at a fixed false-alarm rate: the threshold that lets through k negative tiles per field.
    negatives = np.sort(p[~y])[::-1]
    at_rate = {}
    for per_field in FALSE_ALARMS_PER_FIELD:
        k = min(len(negatives), int(per_field * len(fields)))
        cut = float(negatives[k - 1]) if k else 1.0  # scores strictly above the k-th highest negative
        found = sum(
            bool((mask & f["used"]).any() and np.nanmax(f["p"][mask & f["used"]]) > cut)
            for f in fields for mask in f["per_parasite"]
        )
        at_rate[str(per_field)] = {"threshold": cut, "parasites_found": int(found), "tile_sensitivity": float((p[y] > cut).mean()) if y.any() else None}
    tiles = {
        "parasites_at_false_alarms_per_field": at_rate,
        "tiles_total": int(sum(len(f["p"]) for f in fields)),
        "tiles_used": int(sum(f["used"].sum() for f in fields)),
        "tiles_skipped": int(sum((~f["used"]).sum() for f in fields)),
        "fields_all_background_fallback": int(sum(f["fallback"] for f in fields)),
        "tile_foreground_min": _fg_quantile(fields, 0.0),
        "tile_foreground_p1": _fg_quantile(fields, 0.01),
        "tile_positive": int(y.sum()),
        "tile_negative": int((~y).sum()),
        "tile_difficult_only_excluded": int(sum((f["used"] & f["difficult"] & ~f["positive"]).sum() for f in fields)),
        "tile_auc": roc_auc(y, p),
        "tile_auc_clear_negatives": roc_auc(y[clear], p[clear]),
        "tile_auc_loss_by_centre_margin": auc_loss_by_margin(p, y, np.concatenate(margin_all)),
        "tile_negative_clear": int((~y[clear]).sum()),
        "tile_sensitivity": tile_sens,
        "tile_specificity": tile_spec,
        "parasites": n_par,
        "parasites_found": hit,
    }
    # Field level: every aggregation from the same tile probabilities.
    y_field = np.array([f["n_parasites"] > 0 for f in fields])
    per_agg = {}
    for how in AGGREGATIONS:
        pol = dataclasses.replace(policy, aggregation=how, top_k=TOP_K)
        scores = np.array([
            aggregate(f["probs"][f["used"]], pol, activation=card.output_activation, positive_index=pos)[pos] for f in fields
        ])
        if how == policy.aggregation and all(f["card_score"] is not None for f in fields):  # the runtime's own merge must agree
            assert np.allclose(scores, [f["card_score"] for f in fields], atol=1e-5), "aggregate() disagrees with diagnose"
        sens, spec = sens_spec(y_field, scores, threshold)
        per_agg[how] = {
            "field_auc": roc_auc(y_field, scores),
            "field_sensitivity": sens,
            "field_specificity": spec,
            "field_score_median_positive": float(np.median(scores[y_field])) if y_field.any() else None,
            "field_score_median_negative": float(np.median(scores[~y_field])) if (~y_field).any() else None,
        }
    return {"tiles": tiles, "fields": per_agg, "n_fields": len(fields), "n_positive_fields": int(y_field.sum()), "threshold": threshold}


def _fg_quantile(fields: list[dict[str, Any]], q: float) -> float | None:
    """A quantile of the tiles' foreground fraction (measured only when the pass filters)."""
    values = [f["foreground"] for f in fields if f["foreground"] is not None]
    if not values:
        return None
    return float(np.quantile(np.concatenate(values), q))


def write_overlays(out: Path, kept: dict, images: Path, boxes: dict, card: Any, tag: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    pos = card.positive_index
    written = []
    for name, diagnosis in kept.items():
        image = read_image(images / name)
        caption = f"{Path(name).stem} p({card.positive_class}) {tag}"
        canvas = render_overlay(image, diagnosis.sliding, pos, caption)
        banner = canvas.shape[0] - image.shape[0]
        canvas = np.ascontiguousarray(canvas)
        for kind, x, y, w, h in boxes.get(name, []):
            colour = (255, 255, 255) if kind == DIFFICULT else (0, 255, 0)
            cv2.rectangle(canvas, (int(x), int(y) + banner), (int(x + w), int(y + h) + banner), colour, 2)
        written.append(write_image(out / f"{Path(name).stem}_{tag}.png", canvas))
    return written


def fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=None, help="folder holding malaria_fields_iml/ and malaria_cells_iml/ (default $EDGEDX_DATA or ../shared/data)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N validation fields (quick iterations)")
    parser.add_argument("--min-foreground", default="0,0.2", help="comma-separated min_foreground values, one pass each (default 0,0.2)")
    parser.add_argument("--scale", type=float, default=None, help="override the card's crop scale (default: the card's)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--overlays", type=Path, nargs="?", const=DEFAULT_OVERLAYS, default=None, help=f"write heat-map overlays with the parasite boxes (default dir {DEFAULT_OVERLAYS})")
    parser.add_argument("--n-overlays", type=int, default=6)
    parser.add_argument("--no-save", action="store_true", help="do not append to benchmarks/results/")
    args = parser.parse_args()

    if not args.model.is_file():
        print(f"model not found: {args.model}\nmake it with:\n"
              "  python benchmarks/train_real_data.py --datasets malaria_cells_iml\n"
              "  python benchmarks/export_real_data.py --datasets malaria_cells_iml", file=sys.stderr)
        raise SystemExit(2)
    root = data_root(args.data)
    images = root / "malaria_fields_iml" / "images"
    if not images.is_dir() or not (root / "malaria_cells_iml" / "malaria_cells_iml.npz").is_file():
        raise SystemExit(f"no data at {root}: pass --data DIR or set EDGEDX_DATA to the folder holding malaria_fields_iml/ and malaria_cells_iml/")

    fields = validation_fields(root)
    n_val = len(fields)
    if args.limit:
        fields = fields[: args.limit]
    boxes = load_boxes(root)
    missing = [f for f in fields if f not in boxes]
    if missing:
        raise SystemExit(f"validation fields without annotations: {missing[:5]}")

    started = time.perf_counter()
    # the quality gate off: every field's tiles are scored (a rejected field has none); fit-fields keeps the gate
    model = load_model(args.model, batch_size=args.batch_size, threads=args.threads, quality="off")
    card = model.card
    threshold = 0.5 if card.threshold is None else card.threshold
    print(f"model: {args.model}")
    print(f"card crop policy: {json.dumps(dataclasses.asdict(card.crop))}")
    print(f"positive class: {card.positive_class} (index {card.positive_index}), card threshold {threshold:.4f}")
    n_pos_fields = sum(any(b[0] in PARASITES for b in boxes[f]) for f in fields)
    print(f"validation fields: {len(fields)} of {n_val} held out ({n_pos_fields} with parasites, {len(fields) - n_pos_fields} without)")

    keep: set[str] = set()
    if args.overlays:
        positives = [f for f in fields if any(b[0] in PARASITES for b in boxes[f])]
        negatives = [f for f in fields if f not in positives]
        half = max(1, args.n_overlays // 2)
        keep = set(positives[: args.n_overlays - min(len(negatives), half)] + negatives[:half])

    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "onnxruntime_providers": list(model.session.providers),
        "python": platform.python_version(),
    }
    rows = []
    for fg in [float(v) for v in args.min_foreground.split(",") if v.strip()]:
        crop: dict[str, Any] = {"min_foreground": fg}
        if args.scale is not None:
            crop["scale"] = args.scale
        policy = dataclasses.replace(card.crop, **crop)
        run = run_pass(model, fields, images, boxes, crop, keep)
        scored = score_pass(run, policy, card)
        tag = f"fg{fg:g}" + (f"_scale{args.scale:g}" if args.scale is not None else "")
        if args.overlays and run["kept"]:
            paths = write_overlays(args.overlays, run["kept"], images, boxes, card, tag)
            print(f"overlays ({tag}): {len(paths)} in {args.overlays}")
        rows.append((fg, policy, run["seconds"], scored))

    total_s = time.perf_counter() - started
    print()
    print("Tiles (a tile is positive when it holds the centre of a parasite box; 'difficult'-only tiles excluded)\n")
    print("| pass | tiles used / skipped | positive / negative tiles | tile AUC | tile AUC, negatives clear of parasite boxes | tile sens / spec at threshold | parasites found at threshold | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for fg, policy, seconds, s in rows:
        t = s["tiles"]
        print(f"| min_foreground {fg:g}, scale {policy.scale:g} | {t['tiles_used']} / {t['tiles_skipped']} | {t['tile_positive']} / {t['tile_negative']} | "
              f"{fmt(t['tile_auc'])} | {fmt(t['tile_auc_clear_negatives'])} | {fmt(t['tile_sensitivity'])} / {fmt(t['tile_specificity'])} | "
              f"{t['parasites_found']} / {t['parasites']} | {seconds:.0f} |")
    print("\nParasites found at a fixed false-alarm rate (false tiles per field; threshold chosen on these fields)\n")
    print("| pass | " + " | ".join(f"{r} false/field: found (tile sens, threshold)" for r in FALSE_ALARMS_PER_FIELD) + " |")
    print("|---|" + "---|" * len(FALSE_ALARMS_PER_FIELD))
    for fg, policy, _, s in rows:
        cells = []
        for r in FALSE_ALARMS_PER_FIELD:
            a = s["tiles"]["parasites_at_false_alarms_per_field"][str(r)]
            cells.append(f"{a['parasites_found']} / {s['tiles']['parasites']} ({fmt(a['tile_sensitivity'])}, {a['threshold']:.3f})")
        print(f"| min_foreground {fg:g}, scale {policy.scale:g} | " + " | ".join(cells) + " |")
    for fg, policy, _, s in rows:
        if s["tiles"]["tile_foreground_min"] is not None:
            print(f"min_foreground {fg:g}: tile foreground fraction min {s['tiles']['tile_foreground_min']:.3f}, 1st percentile {s['tiles']['tile_foreground_p1']:.3f}")
    print(f"\nFields ({rows[0][3]['n_positive_fields']} of {rows[0][3]['n_fields']} positive; decisions at the card threshold {threshold:.3f})\n")
    print("| pass | aggregation | field AUC | sensitivity | specificity | median score, positive / negative fields |")
    print("|---|---|---|---|---|---|")
    for fg, policy, _, s in rows:
        for how, m in s["fields"].items():
            name = f"top_k_mean (k={TOP_K})" if how == "top_k_mean" else how
            print(f"| min_foreground {fg:g} | {name} | {fmt(m['field_auc'])} | {fmt(m['field_sensitivity'])} | {fmt(m['field_specificity'])} | "
                  f"{fmt(m['field_score_median_positive'])} / {fmt(m['field_score_median_negative'])} |")
    print(f"\ntotal {total_s:.0f} s")

    if args.no_save:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with (RESULTS / "field_localisation.jsonl").open("a", encoding="utf-8") as f:
        for fg, policy, seconds, s in rows:
            for how, m in s["fields"].items():
                row = {
                    "model": str(args.model),
                    "card_crop_policy": dataclasses.asdict(card.crop),
                    "pass": {"min_foreground": fg, "scale": policy.scale},
                    "aggregation": how,
                    "top_k": TOP_K if how == "top_k_mean" else None,
                    "threshold": threshold,
                    "positive_class": card.positive_class,
                    "n_fields": s["n_fields"],
                    "n_validation_fields": n_val,
                    "n_positive_fields": s["n_positive_fields"],
                    **m,
                    **s["tiles"],
                    "pass_seconds": round(seconds, 1),
                    "total_seconds": round(total_s, 1),
                    "batch_size": args.batch_size,
                    **machine,
                    "time": now,
                }
                f.write(json.dumps(row, default=str).replace("NaN", "null") + "\n")


if __name__ == "__main__":
    main()
