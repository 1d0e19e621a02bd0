"""``edgedx export CV_DIR``: a cross-validation folder exported as one verified fold ensemble.

The K fold models become ``CV_DIR/ensemble.pt`` (one checkpoint, the averaging
inside the network: :mod:`edgedx.training.ensemble`), which is then exported
like any checkpoint: one ONNX whose output's activation is the members'
averaged calibrated probability, verified on the shipped path by the same
parity check. An ``ensemble.pt`` newer than every fold model (cross-validation
writes one at its end) is reused, so exporting twice averages once.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgedx.errors import EdgeDxError, InputError
from edgedx.export import pipeline
from edgedx.export.pipeline import ExportOptions, ExportReport
from edgedx.progress import ProgressFn, no_progress
from edgedx.training.checkpoint import load_checkpoint
from edgedx.training.ensemble import ENSEMBLE_NAME, ensemble_from_folds, fold_checkpoints
from edgedx.training.run import CV_SUMMARY_NAME, SPLIT_NAME

log = logging.getLogger(__name__)


def is_cv_folder(path: str | Path) -> bool:
    """Whether ``path`` is a cross-validation folder (``cv_summary.json`` or ``fold_*`` folders) rather than a checkpoint."""
    path = Path(path)
    return path.is_dir() and ((path / CV_SUMMARY_NAME).is_file() or any(path.glob("fold_*")))


def ensemble_checkpoint(cv_dir: str | Path) -> Path:
    """``cv_dir/ensemble.pt``: reused when newer than every fold model (and its split.json is there), else built now."""
    cv_dir = Path(cv_dir)
    folds = fold_checkpoints(cv_dir)  # refuses a missing fold before anything is reused
    existing = cv_dir / ENSEMBLE_NAME
    if existing.is_file() and (cv_dir / SPLIT_NAME).is_file():
        newest = max(p.stat().st_mtime for p in folds)
        if existing.stat().st_mtime >= newest and _members_of(existing) == len(folds):
            log.info("reusing %s (newer than its %d fold models)", existing, len(folds))
            return existing
    log.warning(
        "averaging the %d fold models of %s now (%s); its threshold, abstention limits and metrics are fold_1's, from its "
        "own validation split, not the out-of-fold ones cross-validation writes with its ensemble", len(folds), cv_dir,
        "no ensemble.pt there" if not existing.is_file() else "ensemble.pt is older than a fold model, or not of these folds",
    )
    return ensemble_from_folds(cv_dir)


def _members_of(path: Path) -> int:
    """How many members an existing ensemble checkpoint says it has (0 when it is not one)."""
    try:
        return load_checkpoint(path).card.ensemble.members
    except EdgeDxError:
        return 0


def export_folds(
    cv_dir: str | Path, out: str | Path, options: ExportOptions | None = None, *, progress: ProgressFn = no_progress
) -> ExportReport:
    """Average the fold models of ``cv_dir`` into one checkpoint and export it, verified like any export."""
    if not is_cv_folder(cv_dir):
        raise InputError(
            f"{cv_dir} is not a cross-validation folder (no {CV_SUMMARY_NAME}, no fold_* folders); give the folder "
            "edgedx train DATA --out CV_DIR --folds K wrote, or a model.pt"
        )
    checkpoint = ensemble_checkpoint(cv_dir)
    return pipeline.export_checkpoint(checkpoint, out, options, progress=progress)  # looked up now: one export path, patchable
