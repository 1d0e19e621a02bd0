"""Remove every inference-mode ``BatchNormalization`` from an ONNX graph.

Deployments never run batch norm: :func:`fold_batchnorms` rewrites each
``BatchNormalization`` node of the main graph in one of two ways.

Folded into the preceding Conv
    When the BN input ``X`` is the output of a ``Conv`` node, that output has
    exactly one use (this BN), is not a graph output and is not referenced from
    any subgraph, and the Conv weight (and bias, if present) and the four BN
    parameters are all constant initializers::

        s  = scale / sqrt(var + epsilon)
        W' = W * s[:, None, ...]          # axis 0 of a Conv weight is always the
                                          # output channel, also for group convs
        b' = (b - mean) * s + B           # b = 0 when the Conv has no bias

    ``W'`` and ``b'`` are written as *new* initializers with fresh unique names
    (an initializer shared with other nodes is never changed), the Conv now
    writes the BN's output name and the BN node is dropped.

Converted to a per-channel affine
    Every other BN (pre-activation BN after a Concat or on a graph input, a
    Conv output with several uses, non-constant Conv weights) becomes
    ``Add(Mul(X, scale_c), shift_c)`` with ``scale_c = s`` and
    ``shift_c = B - mean * s``, both stored as initializers shaped
    ``(1, C, 1, ..., 1)`` (rank of ``X``). The rank of ``X`` is taken from ONNX
    shape inference / ``value_info`` / graph inputs, else from the weight of a
    producing Conv; when it is still unknown, ``(1, C, 1, 1)`` (a 4-D NCHW
    input) is assumed.
    When a BN parameter is not a constant initializer, the same affine is
    computed inside the graph (``Add``/``Sqrt``/``Div``/``Mul``/``Sub`` then
    ``Reshape`` to ``[1, -1, 1, ...]``), casting the parameters to the type of
    ``X`` when they differ.

Numerics: constants are computed in float64 and cast back to the parameter
dtype (float32, float16, ...). For the affine the dtype of ``X`` wins when it is
known and differs from the parameters (opset 15+ allows mixed BN types, and
``Mul`` does not); a folded Conv keeps the dtype of its weight.

Only initializers count as constants (not ``Constant`` nodes), and an
initializer that is also listed as a graph input is *not* constant (it is an
overridable default). BNs inside subgraphs (``If``/``Loop``/``Scan`` bodies)
are not rewritten; they are counted in :attr:`BatchNormReport.remaining`, so
``found == folded_into_conv + converted_to_affine + remaining`` always holds.
:func:`count_batchnorms` and :func:`assert_no_batchnorm` do look inside
subgraphs. A BN in training mode (``training_mode=1``), with more than one
(non-empty) output, with ``spatial=0`` (opset < 9) or with malformed
parameters raises :class:`edgedx.errors.ModelError` naming the node.

Initializers that the pass leaves unused (for instance the original Conv weight
and BN statistics) are removed; initializers that were already unused before,
or that are also graph inputs, are left alone.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgedx.errors import ModelError

__all__ = [
    "BatchNormReport",
    "assert_no_batchnorm",
    "count_batchnorms",
    "fold_batchnorms",
]

_BN = "BatchNormalization"
_DEFAULT_DOMAINS = ("", "ai.onnx")
_DEFAULT_EPSILON = 1e-5
_FALLBACK_RANK = 4


@dataclass(frozen=True)
class BatchNormReport:
    """What :func:`fold_batchnorms` did."""

    found: int  # BatchNormalization nodes in the graph before the pass (subgraphs included)
    folded_into_conv: int
    converted_to_affine: int
    remaining: int  # after the pass; must be 0 for a deployable graph

    def to_dict(self) -> dict[str, int]:
        return {key: int(value) for key, value in asdict(self).items()}


# --------------------------------------------------------------------------- #
# Graph walking helpers
# --------------------------------------------------------------------------- #


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _walk(graph: onnx.GraphProto, where: str = "") -> Iterator[tuple[str, int, onnx.NodeProto]]:
    """Every node of ``graph`` and its subgraphs, with a location prefix."""
    for index, node in enumerate(graph.node):
        yield where, index, node
        for sub in _subgraphs(node):
            label = node.name or f"#{index}"
            yield from _walk(sub, f"{where}{label}/{sub.name or 'body'}/")


def _is_bn(node: onnx.NodeProto) -> bool:
    return node.op_type == _BN


def _describe(node: onnx.NodeProto, index: int, where: str = "") -> str:
    if node.name:
        return f"'{where}{node.name}'"
    outputs = [o for o in node.output if o]
    out = f", output '{outputs[0]}'" if outputs else ""
    return f"'{where}#{index}' (unnamed{out})"


def _subgraph_references(graph: onnx.GraphProto) -> set[str]:
    """Names read by nodes inside subgraphs of ``graph`` (outer-scope uses, conservatively)."""
    names: set[str] = set()
    for node in graph.node:
        for sub in _subgraphs(node):
            for _, _, inner in _walk(sub):
                names.update(i for i in inner.input if i)
            names.update(o.name for o in sub.output)
    return names


def _all_names(graph: onnx.GraphProto) -> tuple[set[str], set[str]]:
    """(value names, node names) used anywhere in ``graph`` and its subgraphs."""
    values: set[str] = set()
    nodes: set[str] = set()

    def visit(g: onnx.GraphProto) -> None:
        values.update(v.name for v in g.input)
        values.update(v.name for v in g.output)
        values.update(v.name for v in g.value_info)
        values.update(t.name for t in g.initializer)
        values.update(t.values.name for t in g.sparse_initializer)
        for node in g.node:
            values.update(node.input)
            values.update(node.output)
            if node.name:
                nodes.add(node.name)
            for sub in _subgraphs(node):
                visit(sub)

    visit(graph)
    values.discard("")
    return values, nodes


class _Namer:
    def __init__(self, used: set[str]) -> None:
        self._used = used

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self._used:
            k += 1
            name = f"{base}_{k}"
        self._used.add(name)
        return name


def _type_info(model: onnx.ModelProto) -> dict[str, tuple[int, int | None]]:
    """name -> (elem_type, rank or None) from graph inputs/outputs/value_info and shape inference."""
    info: dict[str, tuple[int, int | None]] = {}

    def collect(values: Iterable[onnx.ValueInfoProto]) -> None:
        for vi in values:
            if not vi.type.HasField("tensor_type"):
                continue
            tt = vi.type.tensor_type
            rank = len(tt.shape.dim) if tt.HasField("shape") else None
            old = info.get(vi.name)
            elem = tt.elem_type or (old[0] if old else 0)
            if rank is None and old:
                rank = old[1]
            info[vi.name] = (elem, rank)

    graph = model.graph
    collect(graph.input)
    collect(graph.output)
    collect(graph.value_info)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # noqa: BLE001 - inference is best effort (custom ops, >2 GB, ...)
        inferred = None
    if inferred is not None:
        collect(inferred.graph.value_info)
        collect(inferred.graph.output)
    for init in graph.initializer:
        info.setdefault(init.name, (init.data_type, len(init.dims)))
    return info


def _attr(node: onnx.NodeProto, name: str, default):  # noqa: ANN001, ANN202
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _np_dtype(elem_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


# --------------------------------------------------------------------------- #
# Public API
# --------------------------------------------------------------------------- #


def count_batchnorms(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes in the main graph and any subgraph (If/Loop/Scan attributes)."""
    return sum(1 for _, _, node in _walk(model.graph) if _is_bn(node))


