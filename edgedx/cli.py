"""The ``edgedx`` command: one thin wrapper per library call.

Each command makes exactly one library call (imported inside the command, so
``edgedx --help`` loads neither torch nor onnxruntime) and formats its result.
Errors derived from :class:`EdgeDxError` are caught in one place, :func:`main`,
and printed on one line with exit code 1.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
from contextlib import contextmanager, nullcontext
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from edgedx import __version__
from edgedx.errors import EdgeDxError, InputError
from edgedx.progress import STEP_LOGGER, ProgressFn, no_progress

app = typer.Typer(
    name="edgedx",
    help="Medical image classifiers from a folder of labelled images to a fast, verified deployment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
def _flags_without_type() -> None:
    """``--strict`` is a switch: typer's help would show it as ``--strict <bool>``, as if it took a value.

    Typer draws the type column from ``display_type_rich``; for flags (and
    ``--help``) it should be empty. tests/test_cli.py checks the help stays so
    if typer changes this method.
    """
    from typer.core import TyperOption

    original = TyperOption.display_type_rich
    if getattr(original, "_edgedx_flags", False):
        return

    def display_type_rich(self: TyperOption, ctx: Any) -> str | None:
        return None if self.is_flag else original(self, ctx)

    display_type_rich._edgedx_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_without_type()
console = Console(markup=False, highlight=False, soft_wrap=True)
err_console = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        console.print(f"edgedx {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress details to stderr.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, show_time=False)],
        force=True,
    )
    steps = logging.getLogger(STEP_LOGGER)  # a line per epoch/stage, with or without -v, that stays on screen
    steps.handlers[:] = [_StepHandler()]
    steps.setLevel(logging.INFO)
    steps.propagate = False


class _StepHandler(logging.Handler):
    """Step lines as plain text on stderr: above a live progress bar on a terminal, one line each in a log file."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            err_console.print(record.getMessage(), soft_wrap=True)
        except Exception:  # noqa: BLE001 - logging must never stop the work
            self.handleError(record)


@contextmanager
def progress_bar() -> Iterator[ProgressFn]:
    """A rich progress bar on a terminal; silence when output is piped or logged."""
    if not err_console.is_terminal:
        yield no_progress
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int, info: str = "") -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total or None)
            description = f"{stage} {info}" if info else stage
            bar.update(tasks[stage], completed=done, total=total or None, description=description)

        yield update


Device = Annotated[str, typer.Option(help="Inference device: auto, cpu, cuda, tensorrt, or openvino[-bf16][:GPU|NPU] (OpenVINO).")]
# CSV manifest layout, the same in train and evaluate (ISIC's labels.csv: --path-column image --image-dir images --suffix .jpg)
LabelColumn = Annotated[str, typer.Option(help="CSV manifests: the column holding the class name.")]
PathColumn = Annotated[Optional[str], typer.Option(help="CSV manifests: the column holding the image path or id (default: path, image, file or filename).")]
ImageDir = Annotated[Optional[Path], typer.Option(help="CSV manifests: the folder relative image paths start from (default: the manifest's folder).")]
Suffix = Annotated[str, typer.Option(help="CSV manifests: a suffix the ids lack, e.g. .jpg for ISIC's labels.csv.")]


