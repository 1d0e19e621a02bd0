"""A one-page evaluation report a clinician can read, plus its JSON and plots.

Self-contained HTML (plots embedded as PNG data), no scripts, printable. It
leads with the intended use from the card, then the headline numbers with 95%
intervals at the operating threshold, the confusion matrix, ROC and radar,
calibration (ECE, Brier, reliability before and after the card's temperature),
prediction-set coverage, refer and reject counts, and the misclassified images
with thumbnails (also in ``misclassified.csv``).
Every table and plot title says where its numbers were taken ("at threshold
0.31", "at argmax"): a sensitivity without its threshold cannot be checked.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from edgedx.card import ModelCard
from edgedx.errors import EdgeDxError, MissingDependencyError
from edgedx.runtime.io.image_io import read_image, to_rgb_uint8
from edgedx.runtime.outputs.names import csv_text, printable_name
from edgedx.runtime.outputs.plots import where_taken

if TYPE_CHECKING:
    from edgedx.runtime.evaluate import EvaluationReport

log = logging.getLogger(__name__)

HEADLINE = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "auc")
MAX_THUMBNAILS = 50  # a page a browser opens quickly; the CSV lists them all
THUMBNAIL_PX = 128  # longest side
THUMBNAIL_MIN_PX = 64  # tiny images (28 px MedMNIST) are enlarged, pixel for pixel, to at least this


def write_evaluation(
    out: Path, report: EvaluationReport, card: ModelCard, truth: np.ndarray, probs: np.ndarray,
    *, thumbnails: Sequence[Path | np.ndarray] = (),
) -> dict[str, Path]:
    """``evaluation.json``, ``misclassified.csv``, ``roc.png``, ``confusion_matrix.png``, ``radar.png``,
    ``reliability.png`` and ``report.html`` in ``out``. ``thumbnails`` are the images of ``report.misclassified``, in its order."""
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "evaluation.json"}
    written["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    written["misclassified"] = write_misclassified_csv(out / "misclassified.csv", report, card)
    m = report.metrics
    where = where_taken(card.task, card.threshold)
    binary = card.task == "binary"
    try:
        from edgedx.runtime.outputs import plots

        written["roc"] = plots.plot_roc(
            truth, probs, card.class_names, out / "roc.png", positive_index=card.positive_index,
            operating_threshold=(0.5 if card.threshold is None else card.threshold) if binary else None,
        )
        written["confusion"] = plots.plot_confusion_matrix(m["confusion"], card.class_names, out / "confusion_matrix.png", where=where)
        radar_title = card.positive_class if binary else "macro mean over classes"
        written["radar"] = plots.plot_radar(plots.six_metrics(m, card.positive_class), out / "radar.png", title=radar_title or "", where=where)
        if report.calibration:
            cal = report.calibration
            written["reliability"] = plots.plot_reliability(
                cal["before"]["reliability"], cal["after"]["reliability"], out / "reliability.png",
                **plots.reliability_labels(card.task, card.positive_class), where="this data", calibrated=cal["method"] != "none",
            )
    except MissingDependencyError:
        pass  # the HTML still carries every number; plots need 'edgedx[plots]'
    written["html"] = out / "report.html"
    written["html"].write_text(render_html(report, card, written, thumbnails=thumbnails), encoding="utf-8")
    return written


def probability_column(card: ModelCard) -> str:
    """The CSV column of the probability shown per misclassified image: ``p_<positive class>`` or ``p_predicted``."""
    return f"p_{card.positive_class}" if card.task == "binary" else "p_predicted"


def write_misclassified_csv(path: Path, report: EvaluationReport, card: ModelCard) -> Path:
    """One row per misclassified image (image, true, predicted, p_<class>, threshold), most confidently wrong first.

    Names go through :func:`csv_text`: a file called ``=cmd.png`` must not run in a spreadsheet."""
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "true", "predicted", csv_text(probability_column(card)), "threshold"])
        for r in report.misclassified:
            threshold = "argmax" if r["threshold"] is None else f"{r['threshold']:g}"
            writer.writerow([csv_text(r["image"]), csv_text(r["true"]), csv_text(r["predicted"]), f"{r['probability']:.6f}", threshold])
    return path


def thumbnail(image: Path | str | np.ndarray) -> str:
    """``<img>`` of ``image`` at most :data:`THUMBNAIL_PX` a side (JPEG, base64), or a note saying why there is none.

    Why a note and never an exception: one unreadable, moved or huge file must
    not cost the clinic the whole report."""
    try:
        pixels = read_image(image) if isinstance(image, (str, Path)) else to_rgb_uint8(np.asarray(image))
        h, w = pixels.shape[:2]
        longest = max(h, w)
        if longest > THUMBNAIL_PX:
            f = THUMBNAIL_PX / longest
            pixels = cv2.resize(pixels, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
        elif longest < THUMBNAIL_MIN_PX:
            k = -(-THUMBNAIL_MIN_PX // longest)  # a whole factor: every pixel stays a visible square
            pixels = cv2.resize(pixels, (w * k, h * k), interpolation=cv2.INTER_NEAREST)
        ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
        if not ok:
            raise ValueError("OpenCV could not encode it as JPEG")
    except (EdgeDxError, OSError, ValueError, MemoryError, cv2.error) as exc:
        log.warning("no thumbnail for a misclassified image: %s", exc)
        return f"<span class=warn>no thumbnail: {html.escape(printable_name(str(exc)))}</span>"
    return f'<img class=thumb alt="thumbnail" src="data:image/jpeg;base64,{base64.b64encode(encoded.tobytes()).decode()}">'


def misclassified_section(report: EvaluationReport, card: ModelCard, thumbnails: Sequence[Path | np.ndarray], where: str) -> str:
    """The "Misclassified images" section: a table, most confidently wrong first, with up to
    :data:`MAX_THUMBNAILS` thumbnails, and how many more are only in ``misclassified.csv``."""
    e = html.escape
    wrong = report.misclassified
    head = f"<h2>Misclassified images, {e(where)}</h2>"
    if not wrong:
        return f"{head}\n<p>None: every scored image's decision matches its label.</p>"
    shown = wrong[:MAX_THUMBNAILS]
    p_label = f"p({e(card.positive_class)})" if card.task == "binary" else "p(predicted)"
    rows = "".join(
        f"<tr><td>{thumbnail(thumbnails[i]) if i < len(thumbnails) else '<span class=warn>no image given</span>'}</td>"
        f"<td class=name>{e(printable_name(r['image']))}</td><td>{e(r['true'])}</td><td>{e(r['predicted'])}</td>"
        f"<td>{r['probability']:.3f}</td></tr>"
        for i, r in enumerate(shown)
    )
    left_out = len(wrong) - len(shown)
    more = f"<p>{left_out} more not shown here; all {len(wrong)} are in misclassified.csv.</p>" if left_out else ""
    return (
        f"{head}\n<p>{len(wrong)} of {report.metrics['n']} images, the most confidently wrong first; also in misclassified.csv.</p>\n"
        f"<table class=wrong><tr><th>image</th><th>name</th><th>true</th><th>predicted</th><th>{p_label}</th></tr>{rows}</table>\n{more}"
    )


def trust_section(report: EvaluationReport, where: str) -> str:
    """Calibration before → after, prediction-set coverage, refer and reject: whether a probability and a "refer"
    on this page can be taken at their word."""
    e = html.escape
    cal, ab = report.calibration, report.abstention

    def fmt(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}"

    parts = ["<h2>Calibration and referral</h2>"]
    if cal:
        temps = ", ".join(f"{t:.3g}" for t in cal["temperature"]) or "none on the card"
        rows = "".join(f"<tr><td>{k}</td><td>{fmt(cal['before'][k])}</td><td>{fmt(cal['after'][k])}</td></tr>" for k in ("ece", "brier"))
        parts.append(
            f"<p>Temperature {e(temps)}. Before: the network's own probabilities; after: as deployed (lower is better; ECE over 10 bins).</p>"
            f"<table><tr><th>metric</th><th>before</th><th>after</th></tr>{rows}</table>"
        )
    if ab:
        if ab.get("empirical_coverage") is not None:
            target = "none on the card" if ab["coverage_target"] is None else f"{ab['coverage_target']:.0%}"
            parts.append(f"<p>Prediction sets hold the true class for {ab['empirical_coverage']:.1%} of {ab['n_with_sets']} images "
                         f"(target {e(target)}, mean set size {ab['mean_set_size']:.2f}).</p>")
        keys = [k for k in ("accuracy", "sensitivity", "specificity") if k in ab["all"]]
        rows = "".join(f"<tr><td>{k}</td><td>{fmt(ab['not_referred'][k])}</td><td>{fmt(ab['all'][k])}</td></tr>" for k in keys)
        reasons = ", ".join(f"{e(r)}: {n}" for r, n in ab["refer_reasons"].items())
        parts.append(
            f"<p>Referred to a person: {ab['n_referred']} of {ab['all']['n']}{f' ({reasons})' if reasons else ''}.</p>"
            f"<table><tr><th>{e(where)}</th><th>not referred (n={ab['not_referred']['n']})</th><th>all (n={ab['all']['n']})</th></tr>{rows}</table>"
        )
    if report.rejected:
        parts.append(f"<p class=warn>{len(report.rejected)} image(s) rejected by the image-quality gate are not scored (listed in evaluation.json).</p>")
    return "\n".join(parts) if len(parts) > 1 else ""


def render_html(report: EvaluationReport, card: ModelCard, files: dict[str, Path], *, thumbnails: Sequence[Path | np.ndarray] = ()) -> str:
    """The page; every table heading says where its numbers were taken (:func:`where_taken`)."""
    m = report.metrics
    ci = m.get("ci95") or {}
    sizes, methods = m.get("ci95_n") or {}, m.get("ci95_method") or {}
    e = html.escape

    def fmt(v: Any) -> str:
        return "—" if v is None else f"{v:.3f}"

    def interval(key: str) -> str:
        """The 95% interval, how it was made and on how many images (a proportion on 10 images is wide)."""
        if not ci.get(key):
            return "—"
        low, high = ci[key]
        how = f" ({e(methods[key])}, n={sizes[key]})" if key in sizes and key in methods else ""
        return f"{low:.3f} – {high:.3f}{how}"

    binary = card.task == "binary"
    where = where_taken(card.task, card.threshold)
    rows = "".join(
        f"<tr><td>{e(k.replace('_', ' '))}</td><td>{fmt(m.get(k, m.get('macro_auc') if k == 'auc' else None))}</td>"
        f"<td>{interval(k)}</td>"
        + (f"<td>{fmt((m.get('at_0.5') or {}).get(k))}</td>" if binary else "")
        + "</tr>"
        for k in HEADLINE
    )
    header = "".join(f"<th>{e(c)}</th>" for c in card.class_names)
    confusion = "".join(
        f"<tr><th>{e(name)}</th>{''.join(f'<td>{v}</td>' for v in row)}</tr>" for name, row in zip(card.class_names, m["confusion"])
    )
    images = "".join(
        f'<img class=plot alt="{e(key)}" src="data:image/png;base64,{base64.b64encode(files[key].read_bytes()).decode()}">'
        for key in ("roc", "confusion", "radar", "reliability")
        if key in files
    )
    if not binary:
        threshold = "none: the most probable class is the decision (argmax)"
    else:
        threshold = "0.5 (none on the card)" if card.threshold is None else f"{card.threshold:.3f}"
    failed = f"<p class=warn>{len(report.failed)} image(s) could not be read and are not counted.</p>" if report.failed else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>EdgeDx evaluation: {e(card.arch)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:.3em .6em;text-align:right}}th{{background:#f0f0f0}}img.plot{{width:32%;min-width:15em}}
img.thumb{{max-width:{THUMBNAIL_PX}px;max-height:{THUMBNAIL_PX}px}}td.name{{text-align:left;word-break:break-all}}
.use{{background:#fff4d6;padding:.6em;border-left:4px solid #e0a800}}.warn{{color:#a00}}</style></head><body>
<h1>Evaluation of {e(Path(report.model).name)}</h1>
<p class=use><b>Intended use:</b> {e(card.intended_use)}</p>
<p>{e(card.task)} classifier ({e(card.arch)}, input {card.input_size[1]}×{card.input_size[0]}) on <b>{e(report.data)}</b>:
{m['n']} images, diagnosed through the deployed artefact exactly as <code>edgedx diagnose</code> does.
Operating threshold: {threshold}{f" for '{e(card.positive_class)}'" if binary and card.positive_class else ""}.</p>
{failed}
<table><tr><th>metric</th><th>{e(where)}</th><th>95% interval, {e(where)}</th>{"<th>at threshold 0.50</th>" if binary else ""}</tr>{rows}</table>
<h2>Confusion matrix, {e(where)} (rows: truth, columns: model)</h2>
<table><tr><th></th>{header}</tr>{confusion}</table>
{images}
{trust_section(report, where)}
{misclassified_section(report, card, thumbnails, where)}
<p><small>Model card schema {card.schema_version}, created {e(card.provenance.created_at)} by EdgeDx {e(card.provenance.edgedx_version)}.</small></p>
</body></html>
"""
