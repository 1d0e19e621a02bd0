"""TensorRT as the inference engine, with the card read from the sidecar beside the engine.

A serialised engine (a "plan") is specific to the TensorRT version and to the
GPU architecture it was built on, and it has no room for metadata. So the build
writes a sidecar JSON (:func:`edgedx.card.sidecar_path`) holding the model card
and how the engine was built::

    {"card": {...},
     "tensorrt": {"version": "10.8.0.43", "gpu": "NVIDIA H100 80GB HBM3",
                  "compute_capability": "9.0", "precision": "fp16",
                  "onnx_sha256": "...", "batch": [1, 8, 32], "workspace_gib": 2.0,
                  "built_at": "..."}}

Before deserialising we compare that record with this machine, so a stale engine
fails with what differs and how to rebuild, not with TensorRT's own error.

Torch-free and onnx-free: needs ``tensorrt`` and ``cuda-python`` (its runtime
bindings, for device memory and the stream) and nothing heavier.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgedx.card import ModelCard, now_iso, sidecar_path
from edgedx.errors import CardError, MissingDependencyError, ModelError
from edgedx.runtime.io.integrity import atomic_write_bytes, verify_model_file
from edgedx.runtime.backends.onnx_backend import check_input_matches_card

log = logging.getLogger(__name__)

REBUILD = "edgedx export CHECKPOINT --out DIR --engine"
UNKNOWN = "unknown"
BUILD_KEYS = ("version", "gpu", "compute_capability", "precision", "onnx_sha256", "batch")
DEVICES = ("tensorrt", "cuda", "auto")

# TensorRT DataType member name -> numpy dtype; BF16/FP8/INT4/FP4 I/O has no numpy twin.
_NUMPY_DTYPES = {
    "FLOAT": np.float32,
    "HALF": np.float16,
    "INT8": np.int8,
    "UINT8": np.uint8,
    "INT32": np.int32,
    "INT64": np.int64,
    "BOOL": np.bool_,
}


# -- optional packages ----------------------------------------------------------------


def import_tensorrt(purpose: str) -> Any:
    """tensorrt, or a clear error naming the extra to install."""
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError("tensorrt", "trt", purpose) from None
    return tensorrt


def import_cudart(purpose: str) -> Any:
    """cuda-python's runtime bindings: ``cuda.bindings.runtime`` (12.6+), else the older ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise MissingDependencyError("cuda-python", "trt", purpose) from None
    return cudart


# -- the sidecar ----------------------------------------------------------------------


def write_sidecar(engine_path: str | Path, card: ModelCard, build: dict[str, Any]) -> Path:
    """Write ``{"card": ..., "tensorrt": build}`` beside the engine, atomically; returns its path."""
    _check_build_block(build, Path(engine_path))
    document = {"card": card.to_dict(), "tensorrt": {**build, "built_at": build.get("built_at") or now_iso()}}
    text = json.dumps(document, indent=2, allow_nan=False) + "\n"
    path = sidecar_path(engine_path)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path


def read_sidecar_block(engine_path: Path, key: str) -> str | None:
    """One optional block of the sidecar as JSON text (the card and build record are read by :func:`read_sidecar`)."""
    try:
        value = json.loads(sidecar_path(engine_path).read_text(encoding="utf-8")).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) or value is None else json.dumps(value)


