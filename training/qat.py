"""Quantisation-aware fine-tuning (QAT): nudge a trained model so its int8 export keeps its decisions.

Why: post-training int8 (with the most harmful layers left in float, by
the exporter's precision step) is not always enough for a small medical
model. QAT fine-tunes the float weights for a few epochs at a small learning
rate while the forward pass rounds exactly as the int8 engine will, so the
weights settle where rounding costs the least. The result is an ordinary
checkpoint (``model.qat.pt`` beside ``model.pt``): same architecture, same
state_dict keys, plain float weights, so the normal export path quantises it
unchanged.

What is simulated, and why it matches the deployed arithmetic:

- weights of every ``Conv2d``/``Linear``: per output channel, symmetric, on
  ONNX Runtime's grids: ``±127`` steps for 8 bits (ORT and TensorRT), ``±64``
  for 7 bits (ORT's ``reduce_range``, used on x86 CPUs without VNNI). The
  scale follows the weights (absmax / steps) as the exporter computes it.
  Export folds batch norm into the convolutions first; folding multiplies
  each output channel by one number, which per-channel symmetric rounding
  commutes with, so rounding the unfolded weight here is rounding the folded
  one there. Gradients pass straight through the rounding.
- the input of every ``Conv2d``/``Linear``: per tensor, ``uint8-asymmetric``
  (0..255 with a zero point, ONNX Runtime on CPUs) or ``int8-symmetric``
  (±127, zero point 0, TensorRT), with ranges from moving-average min/max
  observers warmed on training crops before anything is measured.

The run is rebuilt as training built it, from its own pieces: the card's
training options, the data source the card records (:meth:`RunFolder.data_source`),
the split from ``split.json`` (:func:`load_splits`), images decoded by the
card's crop policy (:func:`decode_all`), the run's loss and class weights
(:func:`prepare_training`), and the epochs of :func:`train_one_epoch` and
:func:`evaluate`. Every layer trains (the quantisation error is everywhere),
at one learning rate. Mixed precision stays off: fp16 rounding on top of the
simulated int8 rounding would describe neither engine.
"""

from __future__ import annotations

from edgedx.deps import require

require(("torch", "timm"), extra="train", purpose="Quantisation-aware fine-tuning")

import dataclasses  # noqa: E402 - after the check that names the extra to install
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao.quantization import FakeQuantize, MovingAverageMinMaxObserver  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from edgedx.card import ModelCard  # noqa: E402
from edgedx.errors import InputError  # noqa: E402
from edgedx.progress import STEP_LOGGER, ProgressFn, no_progress  # noqa: E402
from edgedx.runtime.outputs.plots import where_taken  # noqa: E402
from edgedx.runtime.preprocess import preprocess_batch  # noqa: E402
from edgedx.training.build import Network, build_optimizer, prepare_training, resolve_device  # noqa: E402
from edgedx.training.checkpoint import Checkpoint, build_model, file_sha256, load_checkpoint, save_checkpoint  # noqa: E402
from edgedx.training.config import TrainConfig  # noqa: E402
from edgedx.training.crops import PlannedPolicy, decode_all  # noqa: E402
from edgedx.training.data import RunData  # noqa: E402
from edgedx.training.distributed import Context  # noqa: E402
from edgedx.training.loop import Fitting, epoch_line, evaluate, train_one_epoch, training_crop  # noqa: E402
from edgedx.training.run import RunFolder, SplitUnavailable, jsonable  # noqa: E402
from edgedx.training.splits import load_splits  # noqa: E402
from edgedx.training.threshold import score  # noqa: E402

__all__ = [
    "ACTIVATIONS", "WEIGHT_STEPS", "FakeQuant", "QatOptions", "QatResult", "activation_quantiser", "fake_quantize_weight",
    "insert_fake_quant", "qat_path", "quantisation_aware_finetune",
]

log = logging.getLogger(__name__)
steps_log = logging.getLogger(STEP_LOGGER)

WEIGHT_STEPS = {8: 127, 7: 64}  # symmetric weight grid ±steps: ONNX Runtime's int8 range, and its reduce_range (7-bit)
ACTIVATIONS = ("uint8-asymmetric", "int8-symmetric")
WARMUP_BATCHES = 8
AVERAGING = 0.01  # the observers' moving-average constant while fine-tuning (torch's default)


