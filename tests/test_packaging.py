"""The wheel maps training/, export/ and runtime/ into edgedx.* and ships every module."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT

STAGES = {"edgedx": "edgedx", "training": "edgedx/training", "export": "edgedx/export", "runtime": "edgedx/runtime"}


def test_wheel_contains_every_module(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in (*STAGES, "pyproject.toml", "README.md"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "dist").glob("edgedx-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{target}/{p.relative_to(ROOT / folder).as_posix()}" for folder, target in STAGES.items() for p in (ROOT / folder).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert "edgedx/runtime/backends/session.py" in expected and "edgedx/runtime/io/image_io.py" in expected
    assert expected - names == set()
    assert "edgedx/py.typed" in names
    assert "edgedx/runtime/models/isic_mel_nv.fp16.onnx" in names  # the bundled default model ships
    assert "edgedx/runtime/models/isic_mel_nv.fp16.onnx.sha256" in names  # with the checksum the runtime verifies
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "edgedx = edgedx.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
