"""Soak test: 10,000 video frames through ``diagnose_paths`` — does memory stay flat?

A clinic box runs a camera all day, so anything that grows per frame (a list of
results, a cache keyed by frame, a leak in a decoder) ends in an out-of-memory
kill hours later. This script diagnoses every frame of one long synthetic video
and watches the resident set size (RSS):

- the video: MJPG .avi, ``--size`` (default 160x120), ``--frames`` (default 10,000),
  a disc moving over a shifting gradient with a fixed noise texture, so no two
  frames are alike;
- the model: a tiny torch-free ONNX classifier built with ``onnx.helper``
  (float32 [N,3,32,32] -> GlobalAveragePool -> Flatten -> Gemm -> logits, two
  classes; the card's softmax is applied by the runtime) with an EdgeDx card in
  its metadata; crops of 32 px at stride 32 (20 per 160x120 frame);
- the run: ``edgedx.runtime.batch.diagnose_paths([video], model, out=...jsonl)``
  in a fresh Python process. Its ``progress`` callback reads the process's own
  RSS from /proc/self/statm every 250 frames; the parent also polls the child's
  VmRSS/VmHWM from /proc/PID/status every 0.5 s in a background thread.

Reported: RSS at the start of the diagnosis, after the warm-up (1,000 frames) and
at the end; the least-squares slope in MB per 1,000 frames after the warm-up;
frames/s; peak RSS; verdict "flat" when RSS grows by less than 10 MB (10^6 bytes)
from the end of the warm-up to the end.

    flock /tmp/edgedx-bench.lock python benchmarks/soak_video.py [--frames 10000] [--size 160x120]

Prints a markdown table and writes benchmarks/results/soak_video.json (with the environment).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from _env import cpu_model, git_rev, version

RESULTS = Path(__file__).parent / "results"
MB = 1_000_000
WARMUP_FRAMES = 1000
SAMPLE_EVERY = 250
FLAT_MB = 10.0
TILE = 32


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size {text!r}: give WIDTHxHEIGHT, e.g. 160x120") from None
    if w < TILE or h < TILE:
        raise SystemExit(f"--size {text!r}: both sides must be at least {TILE} px (one crop)")
    return w, h


# -- inputs -------------------------------------------------------------------------------------------------------
def write_video(path: Path, frames: int, width: int, height: int, fps: float = 25.0) -> None:
    """A disc orbiting over a drifting colour gradient plus a fixed noise texture: every frame differs."""
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise SystemExit(f"OpenCV cannot write MJPG to {path}")
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    noise = np.random.default_rng(0).integers(-12, 13, (height, width, 3)).astype(np.int16)
    for i in range(frames):
        phase = i / 97.0
        frame = np.empty((height, width, 3), np.float32)
        frame[..., 0] = 128 + 100 * np.sin(xx / width * 6.28 + phase)
        frame[..., 1] = 128 + 100 * np.cos(yy / height * 6.28 - 0.7 * phase)
        frame[..., 2] = (i * 7) % 256
        cx = width / 2 + width / 3 * np.cos(phase * 3.1)
        cy = height / 2 + height / 3 * np.sin(phase * 2.3)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < (min(width, height) / 6) ** 2
        frame[disc] = (255 - (i % 200), 40, 200)
        writer.write(np.clip(frame.astype(np.int16) + noise, 0, 255).astype(np.uint8))
    writer.release()


def build_model(path: Path) -> None:
    """A two-class ONNX classifier with an EdgeDx card in its metadata, built without torch."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    import edgedx
    from edgedx.card import (
        ONNX_METADATA_KEY,
        CropPolicy,
        ModelCard,
        Provenance,
        now_iso,
    )

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(0, 1, (2, 3)).astype(np.float32), "weight")
    bias = numpy_helper.from_array(np.zeros(2, np.float32), "bias")
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "weight", "bias"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes, "soak", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, TILE, TILE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])], initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    card = ModelCard(
        arch="soak-gap-linear", task="binary", class_names=("neg", "pos"), positive_class="pos", threshold=0.5,
        input_size=(TILE, TILE), crop=CropPolicy((TILE, TILE), (TILE, TILE)),
        provenance=Provenance(edgedx.__version__, now_iso(), data_summary={"note": "synthetic soak-test model"}),
    )
    model.metadata_props.add(key=ONNX_METADATA_KEY, value=card.to_json(indent=None))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


