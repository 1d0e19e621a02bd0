"""Self-test vectors: an artefact proves itself on the machine that runs it.

Why: parity measured at export says nothing about the target. int8 and fp16
results depend on the target's kernels (the same int8 file passes on one x86
CPU and fails on another), and a TensorRT engine is tied to its GPU. So export
stores, inside every artefact, a few real crops (uint8, cut by the card's crop
policy from the run's validation images) with the probabilities the fp32
PyTorch model gives them through the deployed preprocessing, and the
tolerances of the artefact's precision. :func:`run_selftest` replays them on
whatever session runs here and says whether this machine reproduces them.

The vectors double as a conformance suite for a foreign implementation: the
crops are what a client feeds after cropping, the reference is what it must
get (see ``docs/integration.md``).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from edgedx.card import ModelCard
from edgedx.errors import ModelError
from edgedx.runtime.model import decide
from edgedx.runtime.preprocess import model_input, to_probabilities

SELFTEST_KEY = "edgedx.selftest"  # ONNX metadata key, and the engine sidecar's block
FORMAT = 1
FORMAT_EXACT = 2  # vectors that also carry the exact int8 arithmetic's probabilities (int8 files)
READABLE_FORMATS = (FORMAT, FORMAT_EXACT)


@dataclass(frozen=True)
class Tolerances:
    """How far this precision may stray from the fp32 reference on the vectors."""

    max_prob_delta: float  # largest |Δp| of any class on any vector
    min_agreement: float  # share of vectors whose top-1 class and thresholded decision both agree
    max_mean_exact_delta: float | None = None  # int8: mean |Δp| from the file's exact int8 arithmetic

    def to_plain(self) -> dict[str, float]:
        """The set limits only, so vectors without an exact reference read in EdgeDx versions that predate it."""
        return {k: v for k, v in asdict(self).items() if v is not None}


# Per precision, how far an artefact may stray from the fp32 PyTorch reference: the single source of these numbers
# (export's parity gates use them too; the runtime cannot import export).
SELFTEST_TOLERANCES = {
    "fp32": Tolerances(max_prob_delta=1e-3, min_agreement=1.0),
    "fp16": Tolerances(max_prob_delta=0.05, min_agreement=0.98),
    "int8": Tolerances(max_prob_delta=1.0, min_agreement=0.95, max_mean_exact_delta=0.045),
}
# int8 vectors carry the file's exact arithmetic, and top-1/decision agreement is counted against it: the target
# must compute what the file means (its quality against fp32 was judged at export on hundreds of images).
# Why 0.045 on 32 vectors (N_INT8_VECTORS at export): on 763 real malaria cells, an AVX2 CPU without VNNI
# running 8-bit weights (saturating) strays from the exact arithmetic by mean |Δp| 0.095, and a conforming run
# (7-bit weights, 4 layers kept float) by 0.022; over 5000 random sets of 32 vectors, 0.045 refused 99.9% of the
# saturating sets and 1% of the conforming ones (0.0% at 0.05). An outlier vector cannot decide it alone.


@dataclass(frozen=True)
class SelfTestVectors:
    crops: np.ndarray  # (n, H, W, 3) uint8 RGB: the crops the runtime cuts, before preprocessing
    reference: np.ndarray  # (n, C) float32: the fp32 PyTorch model's probabilities through the card's preprocessing
    precision: str  # the artefact's precision the tolerances are for
    tolerances: Tolerances
    source: str  # where the crops came from (e.g. "val split of runs/isic")
    # int8: the probabilities the file's own quantised arithmetic gives, computed exactly (no saturation) at export;
    # a target whose int8 kernels stray from them rounds or saturates differently, whatever its agreement with fp32
    exact: np.ndarray | None = None
    about: str = ""  # what the file is and where it is meant to run, for refusals (int8 flavours)

    @property
    def format(self) -> int:
        return FORMAT if self.exact is None else FORMAT_EXACT

    def _common(self) -> dict[str, Any]:
        common = {"format": self.format, "precision": self.precision, "tolerances": self.tolerances.to_plain(), "source": self.source}
        return {**common, "about": self.about} if self.about else common

    def to_text(self) -> str:
        """JSON with the arrays as base64 of a compressed .npz: fits ONNX metadata and a JSON sidecar alike."""
        buffer = io.BytesIO()
        arrays = {"crops": self.crops.astype(np.uint8), "reference": self.reference.astype(np.float32)}
        if self.exact is not None:
            arrays["exact"] = self.exact.astype(np.float32)
        np.savez_compressed(buffer, **arrays)
        return json.dumps({**self._common(), "npz_base64": base64.b64encode(buffer.getvalue()).decode("ascii")})

    def to_plain(self) -> dict[str, Any]:
        """For JSON sidecars that any language reads: raw uint8 crops (C order, shape given) and plain lists."""
        plain = {
            **self._common(),
            "crops_shape": list(self.crops.shape), "crops_base64": base64.b64encode(np.ascontiguousarray(self.crops, np.uint8).tobytes()).decode("ascii"),
            "reference": [[float(v) for v in row] for row in self.reference],
        }
        if self.exact is not None:
            plain["exact"] = [[float(v) for v in row] for row in self.exact]
        return plain

    @classmethod
    def from_plain(cls, data: dict[str, Any]) -> SelfTestVectors:
        crops = np.frombuffer(base64.b64decode(data["crops_base64"]), np.uint8).reshape(data["crops_shape"])
        reference = np.asarray(data["reference"], np.float32).reshape(len(crops), -1)
        exact = np.asarray(data["exact"], np.float32).reshape(len(crops), -1) if "exact" in data else None
        return cls(crops, reference, str(data["precision"]), Tolerances(**data["tolerances"]), str(data.get("source", "")), exact, str(data.get("about", "")))

    @classmethod
    def from_text(cls, text: str, where: str) -> SelfTestVectors:
        """Either form: the compressed one in ONNX metadata, or the plain one of a sidecar."""
        try:
            data = json.loads(text)
            if data.get("format") not in READABLE_FORMATS:
                raise ModelError(
                    f"{where}: self-test vectors in format {data.get('format')!r}; this EdgeDx reads formats "
                    f"{', '.join(map(str, READABLE_FORMATS))}: upgrade EdgeDx"
                )
            if "crops_base64" in data:
                return cls.from_plain(data)
            with np.load(io.BytesIO(base64.b64decode(data["npz_base64"])), allow_pickle=False) as arrays:
                crops, reference = arrays["crops"], arrays["reference"]
                exact = arrays["exact"] if "exact" in arrays.files else None
            tolerances = Tolerances(**data["tolerances"])
            return cls(crops, reference, str(data["precision"]), tolerances, str(data.get("source", "")), exact, str(data.get("about", "")))
        except ModelError:
            raise
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise ModelError(f"{where}: its self-test vectors are damaged ({exc}); re-export it with edgedx export") from None


@dataclass(frozen=True)
class SelfTestReport:
    """What replaying the vectors on this machine gave, and the verdict."""

    n: int
    max_prob_delta: float
    top1_agreement: float
    decision_agreement: float
    passed: bool
    precision: str
    tolerances: Tolerances
    providers: tuple[str, ...]
    source: str
    exact_mean_delta: float | None = None  # int8: mean |Δp| from the file's exact int8 arithmetic
    about: str = ""
    # mean |Δp| from the fp32 reference, for every precision: how far this engine's answers sit from the model whose
    # metrics the card states (one measure across fp32, fp16 and int8 files, so paths can be ranked by it)
    mean_prob_delta: float | None = None

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        exact = ""
        if self.exact_mean_delta is not None:
            exact = (
                f"; mean |Δp| from the file's exact int8 arithmetic {self.exact_mean_delta:.3f} "
                f"(≤ {self.tolerances.max_mean_exact_delta:g}: this engine's int8 kernels compute what the file means; "
                "agreement is counted against that arithmetic)"
            )
        return (
            f"self-test {verdict} on {self.n} vectors ({self.precision}, {self.providers[0] if self.providers else 'unknown engine'}): "
            f"max |Δp| {self.max_prob_delta:.2e} (≤ {self.tolerances.max_prob_delta:g}), top-1 agreement {self.top1_agreement:.3f} "
            f"and decision agreement {self.decision_agreement:.3f} (≥ {self.tolerances.min_agreement:g}){exact}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "providers": list(self.providers), "tolerances": self.tolerances.to_plain()}


def run_selftest(session: Any, vectors: SelfTestVectors) -> SelfTestReport:
    """Replay ``vectors`` through ``session`` (a :class:`~edgedx.runtime.backends.session.Session`) with the card's
    preprocessing; compare with the stored fp32 reference."""
    card: ModelCard = session.card
    if vectors.crops.ndim != 4 or vectors.crops.shape[3] != 3 or vectors.reference.shape != (len(vectors.crops), card.n_classes):
        raise ModelError(
            f"the self-test vectors ({vectors.crops.shape} crops, {vectors.reference.shape} reference) do not fit this "
            f"model's card ({card.n_classes} classes); re-export it"
        )
    got = np.concatenate([
        to_probabilities(session.run(model_input(vectors.crops[i : i + 8], card)), card) for i in range(0, len(vectors.crops), 8)
    ])
    ref = vectors.reference.astype(np.float64)
    delta = float(np.max(np.abs(got - ref))) if len(ref) else 0.0
    mean_delta = float(np.mean(np.abs(got - ref))) if len(ref) else 0.0
    agree_with = ref if vectors.exact is None else vectors.exact.astype(np.float64)  # int8: the file's own arithmetic
    top1 = float(np.mean(np.argmax(got, axis=1) == np.argmax(agree_with, axis=1))) if len(ref) else 1.0
    decisions = float(np.mean([decide(a, card) == decide(b, card) for a, b in zip(got, agree_with)])) if len(ref) else 1.0
    tol = vectors.tolerances
    passed = delta <= tol.max_prob_delta and min(top1, decisions) >= tol.min_agreement
    exact = None
    if vectors.exact is not None and len(ref):
        exact = float(np.mean(np.abs(got - agree_with)))
        passed = passed and (tol.max_mean_exact_delta is None or exact <= tol.max_mean_exact_delta)
    return SelfTestReport(
        len(ref), delta, top1, decisions, passed, vectors.precision, tol, tuple(session.providers), vectors.source, exact, vectors.about,
        mean_delta,
    )


def verify_session(session: Any) -> SelfTestReport:
    """Run the artefact's own vectors here; a missing or failing self-test is an error that says what to do."""
    text = session.selftest
    where = str(session.path or "the model")
    if not text:
        raise ModelError(
            f"{where} carries no self-test vectors (exported by an older EdgeDx or without labelled images), so it "
            "cannot prove itself here: re-export it with edgedx export, or run without --verify"
        )
    report = run_selftest(session, SelfTestVectors.from_text(text, where))
    if not report.passed:
        about = f" {report.about}." if report.about else ""
        raise ModelError(
            f"{where} does not reproduce its export on this machine: {report.summary()}.{about} This engine rounds differently "
            "from what the file was verified with: use the fp32 model here, or another --device"
        )
    return report