def read_sidecar(engine_path: str | Path) -> tuple[ModelCard, dict[str, Any]]:
    """The card and the ``tensorrt`` build record stored beside an engine.

    The engine alone cannot say how to preprocess or which TensorRT and GPU it
    needs, so a missing or malformed sidecar is an error that says how to rebuild.
    """
    engine_path = Path(engine_path)
    path = sidecar_path(engine_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(
            f"{engine_path}: its sidecar {path.name} is missing (it holds the model card and how the engine "
            f"was built); rebuild the engine with: {REBUILD}"
        ) from None
    except OSError as exc:
        raise ModelError(f"cannot read the engine sidecar {path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CardError(f"{path} is not valid JSON ({exc}); rebuild the engine with: {REBUILD}") from None
    if not isinstance(data, dict) or not {"card", "tensorrt"} <= set(data):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise CardError(
            f"{path} must be a JSON object with 'card' and 'tensorrt' blocks, found {found}; "
            f"rebuild the engine with: {REBUILD}"
        )
    try:
        card = ModelCard.from_dict(data["card"])
    except CardError as exc:
        raise CardError(f"{path}: {exc}") from None
    return card, _check_build_block(data["tensorrt"], path)


def _check_build_block(build: Any, where: Path) -> dict[str, Any]:
    """The ``tensorrt`` record must have every field the runtime and the report read."""
    if not isinstance(build, dict):
        raise CardError(f"{where}: the 'tensorrt' block must be an object, got {type(build).__name__}; rebuild with: {REBUILD}")
    missing = [k for k in BUILD_KEYS if k not in build]
    if missing:
        raise CardError(f"{where}: the 'tensorrt' block is missing field '{missing[0]}'; rebuild with: {REBUILD}")
    for key in ("version", "gpu", "compute_capability", "precision", "onnx_sha256"):
        if not isinstance(build[key], str) or not build[key]:
            raise CardError(f"{where}: 'tensorrt.{key}' must be a non-empty string, got {build[key]!r}; rebuild with: {REBUILD}")
    batch = build["batch"]
    if (
        not isinstance(batch, list)
        or len(batch) != 3
        or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batch)
        or not batch[0] <= batch[1] <= batch[2]
    ):
        raise CardError(
            f"{where}: 'tensorrt.batch' must be [min, opt, max] positive integers in order, got {batch!r}; "
            f"rebuild with: {REBUILD}"
        )
    return dict(build)


# -- what this machine has ------------------------------------------------------------


def current_gpu() -> tuple[str, str]:
    """(name, compute capability "major.minor") of the current GPU, or "unknown" for either.

    cuda-python when importable (it sees what CUDA sees), else ``nvidia-smi``.
    """
    try:
        cudart = import_cudart("Querying the GPU")
    except MissingDependencyError:
        cudart = None
    if cudart is not None:
        found = _gpu_from_cudart(cudart)
        if found is not None:
            return found
    return _gpu_from_nvidia_smi() or (UNKNOWN, UNKNOWN)


def _gpu_from_cudart(cudart: Any) -> tuple[str, str] | None:
    try:
        err, device = cudart.cudaGetDevice()
        if err != cudart.cudaError_t.cudaSuccess:
            return None
        err, props = cudart.cudaGetDeviceProperties(device)
        if err != cudart.cudaError_t.cudaSuccess:
            return None
    except Exception as exc:  # a driver that cannot start raises from inside the bindings
        log.debug("cuda-python could not query the GPU: %s", exc)
        return None
    name = props.name
    if isinstance(name, bytes):
        name = name.split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(name).strip() or UNKNOWN, f"{props.major}.{props.minor}"


def _gpu_from_nvidia_smi() -> tuple[str, str] | None:
    command = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if visible.isdigit():
        command.append(f"--id={visible}")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi is not usable: %s", exc)
        return None
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines or "," not in lines[0]:
        return None
    name, capability = (part.strip() for part in lines[0].rsplit(",", 1))
    return name or UNKNOWN, capability or UNKNOWN


def check_engine_compatible(
    built: dict[str, Any], installed_version: str, gpu: str, compute_capability: str, path: str | Path
) -> None:
    """Refuse an engine from another TensorRT major.minor or another GPU architecture.

    TensorRT rejects such plans with a terse deserialisation error; this says what
    differs and how to rebuild. An unknown compute capability on either side is
    not held against the engine (TensorRT still checks when it deserialises).
    """
    built_version = str(built.get("version", UNKNOWN))
    built_cc = str(built.get("compute_capability", UNKNOWN))
    same_version = _major_minor(built_version) == _major_minor(installed_version)
    same_arch = UNKNOWN in (built_cc, compute_capability) or built_cc.strip() == compute_capability.strip()
    if same_version and same_arch:
        if str(built.get("gpu")) != gpu and UNKNOWN not in (gpu, str(built.get("gpu"))):
            log.warning("%s was built on %s and runs on %s (same sm %s)", path, built.get("gpu"), gpu, built_cc)
        return
    raise ModelError(
        f"{path}: engine built with TensorRT {built_version} on {built.get('gpu', UNKNOWN)} (sm {built_cc}); "
        f"this machine has TensorRT {installed_version} on {gpu} (sm {compute_capability}); "
        f"engines are specific to both: rebuild it here with {REBUILD}"
    )


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.strip().split(".")[:2])


