"""PNG plots of a training run and of diagnostic metrics: learning curves, ROC, confusion matrix, radar, reliability.

Every plot is drawn with matplotlib's object-oriented API on its own Agg canvas:
no pyplot, no change to the global backend, no figure left registered anywhere.
matplotlib is imported inside the functions (it is slow to import), so importing
this module costs only numpy. Numbers shown (AUC, operating point) come from
:mod:`edgedx.runtime.metrics`, so they match the model card.

Each function creates the parent folders of ``path``, writes a PNG at
:data:`DPI` and returns ``path``. Bad input raises :class:`ValueError` naming
the bad value.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgedx.deps import require
from edgedx.runtime.metrics import roc_auc, roc_curve

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "RADAR_KEYS",
    "plot_confusion_matrix",
    "plot_learning_curves",
    "plot_radar",
    "plot_reliability",
    "plot_roc",
    "reliability_labels",
    "six_metrics",
    "threshold_text",
    "where_taken",
]

DPI = 120
RADAR_KEYS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc")
_PER_CLASS_KEYS = RADAR_KEYS[1:]


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #


def _new_figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas (never registered with pyplot)."""
    require(("matplotlib",), extra="plots", purpose="Plotting")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path | str) -> Path:
    """Write ``fig`` as PNG to ``path`` (parents created), release its artists, return the path."""
    from matplotlib.text import Text

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    for text in fig.findobj(Text):  # class names and file names are text, never TeX: "$" must not start mathtext
        text.set_parse_math(False)
    try:
        fig.savefig(out, format="png", dpi=DPI)
    finally:
        fig.clear()
    return out


def _number(value: Any) -> float | None:
    """``value`` as a finite float, or None when missing, non-numeric, bool or nan/inf."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def threshold_text(threshold: float) -> str:
    """A threshold with two or three decimals: 0.31 → "0.31", 0.305 → "0.305", 0.5 → "0.50".

    Why not ``:.3g``: "0.5" reads like the default while "0.50" reads like a
    number someone chose, and a three-decimal threshold must not be rounded
    into another one.
    """
    if _number(threshold) is None:
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    text = f"{float(threshold):.3f}"
    return text[:-1] if text.endswith("0") else text


def where_taken(task: str, threshold: float | None) -> str:
    """Where a metric or plot was taken, for its title: "at threshold 0.31", "at argmax".

    Why: a sensitivity means nothing without its threshold, and a reader of a
    PNG has no card. ``binary``: the card's threshold (0.50 when it has none,
    the runtime's default); ``multilabel``: the same, per label;
    ``multiclass``: the most probable class wins, whatever the threshold.
    """
    if task == "multiclass":
        return "at argmax"
    if task not in ("binary", "multilabel"):
        raise ValueError(f"task must be binary, multiclass or multilabel, got {task!r}")
    text = "at threshold 0.50 (default)" if threshold is None else f"at threshold {threshold_text(threshold)}"
    return f"{text} per label" if task == "multilabel" else text


def _with_where(title: str, where: str) -> str:
    return f"{title}, {where}" if where else title


# --------------------------------------------------------------------------- #
# Learning curves
# --------------------------------------------------------------------------- #


def _epochs(history: list[dict]) -> list[float]:
    """Each row's ``epoch``, or its 1-based position when the row has no numeric epoch."""
    out = []
    for i, row in enumerate(history):
        e = _number(row.get("epoch"))
        out.append(e if e is not None else float(i + 1))
    return out


