"""Does the image-quality gate reject degraded images and keep clean ones? Real images, limits fitted elsewhere.

For each dataset in ``$EDGEDX_DATA`` (default ``../shared/data``): limits from
a *training* portion through :func:`edgedx.runtime.quality.quality_limits`
(the rule training uses), then the gate on a *different* portion, clean and
degraded at the file's resolution: Gaussian blur σ = 3 px, +2 stops (×4,
clipped), −2 stops (×0.25), JPEG quality 5. Everything is measured the way
``diagnose`` measures it: the decoded image, and the same image at the
model's scale (:func:`edgedx.runtime.scale.model_view` with a crop policy
typical of each dataset).

Target: ≥ 95% of the degraded images rejected, ≤ 2% of the clean ones.

    python benchmarks/quality_gate.py [--data DIR] [--per-set N] [--no-save]

Appends one JSON line per dataset × condition to
``benchmarks/results/quality_gate.jsonl`` and prints a Markdown table with
the CPU line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, cpu_line, git_rev  # noqa: E402

from edgedx.card import CropPolicy  # noqa: E402
from edgedx.runtime.quality import card_limits, measure_at_model_scale, measure_quality, quality_limits, quality_reasons  # noqa: E402
from edgedx.runtime.scale import model_view  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "quality_gate.jsonl"
CONDITIONS = ("clean", "blur σ=3", "+2 stops", "−2 stops", "JPEG q5")
ISIC_POLICY = CropPolicy((192, 192), (96, 96), scale=0.217828)  # the bundled isic_mel_nv model's card


def degrade(image: np.ndarray, condition: str) -> np.ndarray:
    """The degradations, at the file's resolution (as a camera or a careless export would make them)."""
    if condition == "clean":
        return image
    if condition == "blur σ=3":
        return cv2.GaussianBlur(image, (0, 0), 3.0)
    if condition == "+2 stops":
        return np.clip(image.astype(np.float32) * 4.0, 0, 255).astype(np.uint8)
    if condition == "−2 stops":
        return np.clip(np.round(image.astype(np.float32) * 0.25), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 5])
    assert ok
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@dataclass(frozen=True)
class Dataset:
    """A dataset's two disjoint portions (lazy image loaders) and the crop policy that sets the model's scale."""

    name: str
    policy: CropPolicy
    fit: Callable[[], Iterator[np.ndarray]]  # the portion the limits come from
    test: Callable[[], Iterator[np.ndarray]]  # the portion the gate is judged on
    split: str  # in words


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, path
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _npz(path: Path, split: str, n: int) -> Callable[[], Iterator[np.ndarray]]:
    def load() -> Iterator[np.ndarray]:
        images = np.load(path)[f"{split}_images"]
        for i in np.random.default_rng(0).permutation(len(images))[:n]:
            image = images[i]
            yield cv2.cvtColor(image, cv2.COLOR_GRAY2RGB) if image.ndim == 2 else image

    return load


def _files(paths: list[Path]) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: (_read(p) for p in paths)


def datasets(data: Path, per_set: int) -> list[Dataset]:
    """The sets under ``data`` that exist; each split so no image (or field) is on both sides."""
    found = []
    cells = data / "malaria_cells_iml" / "malaria_cells_iml.npz"
    if cells.is_file():
        found.append(Dataset("malaria cells (64 px)", CropPolicy((64, 64), (64, 64)), _npz(cells, "train", 2 * per_set), _npz(cells, "val", per_set),
                             "train split → limits, val split (other fields) → judged"))
    fields = data / "malaria_fields_iml" / "images"
    if fields.is_dir() and cells.is_file():
        source = np.load(cells)
        val = {str(s).split(":")[0] for s in source["val_source"]}
        paths = sorted(fields.glob("*.JPG"))
        train = [p for p in paths if p.name not in val]  # recorded in stain batches: a random sample, not the first N
        fit = [train[i] for i in sorted(np.random.default_rng(0).permutation(len(train))[: 2 * per_set])]
        test = [p for p in paths if p.name in val][:per_set]
        found.append(Dataset("malaria fields (1280×960, scale 0.75)", CropPolicy((64, 64), (64, 64), scale=0.75), _files(fit), _files(test),
                             "fields of the cells' train split → limits, of its val split → judged"))
    isic = data / "isic_mel_nv" / "images"
    if isic.is_dir():
        paths = sorted(isic.glob("*.jpg"))
        found.append(Dataset("ISIC dermoscopy (≤1024 px, scale 0.218)", ISIC_POLICY, _files(paths[0::2][: 2 * per_set]), _files(paths[1::2][:per_set]),
                             "even-numbered images (sorted) → limits, odd → judged"))
    pneumonia = data / "pneumoniamnist" / "pneumoniamnist.npz"
    if pneumonia.is_file():
        found.append(Dataset("chest X-ray PneumoniaMNIST (28 px)", CropPolicy((28, 28), (28, 28)), _npz(pneumonia, "train", 2 * per_set),
                             _npz(pneumonia, "val", per_set), "train split → limits, val split → judged"))
    return found


def cxr_leave_one_out(data: Path) -> list[tuple[Path, np.ndarray]]:
    """The 7 real chest X-rays: each judged against limits from the other six (fit 224×224), too few for percentiles
    to mean much; reported apart."""
    folder = data / "cxr_samples"
    paths = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg")) if folder.is_dir() else []
    return [(p, _read(p)) for p in paths]


