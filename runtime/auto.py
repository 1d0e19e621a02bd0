"""``--device auto``: the fastest verified path on this machine, chosen by measuring, and said.

Why: which file and engine is fastest depends on the processor (int8 pays on
VNNI/AMX CPUs and is slower elsewhere; OpenVINO wins on some files and not
others; a GPU wins when there is one), and a fast path that does not
reproduce its export here is no path at all. So ``auto`` takes every
candidate (the artefacts of the export folder × the engines installed here),
keeps only those whose self-test vectors pass on this machine, times each
briefly at the run's batch size, and picks the fastest. Candidates within 5%
of the fastest count as equally fast (brief timings of near-equal paths swap
order from run to run: two int8 files at 2509/2171 crops/s in one choice were
2430/2634 in a longer benchmark); among those it takes the one whose answers on the self-test vectors sit
closest to the fp32 model the card's metrics describe (mean |Δp|, one measure
for fp32, fp16 and int8 files), so noise never trades a faithful path for a
straying one. The choice is cached
per machine (CPU, versions, the files' sha256) in ``~/.cache/edgedx`` and logged
as a step line with the runner-up, so a clinic engineer sees what runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.errors import EdgeDxError, ModelError
from edgedx.progress import STEP_LOGGER
from edgedx.runtime.backends.session import open_session
from edgedx.runtime.preprocess import model_input
from edgedx.runtime.selftest import SelfTestVectors, run_selftest

steps_log = logging.getLogger(STEP_LOGGER)
TIMING_SECONDS = 1.2  # per candidate, split over ROUNDS interleaved rounds
SPEED_TIE = 0.95  # at least this share of the fastest counts as equally fast (issue 19: auto delivers ≥ 0.95× the best)
ROUNDS = 4
PC_SUFFIXES = (".onnx",)  # .ort is for phones: 3-6× slower on x86 (basic optimisations only)


@dataclass(frozen=True)
class Candidate:
    file: str
    device: str
    images_per_s: float | None  # crops/s through the engine, model only; None: not timed (refused)
    refused: str | None = None
    # the self-test's mean |Δp| from the fp32 reference (SelfTestReport.mean_prob_delta); None: not measured (refused,
    # or a cache written before it was recorded)
    selftest_delta: float | None = None


@dataclass(frozen=True)
class AutoChoice:
    path: Path
    device: str
    candidates: tuple[Candidate, ...]
    cached: bool

    def describe(self) -> str:
        timed = sorted((c for c in self.candidates if c.images_per_s), key=lambda c: -(c.images_per_s or 0))
        best = next(c for c in timed if c.file == self.path.name and c.device == self.device)
        others = [c for c in timed if c is not best]
        runner = f"; next {others[0].file} on {others[0].device} {others[0].images_per_s:.0f} crops/s" if others else ""
        if others and (others[0].images_per_s or 0) > (best.images_per_s or 0):
            runner += (f" (as fast within {1 - SPEED_TIE:.0%}; this one is closer to the fp32 model: self-test mean |Δp| "
                       f"{_delta_text(best)} against {_delta_text(others[0])})")
        refused = [c for c in self.candidates if c.refused]
        skipped = f"; {len(refused)} refused (self-test or engine missing)" if refused else ""
        return (
            f"--device auto chose {best.file} on {best.device}: {best.images_per_s:.0f} crops/s (model only), self-test passed here"
            f"{runner}{skipped}{' (cached for this machine)' if self.cached else ''}"
        )


def _delta_text(c: Candidate) -> str:
    return "unknown" if c.selftest_delta is None else f"{c.selftest_delta:.3g}"


def choose(path: Path, batch_size: int = 8, cache_dir: Path | None = None) -> AutoChoice:
    """The fastest (file, device) among the verified candidates for ``path`` (a model file or its export folder); among
    those within 5% of the fastest, the one closest to the fp32 model in its self-test (see the module docstring)."""
    files = _candidate_files(path)
    key = _cache_key(files, batch_size)
    cache = (cache_dir or Path(os.environ.get("EDGEDX_CACHE", Path.home() / ".cache" / "edgedx"))) / "auto.json"
    cached = _read_cache(cache).get(key)
    if cached is not None:
        candidates = tuple(Candidate(**c) for c in cached)
        return _pick(path, files, candidates, cached=True)
    candidates = _measure_all(files, _devices(), batch_size)
    choice = _pick(path, files, candidates, cached=False)
    _write_cache(cache, key, [asdict(c) for c in candidates])
    return choice


def _pick(path: Path, files: list[Path], candidates: tuple[Candidate, ...], *, cached: bool) -> AutoChoice:
    timed = [c for c in candidates if c.images_per_s]
    if not timed:
        reasons = "; ".join(f"{c.file} on {c.device}: {c.refused}" for c in candidates)
        raise ModelError(f"--device auto found no verified path for {path} on this machine ({reasons}); name a --device")
    fastest = max(c.images_per_s or 0 for c in timed)
    near = [c for c in timed if (c.images_per_s or 0) >= SPEED_TIE * fastest]
    best = min(near, key=lambda c: (math.inf if c.selftest_delta is None else c.selftest_delta, -(c.images_per_s or 0)))
    choice = AutoChoice(next(f for f in files if f.name == best.file), best.device, candidates, cached)
    steps_log.info("%s", choice.describe())
    return choice


def _candidate_files(path: Path) -> list[Path]:
    folder = path if path.is_dir() else path.parent
    files = sorted(p for p in folder.iterdir() if p.suffix in PC_SUFFIXES and p.is_file() and not p.name.endswith(".resample.onnx"))
    if not path.is_dir():
        files = [path] + [f for f in files if f != path and f.name.startswith(path.stem.split(".")[0] + ".")]
    if not files:
        raise ModelError(f"--device auto: no .onnx model in {folder}")
    return files


def _devices() -> list[str]:
    """The engines installed here (ONNX Runtime's providers, OpenVINO when importable)."""
    devices = ["cpu"]
    try:
        import onnxruntime

        if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            devices.append("cuda")
    except ImportError:
        pass
    if importlib.util.find_spec("openvino") is not None:
        devices.append("openvino")
    return devices


def _measure_all(files: list[Path], devices: list[str], batch_size: int) -> tuple[Candidate, ...]:
    """Self-test every (file, device) first (one that does not reproduce its export is refused), then time the
    survivors interleaved: ROUNDS rounds, the order rotating, the median per candidate.

    Why interleaved: a one-off timing per candidate picked a 0.80× path on a
    loaded machine, because load that comes and goes lands on whichever runs then.
    """
    refused: dict[tuple[str, str], str] = {}
    open_: dict[tuple[str, str], tuple[Any, np.ndarray]] = {}
    deltas: dict[tuple[str, str], float] = {}
    try:
        for path in files:
            for device in devices:
                verdict = _open_verified(path, device, batch_size)
                if isinstance(verdict, str):
                    refused[(path.name, device)] = verdict
                else:
                    session, x, deltas[(path.name, device)] = verdict
                    open_[(path.name, device)] = (session, x)
        speeds: dict[tuple[str, str], list[float]] = {key: [] for key in open_}
        keys = list(open_)
        for r in range(ROUNDS):
            for key in keys[r % max(1, len(keys)):] + keys[: r % max(1, len(keys))]:
                session, x = open_[key]
                speeds[key].append(_crops_per_second(session, x, TIMING_SECONDS / ROUNDS))
    finally:
        for session, _ in open_.values():
            session.close()
    return tuple(
        Candidate(path.name, device, float(np.median(speeds[(path.name, device)])) if (path.name, device) in speeds else None,
                  refused.get((path.name, device)), deltas.get((path.name, device)))
        for path in files for device in devices
    )


def _open_verified(path: Path, device: str, batch_size: int) -> tuple[Any, np.ndarray, float] | str:
    """An open session whose self-test passed here, a warmed-up input batch and its answers' mean distance from the
    fp32 reference (:attr:`Candidate.selftest_delta`), or why the pair is refused."""
    try:
        session = open_session(path, device)
    except EdgeDxError as exc:
        return str(exc)[:200]
    if not session.selftest:
        session.close()
        return "no self-test vectors"
    report = run_selftest(session, SelfTestVectors.from_text(session.selftest, str(path)))
    if not report.passed:
        session.close()
        return report.summary()
    crops = np.random.default_rng(0).integers(0, 256, (batch_size, *session.card.input_size, 3), dtype=np.uint8)
    x = model_input(crops, session.card)
    session.run(x)  # warm-up
    return session, x, report.mean_prob_delta


def _crops_per_second(session: Any, x: np.ndarray, seconds: float) -> float:
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or runs < 2:
        session.run(x)
        runs += 1
    return runs * len(x) / (time.perf_counter() - started)


def _cache_key(files: list[Path], batch_size: int) -> str:
    from edgedx.runtime.io.integrity import sha256_file

    parts = [platform.processor(), platform.machine(), str(os.cpu_count()), _versions(), str(batch_size)]
    parts += [sha256_file(f) for f in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _versions() -> str:
    found = []
    for name in ("onnxruntime", "openvino"):
        try:
            found.append(f"{name}={__import__(name).__version__}")
        except ImportError:
            pass
    try:
        found.append(Path("/proc/cpuinfo").read_text(encoding="utf-8").split("model name", 1)[1].split("\n", 1)[0])
    except (OSError, IndexError):
        pass
    return ",".join(found)


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, key: str, value: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache(path)
        data[key] = value
        path.write_text(json.dumps(data), encoding="utf-8")
    except OSError:  # a read-only home: measure again next time, never fail the run
        pass
