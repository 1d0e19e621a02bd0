"""Faults and safety around a batch: tampered models, interrupted runs, full disks, outputs that must
never land on inputs, lost cameras, pickled code in checkpoints, and no network use."""

from __future__ import annotations

import ast
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, Trained, run_edgedx
from edgedx.errors import InputError, ModelError
from edgedx.runtime.batch import diagnose_paths
from edgedx.runtime.io.image_io import write_image
from edgedx.runtime.io.integrity import checksum_path, expected_sha256, sha256_file, verify_model_file
from edgedx.runtime.model import load_model
from edgedx.runtime.outputs.records import read_records


def images(folder: Path, n: int, size: tuple[int, int] = (64, 80), seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_image(folder / f"slide {k:03d}.png", rng.integers(0, 255, (*size, 3), dtype=np.uint8)) for k in range(n)]


def model_copy(trained: Trained, folder: Path) -> Path:
    """The exported model with its checksum file, as a user would copy both to a scanner PC."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / trained.onnx.name
    shutil.copy(trained.onnx, target)
    shutil.copy(checksum_path(trained.onnx), checksum_path(target))
    return target


# -- model files ----------------------------------------------------------------------------


def test_export_writes_a_checksum_that_sha256sum_accepts(trained: Trained) -> None:
    line = checksum_path(trained.onnx).read_text()
    assert line == f"{sha256_file(trained.onnx)}  {trained.onnx.name}\n"
    assert expected_sha256(trained.onnx) == (sha256_file(trained.onnx), checksum_path(trained.onnx))
    assert verify_model_file(trained.onnx) == sha256_file(trained.onnx)
    assert load_model(trained.onnx).session.sha256 == sha256_file(trained.onnx)  # hashed once, kept by the session


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_tampered_or_truncated_model_is_refused_before_loading(trained: Trained, tmp_path: Path, damage: str) -> None:
    model = model_copy(trained, tmp_path)
    data = bytearray(model.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # one bit in the weights: ONNX Runtime would load it happily
    else:
        data = data[: len(data) // 3]
    model.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match the sha256 recorded in .*truncated or was changed after export"):
        load_model(model)


def test_truncated_model_without_a_checksum_says_so(trained: Trained, tmp_path: Path) -> None:
    model = tmp_path / "copied.onnx"
    model.write_bytes(trained.onnx.read_bytes()[:5000])
    with pytest.raises(ModelError, match="not a loadable ONNX model .*truncated"):
        load_model(model)


def test_tile_larger_than_the_model_input_is_refused(trained: Trained) -> None:
    with pytest.raises(InputError, match=r"tile 128×128 is larger than the model input 32×32.*--scale 0.25"):
        load_model(trained.onnx, crop={"tile_size": (128, 128), "stride": (64, 64)})


def test_pickled_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from edgedx.training.checkpoint import load_checkpoint

    marker = tmp_path / "code ran"

    class Payload:
        def __reduce__(self):  # what a malicious checkpoint does: run a command on load
            return (os.system, (f"touch '{marker}'",))

    evil = tmp_path / "evil.pt"
    torch.save({"format": "edgedx", "state_dict": {}, "hook": Payload()}, evil)
    with pytest.raises(ModelError, match="refused — this checkpoint contains pickled Python objects"):
        load_checkpoint(evil)
    assert not marker.exists()


# -- outputs --------------------------------------------------------------------------------


def test_same_command_again_continues_and_other_settings_are_refused(trained: Trained, tmp_path: Path) -> None:
    data = tmp_path / "slides"
    first = images(data, 3)
    out = tmp_path / "out" / "results.jsonl"
    assert diagnose_paths([data], trained.onnx, out).n_inputs == 3
    arrived = images(tmp_path / "scanner", 5, seed=1)[3:]  # two new slides arrive; the same command is run again
    more = [p.rename(data / p.name) for p in arrived]
    summary = diagnose_paths([data], trained.onnx, out)
    assert (summary.n_inputs, summary.n_resumed) == (2, 3)
    assert Counter(r["input"] for r in read_records(out)) == Counter(str(p) for p in first + more)
    with pytest.raises(InputError, match=r"written with crop=.*this run has crop=.*--overwrite"):
        diagnose_paths([data], trained.onnx, out, crop={"aggregation": "max"})
    assert diagnose_paths([data], trained.onnx, out, crop={"aggregation": "max"}, overwrite=True).n_inputs == 5
    assert len(read_records(out)) == 5


def test_results_of_another_model_are_never_mixed_in(trained: Trained, tmp_path: Path) -> None:
    data = tmp_path / "slides"
    images(data, 2)
    out = tmp_path / "results.jsonl"
    diagnose_paths([data], trained.onnx, out)
    onnx = pytest.importorskip("onnx")
    graph = onnx.load(str(trained.onnx))
    graph.doc_string = "retrained"  # another model file with the same card and graph input
    other = tmp_path / "other.onnx"
    onnx.save(graph, str(other))
    with pytest.raises(InputError, match="holds results of another model"):
        diagnose_paths([data], other, out)


def test_a_file_not_written_by_edgedx_is_not_appended_to(trained: Trained, tmp_path: Path) -> None:
    data = tmp_path / "slides"
    images(data, 1)
    out = tmp_path / "notes.csv"
    out.write_text("someone's spreadsheet\n")
    with pytest.raises(InputError, match="was not written by this command .*--overwrite"):
        diagnose_paths([data], trained.onnx, out)
    assert out.read_text() == "someone's spreadsheet\n"


def test_outputs_never_land_on_inputs(trained: Trained, tmp_path: Path) -> None:
    data = tmp_path / "slides"
    [slide] = images(data, 1)
    with pytest.raises(InputError, match="--overlays .* is inside the input folder"):
        diagnose_paths([data], trained.onnx, tmp_path / "r.jsonl", overlays=data / "overlays")
    with pytest.raises(InputError, match="--audit .* is one of the inputs"):
        diagnose_paths([slide], trained.onnx, tmp_path / "r.jsonl", audit=slide)


def test_unwritable_output_fails_before_the_model_loads(tmp_path: Path) -> None:
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    images(tmp_path / "slides", 1)
    with pytest.raises(InputError, match=re.escape(f"cannot create {blocker} (for --out): File exists")):
        diagnose_paths([tmp_path / "slides"], tmp_path / "no model.onnx", blocker / "r.jsonl")


def test_a_nearly_full_disk_fails_early_with_the_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images(tmp_path / "slides", 1)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage._replace(free=3 * 2**20))
    with pytest.raises(InputError, match=re.escape(f"only 3.0 MiB free on the disk of {tmp_path / 'out'} (for --out)")):
        diagnose_paths([tmp_path / "slides"], tmp_path / "no model.onnx", tmp_path / "out" / "r.jsonl")


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full to simulate a full disk")
def test_disk_filling_up_mid_run_stops_with_the_path(trained: Trained, tmp_path: Path) -> None:
    images(tmp_path / "slides", 2)
    out = tmp_path / "r.jsonl"
    out.symlink_to("/dev/full")  # every write fails with ENOSPC, as on a full disk
    with pytest.raises(InputError, match=re.escape(f"cannot write results to {out}: No space left on device") + ".*run the same command again"):
        diagnose_paths([tmp_path / "slides"], trained.onnx, out, overwrite=True)


def test_audit_log_can_keep_names_out(trained: Trained, tmp_path: Path) -> None:
    data = tmp_path / "Jane Doe 1970-01-01"
    images(data, 2)
    audit = tmp_path / "audit.jsonl"
    diagnose_paths([data], trained.onnx, tmp_path / "r.jsonl", audit=audit, audit_names="hash")
    text = audit.read_text()
    assert "Jane" not in text
    names = {json.loads(line)["input_name_hmac"] for line in text.splitlines()}
    assert len(names) == 2
    # a keyed hash: without the key beside the log, hashing a guessed name finds nothing
    assert not names & {hashlib.sha256(str(p).encode()).hexdigest() for p in sorted(data.iterdir())}
    key = bytes.fromhex((tmp_path / "audit.jsonl.key").read_text().strip())
    assert names == {hmac.new(key, str(p).encode(), hashlib.sha256).hexdigest() for p in sorted(data.iterdir())}
    assert (tmp_path / "audit.jsonl.key").stat().st_mode & 0o077 == 0  # readable by its owner only


def test_a_lost_camera_gets_a_record_and_the_batch_goes_on(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgedx.runtime import batch
    from edgedx.runtime.io.feeds import Frame

    def flaky(source, *, every, max_frames, reconnect):
        for k in range(2):
            yield Frame(index=k, time_s=k / 10, image=np.full((40, 40, 3), 90 + k, np.uint8), source="camera:0")
        raise InputError("camera:0 stopped delivering frames after 2 frames and did not come back")

    monkeypatch.setattr(batch, "iter_frames", flaky)
    [slide] = images(tmp_path / "slides", 1)
    summary = diagnose_paths([slide, "camera:0"], trained.onnx, tmp_path / "r.jsonl")
    records = read_records(tmp_path / "r.jsonl")
    assert [r["input"] for r in records] == [str(slide), "camera:0#frame=0", "camera:0#frame=1", "camera:0"]
    assert records[-1]["error"] == "camera:0 stopped delivering frames after 2 frames and did not come back"
    assert (summary.n_inputs, summary.n_failed) == (4, 1)


# -- interruptions: the real command line, killed ------------------------------------------


def _start(trained: Trained, data: Path, out: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "edgedx", "diagnose", str(data), "--model", str(trained.onnx), "--out", str(out), "--batch-size", "4"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_interrupted_batch_resumes_with_exactly_one_record_per_input(trained: Trained, tmp_path: Path, sig: signal.Signals) -> None:
    data = tmp_path / "many slides"
    slides = images(data, 60, size=(192, 224))
    out = tmp_path / "r.jsonl"
    proc = _start(trained, data, out)
    deadline = time.monotonic() + 120
    while _lines(out) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    written = _lines(out)
    assert 0 < written < len(slides), "the run must be stopped part-way for this test to mean anything"
    if sig != signal.SIGKILL:
        assert proc.returncode == 130 and "run the same command again to continue" in stderr
    again = run_edgedx("diagnose", str(data), "--model", str(trained.onnx), "--out", str(out))
    assert again.returncode == 0, again.stderr
    counts = Counter(r["input"] for r in read_records(out))
    assert set(counts) == {str(p) for p in slides} and set(counts.values()) == {1}
    assert "already done" in again.stdout
    leftovers = [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
    assert leftovers == []


# -- no network ----------------------------------------------------------------------------


def test_the_runtime_makes_no_network_connection(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network use during diagnosis")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    images(tmp_path / "slides", 2)
    summary = diagnose_paths([tmp_path / "slides"], trained.onnx, tmp_path / "r.jsonl", audit=tmp_path / "a.jsonl")
    assert summary.n_failed == 0 and attempts == []


def test_no_runtime_module_imports_a_network_library() -> None:
    """Stream URLs are opened by OpenCV only when a user names one; nothing else may reach the network."""
    network = {"socket", "urllib", "http", "requests", "httpx", "aiohttp", "ftplib", "smtplib", "ssl"}
    offenders = []
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in network and n != "urllib.parse"]  # parse: strings only
    assert offenders == []


def test_hot_folder_skips_a_file_that_vanishes_while_settling(tmp_path: Path) -> None:
    import threading

    from edgedx.runtime.io.feeds import watch_folder

    hot = tmp_path / "scanner out"
    hot.mkdir()
    pixels = np.full((20, 30, 3), 128, np.uint8)
    gone = write_image(hot / "gone.png", pixels)

    def scanner() -> None:  # the scanner removes a file it was still writing, then drops a real one
        time.sleep(0.15)
        gone.unlink()
        time.sleep(0.1)
        write_image(hot / "kept.png", pixels)

    thread = threading.Thread(target=scanner)
    thread.start()
    seen = [p.name for p in watch_folder(hot, poll_s=0.05, settle_s=0.5, state_file=tmp_path / "state.jsonl", idle_timeout_s=1.5)]
    thread.join()
    assert seen == ["kept.png"]


def test_csv_records_have_frame_columns_only_for_videos_and_cameras(tmp_path: Path) -> None:
    import csv

    from edgedx.runtime.outputs.records import RecordWriter, empty_record

    still, video = tmp_path / "still.csv", tmp_path / "video.csv"
    with RecordWriter(still, ("a", "b")) as writer:
        writer.write({**empty_record("x.png"), "label": "a", "probabilities": {"a": 0.9, "b": 0.1}})
    with RecordWriter(video, ("a", "b"), frames=True) as writer:
        writer.write({**empty_record("v.mp4#frame=3"), "frame": 3, "time_s": 0.1, "label": "b"})
    rows = list(csv.DictReader(still.open(encoding="utf-8", newline="")))
    assert "frame" not in rows[0] and "time_s" not in rows[0] and rows[0]["label"] == "a" and rows[0]["p_a"] == "0.9"
    rows = list(csv.DictReader(video.open(encoding="utf-8", newline="")))
    assert rows[0]["frame"] == "3" and rows[0]["time_s"] == "0.1"
    # a continued file keeps its own header's columns, whatever the new inputs are
    with RecordWriter(video, ("a", "b"), append=True) as writer:
        writer.write({**empty_record("y.png"), "label": "a"})
    with RecordWriter(still, ("a", "b"), append=True, frames=True) as writer:
        writer.write({**empty_record("w.mp4#frame=0"), "frame": 0, "label": "b"})
    rows = list(csv.DictReader(video.open(encoding="utf-8", newline="")))
    assert [r["input"] for r in rows] == ["v.mp4#frame=3", "y.png"] and rows[1]["frame"] == "" and rows[1]["label"] == "a"
    rows = list(csv.DictReader(still.open(encoding="utf-8", newline="")))
    assert [r["label"] for r in rows] == ["a", "b"] and None not in rows[1]  # no extra cells beyond the header
