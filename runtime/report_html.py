"""A one-page evaluation report a clinician can read, plus its JSON and plots.

Self-contained HTML (plots embedded as PNG data), no scripts, printable. It
leads with the intended use from the card, then the headline numbers with 95%
intervals at the operating threshold, the confusion matrix, ROC and radar.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgedx.card import ModelCard
from edgedx.errors import MissingDependencyError

if TYPE_CHECKING:
    from edgedx.runtime.evaluate import EvaluationReport

HEADLINE = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "precision", "f1", "auc")


def write_evaluation(out: Path, report: EvaluationReport, card: ModelCard, truth: np.ndarray, probs: np.ndarray) -> dict[str, Path]:
    """``evaluation.json``, ``roc.png``, ``confusion_matrix.png``, ``radar.png`` and ``report.html`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "evaluation.json"}
    written["json"].write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    m = report.metrics
    try:
        from edgedx.runtime import plots

        written["roc"] = plots.plot_roc(truth, probs, card.class_names, out / "roc.png", positive_index=card.positive_index, operating_threshold=card.threshold)
        written["confusion"] = plots.plot_confusion_matrix(m["confusion"], card.class_names, out / "confusion_matrix.png")
        written["radar"] = plots.plot_radar(plots.six_metrics(m, card.positive_class), out / "radar.png", title="at the operating threshold")
    except MissingDependencyError:
        pass  # the HTML still carries every number; plots need 'edgedx[plots]'
    written["html"] = out / "report.html"
    written["html"].write_text(render_html(report, card, written), encoding="utf-8")
    return written


def render_html(report: EvaluationReport, card: ModelCard, files: dict[str, Path]) -> str:
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

    rows = "".join(
        f"<tr><td>{e(k.replace('_', ' '))}</td><td>{fmt(m.get(k, m.get('macro_auc') if k == 'auc' else None))}</td>"
        f"<td>{interval(k)}</td>"
        f"<td>{fmt((m.get('at_0.5') or {}).get(k))}</td></tr>"
        for k in HEADLINE
    )
    header = "".join(f"<th>{e(c)}</th>" for c in card.class_names)
    confusion = "".join(
        f"<tr><th>{e(name)}</th>{''.join(f'<td>{v}</td>' for v in row)}</tr>" for name, row in zip(card.class_names, m["confusion"])
    )
    images = "".join(
        f'<img alt="{e(key)}" src="data:image/png;base64,{base64.b64encode(files[key].read_bytes()).decode()}">'
        for key in ("roc", "confusion", "radar")
        if key in files
    )
    threshold = "0.5 (none on the card)" if card.threshold is None else f"{card.threshold:.3f}"
    failed = f"<p class=warn>{len(report.failed)} image(s) could not be read and are not counted.</p>" if report.failed else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>EdgeDx evaluation: {e(card.arch)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto;color:#222}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:.3em .6em;text-align:right}}th{{background:#f0f0f0}}img{{width:32%;min-width:15em}}
.use{{background:#fff4d6;padding:.6em;border-left:4px solid #e0a800}}.warn{{color:#a00}}</style></head><body>
<h1>Evaluation of {e(Path(report.model).name)}</h1>
<p class=use><b>Intended use:</b> {e(card.intended_use)}</p>
<p>{e(card.task)} classifier ({e(card.arch)}, input {card.input_size[1]}×{card.input_size[0]}) on <b>{e(report.data)}</b>:
{m['n']} images, diagnosed through the deployed artefact exactly as <code>edgedx diagnose</code> does.
Operating threshold: {threshold}{f" for '{e(card.positive_class)}'" if card.positive_class else ""}.</p>
{failed}
<table><tr><th>metric</th><th>at the operating threshold</th><th>95% interval (bootstrap)</th><th>at 0.5</th></tr>{rows}</table>
<h2>Confusion matrix (rows: truth, columns: model)</h2>
<table><tr><th></th>{header}</tr>{confusion}</table>
{images}
<p><small>Model card schema {card.schema_version}, created {e(card.provenance.created_at)} by EdgeDx {e(card.provenance.edgedx_version)}.</small></p>
</body></html>
"""
