"""What a clinic engineer meets in the first hour: overlays with a colour bar and no fake maps, the misclassified
images of an evaluation, and every plot and table saying the threshold its numbers were taken at.

Tiny synthetic data only: uniform-colour images and a fake session whose p(positive) is the red level, so each
image's probability is chosen by the test and every decision lies far from its threshold.
"""

from __future__ import annotations

import base64
import csv
import re
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgedx.card import CropPolicy, ModelCard, Provenance
from edgedx.errors import InputError, MissingDependencyError
from edgedx.runtime.outputs import overlay
from edgedx.runtime.outputs import plots
from edgedx.runtime.outputs import report_html
from edgedx.runtime.io.image_io import write_image
from edgedx.runtime.model import Model
from edgedx.runtime.tiling import SlidingResult, plan_tiles
from fakes import RedLevelSession

PROVENANCE = Provenance(edgedx_version="0", created_at="2026-01-01T00:00:00+00:00")
TILE = 32


# -- overlays ----------------------------------------------------------------------------------


def sliding(height: int, width: int, tile: tuple[int, int], p_pos: np.ndarray, used: np.ndarray | None = None) -> SlidingResult:
    """A SlidingResult over a (height, width) image with one p(positive) per tile, row-major."""
    grid = plan_tiles(height, width, CropPolicy(tile_size=tile, stride=tile))
    p = np.asarray(p_pos, dtype=np.float64).reshape(-1)
    assert len(p) == grid.n_tiles, (len(p), grid.n_tiles)
    tiles = np.stack([1 - p, p], axis=1)
    return SlidingResult(tiles.mean(axis=0), tiles, grid, used)


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(40, 216, (height, width, 3), dtype=np.uint8)


def note_pixels(banner: np.ndarray) -> int:
    return int(np.all(np.abs(banner.astype(int) - overlay.NOTE) <= 40, axis=-1).sum())


@pytest.mark.parametrize(("shape", "tile", "used", "note"), [
    ((64, 80), (64, 80), None, "single crop - no map"),
    ((64, 160), (64, 80), None, "2 crops - no map"),
    ((64, 64), (32, 32), np.array([True, False, False, False]), "single crop - no map"),  # kept crops count, not the grid
])
def test_one_or_two_crops_leave_the_image_untouched_and_say_so(shape, tile, used, note) -> None:
    h, w = shape
    picture = image(h, w)
    n = plan_tiles(h, w, CropPolicy(tile_size=tile, stride=tile)).n_tiles
    result = sliding(h, w, tile, np.full(n, 0.9), used)
    out = overlay.render_overlay(picture, result, 1, "parasitized  p(parasitized)=0.90", threshold=0.31)
    width = max(overlay.MIN_WIDTH, w)
    bar_h = overlay.bar_layout(width).height
    banner_h = out.shape[0] - h - bar_h
    assert out.shape[1] == width and banner_h > 0
    np.testing.assert_array_equal(out[banner_h : banner_h + h, :w], picture)  # no wash, not even a uniform one
    assert not out[banner_h : banner_h + h, w:].any()  # the padding that keeps the caption legible is black
    assert overlay.no_map_note(result.n_used) == note
    assert note_pixels(out[:banner_h]) > 20  # the note is drawn, in its own colour


def test_several_crops_are_tinted_by_their_probability_and_the_banner_has_no_note() -> None:
    h, w = 128, 256
    grey = np.full((h, w, 3), 128, np.uint8)
    p = np.tile(np.linspace(0.0, 1.0, 8), 4)  # 4 rows of 8 crops: low on the left, high on the right
    result = sliding(h, w, (32, 32), p)
    assert overlay.no_map_note(result.n_used) is None
    out = overlay.render_overlay(grey, result, 1, "parasitized", threshold=0.5)
    bar_h = overlay.bar_layout(w).height
    banner_h = out.shape[0] - h - bar_h
    shown = out[banner_h : banner_h + h].astype(int)
    assert np.abs(shown - 128).mean() > 10  # tinted
    left, right = shown[:, :32].mean(axis=(0, 1)), shown[:, -32:].mean(axis=(0, 1))
    assert left[2] > left[0] + 10 and right[0] > right[2] + 50  # JET: blue where p is low (faint), red where it is high
    assert note_pixels(out[:banner_h]) == 0


