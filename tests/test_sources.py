"""Labelled data sources: ImageFolder, CSV manifests and MedMNIST .npz as one TrainingData."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgedx.errors import ImageReadError, InputError
from edgedx.runtime.io.image_io import write_image
from edgedx.runtime.io.manifest import ManifestLayout
from edgedx.training.sources import TrainingData, load_source

ROOT = Path(__file__).resolve().parents[1]


def rgb(value: int, size: int = 8) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def img(path: Path, value: int = 0) -> Path:
    """An 8x8 RGB image of one grey value, written with the runtime's writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_image(path, rgb(value))


def write_png(path: Path, image: np.ndarray) -> Path:
    """Write any array cv2 can encode (grey, BGRA, 16-bit) as PNG; paths with spaces work via tofile."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", image)
    assert ok
    encoded.tofile(path)
    return path


def write_csv(path: Path, rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "data dir"
    folder.mkdir()
    return folder


# --------------------------------------------------------------------------- ImageFolder


def test_image_folder_binary_and_multiclass(root: Path) -> None:
    for i, cls in enumerate(["normal", "pneumonia", "pneumonia"]):
        img(root / "xr" / cls / f"im {i}.png", 10 * i)
    data = load_source(root / "xr")
    assert data.class_names == ("normal", "pneumonia") and data.task == "binary"
    assert data.targets.tolist() == [0, 1, 1] and data.targets.dtype == np.int64
    xr = root / "xr"
    assert data.ids == [str(xr / "normal" / "im 0.png"), *(str(xr / "pneumonia" / f"im {i}.png") for i in (1, 2))]
    assert data.patient_ids is None and data.splits is None and data.source == str(root / "xr")
    assert len(data) == 3 and data.class_counts() == {"normal": 1, "pneumonia": 2}
    assert data.load(2).shape == (8, 8, 3) and int(data.load(2)[0, 0, 0]) == 20

    for cls in ("a", "b", "c"):
        img(root / "three" / cls / "x.png")
    three = load_source(root / "three")
    assert three.task == "multiclass" and three.class_names == ("a", "b", "c")
    reordered = load_source(root / "three", class_names=["c", "a", "b"])
    assert reordered.class_names == ("c", "a", "b") and reordered.targets.tolist() == [1, 2, 0]
    with pytest.raises(InputError, match=r"class_names \['a', 'b'\] do not match"):
        load_source(root / "three", class_names=["a", "b"])


def test_load_converts_grey_rgba_and_16_bit_files_to_rgb_uint8(root: Path) -> None:
    folder = root / "kinds"
    write_png(folder / "a" / "grey.png", np.full((5, 7), 100, np.uint8))
    bgra = np.zeros((5, 7, 4), np.uint8)
    bgra[..., 0], bgra[..., 2], bgra[..., 3] = 200, 50, 255  # blue 200, red 50 in OpenCV order
    write_png(folder / "a" / "rgba.png", bgra)
    write_png(folder / "b" / "deep.png", np.full((5, 7), 65535, np.uint16))
    write_png(folder / "b" / "deep colour.png", np.full((5, 7, 3), 32896, np.uint16))
    data = load_source(folder)
    images = {Path(i).name: data.load(k) for k, i in enumerate(data.ids)}
    for image in images.values():
        assert image.shape == (5, 7, 3) and image.dtype == np.uint8
    assert (images["grey.png"] == 100).all()
    assert images["rgba.png"][0, 0].tolist() == [50, 0, 200]
    assert (images["deep.png"] == 255).all() and (images["deep colour.png"] == 128).all()


def test_unreadable_file_raises_image_read_error_on_load(root: Path) -> None:
    img(root / "f" / "a" / "ok.png")
    (root / "f" / "b").mkdir(parents=True)
    (root / "f" / "b" / "broken.png").write_bytes(b"not a png")
    data = load_source(root / "f")
    with pytest.raises(ImageReadError, match="broken.png"):
        data.load(1)


# --------------------------------------------------------------------------- CSV


def test_csv_relative_and_absolute_paths_patients_and_splits(root: Path, tmp_path: Path) -> None:
    img(root / "imgs" / "a 1.png", 1)
    img(root / "imgs" / "a 2.png", 2)
    outside = img(tmp_path / "else where" / "b 1.png", 3)
    manifest = write_csv(
        root / "labels.csv",
        [
            ["path", "label", "patient_id", "split"],
            ["imgs/a 1.png", "malignant", "P1", "train"],
            ["imgs/a 2.png", " benign ", "P1", "Train"],
            [str(outside), "benign", "P2", "test"],
        ],
    )
    data = load_source(manifest)
    assert data.class_names == ("benign", "malignant") and data.task == "binary"
    assert data.targets.tolist() == [1, 0, 0]
    assert data.ids == [str(root / "imgs" / "a 1.png"), str(root / "imgs" / "a 2.png"), str(outside)]
    assert data.patient_ids == ["P1", "P1", "P2"] and data.splits == ["train", "train", "test"]
    assert data.source == str(manifest)
    assert int(data.load(2)[0, 0, 0]) == 3



def test_csv_given_by_relative_path_yields_absolute_ids(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img(root / "sub dir" / "a.png", 1)
    img(root / "sub dir" / "b.png", 2)
    write_csv(root / "sub dir" / "m.csv", [["path", "label"], ["a.png", "x"], ["b.png", "y"]])
    monkeypatch.chdir(root)
    data = load_source("sub dir/m.csv")
    assert data.ids == [str(root / "sub dir" / "a.png"), str(root / "sub dir" / "b.png")]
    monkeypatch.chdir(root.parent)
    assert int(data.load(1)[0, 0, 0]) == 2


def test_csv_custom_label_column_and_image_path_column(root: Path) -> None:
    for i in range(3):
        write_image(root / f"{i}.png", rgb(i))
    manifest = write_csv(
        root / "meta.csv", [["image", "dx", "age"], ["0.png", "nv", "40"], ["1.png", "mel", "50"], ["2.png", "bcc", "60"]]
    )
    data = load_source(manifest, layout=ManifestLayout(label_column="dx"))
    assert data.class_names == ("bcc", "mel", "nv") and data.task == "multiclass"
    assert data.targets.tolist() == [2, 1, 0] and data.patient_ids is None and data.splits is None
    forced = load_source(manifest, layout=ManifestLayout(label_column="dx"), class_names=["nv", "mel", "bcc"])
    assert forced.targets.tolist() == [0, 1, 2]


def test_isic_labels_csv_ids_without_suffix_in_an_image_folder(root: Path) -> None:
    """ISIC's own labels.csv: ``image`` ids without suffix, images in ``images/``, class in ``diagnosis``."""
    images = root / "isic data" / "images"
    images.mkdir(parents=True)
    for i in range(4):
        write_image(images / f"ISIC_{i:07d}.jpg", rgb(40 * i + 10))
    rows = [["image", "diagnosis", "label_mel1_nv0"]] + [[f"ISIC_{i:07d}", "melanoma" if i % 2 else "nevus", str(i % 2)] for i in range(4)]
    manifest = write_csv(root / "isic data" / "labels.csv", rows)
    layout = ManifestLayout(path_column="image", label_column="diagnosis", image_dir=str(images), suffix="jpg")
    assert layout.suffix == ".jpg"
    data = load_source(manifest, layout=layout)
    assert data.class_names == ("melanoma", "nevus") and data.targets.tolist() == [1, 0, 1, 0]
    assert [Path(i).name for i in data.ids] == [f"ISIC_{i:07d}.jpg" for i in range(4)]
    assert data.load(2).shape[2] == 3
    # without --image-dir and --suffix the error says where it looked and which options change it
    with pytest.raises(InputError, match=r"none of the 4 image paths .* manifest's folder .*--image-dir / --suffix"):
        load_source(manifest, layout=ManifestLayout(label_column="diagnosis"))
    with pytest.raises(InputError, match="path column 'isic_id' not in labels.csv; columns are: image, diagnosis"):
        load_source(manifest, layout=ManifestLayout(path_column="isic_id", label_column="diagnosis"))
    with pytest.raises(InputError, match="--image-dir .*nowhere is not a folder"):
        load_source(manifest, layout=ManifestLayout(label_column="diagnosis", image_dir=str(root / "nowhere")))
    # a 0/1 column works as the class column too; a value that already ends with the suffix is not doubled
    assert load_source(manifest, layout=ManifestLayout(label_column="label_mel1_nv0", image_dir=str(images), suffix=".jpg")).class_names == ("0", "1")
    assert layout.image_path("sub/ISIC_1.JPG", manifest) == images / "sub" / "ISIC_1.JPG"
    with pytest.raises(InputError, match="--suffix 'a/b' is not a file suffix"):
        ManifestLayout(suffix="a/b")


