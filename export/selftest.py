"""Self-test vectors made at export: real crops and the fp32 PyTorch model's probabilities for them.

Why here: only export has both the reference model and the run's labelled
images. The runtime side (:mod:`edgedx.runtime.selftest`) replays them on the
target; the tolerances are the precision's parity tolerances
(:data:`edgedx.export.parity.TOLERANCES`), so an artefact is held to the same
test on its target as at export.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from edgedx.card import ModelCard
from edgedx.errors import ImageReadError
from edgedx.export.onnx_export import embed_metadata
from edgedx.runtime.io.image_io import read_image, to_rgb_uint8
from edgedx.runtime.preprocess import model_input, to_probabilities
from edgedx.runtime.selftest import SELFTEST_KEY, SELFTEST_TOLERANCES, SelfTestVectors, Tolerances
from edgedx.runtime.tiling import split_tiles
from edgedx.training.validation import TorchSession

log = logging.getLogger(__name__)

N_VECTORS = 8  # about 0.3-1.5 MB inside the artefact at 192-224 px: enough to catch a target that rounds differently
# int8 files carry more: whether a target's int8 kernels conform is judged on the mean deviation from the file's
# exact arithmetic, which 8 vectors estimate too loosely (see SELFTEST_TOLERANCES["int8"])
N_INT8_VECTORS = 32


def selftest_vectors(
    model: torch.nn.Module, card: ModelCard, images: Sequence[Any], precision: str, *, source: str, n: int = N_VECTORS, seed: int = 0
) -> SelfTestVectors:
    """Up to ``n`` crops cut by the card's policy, spread over ``images`` (paths or arrays), with the fp32 reference."""
    rng = np.random.default_rng(seed)
    per_image = max(1, -(-n // max(1, len(images))))
    crops: list[np.ndarray] = []
    for item in images:
        try:
            image = read_image(item) if isinstance(item, (str, Path)) else to_rgb_uint8(np.asarray(item))
        except ImageReadError as exc:
            log.info("self-test vectors: skipping %s", exc)
            continue
        tiles, _ = split_tiles(image, card.crop)
        crops.extend(tiles[rng.permutation(len(tiles))[:per_image]])
        if len(crops) >= n:
            break
    stacked = np.stack(crops[:n]).astype(np.uint8)
    reference = to_probabilities(TorchSession(model, card).run(model_input(stacked, card)), card).astype(np.float32)
    return SelfTestVectors(stacked, reference, precision, tolerances_for(precision), source)


def tolerances_for(precision: str) -> Tolerances:
    return SELFTEST_TOLERANCES[precision]


def for_precision(vectors: SelfTestVectors, precision: str) -> SelfTestVectors:
    """The same crops and reference, held to another precision's tolerances (the first N_VECTORS of them, except
    for int8, which keeps up to N_INT8_VECTORS)."""
    n = N_INT8_VECTORS if precision == "int8" else N_VECTORS
    return SelfTestVectors(vectors.crops[:n], vectors.reference[:n], precision, tolerances_for(precision), vectors.source)


def embed_selftest(path: Path, vectors: SelfTestVectors) -> None:
    """Store the vectors in an ONNX file's metadata (``edgedx.selftest``); ORT files converted from it keep them."""
    graph = onnx.load(str(path))
    embed_metadata(graph, {SELFTEST_KEY: vectors.to_text()})
    onnx.save(graph, str(path))
