"""OpenVINO against ONNX Runtime on the same EdgeDx .onnx files, interleaved, with ratios.

Issue "fastest on the processor it runs on": OpenVINO can be much faster on
Intel CPUs (bf16 on AMX); on an AMD EPYC without AVX-512 it may not be. Every
row says which CPU measured it (model, AVX2 / AVX-512 / VNNI / AMX flags), and
rows are appended to ``benchmarks/results/openvino_vs_ort.jsonl``, so runs on
either kind of developer machine add their rows and both kinds stay.

Variants per model and batch: ONNX Runtime on CPU (``--device cpu``), OpenVINO
at f32 (``openvino``), and OpenVINO bf16 (``openvino-bf16``) where the CPU has
BF16 (the session refuses it elsewhere). Each variant's probabilities on the
same crops are compared with ONNX Runtime's (max |Δp|). Timing: a warm-up,
then ``--rounds`` interleaved rounds in rotated order (see ort_vs_torch.py).

    python benchmarks/openvino_vs_ort.py [MODEL.onnx ...] [--batch-sizes 1,8] [--rounds 5] [--seconds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import ROOT, cpu_model, git_rev, version  # noqa: E402
from ort_vs_torch import interleaved, most_other, ratio_stats  # noqa: E402

from edgedx.errors import EdgeDxError  # noqa: E402
from edgedx.runtime.backends.session import open_session  # noqa: E402
from edgedx.runtime.bundled import bundled_model_path  # noqa: E402
from edgedx.runtime.preprocess import model_input, to_probabilities  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "openvino_vs_ort.jsonl"


def cpu_flags() -> dict[str, bool]:
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    return {"avx2": " avx2" in flags, "avx512": "avx512f" in flags, "vnni": "vnni" in flags, "amx": "amx_tile" in flags}


def sessions(model: Path) -> dict[str, object]:
    """The variants this machine can run (bf16 only where the CPU has it; the refusal is printed)."""
    found = {"onnxruntime": open_session(model, "cpu"), "openvino f32": open_session(model, "openvino")}
    try:
        found["openvino bf16"] = open_session(model, "openvino-bf16")
    except EdgeDxError as exc:
        print(f"  openvino bf16 not measured: {str(exc)[:160]}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", type=Path)
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    models = args.models or [bundled_model_path()]
    env = {"cpu": cpu_model(), **cpu_flags(), "cores": __import__("os").cpu_count(), "onnxruntime": version("onnxruntime"),
           "openvino": version("openvino"), "commit": git_rev(), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    print(f"{env['cpu']} ({env['cores']} cores; avx2 {env['avx2']}, avx512 {env['avx512']}, vnni {env['vnni']}, amx {env['amx']})")
    for model in models:
        variants = sessions(model)
        card = variants["onnxruntime"].card  # type: ignore[attr-defined]
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            crops = np.random.default_rng(0).integers(0, 256, (batch, *card.input_size, 3), dtype=np.uint8)
            x = model_input(crops, card)
            reference = to_probabilities(variants["onnxruntime"].run(x), card)  # type: ignore[attr-defined]
            delta = {n: float(np.abs(to_probabilities(s.run(x), card) - reference).max()) for n, s in variants.items()}  # type: ignore[attr-defined]
            calls = {n: (lambda s=s: s.run(x)) for n, s in variants.items()}  # type: ignore[attr-defined]
            rates, other, discarded = interleaved(calls, batch, rounds=args.rounds, seconds=args.seconds, warmup=1.0, settle=0.2)
            for name in variants:
                row = {
                    "model": model.name, "batch": batch, "variant": name, "images_per_s": statistics.median(rates[name]),
                    "vs_onnxruntime": ratio_stats(rates[name], rates["onnxruntime"]), "max_abs_dp_vs_onnxruntime": delta[name],
                    "precision": variants[name].precision, "most_other_load": most_other(other), "rounds_discarded": discarded,  # type: ignore[attr-defined]
                    "machine": env,
                }
                print(f"  {model.name} b{batch} {name:14s} {row['images_per_s']:7.1f} img/s  ×{row['vs_onnxruntime']['ratio']:.2f} "
                      f"[{row['vs_onnxruntime']['ratio_min']:.2f}, {row['vs_onnxruntime']['ratio_max']:.2f}]  max|Δp| {delta[name]:.1e}")
                with RESULTS.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
