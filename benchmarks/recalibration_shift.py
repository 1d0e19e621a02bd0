"""Site recalibration on real cells: a shifted site makes the card's threshold miss its target; recalibrate restores it.

    python benchmarks/recalibration_shift.py [--model /tmp/edgedx-recipes/malaria_cells_iml/export2/model.onnx]
        [--data $EDGEDX_DATA] [--sizes 100,200,0] [--splits 10] [--out /tmp/edgedx-recalibration]

Needs the malaria cell model and its export (``python benchmarks/real_data/recipe.py malaria_cells_iml``,
then ``edgedx export RUN/model.pt --out .../export2``) and the cells in
``$EDGEDX_DATA/malaria_cells_iml`` (default ``../shared/data``).

What it does, honestly:

- **Cells:** the 763 validation cells (72 parasitized) of ``malaria_cells_iml``. They are the
  model's own validation split: its threshold (target sensitivity 0.95) was chosen on them, so
  on the unshifted cells the old threshold is at its best (the control row).
- **Simulated site:** every cell is changed as a different microscope and stain might change it:
  gamma 0.7 (brighter, washed out), saturation × 0.8 (paler stain), resampled to 0.8× and back
  (a lower-resolution camera). The same change for every cell; no cell is seen twice.
- **Site cases / held-out cases:** the cells' source fields are split at random into halves (cells
  of one field never in both). The site's labelled cases are ``--sizes`` cells drawn from the first
  half (0: all of it, about 380); the operating points are measured on **all of the other half**,
  which recalibration never sees. ``--splits`` random field splits.
- **Recalibration:** ``edgedx.export.recalibrate.recalibrate`` on the site cases (``holdout 0``:
  every site case fits; the held-out half is the report), writing a new ``.onnx``; the old and
  the new files are then run through ``load_model(...).diagnose_many`` on the held-out half:
  sensitivity and specificity at each file's own threshold with Wilson 95% intervals, and ECE.

Prints a markdown table (medians over splits, the share of splits whose held-out sensitivity
reaches 0.90 and 0.95) and appends JSON lines (one per split and size, one summary per size, with
the CPU line) to ``benchmarks/results/recalibration_shift.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, cpu_line, git_rev, version  # noqa: E402

from edgedx.export.recalibrate import RecalibrateOptions, recalibrate  # noqa: E402
from edgedx.runtime import load_model  # noqa: E402
from edgedx.runtime.evaluate import wilson_interval  # noqa: E402
from edgedx.runtime.trust import expected_calibration_error  # noqa: E402

TMP = Path(os.environ.get("TMPDIR", "/tmp"))
MODEL = TMP / "edgedx-recipes" / "malaria_cells_iml" / "export2" / "model.onnx"
RESULTS = ROOT / "benchmarks" / "results" / "recalibration_shift.jsonl"
CLASSES = ("uninfected", "parasitized")
SHIFT = {"gamma": 0.7, "saturation": 0.8, "resample": 0.8}


def site_shift(image: np.ndarray) -> np.ndarray:
    """The simulated site: washed out (gamma), paler stain (saturation), a lower-resolution camera (down and up)."""
    out = np.clip(255.0 * (image / 255.0) ** SHIFT["gamma"], 0, 255).astype(np.uint8)
    hsv = cv2.cvtColor(out, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] *= SHIFT["saturation"]
    out = cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)
    h, w = out.shape[:2]
    small = cv2.resize(out, (round(w * SHIFT["resample"]), round(h * SHIFT["resample"])), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def load_cells(data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = data / "malaria_cells_iml" / "malaria_cells_iml.npz"
    if not path.is_file():
        sys.exit(f"{path} not found: set EDGEDX_DATA (or --data) to the folder holding malaria_cells_iml/")
    with np.load(path) as npz:
        fields = np.asarray([s.split(":")[0] for s in npz["val_source"]])
        return npz["val_images"], npz["val_labels"].reshape(-1).astype(np.int64), fields


def field_halves(fields: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cells of a random half of the source fields, and the rest (no field in both)."""
    names = np.random.default_rng(seed).permutation(np.unique(fields))
    first = set(names[: len(names) // 2].tolist())
    mask = np.asarray([f in first for f in fields])
    return np.flatnonzero(mask), np.flatnonzero(~mask)


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    shutil.rmtree(root, ignore_errors=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / CLASSES[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:04d}.png"), image[..., ::-1])
    return root


def held_out_point(model_path: Path, images: np.ndarray, labels: np.ndarray) -> dict:
    """The file's own threshold on the held-out cells, through the deployed path."""
    model = load_model(model_path)
    probs = np.stack([d.sliding.probabilities for d in model.diagnose_many(list(images))])
    pos = model.card.positive_index
    threshold = model.card.threshold
    called = probs[:, pos] >= threshold
    tp, n_pos = int(np.sum(called & (labels == pos))), int(np.sum(labels == pos))
    tn, n_neg = int(np.sum(~called & (labels != pos))), int(np.sum(labels != pos))
    return {
        "threshold": threshold, "temperature": list(model.card.calibration.temperature) or None,
        "sensitivity": tp / n_pos, "sensitivity_ci95": wilson_interval(tp, n_pos), "sensitivity_counts": [tp, n_pos],
        "specificity": tn / n_neg, "specificity_ci95": wilson_interval(tn, n_neg), "specificity_counts": [tn, n_neg],
        "ece": expected_calibration_error(probs, labels, "binary", pos),
    }


def one_split(args: argparse.Namespace, cells: tuple, shifted: np.ndarray, seed: int, work: Path) -> list[dict]:
    images, labels, fields = cells
    site_half, held = field_halves(fields, seed)
    control = held_out_point(args.model, images[held], labels[held])
    old = held_out_point(args.model, shifted[held], labels[held])
    rows = []
    for size in args.sizes:
        rng = np.random.default_rng(1000 + seed)
        chosen = site_half if size == 0 or size >= len(site_half) else rng.choice(site_half, size, replace=False)
        folder = write_folder(work / f"site{seed}_{size}", shifted[chosen], labels[chosen])
        started = time.perf_counter()
        report = recalibrate(args.model, folder, work / f"out{seed}_{size}", RecalibrateOptions(holdout=0.0, bootstrap=200, overwrite=True))
        seconds = time.perf_counter() - started
        new = held_out_point(Path(report.output), shifted[held], labels[held])
        rows.append({
            "split": seed, "size": size, "site_cases": len(chosen), "site_positives": int(labels[chosen].sum()), "held_out": len(held),
            "held_out_positives": int(labels[held].sum()), "control_unshifted": control, "old": old, "new": new,
            "recalibrate_seconds": round(seconds, 1), "selftest_passed": report.selftest["passed"], "warnings": list(report.warnings),
        })
        print(f"split {seed} size {len(chosen)}: held-out sensitivity {old['sensitivity']:.3f} → {new['sensitivity']:.3f}, "
              f"specificity {old['specificity']:.3f} → {new['specificity']:.3f} ({seconds:.0f} s)", file=sys.stderr)
    return rows


def summarise(rows: list[dict], size: int) -> dict:
    mine = [r for r in rows if r["size"] == size]

    def med(part: str, key: str) -> float:
        return float(np.median([r[part][key] for r in mine]))

    return {
        "size": size or "all of the site half", "splits": len(mine), "site_cases_median": float(np.median([r["site_cases"] for r in mine])),
        "site_positives_median": float(np.median([r["site_positives"] for r in mine])),
        **{f"{part}_{key}_median": med(part, key) for part in ("control_unshifted", "old", "new") for key in ("sensitivity", "specificity", "ece")},
        "new_threshold_median": med("new", "threshold"), "old_threshold": mine[0]["old"]["threshold"],
        "share_new_sensitivity_ge_0.90": float(np.mean([r["new"]["sensitivity"] >= 0.90 for r in mine])),
        "share_new_sensitivity_ge_0.95": float(np.mean([r["new"]["sensitivity"] >= 0.95 for r in mine])),
        "share_old_sensitivity_ge_0.90": float(np.mean([r["old"]["sensitivity"] >= 0.90 for r in mine])),
        "all_selftests_passed": all(r["selftest_passed"] for r in mine),
    }


def table(summaries: list[dict], example: dict) -> str:
    lines = [
        "| site cases (median, positives) | held-out sensitivity: unshifted / old / recalibrated | held-out specificity: old / recalibrated | ECE old → new | threshold old → new | splits with recalibrated sensitivity ≥ 0.90 / ≥ 0.95 |",
        "|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(
            f"| {s['site_cases_median']:.0f} ({s['site_positives_median']:.0f}) | {s['control_unshifted_sensitivity_median']:.3f} / "
            f"{s['old_sensitivity_median']:.3f} / **{s['new_sensitivity_median']:.3f}** | {s['old_specificity_median']:.3f} / "
            f"{s['new_specificity_median']:.3f} | {s['old_ece_median']:.3f} → {s['new_ece_median']:.3f} | {s['old_threshold']:.3f} → "
            f"{s['new_threshold_median']:.3f} | {s['share_new_sensitivity_ge_0.90']:.0%} / {s['share_new_sensitivity_ge_0.95']:.0%} ({s['splits']}) |"
        )
    o, n = example["old"], example["new"]
    lines.append("")
    lines.append(
        f"Split {example['split']}, {example['site_cases']} site cases ({example['site_positives']} positive), held out {example['held_out']} "
        f"({example['held_out_positives']} positive): sensitivity {o['sensitivity']:.3f} {_ci(o, 'sensitivity')} → {n['sensitivity']:.3f} "
        f"{_ci(n, 'sensitivity')}; specificity {o['specificity']:.3f} {_ci(o, 'specificity')} → {n['specificity']:.3f} {_ci(n, 'specificity')}"
    )
    return "\n".join(lines)


def _ci(point: dict, key: str) -> str:
    lo, hi = point[f"{key}_ci95"]
    k, n = point[f"{key}_counts"]
    return f"[{lo:.3f}, {hi:.3f}] ({k}/{n})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("EDGEDX_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[100, 200, 0], help="site cases; 0: the whole site half")
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--out", type=Path, default=TMP / "edgedx-recalibration")
    args = parser.parse_args()
    if not args.model.is_file():
        sys.exit(f"{args.model} not found: python benchmarks/real_data/recipe.py malaria_cells_iml, then export its model.pt (see the docstring)")
    started = time.perf_counter()
    cells = load_cells(args.data)
    shifted = np.stack([site_shift(image) for image in cells[0]])
    rows = [row for seed in range(args.splits) for row in one_split(args, cells, shifted, seed, args.out)]
    summaries = [summarise(rows, size) for size in args.sizes]
    env = {"cpu": cpu_line(), "git": git_rev(), "onnxruntime": version("onnxruntime"), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "model": str(args.model), "shift": SHIFT, "seconds": round(time.perf_counter() - started, 1)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"kind": "split", **row, "env": env}) + "\n")
        for summary in summaries:
            f.write(json.dumps({"kind": "summary", **summary, "env": env}) + "\n")
    print(f"{env['cpu']}; git {env['git']}; onnxruntime {env['onnxruntime']}; {env['seconds']:.0f} s")
    print(table(summaries, rows[-1]))


if __name__ == "__main__":
    main()
