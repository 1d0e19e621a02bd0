"""Image sources for a clinic that runs all day: video files, cameras, streams and a hot folder.

Still files go through :mod:`edgedx.runtime.io.inputs`; this module covers the rest:

- :func:`iter_frames` decodes a video file, a camera (``camera:0``) or a network
  stream (``rtsp://...``) into RGB :class:`Frame` objects, optionally every n-th;
- :class:`RollingDecision` averages frame-level probabilities over a short window
  so one blurred or noisy frame does not flip a live decision;
- :func:`watch_folder` yields each image a scanner drops into a folder exactly
  once, only after the scanner has finished writing it, and remembers what it
  has handled across restarts.

numpy, OpenCV and the standard library only (the runtime never imports torch).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import cv2
import numpy as np
from edgedx.runtime.io.image_io import is_image_path, to_rgb_uint8

from edgedx.errors import EdgeDxError, InputError, StreamLostError

from edgedx.runtime.outputs.names import json_line, json_lines

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg"})
STREAM_SCHEMES = ("rtsp://", "http://", "https://", "udp://")
CAMERA_PREFIXES = ("camera:", "cam:")
TEMP_SUFFIXES = (".tmp", ".part", ".crdownload")
BACKOFF_FIRST_S = 0.5  # wait before the first reconnect attempt; doubles each failed attempt
BACKOFF_CAP_S = 8.0  # longest wait between attempts


# -- video files, cameras and streams ------------------------------------------------------


def is_video_path(path: str | Path) -> bool:
    """By suffix only; decoding decides for real."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def parse_stream_source(text: str) -> int | str | None:
    """``camera:N``/``cam:N`` → camera index N; a stream URL → the URL; anything else → None (a file path).

    Raises :class:`InputError` for ``camera:`` with something other than a non-negative index.
    """
    stripped = text.strip()
    lowered = stripped.lower()
    for prefix in CAMERA_PREFIXES:
        if lowered.startswith(prefix):
            index = stripped[len(prefix) :].strip()
            if not index.isdigit():
                raise InputError(
                    f"camera source {text!r}: expected a non-negative camera index after {prefix!r}, "
                    f"e.g. {prefix}0 for the first camera"
                )
            return int(index)
    if lowered.startswith(STREAM_SCHEMES):
        return stripped
    return None


@dataclass(frozen=True)
class Frame:
    """One decoded frame: where it sits in the source and its pixels as (H, W, 3) uint8 RGB."""

    index: int  # frame number in the source, counting every frame (skipped ones too)
    time_s: float  # position in the source, in seconds
    image: np.ndarray
    source: str


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``, so stream credentials never reach a log or record."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username or ''}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass
class FeedStats:
    """What one camera, stream or video delivered; pass one to :func:`iter_frames` to watch it fill.

    Updated as frames flow, so a caller can read it mid-run (a status page) as
    well as after the iterator ends or raises.
    """

    source: str = ""
    frames_read: int = 0  # grabbed from the source, including those skipped by ``every``
    frames_yielded: int = 0
    decode_failures: int = 0  # grabbed but not decodable: skipped, no reconnect
    reconnects: int = 0  # times the source came back after a loss
    reconnect_attempts: int = 0  # reopenings tried, successful or not
    seconds_disconnected: float = 0.0  # from a failed grab (or open) to the next frame, summed
    size_changes: int = 0  # frames whose size differs from the previous frame's


def backoff_delays(attempts: int, *, first_s: float = BACKOFF_FIRST_S, cap_s: float = BACKOFF_CAP_S) -> list[float]:
    """The waits before reconnect attempts 1..n: 0.5, 1, 2, 4, 8, 8, ... s (no jitter: logs and tests can predict them)."""
    return [min(cap_s, first_s * 2.0**k) for k in range(attempts)]


