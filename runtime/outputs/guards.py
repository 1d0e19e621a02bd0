"""Where a batch writes, checked before any work: writable, room left, never onto an input, resumable.

A clinic reruns the same command after a crash, a power cut or Ctrl-C and
expects it to carry on. Beside every results file ``OUT`` EdgeDx keeps
``OUT.run.json``: the model's sha256 and the settings that shape a record.
Running the same command again continues ``OUT`` (each input keeps exactly one
record); running it with another model or other crop settings is refused,
because mixing two models' results in one file would be silent harm; and
``--overwrite`` starts again on purpose.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import edgedx
from edgedx.card import now_iso
from edgedx.errors import InputError
from edgedx.runtime.io.integrity import atomic_write_bytes

log = logging.getLogger(__name__)

MIN_FREE_BYTES = 16 * 2**20  # a records file grows by ~1 kB per input; overlays and maps need more
RESUME_MODES = ("auto", "resume", "overwrite")


def manifest_path(out: Path) -> Path:
    return out.with_name(out.name + ".run.json")


@dataclass(frozen=True)
class RunSettings:
    """What decides a record's content: a results file is only continued under the same settings."""

    model_sha256: str | None
    settings: Mapping[str, Any]
    evidence: Mapping[str, Any] | None = None  # recorded, never compared: e.g. the self-test on this machine (--verify)

    def to_dict(self) -> dict[str, Any]:
        data = {"model_sha256": self.model_sha256, "settings": dict(self.settings)}
        return {**data, "evidence": dict(self.evidence)} if self.evidence else data


def check_writable(target: Path, option: str, *, is_folder: bool = False, min_free: int = MIN_FREE_BYTES) -> None:
    """Fail before any work when ``target``'s folder cannot be created or written, or its disk is (nearly) full."""
    folder = target if is_folder else target.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {folder} (for {option}): {exc.strerror or exc}; choose a writable location") from None
    probe = folder / f".edgedx-write-test.{os.getpid()}"
    try:
        probe.write_bytes(b"ok")
    except OSError as exc:
        raise InputError(f"cannot write in {folder} (for {option}): {exc.strerror or exc}; choose a writable location") from None
    finally:
        try:
            probe.unlink(missing_ok=True)
        except OSError:  # a read-only folder: the write above already said so
            pass
    free = shutil.disk_usage(folder).free
    if free < min_free:
        raise InputError(
            f"only {free / 2**20:.1f} MiB free on the disk of {folder} (for {option}); "
            f"free at least {min_free / 2**20:.0f} MiB or choose another location"
        )


def check_not_inputs(targets: Mapping[str, Path | None], inputs: Iterable[Path], folders: Iterable[Path] = ()) -> None:
    """No output may be an input file, and no output folder may sit inside an input folder.

    Overlays written into a folder being diagnosed would be read as images by
    the next run, so that is refused too.
    """
    resolved = {_real(p) for p in inputs}  # realpath: a symlink loop among the inputs is not an error here
    input_folders = [_real(f) for f in folders]
    for option, target in targets.items():
        if target is None:
            continue
        real = _real(target)
        if real in resolved:
            raise InputError(f"{option} {target} is one of the inputs; EdgeDx never writes over an input — choose another path")
        if option in ("--overlays", "--maps"):
            for folder in input_folders:
                if real == folder or folder in real.parents:
                    raise InputError(
                        f"{option} {target} is inside the input folder {folder}: the next run would read its files "
                        "as images; choose a folder outside it"
                    )


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def prepare_records_file(out: Path, run: RunSettings, mode: str = "auto") -> bool:
    """Decide whether ``out`` is continued (True) or started afresh (False), and record the settings.

    ``auto``: continue ``out`` when it was written under the same settings,
    start it when it does not exist, refuse otherwise. ``resume``: as auto, but
    a file from an older EdgeDx without a manifest is continued too.
    ``overwrite``: start again.
    """
    if mode not in RESUME_MODES:
        raise InputError(f"unknown output mode {mode!r}; choose one of {', '.join(RESUME_MODES)}")
    manifest = manifest_path(out)
    has_records = out.is_file() and out.stat().st_size > 0
    resume = False
    if has_records and mode != "overwrite":
        previous = _read_manifest(manifest)
        if previous is None and mode == "auto":
            raise InputError(
                f"{out} already exists and was not written by this command (no {manifest.name} beside it); "
                "pass --overwrite to replace it, --resume to continue it anyway, or choose another --out"
            )
        if previous is not None:
            _check_same(out, previous, run)
        resume = True
        log.info("continuing %s: inputs already recorded there are not diagnosed again", out)
    document = {
        "edgedx_version": edgedx.__version__,
        **run.to_dict(),
        "started_at": now_iso(),
        "resumed": resume,
    }
    atomic_write_bytes(manifest, (json.dumps(document, indent=2, default=str) + "\n").encode("utf-8"))
    return resume


