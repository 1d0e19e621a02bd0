"""int8 flavours for the engine each target runs, quantised under accuracy control.

Why flavours: one int8 file cannot be fast everywhere. Measured side by side
(tf_efficientnet_lite0, real malaria cells, ONNX Runtime on 2 cores):

- an AMD EPYC without VNNI, batch 16: symmetric int8 activations 0.67× fp32,
  uint8 asymmetric activations 1.75× fp32 (ONNX Runtime's x86 kernels are
  u8×s8; signed activations take a slow path);
- an Intel Xeon with VNNI/AMX (reported in issue 19), ONNX Runtime's static quantiser: 0.52× vs 2.01×.

TensorRT, however, takes only symmetric int8. And on x86 CPUs without VNNI the
u8×s8 kernels add pairs of products in saturating 16-bit arithmetic, so 8-bit
weights overflow; 7-bit weights do not (``reduce_range``). Whether a CPU
saturates is decided on the target by the self-test (the vectors of an int8
file carry the probabilities of its *exact* int8 arithmetic), not here: export
writes both CPU flavours and the target keeps the one that proves itself.

Why accuracy control: a few layers (often the stem and depthwise convolutions)
cause most of the damage. :func:`controlled_int8` ranks the layers by how much
signal-to-noise each one loses when quantised (ONNX Runtime's
``qdq_loss_debug``, on the exact int8 arithmetic) and keeps the most harmful in
float, doubling their number until top-1 and decision agreement with the float
model on held-out training crops reach the target. Which layers stayed float
is reported; when half the layers in float are not enough, the answer is
quantisation-aware fine-tuning (``--qat-epochs``), and export says so.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edgedx.card import ModelCard
from edgedx.errors import InputError, ModelError
from edgedx.export.precision import quiet
from edgedx.export.preprocess_graph import preprocessing_node_names
from edgedx.runtime.model import decide
from edgedx.runtime.preprocess import model_input, to_probabilities

log = logging.getLogger(__name__)

# the nodes worth keeping in float: those whose int8 kernels do arithmetic (an activation or reshape between them
# only passes quantised values on)
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool"})
FLAVOUR_KEY = "edgedx.int8_flavour"  # ONNX metadata: which flavour a file is, and where it is meant to run


@dataclass(frozen=True)
class Int8Flavour:
    """How one int8 file is quantised, and the engines it is meant for."""

    name: str
    file_tag: str  # <stem>.<file_tag>.onnx
    activations: str  # "uint8-asymmetric" | "int8-symmetric"
    weight_bits: int  # 8, or 7 where the target's kernels would saturate
    meant_for: str

    def about(self) -> str:
        """One sentence for sidecars, reports and refusals."""
        return (
            f"int8 flavour {self.name!r} ({self.activations} activations, int8 per-channel {self.weight_bits}-bit weights), "
            f"meant for {self.meant_for}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "about": self.about()}


INT8_FLAVOURS = {
    "cpu": Int8Flavour(
        "cpu", "int8", "uint8-asymmetric", 8,
        "CPUs with int8 dot-product instructions (x86 with AVX512-VNNI, AVX-VNNI or AMX; Arm with SDOT/UDOT) on "
        "ONNX Runtime, OpenVINO or ONNX Runtime Mobile; on an x86 CPU without VNNI use the 'cpu-avx2' flavour",
    ),
    "cpu-avx2": Int8Flavour(
        "cpu-avx2", "int8-avx2", "uint8-asymmetric", 7,
        "x86 CPUs without VNNI (AVX2 only), whose int8 kernels saturate 8-bit weights; on CPUs with VNNI the 'cpu' "
        "flavour is as fast and closer to fp32",
    ),
    "tensorrt": Int8Flavour(
        "tensorrt", "int8-trt", "int8-symmetric", 8,
        "TensorRT on NVIDIA GPUs (symmetric int8, as TensorRT requires); slow and saturating on CPUs",
    ),
}
DEFAULT_FLAVOURS = ("cpu", "cpu-avx2")


def parse_flavours(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"cpu,tensorrt"`` → ("cpu", "tensorrt"), in a fixed order; unknown names are refused with the choices."""
    items = text.split(",") if isinstance(text, str) else list(text)
    wanted = [f.strip().lower() for f in items if f.strip()]
    bad = [f for f in wanted if f not in INT8_FLAVOURS]
    if bad or not wanted:
        raise InputError(f"unknown int8 flavour {bad[0] if bad else text!r}; choose from {', '.join(INT8_FLAVOURS)} (comma-separated)")
    return tuple(f for f in INT8_FLAVOURS if f in wanted)


@dataclass
class Int8Result:
    """What :func:`controlled_int8` wrote and how it got there."""

    path: Path
    flavour: Int8Flavour
    target: float  # the top-1 and decision agreement asked for
    top1_agreement: float  # with the float model, exact int8 arithmetic, on the search crops
    decision_agreement: float
    reached: bool
    kept_float: list[str] = field(default_factory=list)  # node names left in float, most harmful first
    n_quantisable: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)  # each try: layers in float and its agreement
    n_search_crops: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "flavour": self.flavour.to_dict(), "target_agreement": self.target, "top1_agreement": self.top1_agreement,
            "decision_agreement": self.decision_agreement, "reached": self.reached, "kept_float": self.kept_float,
            "n_quantisable": self.n_quantisable, "steps": self.steps, "n_search_crops": self.n_search_crops,
            "measured_on": "exact int8 arithmetic (ONNX Runtime, graph optimisations off) against the fp32 graph, "
            "on training crops that did not set the ranges",
        }


