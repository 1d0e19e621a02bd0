"""What a fold ensemble costs against one fold model: the same crops, model only, interleaved (issue 20, item 2).

A K-fold ensemble exported as one file (``edgedx export CV_DIR``) runs K
networks per crop, so it should take about K times as long as one fold model;
this measures how close to 1/K its speed is on this CPU, and how far its
answers are from one fold model's on the same crops.

    flock /tmp/edgedx-bench.lock python benchmarks/ensemble_cost.py CV_DIR
        [--out DIR] [--batches 1,16] [--rounds 5] [--seconds 1.0] [--crops 256] [--synthetic-verification-only] [--results FILE]

CV_DIR is the folder ``edgedx train DATA --out CV_DIR --folds K`` wrote.
``fold_1/model.pt`` is exported (fp32) into ``OUT/single`` and the fold models,
averaged into ``CV_DIR/ensemble.pt`` (reused when newer than every fold), into
``OUT/ensemble``; each export is verified as any export is (on its run's
validation images), and an export already in OUT of the same checkpoint
(same sha256) is reused.

Crops: up to ``--crops`` crops of the ensemble's validation images cut by the
card's crop policy (random pixels when the images cannot be found; the table
says which). Timing: a warm-up, then ``--rounds`` interleaved rounds of at least
``--seconds`` per file, the order rotating each round (``_env.interleaved``);
medians, and the ratio ensemble ÷ single with the min–max of the per-round
ratios, beside 1/K. The CPU (model, flags) is printed with the table and every
row is appended to ``benchmarks/results/ensemble_cost.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

# benchmarks/ is sys.path[0] when this file runs as a script
from _env import ROOT, cpu_flags, cpu_line, cpu_model, git_rev, interleaved, most_other, ratio_stats, version

from edgedx.card import ModelCard
from edgedx.errors import EdgeDxError
from edgedx.export.ensemble import ensemble_checkpoint
from edgedx.export.pipeline import REPORT_NAME, ExportOptions, export_checkpoint
from edgedx.export.samples import calibration_crops, split_samples
from edgedx.runtime.backends.session import open_session
from edgedx.runtime.preprocess import model_input, to_probabilities
from edgedx.training.checkpoint import file_sha256, load_checkpoint

RESULTS = ROOT / "benchmarks" / "results" / "ensemble_cost.jsonl"
TMP = Path(tempfile.gettempdir())


def exported(checkpoint: Path, out: Path, synthetic_only: bool) -> Path:
    """``out/<stem>.onnx`` exported (fp32, verified) from ``checkpoint``, or reused when ``out`` holds an export of it."""
    report = out / REPORT_NAME
    onnx_path = out / f"{checkpoint.stem}.onnx"
    if report.is_file() and onnx_path.is_file():
        if json.loads(report.read_text(encoding="utf-8")).get("checkpoint_sha256") == file_sha256(checkpoint):
            print(f"{out}: export of {checkpoint.name} already there, reused", flush=True)
            return onnx_path
    print(f"exporting {checkpoint} → {out} (fp32) …", flush=True)
    started = time.perf_counter()
    export_checkpoint(checkpoint, out, ExportOptions(synthetic_verification_only=synthetic_only))
    print(f"  exported in {time.perf_counter() - started:.0f} s", flush=True)
    return onnx_path


def parity_of(onnx_path: Path) -> dict[str, Any]:
    """The export report's verdict on the file: passed, and the largest probability change against PyTorch."""
    report = json.loads((onnx_path.parent / REPORT_NAME).read_text(encoding="utf-8"))
    entry = next(a for a in report["artefacts"] if a["path"] == onnx_path.name)
    return {"passed": entry["parity"]["passed"], "max_prob_delta": entry["parity"].get("max_prob_delta"),
            "verified_on": report["verification"]["source"]}


def crops_for(checkpoint: Path, card: ModelCard, limit: int) -> tuple[np.ndarray, str]:
    """Crops of the checkpoint's validation images (random pixels when they cannot be read), and where they came from."""
    try:
        samples = split_samples(checkpoint, card, "val", limit=limit)
        return calibration_crops(samples, card, limit=limit), f"validation crops ({samples.source})"
    except EdgeDxError as exc:
        print(f"  validation images unavailable ({exc}); timing on random crops", flush=True)
        rng = np.random.default_rng(0)
        return rng.integers(0, 256, (limit, *card.input_size, 3), dtype=np.uint8), "random crops"


def agreement(single: Any, ensemble: Any, crops: np.ndarray, card: ModelCard) -> dict[str, float]:
    """How far the ensemble's answers are from one fold model's on the same crops (calibrated probabilities)."""
    p1, pk = [], []
    for i in range(0, len(crops), 32):
        x = model_input(crops[i : i + 32], card)
        p1.append(to_probabilities(single.run(x), single.card))
        pk.append(to_probabilities(ensemble.run(x), ensemble.card))
    a, b = np.concatenate(p1), np.concatenate(pk)
    return {"top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()), "mean_abs_dp": float(np.abs(a - b).mean()),
            "max_abs_dp": float(np.abs(a - b).max())}


