"""--engine ray gives the local engine's records, record by record, through Ray Data.

One local Ray (2 CPUs, 127.0.0.1 only) serves the whole module: starting Ray
costs seconds. The model is the session's tiny trained ONNX model.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from edgedx.runtime.batch import diagnose_paths
from edgedx.runtime.io.image_io import write_image
from edgedx.runtime.ray_engine import diagnose_ray, read_ray_records
from edgedx.runtime.outputs.records import read_records

from edgedx.errors import InputError, MissingDependencyError
from edgedx.synthetic import render_field

# a stride below the tile, a foreground filter (skipped tiles, one all-background fallback) and a refer band:
# every part of the policy that shapes a record is exercised on both engines
CROP = {"stride": (24, 24), "min_foreground": 0.15}
BAND = (0.3, 0.7)
TIMINGS = "timings_ms"


@pytest.fixture(scope="module")
def local_ray() -> Any:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level=logging.ERROR, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """7 inputs: odd sizes, smaller than a tile, sparse cells, all glass, a space in a name, one unreadable."""
    root = tmp_path_factory.mktemp("ray") / "fields in"
    root.mkdir()
    rng = np.random.default_rng(3)
    sizes = {"a.png": (511, 237), "b small.png": (31, 45), "c.jpg": (97, 130), "d.png": (64, 200)}
    for name, (h, w) in sizes.items():
        write_image(root / name, render_field(rng, h, w, infected_fraction=0.3).image)
    write_image(root / "e sparse.png", render_field(rng, 150, 170, n_cells=3).image)  # mostly glass: tiles skipped
    write_image(root / "f glass.png", np.full((80, 90, 3), 235, np.uint8))  # all glass: the all-tiles fallback
    (root / "g broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)  # a truncated PNG
    return root


def _same(local: dict[str, Any], other: dict[str, Any]) -> None:
    assert list(local) == list(other), (local.keys(), other.keys())
    for key, value in local.items():
        if key == TIMINGS:
            assert (value is None) == (other[key] is None) and (value is None or set(value) == set(other[key]))
        elif key == "probabilities" and value is not None:
            assert list(value) == list(other[key])
            assert np.allclose(list(value.values()), list(other[key].values()), atol=1e-6, rtol=0)
        elif key == "top_k" and value is not None:
            assert [t["class"] for t in value] == [t["class"] for t in other[key]]
            assert np.allclose([t["probability"] for t in value], [t["probability"] for t in other[key]], atol=1e-6, rtol=0)
        else:
            assert value == other[key], (local["input"], key, value, other[key])


def test_ray_records_match_the_local_engine_in_jsonl_and_parquet(local_ray: Any, folder: Path, trained: Any, tmp_path: Path) -> None:
    local_out = tmp_path / "local.jsonl"
    local = diagnose_paths([folder], trained.onnx, local_out, crop=CROP, refer_band=BAND, batch_size=8)
    expected = sorted(read_records(local_out), key=lambda r: r["input"])
    assert local.n_inputs == 7 and local.n_failed == 1
    assert any(r["tiles_skipped"] for r in expected if r["error"] is None), "no tile was skipped: the filter is not exercised"
    assert next(r for r in expected if "f glass" in r["input"])["tiles_skipped"] == 0  # fallback: every tile used

    stale = tmp_path / "shards.parquet"
    stale.mkdir()
    (stale / "old-run.parquet").write_bytes(b"stale shard")
    for out, kwargs in ((tmp_path / "shards.jsonl", {}), (stale, {"overwrite": True})):
        summary = diagnose_ray([folder], trained.onnx, out, crop=CROP, refer_band=BAND, batch_size=5, images_per_batch=3, **kwargs)
        assert (summary.n_inputs, summary.n_failed, summary.label_counts) == (local.n_inputs, local.n_failed, local.label_counts)
        records = read_ray_records(out)
        assert [r["input"] for r in records] == [r["input"] for r in expected]
        for mine, theirs in zip(records, expected):
            _same(theirs, mine)
        assert not (out / "old-run.parquet").exists()
    assert {p.suffix for p in (tmp_path / "shards.jsonl").iterdir()} == {".jsonl"}
    broken = next(r for r in records if "g broken" in r["input"])
    assert broken["error"] and str(folder) in broken["error"] and broken["label"] is None


def test_without_ray_the_engine_says_how_to_install_it(folder: Path, trained: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError) as caught:
        diagnose_ray([folder], trained.onnx, tmp_path / "out.jsonl")
    assert "pip install 'edgedx[ray]'" in str(caught.value) and "--engine ray" in str(caught.value)


def test_refuses_streams_bad_outputs_and_nonempty_folders(folder: Path, trained: Any, tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    video.write_bytes(b"\x00" * 64)
    for inputs in ([video], ["camera:0"], ["rtsp://cam.local/stream"]):
        with pytest.raises(InputError, match="local engine"):
            diagnose_ray(inputs, trained.onnx, tmp_path / "o.jsonl")
    with pytest.raises(InputError, match=r"\.jsonl or \.parquet"):
        diagnose_ray([folder], trained.onnx, tmp_path / "o.csv")
    holder = tmp_path / "scans.jsonl"
    holder.mkdir()
    write_image(holder / "x.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="holds the input"):
        diagnose_ray([holder / "x.png"], trained.onnx, holder, overwrite=True)
    assert (holder / "x.png").is_file()
    full = tmp_path / "full.jsonl"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="--overwrite"):
        diagnose_ray([folder], trained.onnx, full)
    with pytest.raises(InputError, match="not a results shard"):
        diagnose_ray([folder], trained.onnx, full, overwrite=True)
    assert (full / "notes.txt").read_text() == "mine"
    with pytest.raises(InputError, match="no .jsonl or .parquet shards"):
        read_ray_records(tmp_path / "nothing here")
