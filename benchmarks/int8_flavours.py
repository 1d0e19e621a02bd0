"""int8 flavours × engines on the real-data models: which file and engine is fastest on this CPU, at what accuracy,
and what ``--device auto`` picks.

Issue 19 ("fastest on the processor it runs on"): on a CPU with VNNI or AMX the
'cpu' int8 flavour should reach ≥ 1.8× ONNX Runtime fp32 at ≥ 0.99 top-1
agreement and ≤ 0.005 AUC change, with OpenVINO bf16 beside it; on an x86 CPU
without VNNI (AVX2 only) the same table shows what ``auto`` picks there; and
``--device auto``'s choice should deliver ≥ 0.95× the best verified row. Every
table names the CPU (model and its avx2 / avx512f / avx512_vnni / avx_vnni /
amx_tile / amx_bf16 flags) and rows are appended to
``benchmarks/results/int8_flavours.jsonl``, so a run on either kind of machine
adds its rows and both kinds stay.

    flock /tmp/edgedx-bench.lock python benchmarks/int8_flavours.py
        [--datasets malaria_cells_iml,isic_mel_nv] [--runs /tmp/edgedx-recipes] [--out /tmp/edgedx-int8-flavours]
        [--exports DIR[,DIR...]] [--batches 1,16] [--rounds 5] [--seconds 1.0] [--val-crops 1000]

Inputs: export folders written by ``edgedx export CKPT -o DIR --precision
fp32,int8 --int8-flavours cpu,cpu-avx2,tensorrt`` (``model.onnx``,
``model.int8.onnx``, ``model.int8-avx2.onnx``, ``model.int8-trt.onnx``). With no
``--exports``, each dataset's run ``--runs/<dataset>/run/model.pt`` is exported
into ``--out/<dataset>`` unless that folder holds an export already. An int8
file the export refused (``*.failed``) is not measured; its row says why.

Rows per export: ONNX Runtime (``--device cpu``) and OpenVINO (``openvino``) on
the fp32 file and on each int8 flavour, and OpenVINO bf16 (``openvino-bf16``) on
the fp32 file, or a row saying why the backend refused it here. Columns:

- crops/s at batch 1 and 16, model only (preprocessed input), measured
  interleaved: after a warm-up, ``--rounds`` rounds of ≥ ``--seconds`` per
  variant, the order rotating each round; medians, and the largest batch's
  ratio to ONNX Runtime fp32 with the min–max of the per-round ratios. A round
  in which other processes took more than ``--max-other`` of the machine is run
  again (at most ``--retries`` times); the worst "other load" is printed.
- this machine's self-test verdict for the file on that engine (the vectors
  export stored in the file; for int8, mean |Δp| from the file's exact int8
  arithmetic, refused above ``SELFTEST_TOLERANCES["int8"].max_mean_exact_delta``).
- top-1 and decision agreement with ONNX Runtime fp32, and the AUC (binary:
  the positive class; multiclass: macro one-vs-rest) and its change vs fp32,
  on up to ``--val-crops`` crops of the run's validation split cut by the card's
  crop policy (each crop labelled with its image's class), run through that
  engine as it runs here (fast kernels, not the exact arithmetic); and for
  each int8 file, the same on its exact int8 arithmetic (ONNX Runtime with graph
  optimisations off, the same on every CPU): what a CPU whose self-test passes
  for that file gives, within the self-test's tolerance (so an AVX2 machine
  also measures the accuracy half of the VNNI target).

Then ``edgedx.runtime.auto.choose`` (a fresh cache, batch = the largest batch)
picks a file × engine; its row in the table (measured interleaved above) is
compared with the fastest row whose self-test passed (target ≥ 0.95×).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

# benchmarks/ is sys.path[0] when this file runs as a script
from _env import ROOT, cpu_flags, cpu_line, cpu_model, git_rev, interleaved, most_other, ratio_stats, version
from ort_vs_torch import add_load_options, fmt_load, fmt_ratio

from edgedx.card import ModelCard
from edgedx.errors import EdgeDxError, PartialExportError
from edgedx.export.int8 import INT8_FLAVOURS, exact_probabilities
from edgedx.export.pipeline import REPORT_NAME, ExportOptions, export_checkpoint
from edgedx.export.samples import Samples, calibration_crops, split_samples
from edgedx.runtime.auto import choose
from edgedx.runtime.backends.session import open_session
from edgedx.runtime.metrics import classification_metrics
from edgedx.runtime.model import decide
from edgedx.runtime.preprocess import model_input, to_probabilities
from edgedx.runtime.selftest import SelfTestVectors, run_selftest
from edgedx.training.checkpoint import load_checkpoint

RESULTS = ROOT / "benchmarks" / "results" / "int8_flavours.jsonl"
TMP = Path(tempfile.gettempdir())
DEFAULT_DATASETS = ("malaria_cells_iml", "isic_mel_nv")
FLAVOURS = ("cpu", "cpu-avx2", "tensorrt")
ENGINES = {"cpu": "ONNX Runtime", "openvino": "OpenVINO", "openvino-bf16": "OpenVINO bf16"}
TARGET_AUTO = 0.95  # auto's choice vs the best verified row
QUALITY_BATCH = 64


@dataclass
class Variant:
    """One file on one engine: its session (None when refused), and what was measured."""

    file: Path
    device: str
    flavour: str  # "fp32" or the int8 flavour's name
    session: Any = None
    refused: str | None = None
    row: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.device}:{self.file.name}"


# -- the exports ---------------------------------------------------------------------------------------


def ensure_export(run: Path, out: Path) -> Path | None:
    """``out`` holding an export of ``run/model.pt`` (made now unless there already); None when nothing passed."""
    if (out / REPORT_NAME).is_file() and (out / "model.onnx").is_file():
        print(f"{out}: export already there, reused", flush=True)
        return out
    checkpoint = run / "model.pt"
    print(f"exporting {checkpoint} → {out} (fp32, int8 flavours {', '.join(FLAVOURS)}) …", flush=True)
    started = time.perf_counter()
    try:
        export_checkpoint(checkpoint, out, ExportOptions(precisions=("fp32", "int8"), int8_flavours=FLAVOURS))
    except PartialExportError as exc:
        print(f"  partial export, measuring what passed: {str(exc)[:600]}", flush=True)
    except EdgeDxError as exc:
        print(f"  export failed, {out.name} skipped: {str(exc)[:600]}", flush=True)
        return None
    print(f"  exported in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def export_facts(export: Path) -> tuple[Path, str, dict[str, str]]:
    """(the checkpoint it was exported from, the file stem, {file name: why export refused it})."""
    report = json.loads((export / REPORT_NAME).read_text(encoding="utf-8"))
    refused = {
        a["path"]: "refused at export: " + ", ".join(a.get("parity", {}).get("failures", []) or ["parity failed"])
        for a in report.get("artefacts", []) if a.get("quarantined_as")
    }
    checkpoint = Path(report["checkpoint"])
    return checkpoint, checkpoint.stem, refused  # model.pt → model.onnx; --qat-epochs: model.qat.pt → model.qat.onnx


def variants_of(export: Path, stem: str, refused_at_export: dict[str, str]) -> list[Variant]:
    """Every file × engine, opened (or refused, saying why), in table order."""
    files = [(export / f"{stem}.onnx", "fp32")]
    files += [(export / f"{stem}.{INT8_FLAVOURS[f].file_tag}.onnx", f) for f in FLAVOURS]
    out: list[Variant] = []
    for device in ("cpu", "openvino"):
        for path, flavour in files:
            out.append(open_variant(path, device, flavour, refused_at_export))
    out.append(open_variant(files[0][0], "openvino-bf16", "fp32", refused_at_export))
    return out


def open_variant(path: Path, device: str, flavour: str, refused_at_export: dict[str, str]) -> Variant:
    variant = Variant(path, device, flavour)
    if path.name in refused_at_export:
        variant.refused = refused_at_export[path.name]
    elif not path.is_file():
        variant.refused = "not in the export"
    else:
        try:
            variant.session = open_session(path, device)
        except EdgeDxError as exc:
            variant.refused = f"refused: {' '.join(str(exc).split())[:300]}"
    return variant


# -- what each variant gives ----------------------------------------------------------------------------


def labelled_crops(checkpoint: Path, card: ModelCard, limit: int) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Up to ``limit`` validation crops cut by the card's policy, each labelled with its image's class."""
    samples = split_samples(checkpoint, card, "val", limit=limit)
    if samples.labels is None:
        return calibration_crops(samples, card, limit=limit), None, samples.source
    crops, labels = [], []
    for c in np.unique(samples.labels):
        mine = [item for item, label in zip(samples.items, samples.labels) if label == c]
        share = max(1, round(limit * len(mine) / len(samples)))
        got = calibration_crops(Samples(mine, np.full(len(mine), c), samples.source), card, limit=share)
        crops.append(got)
        labels.append(np.full(len(got), c))
    return np.concatenate(crops), np.concatenate(labels), samples.source


