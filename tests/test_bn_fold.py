"""BatchNormalization removal: folded into Conv or turned into a per-channel affine."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgedx.errors import EdgeDxError, ModelError  # noqa: E402
from edgedx.export.bn_fold import (  # noqa: E402
    BatchNormReport,
    assert_no_batchnorm,
    count_batchnorms,
    fold_batchnorms,
)

OPSET = 18
TOL = 1e-4
F32 = TensorProto.FLOAT


# --------------------------------------------------------------------------- #
# Graph building helpers
# --------------------------------------------------------------------------- #


class Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.inits: list = []

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def conv(self, x: str, out: str, cin: int, cout: int, *, k: int = 3, group: int = 1,
             bias: bool = True, weight: str | None = None, name: str | None = None) -> str:
        ins = [x]
        if weight is None:
            weight = self.init(f"{out}_W", self.rng.normal(0, 0.5, (cout, cin // group, k, k)).astype(np.float32))
        ins.append(weight)
        if bias:
            ins.append(self.init(f"{out}_b", self.rng.normal(0, 0.5, cout).astype(np.float32)))
        self.nodes.append(helper.make_node(
            "Conv", ins, [out], name=name or f"conv_{out}", pads=[k // 2] * 4, group=group))
        return out

    def bn_params(self, prefix: str, c: int) -> list[str]:
        r = self.rng
        return [
            self.init(f"{prefix}_scale", (r.uniform(0.5, 1.5, c) * r.choice([-1, 1], c)).astype(np.float32)),
            self.init(f"{prefix}_B", r.normal(0, 1, c).astype(np.float32)),
            self.init(f"{prefix}_mean", r.normal(0, 1, c).astype(np.float32)),
            self.init(f"{prefix}_var", r.uniform(0.5, 2.0, c).astype(np.float32)),
        ]

    def bn(self, x: str, out: str, c: int, *, name: str, params: list[str] | None = None,
           epsilon: float | None = None, **attrs) -> str:
        params = params or self.bn_params(name, c)
        if epsilon is not None:
            attrs["epsilon"] = epsilon
        self.nodes.append(helper.make_node("BatchNormalization", [x, *params], [out], name=name, **attrs))
        return out

    def add(self, op: str, ins: list[str], out: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, ins, [out], name=f"{op.lower()}_{out}", **attrs))
        return out

    def model(self, inputs: dict[str, tuple], outputs: list[str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g",
            [helper.make_tensor_value_info(n, F32, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, F32, None) for n in outputs],
            initializer=self.inits,
        )
        m = finish(graph)
        onnx.checker.check_model(m, full_check=True)
        return m


def finish(graph) -> onnx.ModelProto:
    """Model at opset 18 whose outputs (and value_info) carry inferred shapes."""
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    m.ir_version = 9
    return onnx.shape_inference.infer_shapes(m)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def check_pass(model, feeds, expected: dict[str, int]) -> tuple[onnx.ModelProto, float]:
    """Run the pass, check numerics, report, purity, checker; return (new model, max diff)."""
    before_bytes = model.SerializeToString()
    n_before = count_batchnorms(model)
    ref = run(model, feeds)

    folded, report = fold_batchnorms(model)

    assert isinstance(report, BatchNormReport)
    assert report.to_dict() == expected
    assert report.found == n_before
    assert count_batchnorms(folded) == 0
    assert_no_batchnorm(folded)
    onnx.checker.check_model(folded, full_check=True)
    # the input model is not mutated
    assert count_batchnorms(model) == n_before
    assert model.SerializeToString() == before_bytes
    with pytest.raises(ModelError, match="BatchNormalization"):
        assert_no_batchnorm(model)
    # no dangling initializers
    used = {i for n in folded.graph.node for i in n.input}
    assert all(t.name in used for t in folded.graph.initializer)

    got = run(folded, feeds)
    assert len(got) == len(ref)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, got))
    assert diff < TOL, diff
    return folded, diff


def ops(model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def rand(rng, *shape) -> np.ndarray:
    return rng.normal(0, 1, shape).astype(np.float32)


AFFINE = {"found": 1, "folded_into_conv": 0, "converted_to_affine": 1, "remaining": 0}
FOLDED = {"found": 1, "folded_into_conv": 1, "converted_to_affine": 0, "remaining": 0}


# --------------------------------------------------------------------------- #
# Cases
# --------------------------------------------------------------------------- #


def test_a_conv_with_bias_bn_relu_is_folded():
    b = Builder(1)
    b.conv("x", "c", 3, 8, bias=True)
    b.bn("c", "n", 8, name="bn_a")
    b.add("Relu", ["n"], "y")
    m = b.model({"x": (2, 3, 9, 9)}, ["y"])
    folded, diff = check_pass(m, {"x": rand(b.rng, 2, 3, 9, 9)}, FOLDED)
    assert ops(folded) == ["Conv", "Relu"]
    conv = folded.graph.node[0]
    assert conv.output[0] == "n" and len(conv.input) == 3
    # the original weight and BN statistics are gone, replaced by fresh names
    names = {t.name for t in folded.graph.initializer}
    assert names == {conv.input[1], conv.input[2]}
    assert not names & {t.name for t in m.graph.initializer}
    print(f"(a) max abs diff {diff:.3g}")


def test_b_grouped_conv_without_bias_is_folded_with_epsilon():
    b = Builder(2)
    b.conv("x", "c", 4, 6, bias=False, group=2)
    b.bn("c", "y", 6, name="bn_b", epsilon=1e-3)
    m = b.model({"x": (2, 4, 8, 8)}, ["y"])
    folded, diff = check_pass(m, {"x": rand(b.rng, 2, 4, 8, 8)}, FOLDED)
    assert ops(folded) == ["Conv"]
    conv = folded.graph.node[0]
    assert len(conv.input) == 3  # a bias was added
    assert helper.get_attribute_value(conv.attribute[[a.name for a in conv.attribute].index("group")]) == 2
    print(f"(b) max abs diff {diff:.3g}")


def test_epsilon_matters():
    """Sanity: folding with the wrong epsilon would fail the tolerance (var small)."""
    b = Builder(3)
    b.conv("x", "c", 2, 3, bias=False)
    params = b.bn_params("bn_e", 3)
    b.inits[-1] = numpy_helper.from_array(np.full(3, 1e-3, np.float32), "bn_e_var")
    b.bn("c", "y", 3, name="bn_e", params=params, epsilon=1e-2)
    m = b.model({"x": (1, 2, 5, 5)}, ["y"])
    check_pass(m, {"x": rand(b.rng, 1, 2, 5, 5)}, FOLDED)


def test_c_preactivation_bn_on_graph_input_becomes_affine():
    b = Builder(4)
    b.bn("x", "n", 3, name="bn_c")
    b.add("Relu", ["n"], "r")
    b.conv("r", "y", 3, 5)
    m = b.model({"x": (2, 3, 7, 7)}, ["y"])
    folded, diff = check_pass(m, {"x": rand(b.rng, 2, 3, 7, 7)}, AFFINE)
    assert ops(folded) == ["Mul", "Add", "Relu", "Conv"]
    shapes = {tuple(t.dims) for t in folded.graph.initializer if t.name.startswith("bn_c")}
    assert shapes == {(1, 3, 1, 1)}
    assert all(t.data_type == F32 for t in folded.graph.initializer)
    print(f"(c) max abs diff {diff:.3g}")


def test_d_concat_of_two_convs_then_bn_becomes_affine():
    b = Builder(5)
    b.conv("x", "c1", 3, 4)
    b.conv("x", "c2", 3, 2, bias=False)
    b.add("Concat", ["c1", "c2"], "cat", axis=1)
    b.bn("cat", "n", 6, name="bn_d", epsilon=1e-3)
    b.add("Relu", ["n"], "y")
    m = b.model({"x": (2, 3, 6, 6)}, ["y"])
    folded, diff = check_pass(m, {"x": rand(b.rng, 2, 3, 6, 6)}, AFFINE)
    assert ops(folded) == ["Conv", "Conv", "Concat", "Mul", "Add", "Relu"]
    print(f"(d) max abs diff {diff:.3g}")


def test_e_conv_output_that_is_also_a_graph_output_is_not_folded():
    b = Builder(6)
    b.conv("x", "c", 3, 4)
    b.bn("c", "y", 4, name="bn_e")
    m = b.model({"x": (1, 3, 6, 6)}, ["c", "y"])
    folded, diff = check_pass(m, {"x": rand(b.rng, 1, 3, 6, 6)}, AFFINE)
    assert ops(folded) == ["Conv", "Mul", "Add"]
    assert folded.graph.node[0].output[0] == "c"
    print(f"(e) max abs diff {diff:.3g}")


def test_conv_output_with_two_consumers_is_not_folded():
    b = Builder(7)
    b.conv("x", "c", 3, 4)
    b.bn("c", "n", 4, name="bn_2c")
    b.add("Add", ["n", "c"], "y")  # residual-style second use
    m = b.model({"x": (1, 3, 6, 6)}, ["y"])
    folded, _ = check_pass(m, {"x": rand(b.rng, 1, 3, 6, 6)}, AFFINE)
    assert ops(folded) == ["Conv", "Mul", "Add", "Add"]


def test_f_two_bns_sharing_a_scale_initializer():
    b = Builder(8)
    shared = b.bn_params("shared", 4)
    b.conv("x", "c1", 3, 4, name="conv1")
    b.bn("c1", "n1", 4, name="bn_f1", params=shared)
    own = b.bn_params("own", 4)
    del b.inits[-4]  # own_scale: bn_f2 uses the shared scale instead
    b.bn("x2", "n2", 4, name="bn_f2", params=[shared[0], *own[1:]], epsilon=1e-3)
    b.conv("n2", "c2", 4, 4, name="conv2")
    b.add("Add", ["n1", "c2"], "y")
    m = b.model({"x": (2, 3, 5, 5), "x2": (2, 4, 5, 5)}, ["y"])
    feeds = {"x": rand(b.rng, 2, 3, 5, 5), "x2": rand(b.rng, 2, 4, 5, 5)}
    expected = {"found": 2, "folded_into_conv": 1, "converted_to_affine": 1, "remaining": 0}
    folded, diff = check_pass(m, feeds, expected)
    names = [t.name for t in folded.graph.initializer]
    assert len(names) == len(set(names))
    assert "shared_scale" not in names and "shared_mean" not in names
    print(f"(f) max abs diff {diff:.3g}")


def test_shared_conv_weight_is_not_mutated():
    b = Builder(9)
    w = b.init("W", b.rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32))
    b.conv("x", "c1", 3, 4, weight=w, name="conv1")
    b.conv("x", "c2", 3, 4, weight=w, bias=False, name="conv2")
    b.bn("c1", "n1", 4, name="bn_1")
    b.bn("c2", "n2", 4, name="bn_2")
    b.add("Sub", ["n1", "n2"], "y")
    m = b.model({"x": (1, 3, 6, 6)}, ["y"])
    expected = {"found": 2, "folded_into_conv": 2, "converted_to_affine": 0, "remaining": 0}
    folded, _ = check_pass(m, {"x": rand(b.rng, 1, 3, 6, 6)}, expected)
    w1, w2 = (n.input[1] for n in folded.graph.node if n.op_type == "Conv")
    assert w1 != w2 and "W" not in (w1, w2)


def test_conv_bn_bn_folds_twice():
    b = Builder(10)
    b.conv("x", "c", 3, 4)
    b.bn("c", "n1", 4, name="bn_1")
    b.bn("n1", "y", 4, name="bn_2", epsilon=1e-3)
    m = b.model({"x": (1, 3, 6, 6)}, ["y"])
    expected = {"found": 2, "folded_into_conv": 2, "converted_to_affine": 0, "remaining": 0}
    folded, _ = check_pass(m, {"x": rand(b.rng, 1, 3, 6, 6)}, expected)
    assert ops(folded) == ["Conv"] and len(folded.graph.initializer) == 2


def test_non_constant_params_become_an_in_graph_affine():
    b = Builder(11)
    b.conv("x", "c", 3, 4)
    b.bn("c", "y", 4, name="bn_dyn", params=["s", "bb", "mu", "v"])
    shapes = {"x": (1, 3, 5, 5), "s": (4,), "bb": (4,), "mu": (4,), "v": (4,)}
    m = b.model(shapes, ["y"])
    r = b.rng
    feeds = {"x": rand(r, 1, 3, 5, 5), "s": rand(r, 4), "bb": rand(r, 4), "mu": rand(r, 4),
             "v": r.uniform(0.5, 2, 4).astype(np.float32)}
    folded, _ = check_pass(m, feeds, AFFINE)
    assert "Conv" in ops(folded) and ops(folded)[-2:] == ["Mul", "Add"]


def test_rank3_input_gets_rank3_constants():
    b = Builder(12)
    b.bn("x", "y", 5, name="bn_1d")
    m = b.model({"x": (2, 5, 7)}, ["y"])
    folded, _ = check_pass(m, {"x": rand(b.rng, 2, 5, 7)}, AFFINE)
    assert {tuple(t.dims) for t in folded.graph.initializer} == {(1, 5, 1)}


def test_float16_params_are_kept_float16():
    b = Builder(13)
    c = 4
    r = b.rng
    params = [
        b.init("s", r.uniform(0.5, 1.5, c).astype(np.float16)),
        b.init("bb", r.normal(0, 1, c).astype(np.float16)),
        b.init("mu", r.normal(0, 1, c).astype(np.float16)),
        b.init("v", r.uniform(0.5, 2, c).astype(np.float16)),
    ]
    b.nodes.append(helper.make_node("BatchNormalization", ["x", *params], ["y"], name="bn_h"))
    graph = helper.make_graph(
        b.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, (1, c, 3, 3))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], initializer=b.inits)
    m = finish(graph)
    folded, report = fold_batchnorms(m)
    assert report.to_dict() == AFFINE
    onnx.checker.check_model(folded, full_check=True)
    assert all(t.data_type == TensorProto.FLOAT16 for t in folded.graph.initializer)
    x = rand(r, 1, c, 3, 3).astype(np.float16)
    p = [numpy_helper.to_array(t).astype(np.float64) for t in m.graph.initializer]
    ref = (x.astype(np.float64) - p[2][:, None, None]) / np.sqrt(p[3][:, None, None] + 1e-5) \
        * p[0][:, None, None] + p[1][:, None, None]
    (got,) = run(folded, {"x": x})
    assert got.dtype == np.float16
    assert np.max(np.abs(got.astype(np.float64) - ref)) < 1e-2


def test_training_mode_bn_raises_model_error():
    b = Builder(14)
    b.bn("x", "y", 3, name="bn_train", training_mode=1)
    graph = helper.make_graph(
        b.nodes, "g", [helper.make_tensor_value_info("x", F32, (2, 3, 4, 4))],
        [helper.make_tensor_value_info("y", F32, None)], initializer=b.inits)
    m = finish(graph)
    with pytest.raises(ModelError, match="bn_train.*training mode") as info:
        fold_batchnorms(m)
    assert isinstance(info.value, EdgeDxError)


def test_bn_with_running_stat_outputs_raises_model_error():
    b = Builder(15)
    params = b.bn_params("p", 3)
    b.nodes.append(helper.make_node(
        "BatchNormalization", ["x", *params], ["y", "rm", "rv"], name="bn_3out", training_mode=1))
    graph = helper.make_graph(
        b.nodes, "g", [helper.make_tensor_value_info("x", F32, (2, 3, 4, 4))],
        [helper.make_tensor_value_info("y", F32, None)], initializer=b.inits)
    m = finish(graph)
    with pytest.raises(ModelError, match="bn_3out"):
        fold_batchnorms(m)


def test_bn_inside_subgraph_is_counted_as_remaining():
    b = Builder(16)
    params = b.bn_params("p", 3)
    body = helper.make_graph(
        [helper.make_node("BatchNormalization", ["x", *params], ["t"], name="bn_inner")],
        "then_body", [], [helper.make_tensor_value_info("t", F32, None)])
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else_body", [],
        [helper.make_tensor_value_info("e", F32, None)])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=body, else_branch=other)]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", F32, (1, 3, 2, 2)),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, ())],
        [helper.make_tensor_value_info("y", F32, None)], initializer=b.inits)
    m = finish(graph)
    assert count_batchnorms(m) == 1
    folded, report = fold_batchnorms(m)
    assert report.to_dict() == {"found": 1, "folded_into_conv": 0, "converted_to_affine": 0, "remaining": 1}
    # initializers read from inside the subgraph are kept
    assert len(folded.graph.initializer) == 4
    with pytest.raises(ModelError, match="bn_inner"):
        assert_no_batchnorm(folded)


def test_unnamed_bn_is_named_by_output():
    b = Builder(17)
    b.nodes.append(helper.make_node("BatchNormalization", ["x", *b.bn_params("p", 2)], ["out_y"]))
    m = b.model({"x": (1, 2, 3, 3)}, ["out_y"])
    with pytest.raises(ModelError, match="out_y"):
        assert_no_batchnorm(m)


def test_no_batchnorm_is_a_no_op():
    b = Builder(18)
    b.conv("x", "y", 3, 2)
    m = b.model({"x": (1, 3, 4, 4)}, ["y"])
    folded, report = fold_batchnorms(m)
    assert report.to_dict() == {"found": 0, "folded_into_conv": 0, "converted_to_affine": 0, "remaining": 0}
    assert folded.SerializeToString() == m.SerializeToString()
    assert folded is not m