def iter_frames(
    source: str | Path | int,
    *,
    every: int = 1,
    max_frames: int | None = None,
    reconnect: int = 5,
    timeout_s: float = 10.0,
    stats: FeedStats | None = None,
) -> Iterator[Frame]:
    """Yield every ``every``-th frame of a video file, camera or stream, as RGB.

    ``source`` is a file path, a camera index (int, or ``camera:0``/``cam:0``) or a
    stream URL (``rtsp://``, ``http(s)://``, ``udp://``). Skipped frames are only
    grabbed, not decoded, so ``every=10`` on a 30 fps camera costs little.
    ``max_frames`` caps the frames yielded (None: to the end of the file; a
    camera or stream runs until it is lost).

    A camera or stream that stops delivering (a cable pulled, a network drop) is
    released and reopened after 0.5, 1, 2, 4, 8, 8, ... s (:func:`backoff_delays`),
    and frame indices continue where they left off. After ``reconnect``
    consecutive failed attempts (0: none) it raises :class:`StreamLostError`.
    A frame that fails to decode is counted and skipped. Streams are opened with
    ``timeout_s`` as FFmpeg's open and read timeout, so a dead address cannot hang
    the reader. ``stats`` (a :class:`FeedStats`) is updated as frames flow.

    Arguments and a missing file are checked at call time; a source that OpenCV
    cannot open raises :class:`InputError` on the first ``next()`` (for cameras
    and streams, after the reconnect attempts).
    """
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise InputError(f"every={every!r}: must be a positive integer (1 keeps every frame, 5 every fifth)")
    if max_frames is not None and (
        isinstance(max_frames, bool) or not isinstance(max_frames, numbers.Integral) or max_frames < 1
    ):
        raise InputError(f"max_frames={max_frames!r}: must be a positive integer, or None for no limit")
    if isinstance(reconnect, bool) or not isinstance(reconnect, numbers.Integral) or reconnect < 0:
        raise InputError(f"reconnect={reconnect!r}: must be 0 or more attempts (0 gives up at the first lost frame)")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, numbers.Real) or not (0 < timeout_s < math.inf):
        raise InputError(f"timeout_s={timeout_s!r}: must be a positive number of seconds, e.g. 10")
    target, label, kind = _resolve_source(source)
    feed = _Feed(target, label, kind, int(reconnect), float(timeout_s), stats if stats is not None else FeedStats())
    return feed.frames(int(every), None if max_frames is None else int(max_frames))


def _resolve_source(source: str | Path | int) -> tuple[str | int, str, str]:
    """(what cv2.VideoCapture opens, a printable name, 'file'|'camera'|'stream')."""
    if isinstance(source, bool):
        raise InputError(f"video source {source!r}: give a file path, a camera index or a stream URL")
    if isinstance(source, numbers.Integral):
        source = int(source)
        if source < 0:
            raise InputError(f"camera index {source}: must be 0 or more (0 is the first camera)")
        return source, f"camera:{source}", "camera"
    if isinstance(source, str):
        parsed = parse_stream_source(source)
        if isinstance(parsed, int):
            return parsed, f"camera:{parsed}", "camera"
        if isinstance(parsed, str):
            return parsed, redact_url(parsed), "stream"
    path = Path(source)
    if not path.exists():
        raise InputError(f"video file not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a video file; give one video file (e.g. .mp4, .avi)")
    return str(path), str(path), "file"


def _open_hint(label: str, kind: str) -> str:
    if kind == "camera":
        return (
            f"cannot open {label}: check the camera index (0 is the first camera), that the camera is "
            "connected and not in use by another program, and the permissions of this user on it "
            "(on Linux: /dev/videoN and membership of the 'video' group)"
        )
    if kind == "stream":
        return (
            f"cannot open stream {label}: check that the address is reachable from this machine, "
            "the URL and credentials are right, and the stream is running"
        )
    return (
        f"cannot open {label} as a video: check that it is a video file (e.g. .mp4, .avi) and that its "
        "codec is supported by this OpenCV build (re-encode to H.264 MP4 or MJPG AVI if not)"
    )


def _lost_hint(kind: str) -> str:
    if kind == "camera":
        return "check the camera's cable and power, that no other program took it over, and the kernel log (dmesg) for USB resets"
    return "check that the stream is still running, the network path to it (ping the host), and the streaming device's logs"


# Seams for tests: a fake capture, and a clock that sleeping advances instead of waiting.
_sleep: Callable[[float], None] = time.sleep
_clock: Callable[[], float] = time.monotonic


