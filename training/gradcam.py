"""Grad-CAM (Selvaraju et al. 2017): where in an image a CNN found the class it scores.

Training writes these overlays for a sample of validation images so a reviewer
can check the model looks at the lesion or parasite, not at a scanner artefact
or a slide label. The map is ``ReLU(sum_k w_k A_k)`` with ``A`` the last feature
map before global pooling and ``w_k`` the spatial mean of the class logit's
gradient with respect to ``A_k``.

By default the feature map is the output of timm's ``forward_features`` and the
logits come from ``forward_head`` on it, so no per-architecture layer name is
needed; ``layer=`` picks any module instead (captured with a forward hook).
Gradients are taken with :func:`torch.autograd.grad` with respect to the
feature tensor only, so a call leaves parameters' ``.grad`` and
``requires_grad`` untouched and works on a fully frozen model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgedx.card import ModelCard

__all__ = ["gradcam", "overlay_cam", "save_gradcam_examples"]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval for the call, then each submodule's own previous mode back.

    Restoring per module (not ``model.train(was_training)``) keeps submodules a
    caller froze in eval mode, such as frozen batch norms, as they were.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _first(output: Any) -> torch.Tensor:
    """The main tensor of a model or block output (inception_v3 adds aux logits in a tuple)."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"expected a tensor output, got {type(output).__name__}")
    return output


def _class_indices(class_index: int | Sequence[int] | None, logits: torch.Tensor) -> torch.Tensor:
    """One class per sample: the predicted class, a shared int, or a per-sample list."""
    n, n_classes = logits.shape
    if class_index is None:
        return logits.detach().argmax(dim=1)
    if isinstance(class_index, (int, np.integer)):
        indices = [int(class_index)] * n
    else:
        indices = [int(i) for i in class_index]
        if len(indices) != n:
            raise ValueError(f"class_index has {len(indices)} entries for a batch of {n} images; give one per image")
    bad = [i for i in indices if not 0 <= i < n_classes]
    if bad:
        raise ValueError(f"class_index {bad[0]} is out of range for a model with {n_classes} outputs")
    return torch.tensor(indices, dtype=torch.long, device=logits.device)


