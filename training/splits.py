"""Patient-level train/val/test splits, k-fold, and the leakage check.

Why: images of one patient are far more alike than images of two patients, so
a split that puts one patient on both sides measures memory, not diagnosis.
Items are therefore assigned to splits in whole *groups*: the patient id when
the source has one, else the item's id (its file path), so a file listed twice
in a manifest also stays on one side.

Stratification: groups are assigned greedily, rarest class first and larger
groups first (ties broken in a seeded random order), each to the split whose
remaining demand for that class is largest: iterative stratification
(Sechidis et al., 2011) applied to groups. For multilabel data each label is a
stratum (an item counts once for each of its positive labels) and items with
no positive label form one more stratum; a group is placed by its rarest label,
which is what keeps rare findings in every split. A repair pass then moves the
smallest possible groups so that every class is in train and every non-empty
split holds every class that has enough groups; what cannot be met is logged.

Numpy and json only (no torch).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.errors import InputError
from edgedx.runtime.io.labelled import SPLIT_PATHS_NOTE, portable_id, resolve_id
from edgedx.training.sources import SPLIT_NAMES, TrainingData

log = logging.getLogger(__name__)

NO_PATIENT_NOTE = "no patient ids: images of one patient may be in several splits"
_SHOW_FILES = 3


# --------------------------------------------------------------------------- public API


def split_indices(
    data: TrainingData, *, val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0
) -> dict[str, np.ndarray]:
    """Sorted int64 indices for "train", "val" and (when asked or predefined) "test".

    A predefined split (``data.splits``) is used as given; when it has no val
    items, val is carved out of its train items (and test too when
    ``test_fraction > 0`` and none is predefined). Fractions are of the items
    being divided: all items, or the predefined train items.
    """
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"val fraction must be between 0 and 1, got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0:
        raise InputError(f"test fraction must be between 0 and 1 (0 for no test split), got {test_fraction}")
    if val_fraction + test_fraction >= 1.0:
        raise InputError(
            f"val fraction {val_fraction} + test fraction {test_fraction} leave nothing to train on; "
            "keep their sum below 1"
        )
    if len(data) == 0:
        raise InputError(f"{data.source} has no items to split")
    rng = np.random.default_rng(seed)

    fixed: dict[str, np.ndarray] = {}
    if data.splits is not None:
        marks = np.asarray(data.splits)
        pool = np.flatnonzero(marks == "train")
        if len(pool) == 0:
            raise InputError(f"no item of {data.source} is marked 'train' in its predefined split; mark some as train")
        val = np.flatnonzero(marks == "val")
        test = np.flatnonzero(marks == "test")
        if len(val):
            fixed["val"] = val
            log.info("using the predefined val split (%d items); val fraction %s not used", len(val), val_fraction)
        if len(test):
            fixed["test"] = test
            if test_fraction > 0:
                log.info("using the predefined test split (%d items); test fraction %s not used", len(test), test_fraction)
    else:
        pool = np.arange(len(data), dtype=np.int64)

    wanted: dict[str, float] = {}
    if "val" not in fixed:
        wanted["val"] = val_fraction
    if "test" not in fixed and test_fraction > 0:
        wanted["test"] = test_fraction

    result: dict[str, np.ndarray] = dict(fixed)
    if wanted:
        names = ["train", *wanted]
        fractions = [1.0 - sum(wanted.values()), *wanted.values()]
        sub = data.subset(pool)
        group_of, matrix = _groups(sub)
        if matrix.shape[0] < len(names):
            raise InputError(
                f"{matrix.shape[0]} {_group_word(sub)} cannot be split into {', '.join(names)}; "
                f"need at least {len(names)}"
            )
        assign = _assign(matrix, fractions, rng)
        _repair(matrix, assign, len(names), n_classes=len(data.class_names), train_first=True, names=names, sub=sub)
        item_split = assign[group_of]
        for s, name in enumerate(names):
            result[name] = pool[item_split == s]
    else:
        result["train"] = pool

    ordered = {k: np.sort(result[k]).astype(np.int64) for k in SPLIT_NAMES if k in result}
    _warn_missing_classes(data, ordered)
    return ordered


def kfold_indices(data: TrainingData, k: int, *, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, val) index pairs over whole groups; every item is in exactly one val fold.

    Predefined splits are ignored: subset the data first to keep a test set out.
    """
    group_of, matrix = _groups(data)
    n_groups = matrix.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2 or k > n_groups:
        raise InputError(
            f"k-fold needs 2 <= k <= the number of {_group_word(data)} ({n_groups}), got k={k}; choose a k in that range"
        )
    k = int(k)
    assign = _assign(matrix, [1.0 / k] * k, np.random.default_rng(seed))
    names = [f"fold {i}" for i in range(k)]
    _repair(matrix, assign, k, n_classes=len(data.class_names), train_first=False, names=names, sub=data)
    item_fold = assign[group_of]
    everything = np.arange(len(data), dtype=np.int64)
    folds = []
    for f in range(k):
        in_val = item_fold == f
        folds.append((everything[~in_val], everything[in_val]))
    return folds


