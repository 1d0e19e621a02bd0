"""Drift monitoring of diagnose results against the card's training references (no model run: constructed results)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from typer.testing import CliRunner

from conftest import run_edgedx
from edgedx.card import Abstention, Calibration, CropPolicy, ModelCard, Provenance, QualityLimits, now_iso
from edgedx.cli import app
from edgedx.errors import EdgeDxError, InputError
from edgedx.runtime.monitor import DriftError, MonitorOptions, MonitorReport, monitor, read_results
from edgedx.runtime.outputs.records import RecordWriter, empty_record

runner = CliRunner()
CLASSES = ("uninfected", "parasitized")
PERCENTILES = {
    "brightness": {"1": 80.0, "5": 90.0, "50": 120.0, "95": 150.0, "99": 160.0},
    "focus": {"1": 40.0, "5": 60.0, "50": 150.0, "95": 400.0, "99": 600.0},
    "clipped": {"1": 0.0, "5": 0.0, "50": 0.001, "95": 0.01, "99": 0.02},
    "colour": {"1": 50.0, "5": 60.0, "50": 80.0, "95": 100.0, "99": 110.0},
    "short_side": {"1": 64.0, "5": 64.0, "50": 64.0, "95": 64.0, "99": 64.0},
}


def card(*, reference: bool = True, refer_rate: float | None = 0.06, confidence: float | None = 0.93) -> ModelCard:
    quality = QualityLimits(focus_min=20.0, clipped_max=0.07, brightness_range=(40.0, 200.0), colour_range=(20.0, 140.0),
                            min_short_side=32, reference={"n_images": 500, "percentiles": PERCENTILES} if reference else {})
    return ModelCard(
        arch="x", task="binary", class_names=CLASSES, positive_class="parasitized", threshold=0.5, input_size=(64, 64),
        crop=CropPolicy((64, 64), (32, 32)), provenance=Provenance("0.1.0", now_iso()), quality=quality if reference else QualityLimits(),
        calibration=Calibration("temperature", (1.2,), {"split": "val", **({"mean_confidence_on_val": confidence} if confidence else {})}),
        abstention=Abstention(0.95, 0.4, 0.2, {"split": "val", **({"refer_rate_on_val": refer_rate} if refer_rate is not None else {})}),
    )


def record(i: int, *, brightness: float = 120.0, refer: bool = False, reject: bool = False, confidence: float = 0.93,
           error: bool = False) -> dict:
    """A record as diagnose writes it (the quality gate's fields included)."""
    rec = empty_record(f"img{i:04d}.png")
    if error:
        return {**rec, "error": "cannot decode img.png"}
    p = confidence if i % 2 else 1 - confidence
    rec.update(
        label="parasitized" if p >= 0.5 else "uninfected", probabilities={"uninfected": round(1 - p, 6), "parasitized": round(p, 6)},
        decision="reject" if reject else "refer" if refer else ("parasitized" if p >= 0.5 else "uninfected"),
        quality={"focus": 150.0, "clipped": 0.001, "brightness": brightness, "colour": 80.0, "short_side": 64.0, "passed": not reject},
        refer_reasons=["crop disagreement"] if refer else [], reject_reasons=["focus"] if reject else [],
    )
    return rec


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_darker_images_are_flagged_in_plain_words(tmp_path: Path) -> None:
    records = [record(i) for i in range(100)] + [record(i, brightness=62.0) for i in range(100, 200)]
    report = monitor(write_jsonl(tmp_path / "r.jsonl", records), card())
    [flag] = [f for f in report.flags if f.what == "brightness"]
    assert flag.severity == "shift" and report.drifted
    assert flag.message == (
        "brightness median 62 over the last 100 images is below the training images' 1st percentile 80: the images are darker "
        "than the training images — check the illumination and exposure"
    )
    assert report.overall.quality["brightness"] == pytest.approx(91.0) and report.current.quality["brightness"] == 62.0
    assert [w.n for w in report.windows] == [100, 100] and report.windows[0].quality["brightness"] == 120.0
    with pytest.raises(DriftError, match="1 shift\\(s\\) in .*brightness median 62"):
        report.raise_if_drift()
    assert issubclass(DriftError, EdgeDxError)


def test_a_median_between_the_5th_and_1st_percentile_is_worth_watching_not_a_shift(tmp_path: Path) -> None:
    report = monitor(write_jsonl(tmp_path / "r.jsonl", [record(i, brightness=85.0) for i in range(60)]), card())
    [flag] = report.flags
    assert flag.severity == "watch" and "5th percentile 90" in flag.message and not report.drifted
    report.raise_if_drift()  # a watch is not a failure


def test_a_refer_rate_far_above_validation_is_flagged(tmp_path: Path) -> None:
    records = [record(i) for i in range(200)] + [record(i, refer=i % 100 < 31) for i in range(200, 300)]
    report = monitor(write_jsonl(tmp_path / "r.jsonl", records), card())
    [flag] = [f for f in report.flags if f.what == "refer_rate"]
    assert flag.message == "refer rate 31% over the last 100 images vs 6% expected on validation; most often: crop disagreement (31)"
    assert report.overall.refer_rate == pytest.approx(31 / 300) and report.current.reasons == {"refer: crop disagreement": 31}


def test_a_refer_rate_near_validation_is_not_flagged(tmp_path: Path) -> None:
    report = monitor(write_jsonl(tmp_path / "r.jsonl", [record(i, refer=i % 100 < 9) for i in range(100)]), card())
    assert not report.flags and report.current.refer_rate == pytest.approx(0.09)


def test_rejections_and_lower_confidence_are_flagged_with_their_reasons(tmp_path: Path) -> None:
    records = [record(i, reject=i % 10 < 2, confidence=0.7) for i in range(100)]
    report = monitor(write_jsonl(tmp_path / "r.jsonl", records), card())
    flags = {f.what: f for f in report.flags}
    assert flags["reject_rate"].message.startswith("reject rate 20% over the last 100 images vs 2% expected at most")
    assert "most often: focus (20)" in flags["reject_rate"].message
    assert flags["confidence"].message.startswith("mean top-class confidence 0.70 over the last 80 images vs 0.93 expected on validation")
    assert report.current.reject_rate == pytest.approx(0.2) and report.current.refer_rate == 0.0


def test_without_references_it_says_what_cannot_be_compared(tmp_path: Path) -> None:
    results = write_jsonl(tmp_path / "r.jsonl", [record(i, brightness=20.0) for i in range(50)])
    bare = monitor(results, card(reference=False, refer_rate=None, confidence=None))
    assert not bare.flags
    text = " ".join(bare.cannot_compare)
    assert "no training reference for image quality" in text and "no refer rate" in text and "no mean top-class confidence" in text
    nothing = monitor(results)
    assert not nothing.flags and nothing.cannot_compare[0].startswith("no model given") and nothing.n == 50


def test_too_few_records_are_not_judged(tmp_path: Path) -> None:
    report = monitor(write_jsonl(tmp_path / "r.jsonl", [record(i, brightness=20.0) for i in range(10)]), card())
    assert not report.flags and "too few to judge" in report.notes[0]


def test_jsonl_and_csv_written_by_diagnose_give_the_same_statistics(tmp_path: Path) -> None:
    records = [record(i, refer=i % 7 == 0, reject=i % 11 == 0, confidence=0.8 + 0.001 * i) for i in range(60)] + [record(60, error=True)]
    stats = []
    for name in ("r.jsonl", "r.csv"):
        with RecordWriter(tmp_path / name, CLASSES) as writer:
            for rec in records:
                writer.write(rec)
        report = monitor(tmp_path / name, card(), MonitorOptions(window=25))
        stats.append((report.n, report.overall.n_errors, report.overall.refer_rate, report.overall.reject_rate,
                      report.overall.confidence, [w.n for w in report.windows], report.overall.quality, report.current.reasons))
    assert stats[0] == stats[1] and stats[0][0] == 61 and stats[0][1] == 1 and stats[0][5] == [25, 25, 11]
    assert stats[0][6]["brightness"] == 120.0 and stats[0][7]["reject: focus"] == 2


def test_csv_quality_columns_and_a_torn_jsonl_line_are_read(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["input", "decision", "error", "quality_brightness", "quality", "quality_measures", "reject_reasons", "p_uninfected", "p_parasitized"])
        w.writerow(["a.png", "reject", "", "55", "", "", "focus; brightness", "0.9", "0.1"])
        w.writerow(["b.png", "uninfected", "", "", json.dumps({"brightness": 65, "focus": 3.5}), "", "", "0.8", "0.2"])
        w.writerow(["c.png", "uninfected", "", "", "", "focus=3.5; brightness=70; blockiness=1.2", "", "0.8", "0.2"])
    [first, second, third] = read_results(path)
    assert first.quality == {"brightness": 55.0} and first.reject_reasons == ("focus", "brightness") and first.confidence == 0.9
    assert second.quality == {"brightness": 65.0, "focus": 3.5} and second.decision == "uninfected"
    assert third.quality == {"brightness": 70.0, "focus": 3.5, "blockiness": 1.2}
    torn = tmp_path / "t.jsonl"
    torn.write_text(json.dumps(record(0)) + "\n" + json.dumps(record(1))[:40], encoding="utf-8")
    assert len(read_results(torn)) == 1
    with pytest.raises(InputError, match="line 1 is not an EdgeDx record"):
        read_results(_bad(tmp_path / "bad.jsonl"))


def _bad(path: Path) -> Path:
    path.write_text("not json\n" + json.dumps(record(0)) + "\n", encoding="utf-8")
    return path


def test_a_card_json_is_read_and_another_models_results_are_noted(tmp_path: Path) -> None:
    results = write_jsonl(tmp_path / "r.jsonl", [record(i, brightness=62.0) for i in range(40)])
    card_path = tmp_path / "model.onnx.card.json"
    card_path.write_text(json.dumps({"artefact": {}, "card": card().to_dict()}), encoding="utf-8")
    report = monitor(results, card_path)
    assert report.model == str(card_path) and report.flags[0].what == "brightness"
    with pytest.raises(InputError, match="monitor reads the .jsonl or .csv"):
        monitor(tmp_path / "r.txt", card())


# -- the command line ---------------------------------------------------------------------------------


def test_cli_monitor_passes_its_arguments_to_the_one_library_call(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    results = write_jsonl(tmp_path / "r.jsonl", [record(i, brightness=62.0) for i in range(40)])
    real = monitor(results, card())
    fake = mock.MagicMock(return_value=real)
    with mock.patch("edgedx.runtime.monitor.monitor", fake):
        result = runner.invoke(app, ["monitor", "r.jsonl", "--model", "m.onnx", "--window", "50", "--json", "m.json"])
    assert result.exit_code == 0, result.output
    fake.assert_called_once_with(Path("r.jsonl"), Path("m.onnx"), MonitorOptions(window=50))
    assert "SHIFT: brightness median 62" in result.output and json.loads((tmp_path / "m.json").read_text())["drifted"] is True
    with mock.patch("edgedx.runtime.monitor.monitor", mock.MagicMock(return_value=real)):
        failed = runner.invoke(app, ["monitor", "r.jsonl", "--fail-on-drift"])
    assert isinstance(failed.exception, DriftError)  # main() turns it into "error: …" and exit 1 (below)


def test_cli_fail_on_drift_exits_1_without_a_traceback_and_informs_otherwise(tmp_path: Path) -> None:
    results = write_jsonl(tmp_path / "r.jsonl", [record(i, brightness=62.0) for i in range(40)])
    card_path = tmp_path / "card.json"
    card_path.write_text(card().to_json(), encoding="utf-8")
    informed = run_edgedx("monitor", str(results), "--model", str(card_path))
    assert informed.returncode == 0 and "SHIFT: brightness median 62" in informed.stdout
    failed = run_edgedx("monitor", str(results), "--model", str(card_path), "--fail-on-drift")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr and "error: 1 shift(s)" in failed.stderr


def test_report_serialises(tmp_path: Path) -> None:
    report = monitor(write_jsonl(tmp_path / "r.jsonl", [record(i) for i in range(40)]), card())
    assert isinstance(report, MonitorReport) and json.loads(json.dumps(report.to_dict()))["n"] == 40
    assert np.isclose(report.overall.confidence["mean"], 0.93)