@app.command()
def train(
    data: Annotated[Path, typer.Argument(help="ImageFolder (one sub-folder per class), CSV manifest (path,label[,patient_id][,split]) or MedMNIST .npz.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory for the checkpoint, split, metrics and plots.")],
    arch: Annotated[str, typer.Option(help="Any timm architecture name.")] = "tf_efficientnet_lite0",
    epochs: Annotated[int, typer.Option(help="Maximum training epochs.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 32,
    lr: Annotated[float, typer.Option(help="Learning rate of the new head (pretrained layers get --backbone-lr-factor times it).")] = 1e-3,
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (momentum 0.9, Nesterov).")] = "adamw",
    schedule: Annotated[str, typer.Option(help="cosine or plateau (reduce on plateau of the monitored metric).")] = "cosine",
    input_size: Annotated[Optional[int], typer.Option(help="Model input side in pixels (default: the architecture's).")] = None,
    crop: Annotated[str, typer.Option(help="How images become crops, in training and in diagnose: fit (whole image resized), shorter_side[:N] (shorter side to N, then sliding crops), scale[:F] (fixed factor, then sliding crops) or auto (scale when all training images have one size, else fit).")] = "auto",
    weights: Annotated[str, typer.Option(help="Starting weights: imagenet, none, a state_dict/safetensors file, or an EdgeDx checkpoint.")] = "imagenet",
    strategy: Annotated[str, typer.Option(help="full, frozen (feature extractor) or last:N (fine-tune the last N stages).")] = "full",
    backbone_lr_factor: Annotated[Optional[float], typer.Option(help="Pretrained layers' lr = lr x this (default 0.1 when pretrained).")] = None,
    imbalance: Annotated[str, typer.Option(help="weighted (class-weighted loss), sampler (balanced sampling) or none.")] = "weighted",
    augment: Annotated[str, typer.Option(help="Augmentation preset: dermoscopy, microscopy, xray, oct or none.")] = "none",
    tta: Annotated[str, typer.Option(help="Test-time views averaged with each crop: off, modality (flips/rotations the --augmentation preset allows; none for chest X-rays), or a list like hflip,vflip.")] = "off",
    normalization: Annotated[str, typer.Option(help="imagenet (the architecture's mean/std) or per_image standardisation.")] = "imagenet",
    monitor: Annotated[str, typer.Option(help="Validation metric that picks the best epoch: balanced_accuracy, auc, accuracy or loss.")] = "balanced_accuracy",
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without improvement.")] = None,
    target_sensitivity: Annotated[float, typer.Option(help="Binary tasks: the operating threshold reaches this validation sensitivity.")] = 0.95,
    calibrate: Annotated[str, typer.Option(help="temperature: fit temperature scaling on validation (through diagnose's merge) before the threshold is chosen; none: the network's own probabilities.")] = "temperature",
    coverage: Annotated[float, typer.Option(help="Binary/multiclass: prediction sets (refer when not one class) hold the true class for this share of cases, fitted on validation.")] = 0.95,
    quality_gate: Annotated[bool, typer.Option("--quality-gate/--no-quality-gate", help="Store image-quality limits (focus, exposure, colour, size) from the training images in the card.")] = True,
    um_per_px: Annotated[Optional[float], typer.Option(help="Micrometres per pixel of the training images, recorded in the card.")] = None,
    val_fraction: Annotated[float, typer.Option(help="Share held out for validation (by patient when ids exist).")] = 0.2,
    test_fraction: Annotated[float, typer.Option(help="Share held out for a test split (by patient when ids exist).")] = 0.0,
    positive_class: Annotated[Optional[str], typer.Option(help="Binary tasks: the class to screen for.")] = None,
    label_column: LabelColumn = "label",
    path_column: PathColumn = None,
    image_dir: ImageDir = None,
    suffix: Suffix = "",
    labels: Annotated[Optional[str], typer.Option(help="CSV manifests: comma-separated 0/1 columns, one per label (multi-label).")] = None,
    class_names: Annotated[Optional[str], typer.Option(help="Comma-separated class names (e.g. for .npz labels 0, 1, ...).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (mixed precision on CUDA).")] = "auto",
    strict: Annotated[bool, typer.Option(help="Fail on an unreadable image instead of skipping it.")] = False,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its last.pt.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start again in an --out that already holds a run (its checkpoints are replaced).")] = False,
    folds: Annotated[Optional[int], typer.Option(help="Patient-level k-fold cross-validation: epoch and threshold chosen out of fold, the source's val/test split (or --test-fraction) held out, the fold models averaged into RUN_DIR/ensemble.pt.")] = None,
    epoch_selection: Annotated[str, typer.Option(help="auto (out_of_fold with --folds, else the run's best validation epoch), per_run, or out_of_fold.")] = "auto",
    seed: Annotated[int, typer.Option(help="Seed for the split, initialisation and augmentation.")] = 0,
    nproc: Annotated[int, typer.Option(help="Data-parallel processes (DDP: gloo on CPU, one GPU each with nccl); --batch-size stays the global batch.")] = 1,
    hard_negatives: Annotated[Optional[Path], typer.Option(help="Binary tasks: a folder of whole images; after training, the model's false-positive tiles in them (p ≥ 0.5) are added to the training split as negatives and training goes on. Without --hard-negative-annotations every image is taken to hold no positive.")] = None,
    hard_negative_annotations: Annotated[Optional[Path], typer.Option(help="Annotations JSON (IML layout) for --hard-negatives: a tile holding a positive box centre or touching a difficult box is never mined; unannotated images are skipped.")] = None,
    hard_negative_rounds: Annotated[int, typer.Option(help="Mining rounds (each: mine with the best weights, then --hard-negative-epochs more epochs).")] = 1,
    hard_negative_epochs: Annotated[int, typer.Option(help="Epochs of further training after each mining round.")] = 2,
    hard_negative_max: Annotated[Optional[int], typer.Option(help="Crops added per round (default: as many as the training split has positive-class images).")] = None,
    mine_positives: Annotated[bool, typer.Option("--mine-positives", help="With --hard-negative-annotations: also add the tiles centred on annotated positives as the positive class (the target as the sliding crops cut it).")] = False,
    mine_positive_margin: Annotated[float, typer.Option(help="With --mine-positives: how far inside a tile (fraction of its side, from every edge) a positive centre must lie; 0 takes every tile holding it (on malaria 0 made the model call any cut cell a parasite).")] = 0.125,
) -> None:
    """Fine-tune a classifier on labelled images; writes RUN_DIR/model.pt with its model card."""
    _must_exist(data, "training data", "an ImageFolder, a CSV manifest or a .npz")  # before torch loads (seconds)
    from edgedx.training.train import CrossValidationResult, TrainConfig
    from edgedx.training.train import train as run_train

    config = TrainConfig(
        arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=schedule,
        input_size=input_size, crop=crop, weights=weights, strategy=strategy, backbone_lr_factor=backbone_lr_factor,
        imbalance=imbalance, augmentation=augment, tta=tta, normalization=normalization, monitor=monitor, patience=patience,
        target_sensitivity=target_sensitivity, calibrate=calibrate, coverage=coverage, quality_gate=quality_gate, um_per_px=um_per_px,
        val_fraction=val_fraction, test_fraction=test_fraction,
        positive_class=positive_class, label_column=label_column, label_columns=_split_names(labels),
        path_column=path_column, image_dir=str(image_dir) if image_dir else None, suffix=suffix,
        class_names=_split_names(class_names), device=device, strict=strict, resume=resume, overwrite=overwrite, seed=seed,
        epoch_selection=epoch_selection,
        hard_negatives=str(hard_negatives) if hard_negatives else None,
        hard_negative_annotations=str(hard_negative_annotations) if hard_negative_annotations else None,
        hard_negative_rounds=hard_negative_rounds, hard_negative_epochs=hard_negative_epochs, hard_negative_max=hard_negative_max,
        mine_positives=mine_positives, mine_positive_margin=mine_positive_margin,
    )
    # --nproc > 1: the launched processes log their epoch lines; a live bar here would draw over them
    with (progress_bar() if nproc == 1 else nullcontext(no_progress)) as progress:
        result = run_train(data, out, config, nproc=nproc, folds=folds, progress=progress)
    if result is None:  # another rank of a torchrun job: rank 0 reports
        return
    if isinstance(result, CrossValidationResult):
        _print_cross_validation(result.summary, folds or 0, Path(out))
        return
    _print_run(result, Path(out))


def threshold_lines(statement: dict[str, Any]) -> list[str]:
    """The shipped threshold in words: its source, the counts and interval behind it, and the costly-target warning."""
    if statement.get("threshold") is None or statement.get("positive_class") is None:
        return []
    line = f"threshold {statement['threshold']:.3g} for {statement['positive_class']} (chosen on: {statement['source'].replace('_', '-')}"
    if statement.get("n_positive") is not None:
        line += f", {statement['n_positive']} positives / {statement['n_negative']} negatives"
    if statement.get("interval"):
        low, high = statement["interval"]
        line += f"; 95% interval of the threshold {low:.3g}–{high:.3g}"
    lines = [line + ")"]
    if statement.get("warning"):
        lines.append(f"warning: {statement['warning']}")
    return lines


def _print_cross_validation(summary: dict[str, Any], folds: int, out: Path) -> None:
    """Each fold's mean ± sd, then what was chosen out of fold (labelled as selection), the held-out result, warnings."""
    from edgedx.training.oof import summary_lines
    from edgedx.training.train import CV_METRICS

    for key in CV_METRICS:
        if summary.get(key):
            console.print(f"{key}: {summary[key]['mean']:.3f} ± {summary[key]['sd']:.3f} over {folds} folds (each fold's own validation)")
    for line in summary_lines(summary):
        console.print(line)
    for warning in summary.get("warnings", []):
        console.print(f"warning: {warning}", style="yellow")
    console.print(f"per-fold runs and cv_summary.json: {out}")
    if summary.get("ensemble"):
        console.print(f"next: edgedx export {out} --out EXPORT_DIR  (the {folds} fold models as one verified ONNX)")


def _print_run(result: Any, out: Path) -> None:
    """A finished run: where the numbers were taken, the positive class and threshold, the test split, warnings, next step."""
    m = result.card.metrics
    where = _where_taken(result.card.task, result.card.threshold)
    line = (
        f"best epoch {result.best_epoch}: val accuracy {_fmt(m.get('accuracy'))} and balanced accuracy {_fmt(m.get('balanced_accuracy'))} "
        f"({where}), AUC {_fmt(m.get('macro_auc'))}"
    )
    console.print(line)
    if result.card.task == "binary":
        pos = result.card.positive_class
        console.print(
            f"positive class: {pos} (the class this model screens for); threshold {_fmt(result.card.threshold)} chosen on validation "
            f"for sensitivity ≥ {_fmt(m.get('target_sensitivity'))} to {pos}: sensitivity {_fmt(m.get('sensitivity'))}, "
            f"specificity {_fmt(m.get('specificity'))}; p({pos}) ≥ {_fmt(result.card.threshold)} → {pos}"
        )
    test = result.summary.get("test") if result.summary else None
    if test:
        console.print(
            f"held-out test split (n {test.get('n')}, at the same threshold): accuracy {_fmt(test.get('accuracy'))}, "
            f"balanced accuracy {_fmt(test.get('balanced_accuracy'))}, AUC {_fmt(test.get('macro_auc'))}"
        )
    for line in (result.summary or {}).get("trust_lines") or ():
        console.print(line)
    crop_info = result.summary.get("crop") if result.summary else None
    if crop_info:
        console.print(f"crops: {crop_info['policy']} ({crop_info['reason']}); validation metrics are measured as diagnose runs")
    note = result.summary.get("splits", {}).get("note") if result.summary else None
    if note:
        console.print(f"note: {note}", style="yellow")
    if result.skipped:
        console.print(f"{len(result.skipped)} unreadable image(s) skipped (listed in summary.json)", style="yellow")
    console.print(f"checkpoint: {result.checkpoint}")
    console.print(f"metrics, split, plots: {out}")
    warnings = result.summary.get("warnings") if result.summary else None
    for warning in warnings or ():
        console.print(f"warning: {warning}", style="yellow")
    if warnings:
        console.print("this model is not ready to deploy: review the warnings (data, labels, --positive-class, --epochs) before exporting", style="yellow")
    console.print(f"next: edgedx export {result.checkpoint} --out {out / 'export'}")


def _must_exist(path: Path, what: str, expected: str) -> None:
    """Fail in a fraction of a second, before PyTorch is imported, on a path that is not there."""
    if not path.exists():
        raise InputError(f"{what} not found: {path}; give {expected}")


def _where_taken(task: Any, threshold: float | None) -> str:
    from edgedx.runtime.outputs.plots import where_taken

    return where_taken(task, threshold) if task in ("binary", "multiclass", "multilabel") else "at the card's threshold"


def _split_names(text: str | None) -> tuple[str, ...] | None:
    return tuple(v.strip() for v in text.split(",") if v.strip()) if text else None


def artefact_line(path: Path, artefact: dict[str, Any]) -> str:
    """One line per exported file: size, precision, format and its parity with PyTorch."""
    p = artefact["parity"]
    line = (
        f"{path}  {artefact['bytes'] / 1e6:.1f} MB  {artefact['precision']} {artefact['format']}  "
        f"parity: max abs diff {p['max_abs_diff']:.2e}, top-1 agreement {p['top1_agreement']:.3f}, "
        f"max prob delta {p['max_prob_delta']:.3f}"
    )
    if p["labelled"]:
        line += f", accuracy {p['labelled']['accuracy']:.3f} (Δ {p['labelled']['accuracy_delta']:+.3f} on {p['labelled']['n']})"
    return line


def int8_line(artefact: dict[str, Any]) -> str:
    """One line per int8 file: its flavour, what stayed float and whether it runs on this machine's kernels."""
    int8 = artefact["int8"]
    kept = int8["kept_float"]
    floats = f"{len(kept)} layer(s) kept float ({', '.join(kept[:4])}{', …' if len(kept) > 4 else ''})" if kept else "every layer int8"
    reached = "reached" if int8["reached"] else "NOT reached (try --qat-epochs 2)"
    here = artefact.get("this_machine")
    where = "" if here is None else ("; runs on this CPU" if here["runs_here"] else "; not for this CPU (its self-test here fails), ships for its targets")
    return (
        f"{int8['flavour']['about']}; {floats}; agreement target {int8['target_agreement']:.3f} {reached} "
        f"(top-1 {int8['top1_agreement']:.3f}, decisions {int8['decision_agreement']:.3f} on {int8['n_search_crops']} training crops){where}"
    )


def _batch_range(text: str) -> tuple[int, int, int]:
    """"1,8,32" → (1, 8, 32), or a one-line error naming the value."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise InputError(f"--engine-batch must be three whole numbers MIN,OPT,MAX (e.g. 1,8,32), got {text!r}")
    low, opt, high = (int(p) for p in parts)
    return low, opt, high


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="An EdgeDx checkpoint (model.pt from edgedx train), or a cross-validation folder (edgedx train --folds K): its fold models are exported as one ensemble averaging their probabilities.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for the artefacts and export_report.json.")],
    precision: Annotated[
        str, typer.Option(help="Comma-separated: fp32, fp16, int8 (fp32 is always built as the reference).")
    ] = "fp32",
    engine: Annotated[bool, typer.Option("--engine", help="Also build a TensorRT engine per precision (needs a GPU and 'edgedx\\[trt]').")] = False,
    mobile: Annotated[bool, typer.Option("--mobile", help="Also write .ort files for ONNX Runtime Mobile.")] = False,
    embed_preprocessing: Annotated[
        bool, typer.Option("--embed-preprocessing", help="The model takes uint8 NHWC RGB crops and preprocesses them itself.")
    ] = False,
    simplify: Annotated[bool, typer.Option("--simplify", help="Simplify the graph with onnxslim ('edgedx\\[simplify]').")] = False,
    calibration: Annotated[
        Optional[Path], typer.Option(help="Folder of typical images for int8 calibration (default: the run's training split).")
    ] = None,
    verify_data: Annotated[
        Optional[Path], typer.Option(help="Labelled folder (one sub-folder per class) to verify on (default: the run's validation split).")
    ] = None,
    synthetic_verification_only: Annotated[
        bool, typer.Option("--synthetic-verification-only", help="When no labelled images exist: verify parity on synthetic images only, with no accuracy check (said in the report).")
    ] = False,
    engine_batch: Annotated[
        str, typer.Option(help="TensorRT optimisation profile batch sizes MIN,OPT,MAX.")
    ] = "1,8,32",
    workspace_gib: Annotated[float, typer.Option(help="TensorRT builder workspace limit in GiB.")] = 2.0,
    opset: Annotated[int, typer.Option(help="ONNX opset (18 or newer).")] = 18,
    bundle: Annotated[bool, typer.Option("--bundle", help="Also write one archive for the vendor: the verified files, their card sidecars (self-test vectors inside), the report, a README and a sha256 manifest; check it with edgedx verify BUNDLE.")] = False,
    embed_resample: Annotated[bool, typer.Option("--embed-resample", help="Also write MODEL.resample.onnx: decoded uint8 RGB image in, the image resampled per the card's crop policy out (no OpenCV needed in the app); verified at export.")] = False,
    fixed_batch: Annotated[Optional[int], typer.Option(help="Static shapes: every graph takes exactly N crops (NNAPI/CoreML take the whole graph only then; .ort files are fixed to N, or 1 by default).")] = None,
    int8_flavours: Annotated[Optional[str], typer.Option(help="int8 files to write, comma-separated: cpu (VNNI/AMX/Arm CPUs), cpu-avx2 (x86 without VNNI), tensorrt (default: cpu,cpu-avx2, plus tensorrt with --engine). The self-test on the target decides which one runs there.")] = None,
    int8_target: Annotated[float, typer.Option(help="Top-1 and decision agreement with fp32 that int8 aims for: the most harmful layers stay float until it is reached.")] = 0.99,
    qat_epochs: Annotated[int, typer.Option(help="Quantisation-aware fine-tuning before int8, for when keeping layers float is not enough: N epochs on the run's training split (writes RUN/MODEL.qat.pt; 0: off).")] = 0,
) -> None:
    """Export to ONNX (and ORT, TensorRT) with batch norm folded, the card embedded and every artefact verified against PyTorch."""
    _must_exist(checkpoint, "checkpoint", "the model.pt that edgedx train wrote, or the folder edgedx train --folds K wrote")
    for option, folder in (("--calibration", calibration), ("--verify-data", verify_data)):
        if folder is not None:
            _must_exist(folder, f"{option} folder", "a folder of images")
    from edgedx.export.ensemble import export_folds, is_cv_folder
    from edgedx.export.pipeline import ExportOptions, export_checkpoint
    from edgedx.export.precision import parse_precisions

    options = ExportOptions(
        precisions=parse_precisions(precision), engine=engine, mobile=mobile, embed_preprocessing=embed_preprocessing,
        simplify=simplify, calibration=calibration, verify_data=verify_data, opset=opset,
        synthetic_verification_only=synthetic_verification_only,
        engine_batch=_batch_range(engine_batch), workspace_gib=workspace_gib, fixed_batch=fixed_batch, bundle=bundle,
        embed_resample=embed_resample, int8_flavours=None if int8_flavours is None else tuple(int8_flavours.split(",")),
        int8_target=int8_target, qat_epochs=qat_epochs,
    )
    with progress_bar() as progress:
        if is_cv_folder(checkpoint):  # the fold models, averaged into one verified artefact
            report = export_folds(checkpoint, out, options, progress=progress)
        else:
            report = export_checkpoint(checkpoint, out, options, progress=progress)
    for artefact in report.artefacts:
        console.print(artefact_line(report.path_of(artefact), artefact))
        if "int8" in artefact:
            console.print(f"  {int8_line(artefact)}")
    bn = report.batchnorm
    console.print(
        f"batch norm: {bn['in_model']} in model, {bn['folded_by_exporter']} folded by the exporter, "
        f"{bn['folded_into_conv']} folded by EdgeDx, {bn['converted_to_affine']} made affine, {bn['remaining']} left"
    )
    verification = report.data["verification"]
    console.print(
        f"verified as diagnose runs on {verification['n_samples']} images ({verification.get('n_crops', '?')} crops; "
        f"{verification['n_real']} real, {verification['n_labelled']} labelled: {verification['source']})"
    )
    console.print(f"report: {report.report_path}")
    for line in threshold_lines(report.data.get("threshold") or {}):
        console.print(line, style="yellow" if line.startswith("warning") else None)
    for row in report.data.get("recommendations") or ():
        console.print(f"ship to {row['target']}: {row['file'] or '—'} ({row['why']})")
    if report.bundle_path is not None:
        console.print(f"bundle for the vendor: {report.bundle_path} (check it anywhere with: edgedx verify {report.bundle_path})")
    engines = [a for a in report.artefacts if a["format"] == "engine"]
    best = report.path_of(engines[-1]) if engines else report.onnx_path
    device = " --device tensorrt" if engines else ""
    console.print(f"next: edgedx diagnose IMAGES... --model {best}{device} --out results.jsonl")


@app.command()
def diagnose(
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Results file: .jsonl or .csv (--engine ray: a folder of shards named *.jsonl or *.parquet). Without it, still images are diagnosed and shown as a table.")] = None,
    inputs: Annotated[
        Optional[list[str]],
        typer.Argument(help="Image files, folders (recursive), globs, video files, camera:N or stream URLs."),
    ] = None,
    model: Annotated[
        Optional[Path], typer.Option("--model", "-m", help="Exported .onnx/.ort model or TensorRT .engine (default: the bundled model).")
    ] = None,
    overlays: Annotated[Optional[Path], typer.Option(help="Write a heat-map overlay PNG per image into this folder.")] = None,
    maps: Annotated[Optional[Path], typer.Option(help="Write each image's per-tile probability map (.npy) into this folder.")] = None,
    device: Device = "cpu",
    batch_size: Annotated[int, typer.Option(help="Crops per inference call (tiles of several images share a batch).")] = 32,
    resume: Annotated[bool, typer.Option("--resume", help="Continue OUT even without its .run.json (running the same command again continues it anyway).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start OUT again instead of continuing it.")] = False,
    audit: Annotated[Optional[Path], typer.Option(help="Append-only audit log (JSON Lines): input and model sha256, card, time, result.")] = None,
    audit_names: Annotated[str, typer.Option(help="Audit log names inputs by: path, or hash (sha256 of the name, for privacy).")] = "path",
    refer_band: Annotated[Optional[str], typer.Option(help="LOW,HIGH: binary results with p(positive) in [LOW, HIGH) are 'refer'.")] = None,
    aggregation: Annotated[Optional[str], typer.Option(help="Override the card: mean, mean_logits, max, top_k_mean, noisy_or.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="Tiles averaged by top_k_mean.")] = None,
    tile: Annotated[Optional[str], typer.Option(help="Override the card's tile size: N or H,W (pixels after scaling).")] = None,
    stride: Annotated[Optional[str], typer.Option(help="Override the card's stride: N or H,W.")] = None,
    scale: Annotated[Optional[float], typer.Option(help="Override the card's resampling factor (object size the model was trained on).")] = None,
    padding: Annotated[Optional[str], typer.Option(help="Edges of images smaller than a tile: constant, reflect or replicate.")] = None,
    min_foreground: Annotated[Optional[float], typer.Option(help="Skip tiles with a smaller foreground fraction (empty glass, black borders).")] = None,
    min_content: Annotated[Optional[float], typer.Option(help="Refuse an image whose crops are less image than this fraction (the rest padding); default from the card (0.05), 0 turns the check off.")] = None,
    centre_weighting: Annotated[Optional[str], typer.Option(help="Heat-map blending of overlapping tiles: none or gaussian.")] = None,
    every: Annotated[int, typer.Option(help="Videos and cameras: diagnose every N-th frame.")] = 1,
    window: Annotated[int, typer.Option(help="Videos and cameras: rolling decision over the last N diagnosed frames.")] = 5,
    max_frames: Annotated[Optional[int], typer.Option(help="Videos and cameras: stop after N diagnosed frames.")] = None,
    reconnect: Annotated[int, typer.Option(help="Cameras and streams: reopen a dropped source up to N times (back-off 0.5 s doubling to 8 s); 0 fails at once.")] = 5,
    max_pixels: Annotated[Optional[int], typer.Option(help="Refuse images above this many pixels, read from the header before decoding (default 250 million or $EDGEDX_MAX_IMAGE_PIXELS).")] = None,
    watch: Annotated[Optional[Path], typer.Option(help="Hot folder: diagnose each image dropped here, once, when complete (Ctrl-C stops).")] = None,
    idle_timeout: Annotated[Optional[float], typer.Option(help="With --watch: stop after this many seconds without a new image.")] = None,
    engine: Annotated[str, typer.Option(help="local (this process) or ray (Ray Data: parallel reading, a pool of model actors; still images only; needs 'edgedx\\[ray]').")] = "local",
    address: Annotated[Optional[str], typer.Option(help="--engine ray: the cluster (auto, or ray://HOST:10001); default: a local Ray on this machine.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Replay the model's self-test vectors on this machine first; refuse a model that does not reproduce its export (recorded in OUT.run.json).")] = False,
    quality: Annotated[str, typer.Option(help="card: images outside the card's quality limits (focus, exposure, colour, size, JPEG blocks) are 'reject' with the reasons and never diagnosed; off: diagnose every image.")] = "card",
    quality_limit: Annotated[Optional[list[str]], typer.Option("--quality-limit", help="NAME=VALUE overriding one of the card's limits (repeatable): focus_min=3, clipped_max=0.1, brightness_range=40,220, colour_range=10,120, min_short_side=64, blockiness_max=1.8; VALUE off turns that check off.")] = None,
    um_per_px: Annotated[Optional[float], typer.Option(help="Micrometres per pixel of the images (a scanner at D dpi: 25400/D); default: the files' TIFF resolution tags. With the card's training scale the images are resampled so objects keep their trained size.")] = None,
    slides: Annotated[Optional[Path], typer.Option(help="CSV with columns path,slide_id: which slide each field is on, for OUT.slides.jsonl (a model from edgedx fit-fields); default: each field's folder. Without INPUTS its paths are diagnosed.")] = None,
) -> None:
    """Diagnose whole images with sliding crops; one record per input (or per video frame)."""
    from edgedx.runtime.diagnose import diagnose as run_diagnose
    from edgedx.runtime.options import DiagnoseOptions

    crop = {
        "aggregation": aggregation, "top_k": top_k, "tile_size": _pair(tile, "--tile"), "stride": _pair(stride, "--stride"),
        "scale": scale, "padding": padding, "min_foreground": min_foreground, "centre_weighting": centre_weighting,
        "min_content": min_content,
    }
    options = DiagnoseOptions(
        model=model, out=out, device=device, batch_size=batch_size, crop={k: v for k, v in crop.items() if v is not None} or None,
        refer_band=_band(refer_band), overlays=overlays, maps=maps, audit=audit, audit_names=audit_names, resume=resume,
        overwrite=overwrite, every=every, window=window, max_frames=max_frames, reconnect=reconnect, max_pixels=max_pixels,
        watch=watch, idle_timeout_s=idle_timeout, engine=engine, address=address, verify=verify,
        quality=quality, quality_limits=_quality_limits(quality_limit), um_per_px=um_per_px, slides=slides,
    )
    with progress_bar() as progress:
        done = run_diagnose(inputs or [], options, progress=progress)
    summary = done.summary
    if out is None:
        _records_table(done.records, summary)
    else:
        rejected = summary.label_counts.get(None, 0)  # a label of None: an image the quality gate rejected
        counts = ", ".join(f"{n} {label}" for label, n in sorted((k, v) for k, v in summary.label_counts.items() if k is not None)) or "none"
        resumed = f", {summary.n_resumed} already done" if summary.n_resumed else ""
        gate = f", {rejected} rejected by the quality gate (reasons in 'reject_reasons')" if rejected else ""
        console.print(f"{summary.n_ok - rejected} diagnosed ({counts}){gate}, {summary.n_failed} failed{resumed}, {summary.seconds:.1f}s → {summary.out}")
        if summary.overlays:
            console.print(f"overlays: {overlays}")
        if getattr(summary, "slides", None):
            console.print(f"slides: {summary.slides}")
    if summary.n_failed:
        where = "their reasons are in the table" if out is None else f"see the 'error' field in {summary.out}"
        err_console.print(f"error: {summary.n_failed} of {summary.n_inputs} inputs could not be read; {where}")
        raise typer.Exit(1)


def _quality_limits(items: list[str] | None) -> dict[str, str] | None:
    """``["focus_min=3", "brightness_range=40,220"]`` → ``{"focus_min": "3", ...}``; the values are checked with the
    options (unknown names are refused there, naming the valid ones)."""
    if not items:
        return None
    limits: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise InputError(f"--quality-limit needs NAME=VALUE (e.g. focus_min=3 or brightness_range=40,220), got {item!r}")
        limits[name.strip()] = value.strip()
    return limits


def _records_table(records: tuple[dict[str, Any], ...], summary: Any) -> None:
    """No --out: each still image's decision and why, on the terminal."""
    table = Table(title=f"{summary.n_ok} diagnosed, {summary.n_failed} failed (give --out FILE to keep the records)")
    for column in ("input", "decision", "why"):
        table.add_column(column, overflow="fold")
    for record in records:
        why = record["rule"] or (record["error"] or "")
        table.add_row(record["input"], str(record["decision"] if record["error"] is None else "error"), why)
    console.print(table)


def _pair(text: str | None, option: str) -> tuple[int, int] | None:
    """"64" → (64, 64); "48,64" → (48, 64)."""
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise InputError(f"{option} must be N or H,W with positive whole numbers, got {text!r}")
    h = int(parts[0])
    return h, int(parts[-1])


def _band(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--refer-band must be LOW,HIGH (e.g. 0.3,0.7), got {text!r}") from None
    return low, high


audit_app = typer.Typer(help="Check an audit log written by diagnose --audit.", no_args_is_help=True, add_completion=False)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    log_file: Annotated[Path, typer.Argument(help="The audit log (JSON Lines) written by edgedx diagnose --audit.")],
) -> None:
    """Walk the log's hash chain: an edited, deleted, inserted, moved or torn line is found and named."""
    from edgedx.errors import AuditError
    from edgedx.runtime.outputs.audit import verify_audit

    result = verify_audit(log_file)
    if not result.ok:
        shown = "; ".join(result.problems[:5]) + (f"; and {len(result.problems) - 5} more" if len(result.problems) > 5 else "")
        raise AuditError(f"{log_file}: the chain is broken ({len(result.problems)} problem(s) in {result.n_lines} lines): {shown}")
    console.print(f"{log_file}: {result.n_lines} lines, chain intact; head sha256 {result.head_sha256}")
    console.print("keep the head sha256 elsewhere: it also proves the last line was not edited")
    if result.n_unchained:
        console.print(f"{result.n_unchained} line(s) carry no chain (written by an EdgeDx before 0.1 chained its log)", style="yellow")


@app.command()
def models() -> None:
    """List the models bundled with EdgeDx and their cards (use one with diagnose, or leave out --model)."""
    from edgedx.runtime.bundled import DEFAULT_MODEL, bundled_models

    found = bundled_models()
    for m in found:
        console.print(m.name + (" (default)" if m.name == DEFAULT_MODEL else ""))
        console.print(_card_grid(m.card, m.path))
        console.print()


def _card_grid(card: Any, path: Path) -> Table:
    """A model's card as label/value lines that wrap inside an 80-column terminal (a wide table did not)."""
    metrics = card.metrics
    shown = ", ".join(f"{k} {metrics[k]:.3f}" for k in ("auc", "sensitivity", "specificity") if isinstance(metrics.get(k), (int, float)))
    classes = " vs ".join(card.class_names) if card.task == "binary" else ", ".join(card.class_names)
    if card.positive_class:
        classes += f" (screens for {card.positive_class})"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True, style="bold")
    grid.add_column(overflow="fold")
    rows = [
        ("task", f"{card.task}: {classes}"),
        ("input", f"{card.input_size[1]}×{card.input_size[0]} px, {card.crop.describe()}"),
        ("threshold", _fmt(card.threshold) + (f": p({card.positive_class}) ≥ {_fmt(card.threshold)} → {card.positive_class}" if card.positive_class and card.threshold is not None else "") + _threshold_source(card)),
        (_METRICS_SPLIT.get(metrics.get("split"), "validation"), (shown + (f" at threshold {_fmt(card.threshold)}" if card.threshold is not None and "sensitivity" in shown else "")) or "—"),
        ("file", f"{path} ({path.stat().st_size / 1e6:.1f} MB)"),
        ("intended use", card.intended_use),
    ]
    for label, value in rows:
        grid.add_row(f"  {label}", value)
    return grid


_METRICS_SPLIT = {"out_of_fold": "out of fold", "test": "test"}


def _threshold_source(card: Any) -> str:
    """Where the threshold came from, with its interval: ``(out of fold, 95% 0.10-0.20)``; nothing for older cards."""
    choice = card.threshold_choice
    if choice.source == "unknown":
        return ""
    interval = f", 95% {_fmt(choice.interval[0])}-{_fmt(choice.interval[1])}" if choice.interval else ""
    return f" ({choice.source.replace('_', ' ')}{interval})"


@app.command("verify")
def verify_model(
    model: Annotated[Path, typer.Argument(help="Exported .onnx/.ort model or TensorRT .engine (or an export folder).")],
    device: Device = "cpu",
) -> None:
    """Replay the model's self-test vectors on this machine: does it reproduce what export measured? (A bundle: every file too.)"""
    from edgedx.runtime.selftest import is_bundle, verify_artefact, verify_bundle

    if is_bundle(model):
        checked = verify_bundle(model, device)
        console.print(f"{model}: all {checked.files} files match the bundle's sha256 manifest")
        for name, result in checked.reports:
            console.print(f"{name}: {result.summary()}")
        if not checked.passed:
            err_console.print(f"error: a model in {model} does not reproduce its export on this machine; use one that passed here")
            raise typer.Exit(1)
        return
    report = verify_artefact(model, device)
    console.print(report.summary())
    console.print(f"vectors: {report.n} real crops from {report.source or 'the export'}; reference: the fp32 PyTorch model")
    if not report.passed:
        err_console.print(
            f"error: {model} does not reproduce its export on this machine ({report.precision} rounds differently here); "
            "use the fp32 model on this machine, or another --device"
        )
        raise typer.Exit(1)


@app.command()
def evaluate(
    model: Annotated[Path, typer.Argument(help="Exported .onnx/.ort model or TensorRT .engine.")],
    data: Annotated[Path, typer.Argument(help="ImageFolder (sub-folders named as the model's classes), CSV manifest, .npz, or a training run folder (its own held-out images).")],
    split: Annotated[str, typer.Option(help="Which split of a run folder, a .npz or a CSV with a split column (val, test); all: every row of a CSV without one.")] = "val",
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for evaluation.json, plots and report.html.")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% intervals (0: none).")] = 1000,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON.")] = None,
    label_column: LabelColumn = "label",
    path_column: PathColumn = None,
    image_dir: ImageDir = None,
    suffix: Suffix = "",
    device: Device = "cpu",
    annotations: Annotated[Optional[Path], typer.Option(help="Object annotations of whole fields (IML annotations.json): DATA is then a folder of fields, scored field by field and parasite by parasite at the card's detection settings.")] = None,
    slides: Annotated[Optional[Path], typer.Option(help="With --annotations: CSV with columns path,slide_id grouping the fields into slides (default: each field's folder), scored at the card's slide rule.")] = None,
) -> None:
    """Score a deployed model on labelled images (or annotated whole fields), through the same path as diagnose."""
    from edgedx.runtime.evaluate import evaluate as evaluate_data, trust_lines
    from edgedx.runtime.io.manifest import ManifestLayout

    layout = ManifestLayout(path_column, label_column, str(image_dir) if image_dir else None, suffix)
    fields = {k: v for k, v in {"annotations": annotations, "slides": slides}.items() if v is not None}
    with progress_bar() as progress:
        report = evaluate_data(model, data, split=split, device=device, bootstrap=bootstrap, out=out, layout=layout, progress=progress, **fields)
    if annotations is not None:
        _print_field_evaluation(report, out, json_out)
        return
    m = report.metrics
    table = Table(title=f"{model.name} on {report.data}")
    for col in ("class", "sensitivity", "specificity", "precision", "f1", "support"):
        table.add_column(col)
    for name, row in m["per_class"].items():
        table.add_row(name, *(_fmt(row[k]) for k in ("sensitivity", "specificity", "precision", "f1", "support")))
    console.print(table)
    ci, sizes = m.get("ci95") or {}, m.get("ci95_n") or {}

    def with_ci(key: str, value: float | None) -> str:
        interval = ci.get(key)
        return _fmt(value) + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "") + (f" (n={sizes[key]})" if key in sizes else "")

    where = f"at threshold {_fmt(report.threshold)}" if report.threshold is not None else "at argmax"
    console.print(
        f"{where}, 95% intervals (Wilson for proportions, bootstrap for AUC): n {m['n']}  accuracy {with_ci('accuracy', m['accuracy'])}  "
        f"balanced accuracy {with_ci('balanced_accuracy', m['balanced_accuracy'])}  AUC {with_ci('auc', m.get('auc', m.get('macro_auc')))}"
    )
    if "sensitivity" in m:
        console.print(f"{where}: sensitivity {with_ci('sensitivity', m['sensitivity'])}  specificity {with_ci('specificity', m['specificity'])}")
    if "at_0.5" in m:
        half = m["at_0.5"]
        console.print(f"at 0.5: accuracy {_fmt(half['accuracy'])}  sensitivity {_fmt(half['sensitivity'])}  specificity {_fmt(half['specificity'])}")
    for line in trust_lines(report):
        console.print(line)
    if report.failed:
        console.print(f"{len(report.failed)} image(s) could not be read", style="yellow")
    if out:
        console.print(f"report: {out / 'report.html'}")
        console.print(f"{report.n_misclassified} misclassified image(s) {where}, most confidently wrong first: {out / 'misclassified.csv'}")
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        console.print(f"report: {json_out}")


