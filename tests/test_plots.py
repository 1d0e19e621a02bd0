"""Training/evaluation plots: valid, non-blank PNGs; the numbers drawn; no global matplotlib state touched."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest



matplotlib = pytest.importorskip("matplotlib")

from edgedx.runtime.metrics import classification_metrics, roc_auc  # noqa: E402
from edgedx.runtime.outputs import plots  # noqa: E402

CLASSES3 = ["normal", "benign", "malignant"]


def assert_png(path: Path) -> None:
    """``path`` is a readable PNG, larger than 100x100, and not a blank canvas."""
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None, f"cv2 could not read {path}"
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert float(image.std()) > 10.0, f"{path} looks blank (std {image.std():.1f})"


@pytest.fixture()
def out(tmp_path: Path) -> Path:
    """A not-yet-existing folder with spaces in its name (the functions create parents)."""
    return tmp_path / "plots dir" / "run 1"


def history() -> list[dict]:
    rows = []
    for e in range(1, 7):
        rows.append(
            {
                "epoch": e,
                "train_loss": 1.0 / e,
                "val_loss": 1.1 / e + (0.1 if e == 5 else 0.0),
                "val_accuracy": 0.5 + 0.05 * e,
                "val_balanced_accuracy": [0.5, 0.6, 0.7, 0.8, 0.8, 0.75][e - 1],
                "val_macro_auc": None if e == 1 else 0.7 + 0.03 * e,
                "lr": 1e-3 / e,
                "seconds": 1.5,
            }
        )
    rows[2].pop("val_accuracy")  # a missing value is skipped, not an error
    return rows


def three_class_data(seed: int = 0, n: int = 240) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    p = rng.dirichlet([1.0, 1.0, 1.0], n)
    p[np.arange(n), y] += 0.6
    return y, p / p.sum(axis=1, keepdims=True)


# --------------------------------------------------------------------------- #
# Import cost and global state
# --------------------------------------------------------------------------- #


def test_module_imports_no_matplotlib_at_import_time() -> None:
    code = "import sys, edgedx.runtime.outputs.plots; print('matplotlib' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_module_top_level_imports_are_numpy_stdlib_and_edgedx_only() -> None:
    tree = ast.parse(Path(plots.__file__).read_text(encoding="utf-8"))
    roots = set()
    for node in tree.body:  # top level only: imports inside functions are the point
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or "").split(".")[0])
    allowed = set(sys.stdlib_module_names) | {"numpy", "edgedx", "__future__"}
    assert roots <= allowed, roots - allowed
    assert "torch" not in roots and "matplotlib" not in roots


def test_backend_unchanged_and_no_pyplot_figures_left(out: Path) -> None:
    before = matplotlib.get_backend()
    y, p = three_class_data()
    m = classification_metrics(y, p, CLASSES3).to_dict()
    plots.plot_learning_curves(history(), out / "lc.png")
    plots.plot_roc(y, p, CLASSES3, out / "roc.png")
    plots.plot_confusion_matrix(m["confusion"], CLASSES3, out / "cm.png")
    plots.plot_radar(plots.six_metrics(m, None), out / "radar.png")
    assert matplotlib.get_backend() == before
    pyplot = pytest.importorskip("matplotlib.pyplot")
    assert pyplot.get_fignums() == []


# --------------------------------------------------------------------------- #
# Learning curves
# --------------------------------------------------------------------------- #


def test_learning_curves_png_with_missing_values(out: Path) -> None:
    path = plots.plot_learning_curves(history(), out / "learning curves.png")
    assert path == out / "learning curves.png"
    assert_png(path)
    assert_png(plots.plot_learning_curves(history(), out / "auc.png", metric="val_macro_auc"))
    assert_png(plots.plot_learning_curves(history()[:1], out / "one epoch.png"))


def test_best_epoch_breaks_ties_like_train() -> None:
    # epochs 4 and 5 tie on balanced accuracy 0.8; epoch 4 has the lower val_loss
    assert plots._best_epoch(history(), "val_balanced_accuracy") == (4.0, 0.8)
    assert plots._best_epoch(history(), "val_loss")[0] == 6.0  # losses: lowest wins
    rows = [{"epoch": 1, "val_macro_auc": None}, {"epoch": 2, "val_macro_auc": float("nan")}]
    assert plots._best_epoch(rows, "val_macro_auc") is None


def test_learning_curves_rejects_unknown_metric_and_empty_history(out: Path) -> None:
    with pytest.raises(ValueError, match="val_f1"):
        plots.plot_learning_curves(history(), out / "x.png", metric="val_f1")
    with pytest.raises(ValueError, match="empty"):
        plots.plot_learning_curves([], out / "x.png")


# --------------------------------------------------------------------------- #
# ROC
# --------------------------------------------------------------------------- #


def test_roc_binary_with_operating_point(out: Path) -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    s = np.clip(0.35 * y + rng.normal(0.35, 0.2, 200), 0.0, 1.0)
    probs = np.c_[1.0 - s, s]
    path = plots.plot_roc(y, probs, ["uninfected", "parasitized"], out / "roc binary.png", operating_threshold=0.37)
    assert_png(path)

    mode, (curve,) = plots._roc_series(y, probs, ["uninfected", "parasitized"], None)
    assert mode == "binary" and curve.name == "parasitized"
    assert curve.label == f"parasitized (AUC {roc_auc(y == 1, s):.3f})"
    sens, spec = plots._operating_point(y == 1, s, 0.37)
    assert sens == pytest.approx(((s >= 0.37) & (y == 1)).sum() / (y == 1).sum())
    assert spec == pytest.approx(((s < 0.37) & (y == 0)).sum() / (y == 0).sum())


def test_operating_point_hand_computed() -> None:
    truth = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    scores = np.array([0.9, 0.5, 0.37, 0.2, 0.4, 0.37, 0.1, 0.0, 0.3])
    # score >= 0.37 is positive: positives 3/4 caught; negatives 0.4 and 0.37 flagged -> 3/5 cleared
    assert plots._operating_point(truth, scores, 0.37) == (0.75, 0.6)


def test_roc_positive_index_picks_the_class(out: Path) -> None:
    y, p = three_class_data(2)
    assert_png(plots.plot_roc(y, p, CLASSES3, out / "malignant.png", positive_index=2, operating_threshold=0.5))
    mode, (curve,) = plots._roc_series(y, p, CLASSES3, 2)
    assert mode == "binary" and curve.name == "malignant"


def test_roc_multiclass_three_classes(out: Path) -> None:
    y, p = three_class_data()
    assert_png(plots.plot_roc(y, p, CLASSES3, out / "roc multiclass.png"))
    mode, curves = plots._roc_series(y, p, CLASSES3, None)
    per_class = classification_metrics(y, p, CLASSES3).per_class
    assert mode == "multiclass" and [c.name for c in curves] == CLASSES3
    for c in curves:
        assert c.auc == pytest.approx(per_class[c.name]["auc"])
        assert f"AUC {per_class[c.name]['auc']:.3f}" in c.label


def test_roc_multilabel(out: Path) -> None:
    rng = np.random.default_rng(3)
    labels = ["effusion", "nodule", "edema", "cardiomegaly"]
    y = (rng.random((150, 4)) < 0.3).astype(np.int64)
    p = np.clip(0.3 * y + 0.7 * rng.random((150, 4)), 0.0, 1.0)
    assert_png(plots.plot_roc(y, p, labels, out / "roc multilabel.png"))
    mode, curves = plots._roc_series(y, p, labels, None)
    assert mode == "multilabel" and len(curves) == 4
    for j, c in enumerate(curves):
        assert c.auc == pytest.approx(roc_auc(y[:, j], p[:, j]))


def test_roc_class_missing_from_y_true_is_skipped_and_noted(out: Path) -> None:
    y, p = three_class_data(4)
    y[y == 2] = 0  # "malignant" never occurs
    assert_png(plots.plot_roc(y, p, CLASSES3, out / "roc missing.png"))
    _, curves = plots._roc_series(y, p, CLASSES3, None)
    assert curves[2].fpr is None and curves[2].auc is None
    assert "malignant" in curves[2].label and "not in y_true" in curves[2].label
    assert all(c.auc is not None for c in curves[:2])
    # a binary task whose positive class is absent still draws (chance line + note)
    assert_png(plots.plot_roc(np.zeros(10, int), np.full((10, 2), 0.5), ["a", "b"], out / "b.png",
                              operating_threshold=0.5))


def test_roc_rejects_bad_input(out: Path) -> None:
    y, p = three_class_data()
    with pytest.raises(ValueError, match="positive_index"):
        plots.plot_roc(y, p, CLASSES3, out / "x.png", operating_threshold=0.5)
    with pytest.raises(ValueError, match="shape"):
        plots.plot_roc(y, p, ["a", "b"], out / "x.png")
    with pytest.raises(ValueError, match="class index"):
        plots.plot_roc(np.r_[y[:-1], 3], p, CLASSES3, out / "x.png")


# --------------------------------------------------------------------------- #
# Confusion matrix and radar
# --------------------------------------------------------------------------- #


def test_confusion_matrix_counts_and_normalised(out: Path) -> None:
    cm = [[50, 3, 1], [4, 40, 6], [0, 0, 0]]  # last class absent: its row shows "-"
    assert_png(plots.plot_confusion_matrix(cm, CLASSES3, out / "cm counts.png"))
    assert_png(plots.plot_confusion_matrix(cm, CLASSES3, out / "cm norm.png", normalize=True))
    with pytest.raises(ValueError, match="3x3"):
        plots.plot_confusion_matrix([[1, 2], [3, 4]], CLASSES3, out / "x.png")
    with pytest.raises(ValueError, match="non-negative"):
        plots.plot_confusion_matrix([[1, -2], [3, 4]], ["a", "b"], out / "x.png")


def test_radar_with_none_and_nan(out: Path) -> None:
    values = {"accuracy": 0.9, "sensitivity": 0.95, "specificity": 0.8, "precision": None, "f1": 0.7,
              "auc": float("nan")}
    assert_png(plots.plot_radar(values, out / "radar.png", title="parasitized (validation)"))
    with pytest.raises(ValueError, match="accuracy"):
        plots.plot_radar({**values, "accuracy": 1.5}, out / "x.png")


# --------------------------------------------------------------------------- #
# six_metrics
# --------------------------------------------------------------------------- #


def metrics_dict() -> dict:
    """Hand-made ClassificationMetrics.to_dict() output: class "c" absent (auc None)."""
    return {
        "n": 10,
        "accuracy": 0.7,
        "balanced_accuracy": 0.65,
        "macro_auc": 0.85,
        "per_class": {
            "a": {"sensitivity": 0.8, "specificity": 0.6, "precision": 0.5, "f1": 0.6, "support": 5, "auc": 0.9},
            "b": {"sensitivity": 0.5, "specificity": 0.9, "precision": 1.0, "f1": 0.7, "support": 5, "auc": 0.8},
            "c": {"sensitivity": 0.0, "specificity": 0.9, "precision": 0.0, "f1": 0.0, "support": 0, "auc": None},
        },
        "confusion": [[4, 0, 1], [2, 3, 0], [0, 0, 0]],
        "class_names": ["a", "b", "c"],
    }


def test_six_metrics_positive_class() -> None:
    assert plots.six_metrics(metrics_dict(), "b") == {
        "accuracy": 0.7, "sensitivity": 0.5, "specificity": 0.9, "precision": 1.0, "f1": 0.7, "auc": 0.8,
    }
    assert plots.six_metrics(metrics_dict(), "c")["auc"] is None
    assert list(plots.six_metrics(metrics_dict(), "a")) == list(plots.RADAR_KEYS)


def test_six_metrics_macro_ignores_none() -> None:
    got = plots.six_metrics(metrics_dict(), None)
    assert list(got) == list(plots.RADAR_KEYS)
    expected = {
        "accuracy": 0.7,
        "sensitivity": (0.8 + 0.5 + 0.0) / 3,
        "specificity": (0.6 + 0.9 + 0.9) / 3,
        "precision": (0.5 + 1.0 + 0.0) / 3,
        "f1": (0.6 + 0.7 + 0.0) / 3,
        "auc": (0.9 + 0.8) / 2,  # None for "c" is left out, not counted as 0
    }
    assert got == pytest.approx(expected)


def test_six_metrics_all_none_and_errors() -> None:
    d = metrics_dict()
    d["accuracy"] = None
    for stats in d["per_class"].values():
        stats["auc"] = None
    got = plots.six_metrics(d, None)
    assert got["accuracy"] is None and got["auc"] is None
    with pytest.raises(ValueError, match="'z'"):
        plots.six_metrics(d, "z")
    with pytest.raises(ValueError, match="per_class"):
        plots.six_metrics({"accuracy": 0.5}, None)


def test_six_metrics_feeds_radar_from_real_metrics(out: Path) -> None:
    y, p = three_class_data(5)
    m = classification_metrics(y, p, CLASSES3).to_dict()
    six = plots.six_metrics(m, "malignant")
    assert six["auc"] == m["per_class"]["malignant"]["auc"] and six["accuracy"] == m["accuracy"]
    assert all(v is not None and 0.0 <= v <= 1.0 and not math.isnan(v) for v in six.values())
    assert_png(plots.plot_radar(six, out / "radar real.png"))
