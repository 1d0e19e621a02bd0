"""OpenVINO as the inference engine: Intel (and other x86/ARM) CPUs, Intel iGPUs and NPUs, from EdgeDx's ONNX files.

Devices (``--device``): ``openvino`` is OpenVINO's CPU plugin; ``openvino:GPU``,
``openvino:NPU`` (or any name in ``ov.Core().available_devices``, e.g.
``openvino:GPU.1``) pick another; ``openvino-bf16[:DEVICE]`` asks for bf16
inference. A device that is not present is refused with the list OpenVINO sees.

The card: OpenVINO's ONNX frontend copies the file's ``metadata_props`` into
the model's runtime info under ``framework``, so the card, the artefact's
precision and its self-test vectors are read with
``model.get_rt_info(["framework", "edgedx.card"])``: no onnx, no onnxruntime.

Precision, never changed silently: left alone, OpenVINO picks the inference
precision itself (bf16 on CPUs with AMX or AVX512_BF16, f16 on GPUs). We
compile with ``INFERENCE_PRECISION_HINT`` f32, or bf16 for ``openvino-bf16``
(refused up front on a device without the BF16 capability), read the precision
back from the compiled model, and report it in ``precision`` combined with the
artefact's own (``fp32``, ``fp16``, ``int8``, ``bf16``, ``int8+bf16``…). A
precision below the artefact's (bf16, or the f16 an NPU computes in) runs only
after the artefact's self-test vectors pass here within the fp16 tolerances
(or the artefact's own, when looser); without vectors it is refused.
"""

from __future__ import annotations

import logging
import queue
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.card import ONNX_METADATA_KEY, ModelCard
from edgedx.errors import MissingDependencyError, ModelError
from edgedx.runtime.backends.onnx_backend import card_from_text, check_card_sidecar, check_input_matches_card
from edgedx.runtime.backends.session import run_in_fixed_batches
from edgedx.runtime.selftest import SELFTEST_TOLERANCES
from edgedx.runtime.io.integrity import verify_model_file

log = logging.getLogger(__name__)

DEVICE_NAMES = ("openvino", "openvino-bf16")  # each optionally followed by :DEVICE (CPU, GPU, GPU.1, NPU…)
INFERENCE_PRECISIONS = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}  # OpenVINO element type -> EdgeDx name
NPU_BATCH = 1  # NPUs compile static shapes only: a dynamic batch is fixed to this, and runs are chunked
# The fp16 self-test gates (export's parity gates for fp16 are the same numbers): bf16 and NPU fp16 must meet them.
FP16_MAX_PROB_DELTA = SELFTEST_TOLERANCES["fp16"].max_prob_delta
FP16_MIN_AGREEMENT = SELFTEST_TOLERANCES["fp16"].min_agreement


def import_openvino() -> Any:
    """openvino, or a clear error naming the extra to install."""
    try:
        import openvino
    except ImportError:
        raise MissingDependencyError("openvino", "openvino", "Running a model with --device openvino") from None
    return openvino


def is_openvino_device(device: str) -> bool:
    return device.lower().startswith("openvino")


def parse_device(device: str) -> tuple[str, bool]:
    """``openvino[-bf16][:DEVICE]`` → (OpenVINO device name, bf16 asked for)."""
    name, colon, target = device.partition(":")
    if name.lower() not in DEVICE_NAMES or (colon and not target.strip()):
        raise ModelError(
            f"unknown OpenVINO device {device!r}; write openvino (CPU), openvino:GPU, openvino:NPU, "
            "or openvino-bf16[:DEVICE] for bf16 inference"
        )
    return (target.strip().upper() or "CPU"), name.lower() == "openvino-bf16"


def check_device(core: Any, target: str, device: str, bf16: bool) -> None:
    """The device must be present, and have the BF16 capability when bf16 is asked for."""
    available = list(core.available_devices)
    if not any(d.upper() == target or d.upper().split(".")[0] == target for d in available):
        raise ModelError(
            f"OpenVINO device {target!r} (--device {device}) is not present on this machine; OpenVINO sees: "
            f"{', '.join(available) or 'no devices'}: use --device openvino:{available[0] if available else 'CPU'}"
        )
    if bf16:
        capabilities = list(core.get_property(target, "OPTIMIZATION_CAPABILITIES"))
        if "BF16" not in capabilities:
            plain = "openvino" if target == "CPU" else f"openvino:{target}"
            raise ModelError(
                f"--device {device} asks for bf16, but OpenVINO {target} here lacks the BF16 capability "
                f"(OPTIMIZATION_CAPABILITIES: {', '.join(capabilities)}; bf16 needs AMX or AVX512_BF16, e.g. an Intel "
                f"Xeon of the 4th generation or later): use --device {plain} for fp32"
            )


