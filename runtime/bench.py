"""Latency of a model: warm up, then time runs until a minimum time and count."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.errors import InputError
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.model import load_model
from edgedx.runtime.preprocess import model_input


@dataclass(frozen=True)
class LatencyRow:
    batch_size: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    images_per_s: float


@dataclass(frozen=True)
class BenchReport:
    model: str
    providers: tuple[str, ...]
    input_size: tuple[int, int]
    rows: tuple[LatencyRow, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "providers": list(self.providers),
            "input_size": list(self.input_size),
            "rows": [asdict(r) for r in self.rows],
        }


def bench_model(
    model: str | Path,
    *,
    batch_sizes: Sequence[int] = (1,),
    device: str = "cpu",
    threads: int | None = None,
    warmup: int = 5,
    min_runs: int = 20,
    min_seconds: float = 1.0,
    seed: int = 0,
    progress: ProgressFn = no_progress,
) -> BenchReport:
    """Model-only latency percentiles per batch size, on random crops of the card's input size."""
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise InputError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    loaded = load_model(model, device=device, threads=threads)
    card = loaded.card
    rng = np.random.default_rng(seed)
    rows = []
    for i, batch in enumerate(batch_sizes):
        crops = rng.integers(0, 256, size=(batch, *card.input_size, 3), dtype=np.uint8)
        x = model_input(crops, card)
        for _ in range(warmup):
            loaded.session.run(x)
        times: list[float] = []
        begin = time.perf_counter()
        while len(times) < min_runs or time.perf_counter() - begin < min_seconds:
            t = time.perf_counter()
            loaded.session.run(x)
            times.append(time.perf_counter() - t)
        ms = np.asarray(times) * 1000.0
        rows.append(
            LatencyRow(
                batch_size=batch,
                runs=len(times),
                p50_ms=float(np.percentile(ms, 50)),
                p90_ms=float(np.percentile(ms, 90)),
                p99_ms=float(np.percentile(ms, 99)),
                mean_ms=float(ms.mean()),
                images_per_s=float(batch * 1000.0 / ms.mean()),
            )
        )
        progress("bench", i + 1, len(batch_sizes))
    return BenchReport(str(model), tuple(loaded.session.providers), card.input_size, tuple(rows))