def check_no_leakage(data: TrainingData, splits: Mapping[str, np.ndarray]) -> None:
    """Raise InputError when an item, a file or a patient is in two splits.

    The patient check is skipped (nothing to check) when the source has no
    patient ids.
    """
    owner: dict[int, str] = {}
    for name, idx in splits.items():
        for i in np.asarray(idx, dtype=np.int64).tolist():
            if not -len(data) <= i < len(data):
                raise InputError(f"split {name!r} holds index {i}, out of range for {len(data)} items")
            i %= len(data)
            if i in owner and owner[i] != name:
                raise InputError(
                    f"item {i} ({_short(data.ids[i])}) is in both {owner[i]} and {name}; each image belongs to one split"
                )
            owner[i] = name

    by_id: dict[str, set[str]] = {}
    for i, name in owner.items():
        by_id.setdefault(data.ids[i], set()).add(name)
    for item_id, names in by_id.items():
        if len(names) > 1:
            a, b = _ordered_pair(names, splits)
            raise InputError(
                f"file {item_id!r} is listed more than once and is in both {a} and {b}; "
                "list each image once, or give every row of it the same split"
            )

    if data.patient_ids is None:
        return
    files: dict[str, dict[str, list[str]]] = {}
    for i, name in sorted(owner.items()):
        files.setdefault(data.patient_ids[i], {}).setdefault(name, []).append(data.ids[i])
    leaky = [p for p, sides in files.items() if len(sides) > 1]
    if not leaky:
        return
    patient = sorted(leaky)[0]
    a, b = _ordered_pair(set(files[patient]), splits)
    more = len(leaky) - 1
    raise InputError(
        f"patient {patient!r} is in both {a} and {b} "
        f"({a}: {_file_list(files[patient][a])}; {b}: {_file_list(files[patient][b])}); "
        + (f"{more} more patient(s) also cross splits; " if more else "")
        + "a patient's images must stay in one split"
    )


def save_splits(path: Path, data: TrainingData, splits: Mapping[str, np.ndarray], *, seed: int) -> None:
    """Write which item went where, so a run can be audited and its split reused (see :func:`load_splits`)."""
    path = Path(path)
    record: dict[str, Any] = {
        "seed": int(seed),
        "class_names": list(data.class_names),
        "patient_level": data.patient_ids is not None,
        "paths": SPLIT_PATHS_NOTE,
    }
    for name, idx in splits.items():
        record[name] = [portable_id(data.ids[int(i)], path.parent) for i in np.asarray(idx)]
        if data.task != "multilabel":  # so `edgedx evaluate MODEL RUN_DIR --split test` needs nothing else
            record[f"{name}_labels"] = [data.class_names[int(data.targets[int(i)])] for i in np.asarray(idx)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")


def load_splits(path: Path, data: TrainingData) -> dict[str, np.ndarray]:
    """Indices into ``data`` of a split written by :func:`save_splits` (same source, same classes)."""
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"split file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not a readable split file ({exc})") from None
    if not isinstance(record, dict) or record.get("class_names") != list(data.class_names):
        found = record.get("class_names") if isinstance(record, dict) else None
        raise InputError(
            f"split file {path} was made for classes {found}, not {list(data.class_names)}; "
            "use the split file of this data set"
        )
    positions: dict[str, list[int]] = {}
    for i, item_id in enumerate(data.ids):  # normalised: a source given as ../data has ".." in its ids
        positions.setdefault(os.path.normpath(item_id), []).append(i)
    out: dict[str, np.ndarray] = {}
    for name in SPLIT_NAMES:
        if name not in record:
            continue
        idx = []
        for item_id in record[name]:
            free = positions.get(os.path.normpath(resolve_id(item_id, path.parent)))
            if not free:
                raise InputError(f"split file {path} lists {item_id!r} ({name}), which is not in {data.source}")
            idx.append(free.pop(0))
        out[name] = np.sort(np.asarray(idx, dtype=np.int64))
    return out


