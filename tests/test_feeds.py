"""Feeds: video files, cameras and streams, rolling decisions, and the scanner's hot folder.

Fast (a few seconds), no network, no GPU: videos are written with cv2.VideoWriter,
hot-folder timings use poll 0.05 s and settle 0.2 s.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from edgedx.runtime.io.feeds import (
    Frame,
    RollingDecision,
    is_temporary_name,
    is_video_path,
    iter_frames,
    parse_stream_source,
    redact_url,
    watch_folder,
)
from edgedx.runtime.io.image_io import read_image, write_image

from edgedx.errors import InputError

FPS = 10.0
N_FRAMES = 25
WIDTH, HEIGHT = 97, 61
POLL = 0.05
SETTLE = 0.2


# -- video ----------------------------------------------------------------------------------------


def colour(i: int) -> tuple[int, int, int]:
    """Frame i's RGB colour: red rises, green falls, blue stays, so a BGR/RGB swap cannot pass."""
    return (10 * i, 250 - 10 * i, 60)


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("video") / "clip with space.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (WIDTH, HEIGHT))
    assert writer.isOpened()
    for i in range(N_FRAMES):
        rgb = np.empty((HEIGHT, WIDTH, 3), np.uint8)
        rgb[:] = colour(i)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def assert_frame(frame: Frame, index: int, video: Path) -> None:
    assert frame.index == index
    assert frame.time_s == pytest.approx(index / FPS, abs=0.011)
    assert frame.source == str(video)
    assert frame.image.dtype == np.uint8 and frame.image.ndim == 3 and frame.image.shape[2] == 3
    # Some codecs round the size down to even numbers.
    assert abs(frame.image.shape[0] - HEIGHT) <= 1 and abs(frame.image.shape[1] - WIDTH) <= 1
    mean = frame.image.reshape(-1, 3).mean(axis=0)
    np.testing.assert_allclose(mean, colour(index), atol=8)  # MJPG is lossy


def test_every_frame_in_order_as_rgb(video: Path) -> None:
    frames = list(iter_frames(video))
    assert len(frames) == N_FRAMES
    for i, frame in enumerate(frames):
        assert_frame(frame, i, video)


def test_every_fifth_frame_keeps_source_index_and_time(video: Path) -> None:
    frames = list(iter_frames(str(video), every=5))
    assert [f.index for f in frames] == [0, 5, 10, 15, 20]
    for frame in frames:
        assert_frame(frame, frame.index, video)


def test_max_frames_stops_early(video: Path) -> None:
    assert [f.index for f in iter_frames(video, max_frames=3)] == [0, 1, 2]
    assert [f.index for f in iter_frames(video, every=5, max_frames=2)] == [0, 5]


def test_missing_video_fails_at_call_time_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "no such clip.mp4"
    with pytest.raises(InputError, match="not found") as info:
        iter_frames(missing)  # no iteration needed
    assert str(missing) in str(info.value)


def test_non_video_file_and_folder_are_input_errors(tmp_path: Path) -> None:
    notes = tmp_path / "scan notes.avi"
    notes.write_text("this is not a video\n")
    with pytest.raises(InputError) as info:
        list(iter_frames(notes))
    assert str(notes) in str(info.value) and "codec" in str(info.value)
    with pytest.raises(InputError, match="folder"):
        iter_frames(tmp_path)


def test_unopenable_camera_says_what_to_check() -> None:
    with pytest.raises(InputError) as info:
        list(iter_frames("camera:97", reconnect=0))  # retries: tests/test_feeds_reconnect.py
    text = str(info.value)
    assert "camera:97" in text and "index" in text and "permission" in text


@pytest.mark.parametrize("bad", [{"every": 0}, {"every": -2}, {"max_frames": 0}])
def test_bad_frame_options(video: Path, bad: dict[str, int]) -> None:
    with pytest.raises(InputError, match=next(iter(bad))):
        iter_frames(video, **bad)


def test_parse_stream_source() -> None:
    assert parse_stream_source("camera:0") == 0
    assert parse_stream_source("cam:1") == 1
    assert parse_stream_source("CAM:2") == 2
    for url in ("rtsp://10.0.0.5:554/live", "http://scope.local/video", "https://x/y.m3u8", "udp://@:1234"):
        assert parse_stream_source(url) == url
    for path in ("clip.mp4", "videos/camera 0.avi", "/data/rtsp.mkv", r"C:\clips\a.mov"):
        assert parse_stream_source(path) is None
    with pytest.raises(InputError, match="camera index"):
        parse_stream_source("camera:front")