@app.command()
def bench(
    models: Annotated[list[Path], typer.Argument(help="Exported artefacts (.onnx, .ort, .engine), e.g. the fp32/fp16/int8 files of one export.")],
    batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1,8",
    devices: Annotated[str, typer.Option(help="Comma-separated devices: cpu, cuda, tensorrt, auto, openvino, openvino-bf16, openvino:GPU, openvino:NPU.")] = "cpu",
    image_sizes: Annotated[
        Optional[str], typer.Option(help="Whole-image sizes WxH, comma-separated (e.g. 1280x960,4000x3000): per-stage breakdown.")
    ] = None,
    data: Annotated[Optional[Path], typer.Option(help="Labelled ImageFolder: each artefact's accuracy goes into the table.")] = None,
    seconds: Annotated[float, typer.Option(help="Minimum timed seconds per measurement.")] = 2.0,
    threads: Annotated[Optional[int], typer.Option(help="Inference threads (default: ONNX Runtime's).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write results and environment as JSON.")] = None,
) -> None:
    """Latency and throughput: p50/p90/p99 and images/s per artefact, device and batch size; whole images by stage."""
    from edgedx.runtime.bench import bench_models

    sizes = _parse_ints(batch_sizes, "--batch-sizes")
    with progress_bar() as progress:
        report = bench_models(
            models, batch_sizes=sizes, devices=_split_list(devices), image_sizes=_image_sizes(image_sizes), data=data,
            threads=threads, min_seconds=seconds, progress=progress,
        )
    env = report.environment
    gpu = env["gpu"] if env["gpu"] == "no GPU" else f"GPU: {env['gpu']}"
    # fits 80 columns: one space between columns, the quality column folds onto two lines rather than vanish
    table = Table(title=f"{env['cpu']} ({env['cores']} cores), {gpu}; latency in ms", box=box.SIMPLE, collapse_padding=True, pad_edge=False)
    for col in ("artefact", "prec.", "device", "MB", "parity / accuracy", "batch", "p50", "p90", "p99", "img/s"):
        left = col in ("artefact", "prec.", "device", "parity / accuracy")
        quality = col == "parity / accuracy"
        table.add_column(col, justify="left" if left else "right", no_wrap=not quality, overflow="fold", min_width=11 if quality else None)
    for r in report.rows:
        table.add_row(
            r.artefact + (f" ×{r.members}" if r.members > 1 else ""), r.precision, r.device, f"{r.size_mb:.1f}",
            _quality(r.parity, r.accuracy), str(r.batch_size), f"{r.p50_ms:.2f}", f"{r.p90_ms:.2f}", f"{r.p99_ms:.2f}",
            f"{r.images_per_s:.0f}",
        )
    console.print(table)
    if any(r.members > 1 for r in report.rows):
        console.print("×K: a fold ensemble of K networks averaged in one file; it costs about K single models")
    engines = sorted({f"{r.device}: {r.providers[0] if r.providers else '?'}" for r in report.rows})
    if engines:
        console.print("ran on " + ", ".join(engines))
    if report.image_rows:
        whole = Table(title="whole images (median ms per stage)", box=box.SIMPLE)
        for col in ("artefact", "device", "image", "tiles", "decode", "tile+prep", "inference", "merge", "p50 ms", "tiles/s"):
            whole.add_column(col, justify="left" if col in ("artefact", "device", "image") else "right")
        for r in report.image_rows:
            st = r.stages_ms
            whole.add_row(
                r.artefact, r.device, f"{r.image_size[1]}×{r.image_size[0]}", str(r.tiles), f"{st['decode']:.1f}",
                f"{st['tiling_preprocess']:.1f}", f"{st['inference']:.1f}", f"{st['merge']:.2f}", f"{r.p50_ms:.1f}",
                f"{r.tiles_per_s:.0f}",
            )
        console.print(whole)
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        console.print(f"results: {json_out}")


