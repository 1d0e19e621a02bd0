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
    chosen = next(c for c in timed if c.device == choice.device)
    assert chosen.images_per_s >= auto.SPEED_TIE * max(c.images_per_s for c in timed) and choice.path == folder / "model.onnx"
    assert all(c.selftest_delta is not None for c in timed)  # each timed path says how closely it reproduced its export
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


def test_among_paths_equally_fast_within_the_timing_noise_the_most_faithful_is_chosen(tmp_path: Path) -> None:
    from edgedx.runtime.auto import AutoChoice, Candidate, _pick

    files = [tmp_path / n for n in ("model.onnx", "model.int8.onnx", "model.int8-avx2.onnx")]
    # measured on the AMD EPYC: the two int8 files swap order from one brief timing to the next
    candidates = (
        Candidate("model.onnx", "cpu", 1400.0, None, 1e-5),
        Candidate("model.int8.onnx", "cpu", 2509.0, None, 0.038),
        Candidate("model.int8-avx2.onnx", "cpu", 2430.0, None, 0.0004),
        Candidate("model.int8-avx2.onnx", "openvino", None, "self-test FAILED"),
    )
    choice = _pick(files[0], files, candidates, cached=False)
    assert (choice.path, choice.device) == (files[2], "cpu")  # 0.97× the fastest, and it strays 100× less
    text = choice.describe()
    assert text.startswith("--device auto chose model.int8-avx2.onnx on cpu: 2430 crops/s")
    assert "next model.int8.onnx on cpu 2509 crops/s (as fast within 5%" in text and "mean |Δp| 0.0004 against 0.038" in text
    # outside the band speed wins, however faithful the slower path; unknown deltas (an older cache) rank last
    slower = candidates[:2] + (Candidate("model.int8-avx2.onnx", "cpu", 2171.0, None, 0.0),)
    assert _pick(files[0], files, slower, cached=True).path == files[1]
    unknown = (Candidate("model.int8.onnx", "cpu", 2509.0), Candidate("model.int8-avx2.onnx", "cpu", 2430.0))
    assert _pick(files[0], files, unknown, cached=True).path == files[1]
    assert isinstance(choice, AutoChoice) and "as fast within" not in _pick(files[0], files, slower, cached=True).describe()
