"""Out-of-fold selection: the epoch from the folds' mean curve, the threshold from pooled predictions with its
interval and alternatives, the held-out split outside every fold, and the cross-validation that ties them together."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from edgedx.errors import InputError
from edgedx.training.oof import Pooled, choose_epoch, fold_spread, out_of_fold_report, pool_predictions
from edgedx.training.run import RunFolder
from edgedx.training.sources import TrainingData
from edgedx.training.splits import fold_split, held_out_items
from edgedx.training.threshold import choose_threshold, youden_threshold
from tests.test_card import make_card


def _rows(values: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "val_loss": 1.0 - v, "val": {"balanced_accuracy": v}} for i, v in enumerate(values)]


def test_choose_epoch_takes_the_best_mean_curve_not_any_folds_own_best() -> None:
    # fold 0 peaks at epoch 1, fold 1 at epoch 3; the mean is best at epoch 2
    histories = [_rows([0.90, 0.88, 0.60]), _rows([0.50, 0.80, 0.85])]
    epoch, curve = choose_epoch(histories, "balanced_accuracy")
    assert epoch == 2 and curve == pytest.approx([0.70, 0.84, 0.725])
    assert choose_epoch(histories, "loss")[0] == 2  # the loss is negated: lower is better


def test_choose_epoch_reads_auc_as_the_macro_auc_and_refuses_a_curve_with_no_values() -> None:
    rows = lambda values: [{"epoch": i + 1, "val_loss": 0.5, "val": {"macro_auc": v}} for i, v in enumerate(values)]  # noqa: E731
    epoch, curve = choose_epoch([rows([0.90, 0.97, 0.95]), rows([0.92, 0.96, 0.99])], "auc")
    assert epoch == 3 and curve == pytest.approx([0.91, 0.965, 0.97])
    with pytest.raises(InputError, match="no fold has a validation auc"):
        choose_epoch([rows([None, None]), rows([None, None])], "auc")


def test_choose_epoch_counts_only_epochs_every_fold_reached_and_breaks_ties_early() -> None:
    epoch, curve = choose_epoch([_rows([0.7, 0.8, 0.99]), _rows([0.7, 0.8])], "balanced_accuracy")
    assert epoch == 2 and len(curve) == 2
    assert choose_epoch([_rows([0.8, 0.8]), _rows([0.8, 0.8])], "balanced_accuracy")[0] == 1
    with pytest.raises(InputError, match="no fold finished an epoch"):
        choose_epoch([[], _rows([0.5])], "balanced_accuracy")


def _write_fold(folder: RunFolder, idx: list[int], targets: list[int], probs: np.ndarray) -> None:
    folder.path.mkdir(parents=True)
    folder.write_predictions(np.asarray(idx), np.asarray(targets), probs, probs)


def test_pool_predictions_orders_by_item_and_refuses_overlap_or_a_missing_fold(tmp_path: Path) -> None:
    p = np.array([[0.9, 0.1], [0.2, 0.8]])
    _write_fold(RunFolder(tmp_path / "a"), [3, 0], [0, 1], p)
    _write_fold(RunFolder(tmp_path / "b"), [1, 2], [1, 0], p[::-1])
    pooled = pool_predictions([RunFolder(tmp_path / "a"), RunFolder(tmp_path / "b")])
    assert pooled.idx.tolist() == [0, 1, 2, 3] and pooled.targets.tolist() == [1, 1, 0, 0] and pooled.fold.tolist() == [0, 1, 1, 0]
    assert pooled.probs[0].tolist() == [0.2, 0.8]
    _write_fold(RunFolder(tmp_path / "c"), [0], [1], p[:1])
    with pytest.raises(InputError, match="overlap"):
        pool_predictions([RunFolder(tmp_path / "a"), RunFolder(tmp_path / "c")])
    with pytest.raises(InputError, match="fold 1 did not finish"):
        pool_predictions([RunFolder(tmp_path / "a"), RunFolder(tmp_path / "missing")])


def _scores(n_pos: int, n_neg: int, seed: int = 0, separation: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    s = np.r_[rng.normal(separation, 1, n_pos), rng.normal(0, 1, n_neg)]
    p = 1 / (1 + np.exp(-s))
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    return y, np.stack([1 - p, p], axis=1)


def test_threshold_choice_states_counts_interval_and_alternatives() -> None:
    card = make_card("binary")  # positive class "parasitized" (index 1)
    y, probs = _scores(200, 300)
    choice, warnings = choose_threshold(y, probs, card, 0.9, source="out_of_fold")
    f = choice.fitted_on
    assert choice.source == "out_of_fold" and f["n_positive"] == 200 and f["n_negative"] == 300
    point = f["chosen"]["threshold"]
    assert choice.interval is not None and choice.interval[0] <= point <= choice.interval[1]
    assert f["chosen"]["sensitivity"] >= 0.9
    lo, hi = f["chosen"]["sensitivity_ci95"]
    assert lo < f["chosen"]["sensitivity"] < hi
    assert set(f["alternatives"]) == {"0.5", "youden"} and warnings == []


def test_a_target_that_costs_nearly_all_specificity_is_said_in_words() -> None:
    card = make_card("binary")
    y, probs = _scores(40, 200, separation=0.2)  # barely separated: 95% sensitivity calls almost everything positive
    choice, warnings = choose_threshold(y, probs, card, 0.95, source="validation")
    assert choice.fitted_on["chosen"]["specificity"] < 0.2
    assert len(warnings) == 1 and "costs nearly all specificity" in warnings[0] and "Youden" in warnings[0]
    assert "--target-sensitivity" in warnings[0] and choice.fitted_on["warning"] == warnings[0]


def test_youden_threshold_maximises_sensitivity_plus_specificity() -> None:
    truth = np.array([0, 0, 0, 1, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    t = youden_threshold(truth, scores)
    j = lambda c: ((scores >= c) & (truth == 1)).sum() / 3 + ((scores < c) & (truth == 0)).sum() / 4 - 1  # noqa: E731
    assert j(t) == pytest.approx(max(j(c) for c in scores))


def test_out_of_fold_report_sets_the_cards_threshold_source_and_qhat() -> None:
    card = make_card("binary")
    y, probs = _scores(60, 90, seed=3)
    pooled = Pooled(np.arange(150), y, probs, np.arange(150) % 3)
    report, fitted, _ = out_of_fold_report(pooled, card, 0.9)
    assert fitted.threshold == report["threshold"] and fitted.threshold_choice.source == "out_of_fold"
    assert fitted.metrics["split"] == "out_of_fold" and report["ci95"]["auc"][0] < report["metrics"]["auc"] < report["ci95"]["auc"][1]
    assert "selection" in report["used_for"]
    assert "fold model that did not train on it" in fitted.threshold_choice.fitted_on["predicted_by"]


def test_fold_spread_gives_mean_sd_and_range() -> None:
    spread = fold_spread([{"accuracy": 0.8, "auc": 0.9}, {"accuracy": 0.6, "auc": None}])
    assert spread["accuracy"] == pytest.approx({"mean": 0.7, "sd": np.std([0.8, 0.6], ddof=1), "min": 0.6, "max": 0.8, "n_folds": 2})
    assert spread["auc"]["n_folds"] == 1


def _data(n: int, splits: list[str] | None = None) -> TrainingData:
    def no_image(i: int) -> np.ndarray:
        raise AssertionError("splitting never loads an image")

    return TrainingData(("a", "b"), "binary", [f"img{i}.png" for i in range(n)], np.arange(n) % 2, None, splits, "mem", loader=no_image)


def test_the_sources_own_val_split_is_held_out_of_every_fold() -> None:
    marks = ["train"] * 16 + ["val"] * 4
    data = _data(20, marks)
    folds = [fold_split(data, 4, i, seed=1) for i in range(4)]
    for f in folds:
        assert f["test"].tolist() == list(range(16, 20))
        assert not set(f["val"]) & set(f["test"]) and not set(f["train"]) & set(f["test"])
    assert sorted(np.concatenate([f["val"] for f in folds]).tolist()) == list(range(16))
    carved = held_out_items(_data(20), seed=0, test_fraction=0.25)
    assert len(carved) == 5 and held_out_items(_data(20)).size == 0


def test_cross_validation_selects_out_of_fold_and_writes_the_ensemble(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("timm")
    from edgedx.training.checkpoint import load_checkpoint
    from edgedx.training.train import TrainConfig, cross_validate
    from tests.test_training_loop import FAST, colour_folder

    data = colour_folder(tmp_path / "data", n=9)
    with caplog.at_level(logging.INFO):
        cv = cross_validate(data, tmp_path / "cv", TrainConfig(**{**FAST.__dict__, "epochs": 2}), folds=3)
    summary = json.loads((tmp_path / "cv" / "cv_summary.json").read_text())
    chosen = summary["epoch_selection"]["chosen"]
    assert summary["epoch_selection"]["method"] == "out_of_fold" and len(summary["epoch_selection"]["mean_curve"]) == 2
    assert all(r.best_epoch == chosen for r in cv.folds)
    assert all(load_checkpoint(r.checkpoint).extra["epoch"] == chosen for r in cv.folds)
    assert not any((tmp_path / "cv" / f"fold_{i}" / "epochs").exists() for i in (1, 2, 3))  # snapshots removed
    assert all(len(r.history) == 2 for r in cv.folds)  # every fold ran every epoch
    ensemble = load_checkpoint(tmp_path / "cv" / "ensemble.pt").card
    assert ensemble.ensemble.members == 3 and ensemble.threshold_choice.source == "out_of_fold"
    assert ensemble.threshold == pytest.approx(summary["out_of_fold"]["threshold"])
    from edgedx.card import ModelCard

    assert ModelCard.load(tmp_path / "cv" / "card.json") == ensemble  # the folder reads like a run's
    assert f"epoch {chosen} chosen on the folds' mean validation" in caplog.text


def test_evaluating_a_fold_ensemble_on_its_members_training_images_is_refused(tmp_path: Path) -> None:
    from edgedx.runtime.io.labelled import load_labelled

    (tmp_path / "split.json").write_text(json.dumps({"val": ["a.png"], "val_labels": ["a"], "val_held_out": False}))
    with pytest.raises(InputError, match="not a result.*--test-fraction"):
        load_labelled(tmp_path, ("a", "b"), split="val")


def test_export_states_the_threshold_source_interval_and_a_costly_target() -> None:
    from edgedx.card import ThresholdChoice
    from edgedx.cli import threshold_lines
    from edgedx.export.pipeline import threshold_statement

    y, probs = _scores(40, 200, separation=0.2)
    card = make_card("binary")
    choice, _ = choose_threshold(y, probs, card, 0.95, source="out_of_fold")
    card = card.replace(threshold=choice.fitted_on["chosen"]["threshold"], threshold_choice=choice)
    lines = threshold_lines(threshold_statement(card))
    assert lines[0].startswith(f"threshold {card.threshold:.3g} for parasitized (chosen on: out-of-fold, 40 positives / 200 negatives; 95% interval")
    assert lines[1].startswith("warning: sensitivity 0.95 costs nearly all specificity")
    plain = threshold_lines(threshold_statement(make_card("binary", threshold_choice=ThresholdChoice())))
    assert plain == ["threshold 0.4 for parasitized (chosen on: unknown)"]