def _quality(parity: dict | None, accuracy: float | None) -> str:
    parts = []
    if parity and parity.get("top1_agreement") is not None:
        parts.append(f"agree {parity['top1_agreement']:.3f}")
    if accuracy is not None:
        parts.append(f"acc {accuracy:.3f}")
    return ", ".join(parts) or "—"


def _split_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InputError(f"expected a comma-separated list, got {text!r}")
    return items


def _image_sizes(text: str | None) -> list[tuple[int, int]]:
    """"1280x960,512x512" → [(960, 1280), (512, 512)] as (height, width)."""
    if not text:
        return []
    sizes = []
    for item in _split_list(text):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise InputError(f"--image-sizes takes WxH items like 1280x960, got {item!r}")
        sizes.append((int(parts[1]), int(parts[0])))
    return sizes


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo leaves its checkpoint, model, results and overlays.")] = Path("edgedx-demo"),
    seed: Annotated[int, typer.Option(help="Seed for the synthetic data and training.")] = 0,
) -> None:
    """Offline end to end on synthetic blood smears: train, export, diagnose whole fields."""
    from edgedx.demo import run_demo

    with progress_bar() as progress:
        result = run_demo(out, seed=seed, progress=progress)
    console.print("The images are synthetic (rendered thin blood smears), not patient data.", style="bold")
    table = Table(title="Whole-field diagnosis with sliding crops", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col in ("field", "truth", "infected", "EdgeDx", "p(parasitized)", "crops", "max tile"):
        table.add_column(col, no_wrap=True)
    for row in result.rows:
        table.add_row(
            Path(row.field).stem, row.truth, row.infected_cells, row.label,
            f"{row.probability:.3f}", str(row.n_crops), f"{row.max_tile:.3f}",
        )
    console.print(table)
    console.print(
        f"tile validation accuracy {result.val_accuracy:.3f}; fields correct {result.fields_correct}/{len(result.rows)}; "
        f"export parity max abs diff {result.parity_max_abs_diff:.2e}; {result.seconds:.0f}s in all"
    )
    for label, path in result.paths.items():
        console.print(f"{label}: {path}")


@app.command("recalibrate")
def recalibrate_command(
    model: Annotated[Path, typer.Argument(help="Exported .onnx model (or its export folder); it is never modified.")],
    site_data: Annotated[Path, typer.Argument(help="50–500 labelled local cases: an ImageFolder (sub-folders named as the model's classes) or a CSV manifest.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the new model (<stem>.<site>.onnx with its .sha256 and card sidecar) and recalibration_report.json.")],
    holdout: Annotated[Optional[float], typer.Option(help="Share of the cases held out to report the old and new operating points on (default 0.3 from 100 cases, else 0: fitted and reported on the same cases).")] = None,
    target_sensitivity: Annotated[Optional[float], typer.Option(help="Binary: the sensitivity the new threshold reaches on the fitting cases (default: the card's).")] = None,
    coverage: Annotated[Optional[float], typer.Option(help="Prediction-set coverage to refit qhat for (default: the card's; none when it has none).")] = None,
    site: Annotated[Optional[str], typer.Option(help="Site name in the new file's name (default: the data's folder or file name).")] = None,
    name: Annotated[Optional[str], typer.Option(help="The new file's name, ending in .onnx (instead of <stem>.<site>.onnx).")] = None,
    split: Annotated[str, typer.Option(help="CSV manifests with a split column: which rows to use (default all).")] = "all",
    label_column: LabelColumn = "label",
    path_column: PathColumn = None,
    image_dir: ImageDir = None,
    suffix: Suffix = "",
    device: Device = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the fit/held-out split and the bootstrap.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file of the same name.")] = False,
) -> None:
    """Refit temperature, threshold and refer rules on a site's labelled cases; writes a NEW model whose lineage names its parent."""
    _must_exist(model, "model", "an exported .onnx file or its export folder")
    _must_exist(site_data, "site data", "an ImageFolder (one sub-folder per class) or a CSV manifest")
    from edgedx.export.recalibrate import RecalibrateOptions
    from edgedx.export.recalibrate import recalibrate as recalibrate_model
    from edgedx.runtime.io.manifest import ManifestLayout

    options = RecalibrateOptions(
        holdout=holdout, target_sensitivity=target_sensitivity, coverage=coverage, site=site, name=name, split=split,
        layout=ManifestLayout(path_column, label_column, str(image_dir) if image_dir else None, suffix),
        device=device, seed=seed, overwrite=overwrite,
    )
    with progress_bar() as progress:
        report = recalibrate_model(model, site_data, out, options, progress=progress)
    _print_recalibration(report)


def _print_recalibration(report: Any) -> None:
    """Old against new on the site cases, the honesty note, the new file and its self-test."""
    old, new = report.operating_points["old"], report.operating_points["new"]

    def cell(point: dict[str, Any], key: str) -> str:
        value, ci, counts = point.get(key), point.get(f"{key}_ci95"), point.get(f"{key}_counts")
        text = _fmt(value) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
        return text + (f" ({counts[0]}/{counts[1]})" if counts else "")

    table = Table(title=f"site cases (n {report.evaluated_on}), 95% intervals", box=box.SIMPLE)
    for col in ("", "old card (as deployed)", "recalibrated"):
        table.add_column(col)
    temps = [report.old.get("temperature"), report.new.get("temperature")]
    table.add_row("temperature", *("none" if t is None else ", ".join(f"{v:.3g}" for v in t) for t in temps))
    if new.get("threshold") is not None:
        table.add_row("threshold", _fmt(old.get("threshold")), _fmt(new.get("threshold")))
    for key in ("sensitivity", "specificity", "accuracy", "ece"):
        if key in new:
            table.add_row(key.upper() if key == "ece" else key, cell(old, key), cell(new, key))
    console.print(table)
    console.print(f"note: {report.note}", style="yellow")
    for warning in report.warnings:
        console.print(f"warning: {warning}", style="yellow")
    console.print(f"new model: {report.output} (parent {Path(report.parent).name} sha256 {report.parent_sha256[:12]}…, unchanged)")
    console.print(f"self-test of the new model here: {'passed' if report.selftest['passed'] else 'FAILED'}; check anywhere with: edgedx verify {report.output}")
    console.print(f"report: {report.report_path}")


def _point_lines(point: dict[str, Any]) -> list[str]:
    """An operating point on fields, in lines: parasites found, false detections, field sensitivity/specificity, errors."""
    def ci(values: Any) -> str:
        return f" [{values[0]:.3f}, {values[1]:.3f}]" if values else ""

    f = point["field"]
    lines = [
        f"parasites found {point['found']} of {point['n_parasites']} at {_fmt(point['false_per_field'])} false detections per field "
        f"({point['n_fields']} fields)",
        f"fields ({f['n_positive_fields']} positive): sensitivity {_fmt(f['sensitivity'])}{ci(f['sensitivity_ci95'])}, "
        f"specificity {_fmt(f['specificity'])}{ci(f['specificity_ci95'])}",
    ]
    if "parasitaemia" in point:
        lines.append(f"parasitaemia per field: mean absolute error {_fmt(point['parasitaemia']['mae_points'])} points "
                     f"({point['parasitaemia']['n_fields']} fields)")
    if "cell_count" in point:
        lines.append(f"red cells per field: mean absolute error {_fmt(point['cell_count']['mae'])} cells")
    return lines


def _slide_line(slides: dict[str, Any]) -> str:
    """Slides at the card's slide rule, saying how fields were grouped (a single folder is a single slide)."""
    def ci(values: Any) -> str:
        return f" [{values[0]:.3f}, {values[1]:.3f}]" if values else ""

    grouped = slides["grouped_by"] if isinstance(slides["grouped_by"], str) else " and ".join(slides["grouped_by"])
    mae = slides["parasitaemia_mae_points"]
    return (
        f"slides ({slides['n_slides']}, {slides['n_positive_slides']} positive, grouped by {grouped}; rule {slides['rule']}): "
        f"sensitivity {_fmt(slides['sensitivity'])}{ci(slides['sensitivity_ci95'])}, specificity {_fmt(slides['specificity'])}"
        f"{ci(slides['specificity_ci95'])}" + (f"; pooled parasitaemia mean absolute error {_fmt(mae)} points" if mae is not None else "")
    )


def _froc_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, box=box.SIMPLE)
    for col in ("false per field ≤", "tile threshold", "parasites found", "false per field"):
        table.add_column(col)
    for row in rows:
        table.add_row(f"{row['fp_per_field']:g}", f"{row['threshold']:.4g}", f"{row['found']}", _fmt(row["false_per_field"]))
    return table


