"""Distributed batch diagnosis on Ray Data: ``edgedx diagnose ... --engine ray``.

One machine's cores (or one GPU) stop being enough when a lab wants a night's
scans diagnosed by morning; Ray spreads the same work over a cluster. The
pipeline is the local engine's, cut into Ray Data stages:

1. the still images are listed on the driver (:func:`expand_inputs`, as locally);
2. parallel **tasks** read each image through the runtime's read path and cut
   its tiles with the runtime's own sliding-window code (scale, padding,
   ``min_foreground`` and the all-background fallback included), so the tiles
   are exactly the local engine's;
3. a pool of **actors**, each holding one model session (on CPU, or one GPU
   each), predicts the tiles of several images per batch, merges them with
   :func:`edgedx.runtime.tiling.aggregate` and builds each record with the
   same :class:`~edgedx.runtime.model.Model` code as a local run;
4. the records are written as shards into the folder ``OUT`` (``*.jsonl`` when
   ``OUT`` ends in ``.jsonl``, ``*.parquet`` when it ends in ``.parquet``):
   one record per input, the same keys and values as a local run (timings
   aside). :func:`read_ray_records` reads either back.

Every path (model, images, ``OUT``) must be readable or writable at the same
name on every node of a cluster (shared storage). Videos, cameras and streams
stay with the local engine: they are one sequential stream each.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from edgedx.card import CropPolicy, ModelCard
from edgedx.errors import EdgeDxError, InputError, MissingDependencyError
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.batch import DiagnoseSummary
from edgedx.runtime.io.feeds import is_video_path, parse_stream_source
from edgedx.runtime.io.inputs import expand_inputs
from edgedx.runtime.gate import GateSettings, Prepared
from edgedx.runtime.gate import prepare as gate_image
from edgedx.runtime.model import CheckedSettings, Model, load_model, prefetched
from edgedx.runtime.backends.session import is_engine_file, open_session
from edgedx.runtime.outputs.guards import check_not_inputs, check_writable
from edgedx.runtime.outputs.records import empty_record
from edgedx.runtime.quality import MEASURES
from edgedx.runtime.tiling import CropLayout, SlidingResult, TileBatcher, TileGrid, merge, split_tiles

log = logging.getLogger(__name__)

SHARD_FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
GPU_DEVICES = ("cuda", "tensorrt")
READ_TASK_MEMORY = 256 * 2**20  # bytes a read task reserves: a decoded 20 MP image, its resampled copy and tiles


def shard_format(out: Path) -> str:
    """``jsonl`` or ``parquet`` from OUT's suffix, or an error saying which suffixes work."""
    fmt = SHARD_FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise InputError(
            f"--out {out}: with --engine ray OUT is a folder of shards whose name ends in .jsonl or .parquet "
            f"(got {out.suffix or 'no suffix'!r}), e.g. --out results.jsonl"
        )
    return fmt


