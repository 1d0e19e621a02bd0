"""``torch_to_onnx``: a PyTorch classifier to an ONNX graph with a dynamic batch axis.

Uses torch's current (dynamo) exporter at opset 18, as one self-contained file
(no external data). The exporter's own console chatter is captured into the log:
the library never prints. :func:`check_graph` runs the ONNX checker and strict
shape inference on every graph EdgeDx writes; :func:`simplify` is the optional
onnxslim pass (constant folding, redundant-node removal).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import onnx
import torch
from torch import nn

from edgedx.card import ModelCard
from edgedx.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


def torch_to_onnx(
    model: nn.Module, card: ModelCard, *, opset: int = DEFAULT_OPSET, max_batch: int = 4096, fixed_batch: int | None = None
) -> onnx.ModelProto:
    """Export ``model`` (eval mode) for (batch, 3, H, W) float32 input per the card.

    ``fixed_batch`` N gives every tensor a static shape (NNAPI and CoreML take
    the whole graph only then); the runtime feeds such a graph N crops at a time.
    """
    if opset < 18:
        raise ModelError(f"opset {opset} is too old for torch's exporter; use 18 or newer")
    model = model.eval()
    example = torch.zeros(fixed_batch or 2, 3, *card.input_size, dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    dynamic = None if fixed_batch else ({0: batch},)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=dynamic,
                external_data=False,
                optimize=True,
            )
    except Exception as exc:  # the exporter raises many internal types
        log.debug("exporter output:\n%s", chatter.getvalue())
        raise ModelError(f"torch could not export {card.arch} to ONNX: {str(exc).splitlines()[0][:300]}") from None
    log.debug("exporter output:\n%s", chatter.getvalue())
    return with_lowest_ir_version(program.model_proto)


def lowest_ir_version(model: onnx.ModelProto) -> int:
    """The lowest ONNX IR version that allows the graph's ``ai.onnx`` opset (opset 18: IR 8).

    Why: torch writes the newest IR its onnx package knows (10 today), and ONNX
    Runtime older than 1.18, still common in deployed apps, refuses IR 10 files
    outright although nothing in the graph needs it.
    """
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=DEFAULT_OPSET)
    allowed = [ir for _, ir, ai_onnx, *_ in onnx.helper.VERSION_TABLE if ai_onnx >= opset]
    return min(allowed) if allowed else model.ir_version


def with_lowest_ir_version(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` stamped with :func:`lowest_ir_version` (never raised above what it had)."""
    model.ir_version = min(model.ir_version, lowest_ir_version(model))
    return model


def embed_metadata(model: onnx.ModelProto, entries: dict[str, str]) -> onnx.ModelProto:
    """Set ``metadata_props`` keys (replacing existing ones); ONNX Runtime reads them as custom metadata."""
    keep = [p for p in model.metadata_props if p.key not in entries]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    return model


def check_graph(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX checker (full) and strict shape inference; a broken graph never reaches disk."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        onnx.checker.check_model(inferred, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ModelError(f"the exported graph is not valid ONNX: {str(exc).splitlines()[0][:300]}") from None
    return inferred


def simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    """Graph simplification with onnxslim; the metadata (card) is kept."""
    try:
        import onnxslim
    except ImportError:
        from edgedx.errors import MissingDependencyError

        raise MissingDependencyError("onnxslim", "simplify", "Simplifying the ONNX graph") from None
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = onnxslim.slim(model)
    log.debug("onnxslim output:\n%s", chatter.getvalue())
    if slim is None:
        raise ModelError("onnxslim could not simplify the graph; export without --simplify")
    embed_metadata(slim, {p.key: p.value for p in model.metadata_props})
    return slim