def assert_no_batchnorm(model: onnx.ModelProto) -> None:
    """Raise :class:`ModelError` naming the BatchNormalization nodes that remain (the export check)."""
    left = [_describe(node, i, where) for where, i, node in _walk(model.graph) if _is_bn(node)]
    if left:
        raise ModelError(
            f"the exported model still contains {len(left)} BatchNormalization node(s): "
            f"{', '.join(left)}; fold them with edgedx.export.bn_fold.fold_batchnorms "
            "before deploying"
        )


def fold_batchnorms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, BatchNormReport]:
    """Returns a new model (the input is not mutated — deep copy) and the report.

    Removes initializers left unused by the pass.
    """
    out = copy.deepcopy(model)
    found = count_batchnorms(out)
    graph = out.graph
    nodes = list(graph.node)

    bns = [(i, n) for i, n in enumerate(nodes) if _is_bn(n) and n.domain in _DEFAULT_DOMAINS]
    for index, node in bns:
        _validate(node, index)
    if not bns:
        return out, BatchNormReport(found, 0, 0, found)

    state = _FoldState(model, graph, nodes)
    folded = affine = 0
    result: list[onnx.NodeProto] = []
    for index, node in enumerate(nodes):
        if not (_is_bn(node) and node.domain in _DEFAULT_DOMAINS):
            result.append(node)
            continue
        replacement, into_conv = _rewrite_bn(state, node, index)
        result.extend(replacement)
        if into_conv:
            folded += 1
        else:
            affine += 1
        for name in node.input:
            if name:
                state.uses[name] -= 1

    _install(graph, result, state)
    remaining = count_batchnorms(out)
    return out, BatchNormReport(found, folded, affine, remaining)


