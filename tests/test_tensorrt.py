"""TensorRT engines: the sidecar, the version/GPU guard, the run loop, and a real build where a GPU is present.

Everything above the ``trt`` marker runs without TensorRT or a GPU: the run loop
is exercised against small stand-ins for ``tensorrt`` and cuda-python's runtime
that keep "device memory" in host buffers, so pointer handling, chunking and
buffer reuse are checked for real.
"""

from __future__ import annotations

import ast
import ctypes
import importlib
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import Trained
from edgedx.card import CropPolicy, ModelCard, Provenance, sidecar_path
from edgedx.errors import CardError, EdgeDxError, InputError, MissingDependencyError, ModelError
from edgedx.runtime.backends import trt_backend
from edgedx.runtime.backends.trt_backend import TensorRTSession, check_engine_compatible, read_sidecar, write_sidecar

REBUILD = "rebuild it here with edgedx export CHECKPOINT --out DIR --engine"
BUILT = {
    "version": "10.3.0.26",
    "gpu": "NVIDIA A100-SXM4-40GB",
    "compute_capability": "8.0",
    "precision": "fp32",
    "onnx_sha256": "ab" * 32,
    "batch": [1, 8, 32],
    "workspace_gib": 2.0,
}


def make_card(size: int = 8, **changes: Any) -> ModelCard:
    fields: dict[str, Any] = {
        "arch": "x",
        "task": "binary",
        "class_names": ("uninfected", "parasitized"),
        "positive_class": "parasitized",
        "input_size": (size, size),
        "crop": CropPolicy(tile_size=(size, size), stride=(size, size)),
        "provenance": Provenance(edgedx_version="0", created_at="2026-01-01T00:00:00+00:00"),
        **changes,
    }
    return ModelCard(**fields)


def export_tensorrt_module() -> Any:
    """edgedx.export.tensorrt; the export package itself needs the export extra."""
    for name in ("torch", "timm", "onnx", "onnxscript"):
        pytest.importorskip(name)
    return importlib.import_module("edgedx.export.tensorrt")


# -- the compatibility guard ------------------------------------------------------------


def test_same_tensorrt_minor_and_gpu_architecture_pass() -> None:
    check_engine_compatible(BUILT, "10.3.1.5", "NVIDIA A100-SXM4-80GB", "8.0", Path("m.engine"))


def test_other_tensorrt_minor_names_both_versions_and_the_rebuild() -> None:
    with pytest.raises(ModelError) as info:
        check_engine_compatible(BUILT, "10.8.0.43", "NVIDIA A100-SXM4-40GB", "8.0", Path("m.engine"))
    message = str(info.value)
    assert "engine built with TensorRT 10.3.0.26 on NVIDIA A100-SXM4-40GB (sm 8.0)" in message
    assert "this machine has TensorRT 10.8.0.43" in message
    assert REBUILD in message and message.startswith("m.engine")


def test_other_tensorrt_major_fails() -> None:
    with pytest.raises(ModelError, match=r"TensorRT 10\.3\.0\.26 .*TensorRT 11\.0\.0"):
        check_engine_compatible(BUILT, "11.0.0", "NVIDIA A100-SXM4-40GB", "8.0", "m.engine")


def test_other_gpu_architecture_names_both_gpus() -> None:
    with pytest.raises(ModelError) as info:
        check_engine_compatible(BUILT, "10.3.0.26", "NVIDIA H100 80GB HBM3", "9.0", "m.engine")
    message = str(info.value)
    assert "NVIDIA A100-SXM4-40GB (sm 8.0)" in message and "NVIDIA H100 80GB HBM3 (sm 9.0)" in message
    assert REBUILD in message


def test_unknown_compute_capability_is_left_to_tensorrt() -> None:
    check_engine_compatible(BUILT, "10.3.0.26", "unknown", "unknown", "m.engine")
    check_engine_compatible({**BUILT, "compute_capability": "unknown"}, "10.3.0.26", "NVIDIA H100", "9.0", "m.engine")


# -- the sidecar --------------------------------------------------------------------------


