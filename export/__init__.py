"""Checkpoint to ONNX with batch norm folded, parity-verified, card embedded."""

from edgedx.deps import require

require(("torch", "timm", "onnx", "onnxscript"), extra="export", purpose="Exporting a model")