def test_csv_multilabel_columns(root: Path) -> None:
    for i in range(3):
        write_image(root / f"{i}.png", rgb(i))
    manifest = write_csv(
        root / "chest.csv",
        [
            ["file", "effusion", "nodule", "age"],
            ["0.png", "1", "0", "3"],
            ["1.png", "0", "0", "4"],
            ["2.png", "1.0", "1", "5"],
        ],
    )
    data = load_source(manifest, label_columns=["effusion", "nodule"])
    assert data.task == "multilabel" and data.class_names == ("effusion", "nodule")
    assert data.targets.dtype == np.float32 and data.targets.tolist() == [[1, 0], [0, 0], [1, 1]]
    assert data.class_counts() == {"effusion": 2, "nodule": 1}
    named = load_source(manifest, label_columns=["effusion", "nodule"], class_names=["Effusion", "Nodule"])
    assert named.class_names == ("Effusion", "Nodule")


def test_subset_keeps_fields_aligned(root: Path) -> None:
    for i in range(4):
        write_image(root / f"{i}.png", rgb(i))
    rows = [["path", "label", "patient_id", "split"]] + [[f"{i}.png", "ab"[i % 2], f"P{i}", "train"] for i in range(4)]
    data = load_source(write_csv(root / "m.csv", rows))
    sub = data.subset([3, 0])
    assert sub.class_names == data.class_names and sub.task == data.task
    assert sub.ids == [data.ids[3], data.ids[0]] and sub.patient_ids == ["P3", "P0"] and sub.splits == ["train"] * 2
    assert sub.targets.tolist() == [1, 0] and int(sub.load(0)[0, 0, 0]) == 3
    assert sub.subset([1]).load(0)[0, 0, 0] == 0 and sub.loader is data.loader
    assert data.subset(np.array([True, False, False, True])).ids == [data.ids[0], data.ids[3]]