def test_missing_sidecar_says_rebuild_with_engine(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(ModelError, match=r"model\.engine\.card\.json is missing.*edgedx export CHECKPOINT --out DIR --engine"):
        read_sidecar(engine)


def test_malformed_sidecar_json(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    sidecar_path(engine).write_text("{not json", encoding="utf-8")
    with pytest.raises(CardError, match=r"not valid JSON.*--engine"):
        read_sidecar(engine)


def test_plain_card_is_not_a_sidecar(tmp_path: Path) -> None:
    """A bare card (``card.save``) lacks the build record the runtime checks."""
    engine = tmp_path / "model.engine"
    make_card().save(sidecar_path(engine))
    with pytest.raises(CardError, match=r"'card' and 'tensorrt' blocks.*--engine"):
        read_sidecar(engine)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"compute_capability": None}, "tensorrt.compute_capability' must be a non-empty string"),
        ({"batch": [8, 1, 32]}, "tensorrt.batch' must be [min, opt, max]"),
        ({"batch": [1, 8]}, "tensorrt.batch' must be [min, opt, max]"),
    ],
)
def test_bad_build_record_is_named(tmp_path: Path, change: dict[str, Any], fragment: str) -> None:
    engine = tmp_path / "model.engine"
    sidecar_path(engine).write_text(json.dumps({"card": make_card().to_dict(), "tensorrt": {**BUILT, **change}}))
    with pytest.raises(CardError) as info:
        read_sidecar(engine)
    assert fragment in str(info.value)


def test_build_record_missing_field_is_named(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    build = {k: v for k, v in BUILT.items() if k != "version"}
    sidecar_path(engine).write_text(json.dumps({"card": make_card().to_dict(), "tensorrt": build}))
    with pytest.raises(CardError, match="missing field 'version'"):
        read_sidecar(engine)


def test_bad_card_in_sidecar_names_file_and_field(tmp_path: Path) -> None:
    engine = tmp_path / "model.engine"
    card = make_card().to_dict()
    del card["task"]
    sidecar_path(engine).write_text(json.dumps({"card": card, "tensorrt": BUILT}))
    with pytest.raises(CardError, match=r"model\.engine\.card\.json: model card is missing field 'task'"):
        read_sidecar(engine)


def test_sidecar_round_trips_a_real_card(tmp_path: Path) -> None:
    engine = tmp_path / "sub dir" / "model.engine"
    card = make_card(threshold=0.3, input_format="uint8_nhwc", metrics={"auc": 0.9})
    written = write_sidecar(engine, card, BUILT)
    assert written == sidecar_path(engine) == tmp_path / "sub dir" / "model.engine.card.json"
    layout = json.loads(written.read_text(encoding="utf-8"))
    assert set(layout) == {"card", "tensorrt"}
    assert layout["tensorrt"]["batch"] == [1, 8, 32] and layout["tensorrt"]["built_at"]
    loaded, build = read_sidecar(engine)
    assert loaded == card
    assert {k: build[k] for k in BUILT} == BUILT
    assert not list(written.parent.glob(".*.tmp"))  # the atomic write left nothing behind


# -- missing packages -----------------------------------------------------------------------


def test_session_without_tensorrt_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"Running a TensorRT engine needs the 'tensorrt'.*pip install 'edgedx\[trt\]'"):
        TensorRTSession(tmp_path / "model.engine")


def test_session_without_cuda_python_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda purpose: types.SimpleNamespace(__version__="10.8.0"))
    for name in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(MissingDependencyError, match=r"'cuda-python'.*pip install 'edgedx\[trt\]'"):
        TensorRTSession(tmp_path / "model.engine")


def test_cpu_device_is_refused_with_the_onnx_alternative(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="only on an NVIDIA GPU.*--device cpu"):
        TensorRTSession(tmp_path / "model.engine", device="cpu")


def test_onnx_to_engine_without_tensorrt_names_the_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    module = export_tensorrt_module()
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"Building a TensorRT engine needs the 'tensorrt'.*pip install 'edgedx\[trt\]'"):
        module.onnx_to_engine(tmp_path / "m.onnx", tmp_path / "m.engine", make_card(), precision="fp32", onnx_sha256="0")


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"precision": "fp8"}, "unknown engine precision 'fp8'"),
        ({"min_batch": 4, "opt_batch": 2}, "1 <= min <= opt <= max"),
        ({"max_batch": 0}, "1 <= min <= opt <= max"),
        ({"workspace_gib": 0}, "more than 0 GiB"),
    ],
)
def test_onnx_to_engine_refuses_bad_options_before_tensorrt(tmp_path: Path, options: dict[str, Any], fragment: str) -> None:
    module = export_tensorrt_module()
    kwargs: dict[str, Any] = {"precision": "fp32", "onnx_sha256": "0", **options}
    with pytest.raises(InputError) as info:
        module.onnx_to_engine(tmp_path / "m.onnx", tmp_path / "m.engine", make_card(), **kwargs)
    assert fragment in str(info.value)


