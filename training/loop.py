"""The epochs: one epoch of training, evaluation as ``diagnose`` runs, and the loop that keeps the best weights.

Data-parallel runs (see :mod:`edgedx.training.distributed`) take every
``world``-th place of each epoch's order, so they see the single process's
global batches; losses are scaled so DDP's gradient average is that batch's
gradient, and validation is shared out and gathered so every rank scores, stops
and saves alike. The best epoch is kept as a copy of the weights, never an
alias of the live model; ``last.pt`` is written after every epoch (rank 0).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgedx.card import ModelCard
from edgedx.progress import STEP_LOGGER, ProgressFn
from edgedx.runtime.outputs.plots import where_taken
from edgedx.runtime.preprocess import preprocess_batch
from edgedx.runtime.tiling import random_tile
from edgedx.training import distributed
from edgedx.training.augment import augment
from edgedx.training.build import Optimisation, Trainable
from edgedx.training.checkpoint import save_checkpoint, save_snapshot
from edgedx.training.config import TrainConfig
from edgedx.training.crops import DecodedImages
from edgedx.training.data import RunData
from edgedx.training.losses import balanced_order
from edgedx.training.oof import metric_key
from edgedx.training.resume import RunState, save_last
from edgedx.training.run import RunFolder
from edgedx.training.strategy import freeze_batchnorm_of_frozen
from edgedx.training.threshold import headline, score
from edgedx.training.validation import as_logits, predict_resampled

log = logging.getLogger(__name__)
steps_log = logging.getLogger(STEP_LOGGER)


@dataclass(frozen=True)
class Fitting:
    """Everything the epochs touch, built once before the first (see :mod:`edgedx.training.build`)."""

    ctx: distributed.Context
    stepper: nn.Module  # runs training steps: DDP around ``setup.model`` when distributed, else the model itself
    setup: Trainable
    optim: Optimisation
    data: RunData
    card: ModelCard  # the card during training: threshold 0.5, no metrics yet
    config: TrainConfig
    run: RunFolder
    progress: ProgressFn

    @property
    def model(self) -> nn.Module:
        """The plain module: evaluated and saved (never the DDP wrapper)."""
        return self.setup.model

    @property
    def total_steps(self) -> int:
        return self.config.epochs * self.optim.steps_per_epoch


def fit(f: Fitting, state: RunState) -> RunState:
    """Epochs from where ``state`` stands up to ``config.epochs``, or until ``patience`` epochs bring no improvement."""
    config, ctx = f.config, f.ctx
    for epoch in range(state.epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        train_loss = train_one_epoch(f, epoch)
        distributed.average_buffers(f.model, ctx)
        val_loss, probs = evaluate(f, f.data.val_idx)
        metrics = score(f.data.targets[f.data.val_idx], probs, f.card)
        monitored = ctx.broadcast(-val_loss if config.monitor == "loss" else _monitored(metrics, config.monitor))
        if config.schedule == "plateau":
            f.optim.scheduler.step(monitored)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_accuracy": metrics["accuracy"],
            "val_balanced_accuracy": metrics["balanced_accuracy"],
            "val_macro_auc": metrics["macro_auc"],
            "lr": f.optim.optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - started, 2),
            "val": metrics,  # the full set: per-class sensitivity, specificity, precision, F1, AUC, confusion
        }
        _record_epoch(f, state, row, monitored)
        if config.epoch_selection == "out_of_fold":
            continue  # every fold runs every epoch: the epoch is chosen afterwards on the folds' mean curve
        if config.patience is not None and state.since_best >= config.patience:
            if ctx.is_main:
                log.info("early stopping after epoch %d: no %s improvement for %d epochs", epoch, config.monitor, config.patience)
            state.stopped_early = True
            break
    return state


def _record_epoch(f: Fitting, state: RunState, row: dict[str, Any], monitored: float) -> None:
    """Report the epoch, keep its weights when it is the best so far, and save ``last.pt`` (rank 0 writes)."""
    epoch, config, main = row["epoch"], f.config, f.ctx.is_main
    state.history.append(row)
    improved = state.best_score is None or monitored > state.best_score
    basis = where_taken(f.card.task, 0.5)  # epochs are scored before a threshold is chosen
    done = epoch * f.optim.steps_per_epoch
    f.progress("train", done, f.total_steps, f"epoch {epoch}/{config.epochs} val {config.monitor.replace('_', ' ')} {monitored:.3f} ({basis})")
    if main:
        steps_log.info("%s", epoch_line(row, config, basis, improved))
    if improved:
        state.best_score, state.best_epoch, state.since_best = monitored, epoch, 0
        state.best_state = {k: v.detach().cpu().clone() for k, v in f.model.state_dict().items()}
        if main:
            card = f.card.replace(metrics={"split": "val", "epoch": epoch, **headline(row["val"])})
            save_checkpoint(f.run.checkpoint, card, state.best_state, epoch=epoch)
    else:
        state.since_best += 1
    state.epoch = epoch
    if main and config.epoch_selection == "out_of_fold":
        save_snapshot(f.run.snapshot(epoch), f.model.state_dict())
    if main:
        save_last(f.run.last, f.model, f.optim, state)


def train_one_epoch(f: Fitting, epoch: int) -> float:
    """One pass over the training split in the epoch's seeded order; the mean loss of its global batches."""
    ctx, config, optim, targets, task = f.ctx, f.config, f.optim, f.data.targets, f.card.task
    f.model.train()
    freeze_batchnorm_of_frozen(f.model, f.setup.trainable)
    train_idx = f.data.train_idx
    epoch_rng = np.random.default_rng([config.seed, epoch])  # identical on every rank, and on resume
    order = balanced_order(targets[train_idx], task, epoch_rng) if config.imbalance == "sampler" else epoch_rng.permutation(len(train_idx))
    order = train_idx[order]
    running, seen = 0.0, 0
    for b, (start, whole, idx) in enumerate(distributed.rank_batches(order, config.batch_size, ctx.rank, ctx.world)):
        if len(idx) < 2 and len(order) > 1:  # batch norm cannot train on a single sample (equal on every rank)
            continue
        positions = start + ctx.rank + ctx.world * np.arange(len(idx))  # place in the global batch order
        batch = np.stack([training_crop(f.data.decoded, i, f.card, config, epoch, p) for i, p in zip(idx, positions)])
        x = torch.from_numpy(preprocess_batch(batch, f.card)).to(ctx.device)
        target = target_tensor(targets[idx], task).to(ctx.device)
        with torch.autocast(device_type=ctx.device.type, dtype=torch.float16, enabled=optim.use_amp):
            loss = f.setup.loss_fn(f.stepper(x), target)
        share = batch_share(targets[idx], targets[whole], task, f.setup.class_weights) if ctx.distributed else 1.0
        optim.optimizer.zero_grad(set_to_none=True)
        # DDP averages gradients over ranks: scaled like this, the average is the whole global batch's gradient.
        optim.scaler.scale(loss * (share * ctx.world) if ctx.distributed else loss).backward()
        optim.scaler.step(optim.optimizer)
        optim.scaler.update()
        if config.schedule == "cosine":
            optim.scheduler.step()
        running += loss.item() * share * len(whole)
        seen += len(whole)
        step = (epoch - 1) * optim.steps_per_epoch + b + 1
        f.progress("train", step, f.total_steps, f"epoch {epoch}/{config.epochs} loss {running / seen:.3f}")
    running = ctx.sum(running)  # the global batches' mean losses, whatever the number of ranks
    return running / max(seen, 1)