def _read_manifest(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise InputError(f"{path} is unreadable; delete it together with its results file, or pass --overwrite") from None
    return data if isinstance(data, dict) else None


def _check_same(out: Path, previous: Mapping[str, Any], run: RunSettings) -> None:
    now = run.to_dict()
    fix = "pass --overwrite to start again, or choose another --out"
    if previous.get("model_sha256") != now["model_sha256"]:
        raise InputError(
            f"{out} holds results of another model (sha256 {str(previous.get('model_sha256'))[:12]}…, this one "
            f"{str(now['model_sha256'])[:12]}…); one results file never mixes models: {fix}"
        )
    before = previous.get("settings") or {}
    changed = sorted(k for k in set(before) | set(now["settings"]) if before.get(k) != _plain(now["settings"].get(k)))
    if changed:
        key = changed[0]
        raise InputError(
            f"{out} was written with {key}={before.get(key)!r}, this run has {key}={_plain(now['settings'].get(key))!r}; "
            f"one results file never mixes settings: {fix}"
        )


def _plain(value: Any) -> Any:
    """What the value looks like after a JSON round trip (tuples become lists)."""
    return json.loads(json.dumps(value, default=str))


def check_distinct(targets: Mapping[str, Path | None]) -> dict[str, Path]:
    """The named output files, refusing two options that name the same file."""
    named = {option: Path(path) for option, path in targets.items() if path is not None}
    seen: dict[str, str] = {}
    for option, path in named.items():
        real = os.path.realpath(path)
        if real in seen:
            raise InputError(f"{seen[real]} and {option} are the same file {path}; give each its own file")
        seen[real] = option
    return named


def lock_path(target: Path) -> Path:
    return target.with_name(target.name + ".lock")


@contextmanager
def exclusive_outputs(targets: Mapping[str, Path | None]) -> Iterator[None]:
    """Hold an exclusive lock on each output file for the whole run; refuse two options naming one file.

    Two runs appending to one results file interleave lines and repeat inputs;
    an audit log that is also the results file corrupts both. The lock is an
    OS lock on ``OUT.lock`` (released by the kernel even after ``kill -9``), and
    the refusal names the process that holds it.
    """
    named = check_distinct(targets)
    held: list[tuple[Path, Any]] = []
    try:
        for option, path in named.items():
            held.append((lock_path(path), _lock(path, option)))
        yield
    finally:
        for lock, handle in reversed(held):
            _unlock(handle)
            lock.unlink(missing_ok=True)


def _lock(path: Path, option: str) -> Any:
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock, "a+", encoding="utf-8")  # noqa: SIM115 - held for the run, closed in _unlock
    try:
        _os_lock(handle)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise InputError(
            f"{path} (for {option}) is being written by another EdgeDx process (pid {holder}, lock {lock}); "
            "wait for it to finish, or choose another file"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _os_lock(handle: Any) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: lock the first byte, without waiting
        import msvcrt

        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        return
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unlock(handle: Any) -> None:
    try:
        handle.close()  # closing releases an flock; msvcrt locks end with the handle too
    except OSError:
        pass