def _open_capture(target: str | int, kind: str, timeout_s: float) -> cv2.VideoCapture:
    """Open ``target``; streams through FFmpeg with open/read timeouts so a dead address cannot hang.

    FFmpeg refuses to open when given a parameter it does not support, so the
    timeouts go only to FFmpeg. Cameras (V4L2 on Linux) give up on a silent
    device by themselves after ``OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT`` (10 s by default).
    """
    if kind == "stream" and cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG):
        ms = max(1, round(timeout_s * 1000))
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        return cv2.VideoCapture(target, cv2.CAP_FFMPEG, params)
    return cv2.VideoCapture(target)


class _Feed:
    """One source being read: the open capture, the reconnect budget and the running statistics."""

    def __init__(self, target: str | int, label: str, kind: str, reconnect: int, timeout_s: float, stats: FeedStats) -> None:
        self.target, self.label, self.kind = target, label, kind
        self.live = kind != "file"
        self.reconnect = reconnect
        self.timeout_s = timeout_s
        self.stats = stats
        stats.source = label
        self.capture: cv2.VideoCapture | None = None
        self._failed_attempts = 0  # consecutive reconnect attempts without a frame
        self._session_frames = 0  # frames grabbed since the capture was last opened

    def frames(self, every: int, max_frames: int | None) -> Iterator[Frame]:
        stats = self.stats
        index = -1  # the source's frame number, kept across reconnects
        shape: tuple[int, ...] | None = None
        lost_at: float | None = None  # when the frames stopped, while reconnecting
        try:
            self.capture = _open_capture(self.target, self.kind, self.timeout_s)
            if not self.capture.isOpened():
                if not self.live:
                    raise InputError(_open_hint(self.label, self.kind))
                lost_at = _clock()
                self._reopen(lost_at, index)
            fps = self.capture.get(cv2.CAP_PROP_FPS)
            fps = fps if math.isfinite(fps) and fps > 0 else 0.0
            log.info("reading %s (%s, %.3g fps, every %d frame(s))", self.label, self.capture.getBackendName(), fps, every)
            started = _clock()
            while max_frames is None or stats.frames_yielded < max_frames:
                if not self.capture.grab():
                    if not self.live or self._finished():
                        break
                    if lost_at is None:
                        lost_at = _clock()
                        log.warning("%s stopped delivering frames after %d frame(s); reconnecting", self.label, index + 1)
                    self._reopen(lost_at, index)
                    continue
                if lost_at is not None:
                    self._back(lost_at)
                    lost_at = None
                index += 1
                stats.frames_read += 1
                self._session_frames += 1
                if index % every:
                    continue
                image = self._decode(index)
                if image is None:
                    continue
                if shape is not None and image.shape != shape:
                    stats.size_changes += 1
                    log.log(
                        logging.WARNING if stats.size_changes <= 3 else logging.DEBUG,
                        "%s: frame %d is %dx%d, the previous frame was %dx%d",
                        self.label, index, image.shape[1], image.shape[0], shape[1], shape[0],
                    )
                shape = image.shape
                time_s = _clock() - started if self.live else _file_time(self.capture, index, fps)
                stats.frames_yielded += 1  # before the yield: a caller reading stats mid-run sees this frame
                yield Frame(index=index, time_s=time_s, image=image, source=self.label)
            if index < 0 and not self.live:
                raise InputError(_open_hint(self.label, self.kind) + "; no frame could be decoded")
        finally:
            if lost_at is not None:  # lost for good (or the caller stopped while reconnecting)
                stats.seconds_disconnected += _clock() - lost_at
            if self.capture is not None:
                self.capture.release()
            log.info(
                "%s: %d frame(s) read, %d yielded, %d not decodable, %d reconnect(s), %.1f s disconnected, %d size change(s)",
                self.label, stats.frames_read, stats.frames_yielded, stats.decode_failures, stats.reconnects,
                stats.seconds_disconnected, stats.size_changes,
            )

    def _finished(self) -> bool:
        """A stream that is really a file (``http://.../clip.mp4``) ends after its frame count; reopening would replay it.

        Live streams report no frame count (0 or less), so they always reconnect.
        """
        assert self.capture is not None
        count = self.capture.get(cv2.CAP_PROP_FRAME_COUNT)
        if self.kind == "stream" and math.isfinite(count) and count > 0 and self._session_frames >= count:
            log.info("%s ended after its %d frame(s) (a finite stream, not reconnected)", self.label, int(count))
            return True
        return False

    def _decode(self, index: int) -> np.ndarray | None:
        """The grabbed frame as RGB, or None (counted) when it cannot be decoded."""
        assert self.capture is not None
        ok, raw = self.capture.retrieve()
        try:
            if ok and raw is not None and raw.size:
                return to_rgb_uint8(raw, bgr=True)
            reason = "the decoder returned nothing"
        except EdgeDxError as exc:  # e.g. an unexpected pixel layout from a camera driver
            reason = str(exc)
        self.stats.decode_failures += 1
        log.warning("%s: frame %d could not be decoded (%s); skipped", self.label, index, reason)
        return None

    def _reopen(self, lost_at: float, index: int) -> None:
        """Release, wait, reopen until the source opens; raise once ``reconnect`` attempts in a row failed.

        An attempt also fails when the source opens but its first grab does not
        deliver; the caller then comes back here and the back-off carries on.
        """
        assert self.capture is not None
        self.capture.release()
        attempt = self._failed_attempts
        while True:
            if attempt >= self.reconnect:
                self._give_up(lost_at, index, attempt)
            delay = backoff_delays(attempt + 1)[-1]
            attempt += 1
            log.warning(
                "%s: %s; reconnect attempt %d/%d in %.3g s",
                self.label, "no frame yet" if index < 0 else f"no frame since frame {index}", attempt, self.reconnect, delay,
            )
            _sleep(delay)
            self.stats.reconnect_attempts += 1
            self.capture = _open_capture(self.target, self.kind, self.timeout_s)
            if self.capture.isOpened():
                self._failed_attempts = attempt  # until a frame arrives, this attempt counts as failed
                self._session_frames = 0
                return
            self.capture.release()

    def _back(self, lost_at: float) -> None:
        """A frame arrived after a loss: count the reconnection and reset the back-off."""
        away = _clock() - lost_at
        self.stats.reconnects += 1
        self.stats.seconds_disconnected += away
        log.info("%s is back after %.1f s (%d attempt(s))", self.label, away, self._failed_attempts)
        self._failed_attempts = 0

    def _give_up(self, lost_at: float, index: int, attempts: int) -> None:
        """Raise: InputError with the opening hint when no frame ever came, else StreamLostError."""
        seconds = _clock() - lost_at
        if index < 0:
            raise InputError(
                f"{_open_hint(self.label, self.kind)} (no frame in {attempts + 1} attempt(s) over {seconds:.1f} s; "
                "reconnect=N sets how many retries)"
            )
        tried = (
            f"{attempts} reconnect attempt(s) over {seconds:.1f} s failed"
            if attempts
            else "no reconnection was tried (reconnect=0)"
        )
        raise StreamLostError(
            f"{self.label} stopped delivering frames after {index + 1} frame(s) and did not come back: {tried}; "
            f"{_lost_hint(self.kind)}, then start again (reconnect=N allows more attempts, up to {BACKOFF_CAP_S:.0f} s apart)"
        )


