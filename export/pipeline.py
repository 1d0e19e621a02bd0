"""``edgedx export``: a checkpoint → verified ONNX (fp32/fp16/int8), ORT and TensorRT artefacts.

Convert, then verify, and return the evidence. Every artefact diagnoses the
same real images as the fp32 PyTorch model (the run's validation split, or the
user's labelled folder), both through the runtime's own diagnosis path (same
reading, crops, preprocessing and merging as ``diagnose``), and is judged
against its precision's tolerance; the report records batch-norm counts, parity
per artefact, sizes, hashes, versions and timings. If labelled images cannot be
found the export stops and names ``--verify-data``: verification is never
silently weaker. An artefact that fails is renamed ``*.failed`` so it cannot be
deployed by mistake; the ones that passed stay, and the export raises
:class:`ParityError` (:class:`PartialExportError` when some passed) after
writing the report, naming both and the next step.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

import edgedx
from edgedx.card import ONNX_METADATA_KEY, ModelCard, sidecar_path
from edgedx.errors import InputError, ParityError, PartialExportError
from edgedx.export.bn_fold import assert_no_batchnorm, count_batchnorms, fold_batchnorms
from edgedx.export.onnx_export import DEFAULT_OPSET, check_graph, embed_metadata, simplify, torch_to_onnx
from edgedx.export.parity import ParityReport, PathOutputs, compare_outputs, diagnose_outputs, parity_crops
from edgedx.export.int8 import DEFAULT_FLAVOURS, FLAVOUR_KEY, INT8_FLAVOURS, Int8Flavour, Int8Result, controlled_int8, exact_probabilities, parse_flavours
from edgedx.export.precision import parse_precisions, to_fp16
from edgedx.export.preprocess_graph import embed_preprocessing
from edgedx.export.resample_graph import decoded_images, write_resample_graph
from edgedx.export.samples import Samples, SplitUnavailable, calibration_crops, folder_samples, split_samples
from edgedx.export.selftest import N_INT8_VECTORS, N_VECTORS, embed_selftest, for_precision, selftest_vectors
from edgedx.export.bundle import write_bundle
from edgedx.export.sidecar import write_card_sidecar
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.io.integrity import CHECKSUM_SUFFIX, atomic_write_bytes, write_checksum
from edgedx.runtime.backends.onnx_backend import OnnxSession
from edgedx.runtime.selftest import SELFTEST_KEY, SelfTestVectors, run_selftest
from edgedx.training.checkpoint import build_model, file_sha256, load_checkpoint
from edgedx.training.validation import TorchSession

log = logging.getLogger(__name__)

CHECKPOINT_SHA_KEY = "edgedx.checkpoint_sha256"
PRECISION_KEY = "edgedx.precision"
REPORT_NAME = "export_report.json"
MIN_PARITY_SAMPLES = 16


@dataclass(frozen=True)
class ExportOptions:
    """What to build. fp32 ONNX is always built: it is the reference the other artefacts derive from."""

    precisions: tuple[str, ...] = ("fp32",)
    engine: bool = False
    mobile: bool = False
    embed_preprocessing: bool = False
    simplify: bool = False
    calibration: Path | None = None
    verify_data: Path | None = None
    synthetic_verification_only: bool = False  # explicit opt-in: parity on synthetic images, no accuracy check
    opset: int = DEFAULT_OPSET
    verify_samples: int = 256
    calibration_samples: int = 128
    engine_batch: tuple[int, int, int] = (1, 8, 32)
    workspace_gib: float = 2.0
    fixed_batch: int | None = None  # static shapes: every graph takes exactly this many crops (NNAPI/CoreML, fixed pipelines)
    bundle: bool = False  # one archive for the vendor: artefacts, sidecars, report, README, sha256 manifest
    embed_resample: bool = False  # also write {stem}.resample.onnx: decoded image -> resampled image, verified
    int8_flavours: tuple[str, ...] | None = None  # None: the CPU flavours, plus TensorRT's with --engine
    int8_target: float = 0.99  # top-1 and decision agreement with fp32 that accuracy-controlled int8 aims for
    qat_epochs: int = 0  # > 0: quantisation-aware fine-tuning of the checkpoint before int8 (run/<stem>.qat.pt)

    def __post_init__(self) -> None:
        object.__setattr__(self, "precisions", parse_precisions(self.precisions))
        flavours = self.int8_flavours or (*DEFAULT_FLAVOURS, *(("tensorrt",) if self.engine else ()))
        object.__setattr__(self, "int8_flavours", parse_flavours(flavours))
        if not 0.0 < self.int8_target <= 1.0:
            raise InputError(f"--int8-target must be in (0, 1], got {self.int8_target}")
        if self.qat_epochs < 0:
            raise InputError(f"--qat-epochs must be 0 (off) or more, got {self.qat_epochs}")
        lo, opt, hi = self.engine_batch
        if not 1 <= lo <= opt <= hi:
            raise InputError(f"engine batch range must satisfy 1 <= min <= opt <= max, got {self.engine_batch}")
        if self.verify_samples < 1 or self.calibration_samples < 1:
            raise InputError("verify_samples and calibration_samples must be at least 1")
        if self.fixed_batch is not None and self.fixed_batch < 1:
            raise InputError(f"--fixed-batch must be at least 1, got {self.fixed_batch}")

    @property
    def mobile_batch(self) -> int:
        """The batch .ort files are fixed to: NNAPI and CoreML take a graph whole only with static shapes."""
        return self.fixed_batch or 1


@dataclass(frozen=True)
class Artefact:
    path: Path
    format: str  # onnx | ort | engine
    precision: str
    parity: ParityReport
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)
    vectors: SelfTestVectors | None = field(default=None, repr=False, compare=False)  # what the file carries

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path.name,
            "format": self.format,
            "precision": self.precision,
            "bytes": self.path.stat().st_size if self.path.exists() else None,
            "sha256": file_sha256(self.path) if self.path.exists() else None,
            "seconds": round(self.seconds, 2),
            "parity": self.parity.to_dict(),
            **self.extra,
        }


@dataclass(frozen=True)
class ExportReport:
    onnx_path: Path
    report_path: Path
    data: dict[str, Any]
    bundle_path: Path | None = None  # --bundle: the vendor's archive

    @property
    def artefacts(self) -> list[dict[str, Any]]:
        return self.data["artefacts"]

    @property
    def parity(self) -> dict[str, Any]:
        """Parity of the fp32 ONNX (the reference artefact)."""
        return self.artefacts[0]["parity"]

    @property
    def batchnorm(self) -> dict[str, int]:
        return self.data["batchnorm"]

    def path_of(self, artefact: dict[str, Any]) -> Path:
        return self.report_path.parent / artefact["path"]


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    options: ExportOptions | None = None,
    *,
    progress: ProgressFn = no_progress,
) -> ExportReport:
    """Build, verify and report every artefact ``options`` asks for; raise ParityError if any fails."""
    options = options or ExportOptions()
    started = time.perf_counter()
    checkpoint, qat = _source_checkpoint(Path(checkpoint), options, progress)
    ckpt = load_checkpoint(checkpoint)
    card = ckpt.card
    model = build_model(ckpt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(checkpoint).stem
    _forget_previous_export(out, stem)
    steps = 3 + len(options.precisions) * (1 + options.mobile + options.engine)  # graph, reference, artefacts, report
    step = _stepper(progress, steps)

    # -- fp32 graph -------------------------------------------------------------------
    t0 = time.perf_counter()
    graph, bn_counts, card = _fp32_graph(model, card, options, sha=file_sha256(ckpt.path) if ckpt.path else "")
    onnx_path = out / f"{stem}.onnx"
    onnx.save(graph, onnx_path)
    fp32_seconds = time.perf_counter() - t0
    step("fp32 onnx")

    # -- the images every artefact is judged on, through the diagnosis path ---------------
    verify = _verification_samples(ckpt.path, ckpt.card, options)
    items, n_real = _verification_items(verify, card)
    reference = diagnose_outputs(TorchSession(model, ckpt.card), items)
    labels = _labels_of(verify, reference, n_real, card)
    vectors = selftest_vectors(
        model, ckpt.card, [image for _, image in items], "fp32", source=verify.source if verify is not None and n_real else "synthetic images",
        n=N_INT8_VECTORS if "int8" in options.precisions else N_VECTORS,
    )
    step("reference")
    judge = _judge_against(reference, items, card, n_real, labels, vectors)

    artefacts, onnx_variants, calibration_info = _onnx_artefacts(
        ckpt.path, ckpt.card, card, options, out, stem, onnx_path, fp32_seconds, judge, step
    )
    if artefacts[0].parity.passed:
        _runtime_artefacts(artefacts, onnx_variants, card, options, judge, step, progress)

    data = {
        "edgedx_version": edgedx.__version__,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(ckpt.path) if ckpt.path else "",
        "options": _plain(options),
        "artefacts": [a.to_dict() for a in artefacts],
        "opset": options.opset,
        "input_format": card.input_format,
        "batchnorm": bn_counts,
        "verification": _verification_summary(verify, reference, n_real, labels),
        "selftest": {"n_vectors": len(vectors.crops), "source": vectors.source, "key": SELFTEST_KEY},
        "calibration": calibration_info,
        "quantisation_aware": qat,
        "versions": _versions(options),
        "card": card.to_dict(),
        "threshold": threshold_statement(card),
        "seconds": round(time.perf_counter() - started, 2),
    }
    extra_files = _resample_artefact(out, stem, card, items, options, data) if options.embed_resample else []
    failed = _quarantine_failed(artefacts, data)
    for artefact in artefacts:
        if artefact.parity.passed:
            _write_sidecar(artefact, card, artefact.vectors or for_precision(vectors, artefact.precision))
            write_checksum(artefact.path)  # the runtime refuses a copy that no longer matches
    data["recommendations"] = _recommendations(artefacts, card)
    report_path = out / REPORT_NAME
    atomic_write_bytes(report_path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))
    step("report")
    if failed:
        raise _refusal(artefacts, failed, report_path, options)
    log.info("exported %d artefacts to %s", len(artefacts), out)
    bundle = write_bundle(out, stem, data, card, [a.path for a in artefacts] + extra_files) if options.bundle else None
    return ExportReport(onnx_path, report_path, data, bundle)


def _resample_artefact(out: Path, stem: str, card: ModelCard, items: list[tuple[int, Any]], options: ExportOptions, data: dict[str, Any]) -> list[Path]:
    """``{stem}.resample.onnx``, checked against EdgeDx's own resampling (ModelError and ``*.failed`` if it differs)."""
    data["resample_graph"] = write_resample_graph(out, stem, card, decoded_images(items), opset=options.opset)
    path = out / data["resample_graph"]["path"]
    write_checksum(path)
    return [path]


