"""Each mining round's tiles on disk, so an interrupted run resumes inside the rounds exactly.

Why: a round's training split is the run's own split plus the tiles mined in
every round so far, and mining again after a restart could pick other tiles
(the model that mined them is gone). ``RUN/hard_negatives/round_N.npz`` keeps
what round N mined (pixels, provenance, scores, window sizes, the centred
positive tiles), the epoch the round started after, and its record; ``--resume``
reads it back instead of mining.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.training.run import RunFolder, jsonable

ROUNDS_DIR = "hard_negatives"


@dataclass(frozen=True)
class MinedCrops:
    """The mined tiles, highest score first: RGB uint8 pixels as the splitter cut them, and where each came from."""

    crops: np.ndarray  # (n, th, tw, 3) uint8
    provenance: tuple[str, ...]  # "FIELD.JPG:x,y,w,h" in the field's original pixels
    scores: np.ndarray  # (n,) p(positive) of each tile
    source_sizes: tuple[tuple[int, int], ...]  # (h, w) in original pixels of each tile's window
    n_fields: int  # fields diagnosed
    n_candidates: int  # eligible tiles at or above the threshold, before the limit
    positives: MinedCrops | None = None  # mine_positives: the tiles centred on annotated positives (scores: p of each)

    def __len__(self) -> int:
        return len(self.provenance)

    @property
    def n_positive(self) -> int:
        return 0 if self.positives is None else len(self.positives)


def round_file(run: RunFolder, r: int) -> Path:
    return run.path / ROUNDS_DIR / f"round_{r}.npz"


def mining_started(run: RunFolder) -> bool:
    """Whether this run folder holds a mined round: a resumed run then goes on in the rounds, not in the first epochs."""
    return round_file(run, 1).is_file()


def save_round(path: Path, mined: MinedCrops, record: dict[str, Any], start_epoch: int) -> None:
    """Write round ``path`` atomically (a kill mid-write leaves no half file to resume from)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = _arrays(mined, "")
    if mined.positives is not None:
        arrays.update(_arrays(mined.positives, "positive_"))
    meta = {"record": jsonable(record), "start_epoch": start_epoch, "n_fields": mined.n_fields, "n_candidates": mined.n_candidates,
            "positives": mined.positives is not None}
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    tmp.replace(path)


def load_round(path: Path) -> tuple[MinedCrops, dict[str, Any], int]:
    """(tiles, the round's record as written when it was mined, the epoch the round started after)."""
    with np.load(path, allow_pickle=False) as saved:
        meta = json.loads(str(saved["meta"]))
        mined = _crops(saved, "", meta)
        if meta["positives"]:
            mined = MinedCrops(**{**mined.__dict__, "positives": _crops(saved, "positive_", meta)})
    return mined, meta["record"], int(meta["start_epoch"])


def _arrays(mined: MinedCrops, prefix: str) -> dict[str, np.ndarray]:
    return {
        f"{prefix}crops": mined.crops, f"{prefix}provenance": np.array(mined.provenance, dtype=str), f"{prefix}scores": mined.scores,
        f"{prefix}source_sizes": np.array(mined.source_sizes, np.int64).reshape(-1, 2),
    }


def _crops(saved: Any, prefix: str, meta: dict[str, Any]) -> MinedCrops:
    return MinedCrops(
        crops=saved[f"{prefix}crops"], provenance=tuple(str(p) for p in saved[f"{prefix}provenance"]), scores=saved[f"{prefix}scores"],
        source_sizes=tuple((int(h), int(w)) for h, w in saved[f"{prefix}source_sizes"]), n_fields=int(meta["n_fields"]),
        n_candidates=int(meta["n_candidates"]),
    )