def diagnose_ray(
    inputs: Sequence[str | Path],
    model: str | Path,
    out: str | Path,
    *,
    address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
    batch_size: int = 32,
    images_per_batch: int = 8,
    device: str = "cpu",
    crop: CropPolicy | Mapping[str, Any] | None = None,
    refer_band: tuple[float, float] | None = None,
    overwrite: bool = False,
    progress: ProgressFn = no_progress,
    quality: str = "card",
    quality_limits: Mapping[str, Any] | None = None,
    um_per_px: float | None = None,
) -> DiagnoseSummary:
    """Diagnose still images on Ray Data; ``out`` becomes a folder of JSON Lines or Parquet shards.

    ``address``: None starts a local Ray on this machine (127.0.0.1 only) and
    stops it afterwards; ``"auto"`` or ``"ray://host:10001"`` joins a running
    cluster (a Ray already initialised in this process is used as it is).
    ``actors`` model sessions run at once (default: one per GPU with a GPU
    device, else half the cluster's CPUs), each reserving ``cpus_per_actor``
    CPUs (its ONNX Runtime threads) and ``gpus_per_actor`` GPUs (default 1 on
    cuda/tensorrt, 0 on cpu; 0.5 puts two sessions on each GPU).
    ``batch_size`` tiles go through the model per call; ``images_per_batch``
    images go to an actor at once. An existing non-empty ``out`` is refused
    unless ``overwrite``. Inputs, output and model are checked before Ray starts.
    The read tasks apply the physical scale and the quality gate (``quality``,
    ``quality_limits``, ``um_per_px``) as the local engine does: a rejected
    image's tiles are never cut.
    """
    if isinstance(model, Model):
        raise InputError("--engine ray loads the model once in every actor: pass the model's file path, not a loaded Model")
    out = Path(out)
    fmt = shard_format(out)
    files, folders = _still_images(inputs)
    _check_out(out, files, folders, overwrite)
    if batch_size < 1 or images_per_batch < 1:
        raise InputError(f"batch size and images per batch must be at least 1, got {batch_size} and {images_per_batch}")
    if actors is not None and actors < 1:
        raise InputError(f"--actors must be at least 1, got {actors}")
    card, checked = _check_model(Path(model), batch_size, crop, refer_band, GateRequest(quality, quality_limits, um_per_px))
    ray = _import_ray()
    start = time.perf_counter()
    progress("diagnose", 0, len(files))
    started = _connect(ray, address)
    try:
        resources = ray.cluster_resources()
        gpus = _gpus(device, gpus_per_actor, resources)
        n_actors = actors or _default_actors(resources, gpus)
        _check_resources(resources, n_actors, cpus_per_actor, gpus, strict=started)
        log.info("Ray: %d actor(s), %.2g CPU and %.2g GPU each; cluster %s", n_actors, cpus_per_actor, gpus, resources)
        with _quiet_data_context(ray):
            records = _dataset(ray, files, card, checked, Path(model), n_actors, cpus_per_actor, gpus, batch_size, images_per_batch, device, resources)
            if fmt == "jsonl":
                records.write_datasink(_jsonl_sink(str(out.resolve())))
            else:
                records.write_parquet(str(out.resolve()))
    finally:
        if started:
            ray.shutdown()
    written = read_ray_records(out)
    _check_one_each(written, files, out)
    failed = sum(1 for r in written if r.get("error"))
    labels: Counter[str | None] = Counter()
    for record in written:
        label = record.get("label")
        if label is not None:
            labels.update(label if isinstance(label, list) else [label])
        elif record.get("decision") == "reject":
            labels[None] += 1  # as the local engine counts them: rejected by the quality gate
    seconds = time.perf_counter() - start
    progress("diagnose", len(files), len(files))
    log.info("diagnosed %d inputs on Ray (%d failed) in %.1fs → %s", len(files), failed, seconds, out)
    return DiagnoseSummary(out, len(files), failed, dict(labels), seconds)