def _series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(epochs, values) of ``key`` over the rows where it is present and numeric."""
    xs, ys = [], []
    for e, row in zip(_epochs(history), history):
        v = _number(row.get(key))
        if v is not None:
            xs.append(e)
            ys.append(v)
    return xs, ys


def _best_epoch(history: list[dict], metric: str) -> tuple[float, float] | None:
    """(epoch, value) of the best ``metric``: lowest for a loss, else highest; None when never numeric.

    Ties go to the lower ``val_loss`` then the earlier epoch, the rule
    ``train`` uses to pick its checkpoint (balanced accuracy, then -val_loss).
    """
    lower_is_better = "loss" in metric
    best: tuple[tuple[float, float, int], float, float] | None = None
    for i, (e, row) in enumerate(zip(_epochs(history), history)):
        v = _number(row.get(metric))
        if v is None:
            continue
        loss = _number(row.get("val_loss"))
        key = (v if lower_is_better else -v, loss if loss is not None else math.inf, i)
        if best is None or key < best[0]:
            best = (key, e, v)
    return None if best is None else (best[1], best[2])


def plot_learning_curves(history: list[dict], path: Path, *, metric: str = "val_balanced_accuracy", where: str = "") -> Path:
    """Two panels per epoch: train/val loss, and every numeric ``val_*`` metric; a line marks the best ``metric``.

    ``where`` (e.g. "at threshold 0.50", from :func:`where_taken`) is added to
    the metrics panel's title: per-epoch validation metrics are usually taken
    at a fixed threshold, not at the one chosen at the end.
    """
    if not history:
        raise ValueError("history is empty: nothing to plot")
    keys: list[str] = []
    for row in history:
        if not isinstance(row, dict):
            raise ValueError(f"history rows must be dicts, got {type(row).__name__}: {row!r}")
        keys.extend(k for k in row if k not in keys)
    if metric not in keys:
        raise ValueError(f"metric {metric!r} is not in the history; its keys are {keys}")
    loss_keys = [k for k in ("train_loss", "val_loss") if _series(history, k)[1]]
    metric_keys = [k for k in keys if k.startswith("val_") and k != "val_loss" and _series(history, k)[1]]
    if metric not in metric_keys and metric not in loss_keys and _series(history, metric)[1]:
        metric_keys.append(metric)
    best = _best_epoch(history, metric)

    from matplotlib.ticker import MaxNLocator

    fig = _new_figure(10.0, 4.0)
    ax_loss, ax_metric = fig.subplots(1, 2)
    for ax, ks in ((ax_loss, loss_keys), (ax_metric, metric_keys)):
        for k in ks:
            xs, ys = _series(history, k)
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=1.5, label=k, zorder=3)
        if best is not None:
            ax.axvline(best[0], color="0.35", linestyle="--", linewidth=1, zorder=2,
                       label=f"best {metric} = {best[1]:.3f} (epoch {best[0]:g})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        if ks or best is not None:
            ax.legend(fontsize=8, loc="best")
        if not ks:
            ax.text(0.5, 0.5, "no numeric values", ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("Loss")
    values = [v for k in metric_keys for v in _series(history, k)[1]]
    if values and all(0.0 <= v <= 1.0 for v in values):
        ax_metric.set_ylim(-0.02, 1.02)
    ax_metric.set_ylabel("value")
    ax_metric.set_title(_with_where("Validation metrics", where))
    fig.suptitle(f"Learning curves ({len(history)} epoch{'s' if len(history) != 1 else ''})")
    return _save(fig, path)


# --------------------------------------------------------------------------- #
# ROC
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class _RocSeries:
    """One ROC curve to draw (``fpr``/``tpr`` are None when the curve is undefined)."""

    name: str
    label: str
    truth: np.ndarray  # bool
    scores: np.ndarray
    fpr: np.ndarray | None
    tpr: np.ndarray | None
    auc: float | None


def _operating_point(truth: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float]:
    """(sensitivity, specificity) of the decisions ``score >= threshold`` (the runtime's rule)."""
    pos = np.asarray(truth, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    sens = float((s[pos] >= threshold).sum()) / n_pos if n_pos else float("nan")
    spec = float((s[~pos] < threshold).sum()) / n_neg if n_neg else float("nan")
    return sens, spec


def _one_curve(name: str, truth: np.ndarray, scores: np.ndarray) -> _RocSeries:
    n_pos = int(truth.sum())
    if n_pos == 0 or n_pos == truth.size:
        why = "not in y_true" if n_pos == 0 else "no negatives in y_true"
        return _RocSeries(name, f"{name}: {why} (skipped)", truth, scores, None, None, None)
    fpr, tpr, _ = roc_curve(truth, scores)
    auc = roc_auc(truth, scores)
    return _RocSeries(name, f"{name} (AUC {auc:.3f})", truth, scores, fpr, tpr, auc)


def _roc_series(
    y_true: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], positive_index: int | None
) -> tuple[str, list[_RocSeries]]:
    """(mode, curves) with mode ``binary``, ``multiclass`` or ``multilabel``; validates the inputs."""
    names = [str(c) for c in class_names]
    probs = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(y_true)
    if probs.ndim != 2 or probs.shape[1] != len(names):
        raise ValueError(
            f"probabilities must have shape (N, {len(names)}) for {len(names)} class names, got {probs.shape}"
        )
    if probs.shape[0] == 0:
        raise ValueError("probabilities is empty: a ROC curve needs at least one sample")
    n_classes = len(names)
    if positive_index is not None and not 0 <= int(positive_index) < n_classes:
        raise ValueError(f"positive_index must be in [0, {n_classes}), got {positive_index}")

    if y.ndim == 2:
        if y.shape != probs.shape:
            raise ValueError(f"multilabel y_true has shape {y.shape} but probabilities has shape {probs.shape}")
        bad = (y != 0) & (y != 1)
        if bad.any():
            raise ValueError(f"multilabel y_true must hold only 0 and 1, got {y[bad].flat[0]!r}")
        truth = y.astype(bool)
        columns = range(n_classes) if positive_index is None else [int(positive_index)]
        mode = "multilabel" if positive_index is None else "binary"
        return mode, [_one_curve(names[c], truth[:, c], probs[:, c]) for c in columns]

    if y.ndim != 1 or y.shape[0] != probs.shape[0]:
        raise ValueError(
            f"y_true must be labels of shape ({probs.shape[0]},) or 0/1 of shape {probs.shape}, got {y.shape}"
        )
    if y.dtype == bool or not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"y_true must hold integer class indices, got dtype {y.dtype}")
    bad = ~np.isfinite(y.astype(np.float64)) | (y != np.round(y)) | (y < 0) | (y >= n_classes)
    if bad.any():
        raise ValueError(f"y_true contains {y[bad][0]!r}, not a class index in [0, {n_classes})")
    labels = y.astype(np.int64)
    if positive_index is not None or n_classes == 2:
        pos = 1 if positive_index is None else int(positive_index)
        return "binary", [_one_curve(names[pos], labels == pos, probs[:, pos])]
    return "multiclass", [_one_curve(names[c], labels == c, probs[:, c]) for c in range(n_classes)]


