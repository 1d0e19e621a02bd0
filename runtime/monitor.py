"""Drift monitoring: do the images a deployed model now sees still look like the ones it was trained on?

Why: a classifier answers confidently on images unlike its training images (a
new camera, a paler stain, a dimmer lamp), and its figures stop meaning what
the card says. Nobody labels every deployed case, but every ``diagnose``
record already carries what is needed to notice: the top-class confidence,
whether the case was referred or refused (and why), and the image-quality
measures (brightness, focus, clipping, colour). :func:`monitor` reads a
results file (JSON Lines or CSV, as ``diagnose`` writes them), summarises it
overall and over consecutive windows of ``window`` records, and compares the
last ``window`` records with what the card recorded at training or site
recalibration time:

- the training images' percentiles of each quality measure
  (``card.quality.reference``): a median outside the 1st–99th percentile is a
  shift, outside the 5th–95th worth watching;
- the refer rate and mean top-class confidence measured when the card was
  fitted (``card.abstention.fitted_on`` ``refer_rate_on_<split>``,
  ``card.calibration.fitted_on`` / ``card.metrics`` ``mean_confidence*``);
- the reject rate: the quality limits sit outside the training images' 1st–99th
  percentiles, so about :data:`EXPECTED_REJECT_RATE` of training-like images
  are refused (or the reference's own ``reject_rate`` when it records one).

Each flag is one sentence that says what differs and what to check. What the
card cannot support (no reference, no recorded refer rate) is said, not
guessed. Monitoring informs: it never changes a result. Torch- and onnx-free.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgedx.card import ModelCard, sidecar_path
from edgedx.errors import CardError, EdgeDxError, InputError
from edgedx.runtime.outputs.guards import manifest_path
from edgedx.runtime.outputs.names import json_lines

log = logging.getLogger(__name__)

MEASURES = ("brightness", "focus", "clipped", "colour", "short_side", "blockiness")
EXPECTED_REJECT_RATE = 0.02  # limits outside the 1st-99th percentiles: ~2% of training-like images refused at most
Z95 = 1.959963984540054
# what a measure's median outside the training range means, and what to check: (below, above); None: harmless
ADVICE: dict[str, tuple[str | None, str | None]] = {
    "brightness": (
        "the images are darker than the training images — check the illumination and exposure",
        "the images are brighter than the training images — check the illumination and exposure",
    ),
    "focus": (
        "the images are blurrier than the training images — check the focus and the magnification",
        "the images are sharper or noisier than the training images — check the camera, its resolution and noise",
    ),
    "clipped": (None, "more pixels are over- or under-exposed than in the training images — check the exposure"),
    "colour": (
        "the colours are paler than in the training images (weaker stain or a colour cast) — check the staining and white balance",
        "the colours are more saturated than in the training images (stronger stain or a colour cast) — check the staining and white balance",
    ),
    "short_side": ("the images are smaller at the model's scale than the training images — check the magnification and --scale", None),
    "blockiness": (None, "the images are more compressed (JPEG blocks) than the training images — check the camera's or the upload's compression settings"),
}


@dataclass(frozen=True)
class MonitorOptions:
    """``window``: records per rolling window (flags judge the last one); ``min_records``: fewer diagnosed
    records in it are too few to judge; ``confidence_drop`` / ``rate_margin``: the smallest changes worth a flag
    (they must also lie outside the window's own sampling error)."""

    window: int = 100
    min_records: int = 30
    confidence_drop: float = 0.1
    rate_margin: float = 0.05

    def __post_init__(self) -> None:
        if self.window < 1 or self.min_records < 1:
            raise InputError(f"--window and the minimum records must be at least 1, got {self.window} and {self.min_records}")
        if not (0 < self.confidence_drop < 1 and 0 < self.rate_margin < 1):
            raise InputError(f"confidence drop and rate margin must be within (0, 1), got {self.confidence_drop} and {self.rate_margin}")


class DriftError(EdgeDxError):
    """``monitor --fail-on-drift``: the results show a shift from the training images (the message lists it)."""


@dataclass(frozen=True)
class Record:
    """One result as monitoring reads it, whichever format it came from."""

    decision: Any
    error: bool
    confidence: float | None
    quality: dict[str, float]
    refer_reasons: tuple[str, ...] = ()
    reject_reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Flag:
    """One finding: ``severity`` "shift" (outside what the training images showed) or "watch" (at its edge)."""

    what: str
    severity: Literal["shift", "watch"]
    message: str


@dataclass(frozen=True)
class WindowStats:
    """Records ``start``..``end`` (1-based, inclusive) summarised."""

    start: int
    end: int
    n: int
    n_errors: int
    refer_rate: float | None
    reject_rate: float | None
    confidence: dict[str, float] | None  # mean, p5, p50, p95 of the top-class probability of diagnosed images
    quality: dict[str, float] = field(default_factory=dict)  # median of each measure
    reasons: dict[str, int] = field(default_factory=dict)  # "refer: …" / "reject: …" → count
    n_referred: int = 0
    n_rejected: int = 0

    @property
    def n_answered(self) -> int:
        return self.n - self.n_errors


@dataclass(frozen=True)
class MonitorReport:
    """What :func:`monitor` found: statistics, flags, and what could not be compared (and why)."""

    results: str
    model: str | None
    n: int
    overall: WindowStats
    current: WindowStats  # the last ``window`` records: what the flags judge
    windows: tuple[WindowStats, ...]
    flags: tuple[Flag, ...]
    cannot_compare: tuple[str, ...]
    expected: dict[str, Any]
    notes: tuple[str, ...] = ()

    @property
    def drifted(self) -> bool:
        return any(f.severity == "shift" for f in self.flags)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "drifted": self.drifted}

    def raise_if_drift(self) -> None:
        """``--fail-on-drift``: a :class:`DriftError` naming every shift, so a scheduler sees a failed check."""
        shifts = [f.message for f in self.flags if f.severity == "shift"]
        if shifts:
            raise DriftError(f"{len(shifts)} shift(s) in {self.results}: " + "; ".join(shifts))