# -- TensorRT's log -------------------------------------------------------------------

_LOGGERS: dict[int, Any] = {}
_LOGGER_LOCK = threading.Lock()


def shared_logger(trt: Any) -> Any:
    """One process-wide ``trt.ILogger`` that forwards to :mod:`logging` (the library never prints).

    Older TensorRT treats the logger as a singleton and it must outlive every
    builder, runtime and engine, so it is created once per ``tensorrt`` module and
    kept. It also keeps recent messages so a failed build or load can quote
    TensorRT's own errors.
    """
    with _LOGGER_LOCK:
        if id(trt) not in _LOGGERS:
            _LOGGERS[id(trt)] = _make_logger(trt)
        return _LOGGERS[id(trt)]


def _make_logger(trt: Any) -> Any:
    severity = trt.ILogger.Severity
    pylog = log  # the method below is itself called ``log``

    class _Logger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.recent: deque[str] = deque(maxlen=200)
            self._captures: list[list[str]] = []

        def log(self, level: Any, msg: str) -> None:
            if level == severity.VERBOSE:
                return  # thousands of lines per build
            if level in (severity.INTERNAL_ERROR, severity.ERROR):
                pylog.error("TensorRT: %s", msg)
                tag = "ERROR"
            elif level == severity.WARNING:
                pylog.warning("TensorRT: %s", msg)
                tag = "WARNING"
            else:
                pylog.debug("TensorRT: %s", msg)
                tag = "INFO"
            line = f"[{tag}] {msg}"
            self.recent.append(line)
            for lines in list(self._captures):
                lines.append(line)

        @contextmanager
        def capture(self) -> Iterator[list[str]]:
            """Collect every message logged inside the block (e.g. one build)."""
            lines: list[str] = []
            self._captures.append(lines)
            try:
                yield lines
            finally:
                self._captures.remove(lines)

    return _Logger()


def errors_in(lines: list[str] | deque[str], *, limit: int = 3) -> str:
    """The last few TensorRT error lines, for an exception message."""
    errors = [line[len("[ERROR] "):] for line in lines if line.startswith("[ERROR]")]
    return "; ".join(errors[-limit:]) if errors else "TensorRT logged no error"


# -- the session ----------------------------------------------------------------------


