"""The training loop: resume, early stopping, every task and source, threshold, transfer."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from edgedx.runtime.io.image_io import write_image  # noqa: E402
from edgedx.training.checkpoint import load_checkpoint  # noqa: E402
from edgedx.training.train import TrainConfig, train  # noqa: E402

FAST = TrainConfig(arch="resnet10t", weights="none", input_size=16, batch_size=8, epochs=2, lr=3e-3, gradcam_samples=0, plots=False, positive_class="light")


def colour_folder(root: Path, n: int = 12, seed: int = 0) -> Path:
    """Dark vs light noisy images: separable, tiny, odd-sized."""
    rng = np.random.default_rng(seed)
    for cls, value in (("dark", 50), ("light", 200)):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(root / cls / f"{i}.png", np.clip(rng.normal(value, 20, (19, 23, 3)), 0, 255).astype(np.uint8))
    return root


class Interrupt(Exception):
    pass


def test_resume_continues_exactly(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "data")
    straight = train(data, tmp_path / "a", FAST)

    def stop_in_epoch_two(stage: str, done: int, total: int, info: str = "") -> None:
        if info.startswith("epoch 2/2 loss"):
            raise Interrupt

    with pytest.raises(Interrupt):
        train(data, tmp_path / "b", FAST, progress=stop_in_epoch_two)
    resumed = train(data, tmp_path / "b", TrainConfig(**{**FAST.__dict__, "resume": True}))
    a = load_checkpoint(straight.checkpoint).state_dict
    b = load_checkpoint(resumed.checkpoint).state_dict
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["train_loss"] for h in straight.history] == [h["train_loss"] for h in resumed.history]
    with pytest.raises(Exception, match="already finished 2 of 2 epochs"):
        train(data, tmp_path / "b", TrainConfig(**{**FAST.__dict__, "resume": True}))


def test_early_stopping(tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    data = colour_folder(tmp_path / "data")
    steps = logging.getLogger("edgedx.steps")
    monkeypatch.setattr(steps, "propagate", False)  # as under the CLI: captured once, by the handler added here
    steps.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="edgedx.steps"):
            result = train(data, tmp_path / "run", TrainConfig(**{**FAST.__dict__, "epochs": 6, "lr": 1e-9, "patience": 1, "schedule": "plateau"}))
    finally:
        steps.removeHandler(caplog.handler)
    assert len(result.history) == 2  # epoch 2 did not beat epoch 1
    # one sentence per epoch on the step logger (the CLI keeps it on screen and in log files), saying where it was taken
    lines = [r.getMessage() for r in caplog.records if r.name == "edgedx.steps"]
    assert len(lines) == 2 and lines[0].startswith("epoch 1/6: train loss ") and lines[1].startswith("epoch 2/6: ")
    assert "(at threshold 0.50), AUC " in lines[0] and lines[0].endswith("best balanced accuracy so far")
    assert not lines[1].endswith("so far")
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["stopped_early"] is True


def test_multilabel_csv_trains_exports_and_diagnoses(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "ml data"
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(32):
        red, blue = i % 2, (i // 2) % 2
        image = np.full((20, 20, 3), 120, np.uint8)
        image[..., 0] = 230 if red else 40
        image[..., 2] = 230 if blue else 40
        image = np.clip(image + rng.normal(0, 10, image.shape), 0, 255).astype(np.uint8)
        write_image(root / "img" / f"{i}.png", image)
        rows.append({"path": f"img/{i}.png", "red": red, "blue": blue, "patient_id": f"P{i // 2}"})
    manifest = root / "labels.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "red", "blue", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    # flat one-colour probes are what this test diagnoses: the quality gate would rightly reject them (no detail)
    config = TrainConfig(**{**FAST.__dict__, "label_columns": ("red", "blue"), "epochs": 8, "plots": True, "quality_gate": False})
    result = train(manifest, tmp_path / "run", config)
    card = result.card
    assert card.task == "multilabel" and card.output_activation == "sigmoid" and card.class_names == ("red", "blue")
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert split["patient_level"] is True
    assert (tmp_path / "run" / "plots" / "radar.png").is_file()

    pytest.importorskip("onnx")
    from edgedx.export.pipeline import export_checkpoint
    from edgedx.runtime import load_model

    exported = export_checkpoint(result.checkpoint, tmp_path / "export")
    assert exported.parity["passed"]
    model = load_model(exported.onnx_path)
    both = np.zeros((16, 16, 3), np.uint8)
    both[..., 0] = both[..., 2] = 230
    diagnosis = model.diagnose(both)
    assert isinstance(diagnosis.label, list)
    neither = model.diagnose(np.full((16, 16, 3), 40, np.uint8)).probabilities
    red_only = model.diagnose(np.dstack([np.full((16, 16), 230), np.full((16, 16), 120), np.full((16, 16), 40)]).astype(np.uint8))
    assert diagnosis.label == ["red", "blue"]  # one sigmoid per label: both can be present
    assert red_only.probabilities["red"] > red_only.probabilities["blue"] + 0.2
    assert neither["red"] < diagnosis.probabilities["red"] and neither["blue"] < diagnosis.probabilities["blue"]


def test_npz_predefined_splits_and_operating_threshold(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def part(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        x = np.clip(rng.normal(60 + 120 * y[:, None, None], 25, (n, 28, 28)), 0, 255).astype(np.uint8)
        return x, y[:, None]

    (tx, ty), (vx, vy) = part(40), part(16)
    path = tmp_path / "tiny mnist.npz"
    np.savez(path, train_images=tx, train_labels=ty, val_images=vx, val_labels=vy)
    config = TrainConfig(**{**FAST.__dict__, "class_names": ("normal", "pneumonia"), "target_sensitivity": 1.0, "positive_class": "pneumonia"})
    result = train(path, tmp_path / "run", config)
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train"]) == 40 and len(split["val"]) == 16  # the file's own splits
    assert result.card.positive_class == "pneumonia"
    assert result.card.metrics["sensitivity"] == 1.0


def test_an_edgedx_checkpoint_is_a_starting_point(tmp_path: Path) -> None:
    data = colour_folder(tmp_path / "data")
    first = train(data, tmp_path / "first", FAST)
    from edgedx.training import models

    net = models.create_model("resnet10t", 3)
    assert models.load_weights(net, "resnet10t", str(first.checkpoint)) == "file:model.pt"
    source = load_checkpoint(first.checkpoint).state_dict
    assert torch.equal(net.state_dict()["conv1.0.weight"], source["conv1.0.weight"])
    assert net.state_dict()["fc.weight"].shape[0] == 3


def test_cross_validation_keeps_patients_together(tmp_path: Path) -> None:
    from edgedx.training.train import cross_validate

    data = colour_folder(tmp_path / "data", n=9)
    cv = cross_validate(data, tmp_path / "cv", TrainConfig(**{**FAST.__dict__, "epochs": 1}), folds=3)
    assert len(cv.folds) == 3
    vals = [set(json.loads((tmp_path / "cv" / f"fold_{i}" / "split.json").read_text())["val"]) for i in (1, 2, 3)]
    assert not (vals[0] & vals[1]) and not (vals[1] & vals[2]) and sum(map(len, vals)) == 18  # each image in one val fold
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    accs = [f["accuracy"] for f in summary["per_fold"]]
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert summary["accuracy"]["sd"] == pytest.approx(np.std(accs, ddof=1))


@pytest.mark.gpu
def test_training_on_cuda_uses_mixed_precision(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU visible to torch")
    data = colour_folder(tmp_path / "data")
    result = train(data, tmp_path / "run", TrainConfig(**{**FAST.__dict__, "device": "cuda"}))
    assert result.summary["device"].startswith("cuda")
    assert result.card.metrics["n"] > 0
    state = load_checkpoint(result.checkpoint).state_dict
    assert all(v.device.type == "cpu" and torch.isfinite(v.float()).all() for v in state.values())  # saved on CPU, no fp16 overflow


def test_multiclass_metrics_every_epoch(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cls, colour in (("red", (220, 40, 40)), ("green", (40, 220, 40)), ("blue", (40, 40, 220))):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(8):
            write_image(tmp_path / "data" / cls / f"{i}.png", np.clip(rng.normal(colour, 25, (18, 18, 3)), 0, 255).astype(np.uint8))
    result = train(tmp_path / "data", tmp_path / "run", TrainConfig(**{**FAST.__dict__, "plots": True}))
    assert result.card.task == "multiclass" and result.card.threshold is None
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    for row in history:
        val = row["val"]
        assert len(val["confusion"]) == 3 and sum(map(sum, val["confusion"])) == val["n"]
        assert set(val["per_class"]) == {"blue", "green", "red"}
        assert all({"sensitivity", "specificity", "precision", "f1", "auc"} <= set(m) for m in val["per_class"].values())
    assert (tmp_path / "run" / "plots" / "confusion_matrix.png").is_file()


def test_resume_with_more_epochs_keeps_annealing(tmp_path: Path) -> None:
    """Raising --epochs on a finished run stretches the cosine schedule instead of restarting its cycle."""
    data = colour_folder(tmp_path / "data")
    train(data, tmp_path / "run", TrainConfig(**{**FAST.__dict__, "epochs": 1}))
    resumed = train(data, tmp_path / "run", TrainConfig(**{**FAST.__dict__, "epochs": 2, "resume": True}))
    lrs = [row["lr"] for row in resumed.history]
    assert len(lrs) == 2
    assert lrs[1] < 1e-3 * FAST.lr  # annealed to ~0 at the new end, not back at the peak