def plot_roc(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    path: Path,
    *,
    positive_index: int | None = None,
    operating_threshold: float | None = None,
) -> Path:
    """ROC curves with AUCs: the positive class (binary), one-vs-rest per class, or per label (y_true (N, C) 0/1).

    Binary when ``positive_index`` is given or there are 2 classes (positive
    class 1). ``operating_threshold`` (binary only) adds the point reached by
    ``score >= threshold`` on this data, labelled "at threshold 0.31: sens
    .., spec ..". Classes whose curve is undefined (absent from y_true, or no
    negatives) are skipped and noted in the legend.
    """
    mode, curves = _roc_series(y_true, probabilities, class_names, positive_index)
    if operating_threshold is not None:
        if mode != "binary":
            raise ValueError(f"operating_threshold needs a single positive class; pass positive_index ({mode} ROC)")
        if _number(operating_threshold) is None:
            raise ValueError(f"operating_threshold must be a finite number, got {operating_threshold!r}")

    from matplotlib.lines import Line2D

    fig = _new_figure(5.0, 4.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for c in curves:
        if c.fpr is None:
            ax.add_line(Line2D([], [], linestyle="none", label=c.label))  # legend note only
            continue
        line = ax.plot(c.fpr, c.tpr, linewidth=1.8, drawstyle="default", label=c.label)[0]
        if operating_threshold is not None:
            sens, spec = _operating_point(c.truth, c.scores, float(operating_threshold))
            ax.plot(
                [1.0 - spec], [sens], marker="o", markersize=8, linestyle="none", color=line.get_color(),
                markeredgecolor="black", zorder=5,
                label=f"at threshold {threshold_text(operating_threshold)}: sens {sens:.2f}, spec {spec:.2f}",
            )
    if operating_threshold is not None and curves[0].fpr is None:
        ax.add_line(Line2D([], [], linestyle="none", label=f"at threshold {threshold_text(operating_threshold)}: undefined"))
    n = int(np.asarray(probabilities).shape[0])
    if mode == "binary":
        title = f"ROC: {curves[0].name} vs rest (n={n})"
    elif mode == "multiclass":
        title = f"ROC one-vs-rest, {len(curves)} classes (n={n})"
    else:
        title = f"ROC per label, {len(curves)} labels (n={n})"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


# --------------------------------------------------------------------------- #
# Confusion matrix
# --------------------------------------------------------------------------- #


def plot_confusion_matrix(
    confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: Path, *, normalize: bool = False, where: str = ""
) -> Path:
    """Heatmap of counts (rows true, columns predicted); each cell shows its count and row percentage.

    ``normalize`` colours by the row-normalised fraction (and puts the
    percentage first) instead of the raw count. ``where`` ("at threshold 0.31",
    from :func:`where_taken`) goes into the title: the same predictions give
    another matrix at another threshold.
    """
    names = [str(c) for c in class_names]
    cm = np.asarray(confusion)
    k = len(names)
    if cm.shape != (k, k):
        raise ValueError(f"confusion must be {k}x{k} for {k} class names, got shape {cm.shape}")
    if k == 0:
        raise ValueError("class_names is empty: nothing to plot")
    if not (np.issubdtype(cm.dtype, np.integer) or np.issubdtype(cm.dtype, np.floating)):
        raise ValueError(f"confusion must hold counts, got dtype {cm.dtype}")
    if not np.isfinite(cm.astype(np.float64)).all() or (cm < 0).any() or (cm != np.round(cm)).any():
        raise ValueError("confusion must hold non-negative integer counts")
    counts = cm.astype(np.int64)
    row_sums = counts.sum(axis=1, keepdims=True)
    fractions = np.divide(counts, row_sums, out=np.zeros(counts.shape, dtype=np.float64), where=row_sums > 0)

    side = max(4.0, min(12.0, 1.6 + 0.75 * k))
    fig = _new_figure(side + 1.0, side)
    ax = fig.add_subplot()
    shown = fractions if normalize else counts
    vmax = 1.0 if normalize else max(1, int(counts.max()))
    image = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=vmax, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="fraction of true class" if normalize else "count", shrink=0.85)
    fontsize = 9 if k <= 6 else 7 if k <= 12 else 5
    for i in range(k):
        for j in range(k):
            pct = f"{100.0 * fractions[i, j]:.1f}%" if row_sums[i, 0] else "-"
            text = f"{pct}\n({counts[i, j]})" if normalize else f"{counts[i, j]}\n({pct})"
            dark = shown[i, j] / vmax > 0.55
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color="white" if dark else "black")
    ax.set_xticks(range(k), labels=names, rotation=30 if max(map(len, names)) > 6 else 0, ha="right" if
                  max(map(len, names)) > 6 else "center")
    ax.set_yticks(range(k), labels=names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(_with_where(f"Confusion matrix ({'row-normalised' if normalize else 'counts'}, n={int(counts.sum())})", where))
    return _save(fig, path)


# --------------------------------------------------------------------------- #
# Radar
# --------------------------------------------------------------------------- #


def plot_radar(metrics: dict[str, float | None], path: Path, *, title: str = "", where: str = "") -> Path:
    """Radar chart of the six metrics in :data:`RADAR_KEYS` order on a 0..1 radial axis.

    Missing, None or nan values are drawn at 0 and labelled "n/a"; other keys
    are ignored. ``where`` ("at threshold 0.31", from :func:`where_taken`) is
    added to the title: five of the six metrics move with the threshold.
    """
    values: list[float | None] = []
    for key in RADAR_KEYS:
        raw = metrics.get(key)
        if raw is not None and (isinstance(raw, bool) or not isinstance(raw, numbers.Real)):
            raise ValueError(f"metric {key!r} must be a number or None, got {raw!r}")
        v = None if raw is None or math.isnan(float(raw)) else float(raw)
        if v is not None and not -1e-9 <= v <= 1.0 + 1e-9:
            raise ValueError(f"metric {key!r} must be in [0, 1], got {raw!r}")
        values.append(None if v is None else min(1.0, max(0.0, v)))

    angles = np.linspace(0.0, 2.0 * np.pi, len(RADAR_KEYS), endpoint=False)
    radii = np.array([0.0 if v is None else v for v in values])
    fig = _new_figure(5.0, 5.0)
    ax = fig.add_subplot(projection="polar")
    ax.set_theta_offset(np.pi / 2)
    ax.set_theta_direction(-1)
    closed_a, closed_r = np.r_[angles, angles[:1]], np.r_[radii, radii[:1]]
    ax.plot(closed_a, closed_r, color="tab:blue", linewidth=2)
    ax.fill(closed_a, closed_r, color="tab:blue", alpha=0.25)
    for a, v in zip(angles, values):
        ax.plot([a], [0.0 if v is None else v], marker="o" if v is not None else "x", markersize=6,
                color="tab:blue" if v is not None else "tab:red", linestyle="none")
    ax.set_xticks(angles, labels=[f"{k}\n{_fmt(v)}" for k, v in zip(RADAR_KEYS, values)], fontsize=9)
    for label, a, v in zip(ax.get_xticklabels(), angles, values):
        x = math.sin(a)  # horizontal position on screen (clockwise from the top)
        label.set_horizontalalignment("left" if x > 0.1 else "right" if x < -0.1 else "center")
        if v is None:
            label.set_color("tab:red")
    ax.set_ylim(0.0, 1.0)
    ax.set_yticks([0.2, 0.4, 0.6, 0.8, 1.0], labels=["0.2", "0.4", "0.6", "0.8", "1.0"], fontsize=7, color="0.4")
    ax.set_rlabel_position(180 / len(RADAR_KEYS))  # between the first two spokes
    ax.tick_params(axis="x", pad=6)
    ax.set_title(_with_where(title or "Six diagnostic metrics (0-1)", where), fontsize=11, pad=16)
    return _save(fig, path)


def six_metrics(metrics_dict: dict, positive: str | None) -> dict[str, float | None]:
    """The :data:`RADAR_KEYS` values from ``ClassificationMetrics.to_dict()``, for :func:`plot_radar`.

    accuracy as given; the per-class metrics of ``positive``, or with
    ``positive=None`` their macro mean over classes, ignoring None/nan (None
    when no class has a value). Classes absent from the data count with the
    0.0 sensitivity the metrics module reports for them.
    """
    per_class = metrics_dict.get("per_class")
    if not isinstance(per_class, dict) or not per_class:
        raise ValueError("metrics_dict has no per_class entries; pass ClassificationMetrics.to_dict()")
    out: dict[str, float | None] = {"accuracy": _number(metrics_dict.get("accuracy"))}
    if positive is not None:
        if positive not in per_class:
            raise ValueError(f"positive class {positive!r} is not one of {list(per_class)}")
        stats = per_class[positive]
        out.update({k: _number(stats.get(k)) for k in _PER_CLASS_KEYS})
        return out
    for k in _PER_CLASS_KEYS:
        defined = [v for v in (_number(stats.get(k)) for stats in per_class.values()) if v is not None]
        out[k] = float(np.mean(defined)) if defined else None
    return out


# --------------------------------------------------------------------------- #
# Reliability
# --------------------------------------------------------------------------- #


def reliability_labels(task: str, positive_class: str | None) -> dict[str, str]:
    """What a reliability diagram bins and what it observes, in words (the choice of
    :func:`edgedx.runtime.trust.reliability`): ``subject`` and ``observed`` for :func:`plot_reliability`."""
    if task == "binary":
        return {"subject": f"p({positive_class})", "observed": f"observed share {positive_class}"}
    if task == "multiclass":
        return {"subject": "the top class's probability", "observed": "observed share right"}
    return {"subject": "every label's probability", "observed": "observed share present"}


def _bins(rows: Sequence[dict[str, float]], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(confidence, observed, count, ECE) of reliability rows, checked."""
    try:
        conf = np.asarray([float(r["confidence"]) for r in rows])
        seen = np.asarray([float(r["observed"]) for r in rows])
        n = np.asarray([int(r["n"]) for r in rows])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{name} must be reliability rows with confidence, observed and n (edgedx.runtime.trust.reliability)") from None
    if not len(rows) or n.sum() <= 0:
        raise ValueError(f"{name} has no images: nothing to plot")
    return conf, seen, n, float(np.sum(n * np.abs(seen - conf)) / n.sum())


def plot_reliability(
    before: Sequence[dict[str, float]], after: Sequence[dict[str, float]], path: Path, *,
    subject: str = "confidence", observed: str = "observed share right", where: str = "", calibrated: bool = True,
) -> Path:
    """Reliability diagram: in each confidence bin, the share that was right (observed) against the mean
    probability given, for the network's own probabilities (before) and with the card's temperature (after,
    as deployed). On the diagonal a probability means what it says; marker area grows with the bin's count.

    ``calibrated`` False (the card has no temperature) draws one series. ``where``
    says which images ("validation, fitted on it", "test"): a curve on the images
    the temperature was fitted on flatters it.
    """
    series = [("network's own (before)", before, "tab:orange"), ("with the card's temperature (after)", after, "tab:blue")]
    if not calibrated:
        series = [("network's own (no temperature on the card)", after, "tab:blue")]
    fig = _new_figure(5.0, 4.6)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfect calibration")
    total = 0
    for label, rows, colour in series:
        conf, seen, n, ece = _bins(rows, label)
        total = int(n.sum())
        ax.plot(conf, seen, color=colour, linewidth=1.5, label=f"{label}: ECE {ece:.3f}")
        ax.scatter(conf, seen, s=12 + 180 * n / n.max(), color=colour, alpha=0.7, edgecolors="black", linewidths=0.5, zorder=4)
    ax.set_title(_with_where(f"Reliability of {subject} (n={total})", where), fontsize=10)
    ax.set_xlabel(f"mean {subject} in the bin")
    ax.set_ylabel(observed)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", framealpha=0.6)
    return _save(fig, path)
