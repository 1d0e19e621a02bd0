"""Does test-time augmentation pay? The same trained model scored with and without views, paired, on the deployed path.

    python benchmarks/tta_effect.py RUN_DIR_OR_MODEL_PT [--split test] [--views hflip,vflip,rot180,rot90,rot270] [--bootstrap 1000]

The checkpoint's card is used twice through the runtime's diagnosis path
(:func:`edgedx.training.validation.diagnose_probabilities`: the same crops,
preprocessing, merge and engine call that ``diagnose`` runs): once as trained,
once with ``crop.tta`` set to ``--views``. The images are the run's ``--split``
(its split.json): use a split no choice was made on (a cross-validation fold's
``test``, the held-out split) for a result.

Caveat, printed with the table: the temperature and threshold were fitted
without views, so the comparison is of ranking (AUC) and of accuracy at 0.5;
a model trained with ``--tta`` refits both with the views.

Reports AUC and accuracy at 0.5 for both, the paired bootstrap 95% interval of
the AUC difference, and the cost (seconds per image, interleaved rounds).
Appends one JSON line to benchmarks/results/tta_effect.jsonl.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import cpu_model, git_rev  # noqa: E402

from edgedx.runtime.evaluate import score  # noqa: E402
from edgedx.runtime.io.labelled import load_labelled  # noqa: E402
from edgedx.runtime.metrics import roc_auc  # noqa: E402
from edgedx.training.checkpoint import build_model, load_checkpoint  # noqa: E402
from edgedx.training.validation import diagnose_probabilities  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def positive_scores(probs: np.ndarray, labels: np.ndarray, card) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Binary: the positive class; multiclass: one-vs-rest of each image's true class is not one AUC, so binary only."""
    pos = card.positive_index
    return (labels == pos).astype(int), probs[:, pos]


def paired_auc_interval(truth: np.ndarray, a: np.ndarray, b: np.ndarray, n: int, seed: int = 0) -> list[float] | None:
    """95% percentile interval of AUC(b) - AUC(a) over images resampled together."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        i = rng.integers(0, len(truth), len(truth))
        if 0 < truth[i].sum() < len(i):
            diffs.append(roc_auc(truth[i], b[i]) - roc_auc(truth[i], a[i]))
    return [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))] if len(diffs) >= n // 2 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--split", default="test")
    parser.add_argument("--views", default="hflip,vflip,rot180,rot90,rot270")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    args = parser.parse_args()
    path = args.checkpoint / "model.pt" if args.checkpoint.is_dir() else args.checkpoint
    ckpt = load_checkpoint(path)
    card = ckpt.card
    if card.task != "binary":
        raise SystemExit("binary models only (one AUC); multiclass TTA effect: compare accuracy with evaluate")
    views = tuple(v for v in args.views.split(",") if v)
    variants = {"as trained": card, "with views": card.replace(crop=dataclasses.replace(card.crop, tta=views))}
    labelled = load_labelled(path.parent, card.class_names, split=args.split)
    labels = np.asarray(labelled.labels)
    items = list(enumerate(labelled.images))
    model = build_model(ckpt)
    probs, seconds = {}, {k: [] for k in variants}
    for r in range(args.rounds):
        for name in (list(variants) if r % 2 == 0 else list(variants)[::-1]):
            started = time.perf_counter()
            _, p, failed = diagnose_probabilities(model, variants[name], items, batch_size=32)
            seconds[name].append((time.perf_counter() - started) / len(items))
            if failed:
                raise SystemExit(f"{len(failed)} images could not be diagnosed: {failed[0][1]}")
            probs[name] = p
    truth, base = positive_scores(probs["as trained"], labels, card)
    _, tta = positive_scores(probs["with views"], labels, card)
    rows = {}
    for name, p in probs.items():
        m = score(labels, p, card, 0.5)
        rows[name] = {"auc": m.get("auc"), "accuracy_at_0.5": m["accuracy"], "seconds_per_image": float(np.median(seconds[name]))}
    row = {
        "checkpoint": str(path), "split": args.split, "n": len(labels), "views": views, "rows": rows,
        "auc_difference": rows["with views"]["auc"] - rows["as trained"]["auc"],
        "auc_difference_ci95": paired_auc_interval(truth, base, tta, args.bootstrap),
        "cost_ratio": rows["with views"]["seconds_per_image"] / rows["as trained"]["seconds_per_image"],
        "caveat": "temperature and threshold fitted without views: compare AUC and accuracy at 0.5",
        "cpu": cpu_model(), "git": git_rev(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / "tta_effect.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    ci = row["auc_difference_ci95"]
    print(f"cpu: {row['cpu']}; {row['caveat']}")
    print("| model | split (n) | views | AUC as trained | AUC with views | difference [95% CI] | acc@0.5 as trained / with views | cost × |")
    print("|---|---|---|---|---|---|---|---|")
    a, b = rows["as trained"], rows["with views"]
    print(f"| {path.parent.name} ({card.arch}) | {args.split} ({len(labels)}) | {','.join(views)} | {a['auc']:.3f} | {b['auc']:.3f} | "
          f"{row['auc_difference']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else "") +
          f" | {a['accuracy_at_0.5']:.3f} / {b['accuracy_at_0.5']:.3f} | {row['cost_ratio']:.1f} |")


if __name__ == "__main__":
    main()