def probabilities(session: Any, crops: np.ndarray, card: ModelCard) -> np.ndarray:
    return np.concatenate([
        to_probabilities(session.run(model_input(crops[i : i + QUALITY_BATCH], card)), card) for i in range(0, len(crops), QUALITY_BATCH)
    ])


def auc(p: np.ndarray, labels: np.ndarray | None, card: ModelCard) -> float | None:
    if labels is None or len(np.unique(labels)) < 2:
        return None
    positive = card.positive_index if card.positive_index is not None else 1
    return classification_metrics(labels, p, card.class_names, positive_index=positive).macro_auc


def quality(p: np.ndarray, reference: np.ndarray, labels: np.ndarray | None, card: ModelCard) -> dict[str, Any]:
    """Agreement with ONNX Runtime fp32 on the same crops, and the AUC and its change."""
    mine, ref = auc(p, labels, card), auc(reference, labels, card)
    return {
        "n_crops": len(p),
        "top1_agreement": float(np.mean(np.argmax(p, axis=1) == np.argmax(reference, axis=1))),
        "decision_agreement": float(np.mean([decide(a, card) == decide(b, card) for a, b in zip(p, reference)])),
        "max_abs_dp": float(np.abs(p - reference).max()),
        "auc": mine,
        "auc_delta": None if mine is None or ref is None else mine - ref,
    }


