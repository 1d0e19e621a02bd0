"""Precision variants, embedded preprocessing, ORT mobile files and their verification."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import Trained

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper  # noqa: E402

from edgedx.card import CropPolicy, ModelCard, Normalization, Provenance  # noqa: E402
from edgedx.errors import InputError, MissingDependencyError, ModelError  # noqa: E402
from edgedx.export.parity import TOLERANCES, Tolerance  # noqa: E402
from edgedx.export.pipeline import ExportOptions, export_checkpoint  # noqa: E402
from edgedx.export.preprocess_graph import embed_preprocessing  # noqa: E402
from edgedx.runtime.preprocess import preprocess_batch  # noqa: E402
from edgedx.runtime.selftest import SelfTestVectors  # noqa: E402


def identity_graph(h: int, w: int) -> onnx.ModelProto:
    """A float32 NCHW 'model' that returns its input, so the preprocessing itself can be read back."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["logits"])], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, h, w])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def small_card(**changes) -> ModelCard:
    base = ModelCard(
        arch="x", task="binary", class_names=("neg", "pos"), positive_class="pos", threshold=0.5, input_size=(7, 5),
        crop=CropPolicy((7, 5), (7, 5)), provenance=Provenance("0", "2026-01-01T00:00:00+00:00"),
    )
    return base.replace(**changes)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"colour_order": "BGR"},
        {"normalization": Normalization(kind="per_image")},
        {"colour_order": "BGR", "normalization": Normalization(pixel_scale=1.0, mean=(100.0, 110.0, 120.0), std=(50.0, 60.0, 70.0))},
    ],
    ids=["imagenet", "bgr", "per-image", "bgr-custom"],
)
def test_embedded_preprocessing_matches_the_runtime(changes: dict) -> None:
    card = small_card(**changes)
    graph, new_card = embed_preprocessing(identity_graph(7, 5), card)
    assert new_card.input_format == "uint8_nhwc" and new_card.replace(input_format="float32_nchw") == card
    onnx.checker.check_model(graph, full_check=True)
    [inp] = graph.graph.input
    assert inp.type.tensor_type.elem_type == TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim] == ["batch", 7, 5, 3]
    crops = np.random.default_rng(0).integers(0, 256, (3, 7, 5, 3), dtype=np.uint8)
    crops[2] = 17  # a flat crop: per-image std hits its floor
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": crops})[0]
    np.testing.assert_allclose(got, preprocess_batch(crops, card), atol=2e-5)


def test_preprocessing_is_embedded_once() -> None:
    graph, card = embed_preprocessing(identity_graph(7, 5), small_card())
    with pytest.raises(ModelError, match="already inside this graph"):
        embed_preprocessing(graph, card)


# int8 results depend on the CPU's kernels (AVX2 without VNNI, AVX-512 VNNI and AMX round differently: this
# tiny model's int8 moved probabilities by 0.03 on one and 0.067 on another). These tests check what an int8
# export writes and records, so its gate here accepts any CPU's int8; the gate itself is tested both ways with
# injected comparisons in test_export_units.py, which no CPU can change.
ANY_CPU_INT8 = Tolerance(atol=None, rtol=None, min_agreement=0.0, max_prob_delta=1.0, max_mean_prob_delta=1.0, max_accuracy_drop=1.0)


@pytest.fixture()
def any_cpu_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(TOLERANCES, "int8", ANY_CPU_INT8)


