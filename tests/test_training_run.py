"""The run folder (edgedx.training.run) and the torch-free half of edgedx.training: no torch needed here.

A run folder is written by hand (split.json through the real writer, a card
naming the source), so reading it back is checked without training a model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgedx.card import CropPolicy, ModelCard, Provenance
from edgedx.errors import InputError
from edgedx.runtime.io.image_io import write_image
from edgedx.training.run import CARD_NAME, RunFolder, SplitUnavailable, check_run_folder, jsonable, write_json
from edgedx.training.sources import load_source

TORCH_FREE = ("sources", "splits", "crops", "data", "run", "threshold")


def folder_run(tmp_path: Path, *, source: str | None = None) -> tuple[RunFolder, ModelCard, list[Path]]:
    """Two classes of four images each; a run folder whose split puts images 0-1 of each class in val."""
    data = tmp_path / "data"
    for cls, value in (("benign", 60), ("malignant", 190)):
        (data / cls).mkdir(parents=True)
        for i in range(4):
            write_image(data / cls / f"{i}.png", np.full((9, 9, 3), value + i, np.uint8))
    listed = load_source(data)
    val = np.array([i for i, item in enumerate(listed.ids) if Path(item).stem in ("0", "1")])
    splits = {"train": np.setdiff1d(np.arange(len(listed)), val), "val": val}
    run = RunFolder(tmp_path / "runs" / "one")
    run.create()
    run.write_split(listed, splits, seed=0)
    card = ModelCard(
        arch="x", task="binary", class_names=("benign", "malignant"), positive_class="malignant", threshold=0.5,
        input_size=(8, 8), crop=CropPolicy((8, 8), (4, 4)),
        provenance=Provenance("0", "2026-01-01T00:00:00+00:00", data_summary={"source": source or str(data.resolve())},
                              training={"label_column": "label", "suffix": ""}),
    )
    return run, card, [Path(listed.ids[i]) for i in val]


def test_the_run_folder_names_its_files() -> None:
    run = RunFolder("out/run")
    assert (run.checkpoint.name, run.last.name, run.split_file.name) == ("model.pt", "last.pt", "split.json")
    assert (run.plots.name, run.gradcam.name) == ("plots", "gradcam")
    assert run.fold(0).path == Path("out/run/fold_1")


def test_an_existing_run_is_never_silently_overwritten(tmp_path: Path) -> None:
    """The --resume / --overwrite rule, on the run's own file names (a plain options object stands in for TrainConfig)."""
    from types import SimpleNamespace

    fresh, resume, overwrite = (SimpleNamespace(resume=r, overwrite=o) for r, o in ((False, False), (True, False), (False, True)))
    check_run_folder(tmp_path, fresh)  # type: ignore[arg-type]
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(InputError, match=r"already holds a training run \(model.pt\); continue it with --resume"):
        RunFolder(tmp_path).check_free(fresh)  # type: ignore[arg-type]
    check_run_folder(tmp_path, resume)  # type: ignore[arg-type]
    check_run_folder(tmp_path, overwrite)  # type: ignore[arg-type]


def test_json_files_are_plain_json_with_nan_as_null(tmp_path: Path) -> None:
    value = {"a": np.float32(0.5), "b": (1, np.int64(2)), "c": np.array([[1.0, float("nan")]]), 3: float("inf")}
    assert jsonable(value) == {"a": 0.5, "b": [1, 2], "c": [[1.0, None]], "3": None}
    write_json(tmp_path / "x.json", value)
    text = (tmp_path / "x.json").read_text(encoding="utf-8")
    assert text.endswith("}\n") and json.loads(text)["c"] == [[1.0, None]] and text.startswith('{\n  "a": 0.5')


def test_split_images_reads_the_held_out_images_back_with_their_labels(tmp_path: Path) -> None:
    run, card, val = folder_run(tmp_path)
    assert json.loads(run.split_file.read_text())["val"][0].startswith("../../data/")  # stored relative to the run
    held = run.split_images("val", limit=10, seed=0, card=card)
    assert sorted(held.items) == sorted(val)
    assert [card.class_names[k] for k in held.labels] == [p.parent.name for p in held.items]
    assert held.source.startswith(f"val split of {run.path} (")
    assert len(run.split_images("train", limit=3, card=card).items) == 3
    assert run.split_images("val", limit=2, seed=5, card=card).items == run.split_images("val", limit=2, seed=5, card=card).items

    (run.path / CARD_NAME).write_text(card.to_json() + "\n", encoding="utf-8")  # without a card: the run's card.json
    assert sorted(RunFolder(run.path).split_images("val", limit=10).items) == sorted(val)


