"""Quantisation-aware fine-tuning: a plain checkpoint beside the original, weights on the int8 grid while it trains."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from torch import nn  # noqa: E402
from torch.nn.utils import parametrize  # noqa: E402

from edgedx.errors import InputError  # noqa: E402
from edgedx.progress import STEP_LOGGER  # noqa: E402
from edgedx.runtime.io.image_io import write_image  # noqa: E402
from edgedx.training.checkpoint import build_model, load_checkpoint  # noqa: E402
from edgedx.training.qat import (  # noqa: E402
    WEIGHT_STEPS, QatOptions, QatResult, fake_quantize_weight, insert_fake_quant, quantisation_aware_finetune,
)
from edgedx.training.train import TrainConfig, train  # noqa: E402

FAST = TrainConfig(
    arch="resnet10t", weights="none", input_size=16, batch_size=8, epochs=1, lr=3e-3, gradcam_samples=0, plots=False, positive_class="light"
)
QUICK = QatOptions(epochs=2, lr=1e-3, batch_size=8, device="cpu")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch resnet10t on 24 dark/light images: the run folder's model.pt (as test_training_loop's runs)."""
    root = tmp_path_factory.mktemp("qat")
    rng = np.random.default_rng(0)
    for cls, value in (("dark", 50), ("light", 200)):
        (root / "data" / cls).mkdir(parents=True)
        for i in range(12):
            write_image(root / "data" / cls / f"{i}.png", np.clip(rng.normal(value, 20, (19, 23, 3)), 0, 255).astype(np.uint8))
    return train(root / "data", root / "run", FAST).checkpoint


@pytest.fixture(scope="module")
def finetuned(run: Path) -> tuple[Path, str, QatResult]:
    """The run's checkpoint fine-tuned once (7-bit weights), with the original's sha256 taken before."""
    before = sha256(run)
    return run, before, quantisation_aware_finetune(run, dataclasses.replace(QUICK, weight_bits=7))


def test_the_qat_checkpoint_is_a_plain_checkpoint_of_the_same_network(finetuned: tuple[Path, str, QatResult]) -> None:
    original_path, original_sha, result = finetuned
    assert result.checkpoint == original_path.with_name("model.qat.pt") and result.checkpoint.is_file()
    original, qat = load_checkpoint(original_path), load_checkpoint(result.checkpoint)
    assert [(k, v.shape) for k, v in qat.state_dict.items()] == [(k, v.shape) for k, v in original.state_dict.items()]
    model = build_model(qat)  # strict load into a fresh network: no parametrization or quantiser keys left
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    convs = [k for k in original.state_dict if k.endswith("conv1.weight") or k == "fc.weight"]
    assert convs and all(not torch.equal(original.state_dict[k], qat.state_dict[k]) for k in convs)
    assert sha256(original_path) == original_sha  # the original is only read
    assert qat.card.arch == original.card.arch and qat.card.threshold == original.card.threshold
    assert "quantisation-aware fine-tuned from model.pt: 2 epochs" in qat.card.provenance.training["quantisation_aware"]
    assert "weights 7-bit per channel, activations uint8-asymmetric" in qat.card.provenance.training["quantisation_aware"]
    extra = qat.extra["qat"]
    assert extra["source_sha256"] == original_sha and extra["options"]["weight_bits"] == 7
    assert extra["val_metric_after"] == pytest.approx(result.val_metric_after)


def test_the_result_is_plain_json(finetuned: tuple[Path, str, QatResult]) -> None:
    result = finetuned[2]
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["epochs"] == 2 and data["metric"] == "balanced_accuracy" and data["checkpoint"].endswith("model.qat.pt")
    assert 0.0 <= data["val_metric_before"] <= 1.0 and 0.0 <= data["val_metric_after"] <= 1.0 and data["seconds"] > 0


def test_one_step_line_per_epoch(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = run.parent.with_name("run copy")
    shutil.copytree(run.parent, folder)  # beside the run: split.json's paths are relative to its folder
    steps = logging.getLogger(STEP_LOGGER)
    propagate = steps.propagate  # the CLI stops step lines propagating (earlier CLI tests leave it so): listen directly
    steps.propagate = False
    steps.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger=STEP_LOGGER):
            result = quantisation_aware_finetune(folder / "model.pt", dataclasses.replace(QUICK, epochs=1, activations="int8-symmetric"))
    finally:
        steps.removeHandler(caplog.handler)
        steps.propagate = propagate
    lines = [r.getMessage() for r in caplog.records if r.name == STEP_LOGGER]
    assert len(lines) == 1 and lines[0].startswith("quantisation-aware epoch 1/1: train loss")
    assert result.checkpoint == folder / "model.qat.pt"