@dataclass(frozen=True)
class QatOptions:
    """How to fine-tune: a few epochs at a small fraction of the training learning rate, for one int8 flavour."""

    epochs: int = 2
    lr: float = 1e-4  # a small fraction of the training lr: QAT nudges, it does not retrain
    batch_size: int = 32
    weight_bits: int = 8  # 7 for CPUs without VNNI (the exporter's "cpu-avx2" int8 flavour)
    activations: str = "uint8-asymmetric"  # or "int8-symmetric" (the TensorRT flavour)
    device: str = "auto"
    seed: int = 0

    def validate(self) -> None:
        """Refuse a setting that cannot work before any data is read, naming the value and the fix."""
        checks = [
            (_is_int(self.epochs) and self.epochs >= 1, f"QAT epochs must be at least 1, got {self.epochs!r}; give epochs=1 or more"),
            (
                _is_number(self.lr) and self.lr > 0 and math.isfinite(self.lr),
                f"QAT learning rate must be a positive number, got {self.lr!r}; a small fraction of the training lr, e.g. 1e-4",
            ),
            (
                _is_int(self.batch_size) and self.batch_size >= 2,
                f"QAT batch size must be at least 2 (batch norm cannot train on one image), got {self.batch_size!r}",
            ),
            (
                _is_int(self.weight_bits) and self.weight_bits in WEIGHT_STEPS,
                f"weight_bits must be 8 or 7, got {self.weight_bits!r}: 8 for VNNI CPUs, GPUs and TensorRT, "
                "7 for x86 CPUs without VNNI (the cpu-avx2 int8 flavour)",
            ),
            (
                isinstance(self.activations, str) and self.activations in ACTIVATIONS,
                f"unknown activations {self.activations!r}; choose uint8-asymmetric (ONNX Runtime on CPUs) "
                "or int8-symmetric (TensorRT)",
            ),
            (
                isinstance(self.device, str) and self.device in ("auto", "cpu", "cuda"),
                f"unknown device {self.device!r}; choose auto, cpu or cuda",
            ),
            (_is_int(self.seed), f"QAT seed must be an integer, got {self.seed!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


@dataclass(frozen=True)
class QatResult:
    """What fine-tuning did: the new checkpoint and the validation metric with fake-quant on, before and after."""

    checkpoint: Path  # the fine-tuned checkpoint, beside the original in the same run folder (run/model.qat.pt)
    epochs: int
    seconds: float
    val_metric_before: float  # the float model with fake-quant on, before fine-tuning
    val_metric_after: float  # the same after fine-tuning
    metric: str = "balanced_accuracy"  # which validation metric the two numbers are (the run's monitor, else accuracy)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the path as a string, NaN as null): for reports and the checkpoint's ``extra``."""
        return jsonable({
            "checkpoint": str(self.checkpoint),
            "epochs": int(self.epochs),
            "seconds": round(float(self.seconds), 2),
            "metric": self.metric,
            "val_metric_before": float(self.val_metric_before),
            "val_metric_after": float(self.val_metric_after),
        })


# -- the fake quantisation ---------------------------------------------------------------------------------


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """``weight`` rounded to the per-output-channel symmetric grid of ``bits`` bits, gradients passed straight through.

    The grid is ``scale_c * k`` with ``|k| <= WEIGHT_STEPS[bits]`` and
    ``scale_c = max|w_c| / steps``: ONNX Runtime's symmetric per-channel
    weight quantisation (``reduce_range`` for 7 bits). The scale is computed
    from the weights but carries no gradient, as in the exporter.
    """
    steps = WEIGHT_STEPS[bits]
    absmax = weight.detach().reshape(weight.shape[0], -1).abs().amax(dim=1)
    scale = (absmax / steps).clamp_min(1e-12).float()
    zero = torch.zeros(weight.shape[0], dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -steps, steps)


class WeightFakeQuant(nn.Module):
    """A parametrization: the layer sees its weight rounded to the int8 grid while the optimiser updates the float one."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize_weight(weight, self.bits)


def activation_quantiser(activations: str) -> FakeQuantize:
    """A per-tensor fake quantiser with a moving-average min/max observer, for one of :data:`ACTIVATIONS`.

    ``int8-symmetric`` uses ±127 (not -128): TensorRT's and ONNX Runtime's
    symmetric range, so the scale is ``absmax / 127`` as there.
    """
    if activations == "int8-symmetric":
        return FakeQuantize(
            observer=MovingAverageMinMaxObserver, quant_min=-127, quant_max=127, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric
        )
    if activations == "uint8-asymmetric":
        return FakeQuantize(
            observer=MovingAverageMinMaxObserver, quant_min=0, quant_max=255, dtype=torch.quint8, qscheme=torch.per_tensor_affine
        )
    raise InputError(f"unknown activations {activations!r}; choose {' or '.join(ACTIVATIONS)}")


@dataclass
class FakeQuant:
    """Fake quantisation attached to a model (weight parametrizations, input hooks) and what removes it again.

    The activation quantisers live here, not in the model, so the model's
    state_dict only changes by the parametrizations, which :meth:`remove` undoes.
    """

    layers: list[nn.Module]
    quantisers: nn.ModuleList
    hooks: list[torch.utils.hooks.RemovableHandle]

    def observe(self, on: bool) -> None:
        """Let the activation ranges follow the data (fine-tuning) or hold them (measuring)."""
        for q in self.quantisers:
            q.enable_observer(on)

    def set_averaging(self, constant: float) -> None:
        for q in self.quantisers:
            q.activation_post_process.averaging_constant = constant

    def remove(self) -> None:
        """The plain model again: hooks gone, each weight the float (latent) weight the optimiser trained."""
        for hook in self.hooks:
            hook.remove()
        for layer in self.layers:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        self.hooks.clear()
        self.layers.clear()


def insert_fake_quant(model: nn.Module, weight_bits: int, activations: str) -> FakeQuant:
    """Fake-quantise the weights and the input of every ``Conv2d``/``Linear`` of ``model`` (in place; see :class:`FakeQuant`)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    device = next(model.parameters()).device
    quantisers = nn.ModuleList()
    hooks = []
    for layer in layers:
        parametrize.register_parametrization(layer, "weight", WeightFakeQuant(weight_bits))
        quantiser = activation_quantiser(activations).to(device)
        quantisers.append(quantiser)
        hooks.append(layer.register_forward_pre_hook(_quantise_input(quantiser)))
    return FakeQuant(layers, quantisers, hooks)


def _quantise_input(quantiser: FakeQuantize) -> Callable[[nn.Module, tuple[Any, ...]], tuple[Any, ...]]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (quantiser(args[0]), *args[1:])

    return hook


# -- the run, rebuilt ---------------------------------------------------------------------------------------


def qat_path(checkpoint: Path) -> Path:
    """Where the fine-tuned checkpoint goes: ``<stem>.qat.pt`` beside the original (``run/model.qat.pt``)."""
    return checkpoint.with_name(f"{checkpoint.stem}.qat.pt")


def qat_config(card: ModelCard, options: QatOptions) -> TrainConfig:
    """The run's training options from its card, with QAT's epochs, learning rate, batch, device and seed.

    Loss weighting, sampler, augmentation, optimiser and monitor stay the
    run's; every layer trains at one learning rate (see the module docstring).
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    recorded = {k: tuple(v) if isinstance(v, list) else v for k, v in (card.provenance.training or {}).items() if k in known}
    config = TrainConfig(**{
        **recorded, "epochs": options.epochs, "lr": options.lr, "batch_size": options.batch_size, "device": options.device,
        "seed": options.seed, "strategy": "full", "backbone_lr_factor": 1.0, "schedule": "cosine", "patience": None,
        "resume": False, "overwrite": False, "gradcam_samples": 0, "plots": False,
    })
    config.validate()
    return config


def rebuild_run_data(checkpoint: Checkpoint, progress: ProgressFn) -> RunData:
    """The run's train and validation images, decoded by the card's crop policy, split as ``split.json`` records.

    Only those two splits are decoded. An image of the split that no longer
    reads is refused rather than skipped: the split would not be training's.
    """
    path = Path(checkpoint.path or "")
    run = RunFolder(path.parent)
    if not run.split_file.is_file():
        raise InputError(
            f"{path} is not in its training run folder ({run.split_file} is missing), so the run's train/validation split "
            "cannot be rebuilt; give the model.pt that edgedx train wrote, inside its run folder"
        )
    try:
        source = run.data_source(checkpoint.card)
        splits = load_splits(run.split_file, source)
    except (SplitUnavailable, InputError) as exc:
        raise InputError(f"{path}: cannot rebuild the run's training data for fine-tuning: {exc}") from None
    train, val = splits.get("train", np.zeros(0, np.int64)), splits.get("val", np.zeros(0, np.int64))
    if len(train) == 0 or len(val) == 0:
        raise InputError(f"{run.split_file} lists no {'train' if len(train) == 0 else 'val'} images; QAT needs both splits")
    try:
        decoded = decode_all(source.subset(np.concatenate([train, val])), checkpoint.card.crop, strict=True, progress=progress)
    except InputError as exc:
        raise InputError(f"{path}: the run's images changed since training: {exc}") from None
    parts = {"train": np.arange(len(train)), "val": np.arange(len(train), len(train) + len(val))}
    return RunData(decoded, parts, PlannedPolicy(checkpoint.card.crop, "as recorded in the card"))


def _fitting(
    checkpoint: Checkpoint, data: RunData, config: TrainConfig, options: QatOptions, progress: ProgressFn
) -> tuple[Fitting, FakeQuant]:
    """The checkpoint's network with fake-quant inserted, its loss and optimiser: what :func:`train_one_epoch` runs."""
    card = checkpoint.card
    ctx = Context(device=resolve_device(config.device))
    mean, std = card.normalization.mean, card.normalization.std
    net = Network(build_model(checkpoint), card.provenance.weights, tuple(card.input_size), tuple(mean), tuple(std))
    setup = prepare_training(ctx, net, data, config)
    quant = insert_fake_quant(setup.model, options.weight_bits, options.activations)
    optim = build_optimizer(setup.model, config, setup, len(data.train_idx), ctx.device)
    optim = dataclasses.replace(optim, scaler=torch.amp.GradScaler("cuda", enabled=False), use_amp=False)
    run = RunFolder(Path(checkpoint.path or "").parent)
    return Fitting(ctx, setup.model, setup, optim, data, card, config, run, progress), quant


def _warm_up(f: Fitting, quant: FakeQuant) -> None:
    """Activation ranges from up to :data:`WARMUP_BATCHES` un-augmented training crops, before anything is measured.

    In eval mode, so batch-norm statistics stay the checkpoint's; the moving
    average is a plain mean over these batches, then follows training slowly.
    """
    config = dataclasses.replace(f.config, augmentation="none")
    order = f.data.train_idx[np.random.default_rng([config.seed, 0]).permutation(len(f.data.train_idx))]
    f.model.eval()
    quant.observe(True)
    with torch.no_grad():
        for k, start in enumerate(range(0, min(len(order), WARMUP_BATCHES * config.batch_size), config.batch_size)):
            part = order[start : start + config.batch_size]
            crops = np.stack([training_crop(f.data.decoded, int(i), f.card, config, 0, start + j) for j, i in enumerate(part)])
            quant.set_averaging(1.0 / (k + 1))
            f.model(torch.from_numpy(preprocess_batch(crops, f.card)).to(f.ctx.device))
    quant.set_averaging(AVERAGING)
    quant.observe(False)


def _validate(f: Fitting) -> tuple[float, dict[str, Any]]:
    """Validation loss and metrics with fake-quant on and ranges held, decided at the card's operating threshold."""
    val_loss, probs = evaluate(f, f.data.val_idx)
    return val_loss, score(f.data.targets[f.data.val_idx], probs, f.card, threshold=f.card.threshold)


def _metric_name(monitor: str, metrics: dict[str, Any]) -> str:
    """The run's monitored metric; accuracy when it monitored the loss or the metric is undefined (AUC of one class)."""
    name = {"auc": "macro_auc", "loss": "accuracy"}.get(monitor, monitor)
    return name if metrics.get(name) is not None else "accuracy"


def _finetune(f: Fitting, quant: FakeQuant, metric: str) -> float:
    """The epochs, one line each on the step log; the last epoch's validation ``metric``."""
    basis = where_taken(f.card.task, f.card.threshold)
    value = float("nan")
    for epoch in range(1, f.config.epochs + 1):
        started = time.perf_counter()
        quant.observe(True)
        train_loss = train_one_epoch(f, epoch)
        quant.observe(False)
        val_loss, metrics = _validate(f)
        value = float(metrics[metric])
        row = {
            "epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_accuracy": metrics["accuracy"],
            "val_balanced_accuracy": metrics["balanced_accuracy"], "val_macro_auc": metrics["macro_auc"],
            "seconds": round(time.perf_counter() - started, 2),
        }
        steps_log.info("quantisation-aware %s (fake-quant on)", epoch_line(row, f.config, basis, improved=False))
    return value


def _qat_card(card: ModelCard, options: QatOptions, source: Path, metric: str, before: float, after: float) -> ModelCard:
    """The same card, its provenance saying how the weights were fine-tuned (no schema change: the training options dict)."""
    epochs = f"{options.epochs} epoch{'s' if options.epochs != 1 else ''}"
    note = (
        f"quantisation-aware fine-tuned from {source.name}: {epochs} at lr {options.lr:g}, weights "
        f"{options.weight_bits}-bit per channel, activations {options.activations}; validation {metric.replace('_', ' ')} "
        f"with fake-quant {before:.3f} before, {after:.3f} after"
    )
    training = {**(card.provenance.training or {}), "quantisation_aware": note}
    return card.replace(provenance=dataclasses.replace(card.provenance, training=training))


def quantisation_aware_finetune(checkpoint: str | Path, options: QatOptions = QatOptions(), progress: ProgressFn | None = None) -> QatResult:
    """Fine-tune ``checkpoint`` with int8 fake-quant on; write ``<stem>.qat.pt`` beside it and return what changed.

    The original checkpoint is only read. The new one holds plain float
    weights with the original's keys and card (its provenance names the
    fine-tuning) and ``extra["qat"]``: the result, the options and the
    source's sha256. Raises :class:`InputError` for options that cannot work
    and for a checkpoint outside its run folder (the split cannot be read).
    """
    options.validate()
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    original = load_checkpoint(checkpoint)
    config = qat_config(original.card, options)
    sink = progress or no_progress

    def report(stage: str, done: int, total: int, info: str = "") -> None:
        sink("qat" if stage == "train" else stage, done, total, info)  # the epochs' bar is QAT's, not training's

    data = rebuild_run_data(original, report)
    torch.manual_seed(options.seed)
    f, quant = _fitting(original, data, config, options, report)
    _warm_up(f, quant)
    val_loss, metrics = _validate(f)
    metric = _metric_name(config.monitor, metrics)
    before = float(metrics[metric])
    log.info(
        "QAT of %s: with fake-quant before fine-tuning, val loss %.3f, val %s %.3f (%s)",
        checkpoint, val_loss, metric.replace("_", " "), before, where_taken(f.card.task, f.card.threshold),
    )
    try:
        after = _finetune(f, quant, metric)
    finally:
        quant.remove()  # the model is plain again even when an epoch fails
    out = qat_path(checkpoint)
    result = QatResult(out, options.epochs, time.perf_counter() - started, before, after, metric)
    extra = {**result.to_dict(), "options": dataclasses.asdict(options), "source": checkpoint.name, "source_sha256": file_sha256(checkpoint)}
    card = _qat_card(original.card, options, checkpoint, metric, before, after)
    state = f.model.state_dict()  # removing a parametrization re-registers the weight last: keep the original's key order
    save_checkpoint(out, card, {k: state[k] for k in original.state_dict}, qat=extra)
    log.info("QAT checkpoint written: %s (val %s with fake-quant %.3f → %.3f)", out, metric.replace("_", " "), before, after)
    return result
