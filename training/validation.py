"""Score a PyTorch model through the runtime's own diagnosis path.

Why: the numbers a user is shown (validation metrics every epoch, the card's
operating threshold and metrics, export parity) must describe what ``diagnose``
does. :class:`TorchSession` puts a PyTorch model behind the runtime's session
interface (``card`` and ``run``), so the runtime's :class:`~edgedx.runtime.model.Model`
splits, preprocesses, batches and merges exactly as it does for an exported
artefact; only the engine differs.
"""

from __future__ import annotations

from pathlib import Path

from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edgedx.card import ModelCard
from edgedx.errors import EdgeDxError, InputError
from edgedx.runtime.fitting import CropLogits, crop_logits
from edgedx.runtime.model import Model

_EPS = 1e-12


class TorchSession:
    """A PyTorch model as a runtime :class:`~edgedx.runtime.backends.session.Session`: ``run`` takes the card's model input
    and returns float32 logits. In memory, so no file or sha256; fp32, the reference every artefact is judged by."""

    path: Path | None = None
    sha256: str | None = None
    precision = "fp32"
    pads_batches = False  # the reference sees the batches as they come; a padded GPU batch is the engines' concern
    selftest: str | None = None  # the reference is what self-tests compare with

    def __init__(self, model: nn.Module, card: ModelCard, device: torch.device | str = "cpu") -> None:
        self.model = model
        self.card = card
        self.torch_device = torch.device(device)
        self.device = self.torch_device.type
        self.providers = (f"PyTorch {torch.__version__} on {self.torch_device}",)

    @torch.inference_mode()
    def run(self, x: np.ndarray) -> np.ndarray:
        self.model.eval()
        return self.model(torch.from_numpy(np.ascontiguousarray(x)).to(self.torch_device)).float().cpu().numpy()

    def close(self) -> None:
        """The module belongs to the caller (training goes on with it); nothing to release."""


def diagnose_probabilities(
    model: nn.Module, card: ModelCard, images: Iterable[tuple[Hashable, Any]], *, batch_size: int, device: torch.device | str = "cpu"
) -> tuple[list[Hashable], np.ndarray, list[tuple[Hashable, EdgeDxError]]]:
    """Merged class probabilities per image, through the runtime's diagnosis path with ``model`` as the engine.

    ``images`` yields ``(key, image)`` with anything ``Model.stream`` takes (a
    path, an RGB array, a :class:`~edgedx.runtime.tiling.ResampledImage`).
    Returns the keys that were diagnosed, their (n, C) probabilities, and the
    inputs that could not be read with their errors.
    """
    runtime = Model(TorchSession(model, card, device), batch_size=batch_size)
    keys: list[Hashable] = []
    rows: list[np.ndarray] = []
    failed: list[tuple[Hashable, EdgeDxError]] = []
    for key, result in runtime.stream(images, prefetch=0):
        if isinstance(result, EdgeDxError):
            failed.append((key, result))
            continue
        keys.append(key)
        rows.append(result.sliding.probabilities)
    probs = np.stack(rows) if rows else np.zeros((0, card.n_classes))
    return keys, probs, failed


def predict_resampled(
    model: nn.Module, card: ModelCard, images: Sequence[Any], idx: np.ndarray, *, batch_size: int, device: torch.device | str
) -> np.ndarray:
    """(len(idx), C) merged probabilities of training images (kept resampled, so nothing can fail to read)."""
    _, probs, failed = diagnose_probabilities(model, card, ((k, images[int(i)]) for k, i in enumerate(idx)), batch_size=batch_size, device=device)
    _refuse(failed, len(idx))
    return probs


def resampled_crop_logits(
    model: nn.Module, card: ModelCard, images: Sequence[Any], idx: np.ndarray, *, batch_size: int, device: torch.device | str
) -> CropLogits:
    """Each training image's crop logits, split as ``diagnose`` splits it, with ``model`` as the engine.

    Why logits and not probabilities: the temperature and the abstention rules
    are fitted by recomputing the merged probabilities for many temperatures;
    the model runs once and :func:`edgedx.runtime.fitting.merged_probabilities`
    does the rest, with the runtime's own merge.
    """
    session = TorchSession(model, card, device)
    crops = crop_logits(session.run, card, ((k, images[int(i)]) for k, i in enumerate(idx)), batch_size=batch_size)
    _refuse(list(crops.failed), len(idx))
    return crops


def _refuse(failed: list[tuple[Hashable, EdgeDxError]], n: int) -> None:
    """Training has no --min-content: say what to change here, not at diagnose time."""
    if failed:
        raise InputError(
            f"validation images would be refused when diagnosed ({failed[0][1]}); {len(failed)} of {n} are. "
            "Train with a smaller --input-size or another --crop, or remove images far smaller than the input"
        )


def as_logits(probs: np.ndarray, activation: str) -> torch.Tensor:
    """Logits whose activation gives ``probs`` back, so the training loss scores merged probabilities.

    softmax(log p) = p when p sums to 1, and logit(p) inverts the sigmoid: the
    task loss on these equals the cross-entropy of the merged probabilities (for
    one crop per image, the loss on the model's own logits).
    """
    p = np.clip(np.asarray(probs, np.float64), _EPS, 1.0 - _EPS)
    z = np.log(p) if activation == "softmax" else np.log(p) - np.log1p(-p)
    return torch.from_numpy(z.astype(np.float32))
