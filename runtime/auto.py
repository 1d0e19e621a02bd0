"""``--device auto``: the fastest verified path on this machine, chosen by measuring, and said.

Why: which file and engine is fastest depends on the processor (int8 pays on
VNNI/AMX CPUs and is slower elsewhere; OpenVINO wins on some files and not
others; a GPU wins when there is one), and a fast path that does not
reproduce its export here is no path at all. So ``auto`` takes every
candidate (the artefacts of the export folder × the engines installed here),
keeps only those whose self-test vectors pass on this machine, times each
briefly at the run's batch size, and picks the fastest. The choice is cached
per machine (CPU, versions, the files' sha256) in ``~/.cache/edgedx`` and logged
as a step line with the runner-up, so a clinic engineer sees what runs.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
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
TIMING_SECONDS = 0.4
PC_SUFFIXES = (".onnx",)  # .ort is for phones: 3-6× slower on x86 (basic optimisations only)


@dataclass(frozen=True)
class Candidate:
    file: str
    device: str
    images_per_s: float | None  # crops/s through the engine, model only; None: not timed (refused)
    refused: str | None = None


@dataclass(frozen=True)
class AutoChoice:
    path: Path
    device: str
    candidates: tuple[Candidate, ...]
    cached: bool

    def describe(self) -> str:
        timed = sorted((c for c in self.candidates if c.images_per_s), key=lambda c: -(c.images_per_s or 0))
        best = timed[0]
        runner = f"; next {timed[1].file} on {timed[1].device} {timed[1].images_per_s:.0f} crops/s" if len(timed) > 1 else ""
        refused = [c for c in self.candidates if c.refused]
        skipped = f"; {len(refused)} refused (self-test or engine missing)" if refused else ""
        return (
            f"--device auto chose {best.file} on {best.device}: {best.images_per_s:.0f} crops/s (model only), self-test passed here"
            f"{runner}{skipped}{' (cached for this machine)' if self.cached else ''}"
        )


def choose(path: Path, batch_size: int = 8, cache_dir: Path | None = None) -> AutoChoice:
    """The fastest (file, device) among the verified candidates for ``path`` (a model file or its export folder)."""
    files = _candidate_files(path)
    key = _cache_key(files, batch_size)
    cache = (cache_dir or Path(os.environ.get("EDGEDX_CACHE", Path.home() / ".cache" / "edgedx"))) / "auto.json"
    cached = _read_cache(cache).get(key)
    if cached is not None:
        candidates = tuple(Candidate(**c) for c in cached)
        return _pick(path, files, candidates, cached=True)
    candidates = tuple(_measure(f, device, batch_size) for f in files for device in _devices())
    choice = _pick(path, files, candidates, cached=False)
    _write_cache(cache, key, [asdict(c) for c in candidates])
    return choice


def _pick(path: Path, files: list[Path], candidates: tuple[Candidate, ...], *, cached: bool) -> AutoChoice:
    timed = [c for c in candidates if c.images_per_s]
    if not timed:
        reasons = "; ".join(f"{c.file} on {c.device}: {c.refused}" for c in candidates)
        raise ModelError(f"--device auto found no verified path for {path} on this machine ({reasons}); name a --device")
    best = max(timed, key=lambda c: c.images_per_s or 0)
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


def _measure(path: Path, device: str, batch_size: int) -> Candidate:
    """Self-test first (a path that does not reproduce its export is refused), then a short timing."""
    try:
        session = open_session(path, device)
    except EdgeDxError as exc:
        return Candidate(path.name, device, None, str(exc)[:200])
    try:
        if not session.selftest:
            return Candidate(path.name, device, None, "no self-test vectors")
        report = run_selftest(session, SelfTestVectors.from_text(session.selftest, str(path)))
        if not report.passed:
            return Candidate(path.name, device, None, report.summary())
        crops = np.random.default_rng(0).integers(0, 256, (batch_size, *session.card.input_size, 3), dtype=np.uint8)
        x = model_input(crops, session.card)
        session.run(x)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < TIMING_SECONDS or runs < 2:
            session.run(x)
            runs += 1
        return Candidate(path.name, device, runs * batch_size / (time.perf_counter() - started))
    finally:
        session.close()


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
