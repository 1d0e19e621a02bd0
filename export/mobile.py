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


def onnx_to_ort(onnx_path: str | Path, ort_path: str | Path | None = None, *, fixed_batch: int | None = None) -> Path:
    """Write ``<model>.ort`` beside the ONNX (or at ``ort_path``) and return its path.

    ``fixed_batch`` converts a copy whose batch dimension is fixed (phones' NNAPI
    and CoreML take the whole graph only then).
    """
    import tempfile

    onnx_path = Path(onnx_path)
    target = Path(ort_path) if ort_path else onnx_path.with_suffix(".ort")
    if fixed_batch is None:
        return _convert(onnx_path, target)
    with tempfile.TemporaryDirectory(prefix="edgedx-ort-") as tmp:
        return _convert(fixed_batch_copy(onnx_path, Path(tmp) / onnx_path.name, fixed_batch), target)


def _convert(onnx_path: Path, target: Path) -> Path:
    ort = import_onnxruntime()
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


def fixed_batch_copy(onnx_path: Path, target: Path, batch: int) -> Path:
    """A copy of the graph whose batch dimension is ``batch`` everywhere (inputs, inferred shapes, outputs).

    Why: NNAPI and CoreML take no node with a dynamic dimension; with the batch
    fixed they take the whole graph (see :func:`mobile_usability`).
    """
    import onnx
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes, make_input_shape_fixed

    model = onnx.load(str(onnx_path))
    for graph_input in model.graph.input:
        dims = graph_input.type.tensor_type.shape.dim
        shape = [batch if i == 0 else d.dim_value for i, d in enumerate(dims)]
        make_input_shape_fixed(model.graph, graph_input.name, shape)
    fix_output_shapes(model)
    onnx.save(model, str(target))
    return target


def mobile_usability(onnx_path: Path) -> dict[str, dict[str, int]]:
    """How many nodes NNAPI and CoreML (MLProgram) would take, as ONNX Runtime's mobile usability checker counts them.

    The graph is first optimised at the basic level, as the ORT conversion does,
    so the counts describe the ``.ort`` file that ships.
    """
    import tempfile

    from onnxruntime.tools.mobile_helpers import usability_checker as checker

    with tempfile.TemporaryDirectory(prefix="edgedx-mobile-") as tmp:
        optimised = Path(tmp) / onnx_path.name
        checker.optimize_model(Path(onnx_path), optimised)
        model = checker.ModelProtoWithShapeInfo(optimised).model_with_shape_info
        found = {
            "nnapi": checker.check_nnapi_partitions(model, True),
            "coreml": checker.check_coreml_partitions(model, True, "coreml_supported_mlprogram_ops.md"),
        }
    return {
        name: {"nodes": info.num_nodes, "supported_nodes": info.num_supported_nodes, "partitions": info.num_partitions}
        for name, info in found.items()
    }