def monitor(
    results_path: str | Path, card_or_model: ModelCard | str | Path | None = None, options: MonitorOptions = MonitorOptions(),
) -> MonitorReport:
    """Summarise ``results_path`` (a ``diagnose`` JSONL or CSV) and compare its last window with the card.

    ``card_or_model``: a :class:`ModelCard`, a model file (its embedded card)
    or a card JSON (a ``.card.json`` sidecar); None compares nothing and says so.
    """
    path = Path(results_path)
    records = read_results(path)
    if not records:
        raise InputError(f"{path} holds no records; monitor reads the .jsonl or .csv that edgedx diagnose wrote")
    card, model_name, notes = _resolve_card(card_or_model, path)
    overall = window_stats(records, 0, len(records))
    windows = tuple(window_stats(records, s, min(s + options.window, len(records))) for s in range(0, len(records), options.window))
    current = window_stats(records, max(0, len(records) - options.window), len(records))
    expected, cannot = expectations(card)
    if current.n_answered < options.min_records:
        notes.append(f"only {current.n_answered} diagnosed record(s) in the last window: too few to judge a shift (at least {options.min_records})")
        flags: list[Flag] = []
    else:
        flags = [*quality_flags(current, expected), *rate_flags(current, expected, options), *confidence_flags(current, expected, options)]
        cannot += _missing_in_records(current, expected)
    for flag in flags:
        log.info("monitor: %s", flag.message)
    return MonitorReport(str(path), model_name, len(records), overall, current, windows, tuple(flags), tuple(cannot), expected, tuple(notes))


# -- reading results -----------------------------------------------------------------------