def test_video_suffixes_and_redaction() -> None:
    assert is_video_path(Path("a b/CLIP.MP4")) and is_video_path("x.webm") and not is_video_path("x.png")
    assert redact_url("rtsp://admin:s3cret@10.0.0.5:554/live") == "rtsp://admin:***@10.0.0.5:554/live"
    assert redact_url("rtsp://10.0.0.5/live") == "rtsp://10.0.0.5/live"


# -- rolling decision ---------------------------------------------------------------------------------


def test_rolling_decision_mean_over_last_window() -> None:
    rolling = RollingDecision(3, ["neg", "pos"])
    pos = [1.0, 0.0, 0.5, 0.25, 0.75]
    expected_pos = [1.0, 0.5, 0.5, 0.25, 0.5]  # (1)/1, (1+0)/2, (1+0+.5)/3, (0+.5+.25)/3, (.5+.25+.75)/3
    for k, (p, want) in enumerate(zip(pos, expected_pos)):
        update = {"neg": 1.0 - p, "pos": p} if k % 2 else np.array([1.0 - p, p])
        assert rolling.update(update) == {"neg": 1.0 - want, "pos": want}
        assert rolling.n == min(k + 1, 3)
    rolling.reset()
    assert rolling.n == 0
    assert rolling.update(np.array([0.9, 0.1])) == {"neg": 0.9, "pos": 0.1}


def test_rolling_decision_rejects_bad_input() -> None:
    with pytest.raises(InputError, match="window=0"):
        RollingDecision(0, ["a", "b"])
    rolling = RollingDecision(2, ["a", "b"])
    with pytest.raises(InputError, match="missing"):
        rolling.update({"a": 1.0, "c": 0.0})
    with pytest.raises(InputError, match="expected 2"):
        rolling.update(np.array([0.2, 0.3, 0.5]))
    with pytest.raises(InputError, match="NaN"):
        rolling.update(np.array([np.nan, 1.0]))
    assert rolling.n == 0  # rejected updates do not enter the window


# -- hot folder ------------------------------------------------------------------------------------


def tile(value: int, size: int = 16) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


class Watcher:
    """Runs watch_folder in a thread, reading every yielded image as a real consumer would."""

    def __init__(self, folder: Path, **options: object) -> None:
        self.stop = threading.Event()
        self.seen: list[tuple[float, Path, tuple[int, ...]]] = []
        self.error: BaseException | None = None
        options = {"poll_s": POLL, "settle_s": SETTLE, **options}
        self._paths = watch_folder(folder, stop=self.stop, **options)  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for path in self._paths:
                self.seen.append((time.monotonic(), path, read_image(path).shape))
        except Exception as exc:  # noqa: BLE001 - surfaced by close()
            self.error = exc

    @property
    def paths(self) -> list[Path]:
        return [p for _, p, _ in self.seen]

    def wait_for(self, n: int, timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.seen) >= n, f"only {self.paths} after {timeout}s"

    def close(self) -> None:
        self.stop.set()
        self._thread.join(timeout=2.0)
        assert not self._thread.is_alive(), "watch_folder did not stop"
        if self.error is not None:
            raise self.error


@pytest.fixture
def hot(tmp_path: Path) -> Path:
    folder = tmp_path / "scanner out"
    folder.mkdir()
    return folder


def test_new_image_is_yielded_once(hot: Path) -> None:
    watcher = Watcher(hot)
    try:
        path = write_image(hot / "slide 1.png", tile(40))
        watcher.wait_for(1)
        time.sleep(3 * SETTLE)
        assert watcher.paths == [path]
        assert watcher.seen[0][2] == (16, 16, 3)
    finally:
        watcher.close()