def threshold_statement(card: ModelCard) -> dict[str, Any]:
    """What the shipped threshold means and where it came from, for the report and the console; a costly target is
    logged as a warning (a clinic must hear it before deploying, not find it in the card)."""
    choice = card.threshold_choice
    statement = {"threshold": card.threshold, "positive_class": card.positive_class, "source": choice.source, "interval": choice.interval,
                 **{k: choice.fitted_on[k] for k in ("n_positive", "n_negative", "chosen", "alternatives", "warning", "predicted_by") if k in choice.fitted_on}}
    if statement.get("warning"):
        log.warning("%s", statement["warning"])
    return statement


def _recommendations(artefacts: list[Artefact], card: ModelCard) -> list[dict[str, str]]:
    """Which file to ship to which kind of target, from the verdicts and a short CPU timing of each verified .onnx."""
    from edgedx.export.recommend import cpu_images_per_second, recommend
    from edgedx.runtime.bench import environment

    runs_here = [a for a in artefacts if a.parity.passed and a.format == "onnx" and a.extra.get("this_machine", {}).get("runs_here", True)]
    speeds = {a.path.name: cpu_images_per_second(a.path, card) for a in runs_here}  # an int8 flavour refused here is not timed
    entries = [{"path": a.path.name, "format": a.format, "precision": a.precision, "parity": {"passed": a.parity.passed}} for a in artefacts]
    return recommend(entries, speeds, environment({})["cpu"])


