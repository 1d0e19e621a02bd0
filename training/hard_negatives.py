"""Hard negatives mined from whole images: the model's false-positive tiles, added to training as negatives.

Why: a training set of labelled crops rarely holds the things a deployed
model meets beside the targets (white cells, platelets, debris, clumps, empty
glass, field edges). Whole images with annotations (or known to hold no
positive at all) show them. Each round runs the current model over those
images exactly as ``diagnose`` does (:class:`~edgedx.training.validation.TorchSession`
behind the runtime's :class:`~edgedx.runtime.model.Model`), keeps the tiles it
calls positive that hold no annotated positive, cuts them as the splitter cut
them (so a mined crop is exactly what the model saw), appends them to the
TRAINING split as the negative class (:func:`edgedx.training.data.with_training_items`)
and trains some epochs more. Validation and test stay untouched, so the epoch,
the threshold and the card's metrics are judged on the same images as without
mining. Any binary task with whole images works, not only malaria.

Without annotations every image in the folder is taken to hold no positive:
every tile the model calls positive is then a false positive.

With annotations, ``mine_positives`` also takes the tiles whose middle holds an
annotated positive centre and adds them as the positive class. Why: the
labelled crops show one object filling the frame, while the deployed sliding
crops cut it off-centre, partly, beside its neighbours (malaria: a 64 px tile
holds about three quarters of a cell); these tiles are the target as the model
will meet it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgedx.card import CropPolicy, ModelCard
from edgedx.errors import EdgeDxError, ImageReadError, InputError
from edgedx.runtime.io.field_annotations import FieldAnnotations, FieldTruth, read_field_annotations
from edgedx.runtime.io.image_io import is_image_path, read_image
from edgedx.runtime.model import Model
from edgedx.runtime.tiling import ImageCrops, ResampledImage, SlidingResult, TileGrid
from edgedx.training.build import build_optimizer
from edgedx.training.config import MINE_POSITIVE_MARGIN
from edgedx.training.data import with_training_items
from edgedx.training.loop import Fitting, fit
from edgedx.training.mining_store import MinedCrops, load_round, round_file, save_round
from edgedx.training.losses import TaskLoss, class_weights
from edgedx.training.resume import RunState, resume_optimisation
from edgedx.training.validation import TorchSession

log = logging.getLogger(__name__)

# Mining runs before the operating threshold exists: that one is chosen afterwards, on validation, for the
# finished model. 0.5 is the training card's own threshold, the one every epoch is scored at.
MINING_THRESHOLD = 0.5


def field_paths(folder: str | Path) -> list[Path]:
    """The whole images under ``folder`` (sub-folders included), sorted so every run and rank mines alike."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"--hard-negatives folder not found: {root}; give a folder of whole images")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and is_image_path(p))
    if not paths:
        raise InputError(f"--hard-negatives folder {root} holds no image; give a folder of whole images (.jpg, .png, .tif, ...)")
    return paths


def class_indices(card: ModelCard) -> tuple[int, int]:
    """(positive, negative) class indices; only a binary task with a positive class can have false positives."""
    if card.task != "binary" or card.positive_class is None:
        raise InputError(
            f"--hard-negatives needs a binary task with a positive class (a mined tile is a false positive of it), "
            f"this one is {card.task} with classes {list(card.class_names)}; train without --hard-negatives"
        )
    positive = card.class_names.index(card.positive_class)
    return positive, 1 - positive


