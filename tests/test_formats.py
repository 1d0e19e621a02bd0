"""Formats that load where they must: the lowest ONNX IR version the opset allows (older ONNX Runtime in apps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Trained

onnx = pytest.importorskip("onnx")


def test_exported_onnx_uses_the_lowest_ir_version_its_opset_allows(trained: Trained) -> None:
    from edgedx.export.onnx_export import lowest_ir_version
    from edgedx.runtime import load_model

    model = onnx.load(str(trained.onnx))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == 18 and lowest_ir_version(model) == 8  # ONNX 1.13's IR: ONNX Runtime 1.14+ loads it, not only 1.18+
    assert model.ir_version == 8
    onnx.checker.check_model(model, full_check=True)
    assert load_model(Path(trained.onnx)).card.class_names  # and the runtime still loads and reads it


def test_a_higher_opset_keeps_the_ir_it_needs() -> None:
    from edgedx.export.onnx_export import lowest_ir_version, with_lowest_ir_version

    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
                                   [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    assert lowest_ir_version(model) == 10  # opset 21 arrived with IR 10
    model.ir_version = 9  # never raised: an older stamp stays
    assert with_lowest_ir_version(model).ir_version == 9
