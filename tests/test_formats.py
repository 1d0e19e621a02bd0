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


def test_every_artefact_has_a_card_sidecar_any_client_reads_and_a_foreign_one_is_refused(trained: Trained, tmp_path: Path) -> None:
    """onnxruntime-node/web and OpenCV cannot read ONNX metadata: the card, the file's sha256 and the self-test vectors
    (raw uint8 crops and reference probabilities as numbers) travel beside the model as plain JSON."""
    import json
    import shutil

    import numpy as np

    from edgedx.card import ModelCard
    from edgedx.errors import ModelError
    from edgedx.runtime import load_model
    from edgedx.runtime.io.integrity import sha256_file
    from edgedx.runtime.selftest import SELFTEST_KEY, SelfTestVectors

    model_path = Path(trained.onnx)
    sidecar = model_path.with_name(model_path.name + ".card.json")
    data = json.loads(sidecar.read_text(encoding="utf-8"))
    assert data["artefact"] == {"file": model_path.name, "sha256": sha256_file(model_path), "format": "onnx", "precision": "fp32"}
    loaded = load_model(model_path)
    assert ModelCard.from_dict(data["card"]) == loaded.card
    plain = data["selftest"]
    crops = np.frombuffer(__import__("base64").b64decode(plain["crops_base64"]), np.uint8).reshape(plain["crops_shape"])
    embedded = SelfTestVectors.from_text(
        next(p.value for p in onnx.load(str(model_path)).metadata_props if p.key == SELFTEST_KEY), "m"
    )
    assert np.array_equal(crops, embedded.crops) and np.allclose(plain["reference"], embedded.reference, atol=1e-7)

    copy = tmp_path / "copy"
    shutil.copytree(model_path.parent, copy)
    foreign = json.loads((copy / sidecar.name).read_text(encoding="utf-8"))
    foreign["artefact"]["sha256"] = "0" * 64
    (copy / sidecar.name).write_text(json.dumps(foreign), encoding="utf-8")
    with pytest.raises(ModelError, match=r"model.onnx.card.json belongs to another file \(sha256 000000000000…"):
        load_model(copy / model_path.name)
    (copy / sidecar.name).unlink()
    assert load_model(copy / model_path.name).card == loaded.card  # no sidecar: the card inside the file is enough


def test_fixed_batch_exports_static_shapes_that_phones_take_whole_and_the_runtime_feeds(trained: Trained, tmp_path: Path) -> None:
    """--mobile .ort files are fixed to batch 1 (NNAPI/CoreML take no node with a dynamic dimension); --fixed-batch N
    makes every graph static; the runtime feeds such a graph N crops at a time, whatever the batch it was given."""
    import json

    import numpy as np

    from edgedx.export.pipeline import ExportOptions, export_checkpoint
    from edgedx.runtime import load_model
    from edgedx.runtime.io.image_io import read_image

    report = export_checkpoint(trained.checkpoint, tmp_path / "fixed", ExportOptions(mobile=True, fixed_batch=4))
    graph = onnx.load(str(report.onnx_path))
    assert [d.dim_value for d in graph.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 32, 32]
    ort_entry = next(a for a in json.loads(report.report_path.read_text())["artefacts"] if a["format"] == "ort")
    assert ort_entry["fixed_batch"] == 4 and ort_entry["parity"]["passed"]
    usability = ort_entry["mobile_usability"]
    for engine in ("nnapi", "coreml"):
        fixed, dynamic = usability["batch_fixed_to_4"][engine], usability["as_exported"][engine]
        assert fixed["supported_nodes"] >= dynamic["supported_nodes"] and fixed["nodes"] > 0
    # the default export has a dynamic batch: its .ort is fixed to batch 1, and that is what lets phones take it whole
    mobile = export_checkpoint(trained.checkpoint, tmp_path / "mobile", ExportOptions(mobile=True))
    entry = next(a for a in json.loads(mobile.report_path.read_text())["artefacts"] if a["format"] == "ort")
    before, after = entry["mobile_usability"]["as_exported"]["nnapi"], entry["mobile_usability"]["batch_fixed_to_1"]["nnapi"]
    assert entry["fixed_batch"] == 1 and after["supported_nodes"] == after["nodes"] > before["supported_nodes"]

    image = read_image(sorted(Path(trained.data).rglob("*.png"))[0])
    field = np.tile(image, (3, 3, 1))[:90, :70]  # several crops, fed in batches of 7: chunks of 4 and a padded 3
    fixed_model = load_model(report.onnx_path, batch_size=7)
    dynamic_model = load_model(trained.onnx, batch_size=7)
    a, b = fixed_model.diagnose(field), dynamic_model.diagnose(field)
    assert a.n_crops == b.n_crops > 7
    np.testing.assert_allclose(a.sliding.probabilities, b.sliding.probabilities, atol=1e-4)


def test_export_says_which_file_to_ship_where(trained: Trained) -> None:
    import json

    from edgedx.export.recommend import recommend

    def entry(path: str, fmt: str, precision: str, passed: bool = True) -> dict:
        return {"path": path, "format": fmt, "precision": precision, "parity": {"passed": passed}}

    artefacts = [entry("model.onnx", "onnx", "fp32"), entry("model.int8.onnx", "onnx", "int8"), entry("model.fp16.onnx", "onnx", "fp16", False),
                 entry("model.ort", "ort", "fp32"), entry("model.fp16.ort", "ort", "fp16")]
    rows = {r["target"]: r for r in recommend(artefacts, {"model.onnx": 200.0, "model.int8.onnx": 410.0}, "Intel Xeon")}
    assert rows["PC CPU (ONNX Runtime)"]["file"] == "model.int8.onnx" and "2.05× model.onnx" in rows["PC CPU (ONNX Runtime)"]["why"]
    assert "run edgedx verify there" in rows["PC CPU (ONNX Runtime)"]["why"]
    assert rows["NVIDIA GPU"]["file"] == "model.onnx" and "--engine" in rows["NVIDIA GPU"]["why"]  # the fp16 file failed: never offered
    phone = rows["Android/iOS (ONNX Runtime Mobile)"]
    assert phone["file"] == "model.ort" and "model.fp16.ort computes in fp32 on phone CPUs" in phone["why"]
    assert rows["browser (onnxruntime-web)"]["file"] == "model.onnx" and "model.onnx.card.json" in rows["browser (onnxruntime-web)"]["why"]
    slow_int8 = {r["target"]: r for r in recommend(artefacts, {"model.onnx": 200.0, "model.int8.onnx": 100.0}, "AMD EPYC")}
    assert slow_int8["PC CPU (ONNX Runtime)"]["file"] == "model.onnx"  # int8 that does not pay here is not recommended here

    report = json.loads(Path(trained.export_report).read_text())
    targets = {r["target"]: r["file"] for r in report["recommendations"]}
    assert targets["PC CPU (ONNX Runtime)"] == "model.onnx" and "no .ort file was made" in str(report["recommendations"])
