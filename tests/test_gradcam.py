"""Grad-CAM: localisation on a model whose answer is known, timm's default path, and side effects."""

from __future__ import annotations

import math

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")

import timm  # noqa: E402
from torch import nn  # noqa: E402

from edgedx.card import CropPolicy, ModelCard, Provenance  # noqa: E402
from edgedx.runtime.io.image_io import read_image  # noqa: E402
from edgedx.runtime.preprocess import preprocess_batch, resize_to  # noqa: E402
from edgedx.training import gradcam as gradcam_module  # noqa: E402
from edgedx.training.gradcam import DISPLAY_MIN_SIDE, gradcam, overlay_cam, save_gradcam_examples  # noqa: E402

SIZE = 64
RED, BLUE = 1, 0  # class indices of the hand-built model


class ColourNet(nn.Module):
    """Class 1 logit = mean 'redness', class 0 logit = mean 'blueness'; grey scores 0 on both.

    A 4x4 stride-4 conv gives a 16x16 feature map, so the CAM is upsampled 4x.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, kernel_size=4, stride=4, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[BLUE] = torch.tensor([-0.5, -0.5, 1.0])[:, None, None] / 16
            self.conv.weight[RED] = torch.tensor([1.0, -0.5, -0.5])[:, None, None] / 16
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(2))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(self.conv(x))).flatten(1))


class SplitColourNet(ColourNet):
    """ColourNet with timm's forward_features/forward_head split, so no layer= is needed."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.relu(x)).flatten(1))


def image_with(squares: list[tuple[tuple[float, float, float], slice, slice]]) -> np.ndarray:
    """(3, H, W) grey image in [0, 1] with coloured squares; the 'preprocessed' input of ColourNet."""
    img = np.full((3, SIZE, SIZE), 0.5, np.float32)
    for colour, rows, cols in squares:
        img[:, rows, cols] = np.asarray(colour, np.float32)[:, None, None]
    return img


def square_mask(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((SIZE, SIZE), bool)
    mask[rows, cols] = True
    return mask


def assert_peaks_in(cam: np.ndarray, mask: np.ndarray) -> None:
    peak = np.unravel_index(int(np.argmax(cam)), cam.shape)
    assert mask[peak], f"CAM peaks at {peak}, outside the square"
    assert cam[mask].mean() > cam[~mask].mean() + 0.5


# red square top-left (large), blue square bottom-right (small) and the converse
RED_BIG = (slice(0, 24), slice(0, 24))
BLUE_SMALL = (slice(48, 64), slice(48, 64))
RED_SMALL = (slice(0, 16), slice(0, 16))
BLUE_BIG = (slice(40, 64), slice(40, 64))


def two_image_batch() -> torch.Tensor:
    a = image_with([((1, 0, 0), *RED_BIG), ((0, 0, 1), *BLUE_SMALL)])  # predicted: red
    b = image_with([((1, 0, 0), *RED_SMALL), ((0, 0, 1), *BLUE_BIG)])  # predicted: blue
    return torch.from_numpy(np.stack([a, b]))


def make_card(**changes: object) -> ModelCard:
    card = ModelCard(
        arch="resnet18",
        task="binary",
        class_names=("neg", "pos"),
        positive_class="pos",
        threshold=0.5,
        input_size=(SIZE, SIZE),
        crop=CropPolicy((SIZE, SIZE), (32, 32)),
        provenance=Provenance(edgedx_version="0", created_at="2026-01-01T00:00:00+00:00"),
    )
    return card.replace(**changes) if changes else card


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=2)


def test_red_square_is_localised() -> None:
    model = ColourNet()
    x = torch.from_numpy(image_with([((1, 0, 0), *RED_BIG)])[None])
    cam = gradcam(model, x, RED, layer=model.conv)
    assert cam.shape == (1, SIZE, SIZE) and cam.dtype == np.float32
    assert cam.max() == pytest.approx(1.0)
    assert_peaks_in(cam[0], square_mask(*RED_BIG))
    # no blue anywhere: the blue class's map has no positive evidence and stays all zeros (no 0/0)
    blue = gradcam(model, x, BLUE, layer=model.conv)
    assert np.all(blue == 0.0)