# --------------------------------------------------------------------------- npz


def test_npz_grey_with_n1_labels(root: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        f"{s}_images": rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) for s, n in (("train", 6), ("val", 2), ("test", 3))
    }
    arrays |= {"train_labels": np.array([[0], [1], [2], [0], [1], [2]], np.uint8)}
    arrays |= {"val_labels": np.array([[2], [0]], np.uint8), "test_labels": np.array([[1], [1], [0]], np.uint8)}
    path = root / "blood mnist.npz"
    np.savez_compressed(path, **arrays)
    data = load_source(path)
    assert data.task == "multiclass" and data.class_names == ("0", "1", "2") and len(data) == 11
    assert data.targets.tolist() == [0, 1, 2, 0, 1, 2, 2, 0, 1, 1, 0] and data.targets.dtype == np.int64
    assert data.ids[0] == "blood mnist.npz:train[0]" and data.ids[6] == "blood mnist.npz:val[0]"
    assert data.ids[-1] == "blood mnist.npz:test[2]"
    assert data.splits == ["train"] * 6 + ["val"] * 2 + ["test"] * 3 and data.patient_ids is None
    image = data.load(7)
    assert image.shape == (28, 28, 3) and image.dtype == np.uint8
    assert all((image[..., c] == arrays["val_images"][1]).all() for c in range(3))
    named = load_source(path, class_names=["basophil", "eosinophil", "erythroblast"])
    assert named.class_names == ("basophil", "eosinophil", "erythroblast")
    with pytest.raises(InputError, match=r"class_names gives 2 names but the labels in blood mnist.npz run 0..2"):
        load_source(path, class_names=["x", "y"])


def test_npz_rgb_binary_and_multilabel(root: Path) -> None:
    images = np.arange(4 * 5 * 5 * 3, dtype=np.uint8).reshape(4, 5, 5, 3)
    np.savez(root / "rgb.npz", train_images=images, train_labels=np.array([0, 1, 1, 0]))
    data = load_source(root / "rgb.npz", class_names=["benign", "malignant"])
    assert data.task == "binary" and data.class_names == ("benign", "malignant") and data.splits == ["train"] * 4
    assert (data.load(2) == images[2]).all()

    labels = np.array([[1, 0, 1], [0, 0, 0], [0, 1, 1], [1, 1, 0]], np.uint8)
    np.savez(root / "chest.npz", train_images=images[..., 0], train_labels=labels)
    multi = load_source(root / "chest.npz")
    assert multi.task == "multilabel" and multi.class_names == ("0", "1", "2")
    assert multi.targets.dtype == np.float32 and multi.targets.tolist() == labels.tolist()
    assert multi.class_counts() == {"0": 2, "1": 2, "2": 2}
    assert load_source(root / "chest.npz", class_names=["a", "b", "c"]).class_names == ("a", "b", "c")


