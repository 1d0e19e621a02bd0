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
per image (:mod:`edgedx.training.validation`). The best epoch is kept as a copy of the weights, never an alias of the
live model; ``last.pt`` holds everything needed to resume.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import edgedx
from edgedx.card import ModelCard, Normalization, Provenance, now_iso
from edgedx.errors import InputError
from edgedx.progress import STEP_LOGGER, ProgressFn, no_progress
from edgedx.runtime.manifest import ManifestLayout
from edgedx.runtime.metrics import classification_metrics, threshold_for_sensitivity
from edgedx.runtime.plots import where_taken
from edgedx.runtime.preprocess import preprocess_batch
from edgedx.runtime.tiling import random_tile
from edgedx.training import distributed
from edgedx.training.augment import PRESETS, augment
from edgedx.training.checkpoint import save_checkpoint
from edgedx.training.crops import CropChoice, DecodedImages, decode_all, plan_crop_policy
from edgedx.training.validation import as_logits, predict_resampled
from edgedx.training.losses import IMBALANCE_MODES, TaskLoss, balanced_order, class_weights, loss_shares
from edgedx.training.models import DEFAULT_ARCH, check_arch, create_model, default_input_size, default_normalization, load_weights
from edgedx.training.sources import TrainingData, load_source
from edgedx.training.splits import check_no_leakage, kfold_indices, save_splits, split_indices
from edgedx.training.splits import summary as split_summary
from edgedx.training.strategy import apply_strategy, freeze_batchnorm_of_frozen, parameter_groups, parse_strategy

log = logging.getLogger(__name__)
steps_log = logging.getLogger(STEP_LOGGER)

NEGATIVE_NAMES = ("normal", "negative", "benign", "uninfected", "healthy", "nevus", "no_finding", "no finding", "absent")
CHECKPOINT_NAME = "model.pt"
LAST_NAME = "last.pt"
MONITORS = ("balanced_accuracy", "auc", "accuracy", "loss")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "plateau")
NORMALIZATIONS = ("imagenet", "per_image")