def compile_config(core: Any, target: str, bf16: bool, threads: int | None) -> dict[str, Any]:
    """Inference precision pinned (f32, or bf16 when asked), no dynamic activation quantisation, threads if given."""
    supported = core.get_property(target, "SUPPORTED_PROPERTIES")
    config: dict[str, Any] = {}
    if "INFERENCE_PRECISION_HINT" in supported:
        config["INFERENCE_PRECISION_HINT"] = "bf16" if bf16 else "f32"
    elif bf16:
        raise ModelError(f"OpenVINO {target} does not take an inference precision, so bf16 cannot be asked for: use --device openvino:{target}")
    if "DYNAMIC_QUANTIZATION_GROUP_SIZE" in supported:
        config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0  # would quantise activations to int8 on its own
    if threads and "INFERENCE_NUM_THREADS" in supported:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return config


def inference_precision(compiled: Any, target: str) -> str:
    """The precision the compiled model computes in, read back (an NPU that does not say computes in fp16)."""
    try:
        value = compiled.get_property("INFERENCE_PRECISION_HINT")
    except RuntimeError:
        return "fp16" if target.startswith("NPU") else "fp32"
    name = value.to_string() if hasattr(value, "to_string") else str(value)
    return INFERENCE_PRECISIONS.get(name, name)


def combined_precision(artefact: str, inference: str) -> str:
    """What runs: the artefact's precision at fp32 inference, else the lower one (``int8+bf16`` when both matter)."""
    if inference == "fp32" or inference == artefact:
        return artefact
    return inference if artefact == "fp32" else f"{artefact}+{inference}"


def metadata(model: Any, key: str) -> str | None:
    """One ONNX ``metadata_props`` entry, as OpenVINO's ONNX frontend keeps it in the model's runtime info."""
    path = ["framework", key]
    return model.get_rt_info(path).astype(str) if model.has_rt_info(path) else None


def card_from_model(model: Any, path: Path) -> ModelCard:
    return card_from_text(metadata(model, ONNX_METADATA_KEY), path)