class TensorRTSession:
    """A deserialised TensorRT engine plus the card from its sidecar (a :class:`~edgedx.runtime.backends.session.Session`).

    Not reentrant on the GPU side, so :meth:`run` holds a lock: one batch at a
    time per session (the engine is still shared, each call reuses the buffers).
    """

    def __init__(self, path: str | Path, *, device: str = "tensorrt", threads: int | None = None) -> None:
        del threads  # CPU threads do not apply to a GPU engine; kept for OnnxSession's signature
        self._closed = True  # close() is safe however far __init__ got
        self._buffers: dict[str, tuple[int, int]] = {}
        self._stream: Any = None
        self._lock = threading.Lock()
        if device not in DEVICES:
            raise ModelError(
                f"a TensorRT engine runs only on an NVIDIA GPU, not on device {device!r}; "
                "pass --device tensorrt to run it, or use the .onnx model for --device cpu"
            )
        trt = import_tensorrt("Running a TensorRT engine")
        cudart = import_cudart("Running a TensorRT engine")
        self._trt, self._cudart = trt, cudart
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelError(f"engine file not found: {self.path}")
        self.sha256 = verify_model_file(self.path)  # refused here if truncated or edited; reused by runs
        self.card, self.build = read_sidecar(self.path)
        gpu, capability = current_gpu()
        check_engine_compatible(self.build, trt.__version__, gpu, capability, self.path)
        self.providers = (f"TensorRT {trt.__version__} on {gpu} (sm {capability})",)
        self.device = "tensorrt"
        self.precision = str(self.build.get("precision") or "fp32")
        self.pads_batches = True  # an engine's optimisation profile is tuned for one batch; keep one shape
        self.selftest = read_sidecar_block(self.path, "selftest")  # the vectors export stored beside the engine

        self._logger = shared_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        with self._logger.capture() as lines:
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self._engine is None:
            raise ModelError(
                f"{self.path}: TensorRT {trt.__version__} could not deserialise this engine ({errors_in(lines)}); "
                f"engines are specific to the TensorRT version and GPU: rebuild it here with {REBUILD}"
            )
        self._inspect_io()
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ModelError(f"{self.path}: TensorRT could not create an execution context ({errors_in(self._logger.recent)})")
        self._stream = self._cuda(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._closed = False
        log.info("loaded %s on %s", self.path, self.providers[0])

    def _inspect_io(self) -> None:
        """One input matching the card, at least one output; dtypes and the profile's batch range."""
        trt, engine = self._trt, self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not self._outputs:
            raise ModelError(
                f"{self.path}: expected one input and at least one output, the engine has "
                f"{len(inputs)} inputs and {len(self._outputs)} outputs; rebuild it with {REBUILD}"
            )
        self.input_name = inputs[0]
        shape = [int(d) for d in engine.get_tensor_shape(self.input_name)]
        check_input_matches_card([d if d >= 0 else None for d in shape], self.card, self.path)
        self._item_shape = tuple(shape[1:])
        if shape[0] >= 0:
            self._min_batch = self._max_batch = shape[0]
        else:
            low, _, high = engine.get_tensor_profile_shape(self.input_name, 0)
            self._min_batch, self._max_batch = int(low[0]), int(high[0])
        self._dtypes = {n: self._numpy_dtype(engine.get_tensor_dtype(n), n) for n in names}

    def _numpy_dtype(self, trt_dtype: Any, name: str) -> np.dtype:
        for member, np_type in _NUMPY_DTYPES.items():
            value = getattr(self._trt.DataType, member, None)
            if value is not None and trt_dtype == value:
                return np.dtype(np_type)
        raise ModelError(
            f"{self.path}: tensor {name!r} has TensorRT type {trt_dtype}, which numpy cannot hold; "
            "build the engine from an ONNX with float32/float16 (or uint8) inputs and outputs"
        )

    # -- inference ---------------------------------------------------------------------

    def run(self, x: np.ndarray) -> np.ndarray:
        """Raw model outputs (logits, the engine's first output) as float32 (N, C) for a preprocessed batch.

        Batches beyond the optimisation profile's maximum run in chunks; smaller
        than its minimum are zero-padded and the padding dropped.
        """
        if self._closed:
            raise ModelError(f"{self.path}: the TensorRT session is closed")
        x = self._check_input(x)
        if len(x) == 0:
            shape = [int(d) for d in self._engine.get_tensor_shape(self._outputs[0])][1:]
            return np.zeros((0, *[max(d, 0) for d in shape]), np.float32)
        with self._lock:
            parts = [self._run_chunk(x[i : i + self._max_batch]) for i in range(0, len(x), self._max_batch)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _check_input(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        want = self._dtypes[self.input_name]
        if x.ndim != 4 or any(e >= 0 and a != e for a, e in zip(x.shape[1:], self._item_shape)):
            raise ModelError(
                f"{self.path}: input of shape {list(x.shape)} does not fit the engine's (batch, "
                f"{', '.join(str(d) for d in self._item_shape)}) input; preprocess with the card "
                f"({self.card.input_format}, input_size {list(self.card.input_size)})"
            )
        if x.dtype != want:
            if not (np.issubdtype(x.dtype, np.floating) and np.issubdtype(want, np.floating)):
                raise ModelError(
                    f"{self.path}: the engine takes {want} input, got {x.dtype}; "
                    f"preprocess with the card (input_format {self.card.input_format})"
                )
            x = x.astype(want)
        return np.ascontiguousarray(x)

    def _run_chunk(self, chunk: np.ndarray) -> np.ndarray:
        trt_context, cudart = self._context, self._cudart
        n = len(chunk)
        if n < self._min_batch:
            pad = np.zeros((self._min_batch - n, *chunk.shape[1:]), chunk.dtype)
            chunk = np.ascontiguousarray(np.concatenate([chunk, pad]))
        if not trt_context.set_input_shape(self.input_name, tuple(chunk.shape)):
            raise ModelError(
                f"{self.path}: TensorRT refused input shape {list(chunk.shape)} (profile batch "
                f"{self._min_batch}..{self._max_batch}): {errors_in(self._logger.recent)}"
            )
        host_out: dict[str, np.ndarray] = {}
        for name in self._outputs:
            shape = tuple(int(d) for d in trt_context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ModelError(f"{self.path}: output {name!r} has unresolved shape {list(shape)}; rebuild with {REBUILD}")
            host_out[name] = np.empty(shape, self._dtypes[name])
        pointers = {self.input_name: self._device_buffer(self.input_name, chunk.nbytes)}
        pointers.update({name: self._device_buffer(name, out.nbytes) for name, out in host_out.items()})
        for name, pointer in pointers.items():
            if not trt_context.set_tensor_address(name, pointer):
                raise ModelError(f"{self.path}: TensorRT refused the device address of tensor {name!r}")

        stream = self._stream
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._cuda(
            cudart.cudaMemcpyAsync(pointers[self.input_name], chunk.ctypes.data, chunk.nbytes, to_device, stream),
            "copying the input to the GPU",
        )
        if not trt_context.execute_async_v3(int(stream)):
            raise ModelError(f"{self.path}: TensorRT inference failed: {errors_in(self._logger.recent)}")
        for name, out in host_out.items():
            self._cuda(cudart.cudaMemcpyAsync(out.ctypes.data, pointers[name], out.nbytes, to_host, stream), "copying outputs back")
        self._cuda(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return host_out[self._outputs[0]][:n]

    def _device_buffer(self, name: str, nbytes: int) -> int:
        """The tensor's device buffer, grown (never shrunk) to ``nbytes``."""
        pointer, capacity = self._buffers.get(name, (0, 0))
        if capacity >= nbytes:
            return pointer
        if pointer:
            self._cuda(self._cudart.cudaFree(pointer), "cudaFree")
            del self._buffers[name]
        pointer = int(self._cuda(self._cudart.cudaMalloc(max(nbytes, 1)), f"allocating {nbytes} bytes on the GPU"))
        self._buffers[name] = (pointer, nbytes)
        return pointer

    def _cuda(self, result: Any, what: str) -> Any:
        """Check a cuda-python ``(err, *values)`` tuple; the value(s) or a ModelError naming the CUDA error."""
        cudart = self._cudart
        err, values = result[0], result[1:]
        if err != cudart.cudaError_t.cudaSuccess:
            try:
                detail = cudart.cudaGetErrorString(err)[1]
                detail = detail.decode() if isinstance(detail, bytes) else str(detail)
            except Exception:  # the error string is a courtesy; the code is what matters
                detail = "no description"
            raise ModelError(f"{self.path}: CUDA error while {what}: {getattr(err, 'name', err)} ({detail})")
        if not values:
            return None
        return values[0] if len(values) == 1 else values

    # -- cleanup -----------------------------------------------------------------------

    def close(self) -> None:
        """Free the device buffers and the stream; idempotent, and the session cannot run afterwards."""
        buffers, stream = getattr(self, "_buffers", {}), getattr(self, "_stream", None)
        self._closed, self._buffers, self._stream = True, {}, None
        self._context = None  # before the memory it points into goes
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for pointer, _ in buffers.values():
            try:
                cudart.cudaFree(pointer)
            except Exception as exc:  # best effort: the process may be shutting down
                log.debug("cudaFree failed: %s", exc)
        if stream is not None:
            try:
                cudart.cudaStreamDestroy(stream)
            except Exception as exc:
                log.debug("cudaStreamDestroy failed: %s", exc)

    def __enter__(self) -> TensorRTSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception as exc:  # never raise from a finaliser
            log.debug("closing %s failed: %s", getattr(self, "path", "a TensorRT session"), exc)
