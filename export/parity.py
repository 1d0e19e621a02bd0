"""Verify an exported artefact against the PyTorch model it came from.

Like Polygraphy's comparator: run both on the same images through the
runtime's diagnosis path (:func:`diagnose_outputs`: the same reading, crops,
preprocessing, batching and merging as ``diagnose``; only the engine differs)
and return the evidence (max absolute and relative difference of the logits, top-1 agreement,
agreement of the decision at the card's threshold, max and mean probability
delta), plus a pass/fail against per-precision tolerances. fp32 must match the
logits of every crop tightly; fp16 and int8 cannot, so they are judged by how
often the per-image decisions agree and how far the merged probabilities move.
On a labelled set the report adds the accuracy and AUC of the reference and of
the variant, per image, as ``evaluate`` would compute them.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgedx.card import ModelCard
from edgedx.runtime.metrics import classification_metrics
from edgedx.errors import EdgeDxError
from edgedx.runtime.model import Model, decide
from edgedx.runtime.preprocess import model_input, preprocess_batch, to_probabilities
from edgedx.runtime.backends.session import Session
from edgedx.runtime.selftest import SELFTEST_TOLERANCES


@dataclass(frozen=True)
class Tolerance:
    """What a precision must achieve; ``atol``/``rtol`` (on logits) are None when not judged."""

    atol: float | None
    rtol: float | None
    min_agreement: float  # top-1 and decision agreement
    max_prob_delta: float  # largest change of any class probability on any sample
    max_mean_prob_delta: float  # the change averaged over samples and classes
    max_accuracy_drop: float  # on a labelled set, when one is given

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# fp16 and int8 are judged by agreement and probability change, not by logits.
# int8 moves a few borderline probabilities a lot by nature (a sample near the
# decision boundary), so its largest single change is not judged, only the mean.
_SELF = SELFTEST_TOLERANCES  # the probability and agreement gates are the ones artefacts prove on their targets
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-4, rtol=1e-3, min_agreement=_SELF["fp32"].min_agreement, max_prob_delta=_SELF["fp32"].max_prob_delta,
                      max_mean_prob_delta=1e-4, max_accuracy_drop=0.0),
    "fp16": Tolerance(atol=None, rtol=None, min_agreement=_SELF["fp16"].min_agreement, max_prob_delta=_SELF["fp16"].max_prob_delta,
                      max_mean_prob_delta=0.005, max_accuracy_drop=0.01),
    "int8": Tolerance(atol=None, rtol=None, min_agreement=_SELF["int8"].min_agreement, max_prob_delta=_SELF["int8"].max_prob_delta,
                      max_mean_prob_delta=0.05, max_accuracy_drop=0.03),
}


@dataclass(frozen=True)
class ParityReport:
    precision: str
    n_samples: int  # images
    n_real: int
    max_abs_diff: float
    max_rel_diff: float
    top1_agreement: float
    decision_agreement: float
    max_prob_delta: float
    mean_prob_delta: float
    tolerance: Tolerance
    failures: tuple[str, ...]
    labelled: dict[str, Any] | None = None
    n_crops: int | None = None  # crops whose logits were compared (None: one per image)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["failures"] = list(self.failures)
        data["passed"] = self.passed
        return data

    def summary(self) -> str:
        """One line for the console."""
        text = (
            f"max abs diff {self.max_abs_diff:.2e}, top-1 agreement {self.top1_agreement:.3f}, "
            f"max prob delta {self.max_prob_delta:.3f}"
        )
        if self.labelled:
            text += f", accuracy {self.labelled['accuracy']:.3f} (Δ {self.labelled['accuracy_delta']:+.3f})"
        return text


def parity_crops(card: ModelCard, n: int, *, seed: int = 0, images: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB crops: the given real ones, then random images up to ``n``.

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
    return np.concatenate(parts)


def parity_inputs(card: ModelCard, n: int, seed: int = 0, images: np.ndarray | None = None) -> np.ndarray:
    """:func:`parity_crops`, preprocessed for a float32 NCHW model."""
    return preprocess_batch(parity_crops(card, n, seed=seed, images=images), card)


@torch.inference_mode()
def torch_logits(model: nn.Module, crops: np.ndarray, card: ModelCard, *, batch_size: int = 64) -> np.ndarray:
    """The reference: the PyTorch model (eval mode, CPU) on the runtime's preprocessing of ``crops``."""
    model = model.eval()
    out = [model(torch.from_numpy(preprocess_batch(crops[i : i + batch_size], card))).float().numpy() for i in range(0, len(crops), batch_size)]
    return np.concatenate(out)