# -- the measured run, in its own process ---------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: argparse.Namespace) -> None:
    import resource

    from edgedx.runtime.batch import diagnose_paths

    samples: list[list[float]] = []  # [frames done, rss bytes, seconds since the diagnosis started]
    started = time.perf_counter()
    samples.append([0, rss_bytes(), 0.0])
    last = [0]

    def progress(stage: str, done: int, total: int, info: str = "") -> None:
        if done - last[0] >= SAMPLE_EVERY:
            last[0] = done
            samples.append([done, rss_bytes(), time.perf_counter() - started])

    summary = diagnose_paths([str(args.video)], str(args.model), args.out, progress=progress)
    seconds = time.perf_counter() - started
    samples.append([summary.n_inputs, rss_bytes(), seconds])
    print(json.dumps({
        "samples": samples, "seconds": seconds, "n_inputs": summary.n_inputs, "n_failed": summary.n_failed,
        "label_counts": summary.label_counts, "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


class Poller:
    """Polls another process's VmRSS and VmHWM from /proc while it runs."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, int]] = []
        self.hwm = 0
        self._stop = threading.Event()
        self._started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fields = dict(line.split(":", 1) for line in Path(f"/proc/{self.pid}/status").read_text().splitlines())
            except (OSError, ValueError):
                return
            if "VmRSS" in fields:
                self.samples.append((time.perf_counter() - self._started, int(fields["VmRSS"].split()[0]) * 1024))
                self.hwm = max(self.hwm, int(fields["VmHWM"].split()[0]) * 1024)
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)


def uncommitted() -> list[str]:
    """Files that differ from the recorded commit: the measured code is HEAD plus these."""
    try:
        done = subprocess.run(["git", "diff", "--name-only", "HEAD"], cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return []
    return done.stdout.split()


# -- analysis -------------------------------------------------------------------------------------------------------
def analyse(samples: list[list[float]], warmup: int) -> dict:
    frames = np.array([s[0] for s in samples], dtype=np.float64)
    rss = np.array([s[1] for s in samples], dtype=np.float64)
    after = frames >= warmup
    at_warmup = int(np.argmin(np.abs(frames - warmup)))
    slope = float(np.polyfit(frames[after], rss[after], 1)[0]) * 1000 / MB if after.sum() >= 2 else float("nan")
    growth = (rss[-1] - rss[at_warmup]) / MB
    return {
        "rss_start_mb": rss[0] / MB,
        "rss_after_warmup_mb": rss[at_warmup] / MB,
        "warmup_sample_frames": int(frames[at_warmup]),
        "rss_end_mb": rss[-1] / MB,
        "rss_max_sampled_mb": rss.max() / MB,
        "growth_after_warmup_mb": growth,
        "slope_mb_per_1000_frames": slope,
        "verdict": "flat" if growth < FLAT_MB else "grows",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=10000)
    parser.add_argument("--size", default="160x120", help="frame WIDTHxHEIGHT")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--video", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.frames <= WARMUP_FRAMES + SAMPLE_EVERY:
        raise SystemExit(f"--frames {args.frames}: needs more than {WARMUP_FRAMES + SAMPLE_EVERY} to measure after the warm-up")
    width, height = parse_size(args.size)

    with tempfile.TemporaryDirectory(prefix="edgedx-soak-") as tmp:
        video, model, out = Path(tmp) / "soak.avi", Path(tmp) / "soak.onnx", Path(tmp) / "soak.jsonl"
        started = time.perf_counter()
        write_video(video, args.frames, width, height)
        build_model(model)
        print(f"wrote {args.frames} frames of {width}x{height} MJPG ({video.stat().st_size / MB:.1f} MB) in "
              f"{time.perf_counter() - started:.0f} s; diagnosing every frame ...", flush=True)
        command = [sys.executable, __file__, "--child", "--video", str(video), "--model", str(model), "--out", str(out)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        poller = Poller(proc.pid)
        stdout, stderr = proc.communicate()
        poller.stop()
        if proc.returncode != 0:
            raise SystemExit(f"the diagnosis process failed ({proc.returncode}):\n{stderr[-4000:]}")
        run = json.loads(stdout.strip().splitlines()[-1])
        n_records = sum(1 for _ in out.open(encoding="utf-8"))
        out_bytes = out.stat().st_size

    stats = analyse(run["samples"], WARMUP_FRAMES)
    fps = run["n_inputs"] / run["seconds"]
    row = {
        "frames": args.frames,
        "size": [width, height],
        "codec": "MJPG",
        "model": f"GlobalAveragePool -> Flatten -> Gemm, 2 classes, {TILE}x{TILE} crops at stride {TILE}",
        "diagnosed": run["n_inputs"],
        "failed": run["n_failed"],
        "records_written": n_records,
        "records_bytes": out_bytes,
        "label_counts": run["label_counts"],
        "seconds": run["seconds"],
        "frames_per_s": fps,
        "warmup_frames": WARMUP_FRAMES,
        "flat_threshold_mb": FLAT_MB,
        **stats,
        "peak_rss_mb": max(run["peak_rss_bytes"], poller.hwm) / MB,  # the kernel's high-water mark, two readings
        "samples": [[int(f), int(r), round(t, 3)] for f, r, t in run["samples"]],
        "polled": [[round(t, 2), r] for t, r in poller.samples],
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "versions": {k: version(k) for k in ("edgedx", "onnxruntime", "onnx", "numpy", "opencv-python-headless", "opencv-python")}
        | {"python": platform.python_version()},
        "platform": platform.platform(),
        "git": git_rev(),
        "git_uncommitted": uncommitted(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print()
    print(f"{run['n_inputs']} frames of {width}x{height} diagnosed in {run['seconds']:.0f} s ({fps:.0f} frames/s), "
          f"{n_records} records, {run['n_failed']} failed")
    print()
    print("| RSS start MB | after warm-up (1,000 frames) MB | end MB | growth after warm-up MB | slope MB / 1,000 frames | peak MB | frames/s | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {stats['rss_start_mb']:.1f} | {stats['rss_after_warmup_mb']:.1f} | {stats['rss_end_mb']:.1f} | "
          f"{stats['growth_after_warmup_mb']:+.1f} | {stats['slope_mb_per_1000_frames']:+.2f} | {row['peak_rss_mb']:.1f} | "
          f"{fps:.0f} | {stats['verdict']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "soak_video.json").write_text(json.dumps(row, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
