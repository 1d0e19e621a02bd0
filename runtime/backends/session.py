"""The one interface every inference engine offers, and the one factory that opens a file as an engine.

Why a protocol: the runtime's :class:`~edgedx.runtime.model.Model`, ``bench``,
``evaluate``, the audit log and export verification all need the same few facts
about an engine (its card, the file and its sha256, what actually runs it, its
precision) besides ``run``. Before, each caller probed for them with
``getattr``; a new backend had no list of what to provide. A backend now
implements :class:`Session`, and :func:`open_session` picks the backend from
the file (``.engine``/``.plan``: TensorRT, else ONNX Runtime) or the device
(``openvino…``: OpenVINO).

Backends: :class:`~edgedx.runtime.backends.onnx_backend.OnnxSession` (ONNX/ORT files),
:class:`~edgedx.runtime.backends.trt_backend.TensorRTSession` (TensorRT engines),
:class:`~edgedx.runtime.backends.openvino_backend.OpenVinoSession` (ONNX files on OpenVINO) and,
above the runtime, ``edgedx.training.validation.TorchSession`` (the PyTorch
model, for validation and as export's reference).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from edgedx.card import ModelCard

ENGINE_SUFFIXES = (".engine", ".plan")
PRECISIONS = ("fp32", "fp16", "int8")  # of artefacts; OpenVINO may also report bf16 or int8+bf16 (what runs)


@runtime_checkable
class Session(Protocol):
    """An engine that turns a preprocessed batch into logits, and says what it is.

    ``path`` and ``sha256`` are None for an in-memory engine (the PyTorch
    reference); ``providers`` lists what actually runs, first the one that
    matters (ONNX Runtime's active providers, ``("TensorRT",)``, ``("PyTorch
    cpu",)``); ``pads_batches`` is True for engines that should see one batch
    shape (GPUs re-tune on a new shape); ``selftest`` is the text of the
    vectors export stored in the artefact, replayed by
    :func:`edgedx.runtime.selftest.verify_session`.
    """

    card: ModelCard
    path: Path | None
    sha256: str | None
    device: str
    providers: tuple[str, ...]
    precision: str
    pads_batches: bool
    selftest: str | None  # the artefact's own self-test vectors (see edgedx.runtime.selftest), None when it has none

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw model outputs (logits, float32) for a preprocessed batch laid out as the card says."""
        ...

    def close(self) -> None:
        """Release the engine (GPU memory, file handles); safe to call twice."""
        ...


def is_engine_file(path: str | Path) -> bool:
    """A TensorRT engine (card in the sidecar beside it) rather than an ONNX/ORT file (card inside)."""
    return Path(path).suffix.lower() in ENGINE_SUFFIXES


def open_session(path: str | Path, device: str = "cpu", *, threads: int | None = None) -> Session:
    """The engine for an exported file: OpenVINO for ``openvino[-bf16][:DEVICE]`` devices, TensorRT for
    ``.engine``/``.plan``, ONNX Runtime for ``.onnx``/``.ort``.

    The file's sha256 is checked against the one export wrote beside it, the
    card is read and checked against the graph, and the requested device must
    be the one that actually runs (no silent fallback to CPU).
    """
    if device.lower().startswith("openvino"):
        from edgedx.runtime.backends.openvino_backend import OpenVinoSession

        return OpenVinoSession(path, device=device, threads=threads)
    if is_engine_file(path):
        from edgedx.runtime.backends.trt_backend import TensorRTSession

        return TensorRTSession(path, device=device)
    from edgedx.runtime.backends.onnx_backend import OnnxSession

    return OnnxSession(path, device=device, threads=threads)


def run_in_fixed_batches(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, n: int) -> np.ndarray:
    """``run`` on a graph with a fixed batch ``n``: the batch cut into chunks of exactly ``n`` rows, the last
    padded with copies of its final row, whose outputs are dropped."""
    if len(x) == n:
        return run(x)
    if len(x) == 0:  # the graph takes no empty batch: run zeros, keep no row
        return run(np.zeros((n, *x.shape[1:]), x.dtype))[:0]
    outputs = []
    for start in range(0, len(x), n):
        chunk = x[start : start + n]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], n - len(chunk), axis=0)]) if len(chunk) < n else chunk
        outputs.append(run(padded)[: len(chunk)])
    return np.concatenate(outputs)