def evaluate(f: Fitting, idx: np.ndarray, card: ModelCard | None = None) -> tuple[float, np.ndarray]:
    """Loss and merged probabilities of the items ``idx``, diagnosed as ``diagnose`` would (sliding crops, merged).

    Under DDP the images are shared out over the ranks and the merged rows
    gathered, so every rank gets the full result. The loss is the task loss of
    the merged probabilities (:func:`as_logits`). ``card`` defaults to the
    training card.
    """
    ctx, card = f.ctx, f.card if card is None else card
    images, batch_size = f.data.decoded.images, f.config.batch_size
    if ctx.distributed:
        mine = idx[distributed.shard_positions(len(idx), ctx.rank, ctx.world)]
        probs = distributed.gather_rows(ctx, predict_resampled(f.model, card, images, mine, batch_size=batch_size, device=ctx.device), len(idx))
    else:
        probs = predict_resampled(f.model, card, images, idx, batch_size=batch_size, device=ctx.device)
    loss = float(f.setup.eval_loss(as_logits(probs, card.output_activation), target_tensor(f.data.targets[idx], card.task)))
    return loss, probs


def epoch_line(row: dict[str, Any], config: TrainConfig, basis: str, improved: bool) -> str:
    """The sentence that stays on screen (and in a log file) for one epoch."""
    auc = row.get("val_macro_auc")
    return (
        f"epoch {row['epoch']}/{config.epochs}: train loss {row['train_loss']:.3f}, val loss {row['val_loss']:.3f}; "
        f"val balanced accuracy {row['val_balanced_accuracy']:.3f} and accuracy {row['val_accuracy']:.3f} ({basis}), "
        f"AUC {'—' if auc is None else f'{auc:.3f}'}; {row['seconds']:.0f} s"
        + (f" — best {config.monitor.replace('_', ' ')} so far" if improved else "")
    )


def training_crop(decoded: DecodedImages, i: int, card: ModelCard, config: TrainConfig, epoch: int, position: int) -> np.ndarray:
    """A random crop by the card's rule (the whole image under ``fit``), then augmented; from generators seeded by
    (seed, epoch, place in the epoch's order), so the same on any number of ranks and on resume."""
    crop = random_tile(decoded.images[i], card.crop, np.random.default_rng([config.seed, epoch, int(position), 1]))
    if config.augmentation == "none":
        return crop
    return augment(crop, config.augmentation, np.random.default_rng([config.seed, epoch, int(position)]))


def batch_share(mine: np.ndarray, whole: np.ndarray, task: str, weights: np.ndarray | None) -> float:
    """This rank's share of the global batch's loss denominator (its weight sum, or its count).

    The task loss is a (weighted) mean over the rank's items; times this share it
    becomes the rank's part of the global batch's mean, as one process computes it.
    """
    if weights is None or task == "multilabel":
        return len(mine) / len(whole)
    return float(weights[mine].sum() / weights[whole].sum())


def seed_dropout(seed: int, rank: int, epoch: int) -> None:
    """Ranks other than 0 draw their own dropout masks (rank 0 keeps the single-process stream)."""
    if rank:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0]))


def target_tensor(targets: np.ndarray, task: str) -> torch.Tensor:
    return torch.from_numpy(targets.astype(np.float32)) if task == "multilabel" else torch.from_numpy(targets).long()


def _monitored(metrics: dict[str, Any], monitor: str) -> float:
    value = metrics[metric_key(monitor)]
    return float("-inf") if value is None else float(value)
