"""Patient-level splits, k-fold, the leakage check, the split file and the summary."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgedx.errors import InputError
from edgedx.training.sources import TrainingData, load_source
from edgedx.training.splits import (
    NO_PATIENT_NOTE,
    check_no_leakage,
    kfold_indices,
    load_splits,
    save_splits,
    split_indices,
    summary,
)


def no_image(i: int) -> np.ndarray:
    raise AssertionError("splitting must not read images")


def patients(seed: int = 0, n_patients: int = 40, positive: float = 0.3, per_image: bool = False) -> TrainingData:
    """40 patients with 1-5 images each; class per patient (about 70/30), or per image when ``per_image``."""
    rng = np.random.default_rng(seed)
    ids, pids, y = [], [], []
    for p in range(n_patients):
        cls = int(p % 10 < positive * 10)  # exactly 70/30 by patient
        for j in range(int(rng.integers(1, 6))):
            ids.append(f"/scans/P{p:03d} img {j}.png")
            pids.append(f"P{p:03d}")
            y.append(int(rng.random() < positive) if per_image else cls)
    return TrainingData(("normal", "tumour"), "binary", ids, np.asarray(y, np.int64), pids, None, "mem", loader=no_image)


def patient_sets(data: TrainingData, splits: dict[str, np.ndarray]) -> dict[str, set[str]]:
    assert data.patient_ids is not None
    return {k: {data.patient_ids[i] for i in v} for k, v in splits.items()}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_patients_never_cross_splits_and_proportions_hold(seed: int) -> None:
    for per_image in (False, True):
        data = patients(seed, per_image=per_image)
        splits = split_indices(data, val_fraction=0.2, test_fraction=0.15, seed=seed)
        assert list(splits) == ["train", "val", "test"]
        sets = patient_sets(data, splits)
        assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
        everything = np.concatenate(list(splits.values()))
        assert sorted(everything.tolist()) == list(range(len(data)))
        for k, v in splits.items():
            assert v.dtype == np.int64 and (np.diff(v) > 0).all()
        n = len(data)
        assert abs(len(splits["val"]) / n - 0.2) < 0.05 and abs(len(splits["test"]) / n - 0.15) < 0.05
        overall = data.targets.mean()
        for k, v in splits.items():
            assert set(data.targets[v].tolist()) == {0, 1}, k  # both classes in every split
            assert abs(data.targets[v].mean() - overall) < 0.12, k
        check_no_leakage(data, splits)


def test_split_is_deterministic_per_seed() -> None:
    data = patients(0)
    a, b, c = (split_indices(data, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["val"], c["val"])
    assert "test" not in a


def test_without_patient_ids_items_split_alone_but_duplicate_files_stay_together() -> None:
    ids = [f"/d/{i}.png" for i in range(30)] + ["/d/0.png"]  # the first file listed twice
    y = np.array([0] * 20 + [1] * 10 + [0])
    data = TrainingData(("a", "b"), "binary", ids, y, None, None, "m", loader=no_image)
    splits = split_indices(data, val_fraction=0.3, seed=1)
    assert len(splits["val"]) in (9, 10) and {0, 1} <= set(y[splits["val"]].tolist())
    side = {k for k, v in splits.items() if 0 in v}
    assert side == {k for k, v in splits.items() if 30 in v}
    check_no_leakage(data, splits)


def test_tiny_sets_keep_every_class_in_train_and_val() -> None:
    data = TrainingData(("a", "b"), "binary", list("wxyz"), np.array([0, 0, 1, 1]), None, None, "m", loader=no_image)
    splits = split_indices(data, seed=0)
    assert sorted(data.targets[splits["train"]].tolist()) == [0, 1] == sorted(data.targets[splits["val"]].tolist())
    two = data.subset([0, 2])
    with pytest.raises(InputError, match="cannot fill the val split from 2 items while keeping every class in training"):
        split_indices(two, seed=0)


def test_rare_class_missing_from_a_split_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    y = np.array([0] * 9 + [1])
    data = TrainingData(("a", "b"), "binary", [str(i) for i in range(10)], y, None, None, "m", loader=no_image)
    with caplog.at_level(logging.WARNING, logger="edgedx.training.splits"):
        splits = split_indices(data, seed=0)
    assert 9 in splits["train"]
    assert "the val split has no item of class(es) ['b']" in caplog.text


def test_multilabel_split_covers_each_label() -> None:
    rng = np.random.default_rng(3)
    targets = (rng.random((200, 4)) < [0.4, 0.1, 0.04, 0.5]).astype(np.float32)
    pids = [f"p{i // 2}" for i in range(200)]
    ids = [str(i) for i in range(200)]
    data = TrainingData(tuple("abcd"), "multilabel", ids, targets, pids, None, "m", loader=no_image)
    splits = split_indices(data, val_fraction=0.25, seed=0)
    check_no_leakage(data, splits)
    for v in splits.values():
        assert (targets[v].sum(axis=0) > 0).all()
    assert abs(len(splits["val"]) / 200 - 0.25) < 0.05


def test_predefined_npz_splits_are_respected(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)

    def arrays(split: str, n: int) -> dict[str, np.ndarray]:
        labels = rng.permutation(np.arange(n) % 2)[:, None]
        return {f"{split}_images": np.zeros((n, 4, 4), np.uint8), f"{split}_labels": labels}

    np.savez(tmp_path / "full set.npz", **arrays("train", 20), **arrays("val", 6), **arrays("test", 8))
    data = load_source(tmp_path / "full set.npz")
    splits = split_indices(data, val_fraction=0.5, test_fraction=0.3, seed=0)
    assert splits["train"].tolist() == list(range(20))
    assert splits["val"].tolist() == list(range(20, 26)) and splits["test"].tolist() == list(range(26, 34))

    np.savez(tmp_path / "no val.npz", **arrays("train", 20), **arrays("test", 8))
    data = load_source(tmp_path / "no val.npz")
    splits = split_indices(data, val_fraction=0.25, seed=0)
    assert splits["test"].tolist() == list(range(20, 28))
    assert len(splits["val"]) == 5 and splits["val"].max() < 20 and set(data.targets[splits["val"]].tolist()) == {0, 1}
    assert sorted([*splits["train"], *splits["val"]]) == list(range(20))

    np.savez(tmp_path / "train only.npz", **arrays("train", 20))
    splits = split_indices(load_source(tmp_path / "train only.npz"), val_fraction=0.2, test_fraction=0.2, seed=0)
    assert [len(splits[k]) for k in ("train", "val", "test")] == [12, 4, 4]

    np.savez(tmp_path / "test only.npz", **arrays("test", 4))
    with pytest.raises(InputError, match="marked 'train'"):
        split_indices(load_source(tmp_path / "test only.npz"))


def test_fraction_errors() -> None:
    data = patients(0)
    with pytest.raises(InputError, match="val fraction must be between 0 and 1, got 1.0"):
        split_indices(data, val_fraction=1.0)
    with pytest.raises(InputError, match="test fraction must be between 0 and 1"):
        split_indices(data, test_fraction=-0.1)
    with pytest.raises(InputError, match="leave nothing to train on"):
        split_indices(data, val_fraction=0.5, test_fraction=0.5)


def test_kfold_covers_each_item_once_and_keeps_patients_together() -> None:
    data = patients(5)
    folds = kfold_indices(data, 5, seed=2)
    assert len(folds) == 5
    seen = np.concatenate([val for _, val in folds])
    assert sorted(seen.tolist()) == list(range(len(data)))
    assert data.patient_ids is not None
    for train, val in folds:
        assert sorted([*train, *val]) == list(range(len(data)))
        assert not {data.patient_ids[i] for i in train} & {data.patient_ids[i] for i in val}
        assert set(data.targets[val].tolist()) == {0, 1}
        assert abs(len(val) / len(data) - 0.2) < 0.06
    again = kfold_indices(data, 5, seed=2)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    for bad in (1, 41):
        with pytest.raises(InputError, match=f"k-fold needs 2 <= k <= the number of patients \\(40\\), got k={bad}"):
            kfold_indices(data, bad)


def test_check_no_leakage_names_patient_splits_and_files() -> None:
    data = patients(0)
    splits = split_indices(data, seed=0)
    check_no_leakage(data, splits)  # split_indices output passes
    assert data.patient_ids is not None
    # Deliberately leak: move one image of a training patient with several images into val.
    pid = next(p for p in sorted(set(data.patient_ids)) if sum(q == p for q in data.patient_ids) > 1
               and data.patient_ids.index(p) in splits["train"])
    moved = data.patient_ids.index(pid)
    leaky = {"train": splits["train"][splits["train"] != moved], "val": np.sort(np.append(splits["val"], moved))}
    with pytest.raises(InputError) as err:
        check_no_leakage(data, leaky)
    message = str(err.value)
    assert message.startswith(f"patient '{pid}' is in both train and val (train: {pid} img 1.png")
    assert f"; val: {pid} img 0.png)" in message and message.endswith("a patient's images must stay in one split")

    with pytest.raises(InputError, match=r"item 3 \(P.* img .\.png\) is in both train and val"):
        check_no_leakage(data, {"train": np.arange(0, 5), "val": np.arange(3, len(data))})
    with pytest.raises(InputError, match="out of range"):
        check_no_leakage(data, {"train": np.array([len(data)])})
    anonymous = data.subset(np.arange(len(data)))
    anonymous.patient_ids = None
    check_no_leakage(anonymous, leaky)  # no patient ids: nothing to check beyond items and files
    dup = TrainingData(("a", "b"), "binary", ["/d/x.png", "/d/x.png"], np.array([0, 1]), None, None, "m", loader=no_image)
    with pytest.raises(InputError, match="file '/d/x.png' is listed more than once and is in both train and val"):
        check_no_leakage(dup, {"train": np.array([0]), "val": np.array([1])})


def test_check_no_leakage_lists_at_most_three_files_per_side() -> None:
    ids = [f"/x/f{i}.png" for i in range(6)]
    data = TrainingData(("a", "b"), "binary", ids, np.array([0, 1] * 3), ["P9"] * 5 + ["P1"], None, "m", loader=no_image)
    with pytest.raises(InputError, match=r"\(train: f0.png, f1.png, f2.png, \+1 more; val: f4.png\)"):
        check_no_leakage(data, {"train": np.array([0, 1, 2, 3]), "val": np.array([4, 5])})


def test_save_splits_round_trip_and_summary(tmp_path: Path) -> None:
    data = patients(1)
    splits = split_indices(data, test_fraction=0.1, seed=4)
    out = tmp_path / "run dir" / "split.json"
    save_splits(out, data, splits, seed=4)
    record = json.loads(out.read_text(encoding="utf-8"))
    assert record["seed"] == 4 and record["class_names"] == ["normal", "tumour"] and record["patient_level"] is True
    assert record["val"] == [os.path.relpath(data.ids[i], out.parent) for i in splits["val"]] and set(record) >= {"train", "val", "test"}
    assert record["paths"] == "image paths are relative to this run folder"
    back = load_splits(out, data)
    assert all(np.array_equal(back[k], splits[k]) for k in splits)

    info = summary(data, splits)
    assert info["patient_ids"] is True and info["note"] is None and info["n"] == len(data)
    val = info["splits"]["val"]
    assert val["n"] == len(splits["val"]) and val["n_patients"] == len(patient_sets(data, splits)["val"])
    y_val = data.targets[splits["val"]]
    assert val["class_counts"] == {"normal": int((y_val == 0).sum()), "tumour": int(y_val.sum())}
    json.dumps(info)  # goes into the run summary and the model card as is

    anonymous = data.subset(np.arange(len(data)))
    anonymous.patient_ids = None
    info = summary(anonymous, splits)
    assert info["patient_ids"] is False and info["note"] == NO_PATIENT_NOTE
    assert info["note"] == "no patient ids: images of one patient may be in several splits"
    assert info["splits"]["train"]["n_patients"] is None
    save_splits(out, anonymous, splits, seed=4)
    assert json.loads(out.read_text(encoding="utf-8"))["patient_level"] is False

    other = TrainingData(("x", "y"), "binary", ["a", "b"], np.array([0, 1]), None, None, "m", loader=no_image)
    with pytest.raises(InputError, match="was made for classes"):
        load_splits(out, other)


def test_a_run_folder_moved_with_its_data_still_finds_its_split(tmp_path: Path) -> None:
    """split.json stores paths relative to the run: copying a project (data + runs) elsewhere keeps runs usable."""
    from edgedx.runtime.io.image_io import write_image
    from edgedx.runtime.io.labelled import load_labelled

    before = tmp_path / "project a"
    for cls in ("normal", "tumour"):
        (before / "data" / cls).mkdir(parents=True)
        (before / "runs").mkdir(exist_ok=True)
        for i in range(5):
            write_image(before / "data" / cls / f"{cls} {i}.png", np.full((9, 11, 3), 20 * i + (cls == "tumour") * 120, np.uint8))
    data = load_source(before / "runs" / ".." / "data")  # a source given with ".." keeps it in its ids
    splits = split_indices(data, val_fraction=0.4, seed=1)
    save_splits(before / "runs" / "r1" / "split.json", data, splits, seed=1)
    record = json.loads((before / "runs" / "r1" / "split.json").read_text(encoding="utf-8"))
    assert all(p.startswith("../../data/") for p in record["val"] + record["train"])
    assert all(np.array_equal(load_splits(before / "runs" / "r1" / "split.json", data)[k], splits[k]) for k in splits)

    after = tmp_path / "moved" / "project b"
    shutil.move(str(before), str(after))
    moved = load_source(after / "data")
    back = load_splits(after / "runs" / "r1" / "split.json", moved)
    assert all(np.array_equal(back[k], splits[k]) for k in splits)
    held_out = load_labelled(after / "runs" / "r1", ("normal", "tumour"), split="val")
    assert len(held_out) == len(splits["val"]) and all(Path(p).is_file() for p in held_out.images)
    assert all(str(p).startswith(str(after)) for p in held_out.images)
