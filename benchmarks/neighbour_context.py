"""Neighbour context on the malaria fields: the blend weight chosen on TRAINING fields, the result read on VALIDATION fields.

    python benchmarks/neighbour_context.py [--model M.onnx] [--training-fields 60] [--weights 0,0.1,0.2,0.3,0.4,0.45]
        [--out /tmp/edgedx-neighbour-context] [--no-fit] [--no-save]

``crop.neighbour_context`` w blends each crop's p(parasitized) with the highest of its eight grid neighbours'
(``edgedx.runtime.neighbours``): q = (1 − w)·p + w·max(neighbours); the card keeps w below 0.5 (from there a crop
beside an object's best crop outranks it, and detections, the map's local maxima, leave the object).

1. Choice: one plain pass (w = 0) of the model over ``--training-fields`` fields whose cells are in the cell
   set's train split (seeded; the mined recipe model has seen their false positives, none of the validation
   fields); every weight is applied to that pass's tile map with the runtime's own function and scored: the
   tile AUC, and the parasites found at 1 false detection per field (the runtime's detections on the blended
   map). The weight with the highest tile AUC among those that find at least as many parasites as w = 0 is
   chosen. No validation field takes part.
2. Result: the 52 validation fields through the runtime's path twice, at w = 0 and at the chosen w (the card's
   crop policy with that one setting changed): the tile AUC as ``field_localisation.py`` scores it (a tile is
   positive when it holds a parasite box centre), its loss split by the centre's margin inside the tile, and
   the field aggregations. The other weights' validation tile AUCs are printed too, marked as not used.
3. Detections: ``edgedx fit-fields``' library call on the validation fields at w = 0 and at the chosen w
   (``--neighbour-context``): parasites found at 0.5/1/2/4/8 false detections per field and the 2-fold
   cross-fitted operating point (``--no-fit`` skips it).
4. Cost: the blend's time per field against the field's whole pass.

The default model is the recipe's 3-round mined model of ``hard_negatives_malaria.py --variants positives
--rounds 3``. Prints markdown tables with the CPU; appends one JSON line to
benchmarks/results/neighbour_context.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _env import append_result, cpu_flags, cpu_model, git_rev  # noqa: E402
from field_localisation import data_root, load_boxes, run_pass, score_pass, validation_fields  # noqa: E402
from hard_negatives_malaria import training_fields  # noqa: E402

from edgedx.card import MAX_NEIGHBOUR_CONTEXT  # noqa: E402
from edgedx.export.fit_fields import FitFieldsOptions, fit_fields  # noqa: E402
from edgedx.runtime import load_model  # noqa: E402
from edgedx.runtime.detection_metrics import field_candidates_of, froc  # noqa: E402
from edgedx.runtime.detections import field_candidates, positive_tile_p  # noqa: E402
from edgedx.runtime.io.field_annotations import read_field_annotations  # noqa: E402
from edgedx.runtime.neighbours import with_neighbour_context  # noqa: E402
from edgedx.runtime.tiling import CropLayout, merge  # noqa: E402

DEFAULT_MODEL = Path("/tmp/edgedx-hardneg-all3/positives/export/model.onnx")


def blended(run: dict[str, Any], weight: float, positive_index: int) -> tuple[dict[str, Any], float]:
    """A copy of a plain pass with every field's tile map blended by the runtime's function; and the seconds it took."""
    started = time.perf_counter()
    fields = []
    for f in run["fields"]:
        probs = with_neighbour_context(f["probs"], f["grid_shape"], weight, positive_index)
        fields.append({**f, "probs": probs, "p": probs[:, positive_index], "card_score": None})  # None: no runtime merge to agree with
    return {**run, "fields": fields}, time.perf_counter() - started


def tile_figures(scored: dict[str, Any]) -> dict[str, Any]:
    t = scored["tiles"]
    keys = ("tile_auc", "tile_auc_clear_negatives", "tile_positive", "tile_negative", "tile_auc_loss_by_centre_margin", "parasites_at_false_alarms_per_field")
    return {k: t[k] for k in keys}


def found_at_one(kept: dict[str, Any], truth: Any, weight: float, card: Any) -> int:
    """Parasites found at 1 false detection per field by the runtime's detections on each plain pass re-merged by the
    runtime's merger at ``weight`` (what diagnose gives with that crop.neighbour_context)."""
    pos, fields = card.positive_index, []
    policy = dataclasses.replace(card.crop, neighbour_context=weight)
    for name, result in kept.items():
        s = result.sliding
        layout = CropLayout(s.grid, np.asarray(s.used, bool), s.foreground, s.foreground_fallback)
        b = merge(layout, s.tile_probabilities, policy, activation=card.output_activation, positive_index=pos)
        found = field_candidates(b, pos, card.detection.nms_iou)
        fields.append(field_candidates_of(found, positive_tile_p(b, pos), truth.fields[name]))
    return int(froc(fields).at_rate(1.0)["found"])