def test_class_index_none_int_and_per_sample() -> None:
    model = ColourNet()
    x = two_image_batch()
    red = [square_mask(*RED_BIG), square_mask(*RED_SMALL)]
    blue = [square_mask(*BLUE_SMALL), square_mask(*BLUE_BIG)]
    assert model(x).argmax(1).tolist() == [RED, BLUE]

    predicted = gradcam(model, x, None, layer=model.conv)
    assert_peaks_in(predicted[0], red[0])
    assert_peaks_in(predicted[1], blue[1])

    all_red = gradcam(model, x, RED, layer=model.conv)
    for i in range(2):
        assert_peaks_in(all_red[i], red[i])
        assert all_red[i][blue[i]].max() < 0.05

    per_sample = gradcam(model, x, [BLUE, RED], layer=model.conv)
    assert_peaks_in(per_sample[0], blue[0])
    assert_peaks_in(per_sample[1], red[1])
    assert not red[0][np.unravel_index(int(np.argmax(per_sample[0])), (SIZE, SIZE))]

    with pytest.raises(ValueError, match="one per image"):
        gradcam(model, x, [RED], layer=model.conv)
    with pytest.raises(ValueError, match="out of range"):
        gradcam(model, x, 2, layer=model.conv)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenetv3_small_050", "tf_efficientnet_lite0"])
def test_timm_default_path(arch: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=2)
    x = torch.randn(2, 3, SIZE, SIZE)
    cam = gradcam(model, x)
    assert cam.shape == (2, SIZE, SIZE) and cam.dtype == np.float32
    assert np.isfinite(cam).all()
    assert cam.min() >= 0.0 and cam.max() <= 1.0
    assert cam.max() > 0.0  # random weights still give some positive evidence somewhere


def test_default_path_matches_hook_on_last_stage(resnet: nn.Module) -> None:
    """forward_features ends at layer4 in resnet, so both ways must agree."""
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(gradcam(resnet, x, [0, 1]), gradcam(resnet, x, [0, 1], layer=resnet.layer4), atol=1e-5)


def test_modes_grads_and_flags_restored(resnet: nn.Module) -> None:
    resnet.train()
    resnet.bn1.eval()  # a frozen batch norm must stay in eval, the rest in train
    flags = {n: p.requires_grad for n, p in resnet.named_parameters()}
    running_mean = resnet.bn1.running_mean.clone(), resnet.layer4[1].bn2.running_mean.clone()
    x = torch.randn(2, 3, SIZE, SIZE)

    gradcam(resnet, x)
    gradcam(resnet, x, 1, layer=resnet.layer3)

    assert resnet.training and not resnet.bn1.training and resnet.layer4[1].bn2.training
    assert all(p.grad is None for p in resnet.parameters())
    assert {n: p.requires_grad for n, p in resnet.named_parameters()} == flags
    # eval mode for the call: batch-norm statistics were not updated by it
    assert torch.equal(resnet.bn1.running_mean, running_mean[0])
    assert torch.equal(resnet.layer4[1].bn2.running_mean, running_mean[1])


def test_frozen_parameters(resnet: nn.Module) -> None:
    resnet.requires_grad_(False)
    try:
        resnet.train()
        cam = gradcam(resnet, torch.randn(1, 3, SIZE, SIZE))
        assert cam.max() > 0.0
        assert resnet.training
        assert all(not p.requires_grad and p.grad is None for p in resnet.parameters())
    finally:
        resnet.requires_grad_(True)

    colour = ColourNet().requires_grad_(False)
    x = torch.from_numpy(image_with([((1, 0, 0), *RED_BIG)])[None])
    with torch.inference_mode():  # also when the caller is in inference mode
        cam = gradcam(colour, x, RED, layer=colour.conv)
    assert_peaks_in(cam[0], square_mask(*RED_BIG))
    assert all(not p.requires_grad and p.grad is None for p in colour.parameters())


def test_non_timm_model_without_layer_is_refused() -> None:
    with pytest.raises(TypeError, match="layer="):
        gradcam(ColourNet(), torch.zeros(1, 3, SIZE, SIZE))