def _print_field_evaluation(report: Any, out: Optional[Path], json_out: Optional[Path]) -> None:
    """evaluate --annotations: the card's operating point on the fields, then the FROC."""
    d = report.detection
    console.print(f"{Path(report.model).name} on {report.counts['n_scored']} annotated fields of {report.data}: tile threshold "
                  f"{report.point['tile_threshold']:.4g}, field rule {d['field_rule']} (k {d['field_k']})")
    for line in _point_lines(report.point):
        console.print(line)
    if getattr(report, "slides", None):
        console.print(_slide_line(report.slides))
    console.print(_froc_table(report.froc, "parasites found against false detections per field (FROC)"))
    if out:
        console.print(f"report: {out / 'evaluation.json'}")
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
        console.print(f"report: {json_out}")


@app.command("fit-fields")
def fit_fields_command(
    model: Annotated[Path, typer.Argument(help="Exported .onnx model (or its export folder); it is never modified.")],
    fields: Annotated[Path, typer.Argument(help="Folder of annotated whole fields the model was not trained on (IML: malaria_fields_iml/images).")],
    annotations: Annotated[Path, typer.Option(help="Their object annotations (IML layout: a list of {image_name, objects: [{type, bbox}]}).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the new model (<stem>.fields.onnx with its .sha256 and card sidecar) and fit_fields_report.json.")],
    fp_per_field: Annotated[float, typer.Option(help="Mean false detections per field the tile threshold allows (the lowest threshold within it is chosen).")] = 1.0,
    count_cells: Annotated[bool, typer.Option("--count-cells/--no-count-cells", help="Count red cells: parasitaemia in every record.")] = True,
    field_rule: Annotated[str, typer.Option(help="auto (best field-level balanced accuracy, ties to the simplest), any, count_at_least or top_k_mean.")] = "auto",
    slide_k: Annotated[int, typer.Option(help="Positive fields a slide needs, where the slide rule cannot be fitted (the fields do not form both positive and negative slides).")] = 1,
    slides: Annotated[Optional[Path], typer.Option(help="CSV with columns path,slide_id grouping the fields into slides (default: each field's folder); with positive and negative slides the slide rule is fitted.")] = None,
    name: Annotated[Optional[str], typer.Option(help="The new file's name, ending in .onnx.")] = None,
    neighbour_context: Annotated[Optional[float], typer.Option(help="Blend each crop's positive probability with its brightest grid neighbour's by this weight (0 to below 0.5), in the new card, before fitting (0: off; default: the card's). Choose it on other fields than these (benchmarks/neighbour_context.py chose it on IML training fields).")] = None,
    device: Device = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the 2-fold cross-fit's split.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output file of the same name.")] = False,
) -> None:
    """Fit the field and slide operating points (tile threshold, field rule) on annotated fields; writes a NEW model with detection on."""
    _must_exist(model, "model", "an exported .onnx file or its export folder")
    _must_exist(fields, "fields folder", "a folder of the annotated field images")
    from edgedx.export.fit_fields import FitFieldsOptions, fit_fields

    options = FitFieldsOptions(
        fp_per_field=fp_per_field, count_cells=count_cells, field_rule=field_rule, slide_k=slide_k, name=name, device=device, seed=seed,
        overwrite=overwrite, neighbour_context=neighbour_context,
    )
    with progress_bar() as progress:
        report = fit_fields(model, fields, annotations, out, options, progress=progress, slides=slides)
    _print_field_fit(report)


