"""Shared by the benchmark scripts: where the data is and what machine measured it."""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def default_images() -> Path:
    """The real malaria fields: $EDGEDX_DATA or ../shared/data beside the repository."""
    data = Path(os.environ.get("EDGEDX_DATA", ROOT.parent / "shared" / "data"))
    return data / "malaria_fields_iml" / "images"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16")


def cpu_flags(names: tuple[str, ...] = CPU_FLAGS) -> dict[str, bool]:
    """Which of the instruction-set flags that decide ONNX Runtime's kernels this CPU has (from /proc/cpuinfo)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith(("flags", "Features")):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {name: name in flags for name in names}


def cpu_line() -> str:
    """The CPU model and its flags in one line, printed beside every table."""
    flags = cpu_flags()
    return f"{cpu_model()}, {os.cpu_count()} cores; " + " ".join(f"{name} {'yes' if on else 'no'}" for name, on in flags.items())


def append_result(name: str, line: dict) -> Path:
    """Append one JSON line to ``benchmarks/results/<name>.jsonl`` (the folder is made when missing); its path."""
    path = ROOT / "benchmarks" / "results" / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(line, allow_nan=False) + "\n")
    return path


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "absent"


# -- interleaved timing, shared by ort_vs_torch.py, int8_vs_fp32.py, openvino_vs_ort.py and pipeline_efficiency.py --


def _cpu() -> tuple[float, float]:
    """(CPU seconds used by the whole machine including hypervisor steal, CPU seconds used by this process)."""
    fields = Path("/proc/stat").read_text(encoding="ascii").split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), own.user + own.system


def images_per_s(fn: Callable[[], None], images_per_call: int, seconds: float) -> tuple[float, float | None]:
    """Call ``fn`` until at least ``seconds`` have passed: (images per second over the whole span, other load).

    Other load: the share of the machine's CPU time, over the span, used by other
    processes (and stolen by the hypervisor): 0 on a quiet machine, 0.5 when
    something else kept one of two cores busy. None where /proc/stat is missing.
    """
    try:
        busy0, own0 = _cpu()
    except (OSError, ValueError):
        busy0 = own0 = None
    calls = 0
    start = time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    other = None
    if busy0 is not None:
        busy1, own1 = _cpu()
        other = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (elapsed * (os.cpu_count() or 1)))
    return calls * images_per_call / elapsed, other


def interleaved(
    variants: dict[str, Callable[[], None]], images_per_call: int, *, rounds: int, seconds: float, warmup: float, settle: float,
    max_other: float = 0.15, retries: int = 2, before_round: Callable[[], None] | None = None,
) -> tuple[dict[str, list[float]], dict[str, list[float | None]], int]:
    """images/s of every variant per round, the other load during each measurement, and the rounds discarded.

    In round r the order is rotated by r (A B C, B C A, C A B, ...), so no variant
    always runs first. A round in which other processes took more than
    ``max_other`` of the machine during any measurement is discarded and run
    again, at most ``retries`` times per call; after that rounds are kept
    whatever the load (the load is recorded with them). ``before_round`` runs
    before each round, untimed (e.g. :func:`wait_for_quiet`).
    """
    names = list(variants)
    for name in names:
        images_per_s(variants[name], images_per_call, warmup)
    rates: dict[str, list[float]] = {name: [] for name in names}
    other: dict[str, list[float | None]] = {name: [] for name in names}
    discarded = 0
    r = 0
    while len(rates[names[0]]) < rounds:
        k = r % len(names)
        r += 1
        got: dict[str, tuple[float, float | None]] = {}
        if before_round is not None:
            before_round()
        for name in names[k:] + names[:k]:
            time.sleep(settle)  # let the other runtime's spinning worker threads go idle
            got[name] = images_per_s(variants[name], images_per_call, seconds)
        if discarded < retries and any(load is not None and load > max_other for _, load in got.values()):
            discarded += 1
            continue
        for name, (rate, load) in got.items():
            rates[name].append(rate)
            other[name].append(load)
    return rates, other, discarded


def most_other(other: dict[str, list[float | None]]) -> float | None:
    values = [v for vs in other.values() for v in vs if v is not None]
    return max(values) if values else None


def ratio_stats(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Ratio of the medians, and the min / max of the per-round ratios."""
    per_round = [a / b for a, b in zip(numerator, denominator)]
    return {
        "ratio": statistics.median(numerator) / statistics.median(denominator),
        "ratio_min": min(per_round),
        "ratio_max": max(per_round),
        "ratio_per_round": per_round,
    }


def wait_for_quiet(max_s: float, *, threshold: float = 0.05, window_s: float = 2.0) -> float | None:
    """Wait until other processes used less than ``threshold`` of the machine over ``window_s`` (this one is idle
    meanwhile), at most ``max_s`` seconds: on a shared 2-core VM a test run next door halves ONNX Runtime's speed.
    Returns the load last seen (None without /proc/stat)."""
    deadline = time.monotonic() + max_s
    while True:
        try:
            busy0, own0 = _cpu()
        except (OSError, ValueError):
            return None
        time.sleep(window_s)
        busy1, own1 = _cpu()
        load = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (window_s * (os.cpu_count() or 1)))
        if load < threshold or time.monotonic() >= deadline:
            return load
