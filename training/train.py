"""Fine-tune a timm CNN on labelled medical images; write a checkpoint with its card.

The recipe practitioners use for small, imbalanced sets: ImageNet weights,
a transfer strategy (frozen features, last stages, or full fine-tune with a
lower learning rate for pretrained layers), class-weighted loss or a balanced
sampler, modality-aware augmentation, patient-level splits, early stopping on a
validation metric and an operating threshold chosen on validation data for a
target sensitivity.

Images go through :func:`edgedx.runtime.preprocess.preprocess_batch` with the
same card the deployed model carries, so training and deployment see identical
inputs. Training crops are drawn by the card's crop policy
(:mod:`edgedx.training.crops`), and validation, the operating threshold and the
card's metrics come from the runtime's own diagnosis path: sliding crops merged
per image (:mod:`edgedx.training.validation`).

A run is a list of steps, each in its own module, in the order of torchvision's
reference scripts::

    data      load the source, plan crops, decode, split        edgedx.training.data
    build     network, transfer set-up and losses, card, optimiser  edgedx.training.build
    resume    a fresh state or last.pt                          edgedx.training.resume
    epochs    train_one_epoch, evaluate, early stopping         edgedx.training.loop
    calibrate temperature, threshold, abstention, quality limits  edgedx.training.calibration, .threshold
    write     model.pt, metrics.json, card.json, summary.json   edgedx.training.run, .report

:func:`train` is the one entry point: one run, cross-validation or the
data-parallel launcher.
"""

from __future__ import annotations

from edgedx.deps import require

require(("torch", "timm"), extra="train", purpose="Training")

import logging  # noqa: E402 - after the check that names the extra to install
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from edgedx.card import ModelCard  # noqa: E402
from edgedx.errors import InputError  # noqa: E402
from edgedx.progress import ProgressFn, no_progress  # noqa: E402
from edgedx.training import distributed  # noqa: E402
from edgedx.training.build import build_card, build_model, build_optimizer, prepare_training, resolve_device  # noqa: E402
from edgedx.training.calibration import fit_card, held_out, trust_lines  # noqa: E402
from edgedx.training.checkpoint import save_checkpoint  # noqa: E402
from edgedx.training.config import TrainConfig  # noqa: E402
from edgedx.training.data import build_data, load_data, pick_positive_class  # noqa: E402
from edgedx.training.loop import Fitting, epoch_line, fit, seed_dropout  # noqa: E402
from edgedx.training.models import check_arch  # noqa: E402
from edgedx.training.report import Final, run_summary, write_gradcam, write_plots  # noqa: E402
from edgedx.training.resume import RunState, start_or_resume  # noqa: E402
from edgedx.training.run import CHECKPOINT_NAME, LAST_NAME, RunFolder, check_run_folder  # noqa: E402
from edgedx.training.threshold import margin_threshold, operating_point, quality_warnings, score  # noqa: E402

__all__ = [
    "CHECKPOINT_NAME", "LAST_NAME", "CV_METRICS", "CrossValidationResult", "TrainConfig", "TrainResult", "check_run_folder",
    "cross_validate", "epoch_line", "margin_threshold", "operating_point", "pick_positive_class", "quality_warnings",
    "resolve_device", "score", "train", "train_run",
]

log = logging.getLogger(__name__)

CV_METRICS = ("accuracy", "balanced_accuracy", "macro_auc", "sensitivity", "specificity")


@dataclass(frozen=True)
class TrainResult:
    """One finished run: its checkpoint and final card, the best epoch's validation metrics, every epoch, what was skipped."""

    checkpoint: Path
    card: ModelCard
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    skipped: tuple[str, ...]
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CrossValidationResult:
    """Every fold's run and ``cv_summary.json``'s contents (each metric's mean ± sd over the folds)."""

    folds: tuple[TrainResult, ...]
    summary: dict[str, Any]


def train(
    data: str | Path,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    *,
    nproc: int = 1,
    folds: int | None = None,
    fold: tuple[int, int] | None = None,
    progress: ProgressFn = no_progress,
) -> TrainResult | CrossValidationResult | None:
    """Train on ``data`` (ImageFolder, CSV manifest or MedMNIST ``.npz``) into the run folder ``out``: the one entry point.

    One run (:func:`train_run`) or ``folds``-fold cross-validation
    (:func:`cross_validate`), in this process or, with ``nproc`` > 1, on
    ``nproc`` data-parallel processes started here
    (:func:`distributed.launch_train`; ``progress`` then stays silent and the
    processes log their epoch lines). ``fold=(i, k)`` trains fold ``i`` of a
    k-fold split alone.

    Returns the result in the process that reports it: rank 0 under
    ``torchrun``, or this process when it launched the others. Every other rank
    gets None, so a caller reports ``if result is not None``.
    """
    if fold is not None and (folds is not None or nproc != 1):
        raise InputError("fold=(i, k) trains one fold in this process; give it without folds and nproc")
    result: TrainResult | CrossValidationResult
    if nproc != 1:
        result = distributed.launch_train(data, out, config, nproc=nproc, folds=folds)
    elif folds is not None:
        result = cross_validate(data, out, config, folds=folds, progress=progress)
    else:
        result = train_run(data, out, config, fold=fold, progress=progress)
    return result if distributed.is_main() else None