def artefact_logits(run: Callable[[np.ndarray], np.ndarray], crops: np.ndarray, card: ModelCard, *, batch_size: int = 64) -> np.ndarray:
    """An artefact's logits through the runtime's input path for its card (float32 NCHW or uint8 NHWC)."""
    out = [np.asarray(run(model_input(crops[i : i + batch_size], card)), np.float32) for i in range(0, len(crops), batch_size)]
    return np.concatenate(out)


@dataclass(frozen=True)
class PathOutputs:
    """What the diagnosis path produced for a set of images with one engine."""

    keys: list[Hashable]  # the images diagnosed, in order
    crop_logits: np.ndarray  # (n_crops, C): every crop the engine saw, in the order it saw them
    probabilities: np.ndarray  # (n_images, C): merged per image, as a diagnose record has them
    failed: list[tuple[Hashable, str]]  # images that could not be read


class _RecordingSession:
    """A session that keeps the logits of every batch it runs (the crops' own evidence); otherwise the inner one."""

    def __init__(self, inner: Session) -> None:
        self.inner = inner
        self.card = inner.card
        self.path, self.sha256, self.device = inner.path, inner.sha256, inner.device
        self.providers, self.precision = inner.providers, inner.precision
        self.pads_batches = inner.pads_batches  # so Model pads GPU batches exactly as it would
        self.selftest = inner.selftest
        self.logits: list[np.ndarray] = []

    def close(self) -> None:
        self.inner.close()

    def run(self, x: np.ndarray) -> np.ndarray:
        out = np.asarray(self.inner.run(x), np.float32)
        self.logits.append(out)
        return out


def diagnose_outputs(session: Session, items: Iterable[tuple[Hashable, Any]], *, batch_size: int = 32) -> PathOutputs:
    """Diagnose ``items`` with ``session`` as the engine, through the runtime's :class:`Model` (``diagnose``'s path).

    Any :class:`~edgedx.runtime.backends.session.Session` is an engine: an ONNX
    Runtime or TensorRT session, or the PyTorch reference
    (:class:`edgedx.training.validation.TorchSession`). Crop logits are recorded
    as the engine returns them; a padded last GPU batch is trimmed off.
    """
    recorder = _RecordingSession(session)
    model = Model(recorder, batch_size=batch_size)
    keys, rows, failed, n_crops = [], [], [], 0
    for key, result in model.stream(items, prefetch=0):
        if isinstance(result, EdgeDxError):
            failed.append((key, str(result)))
            continue
        keys.append(key)
        rows.append(result.sliding.probabilities)
        n_crops += result.n_crops
    n_classes = session.card.n_classes
    logits = np.concatenate(recorder.logits)[:n_crops] if recorder.logits else np.zeros((0, n_classes), np.float32)
    probs = np.stack(rows) if rows else np.zeros((0, n_classes))
    return PathOutputs(keys, logits.reshape(len(logits), -1), probs, failed)


def compare_outputs(
    reference: PathOutputs, candidate: PathOutputs, card: ModelCard, precision: str, *, n_real: int = 0, labels: np.ndarray | None = None
) -> ParityReport:
    """Judge an artefact's diagnosis-path outputs against the reference's: crop logits, then per-image results.

    ``labels`` (class indices) belong to the first ``len(labels)`` images of ``reference.keys``.
    """
    if reference.keys != candidate.keys:
        raise ValueError(f"the artefact diagnosed {len(candidate.keys)} images, the reference {len(reference.keys)}: they must see the same images")
    return _judge(
        reference.crop_logits, candidate.crop_logits, reference.probabilities, candidate.probabilities, card, precision,
        n_real=n_real, labels=labels, n_crops=len(reference.crop_logits),
    )


def compare_logits(
    reference: np.ndarray,
    candidate: np.ndarray,
    card: ModelCard,
    precision: str,
    *,
    n_real: int = 0,
    labels: np.ndarray | None = None,
) -> ParityReport:
    """The comparison on one crop per image (pure numpy, so it is testable on its own).

    ``labels`` (class indices, for the first ``len(labels)`` samples) adds the
    accuracy and AUC of both models and their difference.
    """
    ref, got = np.asarray(reference, np.float64), np.asarray(candidate, np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"reference logits {ref.shape} and candidate logits {got.shape} differ in shape")
    return _judge(ref, got, to_probabilities(ref, card), to_probabilities(got, card), card, precision, n_real=n_real, labels=labels)


