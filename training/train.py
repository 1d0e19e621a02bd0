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

import json  # noqa: E402 - after the check that names the extra to install
import logging  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from edgedx.card import ModelCard  # noqa: E402
from edgedx.errors import InputError  # noqa: E402
from edgedx.progress import ProgressFn, no_progress  # noqa: E402
from edgedx.training import distributed  # noqa: E402
from edgedx.training.build import build_card, build_model, build_optimizer, prepare_training, resolve_device  # noqa: E402
from edgedx.training.calibration import fit_card, held_out, trust_lines  # noqa: E402
from edgedx.training.checkpoint import load_checkpoint, load_snapshot, save_checkpoint  # noqa: E402
from edgedx.training.ensemble import ENSEMBLE_NAME, ensemble_card, save_ensemble, write_ensemble_split  # noqa: E402
from edgedx.training.hard_negatives import class_indices, field_paths, run_rounds  # noqa: E402
from edgedx.training.mining_store import mining_started  # noqa: E402
from edgedx.training.oof import choose_epoch, fold_spread, out_of_fold_report, pool_predictions, summary_lines  # noqa: E402
from edgedx.training.config import TrainConfig  # noqa: E402
from edgedx.training.data import build_data, load_data, pick_positive_class  # noqa: E402
from edgedx.training.loop import Fitting, epoch_line, fit, seed_dropout  # noqa: E402
from edgedx.training.models import check_arch  # noqa: E402
from edgedx.training.report import Final, run_summary, write_gradcam, write_plots  # noqa: E402
from edgedx.training.resume import RunState, start_or_resume  # noqa: E402
from edgedx.training.run import CHECKPOINT_NAME, LAST_NAME, METRICS_NAME, SPLIT_NAME, RunFolder, check_run_folder  # noqa: E402
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
    f = _prepare(ctx, data, run, config, fold=fold, progress=progress)
    state = start_or_resume(run.last, f.model, f.optim, config, main=ctx.is_main)
    seed_dropout(config.seed, ctx.rank, state.epoch)
    if config.hard_negatives is not None:
        field_paths(config.hard_negatives)  # refused before the first epoch, not after the last
        class_indices(f.card)
    if not (config.resume and config.hard_negatives is not None and mining_started(run)):  # resumed inside the rounds: they go on
        state = fit(f, state)
    trained, record = f, None
    if config.hard_negatives is not None:  # mining rounds grow only the training split (edgedx.training.hard_negatives)
        trained, state, record = run_rounds(f, state)
    final = _choose_threshold(f, state)  # ``f``: calibration and quality limits see the data exactly as without mining
    if record is not None:
        final = _with_hard_negatives(final, record)
    result = _write_run(trained, state, final) if ctx.is_main else None  # the other ranks wait for rank 0's result below
    return ctx.broadcast(result)


def _with_hard_negatives(final: Final, record: dict[str, Any]) -> Final:
    """The mining record in metrics.json (every crop's provenance) and in the card's provenance (the counts only)."""
    compact = {**record, "rounds": [{k: v for k, v in r.items() if k != "crops"} for r in record["rounds"]]}
    provenance = replace(final.card.provenance, training={**final.card.provenance.training, "hard_negatives": compact})
    return replace(final, card=final.card.replace(provenance=provenance), report={**final.report, "hard_negatives": record})


def _prepare(
    ctx: distributed.Context, data: str | Path, run: RunFolder, config: TrainConfig, *, fold: tuple[int, int] | None, progress: ProgressFn
) -> Fitting:
    """Data, network, card and optimiser for a run: everything the epochs and the final fit need."""
    source = load_data(data, config)
    if ctx.is_main:
        run.create()
    net = build_model(config, len(source.data.class_names))
    prepared = build_data(source.data, config, net.size, fold=fold, run=run, main=ctx.is_main, progress=progress)
    setup = prepare_training(ctx, net, prepared, config)
    card = build_card(config, net, prepared, setup, positive=source.positive, world=ctx.world)
    optim = build_optimizer(setup.model, config, setup, len(prepared.train_idx), ctx.device)
    stepper = distributed.wrap(setup.model, ctx)  # DDP averages gradients; ``setup.model`` stays the plain module that is saved
    return Fitting(ctx, stepper, setup, optim, prepared, card, config, run, progress)