def mine(
    model: nn.Module, card: ModelCard, fields: Sequence[Path], truth: FieldAnnotations | None, *,
    threshold: float, limit: int, batch_size: int, device: torch.device | str = "cpu", skip: Collection[str] = (),
    positives: bool = False, positive_margin: float = MINE_POSITIVE_MARGIN,
) -> MinedCrops:
    """The ``limit`` highest-scoring false-positive tiles of ``fields``, diagnosed with ``model`` as the engine.

    A tile counts when it was used (the foreground filter kept it), its
    p(positive) is at least ``threshold``, it holds no annotated positive box
    centre and touches no difficult box. With ``truth`` a field that is not
    annotated is skipped (it may hold positives); without, every field is taken
    to hold none. ``skip``: provenance strings already mined (earlier rounds).
    ``positives`` (needs ``truth``): also up to ``limit`` tiles centred on an
    annotated positive (:func:`centred_tiles` at ``positive_margin``), lowest
    score first, in :attr:`MinedCrops.positives`.
    """
    if limit < 1:
        raise InputError(f"the number of crops to mine must be at least 1, got {limit}")
    if positives and truth is None:
        raise InputError("mining positive tiles needs annotations naming the positives; give --hard-negative-annotations A.json")
    positive, _ = class_indices(card)
    policy = card.crop
    runtime = Model(TorchSession(model, card, device), batch_size=batch_size)
    pending: dict[int, tuple[Path, ResampledImage]] = {}
    negatives, centred = _Kept(limit, highest=True), _Kept(limit, highest=False)
    n_fields = n_candidates = 0
    for key, result in runtime.stream(_read_fields(fields, truth, policy, pending), prefetch=0):
        path, image = pending.pop(int(key))
        if isinstance(result, EdgeDxError):
            log.warning("hard negatives: %s not diagnosed: %s", path, result)
            continue
        n_fields += 1
        field = truth.fields[path.name] if truth is not None else None
        chosen = _candidates(result.sliding, positive, threshold, field, truth, path.name, skip)
        n_candidates += len(chosen)
        negatives.add(image, policy, result.sliding, path.name, chosen)
        if positives:
            centred.add(image, policy, result.sliding, path.name, _centred(result.sliding, positive, field, path.name, skip, positive_margin))
    found = negatives.crops(policy, n_fields, n_candidates)
    return replace(found, positives=centred.crops(policy, n_fields, centred.n_seen)) if positives else found


class _Kept:
    """The ``limit`` best tiles over many fields, by score (highest or lowest first), with their pixels cut at once."""

    def __init__(self, limit: int, *, highest: bool) -> None:
        self.limit, self.sign, self.n_seen = limit, -1.0 if highest else 1.0, 0
        self.kept: list[tuple[float, str, np.ndarray, tuple[int, int]]] = []

    def add(self, image: ResampledImage, policy: CropPolicy, sliding: SlidingResult, name: str, chosen: list[tuple[float, int]]) -> None:
        self.n_seen += len(chosen)
        chosen = sorted(chosen, key=lambda c: (self.sign * c[0], c[1]))[: self.limit]
        crops = _cut(image, policy, np.array([c[1] for c in chosen], np.int64))
        grid = sliding.grid
        self.kept += [(score, _where(name, grid, i), crop, _window(grid, i)) for (score, i), crop in zip(chosen, crops)]
        self.kept = sorted(self.kept, key=lambda k: (self.sign * k[0], k[1]))[: self.limit]

    def crops(self, policy: CropPolicy, n_fields: int, n_candidates: int) -> MinedCrops:
        th, tw = policy.tile_size
        kept = self.kept
        return MinedCrops(
            crops=np.stack([k[2] for k in kept]) if kept else np.zeros((0, th, tw, 3), np.uint8),
            provenance=tuple(k[1] for k in kept), scores=np.array([k[0] for k in kept], np.float64),
            source_sizes=tuple(k[3] for k in kept), n_fields=n_fields, n_candidates=n_candidates,
        )


def _read_fields(
    fields: Sequence[Path], truth: FieldAnnotations | None, policy: CropPolicy, pending: dict[int, tuple[Path, ResampledImage]]
) -> Iterator[tuple[int, ResampledImage]]:
    """Each field decoded and resampled by the card's policy (kept in ``pending`` until its result is in, to cut from)."""
    for key, path in enumerate(fields):
        if truth is not None and path.name not in truth.fields:
            log.warning("hard negatives: %s is not in %s, so it may hold positives; skipped", path, truth.source)
            continue
        try:
            image = ResampledImage.of(read_image(path), policy)
        except ImageReadError as exc:
            log.warning("hard negatives: skipping %s", exc)
            continue
        pending[key] = (path, image)
        yield key, image