def quantise(
    prepared: Path, out: Path, card: ModelCard, calibration: np.ndarray, flavour: Int8Flavour, exclude: Sequence[str] = (),
    *, batch_size: int = 16,
) -> Path:
    """Static QDQ int8 of ``prepared`` in ``flavour``, calibrated on real crops through the runtime's preprocessing.

    Preprocessing nodes embedded in the graph and ``exclude`` stay in float.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if len(calibration) == 0:
        raise InputError("int8 needs calibration images; give a folder with --calibration DIR")
    source = onnx.load(str(prepared))
    symmetric = flavour.activations == "int8-symmetric"
    try:
        with quiet():
            quantize_static(
                str(prepared), str(out), _Batches(source.graph.input[0].name, calibration, card, batch_size),
                quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8, weight_type=QuantType.QInt8,
                reduce_range=flavour.weight_bits == 7,
                nodes_to_exclude=[*preprocessing_node_names(source), *exclude],
                extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
            )
    except Exception as exc:  # ONNX Runtime's quantiser raises untyped errors
        raise ModelError(f"int8 quantisation failed: {str(exc).splitlines()[0][:300]}") from None
    quantised = onnx.load(str(out))
    _drop_tool_metadata(quantised)
    onnx.save(quantised, str(out))
    return out


def prepare_for_quantisation(model_path: Path, folder: Path) -> Path:
    """ONNX Runtime's pre-processing (shape inference, fusions) into ``folder``; best effort, as the quantiser is."""
    from onnxruntime.quantization import quant_pre_process

    prepared = folder / "prepared.onnx"
    try:
        with quiet():
            quant_pre_process(str(model_path), str(prepared), skip_symbolic_shape=True)
        return prepared
    except Exception as exc:  # the pre-processor is best effort; quantisation works without it
        log.info("quantisation pre-processing skipped: %s", exc)
        return model_path


class _Batches:
    """A CalibrationDataReader over crops: ONNX Runtime pulls one preprocessed batch at a time."""

    def __init__(self, input_name: str, crops: np.ndarray, card: ModelCard, batch_size: int) -> None:
        self.batches: Iterator[dict[str, np.ndarray]] = (
            {input_name: model_input(crops[i : i + batch_size], card)} for i in range(0, len(crops), batch_size)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.batches, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:  # qdq_loss_debug iterates where the quantiser calls get_next
        return self.batches


def exact_session(path: Path) -> Any:
    """An ONNX Runtime session with graph optimisations off: QDQ nodes run as written, in float arithmetic.

    Why: that is the int8 arithmetic the file means, computed without any
    kernel's shortcuts (no saturation, no fused requantisation), so it is the
    same on every CPU: the reference an int8 target's kernels must reproduce.
    """
    from edgedx.runtime.backends.onnx_backend import import_onnxruntime

    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def exact_probabilities(path: Path, card: ModelCard, crops: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """(n, C) probabilities of ``path`` on uint8 crops through the card's preprocessing, exact arithmetic."""
    session = exact_session(path)
    name = session.get_inputs()[0].name
    parts = [
        to_probabilities(session.run(None, {name: model_input(crops[i : i + batch_size], card)})[0], card)
        for i in range(0, len(crops), batch_size)
    ]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, card.n_classes), np.float32)


def agreement(reference: np.ndarray, got: np.ndarray, card: ModelCard) -> tuple[float, float]:
    """(top-1, decision) agreement of two (n, C) probability arrays; decisions at the card's threshold."""
    if not len(reference):
        return 1.0, 1.0
    top1 = float(np.mean(np.argmax(reference, axis=1) == np.argmax(got, axis=1)))
    decisions = float(np.mean([decide(a, card) == decide(b, card) for a, b in zip(reference, got)]))
    return top1, decisions


def _drop_tool_metadata(model: onnx.ModelProto) -> None:
    """The quantiser leaves its own bookkeeping keys; keep only ours."""
    keep = [p for p in model.metadata_props if not p.key.startswith("onnx.")]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)