# --------------------------------------------------------------------------- task and errors


def test_task_forcing(root: Path) -> None:
    images = np.zeros((4, 4, 4), np.uint8)
    np.savez(root / "two.npz", train_images=images, train_labels=np.array([0, 1, 0, 1]))
    np.savez(root / "three.npz", train_images=images, train_labels=np.array([0, 1, 2, 1]))
    np.savez(root / "multi.npz", train_images=images, train_labels=np.eye(4, 2, dtype=np.uint8))
    assert load_source(root / "two.npz", task="multiclass").task == "multiclass"
    assert load_source(root / "two.npz", task="binary").task == "binary"
    with pytest.raises(InputError, match="task 'binary' needs exactly 2 classes, but .* has 3"):
        load_source(root / "three.npz", task="binary")
    with pytest.raises(InputError, match="task 'multilabel' needs one 0/1 target per label"):
        load_source(root / "two.npz", task="multilabel")
    with pytest.raises(InputError, match="task 'multiclass' needs one class per item"):
        load_source(root / "multi.npz", task="multiclass")
    with pytest.raises(InputError, match="task 'regression' is not one of binary, multiclass, multilabel"):
        load_source(root / "two.npz", task="regression")


def test_source_path_errors(root: Path) -> None:
    with pytest.raises(InputError, match="data not found: .*missing.csv"):
        load_source(root / "missing.csv")
    (root / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"suffix '.txt'"):
        load_source(root / "notes.txt")


def test_csv_errors(root: Path) -> None:
    write_image(root / "a.png", rgb(1))
    write_image(root / "b.png", rgb(2))
    m = write_csv(root / "labels.csv", [["image", "dx", "age"], ["a.png", "x", "1"], ["b.png", "y", "2"]])
    with pytest.raises(InputError) as err:
        load_source(m, layout=ManifestLayout(label_column="diagnosis"))
    assert str(err.value).startswith("label column 'diagnosis' not in labels.csv; name the class column with --label-column")
    assert str(err.value).endswith("columns are: image, dx, age")
    with pytest.raises(InputError, match="label column 'label' not in labels.csv; .* columns are: image, dx, age"):
        load_source(m)
    with pytest.raises(InputError, match="label column 'nodule' not in labels.csv"):
        load_source(m, label_columns=["dx", "nodule"])
    with pytest.raises(InputError, match="needs at least 2"):
        load_source(m, label_columns=["dx"])
    with pytest.raises(InputError, match="no image path column in nopath.csv; expected one named path, image, file"):
        load_source(write_csv(root / "nopath.csv", [["name", "label"], ["a.png", "x"]]))
    (root / "empty.csv").write_text("")
    with pytest.raises(InputError, match="manifest .*empty.csv is empty"):
        load_source(root / "empty.csv")
    with pytest.raises(InputError, match="has a header but no rows"):
        load_source(write_csv(root / "header.csv", [["path", "label"]]))
    with pytest.raises(InputError, match="only one class \\('x' in column 'label'\\)"):
        load_source(write_csv(root / "one.csv", [["path", "label"], ["a.png", "x"], ["b.png", "x"]]))
    ml = write_csv(root / "ml.csv", [["path", "l1", "l2"], ["a.png", 1, 0], ["b.png", 0, "yes"]])
    with pytest.raises(InputError, match="label column 'l2' on line 3 of ml.csv holds 'yes'; multi-label columns hold 0 or 1"):
        load_source(ml, label_columns=["l1", "l2"])
    with pytest.raises(InputError, match="split 'valid' on line 2 of sp.csv is not one of train, val, test"):
        load_source(write_csv(
            root / "sp.csv", [["path", "label", "split"], ["a.png", "x", "valid"], ["b.png", "y", "val"]]
        ))
    with pytest.raises(InputError, match="empty 'patient_id' on line 3 of pid.csv"):
        load_source(write_csv(
            root / "pid.csv", [["path", "label", "patient_id"], ["a.png", "x", "P1"], ["b.png", "y", ""]]
        ))
    with pytest.raises(InputError, match="none of the 2 image paths in .*gone.csv exists"):
        load_source(write_csv(root / "gone.csv", [["path", "label"], ["x.png", "x"], ["y.png", "y"]]))
    with pytest.raises(InputError, match="label 'z' on line 3 of cn.csv is not in class_names"):
        load_source(write_csv(root / "cn.csv", [["path", "label"], ["a.png", "x"], ["b.png", "z"]]), class_names=["x", "y"])


