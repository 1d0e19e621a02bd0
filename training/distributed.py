"""Multi-process training with DistributedDataParallel: torchrun detection, sharding, gathering, launching.

Why this shape: every rank computes the same patient-level split and the same
epoch permutation from the seed, then takes every ``world``-th position of it.
With a per-rank batch of ``global_batch / world``, rank ``r``'s k-th batch is
exactly its share of the single-process run's k-th global batch, so a run on N
processes sees the same global batches as a run on one. Validation is sharded
the same way and gathered, so every rank computes identical metrics and early
stopping stops them together. Only rank 0 writes files.

Processes are started by torch's own elastic launcher (the engine behind
``torchrun``), rendezvous on 127.0.0.1; running the plain command under
``torchrun`` works too, since :func:`session` reads the variables torchrun sets
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
Backends: gloo on CPU, nccl on CUDA (one GPU per process).
"""

from __future__ import annotations

from edgedx.deps import require

require(("torch", "timm"), extra="train", purpose="Training")

import contextlib  # noqa: E402 - after the check that names the extra to install
import inspect  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, TypeVar  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from edgedx import errors  # noqa: E402
from edgedx.errors import EdgeDxError, InputError  # noqa: E402

if TYPE_CHECKING:
    from edgedx.training.config import TrainConfig
    from edgedx.training.train import CrossValidationResult, TrainResult

log = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT = timedelta(minutes=30)  # rank 0 writes plots and Grad-CAM while the others wait


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among ``world`` processes and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def synced_batchnorm(self) -> bool:
        """SyncBatchNorm needs a GPU (torch raises on CPU tensors): on CPU each rank normalises its own share."""
        return self.distributed and self.device.type == "cuda"

    def all_gather(self, value: T) -> list[T]:
        """Every rank's ``value`` (any picklable object, numpy arrays included), in rank order."""
        if not self.distributed:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank (others pass anything, e.g. None)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: float) -> float:
        """The sum of a float over all ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())


def env_world() -> int:
    """The world size torchrun (or our launcher) announced; 1 when not under one."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_main() -> bool:
    """Rank 0, or not distributed: the process that writes and reports."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0") or 0) == 0


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[Context]:
    """The process group for a run: joined from torchrun's variables, left at the end if we joined it.

    Nested sessions (cross-validation folds) reuse the group already open.
    ``device`` is the resolved training device; on CUDA each rank takes
    ``cuda:LOCAL_RANK``.
    """
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else env_world()
    if world <= 1:
        yield Context(device=device)
        return
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise InputError(
                f"process {local_rank} of {world} needs its own GPU but torch sees {torch.cuda.device_count()}; "
                "start at most one process per GPU (--nproc / --nproc_per_node) or use --device cpu"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    ctx = Context(rank=rank, world=world, local_rank=local_rank, device=device)
    if dist.is_initialized():
        yield ctx
        return
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in os.environ]
    if missing:
        raise InputError(
            f"WORLD_SIZE={world} is set but not {', '.join(missing)}; start with torchrun or edgedx train --nproc N, "
            "or unset WORLD_SIZE for one process"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT, **kwargs)
    log.info("process %d of %d joined (%s on %s)", rank, world, backend, device)
    try:
        yield ctx
    finally:
        dist.destroy_process_group()


def check_batch(batch_size: int, world: int) -> None:
    """The global batch must split evenly, at least 2 per process (batch norm needs two samples)."""
    if world > 1 and (batch_size % world or batch_size // world < 2):
        raise InputError(
            f"batch size {batch_size} does not split into {world} processes of at least 2 images each; "
            f"use a multiple of {world} that is at least {2 * world} (the batch size is the global batch)"
        )


def pad_order(order: np.ndarray, world: int) -> np.ndarray:
    """An epoch's order padded to a multiple of ``world`` by repeating its start (as torch's DistributedSampler).

    Only when the training set is not a multiple of ``world``: then every rank
    still runs the same number of steps (the last global batch holds a repeat).
    """
    padded = -(-len(order) // world) * world
    return np.concatenate([order, order[: padded - len(order)]]) if padded > len(order) else order


def rank_batches(order: np.ndarray, batch_size: int, rank: int, world: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Each step's (start position, global batch, this rank's share ``global[rank::world]``) over an epoch.

    Rank ``r``'s share of step ``k`` equals its ``k``-th batch of ``batch_size /
    world`` items from the shard ``order[r::world]``: the torch sharding, with the
    same global batches as one process (given the same ``order``).
    """
    full = pad_order(order, world)
    for start in range(0, len(full), batch_size):
        whole = full[start : start + batch_size]
        yield start, whole, whole[rank::world]


def shard_positions(n: int, rank: int, world: int) -> np.ndarray:
    """Positions of an ``n``-long list this rank evaluates (no padding: gathered objects may differ in length)."""
    return np.arange(rank, n, world)


def gather_rows(ctx: Context, rows: np.ndarray, n: int) -> np.ndarray:
    """Reassemble per-rank rows computed at :func:`shard_positions` into the full ``n``-row array, on every rank."""
    if not ctx.distributed:
        return rows
    parts = ctx.all_gather(rows)
    out = np.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[shard_positions(n, r, ctx.world)] = part
    return out


def prepare_model(model: nn.Module, ctx: Context) -> nn.Module:
    """SyncBatchNorm on multi-GPU runs (timm's converter keeps its fused BN+activation layers intact)."""
    if not ctx.synced_batchnorm:
        return model
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """The module that runs training steps: DDP when distributed (gradients averaged), else the model itself.

    Buffers are not broadcast every step: :func:`average_buffers` syncs the
    per-rank batch-norm statistics once before each evaluation.
    """
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # Newer torch renamed the option; either way buffers are synced once at construction, not every step.
    new_name = "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    return DistributedDataParallel(model, device_ids=ids, **{"forward_sync_buffers" if new_name else "broadcast_buffers": False})