def _features_and_logits(
    model: nn.Module, x: torch.Tensor, layer: nn.Module | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature map as a grad-requiring leaf, logits computed from it)."""
    if layer is None:
        if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
            raise TypeError(
                f"{type(model).__name__} has no timm forward_features/forward_head; pass layer= (the conv module to explain)"
            )
        with torch.no_grad():  # the backbone's graph is not needed: gradients stop at the features
            features = _first(model.forward_features(x))
        features = features.detach().requires_grad_(True)
        # a clone feeds the head so an in-place op there cannot touch the leaf
        return features, _first(model.forward_head(features.clone()))

    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer= must output a tensor, got {type(output).__name__}")
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf.clone()  # the rest of the model runs on a copy: in-place ops downstream stay legal

    handle = layer.register_forward_hook(hook)
    try:
        logits = _first(model(x))
    finally:
        handle.remove()
    if len(captured) != 1:
        raise ValueError(
            f"layer= ran {len(captured)} times in one forward pass; pick a module that runs exactly once"
            if captured
            else "layer= never ran in the model's forward pass; pass a module of this model"
        )
    return captured[0], logits


def _channels_first(features: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """(N, C, h, w); timm models with channels-last features are permuted using num_features."""
    if features.ndim != 4:
        raise ValueError(
            f"Grad-CAM needs a spatial feature map (N, C, h, w), got shape {tuple(features.shape)}; "
            "pass layer= a convolutional module"
        )
    channels = getattr(model, "num_features", None)
    if isinstance(channels, int) and features.shape[1] != channels and features.shape[-1] == channels:
        return features.permute(0, 3, 1, 2)
    return features


def gradcam(
    model: nn.Module,
    x: torch.Tensor,
    class_index: int | Sequence[int] | None = None,
    *,
    layer: nn.Module | None = None,
) -> np.ndarray:
    """(N, H, W) float32 Grad-CAM maps in [0, 1] at the input's size, one per image of ``x``.

    ``x`` is the preprocessed (N, 3, H, W) batch on the model's device.
    ``class_index``: one int for all images, one per image, or None for each
    image's predicted (arg-max) class. Each map is divided by its own maximum so
    maps are comparable as pictures, not across images; a map with no positive
    evidence stays all zeros. The model's modes, gradients and ``requires_grad``
    flags are as they were afterwards.
    """
    if x.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
    height, width = int(x.shape[-2]), int(x.shape[-1])
    with _eval_mode(model), torch.inference_mode(False), torch.enable_grad():
        if x.is_inference():
            x = x.clone()  # inference tensors cannot enter an autograd graph
        features, logits = _features_and_logits(model, x, layer)
        if logits.ndim != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(f"expected (N, classes) logits, got shape {tuple(logits.shape)}")
        indices = _class_indices(class_index, logits)
        # samples are independent in eval mode, so one backward of the sum gives every sample's gradient
        score = logits.gather(1, indices[:, None]).sum()
        (grads,) = torch.autograd.grad(score, features, allow_unused=True)
    if grads is None:  # the head does not depend on the chosen layer
        grads = torch.zeros_like(features)
    acts = _channels_first(features.detach(), model).float()
    grads = _channels_first(grads, model).float()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
    cam = torch.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0).clamp_min(0.0)
    peak = cam.amax(dim=(1, 2), keepdim=True)
    cam = torch.where(peak > 0, cam / torch.where(peak > 0, peak, torch.ones_like(peak)), torch.zeros_like(cam))
    return cam.clamp(0.0, 1.0).cpu().numpy().astype(np.float32, copy=False)


def overlay_cam(image: np.ndarray, cam: np.ndarray, *, alpha: float = 0.45) -> np.ndarray:
    """``image`` (h, w, 3) uint8 RGB with ``cam`` (any size, [0, 1]) blended in as a JET colour map (red = high)."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    if cam.ndim != 2:
        raise ValueError(f"expected a 2-D map, got shape {cam.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be within [0, 1], got {alpha}")
    h, w = image.shape[:2]
    heat = np.clip(np.nan_to_num(cam.astype(np.float32), nan=0.0), 0.0, 1.0)
    if heat.shape != (h, w):
        heat = cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR)
    coloured = cv2.applyColorMap(np.round(heat * 255.0).astype(np.uint8), cv2.COLORMAP_JET)
    coloured = cv2.cvtColor(coloured, cv2.COLOR_BGR2RGB)
    blended = image.astype(np.float32) * (1.0 - alpha) + coloured.astype(np.float32) * alpha
    return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _caption_banner(lines: Sequence[str], width: int) -> np.ndarray:
    """Black banner with white text, each line scaled down to fit the panel's width."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    line_h = max(14, min(24, width // 12))
    banner = np.zeros((line_h * len(lines) + 4, width, 3), np.uint8)
    for row, text in enumerate(lines):
        (text_w, _), _ = cv2.getTextSize(text, font, 1.0, 1)
        scale = max(0.25, min(line_h / 30.0, (width - 6) / max(text_w, 1)))
        baseline_y = line_h * (row + 1) - max(2, line_h // 5)
        cv2.putText(banner, text, (3, baseline_y), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return banner


def _predicted(probabilities: np.ndarray, card: ModelCard) -> int:
    """The class shown in the caption: the card's operating decision for binary, else arg-max."""
    if card.task == "binary":
        pos = card.positive_index
        assert pos is not None  # the card guarantees one for binary tasks
        threshold = 0.5 if card.threshold is None else card.threshold
        return pos if probabilities[pos] >= threshold else 1 - pos
    return int(np.argmax(probabilities))


