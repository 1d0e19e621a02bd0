"""What a hostile or unlucky clinic feeds EdgeDx: odd names, pipes, rewritten files, shared outputs, edited audit logs, empty crops."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import Trained

from edgedx.runtime.outputs.names import csv_text, json_line, json_lines, printable_name
from edgedx.runtime.outputs.records import completed_inputs, read_records


def test_json_line_round_trips_a_latin1_name_exactly() -> None:
    name = os.fsdecode(b"/scans/M\xfcller \xe9t\xe9.png")  # a Latin-1 name as Python holds it (lone surrogates)
    line = json_line({"input": name, "ok": "Zürich ✓"})
    line.encode("utf-8")  # valid UTF-8: no surrogate reaches the file
    back = json.loads(line)
    assert back["input"] == name and os.fsencode(back["input"]) == b"/scans/M\xfcller \xe9t\xe9.png"
    assert "Zürich ✓" in line  # other characters stay readable


def test_csv_cells_are_readable_and_never_formulas() -> None:
    assert printable_name(os.fsdecode(b"M\xfcller.png")) == "M\\xfcller.png"
    for formula in ("=HYPERLINK(\"http://x\")", "+1", "-2", "@SUM(A1)", "\tx"):
        assert csv_text(formula) == "'" + formula
    assert csv_text("field 1.png") == "field 1.png" and csv_text(0.5) == 0.5 and csv_text(None) is None


def test_json_lines_split_on_newlines_only() -> None:
    text = json_line({"input": "a\u2028b\u0085c.png"}) + "\n" + json_line({"input": "d.png"}) + "\n"
    assert [json.loads(line)["input"] for _, line in json_lines(text)] == ["a\u2028b\u0085c.png", "d.png"]


@pytest.fixture()
def hostile_folder(tmp_path: Path) -> tuple[Path, list[Path]]:
    from edgedx.runtime.io.image_io import write_image
    from edgedx.synthetic import render_field

    folder = tmp_path / "share"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [b"M\xfcller.png", b"=cmd|calc.png", b"line\xe2\x80\xa8sep.png", b"plain.png"]
    paths = []
    for raw in names:
        path = Path(os.fsdecode(os.path.join(os.fsencode(folder), raw)))
        write_image(path, render_field(rng, 60, 80, infected_fraction=0.2).image)
        paths.append(path)
    return folder, paths


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_batch_of_hostile_names_completes_resumes_and_audits(trained: Trained, tmp_path: Path, hostile_folder, suffix: str) -> None:
    from edgedx.runtime.batch import diagnose_paths

    folder, paths = hostile_folder
    out = tmp_path / f"results{suffix}"
    audit = tmp_path / "audit.jsonl"
    summary = diagnose_paths([folder], trained.onnx, out, audit=audit)
    assert summary.n_inputs == 4 and summary.n_failed == 0
    out.read_bytes().decode("utf-8")  # the whole output is valid UTF-8
    entries = [json.loads(line) for _, line in json_lines(audit.read_text(encoding="utf-8"))]
    assert sorted(e["input"] for e in entries) == sorted(str(p) for p in paths)
    if suffix == ".jsonl":
        assert sorted(r["input"] for r in read_records(out)) == sorted(str(p) for p in paths)
    else:
        with out.open(newline="", encoding="utf-8") as f:
            cells = [row[0] for row in csv.reader(f)][1:]
        assert any(c.endswith("M\\xfcller.png") for c in cells)
    # the same command again: everything is already done, nothing repeats
    again = diagnose_paths([folder], trained.onnx, out, audit=audit)
    assert again.n_resumed == 4 and len(completed_inputs(out)) == 4


def test_a_formula_name_is_neutralised_in_csv_and_still_resumes(trained: Trained, tmp_path: Path, hostile_folder, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgedx.runtime.batch import diagnose_paths

    folder, _ = hostile_folder
    monkeypatch.chdir(folder)  # names as a user types them: the cell starts with the name
    out = tmp_path / "results.csv"
    diagnose_paths(["=cmd|calc.png", "plain.png"], trained.onnx, out)
    with out.open(newline="", encoding="utf-8") as f:
        cells = [row[0] for row in csv.reader(f)][1:]
    assert cells == ["'=cmd|calc.png", "plain.png"]
    assert diagnose_paths(["=cmd|calc.png", "plain.png"], trained.onnx, out).n_resumed == 2


def test_two_runs_never_share_one_output(trained: Trained, tmp_path: Path, hostile_folder) -> None:
    from edgedx.errors import InputError
    from edgedx.runtime.batch import diagnose_paths
    from edgedx.runtime.outputs.guards import exclusive_outputs

    folder, _ = hostile_folder
    out = tmp_path / "results.jsonl"
    with pytest.raises(InputError, match=r"--out and --audit are the same file"):
        diagnose_paths([folder], trained.onnx, out, audit=out)
    assert not out.exists()
    with exclusive_outputs({"--out": out}):  # another run holds it
        with pytest.raises(InputError, match=rf"being written by another EdgeDx process \(pid {os.getpid()}"):
            diagnose_paths([folder], trained.onnx, out)
    assert diagnose_paths([folder], trained.onnx, out).n_inputs == 4  # released: the next run goes ahead
    assert not (tmp_path / "results.jsonl.lock").exists()


def test_audit_never_opens_pipes_or_devices_and_hashes_what_was_read(trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib
    import threading

    from edgedx.runtime import batch
    from edgedx.runtime.batch import diagnose_paths
    from edgedx.runtime.io.image_io import write_image
    from edgedx.synthetic import render_field

    folder = tmp_path / "in"
    folder.mkdir()
    good = write_image(folder / "good.png", render_field(np.random.default_rng(1), 60, 80, infected_fraction=0.2).image)
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    zero = tmp_path / "zero.png"
    zero.symlink_to("/dev/zero")

    def never(*args, **kwargs):
        raise AssertionError("the audit re-read a file instead of hashing the bytes that were diagnosed")

    monkeypatch.setattr(batch, "sha256_file", never)
    out, audit = tmp_path / "out.jsonl", tmp_path / "audit.jsonl"
    done: list = []
    worker = threading.Thread(target=lambda: done.append(diagnose_paths([pipe, zero, good], trained.onnx, out, audit=audit)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert done, "diagnose hung on a named pipe or /dev/zero"
    assert done[0].n_failed == 2
    records = {Path(r["input"]).name: r for r in read_records(out)}
    assert "is a named pipe, not an image file" in records["pipe.png"]["error"]
    assert "is a character device, not an image file" in records["zero.png"]["error"]
    entries = {Path(e["input"]).name: e for _, e in ((n, json.loads(line)) for n, line in json_lines(audit.read_text(encoding="utf-8")))}
    assert entries["pipe.png"]["input_sha256"] is None and entries["zero.png"]["input_sha256"] is None
    assert entries["good.png"]["input_sha256"] == hashlib.sha256(good.read_bytes()).hexdigest()


def test_a_rewritten_file_is_diagnosed_again_and_the_version_is_recorded(trained: Trained, tmp_path: Path) -> None:
    import hashlib

    from edgedx.runtime.batch import diagnose_paths
    from edgedx.runtime.io.image_io import write_image
    from edgedx.synthetic import render_field

    folder = tmp_path / "scanner"
    folder.mkdir()
    rng = np.random.default_rng(4)
    slide = write_image(folder / "slide.png", render_field(rng, 60, 80, infected_fraction=0.0).image)
    write_image(folder / "other.png", render_field(rng, 60, 80, infected_fraction=0.3).image)
    out = tmp_path / "out.jsonl"
    diagnose_paths([folder], trained.onnx, out)
    first = hashlib.sha256(slide.read_bytes()).hexdigest()
    write_image(slide, render_field(rng, 64, 90, infected_fraction=0.5).image)  # the next patient, same name
    second = hashlib.sha256(slide.read_bytes()).hexdigest()
    again = diagnose_paths([folder], trained.onnx, out)
    assert again.n_resumed == 1 and again.n_inputs == 1  # other.png is done; slide.png is new
    versions = [r["input_sha256"] for r in read_records(out) if r["input"].endswith("slide.png")]
    assert versions == [first, second]
    assert diagnose_paths([folder], trained.onnx, out).n_resumed == 2  # and now both are done


def test_the_audit_log_is_a_hash_chain_that_finds_edits_deletions_and_torn_lines(trained: Trained, tmp_path: Path) -> None:
    from conftest import run_edgedx

    from edgedx.runtime.outputs.audit import verify_audit
    from edgedx.runtime.batch import diagnose_paths
    from edgedx.runtime.io.image_io import write_image
    from edgedx.synthetic import render_field

    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(6)
    for k in range(4):
        write_image(folder / f"f{k}.png", render_field(rng, 50, 70, infected_fraction=0.2).image)
    audit = tmp_path / "audit.jsonl"
    diagnose_paths([folder], trained.onnx, tmp_path / "out.jsonl", audit=audit, crop={"aggregation": "max"}, refer_band=(0.3, 0.7))
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    assert entries[0]["settings"]["crop"]["aggregation"] == "max" and entries[0]["settings"]["refer_band"] == [0.3, 0.7]
    good = verify_audit(audit)
    assert good.ok and good.n_lines == 4 and good.n_unchained == 0
    proc = run_edgedx("audit", "verify", str(audit))
    assert proc.returncode == 0 and "4 lines, chain intact" in proc.stdout and good.head_sha256 in proc.stdout

    lines = audit.read_text().splitlines(keepends=True)
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join([lines[0], lines[1].replace('"decision": "', '"decision": "x'), *lines[2:]]))
    deleted = tmp_path / "deleted.jsonl"
    deleted.write_text("".join([lines[0], *lines[2:]]))
    moved = tmp_path / "moved.jsonl"
    moved.write_text("".join([lines[1], lines[0], *lines[2:]]))
    for broken, where in ((edited, "line 3"), (deleted, "line 2"), (moved, "line 1")):
        found = verify_audit(broken)
        assert not found.ok and any(p.startswith(where) for p in found.problems), (broken.name, found.problems)
    proc = run_edgedx("audit", "verify", str(deleted))
    assert proc.returncode == 1 and "the chain is broken" in proc.stderr and "Traceback" not in proc.stderr

    # a write cut off by a full disk: reported by verify, cut off on the next open, and the next entry says so
    with audit.open("a") as f:
        f.write('{"time": "2026-12-05T')
    assert any("torn" in p for p in verify_audit(audit).problems)
    write_image(folder / "f9.png", render_field(rng, 50, 70, infected_fraction=0.2).image)
    diagnose_paths([folder], trained.onnx, tmp_path / "out.jsonl", audit=audit, crop={"aggregation": "max"}, refer_band=(0.3, 0.7))
    after = verify_audit(audit)
    assert after.ok and after.n_lines == 5
    assert json.loads(audit.read_text().splitlines()[-1])["repaired_torn_line_bytes"] == len('{"time": "2026-12-05T')


def test_hashed_audit_names_are_scrubbed_from_errors(trained: Trained, tmp_path: Path) -> None:
    from edgedx.runtime.batch import diagnose_paths

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "John_Smith_MRN12345.png").write_bytes(b"not an image at all")
    audit = tmp_path / "audit.jsonl"
    diagnose_paths([folder], trained.onnx, tmp_path / "out.jsonl", audit=audit, audit_names="hash")
    text = audit.read_text()
    assert "John" not in text and "MRN12345" not in text
    [entry] = [json.loads(line) for line in text.splitlines()]
    assert entry["input"] is None and len(entry["input_name_hmac"]) == 64 and entry["error"].startswith("<input>")


def test_inputs_with_one_name_in_two_folders_get_their_own_outputs(trained: Trained, tmp_path: Path) -> None:
    from edgedx.runtime.batch import diagnose_paths
    from edgedx.runtime.io.image_io import write_image
    from edgedx.synthetic import render_field

    rng = np.random.default_rng(7)
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        write_image(tmp_path / sub / "x.png", render_field(rng, 60, 80, infected_fraction=0.4 if sub == "a" else 0.0).image)
    out = tmp_path / "out.jsonl"
    diagnose_paths([tmp_path / "a", tmp_path / "b"], trained.onnx, out, maps=tmp_path / "maps", overlays=tmp_path / "ov")
    records = read_records(out)
    maps = {r["input"]: r["tile_map"] for r in records}
    assert len(set(maps.values())) == 2 and len(list((tmp_path / "maps").iterdir())) == 2
    for record in records:
        assert np.nanmax(np.load(tmp_path / "maps" / record["tile_map"])) >= max(record["probabilities"].values()) - 1e-5
        assert (tmp_path / "ov" / record["overlay"]).is_file()


def test_no_confident_answer_from_crops_that_are_nearly_all_padding(trained: Trained, tmp_path: Path) -> None:
    from edgedx.errors import InsufficientContentError
    from edgedx.runtime import load_model
    from edgedx.runtime.batch import diagnose_paths
    from edgedx.runtime.io.image_io import write_image
    from edgedx.synthetic import render_field

    folder = tmp_path / "in"
    folder.mkdir()
    field = write_image(folder / "field.png", render_field(np.random.default_rng(8), 96, 128, infected_fraction=0.3).image)
    dot = write_image(folder / "dot.png", np.full((1, 1, 3), 200, np.uint8))
    model = load_model(trained.onnx)
    with pytest.raises(InsufficientContentError, match=r"dot.png: the image \(1×1 px, 1×1 after resampling\) fills 0.1% of its 32×32 crops"):
        model.diagnose(dot)
    shrunk = load_model(trained.onnx, crop={"scale": 0.001})  # a mistyped scale: the field becomes one pixel
    with pytest.raises(InsufficientContentError, match="the rest is padding"):
        shrunk.diagnose(field)
    # the check can be turned off (and the quality gate, which rejects a one-pixel image as too small and flat)
    assert load_model(trained.onnx, crop={"min_content": 0.0}, quality="off").diagnose(dot).n_crops == 1

    out = tmp_path / "out.jsonl"
    summary = diagnose_paths([folder], trained.onnx, out, crop={"scale": 1000.0})  # would allocate terabytes
    assert summary.n_failed == 2
    errors = {Path(r["input"]).name: r["error"] for r in read_records(out)}
    assert "over the limit of 250; lower --scale" in errors["field.png"]
    assert summary.n_inputs == 2


def test_hostile_files_get_one_line_errors_not_tracebacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    from edgedx.card import ModelCard
    from edgedx.errors import CardError, InputError
    from edgedx.runtime.bench import bench_models
    from edgedx.runtime.outputs.guards import check_writable

    with pytest.raises(CardError, match="nested too deeply"):
        ModelCard.from_json("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InputError, match=r"100000x100000 exceed the pixel limit of 250 megapixels"):
        bench_models([tmp_path / "m.onnx"], image_sizes=[(100_000, 100_000)])

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(Path, "write_bytes", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)  # the probe's cleanup fails too, as on a read-only mount
    with pytest.raises(InputError, match=r"cannot write in .* \(for --out\): Read-only file system; choose a writable location"):
        check_writable(tmp_path / "out.jsonl", "--out")


def test_a_pickle_named_safetensors_is_refused_in_one_line(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    import pickle

    from edgedx.errors import ModelError
    from edgedx.training.models import read_state_dict

    fake = tmp_path / "weights.safetensors"
    fake.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    with pytest.raises(ModelError, match="is not a valid safetensors file.*refused on purpose"):
        read_state_dict(fake)


def test_dollar_signs_in_class_names_do_not_break_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from edgedx.runtime.outputs.plots import plot_confusion_matrix, plot_roc

    names = ("ratio $\\undefined$", "a$_{$b")  # pairs of $ that mathtext cannot parse
    path = plot_confusion_matrix([[3, 1], [0, 4]], names, tmp_path / "cm.png")
    assert path.stat().st_size > 0
    truth = np.array([0, 1, 0, 1, 1, 0])
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.1, 0.9], [0.45, 0.55], [0.7, 0.3]])
    assert plot_roc(truth, probs, names, tmp_path / "roc.png", positive_index=1).stat().st_size > 0


def test_odd_entries_inside_a_folder_get_records_and_unreadable_folders_a_warning(
    trained: Trained, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logging
    import socket

    from edgedx.runtime.batch import diagnose_paths
    from edgedx.runtime.io.image_io import write_image
    from edgedx.runtime.io.inputs import folder_images
    from edgedx.synthetic import render_field

    folder = tmp_path / "drop"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(9)
    write_image(folder / "good.png", render_field(rng, 60, 80, infected_fraction=0.2).image)
    write_image(folder / "anim.gif", render_field(rng, 60, 80, infected_fraction=0.2).image)
    os.mkfifo(folder / "pipe.png")
    (folder / "dangling.jpg").symlink_to(folder / "gone.jpg")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(folder / "sock.png"))
        out = tmp_path / "out.jsonl"
        summary = diagnose_paths([folder], trained.onnx, out)
    records = {Path(r["input"]).name: r for r in read_records(out)}
    assert set(records) == {"good.png", "anim.gif", "pipe.png", "dangling.jpg", "loop.png", "sock.png"}
    assert records["good.png"]["error"] is None and records["anim.gif"]["error"] is None  # a .gif in a folder is read like a named one
    assert "named pipe" in records["pipe.png"]["error"] and "socket" in records["sock.png"]["error"]
    assert "not found" in records["dangling.jpg"]["error"] and records["loop.png"]["error"]
    assert summary.n_failed == 4

    real_walk = os.walk

    def walk_with_a_locked_folder(top, onerror=None, **kwargs):
        onerror(PermissionError(13, "Permission denied", str(folder / "sub")))
        yield from real_walk(top, onerror=onerror, **kwargs)

    monkeypatch.setattr(os, "walk", walk_with_a_locked_folder)
    with caplog.at_level(logging.WARNING):
        folder_images(folder)
    assert "cannot read folder" in caplog.text and "Permission denied" in caplog.text


def test_a_manifest_listing_one_image_twice_is_refused(tmp_path: Path) -> None:
    from edgedx.errors import InputError
    from edgedx.runtime.io.image_io import write_image
    from edgedx.training.sources import load_source

    for i in range(3):
        write_image(tmp_path / f"{i}.png", np.full((8, 8, 3), 40 * i, np.uint8))
    manifest = tmp_path / "labels.csv"
    manifest.write_text("path,label\n0.png,benign\n1.png,malignant\n2.png,benign\n./1.png,benign\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"1.png is listed twice in labels.csv \(lines 3 and 5\)"):
        load_source(manifest)


def test_a_text_file_error_names_its_type_not_its_contents(tmp_path: Path) -> None:
    from edgedx.errors import ImageReadError
    from edgedx.runtime.io.image_io import read_image

    secret = tmp_path / "passwd.png"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n", encoding="utf-8")
    with pytest.raises(ImageReadError) as info:
        read_image(secret)
    assert "it is a text file" in str(info.value) and "root:x" not in str(info.value)


def test_every_record_states_the_threshold_and_the_decision_in_words(trained: Trained, tmp_path: Path) -> None:
    from edgedx.runtime.batch import diagnose_paths
    from edgedx.runtime.io.image_io import write_image
    from edgedx.runtime.model import decision_rule
    from edgedx.synthetic import render_field

    (tmp_path / "in").mkdir()
    write_image(tmp_path / "in" / "f.png", render_field(np.random.default_rng(10), 60, 80, infected_fraction=0.3).image)
    out = tmp_path / "out.jsonl"
    diagnose_paths([tmp_path / "in"], trained.onnx, out, refer_band=(0.0, 1.0))
    [record] = read_records(out)
    p = record["probabilities"]["parasitized"]
    threshold = record["threshold"]
    assert threshold is not None
    sign = "≥" if p >= threshold else "<"
    assert record["rule"].startswith(f"p(parasitized) = {p:.3f} {sign} threshold {threshold:.3f} → {record['label']}")
    assert record["rule"].endswith("inside the refer band [0, 1) → refer to a person") and record["decision"] == "refer"

    from edgedx.card import CropPolicy, ModelCard, Provenance

    card = ModelCard(arch="x", task="binary", class_names=("melanoma", "nevus"), positive_class="melanoma", threshold=0.31,
                     input_size=(8, 8), crop=CropPolicy((8, 8), (4, 4)), provenance=Provenance("0", "2026-01-01T00:00:00+00:00"))
    # the clinician's case: p(melanoma) 0.48, nevus more probable, yet the decision is melanoma
    assert decision_rule(np.array([0.48, 0.52]), card, "melanoma") == "p(melanoma) = 0.480 ≥ threshold 0.310 → melanoma"


def test_model_paths_as_people_type_them(trained: Trained, tmp_path: Path) -> None:
    import shutil

    from edgedx.errors import InputError
    from edgedx.runtime.bundled import bundled_model_path
    from edgedx.runtime.model import resolve_model_path

    assert resolve_model_path(trained.onnx.parent) == trained.onnx.parent / "model.onnx"  # an export folder
    assert resolve_model_path("isic_mel_nv") == bundled_model_path("isic_mel_nv")  # a bundled model by name
    with pytest.raises(InputError, match="no bundled model named 'nosuch'"):
        resolve_model_path("nosuch")
    with pytest.raises(InputError, match=r"is a training checkpoint; .*edgedx export .*model.pt --out EXPORT_DIR"):
        resolve_model_path(trained.checkpoint)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.onnx", "b.ort"):
        shutil.copy(trained.onnx, two / name)
    with pytest.raises(InputError, match=r"folder with 2 model files \(a.onnx, b.ort\)"):
        resolve_model_path(two)


def test_the_hot_folder_keeps_latin1_names_and_sees_a_rewrite(trained: Trained, tmp_path: Path) -> None:
    from edgedx.runtime.batch import diagnose_hot_folder
    from edgedx.runtime.io.image_io import write_image
    from edgedx.synthetic import render_field

    drop = tmp_path / "scanner drop"
    drop.mkdir()
    rng = np.random.default_rng(12)
    name = Path(os.fsdecode(os.path.join(os.fsencode(drop), b"M\xfcller slide.png")))
    write_image(name, render_field(rng, 60, 80, infected_fraction=0.2).image)
    out = tmp_path / "hot.jsonl"
    first = diagnose_hot_folder(drop, trained.onnx, out, poll_s=0.05, settle_s=0.2, idle_timeout_s=1.0)
    assert first.n_inputs == 1 and first.n_failed == 0
    state = tmp_path / "hot.jsonl.watch-state.jsonl"
    [(_, line)] = list(json_lines(state.read_text(encoding="utf-8")))
    assert json.loads(line)["path"] == os.path.abspath(name)  # the watcher's state round-trips the name
    again = diagnose_hot_folder(drop, trained.onnx, out, poll_s=0.05, settle_s=0.2, idle_timeout_s=1.0)
    assert again.n_inputs == 0  # a restart does nothing twice
    os.utime(name, ns=(0, 0))
    write_image(name, render_field(rng, 64, 90, infected_fraction=0.6).image)  # the scanner rewrites it
    third = diagnose_hot_folder(drop, trained.onnx, out, poll_s=0.05, settle_s=0.2, idle_timeout_s=1.0)
    assert third.n_inputs == 1
    assert len({r["input_sha256"] for r in read_records(out)}) == 2