def _file_time(capture: cv2.VideoCapture, index: int, fps: float) -> float:
    """The container's timestamp when it has one, else index/fps, else 0."""
    msec = capture.get(cv2.CAP_PROP_POS_MSEC)
    if math.isfinite(msec) and (msec > 0 or (index == 0 and msec == 0)):
        return msec / 1000.0
    if fps > 0:
        return index / fps
    return 0.0


class RollingDecision:
    """Mean class probabilities over the last ``window`` frames.

    A live decision from single frames flickers (motion blur, a bubble drifting
    past); averaging a short window keeps it steady while still following the
    specimen when it really changes.
    """

    def __init__(self, window: int, class_names: Sequence[str]) -> None:
        if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 1:
            raise InputError(f"window={window!r}: must be a positive number of frames (1 turns smoothing off)")
        names = tuple(class_names)
        if not names or len(set(names)) != len(names):
            raise InputError(f"class_names {list(names)}: give one distinct name per class")
        self.window = int(window)
        self.class_names = names
        self._history: deque[np.ndarray] = deque(maxlen=window)

    @property
    def n(self) -> int:
        """Frames currently in the window (fewer than ``window`` just after start or reset)."""
        return len(self._history)

    def reset(self) -> None:
        """Forget the window, e.g. when the slide or patient changes."""
        self._history.clear()

    def update(self, probabilities: Mapping[str, float] | np.ndarray) -> dict[str, float]:
        """Add one frame's probabilities (by class name, or in class order) and return the window mean."""
        values = self._as_vector(probabilities)
        self._history.append(values)
        mean = np.mean(np.stack(self._history), axis=0)
        return {name: float(p) for name, p in zip(self.class_names, mean)}

    def _as_vector(self, probabilities: Mapping[str, float] | np.ndarray) -> np.ndarray:
        if isinstance(probabilities, Mapping):
            missing = [n for n in self.class_names if n not in probabilities]
            unknown = [k for k in probabilities if k not in self.class_names]
            if missing or unknown:
                raise InputError(
                    f"probabilities for classes {sorted(map(str, probabilities))} do not match "
                    f"{list(self.class_names)} (missing {missing}, unknown {unknown})"
                )
            values = np.array([float(probabilities[n]) for n in self.class_names], dtype=np.float64)
        else:
            values = np.asarray(probabilities, dtype=np.float64).reshape(-1)
            if values.size != len(self.class_names):
                raise InputError(
                    f"got {values.size} probabilities, expected {len(self.class_names)} "
                    f"(one per class: {list(self.class_names)})"
                )
        if not np.all(np.isfinite(values)):
            raise InputError(f"probabilities {values.tolist()} contain NaN or infinity; check the model output")
        return values