def finalise_at(data: str | Path, out: str | Path, config: TrainConfig, *, fold: tuple[int, int], epoch: int) -> TrainResult:
    """Fold ``fold`` again from its snapshot of ``epoch`` (chosen on every fold's curve): temperature, threshold,
    abstention, quality limits and every file of the run, as if that epoch had been its best."""
    run = RunFolder(out)
    metrics = json.loads((run.path / METRICS_NAME).read_text(encoding="utf-8"))
    history = metrics["history"]
    with distributed.session(resolve_device(config.device)) as ctx:
        f = _prepare(ctx, data, run, config, fold=fold, progress=no_progress)
        weights = load_snapshot(run.snapshot(epoch))
        state = RunState(epoch=len(history), best_epoch=epoch, best_state=weights, history=history)
        final = _choose_threshold(f, state)  # validation only: the mined training crops play no part in it
        if metrics.get("hard_negatives") is not None:  # the fold's mining happened; its record stays with the weights
            final = _with_hard_negatives(final, metrics["hard_negatives"])
        result = _write_run(f, state, final) if ctx.is_main else None
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
    return Final(card, operating, fitted.val_probs, warnings, report, fitted.val_uncalibrated, fitted.val_idx)


def _write_run(f: Fitting, state: RunState, final: Final) -> TrainResult:
    """Rank 0: the final checkpoint, metrics.json, card.json, plots, Grad-CAM and summary.json."""
    run, config = f.run, f.config
    save_checkpoint(run.checkpoint, final.card, state.best_state, epoch=state.best_epoch)
    val_idx = f.data.val_idx if final.val_idx is None else final.val_idx  # the images the card was fitted on
    run.write_predictions(val_idx, f.data.targets[val_idx], final.val_probs, final.val_probs if final.val_uncalibrated is None else final.val_uncalibrated)
    run.write_metrics(final.report)
    run.write_card(final.card)
    summary = run_summary(f, final)
    if "hard_negatives" in final.report:
        summary["hard_negatives"] = final.card.provenance.training["hard_negatives"]
    if config.plots:
        write_plots(run.plots, state.history, f.data.targets[val_idx], final, config.monitor)
    if config.gradcam_samples:
        summary["gradcam"] = [str(p) for p in write_gradcam(run.gradcam, f.model, f.data, final.card, config.gradcam_samples)]
    run.write_summary(summary)
    skipped = tuple(f.data.decoded.skipped)
    return TrainResult(run.checkpoint, final.card, state.best_epoch, final.operating["metrics"], state.history, skipped, summary)


def cross_validate(
    data: str | Path, out: str | Path, config: TrainConfig, *, folds: int, progress: ProgressFn = no_progress
) -> CrossValidationResult:
    """Patient-level k-fold cross-validation with every choice made out of fold (see :mod:`edgedx.training.oof`).

    One run per fold in ``out/fold_<i>``; the source's own val/test split (or
    ``--test-fraction``) is held out of every fold. With epoch selection
    ``out_of_fold`` (the default here) every fold runs every epoch, the epoch is
    the best of the folds' mean validation curve, and each fold is finalised at
    it. The pooled out-of-fold predictions give the threshold (with its
    interval) and the card of ``out/ensemble.pt``, the K fold models averaged
    into one network (:mod:`edgedx.training.ensemble`). ``out/cv_summary.json``
    holds the fold spread, the out-of-fold figures (labelled as selection) and
    the held-out figures (the result). Every rank of a ``torchrun`` job returns the same result.
    """
    if folds < 2:
        raise InputError(f"--folds must be at least 2, got {folds}")
    selection = "out_of_fold" if config.epoch_selection == "auto" else config.epoch_selection
    config = replace(config, epoch_selection=selection)
    config.validate()
    folder = RunFolder(out)
    with distributed.session(resolve_device(config.device)) as ctx:  # one process group for every fold
        progress = progress if ctx.is_main else no_progress
        results = []
        for i in range(folds):
            results.append(train_run(data, folder.fold(i).path, config, fold=(i, folds), progress=progress))
            progress("folds", i + 1, folds)
        chosen: dict[str, Any] = {"method": "per_run", "epochs": [r.best_epoch for r in results]}
        if selection == "out_of_fold":
            results, chosen = _refit_at_chosen_epoch(data, folder, config, results)
        summary = _cv_summary(results, folds, config.seed)
        summary["epoch_selection"] = chosen
        if ctx.is_main:
            summary.update(_out_of_fold(folder, results, config))
            folder.write_cv_summary(summary)
            for line in summary_lines(summary):
                log.info("%s", line)
    return CrossValidationResult(tuple(results), summary)


