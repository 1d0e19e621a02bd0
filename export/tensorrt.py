"""ONNX → TensorRT engine, with a sidecar that records the card and how it was built.

TensorRT 11 networks are strongly typed only, and with TensorRT 10 we ask for
strong typing too, so both behave the same: the engine's precision is the
precision of the ONNX it is given (fp16 graph → fp16 engine, QDQ int8 graph →
int8 engine). No precision builder flags are ever set: they are invalid for
strongly typed networks and gone in TensorRT 11.

An engine is tied to the TensorRT version and the GPU it was built on, so the
sidecar records both (see :mod:`edgedx.runtime.backends.trt_backend`), and the runtime
refuses a mismatch with the rebuild command. TensorRT is imported only when an
engine is built; this module imports nothing heavy (and never torch).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedx.card import ModelCard, now_iso
from edgedx.errors import InputError, ModelError
from edgedx.export.precision import PRECISIONS
from edgedx.progress import ProgressFn, no_progress
from edgedx.runtime.backends.onnx_backend import check_input_matches_card
from edgedx.runtime.backends.trt_backend import (
    atomic_write_bytes,
    current_gpu,
    errors_in,
    import_tensorrt,
    read_sidecar,
    shared_logger,
    write_sidecar,
)

__all__ = ["EngineInfo", "default_timing_cache", "onnx_to_engine", "read_sidecar"]

log = logging.getLogger(__name__)

TIMING_CACHE_NAME = "tensorrt.timing.cache"
GIB = 1 << 30


@dataclass(frozen=True)
class EngineInfo:
    """What one build produced, for the export report."""

    engine_path: Path
    sidecar_path: Path
    precision: str
    tensorrt_version: str
    gpu: str
    compute_capability: str
    seconds: float
    bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine_path": str(self.engine_path),
            "sidecar_path": str(self.sidecar_path),
            "precision": self.precision,
            "tensorrt_version": self.tensorrt_version,
            "gpu": self.gpu,
            "compute_capability": self.compute_capability,
            "seconds": self.seconds,
            "bytes": self.bytes,
        }


def default_timing_cache(engine_path: str | Path) -> Path:
    """One timing cache per output folder: every engine built there (fp32, fp16, int8) reuses the timings."""
    return Path(engine_path).parent / TIMING_CACHE_NAME


def onnx_to_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    card: ModelCard,
    *,
    precision: str,
    onnx_sha256: str,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 32,
    workspace_gib: float = 2.0,
    timing_cache: Path | None = None,
    progress: ProgressFn = no_progress,
) -> EngineInfo:
    """Build ``engine_path`` (a serialised plan) from ``onnx_path`` and write its sidecar beside it.

    ``precision`` names what the ONNX holds (the graph decides, not a flag);
    batch sizes set the single optimisation profile (TensorRT tunes for
    ``opt_batch`` and accepts ``min_batch..max_batch``); the timing cache
    (default: :func:`default_timing_cache`) makes rebuilds on the same GPU faster.
    """
    _check_options(precision, min_batch, opt_batch, max_batch, workspace_gib)
    trt = import_tensorrt("Building a TensorRT engine")
    started = time.perf_counter()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise ModelError(f"ONNX model not found: {onnx_path}")
    cache_path = Path(timing_cache) if timing_cache is not None else default_timing_cache(engine_path)
    progress("tensorrt", 0, 3, f"parsing {onnx_path.name}")

    build = _build_plan(
        trt, onnx_path, card, precision, (min_batch, opt_batch, max_batch), workspace_gib, cache_path, progress
    )
    if build.plan is None:
        _refuse_failed_build(onnx_path, engine_path, build.lines)
    progress("tensorrt", 2, 3, f"writing {engine_path.name}")
    _save_timing_cache(build.config, cache_path)
    atomic_write_bytes(engine_path, memoryview(build.plan))

    gpu, capability = current_gpu()
    sidecar = write_sidecar(
        engine_path, card, _build_record(trt, gpu, capability, precision, onnx_sha256, build.batch, workspace_gib)
    )
    progress("tensorrt", 3, 3, f"wrote {engine_path.name}")
    seconds = round(time.perf_counter() - started, 2)
    log.info("built %s (%s, TensorRT %s on %s sm %s) in %.1f s", engine_path, precision, trt.__version__, gpu, capability, seconds)
    return EngineInfo(
        engine_path=engine_path,
        sidecar_path=sidecar,
        precision=precision,
        tensorrt_version=trt.__version__,
        gpu=gpu,
        compute_capability=capability,
        seconds=seconds,
        bytes=engine_path.stat().st_size,
    )


@dataclass
class _Build:
    """Everything one build created, held together until the engine is written.

    The parser owns the weights the network points at, and the timing cache is
    read back from ``config`` after the build, so none of these objects may be
    released early; keeping them in one place keeps them alive as long as
    :func:`onnx_to_engine` runs, as when they were its locals.
    """

    builder: Any
    network: Any
    parser: Any
    config: Any
    plan: Any  # serialised engine (IHostMemory), None when the build failed
    batch: tuple[int, int, int]
    lines: list[str]  # TensorRT's log during parsing and building


def _build_plan(
    trt: Any,
    onnx_path: Path,
    card: ModelCard,
    precision: str,
    batch: tuple[int, int, int],
    workspace_gib: float,
    cache_path: Path,
    progress: ProgressFn,
) -> _Build:
    """Parse, configure and build with TensorRT's log captured, so errors can quote it."""
    logger = shared_logger(trt)
    with logger.capture() as lines:
        builder, network, parser = _parse_network(trt, logger, lines, onnx_path)
        batch = _input_profile(network, card, onnx_path, batch)
        detected = _graph_precision(trt, network)
        if detected is not None and detected != precision:
            log.warning("%s looks like a %s graph but is being built as precision %r", onnx_path, detected, precision)
        config = _builder_config(trt, builder, network, card, batch, workspace_gib, cache_path)

        progress("tensorrt", 1, 3, f"building {precision} engine (can take minutes)")
        log.info("building a %s TensorRT %s engine from %s (batch %s)", precision, trt.__version__, onnx_path, batch)
        plan = builder.build_serialized_network(network, config)
    return _Build(builder, network, parser, config, plan, batch, lines)