def test_runtime_imports_nothing_heavy() -> None:
    """The engine runtime is torch-free and onnx-free, and TensorRT loads only when a session opens."""
    probe = "import sys, edgedx.runtime.backends.trt_backend; print([m for m in ('torch', 'onnx', 'tensorrt') if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"


def test_build_module_imports_tensorrt_only_inside_functions() -> None:
    """edgedx.export.tensorrt has no module-level torch or tensorrt import (the export package may import torch)."""
    tree = ast.parse((Path(__file__).resolve().parents[1] / "export" / "tensorrt.py").read_text(encoding="utf-8"))
    top = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
    top += [n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)]
    assert not [m for m in top if m.split(".")[0] in ("torch", "tensorrt", "onnx")]


# -- the run loop against stand-ins -----------------------------------------------------------


class FakeCudart:
    """cuda-python's runtime API shape: (err, *values) tuples; "device" memory is host memory."""

    def __init__(self) -> None:
        self.cudaError_t = types.SimpleNamespace(cudaSuccess=0, cudaErrorMemoryAllocation=2)
        self.cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2)
        self.live: dict[int, Any] = {}
        self.mallocs = 0
        self.fail_malloc = False
        self.streams: set[int] = set()

    def cudaGetDevice(self) -> tuple[int, int]:
        return 0, 0

    def cudaGetDeviceProperties(self, device: int) -> tuple[int, Any]:
        return 0, types.SimpleNamespace(name=b"Fake GPU 80GB\0\0", major=9, minor=0)

    def cudaGetErrorString(self, err: int) -> tuple[int, bytes]:
        return 0, b"out of memory"

    def cudaMalloc(self, size: int) -> tuple[int, int | None]:
        if self.fail_malloc:
            return self.cudaError_t.cudaErrorMemoryAllocation, None
        buf = ctypes.create_string_buffer(size)
        self.live[ctypes.addressof(buf)] = buf
        self.mallocs += 1
        return 0, ctypes.addressof(buf)

    def cudaFree(self, pointer: int) -> tuple[int]:
        del self.live[pointer]
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: int, stream: Any) -> tuple[int]:
        assert stream in self.streams
        ctypes.memmove(dst, src, count)
        return (0,)

    def cudaStreamCreate(self) -> tuple[int, int]:
        self.streams.add(77)
        return 0, 77

    def cudaStreamSynchronize(self, stream: Any) -> tuple[int]:
        return (0,)

    def cudaStreamDestroy(self, stream: Any) -> tuple[int]:
        self.streams.discard(stream)
        return (0,)


def reference_logits(x: np.ndarray, n_classes: int = 2) -> np.ndarray:
    """What the fake engine computes: per-class mean of one channel plus the class index."""
    return np.stack([x[:, c % x.shape[1]].mean(axis=(1, 2)) + c for c in range(n_classes)], axis=1).astype(np.float32)


def fake_tensorrt(size: int, *, min_batch: int = 1, max_batch: int = 4, version: str = "10.8.0.43") -> Any:
    """The slice of the tensorrt API the session uses, computing :func:`reference_logits` from raw pointers."""

    class ILogger:
        Severity = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)

        def __init__(self) -> None:
            pass

    trt = types.SimpleNamespace(
        __version__=version,
        ILogger=ILogger,
        TensorIOMode=types.SimpleNamespace(INPUT="input", OUTPUT="output"),
        DataType=types.SimpleNamespace(FLOAT="float", HALF="half", UINT8="uint8", INT8="int8", INT32="int32"),
        batches=[],
    )
    item = (3, size, size)

    class Context:
        def __init__(self) -> None:
            self.shape: tuple[int, ...] = ()
            self.addresses: dict[str, int] = {}

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            assert name == "input"
            self.shape = tuple(shape)
            return min_batch <= shape[0] <= max_batch and tuple(shape[1:]) == item

        def get_tensor_shape(self, name: str) -> list[int]:
            return list(self.shape) if name == "input" else [self.shape[0], 2]

        def set_tensor_address(self, name: str, pointer: int) -> bool:
            self.addresses[name] = pointer
            return True

        def execute_async_v3(self, stream_handle: int) -> bool:
            assert isinstance(stream_handle, int)
            count = int(np.prod(self.shape))
            x = np.ctypeslib.as_array((ctypes.c_float * count).from_address(self.addresses["input"])).reshape(self.shape)
            out = np.ctypeslib.as_array((ctypes.c_float * (self.shape[0] * 2)).from_address(self.addresses["logits"]))
            out[:] = reference_logits(x).ravel()
            trt.batches.append(self.shape[0])
            return True

    class Engine:
        num_io_tensors = 2

        def get_tensor_name(self, index: int) -> str:
            return ("input", "logits")[index]

        def get_tensor_mode(self, name: str) -> str:
            return "input" if name == "input" else "output"

        def get_tensor_dtype(self, name: str) -> str:
            return "float"

        def get_tensor_shape(self, name: str) -> list[int]:
            return [-1, *item] if name == "input" else [-1, 2]

        def get_tensor_profile_shape(self, name: str, profile: int) -> tuple[list[int], ...]:
            return [min_batch, *item], [max_batch, *item], [max_batch, *item]

        def create_execution_context(self) -> Context:
            return Context()

    class Runtime:
        def __init__(self, logger: Any) -> None:
            assert isinstance(logger, ILogger)

        def deserialize_cuda_engine(self, plan: bytes) -> Engine | None:
            return Engine() if plan == b"plan" else None

    trt.Runtime = Runtime
    return trt


