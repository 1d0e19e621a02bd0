"""docs/integration.md, checked: an independent implementation of the contract against the runtime.

Everything between the file on disk and the merged probabilities is reimplemented
here from the document alone, in plain numpy + OpenCV + ONNX Runtime: reading the
card from the ONNX metadata as plain JSON, decoding, the crop plan (resampled size
with its rounding, interpolation, grid, padding), the foreground filter, resizing
to the input, normalisation, both input layouts, activation, aggregation and the
decision. Nothing of ``edgedx.runtime.tiling``/``preprocess``/``model`` is called
by the implementation; EdgeDx only builds the models (a tiny hand-made graph with
a card) and gives the reference, ``load_model(path).diagnose(image)``.

A mismatch means the document is wrong or incomplete.

The last tests run ``examples/node/verify.mjs`` (onnxruntime-node) on exported
models' ``<file>.card.json`` sidecars when ``node`` and the package are installed.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgedx.card import ONNX_METADATA_KEY, CropPolicy, ModelCard, Normalization, Provenance  # noqa: E402
from edgedx.errors import InsufficientContentError  # noqa: E402
from edgedx.export.onnx_export import embed_metadata  # noqa: E402
from edgedx.runtime import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NODE_DIR = ROOT / "examples" / "node"
ATOL = 1e-5


# =====================================================================================
# The independent implementation (docs/integration.md, section by section)
# =====================================================================================

def read_card(model_path: Path) -> dict[str, Any]:
    """§1: the card is JSON under the ONNX metadata key ``edgedx.card`` (ONNX Runtime: custom metadata)."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return json.loads(session.get_modelmeta().custom_metadata_map["edgedx.card"])


