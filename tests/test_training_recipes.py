"""Imbalance weights (exact values), augmentation presets, transfer strategies."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from edgedx.errors import InputError  # noqa: E402
from edgedx.training.augment import PRESETS, augment  # noqa: E402
from edgedx.training.losses import TaskLoss, balanced_order, class_weights, loss_shares  # noqa: E402
from edgedx.training.strategy import (  # noqa: E402
    apply_strategy,
    backbone_stages,
    freeze_batchnorm_of_frozen,
    parameter_groups,
    parse_strategy,
)


def test_binary_weights_exact_and_balance_the_loss() -> None:
    y = np.array([0] * 90 + [1] * 10)
    w = class_weights(y, "binary", 2)
    np.testing.assert_allclose(w, [0.1, 0.9])  # w_neg = N_pos/N, w_pos = N_neg/N
    shares = loss_shares(y, "binary", ("neg", "pos"), w)
    assert shares["pos"]["before"] == pytest.approx(0.1) and shares["pos"]["after"] == pytest.approx(0.5)
    assert shares["neg"]["after"] == pytest.approx(0.5)


def test_multiclass_inverse_frequency_exact() -> None:
    y = np.array([0] * 60 + [1] * 30 + [2] * 10)
    w = class_weights(y, "multiclass", 3)
    np.testing.assert_allclose(w, [100 / 180, 100 / 90, 100 / 30])
    shares = loss_shares(y, "multiclass", ("a", "b", "c"), w)
    for name in "abc":
        assert shares[name]["after"] == pytest.approx(1 / 3)
    with pytest.raises(InputError, match="no training images"):
        class_weights(np.array([0, 0, 2]), "multiclass", 3)


def test_multilabel_weights_per_label_and_loss() -> None:
    y = np.zeros((10, 2), np.float32)
    y[:2, 0] = 1  # label 0: 2 positives of 10
    y[:5, 1] = 1  # label 1: 5 of 10
    w = class_weights(y, "multilabel", 2)
    np.testing.assert_allclose(w, [[0.2, 0.8], [0.5, 0.5]])
    shares = loss_shares(y, "multilabel", ("a", "b"), w)
    assert shares["a"]["positive_before"] == pytest.approx(0.2) and shares["a"]["positive_after"] == pytest.approx(0.5)

    loss = TaskLoss("multilabel", w)
    logits = torch.zeros(10, 2)
    expected = np.log(2) * (y * w[:, 1] + (1 - y) * w[:, 0]).sum(axis=1).mean()
    assert float(loss(logits, torch.from_numpy(y))) == pytest.approx(expected, rel=1e-6)


def test_weighted_cross_entropy_matches_torch() -> None:
    logits = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1, 0, 0, 1, 0, 0, 0])
    w = np.array([0.25, 0.75])
    ours = TaskLoss("binary", w)(logits, target)
    ref = torch.nn.functional.cross_entropy(logits, target, weight=torch.tensor([0.25, 0.75]))
    assert float(ours) == pytest.approx(float(ref))


def test_balanced_sampler_evens_out_classes() -> None:
    y = np.array([0] * 950 + [1] * 50)
    order = balanced_order(y, "binary", np.random.default_rng(0))
    assert len(order) == 1000
    assert 0.4 < y[order].mean() < 0.6


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_keep_shape_and_dtype_and_vary(preset: str) -> None:
    rng = np.random.default_rng(0)
    image = (np.random.default_rng(1).random((37, 37, 3)) * 255).astype(np.uint8)
    outs = [augment(image, preset, rng) for _ in range(8)]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    if preset == "none":
        assert all(o is image for o in outs)
    else:
        assert any(not np.array_equal(o, image) for o in outs)


def test_xray_never_flips_left_right() -> None:
    """A marker on the left of a chest film must stay on the left (laterality)."""
    image = np.full((64, 64, 3), 128, np.uint8)
    image[:, :8] = 255
    rng = np.random.default_rng(0)
    for _ in range(50):
        out = augment(image, "xray", rng).astype(float)
        assert out[:, :16].mean() > out[:, -16:].mean() + 15  # a flip would make the left the darker side


def test_oct_never_flips_upside_down() -> None:
    image = np.full((64, 64, 3), 60, np.uint8)
    image[:10] = 250  # bright top layer
    rng = np.random.default_rng(0)
    for _ in range(50):
        out = augment(image, "oct", rng).astype(float)
        assert out[:16].mean() > out[-16:].mean() + 40


def test_strategies_freeze_what_they_say() -> None:
    model = timm.create_model("resnet18", num_classes=2)
    assert str(parse_strategy("last:2")) == "last:2"
    with pytest.raises(InputError, match="unknown strategy"):
        parse_strategy("half")

    trainable = apply_strategy(model, parse_strategy("frozen"))
    assert trainable == {"fc.weight", "fc.bias"}
    assert all(p.requires_grad == (n in trainable) for n, p in model.named_parameters())

    trainable = apply_strategy(model, parse_strategy("last:1"))
    stages = backbone_stages(model)
    assert set(stages[-1]) <= trainable and not set(stages[-2]) & trainable
    assert all(n.startswith(("layer4", "fc")) for n in trainable)

    model.train()
    freeze_batchnorm_of_frozen(model, trainable)
    assert not model.bn1.training and model.layer4[0].bn1.training

    apply_strategy(model, parse_strategy("full"))
    groups = parameter_groups(model, 1e-3, 0.1)
    assert [g["name"] for g in groups] == ["head", "backbone"]
    assert groups[0]["lr"] == 1e-3 and groups[1]["lr"] == pytest.approx(1e-4)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters())
    with pytest.raises(InputError, match="more stages"):
        apply_strategy(model, parse_strategy("last:40"))
