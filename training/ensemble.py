"""Fold ensembles: the K models of a cross-validation as one network, one card, one checkpoint.

Why one network: the runtime divides a graph's output by the card's
temperature and applies the card's activation, and every client (the ONNX
Runtime, TensorRT and OpenVINO sessions, foreign apps reading the card)
already does exactly that. So the averaging lives in the graph:
:class:`FoldEnsemble` runs every member, applies each member's own fitted
temperature, and returns *logits whose activation is the mean of the members'
calibrated probabilities*. The ensemble's card then has calibration "none",
and one file, one session and one parity check cover the whole ensemble with
no new code anywhere downstream.

The averaging is done in log space (``logsumexp`` of log-probabilities), never
by taking the log of an averaged probability, so the output stays finite for
any finite member logits, in fp32 and after fp16 conversion alike: no clamp is
needed and none can saturate.

``cv_dir/ensemble.pt`` sits beside the fold folders with a ``split.json`` of
its own, so export finds verification and calibration images the way it does
for a single run (:func:`write_ensemble_split` says which images those are).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgedx.card import Calibration, Ensemble, ModelCard
from edgedx.errors import InputError
from edgedx.runtime.io.labelled import SPLIT_PATHS_NOTE, portable_id, resolve_id
from edgedx.training.checkpoint import Checkpoint, build_model, file_sha256, load_checkpoint, save_checkpoint
from edgedx.training.run import CARD_NAME, CHECKPOINT_NAME, CV_SUMMARY_NAME, SPLIT_NAME

log = logging.getLogger(__name__)

ENSEMBLE_NAME = "ensemble.pt"
_FOLD_DIR = re.compile(r"^fold_(\d+)$")
# what every member must share for their probabilities to be averaged (card field names)
AGREEING_FIELDS = (
    "arch", "task", "class_names", "input_size", "crop", "normalization", "colour_order", "interpolation",
    "input_format", "output_activation", "positive_class",
)


class FoldEnsemble(nn.Module):
    """Identical-architecture networks whose output's activation is the mean of their calibrated probabilities.

    ``temperatures`` is a (K, T) buffer: member k's logits are divided by row k
    (T is 1, or the number of labels for a multilabel card with per-label
    temperatures) before its activation. ``forward`` returns, per class:

    - softmax: ``log(mean_k softmax(z_k / T_k))`` (softmax of it gives the mean back exactly);
    - sigmoid: ``logit(mean_k sigmoid(z_k / T_k))``, as ``log(mean σ(z)) - log(mean σ(-z))``
      (1 - mean σ(z) = mean σ(-z)), so neither term ever rounds to log(0).
    """

    def __init__(self, members: Sequence[nn.Module], temperatures: torch.Tensor, activation: str) -> None:
        super().__init__()
        if len(members) < 2:
            raise InputError(f"an ensemble needs at least 2 members, got {len(members)}")
        if activation not in ("softmax", "sigmoid"):
            raise InputError(f"ensemble activation must be 'softmax' or 'sigmoid', got {activation!r}")
        temperatures = torch.as_tensor(temperatures, dtype=torch.float32)
        if temperatures.ndim == 1:
            temperatures = temperatures[:, None]
        if temperatures.ndim != 2 or temperatures.shape[0] != len(members):
            raise InputError(f"ensemble temperatures must be ({len(members)}, T), got {tuple(temperatures.shape)}")
        if not bool(torch.all(temperatures > 0)):
            raise InputError(f"ensemble temperatures must be positive, got {temperatures.tolist()}")
        self.members = nn.ModuleList(members)
        self.register_buffer("temperatures", temperatures)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.stack([member(x) for member in self.members]) / self.temperatures[:, None, :]  # (K, B, C)
        if self.activation == "softmax":
            return _log_sum_exp(torch.log_softmax(z, dim=-1)) - math.log(len(self.members))
        return _log_sum_exp(_log_sigmoid(z)) - _log_sum_exp(_log_sigmoid(-z))


def _log_sum_exp(v: torch.Tensor) -> torch.Tensor:
    """log Σ_k exp(v_k) over the members (dim 0), written out with the maximum taken first.

    Why not ``torch.logsumexp``: it exports as ReduceLogSumExp, whose fp16 kernel in
    ONNX Runtime returns -inf for inputs near -20000 (log-probabilities of a
    confident member); here every exp is of a number ≤ 0 and the sum is in [1, K].
    """
    top = v.amax(dim=0)
    return top + torch.log(torch.exp(v - top).sum(dim=0))


def _log_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """log σ(z) as min(z, 0) - log(1 + exp(-|z|)): finite for every finite z.

    Why not ``F.logsigmoid``: the exporter writes it as Log(Sigmoid(z)), which is
    log(0) = -inf once σ underflows (z below about -17 in fp16, -104 in fp32).
    """
    return torch.clamp(z, max=0.0) - torch.log(1.0 + torch.exp(-z.abs()))


def member_temperatures(cards: Sequence[ModelCard]) -> torch.Tensor:
    """(K, T) temperatures: each card's fitted ones ("temperature" calibration), else 1; a single temperature is
    repeated when another member has one per label, so every row has the same length."""
    return torch.tensor(_temperature_rows(cards), dtype=torch.float32)


def _temperature_rows(cards: Sequence[ModelCard]) -> list[list[float]]:
    """The cards' temperatures as plain numbers, one equal-length row per member (for the tensor and the card)."""
    rows = [[float(t) for t in c.calibration.temperature] if c.calibration.method == "temperature" else [1.0] for c in cards]
    width = max(len(r) for r in rows)
    if any(len(r) not in (1, width) for r in rows):
        raise InputError(f"fold models have {sorted({len(r) for r in rows})} temperatures each; they cannot be averaged")
    return [r * width if len(r) == 1 else r for r in rows]