def _parse_network(trt: Any, logger: Any, lines: list[str], onnx_path: Path) -> tuple[Any, Any, Any]:
    """(builder, network, parser) with the ONNX parsed; TensorRT's failures become ModelErrors saying what to do."""
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # TensorRT raises its own untyped errors when CUDA cannot start
        raise ModelError(f"TensorRT could not start ({exc}); building an engine needs an NVIDIA GPU and driver") from None
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(
            f"TensorRT {trt.__version__} cannot parse {onnx_path}: "
            f"{'; '.join(errors) or errors_in(lines)}; re-export it with edgedx export, or use a newer TensorRT"
        )
    return builder, network, parser


def _builder_config(
    trt: Any,
    builder: Any,
    network: Any,
    card: ModelCard,
    batch: tuple[int, int, int],
    workspace_gib: float,
    cache_path: Path,
) -> Any:
    """The build configuration: workspace limit, the one batch profile in the card's layout, the timing cache."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * GIB))
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    h, w = card.input_size
    item = (h, w, 3) if card.input_format == "uint8_nhwc" else (3, h, w)
    profile.set_shape(name, (batch[0], *item), (batch[1], *item), (batch[2], *item))
    config.add_optimization_profile(profile)
    _load_timing_cache(config, cache_path)
    return config


def _refuse_failed_build(onnx_path: Path, engine_path: Path, lines: list[str]) -> None:
    """Keep TensorRT's full log beside the engine path (it is long) and raise with its errors."""
    build_log = engine_path.with_name(engine_path.name + ".build.log")
    atomic_write_bytes(build_log, ("\n".join(lines) + "\n").encode("utf-8"))
    raise ModelError(
        f"TensorRT could not build an engine from {onnx_path}: {errors_in(lines)}; "
        f"the full TensorRT log is in {build_log}"
    )