# -- §2 decoding -----------------------------------------------------------------------
def to_rgb8(image: np.ndarray, *, decoded_bgr: bool) -> np.ndarray:
    """Any decoded array as (H, W, 3) uint8 RGB, per §2."""
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) * np.float32(255.0 / 65535.0) + np.float32(0.5)).astype(np.uint8)
    elif image.dtype in (np.float32, np.float64):
        image = (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if image.ndim == 3 and image.shape[2] in (1, 2):
        image = image[:, :, 0]  # grey (+ alpha): the grey channel
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    image = image[:, :, :3]  # alpha dropped, never composited
    return np.ascontiguousarray(image[:, :, ::-1] if decoded_bgr else image)


def decode_file(path: Path) -> np.ndarray:
    """§2: OpenCV imdecode with ANYDEPTH|ANYCOLOR (EXIF orientation applied by OpenCV), then to RGB."""
    data = np.fromfile(str(path), np.uint8)
    decoded = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    return to_rgb8(decoded, decoded_bgr=True)


# -- §3 the crop plan ------------------------------------------------------------------
def round_half_even(x: float) -> int:
    """Python's round(): to the nearest integer, ties to the even one (150.5 → 150, 18.5 → 18, 511.5 → 512)."""
    f = math.floor(x)
    d = x - f
    if d > 0.5:
        return f + 1
    if d < 0.5:
        return f
    return f + (f % 2)


def resampled_size(h: int, w: int, crop: dict[str, Any]) -> tuple[int, int]:
    th, tw = crop["tile_size"]
    if crop["mode"] == "fit":
        return th, tw
    if crop["mode"] == "shorter_side":
        s = crop["shorter_side"]
        if h <= w:
            return s, max(1, round_half_even((w * s) / h))
        return max(1, round_half_even((h * s) / w)), s
    return max(1, round_half_even(h * crop["scale"])), max(1, round_half_even(w * crop["scale"]))


def resample(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """INTER_AREA when neither side grows, INTER_LINEAR otherwise; no call at all when the size is unchanged."""
    h, w = image.shape[:2]
    if (h, w) == size:
        return image
    flag = cv2.INTER_AREA if size[0] <= h and size[1] <= w else cv2.INTER_LINEAR
    return cv2.resize(image, (size[1], size[0]), interpolation=flag)


def starts(length: int, tile: int, stride: int) -> list[int]:
    if length <= tile:
        return [0]
    out = list(range(0, length - tile + 1, stride))
    if out[-1] != length - tile:
        out.append(length - tile)
    return out


def pad_index(i: np.ndarray, n: int, mode: str) -> np.ndarray:
    """Source index of padded position ``i`` (>= n) for reflect (mirror incl. the edge pixel, period 2n) or replicate."""
    if mode == "replicate":
        return np.minimum(i, n - 1)
    j = i % (2 * n)
    return np.where(j < n, j, 2 * n - 1 - j)


def cut(scaled: np.ndarray, y: int, x: int, crop: dict[str, Any]) -> np.ndarray:
    th, tw = crop["tile_size"]
    window = scaled[y : y + th, x : x + tw]
    vh, vw = window.shape[:2]
    if (vh, vw) == (th, tw):
        return window
    if crop["padding"] == "constant":
        out = np.full((th, tw, 3), crop["pad_value"], np.uint8)
        out[:vh, :vw] = window
        return out
    rows = pad_index(np.arange(th), vh, crop["padding"])
    cols = pad_index(np.arange(tw), vw, crop["padding"])
    rows[:vh], cols[:vw] = np.arange(vh), np.arange(vw)
    return window[rows][:, cols]


# -- §4 the foreground filter -----------------------------------------------------------
def background_colour(scaled: np.ndarray) -> np.ndarray:
    pixels = scaled[::8, ::8].reshape(-1, 3).astype(np.int32)
    value = pixels.max(axis=1)
    p70 = np.percentile(value, 70)  # linear interpolation between order statistics
    return np.trunc(np.median(pixels[value >= p70], axis=0)).astype(np.int32)  # truncated to integers


def foreground_fraction(window: np.ndarray, bg: np.ndarray) -> float:
    x = window.astype(np.int32)
    differs = np.abs(x - bg).max(axis=-1) > 30
    return float((differs & (x.max(axis=-1) >= 25)).mean())


# -- §5 model input ---------------------------------------------------------------------
INTERPOLATION = {"nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA, "cubic": cv2.INTER_CUBIC}


def to_input_size(crop: np.ndarray, card: dict[str, Any]) -> np.ndarray:
    ih, iw = card["input_size"]
    h, w = crop.shape[:2]
    if (h, w) == (ih, iw):
        return crop
    flag = INTERPOLATION[card["interpolation"]]
    if card["interpolation"] == "area" and (ih > h or iw > w):
        flag = cv2.INTER_LINEAR
    return cv2.resize(crop, (iw, ih), interpolation=flag)


def normalise(crops: np.ndarray, card: dict[str, Any]) -> np.ndarray:
    """(N, H, W, 3) uint8 at input size → float32 NCHW, per §5."""
    if card["colour_order"] == "BGR":
        crops = crops[..., ::-1]
    norm = card["normalization"]
    scale = np.float32(norm["pixel_scale"])
    if norm["kind"] == "mean_std":
        std = np.asarray(norm["std"], np.float32)
        gain = scale / std  # float32
        shift = -np.asarray(norm["mean"], np.float32) / std  # float32
        x = crops.astype(np.float32) * gain + shift  # two float32 roundings, per channel
    else:  # per_image: per crop and channel, population std in float64, floored at 1/sqrt(H*W)
        x = crops.astype(np.float32) * scale
        mean = x.astype(np.float64).mean(axis=(1, 2), keepdims=True)
        std = np.sqrt(((x.astype(np.float64) - mean) ** 2).mean(axis=(1, 2), keepdims=True))
        floor = 1.0 / math.sqrt(x.shape[1] * x.shape[2])
        x = ((x - mean) / np.maximum(std, floor)).astype(np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float32)


def model_feed(crops: np.ndarray, card: dict[str, Any]) -> np.ndarray:
    crops = np.stack([to_input_size(c, card) for c in crops])
    if card["input_format"] == "uint8_nhwc":
        return np.ascontiguousarray(crops, np.uint8)  # RGB: the graph does colour order and normalisation
    return normalise(crops, card)


# -- §6 outputs -------------------------------------------------------------------------
def activate(logits: np.ndarray, card: dict[str, Any]) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    if z.ndim == 1:
        z = z[:, None]
    if card["output_activation"] == "sigmoid":
        p = 1.0 / (1.0 + np.exp(-z))
        if card["task"] == "binary" and p.shape[1] == 1:
            pos = card["class_names"].index(card["positive_class"])
            out = np.empty((len(p), 2))
            out[:, pos], out[:, 1 - pos] = p[:, 0], 1.0 - p[:, 0]
            return out
        return p
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# -- §7 aggregation ---------------------------------------------------------------------
EPS = 1e-12


def aggregate(p: np.ndarray, card: dict[str, Any], crop: dict[str, Any]) -> np.ndarray:
    how, sigmoid = crop["aggregation"], card["output_activation"] == "sigmoid"
    if how == "mean":
        return p.mean(axis=0)
    if how == "mean_logits":
        q = np.clip(p, EPS, 1 - EPS)
        if sigmoid:
            return 1.0 / (1.0 + np.exp(-(np.log(q) - np.log(1 - q)).mean(axis=0)))
        z = np.log(q).mean(axis=0)
        e = np.exp(z - z.max())
        return e / e.sum()

    def reduce(a: np.ndarray) -> np.ndarray:
        if how == "max":
            return a.max(axis=0)
        if how == "top_k_mean":
            k = min(crop["top_k"], len(a))
            return np.sort(a, axis=0)[len(a) - k :].mean(axis=0)
        return 1.0 - np.prod(1.0 - np.clip(a, 0.0, 1 - EPS), axis=0)  # noisy_or

    if card["task"] == "binary":
        pos = card["class_names"].index(card["positive_class"])
        out = np.empty(2)
        out[pos] = reduce(p[:, pos])
        out[1 - pos] = 1.0 - out[pos]
        return out
    merged = reduce(p)
    if not sigmoid:
        total = merged.sum()
        return merged / total if total > 0 else np.full(len(merged), 1.0 / len(merged))
    return merged


def decide(p: np.ndarray, card: dict[str, Any]) -> Any:
    threshold = 0.5 if card["threshold"] is None else card["threshold"]
    names = card["class_names"]
    if card["task"] == "binary":
        pos = names.index(card["positive_class"])
        return names[pos] if p[pos] >= threshold else names[1 - pos]
    if card["task"] == "multilabel":
        return [n for n, v in zip(names, p) if v >= threshold]
    return names[int(np.argmax(p))]


class Refused(Exception):
    """§3.6: too little image in the crops (or enlarged too far) for an answer."""


def diagnose(model_path: Path, image: np.ndarray) -> dict[str, Any]:
    """The whole contract for one decoded image (an array as the caller has it: grey, RGB, RGBA, 16-bit...)."""
    card = read_card(model_path)
    crop = card["crop"]
    rgb = to_rgb8(np.asarray(image), decoded_bgr=False)
    h, w = rgb.shape[:2]
    size = resampled_size(h, w, crop)
    scaled = resample(rgb, size)
    th, tw = crop["tile_size"]
    sy, sx = crop["stride"]
    positions = [(y, x) for y in starts(size[0], th, sy) for x in starts(size[1], tw, sx)]
    tiles = [cut(scaled, y, x, crop) for y, x in positions]
    used = np.ones(len(positions), bool)
    if crop["min_foreground"] > 0:
        bg = background_colour(scaled)
        for k, (y, x) in enumerate(positions):
            window = scaled[y : y + th, x : x + tw]  # the image's own pixels, never the padding
            used[k] = foreground_fraction(window, bg) >= crop["min_foreground"]
        if not used.any():
            used[:] = True
    if crop["min_content"] > 0:
        inside = [min(th, size[0] - y) * min(tw, size[1] - x) for k, (y, x) in enumerate(positions) if used[k]]
        if sum(inside) / (len(inside) * th * tw) < crop["min_content"] or (size[0] / h) * (size[1] / w) > 16**2:
            raise Refused
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    chosen = np.stack([t for t, u in zip(tiles, used) if u])
    logits = session.run(None, {session.get_inputs()[0].name: model_feed(chosen, card)})[0]
    rows = activate(logits, card)
    if crop.get("neighbour_context", 0) > 0:
        rows = blend(rows, positions, used, card, crop["neighbour_context"])
    probs = aggregate(rows, card, crop)
    return {"probabilities": probs, "n_used": int(used.sum()), "n_tiles": len(positions), "label": decide(probs, card), "size": size}


def blend(rows: np.ndarray, positions: list[tuple[int, int]], used: np.ndarray, card: dict[str, Any], w: float) -> np.ndarray:
    """§7.1: the used tiles' positive p blended with the highest p of their used grid neighbours (row/column ± 1)."""
    pos = card["class_names"].index(card["positive_class"])
    ys, xs = sorted({y for y, _ in positions}), sorted({x for _, x in positions})
    cell = {(ys.index(y), xs.index(x)): k for k, (y, x) in enumerate(positions)}
    p = {k: rows[j, pos] for j, k in enumerate(np.flatnonzero(used))}
    out = rows.copy()
    for j, k in enumerate(np.flatnonzero(used)):
        r, c = ys.index(positions[k][0]), xs.index(positions[k][1])
        around = [p[cell[r + dr, c + dc]] for dr in (-1, 0, 1) for dc in (-1, 0, 1)
                  if (dr, dc) != (0, 0) and cell.get((r + dr, c + dc)) in p]
        q = (1 - w) * p[k] + w * max(around) if around else p[k]
        out[j, pos], out[j, 1 - pos] = q, 1 - q
    return out


# =====================================================================================
# Models: a tiny hand-made graph that sees every pixel, with an EdgeDx card
# =====================================================================================

def tiny_graph(input_size: tuple[int, int], n_out: int, seed: int, gain: float = 4.0) -> onnx.ModelProto:
    """logits = Gemm(Flatten(Relu(x * M + B)), W, b): position-sensitive, so any crop or resampling slip shows."""
    h, w = input_size
    rng = np.random.default_rng(seed)
    m = rng.normal(0, 1, (1, 3, h, w)).astype(np.float32)
    b = rng.normal(0, 0.5, (1, 3, h, w)).astype(np.float32)
    fc = (rng.normal(0, 1, (3 * h * w, n_out)) / math.sqrt(3 * h * w) * gain).astype(np.float32)
    bias = rng.normal(0, 0.3, (n_out,)).astype(np.float32)
    nodes = [
        helper.make_node("Mul", ["input", "M"], ["xm"]),
        helper.make_node("Add", ["xm", "B"], ["xb"]),
        helper.make_node("Relu", ["xb"], ["xr"]),
        helper.make_node("Flatten", ["xr"], ["xf"], axis=1),
        helper.make_node("Gemm", ["xf", "W", "bias"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_out])],
        [numpy_helper.from_array(m, "M"), numpy_helper.from_array(b, "B"), numpy_helper.from_array(fc, "W"), numpy_helper.from_array(bias, "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


TASKS = {
    "binary": dict(task="binary", class_names=("negative", "positive"), positive_class="positive", threshold=0.31),
    "binary1": dict(task="binary", class_names=("positive", "negative"), positive_class="positive", threshold=0.6, output_activation="sigmoid"),
    "multiclass": dict(task="multiclass", class_names=("a", "b", "c"), threshold=None),
    "multilabel": dict(task="multilabel", class_names=("x", "y", "z"), threshold=0.4, output_activation="sigmoid"),
}


def make_card(task: str = "binary", *, input_size: tuple[int, int] = (32, 32), **changes: Any) -> ModelCard:
    crop = changes.pop("crop", None) or CropPolicy(tile_size=input_size, stride=(input_size[0] // 2, input_size[1] // 2))
    return ModelCard(
        arch="tiny", input_size=input_size, crop=crop, provenance=Provenance("0", "2026-01-01T00:00:00+00:00"),
        **{**TASKS[task], **changes},
    )


def write_model(path: Path, card: ModelCard, *, embed: bool = False, seed: int = 0, gain: float = 4.0) -> Path:
    n_out = 1 if card.task == "binary" and card.output_activation == "sigmoid" else card.n_classes
    graph = tiny_graph(card.input_size, n_out, seed, gain)
    if embed:
        from edgedx.export.preprocess_graph import embed_preprocessing

        graph, card = embed_preprocessing(graph, card)
        graph.ir_version = 8
    embed_metadata(graph, {ONNX_METADATA_KEY: card.to_json()})
    onnx.save(graph, str(path))
    return path


def field_image(h: int, w: int, seed: int, *, grey: bool = False) -> np.ndarray:
    """Tinted glass with dark blobs and pixel noise: the foreground filter has something to find, resampling everywhere."""
    rng = np.random.default_rng(seed)
    image = np.empty((h, w, 3), np.float64)
    image[:] = (179, 210, 179)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(max(1, h * w // 6000)):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, max(4, min(h, w) / 6))
        inside = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        image[inside] = rng.uniform(20, 150, 3)
    image += rng.normal(0, 12, image.shape)
    out = np.clip(image, 0, 255).astype(np.uint8)
    return out.mean(axis=2).astype(np.uint8) if grey else out


def reference(model_path: Path, image: Any, **load: Any):
    return load_model(model_path, **load).diagnose(image)


def assert_same(model_path: Path, image: np.ndarray, *, mine_image: np.ndarray | None = None) -> dict[str, Any]:
    theirs = reference(model_path, image)
    mine = diagnose(model_path, image if mine_image is None else mine_image)
    np.testing.assert_allclose(mine["probabilities"], theirs.sliding.probabilities, rtol=0, atol=ATOL)
    assert (mine["n_tiles"], mine["n_used"]) == (theirs.sliding.n_tiles, theirs.sliding.n_used)
    assert mine["size"] == (theirs.sliding.grid.height, theirs.sliding.grid.width)
    assert mine["label"] == theirs.label
    return mine


# =====================================================================================
# The tests
# =====================================================================================

SIZES = [(37, 53), (200, 301), (1023, 767)]
MODES = {
    # tile 32, stride 16 unless said; shorter_side 100 on 200×301 gives 301·100/200 = 150.5 → 150 (ties to even)
    "fit": dict(mode="fit"),
    "shorter_side": dict(mode="shorter_side", shorter_side=100),
    "scale": dict(mode="scale", scale=0.5),  # 37×53 → 18.5×26.5 → 18×26 (padded), 1023×767 → 512×384
    "scale_up": dict(mode="scale", scale=1.37),  # enlarging: INTER_LINEAR
}
AGGREGATIONS = ["mean", "mean_logits", "max", "top_k_mean", "noisy_or"]


# 1023×767 × 1.37 would be 1.5 MP of 32-px tiles: the two smaller sizes cover enlarging
SIZE_MODES = [(size, mode) for size in SIZES for mode in MODES if not (mode == "scale_up" and size[0] > 500)]


@pytest.mark.parametrize("size,mode", SIZE_MODES, ids=[f"{s[0]}x{s[1]}-{m}" for s, m in SIZE_MODES])
@pytest.mark.parametrize("grey", [False, True], ids=["rgb", "grey"])
def test_crop_modes_on_odd_sizes(tmp_path: Path, size: tuple[int, int], grey: bool, mode: str) -> None:
    k = SIZES.index(size) * 8 + list(MODES).index(mode) * 2 + grey
    aggregation = AGGREGATIONS[k % len(AGGREGATIONS)]
    padding = ("constant", "reflect", "replicate")[k % 3]
    crop = CropPolicy(tile_size=(32, 32), stride=(16, 16), aggregation=aggregation, padding=padding, pad_value=77, top_k=4, **MODES[mode])
    path = write_model(tmp_path / "m.onnx", make_card("binary", crop=crop), seed=k)
    image = field_image(*size, seed=k, grey=grey)
    mine = assert_same(path, image)
    if mode == "shorter_side" and size == (200, 301):
        assert mine["size"] == (100, 150)  # 150.5 rounds to even; half-up would give 151
    if mode == "scale" and size == (37, 53):
        assert mine["size"] == (18, 26)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("task", list(TASKS))
def test_aggregations_and_tasks(tmp_path: Path, aggregation: str, task: str) -> None:
    crop = CropPolicy(tile_size=(32, 32), stride=(20, 24), aggregation=aggregation, top_k=3, mode="scale", scale=0.8)
    path = write_model(tmp_path / "m.onnx", make_card(task, crop=crop), seed=len(aggregation))
    assert_same(path, field_image(151, 97, seed=3))


@pytest.mark.parametrize("min_foreground,aggregation", [(0.0, "mean"), (0.3, "top_k_mean"), (0.3, "max")])
def test_neighbour_context(tmp_path: Path, min_foreground: float, aggregation: str) -> None:
    """§7.1 on odd grids (an edge-aligned last row and column), with skipped tiles that must not count as neighbours."""
    crop = CropPolicy(tile_size=(32, 32), stride=(16, 16), aggregation=aggregation, min_foreground=min_foreground, neighbour_context=0.45,
                      mode="scale", scale=0.7)
    path = write_model(tmp_path / "m.onnx", make_card("binary", crop=crop), seed=13)
    mine = assert_same(path, field_image(300, 421, seed=4))
    if min_foreground:
        assert 0 < mine["n_used"] < mine["n_tiles"]
    plain = write_model(tmp_path / "plain.onnx", make_card("binary", crop=dataclasses.replace(crop, neighbour_context=0.0)), seed=13)
    assert abs(reference(plain, field_image(300, 421, seed=4)).sliding.probabilities[0] - mine["probabilities"][0]) > 1e-4  # the blend changed it


@pytest.mark.parametrize(
    "changes",
    [
        {"normalization": Normalization(kind="per_image")},
        {"colour_order": "BGR"},
        {"normalization": Normalization(pixel_scale=1.0, mean=(100.0,), std=(60.0,))},  # one value for all channels
        {"interpolation": "cubic"},
        {"interpolation": "nearest"},
        {"interpolation": "linear", "normalization": Normalization(kind="per_image"), "colour_order": "BGR"},
    ],
    ids=["per_image", "bgr", "one-channel-stats", "cubic", "nearest", "linear-per_image-bgr"],
)
@pytest.mark.parametrize("embed", [False, True], ids=["float32_nchw", "uint8_nhwc"])
def test_preprocessing_and_input_layouts(tmp_path: Path, changes: dict[str, Any], embed: bool) -> None:
    """Tiles smaller than the input (24×20 → 32×28), so every crop is resized by the card's interpolation."""
    crop = CropPolicy(tile_size=(24, 20), stride=(12, 10), mode="shorter_side", shorter_side=61)
    card = make_card("multiclass", input_size=(32, 28), crop=crop, **changes)
    path = write_model(tmp_path / "m.onnx", card, embed=embed, seed=5)
    if embed:
        assert read_card(path)["input_format"] == "uint8_nhwc"
    assert_same(path, field_image(90, 71, seed=11))


@pytest.mark.parametrize("min_foreground", [0.05, 0.3, 0.999])
def test_foreground_filter(tmp_path: Path, min_foreground: float) -> None:
    crop = CropPolicy(tile_size=(32, 32), stride=(16, 16), min_foreground=min_foreground, aggregation="max", mode="scale", scale=0.7)
    path = write_model(tmp_path / "m.onnx", make_card("binary", crop=crop), seed=9)
    image = field_image(300, 420, seed=4)
    mine = assert_same(path, image)
    assert 0 < mine["n_used"] < mine["n_tiles"]
    glass = np.clip(np.random.default_rng(0).normal((179, 210, 179), 6, (120, 150, 3)), 0, 255).astype(np.uint8)
    mine = assert_same(path, glass)
    assert mine["n_used"] == mine["n_tiles"]  # no crop reached it: every crop is used after all


def test_foreground_rules_at_their_edges(tmp_path: Path) -> None:
    """The background colour is truncated (a median of 150.5 is 150), a pixel must differ by more than 30, and
    near-black pixels (max channel < 25) are never foreground."""
    crop = CropPolicy(tile_size=(32, 32), stride=(32, 32), min_foreground=0.3, mode="scale", scale=1.0)
    path = write_model(tmp_path / "m.onnx", make_card("binary", crop=crop), seed=10)
    image = np.empty((64, 64, 3), np.uint8)
    image[:] = (200, 150, 100)
    image[::8, ::8][:, ::2] = (200, 151, 100)  # the sampled glass: half G=150, half G=151 → median 150.5
    odd = np.zeros((64, 64), bool)
    odd[:, 1::2] = True  # never sampled by the every-8th-pixel background estimate
    top_left, bottom_right = np.zeros_like(odd), np.zeros_like(odd)
    top_left[:32, :32], bottom_right[32:, 32:] = odd[:32, :32], odd[32:, 32:]
    image[top_left] = (200, 181, 100)  # differs from 150 by 31 (foreground), from 151 by 30 (not)
    image[bottom_right] = (0, 0, 24)  # far from the glass, but near black
    mine = assert_same(path, image)
    assert mine["n_used"] == 1  # only the top-left crop


@pytest.mark.parametrize("padding", ["constant", "reflect", "replicate"])
def test_padding_of_a_tiny_image(tmp_path: Path, padding: str) -> None:
    """A 5×3 image in 32-px tiles: reflect must repeat with period 2n (numpy 'symmetric'), not stop after one mirror."""
    crop = CropPolicy(tile_size=(32, 32), stride=(32, 32), padding=padding, pad_value=200, min_content=0.0, mode="scale", scale=1.0)
    path = write_model(tmp_path / "m.onnx", make_card("multilabel", crop=crop), seed=2)
    assert_same(path, np.random.default_rng(0).integers(0, 256, (5, 3, 3), dtype=np.uint8))


def test_too_little_content_is_refused_by_both(tmp_path: Path) -> None:
    crop = CropPolicy(tile_size=(32, 32), stride=(16, 16), mode="scale", scale=0.2)
    path = write_model(tmp_path / "m.onnx", make_card("binary", crop=crop))
    image = field_image(30, 40, seed=0)  # 6×8 after scaling: 48 of 1024 pixels = 4.7% < 5%
    with pytest.raises(Refused):
        diagnose(path, image)
    with pytest.raises(InsufficientContentError):
        reference(path, image)


def test_refer_band_and_threshold(tmp_path: Path) -> None:
    """label: p(positive) >= threshold; decision 'refer' when low <= p(positive) < high."""
    path = write_model(tmp_path / "m.onnx", make_card("binary"), seed=1)
    image = field_image(64, 64, seed=1)
    mine = diagnose(path, image)["probabilities"][1]
    p = float(reference(path, image).sliding.probabilities[1])  # the exact float, for the band's edges
    assert abs(mine - p) <= ATOL
    inside = reference(path, image, refer_band=(max(0.0, p - 0.01), min(1.0, p + 0.01)))
    assert inside.decision == "refer" and inside.label == ("positive" if p >= 0.31 else "negative")
    at_low = reference(path, image, refer_band=(p, min(1.0, p + 0.01)))
    assert at_low.decision == "refer"
    at_high = reference(path, image, refer_band=(max(0.0, p - 0.01), p))
    assert at_high.decision != "refer"


# -- decoding files ---------------------------------------------------------------------

def exif_jpeg(path: Path, rgb: np.ndarray, orientation: int) -> Path:
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    jpeg = encoded.tobytes()
    ifd = struct.pack(">H", 1) + struct.pack(">HHI", 0x0112, 3, 1) + struct.pack(">HH", orientation, 0) + struct.pack(">I", 0)
    exif = b"Exif\x00\x00" + b"MM\x00\x2a" + struct.pack(">I", 8) + ifd
    path.write_bytes(jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(exif) + 2) + exif + jpeg[2:])
    return path


def test_decoding_files(tmp_path: Path) -> None:
    crop = CropPolicy(tile_size=(32, 32), stride=(16, 16), mode="shorter_side", shorter_side=48, aggregation="mean_logits")
    model = write_model(tmp_path / "m.onnx", make_card("multiclass", crop=crop), seed=4)
    rgb = field_image(61, 90, seed=8)
    rng = np.random.default_rng(1)
    files = {}
    grey16 = (rng.integers(0, 65536, (61, 90))).astype(np.uint16)
    files["grey16.png"] = grey16
    rgb16 = (rgb.astype(np.uint16) * 257 + rng.integers(0, 257, rgb.shape)).astype(np.uint16)
    files["rgb16.png"] = cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR)
    rgba = np.concatenate([rgb, rng.integers(0, 256, (61, 90, 1), dtype=np.uint8)], axis=2)
    files["rgba.png"] = cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)
    files["grey.png"] = rgb.mean(axis=2).astype(np.uint8)
    files["rgb.bmp"] = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    for name, array in files.items():
        assert cv2.imwrite(str(tmp_path / name), array)
    paths = [tmp_path / name for name in files]
    paths.append(exif_jpeg(tmp_path / "rotated.jpg", rgb, 6))  # stored 61×90, shown 90×61
    for path in paths:
        decoded = decode_file(path)
        if path.name == "rotated.jpg":
            assert decoded.shape[:2] == (90, 61)
        if path.name == "grey16.png":  # round(v / 257), ties up
            assert np.array_equal(decoded[..., 0], np.floor(grey16 / 257.0 + 0.5).astype(np.uint8))
        if path.name == "rgba.png":
            assert np.array_equal(decoded, rgb)  # alpha dropped, not composited
        theirs = reference(model, path)
        mine = diagnose(model, decoded)
        np.testing.assert_allclose(mine["probabilities"], theirs.sliding.probabilities, rtol=0, atol=ATOL, err_msg=path.name)


def test_arrays_in_other_forms(tmp_path: Path) -> None:
    """(H, W, 1), grey + alpha, RGBA, 16-bit and float arrays given to diagnose directly (no decoding: RGB order)."""
    crop = CropPolicy(tile_size=(32, 32), stride=(16, 16), mode="scale", scale=0.9)
    model = write_model(tmp_path / "m.onnx", make_card("binary", crop=crop), seed=6)
    rng = np.random.default_rng(2)
    rgb = field_image(70, 50, seed=2)
    grey = rgb[..., 1]
    arrays = [
        grey[..., None],
        np.stack([grey, rng.integers(0, 256, grey.shape, dtype=np.uint8)], axis=2),
        np.concatenate([rgb, np.full((70, 50, 1), 3, np.uint8)], axis=2),
        np.minimum(rgb.astype(np.uint32) * 257 + 128, 65535).astype(np.uint16),
        rgb.astype(np.float32) / 255.0,
    ]
    for array in arrays:
        assert_same(model, array)


# =====================================================================================
# The self-test vectors, and examples/node/verify.mjs
# =====================================================================================

def test_sidecar_vectors_are_the_documented_plain_form(tmp_path: Path) -> None:
    """§8: crops_base64 is raw uint8 C-order (n, H, W, 3) RGB at tile size; reference rows follow class_names."""
    from edgedx.export.sidecar import write_card_sidecar
    from edgedx.runtime.selftest import SelfTestVectors, Tolerances

    card = make_card("multiclass")
    path = write_model(tmp_path / "m.onnx", card, seed=3)
    crops = np.stack([field_image(32, 32, seed=s) for s in range(5)])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    plain = read_card(path)
    ref = activate(session.run(None, {"input": model_feed(crops, plain)})[0], plain).astype(np.float32)
    write_card_sidecar(path, card, "onnx", "fp32", SelfTestVectors(crops, ref, "fp32", Tolerances(1e-3, 1.0), "test"))
    document = json.loads((tmp_path / "m.onnx.card.json").read_text())
    assert document["artefact"]["file"] == "m.onnx"
    import hashlib

    assert document["artefact"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert document["card"] == plain
    vectors = document["selftest"]
    raw = np.frombuffer(base64.b64decode(vectors["crops_base64"]), np.uint8).reshape(vectors["crops_shape"])
    assert np.array_equal(raw, crops)
    np.testing.assert_allclose(vectors["reference"], ref, atol=1e-7)
    load_model(path)  # the runtime accepts the pair


def node_or_skip() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    if not (NODE_DIR / "node_modules" / "onnxruntime-node").is_dir():
        pytest.skip("examples/node/node_modules/onnxruntime-node is missing: cd examples/node && npm install")
    return node


def run_node(node: str, model: Path) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    result = subprocess.run([node, str(NODE_DIR / "verify.mjs"), str(model), "--json"], capture_output=True, text=True, timeout=120)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return result, (json.loads(lines[-1]) if lines else {})


def test_node_verify_on_an_exported_model(trained: Any) -> None:
    """The real export: model.onnx and model.onnx.card.json with fp32 PyTorch reference probabilities."""
    node = node_or_skip()
    assert Path(str(trained.onnx) + ".card.json").is_file()
    result, report = run_node(node, trained.onnx)
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)
    assert report["passed"] and report["max_prob_delta"] <= report["tolerances"]["max_prob_delta"]


@pytest.mark.parametrize(
    "task,changes,embed,tile",
    [
        ("binary1", {"normalization": Normalization(kind="per_image"), "colour_order": "BGR"}, False, (32, 28)),
        ("multilabel", {}, True, (32, 28)),
        ("multiclass", {"normalization": Normalization(pixel_scale=1.0, mean=(100.0,), std=(60.0,))}, False, (32, 28)),
        ("binary", {"interpolation": "nearest"}, False, (24, 20)),
        ("multiclass", {"interpolation": "area"}, False, (24, 20)),
        ("multilabel", {"interpolation": "cubic", "normalization": Normalization(kind="per_image")}, True, (24, 20)),
    ],
    ids=["sigmoid1-per_image-bgr", "multilabel-uint8", "one-value-stats", "resize-nearest", "resize-area-linear", "resize-cubic-uint8"],
)
def test_node_verify_paths(tmp_path: Path, task: str, changes: dict[str, Any], embed: bool, tile: tuple[int, int]) -> None:
    """verify.mjs on each layout, normalisation and activation, with crops at the input size (32×28) or smaller
    (24×20: it must resize them). The reference here is this file's implementation (OpenCV's resize).

    Crops at the input size must agree to float rounding. verify.mjs resizes in plain JS floats, OpenCV in fixed
    point: nearest is exact, linear and cubic pixels may differ by one grey level, so those cases use a model
    of ordinary sensitivity and are held to the fp32 self-test tolerance (1e-3)."""
    node = node_or_skip()
    from edgedx.export.sidecar import write_card_sidecar
    from edgedx.runtime.selftest import SelfTestVectors, Tolerances

    crop = CropPolicy(tile_size=tile, stride=(tile[0] // 2, tile[1] // 2))
    card = make_card(task, input_size=(32, 28), crop=crop, **changes)
    exact = tile == (32, 28) or changes.get("interpolation") == "nearest"
    path = write_model(tmp_path / "m.onnx", card, embed=embed, seed=7, gain=4.0 if exact else 0.1)
    plain = read_card(path)
    crops = np.stack([field_image(*tile, seed=s) for s in range(6)])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = activate(session.run(None, {"input": model_feed(crops, plain)})[0], plain).astype(np.float32)
    with_card = ModelCard.from_dict(plain)
    write_card_sidecar(path, with_card, "onnx", "fp32", SelfTestVectors(crops, ref, "fp32", Tolerances(1e-3, 1.0), "test"))
    result, report = run_node(node, path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report["resized"] is (tile != (32, 28))
    print(f"verify.mjs {tile} {changes}: max dp {report['max_prob_delta']:.2e}")
    assert report["max_prob_delta"] <= (1e-5 if exact else 1e-3), report

    # a wrong reference must fail, with a non-zero exit
    document = json.loads((tmp_path / "m.onnx.card.json").read_text())
    document["selftest"]["reference"][0] = [1.0 - v for v in document["selftest"]["reference"][0]]
    (tmp_path / "m.onnx.card.json").write_text(json.dumps(document))
    result, report = run_node(node, path)
    assert result.returncode == 1 and report["passed"] is False


def int8_with_format2_sidecar(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    """A real int8 file (flavour 'cpu-avx2': 7-bit weights, which no CPU's kernels saturate) with a format-2
    sidecar as export writes it: 32 crops, the fp32 reference, the file's exact int8 arithmetic and its flavour."""
    from edgedx.export.int8 import FLAVOUR_KEY, INT8_FLAVOURS, exact_probabilities, quantise
    from edgedx.export.sidecar import write_card_sidecar
    from edgedx.runtime.selftest import SELFTEST_TOLERANCES, SelfTestVectors

    card = make_card("multiclass")  # argmax decisions: shifting every class by one amount keeps them
    float_path = write_model(tmp_path / "float.onnx", card, seed=11, gain=2.0)
    flavour = INT8_FLAVOURS["cpu-avx2"]
    calibration = np.stack([field_image(32, 32, seed=100 + s) for s in range(32)])
    path = quantise(float_path, tmp_path / "m.int8-avx2.onnx", card, calibration, flavour)
    graph = onnx.load(str(path))
    embed_metadata(graph, {ONNX_METADATA_KEY: card.to_json(), "edgedx.precision": "int8", FLAVOUR_KEY: json.dumps(flavour.to_dict())})
    onnx.save(graph, str(path))
    crops = np.stack([field_image(32, 32, seed=s) for s in range(32)])
    plain = read_card(path)
    session = ort.InferenceSession(str(float_path), providers=["CPUExecutionProvider"])
    ref = activate(session.run(None, {"input": model_feed(crops, plain)})[0], plain).astype(np.float32)
    exact = exact_probabilities(path, card, crops)
    vectors = SelfTestVectors(crops, ref, "int8", SELFTEST_TOLERANCES["int8"], "test", exact, flavour.about())
    write_card_sidecar(path, card, "onnx", "int8", vectors, flavour.to_dict())
    return path, json.loads((tmp_path / "m.int8-avx2.onnx.card.json").read_text())


def test_node_verify_int8_format2(tmp_path: Path) -> None:
    """§9, format 2: agreement is counted against the file's exact int8 arithmetic (`exact`), and the mean |Δp| from
    it must stay within max_mean_exact_delta; a target computing something else is refused with the flavour said."""
    node = node_or_skip()
    path, document = int8_with_format2_sidecar(tmp_path)
    sidecar = tmp_path / "m.int8-avx2.onnx.card.json"
    vectors = document["selftest"]
    assert vectors["format"] == 2 and len(vectors["exact"]) == 32 and vectors["tolerances"]["max_mean_exact_delta"] == 0.045
    assert document["artefact"]["int8_flavour"]["name"] == "cpu-avx2"

    result, report = run_node(node, path)
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout)
    assert report["passed"] and report["format"] == 2 and report["agreement_against"] == "exact"
    assert report["exact_mean_delta"] <= 0.045 and "exact int8 arithmetic" in result.stdout

    # the fp32 reference is not what agreement is counted against: 3 of 32 rows moved elsewhere still pass
    # (against the reference, agreement would be at most 29/32 < 0.95)
    moved = json.loads(json.dumps(document))
    for k in range(3):
        row = moved["selftest"]["reference"][k]
        moved["selftest"]["reference"][k] = row[1:] + row[:1]  # the classes rotated: another top-1
    against_reference = np.mean(np.argmax(vectors["exact"], axis=1) == np.argmax(moved["selftest"]["reference"], axis=1))
    assert against_reference < 0.95
    sidecar.write_text(json.dumps(moved))
    result, report = run_node(node, path)
    assert result.returncode == 0 and report["passed"], result.stdout + result.stderr

    # an engine whose int8 kernels compute something else: `exact` shifted by 0.1 (argmax unchanged)
    shifted = json.loads(json.dumps(document))
    shifted["selftest"]["exact"] = [[v + 0.1 for v in row] for row in shifted["selftest"]["exact"]]
    sidecar.write_text(json.dumps(shifted))
    result, report = run_node(node, path)
    assert result.returncode == 1 and report["passed"] is False, result.stdout + result.stderr
    assert min(report["top1_agreement"], report["decision_agreement"]) >= 0.95 and report["exact_mean_delta"] > 0.045
    assert "mean |Δp| from the file's exact int8 arithmetic" in report["failures"][0] and len(report["failures"]) == 1
    assert "refused:" in result.stdout and "int8 flavour 'cpu-avx2'" in result.stdout  # the flavour is said
    print(result.stdout)

    # vectors in a format this script does not know: exit 2, saying to upgrade
    future = json.loads(json.dumps(document))
    future["selftest"]["format"] = 3
    sidecar.write_text(json.dumps(future))
    result, _ = run_node(node, path)
    assert result.returncode == 2 and "upgrade" in result.stderr


def test_per_call_crop_overrides_are_checked_and_honoured_like_load_time_ones(tmp_path: Path) -> None:
    """Found while writing this contract: a per-call ``min_content`` was ignored and a per-call tile larger than the
    model input was accepted (shrinking objects silently). Both now behave as the same setting given to load_model."""
    from edgedx.errors import InputError, InsufficientContentError
    from edgedx.runtime import load_model

    path = write_model(tmp_path / "m.onnx", make_card(input_size=(32, 32)))
    model = load_model(path)
    tiny = field_image(3, 3, seed=1)  # 9 pixels in a 32×32 crop: refused under the card's 5% minimum
    with pytest.raises(InsufficientContentError):
        model.diagnose(tiny)
    assert model.diagnose(tiny, crop={"min_content": 0}).n_crops == 1
    assert load_model(path, crop={"min_content": 0}).diagnose(tiny).n_crops == 1
    with pytest.raises(InputError, match="tile"):
        model.diagnose(field_image(80, 80, seed=2), crop={"tile_size": (64, 64)})