def ensemble_card(member_cards: Sequence[ModelCard], *, fitted_on: dict[str, Any]) -> ModelCard:
    """The ensemble's card: member 0's, with ``ensemble`` set and calibration "none" (the temperatures are in the graph).

    Members that read images differently or answer a different question cannot
    be averaged: the first field that differs is named with its member. The
    threshold, abstention, quality limits and metrics are member 0's until
    cross-validation replaces them with out-of-fold ones.
    """
    if len(member_cards) < 2:
        raise InputError(f"an ensemble needs at least 2 member cards, got {len(member_cards)}")
    first = member_cards[0]
    nested = [k for k, card in enumerate(member_cards) if card.ensemble.members > 1]
    if nested:
        raise InputError(f"member {nested[0]} is itself an ensemble of {member_cards[nested[0]].ensemble.members}; average the fold models themselves")
    for k, card in enumerate(member_cards[1:], start=1):
        for name in AGREEING_FIELDS:
            if getattr(card, name) != getattr(first, name):
                raise InputError(
                    f"fold models cannot be averaged: member {k} has {name} {_shown(getattr(card, name))}, member 0 has "
                    f"{_shown(getattr(first, name))}; train every fold with the same options (edgedx train --folds K)"
                )
    temperatures = _temperature_rows(member_cards)
    provenance = first.provenance
    training = {**provenance.training, "ensemble_of": len(member_cards)}
    return first.replace(
        ensemble=Ensemble(members=len(member_cards), combine="mean_probability", fitted_on={**fitted_on, "temperatures": temperatures}),
        calibration=Calibration(),
        provenance=dataclasses.replace(provenance, training=training),
    )


def _shown(value: Any) -> str:
    return repr(list(value)) if isinstance(value, tuple) else repr(value)


def build_ensemble(card: ModelCard, members: Sequence[nn.Module], temperatures: torch.Tensor) -> FoldEnsemble:
    """A :class:`FoldEnsemble` with the card's activation (the one place the activation is chosen)."""
    return FoldEnsemble(members, temperatures, card.output_activation)


def save_ensemble(path: Path, card: ModelCard, members: Sequence[Checkpoint]) -> Path:
    """One checkpoint in the standard format holding every member's weights and temperatures.

    ``extra["ensemble"]`` names each member's source checkpoint and its sha256,
    so an exported ensemble can be traced back to the fold models it averages.
    """
    if card.ensemble.members != len(members):
        raise InputError(f"the ensemble card has {card.ensemble.members} members but {len(members)} checkpoints were given")
    model = build_ensemble(card, [build_model(m) for m in members], member_temperatures([m.card for m in members]))
    sources = [{"path": str(m.path) if m.path else None, "sha256": file_sha256(m.path) if m.path else None} for m in members]
    return save_checkpoint(path, card, model.state_dict(), ensemble={"members": sources})


def fold_checkpoints(cv_dir: Path) -> list[Path]:
    """``fold_<i>/model.pt`` of a cross-validation folder in fold order, every fold finished.

    Refuses fewer than 2 folds, and a fold whose training did not finish: its
    ``model.pt`` is missing, or is the best epoch so far without the final card
    (``card.json`` is written after the final checkpoint), or, where
    ``cv_summary.json`` says how many folds there are, the fold folder itself.
    """
    cv_dir = Path(cv_dir)
    if not cv_dir.is_dir():
        raise InputError(f"cross-validation folder not found: {cv_dir}")
    found = {int(m[1]): p for p in cv_dir.iterdir() if p.is_dir() and (m := _FOLD_DIR.match(p.name))}
    expected = max([*found, _summary_folds(cv_dir)], default=0)
    if expected < 2:
        raise InputError(
            f"{cv_dir} holds {len(found)} fold folder(s) (fold_1, fold_2, ...); an ensemble needs at least 2: "
            "train them with edgedx train DATA --out CV_DIR --folds K"
        )
    folds = [cv_dir / f"fold_{i}" for i in range(1, expected + 1)]
    for fold in folds:
        checkpoint, card = fold / CHECKPOINT_NAME, fold / CARD_NAME
        finished = checkpoint.is_file() and card.is_file() and card.stat().st_mtime >= checkpoint.stat().st_mtime
        if not finished:
            what = f"{checkpoint} is missing" if not checkpoint.is_file() else f"{checkpoint} is not final (no {CARD_NAME} after it)"
            raise InputError(
                f"{what}: {fold.name}'s training did not finish, so the {expected} folds cannot be averaged. Train all "
                f"folds again with edgedx train DATA --out {cv_dir} --folds {expected} --overwrite"
            )
    return [fold / CHECKPOINT_NAME for fold in folds]