def read_ray_records(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every record in a folder of ``.jsonl`` or ``.parquet`` shards, sorted by ``input``."""
    folder = Path(out_dir)
    shards = sorted(p for p in folder.glob("*") if p.suffix.lower() in SHARD_FORMATS) if folder.is_dir() else []
    if not shards:
        raise InputError(f"{folder} holds no .jsonl or .parquet shards; it should be the --out folder of an --engine ray run")
    records: list[dict[str, Any]] = []
    for shard in shards:
        if shard.suffix.lower() == ".jsonl":
            with shard.open(encoding="utf-8") as f:
                records.extend(json.loads(line) for line in f if line.strip())
        else:
            records.extend(_parquet_rows(shard))
    return sorted(records, key=lambda r: r["input"])


# -- checks before any work ----------------------------------------------------------------


def _still_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """Image files, folders and globs expanded as locally; videos, cameras and streams refused."""
    if not inputs:
        raise InputError("no inputs given")
    for raw in inputs:
        if parse_stream_source(str(raw)) is not None or (is_video_path(raw) and Path(raw).is_file()):
            raise InputError(
                f"{raw} is a video, camera or stream; --engine ray diagnoses still images only: "
                "diagnose it with the local engine (leave out --engine ray)"
            )
    files = expand_inputs(inputs)
    videos = [p for p in files if is_video_path(p)]
    if videos:
        raise InputError(f"{videos[0]} is a video; --engine ray diagnoses still images only: use the local engine for videos")
    return files, [Path(str(raw)) for raw in inputs if Path(str(raw)).is_dir()]


def _check_out(out: Path, files: list[Path], folders: list[Path], overwrite: bool) -> None:
    """OUT is a new or empty folder (or, with ``overwrite``, one holding only shards), never holding an input."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; with --engine ray OUT is a folder of shards: choose a new folder name")
    check_not_inputs({"--out": out}, files, folders)
    real = out.resolve()
    for inside in [*folders, *files]:
        if real == inside.resolve() or real in inside.resolve().parents:
            raise InputError(f"--out {out} holds the input {inside}; choose an --out folder outside the inputs")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise InputError(f"--out {out} already exists and is not empty; pass --overwrite to replace its shards, or choose another --out")
        others = [p for p in out.iterdir() if p.is_dir() or (p.suffix.lower() not in SHARD_FORMATS and not p.name.startswith("."))]
        if others:
            raise InputError(f"--out {out} holds {others[0].name}, which is not a results shard; --overwrite only replaces shards: choose another --out")
        shutil.rmtree(out)
    check_writable(out, "--out", is_folder=True)


class GateRequest(NamedTuple):
    """The quality gate and scale asked for (checked against the card in :func:`_check_model`)."""

    quality: str = "card"
    limits: Mapping[str, Any] | None = None
    um_per_px: float | None = None


def _check_model(
    path: Path, batch_size: int, crop: CropPolicy | Mapping[str, Any] | None, refer_band: tuple[float, float] | None,
    gate: GateRequest = GateRequest(),
) -> tuple[ModelCard, CheckedSettings]:
    """The card, crop overrides, refer band and quality gate checked on the driver, before Ray starts; no session kept."""
    if is_engine_file(path):
        from edgedx.runtime.backends.trt_backend import read_sidecar

        card, _ = read_sidecar(path)
    else:
        with open_session(path, "cpu", threads=1) as session:
            card = session.card
    if card.detection.count_cells:
        raise InputError(
            f"{path.name}: the card counts red cells (detection.count_cells) from each field's pixels, which --engine ray does not "
            "carry past its read tasks (only the crops); diagnose these fields with --engine local, which writes the same records "
            "with cells and parasitaemia"
        )
    checked = CheckedSettings.check(
        card, batch_size=batch_size, crop=crop, refer_band=refer_band, quality=gate.quality, quality_limits=gate.limits, um_per_px=gate.um_per_px,
    )
    return card, checked


def _check_one_each(records: list[dict[str, Any]], files: list[Path], out: Path) -> None:
    counts = Counter(r["input"] for r in records)
    expected = {str(p) for p in files}
    missing = sorted(expected - set(counts))
    repeated = sorted(k for k, n in counts.items() if n > 1)
    if missing or repeated or len(records) != len(files):
        raise EdgeDxError(
            f"{out} has {len(records)} records for {len(files)} inputs (missing {missing[:3]}, repeated {repeated[:3]}); "
            "run again with --overwrite"
        )