@torch.no_grad()
def average_buffers(model: nn.Module, ctx: Context) -> None:
    """Average per-process batch-norm running statistics over ranks so every rank evaluates (and saves) one model.

    Only batch norms that train and are not synchronised differ between ranks;
    frozen ones (eval mode) and SyncBatchNorm already agree and are left alone.
    """
    if not ctx.distributed or ctx.synced_batchnorm:
        return
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
                buffer.div_(ctx.world)


# -- launching ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(nproc: int, fn: Callable[..., T], *args: Any) -> dict[int, T]:
    """Run ``fn(*args)`` in ``nproc`` processes with torch's elastic launcher (rendezvous on 127.0.0.1).

    ``fn`` must be importable (a module-level function): workers are spawned.
    Returns each rank's return value. A failing worker stops the others; its
    EdgeDx error is raised here again with its own message.
    """
    if nproc < 1:
        raise InputError(f"--nproc must be at least 1, got {nproc}")
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"edgedx-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
        start_method="spawn", local_addr="127.0.0.1",
    )
    level = logging.getLogger().getEffectiveLevel()
    try:
        with _quiet_launcher():
            return elastic_launch(config, _worker)(level, fn, *args)
    except ChildFailedError as exc:
        raise _worker_error(exc) from None


def launch_train(
    data: str | Path, out: str | Path, config: TrainConfig, *, nproc: int, folds: int | None = None
) -> TrainResult | CrossValidationResult | None:
    """``edgedx train --nproc N``: train (or cross-validate) on ``nproc`` processes; rank 0's result.

    ``config.batch_size`` is the global batch; each process takes ``batch_size / nproc``.
    Callers go through :func:`edgedx.training.train.train` (``nproc=N``). With
    ``nproc`` 1 the run stays in this process, which may itself be one rank of a
    ``torchrun`` job: ranks other than 0 get None, as from ``train``.
    """
    if nproc < 1:
        raise InputError(f"--nproc must be at least 1, got {nproc}")
    if nproc > 1 and env_world() > 1:
        raise InputError(f"already one of {env_world()} processes (WORLD_SIZE is set, e.g. by torchrun); drop --nproc {nproc}")
    config.validate()
    check_batch(config.batch_size, nproc)
    if nproc > 1 and config.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        raise InputError(
            f"--nproc {nproc} needs {nproc} GPUs but torch sees {torch.cuda.device_count()}; "
            f"use --nproc {torch.cuda.device_count()} or --device cpu"
        )
    if config.device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch sees no CUDA GPU; use --device cpu or auto")
    if nproc == 1:
        return _run_training(data, out, config, folds)
    return launch(nproc, _run_training, data, out, config, folds)[0]


def _run_training(data: str | Path, out: str | Path, config: TrainConfig, folds: int | None) -> TrainResult | CrossValidationResult | None:
    """What each launched process runs: the entry point itself, in one process of the group (None on ranks but 0)."""
    from edgedx.training.train import train

    return train(data, out, config, folds=folds)


def _worker(level: int, fn: Callable[..., T], *args: Any) -> T:
    """A spawned worker: rank 0 logs at the parent's level, the others only errors; CPU threads shared out."""
    logging.basicConfig(level=level if is_main() else logging.ERROR, format=f"[rank {os.environ.get('RANK', '0')}] %(message)s")
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // env_world()))
    try:
        return fn(*args)
    except EdgeDxError as exc:
        raise _Relayed(type(exc).__name__, str(exc)) from None


class _Relayed(RuntimeError):
    """An EdgeDx error crossing the process boundary: its class name and message, for the parent to raise again."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"{_RELAY}{kind}{_RELAY}{message}{_RELAY}")


_RELAY = "\x1eEDGEDX\x1e"


def _worker_error(exc: Exception) -> EdgeDxError:
    """The failed worker's EdgeDx error, raised again here; any other failure logged with its traceback."""
    failures = sorted((getattr(exc, "failures", {}) or {}).items())
    for rank, failure in failures:
        info = failure.message if isinstance(failure.message, dict) else {"message": str(failure.message)}
        text = str(info.get("message", ""))
        if _RELAY in text:
            kind, message = text.split(_RELAY)[1:3]
            cls = getattr(errors, kind, None)
            if isinstance(cls, type) and issubclass(cls, EdgeDxError) and cls is not errors.MissingDependencyError:
                return cls(message)
            return InputError(message)
    rank, failure = failures[0] if failures else (-1, None)
    info = failure.message if failure is not None and isinstance(failure.message, dict) else {}
    stack = (info.get("extraInfo") or {}).get("py_callstack")
    if stack:
        log.error("training process %d failed:\n%s", rank, stack)
    what = info.get("message") or (f"exit code {failure.exitcode}" if failure is not None else str(exc).strip()[-300:])
    return EdgeDxError(
        f"training process {rank} failed: {what}; rerun with --nproc 1 to see it in one process "
        "(a killed process usually ran out of memory: lower --batch-size or --nproc)"
    )


@contextlib.contextmanager
def _quiet_launcher() -> Iterator[None]:
    """Torch's launcher logs every worker failure with its traceback; ours reports it once, in our words."""
    names = [n for n in logging.root.manager.loggerDict if n.startswith(("torch.distributed.elastic", "torch.multiprocessing"))]
    loggers = [logging.getLogger(n) for n in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