def _decision_caption(probabilities: np.ndarray, pred: int, card: ModelCard) -> str:
    """Where the decision was taken, in ASCII (OpenCV's font has no ≥ or →): "p(mel) 0.48 >= 0.31 -> mel", "... (argmax)"."""
    if card.task == "binary" and card.positive_index is not None:
        pos = card.positive_index
        threshold = 0.5 if card.threshold is None else card.threshold
        p = float(probabilities[pos])
        return f"p({card.class_names[pos]}) {p:.3f} {'>=' if p >= threshold else '<'} {threshold:.3f} -> {card.class_names[pred]}"
    return f"pred {card.class_names[pred]} {probabilities[pred]:.2f} (argmax)"


DISPLAY_MIN_SIDE = 160  # small inputs (cell crops, 28-px MedMNIST) are enlarged so a person can read them


def _at_least(image: np.ndarray, side: int) -> np.ndarray:
    """Enlarge (nearest neighbour: no invented detail) so the shorter side is at least ``side``."""
    import cv2

    factor = int(np.ceil(side / min(image.shape[:2])))
    if factor <= 1:
        return image
    return cv2.resize(image, (image.shape[1] * factor, image.shape[0] * factor), interpolation=cv2.INTER_NEAREST)


def save_gradcam_examples(
    model: nn.Module,
    images: Sequence[np.ndarray],
    card: ModelCard,
    folder: Path,
    *,
    names: Sequence[str],
    labels: Sequence[str] | None = None,
    max_images: int = 8,
) -> list[Path]:
    """Write ``folder/<name>.gradcam.png`` (resized original | Grad-CAM overlay, captioned) for up to ``max_images`` images.

    Images are (h, w, 3) uint8 RGB, resized to the card's input size and
    preprocessed exactly as training and the runtime do. The map is for the
    predicted class, except on a binary card, where it is always the positive
    class: the question a clinician asks is "where is the finding?", also when
    the model says there is none. The caption gives the card's decision and its
    probability, and the true label when ``labels`` is given. ``names`` must be
    distinct plain file names (no folders) so files never overwrite each other.
    Returns the paths written, in image order.
    """
    from edgedx.runtime.io.image_io import write_image
    from edgedx.runtime.preprocess import preprocess_batch, resize_to, to_probabilities

    count = min(len(images), max(0, max_images))
    if len(names) < count or (labels is not None and len(labels) < count):
        raise ValueError(f"need a name (and label, if labels are given) for each of the {count} images")
    chosen_names = [str(n) for n in names[:count]]
    if len(set(chosen_names)) != count:
        raise ValueError(f"names must be distinct so files do not overwrite each other, got {chosen_names}")
    for name in chosen_names:
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise ValueError(f"name {name!r} must be a plain file name without folders")
    if count == 0:
        return []

    height, width = card.input_size
    resized = [resize_to(np.asarray(img), height, width, card.interpolation) for img in images[:count]]
    for img in resized:
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected (h, w, 3) uint8 RGB images, got shape {img.shape} dtype {img.dtype}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.from_numpy(preprocess_batch(np.stack(resized), card)).to(device)

    with _eval_mode(model), torch.no_grad():
        logits = _first(model(x)).float().cpu()
    probabilities = to_probabilities(logits.numpy(), card)
    predicted = [_predicted(p, card) for p in probabilities]
    if card.task == "binary":
        assert card.positive_index is not None
        targets = [card.positive_index] * count
    else:
        targets = [int(np.argmax(p)) for p in probabilities]
    cams = gradcam(model, x, targets)

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for i, (img, cam) in enumerate(zip(resized, cams)):
        pred = predicted[i]
        lines = [_decision_caption(probabilities[i], pred, card)]
        if card.task == "binary" or targets[i] != pred:
            lines[0] += f" | cam {card.class_names[targets[i]]}"
        if labels is not None:
            lines.append(f"true {labels[i]}")
        shown = _at_least(img, DISPLAY_MIN_SIDE)
        panel = np.hstack([shown, overlay_cam(shown, cam)])
        picture = np.vstack([_caption_banner(lines, panel.shape[1]), panel])
        paths.append(write_image(folder / f"{chosen_names[i]}.gradcam.png", picture))
    return paths
