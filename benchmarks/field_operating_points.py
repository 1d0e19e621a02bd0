"""Field operating points fitted on annotated validation fields: what ``edgedx fit-fields`` chooses and what it buys.

The malaria-cell model (trained on single-cell crops of the IML fields) goes
through fit-fields' one library call (``edgedx.export.fit_fields.fit_fields``)
on the 52 held-out validation fields (field_localisation.py's selection:
fields with cells in the cell set's val_source and none in train_source),
with the card's crop policy. Printed: the chosen tile threshold and field
rule; parasites found and false detections per field at the chosen point,
fitted (chosen and read on the same 52 fields: optimistic) and 2-fold
cross-fitted (chosen on one half, read on the other: what to expect);
field-level sensitivity/specificity with Wilson intervals; parasitaemia and
red-cell count errors per field; the FROC; the seconds fit-fields took
(one diagnose pass over the fields, the fit, writing and verifying the new
artefact). The new artefact goes to a temporary folder, never the repository.

    python benchmarks/field_operating_points.py [--model MODEL.onnx] [--data DIR] [--limit N] [--fp-per-field 1]
        [--field-rule auto] [--no-count-cells] [--out DIR] [--no-save]

Appends one JSON line to benchmarks/results/field_operating_points.jsonl.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from _env import append_result, cpu_line, cpu_model, git_rev
from field_counting import MODELS
from field_localisation import data_root, validation_fields

from edgedx.export.fit_fields import FitFieldsOptions, fit_fields
from edgedx.runtime.io.field_annotations import read_field_annotations



def fmt(x: Any, digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def ci(values: Any) -> str:
    return "" if not values else f" [{values[0]:.2f}, {values[1]:.2f}]"


def point_row(label: str, point: dict[str, Any]) -> str:
    f = point["field"]
    rate = point.get("parasitaemia", {})
    cells = point.get("cell_count", {})
    return (
        f"| {label} | {point['found']} / {point['n_parasites']} | {fmt(point['false_per_field'], 2)} | "
        f"{fmt(f['sensitivity'], 2)}{ci(f['sensitivity_ci95'])} ({f['sensitivity_counts'][0]}/{f['sensitivity_counts'][1]}) | "
        f"{fmt(f['specificity'], 2)}{ci(f['specificity_ci95'])} ({f['specificity_counts'][0]}/{f['specificity_counts'][1]}) | "
        f"{fmt(rate.get('mae_points'))} | {fmt(rate.get('estimated_median'))} / {fmt(rate.get('annotated_median'))} | {fmt(cells.get('mae'), 1)} |"
    )


def print_tables(result: dict[str, Any]) -> None:
    d = result["detection"]
    rule = d["field_rule"] + (f" k={d['field_k']}" if d["field_rule"] != "any" else "")
    rule += f" threshold {d['field_threshold']:.4f}" if d["field_threshold"] is not None else ""
    print(f"\nCPU: {result['cpu']}; model {result['model']}; {result['n_fields']} validation fields ({result['n_positive_fields']} with "
          f"parasites, {result['n_parasites']} parasites); fit-fields took {result['seconds']:.0f} s\n")
    print(f"chosen at ≤ {result['fp_per_field']:g} false detections per field: tile threshold {d['tile_threshold']:.4f}, field rule {rule}\n")
    print("| figures | parasites found | false per field | field sensitivity | field specificity | parasitaemia MAE (points) "
          "| median parasitaemia est. / ann. (%) | cell count MAE |\n|---|---|---|---|---|---|---|---|")
    print(point_row("fitted (same fields: optimistic)", result["fitted"]))
    if result["cross_fitted"] is not None:
        print(point_row("2-fold cross-fitted", result["cross_fitted"]))
        folds = "; ".join(f"tile threshold {f['tile_threshold']:.4f}, {f['field_rule']} k={f['field_k']}" for f in result["cross_fitted"]["folds"])
        print(f"\ncross-fit folds: {folds}")
    by_rule = result["rule_choice"].get("by_rule", {})
    if by_rule:
        print("\nEach field rule's best setting on all fields (at the chosen tile threshold; fitted, optimistic)\n")
        print("| rule | k | field threshold | balanced accuracy | sensitivity | specificity |\n|---|---|---|---|---|---|")
        for rule, m in by_rule.items():
            print(f"| {rule} | {m['field_k']} | {fmt(m['field_threshold'], 4)} | {fmt(m['balanced_accuracy'])} | {fmt(m['sensitivity'])} | "
                  f"{fmt(m['specificity'])} |")
    print("\nFROC on all fields\n\n| ≤ false per field | tile threshold | parasites found | false per field |\n|---|---|---|---|")
    for row in result["froc"]:
        print(f"| {row['fp_per_field']:g} | {row['threshold']:.4f} | {row['found']} / {result['n_parasites']} | {row['false_per_field']:.2f} |")
    for warning in result["warnings"]:
        print(f"warning: {warning}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="default: the first of " + ", ".join(map(str, MODELS)) + " that exists")
    parser.add_argument("--data", type=Path, default=None, help="folder holding malaria_fields_iml/ and malaria_cells_iml/ (default $EDGEDX_DATA or ../shared/data)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N validation fields")
    parser.add_argument("--fp-per-field", type=float, default=1.0)
    parser.add_argument("--field-rule", default="auto")
    parser.add_argument("--no-count-cells", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="where the new artefact goes (default: a temporary folder)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    path = args.model or next((m for m in MODELS if m.is_file()), None)
    if path is None or not path.is_file():
        sys.exit(f"no model: pass --model (tried {', '.join(map(str, MODELS))})")
    root = data_root(args.data)
    names = validation_fields(root)[: args.limit]
    truth = read_field_annotations(root / "malaria_fields_iml" / "annotations.json").subset(names)
    options = FitFieldsOptions(fp_per_field=args.fp_per_field, field_rule=args.field_rule, count_cells=not args.no_count_cells, overwrite=True)
    with tempfile.TemporaryDirectory(prefix="edgedx-fit-fields-") as tmp:
        started = time.perf_counter()
        report = fit_fields(path, root / "malaria_fields_iml" / "images", truth, args.out or Path(tmp), options)
        seconds = time.perf_counter() - started
    fitted_on = report.detection["fitted_on"]
    result = {
        "model": str(path), "n_fields": fitted_on["n_fields"], "n_positive_fields": fitted_on["n_positive_fields"],
        "n_parasites": fitted_on["n_parasites"], "fp_per_field": args.fp_per_field, "field_rule_asked": args.field_rule,
        "detection": {k: v for k, v in report.detection.items() if k != "fitted_on"}, "fitted": report.fitted,
        "cross_fitted": report.cross_fitted, "rule_choice": report.rule_choice, "froc": report.froc, "counts": report.counts, "warnings": list(report.warnings),
        "selftest_passed": report.selftest["passed"], "seconds": round(seconds, 1),
        "cpu": cpu_line(), "cpu_model": cpu_model(), "git": git_rev(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print_tables(result)
    if not args.no_save:
        append_result("field_operating_points", result)


if __name__ == "__main__":
    main()
