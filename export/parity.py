"""Verify an exported model against the PyTorch model it came from.

Like Polygraphy's comparator: run both on the same inputs and return the
evidence (max absolute and relative difference of the logits, top-1 agreement,
max probability delta), plus a pass/fail against per-precision tolerances.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgedx.card import ModelCard
from edgedx.runtime.onnx_backend import OnnxSession
from edgedx.runtime.preprocess import preprocess_batch, to_probabilities

TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-3}}


@dataclass(frozen=True)
class ParityReport:
    precision: str
    n_samples: int
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float
    max_prob_delta: float
    atol: float
    rtol: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parity_inputs(card: ModelCard, n: int, seed: int = 0, images: np.ndarray | None = None) -> np.ndarray:
    """Preprocessed inputs: the given crops (uint8 NHWC) if any, then random images.

    Random images are smooth blobs plus noise rather than pure noise, so logits
    spread out the way they do on real images.
    """
    rng = np.random.default_rng(seed)
    h, w = card.input_size
    parts = [] if images is None else [images]
    k = max(0, n - (0 if images is None else len(images)))
    if k:
        base = rng.integers(0, 256, size=(k, 1, 1, 3)).astype(np.float32)
        yy, xx = np.mgrid[0:h, 0:w]
        blob = np.exp(-(((yy - rng.uniform(0, h, (k, 1, 1))) ** 2 + (xx - rng.uniform(0, w, (k, 1, 1))) ** 2) / (0.1 * h * w)))
        noisy = base * (0.5 + 0.5 * blob[..., None]) + rng.normal(0, 12, size=(k, h, w, 3))
        parts.append(np.clip(noisy, 0, 255).astype(np.uint8))
    return preprocess_batch(np.concatenate(parts), card)


def compare_logits(reference: np.ndarray, candidate: np.ndarray, card: ModelCard, precision: str) -> ParityReport:
    """The comparison itself (pure numpy, so it is testable on its own)."""
    tol = TOLERANCES[precision]
    ref = reference.astype(np.float64)
    got = candidate.astype(np.float64)
    diff = np.abs(ref - got)
    rel = diff / np.maximum(np.abs(ref), 1e-6)
    p_ref = to_probabilities(ref, card)
    p_got = to_probabilities(got, card)
    agree = float(np.mean(np.argmax(ref, axis=1) == np.argmax(got, axis=1)))
    passed = bool(np.all(diff <= tol["atol"] + tol["rtol"] * np.abs(ref)))
    return ParityReport(
        precision=precision,
        n_samples=int(ref.shape[0]),
        max_abs_diff=float(diff.max()),
        max_rel_diff=float(rel.max()),
        top1_agreement=agree,
        max_prob_delta=float(np.abs(p_ref - p_got).max()),
        atol=tol["atol"],
        rtol=tol["rtol"],
        passed=passed,
    )


@torch.inference_mode()
def verify_onnx(model: nn.Module, onnx_path: str | Path, card: ModelCard, *, n_samples: int = 16, images: np.ndarray | None = None, precision: str = "fp32") -> ParityReport:
    """Run the PyTorch model and the exported file (through the EdgeDx runtime) on the same inputs."""
    x = parity_inputs(card, n_samples, images=images)
    reference = model.eval()(torch.from_numpy(x)).numpy()
    session = OnnxSession(onnx_path, device="cpu")
    candidate = session.run(x)
    return compare_logits(reference, candidate, card, precision)