def _refit_at_chosen_epoch(
    data: str | Path, folder: RunFolder, config: TrainConfig, results: list[TrainResult]
) -> tuple[list[TrainResult], dict[str, Any]]:
    """The epoch with the best mean validation curve over folds; each fold finalised at it, then its snapshots removed."""
    epoch, curve = choose_epoch([r.history for r in results], config.monitor)
    k = len(results)
    refit = [
        r if r.best_epoch == epoch else finalise_at(data, folder.fold(i).path, config, fold=(i, k), epoch=epoch)
        for i, r in enumerate(results)
    ]
    if distributed.is_main():
        for i in range(k):
            shutil.rmtree(folder.fold(i).snapshot(epoch).parent, ignore_errors=True)
    own = [r.best_epoch for r in results]
    log.info("epoch %d chosen on the %d folds' mean validation %s (each fold's own best: %s)", epoch, k, config.monitor, own)
    return refit, {"method": "out_of_fold", "monitor": config.monitor, "chosen": epoch, "mean_curve": curve, "each_fold_best": own}


def _out_of_fold(folder: RunFolder, results: list[TrainResult], config: TrainConfig) -> dict[str, Any]:
    """Rank 0: pooled out-of-fold figures, the held-out spread, and ``ensemble.pt`` with the out-of-fold card."""
    pooled = pool_predictions([folder.fold(i) for i in range(len(results))])
    report, card, warnings = out_of_fold_report(pooled, results[0].card, config.target_sensitivity, seed=config.seed)
    for warning in warnings:
        log.warning("%s", warning)
    held = [json.loads((folder.fold(i).path / METRICS_NAME).read_text(encoding="utf-8")).get("test") for i in range(len(results))]
    section: dict[str, Any] = {"out_of_fold": report, "warnings": warnings}
    if all(h is not None for h in held):
        section["held_out_spread"] = fold_spread(held)  # type: ignore[arg-type]
        section["held_out_n"] = held[0].get("n")  # type: ignore[union-attr]
    members = [load_checkpoint(r.checkpoint) for r in results]
    fitted_on = {"folds": len(results), "members": [str(r.checkpoint) for r in results], "temperatures": [list(m.card.calibration.temperature) for m in members]}
    ensemble = ensemble_card([m.card for m in members], fitted_on=fitted_on)
    ensemble = ensemble.replace(threshold=card.threshold, threshold_choice=card.threshold_choice, abstention=card.abstention, metrics=card.metrics)
    write_ensemble_split(folder.path / SPLIT_NAME, [folder.fold(i).split_file for i in range(len(results))])  # export verifies on it
    section["ensemble"] = str(save_ensemble(folder.path / ENSEMBLE_NAME, ensemble, members))
    folder.write_card(ensemble)  # the folder then reads like a run's: evaluate finds the data source of its split
    return section


def _cv_summary(results: list[TrainResult], folds: int, seed: int) -> dict[str, Any]:
    """Each fold's card metrics, and the mean ± sd (over the folds that have it) of each of :data:`CV_METRICS`."""
    summary: dict[str, Any] = {"folds": folds, "seed": seed, "per_fold": [r.card.metrics for r in results]}
    for key in CV_METRICS:
        values = [r.card.metrics.get(key) for r in results]
        finite = [float(v) for v in values if v is not None]
        summary[key] = {"mean": float(np.mean(finite)), "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0} if finite else None
    return summary
