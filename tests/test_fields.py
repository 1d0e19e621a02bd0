"""Whole fields a clinic can act on: annotations read, detections scored (FROC, field rules), operating points fitted
on annotated fields into a NEW artefact, diagnose deciding by the fitted field rule with slide summaries, and
evaluate --annotations.

Tiny synthetic data only (seconds): a hand-built ONNX whose p(positive) follows a crop's mean red level
(test_recalibrate's), fields of dark discs (red cells, in green and blue) with pure-red squares (parasites).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from edgedx.card import CropPolicy, Detection, ModelCard, Normalization, Provenance, now_iso
from edgedx.errors import InputError
from edgedx.runtime.detection_metrics import (
    FieldCandidates, FieldRule, card_rule, choose_field_rule, choose_tile_threshold, field_candidates_of, froc, match, operating_point,
)
from edgedx.runtime.detections import DetectedBox, fitted_rule_words
from edgedx.runtime.io.field_annotations import FieldTruth, read_field_annotations
from edgedx.runtime.model import Model
from fakes import RedLevelSession

SPOT = 12  # parasites: pure-red squares, pixels
SIZE = 96  # fields are SIZE × SIZE


# -- annotations ------------------------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def box(kind: str, x: float, y: float, w: float = 10, h: float = 10, *, text: bool = True) -> dict[str, Any]:
    values = {"x": x, "y": y, "w": w, "h": h}
    return {"type": kind, "bbox": {k: str(v) if text else v for k, v in values.items()}}


def test_annotations_are_read_per_field_with_difficult_boxes_neither_positive_nor_cells(tmp_path: Path) -> None:
    path = write_json(tmp_path / "a.json", [
        {"image_name": "f1.jpg", "objects": [box("ring", 10, 20), box("red blood cell", 50, 50, text=False), box("difficult", 70, 5),
                                             box("gametocyte", 30, 30), box("leukocyte", 0, 0)]},
        {"image_name": "f2.jpg", "objects": []},
    ])
    truth = read_field_annotations(path)
    f1, f2 = truth.fields["f1.jpg"], truth.fields["f2.jpg"]
    assert f1.positives.tolist() == [[15.0, 25.0], [35.0, 35.0]] and f1.difficult.tolist() == [[75.0, 10.0]]
    assert f1.n_red_cells == 1 and f1.n_cells == 3 and f1.positive  # infected cells are cells; difficult is not counted
    assert not f2.positive and f2.n_cells == 0 and truth.names == ["f1.jpg", "f2.jpg"]
    only_rings = read_field_annotations(path, positive_types=("ring",))
    assert only_rings.fields["f1.jpg"].n_positives == 1
    assert len(truth.subset(["f2.jpg"])) == 1


@pytest.mark.parametrize(("data", "named"), [
    ({"image_name": "x"}, "JSON list"),
    ([{"image_name": "ok.jpg", "objects": []}, {"objects": []}], "entry 1 has no 'image_name'"),
    ([{"image_name": "f.jpg", "objects": [{"type": "ring", "bbox": {"x": "a", "y": 0, "w": 1, "h": 1}}]}], "entry 0 ('f.jpg') object 0"),
    ([{"image_name": "f.jpg", "objects": [{"type": "ring", "bbox": {"x": 0, "y": 0, "w": 0, "h": 1}}]}], "positive w, h"),
    ([{"image_name": "f.jpg", "objects": {}}], "entry 0 ('f.jpg') has no 'objects' list"),
    ([{"image_name": "f.jpg", "objects": []}, {"image_name": "f.jpg", "objects": []}], "entry 1 annotates 'f.jpg' again"),
])
def test_a_malformed_annotations_file_is_refused_naming_the_entry(tmp_path: Path, data: Any, named: str) -> None:
    with pytest.raises(InputError, match=named.replace("(", r"\(").replace(")", r"\)")):
        read_field_annotations(write_json(tmp_path / "a.json", data))
    with pytest.raises(InputError, match="not found"):
        read_field_annotations(tmp_path / "missing.json")
    with pytest.raises(InputError, match="both positive and difficult"):
        read_field_annotations(write_json(tmp_path / "b.json", []), positive_types=("ring",), difficult_types=("ring",))


# -- matching, FROC, choices ------------------------------------------------------------------------------------


def truth(name: str = "f", positives: list[tuple[float, float]] = (), difficult: list[tuple[float, float]] = (), red: int = 0) -> FieldTruth:
    return FieldTruth(name, np.array(positives, float).reshape(-1, 2), np.array(difficult, float).reshape(-1, 2), red)


def test_each_positive_is_matched_once_and_a_detection_on_a_difficult_object_is_not_false() -> None:
    field = truth(positives=[(15, 15), (85, 85)], difficult=[(50, 15)])
    candidates = [
        DetectedBox(40, 0, 20, 20, 0.7),  # holds only the difficult centre: neither
        DetectedBox(5, 5, 20, 20, 0.9),  # the first parasite
        DetectedBox(8, 8, 20, 20, 0.8),  # the same parasite again: a false detection
        DetectedBox(40, 40, 10, 10, 0.6),  # nothing: false
        DetectedBox(80, 80, 10, 10, 0.5),  # the second parasite
    ]
    scores, outcome, found_at = match(candidates, field)
    assert scores.tolist() == [0.9, 0.8, 0.7, 0.6, 0.5] and outcome.tolist() == [1, 0, -1, 0, 1]
    assert found_at.tolist() == [0.9, 0.5]
    curve = froc([field_candidates_of(candidates, np.array([0.9, 0.1]), field)])
    assert curve.point(0.85) == {"threshold": 0.85, "found": 1, "n_positives": 2, "sensitivity": 0.5, "false_per_field": 0.0}
    assert curve.at_rate(1.0)["threshold"] == 0.7  # 0.6 would be the second false detection
    assert curve.at_rate(2.0)["threshold"] == 0.5 and curve.at_rate(2.0)["found"] == 2
    assert [row["fp_per_field"] for row in curve.table()] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert curve.curve()[0] == [0.9, 1, 0.0] and curve.curve()[-1] == [0.5, 2, 2.0]


def fake_field(name: str, parasites: int, false: list[float], hit: float = 0.95, top: list[float] | None = None) -> FieldCandidates:
    """A field with ``parasites`` found at score ``hit`` and false detections at the scores ``false``."""
    scores = np.array(sorted([hit] * parasites + false, reverse=True))
    outcome = np.array([1 if s == hit and i < parasites else 0 for i, s in enumerate(scores)], np.int8)
    p = np.array(top if top is not None else scores[:3].tolist() or [0.01])
    return FieldCandidates(name, scores, outcome, np.full(parasites, hit), np.sort(p)[::-1], 100, 100 + parasites)


def test_the_tile_threshold_is_the_lowest_with_at_most_one_false_detection_per_field() -> None:
    fields = [fake_field("a", 2, [0.9, 0.4]), fake_field("b", 0, [0.8, 0.6, 0.3]), fake_field("c", 1, [0.7]), fake_field("d", 0, [0.5])]
    threshold = choose_tile_threshold(fields, 1.0)  # 4 fields: at most 4 false detections (0.9, 0.8, 0.7, 0.6)
    assert threshold == 0.6
    point = operating_point(fields, threshold, FieldRule("any"))
    assert point["false_per_field"] <= 1.0 and point["found"] == 3 and point["n_parasites"] == 3
    assert choose_tile_threshold(fields, 0.25) == 0.9  # one false detection in four fields
    with pytest.raises(InputError, match="fp-per-field"):
        choose_tile_threshold(fields, -1)


def test_auto_picks_the_rule_that_separates_the_fields_and_the_simplest_on_a_tie() -> None:
    # every negative field has one false detection, every positive field at least two detections: counting separates
    fields = [fake_field(f"p{i}", 2, []) for i in range(3)] + [fake_field(f"n{i}", 0, [0.9]) for i in range(3)]
    rule, note = choose_field_rule(fields, 0.5)
    assert rule == FieldRule("count_at_least", 2) and note["balanced_accuracy"] == 1.0
    clean = [fake_field(f"p{i}", 1, []) for i in range(3)] + [fake_field(f"n{i}", 0, [], top=[0.1]) for i in range(3)]
    assert choose_field_rule(clean, 0.5)[0] == FieldRule("any")  # top_k_mean separates them too: the simpler rule wins
    explicit, _ = choose_field_rule(clean, 0.5, "top_k_mean")
    assert explicit.rule == "top_k_mean" and explicit.threshold is not None and 0.1 < explicit.threshold <= 0.95
    _, said = choose_field_rule(fields[:3], 0.5)
    assert "every field is positive" in said["note"]


# -- fit-fields end to end on a tiny ONNX ------------------------------------------------------------------------


def field_card(detection: Detection | None = None, input_format: str = "float32_nchw") -> ModelCard:
    """The red-level ONNX's card: 16-px crops every 4 px over a field, p(parasitized) = sigmoid(12·(mean red − 0.5));
    ``uint8_nhwc`` for the fake session (tests/fakes.py), whose p(parasitized) is a crop's mean red / 256."""
    return ModelCard(
        arch="red", task="binary", class_names=("uninfected", "parasitized"), positive_class="parasitized", threshold=0.5,
        input_size=(16, 16), crop=CropPolicy((16, 16), (4, 4)), provenance=Provenance("0.1.0", now_iso()),
        normalization=Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)), detection=detection or Detection(),
        input_format=input_format,  # type: ignore[arg-type]
    )