def train_run(
    data: str | Path, out: str | Path, config: TrainConfig = TrainConfig(), *, fold: tuple[int, int] | None = None,
    progress: ProgressFn = no_progress,
) -> TrainResult:
    """One run in this process, or in each process of a ``torchrun`` job; every rank returns rank 0's result.

    Writes ``model.pt`` (best epoch, card inside), ``last.pt`` (for ``resume``),
    ``split.json``, ``metrics.json``, ``card.json``, ``summary.json`` and, unless
    disabled, plots and Grad-CAM overlays (see :mod:`edgedx.training.run`).
    Under ``torchrun`` (see :mod:`edgedx.training.distributed`) training is
    data-parallel, ``config.batch_size`` is the global batch and only rank 0
    writes files.
    """
    config.validate()
    check_arch(config.arch)
    run = RunFolder(out)
    run.check_free(config)
    with distributed.session(resolve_device(config.device)) as ctx:
        distributed.check_batch(config.batch_size, ctx.world)
        return _train(ctx, data, run, config, fold=fold, progress=progress if ctx.is_main else no_progress)


def _train(
    ctx: distributed.Context, data: str | Path, run: RunFolder, config: TrainConfig, *, fold: tuple[int, int] | None, progress: ProgressFn
) -> TrainResult:
    """The steps of a run, in order; every rank takes each of them, only rank 0 writes."""
    source = load_data(data, config)
    if ctx.is_main:
        run.create()
    net = build_model(config, len(source.data.class_names))
    prepared = build_data(source.data, config, net.size, fold=fold, run=run, main=ctx.is_main, progress=progress)
    setup = prepare_training(ctx, net, prepared, config)
    card = build_card(config, net, prepared, setup, positive=source.positive, world=ctx.world)
    optim = build_optimizer(setup.model, config, setup, len(prepared.train_idx), ctx.device)
    state = start_or_resume(run.last, setup.model, optim, config, main=ctx.is_main)
    seed_dropout(config.seed, ctx.rank, state.epoch)
    stepper = distributed.wrap(setup.model, ctx)  # DDP averages gradients; ``setup.model`` stays the plain module that is saved
    f = Fitting(ctx, stepper, setup, optim, prepared, card, config, run, progress)
    state = fit(f, state)
    final = _choose_threshold(f, state)
    result = _write_run(f, state, final) if ctx.is_main else None  # the other ranks wait for rank 0's result below
    return ctx.broadcast(result)


def _choose_threshold(f: Fitting, state: RunState) -> Final:
    """The best epoch's weights on validation: temperature, operating threshold on the calibrated probabilities,
    abstention rules and quality limits (:mod:`edgedx.training.calibration`); then the test split."""
    f.model.load_state_dict(state.best_state)
    fitted = fit_card(f, state.best_epoch)
    card, operating = fitted.card, fitted.operating
    warnings = quality_warnings(operating, card) + list(fitted.warnings)
    report: dict[str, Any] = {
        "best_epoch": state.best_epoch, "stopped_early": state.stopped_early, "val": operating["metrics"], **fitted.fitted, "history": state.history,
    }
    test = held_out(f, card)
    if test is not None:
        report["test"] = test
    for line in trust_lines(fitted.fitted, test) if f.ctx.is_main else ():
        log.info("%s", line)
    for warning in warnings if f.ctx.is_main else ():
        log.warning("%s", warning)
    return Final(card, operating, fitted.val_probs, warnings, report, fitted.val_uncalibrated)


def _write_run(f: Fitting, state: RunState, final: Final) -> TrainResult:
    """Rank 0: the final checkpoint, metrics.json, card.json, plots, Grad-CAM and summary.json."""
    run, config = f.run, f.config
    save_checkpoint(run.checkpoint, final.card, state.best_state, epoch=state.best_epoch)
    run.write_metrics(final.report)
    run.write_card(final.card)
    summary = run_summary(f, final)
    if config.plots:
        write_plots(run.plots, state.history, f.data.targets[f.data.val_idx], final, config.monitor)
    if config.gradcam_samples:
        summary["gradcam"] = [str(p) for p in write_gradcam(run.gradcam, f.model, f.data, final.card, config.gradcam_samples)]
    run.write_summary(summary)
    skipped = tuple(f.data.decoded.skipped)
    return TrainResult(run.checkpoint, final.card, state.best_epoch, final.operating["metrics"], state.history, skipped, summary)


def cross_validate(
    data: str | Path, out: str | Path, config: TrainConfig, *, folds: int, progress: ProgressFn = no_progress
) -> CrossValidationResult:
    """Patient-level k-fold cross-validation: one run per fold in ``out/fold_<i>``, mean ± sd in ``out/cv_summary.json``.

    Every rank of a ``torchrun`` job returns the same result (see :func:`train` for the entry point).
    """
    if folds < 2:
        raise InputError(f"--folds must be at least 2, got {folds}")
    folder = RunFolder(out)
    results = []
    config.validate()
    with distributed.session(resolve_device(config.device)) as ctx:  # one process group for every fold
        progress = progress if ctx.is_main else no_progress
        for i in range(folds):
            results.append(train_run(data, folder.fold(i).path, config, fold=(i, folds), progress=progress))
            progress("folds", i + 1, folds)
        summary = _cv_summary(results, folds, config.seed)
        if ctx.is_main:
            folder.write_cv_summary(summary)
    return CrossValidationResult(tuple(results), summary)


def _cv_summary(results: list[TrainResult], folds: int, seed: int) -> dict[str, Any]:
    """Each fold's card metrics, and the mean ± sd (over the folds that have it) of each of :data:`CV_METRICS`."""
    summary: dict[str, Any] = {"folds": folds, "seed": seed, "per_fold": [r.card.metrics for r in results]}
    for key in CV_METRICS:
        values = [r.card.metrics.get(key) for r in results]
        finite = [float(v) for v in values if v is not None]
        summary[key] = {"mean": float(np.mean(finite)), "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0} if finite else None
    return summary