def _candidates(
    sliding: SlidingResult, positive: int, threshold: float, field: FieldTruth | None, truth: FieldAnnotations | None,
    name: str, skip: Collection[str],
) -> list[tuple[float, int]]:
    """(score, grid index) of the eligible tiles, highest first."""
    grid = sliding.grid
    p = sliding.tile_probabilities[:, positive]
    used = np.ones(grid.n_tiles, bool) if sliding.used is None else np.asarray(sliding.used, bool)
    with np.errstate(invalid="ignore"):
        ok = used & (p >= threshold) & ~blocked_tiles(grid, field, truth.difficult_types if truth is not None else ())
    found = [(float(p[i]), int(i)) for i in np.flatnonzero(ok) if _where(name, grid, int(i)) not in skip]
    return sorted(found, key=lambda c: (-c[0], c[1]))


def _centred(
    sliding: SlidingResult, positive: int, field: FieldTruth | None, name: str, skip: Collection[str], margin: float,
) -> list[tuple[float, int]]:
    """(score, grid index) of the tiles centred on an annotated positive (:func:`centred_tiles`), not mined before."""
    p = sliding.tile_probabilities[:, positive]
    index = np.flatnonzero(centred_tiles(sliding.grid, field, margin))
    return [(float(p[i]), int(i)) for i in index if np.isfinite(p[i]) and _where(name, sliding.grid, int(i)) not in skip]


def centred_tiles(grid: TileGrid, field: FieldTruth | None, margin: float = MINE_POSITIVE_MARGIN) -> np.ndarray:
    """(n_tiles,) True where an annotated positive centre lies at least ``margin`` of the tile from every edge.

    The default, an eighth, keeps tiles that show most of the object, never a sliver of it at the border; with the
    usual half-tile stride each centre then falls in one to four tiles. 0 takes every tile that holds the centre (four
    at that stride): the tile-level truth that field localisation scores, where an object cut in half by the grid is
    a positive tile too. On malaria that taught the model that any cut cell is a parasite (see the config's note).
    """
    ys, xs = grid.starts()
    centred = np.zeros(grid.n_tiles, bool)
    if field is None:
        return centred
    (th, tw), (fy, fx) = grid.tile, grid.factors
    my, mx = th * margin, tw * margin
    for cx, cy in field.positives:
        x, y = cx * fx, cy * fy
        centred |= (xs + mx <= x) & (x < xs + tw - mx) & (ys + my <= y) & (y < ys + th - my)
    return centred


def blocked_tiles(grid: TileGrid, field: FieldTruth | None, difficult_types: Collection[str]) -> np.ndarray:
    """(n_tiles,) True where a tile holds an annotated positive centre or touches a difficult box.

    The boxes are in the field's own pixels and the grid in the resampled
    image's, so they are mapped by the grid's factors first.
    """
    ys, xs = grid.starts()
    blocked = np.zeros(grid.n_tiles, bool)
    if field is None:
        return blocked
    (th, tw), (fy, fx) = grid.tile, grid.factors
    for cx, cy in field.positives:
        x, y = cx * fx, cy * fy
        blocked |= (xs <= x) & (x < xs + tw) & (ys <= y) & (y < ys + th)
    for o in field.objects:
        if o.kind in difficult_types:
            x0, x1, y0, y1 = o.x * fx, (o.x + o.w) * fx, o.y * fy, (o.y + o.h) * fy
            blocked |= (xs < x1) & (x0 < xs + tw) & (ys < y1) & (y0 < ys + th)
    return blocked


def _window(grid: TileGrid, index: int) -> tuple[int, int]:
    """(h, w) of tile ``index``'s window in original pixels (inside the image: padding is not the field's)."""
    ys, xs = grid.starts()
    (th, tw), (fy, fx) = grid.tile, grid.factors
    return max(1, round(min(th, grid.height - int(ys[index])) / fy)), max(1, round(min(tw, grid.width - int(xs[index])) / fx))