def test_half_written_file_waits_until_complete(hot: Path) -> None:
    ok, encoded = cv2.imencode(".png", np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert ok
    data = encoded.tobytes()
    path = hot / "sub dir" / "big scan.png"
    path.parent.mkdir()
    watcher = Watcher(hot)
    try:
        with open(path, "wb") as handle:  # a slow scanner: first half, a pause shorter than settle_s, the rest
            handle.write(data[: len(data) // 2])
            handle.flush()
            time.sleep(SETTLE / 2)
            assert watcher.seen == []
            handle.write(data[len(data) // 2 :])
        completed = time.monotonic()
        watcher.wait_for(1)
        time.sleep(3 * SETTLE)
        assert watcher.paths == [path]
        yielded_at, _, shape = watcher.seen[0]
        assert yielded_at >= completed + SETTLE - POLL  # settled on the complete file, not the half
        assert shape == (64, 64, 3)  # the consumer decoded it whole
    finally:
        watcher.close()


def test_temporary_and_hidden_names_are_ignored(hot: Path) -> None:
    for name in ("a.tmp", "b.part", "c.crdownload", ".d.png", "~e.png"):
        (hot / name).write_bytes(b"partial")
    (hot / ".cache").mkdir()
    write_image(hot / ".cache" / "thumb.png", tile(1))
    assert is_temporary_name("X.PART") and not is_temporary_name("x.png")
    watcher = Watcher(hot, is_wanted=lambda p: True)
    try:
        real = write_image(hot / "real.png", tile(2))
        watcher.wait_for(1)
        time.sleep(2 * SETTLE)
        assert watcher.paths == [real]
        (hot / "b.part").unlink()
        done = write_image(hot / "b.png", tile(3))  # the download finished under its real name
        watcher.wait_for(2)
        assert watcher.paths == [real, done]
    finally:
        watcher.close()


def test_state_file_survives_restart_and_sees_replacements(hot: Path, tmp_path: Path) -> None:
    state = tmp_path / "state dir" / "processed.jsonl"
    a = write_image(hot / "a.png", tile(10))
    b = write_image(hot / "b.png", tile(20))
    run = {"poll_s": POLL, "settle_s": SETTLE, "state_file": state, "idle_timeout_s": 0.3}

    assert sorted(watch_folder(hot, **run)) == [a, b]  # type: ignore[arg-type]
    records = [json.loads(line) for line in state.read_text(encoding="utf-8").splitlines()]
    assert {Path(r["path"]).name for r in records} == {"a.png", "b.png"}
    assert all(isinstance(r["size"], int) and isinstance(r["mtime_ns"], int) for r in records)

    assert list(watch_folder(hot, **run)) == []  # type: ignore[arg-type]  # nothing is handled twice

    write_image(a, tile(200, size=24))  # the scanner re-scanned slide a
    assert list(watch_folder(hot, **run)) == [a]  # type: ignore[arg-type]
    assert list(watch_folder(hot, **run)) == []  # type: ignore[arg-type]


def test_state_file_inside_the_folder_is_never_yielded(hot: Path) -> None:
    a = write_image(hot / "a.png", tile(10))
    run = {"poll_s": POLL, "settle_s": 0.0, "state_file": hot / "processed.jsonl", "idle_timeout_s": 0.3}
    assert list(watch_folder(hot, is_wanted=lambda p: True, **run)) == [a]  # type: ignore[arg-type]


def test_file_not_handled_before_break_comes_again(hot: Path, tmp_path: Path) -> None:
    state = tmp_path / "processed.jsonl"
    a = write_image(hot / "a.png", tile(10))
    paths = watch_folder(hot, poll_s=POLL, settle_s=0.0, state_file=state, idle_timeout_s=0.2)
    assert next(paths) == a
    paths.close()  # like a `break` (or a crash) while handling a: not recorded
    assert not state.exists() or state.read_text() == ""
    assert list(watch_folder(hot, poll_s=POLL, settle_s=0.0, state_file=state, idle_timeout_s=0.2)) == [a]


def test_stop_event_ends_promptly_and_idle_timeout_works(hot: Path) -> None:
    watcher = Watcher(hot, poll_s=5.0)  # a long poll: stop must not wait for it
    time.sleep(0.1)
    started = time.monotonic()
    watcher.close()
    assert time.monotonic() - started < 0.5

    started = time.monotonic()
    assert list(watch_folder(hot, poll_s=POLL, settle_s=SETTLE, idle_timeout_s=0.3)) == []
    assert 0.3 <= time.monotonic() - started < 1.5


def test_missing_folder_and_bad_options(tmp_path: Path) -> None:
    missing = tmp_path / "no scanner here"
    with pytest.raises(InputError, match="not found") as info:
        watch_folder(missing)  # checked at call time, before iterating
    assert str(missing) in str(info.value)
    with pytest.raises(InputError, match="poll_s"):
        watch_folder(tmp_path, poll_s=0)
    with pytest.raises(InputError, match="idle_timeout_s"):
        watch_folder(tmp_path, idle_timeout_s=-1)
