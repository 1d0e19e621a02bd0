"""Cameras and streams that drop out: reconnect with back-off, give up cleanly, never hang.

A scripted fake capture stands in for OpenCV (no camera, no network) and a fake
clock replaces sleeping, so every back-off is asserted exactly and no test waits.
Two tests use a real FFmpeg capture on a clip served over HTTP from localhost:
one proves the open/read timeouts are accepted and cut a stalled stream short.
"""

from __future__ import annotations

import http.server
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import cv2
import numpy as np
import pytest
from edgedx.runtime.io import feeds
from edgedx.runtime.io.feeds import FeedStats, Frame, backoff_delays, iter_frames

from edgedx.errors import InputError, StreamLostError

OPEN_FAILS = "open fails"  # a session whose open() fails
UNDECODABLE = "undecodable"  # a grabbed frame that retrieve() cannot decode
FRAME_S = 0.1  # the fake clock advances this much per decoded frame


class FakeTime:
    """A clock that only sleeping (and decoding) moves, recording every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class FakeCapture:
    """One opening of a scripted source: delivers its frames, then every grab fails."""

    def __init__(self, session: object, fake_time: FakeTime) -> None:
        self.frames = None if session == OPEN_FAILS else list(session)  # type: ignore[call-overload]
        self.fake_time = fake_time
        self.current: object = None
        self.released = False

    def isOpened(self) -> bool:
        return self.frames is not None and not self.released

    def grab(self) -> bool:
        if not self.isOpened() or not self.frames:
            return False
        self.current = self.frames.pop(0)
        return True

    def retrieve(self) -> tuple[bool, np.ndarray | None]:
        self.fake_time.now += FRAME_S
        if self.current is UNDECODABLE:
            return False, None
        return True, self.current  # type: ignore[return-value]

    def get(self, prop: int) -> float:
        return 25.0 if prop == cv2.CAP_PROP_FPS else 0.0  # a live source: no frame count, no timestamps

    def getBackendName(self) -> str:
        return "FAKE"

    def release(self) -> None:
        self.released = True


class Script:
    """Each open takes the next session (a list of frames, or OPEN_FAILS); after the script every open fails."""

    def __init__(self, fake_time: FakeTime) -> None:
        self.fake_time = fake_time
        self.sessions: list[object] = []
        self.opens: list[tuple[object, str, float]] = []
        self.captures: list[FakeCapture] = []

    def open(self, target: str | int, kind: str, timeout_s: float) -> FakeCapture:
        self.opens.append((target, kind, timeout_s))
        capture = FakeCapture(self.sessions.pop(0) if self.sessions else OPEN_FAILS, self.fake_time)
        self.captures.append(capture)
        return capture


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Script, FakeTime]]:
    fake_time = FakeTime()
    script = Script(fake_time)
    monkeypatch.setattr(feeds, "_open_capture", script.open)
    monkeypatch.setattr(feeds, "_sleep", fake_time.sleep)
    monkeypatch.setattr(feeds, "_clock", fake_time.clock)
    started = time.perf_counter()
    yield script, fake_time
    assert time.perf_counter() - started < 0.5, "a reconnect test slept for real"
    assert all(c.released for c in script.captures), "a capture was left open"


def frames(first: int, n: int, shape: tuple[int, int] = (12, 16)) -> list[np.ndarray]:
    """BGR frames whose blue value is their running number, so each yielded frame can be identified."""
    out = []
    for k in range(first, first + n):
        bgr = np.zeros((*shape, 3), np.uint8)
        bgr[..., 0] = k
        out.append(bgr)
    return out


def ids(got: Sequence[Frame]) -> list[int]:
    return [int(f.image[0, 0, 2]) for f in got]  # blue is channel 2 once converted to RGB


def take(source: str, **options: object) -> tuple[list[Frame], BaseException | None]:
    """Frames until the iterator ends or raises, and what it raised."""
    got: list[Frame] = []
    try:
        for frame in iter_frames(source, **options):  # type: ignore[arg-type]
            got.append(frame)  # noqa: PERF402 - keeps the frames that came before an error
    except InputError as exc:
        return got, exc
    return got, None


def test_backoff_schedule_doubles_to_a_cap() -> None:
    assert backoff_delays(7) == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff_delays(0) == []


def test_drop_then_two_failed_opens_then_back_continues_the_index(fake, caplog) -> None:
    script, fake_time = fake
    script.sessions = [frames(0, 5), OPEN_FAILS, OPEN_FAILS, frames(5, 5)]
    stats = FeedStats()
    with caplog.at_level(logging.INFO, logger="edgedx.runtime.io.feeds"):
        got, error = take("camera:3", max_frames=10, stats=stats)
    assert error is None
    assert [f.index for f in got] == list(range(10))
    assert ids(got) == list(range(10))  # every frame once, none repeated or lost
    assert {f.source for f in got} == {"camera:3"}
    assert fake_time.sleeps == [0.5, 1.0, 2.0]
    assert script.opens == [(3, "camera", 10.0)] * 4
    times = [f.time_s for f in got]
    assert times == sorted(times) and times[5] - times[4] == pytest.approx(3.5 + FRAME_S)  # the gap is visible
    assert stats == FeedStats(
        source="camera:3", frames_read=10, frames_yielded=10, decode_failures=0, reconnects=1,
        reconnect_attempts=3, seconds_disconnected=pytest.approx(3.5), size_changes=0,
    )
    attempts = [r.getMessage() for r in caplog.records if "reconnect attempt" in r.getMessage()]
    assert attempts == [
        "camera:3: no frame since frame 4; reconnect attempt 1/5 in 0.5 s",
        "camera:3: no frame since frame 4; reconnect attempt 2/5 in 1 s",
        "camera:3: no frame since frame 4; reconnect attempt 3/5 in 2 s",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records if "reconnect attempt" in r.getMessage())
    summary = caplog.records[-1].getMessage()
    assert summary.startswith("camera:3: 10 frame(s) read, 10 yielded, 0 not decodable, 1 reconnect(s), 3.5 s disconnected")


def test_backoff_restarts_after_each_recovery(fake) -> None:
    script, fake_time = fake
    script.sessions = [frames(0, 2), OPEN_FAILS, frames(2, 2), OPEN_FAILS, frames(4, 2)]
    stats = FeedStats()
    got, error = take("cam:0", max_frames=6, stats=stats)
    assert error is None and ids(got) == list(range(6)) and [f.index for f in got] == list(range(6))
    assert fake_time.sleeps == [0.5, 1.0, 0.5, 1.0]
    assert (stats.reconnects, stats.reconnect_attempts, stats.seconds_disconnected) == (2, 4, pytest.approx(3.0))


def test_opened_but_silent_counts_as_a_failed_attempt(fake) -> None:
    script, fake_time = fake
    script.sessions = [frames(0, 3), [], [], frames(3, 2)]  # two reopenings that open but deliver nothing
    stats = FeedStats()
    got, error = take("camera:1", max_frames=5, stats=stats)
    assert error is None and ids(got) == [0, 1, 2, 3, 4]
    assert fake_time.sleeps == [0.5, 1.0, 2.0]
    assert (stats.reconnects, stats.reconnect_attempts) == (1, 3)


def test_lost_for_good_raises_stream_lost_naming_source_frames_attempts_and_time(fake, caplog) -> None:
    script, fake_time = fake
    script.sessions = [frames(0, 5)]
    url = "rtsp://admin:s3cret@10.0.0.5:554/live"
    stats = FeedStats()
    with caplog.at_level(logging.INFO, logger="edgedx.runtime.io.feeds"):
        got, error = take(url, reconnect=3, timeout_s=2.5, stats=stats)
    assert ids(got) == [0, 1, 2, 3, 4]
    assert isinstance(error, StreamLostError) and isinstance(error, InputError)
    assert str(error) == (
        "rtsp://admin:***@10.0.0.5:554/live stopped delivering frames after 5 frame(s) and did not come back: "
        "3 reconnect attempt(s) over 3.5 s failed; check that the stream is still running, the network path to it "
        "(ping the host), and the streaming device's logs, then start again (reconnect=N allows more attempts, "
        "up to 8 s apart)"
    )
    assert fake_time.sleeps == [0.5, 1.0, 2.0]
    assert script.opens == [(url, "stream", 2.5)] * 4
    assert stats == FeedStats(
        source="rtsp://admin:***@10.0.0.5:554/live", frames_read=5, frames_yielded=5, reconnects=0,
        reconnect_attempts=3, seconds_disconnected=pytest.approx(3.5),
    )
    assert "s3cret" not in caplog.text and "rtsp://admin:***@10.0.0.5:554/live" in caplog.text


def test_default_budget_is_five_attempts(fake) -> None:
    script, fake_time = fake
    script.sessions = [frames(0, 1)]
    got, error = take("camera:0")
    assert len(got) == 1 and isinstance(error, StreamLostError)
    assert fake_time.sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert "after 1 frame(s)" in str(error) and "5 reconnect attempt(s) over 15.5 s" in str(error)
    assert "cable" in str(error)  # the camera hint, not the stream one


def test_reconnect_zero_gives_up_at_once(fake) -> None:
    script, fake_time = fake
    script.sessions = [frames(0, 2), frames(2, 2)]
    got, error = take("camera:0", reconnect=0)
    assert ids(got) == [0, 1] and isinstance(error, StreamLostError)
    assert "no reconnection was tried (reconnect=0)" in str(error)
    assert fake_time.sleeps == [] and len(script.opens) == 1


def test_never_opened_camera_retries_then_raises_the_opening_hint(fake) -> None:
    script, fake_time = fake
    stats = FeedStats()
    got, error = take("camera:7", reconnect=2, stats=stats)
    assert got == [] and type(error) is InputError
    text = str(error)
    assert text.startswith("cannot open camera:7: check the camera index")
    assert "permissions" in text and "no frame in 3 attempt(s) over 1.5 s" in text
    assert fake_time.sleeps == [0.5, 1.0]
    assert script.opens == [(7, "camera", 10.0)] * 3
    assert (stats.reconnect_attempts, stats.seconds_disconnected) == (2, pytest.approx(1.5))


def test_camera_that_opens_on_a_retry_starts_at_frame_zero(fake) -> None:
    script, fake_time = fake
    script.sessions = [OPEN_FAILS, frames(0, 3)]
    stats = FeedStats()
    got, error = take("camera:0", max_frames=3, stats=stats)
    assert error is None and [f.index for f in got] == [0, 1, 2] and ids(got) == [0, 1, 2]
    assert fake_time.sleeps == [0.5]
    assert (stats.reconnects, stats.seconds_disconnected) == (1, pytest.approx(0.5))


def test_files_are_never_reconnected(fake, tmp_path: Path) -> None:
    script, fake_time = fake
    clip = tmp_path / "clip.avi"
    clip.write_bytes(b"opened by the fake")
    script.sessions = [frames(0, 3), frames(3, 3)]
    got, error = take(str(clip))
    assert error is None and ids(got) == [0, 1, 2]
    assert fake_time.sleeps == [] and len(script.opens) == 1


def test_undecodable_frame_is_counted_and_skipped_without_reconnecting(fake, caplog) -> None:
    script, fake_time = fake
    session: list[object] = frames(0, 6)
    session[2] = UNDECODABLE
    session[4] = np.zeros((12, 16, 3), np.uint16)[..., :0]  # an empty frame from a confused driver
    script.sessions = [session]
    stats = FeedStats()
    with caplog.at_level(logging.WARNING, logger="edgedx.runtime.io.feeds"):
        got, error = take("camera:0", max_frames=4, stats=stats)
    assert error is None
    assert [f.index for f in got] == [0, 1, 3, 5] and ids(got) == [0, 1, 3, 5]
    assert (stats.frames_read, stats.frames_yielded, stats.decode_failures, stats.reconnects) == (6, 4, 2, 0)
    assert fake_time.sleeps == [] and len(script.opens) == 1
    assert "camera:0: frame 2 could not be decoded (the decoder returned nothing); skipped" in caplog.text


def test_every_counts_across_a_reconnect(fake) -> None:
    script, _ = fake
    script.sessions = [frames(0, 4), frames(4, 6)]
    got, error = take("camera:0", every=3, max_frames=4)
    assert error is None and [f.index for f in got] == [0, 3, 6, 9] and ids(got) == [0, 3, 6, 9]


def test_frames_of_changing_size_and_grey_frames_pass_through(fake, caplog) -> None:
    script, _ = fake
    grey = np.full((30, 40), 7, np.uint8)  # a camera switched to a mono mode
    script.sessions = [[*frames(0, 2, (12, 16)), *frames(2, 1, (24, 32)), grey, *frames(4, 1, (24, 32))]]
    stats = FeedStats()
    with caplog.at_level(logging.WARNING, logger="edgedx.runtime.io.feeds"):
        got, error = take("camera:0", max_frames=5, stats=stats)
    assert error is None
    assert [f.image.shape for f in got] == [(12, 16, 3), (12, 16, 3), (24, 32, 3), (30, 40, 3), (24, 32, 3)]
    assert all(f.image.dtype == np.uint8 for f in got)
    assert ids(got) == [0, 1, 2, 7, 4]
    assert stats.size_changes == 3 and stats.decode_failures == 0
    assert "camera:0: frame 2 is 32x24, the previous frame was 16x12" in caplog.text


def test_stats_are_current_while_frames_flow(fake) -> None:
    script, fake_time = fake
    script.sessions = [frames(0, 2), OPEN_FAILS, frames(2, 2)]
    stats = FeedStats()
    stream = iter_frames("camera:0", max_frames=4, stats=stats)
    next(stream)
    assert (stats.source, stats.frames_read, stats.frames_yielded) == ("camera:0", 1, 1)
    next(stream)
    next(stream)  # across the reconnect
    assert (stats.frames_yielded, stats.reconnects, stats.reconnect_attempts) == (3, 1, 2)
    stream.close()  # the caller stops early: the capture is still released (checked by the fixture)
    assert fake_time.sleeps == [0.5, 1.0]


@pytest.mark.parametrize(
    ("bad", "match"),
    [({"reconnect": -1}, "reconnect=-1"), ({"reconnect": True}, "reconnect=True"), ({"timeout_s": 0}, "timeout_s=0"),
     ({"timeout_s": float("inf")}, "timeout_s=inf")],
)
def test_bad_reconnect_options(bad: dict[str, object], match: str) -> None:
    with pytest.raises(InputError, match=match):
        iter_frames("camera:0", **bad)  # type: ignore[arg-type]


def test_streams_get_ffmpeg_timeouts_and_cameras_the_default_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []
    monkeypatch.setattr(cv2, "VideoCapture", lambda *args: calls.append(args))
    feeds._open_capture("rtsp://10.0.0.5/live", "stream", 2.5)
    feeds._open_capture(0, "camera", 2.5)
    assert calls == [
        ("rtsp://10.0.0.5/live", cv2.CAP_FFMPEG, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, 2500, cv2.CAP_PROP_READ_TIMEOUT_MSEC, 2500]),
        (0,),
    ]


# -- a real FFmpeg capture over HTTP on localhost ------------------------------------------------------------


@pytest.fixture(scope="module")
def http_clip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Serves a 30-frame MJPG clip at /clip.avi, and at /stall.avi its first half followed by silence."""
    path = tmp_path_factory.mktemp("served") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    for i in range(30):
        writer.write(np.full((48, 64, 3), 8 * i, np.uint8))
    writer.release()
    data = path.read_bytes()
    release = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "video/x-msvideo")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.path == "/stall.avi":
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                release.wait(10.0)  # a camera that froze with the connection still open
            else:
                self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


def test_real_stream_with_timeouts_opens_and_ends_after_its_frame_count(http_clip: str) -> None:
    stats = FeedStats()
    got = list(iter_frames(f"{http_clip}/clip.avi", max_frames=100, stats=stats))  # a file over HTTP: not replayed
    assert [f.index for f in got] == list(range(30))
    assert (stats.reconnect_attempts, stats.decode_failures) == (0, 0)


def test_real_stalled_stream_is_cut_by_the_read_timeout(http_clip: str) -> None:
    started = time.monotonic()
    got, error = take(f"{http_clip}/stall.avi", reconnect=0, timeout_s=0.3)
    assert isinstance(error, StreamLostError)
    assert 0 < len(got) < 30 and f"after {len(got)} frame(s)" in str(error)
    assert time.monotonic() - started < 5.0  # the server holds the connection open for 10 s