# -- Ray -----------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
        import ray.data
    except ImportError:
        raise MissingDependencyError("ray", "ray", "--engine ray") from None
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Join ``address`` or start a local Ray bound to 127.0.0.1; True when this call started it."""
    if ray.is_initialized():
        log.info("using the Ray already running in this process")
        return False
    quiet = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    if address is None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a clinic machine phones nowhere
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        ray.init(address="local", num_cpus=cores, _node_ip_address="127.0.0.1", **quiet)
        return True
    try:
        ray.init(address=address, **({} if address.startswith("ray://") else quiet))
    except ConnectionError as exc:
        raise InputError(f"cannot reach the Ray cluster at --address {address}: {str(exc).rstrip('.')}; start it (ray start --head) or check the address") from None
    return True


def _gpus(device: str, gpus_per_actor: float | None, resources: Mapping[str, float]) -> float:
    if gpus_per_actor is not None:
        if gpus_per_actor < 0:
            raise InputError(f"GPUs per actor must be 0 or more, got {gpus_per_actor}")
        return gpus_per_actor
    if device in GPU_DEVICES:
        return 1.0
    if device == "auto":
        return 1.0 if resources.get("GPU", 0) > 0 else 0.0
    return 0.0


def _default_actors(resources: Mapping[str, float], gpus: float) -> int:
    if gpus > 0:
        return max(1, int(resources.get("GPU", 0) // gpus))
    return max(1, int(resources.get("CPU", 1)) // 2)  # the other half reads and cuts tiles


def _check_resources(resources: Mapping[str, float], actors: int, cpus: float, gpus: float, *, strict: bool) -> None:
    """Actors that can never all start would hang the pipeline: say so (a cluster that autoscales only gets a warning)."""
    have_cpu, have_gpu = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    problem = None
    if gpus > 0 and actors * gpus > have_gpu:
        problem = f"{actors} actor(s) × {gpus:g} GPU need {actors * gpus:g} GPUs; the Ray cluster has {have_gpu:g}: use fewer --actors, --device cpu, or a cluster with GPUs"
    elif actors * cpus >= have_cpu:
        problem = (
            f"{actors} actor(s) × {cpus:g} CPU leave none of the cluster's {have_cpu:g} CPUs for reading and tiling; "
            "use fewer actors or fewer CPUs per actor"
        )
    if problem and strict:
        raise InputError(problem)
    if problem:
        log.warning("%s (waiting for the cluster to scale up)", problem)


@contextmanager
def _quiet_data_context(ray: Any) -> Iterator[None]:
    """No progress bars or execution banners from Ray Data (the library never prints); restored afterwards."""
    ctx = ray.data.DataContext.get_current()
    saved = {k: getattr(ctx, k) for k in ("enable_progress_bars", "print_on_execution_start", "enable_auto_log_stats") if hasattr(ctx, k)}
    data_log = logging.getLogger("ray.data")
    level = data_log.level
    for key in saved:
        setattr(ctx, key, False)
    data_log.setLevel(logging.ERROR)  # its banners and "progress bars disabled" notice; failures still raise
    try:
        yield
    finally:
        data_log.setLevel(level)
        for key, value in saved.items():
            setattr(ctx, key, value)


def _dataset(
    ray: Any, files: list[Path], card: ModelCard, checked: CheckedSettings, model: Path, actors: int, cpus: float, gpus: float,
    batch_size: int, images_per_batch: int, device: str, resources: Mapping[str, float],
) -> Any:
    """paths → (read + cut tiles: tasks) → (predict + merge + record: actors) as a lazy Ray dataset."""
    rows = [{"input": str(p), "path": str(p.resolve())} for p in files]
    blocks = max(1, min(len(rows), int(resources.get("CPU", 1)) * 4))
    return (
        ray.data.from_items(rows, override_num_blocks=blocks)
        # the memory a read holds (decoded image + tiles) caps reads per node, and, differing from the
        # actors' resources, keeps Ray from fusing the reads into them, where they would wait on inference
        .map(read_and_cut, fn_kwargs={"policy": checked.crop, "card": card, "gate": checked.gate}, memory=READ_TASK_MEMORY)
        .map_batches(
            TileDiagnoser,
            fn_constructor_kwargs={
                "model": str(model.resolve()), "device": device, "batch_size": batch_size,
                "threads": max(1, int(cpus)), "crop": checked.crop, "refer_band": checked.refer_band,
            },
            batch_size=images_per_batch, compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=cpus, num_gpus=gpus,
        )
    )


# -- stage 1: read and cut (a Ray task per block of paths) ------------------------------------


def read_and_cut(row: dict[str, Any], policy: CropPolicy, card: ModelCard | None = None, gate: GateSettings | None = None) -> dict[str, Any]:
    """One input → its used tiles (uint8) with the grid, used mask and foreground, or its read error, or its
    rejection by the quality gate (``card`` and ``gate``: the local engine's scale and gate, in the same order)."""
    name, path = row["input"], row["path"]
    judge = None if card is None or gate is None else partial(gate_image, card=card, policy=policy, settings=gate)
    [(_, image, read_ms, digest)] = list(prefetched([(0, Path(path))], 0, judge))  # the local engine's read path
    started = time.perf_counter()
    seen = image if isinstance(image, Prepared) else None
    try:
        if isinstance(image, BaseException):
            raise image
        if seen is not None:
            if seen.rejected:
                return _rejected_row(name, seen, read_ms, digest or "", policy)
            image = seen.image
        tiles, layout = cut_tiles(image, policy)
    except EdgeDxError as exc:
        return _error_row(name, str(exc).replace(path, name), read_ms, policy)
    finally:
        if hasattr(image, "close") and not isinstance(image, BaseException):
            image.close()
    grid = layout.grid
    return {
        "input": name, "error": "", "read_ms": read_ms, "cut_ms": (time.perf_counter() - started) * 1000, "sha256": digest or "",
        "tiles": tiles, "used": layout.used, "foreground": layout.foreground.astype(np.float64), **_grid_fields(grid),
        "fallback": layout.fallback, **_judged_fields(seen),
    }


def _grid_fields(grid: TileGrid) -> dict[str, Any]:
    return {
        "height": grid.height, "width": grid.width, "row_starts": np.asarray(grid.row_starts, np.int64),
        "col_starts": np.asarray(grid.col_starts, np.int64), "source_size": np.asarray(grid.source_size, np.int64),
    }


def _judged_fields(seen: Prepared | None, reasons: Sequence[str] = ()) -> dict[str, str]:
    """The gate's verdict as JSON text (Arrow rows need one type per column whatever the measures)."""
    return {
        "quality": "" if seen is None else json.dumps(seen.quality), "scale": "" if seen is None else json.dumps(seen.scale),
        "reject": json.dumps(list(reasons)) if reasons else "",
    }


def _rejected_row(name: str, seen: Prepared, read_ms: float, digest: str, policy: CropPolicy) -> dict[str, Any]:
    """A rejected image: no tiles, the grid it would have had, the reasons."""
    th, tw = policy.tile_size
    assert seen.grid is not None
    n = seen.grid.n_tiles
    return {
        "input": name, "error": "", "read_ms": read_ms, "cut_ms": 0.0, "sha256": digest, "tiles": np.zeros((0, th, tw, 3), np.uint8),
        "used": np.zeros(n, bool), "foreground": np.ones(n), **_grid_fields(seen.grid), "fallback": False,
        **_judged_fields(seen, seen.reasons),
    }


def cut_tiles(image: Any, policy: CropPolicy) -> tuple[np.ndarray, CropLayout]:
    """The tiles the local engine would predict for ``image``, in its order, and the layout around them.

    The runtime's splitter itself, so the policy (resampling mode, padding,
    foreground filter, all-background fallback) cannot drift from the local
    engine's. Tile ``k`` belongs to grid position ``flatnonzero(used)[k]``.
    """
    tiles, crops = split_tiles(image, policy)
    return tiles, crops.layout()


def _error_row(name: str, error: str, read_ms: float, policy: CropPolicy) -> dict[str, Any]:
    th, tw = policy.tile_size
    empty_i = np.zeros(0, np.int64)
    return {
        "input": name, "error": error, "read_ms": read_ms, "cut_ms": 0.0, "sha256": "", "tiles": np.zeros((0, th, tw, 3), np.uint8),
        "used": np.zeros(0, bool), "foreground": np.zeros(0), "height": 0, "width": 0,
        "row_starts": empty_i, "col_starts": empty_i, "source_size": np.zeros(2, np.int64), "fallback": False,
        **_judged_fields(None),
    }


# -- stage 2: predict, merge, record (a pool of actors, one model session each) -----------------


class TileDiagnoser:
    """A Ray actor: loads the model once, then turns batches of cut images into records."""

    def __init__(
        self, model: str, device: str, batch_size: int, threads: int, crop: CropPolicy, refer_band: tuple[float, float] | None
    ) -> None:
        self.model = load_model(model, device=device, threads=threads, batch_size=batch_size, crop=crop, refer_band=refer_band)
        self.schema = record_schema(self.model.card)

    def __call__(self, batch: Mapping[str, Any]) -> Any:
        import pyarrow as pa

        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["input"]))]
        ok = [r for r in rows if not r["error"] and not r["reject"]]
        started = time.perf_counter()
        probs = self._predict([r["tiles"] for r in ok])
        per_tile_ms = (time.perf_counter() - started) * 1000 / max(1, len(probs))
        records, offset = [], 0
        for row in rows:
            record = empty_record(str(row["input"]))
            if row["error"]:
                record["error"] = str(row["error"])
            else:
                n = len(row["tiles"])
                timings = {"read": round(float(row["read_ms"]), 2), "diagnose": round(float(row["cut_ms"]) + n * per_tile_ms, 2)}
                record.update(self._record(row, probs[offset : offset + n], timings))
                record["input_sha256"] = str(row["sha256"]) or None  # the bytes the read task decoded
                offset += n
            records.append(record)
        return pa.Table.from_pylist(records, schema=self.schema)

    def _predict(self, tile_sets: list[np.ndarray]) -> np.ndarray:
        """The tiles of all images of the batch through the runtime's batcher (padded on GPUs, as locally)."""
        if not tile_sets or sum(len(t) for t in tile_sets) == 0:
            return np.zeros((0, self.model.card.n_classes))
        tiles = np.concatenate([np.asarray(t, np.uint8) for t in tile_sets])
        return TileBatcher(self.model.predict_tiles, self.model.batch_size, pad_batches=self.model.pad_batches).predict_all(tiles)

    def _record(self, row: Mapping[str, Any], probs: np.ndarray, timings: dict[str, float]) -> dict[str, Any]:
        """The record's result fields, as the local engine makes them: a rejection, a refusal (too little content)
        or the diagnosis with its scale and quality."""
        quality, scale = (json.loads(row[k]) if row[k] else None for k in ("quality", "scale"))
        if row["reject"]:
            seen = Prepared(None, scale or {}, quality or {}, tuple(json.loads(row["reject"])), self._grid(row))
            return self.model.rejection(seen, timings).to_record()
        sliding = self._sliding(row, probs)
        problem = self.model.content_problem(sliding)
        if problem is not None:  # as the local engine: no result from an image that is nearly all padding
            return {"error": problem}
        return {**self.model.to_diagnosis(sliding, timings).to_record(), "quality": quality, "scale": scale}

    def _grid(self, row: Mapping[str, Any]) -> TileGrid:
        return TileGrid(
            int(row["height"]), int(row["width"]), self.model.crop.tile_size,
            tuple(int(v) for v in row["row_starts"]), tuple(int(v) for v in row["col_starts"]),
            (int(row["source_size"][0]), int(row["source_size"][1])),
        )

    def _sliding(self, row: Mapping[str, Any], probs: np.ndarray) -> SlidingResult:
        """The local engine's SlidingResult: all grid rows NaN but the used ones, merged by the runtime's merger."""
        card, policy = self.model.card, self.model.crop
        used = np.asarray(row["used"], bool)
        grid = self._grid(row)
        tile_probs = np.full((grid.n_tiles, probs.shape[1]), np.nan)
        tile_probs[np.flatnonzero(used)] = probs
        layout = CropLayout(grid, used, np.asarray(row["foreground"], np.float64), bool(row["fallback"]))
        return merge(
            layout, tile_probs, policy, activation=card.output_activation,
            positive_index=card.positive_index if card.task == "binary" else None,
        )


