"""ONNX Runtime as the inference engine, with the card read from the model file.

The card lives in the ONNX ``metadata_props`` under ``edgedx.card``; ONNX
Runtime exposes it as custom metadata, so the runtime never needs the ``onnx``
package. After the session is created we check which provider really runs:
onnxruntime-gpu silently falls back to CPU when CUDA cannot start.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.card import ONNX_METADATA_KEY, ModelCard, sidecar_path
from edgedx.errors import CardError, MissingDependencyError, ModelError
from edgedx.runtime.backends.session import run_in_fixed_batches
from edgedx.runtime.io.integrity import verify_model_file

log = logging.getLogger(__name__)

DEVICE_PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
DEVICES = ("auto", "cpu", "cuda", "tensorrt")


def import_onnxruntime() -> Any:
    """onnxruntime, or a clear error naming the extra to install."""
    try:
        import onnxruntime
    except ImportError:
        raise MissingDependencyError("onnxruntime", "cpu", "Running an ONNX model") from None
    return onnxruntime


def resolve_providers(device: str, available: list[str]) -> list[str]:
    """Execution providers to request for ``device`` (``auto`` prefers CUDA when listed)."""
    if device not in DEVICES:
        raise ModelError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}, or openvino[-bf16][:GPU|NPU]")
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    wanted = DEVICE_PROVIDERS[device]
    if wanted[0] not in available:
        raise ModelError(
            f"device {device!r} needs {wanted[0]}, which this onnxruntime does not provide "
            f"(available: {', '.join(available)}); install 'edgedx[gpu]' on a machine with CUDA, or use --device cpu"
        )
    return wanted


def provider_options(providers: list[str], model_path: Path) -> list[Any]:
    """Providers with the options a clinic box wants.

    CUDA: cuDNN's exhaustive per-shape algorithm search costs seconds for every
    new input shape, so use its heuristic instead (tile batches have one shape
    anyway). TensorRT provider: fp16 where the graph allows it is the user's
    choice via the exported precision, so leave precision alone, and cache the
    built engines beside the model so a restart does not rebuild them.
    """
    configured: list[Any] = []
    for name in providers:
        if name == "CUDAExecutionProvider":
            configured.append((name, {"cudnn_conv_algo_search": "HEURISTIC"}))
        elif name == "TensorrtExecutionProvider":
            cache = model_path.parent / ".ort-trt-cache"
            configured.append((name, {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": "True"}))
        else:
            configured.append(name)
    return configured


class OnnxSession:
    """One ONNX Runtime session plus the model card embedded in the file (a :class:`~edgedx.runtime.backends.session.Session`)."""

    def __init__(self, path: str | Path, *, device: str = "cpu", threads: int | None = None, optimise: bool = True) -> None:
        """``optimise=False`` runs the graph as written (QDQ int8 in exact float arithmetic, no fused kernels):
        export judges an int8 file's quality that way, the same on every CPU."""
        ort = import_onnxruntime()
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}")
        self.sha256 = verify_model_file(self.path)  # refused here if truncated or edited; reused by runs
        providers = resolve_providers(device, ort.get_available_providers())
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        if not optimise:
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=provider_options(providers, self.path)
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelError(
                f"{self.path}: not a loadable ONNX model ({str(exc).splitlines()[0][:200]}); the file may be truncated "
                "or not an ONNX file: copy it again from the export folder or re-export it with edgedx export"
            ) from None
        active = self.session.get_providers()
        if providers[0] not in active:
            raise ModelError(
                f"{providers[0]} was requested but ONNX Runtime is running {', '.join(active)} "
                "(the GPU provider could not start: check the CUDA/cuDNN installation)"
            )
        self.providers = tuple(active)
        self.device = device
        self.pads_batches = active[0] != "CPUExecutionProvider"  # a GPU re-tunes on every new batch shape
        metadata = self.session.get_modelmeta().custom_metadata_map
        self.precision = metadata.get("edgedx.precision", "fp32")  # exports before precisions were recorded: fp32
        self.selftest = metadata.get("edgedx.selftest")  # the vectors this artefact proves itself with
        self.card = card_from_session(self.session, self.path)
        check_card_sidecar(self.path, self.sha256, self.card)
        inputs = self.session.get_inputs()
        if len(inputs) != 1:
            raise ModelError(f"{self.path}: expected one input, the model has {len(inputs)}")
        self.input_name = inputs[0].name
        check_input_matches_card(inputs[0].shape, self.card, self.path)
        batch = inputs[0].shape[0]
        self.fixed_batch = batch if isinstance(batch, int) and batch > 0 else None  # --fixed-batch / mobile exports
        log.info("loaded %s on %s", self.path, ", ".join(active))

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw model outputs (logits) for a preprocessed batch of any size.

        A graph with a fixed batch (exported for NNAPI/CoreML) gets exactly that
        many rows per call: the batch is cut into chunks and the last one padded
        with copies of its final row, whose outputs are dropped.
        """
        if self.fixed_batch is None:
            return self._infer(x)
        return run_in_fixed_batches(self._infer, x, self.fixed_batch)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: x})[0]

    def close(self) -> None:
        """ONNX Runtime frees the session with the object; nothing to release early."""

    def __enter__(self) -> OnnxSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_card_sidecar(path: Path, sha256: str, card: ModelCard) -> None:
    """A ``<file>.card.json`` beside the model must describe this very file: same bytes, same card.

    Clients that cannot read ONNX metadata take the contract from the sidecar;
    one copied from another export would give them another threshold or crop
    rule, so EdgeDx refuses the pair rather than let them disagree.
    """
    sidecar = sidecar_path(path)
    if not sidecar.is_file():
        return
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
        recorded, sidecar_card = data["artefact"]["sha256"], ModelCard.from_dict(data["card"])
    except (OSError, ValueError, KeyError, TypeError, CardError) as exc:
        raise ModelError(f"{sidecar} is not a readable card sidecar ({exc}); delete it or re-export {path.name}") from None
    if recorded != sha256:
        raise ModelError(
            f"{sidecar.name} belongs to another file (sha256 {str(recorded)[:12]}…, {path.name} is {sha256[:12]}…): "
            f"copy the sidecar exported with this model, or delete it"
        )
    if sidecar_card != card:
        raise ModelError(f"{sidecar.name} holds another card than the one inside {path.name}: re-export, or delete the sidecar")


def card_from_session(session: Any, path: Path) -> ModelCard:
    """The card stored in the model's metadata, or a ModelError saying how to get one."""
    return card_from_text(session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY), path)


def card_from_text(text: str | None, path: Path) -> ModelCard:
    """The card of ONNX metadata ``edgedx.card`` as any backend reads it; missing or newer schema: what to do."""
    if text is None:
        raise ModelError(
            f"{path} has no EdgeDx model card (ONNX metadata '{ONNX_METADATA_KEY}'); "
            "export it from an EdgeDx checkpoint with: edgedx export CHECKPOINT --out DIR"
        )
    try:
        return ModelCard.from_json(text)
    except CardError as exc:
        raise CardError(f"{path}: {exc}") from None


def check_input_matches_card(shape: list[Any], card: ModelCard, path: Path) -> None:
    """The graph's input must be (batch, 3, H, W) — or (batch, H, W, 3) for uint8_nhwc — per the card."""
    h, w = card.input_size
    expected = [h, w, 3] if card.input_format == "uint8_nhwc" else [3, h, w]
    if len(shape) != 4 or any(isinstance(a, int) and a != e for a, e in zip(shape[1:], expected)):
        raise ModelError(
            f"{path}: the graph's input shape {shape} does not match its card "
            f"({card.input_format}, input_size {list(card.input_size)}); re-export the model with edgedx export"
        )