# --------------------------------------------------------------------------- #
# Pass internals
# --------------------------------------------------------------------------- #


class _FoldState:
    """The main graph's bookkeeping while :func:`fold_batchnorms` rewrites it.

    Constants, uses, producers and fresh names are read and updated by every
    rewrite step, so they live in one object the steps share rather than in
    the locals of one long function.
    """

    def __init__(self, model: onnx.ModelProto, graph: onnx.GraphProto, nodes: list[onnx.NodeProto]) -> None:
        self.types = _type_info(model)
        value_names, node_names = _all_names(graph)
        self.fresh = _Namer(value_names)
        self.fresh_node = _Namer(node_names)
        self.inits: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.graph_inputs = {v.name for v in graph.input}
        self.graph_outputs = {v.name for v in graph.output}
        self.referenced_before = _referenced(graph)
        self.sub_refs = _subgraph_references(graph)
        self.uses: Counter[str] = Counter(name for n in nodes for name in n.input if name)
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in nodes for o in n.output if o}
        self.new_inits: list[onnx.TensorProto] = []
        self.dropped_value_info: set[str] = set()

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` when it is a constant initializer (not an overridable graph input)."""
        if name and name in self.inits and name not in self.graph_inputs:
            return numpy_helper.to_array(self.inits[name])
        return None

    def add_init(self, array: np.ndarray, base: str) -> str:
        """Store ``array`` as a new initializer under a fresh name (existing ones are never changed)."""
        name = self.fresh(base)
        tensor = numpy_helper.from_array(array, name)
        self.inits[name] = tensor
        self.new_inits.append(tensor)
        return name


def _rewrite_bn(state: _FoldState, node: onnx.NodeProto, index: int) -> tuple[list[onnx.NodeProto], bool]:
    """The nodes that replace one BN, and whether it was folded into its Conv (else: an affine).

    Folding emits no node: the Conv itself now writes the BN's output.
    """
    label = _describe(node, index)
    x, scale_n, bias_n, mean_n, var_n = list(node.input[:5])
    y = node.output[0]
    eps = float(_attr(node, "epsilon", _DEFAULT_EPSILON))
    params = [state.const(n) for n in (scale_n, bias_n, mean_n, var_n)]

    if not all(p is not None for p in params):
        elem, rank = _x_type(x, state.types, state.producer, state.const)
        replacement = _dynamic_affine_nodes(
            node, x, (scale_n, bias_n, mean_n, var_n), y, eps, elem, rank, state.types,
            state.fresh, state.fresh_node, state.add_init,
        )
        return replacement, False

    scale, bias, mean, var = params
    channels = _check_params(label, scale, bias, mean, var)
    conv = _foldable_conv(x, state.producer, state.uses, state.graph_outputs, state.sub_refs, state.const)
    s64 = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    shift64 = bias.astype(np.float64) - mean.astype(np.float64) * s64
    if conv is not None:
        _fold_into_conv(state, conv, label, y, channels, s64, mean, bias)
        return [], True
    return _constant_affine_nodes(state, node, x, y, channels, s64, shift64, scale.dtype), False


def _fold_into_conv(
    state: _FoldState,
    conv: onnx.NodeProto,
    label: str,
    y: str,
    channels: int,
    s64: np.ndarray,
    mean: np.ndarray,
    bias: np.ndarray,
) -> None:
    """Scale the Conv's weight and bias by the BN (new initializers) and let the Conv write the BN output ``y``."""
    weight = state.const(conv.input[1])
    assert weight is not None
    if weight.ndim < 1 or weight.shape[0] != channels:
        raise ModelError(
            f"BatchNormalization node {label} has {channels} channels but the Conv "
            f"before it has {weight.shape[0] if weight.ndim else 0} output channels; "
            "the model is malformed, re-export it"
        )
    conv_bias = state.const(conv.input[2]) if len(conv.input) > 2 and conv.input[2] else None
    b64 = (
        np.zeros(channels, dtype=np.float64)
        if conv_bias is None
        else conv_bias.astype(np.float64).reshape(-1)
    )
    if b64.shape != (channels,):
        raise ModelError(
            f"the Conv before BatchNormalization node {label} has a bias of shape "
            f"{conv_bias.shape} for {channels} output channels; re-export the model"
        )
    w_new = weight.astype(np.float64) * s64.reshape((-1,) + (1,) * (weight.ndim - 1))
    b_new = (b64 - mean.astype(np.float64)) * s64 + bias.astype(np.float64)
    base = conv.name or y
    w_name = state.add_init(w_new.astype(weight.dtype), f"{base}_bnfold_W")
    b_name = state.add_init(b_new.astype(weight.dtype), f"{base}_bnfold_B")
    old_out = conv.output[0]
    conv.input[1] = w_name
    if len(conv.input) > 2:
        conv.input[2] = b_name
    else:
        conv.input.append(b_name)
    conv.output[0] = y
    state.producer.pop(old_out, None)
    state.producer[y] = conv
    state.dropped_value_info.add(old_out)


def _constant_affine_nodes(
    state: _FoldState,
    node: onnx.NodeProto,
    x: str,
    y: str,
    channels: int,
    s64: np.ndarray,
    shift64: np.ndarray,
    param_dtype: np.dtype,
) -> list[onnx.NodeProto]:
    """``Add(Mul(x, scale), shift)`` with constants shaped ``(1, C, 1, ...)`` in the dtype of ``x`` when known."""
    elem, rank = _x_type(x, state.types, state.producer, state.const)
    dtype = _np_dtype(elem) if elem else param_dtype
    shape = (1, channels) + (1,) * (max(rank, 2) - 2)
    s_name = state.add_init(s64.reshape(shape).astype(dtype), f"{node.name or y}_bn_scale")
    t_name = state.add_init(shift64.reshape(shape).astype(dtype), f"{node.name or y}_bn_shift")
    return _affine_nodes(node, x, s_name, t_name, y, state.fresh, state.fresh_node)


def _install(graph: onnx.GraphProto, result: list[onnx.NodeProto], state: _FoldState) -> None:
    """Write the rewritten node list and new initializers into ``graph``; drop stale value_info and orphans."""
    # detach from the repeated field before clearing it (portable across protobuf backends)
    rebuilt = []
    for node in result:
        fresh_copy = onnx.NodeProto()
        fresh_copy.CopyFrom(node)
        rebuilt.append(fresh_copy)
    del graph.node[:]
    graph.node.extend(rebuilt)
    graph.initializer.extend(state.new_inits)
    if state.dropped_value_info:
        kept = [vi for vi in graph.value_info if vi.name not in state.dropped_value_info]
        del graph.value_info[:]
        graph.value_info.extend(kept)
    _drop_orphaned_initializers(
        graph, state.referenced_before | {t.name for t in state.new_inits}, state.graph_inputs
    )


def _validate(node: onnx.NodeProto, index: int) -> None:
    label = _describe(node, index)
    if int(_attr(node, "training_mode", 0)) != 0:
        raise ModelError(
            f"BatchNormalization node {label} is in training mode (training_mode=1); "
            "export the model after model.eval() so batch norm uses its running statistics"
        )
    outputs = [o for o in node.output if o]
    if len(outputs) != 1 or not node.output[0]:
        raise ModelError(
            f"BatchNormalization node {label} has {len(outputs)} outputs (running statistics "
            "requested, i.e. training mode); export the model after model.eval()"
        )
    if int(_attr(node, "spatial", 1)) == 0:
        raise ModelError(
            f"BatchNormalization node {label} uses spatial=0 (per-activation statistics), "
            "which cannot be folded; re-export with a current opset"
        )
    if len(node.input) < 5 or not all(node.input[:5]):
        raise ModelError(
            f"BatchNormalization node {label} has {len(node.input)} inputs, expected 5 "
            "(X, scale, B, mean, var); the model is malformed, re-export it"
        )


def _check_params(label: str, *params: np.ndarray) -> int:
    shapes = {p.shape for p in params}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ModelError(
            f"BatchNormalization node {label} has parameters of shapes "
            f"{[p.shape for p in params]}; expected four 1-D tensors of length C"
        )
    # kind "V": ml_dtypes floats such as bfloat16, which numpy does not call floating
    if not all(p.dtype.kind in "fV" for p in params):
        raise ModelError(
            f"BatchNormalization node {label} has non-floating parameters "
            f"{[str(p.dtype) for p in params]}; the model is malformed, re-export it"
        )
    return int(params[0].shape[0])


def _foldable_conv(x, producer, uses, graph_outputs, sub_refs, const):  # noqa: ANN001, ANN202
    conv = producer.get(x)
    if conv is None or conv.op_type != "Conv" or conv.domain not in _DEFAULT_DOMAINS:
        return None
    if conv.output[0] != x or uses[x] != 1 or x in graph_outputs or x in sub_refs:
        return None
    if len(conv.input) < 2 or const(conv.input[1]) is None:
        return None
    if len(conv.input) > 2 and conv.input[2] and const(conv.input[2]) is None:
        return None
    return conv


def _x_type(x, types, producer, const) -> tuple[int, int]:  # noqa: ANN001
    """(elem_type or 0 if unknown, rank) of the BN input; rank falls back to 4 (NCHW)."""
    elem, rank = types.get(x, (0, None))
    if rank is None:
        conv = producer.get(x)
        if conv is not None and conv.op_type == "Conv" and len(conv.input) > 1:
            weight = const(conv.input[1])
            if weight is not None:
                rank = weight.ndim
    return elem, rank if rank is not None else _FALLBACK_RANK


def _affine_nodes(node, x, s_name, t_name, y, fresh, fresh_node) -> list[onnx.NodeProto]:  # noqa: ANN001
    base = node.name or y
    scaled = fresh(f"{base}_bn_scaled")
    return [
        helper.make_node("Mul", [x, s_name], [scaled], name=fresh_node(f"{base}_mul")),
        helper.make_node("Add", [scaled, t_name], [y], name=fresh_node(f"{base}_add")),
    ]


def _dynamic_affine_nodes(  # noqa: ANN202, PLR0913
    node, x, param_names, y, eps, elem, rank, types, fresh, fresh_node, add_init,  # noqa: ANN001
):
    """The affine computed in-graph, for BNs whose parameters are not constant initializers."""
    base = node.name or y
    out: list[onnx.NodeProto] = []

    def emit(op: str, inputs: list[str], tag: str, **attrs) -> str:  # noqa: ANN003
        name = fresh(f"{base}_{tag}")
        out.append(helper.make_node(op, inputs, [name], name=fresh_node(f"{base}_{tag}"), **attrs))
        return name

    if not elem:
        elem = types.get(param_names[0], (onnx.TensorProto.FLOAT, None))[0] or onnx.TensorProto.FLOAT
    cast = []
    for pname, tag in zip(param_names, ("scale", "B", "mean", "var")):
        if types.get(pname, (0, None))[0] != elem:
            pname = emit("Cast", [pname], f"bn_{tag}_cast", to=elem)
        cast.append(pname)
    scale, bias, mean, var = cast
    eps_name = add_init(np.array(eps, dtype=_np_dtype(elem)), f"{base}_bn_eps")
    shape_name = add_init(np.array([1, -1] + [1] * (max(rank, 2) - 2), dtype=np.int64), f"{base}_bn_shape")
    std = emit("Sqrt", [emit("Add", [var, eps_name], "bn_var_eps")], "bn_std")
    s = emit("Div", [scale, std], "bn_s")
    shift = emit("Sub", [bias, emit("Mul", [mean, s], "bn_mean_s")], "bn_shift_1d")
    s_r = emit("Reshape", [s, shape_name], "bn_scale")
    t_r = emit("Reshape", [shift, shape_name], "bn_shift")
    scaled = emit("Mul", [x, s_r], "bn_scaled")
    out.append(helper.make_node("Add", [scaled, t_r], [y], name=fresh_node(f"{base}_add")))
    return out


def _referenced(graph: onnx.GraphProto) -> set[str]:
    names = {name for node in graph.node for name in node.input if name}
    names |= {v.name for v in graph.output}
    return names | _subgraph_references(graph)


def _drop_orphaned_initializers(
    graph: onnx.GraphProto, candidates: set[str], graph_inputs: set[str]
) -> None:
    """Drop initializers in ``candidates`` (used before the pass, or made by it) now unused."""
    used = _referenced(graph)
    keep = [
        t
        for t in graph.initializer
        if t.name in used or t.name in graph_inputs or t.name not in candidates
    ]
    if len(keep) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(keep)