def read_results(path: Path) -> list[Record]:
    """Every record of a ``diagnose`` results file, JSON Lines or CSV by the suffix; a torn last line is skipped."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise InputError(f"{path}: monitor reads the .jsonl or .csv files edgedx diagnose writes, got {suffix or 'no suffix'!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"results file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    return _jsonl(text, path) if suffix == ".jsonl" else _csv(text, path)


def _jsonl(text: str, path: Path) -> list[Record]:
    lines = list(json_lines(text))
    records = []
    for i, (number, line) in enumerate(lines):
        try:
            data = json.loads(line)
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError:
            if i == len(lines) - 1 and not text.endswith("\n"):
                log.warning("%s ends in a partial record (a run still writing, or interrupted); it is not counted", path)
                break
            raise InputError(f"{path} line {number} is not an EdgeDx record; monitor reads the file edgedx diagnose wrote") from None
        records.append(_record(data))
    return records


def _record(data: dict[str, Any]) -> Record:
    """A JSON record (or a CSV row made into one) as monitoring reads it."""
    probabilities = data.get("probabilities") or {}
    values = [float(v) for v in probabilities.values() if _number(v) is not None] if isinstance(probabilities, dict) else []
    quality = data.get("quality")
    measures = {m: float(quality[m]) for m in MEASURES if isinstance(quality, dict) and _number(quality.get(m)) is not None}
    return Record(
        data.get("decision"), bool(data.get("error")), max(values) if values else None, measures,
        _reasons(data.get("refer_reasons")), _reasons(data.get("reject_reasons")),
    )


def _csv(text: str, path: Path) -> list[Record]:
    """CSV rows: ``p_<class>`` columns are the probabilities; quality from ``quality_measures`` (``focus=3.5;
    brightness=120``, as diagnose writes it), a ``quality`` cell (JSON) or one column per measure (``quality_<m>``
    or ``<m>``); reasons as JSON lists or ``;``-joined text."""
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames or "input" not in reader.fieldnames:
        raise InputError(f"{path} has no EdgeDx header row (an 'input' column); monitor reads the file edgedx diagnose wrote")
    records = []
    for row in reader:
        if None in row:  # more cells than the header: not a row diagnose wrote (or a torn one)
            raise InputError(f"{path} line {reader.line_num} has more cells than its header; monitor reads the file edgedx diagnose wrote")
        quality = _pairs(row.get("quality_measures")) or _json_cell(row.get("quality"))
        if not isinstance(quality, dict):
            quality = {m: row.get(f"quality_{m}", row.get(m)) for m in MEASURES}
        data = {
            "decision": row.get("decision") or None, "error": row.get("error"),
            "probabilities": {k[2:]: _number(v) for k, v in row.items() if k.startswith("p_") and _number(v) is not None},
            "quality": {m: _number(v) for m, v in quality.items()},
            "refer_reasons": _json_cell(row.get("refer_reasons")), "reject_reasons": _json_cell(row.get("reject_reasons")),
        }
        records.append(_record(data))
    return records


def _pairs(value: str | None) -> dict[str, str]:
    """``"focus=3.5; brightness=120"`` → {"focus": "3.5", "brightness": "120"} (empty for an empty cell)."""
    pairs = (item.split("=", 1) for item in (value or "").split(";") if "=" in item)
    return {k.strip(): v.strip() for k, v in pairs}


def _json_cell(value: str | None) -> Any:
    """A CSV cell that may hold JSON (a list, an object); plain text as it is."""
    if not value:
        return None
    text = value.strip()
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except ValueError:
            return text
    return text


def _reasons(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(";") if v.strip())
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value if v)
    return ()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# -- statistics ------------------------------------------------------------------------------


def window_stats(records: Sequence[Record], start: int, end: int) -> WindowStats:
    """Rates, confidence and quality medians of ``records[start:end]``.

    The reject rate is over the images read; the refer rate and the confidence
    over the images diagnosed (not refused), as validation measured them.
    """
    rows = records[start:end]
    answered = [r for r in rows if not r.error]
    rejected = [r for r in answered if r.decision == "reject"]
    diagnosed = [r for r in answered if r.decision != "reject"]
    referred = [r for r in diagnosed if r.decision == "refer"]
    conf = np.asarray([r.confidence for r in diagnosed if r.confidence is not None], np.float64)
    confidence = None
    if conf.size:
        confidence = {"mean": float(conf.mean()), "sd": float(conf.std()), "n": int(conf.size),
                      **{f"p{q}": float(np.percentile(conf, q)) for q in (5, 50, 95)}}
    quality = {}
    for m in MEASURES:
        values = [r.quality[m] for r in answered if m in r.quality]
        if values:
            quality[m] = float(np.median(values))
    reasons = Counter([f"refer: {x}" for r in referred for x in r.refer_reasons] + [f"reject: {x}" for r in rejected for x in r.reject_reasons])
    return WindowStats(
        start + 1, end, len(rows), len(rows) - len(answered),
        len(referred) / len(diagnosed) if diagnosed else None, len(rejected) / len(answered) if answered else None,
        confidence, quality, dict(reasons.most_common()), len(referred), len(rejected),
    )


# -- what the card expects ---------------------------------------------------------------------


def expectations(card: ModelCard | None) -> tuple[dict[str, Any], list[str]]:
    """What the card recorded to compare with, and a sentence for each thing it cannot support."""
    if card is None:
        return {}, ["no model given: confidence, refer and reject rates and image quality cannot be compared with the training "
                    "images (pass --model, the model that wrote these results)"]
    expected: dict[str, Any] = {}
    cannot = []
    percentiles = card.quality.reference.get("percentiles") if isinstance(card.quality.reference, dict) else None
    if isinstance(percentiles, dict) and percentiles:
        expected["quality"] = percentiles
    else:
        cannot.append("the card holds no training reference for image quality (a model trained before EdgeDx recorded one): "
                      "brightness, focus, clipping and colour cannot be compared; retrain to record it")
    refer = _recorded(card.abstention.fitted_on, "refer_rate") or _recorded(card.metrics, "refer_rate")
    if refer is not None:
        expected["refer_rate"] = refer
    elif card.abstention.qhat is not None or card.abstention.dispersion_limit is not None:
        cannot.append("the card records no refer rate measured when its refer rules were fitted: the refer rate cannot be compared")
    confidence = _recorded(card.calibration.fitted_on, "mean_confidence") or _recorded(card.metrics, "mean_confidence")
    if confidence is not None:
        expected["mean_confidence"] = confidence
    else:
        cannot.append("the card records no mean top-class confidence on its validation (or site) images: confidence cannot be compared")
    limits = card.quality
    if any(v is not None for v in (limits.focus_min, limits.clipped_max, limits.brightness_range, limits.colour_range, limits.min_short_side)):
        recorded = _number(card.quality.reference.get("reject_rate"))
        expected["reject_rate"] = (recorded, "on the training images") if recorded is not None else (
            EXPECTED_REJECT_RATE, "at most, as the quality limits sit outside the training images' 1st–99th percentiles")
    return expected, cannot


def _recorded(source: dict[str, Any], stem: str) -> tuple[float, str] | None:
    """``(value, where)`` of ``stem`` or ``stem_on_<split>`` in a fitted_on/metrics dict (validation preferred)."""
    found = {k: _number(v) for k, v in source.items() if k == stem or k.startswith(f"{stem}_on_")}
    for key in (f"{stem}_on_val", f"{stem}_on_site", stem, *sorted(found)):
        if found.get(key) is not None:
            split = key[len(stem) + 4 :] if key != stem else str(source.get("split", ""))
            return float(found[key]), _where(split)  # type: ignore[arg-type]
    return None


def _where(split: str) -> str:
    return {"val": "on validation", "site": "on the site cases", "test": "on the test split"}.get(split, f"on {split}" if split else "when fitted")


def _missing_in_records(current: WindowStats, expected: dict[str, Any]) -> list[str]:
    """References the card has but the results cannot be compared with (written before diagnose recorded quality)."""
    if "quality" in expected and not current.quality:
        return ["the results hold no image-quality measures (written by an EdgeDx before the quality gate): image quality cannot be compared"]
    return []


# -- flags ----------------------------------------------------------------------------------------------


def quality_flags(current: WindowStats, expected: dict[str, Any]) -> list[Flag]:
    """A measure's median over the last window against the training images' percentiles."""
    flags = []
    for m, median in current.quality.items():
        pct = (expected.get("quality") or {}).get(m)
        if not isinstance(pct, dict) or any(_number(pct.get(q)) is None for q in ("1", "5", "95", "99")):
            continue
        below, above = ADVICE[m]
        p = {q: float(pct[q]) for q in ("1", "5", "95", "99")}
        where = f"over the last {current.n_answered} images"
        if below and median < p["1"]:
            flags.append(Flag(m, "shift", f"{m} median {_num(median)} {where} is below the training images' 1st percentile {_num(p['1'])}: {below}"))
        elif above and median > p["99"]:
            flags.append(Flag(m, "shift", f"{m} median {_num(median)} {where} is above the training images' 99th percentile {_num(p['99'])}: {above}"))
        elif below and median < p["5"]:
            flags.append(Flag(m, "watch", f"{m} median {_num(median)} {where} is below the training images' 5th percentile {_num(p['5'])}: {below}"))
        elif above and median > p["95"]:
            flags.append(Flag(m, "watch", f"{m} median {_num(median)} {where} is above the training images' 95th percentile {_num(p['95'])}: {above}"))
    return flags


def rate_flags(current: WindowStats, expected: dict[str, Any], options: MonitorOptions) -> list[Flag]:
    """Refer and reject rates above what the card expects, by at least ``rate_margin`` and beyond their 95% interval."""
    flags = []
    checks = (("refer_rate", current.n_referred, current.n_answered - current.n_rejected, "refer"),
              ("reject_rate", current.n_rejected, current.n_answered, "reject"))
    for key, k, n, word in checks:
        if key not in expected or n == 0:
            continue
        rate, where = expected[key]
        observed = k / n
        low = _wilson_low(k, n)
        if observed - rate >= options.rate_margin and low > rate:
            top = [f"{r.split(': ', 1)[1]} ({c})" for r, c in current.reasons.items() if r.startswith(word)][:3]
            why = f"; most often: {', '.join(top)}" if top else ""
            flags.append(Flag(key, "shift", f"{word} rate {observed:.0%} over the last {n} images vs {rate:.0%} expected {where}{why}"))
    return flags


def confidence_flags(current: WindowStats, expected: dict[str, Any], options: MonitorOptions) -> list[Flag]:
    """Mean top-class confidence against the card's, by at least ``confidence_drop`` and beyond 3 standard errors."""
    conf = current.confidence
    if conf is None or "mean_confidence" not in expected:
        return []
    value, where = expected["mean_confidence"]
    gap = conf["mean"] - value
    noise = 3 * conf["sd"] / math.sqrt(conf["n"])
    if abs(gap) < max(options.confidence_drop, noise):
        return []
    if gap < 0:
        return [Flag("confidence", "shift", f"mean top-class confidence {conf['mean']:.2f} over the last {conf['n']} images vs {value:.2f} "
                     f"expected {where}: the model is less sure than it was; the images may differ from the training images")]
    return [Flag("confidence", "watch", f"mean top-class confidence {conf['mean']:.2f} over the last {conf['n']} images vs {value:.2f} "
                 f"expected {where}: the model is surer than it was; check that the cases are not easier or duplicated")]