MODEL_SCALE_ONLY = False  # --model-scale-only: every measure on the resampled image (the ablation of focus/blockiness placement)


def measured(image: np.ndarray, policy: CropPolicy) -> dict[str, float]:
    """As the runtime measures (:func:`measure_at_model_scale`), or, for the ablation, all on the resampled image."""
    if MODEL_SCALE_ONLY:
        return measure_quality(model_view(image, policy).pixels)
    return measure_at_model_scale(image, policy)


def judge(limits: dict, images: list[np.ndarray], policy: CropPolicy) -> dict[str, dict]:
    """Reject rate and the checks that fired, per condition."""
    out = {}
    for condition in CONDITIONS:
        fired: Counter[str] = Counter()
        rejected = 0
        started = time.perf_counter()
        for image in images:
            reasons = quality_reasons(measured(degrade(image, condition), policy), limits)
            rejected += bool(reasons)
            fired.update(r.split(":")[0] for r in reasons)
        out[condition] = {"n": len(images), "rejected": rejected, "rate": rejected / max(1, len(images)), "checks": dict(fired),
                          "ms_per_image": round(1000 * (time.perf_counter() - started) / max(1, len(images)), 1)}
    return out


def run_set(ds: Dataset) -> tuple[dict, dict[str, dict]]:
    started = time.perf_counter()
    fit = [measured(image, ds.policy) for image in ds.fit()]
    limits_card = quality_limits(fit)
    limits = card_limits(limits_card)
    test = list(ds.test())
    result = judge(limits, test, ds.policy)
    print(f"  {ds.name}: limits from {len(fit)} images, judged on {len(test)} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return {k: v for k, v in limits.items()} | {"n_fit": len(fit)}, result


def run_cxr(data: Path) -> tuple[dict, dict[str, dict]] | None:
    items = cxr_leave_one_out(data)
    if len(items) < 3:
        return None
    policy = CropPolicy((224, 224), (224, 224), mode="fit")
    measures = [measured(image, policy) for _, image in items]
    totals: dict[str, dict] = {c: {"n": 0, "rejected": 0, "checks": Counter()} for c in CONDITIONS}
    for k, (_, image) in enumerate(items):
        limits = card_limits(quality_limits([m for j, m in enumerate(measures) if j != k]))
        for condition, row in judge(limits, [image], policy).items():
            totals[condition]["n"] += row["n"]
            totals[condition]["rejected"] += row["rejected"]
            totals[condition]["checks"].update(row["checks"])
    result = {c: {"n": t["n"], "rejected": t["rejected"], "rate": t["rejected"] / t["n"], "checks": dict(t["checks"])} for c, t in totals.items()}
    return {"n_fit": len(items) - 1, "note": "leave-one-out over 7 images, fit 224×224"}, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("EDGEDX_DATA", ROOT.parent / "shared" / "data")))
    parser.add_argument("--per-set", type=int, default=150, help="images judged per dataset (twice as many fit the limits)")
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--model-scale-only", action="store_true", help="ablation: focus and blockiness on the resampled image too")
    args = parser.parse_args()
    global MODEL_SCALE_ONLY
    MODEL_SCALE_ONLY = args.model_scale_only
    if not args.data.is_dir():
        sys.exit(f"no data at {args.data}: set EDGEDX_DATA or --data to the shared data folder (see ../shared/README.md)")
    rows = []
    for ds in datasets(args.data, args.per_set):
        limits, result = run_set(ds)
        rows.append((ds.name, ds.split, limits, result))
    cxr = run_cxr(args.data)
    if cxr is not None:
        rows.append(("chest X-ray samples (7 real, 512–2373 px)", cxr[0]["note"], cxr[0], cxr[1]))
    report(rows, save=not args.no_save)


def report(rows: list[tuple[str, str, dict, dict]], *, save: bool) -> None:
    variant = "every measure on the resampled image (ablation)" if MODEL_SCALE_ONLY else "as the runtime measures"
    print(f"\ncpu: {cpu_line()}; commit {git_rev()}; {variant}\n")
    print("| dataset | " + " | ".join(CONDITIONS) + " |")
    print("|---|" + "---:|" * len(CONDITIONS))
    for name, _, _, result in rows:
        cells = [f"{result[c]['rate']:.1%} ({result[c]['rejected']}/{result[c]['n']})" for c in CONDITIONS]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nchecks that fired (images per check):")
    for name, _, _, result in rows:
        print(f"- {name}: " + "; ".join(f"{c}: {dict(result[c]['checks']) or '-'}" for c in CONDITIONS))
    if not save:
        return
    stamp = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    with RESULTS.open("a", encoding="utf-8") as f:
        for name, split, limits, result in rows:
            for condition in CONDITIONS:
                line = {"benchmark": "quality_gate", "variant": "model_scale_only" if MODEL_SCALE_ONLY else "runtime", "dataset": name,
                        "split": split, "condition": condition, **result[condition],
                        "limits": limits, "cpu": cpu_line(), "commit": git_rev(), "time": stamp}
                f.write(json.dumps(line, ensure_ascii=False, default=str) + "\n")
    print(f"\nappended {len(rows) * len(CONDITIONS)} lines to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