def test_a_relative_source_is_found_beside_the_run_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run, card, val = folder_run(tmp_path, source="data")  # as recorded when training ran in tmp_path
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert sorted(run.split_images("val", limit=10, card=card).items) == sorted(val)


def test_split_images_says_why_it_cannot(tmp_path: Path) -> None:
    run, card, _ = folder_run(tmp_path)
    with pytest.raises(SplitUnavailable, match="lists no test images"):
        run.split_images("test", limit=4, card=card)
    nowhere = card.replace(provenance=Provenance("0", "2026-01-01T00:00:00+00:00", data_summary={"source": str(tmp_path / "gone")}))
    with pytest.raises(SplitUnavailable, match=r"the training data .*gone is not found \(tried as given and beside"):
        run.split_images("val", limit=4, card=nowhere)
    unrecorded = card.replace(provenance=Provenance("0", "2026-01-01T00:00:00+00:00"))
    with pytest.raises(SplitUnavailable, match="the card records no training data source"):
        run.split_images("val", limit=4, card=unrecorded)
    with pytest.raises(SplitUnavailable, match=r"split.json is missing \(the checkpoint was moved out of its run folder\)"):
        RunFolder(tmp_path / "empty").split_images("val", limit=4, card=card)
    with pytest.raises(SplitUnavailable, match="card.json"):
        run.split_images("val", limit=4)  # no card given and none written
    run.split_file.write_text("{not json", encoding="utf-8")
    with pytest.raises(SplitUnavailable, match="cannot read .*split.json"):
        run.split_images("val", limit=4, card=card)


def test_npz_items_come_back_as_arrays(tmp_path: Path) -> None:
    """``file.npz:val[3]`` ids stay as they are in split.json and come back as the arrays."""
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, train_images=rng.integers(0, 255, (6, 8, 8), dtype=np.uint8), train_labels=np.array([[0], [1]] * 3),
             val_images=rng.integers(0, 255, (4, 8, 8), dtype=np.uint8), val_labels=np.array([[0], [1], [0], [1]]))
    listed = load_source(path, class_names=("normal", "pneumonia"))
    splits = {"train": np.flatnonzero(np.asarray(listed.splits) == "train"), "val": np.flatnonzero(np.asarray(listed.splits) == "val")}
    run = RunFolder(tmp_path / "run")
    run.write_split(listed, splits, seed=0)
    assert json.loads(run.split_file.read_text())["val"][0].endswith("tiny.npz:val[0]")
    card = ModelCard(
        arch="x", task="binary", class_names=("normal", "pneumonia"), positive_class="pneumonia", threshold=0.5,
        input_size=(8, 8), crop=CropPolicy((8, 8), (4, 4)),
        provenance=Provenance("0", "2026-01-01T00:00:00+00:00", data_summary={"source": str(path)}),
    )
    held = run.split_images("val", limit=10, card=card)
    assert len(held.items) == 4 and all(isinstance(item, np.ndarray) for item in held.items)
    assert sorted(held.labels.tolist()) == [0, 0, 1, 1]


def test_the_split_code_imports_without_torch() -> None:
    """Reading a run's split and folder needs neither torch nor timm: the package import is cheap."""
    code = "import sys, edgedx.training.splits, edgedx.training.sources; assert 'torch' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert done.returncode == 0, done.stderr
    modules = ", ".join(f"edgedx.training.{m}" for m in TORCH_FREE)
    code = f"import sys, {modules}\nbad = [m for m in ('torch', 'timm', 'onnxruntime', 'onnx') if m in sys.modules]\nassert not bad, bad"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("module", ["edgedx.training.train", "edgedx.training.distributed"])
def test_without_torch_the_split_code_works_and_training_names_the_extra(module: str) -> None:
    script = (
        "import sys\nsys.modules['torch'] = None\n"
        f"import {', '.join(f'edgedx.training.{m}' for m in TORCH_FREE)}\n"
        "from edgedx.errors import MissingDependencyError\n"
        f"try:\n    import {module}\nexcept MissingDependencyError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pip install 'edgedx[train]'" in done.stdout and "'torch'" in done.stdout