CELLS = [(10 + 19 * i, 10 + 19 * j) for i in range(5) for j in range(5)]  # 25 red cells of 16 px per field


def smear(spots: list[tuple[int, int]]) -> np.ndarray:
    """Dark discs (cells) on light glass in green and blue, a dim red channel, and pure-red SPOT squares (top-left x, y)."""
    image = np.full((SIZE, SIZE, 3), (25, 215, 200), np.uint8)
    for x, y in CELLS:
        cv2.circle(image, (x, y), 8, (25, 120, 140), -1, cv2.LINE_AA)
    for x, y in spots:
        image[y : y + SPOT, x : x + SPOT, 0] = 255
    return image


SLIDES = {  # slide → field → parasites' top-left corners
    "slide A": {"a0.png": [(20, 20)], "a1.png": [(10, 60), (60, 14)], "a2.png": [(50, 50)], "a3.png": [(70, 30), (20, 70)]},
    "slide B": {"b0.png": [], "b1.png": [], "b2.png": [], "b3.png": []},
}


@pytest.fixture(scope="module")
def fields(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two slide folders of fields under one root, and their annotations.json (parasites as 'ring', cells as red cells)."""
    root = tmp_path_factory.mktemp("fields") / "smears"
    entries = []
    for slide, per_field in SLIDES.items():
        (root / slide).mkdir(parents=True)
        for name, spots in per_field.items():
            cv2.imwrite(str(root / slide / name), smear(spots)[..., ::-1])
            objects = [box("ring", x, y, SPOT, SPOT) for x, y in spots] + [box("red blood cell", x - 8, y - 8, 16, 16) for x, y in CELLS]
            entries.append({"image_name": f"{slide}/{name}", "objects": objects})
    return root, write_json(root.parent / "annotations.json", entries)


@pytest.fixture(scope="module")
def fitted(fields: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    pytest.importorskip("onnx")
    from edgedx.export.fit_fields import FitFieldsOptions, fit_fields
    from test_recalibrate import red_model

    parent = red_model(tmp_path_factory.mktemp("model") / "red.onnx", field_card())
    root, annotations = fields
    report = fit_fields(parent, root, annotations, parent.parent / "out", FitFieldsOptions(fp_per_field=0.5))
    return parent, report


def test_fit_fields_writes_a_new_verified_artefact_with_detection_fitted_and_the_parent_untouched(fitted: tuple[Path, Any]) -> None:
    from edgedx.runtime import load_model
    from edgedx.runtime.io.integrity import sha256_file
    from edgedx.runtime.selftest import verify_artefact

    parent, report = fitted
    assert sha256_file(parent) == report.parent_sha256  # the parent's bytes, as they were read
    new = Path(report.output)
    assert new.name == "red.fields.onnx" and new.is_file() and new != parent and Path(report.report_path).is_file()
    assert verify_artefact(new).passed and report.selftest["passed"]
    card = load_model(new, verify=True).card
    d = card.detection
    assert d.enabled and d.count_cells and d.field_rule == "any" and d.slide_rule == "any_field" and d.slide_k == 1
    assert 0.5 < d.tile_threshold < 1  # type: ignore[operator]
    fitted_on = d.fitted_on
    assert fitted_on["source"] == "validation fields" and fitted_on["n_fields"] == 8 and fitted_on["n_parasites"] == 6
    assert fitted_on["fitted"]["found"] == 6 and fitted_on["fitted"]["false_per_field"] <= 0.5
    assert fitted_on["fitted"]["field_sensitivity"] == 1.0 and fitted_on["fitted"]["field_specificity_ci95"] is not None
    assert fitted_on["cross_fitted"] is not None and "seed" in fitted_on["cross_fitted"]
    slides = fitted_on["slides"]  # two folders, one infected: the rule is chosen, ties to the smallest k
    assert slides["fitted"] and slides["grouped_by"] == "folder" and (slides["n_slides"], slides["n_positive_slides"]) == (2, 1)
    assert (slides["rule"], slides["k"]) == ("any_field", 1) and slides["by_k"]["4"]["sensitivity"] == 1.0 and slides["by_k"]["5"]["sensitivity"] == 0.0
    assert "cell_count_mae" in fitted_on["fitted"] and "parasitaemia_mae_points" in fitted_on["cross_fitted"]
    step = card.provenance.lineage[-1]
    assert step["step"] == "fit-fields" and step["parent_sha256"] == report.parent_sha256 and step["parent_file"] == "red.onnx"
    assert {row["fp_per_field"] for row in report.froc} == {0.5, 1.0, 2.0, 4.0, 8.0}
    saved = json.loads(Path(report.report_path).read_text(encoding="utf-8"))
    assert saved["output_sha256"] == sha256_file(new) and saved["cross_fitted"]["folds"][0]["n_fitted_on"] == 4


def test_fit_fields_refuses_to_overwrite_and_a_non_binary_model(fitted: tuple[Path, Any], fields: tuple[Path, Path]) -> None:
    from edgedx.export.fit_fields import FitFieldsOptions, fit_fields

    parent, report = fitted
    root, annotations = fields
    with pytest.raises(InputError, match="already exists"):
        fit_fields(parent, root, annotations, Path(report.output).parent, FitFieldsOptions())
    with pytest.raises(InputError, match="field-rule"):
        FitFieldsOptions(field_rule="best")


def test_fit_fields_with_neighbour_context_fits_on_the_blended_crops_diagnose_reads(
    fitted: tuple[Path, Any], fields: tuple[Path, Path], tmp_path: Path,
) -> None:
    from edgedx.export.fit_fields import FitFieldsOptions, fit_fields
    from edgedx.runtime import load_model
    from edgedx.runtime.neighbours import with_neighbour_context

    parent, plain = fitted
    root, annotations = fields
    report = fit_fields(parent, root, annotations, tmp_path / "out", FitFieldsOptions(fp_per_field=0.5, neighbour_context=0.4))
    new = load_model(report.output, verify=True)
    assert new.card.crop.neighbour_context == 0.4 and report.neighbour_context == 0.4 and plain.neighbour_context == 0.0
    assert new.card.provenance.lineage[-1]["neighbour_context"] == {"old": 0.0, "new": 0.4}
    assert load_model(parent).card.crop.neighbour_context == 0.0  # the parent is unchanged
    field = root / "slide A" / "a1.png"
    own, blended = load_model(parent).diagnose(field).sliding, new.diagnose(field).sliding
    expected = with_neighbour_context(own.tile_probabilities, own.grid.shape, 0.4, 1)
    np.testing.assert_allclose(blended.tile_probabilities, expected, atol=1e-6)
    assert report.detection["tile_threshold"] != plain.detection["tile_threshold"]  # chosen on the blended crops
    with pytest.raises(InputError, match="neighbour-context"):
        FitFieldsOptions(neighbour_context=0.5)


def test_slides_of_one_kind_leave_the_slide_rule_a_default_and_say_why(fitted: tuple[Path, Any], fields: tuple[Path, Path], tmp_path: Path) -> None:
    from edgedx.export.fit_fields import FitFieldsOptions, fit_fields

    parent, _ = fitted
    root, annotations = fields
    manifest = tmp_path / "one slide.csv"
    manifest.write_text("path,slide_id\n" + "".join(f"{root / slide / name},S1\n" for slide, per in SLIDES.items() for name in per), encoding="utf-8")
    report = fit_fields(parent, root, annotations, tmp_path / "out", FitFieldsOptions(slide_k=2), slides=manifest)
    slides = report.detection["fitted_on"]["slides"]
    assert not slides["fitted"] and (report.detection["slide_rule"], report.detection["slide_k"]) == ("count_at_least", 2)
    assert slides["why"].startswith("1 slide(s), 1 positive (grouped by manifest): a slide rule cannot be chosen") and "--slides" in slides["why"]


def test_diagnose_decides_by_the_fitted_field_rule_and_writes_one_line_per_slide(fitted: tuple[Path, Any], fields: tuple[Path, Path], tmp_path: Path) -> None:
    import csv

    from edgedx.runtime.batch import diagnose_paths
    from edgedx.runtime.outputs.records import DETECTION_COLUMNS, read_records

    _, report = fitted
    root, _ = fields
    summary = diagnose_paths([root], report.output, tmp_path / "fields.jsonl")
    records = {Path(r["input"]).name: r for r in read_records(summary.out)}
    assert len(records) == 8
    for slide, per_field in SLIDES.items():
        for name, spots in per_field.items():
            record = records[name]
            assert record["decision"] == ("parasitized" if spots else "uninfected") and record["n_detections"] == len(spots)
            assert record["decided_by"].startswith("field rule: at least 1 parasitized candidate at p ≥ ")
            assert record["decided_by"].endswith("fitted on 8 validation fields")
    assert records["a0.png"]["probabilities"]["parasitized"] < 0.5  # the mean of the crops would have said uninfected
    assert summary.slides is not None and summary.slides.name == "fields.jsonl.slides.jsonl"
    lines = {line["slide_id"]: line for line in map(json.loads, summary.slides.read_text(encoding="utf-8").splitlines())}
    assert set(lines) == {str(root / "slide A"), str(root / "slide B")}
    a, b = lines[str(root / "slide A")], lines[str(root / "slide B")]
    assert (a["n_fields"], a["n_positive_fields"], a["n_detections"], a["label"]) == (4, 4, 6, "parasitized")
    assert (b["n_positive_fields"], b["label"], b["slide_decision"]["positive"]) == (0, "uninfected", False)
    in_a = [records[n] for n in SLIDES["slide A"]]
    cells = sum(r["cells"]["count"] for r in in_a)
    assert cells > 0 and a["parasitaemia"]["n_cells"] == cells and a["parasitaemia"]["percent"] == pytest.approx(100 * 6 / cells, abs=1e-3)
    assert a["parasitaemia"]["ci95"][0] < a["parasitaemia"]["percent"] < a["parasitaemia"]["ci95"][1]
    as_csv = diagnose_paths([root / "slide A"], report.output, tmp_path / "fields.csv")
    header = next(csv.reader(as_csv.out.open(encoding="utf-8")))
    assert set(DETECTION_COLUMNS) <= set(header)
    assert json.loads(as_csv.slides.read_text(encoding="utf-8"))["n_detections"] == 6  # type: ignore[union-attr]


def test_a_slide_manifest_groups_fields_across_folders_and_names_the_ones_it_does_not_list(
    fitted: tuple[Path, Any], fields: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from edgedx.runtime.batch import diagnose_paths
    from edgedx.runtime.outputs.records import read_records

    parent, report = fitted
    root, _ = fields
    lists = tmp_path / "lims export"
    lists.mkdir()
    manifest = lists / "slides.csv"  # relative paths are read from the manifest's folder
    rel = Path(os.path.relpath(root, lists))
    rows = [("slide A/a0.png", "patient 1"), ("slide A/a1.png", "patient 1"), ("slide A/a2.png", "patient 2"), ("slide B/b0.png", "patient 2")]
    manifest.write_text("path,slide_id\n" + "".join(f"{rel / p},{s}\n" for p, s in rows), encoding="utf-8")

    only = diagnose_paths([], report.output, tmp_path / "listed.jsonl", slides=manifest)  # no inputs: the manifest's fields
    assert sorted(Path(r["input"]).name for r in read_records(only.out)) == ["a0.png", "a1.png", "a2.png", "b0.png"]
    lines = {line["slide_id"]: line for line in map(json.loads, only.slides.read_text(encoding="utf-8").splitlines())}  # type: ignore[union-attr]
    assert set(lines) == {"patient 1", "patient 2"} and {line["grouped_by"] for line in lines.values()} == {"manifest"}
    assert (lines["patient 1"]["n_fields"], lines["patient 1"]["n_detections"], lines["patient 1"]["label"]) == (2, 3, "parasitized")
    assert (lines["patient 2"]["n_fields"], lines["patient 2"]["n_positive_fields"]) == (2, 1)

    with caplog.at_level("WARNING"):
        every = diagnose_paths([root], report.output, tmp_path / "every.jsonl", slides=manifest)
    lines = {line["slide_id"]: line for line in map(json.loads, every.slides.read_text(encoding="utf-8").splitlines())}  # type: ignore[union-attr]
    assert lines["patient 1"]["n_fields"] == 2 and lines["patient 2"]["n_fields"] == 2
    assert lines[str(root / "slide A")]["n_fields"] == 1 and lines[str(root / "slide B")]["n_fields"] == 3  # unlisted: their folder
    assert lines[str(root / "slide B")]["grouped_by"] == "folder"
    assert "4 fields are not in --slides" in caplog.text

    with pytest.raises(InputError, match="no field detection.*edgedx fit-fields"):
        diagnose_paths([root], parent, tmp_path / "plain.jsonl", slides=manifest)
    assert not (tmp_path / "plain.jsonl").exists()


def test_evaluate_with_annotations_scores_fields_at_the_cards_rule(fitted: tuple[Path, Any], fields: tuple[Path, Path], tmp_path: Path) -> None:
    from edgedx.runtime.evaluate import FieldEvaluationReport, evaluate

    parent, report = fitted
    root, annotations = fields
    result = evaluate(report.output, root, annotations=annotations, out=tmp_path / "eval")
    assert isinstance(result, FieldEvaluationReport)
    assert result.point["found"] == 6 and result.point["field"]["sensitivity"] == 1.0 and result.point["field"]["specificity"] == 1.0
    assert [row["fp_per_field"] for row in result.froc] == [0.5, 1.0, 2.0, 4.0, 8.0] and result.froc[0]["found"] == 6
    assert "mae_points" in result.point["parasitaemia"] and "mae" in result.point["cell_count"]
    assert {r["image"] for r in result.per_field if r["decided"]} == {f"slide A/{n}" for n in SLIDES["slide A"]}
    saved = json.loads((tmp_path / "eval" / "evaluation.json").read_text(encoding="utf-8"))
    assert saved["point"]["found"] == 6 and saved["froc"][1]["fp_per_field"] == 1.0
    slides = result.slides
    assert slides is not None and slides["grouped_by"] == "folder" and (slides["n_slides"], slides["n_positive_slides"]) == (2, 1)
    assert slides["sensitivity"] == 1.0 and slides["specificity"] == 1.0 and slides["rule"] == "any_field"
    a = next(s for s in slides["per_slide"] if s["slide_id"] == str(root / "slide A"))
    assert (a["n_fields"], a["parasites"], a["detections"], a["truth"], a["positive"]) == (4, 6, 6, True, True)
    assert a["parasitaemia_annotated_percent"] == pytest.approx(100 * 6 / (4 * len(CELLS) + 6))
    assert saved["slides"]["n_slides"] == 2
    with pytest.raises(InputError, match="edgedx fit-fields"):
        evaluate(parent, root, annotations=annotations)


def test_evaluate_scores_slides_as_a_manifest_groups_them(fitted: tuple[Path, Any], fields: tuple[Path, Path], tmp_path: Path) -> None:
    from edgedx.runtime.evaluate import evaluate

    _, report = fitted
    root, annotations = fields
    manifest = tmp_path / "slides.csv"  # patient 1: one positive field and one clean one; patient 2: two clean fields
    manifest.write_text(f"path,slide_id\n{root / 'slide A' / 'a0.png'},P1\n{root / 'slide B' / 'b0.png'},P1\n"
                        f"{root / 'slide B' / 'b1.png'},P2\n{root / 'slide B' / 'b2.png'},P2\n", encoding="utf-8")
    slides = evaluate(report.output, root, annotations=annotations, slides=manifest).slides
    assert slides is not None and sorted(slides["grouped_by"]) == ["folder", "manifest"]  # the unlisted fields keep their folder
    by_id = {s["slide_id"]: s for s in slides["per_slide"]}
    assert by_id["P1"]["truth"] and by_id["P1"]["positive"] and by_id["P1"]["n_fields"] == 2
    assert not by_id["P2"]["truth"] and not by_id["P2"]["positive"]
    assert by_id[str(root / "slide A")]["n_fields"] == 3 and by_id[str(root / "slide B")]["n_fields"] == 1
    assert slides["n_slides"] == 4 and slides["sensitivity"] == 1.0 and slides["specificity"] == 1.0
    with pytest.raises(InputError, match="give --annotations A.json with it"):
        evaluate(report.output, root, slides=manifest)


# -- records without a fitted rule, the Ray schema -----------------------------------------------------------


def test_an_unfitted_detection_card_keeps_the_probability_decision_and_says_no_decided_by() -> None:
    image = smear([(20, 20)])
    plain = Model(RedLevelSession(field_card(Detection(enabled=True), "uint8_nhwc"))).diagnose(image).to_record()
    assert "decided_by" not in plain and plain["n_detections"] >= 1 and plain["decision"] == "uninfected"  # by the merged probability
    card = field_card(Detection(enabled=True, tile_threshold=0.9, field_rule="count_at_least", field_k=2, fitted_on={"n_fields": 52, "source": "validation fields"}))
    assert fitted_rule_words(card) == "field rule: at least 2 parasitized candidates at p ≥ 0.9, fitted on 52 validation fields"
    assert card_rule(card) == (0.9, FieldRule("count_at_least", 2))


def test_the_ray_schema_keeps_the_detection_keys() -> None:
    pa = pytest.importorskip("pyarrow")
    from edgedx.runtime.outputs.records import empty_record
    from edgedx.runtime.ray_engine import record_schema

    card = field_card(Detection(enabled=True, fitted_on={"n_fields": 3, "source": "validation fields"}), "uint8_nhwc")
    record = {**empty_record("f.png"), **Model(RedLevelSession(card)).diagnose(smear([(20, 20)])).to_record()}
    table = pa.Table.from_pylist([record], schema=record_schema(card))
    [back] = table.to_pylist()
    assert back["n_detections"] == record["n_detections"] and back["decided_by"] == record["decided_by"]
    assert back["detections"][0]["box"] == record["detections"][0]["box"] and back["timings_ms"]["detect"] == record["timings_ms"]["detect"]
    assert "n_detections" not in record_schema(field_card()).names


def test_ray_refuses_a_card_that_counts_cells_naming_the_local_engine(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    from edgedx.runtime.ray_engine import _check_model
    from test_recalibrate import red_model

    path = red_model(tmp_path / "cells.onnx", field_card(Detection(enabled=True, count_cells=True)))
    with pytest.raises(InputError, match="--engine local"):
        _check_model(path, 32, None, None)
