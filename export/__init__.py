"""Checkpoint to ONNX (fp32/fp16/int8), ORT and TensorRT with batch norm folded, parity-verified, card embedded."""

from edgedx.deps import require

require(("torch", "timm", "onnx", "onnxscript"), extra="export", purpose="Exporting a model")
# Every artefact is verified by running it; the engine (CPU or GPU build) is the user's choice.
require(("onnxruntime",), extra="cpu", purpose="Verifying an exported model")
