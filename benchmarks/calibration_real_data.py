"""Temperature scaling and split-conformal abstention on the real-data models, fitted and judged on separate images.

    python benchmarks/calibration_real_data.py [--datasets bloodmnist,isic_mel_nv] [--runs /tmp/edgedx-recipes] [--splits 50]

For each trained run in ``--runs/<dataset>/run`` (``model.pt`` + ``split.json``,
trained by ``benchmarks/real_data/recipe.py``; cards of schema 3 migrate on
load), every validation image is split and its crop logits computed once,
through the runtime's splitter with the checkpoint as the engine
(:func:`edgedx.runtime.fitting.crop_logits`). These runs have no test split,
so the validation images are cut in two, stratified by class, with a fixed
seed: the FIT half fits what training would fit (temperature, then the
operating threshold on the calibrated probabilities by training's own rule and
target sensitivity, then ``qhat`` for 95% coverage and the crop-dispersion
limit), and every figure in the table is measured on the other, REPORT half:
ECE and Brier before (the network's own probabilities) and after (as
deployed), the prediction sets' coverage with its Wilson 95% interval, the
refer rate, and accuracy (and for binary models sensitivity and specificity) on
the cases not referred against all. The aim: coverage within ±2 points of 95%.
One split of a small set is noisy, so the same is repeated over ``--splits``
random halvings and the mean ± sd of coverage, ECE after and refer rate are
given beside it. The models were selected and thresholded on all of
validation at training time; that selection is not redone here, which
flatters the report half a little (said in the README).

One JSON line per dataset goes to benchmarks/results/calibration_real_data.jsonl;
a Markdown table and the CPU line are printed. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _env import cpu_line, git_rev  # noqa: E402

from edgedx.card import ModelCard  # noqa: E402
from edgedx.runtime.evaluate import wilson_interval  # noqa: E402
from edgedx.runtime.fitting import CropLogits, crop_logits, fit_abstention, fit_calibration, trust_figures  # noqa: E402
from edgedx.training.checkpoint import build_model, load_checkpoint  # noqa: E402
from edgedx.training.run import RunFolder  # noqa: E402
from edgedx.training.threshold import operating_point  # noqa: E402
from edgedx.training.validation import TorchSession  # noqa: E402

DATASETS = ("malaria_cells_iml", "isic_mel_nv", "bloodmnist", "breastmnist", "pneumoniamnist")
RESULTS = HERE / "results" / "calibration_real_data.jsonl"
COVERAGE = 0.95
AIM_POINTS = 0.02


def halves(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A stratified 50/50 split of the image indices: (fit, report)."""
    rng = np.random.default_rng(seed)
    fit, report = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        fit.extend(idx[: len(idx) // 2])
        report.extend(idx[len(idx) // 2 :])
    return np.sort(fit), np.sort(report)


def fit_card(card: ModelCard, crops: CropLogits, y: np.ndarray, target: float) -> ModelCard:
    """What training fits, in training's order, on the fit half: temperature, threshold, abstention."""
    calibrated = fit_calibration(crops, y, card, split="fit half")
    fitted = card.replace(calibration=calibrated.calibration)
    if card.task == "binary":
        fitted = fitted.replace(threshold=operating_point(y, calibrated.after, fitted, target)["threshold"])
    return fitted.replace(abstention=fit_abstention(crops, y, fitted, coverage=COVERAGE, split="fit half"))


def one_split(card: ModelCard, crops: CropLogits, y: np.ndarray, target: float, seed: int) -> tuple[ModelCard, dict[str, Any]]:
    fit_idx, report_idx = halves(y, seed)
    fitted = fit_card(card, crops.subset(fit_idx), y[fit_idx], target)
    return fitted, trust_figures(crops.subset(report_idx), y[report_idx], fitted)


def measure(dataset: str, runs: Path, splits: int, batch_size: int) -> dict[str, Any]:
    run = runs / dataset / "run"
    ckpt = load_checkpoint(run / "model.pt")
    card = ckpt.card  # schema 3 cards migrate on load: no temperature, no abstention yet
    held = RunFolder(run).split_images("val", limit=10**9, card=card)  # every validation image, read back from the data source
    started = time.perf_counter()
    session = TorchSession(build_model(ckpt), card)
    crops = crop_logits(session.run, card, list(enumerate(held.items)), batch_size=batch_size)
    model_s = time.perf_counter() - started
    if crops.failed:
        raise SystemExit(f"{dataset}: {len(crops.failed)} validation images refused: {crops.failed[0][1]}")
    assert held.labels is not None
    y = held.labels[list(crops.keys)]
    target = float(card.metrics.get("target_sensitivity") or card.provenance.training.get("target_sensitivity") or 0.95)
    fitted, first = one_split(card, crops, y, target, seed=0)
    repeats = [one_split(card, crops, y, target, seed=s)[1] for s in range(splits)]
    n_report = first["n"]
    covered = round(first["coverage"] * n_report)
    row = {
        "dataset": dataset, "task": card.task, "epochs_trained": card.provenance.training.get("epochs"), "best_epoch": ckpt.extra.get("epoch"),
        "crop_policy": card.crop.describe(), "aggregation": card.crop.aggregation,
        "n_val": len(crops), "n_fit": len(crops) - n_report, "n_report": n_report, "mean_crops": float(crops.n_crops.mean()),
        "split": "validation images, stratified 50/50 (seed 0): fit half fits T, threshold, qhat, dispersion limit; report half is measured",
        "temperature": list(fitted.calibration.temperature), "qhat": fitted.abstention.qhat,
        "dispersion_limit": fitted.abstention.dispersion_limit, "threshold": fitted.threshold, "target_sensitivity": target,
        "report": first, "coverage_ci95": wilson_interval(covered, n_report),
        # split conformal's own expectation with this many fitting images: ceil((n+1)·0.95)/(n+1), or 1 when too few
        "coverage_expected": min(1.0, math.ceil((len(crops) - n_report + 1) * COVERAGE) / (len(crops) - n_report + 1)),
        "coverage_within_aim": abs(first["coverage"] - COVERAGE) <= AIM_POINTS + 1e-9,
        "repeated": {
            "splits": splits,
            **{f"{k}_mean": float(np.mean([r[k] for r in repeats])) for k in ("coverage", "ece_before", "ece_after", "refer_rate")},
            **{f"{k}_sd": float(np.std([r[k] for r in repeats], ddof=1)) for k in ("coverage", "ece_after", "refer_rate")},
        },
        "seconds": {"model": round(model_s, 1), "total": round(time.perf_counter() - started, 1)},
    }
    row.update(cpu=cpu_line(), git=git_rev(), time=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return row


def table(rows: list[dict[str, Any]]) -> str:
    f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    head = (
        "| dataset | n fit / report | T | ECE before → after | Brier before → after | coverage (95% CI) | expected | refer rate | "
        "accuracy: not referred (n) / all | sens / spec: not referred · all | coverage over splits (mean ± sd) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        rep, rpt, ci = r["report"], r["repeated"], r["coverage_ci95"]
        kept, every = rep["not_referred"], rep["all"]
        sens = (f"{f(kept.get('sensitivity'))} / {f(kept.get('specificity'))} · {f(every.get('sensitivity'))} / {f(every.get('specificity'))}"
                if "sensitivity" in kept else "—")
        lines.append(
            f"| {r['dataset']} | {r['n_fit']} / {r['n_report']} | {', '.join(f'{t:.3g}' for t in r['temperature'])} | "
            f"{f(rep['ece_before'])} → {f(rep['ece_after'])} | {f(rep['brier_before'])} → {f(rep['brier_after'])} | "
            f"{f(rep['coverage'])} ({f(ci[0], 2)}–{f(ci[1], 2)}){'' if r['coverage_within_aim'] else ' ✗'} | {f(r['coverage_expected'])} | "
            f"{f(rep['refer_rate'])} | {f(kept['accuracy'])} ({kept['n']}) / {f(every['accuracy'])} | {sens} | "
            f"{f(rpt['coverage_mean'])} ± {f(rpt['coverage_sd'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--runs", type=Path, default=Path(tempfile.gettempdir()) / "edgedx-recipes")
    parser.add_argument("--splits", type=int, default=50, help="random 50/50 halvings for the mean ± sd columns")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-save", action="store_true", help="print only; do not append to the results file")
    args = parser.parse_args()
    rows = []
    for dataset in args.datasets.split(","):
        row = measure(dataset.strip(), args.runs, args.splits, args.batch_size)
        rows.append(row)
        print(f"{dataset}: {row['seconds']['total']} s", flush=True)
        if not args.no_save:
            with RESULTS.open("a", encoding="utf-8") as out:
                out.write(json.dumps(row) + "\n")
    print(table(rows))
    print(f"CPU: {cpu_line()}")


if __name__ == "__main__":
    main()