def record_schema(card: ModelCard) -> Any:
    """The Arrow schema of a record: nested fields as structs and lists, so Parquet round-trips them exactly."""
    import pyarrow as pa

    label = pa.list_(pa.string()) if card.task == "multilabel" else pa.string()
    types = {
        "input": pa.string(), "label": label, "decision": label,
        "probabilities": pa.struct([(name, pa.float64()) for name in card.class_names]),
        "top_k": pa.list_(pa.struct([("class", pa.string()), ("probability", pa.float64())])),
        "n_crops": pa.int64(), "tiles_used": pa.int64(), "tiles_skipped": pa.int64(),
        "timings_ms": pa.struct([("read", pa.float64()), ("diagnose", pa.float64())]), "error": pa.string(),
        "input_sha256": pa.string(), "overlay": pa.string(), "tile_map": pa.string(), "threshold": pa.float64(), "rule": pa.string(),
        "prediction_set": pa.list_(pa.string()), "crop_dispersion": pa.float64(),
        "refer_reasons": pa.list_(pa.string()), "reject_reasons": pa.list_(pa.string()),
        "quality": pa.struct(
            [(m, pa.float64()) for m in MEASURES] + [("passed", pa.bool_()), ("gate", pa.string())]
        ),
        "scale": pa.struct([
            ("image_um_per_px", pa.float64()), ("trained_um_per_px", pa.float64()), ("source", pa.string()),
            ("factor", pa.float64()), ("note", pa.string()),
        ]),
    }
    fields = list(empty_record(""))
    if card.detection.enabled:  # the keys a detection card's records add (Diagnosis.to_record): kept, not dropped by the schema
        types.update(detection_types(pa))
        fields += list(DETECTION_KEYS)
    unknown = [k for k in fields if k not in types]
    if unknown:
        raise ValueError(f"record field(s) {unknown} have no Arrow type; add them to ray_engine.record_schema")
    return pa.schema([(k, types[k]) for k in fields])