@pytest.fixture(scope="module")
def variants(trained: Trained, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("variants") / "out dir"
    # a low int8 target: the search for layers to keep float is tested on a tiny graph in test_int8_flavours.py
    options = ExportOptions(precisions=("fp32", "fp16", "int8"), mobile=True, embed_preprocessing=True, simplify=True, int8_target=0.5)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(TOLERANCES, "int8", ANY_CPU_INT8)
        return export_checkpoint(trained.checkpoint, out, options)


def test_every_variant_is_written_verified_and_reported(variants, trained: Trained) -> None:
    names = [(a["path"], a["precision"], a["format"]) for a in variants.artefacts]
    assert names == [
        ("model.onnx", "fp32", "onnx"), ("model.fp16.onnx", "fp16", "onnx"), ("model.int8.onnx", "int8", "onnx"),
        ("model.int8-avx2.onnx", "int8", "onnx"),
        ("model.ort", "fp32", "ort"), ("model.fp16.ort", "fp16", "ort"), ("model.int8.ort", "int8", "ort"),
        ("model.int8-avx2.ort", "int8", "ort"),
    ]
    report = json.loads(variants.report_path.read_text())
    assert report["artefacts"] == variants.artefacts
    for artefact in report["artefacts"]:
        parity = artefact["parity"]
        assert parity["passed"], (artefact["path"], parity["failures"])
        assert parity["n_real"] == 32 and parity["labelled"]["n"] == 32 and parity["n_crops"] >= 32
        assert 0.0 <= parity["decision_agreement"] <= 1.0 and parity["mean_prob_delta"] >= 0.0
        assert variants.path_of(artefact).stat().st_size == artefact["bytes"]
    sizes = {a["path"]: a["bytes"] for a in report["artefacts"]}
    assert sizes["model.fp16.onnx"] < 0.6 * sizes["model.onnx"]
    assert sizes["model.int8.onnx"] < 0.4 * sizes["model.onnx"]
    calibration = report["calibration"]
    assert "train split" in calibration["source"] and 0 < calibration["n_crops"] <= 128
    assert calibration["n_search_crops"] >= calibration["n_crops"] // 3  # the layers kept float are chosen on other crops
    for artefact in report["artefacts"]:
        if artefact["precision"] != "int8":
            assert "int8" not in artefact and "this_machine" not in artefact
            continue
        int8 = artefact["int8"]
        assert int8["flavour"]["name"] == ("cpu-avx2" if "avx2" in artefact["path"] else "cpu")
        assert int8["steps"][0]["n_float"] == 0  # all-int8 is tried first
        assert len(int8["kept_float"]) in {step["n_float"] for step in int8["steps"]}  # the file is one of the tries
        # whether this CPU's int8 kernels conform is recorded, whichever way it went
        assert artefact["this_machine"]["selftest"]["exact_mean_delta"] is not None
        assert artefact["this_machine"]["runs_here"] == artefact["this_machine"]["selftest"]["passed"]
    assert report["verification"]["path"].startswith("diagnose")
    assert report["input_format"] == "uint8_nhwc" and report["options"]["embed_preprocessing"] is True
    assert {"torch", "onnx", "onnxruntime"} <= set(report["versions"])
    fp32 = next(a for a in report["artefacts"] if a["path"] == "model.onnx")["parity"]
    assert fp32["max_abs_diff"] < 1e-3  # preprocessing inside the graph changes nothing


def test_variant_graphs_carry_card_precision_and_uint8_input(variants, trained: Trained) -> None:
    from edgedx.training.checkpoint import load_checkpoint

    trained_card = load_checkpoint(trained.checkpoint).card
    out = variants.report_path.parent
    for name, precision in (("model.onnx", "fp32"), ("model.fp16.onnx", "fp16"), ("model.int8.onnx", "int8")):
        graph = onnx.load(str(out / name))
        meta = {p.key: p.value for p in graph.metadata_props}
        assert meta["edgedx.precision"] == precision
        assert ModelCard.from_json(meta["edgedx.card"]) == trained_card.replace(input_format="uint8_nhwc")
        assert not any(k.startswith("onnx.") for k in meta)
        assert graph.graph.input[0].type.tensor_type.elem_type == TensorProto.UINT8
        assert graph.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
        ops = {n.op_type for n in graph.graph.node}
        assert "BatchNormalization" not in ops
        kinds = {i.data_type for i in graph.graph.initializer}
        if precision == "fp16":
            assert TensorProto.FLOAT16 in kinds
        if precision == "int8":
            assert {"QuantizeLinear", "DequantizeLinear"} <= ops and TensorProto.INT8 in kinds
            assert TensorProto.UINT8 in kinds  # the CPU flavour: uint8 asymmetric activations (zero points)
            assert json.loads(meta["edgedx.int8_flavour"])["name"] == "cpu"
            carried = SelfTestVectors.from_text(meta["edgedx.selftest"], name)
            assert carried.exact is not None and carried.exact.shape == carried.reference.shape and len(carried.crops) > 8
            assert "meant for" in carried.about
            sidecar = json.loads((out / f"{name}.card.json").read_text())
            assert sidecar["artefact"]["int8_flavour"]["name"] == "cpu" and "exact" in sidecar["selftest"]
            # preprocessing stays in float32, outside the quantised part
            pre = [n for n in graph.graph.node if n.name.startswith("edgedx_preprocess/")]
            assert pre and all(n.op_type not in ("QuantizeLinear", "DequantizeLinear") for n in pre)


def test_variants_diagnose_like_the_float_model(variants, trained: Trained) -> None:
    from edgedx.runtime import load_model
    from edgedx.synthetic import render_field

    field = render_field(np.random.default_rng(5), 237, 511, infected_fraction=0.3).image
    reference = load_model(trained.onnx).diagnose(field)
    out = variants.report_path.parent
    # int8 is left out of the numbers: how close it comes depends on the CPU's int8 kernels
    for name, atol in (("model.onnx", 1e-4), ("model.ort", 1e-4), ("model.fp16.onnx", 0.02), ("model.int8.ort", None)):
        model = load_model(out / name)
        assert model.card.input_format == "uint8_nhwc"
        got = model.diagnose(field)
        assert got.n_crops == reference.n_crops and sum(got.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        for cls, p in reference.probabilities.items():
            assert atol is None or got.probabilities[cls] == pytest.approx(p, abs=atol), name


def test_calibration_and_verification_folders(trained: Trained, tmp_path: Path, any_cpu_int8: None) -> None:
    options = ExportOptions(
        precisions=("int8",), calibration=trained.data, verify_data=trained.data, calibration_samples=20, verify_samples=40,
        int8_flavours=("cpu-avx2",), int8_target=0.5,
    )
    report = export_checkpoint(trained.checkpoint, tmp_path / "out", options)
    calibration = report.data["calibration"]
    assert calibration["source"] == str(trained.data) and calibration["n_crops"] == 20  # the ranges: 20 crops
    assert calibration["n_search_crops"] == calibration["n_images"] - 20  # the rest: where layers kept float are chosen
    assert report.data["verification"]["source"] == str(trained.data)
    assert report.data["verification"]["n_labelled"] == 40
    assert [(a["path"], a["precision"]) for a in report.artefacts] == [("model.onnx", "fp32"), ("model.int8-avx2.onnx", "int8")]


def test_without_the_run_folder_export_stops_and_names_the_options(trained: Trained, tmp_path: Path) -> None:
    lonely = tmp_path / "moved"
    lonely.mkdir()
    shutil.copy(trained.checkpoint, lonely / "model.pt")  # no split.json beside it
    with pytest.raises(InputError, match=r"cannot verify on labelled images: .*split.json is missing.*--verify-data DIR"):
        export_checkpoint(lonely / "model.pt", tmp_path / "out")  # never silently weaker
    with pytest.raises(InputError, match="--calibration DIR"):
        export_checkpoint(lonely / "model.pt", tmp_path / "out", ExportOptions(precisions=("int8",), verify_data=trained.data))
    report = export_checkpoint(lonely / "model.pt", tmp_path / "out2", ExportOptions(synthetic_verification_only=True))
    verification = report.data["verification"]
    assert "synthetic images only" in verification["source"] and "--synthetic-verification-only" in verification["source"]
    assert (verification["n_samples"], verification["n_real"], verification["n_labelled"]) == (16, 0, 0)


def test_a_relative_data_path_is_found_when_export_runs_elsewhere(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A card written when training ran with a relative data path: export from another directory still verifies on labels."""
    import dataclasses

    import torch

    from edgedx.training.checkpoint import load_checkpoint

    run = trained.root / "relative run"
    shutil.copytree(trained.checkpoint.parent, run, ignore=shutil.ignore_patterns("plots", "gradcam", "last.pt"))
    payload = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    card = load_checkpoint(run / "model.pt").card
    summary = {**card.provenance.data_summary, "source": trained.data.name}  # relative to the folder holding the run
    payload["card"] = card.replace(provenance=dataclasses.replace(card.provenance, data_summary=summary)).to_json(indent=None)
    torch.save(payload, run / "model.pt")
    monkeypatch.chdir(tmp_path)  # not where training ran
    report = export_checkpoint(run / "model.pt", tmp_path / "out")
    assert report.data["verification"]["n_labelled"] == 32


def test_verification_folder_must_name_the_model_classes(trained: Trained, tmp_path: Path) -> None:
    from edgedx.runtime.io.image_io import write_image

    for name in ("cats", "dogs"):
        (tmp_path / "wrong" / name).mkdir(parents=True)
        write_image(tmp_path / "wrong" / name / "a.png", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InputError, match=r"class folder\(s\) \['cats', 'dogs'\]"):
        export_checkpoint(trained.checkpoint, tmp_path / "out", ExportOptions(verify_data=tmp_path / "wrong"))


def test_engine_without_tensorrt_fails_before_any_work(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgedx\[trt\]'"):
        export_checkpoint(trained.checkpoint, tmp_path / "out", ExportOptions(engine=True))
    assert not (tmp_path / "out").exists()


def test_densenet_style_preactivation_bn_becomes_affine_through_the_real_exporter() -> None:
    """torch's exporter folds Conv→BN itself but keeps DenseNet's BN→ReLU→Conv and BN-after-Concat."""
    import torch
    from torch import nn

    from edgedx.export.bn_fold import count_batchnorms, fold_batchnorms
    from edgedx.export.onnx_export import check_graph, torch_to_onnx

    class DenseBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))  # foldable
            self.pre = nn.Sequential(nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))  # pre-activation
            self.after_concat = nn.BatchNorm2d(12)
            self.head = nn.Linear(12, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.stem(x))
            x = self.after_concat(torch.cat([x, self.pre(x)], dim=1))
            return self.head(x.mean(dim=(2, 3)))

    torch.manual_seed(0)
    model = DenseBlock()
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):  # non-trivial statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    card = small_card(input_size=(11, 13))
    graph = torch_to_onnx(model, card)
    assert count_batchnorms(graph) == 2  # the exporter folded only the stem
    folded, report = fold_batchnorms(graph)
    assert report.converted_to_affine == 2 and report.remaining == 0
    folded = check_graph(folded)
    x = np.random.default_rng(0).normal(size=(3, 3, 11, 13)).astype(np.float32)
    session = ort.InferenceSession(folded.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"input": x})[0], expected, atol=1e-5)


def test_quantisation_aware_fine_tuning_feeds_the_int8_export(trained: Trained, tmp_path: Path, any_cpu_int8: None) -> None:
    run = trained.checkpoint.parent.parent / "run for qat"  # beside the original run: its data paths are relative
    shutil.copytree(trained.checkpoint.parent, run, dirs_exist_ok=True)  # the fine-tuned checkpoint goes beside the copy
    with pytest.raises(InputError, match="--qat-epochs fine-tunes for int8: add int8 to --precision"):
        export_checkpoint(run / "model.pt", tmp_path / "none", ExportOptions(qat_epochs=1))
    options = ExportOptions(
        precisions=("int8",), qat_epochs=1, int8_flavours=("cpu-avx2",), int8_target=0.5, calibration_samples=16, verify_samples=32,
    )
    report = export_checkpoint(run / "model.pt", tmp_path / "out", options)
    qat = report.data["quantisation_aware"]
    assert qat["flavour"] == "cpu-avx2" and qat["epochs"] == 1 and "fine-tuned checkpoint" in qat["note"]
    assert report.data["checkpoint"] == str(run / "model.qat.pt") and (run / "model.qat.pt").is_file()
    assert [a["path"] for a in report.artefacts] == ["model.qat.onnx", "model.qat.int8-avx2.onnx"]