def _summary_folds(cv_dir: Path) -> int:
    """The number of folds ``cv_summary.json`` records (0 without one)."""
    try:
        return int(json.loads((cv_dir / CV_SUMMARY_NAME).read_text(encoding="utf-8")).get("folds") or 0)
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def ensemble_from_folds(cv_dir: Path, out: Path | None = None) -> Path:
    """``cv_dir/ensemble.pt`` (or ``out``) from every fold model of a cross-validation, with ``split.json`` beside it.

    The split file gives export its verification images ("val") and int8
    calibration images ("train"); see :func:`write_ensemble_split`. The card's
    threshold, abstention and metrics are fold 1's (its own validation split):
    cross-validation replaces them with out-of-fold ones when it writes the
    ensemble itself.
    """
    cv_dir = Path(cv_dir)
    paths = fold_checkpoints(cv_dir)
    members = [load_checkpoint(p) for p in paths]
    fitted_on = {"folds": len(paths), "members": [str(p) for p in paths]}  # as cross-validation records it
    card = ensemble_card([m.card for m in members], fitted_on=fitted_on)
    out = Path(out) if out is not None else cv_dir / ENSEMBLE_NAME
    write_ensemble_split(out.parent / SPLIT_NAME, [p.parent / SPLIT_NAME for p in paths])
    saved = save_ensemble(out, card, members)
    (out.parent / CARD_NAME).write_text(card.to_json() + "\n", encoding="utf-8")  # read like a run folder's (evaluate's data source)
    log.info("averaged %d fold models into %s", len(members), saved)
    return saved


def write_ensemble_split(path: Path, fold_splits: Sequence[Path]) -> dict[str, Any]:
    """The ensemble's ``split.json``, in a run's format, with paths relative to its own folder.

    "val" (what export verifies on) is the test items when the folds hold a
    test split out (the same items in every fold), else the union of the
    folds' val items: every training image, each seen by all members but one,
    so accuracy there is not a held-out result, though parity still holds
    (``val_held_out`` says which). "train" (int8 calibration) is the union of
    the folds' train and val items.
    """
    records = [_read_split(p) for p in fold_splits]
    first = records[0]
    everywhere = set.intersection(*({item for item, _ in r["test"]} for r in records))  # held out by every member
    test = [(item, label) for item, label in first["test"] if item in everywhere]
    if len(test) < len(first["test"]) or any(len(r["test"]) != len(test) for r in records):
        log.warning("the folds hold different test items out; the ensemble is verified on the %d that every fold held out", len(test))
    has_test = bool(test)
    train = _union([item for r in records for item in (*r["train"], *r["val"])])
    held = test if has_test else _union([item for r in records for item in r["val"]])
    if not has_test:
        log.warning(
            "the folds hold no test split out: the ensemble is verified at export on every fold's validation images, which "
            "its members trained on (all but one of them each), so accuracy at export is not a held-out result; parity still holds"
        )
    record: dict[str, Any] = {
        "seed": first["seed"], "class_names": first["class_names"], "patient_level": first["patient_level"], "paths": SPLIT_PATHS_NOTE,
        "ensemble_of": [str(p.parent.name) for p in fold_splits], "val_held_out": has_test,
    }
    splits = {"train": train, "val": held, **({"test": held} if has_test else {})}
    for name, items in splits.items():
        record[name] = [portable_id(item, path.parent) for item, _ in items]
        if all(label is not None for _, label in items):
            record[f"{name}_labels"] = [label for _, label in items]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return record


def _read_split(path: Path) -> dict[str, Any]:
    """A fold's split.json as absolute ids paired with labels (None when multilabel), per split."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the fold split {path} ({exc}); train the folds again with edgedx train DATA --folds K") from None
    out: dict[str, Any] = {key: record.get(key) for key in ("seed", "class_names", "patient_level")}
    for name in ("train", "val", "test"):
        ids = [os.path.normpath(resolve_id(i, path.parent)) for i in record.get(name) or []]
        labels = record.get(f"{name}_labels")
        out[name] = list(zip(ids, labels if labels is not None and len(labels) == len(ids) else [None] * len(ids)))
    return out


def _union(items: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Each id once, in first-seen order."""
    seen: dict[str, Any] = {}
    for item, label in items:
        seen.setdefault(item, label)
    return list(seen.items())
