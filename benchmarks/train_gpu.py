"""Training throughput: one GPU with mixed precision against the CPU, and 2 CPU processes (DDP, gloo) against 1.

GPU mode (the default) needs CUDA; without it the script says so and exits (status 1, no JSON):

- ``steps``: the training step exactly as ``train()`` runs it (uint8 batch -> ``preprocess_batch`` on
  the CPU -> forward/backward under fp16 autocast with a GradScaler -> AdamW step) for the default
  architecture at 224 px, batch 32: images/s and peak GPU memory (``torch.cuda.max_memory_allocated``);
- ``train()``: the library's whole loop on the same data (``--epochs``, validation included in each
  epoch's seconds): epoch seconds, train images per epoch second, peak GPU memory;
- the same step on the CPU (fp32) for ``--cpu-steps`` steps after one warm-up step.

``--ddp-cpu``: ``train()`` in one process (torch's default threads) against ``launch_train(nproc=2)``
(gloo, one thread each) on the same data and global batch: epoch seconds after the first, and the
whole run's wall time (process start included). Runs on any machine.

Data: ISIC melanoma/nevus dermoscopy images from ``$EDGEDX_DATA/isic_mel_nv`` (default
``../shared/data``) when present, else a synthetic two-class set at the input size. Weights are
``none`` (throughput does not depend on them).

    flock /tmp/edgedx-bench.lock python benchmarks/train_gpu.py               # -> results/train_gpu.json
    flock /tmp/edgedx-bench.lock python benchmarks/train_gpu.py --ddp-cpu     # -> results/train_ddp_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from _env import cpu_model, git_rev, version

RESULTS = Path(__file__).parent / "results"
DATA_ROOT = Path(os.environ.get("EDGEDX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def make_data(folder: Path, size: int, n_images: int) -> tuple[Path, str]:
    """A source ``train()`` reads: the ISIC manifest when the data is there, else a synthetic .npz."""
    isic = DATA_ROOT / "isic_mel_nv"
    if (isic / "labels.csv").is_file():
        manifest = folder / "isic_manifest.csv"
        with (isic / "labels.csv").open(newline="") as src:
            rows = [(str(isic / "images" / f"{r['image']}.jpg"), r["diagnosis"]) for r in csv.DictReader(src)][:n_images]
        with manifest.open("w", newline="") as dst:
            csv.writer(dst).writerows([("path", "label"), *rows])
        return manifest, f"isic_mel_nv ({len(rows)} real dermoscopy images, resized to {size} px)"
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, n_images)
    x = np.clip(rng.normal(90 + 60 * y[:, None, None, None], 40, (n_images, size, size, 3)), 0, 255).astype(np.uint8)
    path = folder / "synthetic.npz"
    np.savez(path, train_images=x, train_labels=y[:, None])
    return path, f"synthetic ({n_images} random two-class images, {size} px)"


def step_throughput(arch: str, size: int, batch: int, device_name: str, steps: int, warmup: int) -> dict:
    """Images/s of ``train()``'s step (preprocess on CPU, AMP on CUDA) on random uint8 images."""
    import torch

    from edgedx.card import CropPolicy, ModelCard, Normalization, Provenance
    from edgedx.runtime.preprocess import preprocess_batch
    from edgedx.training.losses import TaskLoss
    from edgedx.training.models import create_model, default_normalization
    from edgedx.training.strategy import parameter_groups

    device = torch.device(device_name)
    model = create_model(arch, 2).to(device).train()
    mean, std = default_normalization(model)
    card = ModelCard(
        arch=arch, task="binary", class_names=("a", "b"), positive_class="b", threshold=0.5, input_size=(size, size),
        normalization=Normalization(mean=mean, std=std), crop=CropPolicy((size, size), (size, size)),
        provenance=Provenance("bench", "2026-01-01T00:00:00+00:00"),
    )
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-3, 0.1), lr=1e-3)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    loss_fn = TaskLoss("binary", None).to(device)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    target = torch.from_numpy(rng.integers(0, 2, batch)).long().to(device)

    def step() -> None:
        x = torch.from_numpy(preprocess_batch(images, card)).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.float16, enabled=use_amp):
            loss = loss_fn(model(x), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss.item()  # the loop reads the loss every step, which also waits for the GPU

    for _ in range(warmup):
        step()
    if use_amp:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if use_amp:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    row = {"device": device_name, "amp": use_amp, "batch": batch, "steps": steps, "seconds": round(seconds, 3),
           "images_per_s": round(batch * steps / seconds, 1), "threads": torch.get_num_threads()}
    if use_amp:
        row["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def run_train(data: Path, out: Path, config, nproc: int = 1, threads: int | None = None) -> dict:  # config: a TrainConfig
    """One ``train()`` (or ``launch_train``) run: per-epoch seconds and throughput, wall time, peak GPU memory.

    ``threads`` sets torch's threads for a one-process run (launched workers share the cores out themselves).
    """
    import torch

    from edgedx.training.distributed import launch_train

    cuda = config.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    started = time.perf_counter()
    try:
        result = launch_train(data, out, config, nproc=nproc)
    finally:
        torch.set_num_threads(before)
    wall = time.perf_counter() - started
    n_train = result.card.provenance.data_summary["splits"]["train"]
    epochs = [row["seconds"] for row in result.history]
    steady = epochs[1:] or epochs  # the first epoch carries warm-up (cuDNN autotuning, allocator)
    row = {
        "processes": nproc, "threads_per_process": (threads or before) if nproc == 1 else max(1, (os.cpu_count() or 1) // nproc),
        "n_train": n_train, "n_val": result.card.provenance.data_summary["splits"]["val"],
        "epoch_seconds": epochs, "steady_epoch_seconds": round(statistics.median(steady), 2),
        "train_images_per_epoch_second": round(n_train / statistics.median(steady), 1), "wall_seconds": round(wall, 1),
        "world_size": result.summary.get("world_size"), "val_balanced_accuracy": result.card.metrics.get("balanced_accuracy"),
    }
    if cuda:
        row["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return row


def environment() -> dict:
    import torch

    env = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": git_rev(), "cpu": cpu_model(), "cores": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
        "versions": {"torch": torch.__version__, "timm": version("timm"), "edgedx": version("edgedx"), "python": platform.python_version()},
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   compute_capability=f"{props.major}.{props.minor}")
    return env


def gpu_mode(args: argparse.Namespace) -> dict:
    from edgedx.training.models import DEFAULT_ARCH
    from edgedx.training.train import TrainConfig

    arch, size = args.arch or DEFAULT_ARCH, args.size or 224
    report = {"mode": "gpu", "arch": arch, "size": size, "batch": args.batch}
    report["gpu_steps"] = step_throughput(arch, size, args.batch, "cuda", args.gpu_steps, warmup=5)
    report["cpu_steps"] = step_throughput(arch, size, args.batch, "cpu", args.cpu_steps, warmup=1)
    report["gpu_over_cpu"] = round(report["gpu_steps"]["images_per_s"] / report["cpu_steps"]["images_per_s"], 1)
    with tempfile.TemporaryDirectory(prefix="edgedx-train-gpu-") as tmp:
        data, report["data"] = make_data(Path(tmp), size, args.images or 388)
        config = TrainConfig(arch=arch, weights="none", input_size=size, batch_size=args.batch, epochs=args.epochs,
                             device="cuda", plots=False, gradcam_samples=0)
        report["train"] = run_train(data, Path(tmp) / "run", config)
    return report


def ddp_cpu_mode(args: argparse.Namespace) -> dict:
    from edgedx.training.models import DEFAULT_ARCH
    from edgedx.training.train import TrainConfig

    arch, size = args.arch or DEFAULT_ARCH, args.size or 64
    report = {"mode": "ddp-cpu", "arch": arch, "size": size, "batch": args.batch}
    with tempfile.TemporaryDirectory(prefix="edgedx-ddp-cpu-") as tmp:
        data, report["data"] = make_data(Path(tmp), size, args.images or 160)
        config = TrainConfig(arch=arch, weights="none", input_size=size, batch_size=args.batch, epochs=args.epochs,
                             device="cpu", plots=False, gradcam_samples=0)
        # One process with every core, one with a single thread (what each worker gets), then two processes.
        report["one_process"] = run_train(data, Path(tmp) / "one", config, nproc=1)
        report["one_process_one_thread"] = run_train(data, Path(tmp) / "one_1t", config, nproc=1, threads=1)
        report["two_processes"] = run_train(data, Path(tmp) / "two", config, nproc=2)
    one, two = report["one_process"], report["two_processes"]
    report["two_over_one_epoch_throughput"] = round(two["train_images_per_epoch_second"] / one["train_images_per_epoch_second"], 2)
    report["two_over_one_single_thread"] = round(
        two["train_images_per_epoch_second"] / report["one_process_one_thread"]["train_images_per_epoch_second"], 2
    )
    return report


def table(report: dict) -> str:
    if report["mode"] == "gpu":
        g, c, t = report["gpu_steps"], report["cpu_steps"], report["train"]
        lines = [
            f"{report['arch']} at {report['size']} px, batch {report['batch']}; data: {report['data']}",
            "| what | device | images/s | seconds | peak GPU MiB |", "|---|---|---|---|---|",
            f"| training step ({g['steps']} steps, AMP) | cuda | {g['images_per_s']} | {g['seconds']} | {g['peak_gpu_memory_mib']} |",
            f"| training step ({c['steps']} steps, fp32, {c['threads']} threads) | cpu | {c['images_per_s']} | {c['seconds']} | |",
            f"| train() epochs {t['epoch_seconds']} s (val included) | cuda | {t['train_images_per_epoch_second']} | {t['steady_epoch_seconds']} | {t['peak_gpu_memory_mib']} |",
            f"GPU step / CPU step: {report['gpu_over_cpu']}x",
        ]
    else:
        lines = [
            f"{report['arch']} at {report['size']} px, global batch {report['batch']}; data: {report['data']}",
            "| processes x threads | epoch seconds | steady epoch s | train images/s | wall s (start included) | val bal. acc |",
            "|---|---|---|---|---|---|",
        ]
        for key in ("one_process", "one_process_one_thread", "two_processes"):
            r = report[key]
            lines.append(
                f"| {r['processes']} x {r['threads_per_process']} | {r['epoch_seconds']} | {r['steady_epoch_seconds']} | "
                f"{r['train_images_per_epoch_second']} | {r['wall_seconds']} | {r['val_balanced_accuracy']} |"
            )
        lines.append(
            f"2 processes / 1 process, epoch throughput: {report['two_over_one_epoch_throughput']}x "
            f"(against 1 process x 1 thread: {report['two_over_one_single_thread']}x)"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ddp-cpu", action="store_true", help="2 CPU processes (gloo) against 1, instead of the GPU run")
    parser.add_argument("--arch", help="timm architecture (default: EdgeDx's default)")
    parser.add_argument("--size", type=int, help="input size (default 224 on GPU, 64 for --ddp-cpu)")
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, help="images in the data set (default 388 on GPU, 160 for --ddp-cpu)")
    parser.add_argument("--gpu-steps", type=int, default=50)
    parser.add_argument("--cpu-steps", type=int, default=3)
    parser.add_argument("--json", type=Path, help="where to write the JSON (default: results/train_gpu.json or train_ddp_cpu.json)")
    args = parser.parse_args()

    import torch

    if not args.ddp_cpu and not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: nothing measured, no JSON written. "
              "Run this on a machine with an NVIDIA GPU, or use --ddp-cpu for the CPU comparison.", file=sys.stderr)
        return 1
    load_start = [round(v, 2) for v in os.getloadavg()]  # the machine may be shared: record how busy it was
    report = ddp_cpu_mode(args) if args.ddp_cpu else gpu_mode(args)
    report["environment"] = {**environment(), "load_average_start": load_start, "load_average_end": [round(v, 2) for v in os.getloadavg()]}
    path = args.json or RESULTS / ("train_ddp_cpu.json" if args.ddp_cpu else "train_gpu.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(report))
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
