"""Data-parallel training: sharding keeps patient splits, 2 CPU processes (gloo) match one process."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from edgedx.errors import InputError  # noqa: E402
from edgedx.runtime.io.image_io import write_image  # noqa: E402
from edgedx.training import distributed  # noqa: E402
from edgedx.training.checkpoint import load_checkpoint  # noqa: E402
from edgedx.training.losses import TaskLoss, balanced_order, class_weights  # noqa: E402
from edgedx.training.sources import load_source  # noqa: E402
from edgedx.training.splits import split_indices  # noqa: E402
from edgedx.training.loop import batch_share  # noqa: E402
from edgedx.training.train import TrainConfig, train  # noqa: E402

# timm's test_efficientnet_gn (an EfficientNet with GroupNorm, 0.1 M parameters) normalises each sample on its own,
# so a sharded batch computes exactly what the whole batch does and the only difference left is float summation
# order in the gradient all-reduce. Batch-norm models on CPU normalise each process's share separately (torch's
# SyncBatchNorm needs a GPU), so they match one process only statistically, not to a tolerance.
# SGD, not Adam: Adam divides out a constant gradient scale, which would hide a wrong loss scaling.
CONFIG = TrainConfig(
    arch="test_efficientnet_gn", weights="none", input_size=32, batch_size=8, epochs=2, lr=0.05, optimizer="sgd",
    gradcam_samples=0, plots=False,
)


@pytest.fixture
def one_thread():  # noqa: ANN201
    """One torch thread, as each of the two workers gets on this machine: fair, and no OpenMP spinning under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def manifest(root: Path, n: int = 40) -> Path:
    """Imbalanced two-class CSV with 4 images per patient; 32 train images split by patient (a multiple of 8)."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n):
        y = int(i % 5 < 2)
        write_image(root / "img" / f"{i}.png", np.clip(rng.normal(105 + 40 * y, 45, (18, 18, 3)), 0, 255).astype(np.uint8))
        rows.append({"path": f"img/{i}.png", "label": ("benign", "malignant")[y], "patient_id": f"P{i // 4}"})
    path = root / "labels.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def spy_train(data: Path, out: Path, config: TrainConfig, record: Path):  # noqa: ANN201 - a TrainResult
    """In a launched worker: train under the WORLD_SIZE/RANK the launcher set, listing every file this rank writes."""
    rank = os.environ["RANK"]
    written: list[str] = []
    real_save, real_write = torch.save, Path.write_text

    def save(obj, f, *args, **kwargs):  # noqa: ANN001, ANN202
        written.append(str(f))
        return real_save(obj, f, *args, **kwargs)

    def write_text(self, *args, **kwargs):  # noqa: ANN001, ANN202
        written.append(str(self))
        return real_write(self, *args, **kwargs)

    with mock.patch.object(torch, "save", save), mock.patch.object(Path, "write_text", write_text):
        result = train(data, out, config)
    (record / f"rank{rank}.json").write_text(json.dumps({"world": os.environ["WORLD_SIZE"], "written": written}))
    return result


def test_two_cpu_processes_match_one(tmp_path: Path, one_thread: None) -> None:
    if not __import__("timm").is_model(CONFIG.arch):
        pytest.skip(f"this timm has no {CONFIG.arch} (timm's small test models came in 1.0)")
    data = manifest(tmp_path / "data")
    one = train(data, tmp_path / "one", CONFIG)
    record = tmp_path / "record"
    record.mkdir()
    ranks_results = distributed.launch(2, spy_train, data, tmp_path / "two", CONFIG, record)
    two = ranks_results[0]
    assert ranks_results[1] is None  # only rank 0 reports: train() returns None on the others

    # Same global batches, gradients averaged over ranks: the weights agree up to float summation order, which
    # 8 steps at lr 0.05 grow to about 1e-6 (seen: 9e-7) and the losses to 1e-5 relative. One wrongly composed or
    # wrongly weighted batch moves the weights by about lr x gradient, 1e-3 or more.
    a, b = load_checkpoint(one.checkpoint).state_dict, load_checkpoint(two.checkpoint).state_dict
    assert a.keys() == b.keys() and not any(k.startswith("module.") for k in b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=lambda m, key=key: f"{key}: {m}")
    for x, y in zip(one.history, two.history, strict=True):
        assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-4)  # reduced over ranks
        assert y["val_loss"] == pytest.approx(x["val_loss"], rel=1e-4)  # gathered from both ranks' shares
        assert y["val"]["confusion"] == x["val"]["confusion"] and y["val"]["n"] == x["val"]["n"]
    assert 0.01 < one.history[-1]["train_loss"] < 0.7  # still learning: the comparison is not of saturated outputs
    assert two.best_epoch == one.best_epoch
    assert two.card.threshold == pytest.approx(one.card.threshold, abs=1e-5)
    assert two.card.metrics["n"] == one.card.metrics["n"] == len(json.loads((tmp_path / "one" / "split.json").read_text())["val"])

    assert (tmp_path / "two" / "split.json").read_text() == (tmp_path / "one" / "split.json").read_text()
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    ranks = {r: json.loads((record / f"rank{r}.json").read_text()) for r in (0, 1)}
    assert ranks[0]["world"] == ranks[1]["world"] == "2"  # the launcher's torchrun-style environment
    assert ranks[1]["written"] == []  # only rank 0 writes
    assert sum(Path(p).name == "metrics.json" for p in ranks[0]["written"]) == 1
    assert {Path(p).name for p in ranks[0]["written"]} >= {"split.json", "model.pt.tmp", "last.pt.tmp", "summary.json"}
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["batch_norm"] == "per process"
    assert two.card.provenance.training["world_size"] == 2 and two.card.provenance.training["batch_size"] == 8


def test_sharding_takes_each_training_index_once_and_keeps_patients_apart(tmp_path: Path) -> None:
    source = load_source(manifest(tmp_path / "data", n=44))
    splits = split_indices(source, val_fraction=0.25, seed=3)
    train_idx = splits["train"]
    val_patients = set(np.asarray(source.patient_ids)[splits["val"]])
    weights_of = class_weights(source.targets[train_idx], "binary", 2)
    for world in (1, 2, 4):
        for epoch_order in (np.random.default_rng(1).permutation(len(train_idx)), balanced_order(source.targets[train_idx], "binary", np.random.default_rng(1))):
            order = train_idx[epoch_order]
            per_rank = [list(distributed.rank_batches(order, 8, r, world)) for r in range(world)]
            assert len({len(steps) for steps in per_rank}) == 1  # every rank runs the same number of steps
            assert all(len({len(s[2]) for s in step}) == 1 for step in zip(*per_rank))  # of equal sizes
            seen = np.concatenate([share for steps in per_rank for _, _, share in steps])
            padding = len(seen) - len(order)
            assert 0 <= padding < world
            np.testing.assert_array_equal(np.sort(seen), np.sort(np.concatenate([order, order[:padding]])))
            assert not val_patients & set(np.asarray(source.patient_ids)[seen])
            for steps in zip(*per_rank):  # the ranks' shares make up the single process's global batch
                start, whole, _ = steps[0]
                np.testing.assert_array_equal(np.sort(np.concatenate([s[2] for s in steps])), np.sort(whole))
                if start + len(whole) <= len(order):
                    np.testing.assert_array_equal(whole, order[start : start + 8])
                # the ranks' weighted losses add up to the whole batch's weighted mean
                logits = torch.randn(len(whole), 2, generator=torch.Generator().manual_seed(start))
                y = torch.from_numpy(source.targets[whole]).long()
                loss = TaskLoss("binary", weights_of)
                parts = [loss(logits[r::world], y[r::world]) * batch_share(source.targets[s[2]], source.targets[whole], "binary", weights_of) for r, s in enumerate(steps)]
                assert float(sum(parts)) == pytest.approx(float(loss(logits, y)), rel=1e-5)


def test_launch_checks_before_starting_processes(tmp_path: Path) -> None:
    with mock.patch.object(distributed, "launch") as launch:
        with pytest.raises(InputError, match="batch size 10 does not split into 4 processes"):
            distributed.launch_train(tmp_path, tmp_path / "run", TrainConfig(batch_size=10, device="cpu"), nproc=4)
        with pytest.raises(InputError, match="--nproc must be at least 1, got 0"):
            distributed.launch_train(tmp_path, tmp_path / "run", TrainConfig(device="cpu"), nproc=0)
        launch.assert_not_called()
        distributed.launch_train(tmp_path, tmp_path / "run", TrainConfig(batch_size=8, device="cpu"), nproc=2, folds=3)
    launch.assert_called_once_with(2, distributed._run_training, tmp_path, tmp_path / "run", TrainConfig(batch_size=8, device="cpu"), 3)


def test_a_worker_error_comes_back_as_itself() -> None:
    relayed = str(distributed._Relayed("InputError", "no images in /data/x; point DATA at a folder of images"))
    failure = SimpleNamespace(message={"message": f"_Relayed: {relayed}"}, exitcode=1)
    error = distributed._worker_error(SimpleNamespace(failures={1: failure}))
    assert isinstance(error, InputError) and str(error) == "no images in /data/x; point DATA at a folder of images"
    crash = SimpleNamespace(message={"message": "RuntimeError: boom", "extraInfo": {"py_callstack": "Traceback ..."}}, exitcode=1)
    assert "training process 0 failed: RuntimeError: boom; rerun with --nproc 1" in str(distributed._worker_error(SimpleNamespace(failures={0: crash})))


def test_world_size_without_a_rendezvous_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(InputError, match="WORLD_SIZE=2 is set but not MASTER_ADDR, MASTER_PORT"), distributed.session(torch.device("cpu")):
        pass
