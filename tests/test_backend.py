"""The ONNX Runtime backend: provider checks, missing packages, cards that lie about the graph."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import Trained
from edgedx.errors import MissingDependencyError, ModelError
from edgedx.runtime.backends import onnx_backend
from edgedx.runtime.backends.onnx_backend import OnnxSession, resolve_providers


def test_resolve_providers() -> None:
    assert resolve_providers("cpu", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert resolve_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])[0] == "CUDAExecutionProvider"
    with pytest.raises(ModelError, match="device 'cuda' needs CUDAExecutionProvider.*--device cpu"):
        resolve_providers("cuda", ["CPUExecutionProvider"])
    with pytest.raises(ModelError, match="unknown device 'gpu'"):
        resolve_providers("gpu", ["CPUExecutionProvider"])


def test_missing_onnxruntime_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'edgedx\[cpu\]'"):
        onnx_backend.import_onnxruntime()


def test_silent_cpu_fallback_is_refused(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu lists CUDA but may run on CPU: we check what the session really uses."""
    import onnxruntime as real

    class FallbackSession(real.InferenceSession):
        def __init__(self, path, sess_options=None, providers=None):
            super().__init__(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    fake = types.SimpleNamespace(
        get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
        SessionOptions=real.SessionOptions,
        InferenceSession=FallbackSession,
    )
    monkeypatch.setattr(onnx_backend, "import_onnxruntime", lambda: fake)
    with pytest.raises(ModelError, match="CUDAExecutionProvider was requested but ONNX Runtime is running CPUExecutionProvider"):
        OnnxSession(trained.onnx, device="cuda")


def test_card_that_does_not_match_the_graph_is_refused(trained: Trained, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from edgedx.card import ONNX_METADATA_KEY, ModelCard
    from edgedx.export.onnx_export import embed_metadata

    graph = onnx.load(str(trained.onnx))
    card = ModelCard.from_json({p.key: p.value for p in graph.metadata_props}[ONNX_METADATA_KEY])
    embed_metadata(graph, {ONNX_METADATA_KEY: card.replace(input_size=(64, 64)).to_json()})
    path = tmp_path / "lying card.onnx"
    onnx.save(graph, str(path))
    with pytest.raises(ModelError, match=r"does not match its card.*input_size \[64, 64\]"):
        OnnxSession(path)


def test_newer_card_schema_asks_for_upgrade(trained: Trained, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    import json

    from edgedx.card import ONNX_METADATA_KEY, SCHEMA_VERSION
    from edgedx.errors import CardError
    from edgedx.export.onnx_export import embed_metadata

    graph = onnx.load(str(trained.onnx))
    data = json.loads({p.key: p.value for p in graph.metadata_props}[ONNX_METADATA_KEY])
    data["schema_version"] = SCHEMA_VERSION + 1
    embed_metadata(graph, {ONNX_METADATA_KEY: json.dumps(data)})
    path = tmp_path / "future.onnx"
    onnx.save(graph, str(path))
    with pytest.raises(CardError, match="upgrade edgedx"):
        OnnxSession(path)


def test_not_an_onnx_file(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        OnnxSession(path)
    with pytest.raises(ModelError, match="model file not found"):
        OnnxSession(tmp_path / "missing.onnx")


@pytest.mark.gpu
def test_diagnose_on_cuda_matches_cpu(trained: Trained) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("no CUDAExecutionProvider: install 'edgedx[gpu]' on a machine with an NVIDIA GPU")
    from edgedx.runtime import load_model

    try:
        gpu = load_model(trained.onnx, device="cuda")
    except ModelError as exc:
        pytest.skip(f"CUDA provider listed but cannot start here: {exc}")
    cpu = load_model(trained.onnx, device="cpu")
    image = np.random.default_rng(0).integers(0, 256, (100, 130, 3), dtype=np.uint8)
    a, b = cpu.diagnose(image), gpu.diagnose(image)
    assert a.n_crops == b.n_crops
    np.testing.assert_allclose(list(a.probabilities.values()), list(b.probabilities.values()), atol=1e-3)


def test_gpu_providers_get_options_that_avoid_per_shape_tuning(tmp_path) -> None:
    from edgedx.runtime.backends.onnx_backend import provider_options

    got = provider_options(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], tmp_path / "m.onnx")
    trt, cuda, cpu = got
    assert cuda == ("CUDAExecutionProvider", {"cudnn_conv_algo_search": "HEURISTIC"})
    assert trt[0] == "TensorrtExecutionProvider" and trt[1]["trt_engine_cache_enable"] == "True"
    assert trt[1]["trt_engine_cache_path"] == str(tmp_path / ".ort-trt-cache")
    assert cpu == "CPUExecutionProvider"


def test_bench_says_no_gpu_rather_than_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgedx.runtime import bench
    from edgedx.runtime.backends import trt_backend

    monkeypatch.setattr(trt_backend, "current_gpu", lambda: (trt_backend.UNKNOWN, trt_backend.UNKNOWN))
    assert bench.gpu_description() == ("no GPU", None) and bench.environment({})["gpu"] == "no GPU"
    monkeypatch.setattr(trt_backend, "current_gpu", lambda: ("NVIDIA H100 80GB HBM3", "9.0"))
    assert bench.gpu_description() == ("NVIDIA H100 80GB HBM3", "9.0")


def test_every_backend_is_a_session(trained: Trained) -> None:
    """One protocol: the ONNX backend, the TensorRT backend's class and the PyTorch reference all offer what callers
    read (card, path, sha256, device, providers, precision, pads_batches, run, close); no caller probes with getattr."""
    import ast

    from edgedx.runtime.backends.session import Session, open_session

    fields = [n for n in Session.__annotations__] + ["run", "close"]
    assert fields == ["card", "path", "sha256", "device", "providers", "precision", "pads_batches", "selftest", "run", "close"]
    for module in ("onnx_backend.py", "trt_backend.py"):
        tree = ast.parse((Path(__file__).parents[1] / "runtime" / "backends" / module).read_text(encoding="utf-8"))
        cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name.endswith("Session") and n.name != "FallbackSession")
        assigned = {t.attr for n in ast.walk(cls) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Attribute)}
        methods = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
        assert set(fields) <= assigned | methods | {"card"}, (module, set(fields) - assigned - methods)
    # no getattr probes on sessions anywhere in the code
    for folder in ("runtime", "export", "training", "edgedx"):
        for py in (Path(__file__).parents[1] / folder).rglob("*.py"):
            text = py.read_text(encoding="utf-8")
            assert "getattr(model.session" not in text and "getattr(loaded.session" not in text, py
            assert "getattr(session," not in text and "getattr(inner," not in text, py
    model = Path(trained.onnx)
    session = open_session(model, "cpu")
    assert isinstance(session, Session) and session.path == model and session.precision == "fp32"
    assert session.providers[0] == "CPUExecutionProvider" and not session.pads_batches and len(session.sha256) == 64
    session.close()