def test_npz_errors(root: Path) -> None:
    np.savez(root / "odd.npz", images=np.zeros((2, 4, 4), np.uint8), y=np.zeros(2))
    with pytest.raises(InputError, match="odd.npz has no MedMNIST arrays .*keys present: images, y"):
        load_source(root / "odd.npz")
    np.savez(root / "half.npz", train_images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(InputError, match="no 'train_labels' array .*keys present: train_images"):
        load_source(root / "half.npz")
    np.savez(root / "one.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([1, 1]))
    with pytest.raises(InputError, match="only one class"):
        load_source(root / "one.npz")
    np.savez(root / "ml.npz", train_images=np.zeros((2, 4, 4), np.uint8), train_labels=np.array([[0, 2], [1, 0]]))
    with pytest.raises(InputError, match="item 0, label 1 holds 2"):
        load_source(root / "ml.npz")
    np.savez(root / "float.npz", train_images=np.zeros((2, 4, 4), np.float32), train_labels=np.array([0, 1]))
    with pytest.raises(InputError, match="expected uint8"):
        load_source(root / "float.npz")
    (root / "text.npz").write_text("not an archive")
    with pytest.raises(InputError, match="text.npz is not a .npz archive"):
        load_source(root / "text.npz")


def test_training_data_rejects_misaligned_fields() -> None:
    with pytest.raises(InputError, match="patient_ids has 1 entries for 2 items"):
        TrainingData(("a", "b"), "binary", ["x", "y"], np.array([0, 1]), ["P"], None, "mem", loader=lambda i: np.zeros(1))
    with pytest.raises(InputError, match="split value 'dev'"):
        TrainingData(
            ("a", "b"), "binary", ["x", "y"], np.array([0, 1]), None, ["train", "dev"], "m", loader=lambda i: np.zeros(1)
        )


def test_modules_themselves_import_neither_torch_nor_onnxruntime() -> None:
    """Loaded under a bare ``edgedx.training`` package, so the package's own torch check does not count."""
    code = (
        "import sys, types; import edgedx\n"
        f"pkg = types.ModuleType('edgedx.training'); pkg.__path__ = [{str(ROOT / 'training')!r}]\n"
        "sys.modules['edgedx.training'] = pkg\n"
        "import edgedx.training.sources, edgedx.training.splits\n"
        "bad = [m for m in ('torch', 'onnxruntime', 'timm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ.copy(), timeout=60)
    assert done.returncode == 0, done.stderr


def test_npz_without_usable_arrays_is_a_message_not_a_traceback(root: Path) -> None:
    empty = root / "empty.npz"
    np.savez(empty, train_images=np.zeros((0, 28, 28), np.uint8), train_labels=np.zeros((0, 1), np.int64))
    with pytest.raises(InputError, match=r"empty.npz does not hold MedMNIST-style arrays \(IndexError.*N > 0"):
        load_source(empty)


def test_evaluate_reads_manifests_like_training(root: Path) -> None:
    """One reader: a byte-order mark, blank lines and a capitalised split value mean the same to evaluate as to train,
    and errors name the file's own line numbers."""
    from edgedx.runtime.io.labelled import load_labelled

    for i in range(3):
        write_image(root / f"{i}.png", rgb(i))
    manifest = root / "labels.csv"
    manifest.write_text("\ufeffpath,label,split\n0.png,a,train\n\n1.png,b,Val\n2.png,c,val\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"labels.csv line 5: label 'c' is not a class"):
        load_labelled(manifest, ("a", "b"), split="val")
    manifest.write_text("\ufeffpath,label,split\n0.png,a,train\n\n1.png,b,Val\n2.png,a,val\n", encoding="utf-8")
    held_out = load_labelled(manifest, ("a", "b"), split="val")
    assert [Path(p).name for p in held_out.names] == ["1.png", "2.png"] and held_out.labels.tolist() == [1, 0]
    assert load_source(manifest).splits == ["train", "val", "val"]