@pytest.fixture
def fake_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """An engine file with its sidecar, and the stand-ins wired into the runtime module."""
    cudart = FakeCudart()
    state = types.SimpleNamespace(cudart=cudart, trt=fake_tensorrt(8), engine=tmp_path / "model.engine")
    state.engine.write_bytes(b"plan")
    write_sidecar(state.engine, make_card(8), {**BUILT, "version": "10.8.0.43", "gpu": "Fake GPU 80GB", "compute_capability": "9.0"})
    monkeypatch.setattr(trt_backend, "import_tensorrt", lambda purpose: state.trt)
    monkeypatch.setattr(trt_backend, "import_cudart", lambda purpose: cudart)
    return state


def test_run_chunks_by_profile_max_and_reuses_buffers(fake_gpu: Any) -> None:
    session = TensorRTSession(fake_gpu.engine)
    assert session.providers == ("TensorRT 10.8.0.43 on Fake GPU 80GB (sm 9.0)",) and session.precision == "fp32" and session.pads_batches
    assert session.input_name == "input" and session.card == make_card(8)
    x = np.random.default_rng(0).normal(size=(10, 3, 8, 8)).astype(np.float32)
    out = session.run(x)
    assert out.dtype == np.float32 and out.shape == (10, 2)
    np.testing.assert_allclose(out, reference_logits(x), rtol=1e-6)
    assert fake_gpu.trt.batches == [4, 4, 2]
    assert fake_gpu.cudart.mallocs == 2  # one input and one output buffer, sized by the first chunk
    np.testing.assert_allclose(session.run(x[:3].astype(np.float64)), reference_logits(x[:3]), rtol=1e-6)
    assert session.run(x[:0]).shape == (0, 2)
    session.close()
    assert not fake_gpu.cudart.live and not fake_gpu.cudart.streams
    session.close()  # idempotent
    with pytest.raises(ModelError, match="closed"):
        session.run(x)