def _write_sidecar(artefact: Artefact, card: ModelCard, vectors: SelfTestVectors) -> None:
    """The card and self-test vectors beside the file, for clients that cannot read ONNX metadata; an engine's
    existing sidecar (card and build record) gains the vectors."""
    if artefact.format != "engine":
        flavour = artefact.extra.get("int8", {}).get("flavour")
        write_card_sidecar(artefact.path, card, artefact.format, artefact.precision, vectors, flavour)
        return
    path = sidecar_path(artefact.path)
    document = json.loads(path.read_text(encoding="utf-8"))
    document["selftest"] = vectors.to_plain()
    atomic_write_bytes(path, (json.dumps(document, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def _stepper(progress: ProgressFn, steps: int) -> Callable[[str], None]:
    """A ``step(info)`` that reports the next of ``steps`` export steps done, so callers need not count."""
    done = 0

    def step(info: str = "") -> None:
        nonlocal done
        done += 1
        progress("export", done, steps, info)

    return step


def _judge_against(
    reference: PathOutputs, items: list[tuple[int, Any]], card: ModelCard, n_real: int, labels: np.ndarray | None,
    vectors: SelfTestVectors,
) -> Callable[..., Artefact]:
    """A ``judge(path, format, precision, seconds, session, **extra)`` that diagnoses the verification items
    with ``session`` and compares them with the fp32 PyTorch reference: every artefact meets the same test.

    An ONNX file first gets its self-test vectors (held to its precision's tolerances), so the session judged
    is the file that ships, and the file can prove itself on its target later (``edgedx verify``).

    int8 files are judged on their exact arithmetic (graph optimisations off),
    which every conforming int8 engine computes: the verdict is the file's,
    not this CPU's. Their vectors carry those exact probabilities, so a target
    whose kernels compute something else (x86 without VNNI saturating 8-bit
    weights) is refused there; whether this machine's kernels conform is
    recorded as ``this_machine``."""

    def judge(
        path: Path, fmt: str, precision: str, seconds: float, session: Any, *, flavour: Int8Flavour | None = None,
        carried: SelfTestVectors | None = None, **extra: Any,
    ) -> Artefact:
        exact = precision != "int8" or fmt == "engine"  # an engine is judged as it runs: that is what TensorRT computes
        if fmt == "onnx":  # the vectors go in first, so the one session judged is the file that ships
            carried = for_precision(vectors, precision)
            if flavour is not None:
                carried = replace(carried, exact=exact_probabilities(path, card, carried.crops), about=flavour.about())
            embed_selftest(path, carried)
            session = OnnxSession(path, device="cpu", optimise=exact)
        candidate = diagnose_outputs(session, items)
        report = compare_outputs(reference, candidate, card, precision, n_real=n_real, labels=labels)
        log.info("%s: %s%s", path.name, report.summary(), "" if exact else " (exact int8 arithmetic)")
        if not exact and carried is not None and fmt != "engine":
            extra["this_machine"] = _int8_here(path, carried)
        return Artefact(path, fmt, precision, report, seconds, extra, carried or for_precision(vectors, precision))

    return judge


def _onnx_artefacts(
    checkpoint: Path | None,
    checkpoint_card: ModelCard,
    card: ModelCard,
    options: ExportOptions,
    out: Path,
    stem: str,
    onnx_path: Path,
    fp32_seconds: float,
    judge: Callable[..., Artefact],
    step: Callable[[str], None],
) -> tuple[list[Artefact], list[tuple[str, Path]], dict[str, Any] | None]:
    """Build and judge one ONNX per precision: (artefacts, (precision, path) pairs, calibration info).

    Stops after a failed fp32 graph: every other artefact derives from it.
    """
    artefacts: list[Artefact] = []
    onnx_variants: list[tuple[str, Path]] = []
    calibration_info: dict[str, Any] | None = None
    for precision in options.precisions:
        t0 = time.perf_counter()
        if precision == "int8":
            int8, calibration_info = _write_int8(checkpoint, checkpoint_card, card, options, onnx_path, out, stem)
            for result, seconds in int8:
                extra = {"int8": result.to_dict()}
                artefacts.append(judge(result.path, "onnx", "int8", seconds, None, flavour=result.flavour, **extra))
                onnx_variants.append(("int8", result.path))
            step("int8 onnx")
            continue
        if precision == "fp32":
            path, seconds = onnx_path, fp32_seconds
        else:
            path = out / f"{stem}.fp16.onnx"
            _write_fp16(onnx_path, path)
            seconds = time.perf_counter() - t0
        artefacts.append(judge(path, "onnx", precision, seconds, None))  # judge opens it once its vectors are in
        onnx_variants.append((precision, path))
        step(f"{precision} onnx")
        if precision == "fp32" and not artefacts[0].parity.passed:
            break  # every other artefact derives from this graph
    return artefacts, onnx_variants, calibration_info


def _source_checkpoint(checkpoint: Path, options: ExportOptions, progress: ProgressFn) -> tuple[Path, dict[str, Any] | None]:
    """The checkpoint to export (``--qat-epochs``: fine-tuned first, with the first int8 flavour's arithmetic
    simulated) and what the fine-tuning did, for the report; refuses early what cannot be built here."""
    if options.engine:
        _require_tensorrt()
    if not options.qat_epochs:
        return checkpoint, None
    from edgedx.training.qat import QatOptions, quantisation_aware_finetune

    if "int8" not in options.precisions:
        raise InputError("--qat-epochs fine-tunes for int8: add int8 to --precision, or leave --qat-epochs at 0")
    flavour = INT8_FLAVOURS[options.int8_flavours[0]]
    qat = QatOptions(epochs=options.qat_epochs, weight_bits=flavour.weight_bits, activations=flavour.activations)
    result = quantisation_aware_finetune(checkpoint, qat, progress)
    log.info("quantisation-aware fine-tuning (%s flavour): %s", flavour.name, result.to_dict())
    return result.checkpoint, {
        **result.to_dict(), "flavour": flavour.name,
        "note": "every artefact here is exported from the fine-tuned checkpoint; the card's threshold and validation "
        "metrics are the original run's, and each artefact's parity is measured on the fine-tuned weights",
    }


def _int8_here(path: Path, carried: SelfTestVectors) -> dict[str, Any]:
    """Whether this machine's ONNX Runtime int8 kernels reproduce the file's exact arithmetic (its self-test here)."""
    from edgedx.runtime.bench import environment

    report = run_selftest(OnnxSession(path, device="cpu"), carried)
    cpu = environment({})["cpu"]
    if not report.passed:
        log.info("%s is not for this CPU (%s): %s; it ships for its targets, where its self-test decides", path.name, cpu, report.summary())
    return {"cpu": cpu, "runs_here": report.passed, "selftest": report.to_dict()}


def _write_fp16(onnx_path: Path, path: Path) -> None:
    """The fp32 graph converted to fp16 and labelled as such, so the runtime knows what it loads."""
    half = to_fp16(onnx.load(str(onnx_path)))
    embed_metadata(half, {PRECISION_KEY: "fp16"})
    onnx.save(half, path)


def _write_int8(
    checkpoint: Path | None, checkpoint_card: ModelCard, card: ModelCard, options: ExportOptions, onnx_path: Path, out: Path, stem: str,
) -> tuple[list[tuple[Int8Result, float]], dict[str, Any]]:
    """One int8 file per flavour, each quantised under accuracy control and labelled with its precision and
    flavour: ([(result, seconds)], what they were calibrated and searched on).

    The first ``calibration_samples`` crops set the ranges (fewer when the
    images give under 1.5 times as many: a third is kept back); the crops after
    them (up to twice as many more) are where the layers to keep in float are
    searched. Neither is the verification set.
    """
    calibration = _calibration_samples(checkpoint, checkpoint_card, options, extra=3)
    crops = calibration_crops(calibration, checkpoint_card, limit=options.calibration_samples * 3)
    n_ranges = min(options.calibration_samples, len(crops) - len(crops) // 3)  # few images: a third is kept for the search
    ranges, search = crops[:n_ranges], crops[n_ranges:]
    info = {"source": calibration.source, "n_images": len(calibration), "n_crops": len(ranges), "n_search_crops": len(search)}
    results = []
    for name in options.int8_flavours:
        t0 = time.perf_counter()
        flavour = INT8_FLAVOURS[name]
        result = controlled_int8(onnx_path, out / f"{stem}.{flavour.file_tag}.onnx", card, ranges, search, flavour, target=options.int8_target)
        quantised = onnx.load(str(result.path))
        embed_metadata(quantised, {PRECISION_KEY: "int8", FLAVOUR_KEY: json.dumps(flavour.to_dict())})
        onnx.save(quantised, result.path)
        results.append((result, time.perf_counter() - t0))
    return results, info


def _runtime_artefacts(
    artefacts: list[Artefact],
    onnx_variants: list[tuple[str, Path]],
    card: ModelCard,
    options: ExportOptions,
    judge: Callable[..., Artefact],
    step: Callable[[str], None],
    progress: ProgressFn,
) -> None:
    """Append the ORT and TensorRT artefacts asked for, derived from each judged ONNX, in precision order.

    An int8 flavour goes only where it is meant to run: TensorRT's to engines,
    the CPU flavours to .ort files (phones' CPUs and NPUs)."""
    sources = {a.path: a for a in artefacts}
    for precision, path in onnx_variants:
        source = sources[path]
        tensorrt_only = source.extra.get("int8", {}).get("flavour", {}).get("name") == "tensorrt"
        if options.mobile and not tensorrt_only:
            artefacts.append(_mobile(source, options.mobile_batch, judge))
            step(f"{precision} ort")
        if options.engine and (precision != "int8" or tensorrt_only):
            artefacts.append(_engine(path, precision, card, options, judge, progress, source.vectors))
            step(f"{precision} engine")


def _verification_summary(
    verify: Samples | None, reference: PathOutputs, n_real: int, labels: np.ndarray | None
) -> dict[str, Any]:
    """What the artefacts were judged on, for the report: a reader must see how strong the evidence is."""
    return {
        "source": "synthetic images only (asked for with --synthetic-verification-only)" if verify is None else verify.source,
        "path": "diagnose: the card's crop policy, crops merged per image",
        "n_samples": len(reference.keys),
        "n_crops": len(reference.crop_logits),
        "n_real": n_real,
        "n_labelled": 0 if labels is None else len(labels),
        "unreadable": [message for _, message in reference.failed],
    }


def _quarantine_failed(artefacts: list[Artefact], data: dict[str, Any]) -> list[Artefact]:
    """Rename each refused artefact to ``*.failed`` (so it cannot be deployed by mistake), note it in the report."""
    failed = [a for a in artefacts if not a.parity.passed]
    for artefact in failed:
        quarantined = artefact.path.with_name(artefact.path.name + ".failed")
        artefact.path.replace(quarantined)
        for entry in data["artefacts"]:
            if entry["path"] == artefact.path.name:
                entry["quarantined_as"] = quarantined.name
    return failed


def _refusal(artefacts: list[Artefact], failed: list[Artefact], report_path: Path, options: ExportOptions) -> ParityError:
    """What passed, what was refused and why, and what to do next: one message for the one catch site."""
    refused = "; ".join(
        f"{a.path.name} ({a.precision} {a.format}) refused: {', '.join(a.parity.failures)} (kept as {a.path.name}.failed)" for a in failed
    )
    passed = [a for a in artefacts if a.parity.passed]
    if not passed:
        return ParityError(f"{refused}; nothing was derived from it. Evidence: {report_path}")
    hints = []
    if any(a.precision == "int8" for a in failed):
        hints.append(
            ("retry int8 with --calibration DIR (typical images of the deployment), " if options.calibration is None else "")
            + "fine-tune for int8 with --qat-epochs 2, or export without int8 (it is optional)"
        )
    if any(a.precision == "fp16" for a in failed):
        hints.append("fp16 is optional: export without it")
    ship = ", ".join(a.path.name for a in passed)
    return PartialExportError(
        f"partial export: passed {ship}; {refused}. Next: ship {passed[0].path.name}"
        + (f", or {'; or '.join(hints)}" if hints else "")
        + f". Evidence: {report_path}"
    )


def _forget_previous_export(out: Path, stem: str) -> None:
    """Checksums, refused ``*.failed`` artefacts and the report of an earlier export into ``out`` describe files about
    to be replaced: a new export starts without them (it writes its own refusals again if it has any)."""
    (out / REPORT_NAME).unlink(missing_ok=True)
    sidecars = [*out.glob(f"{stem}*.onnx.card.json"), *out.glob(f"{stem}*.ort.card.json")]
    for old in [*out.glob(f"{stem}*{CHECKSUM_SUFFIX}"), *out.glob(f"{stem}*.failed"), *sidecars]:
        old.unlink()


def _fp32_graph(model: torch.nn.Module, card: ModelCard, options: ExportOptions, *, sha: str) -> tuple[onnx.ModelProto, dict[str, int], ModelCard]:
    """Export, fold every batch norm, optionally embed preprocessing and simplify, embed the card; checked."""
    bn_modules = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    graph = torch_to_onnx(model, card, opset=options.opset, fixed_batch=options.fixed_batch)
    left_by_exporter = count_batchnorms(graph)
    graph, bn = fold_batchnorms(graph)
    assert_no_batchnorm(graph)
    if options.embed_preprocessing:
        graph, card = embed_preprocessing(graph, card)
    embed_metadata(graph, {ONNX_METADATA_KEY: card.to_json(indent=None), CHECKPOINT_SHA_KEY: sha, PRECISION_KEY: "fp32"})
    graph.producer_name = "edgedx"
    graph.producer_version = edgedx.__version__
    graph.doc_string = f"EdgeDx {card.task} classifier ({card.arch}); classes: {', '.join(card.class_names)}"
    if options.simplify:
        graph = simplify(graph)
    graph = check_graph(graph)
    assert_no_batchnorm(graph)
    counts = {
        "in_model": bn_modules,
        "folded_by_exporter": max(0, bn_modules - left_by_exporter),
        "folded_into_conv": bn.folded_into_conv,
        "converted_to_affine": bn.converted_to_affine,
        "remaining": count_batchnorms(graph),
    }
    return graph, counts, card


def _verification_samples(checkpoint: Path | None, card: ModelCard, options: ExportOptions) -> Samples | None:
    """The user's labelled folder, else the run's validation split; never silently nothing.

    None only when the user asked for synthetic-only verification. When the
    run's labelled images cannot be found, the export stops and says why and
    which option fixes it.
    """
    if options.verify_data is not None:
        return folder_samples(options.verify_data, card, limit=options.verify_samples, labelled=True)
    if options.synthetic_verification_only:
        return None
    why = "the checkpoint is not in a run folder"
    if checkpoint is not None:
        try:
            found = split_samples(checkpoint, card, "val", limit=options.verify_samples)
        except SplitUnavailable as exc:
            why = str(exc)
        else:
            if found.labels is not None or card.task == "multilabel":
                return found
            why = f"the labels of {found.source} are not known"
    raise InputError(
        f"cannot verify on labelled images: {why}. Give a labelled folder (one sub-folder per class) with --verify-data DIR, "
        "or accept parity on synthetic images only, with no accuracy check, with --synthetic-verification-only"
    )


def _verification_items(verify: Samples | None, card: ModelCard) -> tuple[list[tuple[int, Any]], int]:
    """(key, image) pairs: the real images first, topped up with synthetic ones to at least MIN_PARITY_SAMPLES."""
    real = [] if verify is None else list(verify.items)
    missing = MIN_PARITY_SAMPLES - len(real)
    synthetic = list(parity_crops(card, missing)) if missing > 0 else []
    return list(enumerate([*real, *synthetic])), len(real)


def _labels_of(verify: Samples | None, reference: PathOutputs, n_real: int, card: ModelCard) -> np.ndarray | None:
    """Labels of the real images that were diagnosed (they come first in ``reference.keys``)."""
    if verify is None or verify.labels is None or card.task == "multilabel":
        return None
    read = [int(k) for k in reference.keys if int(k) < n_real]
    if not read:
        raise InputError(f"none of the {n_real} verification images of {verify.source} could be read: {reference.failed[0][1] if reference.failed else ''}")
    return verify.labels[read]


def _calibration_samples(checkpoint: Path | None, card: ModelCard, options: ExportOptions, *, extra: int = 1) -> Samples:
    """The user's folder, else the run's training split (``extra`` times the calibration samples); int8 without
    real images is refused."""
    limit = options.calibration_samples * extra
    if options.calibration is not None:
        return folder_samples(options.calibration, card, limit=limit, labelled=False)
    why = "the checkpoint is not in a run folder"
    if checkpoint is not None:
        try:
            return split_samples(checkpoint, card, "train", limit=limit)
        except SplitUnavailable as exc:
            why = str(exc)
    raise InputError(f"int8 needs calibration images and the run's training split cannot be read ({why}); give a folder of typical images with --calibration DIR")


def _mobile(source: Artefact, batch: int, judge: Callable[..., Artefact]) -> Artefact:
    """The .ort file, with its batch fixed, and how much of it NNAPI and CoreML take (before and after fixing)."""
    import tempfile

    from edgedx.export.mobile import fixed_batch_copy, mobile_usability, onnx_to_ort

    path, precision = source.path, source.precision
    t0 = time.perf_counter()
    ort_path = onnx_to_ort(path, fixed_batch=batch)
    seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="edgedx-usability-") as tmp:
        usability = {
            "as_exported": mobile_usability(path),
            f"batch_fixed_to_{batch}": mobile_usability(fixed_batch_copy(path, Path(tmp) / path.name, batch)),
        }
    for name, counts in usability[f"batch_fixed_to_{batch}"].items():
        log.info("%s: %s takes %d of %d nodes", ort_path.name, name, counts["supported_nodes"], counts["nodes"])
    session = OnnxSession(ort_path, device="cpu", optimise=precision != "int8")  # int8: its exact arithmetic, as for .onnx
    extra = {"int8": source.extra["int8"]} if "int8" in source.extra else {}
    return judge(ort_path, "ort", precision, seconds, session, carried=source.vectors, fixed_batch=batch, mobile_usability=usability, **extra)


def _engine(
    path: Path, precision: str, card: ModelCard, options: ExportOptions, judge: Callable[..., Artefact], progress: ProgressFn,
    carried: SelfTestVectors | None,
) -> Artefact:
    from edgedx.export.tensorrt import onnx_to_engine
    from edgedx.runtime.backends.trt_backend import TensorRTSession

    lo, opt, hi = options.engine_batch
    engine_path = path.with_suffix(".engine")
    info = onnx_to_engine(
        path, engine_path, card, precision=precision, onnx_sha256=file_sha256(path),
        min_batch=lo, opt_batch=opt, max_batch=hi, workspace_gib=options.workspace_gib, progress=progress,
    )
    return judge(engine_path, "engine", precision, info.seconds, TensorRTSession(engine_path), carried=carried, tensorrt=info.to_dict())


def _require_tensorrt() -> None:
    """Fail before the slow steps when an engine is asked for and TensorRT is missing."""
    from edgedx.deps import require

    require(("tensorrt",), extra="trt", purpose="Building a TensorRT engine")


def _versions(options: ExportOptions) -> dict[str, str]:
    """Versions of what built the artefacts (TensorRT only when it was used: importing it starts CUDA)."""
    found = {"torch": torch.__version__, "onnx": onnx.__version__}
    used = ("onnxruntime", *(("onnxslim",) if options.simplify else ()), *(("tensorrt",) if options.engine else ()))
    for name in used:
        try:
            module = __import__(name)
        except ImportError:
            continue
        found[name] = getattr(module, "__version__", "unknown")
    return found


def _plain(options: ExportOptions) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v) for k, v in options.__dict__.items()}
