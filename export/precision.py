"""fp16 and int8 variants of a verified float32 ONNX graph.

fp16 halves the file and suits GPUs with tensor cores; int8 (static, QDQ,
per-channel weights, in a flavour per target engine: :mod:`edgedx.export.int8`)
quarters it and is what CPUs with VNNI/AMX, TensorRT and mobile NPUs want.
TensorRT 11 is strongly typed, so the precision it builds is the precision of
the ONNX it is given: these graphs are what an fp16 or int8 engine is built from.
Both keep float32 inputs and outputs (uint8 with embedded preprocessing) so
the runtime feeds every variant the same way; embedded preprocessing stays in
float32.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator

import onnx

from edgedx.errors import InputError, ModelError
from edgedx.export.preprocess_graph import preprocessing_node_names

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")


def parse_precisions(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"fp32,fp16"`` → ("fp32", "fp16"); fp32 always comes first (it is the reference the others derive from)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    wanted = [p.strip().lower() for p in items if p.strip()]
    bad = [p for p in wanted if p not in PRECISIONS]
    if bad:
        raise InputError(f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)} (comma-separated)")
    return tuple(p for p in PRECISIONS if p in wanted or p == "fp32")


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights and activations in float16, inputs and outputs unchanged."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet():
        half = convert_float_to_float16(
            model, keep_io_types=True, node_block_list=preprocessing_node_names(model), disable_shape_infer=False
        )
    _topological_sort(half.graph)  # the converter appends its input casts at the end
    onnx.checker.check_model(half)
    return half


def _topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder nodes so each comes after the producers of its inputs (stable otherwise)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        rest = []
        for node in pending:
            # inputs produced outside this graph level (outer scope) are never produced here
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ModelError(f"the fp16 graph has a cycle or a missing input at node {rest[0].name!r}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The converters print and warn; the library logs instead."""
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
    if chatter.getvalue().strip():
        log.debug("converter output:\n%s", chatter.getvalue())