def test_batches_below_the_profile_minimum_are_padded(fake_gpu: Any) -> None:
    fake_gpu.trt = fake_tensorrt(8, min_batch=3, max_batch=6)
    session = TensorRTSession(fake_gpu.engine)
    x = np.random.default_rng(1).normal(size=(8, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(session.run(x), reference_logits(x), rtol=1e-6)
    assert fake_gpu.trt.batches == [6, 3]  # the last 2 padded to 3, the padding dropped


def test_run_refuses_inputs_that_do_not_fit(fake_gpu: Any) -> None:
    session = TensorRTSession(fake_gpu.engine)
    with pytest.raises(ModelError, match=r"input of shape \[2, 8, 8, 3\] does not fit"):
        session.run(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ModelError, match="takes float32 input, got uint8"):
        session.run(np.zeros((2, 3, 8, 8), np.uint8))


def test_cuda_errors_become_model_errors(fake_gpu: Any) -> None:
    session = TensorRTSession(fake_gpu.engine)
    fake_gpu.cudart.fail_malloc = True
    with pytest.raises(ModelError, match=r"CUDA error while allocating .*\(out of memory\)"):
        session.run(np.zeros((2, 3, 8, 8), np.float32))


def test_stale_engine_is_refused_before_deserialising(fake_gpu: Any) -> None:
    fake_gpu.trt = fake_tensorrt(8, version="10.9.0.1")
    with pytest.raises(ModelError, match=r"TensorRT 10\.8\.0\.43 on Fake GPU 80GB \(sm 9\.0\); this machine has TensorRT 10\.9\.0\.1") as info:
        TensorRTSession(fake_gpu.engine)
    assert REBUILD in str(info.value)


def test_undeserialisable_engine_says_rebuild(fake_gpu: Any) -> None:
    fake_gpu.engine.write_bytes(b"not a plan")
    with pytest.raises(ModelError, match=f"could not deserialise this engine.*{REBUILD}"):
        TensorRTSession(fake_gpu.engine)


def test_card_that_does_not_match_the_engine_is_refused(fake_gpu: Any) -> None:
    write_sidecar(fake_gpu.engine, make_card(16), {**BUILT, "version": "10.8.0.43", "compute_capability": "9.0"})
    with pytest.raises(ModelError, match=r"does not match its card .*input_size \[16, 16\]"):
        TensorRTSession(fake_gpu.engine)


def test_errors_are_edgedx_errors() -> None:
    assert issubclass(ModelError, EdgeDxError) and issubclass(CardError, EdgeDxError)


# -- real TensorRT on a real GPU ---------------------------------------------------------------


def _no_trt_reason() -> str | None:
    """Why the real-engine tests cannot run here (checked at collection, before the session model trains)."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed: pip install 'edgedx[trt]' on a machine with an NVIDIA GPU"
    if importlib.util.find_spec("cuda") is None:
        return "cuda-python is not installed: pip install cuda-python"
    if trt_backend.current_gpu()[0] == "unknown":
        return "no CUDA GPU visible (neither cuda-python nor nvidia-smi found one)"
    return None


NO_TRT = _no_trt_reason()
needs_trt = pytest.mark.skipif(NO_TRT is not None, reason=NO_TRT or "")


@pytest.fixture(scope="module")
def built_engine(trained: Trained, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The session model's fp32 ONNX built into an engine once for the real tests."""
    module = export_tensorrt_module()
    from edgedx.runtime.backends.onnx_backend import OnnxSession

    card = OnnxSession(trained.onnx).card
    out = tmp_path_factory.mktemp("trt engine")
    sha = "0" * 64
    info = module.onnx_to_engine(
        trained.onnx, out / "model.engine", card, precision="fp32", onnx_sha256=sha, min_batch=1, opt_batch=4, max_batch=4
    )
    return types.SimpleNamespace(info=info, card=card, sha=sha, gpu=trt_backend.current_gpu())


@pytest.mark.trt
@needs_trt
def test_real_engine_matches_onnx_runtime(built_engine: Any, trained: Trained) -> None:
    from edgedx.runtime.backends.onnx_backend import OnnxSession
    from edgedx.runtime.preprocess import preprocess_batch

    card = built_engine.card
    crops = np.random.default_rng(0).integers(0, 256, size=(5, *card.input_size, 3), dtype=np.uint8)
    x = preprocess_batch(crops, card)
    with TensorRTSession(built_engine.info.engine_path) as session:
        assert session.card == card
        got = session.run(x)  # 5 > max batch 4: two chunks
    want = OnnxSession(trained.onnx).run(x)
    assert got.shape == want.shape == (5, card.n_classes)
    assert float(np.max(np.abs(got - want))) < 1e-2


@pytest.mark.trt
@needs_trt
def test_real_sidecar_records_the_build(built_engine: Any) -> None:
    info = built_engine.info
    card, build = read_sidecar(info.engine_path)
    assert card == built_engine.card
    assert (build["gpu"], build["compute_capability"]) == built_engine.gpu
    assert build["precision"] == "fp32" and build["onnx_sha256"] == built_engine.sha
    assert build["batch"] == [1, 4, 4]
    assert build["version"] == info.tensorrt_version
    assert info.bytes == info.engine_path.stat().st_size > 0
    assert info.to_dict()["sidecar_path"] == str(sidecar_path(info.engine_path))
    assert (info.engine_path.parent / "tensorrt.timing.cache").is_file()


@pytest.mark.trt
@needs_trt
def test_real_engine_from_another_tensorrt_is_refused(built_engine: Any, tmp_path: Path) -> None:
    engine = tmp_path / "copy.engine"
    engine.write_bytes(built_engine.info.engine_path.read_bytes())
    card, build = read_sidecar(built_engine.info.engine_path)
    write_sidecar(engine, card, {**build, "version": "1.0.0"})
    with pytest.raises(ModelError, match=f"engine built with TensorRT 1.0.0 .*{REBUILD}"):
        TensorRTSession(engine)


def test_load_model_sends_engine_files_to_tensorrt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from edgedx.runtime import load_model

    engine = tmp_path / "model.fp16.engine"
    engine.write_bytes(b"plan")
    with pytest.raises(ModelError, match="use the .onnx model for --device cpu"):
        load_model(engine, device="cpu")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match=r"Running a TensorRT engine.*pip install 'edgedx\[trt\]'"):
        load_model(engine, device="tensorrt")
