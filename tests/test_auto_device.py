"""--device auto: the fastest verified (file, engine) here, chosen by measuring, cached per machine, and said."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import Trained
from edgedx.errors import ModelError


def test_auto_measures_verified_candidates_picks_the_fastest_and_caches(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgedx.runtime import auto, load_model

    folder = tmp_path / "export"
    shutil.copytree(Path(trained.onnx).parent, folder)
    monkeypatch.setenv("EDGEDX_CACHE", str(tmp_path / "cache"))
    choice = auto.choose(folder / "model.onnx", batch_size=4)
    assert not choice.cached and {c.device for c in choice.candidates} >= {"cpu"}
    timed = [c for c in choice.candidates if c.images_per_s]
    assert choice.device == max(timed, key=lambda c: c.images_per_s).device and choice.path == folder / "model.onnx"
    assert choice.describe().startswith("--device auto chose model.onnx on ") and "self-test passed here" in choice.describe()
    again = auto.choose(folder / "model.onnx", batch_size=4)
    assert again.cached and again.device == choice.device  # the second start does not measure again
    assert json.loads((tmp_path / "cache" / "auto.json").read_text())
    assert load_model(folder, device="auto", batch_size=4).session.device == choice.device


def test_a_candidate_that_fails_its_self_test_here_is_never_chosen(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgedx.runtime import auto
    from edgedx.runtime.selftest import SelfTestReport

    monkeypatch.setenv("EDGEDX_CACHE", str(tmp_path / "cache"))

    def failing(session, vectors):  # this machine rounds differently from the export machine
        return SelfTestReport(8, 0.2, 0.5, 0.5, False, "int8", vectors.tolerances, tuple(session.providers), "")

    monkeypatch.setattr(auto, "run_selftest", failing)
    with pytest.raises(ModelError, match="--device auto found no verified path .* self-test FAILED"):
        auto.choose(Path(trained.onnx), batch_size=4)