def _build_record(
    trt: Any,
    gpu: str,
    capability: str,
    precision: str,
    onnx_sha256: str,
    batch: tuple[int, int, int],
    workspace_gib: float,
) -> dict[str, Any]:
    """How the engine was built, for the sidecar: the runtime refuses it on another TensorRT or GPU."""
    return {
        "version": trt.__version__,
        "gpu": gpu,
        "compute_capability": capability,
        "precision": precision,
        "onnx_sha256": onnx_sha256,
        "batch": list(batch),
        "workspace_gib": workspace_gib,
        "built_at": now_iso(),
    }


def _check_options(precision: str, min_batch: int, opt_batch: int, max_batch: int, workspace_gib: float) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"unknown engine precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    batches = (min_batch, opt_batch, max_batch)
    if any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batches) or not min_batch <= opt_batch <= max_batch:
        raise InputError(
            f"engine batch sizes must be integers with 1 <= min <= opt <= max, got min {min_batch}, "
            f"opt {opt_batch}, max {max_batch}"
        )
    if not workspace_gib > 0:
        raise InputError(f"TensorRT workspace must be more than 0 GiB, got {workspace_gib}")


def _network_flags(trt: Any) -> int:
    """STRONGLY_TYPED on TensorRT 10; 0 on 11+, where every network is strongly typed and the flag is deprecated."""
    if int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def _input_profile(network: Any, card: ModelCard, onnx_path: Path, batch: tuple[int, int, int]) -> tuple[int, int, int]:
    """Check the parsed input against the card; the (min, opt, max) batch the graph allows."""
    if network.num_inputs != 1:
        raise ModelError(f"{onnx_path}: expected one input, the graph has {network.num_inputs}")
    shape = [int(d) for d in network.get_input(0).shape]
    check_input_matches_card([d if d >= 0 else None for d in shape], card, onnx_path)
    if shape[0] >= 0 and batch != (shape[0],) * 3:
        log.warning("%s has a fixed batch of %d; building for exactly that batch, not %s", onnx_path, shape[0], list(batch))
        return (shape[0],) * 3
    return batch


def _graph_precision(trt: Any, network: Any) -> str | None:
    """Best guess at what precision the parsed graph computes in: Q/DQ layers → int8, half tensors → fp16.

    Only a sanity check for the caller's ``precision`` label; None if it cannot tell.
    """
    try:
        half = False
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type in (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE):
                return "int8"
            half = half or any(layer.get_output(j).dtype == trt.DataType.HALF for j in range(layer.num_outputs))
        return "fp16" if half else "fp32"
    except Exception as exc:  # introspection differs across TensorRT versions; the build does not depend on it
        log.debug("could not inspect the graph's precision: %s", exc)
        return None


def _load_timing_cache(config: Any, path: Path) -> None:
    """Start from the saved timings when they fit this TensorRT and GPU, else from an empty cache."""
    data = b""
    if path.is_file():
        try:
            data = path.read_bytes()
        except OSError as exc:
            log.warning("cannot read the timing cache %s (%s); starting a new one", path, exc.strerror)
    try:
        cache = config.create_timing_cache(data)
        if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
            if data:
                log.info("using the TensorRT timing cache %s", path)
            return
    except Exception as exc:  # a corrupt cache file must not stop the build
        log.debug("timing cache %s rejected: %s", path, exc)
    log.warning("the timing cache %s is from another TensorRT version or GPU (or damaged); starting a new one", path)
    config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(config: Any, path: Path) -> None:
    """Keep the timings for the next build; losing them only makes that build slower."""
    try:
        cache = config.get_timing_cache()
        if cache is not None:
            atomic_write_bytes(path, memoryview(cache.serialize()))
    except Exception as exc:
        log.warning("could not save the TensorRT timing cache to %s: %s", path, exc)