def _print_field_fit(report: Any) -> None:
    """The chosen point, its figures fitted and cross-fitted, the FROC, the new file and its self-test."""
    d = report.detection
    threshold = "" if d["field_threshold"] is None else f", field threshold {d['field_threshold']:.4g}"
    slides = (d.get("fitted_on") or {}).get("slides") or {}
    fitted = (f"fitted on {slides['n_slides']} slides: sensitivity {_fmt(slides['sensitivity'])}, specificity {_fmt(slides['specificity'])}, optimistic"
              if slides.get("fitted") else "not fitted")
    console.print(f"chosen on {report.counts['n_scored']} fields: tile threshold {d['tile_threshold']:.4g}, field rule {d['field_rule']} "
                  f"(k {d['field_k']}{threshold}), slide rule {d['slide_rule']} (k {d['slide_k']}, {fitted})")
    blend = report.neighbour_context
    console.print(f"crops: each blended {blend:g} with its brightest grid neighbour (crop.neighbour_context)" if blend
                  else "crops: each crop's own probability (crop.neighbour_context 0)")
    if slides and not slides.get("fitted"):
        console.print(f"slides: {slides['why']}", style="yellow")
    console.print("fitted (chosen and read on the same fields: optimistic):", style="yellow")
    for line in _point_lines(report.fitted):
        console.print(f"  {line}")
    if report.cross_fitted is not None:
        console.print("cross-fitted (2-fold: chosen on one half, read on the other; what to expect):")
        for line in _point_lines(report.cross_fitted):
            console.print(f"  {line}")
    console.print(_froc_table(report.froc, "all fields: parasites found against false detections per field (FROC)"))
    for warning in report.warnings:
        console.print(f"warning: {warning}", style="yellow")
    console.print(f"new model: {report.output} (parent {Path(report.parent).name} sha256 {report.parent_sha256[:12]}…, unchanged)")
    console.print(f"self-test of the new model here: {'passed' if report.selftest['passed'] else 'FAILED'}; report: {report.report_path}")


