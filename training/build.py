"""What a run builds before its first epoch: the network, its transfer set-up and losses, the card, the optimiser.

The order of torchvision's reference scripts, one function each, so the run's
sequence in :mod:`edgedx.training.train` reads as a list of steps. The torch
generator is seeded right before the network is created: every rank starts
from the same weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import edgedx
from edgedx.card import ModelCard, Normalization, Provenance, now_iso
from edgedx.errors import InputError
from edgedx.training import distributed
from edgedx.training.config import TrainConfig
from edgedx.training.data import RunData
from edgedx.training.losses import TaskLoss, class_weights
from edgedx.training.models import create_model, default_input_size, default_normalization, load_weights
from edgedx.training.run import jsonable
from edgedx.training.strategy import Strategy, apply_strategy, parameter_groups, parse_strategy


def resolve_device(name: str) -> torch.device:
    """``auto`` is the GPU when torch sees one; ``cuda`` without one is refused, naming the way out."""
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@dataclass(frozen=True)
class Network:
    """A new timm network with its starting weights, and the input it expects."""

    model: nn.Module
    weights: str  # what :func:`load_weights` loaded ("none" from scratch), recorded in the card
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


def build_model(config: TrainConfig, n_classes: int) -> Network:
    """The architecture with ``n_classes`` outputs; the same initial weights on every rank (seeded here)."""
    torch.manual_seed(config.seed)
    model = create_model(config.arch, n_classes)
    weights = load_weights(model, config.arch, config.weights)
    size = (config.input_size, config.input_size) if config.input_size else default_input_size(model)
    mean, std = default_normalization(model)
    return Network(model, weights, size, mean, std)


@dataclass(frozen=True)
class Trainable:
    """The network set up for the transfer strategy, on this rank's device, with the losses that train and score it."""

    model: nn.Module  # the plain module (SyncBatchNorm on multi-GPU runs): trained, evaluated and saved
    trainable: set[str]  # names of the parameters that train; the others' batch norms stay frozen
    strategy: Strategy
    backbone_factor: float
    class_weights: np.ndarray | None
    loss_fn: nn.Module  # on the device, for training steps
    eval_loss: nn.Module  # on CPU, where validation probabilities are gathered


def prepare_training(ctx: distributed.Context, net: Network, data: RunData, config: TrainConfig) -> Trainable:
    """Freeze what the strategy says, move the network to the device, weight the loss for the class balance."""
    strategy = parse_strategy(config.strategy)
    pretrained = net.weights != "none"
    backbone_factor = config.backbone_lr_factor if config.backbone_lr_factor is not None else (0.1 if pretrained else 1.0)
    trainable = apply_strategy(net.model, strategy)
    model = distributed.prepare_model(net.model, ctx).to(ctx.device)
    task, n_classes = data.data.task, len(data.data.class_names)
    weights = class_weights(data.targets[data.train_idx], task, n_classes) if config.imbalance == "weighted" else None
    return Trainable(model, trainable, strategy, backbone_factor, weights, TaskLoss(task, weights).to(ctx.device), TaskLoss(task, weights))


def build_card(config: TrainConfig, net: Network, data: RunData, setup: Trainable, *, positive: str | None, world: int) -> ModelCard:
    """The card the checkpoint will carry: what the model expects and where it came from (threshold and metrics come later)."""
    task = data.data.task
    normalization = Normalization(kind="per_image") if config.normalization == "per_image" else Normalization(mean=net.mean, std=net.std)
    return ModelCard(
        arch=config.arch,
        task=task,
        class_names=data.data.class_names,
        positive_class=positive,
        threshold=0.5 if task != "multiclass" else None,
        input_size=net.size,
        normalization=normalization,
        output_activation="sigmoid" if task == "multilabel" else "softmax",
        crop=data.planned.policy,
        um_per_px=config.um_per_px,
        provenance=Provenance(
            edgedx_version=edgedx.__version__,
            created_at=now_iso(),
            data_summary=_data_summary(data),
            split_seed=config.seed,
            weights=net.weights,
            training={
                **jsonable(asdict(config)), "strategy": str(setup.strategy), "backbone_lr_factor": setup.backbone_factor, "world_size": world,
            },
        ),
    )


def _data_summary(data: RunData) -> dict[str, Any]:
    """The card's ``data_summary``; ``source`` is absolute so export finds the images from any directory."""
    return {
        "source": str(Path(data.data.source).resolve()),
        "n_images": len(data.data),
        "class_counts": data.data.class_counts(),
        "n_skipped": len(data.decoded.skipped),
        "splits": {k: int(len(v)) for k, v in data.splits.items()},
        "patient_ids": data.data.patient_ids is not None,
    }


@dataclass(frozen=True)
class Optimisation:
    """Optimiser, learning-rate schedule and loss scaler: what a training step updates and ``last.pt`` saves."""

    optimizer: torch.optim.Optimizer
    scheduler: Any  # CosineAnnealingLR, stepped every batch, or ReduceLROnPlateau, stepped every epoch
    scaler: torch.amp.GradScaler
    steps_per_epoch: int
    use_amp: bool  # mixed precision: on CUDA only


def build_optimizer(model: nn.Module, config: TrainConfig, setup: Trainable, n_train: int, device: torch.device) -> Optimisation:
    """AdamW or Nesterov SGD over the strategy's parameter groups, with a cosine or plateau schedule."""
    groups = parameter_groups(model, config.lr, setup.backbone_factor)
    if config.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, math.ceil(n_train / config.batch_size))
    if config.schedule == "cosine":
        scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.3, patience=2)
    use_amp = device.type == "cuda"
    return Optimisation(optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=use_amp), steps_per_epoch, use_amp)
