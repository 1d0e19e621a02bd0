"""Which file to ship where: a short recommendation per target class, from what this export measured.

Why: an export folder can hold six files (fp32/fp16/int8 × .onnx/.ort, engines)
and nothing said which one a scanner PC, a GPU box, a phone app or a browser
should load. ``.ort`` is 3–6× slower than ``.onnx`` on x86 (basic graph
optimisations only); an fp16 ``.ort`` carries Cast nodes and computes in fp32
on CPUs; int8 pays in the flavour made for the CPU (uint8 activations; 7-bit weights without VNNI); an engine
runs on the GPU it was built on. The recommendation uses the parity verdicts
and a short CPU timing taken here, and says that the target must confirm it
(``edgedx verify`` on the target).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.card import ModelCard
from edgedx.runtime.backends.onnx_backend import OnnxSession
from edgedx.runtime.preprocess import model_input

TIMING_BATCH = 8
TIMING_SECONDS = 0.5


def cpu_images_per_second(path: Path, card: ModelCard) -> float:
    """Crops/s of one artefact on this CPU at batch 8, model only (a short measurement for ranking, not a benchmark)."""
    session = OnnxSession(path, device="cpu")
    crops = np.random.default_rng(0).integers(0, 256, (TIMING_BATCH, *card.input_size, 3), dtype=np.uint8)
    x = model_input(crops, session.card)
    session.run(x)  # warm-up
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < TIMING_SECONDS or runs < 2:
        session.run(x)
        runs += 1
    return runs * TIMING_BATCH / (time.perf_counter() - started)


def recommend(artefacts: list[dict[str, Any]], speeds: dict[str, float], cpu: str) -> list[dict[str, str]]:
    """One line per target class: the file, and why (from the parity verdicts and the speeds measured here)."""
    passed = [a for a in artefacts if a["parity"]["passed"]]
    by: dict[tuple[str, str], str] = {}
    for a in passed:  # the first of a kind wins: for int8 the 'cpu' flavour, the one for Arm phones and VNNI CPUs
        by.setdefault((a["format"], a["precision"]), a["path"])
    rows = [_pc_cpu(passed, speeds, cpu), _gpu(by), _phone(by), _browser(by)]
    return [r for r in rows if r is not None]


def _pc_cpu(passed: list[dict[str, Any]], speeds: dict[str, float], cpu: str) -> dict[str, str] | None:
    onnx_files = [a for a in passed if a["format"] == "onnx" and a["path"] in speeds]
    if not onnx_files:
        return None
    best = max(onnx_files, key=lambda a: speeds[a["path"]])
    fp32 = next((a for a in onnx_files if a["precision"] == "fp32"), best)
    ratio = speeds[best["path"]] / speeds[fp32["path"]]
    why = f"fastest verified file on this CPU ({cpu}): {speeds[best['path']]:.0f} crops/s at batch {TIMING_BATCH}, model only"
    if best is not fp32:
        why += f", {ratio:.2f}× {fp32['path']}"
    why += "; another CPU may round and rank differently: run edgedx verify there (and edgedx bench)"
    return {"target": "PC CPU (ONNX Runtime)", "file": best["path"], "why": why}


def _gpu(by: dict[tuple[str, str], str]) -> dict[str, str]:
    engines = [p for (fmt, _), p in by.items() if fmt == "engine"]
    if engines:
        return {"target": "NVIDIA GPU", "file": engines[-1], "why": "a TensorRT engine runs only on the GPU model and TensorRT version it was built with (see its sidecar)"}
    file = by.get(("onnx", "fp16")) or by.get(("onnx", "fp32"), "")
    return {
        "target": "NVIDIA GPU", "file": file,
        "why": "with --device cuda; for the fastest path build an engine on the target GPU: edgedx export CHECKPOINT --engine",
    }


def _phone(by: dict[tuple[str, str], str]) -> dict[str, str] | None:
    fp32, int8, fp16 = by.get(("ort", "fp32")), by.get(("ort", "int8")), by.get(("ort", "fp16"))
    if not (fp32 or int8 or fp16):
        return {"target": "Android/iOS (ONNX Runtime Mobile)", "file": "", "why": "no .ort file was made: export with --mobile"}
    file = fp32 or int8 or fp16 or ""
    why = "ORT format with a fixed batch, so NNAPI/CoreML can take the whole graph (counts in export_report.json)"
    if fp16:
        why += f"; {fp16} computes in fp32 on phone CPUs (Cast nodes around each op): use it only with a GPU/NPU delegate"
    return {"target": "Android/iOS (ONNX Runtime Mobile)", "file": file, "why": why}


def _browser(by: dict[tuple[str, str], str]) -> dict[str, str] | None:
    file = by.get(("onnx", "fp32"))
    if file is None:
        return None
    return {
        "target": "browser (onnxruntime-web)", "file": file,
        "why": f"fp32 .onnx on wasm; the card and self-test vectors are in {file}.card.json (the web runtime cannot read ONNX metadata)",
    }
