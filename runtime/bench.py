"""``edgedx bench``: latency and throughput of deployed artefacts, swept side by side.

For each artefact × device × batch size: warm up, then time runs until a
minimum time and count; p50/p90/p99 latency and images/s. For whole images of
each requested size, the same statistics plus a per-stage breakdown (decode,
tiling + preprocessing, inference, merge) using the runtime's own functions.
With labelled data, each artefact's accuracy rides along, so a speed table
carries its accuracy cost; the export report beside an artefact supplies its
parity. The environment (CPU, cores, versions, active providers, GPU) is
recorded with the numbers.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

import edgedx
from edgedx.errors import EdgeDxError, InputError
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.io.image_io import decode_image, default_max_pixels
from edgedx.runtime.model import Model, load_model
from edgedx.runtime.preprocess import model_input, to_probabilities
from edgedx.runtime.tiling import merge, split_tiles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyRow:
    """Model-only timing of one artefact on one device at one batch size."""

    artefact: str
    precision: str
    device: str
    providers: tuple[str, ...]
    size_mb: float
    batch_size: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float
    parity: dict[str, Any] | None = None  # from the export report beside the artefact
    accuracy: float | None = None  # on --data, through the production path
    members: int = 1  # networks the artefact runs per crop (card.ensemble.members): a fold ensemble of K costs about K times one


@dataclass(frozen=True)
class ImageRow:
    """Whole-image diagnosis timing with the per-stage breakdown (medians, ms)."""

    artefact: str
    precision: str
    device: str
    image_size: tuple[int, int]
    tiles: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    images_per_s: float
    tiles_per_s: float
    stages_ms: dict[str, float] = field(default_factory=dict)
    members: int = 1  # see LatencyRow.members


@dataclass(frozen=True)
class BenchReport:
    rows: tuple[LatencyRow, ...]
    image_rows: tuple[ImageRow, ...]
    environment: dict[str, Any]

    @property
    def providers(self) -> tuple[str, ...]:
        return self.rows[0].providers if self.rows else ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "environment": self.environment,
            "rows": [asdict(r) for r in self.rows],
            "image_rows": [asdict(r) for r in self.image_rows],
        }


def bench_models(
    models: Sequence[str | Path],
    *,
    batch_sizes: Sequence[int] = (1, 8),
    devices: Sequence[str] = ("cpu",),
    image_sizes: Sequence[tuple[int, int]] = (),
    data: str | Path | None = None,
    threads: int | None = None,
    warmup: int = 5,
    min_runs: int = 20,
    min_seconds: float = 1.0,
    seed: int = 0,
    progress: ProgressFn = no_progress,
) -> BenchReport:
    """Sweep artefacts × devices × batch sizes (and whole-image sizes); see the module docstring."""
    if not models:
        raise InputError("no model given; name one or more exported artefacts (.onnx, .ort, .engine)")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    if any(h < 1 or w < 1 for h, w in image_sizes):
        raise InputError(f"image sizes must be positive, got {list(image_sizes)}")
    limit = default_max_pixels()
    too_big = [f"{w}x{h}" for h, w in image_sizes if h * w > limit]
    if too_big:
        raise InputError(
            f"image size(s) {', '.join(too_big)} exceed the pixel limit of {limit / 1e6:.0f} megapixels (a synthetic image is made "
            "in memory); choose smaller --image-sizes, or raise the limit with EDGEDX_MAX_IMAGE_PIXELS"
        )
    for m in models:
        if not Path(m).is_file():
            raise InputError(f"model not found: {m}")
    rng = np.random.default_rng(seed)
    rows: list[LatencyRow] = []
    image_rows: list[ImageRow] = []
    active: dict[str, list[str]] = {}
    total = len(models) * len(devices) * (len(batch_sizes) + len(image_sizes) + (data is not None))
    done = 0
    for path in models:
        path = Path(path)
        for device in devices:
            loaded = load_model(path, device=device, threads=threads, batch_size=max(batch_sizes))
            providers = tuple(loaded.session.providers)
            active[f"{path.name}@{device}"] = list(providers)
            card = loaded.card
            precision = artefact_precision(loaded)
            size_mb = round(path.stat().st_size / 1e6, 2)
            parity = export_parity(path)
            accuracy = None
            if data is not None:
                accuracy = _accuracy(loaded, data)
                done += 1
                progress("bench", done, total, f"{path.name} accuracy")
            for batch in batch_sizes:
                crops = rng.integers(0, 256, size=(batch, *card.input_size, 3), dtype=np.uint8)
                x = model_input(crops, card)
                ms = time_runs(lambda: loaded.session.run(x), warmup=warmup, min_runs=min_runs, min_seconds=min_seconds)
                rows.append(
                    LatencyRow(
                        artefact=path.name, precision=precision, device=device, providers=providers, size_mb=size_mb,
                        batch_size=batch, runs=len(ms), p50_ms=_pct(ms, 50), p90_ms=_pct(ms, 90), p99_ms=_pct(ms, 99),
                        mean_ms=float(ms.mean()), images_per_s=float(batch * 1000.0 / ms.mean()), parity=parity,
                        accuracy=accuracy, members=card.ensemble.members,
                    )
                )
                done += 1
                progress("bench", done, total, f"{path.name} batch {batch}")
            for size in image_sizes:
                image_rows.append(_bench_image(loaded, path.name, precision, device, size, rng, warmup=min(warmup, 2), min_runs=max(3, min_runs // 4), min_seconds=min_seconds))
                done += 1
                progress("bench", done, total, f"{path.name} {size[1]}×{size[0]}")
    return BenchReport(tuple(rows), tuple(image_rows), environment(active))


def bench_model(model: str | Path, *, batch_sizes: Sequence[int] = (1,), device: str = "cpu", **kwargs: Any) -> BenchReport:
    """One artefact on one device (kept for scripts written against the first version)."""
    return bench_models([model], batch_sizes=batch_sizes, devices=(device,), **kwargs)


def time_runs(fn: Callable[[], Any], *, warmup: int, min_runs: int, min_seconds: float) -> np.ndarray:
    """Milliseconds per call after ``warmup`` calls, until both ``min_runs`` and ``min_seconds`` are reached."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    begin = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - begin < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return np.asarray(times) * 1000.0


