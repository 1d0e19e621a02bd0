"""``--embed-resample``: the whole-image resampling of docs/integration.md §3.1-3.2 as a small ONNX graph.

Where an application cannot call OpenCV (whose ``INTER_AREA`` is hard to match
by hand), it feeds ``model.resample.onnx`` the decoded image and gets back the
image EdgeDx cuts crops from (tiling, padding and preprocessing stay as documented):

- input ``image``: uint8 RGB, shape (H, W, 3), H and W dynamic;
- output ``resampled``: uint8, shape (h', w', 3), per the card's crop policy
  (the card is embedded as ``edgedx.card``, with ``edgedx.role = resample``).

Inside the graph (opset 18, the lowest IR version that allows it):

1. **Size** (§3.1), in float64 on the dynamic H, W exactly as
   :func:`edgedx.runtime.tiling.resampled_size`: ``fit`` gives ``tile_size``;
   ``shorter_side`` S gives S for the shorter side (h when ``h <= w``) and
   ``max(1, Round(other * S / shorter))`` for the other; ``scale`` gives
   ``max(1, Round(side * scale))``. ONNX ``Round`` rounds ties to even, as Python's ``round``.
2. **Shrinking in both axes** (``h' <= H`` and ``w' <= W``; an ``If`` node picks the branch):
   OpenCV's ``INTER_AREA`` as a separable weighted sum, ``out = Wy @ img @ Wx^T`` per channel, with
   ``Wy[i, j] = overlap([i*s, (i+1)*s), [j, j+1)) / s`` and ``s = H / h'`` (Wx likewise), the weights
   built in the graph from Range/Mul/Min/Max/Floor/Ceil on the dynamic sizes. The sums run tap by tap in
   float32 (a ``Loop`` over the taps, rows first, then columns) in OpenCV's order, so even exact .5 ties
   round as OpenCV's do; exactly 2× in both axes OpenCV's integer path rounds ties up, and so does the graph.
   The size-unchanged case is this branch with identity weights.
3. **Otherwise** (a side grows) ``INTER_LINEAR``: half-pixel centres ``(d + 0.5) * s - 0.5``, edges
   clamped, reproduced in OpenCV's own fixed point (11-bit weights, int32 arithmetic) rather than with
   ``Resize``, whose float result differs from OpenCV by one grey level on about 1 pixel in 8.
4. **To uint8** as OpenCV saturates: Round (ties to even), Clip to 0..255, Cast.

On the sizes and factors tested (tests/test_resample_graph.py) the graph equals ``cv2.resize``
bit for bit. The export still measures it on the verification images (:func:`verify_resample_graph`)
and refuses the graph (renamed ``*.failed``, :class:`ModelError` naming the numbers) beyond one grey
level or 1% of pixel values; the numbers go to ``export_report.json`` under ``"resample_graph"``.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgedx.card import ONNX_METADATA_KEY, CropPolicy, ModelCard
from edgedx.errors import ModelError
from edgedx.export.onnx_export import DEFAULT_OPSET, embed_metadata, with_lowest_ir_version

ROLE_KEY = "edgedx.role"
ROLE = "resample"
INPUT_NAME = "image"
OUTPUT_NAME = "resampled"
FILE_SUFFIX = ".resample.onnx"
MAX_GREY_LEVELS = 1
MAX_SHARE_DIFFERENT = 0.01
_TIE_UP = 1e-3  # added before Round in OpenCV's exact-2x2 area path, whose integer sums round ties up


class _Builder:
    def __init__(self, prefix: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.prefix = prefix
        self.count = 0

    def const(self, value: Any, dtype: Any, name: str) -> str:
        full = self.prefix + name
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), full))
        return full

    def op(self, op_type: str, inputs: Iterable[str], name: str | None = None, **attrs: Any) -> str:
        self.count += 1
        out = self.prefix + (name or f"{op_type.lower()}_{self.count}")
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out


def _round_size(b: _Builder, value: str, one: str) -> str:
    """max(1, Round(value)) as int64 from a float64 scalar."""
    return b.op("Cast", [b.op("Max", [b.op("Round", [value]), one])], to=TensorProto.INT64)


def _size_nodes(b: _Builder, h: str, w: str, crop: CropPolicy) -> tuple[str, str]:
    """(h', w') int64 scalars from the int64 scalars (H, W), per §3.1."""
    if crop.mode == "fit":
        th, tw = crop.tile_size
        return b.const(int(th), np.int64, "fit_h"), b.const(int(tw), np.int64, "fit_w")
    hd = b.op("Cast", [h], "h_f64", to=TensorProto.DOUBLE)
    wd = b.op("Cast", [w], "w_f64", to=TensorProto.DOUBLE)
    one = b.const(1.0, np.float64, "one_f64")
    if crop.mode == "shorter_side":
        side = int(crop.shorter_side)  # type: ignore[arg-type]
        s_d = b.const(float(side), np.float64, "side_f64")
        s_i = b.const(side, np.int64, "side_i64")
        portrait = b.op("LessOrEqual", [h, w], "h_is_shorter")  # h <= w: h is the shorter side
        long_w = _round_size(b, b.op("Div", [b.op("Mul", [wd, s_d]), hd]), one)
        long_h = _round_size(b, b.op("Div", [b.op("Mul", [hd, s_d]), wd]), one)
        return b.op("Where", [portrait, s_i, long_h], "out_h"), b.op("Where", [portrait, long_w, s_i], "out_w")
    scale = b.const(float(crop.scale), np.float64, "scale_f64")
    return _round_size(b, b.op("Mul", [hd, scale]), one), _round_size(b, b.op("Mul", [wd, scale]), one)


def _area_taps(b: _Builder, n_in: str, n_out: str, tag: str) -> tuple[str, str, str]:
    """OpenCV's INTER_AREA taps for one axis (``computeResizeAreaTab``), built on the dynamic sizes.

    Output ``d`` covers the source cell ``[d*s, d*s + s)`` with ``s = 1 / (n_out / n_in)`` (float64), cut at
    the image edge (``cw = min(s, n_in - d*s)``); its taps are consecutive source pixels from ``first``: a
    partial left pixel ``(ceil(d*s) - d*s) / cw``, whole pixels ``1 / cw``, a partial right pixel
    ``min(d*s + s - floor(d*s + s), 1, cw) / cw`` (partials of 1e-3 pixel or less are dropped, as OpenCV
    does), each weight float32: Wy[i, j] = overlap([i*s, (i+1)*s), [j, j+1)) / s. Returns (indices (n_out, K)
    int64, weights (n_out, K) float32 with zeros past each output's own taps, K scalar int64).
    """
    zero_i, one_i = b.const(0, np.int64, f"{tag}_zero_i"), b.const(1, np.int64, f"{tag}_one_i")
    zero = b.const(0.0, np.float64, f"{tag}_zero")
    one = b.const(1.0, np.float64, f"{tag}_one")
    eps = b.const(1e-3, np.float64, f"{tag}_eps")
    nin_d = b.op("Cast", [n_in], to=TensorProto.DOUBLE)
    nout_d = b.op("Cast", [n_out], to=TensorProto.DOUBLE)
    s = b.op("Div", [one, b.op("Div", [nout_d, nin_d])], f"{tag}_s")
    last = b.op("Sub", [nin_d, one])
    d = b.op("Cast", [b.op("Range", [zero_i, n_out, one_i])], to=TensorProto.DOUBLE)
    f1 = b.op("Mul", [d, s])
    f2 = b.op("Add", [f1, s])
    cw = b.op("Min", [s, b.op("Sub", [nin_d, f1])], f"{tag}_cell")
    s2 = b.op("Min", [b.op("Floor", [f2]), last])
    s1 = b.op("Min", [b.op("Ceil", [f1]), s2])
    left = b.op("Greater", [b.op("Sub", [s1, f1]), eps])
    right = b.op("Greater", [b.op("Sub", [f2, s2]), eps])
    left_d = b.op("Cast", [left], to=TensorProto.DOUBLE)
    right_d = b.op("Cast", [right], to=TensorProto.DOUBLE)
    first = b.op("Sub", [s1, left_d])
    count = b.op("Add", [b.op("Add", [b.op("Sub", [s2, s1]), left_d]), right_d])
    k_max = b.op("Cast", [b.op("ReduceMax", [count], keepdims=0)], f"{tag}_k", to=TensorProto.INT64)
    col = b.const([-1, 1], np.int64, f"{tag}_col")
    row = b.const([1, -1], np.int64, f"{tag}_row")
    k = b.op("Reshape", [b.op("Cast", [b.op("Range", [zero_i, k_max, one_i])], to=TensorProto.DOUBLE), row])

    def column(name: str) -> str:
        return b.op("Reshape", [name, col])

    s1c, s2c, f1c, f2c, cwc = (column(v) for v in (s1, s2, f1, f2, cw))
    j = b.op("Add", [column(first), k])  # (n_out, K) source index of each tap
    w_left = b.op("Div", [b.op("Sub", [s1c, f1c]), cwc])
    w_full = b.op("Div", [one, cwc])
    w_right = b.op("Div", [b.op("Min", [b.op("Min", [b.op("Sub", [f2c, s2c]), one]), cwc]), cwc])
    is_left = b.op("And", [column(left), b.op("Equal", [j, b.op("Sub", [s1c, one])])])
    is_full = b.op("And", [b.op("GreaterOrEqual", [j, s1c]), b.op("Less", [j, s2c])])
    is_right = b.op("And", [column(right), b.op("Equal", [j, s2c])])
    weight = b.op("Where", [is_left, w_left, b.op("Where", [is_full, w_full, b.op("Where", [is_right, w_right, zero])])])
    weight = b.op("Cast", [weight], f"{tag}_weights", to=TensorProto.FLOAT)
    index = b.op("Cast", [b.op("Min", [b.op("Max", [j, zero]), last])], f"{tag}_index", to=TensorProto.INT64)
    return index, weight, k_max


def _accumulate(b: _Builder, source: str, index: str, weight: str, k_max: str, initial: str, axis: int, tag: str) -> str:
    """``acc = initial; for k < K: acc = acc + take(source, index[:, k], axis) * weight[:, k]`` in float32, one
    tap at a time in OpenCV's order (so float rounding, and with it exact .5 ties, go the way OpenCV's do)."""
    p = f"{b.prefix}{tag}_loop/"
    shape = [1, -1, 1] if axis == 1 else [-1, 1, 1]
    body_nodes = [
        helper.make_node("Unsqueeze", [p + "k", p + "axes"], [p + "k1"], name=p + "k1"),
        helper.make_node("Gather", [index, p + "k1"], [p + "idx2"], axis=1, name=p + "idx2"),
        helper.make_node("Reshape", [p + "idx2", p + "flat"], [p + "idx"], name=p + "idx"),
        helper.make_node("Gather", [weight, p + "k1"], [p + "w2"], axis=1, name=p + "w2"),
        helper.make_node("Reshape", [p + "w2", p + "shape"], [p + "w"], name=p + "w"),
        helper.make_node("Gather", [source, p + "idx"], [p + "taken"], axis=axis, name=p + "taken"),
        helper.make_node("Mul", [p + "taken", p + "w"], [p + "product"], name=p + "product"),
        helper.make_node("Add", [p + "acc_in", p + "product"], [p + "acc_out"], name=p + "acc"),
        helper.make_node("Identity", [p + "cond_in"], [p + "cond_out"], name=p + "cond"),
    ]
    body = helper.make_graph(
        body_nodes,
        f"{tag}_loop_body",
        [
            helper.make_tensor_value_info(p + "k", TensorProto.INT64, []),
            helper.make_tensor_value_info(p + "cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info(p + "acc_in", TensorProto.FLOAT, [None, None, 3]),
        ],
        [
            helper.make_tensor_value_info(p + "cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info(p + "acc_out", TensorProto.FLOAT, [None, None, 3]),
        ],
        [
            numpy_helper.from_array(np.asarray([0], np.int64), p + "axes"),
            numpy_helper.from_array(np.asarray([-1], np.int64), p + "flat"),
            numpy_helper.from_array(np.asarray(shape, np.int64), p + "shape"),
        ],
    )
    true = b.const(True, np.bool_, f"{tag}_true")
    return b.op("Loop", [k_max, true, initial], f"{tag}_sum", body=body)


def _zeros(b: _Builder, dims: tuple[str, str], tag: str) -> str:
    """float32 zeros of shape (dims[0], dims[1], 3) from int64 scalars."""
    axes = b.const([0], np.int64, f"{tag}_axes")
    shape = b.op("Concat", [b.op("Unsqueeze", [dims[0], axes]), b.op("Unsqueeze", [dims[1], axes]), b.const([3], np.int64, f"{tag}_c")], axis=0)
    return b.op("ConstantOfShape", [shape], f"{tag}_zeros", value=numpy_helper.from_array(np.zeros(1, np.float32)))


def _area_branch(h: str, w: str, oh: str, ow: str) -> onnx.GraphProto:
    """If-branch: INTER_AREA as a separable weighted sum, ``Wy @ img @ Wx^T`` per channel, in float32: first
    along each row (taps of Wx), then down the columns (taps of Wy), rounded to uint8."""
    b = _Builder("area/")
    image = b.op("Cast", [INPUT_NAME], "image_f32", to=TensorProto.FLOAT)  # (H, W, 3)
    x_index, x_weight, x_k = _area_taps(b, w, ow, "x")
    y_index, y_weight, y_k = _area_taps(b, h, oh, "y")
    rows = _accumulate(b, image, x_index, x_weight, x_k, _zeros(b, (h, ow), "rows"), 1, "x")  # (H, w', 3)
    out = _accumulate(b, rows, y_index, y_weight, y_k, _zeros(b, (oh, ow), "out"), 0, "y")  # (h', w', 3)
    two = b.const(2, np.int64, "two")
    exact2 = b.op("And", [b.op("Equal", [h, b.op("Mul", [oh, two])]), b.op("Equal", [w, b.op("Mul", [ow, two])])])
    tie = b.op("Mul", [b.op("Cast", [exact2], to=TensorProto.FLOAT), b.const(_TIE_UP, np.float32, "tie_up")])
    rounded = b.op("Round", [b.op("Add", [out, tie])], "rounded")  # ties to even, as OpenCV's saturate_cast
    clipped = b.op("Clip", [rounded, b.const(0.0, np.float32, "lo"), b.const(255.0, np.float32, "hi")], "clipped")
    result = b.op("Cast", [clipped], "area_out", to=TensorProto.UINT8)
    return helper.make_graph(
        b.nodes, "area", [], [helper.make_tensor_value_info(result, TensorProto.UINT8, [None, None, 3])], b.inits
    )


def _linear_taps(b: _Builder, n_in: str, n_out: str, tag: str, *, clamp_weights: bool) -> tuple[str, str, str, str]:
    """OpenCV's INTER_LINEAR taps for one axis: (i0, i1) int64 source indices and (a0, a1) int32 weights summing
    to about 2048 (11-bit fixed point, each rounded ties to even). Source position (d + 0.5) * s - 0.5 with
    s = 1 / (n_out / n_in) in float64, then float32. Columns outside the image take the edge pixel with weight
    2048; rows keep their fraction and clamp both row indices (as OpenCV does)."""
    zero_i, one_i = b.const(0, np.int64, f"{tag}_zero_i"), b.const(1, np.int64, f"{tag}_one_i")
    half = b.const(0.5, np.float64, f"{tag}_half")
    one_d = b.const(1.0, np.float64, f"{tag}_one_d")
    inv = b.op("Div", [b.op("Cast", [n_out], to=TensorProto.DOUBLE), b.op("Cast", [n_in], to=TensorProto.DOUBLE)])
    scale = b.op("Div", [one_d, inv], f"{tag}_scale")
    d = b.op("Cast", [b.op("Range", [zero_i, n_out, one_i])], to=TensorProto.DOUBLE)
    pos = b.op("Cast", [b.op("Sub", [b.op("Mul", [b.op("Add", [d, half]), scale]), half])], f"{tag}_pos", to=TensorProto.FLOAT)
    start = b.op("Floor", [pos])
    frac = b.op("Sub", [pos, start])
    start_i = b.op("Cast", [start], to=TensorProto.INT64)
    last = b.op("Sub", [n_in, one_i])
    if clamp_weights:
        zero_f = b.const(0.0, np.float32, f"{tag}_zero_f")
        outside = b.op("Or", [b.op("Less", [start_i, zero_i]), b.op("GreaterOrEqual", [start_i, last])])
        frac = b.op("Where", [outside, zero_f, frac])
    i0 = b.op("Min", [b.op("Max", [start_i, zero_i]), last], f"{tag}_i0")
    i1 = b.op("Min", [b.op("Max", [b.op("Add", [start_i, one_i]), zero_i]), last], f"{tag}_i1")
    fixed = b.const(2048.0, np.float32, f"{tag}_fixed")
    one_f = b.const(1.0, np.float32, f"{tag}_one_f")
    a1 = b.op("Cast", [b.op("Round", [b.op("Mul", [frac, fixed])])], f"{tag}_a1", to=TensorProto.INT32)
    a0 = b.op("Cast", [b.op("Round", [b.op("Mul", [b.op("Sub", [one_f, frac]), fixed])])], f"{tag}_a0", to=TensorProto.INT32)
    return i0, i1, a0, a1


def _linear_branch(h: str, w: str, oh: str, ow: str) -> onnx.GraphProto:
    """If-branch: cv2.INTER_LINEAR on uint8 reproduced in int32: a horizontal pass with 11-bit weights, then
    OpenCV's vertical pass ``((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16) + 2 >> 2`` (all values are
    non-negative, so integer Div is the shift)."""
    b = _Builder("linear/")
    x0, x1, a0, a1 = _linear_taps(b, w, ow, "x", clamp_weights=True)
    y0, y1, b0, b1 = _linear_taps(b, h, oh, "y", clamp_weights=False)
    col = b.const([1, -1, 1], np.int64, "col_shape")
    row = b.const([-1, 1, 1], np.int64, "row_shape")
    image = b.op("Cast", [INPUT_NAME], "image_i32", to=TensorProto.INT32)
    horizontal = b.op("Add", [
        b.op("Mul", [b.op("Gather", [image, x0], axis=1), b.op("Reshape", [a0, col])]),
        b.op("Mul", [b.op("Gather", [image, x1], axis=1), b.op("Reshape", [a1, col])]),
    ], "horizontal")  # (H, w', 3), pixel * 2048
    c16, c65536, c2, c4 = (b.const(v, np.int32, f"c{v}") for v in (16, 65536, 2, 4))

    def tap(rows: str, beta: str) -> str:
        shifted = b.op("Div", [b.op("Gather", [horizontal, rows], axis=0), c16])
        return b.op("Div", [b.op("Mul", [shifted, b.op("Reshape", [beta, row])]), c65536])

    total = b.op("Div", [b.op("Add", [b.op("Add", [tap(y0, b0), tap(y1, b1)]), c2]), c4])
    clipped = b.op("Clip", [total, b.const(0, np.int32, "lo"), b.const(255, np.int32, "hi")])
    result = b.op("Cast", [clipped], "linear_out", to=TensorProto.UINT8)
    return helper.make_graph(
        b.nodes, "linear", [], [helper.make_tensor_value_info(result, TensorProto.UINT8, [None, None, 3])], b.inits
    )


def resample_graph(card: ModelCard, *, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The uint8 (H, W, 3) → uint8 (h', w', 3) resampling graph for ``card.crop``, the card embedded."""
    crop = card.crop
    b = _Builder()
    shape = b.op("Shape", [INPUT_NAME], "shape")
    h = b.op("Gather", [shape, b.const(0, np.int64, "axis_h")], "in_h", axis=0)
    w = b.op("Gather", [shape, b.const(1, np.int64, "axis_w")], "in_w", axis=0)
    oh, ow = _size_nodes(b, h, w, crop)
    shrink = b.op("And", [b.op("LessOrEqual", [oh, h]), b.op("LessOrEqual", [ow, w])], "shrinks_both")
    b.nodes.append(helper.make_node(
        "If", [shrink], [OUTPUT_NAME], name="area_or_linear",
        then_branch=_area_branch(h, w, oh, ow), else_branch=_linear_branch(h, w, oh, ow),
    ))
    graph = helper.make_graph(
        b.nodes,
        "edgedx_resample",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, ["H", "W", 3])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.UINT8, ["out_H", "out_W", 3])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="edgedx")
    model = with_lowest_ir_version(model)
    onnx.checker.check_model(model, full_check=True)
    return embed_metadata(model, {ONNX_METADATA_KEY: card.to_json(), ROLE_KEY: ROLE})


