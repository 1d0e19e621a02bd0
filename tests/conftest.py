"""Shared fixtures: one tiny model trained and exported once per session, on synthetic smears."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("uninfected", "parasitized")
TILE = 32


INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16", "avx512_fp16", "asimddp", "i8mm")


def cpu_description() -> str:
    """The CPU model and the flags that decide int8/fp16 kernels (results differ between AVX2, VNNI, AMX and ARM)."""
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "CPU part") and value.strip() and model in ("", platform.machine()):
            model = value.strip()
        if key.strip() in ("flags", "Features"):
            flags |= set(value.split())
    present = [f for f in INT8_FLAGS if f in flags]
    return f"cpu: {model}; {platform.machine()}, {os.cpu_count()} cores; int8/fp16 flags: {' '.join(present) or 'none of ' + ' '.join(INT8_FLAGS)}"


def pytest_report_header() -> str:
    return cpu_description()


def pytest_sessionstart(session: pytest.Session) -> None:
    """The CPU line also under ``-q`` (which hides the header): a failure must say which CPU's kernels ran."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and session.config.get_verbosity() < 0:
        reporter.write_line(cpu_description())


@dataclass(frozen=True)
class Trained:
    root: Path  # a folder whose name has a space
    data: Path
    checkpoint: Path
    onnx: Path
    export_report: Path


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Train the default architecture (offline ImageNet weights) on 160 synthetic tiles, then export."""
    pytest.importorskip("torch")
    from edgedx.export.pipeline import export_checkpoint
    from edgedx.synthetic import render_tile_dataset, write_image_folder
    from edgedx.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("e2e") / "run with space"
    images, labels = render_tile_dataset(np.random.default_rng(0), 160, TILE)
    data = root / "tiles data"
    write_image_folder(data, images, labels, CLASSES)
    # Synthetic 32-px tiles are far from ImageNet: the backbone adapts at the head's rate.
    config = TrainConfig(
        epochs=3, input_size=TILE, batch_size=16, lr=2e-3, weights="imagenet", augmentation="microscopy",
        backbone_lr_factor=1.0, gradcam_samples=4,
    )
    result = train(data, root / "run", config)
    exported = export_checkpoint(result.checkpoint, root / "export dir")
    return Trained(root, data, result.checkpoint, exported.onnx_path, exported.report_path)


def run_edgedx(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line in a fresh interpreter (its one error catch site included)."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "edgedx", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )
