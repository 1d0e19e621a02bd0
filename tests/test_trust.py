"""Calibration and abstention arithmetic on synthetic data whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from edgedx.runtime.trust import (
    brier_score, conformal_qhat, crop_dispersion, dispersion_limit, expected_calibration_error, fit_temperature,
    prediction_set, reliability,
)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def overconfident(n: int, classes: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose calibrated temperature is ``scale``: labels drawn from softmax(z), the model reports z * scale."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, classes))
    labels = np.array([rng.choice(classes, p=p) for p in softmax(z)])
    return z * scale, labels


@pytest.mark.parametrize("classes", [2, 4])
def test_temperature_scaling_recovers_the_overconfidence_and_lowers_ece(classes: int) -> None:
    logits, labels = overconfident(4000, classes, 2.5, seed=classes)
    task = "binary" if classes == 2 else "multiclass"
    (t,) = fit_temperature(lambda ts: softmax(logits / ts[0]), labels, task, classes)
    assert t == pytest.approx(2.5, rel=0.12)
    before = expected_calibration_error(softmax(logits), labels, task, positive=1 if classes == 2 else None)
    after = expected_calibration_error(softmax(logits / t), labels, task, positive=1 if classes == 2 else None)
    assert after < before / 2 and after < 0.03
    assert brier_score(softmax(logits / t), labels, task) < brier_score(softmax(logits), labels, task)


def test_multilabel_temperatures_are_fitted_per_label() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, (4000, 2))
    labels = (rng.uniform(size=z.shape) < 1 / (1 + np.exp(-z))).astype(float)
    reported = z * np.array([3.0, 0.5])  # label 0 overconfident, label 1 underconfident
    temps = fit_temperature(lambda ts: 1 / (1 + np.exp(-reported / np.asarray(ts))), labels, "multilabel", 2)
    assert temps[0] == pytest.approx(3.0, rel=0.15) and temps[1] == pytest.approx(0.5, rel=0.15)


def test_brier_and_reliability_on_hand_computed_cases() -> None:
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = np.array([0, 1, 1])
    assert brier_score(probs, labels, "binary") == pytest.approx((0.01 + 0.04 + 0.36) / 3)
    rows = reliability(probs, labels, "binary", positive=1, bins=2)
    assert rows == [{"lo": 0.0, "hi": 0.5, "confidence": pytest.approx(0.25), "observed": 0.5, "n": 2},
                    {"lo": 0.5, "hi": 1.0, "confidence": 0.8, "observed": 1.0, "n": 1}]
    assert expected_calibration_error(probs, labels, "binary", positive=1, bins=2) == pytest.approx((2 * 0.25 + 0.2) / 3)


def test_conformal_sets_cover_new_images_at_the_stated_rate() -> None:
    logits, labels = overconfident(6000, 3, 1.0, seed=7)
    probs = softmax(logits)
    qhat = conformal_qhat(probs[:1000], labels[:1000], 0.9)
    names = ("a", "b", "c")
    sets = [prediction_set(p, qhat, names) for p in probs[1000:]]
    covered = np.mean([names[y] in s for s, y in zip(sets, labels[1000:])])
    assert 0.87 <= covered <= 0.93  # 0.9 in expectation over calibration sets; one set of 1000 varies by about ±0.01
    assert any(len(s) > 1 for s in sets) and all(s == sorted(s, key=lambda c: -probs[1000 + i][names.index(c)]) for i, s in enumerate(sets[:50]))
    assert conformal_qhat(probs[:5], labels[:5], 0.95) == 1.0  # too few images for 95%: every class, always refer


def test_dispersion_of_agreeing_and_disagreeing_crops() -> None:
    agree = np.array([[0.2, 0.8], [0.21, 0.79], [0.19, 0.81]])
    disagree = np.array([[0.9, 0.1], [0.1, 0.9]])
    assert crop_dispersion(agree, 1) < 0.01 and crop_dispersion(disagree, 1) == pytest.approx(0.4)
    assert crop_dispersion(agree[:1], 1) == 0.0 and crop_dispersion(disagree, None) == pytest.approx(0.4)
    assert dispersion_limit(np.array([0.0, 0.1, 0.2, 0.3, 0.4]), 0.5) == pytest.approx(0.2)
    assert dispersion_limit(np.array([])) is None