def _where(name: str, grid: TileGrid, index: int) -> str:
    """``NAME:x,y,w,h`` of tile ``index`` in the field's original pixels."""
    ys, xs = grid.starts()
    fy, fx = grid.factors
    h, w = _window(grid, index)
    return f"{name}:{round(int(xs[index]) / fx)},{round(int(ys[index]) / fy)},{w},{h}"


def _cut(image: ResampledImage, policy: CropPolicy, index: np.ndarray) -> list[np.ndarray]:
    """The RGB tiles at grid ``index``, cut by the runtime's own splitter (padding and all), in ``index``'s order."""
    if not len(index):
        return []
    found: dict[int, np.ndarray] = {}
    for block, tiles in ImageCrops(image, policy).blocks(256):
        for i, tile in zip(block[np.isin(block, index)], tiles[np.isin(block, index)]):
            found[int(i)] = np.array(tile, np.uint8)
    return [found[int(i)] for i in index]


def read_truth(path: str | None) -> FieldAnnotations | None:
    """The annotations, or None: every image is then taken to hold no positive (logged, since that is an assumption)."""
    if path is None:
        log.info("hard negatives: no annotations given, so every image in the folder is taken to hold no positive at all")
        return None
    return read_field_annotations(path)


def run_rounds(f: Fitting, state: RunState) -> tuple[Fitting, RunState, dict[str, Any]]:
    """``config.hard_negative_rounds`` rounds of mining with the best weights so far, then more epochs from them.

    Why from the best weights: the mined tiles are that model's mistakes, so
    it is the one that learns from them. The best epoch stays honest: every
    epoch (mining or not) is scored on the same validation split, and the best
    one overall is kept, which may come from any round. Returns the Fitting
    with the grown training split, the state, and the record for metrics.json
    and the card. Rank 0 mines and every rank gets its crops. Each round's
    tiles are saved (:mod:`edgedx.training.mining_store`), so ``--resume``
    continues inside a round as if never stopped.
    """
    config, ctx = f.config, f.ctx
    fields = field_paths(config.hard_negatives or "")
    truth = read_truth(config.hard_negative_annotations) if ctx.is_main else None
    positive, negative = class_indices(f.card)
    limit = config.hard_negative_max or max(1, int((f.data.targets[f.data.train_idx] == positive).sum()))
    n_train, rounds = len(f.data.train_idx), []
    seen: set[str] = set()
    for r in range(1, config.hard_negative_rounds + 1):
        mined, record, start, saved = _round_tiles(f, state, r, lambda: mine(
            f.model, f.card, fields, truth, threshold=MINING_THRESHOLD, limit=limit, batch_size=config.batch_size, device=ctx.device, skip=seen,
            positives=config.mine_positives, positive_margin=config.mine_positive_margin,
        ))
        if not len(mined) and not mined.n_positive:
            rounds.append({**record, "val_after": record["val_before"], "epochs": []})
            if ctx.is_main:
                log.info("round %d: no new tile to add (false positives at p ≥ %.2g or centred positives) in %d fields; mining stops", r, MINING_THRESHOLD, mined.n_fields)
            break
        seen.update(mined.provenance)
        seen.update(mined.positives.provenance if mined.positives is not None else ())
        f = _with_mined(f, mined, (positive, negative), start + config.hard_negative_epochs)
        _continue_round(f, state, start, saved)
        state = fit(f, state)
        first = sum(row["epoch"] <= start for row in state.history)
        for row in state.history[first:]:
            row["hard_negative_round"] = r
        rounds.append({**record, "val_after": _shown(state.best_score, config.monitor), "best_epoch": state.best_epoch,
                       "epochs": [row["epoch"] for row in state.history[first:]], "crops": list(mined.provenance)})
        if mined.positives is not None:
            rounds[-1]["positive_crops"] = list(mined.positives.provenance)
        if ctx.is_main:
            log.info("%s", round_line(rounds[-1], len(state.history) - first))
    margin = config.mine_positive_margin if config.mine_positives else None
    return f, state, {"folder": str(config.hard_negatives), "annotations": config.hard_negative_annotations, "n_fields": len(fields),
                      "limit": limit, "mine_positives": config.mine_positives, "mine_positive_margin": margin,
                      "n_train_before": n_train, "n_train_after": len(f.data.train_idx), "rounds": rounds}


