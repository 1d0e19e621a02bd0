"""Transfer strategies: what to train, and at which learning rate.

- ``full``: every layer trains; pretrained layers at ``lr * backbone_lr_factor``,
  the new head at ``lr`` (pretrained features need smaller steps than a random head).
- ``frozen``: a feature extractor: the backbone is frozen (and its batch norm
  kept in eval mode so its statistics stay ImageNet's), only the head trains.
- ``last:N``: the last N backbone stages (timm's coarse layer groups) and the
  head train; earlier stages are frozen.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from edgedx.errors import InputError


@dataclass(frozen=True)
class Strategy:
    kind: str  # full | frozen | last
    n_last: int = 0

    def __str__(self) -> str:
        return f"last:{self.n_last}" if self.kind == "last" else self.kind


def parse_strategy(text: str) -> Strategy:
    """``full``, ``frozen`` or ``last:N``."""
    if text in ("full", "frozen"):
        return Strategy(text)
    match = re.fullmatch(r"last:(\d+)", text)
    if match and int(match.group(1)) >= 1:
        return Strategy("last", int(match.group(1)))
    raise InputError(f"unknown strategy {text!r}; use full, frozen, or last:N (e.g. last:2) to fine-tune the last N stages")


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names of the classifier's parameters (timm's ``get_classifier``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        raise InputError(f"{type(model).__name__} has no classifier head that EdgeDx can find")
    ids = {id(p) for p in head.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def backbone_stages(model: nn.Module) -> list[list[str]]:
    """Backbone parameter names grouped by stage, input side first (timm's coarse group matcher)."""
    from timm.models import group_parameters

    head = head_parameter_names(model)
    groups = group_parameters(model, model.group_matcher(coarse=True))
    stages = [[n for n in groups[k] if n not in head] for k in sorted(groups)]
    return [s for s in stages if s]


def apply_strategy(model: nn.Module, strategy: Strategy) -> set[str]:
    """Freeze what the strategy says; returns the names of the parameters that still train."""
    head = head_parameter_names(model)
    if strategy.kind == "full":
        trainable = {n for n, _ in model.named_parameters()}
    elif strategy.kind == "frozen":
        trainable = set(head)
    else:
        stages = backbone_stages(model)
        if strategy.n_last > len(stages):
            raise InputError(f"strategy last:{strategy.n_last} asks for more stages than {len(stages)} in this architecture")
        trainable = head | {n for stage in stages[-strategy.n_last :] for n in stage}
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return trainable


def freeze_batchnorm_of_frozen(model: nn.Module, trainable: set[str]) -> None:
    """Keep BN layers whose parameters are frozen in eval mode (call after ``model.train()``)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = [f"{name}.{p}" for p, _ in module.named_parameters(recurse=False)]
            if params and not any(p in trainable for p in params):
                module.eval()


def parameter_groups(model: nn.Module, lr: float, backbone_lr_factor: float) -> list[dict]:
    """Head at ``lr``, trainable backbone at ``lr * backbone_lr_factor``; frozen parameters left out."""
    head = head_parameter_names(model)
    head_params = [p for n, p in model.named_parameters() if n in head and p.requires_grad]
    body_params = [p for n, p in model.named_parameters() if n not in head and p.requires_grad]
    groups = [{"params": head_params, "lr": lr, "name": "head"}]
    if body_params:
        groups.append({"params": body_params, "lr": lr * backbone_lr_factor, "name": "backbone"})
    return groups
