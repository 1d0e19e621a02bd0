"""Checkpoint to ONNX with batch norm folded, parity-verified, card embedded."""