@app.command("monitor")
def monitor_command(
    results: Annotated[Path, typer.Argument(help="Results of edgedx diagnose (.jsonl or .csv).")],
    model: Annotated[Optional[Path], typer.Option(help="The model that wrote the results (.onnx, export folder) or its card JSON: the training references to compare with.")] = None,
    window: Annotated[int, typer.Option(help="Records per rolling window; the flags judge the last one.")] = 100,
    fail_on_drift: Annotated[bool, typer.Option("--fail-on-drift", help="Exit 1 when a shift is found (for a scheduled check).")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON.")] = None,
) -> None:
    """Compare recent diagnose results with the training images: confidence, refer and reject rates, image quality."""
    from edgedx.runtime.monitor import MonitorOptions
    from edgedx.runtime.monitor import monitor as run_monitor

    report = run_monitor(results, model, MonitorOptions(window=window))
    _print_monitor(report)
    if json_out:
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        console.print(f"report: {json_out}")
    if fail_on_drift:
        report.raise_if_drift()


def _print_monitor(report: Any) -> None:
    """A short table (recent windows, the last window, overall), then the flags and what could not be compared."""
    table = Table(title=f"{report.results}: {report.n} records", box=box.SIMPLE, pad_edge=False, collapse_padding=True)
    for col in ("records", "errors", "confidence", "refer", "reject", "brightness", "focus", "clipped", "colour"):
        table.add_column(col, justify="left" if col == "records" else "right")

    def pct(x: float | None) -> str:
        return "—" if x is None else f"{x:.0%}"

    rows = [(f"{w.start}–{w.end}", w) for w in report.windows[-5:]]
    rows += [(f"last {report.current.n}", report.current), ("all", report.overall)]
    for label, w in rows:
        q = w.quality
        table.add_row(
            label, str(w.n_errors), "—" if w.confidence is None else f"{w.confidence['mean']:.2f}", pct(w.refer_rate), pct(w.reject_rate),
            *("—" if m not in q else (f"{q[m]:.3f}" if m == "clipped" else f"{q[m]:.0f}") for m in ("brightness", "focus", "clipped", "colour")),
        )
    console.print(table)
    for flag in report.flags:
        console.print(f"{'SHIFT' if flag.severity == 'shift' else 'watch'}: {flag.message}", style="red" if flag.severity == "shift" else "yellow")
    for line in report.cannot_compare:
        console.print(f"cannot compare: {line}", style="yellow")
    for note in report.notes:
        console.print(f"note: {note}", style="yellow")
    if not report.flags and report.expected:
        console.print(f"no shift found against the card's references ({', '.join(sorted(report.expected))})")


def _parse_ints(text: str, option: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{option} takes comma-separated integers, got {text!r}") from None  # exit 1, like every other value error


def _fmt(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def main() -> None:
    """Entry point: the one place EdgeDx errors become a one-line message and exit code 1."""
    signal.signal(signal.SIGTERM, _stop)  # a service stop ends like Ctrl-C: files closed, records kept
    signal.signal(signal.SIGINT, _stop)
    try:
        app()
    except EdgeDxError as exc:
        err_console.print(f"error: {exc}", style="red", soft_wrap=True)
        sys.exit(1)
    except (_Stopped, KeyboardInterrupt):
        err_console.print(interrupted_message(sys.argv[1:]))
        sys.exit(130)


def interrupted_message(args: list[str]) -> str:
    """What Ctrl-C or SIGTERM left, and the exact way to go on, for the command that was running."""
    if args[:1] == ["train"]:
        saved = "interrupted: the epochs finished so far are saved in the run's last.pt; "
        if "--resume" in args:
            return saved + "run the same command again to continue"
        if "--overwrite" in args:
            return saved + "run the same command with --resume instead of --overwrite to continue"
        return saved + "run the same command with --resume added to continue"
    return "interrupted: everything finished so far is saved; run the same command again to continue"


class _Stopped(BaseException):
    """Ctrl-C or SIGTERM. Not a KeyboardInterrupt, which click swallows with a silent exit: the user must hear how to go on."""


def _stop(signum: int, frame: object) -> None:
    raise _Stopped(signum)


if __name__ == "__main__":
    main()
