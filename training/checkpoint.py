"""EdgeDx checkpoints: weights plus the model card, one file.

Saved with ``torch.save`` as a dict of plain values and tensors so it loads
with ``weights_only=True`` (no pickled code runs when a checkpoint is opened).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgedx.card import ModelCard
from edgedx.errors import CardError, InputError, ModelError
from edgedx.runtime.io.integrity import sha256_file as file_sha256  # noqa: F401  (re-exported for export/)

FORMAT = "edgedx-checkpoint"
FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    card: ModelCard
    state_dict: dict[str, torch.Tensor]
    extra: dict[str, Any]
    path: Path | None = None


def save_checkpoint(path: str | Path, card: ModelCard, state_dict: dict[str, torch.Tensor], **extra: Any) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "card": card.to_json(indent=None),
        "state_dict": {k: v.detach().cpu().clone() for k, v in state_dict.items()},
        "extra": extra,
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def save_snapshot(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """One epoch's weights alone (no card), for choosing the epoch after every fold has run; atomic like a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu().clone() for k, v in state_dict.items()}, tmp)
    tmp.replace(path)
    return path


def load_snapshot(path: Path) -> dict[str, torch.Tensor]:
    """Weights written by :func:`save_snapshot` (tensors only: nothing pickled runs)."""
    if not path.is_file():
        raise ModelError(f"epoch snapshot not found: {path}; run the cross-validation again with --overwrite")
    return safe_torch_load(path, "epoch snapshot")


def safe_torch_load(path: Path, what: str) -> Any:
    """``torch.load`` that never runs pickled code: tensors, dicts, lists and numbers only.

    A file carrying pickled objects (which could execute anything on load) is
    refused with a message saying so, not with torch's internals.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            raise ModelError(
                f"{path}: refused — this {what} contains pickled Python objects, which could run code when "
                "opened, and EdgeDx loads tensors only. Use a checkpoint written by edgedx train, or save plain "
                "weights with torch.save(model.state_dict(), ...) or safetensors"
            ) from None
        raise ModelError(f"{path}: not a readable {what} ({str(exc).splitlines()[0][:160]})") from None
    except Exception as exc:  # truncated or foreign files raise various zip/EOF errors
        raise ModelError(f"{path}: not a readable {what}; the file may be truncated ({str(exc).splitlines()[0][:160]})") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; errors say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {path}")
    payload = safe_torch_load(path, "checkpoint")
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(
            f"{path} is not an EdgeDx checkpoint (no model card inside); train one with: edgedx train DATA --out RUN_DIR"
        )
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise ModelError(f"{path} was written by a newer edgedx; upgrade edgedx: pip install --upgrade edgedx")
    try:
        card = ModelCard.from_json(payload["card"])
    except CardError as exc:
        raise CardError(f"{path}: {exc}") from None
    return Checkpoint(card, payload["state_dict"], payload.get("extra", {}), path)


def build_model(checkpoint: Checkpoint) -> nn.Module:
    """The checkpoint's network in eval mode, weights loaded strictly.

    A fold ensemble's card (``ensemble.members`` > 1) gives a
    :class:`~edgedx.training.ensemble.FoldEnsemble` of that many networks, so
    export, validation and every other caller handle it as one model.
    """
    from edgedx.training.models import create_model

    card = checkpoint.card
    if card.ensemble.members > 1:
        from edgedx.training.ensemble import build_ensemble

        members = [create_model(card.arch, card.n_classes) for _ in range(card.ensemble.members)]
        temperatures = checkpoint.state_dict.get("temperatures")
        if temperatures is None:
            raise ModelError(f"{checkpoint.path}: the card says an ensemble of {card.ensemble.members} {card.arch} networks, "
                             "but the weights hold no member temperatures; build it again with edgedx export CV_DIR")
        try:
            model: nn.Module = build_ensemble(card, members, torch.ones_like(temperatures))
        except InputError as exc:
            raise ModelError(f"{checkpoint.path}: the member temperatures do not fit the card ({exc})") from None
        what = f"an ensemble of {card.ensemble.members} {card.arch} networks"
    else:
        model, what = create_model(card.arch, card.n_classes), card.arch
    try:
        model.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines()]  # the first says only "Error(s) in loading state_dict"
        raise ModelError(f"{checkpoint.path}: weights do not fit {what} ({'; '.join(lines[:2])[:300]})") from None
    return model.eval()


