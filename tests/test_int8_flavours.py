"""int8 flavours, the exact-arithmetic self-test and accuracy-controlled quantisation, on a tiny ONNX graph.

Everything asserted here is CPU-independent: files are inspected as written,
and the quality numbers come from the exact int8 arithmetic (graph
optimisations off), which is the same on every CPU.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgedx.card import CropPolicy, ModelCard, Provenance  # noqa: E402
from edgedx.errors import InputError  # noqa: E402
from edgedx.export.int8 import (  # noqa: E402
    INT8_FLAVOURS, _segment_losses, agreement, controlled_int8, exact_probabilities, parse_flavours, quantise,
)
from edgedx.export.onnx_export import embed_metadata  # noqa: E402
from edgedx.runtime.backends.onnx_backend import OnnxSession  # noqa: E402
from edgedx.runtime.selftest import SELFTEST_TOLERANCES, SelfTestVectors, run_selftest  # noqa: E402


def card() -> ModelCard:
    return ModelCard(
        arch="x", task="binary", class_names=("neg", "pos"), positive_class="pos", threshold=0.5,
        input_size=(12, 12), crop=CropPolicy((12, 12), (6, 6)), provenance=Provenance("0", "2026-01-01T00:00:00+00:00"),
    )


def tiny_graph(path: Path, seed: int = 0) -> Path:
    """Conv → Relu → Conv → Relu → GlobalAveragePool → Flatten → Gemm: the shapes a CNN classifier has."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.normal(0, 0.4, (8, 3, 3, 3)), "b1": rng.normal(0, 0.1, 8),
        "w2": rng.normal(0, 0.3, (8, 8, 3, 3)), "b2": rng.normal(0, 0.1, 8),
        "wf": rng.normal(0, 0.8, (2, 8)), "bf": np.zeros(2),
    }
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"], name="pool"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 12, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    embed_metadata(model, {"edgedx.card": card().to_json()})
    onnx.save(model, str(path))
    return path


def crops(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 12, 12, 3), dtype=np.uint8)


def initialisers(path: Path) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_flavour_names_are_checked_and_ordered() -> None:
    assert parse_flavours("tensorrt, CPU") == ("cpu", "tensorrt")
    with pytest.raises(InputError, match="unknown int8 flavour 'avx9'; choose from cpu, cpu-avx2, tensorrt"):
        parse_flavours("cpu,avx9")
    with pytest.raises(InputError, match="unknown int8 flavour"):
        parse_flavours("")
    for flavour in INT8_FLAVOURS.values():
        assert "meant for" in flavour.about() and flavour.name in flavour.about()


@pytest.mark.parametrize("name", ["cpu", "cpu-avx2", "tensorrt"])
def test_each_flavour_writes_its_own_arithmetic(tmp_path: Path, name: str) -> None:
    """CPU flavours: uint8 activations with zero points, int8 weights (7-bit where asked); TensorRT: symmetric int8."""
    source = tiny_graph(tmp_path / "m.onnx")
    out = quantise(source, tmp_path / f"{name}.onnx", card(), crops(32, 1), INT8_FLAVOURS[name])
    values = initialisers(out)
    weights = [v for k, v in values.items() if v.dtype == np.int8 and v.ndim == 4]
    assert weights, "the convolution weights are stored as int8"
    limit = 64 if INT8_FLAVOURS[name].weight_bits == 7 else 127
    assert max(int(np.abs(w).max()) for w in weights) <= limit
    assert any(int(np.abs(w).max()) > 64 for w in weights) == (limit == 127)  # 8-bit weights use the range they have
    activation_points = [v for k, v in values.items() if "zero_point" in k and v.ndim == 0]
    if name == "tensorrt":
        assert all(v.dtype == np.int8 and int(v) == 0 for v in activation_points)
    else:
        assert all(v.dtype == np.uint8 for v in activation_points) and any(int(v) != 0 for v in activation_points)


def test_the_exact_arithmetic_is_the_unoptimised_graph(tmp_path: Path) -> None:
    source = tiny_graph(tmp_path / "m.onnx")
    out = quantise(source, tmp_path / "q.onnx", card(), crops(32, 1), INT8_FLAVOURS["cpu-avx2"])
    x = crops(16, 2)
    exact = exact_probabilities(out, card(), x)
    again = exact_probabilities(out, card(), x)
    assert np.array_equal(exact, again) and exact.shape == (16, 2)
    session = OnnxSession(out, optimise=False)
    from edgedx.runtime.preprocess import model_input, to_probabilities

    assert np.allclose(to_probabilities(session.run(model_input(x, card())), card()), exact, atol=1e-6)
    assert agreement(exact, exact, card()) == (1.0, 1.0)
    flipped = exact[:, ::-1].copy()
    assert agreement(exact, flipped, card())[0] < 1.0