def test_removing_fake_quant_gives_the_plain_model_back(run: Path) -> None:
    model = build_model(load_checkpoint(run))
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    x = torch.randn(4, 3, 16, 16)
    quant = insert_fake_quant(model, 8, "uint8-asymmetric")
    with torch.no_grad():
        model(x)  # observe ranges
        quant.observe(False)
        quantised = model(x)
    assert not torch.equal(quantised, reference(x))
    quant.remove()
    assert sorted(model.state_dict()) == sorted(keys)  # a parametrization's removal re-registers the weight after the bias
    assert not any(parametrize.is_parametrized(m) or m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("bits", [7, 8])
def test_weights_are_on_the_per_channel_grid_with_straight_through_gradients(bits: int) -> None:
    steps = WEIGHT_STEPS[bits]
    assert steps == {7: 64, 8: 127}[bits]  # ONNX Runtime: reduce_range ±64, symmetric int8 ±127
    weight = (torch.randn(6, 3, 3, 3) * torch.tensor([1.0, 0.1, 5.0, 1e-3, 2.0, 0.5]).view(6, 1, 1, 1)).requires_grad_()
    quantised = fake_quantize_weight(weight, bits)
    scale = weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / steps
    k = quantised.detach() / scale
    assert torch.allclose(k, k.round(), atol=1e-3)
    assert k.round().abs().max() <= steps and torch.all(k.round().abs().amax(dim=(1, 2, 3)) == steps)  # each channel's extreme is ±steps
    assert torch.all((quantised - weight).abs() <= scale / 2 + 1e-6)
    quantised.sum().backward()
    assert torch.equal(weight.grad, torch.ones_like(weight))


def test_a_layer_sees_its_weights_on_the_7_bit_grid_inside_the_forward() -> None:
    layer = nn.Conv2d(3, 4, 3)
    seen: list[torch.Tensor] = []
    layer.register_forward_hook(lambda module, args, out: seen.append(module.weight.detach().clone()))
    quant = insert_fake_quant(layer, 7, "int8-symmetric")
    layer(torch.randn(2, 3, 8, 8))
    scale = seen[0].abs().amax(dim=(1, 2, 3), keepdim=True) / 64
    assert torch.allclose(seen[0] / scale, (seen[0] / scale).round(), atol=1e-3) and (seen[0] / scale).round().abs().max() == 64
    assert quant.quantisers[0].zero_point.item() == 0  # int8-symmetric: zero point 0 (TensorRT)
    quant.remove()


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"epochs": 0}, "epochs must be at least 1, got 0"),
        ({"weight_bits": 6}, "weight_bits must be 8 or 7, got 6"),
        ({"activations": "int4"}, "unknown activations 'int4'"),
        ({"lr": 0.0}, "learning rate must be a positive number, got 0.0"),
        ({"batch_size": 1}, "batch size must be at least 2"),
        ({"device": "gpu"}, "unknown device 'gpu'"),
    ],
)
def test_bad_options_are_refused_naming_the_value(run: Path, changes: dict[str, object], named: str) -> None:
    with pytest.raises(InputError, match=named):
        quantisation_aware_finetune(run, dataclasses.replace(QUICK, **changes))


def test_a_checkpoint_outside_its_run_folder_is_refused(run: Path, tmp_path: Path) -> None:
    alone = tmp_path / "model.pt"
    shutil.copy(run, alone)
    with pytest.raises(InputError, match=r"not in its training run folder .*split\.json is missing"):
        quantisation_aware_finetune(alone, QUICK)
    assert not (tmp_path / "model.qat.pt").exists()


@pytest.mark.parametrize(("bits", "reduce_range"), [(7, True), (8, False)])
def test_the_weight_grid_is_onnx_runtimes(tmp_path: Path, bits: int, reduce_range: bool) -> None:
    """Bit for bit what ONNX Runtime's symmetric per-channel int8 quantiser (``reduce_range`` for 7 bits) makes of a weight."""
    onnx = pytest.importorskip("onnx")
    quantization = pytest.importorskip("onnxruntime.quantization")
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).normal(size=(6, 3, 3, 3)).astype(np.float32) * np.float32([1, 0.1, 5, 1e-3, 2, 0.5]).reshape(6, 1, 1, 1)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "conv.onnx")

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": np.ones((1, 3, 8, 8), np.float32)}])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantization.quantize_static(
        str(tmp_path / "conv.onnx"), str(tmp_path / "int8.onnx"), Reader(), quant_format=quantization.QuantFormat.QDQ, per_channel=True,
        activation_type=quantization.QuantType.QInt8, weight_type=quantization.QuantType.QInt8, reduce_range=reduce_range,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    initializers = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "int8.onnx").graph.initializer}
    (q,) = [v for v in initializers.values() if v.dtype == np.int8 and v.shape == weight.shape]
    (scale,) = [v for v in initializers.values() if v.dtype == np.float32 and v.shape == (6,)]
    assert np.abs(q).reshape(6, -1).max(axis=1).tolist() == [WEIGHT_STEPS[bits]] * 6
    ours = fake_quantize_weight(torch.from_numpy(weight), bits).numpy()
    np.testing.assert_array_equal(ours, q.astype(np.float32) * scale.reshape(6, 1, 1, 1))


def test_without_torch_the_import_names_the_extra_and_loads_no_onnxruntime() -> None:
    import subprocess
    import sys

    script = (
        "import sys\nsys.modules['torch'] = None\nfrom edgedx.errors import MissingDependencyError\n"
        "try:\n    import edgedx.training.qat\nexcept MissingDependencyError as exc:\n    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Quantisation-aware fine-tuning needs the 'torch' package" in done.stdout and "pip install 'edgedx[train]'" in done.stdout
    code = "import sys, edgedx.training.qat\nassert not {'onnxruntime', 'onnx'} & set(sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