def measure(single: Any, ensemble: Any, crops: np.ndarray, card: ModelCard, batch: int, args: argparse.Namespace) -> dict[str, Any]:
    """crops/s of both files at ``batch``, interleaved, and the ensemble's speed as a fraction of one fold model's."""
    x = model_input(np.resize(crops, (batch, *crops.shape[1:])), card)  # repeats the crops when there are fewer than the batch
    calls = {"single": lambda: single.run(x), "ensemble": lambda: ensemble.run(x)}
    rates, other, discarded = interleaved(calls, batch, rounds=args.rounds, seconds=args.seconds, warmup=args.warmup, settle=0.05)
    return {
        "batch": batch, "single_crops_per_s": statistics.median(rates["single"]), "ensemble_crops_per_s": statistics.median(rates["ensemble"]),
        "ensemble_vs_single": ratio_stats(rates["ensemble"], rates["single"]), "other_load_max": most_other(other), "rounds_discarded": discarded,
    }


def print_table(cv_dir: Path, card: ModelCard, members: int, rows: list[dict[str, Any]], facts: dict[str, Any]) -> None:
    print(f"\n### {cv_dir.name}: {members}-fold ensemble vs fold_1 ({card.arch}, {card.input_size[0]} px; {facts['crops']})\n")
    print(f"{cpu_line()}; ONNX Runtime {version('onnxruntime')}\n")
    print("| batch | fold_1 crops/s | ensemble crops/s | ensemble ÷ single (min–max) | 1/K |")
    print("|---|---|---|---|---|")
    for r in rows:
        s = r["ensemble_vs_single"]
        print(f"| {r['batch']} | {r['single_crops_per_s']:.0f} | {r['ensemble_crops_per_s']:.0f} | "
              f"{s['ratio']:.3f} ({s['ratio_min']:.3f}–{s['ratio_max']:.3f}) | {1 / members:.3f} |")
    a = facts["agreement"]
    print(f"\nFiles: fold_1 {facts['single_mb']:.1f} MB, ensemble {facts['ensemble_mb']:.1f} MB. Export parity: fold_1 "
          f"{facts['single_parity']['passed']}, ensemble {facts['ensemble_parity']['passed']} (max |Δp| vs PyTorch "
          f"{facts['ensemble_parity']['max_prob_delta']}). Ensemble vs fold_1 on the crops: top-1 agreement {a['top1_agreement']:.3f}, "
          f"mean |Δp| {a['mean_abs_dp']:.4f}.")
    load = max((r["other_load_max"] for r in rows if r["other_load_max"] is not None), default=None)
    print(f"Other load, max: {'n/a' if load is None else f'{load:.0%}'}.")


def bench(cv_dir: Path, args: argparse.Namespace, env: dict[str, Any]) -> None:
    ensemble_ckpt = ensemble_checkpoint(cv_dir)
    single_onnx = exported(cv_dir / "fold_1" / "model.pt", args.out / "single", args.synthetic_verification_only)
    ensemble_onnx = exported(ensemble_ckpt, args.out / "ensemble", args.synthetic_verification_only)
    card = load_checkpoint(ensemble_ckpt).card
    members = card.ensemble.members
    single, ensemble = open_session(single_onnx, "cpu"), open_session(ensemble_onnx, "cpu")
    crops, source = crops_for(ensemble_ckpt, card, args.crops)
    facts = {
        "crops": f"{len(crops)} {source}", "agreement": agreement(single, ensemble, crops, card),
        "single_mb": single_onnx.stat().st_size / 1e6, "ensemble_mb": ensemble_onnx.stat().st_size / 1e6,
        "single_parity": parity_of(single_onnx), "ensemble_parity": parity_of(ensemble_onnx),
    }
    rows = []
    for batch in sorted(int(b) for b in args.batches.split(",") if b.strip()):
        rows.append(measure(single, ensemble, crops, card, batch, args))
        print(f"  batch {batch}: fold_1 {rows[-1]['single_crops_per_s']:.0f}, ensemble {rows[-1]['ensemble_crops_per_s']:.0f} crops/s", flush=True)
    print_table(cv_dir, card, members, rows, facts)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({"cv_dir": str(cv_dir), "arch": card.arch, "input_size": list(card.input_size), "members": members,
                                "expected_ratio": 1 / members, **row, **facts, **env}) + "\n")
    print(f"\nappended {len(rows)} lines to {args.results}", flush=True)
    single.close()
    ensemble.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cv_dir", type=Path, help="the folder edgedx train DATA --out CV_DIR --folds K wrote")
    parser.add_argument("--out", type=Path, default=TMP / "edgedx-ensemble-cost", help="where the two exports go")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum seconds per file per round")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--crops", type=int, default=256, help="validation crops to time and compare on")
    parser.add_argument("--synthetic-verification-only", action="store_true", help="export without labelled images (parity only)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON lines file the rows are appended to")
    args = parser.parse_args()
    started = time.perf_counter()
    env = {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "onnxruntime": version("onnxruntime"),
        "edgedx": version("edgedx"), "commit": git_rev(), "rounds": args.rounds, "seconds_per_round": args.seconds,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(cpu_line(), flush=True)
    try:
        bench(args.cv_dir, args, env)
    except EdgeDxError as exc:  # a refused export or a folder that is not a finished cross-validation
        raise SystemExit(f"not measured: {exc}") from None
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