DETECTION_KEYS = ("n_detections", "detections", "detection_threshold", "field_decision", "cells", "parasitaemia", "decided_by")


def detection_types(pa: Any) -> dict[str, Any]:
    """Arrow types of a detection card's record keys (:meth:`edgedx.runtime.detections.FieldFindings.to_record`), and
    the timings with the detection's own step (cells are never counted here: :func:`_check_model` refuses that)."""
    return {
        "n_detections": pa.int64(),
        "detections": pa.list_(pa.struct([("box", pa.list_(pa.int64())), ("score", pa.float64())])),
        "detection_threshold": pa.float64(),
        "field_decision": pa.struct([("positive", pa.bool_()), ("rule", pa.string())]),
        "cells": pa.struct([("count", pa.int64()), ("method", pa.string()), ("diameter_px", pa.float64()), ("foreground", pa.float64()), ("note", pa.string())]),
        "parasitaemia": pa.struct([
            ("percent", pa.float64()), ("ci95", pa.list_(pa.float64())), ("n_parasites", pa.int64()), ("n_cells", pa.int64()), ("note", pa.string()),
        ]),
        "decided_by": pa.string(),
        "timings_ms": pa.struct([("read", pa.float64()), ("diagnose", pa.float64()), ("detect", pa.float64()), ("count", pa.float64())]),
    }


# -- stage 3: shards ---------------------------------------------------------------------------


def _jsonl_sink(path: str) -> Any:
    """Ray's write_json goes through pandas (nullable ints become floats); this writes each record as the local engine does."""
    from ray.data.datasource import BlockBasedFileDatasink

    class JsonlRecords(BlockBasedFileDatasink):
        def __init__(self, folder: str) -> None:
            super().__init__(folder, file_format="jsonl")

        def write_block_to_file(self, block: Any, file: Any) -> None:
            lines = (json.dumps(r, ensure_ascii=False) + "\n" for r in block.to_arrow().to_pylist())
            file.write("".join(lines).encode("utf-8"))

    return JsonlRecords(path)


def _parquet_rows(shard: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError("pyarrow", "ray", "reading Parquet results") from None
    return pq.read_table(shard).to_pylist()