@dataclass(frozen=True)
class TrainConfig:
    """Every training choice; recorded in the card's provenance and in ``summary.json``."""

    arch: str = DEFAULT_ARCH
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    input_size: int | None = None
    weights: str = "imagenet"
    strategy: str = "full"
    backbone_lr_factor: float | None = None  # None: 0.1 with pretrained weights, 1.0 from scratch
    imbalance: str = "weighted"
    augmentation: str = "none"
    normalization: str = "imagenet"
    monitor: str = "balanced_accuracy"
    patience: int | None = None
    target_sensitivity: float = 0.95
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    device: str = "auto"
    positive_class: str | None = None
    task: str | None = None
    label_column: str = "label"
    label_columns: tuple[str, ...] | None = None
    path_column: str | None = None  # CSV manifests: the image column (None: path, image, file or filename)
    image_dir: str | None = None  # CSV manifests: where relative paths start (None: the manifest's folder)
    suffix: str = ""  # CSV manifests: appended to ids that lack it (ISIC's labels.csv: .jpg)
    class_names: tuple[str, ...] | None = None
    stride_fraction: float = 0.5
    crop: str = "auto"  # auto | fit | shorter_side[:N] | scale[:F]: how images become crops, in training and in diagnose
    strict: bool = False
    resume: bool = False
    overwrite: bool = False  # start again in a run folder that already holds a run
    gradcam_samples: int = 8
    plots: bool = True

    def __post_init__(self) -> None:
        if self.image_dir is not None:  # recorded in the card: export reloads the images from any directory
            object.__setattr__(self, "image_dir", str(Path(self.image_dir).absolute()))

    def validate(self) -> None:
        """Fail before any work on a setting that makes no sense, naming it."""
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose {', '.join(SCHEDULES)}"),
            (self.imbalance in IMBALANCE_MODES, f"unknown imbalance mode {self.imbalance!r}; choose {', '.join(IMBALANCE_MODES)}"),
            (self.augmentation in PRESETS, f"unknown augmentation {self.augmentation!r}; choose one of {', '.join(PRESETS)}"),
            (self.normalization in NORMALIZATIONS, f"unknown normalization {self.normalization!r}; choose {', '.join(NORMALIZATIONS)}"),
            (self.monitor in MONITORS, f"unknown monitor {self.monitor!r}; choose one of {', '.join(MONITORS)}"),
            (self.patience is None or self.patience >= 1, f"patience must be at least 1 epoch, got {self.patience}"),
            (0 < self.target_sensitivity <= 1, f"target sensitivity must be in (0, 1], got {self.target_sensitivity}"),
            (0 < self.stride_fraction <= 1, f"stride fraction must be in (0, 1], got {self.stride_fraction}"),
            (self.device in ("auto", "cpu", "cuda"), f"unknown device {self.device!r}; choose auto, cpu or cuda"),
            (self.input_size is None or self.input_size >= 8, f"input size must be at least 8 pixels, got {self.input_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        parse_strategy(self.strategy)
        CropChoice.parse(self.crop)
        if self.resume and self.overwrite:
            raise InputError("--resume continues the run in --out and --overwrite starts it again: give one of them")
        self.layout()

    def layout(self) -> ManifestLayout:
        """How a CSV manifest names images and classes (evaluate and export read the same layout)."""
        return ManifestLayout(self.path_column, self.label_column, self.image_dir, self.suffix)


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    card: ModelCard
    best_epoch: int
    best_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    skipped: tuple[str, ...]
    summary: dict[str, Any] = field(default_factory=dict)


def pick_positive_class(class_names: tuple[str, ...], requested: str | None) -> str:
    """The class a binary model screens for: as requested, else the one not named like a negative.

    Never a guess: the threshold is tuned for sensitivity to this class, so with
    folder names like ``MEL``/``NV`` a silent pick could tune a melanoma screen
    for nevi. When neither name is recognisably negative (``normal``,
    ``benign``, ``nevus``, ``uninfected``, ...), the user must say.
    """
    if requested is not None:
        if requested not in class_names:
            raise InputError(f"positive class {requested!r} is not one of the classes {list(class_names)}")
        return requested
    negatives = [n for n in class_names if n.lower().lstrip("0123456789_-") in NEGATIVE_NAMES]
    if len(negatives) == 1:
        return next(n for n in class_names if n not in negatives)
    raise InputError(
        f"which class should this model screen for? Neither of {list(class_names)} is named like a negative "
        f"({', '.join(NEGATIVE_NAMES[:6])}, ...), and the operating threshold is tuned for sensitivity to the positive "
        f"class: give --positive-class {class_names[0]} or --positive-class {class_names[1]}"
    )


def check_run_folder(out: Path, config: TrainConfig) -> None:
    """A run folder that already holds a run is continued (--resume) or replaced (--overwrite), never silently overwritten."""
    if config.resume or config.overwrite:
        return
    previous = [name for name in (CHECKPOINT_NAME, LAST_NAME) if (out / name).is_file()]
    if previous:
        raise InputError(
            f"{out} already holds a training run ({', '.join(previous)}); continue it with --resume, start it again "
            "with --overwrite, or choose another --out"
        )


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def train(
    data: str | Path,
    out: str | Path,
    config: TrainConfig = TrainConfig(),
    *,
    fold: tuple[int, int] | None = None,
    progress: ProgressFn = no_progress,
) -> TrainResult:
    """Train on ``data`` (ImageFolder, CSV manifest or MedMNIST ``.npz``) into the run directory ``out``.

    Writes ``model.pt`` (best epoch, card inside), ``last.pt`` (for ``resume``),
    ``split.json``, ``metrics.json``, ``summary.json`` and, unless disabled,
    plots and Grad-CAM overlays. ``fold=(i, k)`` trains on fold ``i`` of a
    patient-level k-fold split instead (see :func:`cross_validate`).

    Under ``torchrun`` (or ``edgedx train --nproc N``, see
    :mod:`edgedx.training.distributed`) every process calls this: training is
    data-parallel, ``config.batch_size`` is the global batch, only rank 0 writes
    files, and every rank returns rank 0's result.
    """
    config.validate()
    check_arch(config.arch)
    check_run_folder(Path(out), config)
    with distributed.session(resolve_device(config.device)) as ctx:
        distributed.check_batch(config.batch_size, ctx.world)
        return _train(ctx, data, Path(out), config, fold=fold, progress=progress if ctx.is_main else no_progress)


def _train(
    ctx: distributed.Context, data: str | Path, out: Path, config: TrainConfig, *, fold: tuple[int, int] | None, progress: ProgressFn
) -> TrainResult:
    source = load_source(
        data,
        layout=config.layout(),
        label_columns=list(config.label_columns) if config.label_columns else None,
        class_names=list(config.class_names) if config.class_names else None,
        task=config.task,
    )
    task = source.task
    positive = pick_positive_class(source.class_names, config.positive_class) if task == "binary" else None
    main = ctx.is_main
    if main:
        out.mkdir(parents=True, exist_ok=True)
    device = ctx.device
    torch.manual_seed(config.seed)  # the same initial weights on every rank

    class_names = source.class_names
    model = create_model(config.arch, len(class_names))
    weights_used = load_weights(model, config.arch, config.weights)
    size = (config.input_size, config.input_size) if config.input_size else default_input_size(model)
    mean, std = default_normalization(model)

    planned = plan_crop_policy(source, config.crop, size, config.stride_fraction)
    if main:
        log.info("crop policy: %s (%s)", planned.policy.describe(), planned.reason)
    decoded = decode_all(source, planned.policy, strict=config.strict, progress=progress)
    data_ = decoded.data
    targets = data_.targets
    present = np.flatnonzero(data_.class_matrix().any(axis=0))
    if task != "multilabel" and len(present) < 2:
        empty = [n for i, n in enumerate(class_names) if i not in present]
        raise InputError(
            f"only one class has readable images in {data_.source} (none readable for: {', '.join(empty)}); "
            "a classifier needs at least two"
        )
    # Every rank computes the same patient-level split from the seed; only training batches are sharded.
    if fold is None:
        splits = split_indices(data_, val_fraction=config.val_fraction, test_fraction=config.test_fraction, seed=config.seed)
    else:
        fold_train, fold_val = kfold_indices(data_, fold[1], seed=config.seed)[fold[0]]
        splits = {"train": fold_train, "val": fold_val}
    check_no_leakage(data_, splits)
    if main:
        save_splits(out / "split.json", data_, splits, seed=config.seed)
    train_idx, val_idx = splits["train"], splits["val"]
    if len(val_idx) == 0:
        raise InputError("the validation split is empty; raise --val-fraction or add images")

    strategy = parse_strategy(config.strategy)
    pretrained = weights_used != "none"
    backbone_factor = config.backbone_lr_factor if config.backbone_lr_factor is not None else (0.1 if pretrained else 1.0)
    trainable = apply_strategy(model, strategy)
    model = distributed.prepare_model(model, ctx).to(device)
    weights = class_weights(targets[train_idx], task, len(class_names)) if config.imbalance == "weighted" else None
    loss_fn = TaskLoss(task, weights).to(device)
    eval_loss = TaskLoss(task, weights)  # on CPU, where validation logits are gathered

    card = ModelCard(
        arch=config.arch,
        task=task,
        class_names=class_names,
        positive_class=positive,
        threshold=0.5 if task != "multiclass" else None,
        input_size=size,
        normalization=Normalization(kind="per_image") if config.normalization == "per_image" else Normalization(mean=mean, std=std),
        output_activation="sigmoid" if task == "multilabel" else "softmax",
        crop=planned.policy,
        provenance=Provenance(
            edgedx_version=edgedx.__version__,
            created_at=now_iso(),
            data_summary={
                "source": str(Path(data_.source).resolve()),  # export finds it from any directory
                "n_images": len(data_),
                "class_counts": data_.class_counts(),
                "n_skipped": len(decoded.skipped),
                "splits": {k: int(len(v)) for k, v in splits.items()},
                "patient_ids": data_.patient_ids is not None,
            },
            split_seed=config.seed,
            weights=weights_used,
            training={
                **_jsonable(asdict(config)), "strategy": str(strategy), "backbone_lr_factor": backbone_factor, "world_size": ctx.world,
            },
        ),
    )

    groups = parameter_groups(model, config.lr, backbone_factor)
    if config.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / config.batch_size))
    if config.schedule == "cosine":
        scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.3, patience=2)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    state = _RunState()
    last = out / LAST_NAME
    if config.resume:
        if not last.is_file():
            raise InputError(f"nothing to resume: {last} does not exist; run without --resume to start")
        state = _restore(last, model, optimizer, scheduler, scaler, config)
        if config.schedule == "cosine":
            scheduler.T_max = config.epochs * steps_per_epoch  # a resumed run may have been given more epochs
        if main:
            log.info("resumed after epoch %d", state.epoch)
    _seed_dropout(config.seed, ctx.rank, state.epoch)
    stepper = distributed.wrap(model, ctx)  # DDP averages gradients; ``model`` stays the plain module that is saved

    checkpoint = out / CHECKPOINT_NAME
    total_steps = config.epochs * steps_per_epoch
    for epoch in range(state.epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        model.train()
        freeze_batchnorm_of_frozen(model, trainable)
        epoch_rng = np.random.default_rng([config.seed, epoch])  # identical on every rank, and on resume
        order = balanced_order(targets[train_idx], task, epoch_rng) if config.imbalance == "sampler" else epoch_rng.permutation(len(train_idx))
        order = train_idx[order]
        running, seen = 0.0, 0
        for b, (start, whole, idx) in enumerate(distributed.rank_batches(order, config.batch_size, ctx.rank, ctx.world)):
            if len(idx) < 2 and len(order) > 1:  # batch norm cannot train on a single sample (equal on every rank)
                continue
            positions = start + ctx.rank + ctx.world * np.arange(len(idx))  # place in the global batch order
            batch = np.stack([_training_crop(decoded, i, card, config, epoch, p) for i, p in zip(idx, positions)])
            x = torch.from_numpy(preprocess_batch(batch, card)).to(device)
            target = _target_tensor(targets[idx], task).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
                loss = loss_fn(stepper(x), target)
            share = _batch_share(targets[idx], targets[whole], task, weights) if ctx.distributed else 1.0
            optimizer.zero_grad(set_to_none=True)
            # DDP averages gradients over ranks: scaled like this, the average is the whole global batch's gradient.
            scaler.scale(loss * (share * ctx.world) if ctx.distributed else loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if config.schedule == "cosine":
                scheduler.step()
            running += loss.item() * share * len(whole)
            seen += len(whole)
            step = (epoch - 1) * steps_per_epoch + b + 1
            progress("train", step, total_steps, f"epoch {epoch}/{config.epochs} loss {running / seen:.3f}")
        running = ctx.sum(running)  # the global batches' mean losses, whatever the number of ranks
        distributed.average_buffers(model, ctx)
        val_loss, probs = _evaluate(ctx, model, decoded.images, targets, val_idx, card, config.batch_size, eval_loss)
        metrics = score(targets[val_idx], probs, card)
        monitored = ctx.broadcast(-val_loss if config.monitor == "loss" else _monitored(metrics, config.monitor))
        if config.schedule == "plateau":
            scheduler.step(monitored)
        row = {
            "epoch": epoch,
            "train_loss": running / max(seen, 1),
            "val_loss": val_loss,
            "val_accuracy": metrics["accuracy"],
            "val_balanced_accuracy": metrics["balanced_accuracy"],
            "val_macro_auc": metrics["macro_auc"],
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - started, 2),
            "val": metrics,  # the full set: per-class sensitivity, specificity, precision, F1, AUC, confusion
        }
        state.history.append(row)
        improved = state.best_score is None or monitored > state.best_score
        basis = where_taken(card.task, 0.5)  # epochs are scored before a threshold is chosen
        progress("train", epoch * steps_per_epoch, total_steps, f"epoch {epoch}/{config.epochs} val {config.monitor.replace('_', ' ')} {monitored:.3f} ({basis})")
        if main:
            steps_log.info("%s", epoch_line(row, config, basis, improved))
        if improved:
            state.best_score, state.best_epoch, state.since_best = monitored, epoch, 0
            state.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if main:
                save_checkpoint(checkpoint, card.replace(metrics={"split": "val", "epoch": epoch, **_headline(metrics)}), state.best_state, epoch=epoch)
        else:
            state.since_best += 1
        state.epoch = epoch
        if main:
            _save_last(last, model, optimizer, scheduler, scaler, state)
        if config.patience is not None and state.since_best >= config.patience:
            if main:
                log.info("early stopping after epoch %d: no %s improvement for %d epochs", epoch, config.monitor, config.patience)
            state.stopped_early = True
            break

    # The best epoch's weights: choose the operating threshold on validation data.
    model.load_state_dict(state.best_state)
    _, val_probs = _evaluate(ctx, model, decoded.images, targets, val_idx, card, config.batch_size, eval_loss)
    final = operating_point(targets[val_idx], val_probs, card, config.target_sensitivity)
    card = card.replace(threshold=final["threshold"], metrics={"split": "val", "epoch": state.best_epoch, **final["card_metrics"]})
    warnings = quality_warnings(final, card)
    for warning in warnings if main else ():
        log.warning("%s", warning)
    report: dict[str, Any] = {"best_epoch": state.best_epoch, "stopped_early": state.stopped_early, "val": final["metrics"], "history": state.history}
    if len(splits.get("test", [])):
        _, test_probs = _evaluate(ctx, model, decoded.images, targets, splits["test"], card, config.batch_size, eval_loss)
        report["test"] = score(targets[splits["test"]], test_probs, card, threshold=card.threshold)
    result = None
    if main:  # the other ranks wait for rank 0's result below
        save_checkpoint(checkpoint, card, state.best_state, epoch=state.best_epoch)
        (out / "metrics.json").write_text(json.dumps(_jsonable(report), indent=2) + "\n", encoding="utf-8")
        (out / "card.json").write_text(card.to_json() + "\n", encoding="utf-8")
        summary = {
            "data": data_.source,
            "task": task,
            "class_counts_train": {n: c for n, c in zip(class_names, _counts(targets[train_idx], task, len(class_names)))},
            "loss_shares": loss_shares(targets[train_idx], task, class_names, weights),
            "imbalance": config.imbalance,
            "splits": split_summary(data_, splits),
            "skipped": decoded.skipped,
            "weights": weights_used,
            "strategy": str(strategy),
            "trainable_parameters": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
            "device": str(device),
            "world_size": ctx.world,
            "batch_norm": "synchronised" if ctx.synced_batchnorm else ("per process" if ctx.distributed else "single process"),
            "crop": {"policy": card.crop.describe(), "reason": planned.reason, "validated_as": "diagnose: sliding crops merged per image"},
            "warnings": warnings,
            **({"test": _headline(report["test"])} if "test" in report else {}),
        }
        if config.plots:
            _write_plots(out, state.history, targets[val_idx], val_probs, card, final, config.monitor)
        if config.gradcam_samples:
            summary["gradcam"] = [str(p) for p in _write_gradcam(out, model, decoded, val_idx, card, config.gradcam_samples)]
        (out / "summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n", encoding="utf-8")
        result = TrainResult(checkpoint, card, state.best_epoch, final["metrics"], state.history, tuple(decoded.skipped), summary)
    return ctx.broadcast(result)


CV_METRICS = ("accuracy", "balanced_accuracy", "macro_auc", "sensitivity", "specificity")


@dataclass(frozen=True)
class CrossValidationResult:
    folds: tuple[TrainResult, ...]
    summary: dict[str, Any]


def cross_validate(
    data: str | Path, out: str | Path, config: TrainConfig, *, folds: int, progress: ProgressFn = no_progress
) -> CrossValidationResult:
    """Patient-level k-fold cross-validation: one run per fold in ``out/fold_<i>``, mean ± sd in ``out/cv_summary.json``."""
    if folds < 2:
        raise InputError(f"--folds must be at least 2, got {folds}")
    out = Path(out)
    results = []
    config.validate()
    with distributed.session(resolve_device(config.device)) as ctx:  # one process group for every fold
        progress = progress if ctx.is_main else no_progress
        for i in range(folds):
            results.append(train(data, out / f"fold_{i + 1}", config, fold=(i, folds), progress=progress))
            progress("folds", i + 1, folds)
        summary: dict[str, Any] = {"folds": folds, "seed": config.seed, "per_fold": [r.card.metrics for r in results]}
        for key in CV_METRICS:
            values = [r.card.metrics.get(key) for r in results]
            finite = [float(v) for v in values if v is not None]
            summary[key] = {"mean": float(np.mean(finite)), "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0} if finite else None
        if ctx.is_main:
            (out / "cv_summary.json").write_text(json.dumps(_jsonable(summary), indent=2) + "\n", encoding="utf-8")
    return CrossValidationResult(tuple(results), summary)


def _evaluate(
    ctx: distributed.Context, model: nn.Module, images: list, targets: np.ndarray, idx: np.ndarray,
    card: ModelCard, batch_size: int, loss_fn: nn.Module,
) -> tuple[float, np.ndarray]:
    """Loss and merged probabilities of the items ``idx``, diagnosed as ``diagnose`` would (sliding crops, merged).

    Under DDP the images are shared out over the ranks and the merged rows
    gathered, so every rank gets the full result. The loss is the task loss of
    the merged probabilities (:func:`as_logits`).
    """
    if ctx.distributed:
        mine = idx[distributed.shard_positions(len(idx), ctx.rank, ctx.world)]
        probs = distributed.gather_rows(ctx, predict_resampled(model, card, images, mine, batch_size=batch_size, device=ctx.device), len(idx))
    else:
        probs = predict_resampled(model, card, images, idx, batch_size=batch_size, device=ctx.device)
    loss = float(loss_fn(as_logits(probs, card.output_activation), _target_tensor(targets[idx], card.task)))
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


def score(y: np.ndarray, probs: np.ndarray, card: ModelCard, *, threshold: float | None = None) -> dict[str, Any]:
    """The full metric set. Binary decisions at ``threshold`` (argmax when None); multilabel per label at 0.5."""
    if card.task == "multilabel":
        per_label = {}
        for i, name in enumerate(card.class_names):
            p = np.stack([1 - probs[:, i], probs[:, i]], axis=1)
            cut = 0.5 if threshold is None else threshold
            per_label[name] = classification_metrics(
                y[:, i].astype(int), p, ("absent", name), y_pred=(probs[:, i] >= cut).astype(int)
            ).to_dict()
        keys = ("accuracy", "balanced_accuracy", "macro_auc")
        means = {k: _nanmean([m[k] for m in per_label.values()]) for k in keys}
        return {**means, "n": len(y), "per_label": per_label}
    y_pred = None
    if card.task == "binary" and threshold is not None:
        pos = card.positive_index
        y_pred = np.where(probs[:, pos] >= threshold, pos, 1 - pos)
    return classification_metrics(y, probs, card.class_names, y_pred=y_pred, positive_index=card.positive_index or 1).to_dict()


WEAK_AUC = 0.6
NEAR_ZERO = 0.05


def quality_warnings(final: dict[str, Any], card: ModelCard) -> list[str]:
    """What a clinic must hear before exporting: a model that barely separates the classes, or one that never
    (or always) calls a class at its operating point. Validation numbers, so they are warnings, not refusals."""
    binary = card.task == "binary"
    metrics = final["metrics"]["at_threshold"] if binary else final["metrics"]
    where = where_taken(card.task, card.threshold)
    warnings = []
    auc = metrics.get("macro_auc")
    if auc is not None and auc <= WEAK_AUC:
        warnings.append(f"validation AUC is {auc:.3f} (≤ {WEAK_AUC}; 0.5 is chance): the model barely separates the classes")
    rows = metrics.get("per_class") or {}
    if binary:
        rows = {card.positive_class: rows.get(card.positive_class, {})}
    for name, row in rows.items():
        for key in ("sensitivity", "specificity"):
            value = row.get(key) if isinstance(row, dict) else None
            if value is not None and value <= NEAR_ZERO:
                meaning = "it almost never calls" if key == "sensitivity" else "it calls almost everything"
                warnings.append(f"validation {key} for {name} is {value:.3f} {where}: {meaning} {name}")
    return warnings


def margin_threshold(truth: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The operating threshold for at least ``target`` sensitivity, with the widest margin.

    ``threshold_for_sensitivity`` gives the highest threshold reaching the
    target, which maximises specificity. Every threshold down to the highest
    negative below it keeps that specificity while catching more positives, so
    we go down to that gap and sit in its middle: between the highest such
    negative and the lowest positive above it. Validation specificity is
    unchanged, sensitivity can only rise, and the threshold is not glued to one
    validation case (less brittle on new images and on whole-image means).
    """
    top = float(threshold_for_sensitivity(truth, scores, target))
    negatives = scores[(truth == 0) & (scores < top)]
    if negatives.size == 0:
        below = scores[scores < top]
        return (top + float(below.max())) / 2.0 if below.size else top
    highest_negative = float(negatives.max())
    lowest_positive_above = float(scores[(truth == 1) & (scores > highest_negative)].min())
    return (highest_negative + lowest_positive_above) / 2.0


def operating_point(y: np.ndarray, probs: np.ndarray, card: ModelCard, target: float) -> dict[str, Any]:
    """Binary: the threshold reaching ``target`` sensitivity on validation data, and the metrics there."""
    if card.task != "binary":
        metrics = score(y, probs, card)
        return {"threshold": card.threshold, "metrics": metrics, "card_metrics": _headline(metrics)}
    pos = card.positive_index
    assert pos is not None
    truth = (y == pos).astype(int)
    threshold = margin_threshold(truth, probs[:, pos], target) if truth.any() else 0.5
    at = score(y, probs, card, threshold=threshold)
    at_half = score(y, probs, card, threshold=0.5)
    row = at["per_class"][card.class_names[pos]]
    card_metrics = {
        **_headline(at),
        "target_sensitivity": target,
        "threshold": threshold,
        "sensitivity": row["sensitivity"],
        "specificity": row["specificity"],
        "precision": row["precision"],
        "f1": row["f1"],
        "auc": at["macro_auc"],
    }
    return {"threshold": threshold, "metrics": {"at_threshold": at, "at_0.5": at_half}, "card_metrics": card_metrics}


# -- internals --------------------------------------------------------------------------


@dataclass
class _RunState:
    epoch: int = 0
    best_epoch: int = 0
    best_score: float | None = None
    since_best: int = 0
    stopped_early: bool = False
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def _save_last(path: Path, model, optimizer, scheduler, scaler, state: _RunState) -> None:
    """Everything needed to continue exactly where this epoch ended (atomic write)."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "state": {k: v for k, v in asdict(state).items() if k not in ("best_state", "history")},
        "history": json.dumps(_jsonable(state.history)),
        "best_state": state.best_state,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def _restore(path: Path, model, optimizer, scheduler, scaler, config: TrainConfig) -> _RunState:
    """Load ``last.pt``; epoch orders and augmentations derive from (seed, epoch), so no numpy state is needed."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    scaler.load_state_dict(payload["scaler"])
    torch.set_rng_state(payload["torch_rng"])
    state = _RunState(**payload["state"], best_state=payload["best_state"], history=json.loads(payload["history"]))
    if state.epoch >= config.epochs:
        raise InputError(f"the run already finished {state.epoch} of {config.epochs} epochs; raise --epochs to train further")
    return state


def _training_crop(decoded: DecodedImages, i: int, card: ModelCard, config: TrainConfig, epoch: int, position: int) -> np.ndarray:
    """A random crop by the card's rule (the whole image under ``fit``), then augmented; from generators seeded by
    (seed, epoch, place in the epoch's order), so the same on any number of ranks and on resume."""
    crop = random_tile(decoded.images[i], card.crop, np.random.default_rng([config.seed, epoch, int(position), 1]))
    if config.augmentation == "none":
        return crop
    return augment(crop, config.augmentation, np.random.default_rng([config.seed, epoch, int(position)]))


def _batch_share(mine: np.ndarray, whole: np.ndarray, task: str, weights: np.ndarray | None) -> float:
    """This rank's share of the global batch's loss denominator (its weight sum, or its count).

    The task loss is a (weighted) mean over the rank's items; times this share it
    becomes the rank's part of the global batch's mean, as one process computes it.
    """
    if weights is None or task == "multilabel":
        return len(mine) / len(whole)
    return float(weights[mine].sum() / weights[whole].sum())


def _seed_dropout(seed: int, rank: int, epoch: int) -> None:
    """Ranks other than 0 draw their own dropout masks (rank 0 keeps the single-process stream)."""
    if rank:
        torch.manual_seed(int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0]))


def _target_tensor(targets: np.ndarray, task: str) -> torch.Tensor:
    return torch.from_numpy(targets.astype(np.float32)) if task == "multilabel" else torch.from_numpy(targets).long()


def _monitored(metrics: dict[str, Any], monitor: str) -> float:
    value = metrics["macro_auc" if monitor == "auc" else monitor]
    return float("-inf") if value is None else float(value)


def _headline(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: metrics[k] for k in ("n", "accuracy", "balanced_accuracy", "macro_auc") if k in metrics}


def _counts(targets: np.ndarray, task: str, n: int) -> list[int]:
    if task == "multilabel":
        return [int(v) for v in targets.sum(axis=0)]
    return [int(v) for v in np.bincount(targets, minlength=n)]


def _nanmean(values: list[Any]) -> float | None:
    finite = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(finite)) if finite else None


def _jsonable(value: Any) -> Any:
    """Plain JSON values (numpy scalars and arrays, tuples, NaN → null)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_plots(out: Path, history, y, probs, card: ModelCard, final: dict[str, Any], monitor: str) -> None:
    """Learning curves, ROC with the operating point, confusion matrix and the six-metric radar."""
    from edgedx.runtime import plots

    folder = out / "plots"
    curve_metric = {"auc": "val_macro_auc", "loss": "val_loss"}.get(monitor, f"val_{monitor}")
    threshold_free = monitor in ("auc", "loss")
    plots.plot_learning_curves(
        history, folder / "learning_curves.png", metric=curve_metric, where="" if threshold_free else where_taken(card.task, 0.5)
    )
    binary = card.task == "binary"
    where = where_taken(card.task, card.threshold)
    plots.plot_roc(
        y, probs, card.class_names, folder / "roc.png",
        positive_index=card.positive_index, operating_threshold=(0.5 if card.threshold is None else card.threshold) if binary else None,
    )
    metrics = final["metrics"]["at_threshold"] if binary else final["metrics"]
    if card.task == "multilabel":
        per_label = [plots.six_metrics(m, name) for name, m in metrics["per_label"].items()]
        six = {k: _nanmean([p[k] for p in per_label]) for k in per_label[0]}
    else:
        plots.plot_confusion_matrix(metrics["confusion"], card.class_names, folder / "confusion_matrix.png", where=where)
        six = plots.six_metrics(metrics, card.positive_class)
    plots.plot_radar(six, folder / "radar.png", title=f"{card.arch}, validation", where=where)


def _write_gradcam(out: Path, model: nn.Module, decoded: DecodedImages, val_idx: np.ndarray, card: ModelCard, n: int) -> list[Path]:
    """Grad-CAM overlays for the first ``n`` validation images; a failure is logged, the run is kept."""
    from edgedx.training.gradcam import save_gradcam_examples

    chosen = val_idx[: min(n, len(val_idx))]
    labels = None if card.task == "multilabel" else [card.class_names[int(decoded.data.targets[i])] for i in chosen]
    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", f"val_{k:02d}_{Path(decoded.data.ids[i]).stem}")[:80] for k, i in enumerate(chosen)]
    try:
        return save_gradcam_examples(
            model.cpu(), [decoded.images[i].pixels for i in chosen], card, out / "gradcam", names=names, labels=labels, max_images=n
        )
    except Exception as exc:  # Grad-CAM is evidence, not the product: never lose a finished run over it
        log.warning("Grad-CAM overlays failed for %s: %s", card.arch, exc)
        return []