def summary(data: TrainingData, splits: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Sizes, class counts and patients per split, for the run summary and the model card."""
    per_split: dict[str, Any] = {}
    for name, idx in splits.items():
        part = data.subset(np.asarray(idx, dtype=np.int64))
        per_split[name] = {
            "n": len(part),
            "class_counts": part.class_counts(),
            "n_patients": None if part.patient_ids is None else len(set(part.patient_ids)),
        }
    return {
        "n": len(data),
        "task": data.task,
        "class_counts": data.class_counts(),
        "patient_ids": data.patient_ids is not None,
        "predefined_splits": data.splits is not None,
        "note": None if data.patient_ids is not None else NO_PATIENT_NOTE,
        "splits": per_split,
    }


# --------------------------------------------------------------------------- internals


def _group_word(data: TrainingData) -> str:
    return "patients" if data.patient_ids is not None else "items"


def _groups(data: TrainingData) -> tuple[np.ndarray, np.ndarray]:
    """Group index per item and the (G, K) stratum counts per group.

    Columns are the classes; multilabel data get one more for items with no
    positive label. Groups are numbered in sorted key order (deterministic).
    """
    keys = data.patient_ids if data.patient_ids is not None else data.ids
    _, group_of = np.unique(np.asarray(keys, dtype=object).astype(str), return_inverse=True)
    group_of = group_of.reshape(-1).astype(np.int64)
    member = data.class_matrix()
    if data.task == "multilabel":
        member = np.concatenate([member, (member.sum(axis=1) == 0).astype(np.int64)[:, None]], axis=1)
    matrix = np.zeros((int(group_of.max()) + 1 if len(group_of) else 0, member.shape[1]), np.int64)
    np.add.at(matrix, group_of, member)
    return group_of, matrix


def _assign(matrix: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Greedy iterative stratification of groups into splits with the given fractions."""
    n_groups = matrix.shape[0]
    totals = matrix.sum(axis=0).astype(np.float64)
    sizes = matrix.sum(axis=1)
    frac = np.asarray(fractions, np.float64)
    demand = frac[:, None] * totals[None, :]  # (S, K): stratum counts each split still wants
    demand_total = frac * float(totals.sum())
    # Each group is placed by its rarest stratum; rare strata and big groups go first.
    rarity = np.where(matrix > 0, totals[None, :], np.inf)
    key = rarity.argmin(axis=1)
    order = rng.permutation(n_groups)
    order = order[np.lexsort((-sizes[order], totals[key[order]]))]
    assign = np.empty(n_groups, np.int64)
    for g in order.tolist():
        c = key[g]
        best = max(range(len(frac)), key=lambda s: (demand[s, c], demand_total[s], -s))
        assign[g] = best
        demand[best] -= matrix[g]
        demand_total[best] -= sizes[g]
    return assign


def _repair(
    matrix: np.ndarray,
    assign: np.ndarray,
    n_splits: int,
    *,
    n_classes: int,
    train_first: bool,
    names: Sequence[str],
    sub: TrainingData,
) -> None:
    """Move the smallest possible groups so no split is empty and classes are covered where the data allow.

    Split 0 is train when ``train_first``: it must hold every class and never
    gives away a class's last group.
    """
    sizes = matrix.sum(axis=1)
    cls = matrix[:, :n_classes] > 0  # (G, C) which classes each group holds
    base_guard = {0} if train_first else set()

    def move(target: int, need: int | None, guard: set[int], may_empty: bool = False) -> int | None:
        """Move the cheapest group (holding class ``need`` if given) into ``target``; return its donor.

        Cost: classes the donor would lose, then group size. Donors in
        ``guard`` never lose a class; no donor is emptied unless ``may_empty``.
        """
        best: tuple[tuple[int, int, int], int, int] | None = None
        for donor in range(n_splits):
            if donor == target:
                continue
            members = np.flatnonzero(assign == donor)
            if len(members) < 2 and not may_empty:
                continue
            count = cls[members].sum(axis=0)
            for g in members.tolist():
                if need is not None and not cls[g, need]:
                    continue
                lost = int(np.sum(cls[g] & (count <= 1)))
                if lost and donor in guard:
                    continue
                cost = (int(len(members) < 2), lost, int(sizes[g]))
                if best is None or cost < best[0]:
                    best = (cost, g, donor)
        if best is None:
            return None
        assign[best[1]] = target
        return best[2]

    def fill(s: int) -> None:
        if not np.any(assign == s) and move(s, None, base_guard) is None:
            raise InputError(
                f"cannot fill the {names[s]} split from {matrix.shape[0]} {_group_word(sub)} while keeping every "
                "class in training; add images of the rarer classes or ask for fewer splits"
            )

    # 1. No requested split may be empty.
    for s in range(n_splits):
        fill(s)
    # 2. Train holds every class that has any item, refilling a split this empties.
    groups_per_class = cls.sum(axis=0)
    if train_first:
        for c in range(n_classes):
            if groups_per_class[c] and not cls[assign == 0, c].any():
                donor = move(0, c, set(), may_empty=True)
                if donor is not None:
                    fill(donor)
    # 3. Every split holds every class with at least one group per split, without costing a donor a class.
    every = set(range(n_splits))
    for c in range(n_classes):
        if groups_per_class[c] < n_splits:
            continue
        for s in range(n_splits):
            if not cls[assign == s, c].any():
                move(s, c, every)


def _warn_missing_classes(data: TrainingData, splits: Mapping[str, np.ndarray]) -> None:
    """Say which non-empty split lacks a class; metrics for that class will be undefined there."""
    for name, idx in splits.items():
        if len(idx) == 0:
            continue
        counts = data.subset(idx).class_counts()
        missing = [c for c, n in counts.items() if n == 0]
        if missing:
            log.warning("the %s split has no item of class(es) %s (too few %s)", name, missing, _group_word(data))


def _ordered_pair(names: set[str], splits: Mapping[str, np.ndarray]) -> tuple[str, str]:
    """The first two of ``names`` in the order the splits were given."""
    ordered = [n for n in splits if n in names]
    return ordered[0], ordered[1]


def _short(item_id: str) -> str:
    """A file's name, or an npz item id as is, for messages."""
    return Path(item_id).name if "/" in item_id or "\\" in item_id else item_id


def _file_list(ids: Sequence[str]) -> str:
    shown = ", ".join(_short(i) for i in ids[:_SHOW_FILES])
    return shown + (f", +{len(ids) - _SHOW_FILES} more" if len(ids) > _SHOW_FILES else "")


def held_out_items(data: TrainingData, *, seed: int = 0, test_fraction: float = 0.0) -> np.ndarray:
    """The items cross-validation never trains or selects on: the source's own val/test split, else a seeded
    patient-level ``test_fraction`` carve-out, else none. Why: out-of-fold figures are what choices are made on, so
    the split that is reported as a result must stay outside every fold."""
    if data.splits is not None:
        held = np.flatnonzero(np.asarray(data.splits) != "train")
        if len(held):
            return held.astype(np.int64)
    if test_fraction > 0:
        return split_indices(data, val_fraction=test_fraction, seed=seed)["val"]
    return np.zeros(0, dtype=np.int64)


def fold_split(data: TrainingData, k: int, i: int, *, seed: int = 0, test_fraction: float = 0.0) -> dict[str, np.ndarray]:
    """Fold ``i`` of ``k`` over the items not held out (:func:`held_out_items`); the held-out items are every fold's
    "test" split, so each fold model is also scored on data no choice was made on."""
    held = held_out_items(data, seed=seed, test_fraction=test_fraction)
    pool = np.setdiff1d(np.arange(len(data), dtype=np.int64), held)
    if len(held):
        log.info("cross-validation holds out %d items as the test split; the %d folds divide the other %d", len(held), k, len(pool))
    fold_train, fold_val = kfold_indices(data.subset(pool), k, seed=seed)[i]
    return {"train": pool[fold_train], "val": pool[fold_val], "test": held}
