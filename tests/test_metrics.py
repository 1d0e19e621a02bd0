"""Diagnostic metrics against hand-computed values and brute-force definitions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from edgedx.runtime.metrics import (
    ClassificationMetrics,
    classification_metrics,
    confusion_matrix,
    roc_auc,
    roc_curve,
    threshold_for_sensitivity,
)

SEEDS = [0, 1, 2, 3, 4, 5, 6, 7]


def brute_force_auc(y: np.ndarray, s: np.ndarray) -> float:
    """P(score_pos > score_neg) + 0.5 P(tie) over every (positive, negative) pair."""
    pos = s[y == 1][:, None]
    neg = s[y == 0][None, :]
    return float(((pos > neg).sum() + 0.5 * (pos == neg).sum()) / (pos.size * neg.size))


def sensitivity_at(y: np.ndarray, s: np.ndarray, t: float) -> float:
    return float((s[y == 1] >= t).sum() / (y == 1).sum())


def trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def one_hot_probs(pred: list[int], n_classes: int) -> np.ndarray:
    """Probabilities whose argmax is ``pred`` (0.6 on the predicted class, the rest shared)."""
    p = np.full((len(pred), n_classes), 0.4 / (n_classes - 1))
    p[np.arange(len(pred)), pred] = 0.6
    return p


# --------------------------------------------------------------------------- #
# confusion_matrix
# --------------------------------------------------------------------------- #


def test_confusion_matrix_known() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 1, 0, 1, 2, 2, 2, 0, 2])
    expected = np.array(
        [
            [2, 1, 0],
            [0, 1, 1],
            [1, 0, 3],
        ]
    )
    cm = confusion_matrix(y_true, y_pred, 3)
    assert cm.dtype == np.int64
    assert cm.shape == (3, 3)
    np.testing.assert_array_equal(cm, expected)


def test_confusion_matrix_keeps_absent_classes() -> None:
    cm = confusion_matrix(np.array([0, 0]), np.array([0, 1]), 4)
    np.testing.assert_array_equal(cm, [[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])


def test_confusion_matrix_accepts_integral_floats_and_bools() -> None:
    cm = confusion_matrix(np.array([0.0, 1.0]), np.array([True, True]), 2)
    np.testing.assert_array_equal(cm, [[0, 1], [0, 1]])


def test_confusion_matrix_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        confusion_matrix(np.array([], dtype=int), np.array([], dtype=int), 2)
    with pytest.raises(ValueError, match="label 3"):
        confusion_matrix(np.array([0, 3]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match="label -1"):
        confusion_matrix(np.array([0, 1]), np.array([0, -1]), 3)
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        confusion_matrix(np.array([0, 1, 1]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(np.array([0.5, 1.0]), np.array([0, 1]), 2)


# --------------------------------------------------------------------------- #
# roc_auc
# --------------------------------------------------------------------------- #


def test_auc_by_hand_with_ties() -> None:
    # positives: 0.35, 0.8, 0.4   negatives: 0.1, 0.4, 0.4
    # 0.35 beats 0.1 only -> 1;  0.8 beats all -> 3;  0.4 beats 0.1, ties twice -> 1 + 0.5 + 0.5 = 2
    # AUC = (1 + 3 + 2) / 9 = 2/3
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4])
    assert roc_auc(y, s) == pytest.approx(2 / 3, abs=1e-12)


def test_auc_all_tied_is_half() -> None:
    assert roc_auc(np.array([0, 1, 0, 1, 1]), np.full(5, 0.3)) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_auc_matches_pairwise_definition_with_many_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    y = rng.integers(0, 2, size=n)
    y[0], y[1] = 0, 1  # both classes present
    s = rng.integers(0, 5, size=n) / 4.0  # only five distinct values: lots of ties
    assert roc_auc(y, s) == pytest.approx(brute_force_auc(y, s), abs=1e-12)


def test_auc_perfect_and_inverted() -> None:
    y = np.array([0, 0, 0, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.9])
    assert roc_auc(y, s) == 1.0
    assert roc_auc(y, -s) == 0.0
    assert roc_auc(1 - y, s) == 0.0
    assert roc_auc(y.astype(bool), s) == 1.0


def test_auc_single_class_is_nan() -> None:
    assert math.isnan(roc_auc(np.zeros(4, dtype=int), np.array([0.1, 0.2, 0.3, 0.4])))
    assert math.isnan(roc_auc(np.ones(3, dtype=int), np.array([0.1, 0.2, 0.3])))


def test_auc_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        roc_auc(np.array([], dtype=int), np.array([]))
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        roc_auc(np.array([0, 1, 1]), np.array([0.2, 0.3]))
    with pytest.raises(ValueError, match="only 0 and 1, got 2"):
        roc_auc(np.array([0, 1, 2]), np.array([0.2, 0.3, 0.4]))
    with pytest.raises(ValueError, match="finite"):
        roc_auc(np.array([0, 1]), np.array([0.2, np.nan]))


# --------------------------------------------------------------------------- #
# roc_curve
# --------------------------------------------------------------------------- #


def test_roc_curve_by_hand() -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4])
    fpr, tpr, thr = roc_curve(y, s)
    # thresholds inf, 0.8, 0.4, 0.35, 0.1
    np.testing.assert_array_equal(thr, [np.inf, 0.8, 0.4, 0.35, 0.1])
    np.testing.assert_allclose(tpr, [0, 1 / 3, 2 / 3, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 2 / 3, 2 / 3, 1])
    assert trapezoid(fpr, tpr) == pytest.approx(roc_auc(y, s), abs=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_roc_curve_monotone_ends_and_area(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 300))
    y = rng.integers(0, 2, size=n)
    y[0], y[1] = 0, 1
    s = np.round(rng.random(n), 1)  # ties
    fpr, tpr, thr = roc_curve(y, s)
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.all(np.diff(thr) < 0), "thresholds must be strictly descending"
    assert np.isinf(thr[0]) and thr[-1] == s.min()
    # Each point is the (fpr, tpr) of deciding "score >= threshold".
    for f, t, th in zip(fpr, tpr, thr):
        assert t == pytest.approx(np.mean(s[y == 1] >= th))
        assert f == pytest.approx(np.mean(s[y == 0] >= th))
    assert trapezoid(fpr, tpr) == pytest.approx(roc_auc(y, s), abs=1e-12)


def test_roc_curve_single_class_rate_is_nan() -> None:
    fpr, tpr, _ = roc_curve(np.zeros(3, dtype=int), np.array([0.1, 0.2, 0.3]))
    assert np.isnan(tpr).all()
    np.testing.assert_allclose(fpr, [0, 1 / 3, 2 / 3, 1])


# --------------------------------------------------------------------------- #
# threshold_for_sensitivity
# --------------------------------------------------------------------------- #


def test_threshold_by_hand() -> None:
    y = np.array([1, 1, 1, 1, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.1])
    # Sensitivity >= 0.75 needs 3 of 4 positives: highest such t = third-highest positive = 0.6.
    assert threshold_for_sensitivity(y, s, 0.75) == 0.6
    # 0.76 needs all four.
    assert threshold_for_sensitivity(y, s, 0.76) == 0.3
    assert threshold_for_sensitivity(y, s, 0.25) == 0.9
    assert threshold_for_sensitivity(y, s, 1.0) == 0.3


def test_threshold_target_that_float_rounding_would_miss() -> None:
    # 0.7 * 10 == 7.000000000000001: ceil would wrongly ask for 8 positives.
    y = np.ones(10, dtype=int)
    s = np.arange(10, dtype=float)[::-1] / 10  # 0.9, 0.8, ..., 0.0
    t = threshold_for_sensitivity(y, s, 0.7)
    assert t == pytest.approx(0.3)
    assert sensitivity_at(y, s, t) == 0.7


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_is_highest_meeting_target(seed: int, target: float) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(10, 400))
    y = rng.integers(0, 2, size=n)
    y[0], y[1] = 0, 1
    s = np.round(rng.random(n) * 0.5 + 0.4 * y, 2)  # informative, with ties
    t = threshold_for_sensitivity(y, s, target)
    assert sensitivity_at(y, s, t) >= target
    higher = np.unique(s[s > t])
    if higher.size:
        assert sensitivity_at(y, s, float(higher[0])) < target


def test_threshold_errors() -> None:
    y = np.array([0, 1, 1])
    s = np.array([0.1, 0.2, 0.3])
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="target sensitivity"):
            threshold_for_sensitivity(y, s, bad)
    with pytest.raises(ValueError, match="no positive"):
        threshold_for_sensitivity(np.zeros(3, dtype=int), s, 0.9)
    with pytest.raises(ValueError, match="empty"):
        threshold_for_sensitivity(np.array([], dtype=int), np.array([]), 0.9)


# --------------------------------------------------------------------------- #
# classification_metrics
# --------------------------------------------------------------------------- #


def test_classification_metrics_multiclass_by_hand() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = [0, 1, 0, 1, 2, 2, 2, 0, 2]
    m = classification_metrics(y_true, one_hot_probs(y_pred, 3), ["a", "b", "c"])
    assert isinstance(m, ClassificationMetrics)
    assert m.n == 9
    assert m.confusion == [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
    assert m.class_names == ("a", "b", "c")
    assert m.accuracy == pytest.approx(6 / 9)
    # recalls 2/3, 1/2, 3/4
    assert m.balanced_accuracy == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    a = m.per_class["a"]
    # a: tp 2, fn 1, fp 1, tn 5
    assert a["sensitivity"] == pytest.approx(2 / 3)
    assert a["specificity"] == pytest.approx(5 / 6)
    assert a["precision"] == pytest.approx(2 / 3)
    assert a["f1"] == pytest.approx(2 / 3)
    assert a["support"] == 3
    c = m.per_class["c"]
    # c: tp 3, fn 1, fp 1, tn 4
    assert c["sensitivity"] == pytest.approx(3 / 4)
    assert c["specificity"] == pytest.approx(4 / 5)
    assert c["precision"] == pytest.approx(3 / 4)
    assert c["f1"] == pytest.approx(3 / 4)
    assert c["support"] == 4
    b = m.per_class["b"]
    # b: tp 1, fn 1, fp 1, tn 6 -> P = R = 1/2
    assert (b["sensitivity"], b["precision"], b["f1"]) == pytest.approx((0.5, 0.5, 0.5))
    assert b["specificity"] == pytest.approx(6 / 7)
    # AUCs per class from the probability columns, macro = their mean.
    probs = one_hot_probs(y_pred, 3)
    for k, name in enumerate("abc"):
        assert m.per_class[name]["auc"] == pytest.approx(brute_force_auc((y_true == k).astype(int), probs[:, k]))
    assert m.macro_auc == pytest.approx(np.mean([m.per_class[x]["auc"] for x in "abc"]))


def test_balanced_accuracy_imbalanced_by_hand() -> None:
    # 8 negatives, 2 positives; always predicting the majority: accuracy 0.8, balanced 0.5.
    y_true = np.array([0] * 8 + [1] * 2)
    m = classification_metrics(y_true, one_hot_probs([0] * 10, 2), ["neg", "pos"])
    assert m.accuracy == pytest.approx(0.8)
    assert m.balanced_accuracy == pytest.approx(0.5)
    # Zero division: "pos" is never predicted -> precision and f1 are 0.0, not nan.
    assert m.per_class["pos"]["precision"] == 0.0
    assert m.per_class["pos"]["f1"] == 0.0
    assert m.per_class["pos"]["sensitivity"] == 0.0
    assert m.per_class["neg"]["specificity"] == 0.0

    # Catch one of the two positives and misfire on two negatives:
    # recall(neg) = 6/8, recall(pos) = 1/2 -> balanced 0.625, accuracy 7/10.
    pred = [0] * 6 + [1, 1] + [1, 0]
    m = classification_metrics(y_true, one_hot_probs(pred, 2), ["neg", "pos"])
    assert m.accuracy == pytest.approx(0.7)
    assert m.balanced_accuracy == pytest.approx(0.625)


def test_balanced_accuracy_ignores_classes_absent_from_truth() -> None:
    # Class 2 never occurs in y_true (but is predicted once): mean over classes 0 and 1 only.
    y_true = np.array([0, 0, 0, 1])
    pred = [0, 0, 2, 1]
    m = classification_metrics(y_true, one_hot_probs(pred, 3), ["a", "b", "c"])
    assert m.balanced_accuracy == pytest.approx((2 / 3 + 1) / 2)
    # Its sensitivity is 0/0 -> 0.0, its AUC undefined -> nan and left out of macro_auc.
    assert m.per_class["c"]["sensitivity"] == 0.0
    assert m.per_class["c"]["support"] == 0
    assert math.isnan(m.per_class["c"]["auc"])
    defined = [m.per_class["a"]["auc"], m.per_class["b"]["auc"]]
    assert m.macro_auc == pytest.approx(np.mean(defined))


def test_binary_with_operating_threshold_y_pred() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 1])
    p_pos = np.array([0.1, 0.3, 0.45, 0.4, 0.7, 0.9])
    probs = np.stack([1 - p_pos, p_pos], axis=1)
    # argmax (0.5): predictions 0,0,0,0,1,1
    m = classification_metrics(y_true, probs, ["healthy", "disease"])
    assert m.confusion == [[3, 0], [1, 2]]
    # At threshold 0.35 the caller passes y_pred: 0,0,1,1,1,1
    m_thr = classification_metrics(y_true, probs, ["healthy", "disease"], y_pred=(p_pos >= 0.35).astype(int))
    assert m_thr.confusion == [[2, 1], [0, 3]]
    assert m_thr.per_class["disease"]["sensitivity"] == 1.0
    # AUC does not depend on the decisions; binary macro_auc is the positive class's AUC.
    auc = roc_auc(y_true, p_pos)
    assert auc == pytest.approx(8 / 9)
    assert m.macro_auc == m_thr.macro_auc == pytest.approx(auc)
    assert m.per_class["disease"]["auc"] == pytest.approx(auc)
    assert m.per_class["healthy"]["auc"] == pytest.approx(auc)  # complementary probabilities


def test_perfect_classifier() -> None:
    y = np.array([0, 1, 2, 1, 0])
    m = classification_metrics(y, one_hot_probs(list(y), 3), ["a", "b", "c"])
    assert m.accuracy == m.balanced_accuracy == m.macro_auc == 1.0
    for stats in m.per_class.values():
        assert stats["sensitivity"] == stats["specificity"] == stats["precision"] == stats["f1"] == 1.0


def test_to_dict_is_json_and_nan_becomes_none() -> None:
    y_true = np.array([0, 0, 0])
    m = classification_metrics(y_true, one_hot_probs([0, 1, 0], 2), ["neg", "pos"])
    assert math.isnan(m.macro_auc)
    d = m.to_dict()
    text = json.dumps(d, allow_nan=False)  # must not contain NaN
    back = json.loads(text)
    assert back["macro_auc"] is None
    assert back["per_class"]["pos"]["auc"] is None
    assert back["per_class"]["neg"]["support"] == 3
    assert back["confusion"] == [[2, 1], [0, 0]]
    assert back["class_names"] == ["neg", "pos"]
    assert back["n"] == 3
    assert set(back) >= {"n", "accuracy", "balanced_accuracy", "macro_auc", "per_class", "confusion", "class_names"}
    assert set(back["per_class"]["neg"]) == {"sensitivity", "specificity", "precision", "f1", "support", "auc"}


def test_metrics_are_frozen() -> None:
    m = classification_metrics(np.array([0, 1]), one_hot_probs([0, 1], 2), ["a", "b"])
    with pytest.raises(AttributeError):
        m.accuracy = 0.0  # type: ignore[misc]


def test_classification_metrics_errors() -> None:
    probs = one_hot_probs([0, 1, 0], 2)
    with pytest.raises(ValueError, match="empty"):
        classification_metrics(np.array([], dtype=int), np.zeros((0, 2)), ["a", "b"])
    with pytest.raises(ValueError, match=r"\(3, 2\).*3 entries.*\(3, 3\)"):
        classification_metrics(np.array([0, 1, 0]), probs, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\(3, 2\).*\(4,\)"):
        classification_metrics(np.array([0, 1, 0, 1]), probs, ["a", "b"])
    with pytest.raises(ValueError, match="y_true contains label 2"):
        classification_metrics(np.array([0, 2, 0]), probs, ["a", "b"])
    with pytest.raises(ValueError, match="y_pred contains label 5"):
        classification_metrics(np.array([0, 1, 0]), probs, ["a", "b"], y_pred=np.array([0, 5, 0]))
    with pytest.raises(ValueError, match="y_pred has shape"):
        classification_metrics(np.array([0, 1, 0]), probs, ["a", "b"], y_pred=np.array([0, 1]))
    with pytest.raises(ValueError, match="distinct"):
        classification_metrics(np.array([0, 1, 0]), probs, ["a", "a"])
    with pytest.raises(ValueError, match="nan or inf"):
        bad = probs.copy()
        bad[0, 0] = np.nan
        classification_metrics(np.array([0, 1, 0]), bad, ["a", "b"])


# --------------------------------------------------------------------------- #
# Optional cross-check against scikit-learn (skipped when it is not installed)
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("seed", SEEDS)
def test_cross_check_with_sklearn(seed: int) -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n, k = 200, 4
    y = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    probs = np.round(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), 2)
    m = classification_metrics(y, probs, [f"c{i}" for i in range(k)])
    pred = probs.argmax(axis=1)
    np.testing.assert_array_equal(m.confusion, skm.confusion_matrix(y, pred, labels=list(range(k))))
    assert m.balanced_accuracy == pytest.approx(skm.balanced_accuracy_score(y, pred))
    for i in range(k):
        yb = (y == i).astype(int)
        assert m.per_class[f"c{i}"]["auc"] == pytest.approx(skm.roc_auc_score(yb, probs[:, i]))
        fpr, tpr, _ = roc_curve(yb, probs[:, i])
        sk_fpr, sk_tpr, _ = skm.roc_curve(yb, probs[:, i], drop_intermediate=False)
        np.testing.assert_allclose(fpr, sk_fpr)
        np.testing.assert_allclose(tpr, sk_tpr)


def test_wilson_intervals_are_honest_on_small_counts() -> None:
    from edgedx.runtime.evaluate import wilson_interval

    low, high = wilson_interval(10, 10)  # sensitivity 1.000 on 10 melanomas
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-3)  # not [1.000, 1.000]
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)
    low, high = wilson_interval(50, 100)
    assert (low, high) == (pytest.approx(0.4038, abs=1e-3), pytest.approx(0.5962, abs=1e-3))
    assert wilson_interval(0, 0) is None