def _bench_image(
    model: Model, name: str, precision: str, device: str, size: tuple[int, int], rng: np.random.Generator,
    *, warmup: int, min_runs: int, min_seconds: float,
) -> ImageRow:
    """Decode → tile + preprocess → infer → merge on a PNG of ``size``, each stage timed separately."""
    height, width = size
    smooth = cv2.resize(rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8), (width, height))
    noisy = np.clip(smooth.astype(np.int16) + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".png", noisy)
    assert ok
    card, policy = model.card, model.crop
    stages: dict[str, list[float]] = {"decode": [], "tiling_preprocess": [], "inference": [], "merge": []}
    n_tiles = 0

    def run() -> None:
        nonlocal n_tiles
        t0 = time.perf_counter()
        image = decode_image(encoded)
        t1 = time.perf_counter()
        tiles, crops = split_tiles(image, policy)  # the runtime's splitter, foreground filter included
        size = model.batch_size
        batches = [model_input(tiles[i : i + size], card) for i in range(0, len(tiles), size)]
        t2 = time.perf_counter()
        logits = [model.run(b) for b in batches]  # the card's test-time views included, as diagnose runs them
        t3 = time.perf_counter()
        layout = crops.layout()
        tile_probs = np.full((layout.grid.n_tiles, card.n_classes), np.nan)
        tile_probs[layout.used] = to_probabilities(np.concatenate(logits), card)
        merge(layout, tile_probs, policy, activation=card.output_activation,
              positive_index=card.positive_index if card.task == "binary" else None)
        t4 = time.perf_counter()
        n_tiles = len(tiles)
        for key, value in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            stages[key].append(value * 1000.0)

    ms = time_runs(run, warmup=warmup, min_runs=min_runs, min_seconds=min_seconds)
    measured = {k: round(float(np.median(v[warmup:])), 3) for k, v in stages.items()}
    return ImageRow(
        artefact=name, precision=precision, device=device, image_size=(height, width), tiles=n_tiles, runs=len(ms),
        p50_ms=_pct(ms, 50), p90_ms=_pct(ms, 90), p99_ms=_pct(ms, 99), images_per_s=float(1000.0 / ms.mean()),
        tiles_per_s=float(n_tiles * 1000.0 / ms.mean()), stages_ms=measured, members=card.ensemble.members,
    )


def _accuracy(model: Model, data: str | Path) -> float | None:
    from edgedx.runtime.evaluate import evaluate_folder

    return evaluate_folder(model, data).metrics.get("accuracy")


def artefact_precision(model: Model) -> str:
    """fp32/fp16/int8 from the ONNX metadata or the engine sidecar; "fp32" for older exports."""
    return model.session.precision


def export_parity(path: Path) -> dict[str, Any] | None:
    """This artefact's parity from ``export_report.json`` beside it, if the export wrote one."""
    report = path.parent / "export_report.json"
    if not report.is_file():
        return None
    try:
        for artefact in json.loads(report.read_text(encoding="utf-8")).get("artefacts", []):
            if artefact.get("path") == path.name:
                p = artefact.get("parity") or {}
                labelled = p.get("labelled") or {}
                return {
                    "max_abs_diff": p.get("max_abs_diff"), "top1_agreement": p.get("top1_agreement"),
                    "passed": p.get("passed"), "accuracy_delta": labelled.get("accuracy_delta"),
                }
    except (OSError, ValueError) as exc:
        log.info("cannot read %s: %s", report, exc)
    return None


def gpu_description() -> tuple[str, str | None]:
    """(name, compute capability) of the GPU, or ("no GPU", None) when neither CUDA nor nvidia-smi finds one.

    A table titled "GPU: unknown" reads as a failed probe on a machine with a GPU; on a CPU box it is "no GPU".
    """
    from edgedx.runtime.backends.trt_backend import UNKNOWN, current_gpu

    try:
        gpu, capability = current_gpu()
    except EdgeDxError:  # a CUDA runtime that cannot start
        return "no GPU", None
    if gpu == UNKNOWN and capability == UNKNOWN:
        return "no GPU", None
    return gpu, capability


def environment(active_providers: dict[str, list[str]]) -> dict[str, Any]:
    """What the numbers were measured on."""
    versions = {"edgedx": edgedx.__version__, "numpy": np.__version__, "opencv": cv2.__version__, "python": platform.python_version()}
    for name in ("onnxruntime", "tensorrt"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            pass
    if "openvino" in sys.modules:  # only when a --devices openvino… row loaded it
        versions["openvino"] = sys.modules["openvino"].__version__
    gpu, capability = gpu_description()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "versions": versions,
        "providers": active_providers,
        "gpu": gpu,
        "compute_capability": capability,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _pct(ms: np.ndarray, q: float) -> float:
    return float(np.percentile(ms, q))
