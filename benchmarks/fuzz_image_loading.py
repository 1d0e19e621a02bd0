"""Bounded, seeded fuzz run of the image loading path (``edgedx.runtime.io.image_io.read_image``).

A clinic runs EdgeDx unattended on folders it does not control, so every file, however broken,
must end as a decoded image or an ``ImageReadError``: never another exception, a crash or a hang.

- **Seed corpus**, made here: small valid PNG (8-bit RGB and 16-bit grey), JPEG (baseline and
  progressive), BMP, TIFF (LZW and uncompressed) and WebP (lossy and lossless) images.
- **Mutations**, ``--n`` of them (default 3000), each from its own generator seeded with
  ``(--seed, case index)`` so any case can be rebuilt alone (``--replay I``): bit flips, byte
  runs, truncation at a random point, header dimension fields set huge (PNG IHDR, JPEG SOFn, BMP,
  TIFF tags 256/257, WebP VP8/VP8L/VP8X) and chunk duplication (a PNG chunk, a JPEG segment or
  a random slice).
- **Each case** is written to a temp file with its seed's suffix and read with ``read_image``
  (default pixel limit), in worker subprocesses that take ``--chunk`` cases each. The parent
  reads one JSON line per case; a worker that dies is counted as a **crash** of the case it was
  on, and a case that takes longer than ``--case-timeout`` as a **timeout**; the worker is then
  replaced and the run goes on after that case. Workers run one at a time, with an address-space
  limit (``--max-mem-mib``) so a bomb that slipped through cannot take the shared machine down.

Outcomes: decoded, ImageReadError (by kind of message), other exception (a bug in read_image: type,
message and case listed), crash, timeout; per-case milliseconds (p50, p99, max); the workers' peak
RSS. Prints a markdown table and writes ``benchmarks/results/fuzz_image_loading.json``.

    flock /tmp/edgedx-bench.lock python benchmarks/fuzz_image_loading.py [--n 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import selectors
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from _env import cpu_model, git_rev, version

RESULTS = Path(__file__).parent / "results"
MUTATIONS = ("bitflip", "byterun", "truncate", "huge_dims", "duplicate")
HUGE = (0, 1, 16383, 65535, 40000, 2**31 - 1, 2**32 - 1)
OUTCOMES = ("decoded", "ImageReadError", "other exception", "crash", "timeout")


# -- seed corpus ---------------------------------------------------------------------------------
def make_corpus() -> dict[str, bytes]:
    """Small valid images, deterministic for a given OpenCV/tifffile version."""
    import cv2
    import tifffile

    y, x = np.mgrid[0:48, 0:64]
    noise = np.random.default_rng(1234).integers(0, 40, (48, 64, 3))
    bgr = np.stack([x * 4, y * 5, (x + y) * 2], axis=-1) + noise
    bgr = np.clip(bgr, 0, 255).astype(np.uint8)
    grey16 = (np.clip(y * 1300 + x * 200 + noise[..., 0] * 50, 0, 65535)).astype(np.uint16)

    def enc(suffix: str, image: np.ndarray, params: list[int] | None = None) -> bytes:
        ok, buf = cv2.imencode(suffix, image, params or [])
        assert ok, suffix
        return buf.tobytes()

    corpus = {
        "rgb.png": enc(".png", bgr),
        "grey16.png": enc(".png", grey16),
        "baseline.jpg": enc(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90]),
        "progressive.jpg": enc(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        "rgb.bmp": enc(".bmp", bgr),
        "lzw.tif": enc(".tif", bgr),
        "lossy.webp": enc(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, 80]),
        "lossless.webp": enc(".webp", bgr, [cv2.IMWRITE_WEBP_QUALITY, 101]),
    }
    import io

    raw = io.BytesIO()
    tifffile.imwrite(raw, bgr[..., ::-1], photometric="rgb")
    corpus["raw.tif"] = raw.getvalue()
    return corpus


# -- mutations -----------------------------------------------------------------------------------
def mutate(data: bytes, name: str, rng: np.random.Generator) -> tuple[bytes, str, str]:
    """(mutated bytes, mutation kind, what was done)."""
    kind = MUTATIONS[int(rng.integers(len(MUTATIONS)))]
    buf = bytearray(data)
    n = len(buf)
    if kind == "bitflip":
        k = int(rng.integers(1, 9))
        at = sorted(int(p) for p in rng.integers(0, n, k))
        for p in at:
            buf[p] ^= 1 << int(rng.integers(8))
        return bytes(buf), kind, f"{k} bits at {at}"
    if kind == "byterun":
        start, length = int(rng.integers(0, n)), int(rng.integers(1, 65))
        fill = rng.choice(["zero", "ff", "random"])
        run = {"zero": b"\x00" * length, "ff": b"\xff" * length}.get(str(fill)) or rng.bytes(length)
        buf[start : start + length] = run[: max(0, min(length, n - start))]
        return bytes(buf), kind, f"{fill} run of {length} at {start}"
    if kind == "truncate":
        cut = int(rng.integers(1, n))
        return bytes(buf[:cut]), kind, f"cut at {cut} of {n}"
    if kind == "huge_dims":
        width, height = int(rng.choice(HUGE)), int(rng.choice(HUGE))
        return set_dims(bytes(buf), name, width, height, rng), kind, f"{width}x{height}"
    mutated, what = duplicate(bytes(buf), name, rng)
    return mutated, kind, what


def set_dims(data: bytes, name: str, width: int, height: int, rng: np.random.Generator) -> bytes:
    """Overwrite the header's width/height fields, clipped to the field's width."""
    buf = bytearray(data)
    if name.endswith(".png"):
        buf[16:24] = struct.pack(">II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
        if rng.random() < 0.5:  # a valid CRC gets past libpng's check to the decoder
            buf[29:33] = struct.pack(">I", zlib.crc32(bytes(buf[12:29])) & 0xFFFFFFFF)
    elif name.endswith(".jpg"):
        pos = 2
        while pos + 4 <= len(buf) and buf[pos] == 0xFF:
            code, length = buf[pos + 1], struct.unpack(">H", buf[pos + 2 : pos + 4])[0]
            if 0xC0 <= code <= 0xCF and code not in (0xC4, 0xC8, 0xCC):
                buf[pos + 5 : pos + 9] = struct.pack(">HH", height & 0xFFFF, width & 0xFFFF)
                break
            pos += 2 + length
    elif name.endswith(".bmp"):
        buf[18:26] = struct.pack("<II", width & 0xFFFFFFFF, height & 0xFFFFFFFF)
    elif name.endswith(".tif"):
        order = "<" if buf[:2] == b"II" else ">"
        (ifd,) = struct.unpack(order + "I", buf[4:8])
        (count,) = struct.unpack(order + "H", buf[ifd : ifd + 2])
        for i in range(count):
            at = ifd + 2 + 12 * i
            tag = struct.unpack(order + "H", buf[at : at + 2])[0]
            if tag in (256, 257):
                value = width if tag == 256 else height
                buf[at + 2 : at + 12] = struct.pack(order + "HII", 4, 1, value & 0xFFFFFFFF)  # LONG
    elif name.endswith(".webp"):
        chunk = bytes(buf[12:16])
        if chunk == b"VP8 ":
            buf[26:30] = struct.pack("<HH", width & 0x3FFF, height & 0x3FFF)
        elif chunk == b"VP8L":
            bits = struct.unpack("<I", buf[21:25])[0] & ~0x0FFFFFFF
            bits |= ((width - 1) & 0x3FFF) | (((height - 1) & 0x3FFF) << 14)
            buf[21:25] = struct.pack("<I", bits & 0xFFFFFFFF)
        elif chunk == b"VP8X":
            buf[24:30] = ((width - 1) & 0xFFFFFF).to_bytes(3, "little") + ((height - 1) & 0xFFFFFF).to_bytes(3, "little")
    return bytes(buf)


def duplicate(data: bytes, name: str, rng: np.random.Generator) -> tuple[bytes, str]:
    """Insert a copy of one PNG chunk / JPEG header segment right after it, else of a random slice."""
    spans = []
    if name.endswith(".png"):
        pos = 8
        while pos + 12 <= len(data):
            length = struct.unpack(">I", data[pos : pos + 4])[0]
            spans.append((pos, pos + 12 + length, data[pos + 4 : pos + 8].decode("latin-1")))
            pos += 12 + length
    elif name.endswith(".jpg"):
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] != 0xDA:
            length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
            spans.append((pos, pos + 2 + length, f"FF{data[pos + 1]:02X}"))
            pos += 2 + length
    if spans and rng.random() < 0.7:
        start, end, label = spans[int(rng.integers(len(spans)))]
        return data[:end] + data[start:end] + data[end:], f"chunk {label} duplicated"
    start = int(rng.integers(0, len(data)))
    end = min(len(data), start + int(rng.integers(1, 257)))
    return data[:end] + data[start:end] + data[end:], f"slice {start}:{end} duplicated"


def build_case(corpus: dict[str, bytes], seed: int, index: int) -> tuple[str, bytes, str, str]:
    """(seed file name, bytes, mutation kind, description) of case ``index``; the same every time."""
    rng = np.random.default_rng([seed, index])
    names = sorted(corpus)
    name = names[int(rng.integers(len(names)))]
    data, kind, what = mutate(corpus[name], name, rng)
    return name, data, kind, what


# -- the worker ----------------------------------------------------------------------------------
def plain_read(path: Path) -> np.ndarray:
    """The loader before hardening, for comparison: np.fromfile + cv2.imdecode, None -> ImageReadError."""
    import cv2
    from edgedx.runtime.io.image_io import to_rgb_uint8

    from edgedx.errors import ImageReadError

    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    image = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    if image is None:
        raise ImageReadError(f"{path}: not a decodable image (corrupt, truncated, or not an image format)")
    return to_rgb_uint8(image, bgr=True)


def classify_error(message: str) -> str:
    """A short kind for an ImageReadError message: its words after the path, numbers folded."""
    text = message.split(": ", 1)[-1]
    for key, label in (
        ("(corrupt, truncated, or not an image format)", "not decodable (the plain loader's one message)"),
        ("exceeds the limit", "over the pixel limit"),
        ("OpenCV's own pixel limit", "over OpenCV's pixel limit"),
        ("not enough memory", "not enough memory"),
        ("truncated", "truncated"),
        ("header: it says", "corrupt header (zero size)"),
        ("OpenCV failed decoding", "corrupt (OpenCV error)"),
        ("corrupt", "corrupt (OpenCV returned nothing)"),
        ("unrecognised content", "unrecognised content"),
        ("text file", "text file"),
        ("unsupported", "unsupported pixel layout"),
        ("empty file", "empty file"),
    ):
        if key in text:
            return label
    return re.sub(r"\d+", "N", text)[:60]


def worker(args: argparse.Namespace) -> None:
    """Run cases [start, stop): one JSON line per case on stdout, then the peak RSS."""
    if args.max_mem_mib:
        limit = args.max_mem_mib * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    from edgedx.runtime.io.image_io import read_image

    from edgedx.errors import ImageReadError

    load = read_image if args.loader == "read_image" else plain_read
    corpus = {p.name: p.read_bytes() for p in Path(args.corpus).iterdir()}
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = sys.stdout
    with tempfile.TemporaryDirectory(prefix="edgedx-fuzz-") as tmp:
        for index in range(args.start, args.stop):
            name, data, kind, what = build_case(corpus, args.seed, index)
            path = Path(tmp) / f"case{Path(name).suffix}"
            path.write_bytes(data)
            row: dict = {"i": index, "seed_file": name, "mutation": kind}
            started = time.perf_counter()
            try:
                image = load(path)
                ok = image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
                row.update(outcome="decoded" if ok else "other exception", shape=list(image.shape))
                if not ok:
                    row["error"] = f"bad output: shape {image.shape} dtype {image.dtype}"
            except ImageReadError as exc:
                row.update(outcome="ImageReadError", kind=classify_error(str(exc)))
            except Exception as exc:  # noqa: BLE001 - exactly what the fuzz run looks for
                row.update(outcome="other exception", error=f"{type(exc).__name__}: {exc}"[:300], what=what)
            row["ms"] = round((time.perf_counter() - started) * 1000, 3)
            out.write(json.dumps(row) + "\n")
            out.flush()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out.write(json.dumps({"done": True, "baseline_rss_kib": baseline, "peak_rss_kib": peak}) + "\n")
    out.flush()


# -- the parent ----------------------------------------------------------------------------------
def run_chunk(args: argparse.Namespace, corpus_dir: Path, start: int, stop: int, rows: list[dict], rss: list[dict]) -> int:
    """Run cases from ``start`` until a worker finishes them, dies or hangs; return the next case to run."""
    cmd = [
        sys.executable, __file__, "--worker", "--corpus", str(corpus_dir), "--seed", str(args.seed),
        "--start", str(start), "--stop", str(stop), "--max-mem-mib", str(args.max_mem_mib), "--loader", args.loader,
    ]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        current = start
        while True:
            ready = sel.select(timeout=args.case_timeout if current > start else args.case_timeout + 30)
            if not ready:  # nothing for too long: the case in progress hangs
                os.killpg(proc.pid, 9)
                proc.wait()
                rows.append({"i": current, "outcome": "timeout", "what": describe(args, corpus_dir, current)})
                return current + 1
            line = proc.stdout.readline()
            if not line:  # the worker is gone without saying "done": the case in progress crashed it
                proc.wait()
                err.seek(0)
                tail = err.read()[-400:].decode("utf-8", "replace")
                if current >= stop:
                    return stop
                rows.append({"i": current, "outcome": "crash", "returncode": proc.returncode, "stderr_tail": tail,
                             "what": describe(args, corpus_dir, current)})
                return current + 1
            row = json.loads(line)
            if row.get("done"):
                rss.append(row)
                proc.wait()
                return stop
            rows.append(row)
            current = row["i"] + 1


def describe(args: argparse.Namespace, corpus_dir: Path, index: int) -> str:
    corpus = {p.name: p.read_bytes() for p in corpus_dir.iterdir()}
    name, _, kind, what = build_case(corpus, args.seed, index)
    return f"{name}, {kind}: {what}"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=3000, help="number of mutated cases")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=250, help="cases per worker process")
    parser.add_argument("--case-timeout", type=float, default=10.0, help="seconds one case may take")
    parser.add_argument("--max-mem-mib", type=int, default=4096, help="address-space limit of a worker (0: none)")
    parser.add_argument(
        "--loaders", default="read_image,plain",
        help="comma-separated: read_image (EdgeDx) and/or plain (np.fromfile + cv2.imdecode, the loader before hardening)",
    )
    parser.add_argument("--json", type=Path, default=RESULTS / "fuzz_image_loading.json")
    parser.add_argument("--replay", type=int, default=None, help="run case I with read_image in this process, raising what it raises")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--loader", default="read_image", help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    corpus = make_corpus()
    if args.replay is not None:
        replay(corpus, args.seed, args.replay)
        return
    runs = {}
    for loader in args.loaders.split(","):
        args.loader = loader
        runs[loader] = fuzz(args, corpus)
    result = {
        "benchmark": "fuzz_image_loading",
        "n": args.n,
        "seed": args.seed,
        "chunk": args.chunk,
        "case_timeout_s": args.case_timeout,
        "max_mem_mib": args.max_mem_mib,
        "pixel_limit": "read_image's default (default_max_pixels(); EDGEDX_MAX_IMAGE_PIXELS unset: 250 MP)",
        "corpus": {name: len(data) for name, data in sorted(corpus.items())},
        "runs": runs,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "versions": {k: version(k) for k in ("opencv-python-headless", "numpy", "tifffile", "pillow")} | {"python": platform.python_version()},
        "git": git_rev(),
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    print_tables(args, corpus, runs)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.json}")


def replay(corpus: dict[str, bytes], seed: int, index: int) -> None:
    from edgedx.runtime.io.image_io import read_image

    name, data, kind, what = build_case(corpus, seed, index)
    print(f"case {index}: {name}, {kind}: {what}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"case{Path(name).suffix}"
        path.write_bytes(data)
        image = read_image(path)
        print("decoded", image.shape, image.dtype)


def fuzz(args: argparse.Namespace, corpus: dict[str, bytes]) -> dict:
    """All cases with one loader, in chunks of worker processes; the summary of what happened."""
    started, load_before = time.perf_counter(), os.getloadavg()[0]
    rows: list[dict] = []
    rss: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="edgedx-fuzz-corpus-") as tmp:
        corpus_dir = Path(tmp)
        for name, data in corpus.items():
            (corpus_dir / name).write_bytes(data)
        for chunk_start in range(0, args.n, args.chunk):
            stop = min(args.n, chunk_start + args.chunk)
            at = chunk_start
            while at < stop:
                at = run_chunk(args, corpus_dir, at, stop, rows, rss)
            print(f"\r{args.loader}: {stop}/{args.n} cases", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    wall = time.perf_counter() - started

    def mutation_of(r: dict) -> str:
        return r.get("mutation") or r["what"].split(", ", 1)[1].split(":")[0]

    def seed_of(r: dict) -> str:
        return r.get("seed_file") or r["what"].split(",")[0]

    by_mutation: dict[str, Counter] = defaultdict(Counter)
    by_seed: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        by_mutation[mutation_of(r)][r["outcome"]] += 1
        by_seed[seed_of(r)][r["outcome"]] += 1
    outcomes = Counter(r["outcome"] for r in rows)
    ms = [r["ms"] for r in rows if "ms" in r]
    others = [r for r in rows if r["outcome"] == "other exception"]
    other_types = Counter(r["error"].split(":")[0] + ": " + re.sub(r"\d+", "N", r["error"].split(": ", 1)[-1])[:90] for r in others)
    return {
        "outcomes": {k: outcomes.get(k, 0) for k in OUTCOMES},
        "image_read_error_kinds": dict(Counter(r["kind"] for r in rows if r["outcome"] == "ImageReadError").most_common()),
        "by_mutation": {k: dict(v) for k, v in sorted(by_mutation.items())},
        "by_seed_file": {k: dict(v) for k, v in sorted(by_seed.items())},
        "ms_per_case": {"p50": round(percentile(ms, 50), 3), "p99": round(percentile(ms, 99), 3), "max": round(max(ms, default=0), 3)},
        "slowest_case": max((r for r in rows if "ms" in r), key=lambda r: r["ms"], default=None),
        "other_exceptions": {"count": len(others), "kinds": dict(other_types.most_common()), "first": others[:10]},
        "crashes_and_timeouts": [r for r in rows if r["outcome"] in ("crash", "timeout")][:10],
        "worker_rss_mib": {
            "peak": round(max((r["peak_rss_kib"] for r in rss), default=0) / 1024, 1),
            "after_imports_min": round(min((r["baseline_rss_kib"] for r in rss), default=0) / 1024, 1),
            "workers": len(rss),
        },
        "wall_s": round(wall, 1),
        "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def print_tables(args: argparse.Namespace, corpus: dict[str, bytes], runs: dict[str, dict]) -> None:
    names = list(runs)
    print(f"\n{args.n} mutated cases from {len(corpus)} seed images, seed {args.seed}\n")
    print("| outcome | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for k in OUTCOMES:
        print(f"| {k} | " + " | ".join(str(runs[n]["outcomes"][k]) for n in names) + " |")
    print("| ms per case p50 / p99 / max | " + " | ".join(
        "{p50} / {p99} / {max}".format(**runs[n]["ms_per_case"]) for n in names) + " |")
    print("| worker peak RSS MiB (after imports) | " + " | ".join(
        "{peak} ({after_imports_min})".format(**runs[n]["worker_rss_mib"]) for n in names) + " |")
    print("| wall s | " + " | ".join(str(runs[n]["wall_s"]) for n in names) + " |")
    for n in names:
        run = runs[n]
        print(f"\n{n}, by mutation:\n")
        print("| mutation | " + " | ".join(OUTCOMES) + " |")
        print("|---" * (len(OUTCOMES) + 1) + "|")
        for name, counts in run["by_mutation"].items():
            print(f"| {name} | " + " | ".join(str(counts.get(k, 0)) for k in OUTCOMES) + " |")
        print(f"\n{n}, ImageReadError kinds: " + ", ".join(f"{k} {v}" for k, v in run["image_read_error_kinds"].items()))
        for kind, count in run["other_exceptions"]["kinds"].items():
            print(f"{n}, OTHER EXCEPTION x{count}: {kind}")
        for r in run["crashes_and_timeouts"][:5]:
            print(f"{n}, {r['outcome'].upper()} case {r['i']} ({r['what']})")


if __name__ == "__main__":
    main()
