"""``--embed-resample``: the in-graph resampling equals EdgeDx's own (cv2.resize) for every crop mode."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgedx.card import ONNX_METADATA_KEY, CropPolicy, ModelCard
from edgedx.errors import ModelError
from edgedx.export.resample_graph import (
    INPUT_NAME,
    OUTPUT_NAME,
    ROLE_KEY,
    compare_resampling,
    resample_graph,
    run_resample_graph,
    verify_resample_graph,
)
from edgedx.runtime.tiling import rescale, resampled_size

from test_integration_contract import make_card

ort = pytest.importorskip("onnxruntime")

MAX_GREY_LEVELS = 1
MAX_SHARE = 0.01

POLICIES = {
    "fit": CropPolicy(tile_size=(64, 48), stride=(32, 24), mode="fit"),
    "shorter_side": CropPolicy(tile_size=(32, 32), stride=(16, 16), mode="shorter_side", shorter_side=100),
    "scale_half": CropPolicy(tile_size=(32, 32), stride=(16, 16), scale=0.5),  # integer factor 2
    "scale_quarter": CropPolicy(tile_size=(32, 32), stride=(16, 16), scale=0.25),  # integer factor 4
    "scale_third": CropPolicy(tile_size=(32, 32), stride=(16, 16), scale=1 / 3),
    "scale_0.37": CropPolicy(tile_size=(32, 32), stride=(16, 16), scale=0.37),  # non-integer shrink
    "scale_1.7": CropPolicy(tile_size=(32, 32), stride=(16, 16), scale=1.7),  # enlargement
    "scale_1": CropPolicy(tile_size=(32, 32), stride=(16, 16), scale=1.0),  # no resize at all
}
# (h, w, grey): odd sizes, one grey image as RGB, one smaller than every tile, one mixed (one side grows under fit)
SIZES = [(37, 53, True), (200, 301, False), (1023, 767, False), (20, 25, False), (202, 306, False), (40, 130, False), (1, 1, False)]


def image(h: int, w: int, seed: int, *, grey: bool = False) -> np.ndarray:
    """Smooth structure plus noise: every kind of neighbourhood, and many exact .5 ties for simple factors."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = 128 + 90 * np.sin(yy / 7.0) * np.cos(xx / 5.0)
    pixels = np.clip(base[..., None] + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return np.repeat(pixels[..., :1], 3, axis=2) if grey else pixels


def session(card: ModelCard):
    return ort.InferenceSession(resample_graph(card).SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("mode", list(POLICIES))
def test_graph_resamples_like_edgedx(mode: str) -> None:
    policy = POLICIES[mode]
    run = session(make_card(crop=policy))
    for seed, (h, w, grey) in enumerate(SIZES):
        pixels = image(h, w, seed, grey=grey)
        expected = rescale(pixels, policy)
        got = run_resample_graph(run, pixels)
        assert got.dtype == np.uint8 and got.shape == (*resampled_size(h, w, policy), 3), (mode, h, w)
        stats = compare_resampling(got, expected)
        assert stats["max_abs_diff"] <= MAX_GREY_LEVELS and stats["share_different"] <= MAX_SHARE, (mode, h, w, stats)


def test_sizes_round_half_to_even_in_graph() -> None:
    """The documented ties: 301·100/200 = 150.5 → 150; 37×53 at 0.5 → 18×26; 1023×767 at 0.5 → 512×384."""
    shorter = session(make_card(crop=POLICIES["shorter_side"]))
    half = session(make_card(crop=POLICIES["scale_half"]))
    assert run_resample_graph(shorter, image(200, 301, 0)).shape == (100, 150, 3)
    assert run_resample_graph(shorter, image(301, 200, 0)).shape == (150, 100, 3)
    assert run_resample_graph(half, image(37, 53, 0)).shape == (18, 26, 3)
    assert run_resample_graph(half, image(1023, 767, 0)).shape == (512, 384, 3)
    tiny = session(make_card(crop=CropPolicy(tile_size=(32, 32), stride=(16, 16), scale=0.1)))
    assert run_resample_graph(tiny, image(3, 4, 0)).shape == (1, 1, 3)  # at least one pixel


def test_graph_contract() -> None:
    card = make_card(crop=POLICIES["fit"])
    model = resample_graph(card)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 18)]
    assert model.ir_version == 8
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == INPUT_NAME and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["H", "W", 3]
    assert out.name == OUTPUT_NAME and out.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta[ROLE_KEY] == "resample"
    assert ModelCard.from_dict(json.loads(meta[ONNX_METADATA_KEY])) == card


def test_refuses_a_graph_that_resamples_differently(tmp_path) -> None:
    path = tmp_path / "model.resample.onnx"
    onnx.save(resample_graph(make_card(crop=POLICIES["scale_half"])), path)
    good = verify_resample_graph(path, make_card(crop=POLICIES["scale_half"]), [image(50, 70, 1)])
    assert good["passed"] and good["max_abs_diff"] == 0 and good["share_different"] == 0.0
    with pytest.raises(ModelError, match=r"max \|Δ\| 255 grey levels .* 100\.00% of pixel values differ"):
        verify_resample_graph(path, make_card(crop=POLICIES["scale_0.37"]), [image(50, 70, 1)])


def test_export_writes_verified_resample_graph(trained, tmp_path) -> None:
    from edgedx.export.pipeline import ExportOptions, export_checkpoint

    report = export_checkpoint(trained.checkpoint, tmp_path / "exp", ExportOptions(embed_resample=True))
    path = tmp_path / "exp" / f"{trained.checkpoint.stem}.resample.onnx"
    assert path.is_file()
    entry = json.loads(report.report_path.read_text(encoding="utf-8"))["resample_graph"]
    assert entry["path"] == path.name and entry["passed"] and entry["n_images"] >= 16
    assert entry["max_abs_diff"] <= MAX_GREY_LEVELS and entry["share_different"] <= MAX_SHARE
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta[ROLE_KEY] == "resample" and json.loads(meta[ONNX_METADATA_KEY]) == report.data["card"]