class _Shifted:
    """A session that gives the exact probabilities moved by ``shift`` (a target whose kernels compute otherwise)."""

    def __init__(self, exact: np.ndarray, shift: float) -> None:
        self.card, self.providers = card(), ("FakeProvider",)
        self.exact, self.shift, self.at = exact, shift, 0

    def run(self, x: np.ndarray) -> np.ndarray:
        p = np.clip(self.exact[self.at : self.at + len(x), 1] + self.shift, 1e-6, 1 - 1e-6)
        self.at += len(x)
        return np.log(np.stack([1 - p, p], axis=1))  # softmax of log-probabilities gives them back


def test_an_int8_target_must_reproduce_the_exact_arithmetic() -> None:
    rng = np.random.default_rng(3)
    p = rng.uniform(0.05, 0.95, 32)
    exact = np.stack([1 - p, p], axis=1).astype(np.float32)
    fp32 = exact.copy()
    fp32[0] = fp32[0, ::-1]  # the file disagrees with fp32 on one crop: judged at export, not here
    vectors = SelfTestVectors(crops(32, 4), fp32, "int8", SELFTEST_TOLERANCES["int8"], "test", exact, "int8 flavour 'cpu', meant for VNNI")
    conforming = run_selftest(_Shifted(exact, 0.0), vectors)
    assert conforming.passed and conforming.exact_mean_delta == pytest.approx(0.0, abs=1e-5)
    assert conforming.top1_agreement == 1.0  # counted against the file's own arithmetic
    saturating = run_selftest(_Shifted(exact, 0.08), vectors)
    assert not saturating.passed and saturating.exact_mean_delta > SELFTEST_TOLERANCES["int8"].max_mean_exact_delta
    assert "exact int8 arithmetic" in saturating.summary() and saturating.about.startswith("int8 flavour 'cpu'")


def test_vectors_with_an_exact_reference_round_trip_and_plain_ones_stay_format_1() -> None:
    p = np.array([[0.3, 0.7], [0.9, 0.1]], np.float32)
    plain = SelfTestVectors(crops(2, 5), p, "fp32", SELFTEST_TOLERANCES["fp32"], "s")
    assert json.loads(plain.to_text())["format"] == 1 and "max_mean_exact_delta" not in json.loads(plain.to_text())["tolerances"]
    int8 = replace(plain, precision="int8", tolerances=SELFTEST_TOLERANCES["int8"], exact=p[::-1].copy(), about="a")
    for text in (int8.to_text(), json.dumps(int8.to_plain())):
        back = SelfTestVectors.from_text(text, "m")
        assert json.loads(text)["format"] == 2 and np.array_equal(back.exact, int8.exact) and back.about == "a"
        assert back.tolerances == SELFTEST_TOLERANCES["int8"]


def test_a_layer_is_blamed_for_the_noise_it_adds_not_the_noise_it_inherits(tmp_path: Path) -> None:
    """conv1's output is never measured (Q/DQ sit after the Relu): its segment (conv1, relu1) takes the loss."""
    graph = onnx.load(str(tiny_graph(tmp_path / "m.onnx")))
    sqnr = {"input": 60.0, "r1": 30.0, "r2": 27.0, "g": 26.0, "logits": 25.0}
    losses = dict(_segment_losses(graph.graph, sqnr))
    assert set(losses) == {"conv1", "conv2", "pool", "fc"}  # relu and flatten only pass values on
    assert losses["conv1"] == pytest.approx(30.0) and losses["conv2"] == pytest.approx(3.0)
    assert [n for n, _ in _segment_losses(graph.graph, sqnr)][0] == "conv1"


def test_accuracy_control_keeps_layers_float_until_the_target_or_says_it_was_not_reached(tmp_path: Path) -> None:
    source = tiny_graph(tmp_path / "m.onnx")
    flavour = INT8_FLAVOURS["cpu"]
    easy = controlled_int8(source, tmp_path / "easy.onnx", card(), crops(32, 1), crops(48, 6), flavour, target=0.0)
    assert easy.reached and easy.kept_float == [] and len(easy.steps) == 1  # all-int8 first
    hard = controlled_int8(source, tmp_path / "hard.onnx", card(), crops(32, 1), crops(48, 6), flavour, target=1.0)
    assert hard.steps[0]["n_float"] == 0
    assert hard.reached or len(hard.steps) >= 2  # not reached with every layer int8: layers were kept float
    tries = {s["n_float"]: min(s["top1_agreement"], s["decision_agreement"]) for s in hard.steps}
    assert min(hard.top1_agreement, hard.decision_agreement) == max(tries.values())  # the best try is the file
    assert len(hard.kept_float) in tries and set(hard.kept_float) <= {"conv1", "conv2", "pool", "fc"}
    quantised = onnx.load(str(hard.path)).graph
    float_weights = {i.name for i in quantised.initializer if i.data_type == TensorProto.FLOAT}
    for node in quantised.node:
        if node.op_type == "Conv":  # a conv kept float reads its float weights directly, the others a DequantizeLinear
            assert (node.input[1] in float_weights) == (node.name in hard.kept_float), node.name
    assert json.loads(json.dumps(hard.to_dict()))["flavour"]["name"] == "cpu"
    nothing = controlled_int8(source, tmp_path / "none.onnx", card(), crops(32, 1), crops(0, 6), flavour, target=0.5)
    assert not nothing.reached  # no crops to search on: nothing was reached
