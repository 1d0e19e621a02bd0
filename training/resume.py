"""Where a run stands after each epoch, and ``last.pt``: exactly what continuing needs, nothing more.

Epoch orders, training crops and augmentations derive from ``(seed, epoch)``,
so no numpy state is saved; the torch generator (dropout) is. A resumed run
therefore repeats the uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgedx.errors import InputError
from edgedx.training.build import Optimisation
from edgedx.training.config import TrainConfig
from edgedx.training.run import jsonable

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """The epoch loop's state: the last finished epoch, the best so far (with a copy of its weights), the history."""

    epoch: int = 0
    best_epoch: int = 0
    best_score: float | None = None
    since_best: int = 0
    stopped_early: bool = False
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def save_last(path: Path, model: nn.Module, optim: Optimisation, state: RunState) -> None:
    """Everything needed to continue exactly where this epoch ended (atomic write)."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optim.optimizer.state_dict(),
        "scheduler": optim.scheduler.state_dict(),
        "scaler": optim.scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "state": {k: v for k, v in asdict(state).items() if k not in ("best_state", "history")},
        "history": json.dumps(jsonable(state.history)),
        "best_state": state.best_state,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def planned_epochs(config: TrainConfig) -> int:
    """Every epoch the run means to train: ``epochs``, plus each hard-negative round's epochs."""
    return config.epochs + (config.hard_negative_rounds * config.hard_negative_epochs if config.hard_negatives is not None else 0)


def resume_optimisation(path: Path, optim: Optimisation) -> None:
    """``last.pt``'s optimiser, schedule and gradient scaler into ``optim`` (a mining round's own optimisation,
    built after the model's weights were restored)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    optim.optimizer.load_state_dict(payload["optimizer"])
    optim.scheduler.load_state_dict(payload["scheduler"])
    optim.scaler.load_state_dict(payload["scaler"])


def restore(path: Path, model: nn.Module, optim: Optimisation, config: TrainConfig) -> RunState:
    """Load ``last.pt`` into the model and optimisation; refuse a run that already did every planned epoch."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    optim.optimizer.load_state_dict(payload["optimizer"])
    optim.scheduler.load_state_dict(payload["scheduler"])
    optim.scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["torch_rng"])
    state = RunState(**payload["state"], best_state=payload["best_state"], history=json.loads(payload["history"]))
    planned = planned_epochs(config)
    if state.epoch >= planned:
        rounds = f" ({config.epochs} and {config.hard_negative_rounds} mining rounds)" if planned > config.epochs else ""
        raise InputError(f"the run already finished {state.epoch} of {planned} epochs{rounds}; raise --epochs to train further")
    return state


def start_or_resume(last: Path, model: nn.Module, optim: Optimisation, config: TrainConfig, *, main: bool) -> RunState:
    """A fresh state, or (``--resume``) the one in ``last``, with the cosine schedule stretched to ``config.epochs``."""
    if not config.resume:
        return RunState()
    if not last.is_file():
        raise InputError(f"nothing to resume: {last} does not exist; run without --resume to start")
    state = restore(last, model, optim, config)
    if config.schedule == "cosine":
        optim.scheduler.T_max = config.epochs * optim.steps_per_epoch  # a resumed run may have been given more epochs
    if main:
        log.info("resumed after epoch %d", state.epoch)
    return state