@pytest.mark.parametrize(("w", "threshold"), [(400, 0.31), (400, 0.05), (400, 0.8), (1800, 0.31)])
def test_the_colour_bar_runs_blue_to_red_and_marks_the_threshold(w: int, threshold: float) -> None:
    h = 96
    result = sliding(h, w, (32, 40), np.linspace(0, 1, 3 * (w // 40)))
    out = overlay.render_overlay(image(h, w), result, 1, "caption", threshold=threshold, scale_label="p(parasitized)")
    geo = overlay.bar_layout(w)
    assert out.shape == (out.shape[0], w, 3) and out.shape[0] > h + geo.height  # taller by the bar (and the banner)
    row = out[-geo.height :][(geo.y0 + geo.y1) // 2].astype(int)
    coloured = np.flatnonzero(row.sum(axis=1) > 0)
    x0, x1 = int(coloured[0]), int(coloured[-1])  # the bar's ends, found in the pixels
    assert row[x0][2] > 100 and row[x0][0] < 30 and row[x1][0] > 100 and row[x1][2] < 30  # JET 0 = blue, 1 = red
    white = np.flatnonzero(np.all(row == 255, axis=1))
    assert white.size > 0
    assert abs(white.mean() - (x0 + threshold * (x1 - x0))) <= 2


def test_no_threshold_means_no_mark_and_a_bad_one_is_refused() -> None:
    panel = overlay.colour_bar(300, threshold=None)
    geo = overlay.bar_layout(300)
    row = panel[(geo.y0 + geo.y1) // 2]
    assert not np.all(row == 255, axis=1).any()
    with pytest.raises(InputError, match=r"1\.5"):
        overlay.colour_bar(300, threshold=1.5)


# -- evaluate: misclassified images ----------------------------------------------------------------


def card(task: str = "binary", **changes: Any) -> ModelCard:
    fields: dict[str, Any] = {
        "binary": {"class_names": ("parasitized", "uninfected"), "positive_class": "parasitized", "threshold": 0.31},
        "multiclass": {"class_names": ("red", "green", "blue")},
    }[task]
    return ModelCard(
        arch="fake", task=task, input_size=(TILE, TILE), crop=CropPolicy(tile_size=(TILE, TILE), stride=(TILE, TILE)),
        provenance=PROVENANCE, input_format="uint8_nhwc", **{**fields, **changes},
    )


def solid(rgb: tuple[int, int, int]) -> np.ndarray:
    return np.tile(np.asarray(rgb, np.uint8), (TILE, TILE, 1))


# name: (true class, p(parasitized)); decisions at 0.31, each at least 0.1 away from it
BINARY = {
    "pos sure.png": ("parasitized", 0.90),
    "pos missed.png": ("parasitized", 0.10),  # false negative, 0.21 below
    "neg clear.png": ("uninfected", 0.05),
    "neg flagged.png": ("uninfected", 0.80),  # false positive, 0.49 above: the most confidently wrong
    "<b>neg 0.45.png": ("uninfected", 0.45),  # right at 0.5, wrong at the card's 0.31; a name with markup
    "pos faint.png": ("parasitized", 0.20),  # false negative, 0.11 below
}
EXPECTED_ORDER = ["neg flagged.png", "pos missed.png", "<b>neg 0.45.png", "pos faint.png"]


def binary_folder(root: Path) -> Path:
    for name, (label, p) in BINARY.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        write_image(root / label / name, solid((int(round(p * 256 - 1)), 0, 0)))
    return root


def captured_texts(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Every text drawn on each saved figure (titles, legends, labels), by file name."""
    pytest.importorskip("matplotlib")
    from matplotlib.text import Text

    texts: dict[str, list[str]] = {}
    real = plots._save

    def spy(fig: Any, path: Path | str) -> Path:
        texts[Path(path).name] = [t.get_text() for t in fig.findobj(Text)]
        return real(fig, path)

    monkeypatch.setattr(plots, "_save", spy)
    return texts


def section(page: str) -> str:
    start = page.index("<h2>Misclassified images")
    return page[start : page.index("</table>", start)]


def test_evaluate_lists_exactly_the_misclassified_images_most_confident_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgedx.runtime.evaluate import evaluate

    texts = captured_texts(monkeypatch)
    data = binary_folder(tmp_path / "labelled")
    report = evaluate(Model(RedLevelSession(card())), data, bootstrap=0, out=tmp_path / "report")
    assert report.metrics["n"] == 6 and report.n_misclassified == 4
    assert [Path(m["image"]).name for m in report.misclassified] == EXPECTED_ORDER
    first = report.misclassified[0]
    assert (first["true"], first["predicted"], first["probability_of"], first["threshold"]) == ("uninfected", "parasitized", "parasitized", 0.31)
    assert first["probability"] == pytest.approx(0.80, abs=0.01)
    assert report.to_dict()["n_misclassified"] == 4 and len(report.to_dict()["misclassified"]) == 4

    with (tmp_path / "report" / "misclassified.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "true", "predicted", "p_parasitized", "threshold"]
    assert [Path(r["image"]).name for r in rows] == EXPECTED_ORDER
    assert [(r["true"], r["predicted"]) for r in rows] == [(BINARY[n][0], "uninfected" if BINARY[n][0] == "parasitized" else "parasitized") for n in EXPECTED_ORDER]
    assert {r["threshold"] for r in rows} == {"0.31"}

    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    wrong = section(page)
    assert wrong.count("<img") == 4 and wrong.count('src="data:image/jpeg;base64,') == 4
    assert "<b>neg" not in page and "&lt;b&gt;neg 0.45.png" in wrong
    assert "at threshold 0.31" in wrong and "Confusion matrix, at threshold 0.31" in page and "<th>at threshold 0.31</th>" in page
    # the plots say where they were taken too
    assert any("at threshold 0.31" in t and "Confusion matrix" in t for t in texts["confusion_matrix.png"])
    assert any(t.startswith("parasitized, at threshold 0.31") for t in texts["radar.png"])
    assert any(t.startswith("at threshold 0.31: sens 0.33, spec 0.33") for t in texts["roc.png"])  # 1 of 3 caught, 1 of 3 cleared


def test_multiclass_misclassified_use_argmax_and_the_predicted_probability(tmp_path: Path) -> None:
    from edgedx.runtime.evaluate import evaluate

    colours = [(200, 20, 20), (20, 200, 20), (20, 20, 200), (20, 180, 60), (30, 30, 160)]
    labels = [0, 1, 2, 0, 2]  # the fourth is green but labelled red: the only mistake
    npz = tmp_path / "set.npz"
    np.savez(npz, val_images=np.stack([solid(c) for c in colours]), val_labels=np.asarray(labels)[:, None])
    report = evaluate(Model(RedLevelSession(card("multiclass"))), npz, bootstrap=0, out=tmp_path / "out")
    assert [(m["image"], m["true"], m["predicted"], m["threshold"]) for m in report.misclassified] == [("set.npz:val[3]", "red", "green", None)]
    assert report.misclassified[0]["probability"] == pytest.approx(181 / 263, abs=0.01)
    rows = list(csv.reader((tmp_path / "out" / "misclassified.csv").open(encoding="utf-8")))
    assert rows[0] == ["image", "true", "predicted", "p_predicted", "threshold"] and rows[1][4] == "argmax"
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert section(page).count("<img") == 1 and "Misclassified images, at argmax" in page
    assert "Confusion matrix, at argmax" in page and "at threshold 0.50" not in page  # no binary-only column


def no_matplotlib(*_: Any) -> Any:
    raise MissingDependencyError("matplotlib", "plots", "Plotting")


def test_thumbnails_are_capped_and_an_unreadable_one_gets_a_note(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgedx.runtime.evaluate import EvaluationReport, score

    c = card()
    truth = np.zeros(4, dtype=int)  # all parasitized, all missed
    probs = np.tile([0.1, 0.9], (4, 1))
    records = tuple({"image": f"=cmd{i}.png", "true": "parasitized", "predicted": "uninfected", "probability": 0.1,
                     "probability_of": "parasitized", "threshold": 0.31} for i in range(4))
    report = EvaluationReport("m.onnx", "data", 0.31, score(truth, probs, c, 0.31), (), records)
    big = tmp_path / "big.png"
    write_image(big, image(300, 500))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    monkeypatch.setattr(report_html, "MAX_THUMBNAILS", 3)
    monkeypatch.setattr(plots, "_new_figure", no_matplotlib)  # the page alone: no plots to wait for
    thumbs = [big, tmp_path / "gone.png", tmp_path / "broken.png", big]
    report_html.write_evaluation(tmp_path / "out", report, c, truth, probs, thumbnails=thumbs)
    wrong = section((tmp_path / "out" / "report.html").read_text(encoding="utf-8"))
    assert wrong.count("<img") == 1 and wrong.count("no thumbnail") == 2
    assert "1 more not shown here; all 4 are in misclassified.csv" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    with (tmp_path / "out" / "misclassified.csv").open(newline="", encoding="utf-8") as f:
        assert [row[0] for row in csv.reader(f)] == ["image"] + [f"'=cmd{i}.png" for i in range(4)]  # never a formula
    encoded = re.search(r'src="data:image/jpeg;base64,([^"]+)"', wrong)
    assert encoded is not None
    thumb = cv2.imdecode(np.frombuffer(base64.b64decode(encoded.group(1)), np.uint8), cv2.IMREAD_COLOR)
    assert max(thumb.shape[:2]) == report_html.THUMBNAIL_PX and thumb.shape[:2] == (77, 128)  # aspect kept


def test_a_tiny_npz_image_is_enlarged_pixel_for_pixel() -> None:
    tag = report_html.thumbnail(np.zeros((28, 28), np.uint8))
    data = re.search(r"base64,([^\"]+)", tag)
    assert data is not None
    thumb = cv2.imdecode(np.frombuffer(base64.b64decode(data.group(1)), np.uint8), cv2.IMREAD_COLOR)
    assert thumb.shape[:2] == (84, 84)  # 3 × 28: at least 64, a whole factor


# -- plots say where they were taken -------------------------------------------------------


def test_where_taken_names_the_threshold_or_argmax() -> None:
    assert plots.where_taken("binary", 0.31) == "at threshold 0.31"
    assert plots.where_taken("binary", 0.305) == "at threshold 0.305"
    assert plots.where_taken("binary", 0.5) == "at threshold 0.50"
    assert plots.where_taken("binary", None) == "at threshold 0.50 (default)"
    assert plots.where_taken("multiclass", 0.31) == "at argmax"
    assert plots.where_taken("multilabel", 0.3) == "at threshold 0.30 per label"
    with pytest.raises(ValueError, match="'regression'"):
        plots.where_taken("regression", 0.5)
    with pytest.raises(ValueError, match="nan"):
        plots.threshold_text(float("nan"))


def test_every_plot_title_carries_where_it_was_taken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = captured_texts(monkeypatch)
    where = plots.where_taken("binary", 0.31)
    plots.plot_confusion_matrix([[3, 1], [0, 4]], ["a", "b"], tmp_path / "cm.png", where=where)
    plots.plot_radar({"accuracy": 0.8}, tmp_path / "radar.png", title="b, validation", where=where)
    plots.plot_learning_curves([{"epoch": 1, "val_loss": 1.0, "val_accuracy": 0.5}], tmp_path / "lc.png", metric="val_accuracy", where="at threshold 0.50")
    y = np.array([0, 0, 1, 1])
    plots.plot_roc(y, np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.1, 0.9]]), ["a", "b"], tmp_path / "roc.png", operating_threshold=0.31)
    assert "Confusion matrix (counts, n=8), at threshold 0.31" in texts["cm.png"]
    assert "b, validation, at threshold 0.31" in texts["radar.png"]
    assert "Validation metrics, at threshold 0.50" in texts["lc.png"]
    assert "at threshold 0.31: sens 0.50, spec 0.50" in texts["roc.png"]
    plots.plot_confusion_matrix([[3, 1], [0, 4]], ["a", "b"], tmp_path / "old.png")  # other callers: titles as before
    assert "Confusion matrix (counts, n=8)" in texts["old.png"]


def test_a_long_caption_wraps_instead_of_losing_its_threshold() -> None:
    """A 320-px field cut "... threshold 0.62" to "... thresh": the number the overlay exists to show."""
    caption = "parasitized  p(parasitized)=0.99  threshold 0.62"
    line_h = max(18, 240 // 16)
    one_line = overlay._banner(2000, 240, caption, None)
    wrapped = overlay._banner(320, 240, caption, None)
    assert one_line.shape[0] == line_h and wrapped.shape[0] == 2 * line_h  # two lines on the narrow image
    assert overlay._wrap(caption, 312, line_h / 30.0) == ["parasitized p(parasitized)=0.99", "threshold 0.62"]
    assert not wrapped[:, -3:].any()  # nothing runs into the right edge
    with_note = overlay._banner(320, 240, caption, "single crop - no map")
    assert with_note.shape[0] == 3 * line_h
