"""Artefacts prove themselves where they run: self-test vectors stored at export, replayed by `edgedx verify`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from conftest import Trained
from edgedx.card import CropPolicy, ModelCard, Provenance
from edgedx.errors import ModelError
from edgedx.runtime.selftest import SELFTEST_KEY, SelfTestVectors, Tolerances, run_selftest, verify_session


def card() -> ModelCard:
    return ModelCard(
        arch="x", task="binary", class_names=("neg", "pos"), positive_class="pos", threshold=0.5, input_size=(8, 8),
        crop=CropPolicy((8, 8), (4, 4)), provenance=Provenance("0", "2026-01-01T00:00:00+00:00"),
    )


class RedSession:
    """p(pos) = mean red / 255 of the crop (as log-probabilities, which the card's softmax turns back)."""

    path, sha256, device, providers, precision, pads_batches = Path("fake.onnx"), None, "cpu", ("fake",), "fp32", False

    def __init__(self, selftest: str | None = None, shift: float = 0.0) -> None:
        self.card, self.selftest, self.shift = card(), selftest, shift

    def run(self, x: np.ndarray) -> np.ndarray:
        red = np.clip(x[:, 0].mean(axis=(1, 2)) * 0.229 + 0.485 + self.shift, 1e-3, 1 - 1e-3)  # undo ImageNet normalisation
        return np.log(np.stack([1 - red, red], axis=1))

    def close(self) -> None:
        pass


def vectors(reference_shift: float = 0.0, tolerances: Tolerances = Tolerances(1e-3, 1.0)) -> SelfTestVectors:
    rng = np.random.default_rng(3)
    crops = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    crops[:3, ..., 0] = 230  # clearly positive
    crops[3:, ..., 0] = 20  # clearly negative
    from edgedx.runtime.preprocess import model_input, to_probabilities

    reference = to_probabilities(RedSession(shift=reference_shift).run(model_input(crops, card())), card()).astype(np.float32)
    return SelfTestVectors(crops, reference, "fp32", tolerances, "6 synthetic crops")


def test_vectors_round_trip_through_text_and_pass_on_the_same_engine() -> None:
    original = vectors()
    back = SelfTestVectors.from_text(original.to_text(), "model.onnx")
    assert np.array_equal(back.crops, original.crops) and np.array_equal(back.reference, original.reference)
    assert back.tolerances == Tolerances(1e-3, 1.0) and back.precision == "fp32" and back.source == "6 synthetic crops"
    report = run_selftest(RedSession(), back)
    assert report.passed and report.n == 6 and report.max_prob_delta < 1e-6 and report.top1_agreement == 1.0
    assert report.summary().startswith("self-test passed on 6 vectors (fp32, fake): max |Δp|")


def test_an_engine_that_rounds_differently_fails_and_says_by_how_much() -> None:
    shifted = vectors(reference_shift=0.01)  # the export machine saw p 0.01 higher than this one computes
    report = run_selftest(RedSession(), shifted)
    assert not report.passed and report.max_prob_delta == pytest.approx(0.01, abs=2e-3)
    assert report.mean_prob_delta <= report.max_prob_delta and report.mean_prob_delta == pytest.approx(0.01, abs=2e-3)  # every p shifted alike
    assert report.top1_agreement == 1.0  # decisions agree, but |Δp| exceeds fp32's 1e-3
    assert run_selftest(RedSession(), vectors(0.01, Tolerances(0.05, 0.98))).passed  # within fp16's tolerances
    with pytest.raises(ModelError, match=r"does not reproduce its export on this machine: self-test FAILED on 6 vectors"):
        verify_session(RedSession(selftest=shifted.to_text()))


def test_missing_or_damaged_vectors_are_refused_not_skipped() -> None:
    with pytest.raises(ModelError, match="carries no self-test vectors .* cannot prove itself here: re-export it"):
        verify_session(RedSession(selftest=None))
    text = json.loads(vectors().to_text())
    with pytest.raises(ModelError, match="self-test vectors are damaged"):
        SelfTestVectors.from_text(json.dumps({**text, "npz_base64": "bm90IGFuIG5weg=="}), "m.onnx")
    with pytest.raises(ModelError, match="format 99; this EdgeDx reads formats 1, 2: upgrade EdgeDx"):
        SelfTestVectors.from_text(json.dumps({**text, "format": 99}), "m.onnx")


def test_the_cli_prints_the_comparison_and_exits_1_on_a_failure() -> None:
    from typer.testing import CliRunner

    from edgedx.cli import app

    runner = CliRunner()
    good = run_selftest(RedSession(), vectors())
    bad = run_selftest(RedSession(), vectors(0.01))
    with mock.patch("edgedx.runtime.selftest.verify_artefact", return_value=good) as verify:
        result = runner.invoke(app, ["verify", "export dir/model.onnx", "--device", "cuda"])
    assert result.exit_code == 0 and "self-test passed on 6 vectors" in result.output
    verify.assert_called_once_with(Path("export dir/model.onnx"), "cuda")
    with mock.patch("edgedx.runtime.selftest.verify_artefact", return_value=bad):
        result = runner.invoke(app, ["verify", "m.onnx"])
    assert result.exit_code == 1 and "self-test FAILED" in result.output and "does not reproduce its export" in result.output


def test_the_cli_verifies_a_bundle_file_by_file() -> None:
    from typer.testing import CliRunner

    from edgedx.cli import app
    from edgedx.runtime.selftest import BundleCheck

    good = run_selftest(RedSession(), vectors())
    bad = run_selftest(RedSession(), vectors(0.01))
    runner = CliRunner()
    with mock.patch("edgedx.runtime.selftest.verify_bundle", return_value=BundleCheck(7, (("model.onnx", good), ("model.int8.onnx", bad)))) as check:
        result = runner.invoke(app, ["verify", "m.edgedx-bundle.zip"])
    check.assert_called_once_with(Path("m.edgedx-bundle.zip"), "cpu")
    assert result.exit_code == 1 and "all 7 files match the bundle's sha256 manifest" in result.output
    assert "model.onnx: self-test passed" in result.output and "model.int8.onnx: self-test FAILED" in result.output


def _tampered_copy(source: Path, folder: Path) -> Path:
    """The exported model with one reference probability of its vectors changed, checksum rewritten."""
    import onnx

    from edgedx.runtime.io.integrity import write_checksum

    folder.mkdir()
    target = folder / "tampered.onnx"
    graph = onnx.load(str(source))
    entry = next(p for p in graph.metadata_props if p.key == SELFTEST_KEY)
    stored = SelfTestVectors.from_text(entry.value, str(source))
    reference = stored.reference.copy()
    reference[0] = reference[0][::-1]  # one vector's probabilities swapped: a decision flips
    entry.value = SelfTestVectors(stored.crops, reference, stored.precision, stored.tolerances, stored.source).to_text()
    onnx.save(graph, str(target))
    write_checksum(target)
    return target


def test_an_exported_model_carries_vectors_and_verifies_here_and_a_tampered_one_is_refused(trained: Trained, tmp_path: Path) -> None:
    from edgedx.runtime import load_model
    from edgedx.runtime.batch import diagnose_paths
    from edgedx.runtime.selftest import verify_artefact

    report = verify_artefact(trained.onnx)
    assert report.passed and report.n == 8 and report.precision == "fp32" and report.max_prob_delta < 1e-3
    assert "val split" in report.source  # real validation crops of the run, not synthetic ones
    assert load_model(trained.onnx, verify=True).verification.passed
    export_report = json.loads(Path(trained.export_report).read_text())
    assert export_report["selftest"]["n_vectors"] == 8

    tampered = _tampered_copy(Path(trained.onnx), tmp_path / "copy")
    assert not verify_artefact(tampered).passed
    with pytest.raises(ModelError, match="does not reproduce its export on this machine"):
        load_model(tampered, verify=True)

    image = sorted(Path(trained.data).rglob("*.png"))[0]
    out = tmp_path / "out" / "results.jsonl"
    diagnose_paths([image], trained.onnx, out, verify=True)
    manifest = json.loads(out.with_name("results.jsonl.run.json").read_text())
    assert manifest["evidence"]["selftest"]["passed"] is True and manifest["evidence"]["selftest"]["n"] == 8
    with pytest.raises(ModelError, match="does not reproduce its export"):
        diagnose_paths([image], tampered, tmp_path / "out2" / "r.jsonl", verify=True)
    shutil.rmtree(tmp_path / "copy")


def test_a_vendor_bundle_checks_its_manifest_and_replays_every_model(trained: Trained, tmp_path: Path) -> None:
    import zipfile

    from edgedx.export.pipeline import ExportOptions, export_checkpoint
    from edgedx.runtime.selftest import verify_bundle

    report = export_checkpoint(trained.checkpoint, tmp_path / "export dir", ExportOptions(mobile=True, bundle=True, embed_resample=True))
    bundle = report.bundle_path
    assert bundle is not None and bundle.name == "model.edgedx-bundle.zip"
    names = set(zipfile.ZipFile(bundle).namelist())
    assert {"model.onnx", "model.onnx.sha256", "model.onnx.card.json", "model.ort", "model.ort.card.json",
            "model.resample.onnx", "model.resample.onnx.sha256", "export_report.json", "README.md", "MANIFEST.json"} <= names
    readme = zipfile.ZipFile(bundle).read("README.md").decode()
    assert "## Intended use" in readme and "p(parasitized) ≥" in readme and "edgedx verify model.edgedx-bundle.zip" in readme
    checked = verify_bundle(bundle)
    assert checked.passed and checked.files == len(names) - 1 and [n for n, _ in checked.reports] == ["model.onnx", "model.ort"]

    tampered = tmp_path / "tampered.edgedx-bundle.zip"
    with zipfile.ZipFile(bundle) as source, zipfile.ZipFile(tampered, "w") as target:
        for name in source.namelist():
            data = source.read(name)
            target.writestr(name, data.replace(b"research", b"RESEARCH") if name == "README.md" else data)
    with pytest.raises(ModelError, match=r"README.md do\(es\) not match the bundle's manifest"):
        verify_bundle(tampered)
