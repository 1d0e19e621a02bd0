"""int8 vs fp32 on the real-data models: images/s side by side, and int8's top-1 agreement on real validation images.

    python benchmarks/int8_vs_fp32.py [--datasets malaria_cells_iml,bloodmnist] [--batches 32,1]
        [--threads 2] [--rounds 5] [--seconds 1.0] [--no-224]

Needs the real-data runs and their exports:

    python benchmarks/train_real_data.py       # /tmp/edgedx-real/<dataset>/model.pt
    python benchmarks/export_real_data.py      # /tmp/edgedx-real-export/<dataset>/model.onnx, model.int8.onnx

For each dataset three variants run on the same batch of real validation
images (preprocessed by the runtime): PyTorch eager fp32 (the checkpoint's
network, ``torch.inference_mode()``, ``torch.set_num_threads(threads)``), and
ONNX Runtime fp32 and int8 through ``OnnxSession(threads=threads)``. An int8
file that the export refused (parity failed, kept as ``model.int8.onnx.failed``)
is still timed, and marked so.

Agreement: top-1 (argmax) and decision (at the card's operating threshold)
agreement of int8 with the PyTorch fp32 model on the dataset's validation split
(``split.json`` beside the checkpoint), plus ONNX fp32's max abs logit
difference as a check that the fp32 graph is the same model.

The 224-px row: the trained models are 64-px (ISIC 192-px), where fixed
per-call costs weigh more. For speed at a typical deployment size, a
``tf_efficientnet_lite0`` with **random weights** is exported at 224 px and
quantised with ``edgedx.export.int8.quantise`` (the 'cpu-avx2' flavour: 7-bit weights) calibrated on real malaria
training cells resized to 224; it is timed on real malaria validation cells
resized to 224. Its agreement is not reported: a random network's top-1 says
nothing about a trained one's.

Timing: after a warm-up, the variants are measured interleaved, ``--rounds``
rounds of at least ``--seconds`` each, the order rotating every round. Medians
per variant, ratio of medians, min–max of per-round ratios, and the largest
share of the machine's CPU that other processes used during a measurement
("other load"; PyTorch's OpenMP threads suffer most from it). A round with
more than ``--max-other`` (15%) other load is discarded and run again, at most
``--retries`` (2) times per row. Run it under the
benchmark lock:

    flock /tmp/edgedx-bench.lock python benchmarks/int8_vs_fp32.py

Prints a markdown table and appends one JSON line per (model, batch) to
``benchmarks/results/int8_vs_fp32.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgedx.card import CropPolicy
from edgedx.export.parity import artefact_logits, compare_logits, torch_logits
from edgedx.export.int8 import INT8_FLAVOURS, quantise
from edgedx.export.samples import Samples, SplitUnavailable, split_samples
from edgedx.runtime.backends.onnx_backend import OnnxSession
from edgedx.runtime.preprocess import model_input
from edgedx.training.checkpoint import build_model, load_checkpoint
from edgedx.training.models import create_model

# benchmarks/ is sys.path[0] when this file runs as a script
from ort_vs_torch import add_load_options, export_fp32, fmt_load, fmt_ratio, interleaved, machine, most_other, ratio_stats

RESULTS = Path(__file__).resolve().parent / "results"
TMP = Path(tempfile.gettempdir())
DATASETS = ("malaria_cells_iml", "pneumoniamnist", "bloodmnist", "breastmnist", "isic_mel_nv")
TARGET_SPEEDUP = 3.0
TARGET_AGREEMENT = 0.99
HOW_TO = (
    "python benchmarks/train_real_data.py && python benchmarks/export_real_data.py "
    "(writes /tmp/edgedx-real/<dataset>/model.pt and /tmp/edgedx-real-export/<dataset>/model.onnx, model.int8.onnx)"
)


def batch_of(images: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` crops, repeated if the split has fewer."""
    reps = -(-n // len(images))
    return np.concatenate([images] * reps)[:n]


def time_variants(model: torch.nn.Module, fp32: OnnxSession, int8: OnnxSession, crops: np.ndarray, batch: int, args: argparse.Namespace) -> dict:
    x = model_input(batch_of(crops, batch), fp32.card)
    xt = torch.from_numpy(x)

    def run_torch() -> None:
        with torch.inference_mode():
            model(xt)

    rates, other, discarded = interleaved(
        {"torch_fp32": run_torch, "ort_fp32": lambda: fp32.run(x), "ort_int8": lambda: int8.run(x)}, batch,
        rounds=args.rounds, seconds=args.seconds, warmup=args.warmup, settle=args.settle,
        max_other=args.max_other, retries=args.retries,
    )
    return {
        "batch": batch,
        "other_load": other, "other_load_max": most_other(other), "rounds_discarded": discarded,
        **{f"{k}_images_per_s": v for k, v in rates.items()},
        **{f"{k}_median": statistics.median(v) for k, v in rates.items()},
        "int8_vs_torch": ratio_stats(rates["ort_int8"], rates["torch_fp32"]),
        "int8_vs_ort_fp32": ratio_stats(rates["ort_int8"], rates["ort_fp32"]),
        "ort_fp32_vs_torch": ratio_stats(rates["ort_fp32"], rates["torch_fp32"]),
    }


class Crops:
    """One input-size crop per image (the cells are crops already), with labels: what the timing rows feed the models."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | None) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)


def as_crops(samples: Samples, card) -> Crops:  # noqa: ANN001
    from edgedx.runtime.io.image_io import read_image, to_rgb_uint8
    from edgedx.runtime.preprocess import resize_to

    h, w = card.input_size
    images = [read_image(i) if isinstance(i, Path) else to_rgb_uint8(np.asarray(i)) for i in samples.items]
    return Crops(np.stack([resize_to(im, h, w, card.interpolation) for im in images]), samples.labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--runs", type=Path, default=TMP / "edgedx-real")
    parser.add_argument("--exports", type=Path, default=TMP / "edgedx-real-export")
    parser.add_argument("--batches", default="32,1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum seconds per variant per round")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--settle", type=float, default=0.05, help="pause before each measurement")
    add_load_options(parser)
    parser.add_argument("--val-limit", type=int, default=2000, help="validation images for agreement")
    parser.add_argument("--no-224", dest="lite224", action="store_false", help="skip the 224-px random-weights Lite0 row")
    parser.add_argument("--calibration-samples", type=int, default=64, help="real training images (224 px) to calibrate the 224-px int8")
    args = parser.parse_args()
    started = time.perf_counter()
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    info = machine()
    torch.manual_seed(0)
    rows: list[dict] = []

    def record(base: dict, model: torch.nn.Module, fp32: OnnxSession, int8: OnnxSession, crops: np.ndarray) -> None:
        torch.set_num_threads(args.threads)
        for batch in batches:
            row = {**base, **time_variants(model, fp32, int8, crops, batch, args), "threads": args.threads,
                   "rounds": args.rounds, "seconds_per_round": args.seconds, **info}
            speed = row["int8_vs_torch"]["ratio"]
            agree = row.get("int8_top1_agreement")
            row["speed_met"] = speed >= TARGET_SPEEDUP
            row["agreement_met"] = None if agree is None else agree >= TARGET_AGREEMENT
            rows.append(row)
            print(
                f"  batch {batch}: torch {row['torch_fp32_median']:.0f}, ORT fp32 {row['ort_fp32_median']:.0f}, "
                f"ORT int8 {row['ort_int8_median']:.0f} img/s; int8/torch {fmt_ratio(row['int8_vs_torch'])}, "
                f"int8/ORT fp32 {fmt_ratio(row['int8_vs_ort_fp32'])}; other load ≤ {fmt_load(row['other_load_max'])}, {row['rounds_discarded']} round(s) discarded",
                flush=True,
            )

    malaria_checkpoint = None
    for name in [d.strip() for d in args.datasets.split(",") if d.strip()]:
        checkpoint_path = args.runs / name / "model.pt"
        fp32_path = args.exports / name / "model.onnx"
        int8_path = args.exports / name / "model.int8.onnx"
        refused = False
        if not int8_path.is_file() and int8_path.with_name(int8_path.name + ".failed").is_file():
            int8_path, refused = int8_path.with_name(int8_path.name + ".failed"), True
        missing = [p for p in (checkpoint_path, fp32_path, int8_path) if not p.is_file()]
        if missing:
            print(f"{name}: skipped, missing {', '.join(map(str, missing))}; make them with: {HOW_TO}")
            continue
        if name == "malaria_cells_iml":
            malaria_checkpoint = checkpoint_path
        checkpoint = load_checkpoint(checkpoint_path)
        model = build_model(checkpoint)
        card = checkpoint.card
        fp32 = OnnxSession(fp32_path, threads=args.threads)
        int8 = OnnxSession(int8_path, threads=args.threads)
        try:
            val = as_crops(split_samples(checkpoint_path, card, "val", limit=args.val_limit), card)
        except SplitUnavailable as exc:
            print(f"{name}: skipped, the validation images cannot be read ({exc})")
            continue
        torch.set_num_threads(args.threads)
        reference = torch_logits(model, val.images, card)
        p32 = compare_logits(reference, artefact_logits(fp32.run, val.images, fp32.card), card, "fp32", n_real=len(val))
        p8 = compare_logits(reference, artefact_logits(int8.run, val.images, int8.card), card, "int8", n_real=len(val), labels=val.labels)
        print(
            f"{name} ({card.arch}, {card.input_size[0]} px, {len(val)} val images): fp32 ONNX max abs diff {p32.max_abs_diff:.1e}; "
            f"int8 top-1 agreement {p8.top1_agreement:.4f}, decision agreement {p8.decision_agreement:.4f}"
            f"{' (int8 export refused by parity)' if refused else ''}",
            flush=True,
        )
        base = {
            "model": name, "arch": card.arch, "weights": "trained", "input_size": list(card.input_size), "val_n": len(val),
            "int8_file": str(int8_path), "int8_refused_by_export": refused,
            "fp32_max_abs_diff": p32.max_abs_diff, "int8_top1_agreement": p8.top1_agreement,
            "int8_decision_agreement": p8.decision_agreement, "int8_mean_prob_delta": p8.mean_prob_delta,
            "int8_labelled": p8.labelled,
        }
        record(base, model, fp32, int8, val.images)

    if args.lite224:
        if malaria_checkpoint is None:
            malaria_checkpoint = args.runs / "malaria_cells_iml" / "model.pt"
        if not malaria_checkpoint.is_file():
            print(f"224-px row: skipped, no malaria checkpoint at {malaria_checkpoint}; make it with: {HOW_TO}")
        else:
            card = load_checkpoint(malaria_checkpoint).card
            card = card.replace(input_size=(224, 224), crop=CropPolicy((224, 224), (112, 112)))  # the malaria card's source and normalisation
            try:
                val = as_crops(split_samples(malaria_checkpoint, card, "val", limit=256), card)
                calibration = as_crops(split_samples(malaria_checkpoint, card, "train", limit=args.calibration_samples), card)
            except SplitUnavailable:
                val = calibration = None
            if val is None or calibration is None:
                print("224-px row: skipped, the malaria images cannot be read")
            else:
                model = create_model(card.arch, card.n_classes).eval()  # random weights: for speed only
                with tempfile.TemporaryDirectory(prefix="edgedx-int8-224-") as tmp:
                    t0 = time.perf_counter()
                    fp32_path = export_fp32(model, card, Path(tmp) / "model.onnx")
                    int8_path = quantise(fp32_path, Path(tmp) / "model.int8.onnx", card, calibration.images, INT8_FLAVOURS["cpu-avx2"])
                    print(
                        f"lite0 224 px (random weights): exported and quantised ({len(calibration)} real malaria training "
                        f"cells resized 64 → 224) in {time.perf_counter() - t0:.0f} s",
                        flush=True,
                    )
                    fp32 = OnnxSession(fp32_path, threads=args.threads)
                    int8 = OnnxSession(int8_path, threads=args.threads)
                    base = {
                        "model": "lite0_224_random_weights", "arch": card.arch, "weights": "random", "input_size": [224, 224],
                        "val_n": len(val), "int8_file": "temporary", "int8_refused_by_export": None,
                        "calibration": f"{len(calibration)} malaria training cells resized to 224",
                        "timed_on": "malaria validation cells resized to 224",
                        "int8_top1_agreement": None, "note": "random weights: agreement not meaningful, not reported",
                    }
                    record(base, model, fp32, int8, val.images)

    print()
    print(f"{info['cpu']}, {info['cores']} cores (AVX2 {'yes' if info['avx2'] else 'no'}, AVX-512 {'yes' if info['avx512'] else 'no'}, "
          f"VNNI {'yes' if info['vnni'] else 'no'}), {args.threads} threads; torch {info['torch']}, ONNX Runtime {info['onnxruntime']}; "
          f"{args.rounds} interleaved rounds of ≥ {args.seconds:g} s")
    print()
    print(
        "| model | px | batch | PyTorch fp32 img/s | ORT fp32 img/s | ORT int8 img/s | int8 / PyTorch (median, min–max) | "
        f"int8 / ORT fp32 | int8 top-1 agreement vs PyTorch (val n) | target ≥ {TARGET_SPEEDUP:g}× and ≥ {TARGET_AGREEMENT:.0%} | other load, max |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["int8_top1_agreement"] is None:
            agree = "— (random weights)"
        else:
            agree = f"{r['int8_top1_agreement']:.3f} ({r['val_n']}){' †' if r['int8_refused_by_export'] else ''}"
        if r["agreement_met"] is None:
            verdict = f"speed {'met' if r['speed_met'] else 'not met'}; agreement n/a"
        else:
            bad = [x for x, ok in (("speed", r["speed_met"]), ("agreement", r["agreement_met"])) if not ok]
            verdict = "not met: " + ", ".join(bad) if bad else "met"
        print(
            f"| {r['model']} | {r['input_size'][0]} | {r['batch']} | {r['torch_fp32_median']:.0f} | {r['ort_fp32_median']:.0f} | "
            f"{r['ort_int8_median']:.0f} | {fmt_ratio(r['int8_vs_torch'])} | {fmt_ratio(r['int8_vs_ort_fp32'])} | {agree} | {verdict} | {fmt_load(r['other_load_max'])} |"
        )
    if any(r["int8_refused_by_export"] for r in rows):
        print("\n† int8 file that `edgedx export` refused (failed its parity tolerance; kept as model.int8.onnx.failed), timed anyway.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "int8_vs_fp32.jsonl").open("a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\nappended {len(rows)} lines to {RESULTS / 'int8_vs_fp32.jsonl'}; {time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