def layer_harm(float_path: Path, qdq_path: Path, card: ModelCard, crops: np.ndarray) -> list[tuple[str, float]]:
    """(node name, dB of signal-to-noise lost across it) for each node of the float graph, most harmful first.

    The loss of a node is how much the quantised model's activation drifts from
    the float model's between the node's inputs and its output (``xmodel_err``
    of ``qdq_loss_debug``, as SQNR in dB), so a layer is blamed for the noise it
    adds, not for the noise it inherits.
    """
    from onnxruntime.quantization.qdq_loss_debug import (
        collect_activations, compute_activation_error, create_activation_matching, modify_model_output_intermediate_tensors,
    )

    from edgedx.runtime.backends.onnx_backend import import_onnxruntime

    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    graph = onnx.load(str(float_path))
    name = graph.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="edgedx-harm-") as tmp, quiet():
        activations = []
        for i, path in enumerate((qdq_path, float_path)):
            augmented = Path(tmp) / f"augmented{i}.onnx"
            modify_model_output_intermediate_tensors(str(path), str(augmented))
            activations.append(collect_activations(str(augmented), _Batches(name, crops, card, 16), options, ["CPUExecutionProvider"]))
    errors = compute_activation_error(create_activation_matching(*activations))
    sqnr = {t: min(float(e["xmodel_err"]), 100.0) for t, e in errors.items() if "xmodel_err" in e and not math.isnan(float(e["xmodel_err"]))}
    return _segment_losses(graph.graph, sqnr)


def _segment_losses(graph: onnx.GraphProto, sqnr: dict[str, float]) -> list[tuple[str, float]]:
    """Blame each measured tensor's SQNR loss on the nodes between it and its nearest measured ancestors.

    Why segments: the quantiser puts Q/DQ only where the int8 graph changes
    precision (after a Conv+Clip pair, not between them), so a Conv's own
    output is never measured; its segment (Conv, Clip) is what can stay float.
    """
    producer = {out: node for node in graph.node for out in node.output}
    losses: dict[str, float] = {}
    for tensor, after in sqnr.items():
        segment, ancestors, stack, seen = [], [], [tensor], set()
        while stack:
            node = producer.get(stack.pop())
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            segment.append(node.name)
            for name in node.input:
                (ancestors if name in sqnr else stack).append(name)
        before = min((sqnr[a] for a in ancestors), default=100.0)
        for name in segment:
            losses[name] = max(losses.get(name, 0.0), before - after)
    compute = {node.name for node in graph.node if node.op_type in COMPUTE_OPS}
    return sorted(((n, max(0.0, loss)) for n, loss in losses.items() if n in compute), key=lambda item: -item[1])


def controlled_int8(
    model_path: Path, out_path: Path, card: ModelCard, calibration: np.ndarray, search: np.ndarray, flavour: Int8Flavour,
    *, target: float = 0.99, max_float_share: float = 0.5, rank_crops: int = 32,
) -> Int8Result:
    """``model_path`` (fp32 ONNX) quantised in ``flavour`` at ``out_path``, keeping the fewest harmful layers in
    float that bring top-1 and decision agreement on ``search`` crops to ``target``.

    ``search`` must not be the crops that set the ranges, nor the images export
    verifies on: the agreement reported by export's parity is then a result,
    not a fit. Stops at ``max_float_share`` of the ranked layers in float and
    returns the best try with ``reached`` False.
    """
    with tempfile.TemporaryDirectory(prefix="edgedx-int8-") as tmp:
        prepared = prepare_for_quantisation(model_path, Path(tmp))
        reference = exact_probabilities(prepared, card, search)
        quantise(prepared, out_path, card, calibration, flavour)
        result = _try(out_path, card, search, reference, flavour, target, [], 0)
        if result.reached or not len(search):
            return result  # n_quantisable stays 0: no layer ranking was needed (or possible)
        ranked = [n for n, loss in layer_harm(prepared, out_path, card, search[:rank_crops]) if loss > 0]
        result.n_quantisable, best = len(ranked), result
        trial = Path(tmp) / "trial.onnx"
        cap = max(1, int(len(ranked) * max_float_share))
        for k in sorted({*(2**i for i in range(cap.bit_length()) if 2**i < cap), cap}):  # 1, 2, 4, … and the cap itself
            quantise(prepared, trial, card, calibration, flavour, ranked[:k])
            attempt = _try(trial, card, search, reference, flavour, target, ranked[:k], len(ranked))
            best.steps.append(attempt.steps[-1])
            if min(attempt.top1_agreement, attempt.decision_agreement) > min(best.top1_agreement, best.decision_agreement):
                trial.replace(out_path)
                best = Int8Result(out_path, flavour, target, attempt.top1_agreement, attempt.decision_agreement, attempt.reached,
                                  ranked[:k], len(ranked), best.steps, len(search))
            if attempt.reached:
                break
        return best


def _try(
    path: Path, card: ModelCard, search: np.ndarray, reference: np.ndarray, flavour: Int8Flavour, target: float,
    kept_float: list[str], n_quantisable: int,
) -> Int8Result:
    """Score one quantised file on the search crops (exact int8 arithmetic) and log the step."""
    top1, decisions = agreement(reference, exact_probabilities(path, card, search), card)
    reached = len(search) > 0 and min(top1, decisions) >= target  # no crops to search on: nothing was reached
    log.info(
        "int8 %s with %d layer(s) in float: top-1 agreement %.3f, decision agreement %.3f on %d crops (target %.3f)",
        flavour.name, len(kept_float), top1, decisions, len(search), target,
    )
    step = {"n_float": len(kept_float), "top1_agreement": top1, "decision_agreement": decisions}
    return Int8Result(path, flavour, target, top1, decisions, reached, list(kept_float), n_quantisable, [step], len(search))
