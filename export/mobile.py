"""``onnx_to_ort``: the ORT format for ONNX Runtime Mobile (smartphone microscopes).

ONNX Runtime Mobile loads ``.ort`` flatbuffers, not ``.onnx``. This is what
``python -m onnxruntime.tools.convert_onnx_models_to_ort`` does, for one model:
let a session apply the portable (basic) graph optimisations and save the
result in ORT format. The card rides along in the model metadata, and the
file is loaded back to prove it opens.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgedx.errors import ModelError
from edgedx.runtime.backends.onnx_backend import import_onnxruntime

log = logging.getLogger(__name__)


def onnx_to_ort(onnx_path: str | Path, ort_path: str | Path | None = None) -> Path:
    """Write ``<model>.ort`` beside the ONNX (or at ``ort_path``) and return its path."""
    ort = import_onnxruntime()
    onnx_path = Path(onnx_path)
    target = Path(ort_path) if ort_path else onnx_path.with_suffix(".ort")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # basic optimisations only: extended ones are hardware-specific and would not be portable to a phone
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(target)
    options.add_session_config_entry("session.save_model_format", "ORT")
    try:
        ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
        ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ModelError(f"could not convert {onnx_path} to ORT format: {str(exc).splitlines()[0][:300]}") from None
    log.info("wrote %s", target)
    return target