def choose(model: Any, root: Path, boxes: dict, weights: list[float], n_fields: int) -> dict[str, Any]:
    """Tile AUC and parasites found at 1 false detection per field, per weight, on training fields (one plain pass,
    blended by the runtime's function); the weight chosen by the rule of the module docstring."""
    names = training_fields(root, n_fields, seed=1)
    truth = read_field_annotations(root / "malaria_fields_iml" / "annotations.json").subset(names)
    run = run_pass(model, names, root / "malaria_fields_iml" / "images", boxes, {"neighbour_context": 0.0}, set(names))
    card = model.card
    policy = dataclasses.replace(card.crop, neighbour_context=0.0)
    rows = {}
    for w in weights:
        copy, _ = blended(run, w, card.positive_index)
        rows[w] = {**tile_figures(score_pass(copy, policy, card)), "found_at_1_per_field": found_at_one(run["kept"], truth, w, card)}
    allowed = [w for w in weights if rows[w]["found_at_1_per_field"] >= rows[0.0]["found_at_1_per_field"]]
    best = max(allowed, key=lambda w: (rows[w]["tile_auc"], -w))
    return {"fields": names, "n_fields": len(names), "n_parasites": sum(len(truth.fields[n].positives) for n in names),
            "by_weight": {str(w): rows[w] for w in weights}, "chosen": best}


def validation(model: Any, root: Path, boxes: dict, weights: list[float], chosen: float) -> dict[str, Any]:
    """The validation fields through the runtime at w = 0 and the chosen w; the other weights blended in numpy (not used)."""
    names = validation_fields(root)
    images = root / "malaria_fields_iml" / "images"
    card = model.card
    out: dict[str, Any] = {"n_fields": len(names)}
    plain = None
    for w in sorted({0.0, chosen}):
        run = run_pass(model, names, images, boxes, {"neighbour_context": w}, set())
        scored = score_pass(run, dataclasses.replace(card.crop, neighbour_context=w), card)
        out[f"runtime_w{w:g}"] = {"tiles": tile_figures(scored), "fields": scored["fields"], "seconds": run["seconds"]}
        if w == 0.0:
            plain = run
    assert plain is not None
    seconds = []
    out["numpy_by_weight"] = {}
    for w in weights:
        copy, took = blended(plain, w, card.positive_index)
        seconds.append(took)
        out["numpy_by_weight"][str(w)] = tile_figures(score_pass(copy, dataclasses.replace(card.crop, neighbour_context=w), card))["tile_auc"]
    out["blend_ms_per_field"] = 1000 * float(np.median(seconds)) / len(names)
    out["pass_ms_per_field"] = 1000 * out["runtime_w0"]["seconds"] / len(names)
    return out


def detections(model_path: Path, root: Path, out: Path, weights: list[float]) -> dict[str, Any]:
    """fit-fields on the validation fields at each weight: FROC and the cross-fitted operating point."""
    truth = read_field_annotations(root / "malaria_fields_iml" / "annotations.json").subset(validation_fields(root))
    rows = {}
    for w in weights:
        report = fit_fields(model_path, root / "malaria_fields_iml" / "images", truth, out / f"w{w:g}",
                            FitFieldsOptions(overwrite=True, neighbour_context=w))
        rows[str(w)] = {"froc": report.froc, "cross_fitted": report.cross_fitted, "tile_threshold": report.detection["tile_threshold"],
                        "output": report.output, "seconds": report.seconds}
    return rows


