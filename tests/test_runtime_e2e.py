"""The runtime with a real tiny exported model: videos, hot folder, resume, audit, maps, embedding API."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import Trained

pytest.importorskip("onnxruntime")

from edgedx.card import SCHEMA_VERSION  # noqa: E402
from edgedx.runtime import load_model  # noqa: E402
from edgedx.runtime.batch import diagnose_hot_folder, diagnose_paths  # noqa: E402
from edgedx.runtime.io.image_io import write_image  # noqa: E402
from edgedx.runtime.outputs.records import read_records  # noqa: E402
from edgedx.synthetic import render_field  # noqa: E402


def fields(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [render_field(rng, 97, 131, infected_fraction=0.3 * (i % 2)).image for i in range(n)]


def write_fields(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_image(folder / f"field {i}.png", image) for i, image in enumerate(fields(n))]


def test_records_carry_decision_top_k_tiles_and_timings(trained: Trained, tmp_path: Path) -> None:
    paths = write_fields(tmp_path / "in", 3)
    out = tmp_path / "out.jsonl"
    summary = diagnose_paths(
        paths, trained.onnx, out, refer_band=(0.2, 0.8), maps=tmp_path / "maps", crop={"aggregation": "max"}, batch_size=7,
    )
    assert summary.n_inputs == 3 and summary.n_failed == 0
    model = load_model(trained.onnx, crop={"aggregation": "max"})
    for path, record in zip(paths, read_records(out)):
        assert record["input"] == str(path)
        assert [t["class"] for t in record["top_k"]] == sorted(record["probabilities"], key=record["probabilities"].get, reverse=True)
        assert record["tiles_used"] == record["n_crops"] > 1 and record["tiles_skipped"] == 0
        assert set(record["timings_ms"]) == {"read", "diagnose"}
        p = record["probabilities"]["parasitized"]
        assert record["decision"] == ("refer" if 0.2 <= p < 0.8 else record["label"])
        direct = model.diagnose(path)
        assert p == pytest.approx(direct.probabilities["parasitized"], abs=1e-6)  # batching across images changes nothing
        tile_map = np.load(tmp_path / "maps" / record["tile_map"])
        assert tile_map.shape == (*direct.sliding.grid.shape, 2)
        assert float(np.nanmax(tile_map[..., 0])) == pytest.approx(p, abs=1e-5)  # max aggregation = the hottest tile


def test_diagnose_many_matches_diagnose_and_raises_on_a_bad_image(trained: Trained, tmp_path: Path) -> None:
    from edgedx.errors import ImageReadError

    model = load_model(trained.onnx, batch_size=5)
    images = fields(4, seed=3)
    many = list(model.diagnose_many([images[0], images[1], images[2], images[3]]))
    for image, result in zip(images, many):
        assert result.probabilities == model.diagnose(image).probabilities
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="bad.png"):
        list(model.diagnose_many([images[0], bad]))


def test_resume_after_an_interruption_loses_and_repeats_nothing(trained: Trained, tmp_path: Path) -> None:
    paths = write_fields(tmp_path / "in", 5)
    full = tmp_path / "full.jsonl"
    diagnose_paths(paths, trained.onnx, full)
    lines = full.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(lines[:2]) + lines[2][:25], encoding="utf-8")  # killed while writing record 3
    summary = diagnose_paths(paths, trained.onnx, cut, resume=True)
    assert summary.n_resumed == 2 and summary.n_inputs == 3
    got = read_records(cut)
    assert [r["input"] for r in got] == [str(p) for p in paths]
    for a, b in zip(got, read_records(full)):
        assert a["probabilities"] == b["probabilities"]
    # resuming a finished run does nothing
    again = diagnose_paths(paths, trained.onnx, cut, resume=True)
    assert again.n_inputs == 0 and again.n_resumed == 5 and len(read_records(cut)) == 5


def test_audit_log_names_input_and_model_by_hash(trained: Trained, tmp_path: Path) -> None:
    paths = write_fields(tmp_path / "in", 2)
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"\x89PNG broken")
    audit = tmp_path / "audit dir" / "audit.jsonl"
    diagnose_paths([*paths, bad], trained.onnx, tmp_path / "o.jsonl", audit=audit)
    diagnose_paths(paths[:1], trained.onnx, tmp_path / "o2.jsonl", audit=audit)  # appended, never rewritten
    entries = [json.loads(line) for line in audit.read_text(encoding="utf-8").splitlines()]
    assert len(entries) == 4
    model_sha = hashlib.sha256(trained.onnx.read_bytes()).hexdigest()
    for entry, path in zip(entries, [*paths, bad, paths[0]]):
        assert entry["input"] == str(path)
        assert entry["input_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["model_sha256"] == model_sha and entry["card_schema_version"] == SCHEMA_VERSION
        assert entry["time"].endswith("+00:00")
    assert entries[2]["error"] and entries[2]["result"]["label"] is None
    assert entries[0]["result"]["label"] in ("uninfected", "parasitized")


def test_video_frames_with_a_rolling_decision(trained: Trained, tmp_path: Path) -> None:
    video = tmp_path / "smear video.avi"
    frames = fields(12, seed=5)
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (131, 97))
    assert writer.isOpened()
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    out = tmp_path / "video.jsonl"
    summary = diagnose_paths([video], trained.onnx, out, every=3, window=2, overlays=tmp_path / "ov")
    records = read_records(out)
    assert summary.n_inputs == 4 and [r["frame"] for r in records] == [0, 3, 6, 9]
    assert [r["input"] for r in records] == [f"{video}#frame={i}" for i in (0, 3, 6, 9)]
    assert records[1]["time_s"] == pytest.approx(0.3, abs=0.02)
    for prev, cur in zip(records, records[1:]):
        expected = (prev["probabilities"]["parasitized"] + cur["probabilities"]["parasitized"]) / 2
        assert cur["rolling_probabilities"]["parasitized"] == pytest.approx(expected, abs=1e-6)
        assert cur["rolling_frames"] == 2
    assert len(list((tmp_path / "ov").glob("*.frame*.overlay.png"))) == 4


def test_hot_folder_diagnoses_each_new_image_once(trained: Trained, tmp_path: Path) -> None:
    drop = tmp_path / "scanner drop"
    drop.mkdir()
    out = tmp_path / "hot.jsonl"
    stop = threading.Event()
    result: dict = {}

    def serve() -> None:
        result["summary"] = diagnose_hot_folder(drop, trained.onnx, out, poll_s=0.05, settle_s=0.2, stop=stop)

    thread = threading.Thread(target=serve)
    thread.start()
    images = fields(2, seed=9)
    write_image(drop / "first.png", images[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 1):
        time.sleep(0.05)
    write_image(drop / "second.png", images[1])
    while time.monotonic() < deadline and out.read_text().count("\n") < 2:
        time.sleep(0.05)
    stop.set()
    thread.join(10)
    assert not thread.is_alive()
    assert [Path(r["input"]).name for r in read_records(out)] == ["first.png", "second.png"]
    # a restart over the same folder diagnoses nothing again
    again = diagnose_hot_folder(drop, trained.onnx, out, poll_s=0.05, settle_s=0.2, idle_timeout_s=0.5)
    assert again.n_inputs == 0 and len(read_records(out)) == 2