def test_overlay_cam_any_image_size() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (511, 237, 3), dtype=np.uint8)
    cam = rng.random((SIZE, SIZE)).astype(np.float32)
    out = overlay_cam(image, cam)
    assert out.shape == (511, 237, 3) and out.dtype == np.uint8
    assert np.array_equal(overlay_cam(image, cam, alpha=0.0), image)
    # JET's top is red in RGB order (BGR converted), its bottom blue
    hot = overlay_cam(np.zeros((237, 511, 3), np.uint8), np.ones((8, 8)), alpha=1.0)
    cold = overlay_cam(np.zeros((237, 511, 3), np.uint8), np.zeros((8, 8)), alpha=1.0)
    assert hot.shape == (237, 511, 3)
    assert hot[..., 0].mean() > hot[..., 2].mean() and cold[..., 2].mean() > cold[..., 0].mean()


def square_photo(shape: tuple[int, int], colour: tuple[int, int, int]) -> np.ndarray:
    """Grey RGB uint8 'photo' with a coloured square in the top-left corner."""
    img = np.full((*shape, 3), 128, np.uint8)
    img[: shape[0] // 3, : shape[1] // 3] = colour
    return img


def test_save_gradcam_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []
    real = gradcam_module.gradcam

    def spy(model: nn.Module, x: torch.Tensor, class_index: object = None, **kw: object) -> np.ndarray:
        seen.append(class_index)
        return real(model, x, class_index, **kw)

    monkeypatch.setattr(gradcam_module, "gradcam", spy)
    model = SplitColourNet()  # through the default forward_features/forward_head path
    images = [square_photo((80, 100), (255, 0, 0)), square_photo((40, 64), (0, 0, 255)), square_photo((64, 64), (255, 0, 0))]
    folder = tmp_path / "grad cam out"

    # the model's own predictions after the card's preprocessing: red -> 1, blue -> 0
    multi = make_card(task="multiclass", class_names=("a", "b"), positive_class=None, threshold=None)
    resized = np.stack([resize_to(img, SIZE, SIZE, multi.interpolation) for img in images])
    with torch.no_grad():
        predicted = model(torch.from_numpy(preprocess_batch(resized, multi))).argmax(1).tolist()
    assert predicted == [RED, BLUE, RED]

    # binary card whose positive class is the blue one (index 0): the map is for it even where "neg" is predicted
    binary = make_card(class_names=("pos", "neg"))
    paths = save_gradcam_examples(
        model, images, binary, folder, names=["a 1", "b", "c"], labels=["neg", "pos", "neg"], max_images=2
    )
    assert paths == [folder / "a 1.gradcam.png", folder / "b.gradcam.png"]
    assert seen == [[0, 0]]
    for path in paths:
        written = read_image(path)
        shown = SIZE * math.ceil(DISPLAY_MIN_SIDE / SIZE)  # small inputs are enlarged to be legible
        assert written.shape[1] == 2 * shown and written.shape[0] > shown  # side by side, caption on top

    seen.clear()
    paths = save_gradcam_examples(model, images, multi, folder, names=["x", "y", "z"])
    assert paths == [folder / f"{n}.gradcam.png" for n in "xyz"] and all(p.is_file() for p in paths)
    assert seen == [predicted]  # multiclass: each image's predicted class

    with pytest.raises(ValueError, match="distinct"):
        save_gradcam_examples(model, images, binary, folder, names=["same", "same", "other"])
    with pytest.raises(ValueError, match="plain file name"):
        save_gradcam_examples(model, images, binary, folder, names=["sub/x", "y", "z"])
    assert save_gradcam_examples(model, images, binary, folder, names=["x", "y", "z"], max_images=0) == []


def test_captions_say_where_the_decision_was_taken() -> None:
    """A caption with p = 0.48 and "melanoma" must show the threshold that made it melanoma."""
    card = make_card(threshold=0.31)
    assert gradcam_module._decision_caption(np.array([0.52, 0.48]), 1, card) == "p(pos) 0.480 >= 0.310 -> pos"
    assert gradcam_module._decision_caption(np.array([0.8, 0.2]), 0, card) == "p(pos) 0.200 < 0.310 -> neg"
    multi = make_card(task="multiclass", class_names=("a", "b", "c"), positive_class=None, threshold=None)
    assert gradcam_module._decision_caption(np.array([0.2, 0.5, 0.3]), 1, multi) == "pred b 0.50 (argmax)"