def print_tables(line: dict[str, Any]) -> None:
    flags = ", ".join(k for k, v in line["cpu_flags"].items() if v) or "none"
    print(f"\ncpu: {line['cpu']} (flags: {flags}); model {line['model']}")
    c, v = line["choice"], line["validation"]
    print(f"\nChoice on {c['n_fields']} training fields ({c['n_parasites']} parasites); the validation column is not used for the choice\n")
    print("| w | tile AUC, training fields | parasites found at 1 false detection/field, training | tile AUC, validation fields |")
    print("|---|---|---|---|")
    for w, row in c["by_weight"].items():
        mark = " (chosen)" if float(w) == c["chosen"] else ""
        print(f"| {w}{mark} | {row['tile_auc']:.4f} | {row['found_at_1_per_field']} | {v['numpy_by_weight'][w]:.4f} |")
    print(f"\nValidation fields ({v['n_fields']}) through the runtime\n")
    print("| w | tile AUC | negatives clear of parasite boxes | parasites lit at 1 false tile/field | field AUC (mean / top_k_mean) |")
    print("|---|---|---|---|---|")
    for key in (k for k in v if k.startswith("runtime_w")):
        t, f = v[key]["tiles"], v[key]["fields"]
        print(f"| {key[9:]} | {t['tile_auc']:.4f} | {t['tile_auc_clear_negatives']:.4f} | {t['parasites_at_false_alarms_per_field']['1']['parasites_found']} | "
              f"{f['mean']['field_auc']:.3f} / {f['top_k_mean']['field_auc']:.3f} |")
    print("\n| w | centre inside the tile by | positive tiles | median p | share of 1 − AUC |")
    print("|---|---|---|---|---|")
    for key in (k for k in v if k.startswith("runtime_w")):
        for b in v[key]["tiles"]["tile_auc_loss_by_centre_margin"]:
            median = "—" if b["median_p"] is None else f"{b['median_p']:.3f}"
            print(f"| {key[9:]} | {b['margin_from']:.3g}–{b['margin_to']:.3g} | {b['positive_tiles']} | {median} | {b['auc_loss']:.4f} |")
    print(f"\nblend: {v['blend_ms_per_field']:.3f} ms per field; the plain pass {v['pass_ms_per_field']:.0f} ms per field "
          f"({100 * v['blend_ms_per_field'] / v['pass_ms_per_field']:.3f}%)")
    if line.get("detections"):
        print("\nDetections (fit-fields on the validation fields): parasites found at 0.5 / 1 / 2 / 4 / 8 false detections per field; cross-fitted\n")
        print("| w | FROC | cross-fitted: found at false/field | field sensitivity / specificity | parasitaemia MAE (points) |")
        print("|---|---|---|---|---|")
        for w, d in line["detections"].items():
            froc = " / ".join(str(r["found"]) for r in d["froc"])
            x = d["cross_fitted"]
            print(f"| {w} | {froc} of {d['froc'][0]['n_positives']} | {x['found']} at {x['false_per_field']:.2f} | "
                  f"{x['field']['sensitivity']:.3f} / {x['field']['specificity']:.3f} | {x['parasitaemia']['mae_points']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--training-fields", type=int, default=60)
    parser.add_argument("--weights", default="0,0.1,0.2,0.3,0.4,0.45", help="weights tried, each below 0.5 (0 is always tried)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgedx-neighbour-context"))
    parser.add_argument("--no-fit", action="store_true", help="skip the fit-fields detections (two more passes)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    if not args.model.is_file():
        raise SystemExit(f"model not found: {args.model}; make it with python benchmarks/hard_negatives_malaria.py --variants positives --rounds 3")
    root = data_root(args.data)
    weights = sorted({float(w) for w in args.weights.split(",") if w.strip()} | {0.0})
    if any(not 0.0 <= w < MAX_NEIGHBOUR_CONTEXT for w in weights):
        raise SystemExit(f"--weights {args.weights}: each must be within [0, {MAX_NEIGHBOUR_CONTEXT:g}), as the card requires")
    model = load_model(args.model, quality="off")
    if model.card.crop.neighbour_context:
        raise SystemExit(f"{args.model} already blends its crops (neighbour_context {model.card.crop.neighbour_context:g}): give the plain export")
    boxes = load_boxes(root)
    started = time.perf_counter()
    choice = choose(model, root, boxes, weights, args.training_fields)
    line: dict[str, Any] = {"model": str(args.model), "choice": choice,
                            "validation": validation(model, root, boxes, weights, choice["chosen"])}
    if not args.no_fit:
        line["detections"] = detections(args.model, root, args.out, sorted({0.0, choice["chosen"]}))
    line.update(seconds=round(time.perf_counter() - started, 1), cpu=cpu_model(), cpu_flags=cpu_flags(), git=git_rev(),
                time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    print_tables(line)
    if not args.no_save:
        append_result("neighbour_context", line)


if __name__ == "__main__":
    main()
