"""Batch diagnosis: many inputs → one record each; the batch goes on past bad images.

Inputs are image files, folders, globs, video files, cameras (``camera:0``) and
stream URLs; :func:`diagnose_hot_folder` serves a folder a scanner drops images
into. Tiles of consecutive images share model batches and decoding runs ahead
of inference (:meth:`edgedx.runtime.model.Model.stream`). Records are flushed
one by one; ``resume`` continues an interrupted output without losing or
repeating a record; ``audit`` appends a tamper-evident line per result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.errors import EdgeDxError, ImageReadError, InputError
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.outputs.audit import AuditLog, sha256_pixels
from edgedx.runtime.io.feeds import RollingDecision, is_video_path, iter_frames, parse_stream_source, redact_url, watch_folder
from edgedx.runtime.io.image_io import check_regular_file, default_max_pixels, pixel_limit, read_image, write_image
from edgedx.runtime.io.inputs import expand_inputs
from edgedx.runtime.io.integrity import atomic_path, sha256_file
from edgedx.runtime.io.slide_manifest import SlideManifest, read_slide_manifest
from edgedx.runtime.model import Diagnosis, Model, decide, load_model
from edgedx.runtime.options import DiagnoseOptions
from edgedx.runtime.outputs.guards import RunSettings, check_distinct, check_not_inputs, check_writable, exclusive_outputs, prepare_records_file
from edgedx.runtime.outputs.overlay import diagnosis_overlay
from edgedx.runtime.outputs.records import RecordWriter, completed_versions, empty_record, output_format, record_key
from edgedx.runtime.outputs.slides import write_slide_summary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiagnoseSummary:
    """What a batch did; the records themselves are in ``out``."""

    out: Path
    n_inputs: int
    n_failed: int
    label_counts: dict[str, int]
    seconds: float
    overlays: tuple[Path, ...] = field(default=())
    n_resumed: int = 0  # inputs already in ``out`` from an interrupted run, not diagnosed again
    slides: Path | None = None  # OUT.slides.jsonl: one line per slide (a detection-enabled card only)

    @property
    def n_ok(self) -> int:
        return self.n_inputs - self.n_failed


@dataclass(frozen=True)
class _Item:
    """One thing to diagnose: a file, or a frame of a video/camera."""

    name: str  # the record's ``input``
    image: Any  # path or RGB frame
    path: Path | None = None
    frame: int | None = None
    time_s: float | None = None
    stream: str | None = None  # the video/camera it came from (rolling decision)


def diagnose_paths(
    inputs: Sequence[str | Path],
    model: str | Path | Model,
    out: str | Path,
    options: DiagnoseOptions | None = None,
    *,
    progress: ProgressFn = no_progress,
    **settings: Any,
) -> DiagnoseSummary:
    """Diagnose every input and write ``out`` (.jsonl or .csv).

    ``options`` (or ``settings``, the same fields as keywords) say how: see
    :class:`~edgedx.runtime.options.DiagnoseOptions`. Inputs, outputs and the
    model are checked before any image is read: the output folders must be
    writable with room left and never an input. Running the same command again
    continues ``out`` (each input keeps exactly one record; see
    :mod:`edgedx.runtime.outputs.guards`); ``overwrite`` starts it again. Videos and
    cameras give one record per ``every``-th frame, with a rolling decision
    over the last ``window`` frames; a camera or stream that fails gets a
    record saying so, and one that drops is reopened up to ``reconnect`` times.
    Images over ``max_pixels`` are refused from their header (default: see
    :func:`edgedx.runtime.io.image_io.default_max_pixels`).
    """
    options = (options or DiagnoseOptions()).replace(model=model, out=Path(out), **settings)
    options.validate(inputs)
    assert options.out is not None
    out = options.out
    output_format(out)
    if options.max_pixels is None:
        default_max_pixels()  # a bad EDGEDX_MAX_IMAGE_PIXELS fails now, not at the first image
    manifest = read_slide_manifest(options.slides) if options.slides is not None else None
    if manifest is not None and not inputs:
        inputs = manifest.paths  # the manifest lists the fields: they are the inputs
    files, streams = _split_inputs(inputs)
    folders = [Path(str(raw)) for raw in inputs if Path(str(raw)).is_dir()]
    _check_outputs(options, files, folders)
    loaded = _load(options)
    _check_slides(manifest, loaded)
    with exclusive_outputs({"--out": out, "--audit": options.audit}):
        return _diagnose_locked(files, streams, loaded, options, progress, manifest)


def _diagnose_locked(
    files: list[Path], streams: list[str | int], loaded: Model, options: DiagnoseOptions, progress: ProgressFn, manifest: SlideManifest | None
) -> DiagnoseSummary:
    """:func:`diagnose_paths` once this process holds the outputs."""
    assert options.out is not None
    settings = {"every": options.every, "window": options.window}
    resumed = prepare_records_file(options.out, _run_settings(loaded, settings), options.mode)
    sole_stream = len(streams) == 1 and not files

    def items() -> Iterator[_Item]:
        for kind, value in _ordered(files, streams):
            if kind == "file":
                yield _Item(str(value), value, path=value)
                continue
            frames = 0
            try:
                for frame in iter_frames(value, every=options.every, max_frames=options.max_frames, reconnect=options.reconnect):
                    frames += 1
                    yield _Item(f"{frame.source}#frame={frame.index}", frame.image, frame=frame.index, time_s=round(frame.time_s, 3), stream=frame.source)
            except InputError as exc:  # a camera/stream that cannot open or is lost: say so, go on with the rest
                if sole_stream and frames == 0:
                    raise
                yield _Item(_stream_label(value), exc, stream=_stream_label(value))

    total = len(files) if not streams else 0
    live = any(isinstance(s, int) or "://" in str(s) for s in streams)  # cameras and streams: no waiting for a full batch
    with pixel_limit(options.max_pixels):
        return _run(
            items(), loaded, options, total=total, resume=resumed, window=options.window, progress=progress, live=live, frames=bool(streams),
            manifest=manifest,
        )


def diagnose_hot_folder(
    folder: str | Path,
    model: str | Path | Model,
    out: str | Path,
    options: DiagnoseOptions | None = None,
    *,
    stop: threading.Event | None = None,
    progress: ProgressFn = no_progress,
    **settings: Any,
) -> DiagnoseSummary:
    """Diagnose each image a scanner drops into ``folder``, once, when it is completely written.

    Runs until ``stop`` is set or nothing new arrives for ``idle_timeout_s``.
    Records are appended to ``out``; the files already recorded there (and in
    the watcher's state file beside it) are not diagnosed again after a restart.
    """
    options = (options or DiagnoseOptions()).replace(model=model, out=Path(out), watch=Path(folder), **settings)
    options.validate()
    assert options.out is not None and options.watch is not None
    out, folder = options.out, options.watch
    output_format(out)
    if not folder.is_dir():
        raise InputError(f"hot folder not found: {folder}; create it or point --watch at the scanner's output folder")
    _check_outputs(options, [], [folder])
    manifest = read_slide_manifest(options.slides) if options.slides is not None else None
    loaded = _load(options)
    _check_slides(manifest, loaded)
    state = out.with_name(out.name + ".watch-state.jsonl")

    def items() -> Iterator[_Item]:
        watched = watch_folder(
            folder, poll_s=options.poll_s, settle_s=options.settle_s, state_file=state, stop=stop, idle_timeout_s=options.idle_timeout_s
        )
        for path in watched:
            yield _Item(str(path), path, path=path)

    # one image at a time: a hot folder wants each result as soon as its file lands
    with exclusive_outputs({"--out": out, "--audit": options.audit}), pixel_limit(options.max_pixels):
        prepare_records_file(out, _run_settings(loaded, {"watch": True}), "resume")
        return _run(items(), loaded, options, total=0, resume=True, window=1, progress=progress, prefetch=0, live=True, manifest=manifest)


def _load(options: DiagnoseOptions) -> Model:
    if isinstance(options.model, Model):
        return options.model
    return load_model(
        options.model, device=options.device, batch_size=options.batch_size, crop=options.crop, refer_band=options.refer_band,
        verify=options.verify, quality=options.quality, quality_limits=options.quality_limits, um_per_px=options.um_per_px,
    )


def _check_slides(manifest: SlideManifest | None, model: Model) -> None:
    """A slide manifest groups fields for the slide summary, which only a card with field detection writes: refuse
    it on any other card instead of ignoring it."""
    if manifest is None or model.card.detection.enabled:
        return
    raise InputError(
        f"--slides {manifest.source} groups fields into slides, but this model's card has no field detection, so no slide "
        "summary is written; fit it on annotated fields first (edgedx fit-fields MODEL FIELDS --annotations A.json -o OUT) "
        "and diagnose with that model, or leave out --slides"
    )


def _check_outputs(options: DiagnoseOptions, files: list[Path], folders: list[Path]) -> None:
    """Every place this run writes is writable, has room, and is not an input (before the model loads)."""
    targets = {"--out": options.out, "--overlays": options.overlays, "--maps": options.maps, "--audit": options.audit}
    check_distinct({"--out": options.out, "--audit": options.audit})
    check_not_inputs(targets, files, folders)
    for option, target in targets.items():
        if target is not None:
            check_writable(target, option, is_folder=option in ("--overlays", "--maps"))


def _run_settings(model: Model, extra: Mapping[str, Any]) -> RunSettings:
    """The model's bytes and every setting that shapes a record (crop policy, threshold, refer band, quality gate, scale)."""
    sha = model.session.sha256
    settings = {
        "crop": dataclasses.asdict(model.crop), "threshold": model.card.threshold,
        "refer_band": list(model.refer_band) if model.refer_band else None,
        "quality": model.gate.describe(), "um_per_px": model.gate.um_per_px, **extra,
    }
    evidence = {"selftest": model.verification.to_dict()} if model.verification is not None else None
    return RunSettings(sha, settings, evidence)


def _stream_label(source: str | int) -> str:
    if isinstance(source, int):
        return f"camera:{source}"
    return redact_url(source) if "://" in source else source


def _split_inputs(inputs: Sequence[str | Path]) -> tuple[list[Path], list[str | int]]:
    """Stream sources (cameras, URLs, video files) apart; everything else expanded as image paths up front."""
    if not inputs:
        raise InputError("no inputs given")
    streams: list[str | int] = []
    still: list[str | Path] = []
    for raw in inputs:
        source = parse_stream_source(str(raw))
        if source is not None:
            streams.append(source)
        elif is_video_path(raw) and Path(raw).is_file():
            streams.append(str(raw))
        else:
            still.append(raw)
    files = expand_inputs(still) if still else []
    return files, streams


def _ordered(files: list[Path], streams: list[str | int]) -> Iterator[tuple[str, Any]]:
    """Still images first (expanded in input order), then the videos and cameras in input order."""
    for path in files:
        yield "file", path
    for source in streams:
        yield "stream", source


def _run(
    items: Iterator[_Item],
    model: Model,
    options: DiagnoseOptions,
    *,
    total: int,
    resume: bool,
    window: int,
    progress: ProgressFn,
    prefetch: int = 4,
    live: bool = False, frames: bool = False, manifest: SlideManifest | None = None,  # manifest: --slides
) -> DiagnoseSummary:
    card = model.card
    assert options.out is not None
    out, audit = options.out, options.audit
    done_before = completed_versions(out) if resume else {}
    overlay_dir = _folder(options.overlays)
    map_dir = _folder(options.maps)
    written: list[Path] = []
    labels: Counter[str] = Counter()
    rolling: dict[str, RollingDecision] = {}
    failed = n = resumed = 0
    pending: dict[int, _Item] = {}
    start = time.perf_counter()
    progress("diagnose", 0, total)

    def todo() -> Iterator[tuple[int, Any]]:
        nonlocal resumed
        for k, item in enumerate(items):
            versions = done_before.get(record_key(item.name, out))
            if versions is not None and not _changed_since(item, versions):
                resumed += 1
                continue
            pending[k] = item
            yield k, item.image

    model_path = options.model if not isinstance(options.model, Model) else (model.session.path or "")
    audit_log = None
    if audit is not None:
        settings = _run_settings(model, {}).settings  # crop policy, threshold, refer band: what shaped each result
        audit_log = AuditLog(audit, model_path, card, names=options.audit_names, model_sha256=model.session.sha256, settings=settings)
    with RecordWriter(out, card.class_names, append=resume, frames=frames, detection=card.detection.enabled) as writer:
        if audit_log is not None:
            audit_log.__enter__()
        try:
            for key, result in model.stream(todo(), prefetch=prefetch, live=live):
                item = pending.pop(key)
                record = empty_record(item.name)
                if item.frame is not None:
                    record.update(frame=item.frame, time_s=item.time_s)
                if isinstance(result, EdgeDxError):
                    failed += 1
                    record["error"] = str(result)
                    log.warning("skipped %s", result)
                else:
                    record.update(result.to_record())
                    labels.update(result.label if isinstance(result.label, list) else [result.label])
                    if item.stream is not None and not result.rejected:  # a rejected frame has no probabilities to smooth
                        record.update(_rolling(rolling, item.stream, result, model, window))
                    if overlay_dir is not None:
                        try:
                            written.append(_write_overlay(overlay_dir, item, result, model))
                            record["overlay"] = written[-1].name
                        except ImageReadError as exc:  # a gigapixel image is diagnosed lazily but cannot be drawn whole
                            log.warning("no overlay for %s: %s", item.name, exc)
                    if map_dir is not None:
                        record["tile_map"] = _write_map(map_dir, item, result).name
                if audit_log is not None:  # audit first: a kill in between repeats an audit line, never loses one
                    audit_log.append(record, input_sha256=_input_sha(item, result))
                writer.write(record)
                n += 1
                progress("diagnose", n + resumed, total)
        finally:
            if audit_log is not None:
                audit_log.__exit__(None, None, None)
    slides = write_slide_summary(out, card, manifest) if card.detection.enabled else None  # from the file: resumed records count too
    seconds = time.perf_counter() - start
    log.info("diagnosed %d inputs (%d failed, %d already done) in %.1fs → %s", n, failed, resumed, seconds, out)
    return DiagnoseSummary(out, n, failed, dict(labels), seconds, tuple(written), resumed, slides)


def _folder(path: str | Path | None) -> Path | None:
    if path is None:
        return None
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _rolling(rolling: dict[str, RollingDecision], stream: str, result: Diagnosis, model: Model, window: int) -> dict[str, Any]:
    """The decision over the last ``window`` frames of this stream: one noisy frame does not flip it."""
    card = model.card
    smoother = rolling.setdefault(stream, RollingDecision(window, card.class_names))
    smoothed = smoother.update(result.probabilities)
    probs = np.asarray([smoothed[c] for c in card.class_names])
    return {
        "rolling_probabilities": {c: round(float(p), 6) for c, p in zip(card.class_names, probs)},
        "rolling_label": decide(probs, card),
        "rolling_frames": smoother.n,
    }


def _changed_since(item: _Item, versions: set[str | None]) -> bool:
    """A file already diagnosed whose bytes are not any version recorded for its name: a scanner rewrote it
    (a new patient's image under the old name), so it is diagnosed again. Records without a hash (failed
    reads, frames, older files) keep the input done."""
    if item.path is None or None in versions:
        return False
    try:
        check_regular_file(item.path)
        current = sha256_file(item.path)
    except (OSError, ImageReadError):
        return False  # gone or unreadable now: its earlier record stands
    if current in versions:
        return False
    log.info("%s changed since it was diagnosed (sha256 %s…); diagnosing the new version", item.name, current[:12])
    return True


def _input_sha(item: _Item, result: Diagnosis | EdgeDxError) -> str | None:
    """The sha256 of what was diagnosed: the file bytes hashed as they were read (never re-read: a replacement or a
    pipe must not answer for them), a frame's pixels; a lazily read tiled TIFF is hashed here, a regular file only.
    A file that was read but could not be decoded has the hash of those bytes; one never read has none."""
    if isinstance(result, ImageReadError):
        return result.sha256  # the bytes that could be read but not decoded, if any
    if isinstance(result, EdgeDxError) or isinstance(item.image, BaseException):
        return None
    if result.input_sha256 is not None:
        return result.input_sha256
    if item.path is None:
        return sha256_pixels(item.image)
    try:
        check_regular_file(item.path)
        return sha256_file(item.path)
    except (OSError, ImageReadError):
        return None


def _stem(item: _Item) -> str:
    base = item.path.stem if item.path is not None else Path(str(item.stream)).stem or "stream"
    return base if item.frame is None else f"{base}.frame{item.frame:06d}"


def _output_stem(item: _Item, result: Diagnosis) -> str:
    """``<stem>.<10 hex>``: unique per input name and version, the same on every run. ``a/x.png`` and ``b/x.png``
    never share a file, a resumed run never overwrites another input's, and a rewritten file gets its own."""
    key = item.name.encode("utf-8", "surrogateescape") + b"\0" + (result.input_sha256 or "").encode()
    return f"{_stem(item)}.{hashlib.sha256(key).hexdigest()[:10]}"


def _write_map(folder: Path, item: _Item, result: Diagnosis) -> Path:
    """(rows, cols, classes) float32 per-tile probabilities, NaN where a tile was skipped."""
    sliding = result.sliding
    rows, cols = sliding.grid.shape
    target = folder / f"{_output_stem(item, result)}.tilemap.npy"
    with atomic_path(target) as tmp, tmp.open("wb") as f:
        np.save(f, sliding.tile_probabilities.reshape(rows, cols, -1).astype(np.float32))
    return target


def _write_overlay(folder: Path, item: _Item, result: Diagnosis, model: Model) -> Path:
    """One PNG per input version, named after it (see :func:`_output_stem`): the heat map, or a rejected image
    with the quality gate's reasons (:func:`edgedx.runtime.outputs.overlay.diagnosis_overlay`)."""
    image = read_image(item.path) if item.path is not None else item.image
    target = folder / f"{_output_stem(item, result)}.overlay.png"
    heat = diagnosis_overlay(image, result, model.card, weighting=model.crop.centre_weighting)
    with atomic_path(target) as tmp:
        write_image(tmp, heat)
    return target
