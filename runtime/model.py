"""A deployable model: inference session + card-driven preprocessing + sliding crops.

This is the object a microscope or scanner application embeds::

    from edgedx.runtime import load_model
    model = load_model("model.onnx")
    result = model.diagnose("field.jpg")   # or an (H, W, 3) uint8 RGB array
    print(result.label, result.probabilities)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.card import ModelCard
from edgedx.runtime.image_io import read_image, to_rgb_uint8
from edgedx.runtime.onnx_backend import OnnxSession
from edgedx.runtime.trt_backend import TensorRTSession
from edgedx.runtime.preprocess import model_input, to_probabilities
from edgedx.runtime.tiling import SlidingResult, sliding_window_predict


Session = OnnxSession | TensorRTSession  # anything with .card and .run(x) -> logits


@dataclass(frozen=True)
class Diagnosis:
    """The result for one image: decision, probabilities and the tiles behind them."""

    label: str | list[str]
    probabilities: dict[str, float]
    n_crops: int
    sliding: SlidingResult

    def to_record(self) -> dict[str, Any]:
        return {"label": self.label, "probabilities": self.probabilities, "n_crops": self.n_crops}


def decide(probabilities: np.ndarray, card: ModelCard) -> str | list[str]:
    """The label at the card's operating threshold.

    binary: the positive class when its probability reaches the threshold
    (0.5 when the card has none); multiclass: the most probable class;
    multilabel: every class at or above the threshold.
    """
    threshold = 0.5 if card.threshold is None else card.threshold
    names = card.class_names
    if card.task == "binary":
        pos = card.positive_index
        assert pos is not None  # the card guarantees a positive class for binary tasks
        return names[pos] if probabilities[pos] >= threshold else names[1 - pos]
    if card.task == "multilabel":
        return [n for n, p in zip(names, probabilities) if p >= threshold]
    return names[int(np.argmax(probabilities))]


class Model:
    """Thread-safe: it holds no per-call state and ONNX Runtime's ``run`` is thread-safe."""

    def __init__(self, session: Session, *, batch_size: int = 32) -> None:
        self.session = session
        self.card = session.card
        self.batch_size = batch_size

    def predict_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 RGB crops → (N, C) probabilities."""
        logits = self.session.run(model_input(tiles, self.card))
        return to_probabilities(logits, self.card)

    def diagnose(self, image: np.ndarray | str | Path) -> Diagnosis:
        """Diagnose one whole image (path or RGB array) with the card's sliding crops."""
        rgb = read_image(image) if isinstance(image, (str, Path)) else to_rgb_uint8(np.asarray(image))
        sliding = sliding_window_predict(rgb, self.predict_tiles, self.card.crop, batch_size=self.batch_size)
        probs = sliding.probabilities
        return Diagnosis(
            label=decide(probs, self.card),
            probabilities={n: round(float(p), 6) for n, p in zip(self.card.class_names, probs)},
            n_crops=sliding.n_tiles,
            sliding=sliding,
        )


ENGINE_SUFFIXES = (".engine", ".plan")


def load_model(path: str | Path, *, device: str = "cpu", threads: int | None = None, batch_size: int = 32) -> Model:
    """Load an exported model, ready to diagnose.

    ``.onnx`` and ``.ort`` files run on ONNX Runtime with the card from their
    metadata; ``.engine``/``.plan`` files are TensorRT engines with the card in
    the sidecar JSON beside them (``device`` must then be tensorrt, cuda or auto).
    """
    if Path(path).suffix.lower() in ENGINE_SUFFIXES:
        return Model(TensorRTSession(path, device=device), batch_size=batch_size)
    return Model(OnnxSession(path, device=device, threads=threads), batch_size=batch_size)