def _judge(
    ref_logits: np.ndarray, got_logits: np.ndarray, p_ref: np.ndarray, p_got: np.ndarray, card: ModelCard, precision: str,
    *, n_real: int, labels: np.ndarray | None, n_crops: int | None = None,
) -> ParityReport:
    """Logits per crop against the precision's atol/rtol; agreement and probability change per image."""
    tol = TOLERANCES[precision]
    ref = np.asarray(ref_logits, np.float64)
    got = np.asarray(got_logits, np.float64)
    if ref.shape != got.shape:
        raise ValueError(f"reference logits {ref.shape} and candidate logits {got.shape} differ in shape")
    diff = np.abs(ref - got)
    rel = diff / np.maximum(np.abs(ref), 1e-6)
    prob_delta = np.abs(p_ref - p_got)
    top1 = float(np.mean(np.argmax(p_ref, axis=1) == np.argmax(p_got, axis=1)))
    decisions = float(np.mean([decide(a, card) == decide(b, card) for a, b in zip(p_ref, p_got)]))
    labelled = None if labels is None or len(labels) == 0 else _labelled(p_ref[: len(labels)], p_got[: len(labels)], labels, card)

    failures = []
    if tol.atol is not None and tol.rtol is not None and not np.all(diff <= tol.atol + tol.rtol * np.abs(ref)):
        failures.append(f"logits differ by up to {diff.max():.3g} (tolerance {tol.atol:g} + {tol.rtol:g}·|x|)")
    if top1 < tol.min_agreement:
        failures.append(f"top-1 agreement {top1:.3f} < {tol.min_agreement:g}")
    if decisions < tol.min_agreement:
        failures.append(f"decision agreement at the operating threshold {decisions:.3f} < {tol.min_agreement:g}")
    if prob_delta.max() > tol.max_prob_delta:
        failures.append(f"a probability moved by {prob_delta.max():.3g} (tolerance {tol.max_prob_delta:g})")
    if prob_delta.mean() > tol.max_mean_prob_delta:
        failures.append(f"probabilities moved by {prob_delta.mean():.3g} on average (tolerance {tol.max_mean_prob_delta:g})")
    # on a small labelled set one image is already a few percent: a single changed image is tolerated
    allowed_drop = max(tol.max_accuracy_drop, 1.0 / labelled["n"]) if labelled and tol.max_accuracy_drop > 0 else tol.max_accuracy_drop
    if labelled is not None and labelled["accuracy_delta"] < -allowed_drop - 1e-12:
        failures.append(
            f"accuracy fell from {labelled['reference_accuracy']:.3f} to {labelled['accuracy']:.3f} "
            f"on {labelled['n']} labelled images (tolerance {allowed_drop:.3g})"
        )
    return ParityReport(
        precision=precision,
        n_samples=int(p_ref.shape[0]),
        n_real=int(n_real),
        max_abs_diff=float(diff.max()) if diff.size else 0.0,
        max_rel_diff=float(rel.max()) if rel.size else 0.0,
        top1_agreement=top1,
        decision_agreement=decisions,
        max_prob_delta=float(prob_delta.max()),
        mean_prob_delta=float(prob_delta.mean()),
        tolerance=tol,
        failures=tuple(failures),
        labelled=labelled,
        n_crops=n_crops,
    )


def _labelled(p_ref: np.ndarray, p_got: np.ndarray, labels: np.ndarray, card: ModelCard) -> dict[str, Any]:
    """Accuracy at the card's operating point and AUC, reference vs variant."""

    def metrics(p: np.ndarray) -> tuple[float, float | None]:
        pred = np.asarray([card.class_names.index(decide(row, card)) for row in p])  # type: ignore[arg-type]
        m = classification_metrics(labels, p, card.class_names, y_pred=pred, positive_index=card.positive_index or 1)
        auc = None if not np.isfinite(m.macro_auc) else float(m.macro_auc)
        return float(m.accuracy), auc

    if card.task == "multilabel":
        raise ValueError("labelled verification supports single-label tasks")
    acc_ref, auc_ref = metrics(p_ref)
    acc, auc = metrics(p_got)
    return {
        "n": int(len(labels)),
        "reference_accuracy": acc_ref,
        "accuracy": acc,
        "accuracy_delta": acc - acc_ref,
        "reference_auc": auc_ref,
        "auc": auc,
        "auc_delta": None if auc is None or auc_ref is None else auc - auc_ref,
    }
