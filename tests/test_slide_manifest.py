"""The ``--slides`` manifest: which slide each field is on, read strictly (a wrong grouping changes a slide's answer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgedx.errors import InputError
from edgedx.runtime.io.slide_manifest import path_key, read_slide_manifest
from edgedx.runtime.outputs.slides import grouping


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8"))
    return path


def test_paths_are_read_from_the_manifests_folder_and_keep_file_order(tmp_path: Path) -> None:
    manifest = write(tmp_path / "day 3" / "slides.csv", "\ufeffslide_id,path\nS-7,f 2.png\nS-7,sub/f1.png\nS-9,/abs/x.png\n\nS-7,f 2.png\n")
    read = read_slide_manifest(manifest)
    assert read.paths == (Path(path_key(tmp_path / "day 3" / "f 2.png")), Path(path_key(tmp_path / "day 3" / "sub" / "f1.png")), Path("/abs/x.png"))
    assert set(read.slides.values()) == {"S-7", "S-9"}
    assert read.slide_of(str(tmp_path / "day 3" / "sub" / ".." / "sub" / "f1.png")) == "S-7"  # normalised before matching
    assert read.slide_of("/abs/y.png") is None


def test_grouping_says_where_a_slide_came_from(tmp_path: Path) -> None:
    read = read_slide_manifest(write(tmp_path / "m.csv", "path,slide_id\na.png,P1\n"))
    assert grouping(str(tmp_path / "a.png"), read) == ("P1", "manifest")
    assert grouping(str(tmp_path / "other" / "b.png"), read) == (str(tmp_path / "other"), "folder")
    assert grouping("camera:0#frame=3", read) == ("camera:0", "stream")
    assert grouping(str(tmp_path / "other" / "b.png"), None) == (str(tmp_path / "other"), "folder")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty; it needs a header row"),
        ("path,slide\na.png,1\n", "has no slide_id column \\(its columns: path, slide\\)"),
        ("file,slide_id\na.png,1\n", "has no path column"),
        ("path,slide_id\n", "lists no fields"),
        ("path,slide_id\na.png,\n", "line 2: the slide_id is empty"),
        ("path,slide_id\n,S1\n", "line 2: the path is empty"),
        ("path,slide_id\na.png,S1\nb.png,S1\na.png,S2\n", "line 4: a.png is listed under two slides \\('S1' and 'S2'\\)"),
    ],
)
def test_a_bad_manifest_is_refused_naming_the_line_and_the_fix(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        read_slide_manifest(write(tmp_path / "bad.csv", text))


def test_a_missing_or_non_utf8_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file; give a CSV with the columns path,slide_id"):
        read_slide_manifest(tmp_path / "nope.csv")
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"path,slide_id\nM\xfcller.png,S1\n")
    with pytest.raises(InputError, match="not UTF-8"):
        read_slide_manifest(latin)