def selftest_verdict(variant: Variant) -> dict[str, Any]:
    """This machine's verdict on the file's own vectors (OpenVINO bf16: the backend's check at open)."""
    session = variant.session
    report = getattr(session, "verification", None)
    if report is None:
        if not session.selftest:
            return {"passed": None, "summary": "no self-test vectors"}
        report = run_selftest(session, SelfTestVectors.from_text(session.selftest, str(variant.file)))
    return {"passed": report.passed, "exact_mean_delta": report.exact_mean_delta, "summary": report.summary()}


def measure_quality(variants: list[Variant], crops: np.ndarray, labels: np.ndarray | None, card: ModelCard) -> None:
    live = [v for v in variants if v.session is not None]
    reference = probabilities(live[0].session, crops, card)  # ONNX Runtime fp32: the first variant
    for v in live:
        t0 = time.perf_counter()
        v.row["selftest"] = selftest_verdict(v)
        v.row["quality"] = quality(probabilities(v.session, crops, card), reference, labels, card)
        if v.flavour != "fp32" and v.device == "cpu":  # the file's own arithmetic: what any CPU whose self-test passes gives
            v.row["quality_exact"] = quality(exact_probabilities(v.file, card, crops), reference, labels, card)
        v.row["precision"] = v.session.precision
        v.row["providers"] = list(v.session.providers)
        q = v.row["quality"]
        print(f"  {v.name:34s} self-test {'passed' if v.row['selftest']['passed'] else 'REFUSED'}; top-1 {q['top1_agreement']:.4f}, "
              f"decision {q['decision_agreement']:.4f}, AUC {fmt_num(q['auc'], '.4f')} ({time.perf_counter() - t0:.0f} s)", flush=True)


