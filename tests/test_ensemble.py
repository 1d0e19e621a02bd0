"""Fold ensembles: K fold models averaged inside one network, saved as one checkpoint, exported and verified as one file."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("onnx")

from torch import nn  # noqa: E402

from edgedx.card import Calibration, CropPolicy, ModelCard, Provenance  # noqa: E402
from edgedx.errors import InputError, ModelError  # noqa: E402
from edgedx.training.checkpoint import build_model, load_checkpoint, save_checkpoint  # noqa: E402
from edgedx.training.ensemble import (  # noqa: E402
    ENSEMBLE_NAME, FoldEnsemble, ensemble_card, ensemble_from_folds, fold_checkpoints, save_ensemble, write_ensemble_split,
)
from edgedx.training.models import create_model  # noqa: E402

FAST = {"arch": "resnet10t", "weights": "none", "input_size": 16, "batch_size": 8, "epochs": 1, "lr": 3e-3, "gradcam_samples": 0,
        "plots": False, "positive_class": "light"}


class Tiny(nn.Module):
    """Conv + batch norm + linear head: small, and with a batch norm for export to fold."""

    def __init__(self, n_classes: int, scale: float = 3.0) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, n_classes)
        nn.init.normal_(self.head.weight, std=scale)
        self.body[1].running_mean.uniform_(-0.5, 0.5)
        self.body[1].running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def make_card(task: str = "binary", n: int = 2, **overrides: object) -> ModelCard:
    names = ("dark", "light") if task == "binary" else tuple(f"c{i}" for i in range(n))
    fields: dict = dict(
        arch="resnet10t", task=task, class_names=names, input_size=(16, 16), crop=CropPolicy((16, 16), (16, 16), mode="fit"),
        provenance=Provenance("0.1.0", "2025-01-01T00:00:00Z", training={"epochs": 1}), positive_class="light" if task == "binary" else None,
        output_activation="sigmoid" if task == "multilabel" else "softmax",
    )
    return ModelCard(**{**fields, **overrides})


@pytest.mark.parametrize(("activation", "n_classes", "temperatures"), [
    ("softmax", 2, [[0.6], [1.7]]),  # binary
    ("softmax", 4, [[0.4], [2.5]]),  # multiclass
    ("sigmoid", 3, [[0.5, 1.0, 2.0], [1.5, 0.8, 3.0]]),  # multilabel, one temperature per label
])
def test_the_output_s_activation_is_the_mean_of_the_members_calibrated_probabilities(activation: str, n_classes: int, temperatures: list) -> None:
    torch.manual_seed(0)
    members = [Tiny(n_classes).eval(), Tiny(n_classes).eval()]
    ensemble = FoldEnsemble(members, torch.tensor(temperatures), activation).eval()
    x = torch.randn(5, 3, 12, 12) * 2
    act = (lambda z: torch.softmax(z, -1)) if activation == "softmax" else torch.sigmoid
    with torch.no_grad():
        expected = torch.stack([act(m(x) / torch.tensor(t)) for m, t in zip(members, temperatures)]).mean(0)
        got = act(ensemble(x))
        far = FoldEnsemble(members, torch.tensor(temperatures) * 1e-3, activation)(x * 100)  # members certain: logits in the thousands
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.isfinite(far).all()


def test_the_ensemble_exports_to_one_graph_with_every_batch_norm_folded_and_stays_finite_in_fp16() -> None:
    import onnxruntime as ort

    from edgedx.export.bn_fold import assert_no_batchnorm, fold_batchnorms
    from edgedx.export.onnx_export import torch_to_onnx
    from edgedx.export.precision import to_fp16

    torch.manual_seed(1)
    card = make_card("multilabel", 3)
    ensemble = FoldEnsemble([Tiny(3, scale=300.0), Tiny(3, scale=300.0)], torch.tensor([[0.5, 1.0, 2.0], [1.5, 0.8, 3.0]]), "sigmoid").eval()
    graph, _ = fold_batchnorms(torch_to_onnx(ensemble, card))
    assert_no_batchnorm(graph)
    assert len(graph.graph.input) == 1 and len(graph.graph.output) == 1
    x = (torch.randn(16, 3, 16, 16) * 50).numpy()
    with torch.no_grad():
        reference = ensemble(torch.from_numpy(x)).numpy()
    for model in (graph, to_fp16(graph)):
        out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        assert np.isfinite(out).all()  # ReduceLogSumExp or Log(Sigmoid) would give -inf in fp16 here
        assert np.abs(1 / (1 + np.exp(-out)) - 1 / (1 + np.exp(-reference))).max() < 5e-3


def test_members_that_differ_cannot_be_averaged() -> None:
    cards = [make_card("multiclass", 3), make_card("multiclass", 3, class_names=("c0", "c1", "other"))]
    with pytest.raises(InputError, match=r"member 1 has class_names \['c0', 'c1', 'other'\]"):
        ensemble_card(cards, fitted_on={})
    with pytest.raises(InputError, match="member 1 has input_size"):
        ensemble_card([make_card(), make_card(input_size=(32, 32), crop=CropPolicy((32, 32), (32, 32), mode="fit"))], fitted_on={})


def test_the_ensemble_card_moves_the_temperatures_into_the_graph() -> None:
    cards = [make_card(calibration=Calibration("temperature", (0.7,))), make_card(calibration=Calibration("temperature", (1.3,)))]
    card = ensemble_card(cards, fitted_on={"folds": ["fold_1", "fold_2"]})
    assert card.ensemble.members == 2 and card.ensemble.combine == "mean_probability"
    assert card.ensemble.fitted_on == {"folds": ["fold_1", "fold_2"], "temperatures": [[0.7], [1.3]]}
    assert card.calibration.method == "none" and card.provenance.training == {"epochs": 1, "ensemble_of": 2}
    assert ModelCard.from_json(card.to_json()) == card


def test_a_saved_ensemble_loads_back_as_the_same_network(tmp_path: Path) -> None:
    torch.manual_seed(2)
    members = []
    for k, t in enumerate((0.8, 1.9)):
        card = make_card(calibration=Calibration("temperature", (t,)))
        members.append(load_checkpoint(save_checkpoint(tmp_path / f"fold_{k + 1}.pt", card, create_model("resnet10t", 2).state_dict())))
    card = ensemble_card([m.card for m in members], fitted_on={})
    loaded = load_checkpoint(save_ensemble(tmp_path / ENSEMBLE_NAME, card, members))
    assert [m["path"] for m in loaded.extra["ensemble"]["members"]] == [str(m.path) for m in members]
    model = build_model(loaded)
    assert isinstance(model, FoldEnsemble) and model.temperatures.flatten().tolist() == pytest.approx([0.8, 1.9])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(build_model(m)(x) / t, -1) for m, t in zip(members, (0.8, 1.9))]).mean(0)
        assert torch.allclose(torch.softmax(model(x), -1), expected, atol=1e-6)
    bad = load_checkpoint(loaded.path)
    bad.state_dict = {k: v for k, v in bad.state_dict.items() if not k.startswith("members.1.")}
    with pytest.raises(ModelError, match="weights do not fit an ensemble of 2 resnet10t networks.*Missing key"):
        build_model(bad)


def test_a_folder_with_one_fold_or_an_unfinished_fold_is_refused_naming_it(tmp_path: Path) -> None:
    (tmp_path / "fold_1").mkdir()
    (tmp_path / "fold_1" / "model.pt").write_bytes(b"")
    (tmp_path / "fold_1" / "card.json").write_text("{}")
    with pytest.raises(InputError, match="holds 1 fold folder.*at least 2"):
        ensemble_from_folds(tmp_path)
    (tmp_path / "fold_2").mkdir()
    with pytest.raises(InputError, match=r"fold_2[/\\]model.pt is missing: fold_2's training did not finish.*--folds 2 --overwrite"):
        ensemble_from_folds(tmp_path)
    (tmp_path / "cv_summary.json").write_text(json.dumps({"folds": 3}))
    (tmp_path / "fold_2" / "model.pt").write_bytes(b"")
    os.utime(tmp_path / "fold_2" / "model.pt", (time.time() + 5, time.time() + 5))
    (tmp_path / "fold_2" / "card.json").write_text("{}")
    with pytest.raises(InputError, match="fold_2[/\\\\]model.pt is not final"):
        fold_checkpoints(tmp_path)
    os.utime(tmp_path / "fold_2" / "card.json", (time.time() + 10, time.time() + 10))
    with pytest.raises(InputError, match=r"fold_3[/\\]model.pt is missing.*3 folds"):  # cv_summary.json says 3
        fold_checkpoints(tmp_path)


def test_the_ensemble_is_verified_on_the_test_items_every_fold_held_out(tmp_path: Path) -> None:
    data = tmp_path / "data"
    folds = []
    for k, (train, val) in enumerate(((["a", "b"], ["c"]), (["a", "c"], ["b"]))):
        fold = tmp_path / "cv" / f"fold_{k + 1}"
        fold.mkdir(parents=True)
        record = {"seed": 0, "class_names": ["dark", "light"], "patient_level": False, "train": [f"../../data/{i}.png" for i in train],
                  "val": [f"../../data/{i}.png" for i in val], "test": ["../../data/t.png"]}
        record.update({f"{s}_labels": ["dark"] * len(record[s]) for s in ("train", "val", "test")})
        (fold / "split.json").write_text(json.dumps(record))
        folds.append(fold / "split.json")
    record = write_ensemble_split(tmp_path / "cv" / "split.json", folds)
    assert record["val"] == record["test"] == ["../data/t.png"] and record["val_held_out"] is True
    assert record["train"] == ["../data/a.png", "../data/b.png", "../data/c.png"] and record["train_labels"] == ["dark"] * 3
    for fold in folds:  # no test split: every fold's val items, said not to be held out
        fold.write_text(json.dumps({k: v for k, v in json.loads(fold.read_text()).items() if not k.startswith("test")}))
    record = write_ensemble_split(tmp_path / "cv" / "split.json", folds)
    assert record["val"] == ["../data/c.png", "../data/b.png"] and record["val_held_out"] is False and "test" not in record
    assert os.path.normpath(tmp_path / "cv" / record["val"][0]) == os.path.normpath(data / "c.png")


# -- end to end: two folds trained, averaged, exported, diagnosed -----------------------------------------------------


@dataclass(frozen=True)
class Folds:
    data: Path
    cv: Path
    ensemble: Path
    export: Path


@pytest.fixture(scope="module")
def folds(tmp_path_factory: pytest.TempPathFactory) -> Folds:
    from edgedx.export.ensemble import export_folds
    from edgedx.export.pipeline import ExportOptions
    from edgedx.training.train import TrainConfig, train
    from test_training_loop import colour_folder

    root = tmp_path_factory.mktemp("folds")
    data = colour_folder(root / "data", n=8)
    train(data, root / "cv", TrainConfig(**FAST), folds=2)
    report = export_folds(root / "cv", root / "export", ExportOptions(precisions=("fp32", "fp16")))
    return Folds(data, root / "cv", root / "cv" / ENSEMBLE_NAME, report.report_path.parent)


def test_fold_models_export_as_one_verified_file(folds: Folds) -> None:
    import onnx

    report = json.loads((folds.export / "export_report.json").read_text())
    assert [(a["path"], a["parity"]["passed"]) for a in report["artefacts"]] == [("ensemble.onnx", True), ("ensemble.fp16.onnx", True)]
    assert report["batchnorm"]["remaining"] == 0 and report["batchnorm"]["in_model"] > 0
    assert report["verification"]["n_real"] == 16  # every training image: the folds hold no test split out
    graph = onnx.load(folds.export / "ensemble.onnx")
    assert len(graph.graph.input) == 1 and len(graph.graph.output) == 1
    card = ModelCard.from_json(next(p.value for p in graph.metadata_props if p.key == "edgedx.card"))
    assert card.ensemble.members == 2 and card.calibration.method == "none" and len(card.ensemble.fitted_on["temperatures"]) == 2
    split = json.loads((folds.cv / "split.json").read_text())
    val = [set(json.loads((folds.cv / f"fold_{i}" / "split.json").read_text())["val"]) for i in (1, 2)]
    assert len(split["val"]) == len(val[0] | val[1]) == 16 and len(split["train"]) == 16


def test_the_exported_ensemble_diagnoses_the_mean_of_its_fold_models(folds: Folds) -> None:
    from edgedx.runtime.model import load_model
    from edgedx.training.validation import diagnose_probabilities

    image = sorted((folds.data / "light").glob("*.png"))[0]
    per_fold = []
    temperatures = []
    for i in (1, 2):
        member = load_checkpoint(folds.cv / f"fold_{i}" / "model.pt")
        temperatures.append(member.card.calibration.temperature)
        _, probs, _ = diagnose_probabilities(build_model(member), member.card, [(0, image)], batch_size=8)
        per_fold.append(probs[0])
    for name in ("ensemble.onnx", "ensemble.fp16.onnx"):
        model = load_model(folds.export / name, verify=True)  # the self-test vectors the export stored
        diagnosis = model.diagnose(image)
        assert np.abs(diagnosis.sliding.probabilities - np.mean(per_fold, axis=0)).max() < (1e-4 if name == "ensemble.onnx" else 5e-3)
    assert all(len(t) == 1 for t in temperatures)  # calibrated members: their temperatures are inside the graph


def test_an_ensemble_newer_than_its_folds_is_reused_and_rebuilt_after_them(folds: Folds) -> None:
    from edgedx.export.ensemble import ensemble_checkpoint, is_cv_folder

    assert is_cv_folder(folds.cv) and not is_cv_folder(folds.cv / "fold_1") and not is_cv_folder(folds.ensemble)
    before = folds.ensemble.stat().st_mtime_ns
    assert ensemble_checkpoint(folds.cv) == folds.ensemble and folds.ensemble.stat().st_mtime_ns == before
    later = time.time() + 5
    for name in ("model.pt", "card.json"):
        os.utime(folds.cv / "fold_2" / name, (later, later))
    assert ensemble_checkpoint(folds.cv) == folds.ensemble and folds.ensemble.stat().st_mtime_ns != before  # ensemble_from_folds
    rebuilt = load_checkpoint(folds.ensemble)
    assert rebuilt.card.ensemble.fitted_on["folds"] == 2 and len(rebuilt.extra["ensemble"]["members"]) == 2
    assert (folds.cv / "split.json").stat().st_mtime_ns >= before


def test_bench_shows_how_many_networks_an_artefact_runs(folds: Folds) -> None:
    from edgedx.runtime.bench import bench_models

    report = bench_models([folds.export / "ensemble.onnx"], batch_sizes=(1,), warmup=1, min_runs=2, min_seconds=0.0)
    assert [r.members for r in report.rows] == [2]
    assert report.to_dict()["rows"][0]["members"] == 2
