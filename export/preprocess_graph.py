"""Preprocessing inside the graph: the model takes uint8 NHWC RGB crops.

A phone or scanner application then needs no preprocessing code: it hands the
graph the crop's pixels and the graph casts, reorders colours (for a BGR model),
scales, normalises (ImageNet mean/std or per-image standardisation, per the card)
and transposes to NCHW. The same numbers as :func:`edgedx.runtime.preprocess.preprocess_batch`;
the card's ``input_format`` becomes ``uint8_nhwc`` so the runtime knows to skip
its own preprocessing. Node names start with :data:`NODE_PREFIX` so precision
passes can keep these few nodes in float32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgedx.card import ModelCard
from edgedx.errors import ModelError

NODE_PREFIX = "edgedx_preprocess/"


def embed_preprocessing(model: onnx.ModelProto, card: ModelCard) -> tuple[onnx.ModelProto, ModelCard]:
    """Prepend preprocessing to a float32 NCHW graph; returns the new graph and card."""
    if card.input_format != "float32_nchw":
        raise ModelError(f"preprocessing is already inside this graph (input_format {card.input_format!r})")
    graph = model.graph
    if len(graph.input) != 1:
        raise ModelError(f"expected a graph with one input, found {len(graph.input)}")
    old = graph.input[0]
    batch_dim = old.type.tensor_type.shape.dim[0]
    height, width = card.input_size
    inner = _fresh_name(graph, "edgedx_preprocessed")
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old.name:
                node.input[i] = inner

    name = old.name
    nodes, inits = _preprocess_nodes(name, inner, card, height * width)
    del graph.input[:]
    new_input = helper.make_tensor_value_info(name, TensorProto.UINT8, [None, height, width, 3])
    new_input.type.tensor_type.shape.dim[0].CopyFrom(batch_dim)
    graph.input.append(new_input)
    graph.initializer.extend(inits)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    return model, card.replace(input_format="uint8_nhwc")


def _preprocess_nodes(src: str, dst: str, card: ModelCard, pixels: int) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    p = NODE_PREFIX
    norm = card.normalization
    inits = [numpy_helper.from_array(np.asarray([norm.pixel_scale], np.float32), p + "scale")]
    nodes = [helper.make_node("Cast", [src], [p + "float"], to=TensorProto.FLOAT, name=p + "cast")]
    x = p + "float"
    if card.colour_order == "BGR":
        inits.append(numpy_helper.from_array(np.asarray([2, 1, 0], np.int64), p + "bgr_index"))
        nodes.append(helper.make_node("Gather", [x, p + "bgr_index"], [p + "bgr"], axis=3, name=p + "to_bgr"))
        x = p + "bgr"
    nodes.append(helper.make_node("Mul", [x, p + "scale"], [p + "scaled"], name=p + "scale"))
    x = p + "scaled"
    if norm.kind == "per_image":
        # per image and channel over H, W (axes 1, 2 of NHWC), std floored at 1/sqrt(pixels)
        inits += [
            numpy_helper.from_array(np.asarray([1, 2], np.int64), p + "hw_axes"),
            numpy_helper.from_array(np.asarray([1.0 / np.sqrt(pixels)], np.float32), p + "std_floor"),
        ]
        nodes += [
            helper.make_node("ReduceMean", [x, p + "hw_axes"], [p + "mean"], keepdims=1, name=p + "mean"),
            helper.make_node("Sub", [x, p + "mean"], [p + "centred"], name=p + "centre"),
            helper.make_node("Mul", [p + "centred", p + "centred"], [p + "sq"], name=p + "square"),
            helper.make_node("ReduceMean", [p + "sq", p + "hw_axes"], [p + "var"], keepdims=1, name=p + "var"),
            helper.make_node("Sqrt", [p + "var"], [p + "std"], name=p + "std"),
            helper.make_node("Max", [p + "std", p + "std_floor"], [p + "std_floored"], name=p + "floor"),
            helper.make_node("Div", [p + "centred", p + "std_floored"], [p + "normalised"], name=p + "normalise"),
        ]
    else:
        inits += [
            numpy_helper.from_array(np.asarray(norm.mean, np.float32), p + "mean"),
            numpy_helper.from_array(np.asarray(norm.std, np.float32), p + "std"),
        ]
        nodes += [
            helper.make_node("Sub", [x, p + "mean"], [p + "centred"], name=p + "centre"),
            helper.make_node("Div", [p + "centred", p + "std"], [p + "normalised"], name=p + "normalise"),
        ]
    nodes.append(helper.make_node("Transpose", [p + "normalised"], [dst], perm=[0, 3, 1, 2], name=p + "to_nchw"))
    return nodes, inits


def preprocessing_node_names(model: onnx.ModelProto) -> list[str]:
    """The embedded preprocessing nodes (kept in float32 by the fp16 and int8 passes)."""
    return [n.name for n in model.graph.node if n.name.startswith(NODE_PREFIX)]


def _fresh_name(graph: onnx.GraphProto, base: str) -> str:
    used = {v for n in graph.node for v in (*n.input, *n.output)} | {i.name for i in graph.initializer}
    name, k = base, 0
    while name in used:
        k += 1
        name = f"{base}_{k}"
    return name