def verify_artefact(path: Any, device: str = "cpu") -> SelfTestReport:
    """``edgedx verify``: open the artefact on ``device`` here and replay its vectors; the report says pass or fail.

    A missing or damaged set of vectors is an error (nothing was checked); a
    failing replay is a report with ``passed`` False, for the caller to show.
    """
    from edgedx.runtime.model import resolve_model_path
    from edgedx.runtime.backends.session import open_session

    session = open_session(resolve_model_path(path), device)
    try:
        if not session.selftest:
            raise ModelError(
                f"{session.path} carries no self-test vectors (exported by an older EdgeDx), so it cannot prove itself "
                "here: re-export it with edgedx export"
            )
        return run_selftest(session, SelfTestVectors.from_text(session.selftest, str(session.path)))
    finally:
        session.close()


BUNDLE_SUFFIX = ".edgedx-bundle.zip"
MANIFEST = "MANIFEST.json"
MODEL_FILES = (".onnx", ".ort")


@dataclass(frozen=True)
class BundleCheck:
    """``edgedx verify BUNDLE``: every file matched the manifest, and each model's self-test here."""

    files: int
    reports: tuple[tuple[str, SelfTestReport], ...]

    @property
    def passed(self) -> bool:
        return all(report.passed for _, report in self.reports)


