"""One entry point for diagnosis: inputs and :class:`~edgedx.runtime.options.DiagnoseOptions` in, a summary out.

Why: the CLI used to choose among three library calls and check which options
went with which engine. :func:`diagnose` validates the options once and
dispatches: a hot folder (``watch``), Ray Data (``engine="ray"``) or this
process (files, folders, videos, cameras). Without ``out`` the still images'
records come back in :attr:`Diagnosed.records` instead of a file, so a
terminal can show them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgedx.progress import STEP_LOGGER, ProgressFn, no_progress
from edgedx.runtime.batch import DiagnoseSummary, diagnose_hot_folder, diagnose_paths
from edgedx.runtime.options import DiagnoseOptions

steps_log = logging.getLogger(STEP_LOGGER)


@dataclass(frozen=True)
class Diagnosed:
    """What a run did (:class:`~edgedx.runtime.batch.DiagnoseSummary`), the model it used and, without ``out``,
    the records themselves."""

    summary: DiagnoseSummary
    model: Any
    records: tuple[dict[str, Any], ...] = field(default=())


def diagnose(inputs: Sequence[str | Path], options: DiagnoseOptions, *, progress: ProgressFn = no_progress) -> Diagnosed:
    """Diagnose ``inputs`` (or the ``watch`` folder) as ``options`` say, on the engine they name.

    The options are validated before anything is read. No model named: the
    bundled default model is used and a step line says so (research use, not a
    medical device).
    """
    options.validate(inputs)
    if options.model is None:
        from edgedx.runtime.bundled import DEFAULT_MODEL, bundled_model_path

        options = options.replace(model=bundled_model_path())
        steps_log.info(
            "no --model given: using the bundled model %s (%s; research use, not a medical device; see edgedx models)",
            DEFAULT_MODEL, Path(options.model).name,
        )
    if options.engine == "ray":
        from edgedx.runtime.ray_engine import diagnose_ray

        assert options.out is not None
        summary = diagnose_ray(
            inputs, options.model, options.out, address=options.address, device=options.device, batch_size=options.batch_size,
            crop=options.crop, refer_band=options.refer_band, overwrite=options.overwrite, progress=progress, **_gate_changes(options),
        )
        return Diagnosed(summary, options.model)
    options = _with_gate(options)
    if options.watch is not None:
        steps_log.info("watching %s (Ctrl-C to stop) → %s", options.watch, options.out)
        summary = diagnose_hot_folder(options.watch, options.model, options.out, options, progress=progress)
    elif options.out is None:
        return _to_memory(inputs, options, progress)
    else:
        summary = diagnose_paths(inputs, options.model, options.out, options, progress=progress)
    return Diagnosed(summary, options.model)


def _gate_changes(options: DiagnoseOptions) -> dict[str, Any]:
    """The quality-gate and scale settings that differ from the defaults (the card's gate, the files' own scale)."""
    changes = {"quality": options.quality, "quality_limits": options.quality_limits, "um_per_px": options.um_per_px}
    defaults = {"quality": "card", "quality_limits": None, "um_per_px": None}
    return {k: v for k, v in changes.items() if v != defaults[k] and not (k == "quality_limits" and not v)}


def _with_gate(options: DiagnoseOptions) -> DiagnoseOptions:
    """A run that changes the quality gate (``quality``, ``quality_limits``) or gives ``um_per_px`` gets its model
    loaded here with them, so every record is held to the gate asked for; other runs load it as before. A
    :class:`~edgedx.runtime.model.Model` passed in has its gate already: changing it here is refused, not ignored."""
    from edgedx.errors import InputError
    from edgedx.runtime.model import Model, load_model

    changes = _gate_changes(options)
    if not changes:
        return options
    if isinstance(options.model, Model):
        raise InputError(
            f"{', '.join(changes)} apply when the model is loaded; this Model was loaded already: "
            "pass its path, or build it with load_model(path, quality=..., quality_limits=..., um_per_px=...)"
        )
    model = load_model(
        options.model, device=options.device, batch_size=options.batch_size, crop=options.crop, refer_band=options.refer_band,
        verify=options.verify, **changes,
    )
    return options.replace(model=model)


def _to_memory(inputs: Sequence[str | Path], options: DiagnoseOptions, progress: ProgressFn) -> Diagnosed:
    """No ``out``: the same batch diagnosis into a temporary results file, read back, then removed."""
    from edgedx.runtime.outputs.records import read_records

    with tempfile.TemporaryDirectory(prefix="edgedx-") as tmp:
        out = Path(tmp) / "results.jsonl"
        summary = diagnose_paths(inputs, options.model, out, options, progress=progress)
        records = tuple(read_records(out))
    return Diagnosed(summary, options.model, records)