def measure_speed(variants: list[Variant], crops: np.ndarray, card: ModelCard, batches: list[int], args: argparse.Namespace) -> None:
    """crops/s per variant and batch, interleaved; the ratio to ONNX Runtime fp32 (the first variant) per batch."""
    live = [v for v in variants if v.session is not None]
    for batch in batches:
        x = model_input(np.concatenate([crops] * -(-batch // len(crops)))[:batch], card)
        calls = {v.name: (lambda s=v.session: s.run(x)) for v in live}
        rates, other, discarded = interleaved(calls, batch, rounds=args.rounds, seconds=args.seconds, warmup=args.warmup,
                                              settle=args.settle, max_other=args.max_other, retries=args.retries)
        for v in live:
            v.row[f"b{batch}"] = {
                "crops_per_s": statistics.median(rates[v.name]), "per_round": rates[v.name],
                "vs_ort_fp32": ratio_stats(rates[v.name], rates[live[0].name]),
                "other_load_max": most_other(other), "rounds_discarded": discarded,
            }
        print(f"  batch {batch}: " + ", ".join(f"{v.name} {v.row[f'b{batch}']['crops_per_s']:.0f}" for v in live)
              + f" crops/s; other load ≤ {fmt_load(most_other(other))}, {discarded} round(s) discarded", flush=True)


def auto_verdict(export: Path, stem: str, variants: list[Variant], batch: int) -> dict[str, Any]:
    """``--device auto``'s choice (fresh cache), and its row's measured speed vs the fastest verified row."""
    with tempfile.TemporaryDirectory(prefix="edgedx-auto-") as cache:
        t0 = time.perf_counter()
        choice = choose(export / f"{stem}.onnx", batch_size=batch, cache_dir=Path(cache))
        seconds = time.perf_counter() - t0
    key = f"b{batch}"
    verified = [v for v in variants if v.session is not None and v.row.get("selftest", {}).get("passed") and key in v.row]
    best = max(verified, key=lambda v: v.row[key]["crops_per_s"])
    chosen = next((v for v in variants if v.file == choice.path and v.device == choice.device), None)
    speed = chosen.row[key]["crops_per_s"] if chosen is not None and key in chosen.row else None
    return {
        "file": choice.path.name, "device": choice.device, "batch": batch, "seconds_to_choose": seconds,
        "describe": choice.describe(), "candidates": [c.__dict__ for c in choice.candidates],
        "measured_crops_per_s": speed, "best_verified": best.name, "best_crops_per_s": best.row[key]["crops_per_s"],
        "vs_best": None if speed is None else speed / best.row[key]["crops_per_s"],
        "target_met": None if speed is None else speed / best.row[key]["crops_per_s"] >= TARGET_AUTO,
    }


# -- output ---------------------------------------------------------------------------------------------


def fmt_num(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def short(reason: str) -> str:
    """A refusal's first clause, for the table (the JSON line keeps it whole)."""
    first = reason.split("; ")[0]
    return first + ")" * (first.count("(") - first.count(")"))


def table_line(v: Variant, batches: list[int], chosen: bool) -> str:
    label = f"{ENGINES[v.device]} | `{v.file.name}` ({v.flavour})"
    if v.session is None:
        return f"| {label} | — | " + " | ".join("—" for _ in batches) + f" | — | {short(v.refused or '')} | — | — | — | — |"
    r, big = v.row, f"b{batches[-1]}"
    speeds = " | ".join(f"{r[f'b{b}']['crops_per_s']:.0f}" for b in batches)
    test = r["selftest"]
    verdict = {True: "passed", False: "**refused**", None: "no vectors"}[test["passed"]]
    if test.get("exact_mean_delta") is not None:
        verdict += f" (exact Δ {test['exact_mean_delta']:.3f})"
    q = r["quality"]
    auc_text = "—" if q["auc"] is None else f"{q['auc']:.4f} ({q['auc_delta']:+.4f})"
    exact = r.get("quality_exact")
    exact_text = "—" if exact is None else f"{exact['top1_agreement']:.4f} / " + fmt_num(exact["auc_delta"], "+.4f")
    return (f"| {label}{' ← auto' if chosen else ''} | {r['precision']} | {speeds} | {fmt_ratio(r[big]['vs_ort_fp32'])} | {verdict} | "
            f"{q['top1_agreement']:.4f} | {q['decision_agreement']:.4f} | {auc_text} | {exact_text} |")


def print_table(dataset: str, card: ModelCard, n_crops: int, variants: list[Variant], auto: dict[str, Any] | None, batches: list[int]) -> None:
    print(f"\n### {dataset} ({card.arch}, {card.input_size[0]} px, {n_crops} validation crops)\n")
    print(f"{cpu_line()}; ONNX Runtime {version('onnxruntime')}, OpenVINO {version('openvino')}\n")
    heads = " | ".join(f"b{b} crops/s" for b in batches)
    print(f"| engine | file (flavour) | runs as | {heads} | × ORT fp32 (b{batches[-1]}, min–max) | self-test here | "
          "top-1 agr. vs fp32 | decision agr. | AUC (Δ vs fp32) | the file's exact int8 arithmetic: top-1 agr. / AUC Δ |")
    print("|---|---|---|" + "---|" * len(batches) + "---|---|---|---|---|---|")
    for v in variants:
        print(table_line(v, batches, auto is not None and v.file.name == auto["file"] and v.device == auto["device"]))
    loads = [v.row[f"b{b}"]["other_load_max"] for v in variants if v.session is not None for b in batches]
    print(f"\nOther load, max: {fmt_load(max((x for x in loads if x is not None), default=None))}.")
    if auto is not None:
        print(f"`--device auto` (batch {auto['batch']}) chose `{auto['file']}` on {ENGINES[auto['device']]}: "
              f"{fmt_num(auto['measured_crops_per_s'], '.0f')} crops/s = {fmt_num(auto['vs_best'], '.3f')}× the fastest verified row "
              f"({auto['best_verified']}, {auto['best_crops_per_s']:.0f} crops/s); target ≥ {TARGET_AUTO:g}×: "
              f"{'met' if auto['target_met'] else 'not met'}.")


def write_rows(dataset: str, card: ModelCard, variants: list[Variant], auto: dict[str, Any] | None, env: dict[str, Any]) -> int:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    rows = [{
        "dataset": dataset, "arch": card.arch, "input_size": list(card.input_size), "engine": v.device, "file": v.file.name,
        "flavour": v.flavour, "refused": v.refused, **v.row,
        "auto_chose": auto is not None and v.file.name == auto["file"] and v.device == auto["device"], **env,
    } for v in variants]
    if auto is not None:
        rows.append({"dataset": dataset, "arch": card.arch, "input_size": list(card.input_size), "engine": "auto", "auto": auto, **env})
    with RESULTS.open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return len(rows)


# -- the run --------------------------------------------------------------------------------------------


def bench_export(export: Path, args: argparse.Namespace, batches: list[int], env: dict[str, Any]) -> None:
    checkpoint, stem, refused_at_export = export_facts(export)
    dataset = export.name
    card = load_checkpoint(checkpoint).card
    crops, labels, source = labelled_crops(checkpoint, card, args.val_crops)
    print(f"\n{dataset}: {len(crops)} crops from the {source}", flush=True)
    variants = variants_of(export, stem, refused_at_export)
    for v in variants:
        if v.refused:
            print(f"  {v.name}: {v.refused}", flush=True)
    measure_quality(variants, crops, labels, card)
    measure_speed(variants, crops, card, batches, args)
    auto = None
    try:
        auto = auto_verdict(export, stem, variants, batches[-1])
        print(f"  {auto['describe']} ({auto['seconds_to_choose']:.0f} s to choose)", flush=True)
    except EdgeDxError as exc:
        print(f"  --device auto failed: {exc}", flush=True)
    print_table(dataset, card, len(crops), variants, auto, batches)
    print(f"\nappended {write_rows(dataset, card, variants, auto, env)} lines to {RESULTS}", flush=True)
    for v in variants:
        if v.session is not None:
            v.session.close()


def exports_to_measure(args: argparse.Namespace) -> list[Path]:
    if args.exports:
        return [Path(p) for p in args.exports.split(",") if p.strip()]
    found = [ensure_export(args.runs / d / "run", args.out / d) for d in args.datasets.split(",") if d.strip()]
    return [e for e in found if e is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DEFAULT_DATASETS), help="runs to export and measure (without --exports)")
    parser.add_argument("--runs", type=Path, default=TMP / "edgedx-recipes", help="RUNS/<dataset>/run/model.pt")
    parser.add_argument("--out", type=Path, default=TMP / "edgedx-int8-flavours", help="where the exports go")
    parser.add_argument("--exports", default="", help="comma-separated export folders to measure instead")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum seconds per variant per round")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--settle", type=float, default=0.05, help="pause before each measurement")
    parser.add_argument("--val-crops", type=int, default=1000, help="validation crops for agreement and AUC")
    add_load_options(parser)
    args = parser.parse_args()
    started = time.perf_counter()
    batches = sorted(int(b) for b in args.batches.split(",") if b.strip())
    env = {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(), "onnxruntime": version("onnxruntime"),
        "openvino": version("openvino"), "edgedx": version("edgedx"), "commit": git_rev(),
        "rounds": args.rounds, "seconds_per_round": args.seconds, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print(cpu_line(), flush=True)
    for export in exports_to_measure(args):
        bench_export(export, args, batches, env)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