def run_resample_graph(session: Any, image: np.ndarray) -> np.ndarray:
    """``image`` (H, W, 3) uint8 RGB through an onnxruntime session of the graph."""
    return session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(image, np.uint8)})[0]


def compare_resampling(graph_out: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """max |Δ| (grey levels) and the share of differing pixel values; a shape mismatch counts as all different."""
    if graph_out.shape != reference.shape:
        return {"max_abs_diff": 255, "share_different": 1.0, "shape": list(graph_out.shape), "expected": list(reference.shape)}
    diff = np.abs(graph_out.astype(np.int16) - reference.astype(np.int16))
    return {"max_abs_diff": int(diff.max(initial=0)), "share_different": float(np.mean(diff > 0)) if diff.size else 0.0}


def verify_resample_graph(path: Path, card: ModelCard, images: Iterable[np.ndarray]) -> dict[str, Any]:
    """Run the graph on decoded RGB ``images`` and compare with :func:`edgedx.runtime.tiling.rescale`.

    Returns the evidence for the report; raises :class:`ModelError` naming the numbers when any pixel is
    more than one grey level off or more than 1% of pixel values differ (over all images together).
    """
    import onnxruntime as ort

    from edgedx.runtime.tiling import rescale

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst, different, total, n = 0, 0, 0, 0
    for image in images:
        image = np.asarray(image, np.uint8)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        expected = rescale(image, card.crop)
        got = run_resample_graph(session, image)
        stats = compare_resampling(got, expected)
        worst = max(worst, stats["max_abs_diff"])
        size = max(expected.size, got.size)
        different += round(stats["share_different"] * size)
        total += size
        n += 1
    share = different / total if total else 0.0
    result = {
        "path": path.name, "n_images": n, "max_abs_diff": worst, "share_different": share,
        "tolerance": {"max_abs_diff": MAX_GREY_LEVELS, "share_different": MAX_SHARE_DIFFERENT},
        "passed": worst <= MAX_GREY_LEVELS and share <= MAX_SHARE_DIFFERENT,
    }
    if not result["passed"]:
        raise ModelError(
            f"{path.name} does not resample as EdgeDx does on {n} verification images: max |Δ| {worst} grey levels "
            f"(allowed {MAX_GREY_LEVELS}), {share:.2%} of pixel values differ (allowed {MAX_SHARE_DIFFERENT:.0%}); "
            "resample with OpenCV instead (docs/integration.md §3.2)"
        )
    return result


def decoded_images(items: Iterable[tuple[Any, Any]]) -> list[np.ndarray]:
    """The decoded RGB images of the export's verification items ((key, path or array) pairs); unreadable ones skipped."""
    from edgedx.errors import ImageReadError
    from edgedx.runtime.io.image_io import read_image

    images = []
    for _, item in items:
        if isinstance(item, np.ndarray):
            images.append(item)
            continue
        try:
            images.append(read_image(item))
        except ImageReadError:
            continue  # already named in the report's verification.unreadable
    return images


def write_resample_graph(out: Path, stem: str, card: ModelCard, images: Iterable[np.ndarray], *, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Write ``{stem}.resample.onnx`` into ``out``, verify it on ``images``; the report entry (raises if refused)."""
    path = out / f"{stem}{FILE_SUFFIX}"
    onnx.save(resample_graph(card, opset=opset), path)
    try:
        return verify_resample_graph(path, card, images)
    except ModelError:
        path.replace(path.with_name(path.name + ".failed"))
        raise