# -- hot folder -------------------------------------------------------------------------------


def is_temporary_name(name: str) -> bool:
    """Hidden files and the names scanners and browsers use while still writing."""
    lowered = name.lower()
    return name.startswith((".", "~")) or lowered.endswith(TEMP_SUFFIXES)


def watch_folder(
    folder: str | Path,
    *,
    poll_s: float = 1.0,
    settle_s: float = 2.0,
    state_file: str | Path | None = None,
    stop: threading.Event | None = None,
    idle_timeout_s: float | None = None,
    is_wanted: Callable[[Path], bool] = is_image_path,
) -> Iterator[Path]:
    """Yield each new wanted file under ``folder`` (recursively) once, when it is complete.

    A file is complete when its size and modification time have not changed for
    ``settle_s`` seconds, so a scanner still writing a large TIFF is never read
    half-written. Hidden and temporary names (``.x``, ``~x``, ``*.tmp``,
    ``*.part``, ``*.crdownload``) are ignored. Files ready together come oldest
    first (modification time, then name).

    With ``state_file`` (JSON Lines) a file is recorded once the caller has
    handled it, i.e. when it asks for the next one; after a restart, recorded
    files are skipped unless replaced (different size or mtime). A ``break`` out
    of the loop leaves the last file unrecorded (it comes again after a restart:
    at-least-once); set ``stop`` and keep iterating to end cleanly.

    Ends when ``stop`` is set, or after ``idle_timeout_s`` seconds with nothing
    new (None: runs until stopped). Arguments and the folder are checked at call time.
    """
    root = Path(folder)
    if not root.exists():
        raise InputError(f"watch folder not found: {root}; create it or point to the scanner's output folder")
    if not root.is_dir():
        raise InputError(f"watch folder {root} is a file, not a folder; give the folder the scanner writes into")
    if not (poll_s > 0 and math.isfinite(poll_s)):
        raise InputError(f"poll_s={poll_s!r}: must be a positive number of seconds")
    if not (settle_s >= 0 and math.isfinite(settle_s)):
        raise InputError(f"settle_s={settle_s!r}: must be 0 or more seconds")
    if idle_timeout_s is not None and not idle_timeout_s > 0:
        raise InputError(f"idle_timeout_s={idle_timeout_s!r}: must be a positive number of seconds, or None")
    state = Path(state_file) if state_file is not None else None
    if state is not None and state.is_dir():
        raise InputError(f"state_file {state} is a folder; give a file path such as processed.jsonl")
    done = _load_state(state) if state is not None else {}
    return _watch(root, poll_s, settle_s, state, done, stop, idle_timeout_s, is_wanted)


Signature = tuple[int, int]  # (size in bytes, mtime in ns)


def _key(path: Path) -> str:
    return os.path.abspath(path)