class OpenVinoSession:
    """One OpenVINO compiled model plus the card embedded in the ONNX file (a :class:`~edgedx.runtime.backends.session.Session`)."""

    def __init__(self, path: str | Path, *, device: str = "openvino", threads: int | None = None) -> None:
        ov = import_openvino()
        target, bf16 = parse_device(device)
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"model file not found: {self.path}")
        if self.path.suffix.lower() != ".onnx":
            raise ModelError(
                f"{self.path.name}: --device {device} runs .onnx files (OpenVINO reads neither ONNX Runtime's .ort nor "
                "TensorRT engines): use the model.onnx from the same export"
            )
        self.sha256 = verify_model_file(self.path)
        core = ov.Core()
        check_device(core, target, device, bf16)
        try:
            model = core.read_model(str(self.path))
        except Exception as exc:  # OpenVINO raises untyped errors for bad files
            raise ModelError(
                f"{self.path}: not a loadable ONNX model for OpenVINO ({str(exc).splitlines()[0][:200]}); the file may be "
                "truncated: copy it again from the export folder or re-export it with edgedx export"
            ) from None
        self.card = card_from_model(model, self.path)
        check_card_sidecar(self.path, self.sha256, self.card)
        self.selftest = metadata(model, "edgedx.selftest")
        artefact = metadata(model, "edgedx.precision") or "fp32"  # exports before precisions were recorded: fp32
        self.fixed_batch = self._prepare_inputs(model, target)
        self._compiled = self._compile(core, model, target, bf16, threads, device)
        self._n_out = self._compiled.outputs[0].get_partial_shape()[-1].get_length()
        self._input_dtype = self._compiled.inputs[0].get_element_type().to_dtype()
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.device = device
        executing = tuple(str(d) for d in self._compiled.get_property("EXECUTION_DEVICES"))
        self.providers = tuple(f"OpenVINO {d}" for d in executing) or (f"OpenVINO {target}",)
        self.pads_batches = not target.startswith("CPU")  # GPUs and NPUs compile per input shape
        inference = inference_precision(self._compiled, target)
        if bf16 and inference != "bf16":
            raise ModelError(f"--device {device} asked for bf16 but OpenVINO {target} compiled the model in {inference}; use --device openvino")
        self.precision = combined_precision(artefact, inference)
        self.verification = None
        if inference not in ("fp32", artefact):
            self.verification = check_reduced_precision(self, inference)
        log.info("loaded %s on %s (%s)", self.path, ", ".join(self.providers), self.precision)

    def _prepare_inputs(self, model: Any, target: str) -> int | None:
        """Check the one input against the card; the fixed batch to feed (static graphs, NPUs), None when dynamic."""
        if len(model.inputs) != 1:
            raise ModelError(f"{self.path}: expected one input, the model has {len(model.inputs)}")
        shape = model.inputs[0].get_partial_shape()
        dims: list[Any] = [d.get_length() if d.is_static else "?" for d in shape]
        check_input_matches_card(dims, self.card, self.path)
        if dims and isinstance(dims[0], int) and dims[0] > 0:
            return dims[0]  # --fixed-batch / mobile exports
        if target.startswith("NPU"):
            model.reshape({model.inputs[0]: [NPU_BATCH, *dims[1:]]})
            return NPU_BATCH
        return None

    def _compile(self, core: Any, model: Any, target: str, bf16: bool, threads: int | None, device: str) -> Any:
        try:
            return core.compile_model(model, target, compile_config(core, target, bf16, threads))
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(
                f"{self.path}: OpenVINO could not compile it for {target} ({str(exc).splitlines()[0][:200]}); "
                f"try --device openvino (CPU), or run it on ONNX Runtime with --device cpu"
            ) from None

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw model outputs (logits, float32) for a preprocessed batch of any size (fixed-batch graphs in chunks)."""
        if self._compiled is None:
            raise ModelError(f"{self.path}: the OpenVINO session was closed; load the model again")
        if len(x) == 0:
            return np.zeros((0, self._n_out), np.float32)
        n = self.fixed_batch
        if n is None or len(x) == n:
            return self._infer(x)
        return run_in_fixed_batches(self._infer, x, n)

    def _infer(self, x: np.ndarray) -> np.ndarray:
        """One inference on a request of our own: thread-safe, as ONNX Runtime's ``run`` is."""
        try:
            request = self._requests.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            # share_inputs: the (contiguous) batch is read in place, not copied; the outputs are copied out
            return np.asarray(request.infer({0: np.ascontiguousarray(x, self._input_dtype)}, share_inputs=True)[0], dtype=np.float32)
        finally:
            self._requests.put(request)

    def close(self) -> None:
        """Release the compiled model and its requests; safe to call twice."""
        self._compiled = None
        self._requests = queue.SimpleQueue()

    def __enter__(self) -> OpenVinoSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_reduced_precision(session: OpenVinoSession, inference: str) -> Any:
    """Replay the artefact's self-test vectors at the reduced precision; refuse it when they do not pass."""
    from edgedx.runtime.selftest import SelfTestVectors, Tolerances, run_selftest

    if not session.selftest:
        raise ModelError(
            f"{session.path} would run in {inference} on {session.providers[0]}, and it carries no self-test vectors to "
            f"prove that rounding here: re-export it with edgedx export, or use --device openvino (fp32 on the CPU)"
        )
    vectors = SelfTestVectors.from_text(session.selftest, str(session.path))
    own = vectors.tolerances
    tolerances = Tolerances(max(own.max_prob_delta, FP16_MAX_PROB_DELTA), min(own.min_agreement, FP16_MIN_AGREEMENT))
    report = run_selftest(session, replace(vectors, tolerances=tolerances))
    if not report.passed:
        raise ModelError(
            f"{session.path} does not reproduce its export in {inference} on {session.providers[0]}: {report.summary()}; "
            "use --device openvino (fp32 on the CPU)"
        )
    log.info("%s in %s: %s", session.path.name, inference, report.summary())
    return report