def _wilson_low(k: int, n: int) -> float:
    """The lower end of the Wilson 95% interval of k/n."""
    p = k / n
    centre = p + Z95 * Z95 / (2 * n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95 * Z95 / (4 * n * n))
    return max(0.0, (centre - half) / (1 + Z95 * Z95 / n))


def _num(x: float) -> str:
    """A measure for a sentence: 62, 7.4, 0.031."""
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.1f}" if abs(x) >= 1 else f"{x:.3f}"


# -- the card ---------------------------------------------------------------------------------


def _resolve_card(card_or_model: ModelCard | str | Path | None, results: Path) -> tuple[ModelCard | None, str | None, list[str]]:
    """The card to compare with, the model's name, and a note when the results were written by another model."""
    if card_or_model is None or isinstance(card_or_model, ModelCard):
        return card_or_model, None, []
    path = Path(card_or_model)
    if path.suffix.lower() == ".json":
        return load_card_json(path), str(path), []
    from edgedx.runtime.backends.session import is_engine_file, open_session
    from edgedx.runtime.model import resolve_model_path

    resolved = resolve_model_path(path)
    if is_engine_file(resolved):
        card, sha = load_card_json(sidecar_path(resolved)), None
    else:
        session = open_session(resolved, "cpu")
        card, sha = session.card, session.sha256
        session.close()
    return card, str(resolved), _same_model(results, sha, resolved)


def load_card_json(path: Path) -> ModelCard:
    """A card from a JSON file: a card itself, or a sidecar/engine document holding one under ``card``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"card file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise CardError(f"{path} is not a readable card JSON ({exc})") from None
    return ModelCard.from_dict(data["card"] if isinstance(data, dict) and "card" in data else data)


def _same_model(results: Path, sha: str | None, model: Path) -> list[str]:
    """The results' run manifest names the sha256 of the model that wrote them; another model's card misleads."""
    manifest = manifest_path(results)
    try:
        recorded = json.loads(manifest.read_text(encoding="utf-8")).get("model_sha256") if manifest.is_file() else None
    except (OSError, ValueError, AttributeError):
        recorded = None
    if sha and recorded and recorded != sha:
        note = (f"these results were written by another model (sha256 {recorded[:12]}… in {manifest.name}) than {model.name} "
                f"({sha[:12]}…): its card's references may not apply; pass the model that wrote them")
        log.warning("%s", note)
        return [note]
    return []