def _load_state(state: Path) -> dict[str, Signature]:
    """Processed files from a JSON Lines state file; later lines win, damaged lines are skipped."""
    done: dict[str, Signature] = {}
    if not state.exists():
        return done
    try:
        text = state.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InputError(f"cannot read state_file {state}: {exc.strerror or exc}; check its permissions") from None
    for number, line in json_lines(text):
        try:
            record = json.loads(line)
            done[str(record["path"])] = (int(record["size"]), int(record["mtime_ns"]))
        except (ValueError, KeyError, TypeError):
            # A crash mid-write leaves a torn last line; that file is simply handled again.
            log.warning("%s line %d is not a valid record; ignored", state, number)
    return done


def _append_state(state: Path, key: str, signature: Signature) -> None:
    """Append one record and force it to disk, so a power cut cannot lose a handled file."""
    state.parent.mkdir(parents=True, exist_ok=True)
    line = json_line({"path": key, "size": signature[0], "mtime_ns": signature[1]})
    with open(state, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _scan(root: Path, is_wanted: Callable[[Path], bool], exclude: str | None) -> dict[Path, Signature] | None:
    """Wanted, non-temporary files under ``root`` with their signatures; None when ``root`` is unreadable.

    ``exclude`` (an absolute path) is the state file, which must never be fed to the caller.
    """
    found: dict[Path, Signature] = {}
    failed = False

    def on_error(exc: OSError) -> None:
        nonlocal failed
        if Path(exc.filename or "") == root:
            failed = True

    for directory, subdirs, files in os.walk(root, onerror=on_error):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in files:
            if is_temporary_name(name):
                continue
            path = Path(directory, name)
            if _key(path) == exclude or not is_wanted(path):
                continue
            try:
                st = path.stat()
            except OSError:  # removed or renamed between listing and stat
                continue
            found[path] = (st.st_size, st.st_mtime_ns)
    if failed or not root.is_dir():
        return None
    return found


def _watch(
    root: Path,
    poll_s: float,
    settle_s: float,
    state: Path | None,
    done: dict[str, Signature],
    stop: threading.Event | None,
    idle_timeout_s: float | None,
    is_wanted: Callable[[Path], bool],
) -> Iterator[Path]:
    log.info("watching %s (poll %.3gs, settle %.3gs, %d file(s) already processed)", root, poll_s, settle_s, len(done))
    exclude = _key(state) if state is not None else None
    pending: dict[Path, tuple[Signature, float]] = {}  # signature and when it was first seen unchanged
    last_activity = time.monotonic()
    root_missing = False
    while not (stop is not None and stop.is_set()):
        now = time.monotonic()
        found = _scan(root, is_wanted, exclude)
        if found is None:
            if not root_missing:
                log.warning("watch folder %s is not readable (unmounted or removed?); still waiting", root)
            root_missing = True
            found = {}
        elif root_missing:
            log.info("watch folder %s is readable again", root)
            root_missing = False

        ready: list[tuple[int, str, Path, Signature]] = []
        still_pending: dict[Path, tuple[Signature, float]] = {}
        for path, signature in found.items():
            if done.get(_key(path)) == signature:
                continue
            previous = pending.get(path)
            if previous is None or previous[0] != signature:
                if previous is None:
                    log.debug("new file %s; waiting for it to settle", path)
                previous = (signature, now)
                last_activity = now
            if now - previous[1] >= settle_s:
                ready.append((signature[1], str(path), path, signature))
            else:
                still_pending[path] = previous
        pending = still_pending

        for _mtime, _name, path, signature in sorted(ready):
            if stop is not None and stop.is_set():
                return
            try:  # the caller may have spent a while on the previous file: check this one is still unchanged
                st = path.stat()
                current = (st.st_size, st.st_mtime_ns)
            except OSError:
                continue
            if current != signature:
                pending[path] = (current, time.monotonic())
                continue
            log.info("ready: %s (%d bytes)", path, signature[0])
            yield path
            key = _key(path)
            done[key] = signature
            if state is not None:
                _append_state(state, key, signature)
            last_activity = time.monotonic()

        if idle_timeout_s is not None and not pending and time.monotonic() - last_activity >= idle_timeout_s:
            log.info("nothing new in %s for %.3gs; stopping", root, idle_timeout_s)
            return
        if stop is not None:
            stop.wait(poll_s)
        else:
            time.sleep(poll_s)
    log.info("stopped watching %s", root)
