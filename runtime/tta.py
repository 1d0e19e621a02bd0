"""Test-time augmentation (TTA): the engine run on flipped/rotated copies of each crop, logits averaged.

Why here, at the session level, and why logits:

- Every caller that turns crops into numbers goes through one engine call:
  ``Model.predict_tiles``/``predict_prepared`` (``diagnose``, evaluate, export
  parity, training validation) and :func:`edgedx.runtime.fitting.crop_logits`
  (the temperature, threshold and abstention fits). Wrapping that call once
  makes all of them run the views the card declares (``card.crop.tta``), so the
  numbers training validated are the numbers ``diagnose`` gives.
- The averaged quantity is the **logit**: the card's temperature and the
  activation are applied afterwards (:func:`~edgedx.runtime.preprocess.to_probabilities`),
  and the fitting code recomputes probabilities from crop logits for many
  temperatures. With logits averaged first, a fit on validation and a diagnosis
  compute exactly the same thing.
- Each view is one engine call with the batch as it came (same batch size, same
  shape), so fixed-batch engines and padded GPU batches see the shape they were
  built for; views are never concatenated into a larger batch.

The views act on the model input as the card's ``input_format`` gives it, on its
(height, width) axes: ``hflip`` mirrors the width axis (left ↔ right), ``vflip``
the height axis, ``rot180`` both, ``rot90``/``rot270`` are ``np.rot90`` with
k = 1 / k = 3 on (H, W) (quarter turns need a square input). Flipping after the
card's per-pixel normalisation equals normalising the flipped crop (per-channel
statistics do not depend on pixel order), so float32 NCHW and uint8 NHWC
engines of one model agree. The engine's own self-test stays raw (one call, no
views): its vectors judge the engine, not the averaging.

Numpy only: the runtime never imports torch or onnx.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgedx.card import TTA_VIEWS, ModelCard
from edgedx.errors import CardError

Run = Callable[[np.ndarray], np.ndarray]

# (height axis, width axis) of the model input per layout
_AXES = {"float32_nchw": (2, 3), "uint8_nhwc": (1, 2)}


def view(x: np.ndarray, name: str, input_format: str) -> np.ndarray:
    """One test-time view of a model-input batch ``x``, C-contiguous (engines copy or refuse strided arrays)."""
    h, w = _AXES[input_format]
    if name == "hflip":
        out = np.flip(x, axis=w)
    elif name == "vflip":
        out = np.flip(x, axis=h)
    elif name == "rot180":
        out = np.flip(x, axis=(h, w))
    elif name == "rot90":
        out = np.rot90(x, k=1, axes=(h, w))
    elif name == "rot270":
        out = np.rot90(x, k=3, axes=(h, w))
    else:
        raise CardError(f"unknown test-time view {name!r}; use any of {list(TTA_VIEWS)}")
    return np.ascontiguousarray(out)


def tta_views(card: ModelCard) -> tuple[str, ...]:
    """The card's views, checked against its input: a quarter turn of a non-square input changes the engine's shape."""
    views = tuple(card.crop.tta)
    if card.input_format not in _AXES:
        raise CardError(f"test-time views need a known input layout, not {card.input_format!r}")
    height, width = card.input_size
    quarter = [v for v in views if v in ("rot90", "rot270")]
    if quarter and height != width:
        raise CardError(
            f"model card field 'crop.tta' view {quarter[0]!r} turns the {height}×{width} model input on its side; "
            "quarter turns need a square input: drop it or use hflip, vflip, rot180"
        )
    return views


def tta_run(run: Run, card: ModelCard) -> Run:
    """``run`` (model input → logits) with the card's test-time views: the mean of the logits over the crop itself
    and each view, in that order, one engine call per view at the batch size given.

    With no views (``card.crop.tta == ()``, the default) ``run`` itself comes back: no cost, no copy. The mean is
    taken in float64 (one rounding, whatever the engine's precision), so training's fits and ``diagnose`` agree.
    """
    views = tta_views(card)
    if not views:
        return run
    layout = card.input_format

    def averaged(x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x)
        total = np.asarray(run(x), np.float64).copy()
        for name in views:
            out = np.asarray(run(view(x, name, layout)), np.float64)
            if out.shape != total.shape:
                raise CardError(f"test-time view {name!r} gave outputs of shape {out.shape}, the crop itself {total.shape}")
            total += out
        return total / (1 + len(views))

    averaged.__doc__ = f"the engine averaged over the crop and its test-time views {', '.join(views)}"
    return averaged