def _round_tiles(f: Fitting, state: RunState, r: int, mine_now: Callable[[], MinedCrops]) -> tuple[MinedCrops, dict[str, Any], int, bool]:
    """Round ``r``'s tiles, its record, the epoch it starts after, and whether they were read back (``--resume``)
    rather than mined now with the best weights (then saved before any epoch of the round)."""
    config, ctx = f.config, f.ctx
    path = round_file(f.run, r)
    if config.resume and path.is_file():
        mined, record, start = ctx.broadcast(load_round(path) if ctx.is_main else None)
        if ctx.is_main:
            log.info("round %d: %d tiles read back from %s (mined before the run was stopped)", r, len(mined) + mined.n_positive, path)
        return mined, record, start, True
    f.model.load_state_dict(state.best_state)
    mined = ctx.broadcast(mine_now() if ctx.is_main else None)
    record: dict[str, Any] = {"round": r, "n_mined": len(mined), "n_fields": mined.n_fields, "n_candidates": mined.n_candidates,
                              "threshold": MINING_THRESHOLD, "monitor": config.monitor, "val_before": _shown(state.best_score, config.monitor)}
    if config.mine_positives:
        record["n_positive_mined"] = mined.n_positive
    if ctx.is_main:
        save_round(path, mined, record, state.epoch)
    return mined, record, state.epoch, False


def _continue_round(f: Fitting, state: RunState, start: int, saved: bool) -> None:
    """Where the round's epochs begin: from the best weights with a fresh patience count, as an uninterrupted run
    does, or (resumed after some of its epochs) from ``last.pt``'s weights, optimiser and patience as they were."""
    if saved and state.epoch > start:
        resume_optimisation(f.run.last, f.optim)  # the model's weights were restored from last.pt already
        return
    f.model.load_state_dict(state.best_state)
    state.since_best = 0


def _with_mined(f: Fitting, mined: MinedCrops, classes: tuple[int, int], epochs: int) -> Fitting:
    """The Fitting with the crops appended to training as the negative class (and any centred positive tiles as the
    positive class; ``classes`` is (positive, negative)), the loss re-weighted for the new balance and a
    fresh optimiser whose schedule spans the round's epochs (the first schedule has decayed to nothing by now).

    The validation loss keeps its weights, so a round's val loss compares with the epochs before it.
    """
    config = replace(f.config, epochs=epochs)
    positive, negative = classes
    data = with_training_items(f.data, list(mined.crops), mined.provenance, negative, source_sizes=mined.source_sizes)
    if mined.positives is not None:
        extra = mined.positives
        data = with_training_items(data, list(extra.crops), extra.provenance, positive, source_sizes=extra.source_sizes)
    task, n_classes = data.data.task, len(data.data.class_names)
    weights = class_weights(data.targets[data.train_idx], task, n_classes) if config.imbalance == "weighted" else None
    setup = replace(f.setup, class_weights=weights, loss_fn=TaskLoss(task, weights).to(f.ctx.device))
    optim = build_optimizer(setup.model, replace(config, epochs=config.hard_negative_epochs), setup, len(data.train_idx), f.ctx.device)
    return replace(f, data=data, setup=setup, optim=optim, config=config)


def _shown(score: float | None, monitor: str) -> float | None:
    """The monitored value as a reader knows it (the loop maximises minus the loss)."""
    return None if score is None else (-score if monitor == "loss" else score)


def round_line(record: dict[str, Any], epochs: int) -> str:
    """The line a round leaves in the log."""
    before, after = record["val_before"], record["val_after"]
    shown = "—" if before is None or after is None else f"{before:.3f} → {after:.3f}"
    centred = f" and {record['n_positive_mined']} tiles centred on annotated positives" if "n_positive_mined" in record else ""
    return (
        f"round {record['round']}: {record['n_mined']} false-positive crops{centred} from {record['n_fields']} fields "
        f"(p ≥ {record['threshold']:.2g}), {epochs} epochs more; val {record['monitor'].replace('_', ' ')} {shown}"
    )