def is_bundle(path: Any) -> bool:
    return str(path).endswith(BUNDLE_SUFFIX)


def verify_bundle(path: Any, device: str = "cpu") -> BundleCheck:
    """Check a vendor bundle's files against its sha256 manifest, then replay each model's vectors on ``device``.

    A file missing, added or changed on the way is an error naming it (nothing
    is replayed from a bundle that does not match its manifest). TensorRT
    engines are replayed only with ``device="tensorrt"``; OpenVINO devices replay the ``.onnx`` files.
    """
    import hashlib
    import tempfile
    import zipfile
    from pathlib import Path

    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{path} is not a readable EdgeDx bundle ({exc}); copy it again") from None
    with archive, tempfile.TemporaryDirectory(prefix="edgedx-bundle-") as tmp:
        names = archive.namelist()
        if MANIFEST not in names or any("/" in n or "\\" in n or n.startswith(".") for n in names):
            raise ModelError(f"{path} is not an EdgeDx bundle (no {MANIFEST}, or entries inside folders); copy it again")
        expected = json.loads(archive.read(MANIFEST))["sha256"]
        found = {n: hashlib.sha256(archive.read(n)).hexdigest() for n in names if n != MANIFEST}
        problems = sorted(set(expected) ^ set(found)) + sorted(n for n in expected if n in found and found[n] != expected[n])
        if problems:
            raise ModelError(f"{path}: {', '.join(problems)} do(es) not match the bundle's manifest (missing, added or changed); ask for the bundle again")
        archive.extractall(tmp)
        suffixes = MODEL_FILES + ((".engine", ".plan") if device == "tensorrt" else ())
        if device.lower().startswith("openvino"):
            suffixes = (".onnx",)  # OpenVINO reads neither ONNX Runtime's .ort nor TensorRT engines
        models = [n for n in sorted(found) if n.endswith(suffixes) and not n.endswith(".resample.onnx")]  # the resample graph is no model
        reports = tuple((n, verify_artefact(Path(tmp) / n, device)) for n in models)
    return BundleCheck(len(found), reports)
