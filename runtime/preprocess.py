"""Turn RGB uint8 crops into model inputs exactly as the card says.

Training uses this same function, so the model sees identical numbers in
training and in deployment (no train/serve skew). Nothing here is a constant:
colour order, input size, interpolation, scaling and normalisation all come from
the card.
"""

from __future__ import annotations

import cv2
import numpy as np

from edgedx.card import ModelCard

_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "area": cv2.INTER_AREA,
    "cubic": cv2.INTER_CUBIC,
}


def resize_to(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    """Resize an (H, W, C) image; no-op when the size already matches."""
    if image.shape[0] == height and image.shape[1] == width:
        return image
    mode = _INTERPOLATION[interpolation]
    if interpolation == "area" and (height > image.shape[0] or width > image.shape[1]):
        mode = cv2.INTER_LINEAR  # area is for shrinking; it degenerates to nearest when enlarging
    return cv2.resize(image, (width, height), interpolation=mode)


def fit_crops(crops: np.ndarray, card: ModelCard) -> np.ndarray:
    """(N, H, W, 3) RGB uint8 → the card's input size and colour order, still uint8."""
    if crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB crops, got shape {crops.shape}")
    height, width = card.input_size
    if crops.shape[1:3] != (height, width):
        crops = np.stack([resize_to(c, height, width, card.interpolation) for c in crops])
    return _colour_order(crops, card)


def _colour_order(pixels: np.ndarray, card: ModelCard) -> np.ndarray:
    """RGB pixels (last axis) in the card's colour order (a view)."""
    return pixels[..., ::-1] if card.colour_order == "BGR" else pixels


def pixelwise(card: ModelCard, tile_size: tuple[int, int]) -> bool:
    """Whether a crop's model input depends on each of its pixels alone (float input, ``mean_std``, no resize).

    Then a whole field can be preprocessed once and its crops cut from the
    result (:func:`preprocess_field`): overlapping crops (stride half the tile)
    no longer normalise every pixel four times, and the numbers are bit-identical.
    """
    return card.input_format == "float32_nchw" and card.normalization.kind == "mean_std" and tuple(tile_size) == tuple(card.input_size)


def preprocess_field(image: np.ndarray, card: ModelCard) -> np.ndarray:
    """(H, W, 3) uint8 RGB image → (3, H, W) float32, every pixel as :func:`preprocess_batch` treats it in a crop.

    Only for cards where :func:`pixelwise` holds; a crop ``[:, y:y+h, x:x+w]``
    of the result equals ``preprocess_batch`` of the same crop, bit for bit.
    """
    if not (card.input_format == "float32_nchw" and card.normalization.kind == "mean_std"):
        raise ValueError(f"a field can be preprocessed once only for float32_nchw mean_std cards, not {card.input_format} {card.normalization.kind}")
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    return _mean_std(_colour_order(image, card), card)


def _mean_std(pixels: np.ndarray, card: ModelCard) -> np.ndarray:
    """(..., H, W, C) uint8 → (..., C, H, W) float32 ``x * (scale / std) - mean / std``, straight into channels-first.

    One channel plane at a time: a strided copy that converts to float32
    exactly, then an in-place multiply and add on contiguous memory. That is
    2x faster than one broadcast multiply over the transposed pixels (and 10x
    faster than step by step) with the very same float32 operations, so a crop
    batch and a whole field give the same numbers bit for bit.
    """
    norm = card.normalization
    channels = pixels.shape[-1]
    std = np.asarray(norm.std, np.float32)
    gain = np.broadcast_to(np.float32(norm.pixel_scale) / std, (channels,))
    shift = np.broadcast_to(-np.asarray(norm.mean, np.float32) / std, (channels,))
    out = np.empty((*pixels.shape[:-3], channels, *pixels.shape[-3:-1]), np.float32)
    for c in range(channels):
        plane = out[..., c, :, :]
        plane[...] = pixels[..., c]
        plane *= gain[c]
        plane += shift[c]
    return out


def preprocess_batch(crops: np.ndarray, card: ModelCard) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB crops → (N, 3, h, w) float32 model input per the card.

    Crops whose size differs from ``card.input_size`` are resized first with the
    card's interpolation.
    """
    crops = fit_crops(crops, card)
    norm = card.normalization
    if norm.kind == "mean_std":
        return _mean_std(crops, card)
    x = crops.astype(np.float32) * np.float32(norm.pixel_scale)
    if norm.kind == "per_image":
        # float64 statistics so a flat crop gives exactly 0, not amplified rounding
        # noise; the std floor 1/sqrt(pixels) is TensorFlow's per_image_standardization.
        mean = x.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
        std = x.std(axis=(1, 2), keepdims=True, dtype=np.float64)
        floor = 1.0 / np.sqrt(x.shape[1] * x.shape[2])
        x = ((x - mean) / np.maximum(std, floor)).astype(np.float32)
    else:
        x = (x - np.asarray(norm.mean, np.float32)) / np.asarray(norm.std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)


def model_input(crops: np.ndarray, card: ModelCard) -> np.ndarray:
    """What the graph takes, per the card's ``input_format``.

    ``float32_nchw``: the full preprocessing above. ``uint8_nhwc``: the graph takes
    RGB pixels and does colour order, scaling and normalisation itself (for apps
    with no preprocessing code); we only resize.
    """
    if card.input_format == "float32_nchw":
        return preprocess_batch(crops, card)
    if crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) RGB crops, got shape {crops.shape}")
    height, width = card.input_size
    if crops.shape[1:3] != (height, width):
        crops = np.stack([resize_to(c, height, width, card.interpolation) for c in crops])
    return np.ascontiguousarray(crops, dtype=np.uint8)


def to_probabilities(outputs: np.ndarray, card: ModelCard, *, calibrated: bool = True) -> np.ndarray:
    """Model outputs (logits) → (N, n_classes) probabilities per the card's activation.

    A binary model with a single output logit yields [1 - p, p] in class order
    with ``p`` the probability of the positive class. With the card's
    temperature (``card.calibration``) the logits are divided by it first: the
    graph stays on raw logits (parity compares those), and every probability
    EdgeDx shows is calibrated; ``calibrated=False`` gives the network's own
    (for fitting the temperature, and "before" figures).
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 1:
        outputs = outputs[:, None]
    if calibrated and card.calibration.method == "temperature":
        outputs = outputs / np.asarray(card.calibration.temperature, dtype=np.float64)
    n = card.n_classes
    if card.output_activation == "sigmoid":
        p = 0.5 * (1.0 + np.tanh(0.5 * outputs))  # the logistic function, without overflow
        if card.task == "binary" and p.shape[1] == 1:
            pos = 1 if card.positive_index is None else card.positive_index
            probs = np.empty((p.shape[0], 2))
            probs[:, pos] = p[:, 0]
            probs[:, 1 - pos] = 1.0 - p[:, 0]
            return probs
    else:
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        e = np.exp(shifted)
        p = e / e.sum(axis=1, keepdims=True)
    if p.shape[1] != n:
        raise ValueError(f"model gives {p.shape[1]} outputs but the card names {n} classes")
    return p
