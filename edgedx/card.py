"""The model card: the one contract between training, export and the runtime.

A card says everything a deployment needs to reproduce the model's view of an
image (colour order, scaling, normalisation, input size, crop policy) and how to
read its output (task, class names, operating threshold), plus where it came
from and how well it did. It is serialised once as JSON and travels inside the
checkpoint, inside ONNX ``metadata_props`` (key :data:`ONNX_METADATA_KEY`) and in
a sidecar JSON beside a TensorRT engine.

Standard library only: every stage, including the torch-free runtime, reads it.
Parsing is strict: a missing or unknown field fails naming the field, and a card
written by a newer EdgeDx fails with "upgrade edgedx".
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Union

from edgedx.errors import CardError

SCHEMA_VERSION = 7  # 2: crop padding modes, aggregations, top_k, centre weighting, foreground filter; 3: crop modes;
# 4: calibration, abstention, image-quality limits, physical scale, lineage; 5: test-time augmentation, fold ensembles,
# where the threshold came from and how sure it is; 6: detection (counting the positive class on a field);
# 7: neighbour context (a crop's positive probability blended with its grid neighbours')
ONNX_METADATA_KEY = "edgedx.card"
# crop.neighbour_context stays below this: two neighbouring crops a > b blend to (1 − w)·a + w·b and (1 − w)·b + w·a,
# which swap order once w > 0.5 (tie at 0.5), so the detection (a local maximum) would leave the object's best crop
MAX_NEIGHBOUR_CONTEXT = 0.5
SIDECAR_SUFFIX = ".card.json"

Task = Literal["binary", "multiclass", "multilabel"]
ColourOrder = Literal["RGB", "BGR"]
Interpolation = Literal["nearest", "linear", "area", "cubic"]
NormKind = Literal["mean_std", "per_image"]
OutputActivation = Literal["softmax", "sigmoid"]
InputFormat = Literal["float32_nchw", "uint8_nhwc"]
Padding = Literal["constant", "reflect", "replicate"]
Aggregation = Literal["mean", "mean_logits", "max", "top_k_mean", "noisy_or"]
CentreWeighting = Literal["none", "gaussian"]
CropMode = Literal["fit", "shorter_side", "scale"]
CROP_MODES: tuple[str, ...] = ("fit", "shorter_side", "scale")
# test-time views of each crop, besides the crop itself: flips and quarter turns (the last two need square crops)
TTA_VIEWS: tuple[str, ...] = ("hflip", "vflip", "rot180", "rot90", "rot270")
ThresholdSource = Literal["unknown", "validation", "out_of_fold", "site", "manual"]
FieldRule = Literal["any", "count_at_least", "top_k_mean"]
SlideRule = Literal["any_field", "count_at_least"]
FIELD_RULES: tuple[str, ...] = ("any", "count_at_least", "top_k_mean")
SLIDE_RULES: tuple[str, ...] = ("any_field", "count_at_least")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_INTENDED_USE = "research use; not a medical device"


@dataclass(frozen=True)
class Normalization:
    """How pixel values become model inputs: ``(x * pixel_scale - mean) / std``.

    ``per_image`` standardises each crop by its own mean and std (per channel);
    ``mean``/``std`` are then unused but kept for the record.
    """

    kind: NormKind = "mean_std"
    pixel_scale: float = 1.0 / 255.0
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise CardError(
                f"model card field 'normalization': mean has {len(self.mean)} values "
                f"but std has {len(self.std)}; give one per channel"
            )
        if not all(math.isfinite(v) for v in (*self.mean, *self.std, self.pixel_scale)):
            raise CardError(
                f"model card field 'normalization' must hold finite numbers, got mean {list(self.mean)}, "
                f"std {list(self.std)}, pixel_scale {self.pixel_scale}"
            )
        if any(not s > 0 for s in self.std):
            raise CardError(f"model card field 'normalization.std' must be > 0, got {list(self.std)}")
        if not self.pixel_scale > 0:
            raise CardError(f"model card field 'normalization.pixel_scale' must be > 0, got {self.pixel_scale}")


@dataclass(frozen=True)
class CropPolicy:
    """How a whole image is cut into model-sized crops and merged back.

    Training cuts its crops by the same rule and validates through it, so the
    numbers on the card describe what ``diagnose`` does. ``mode`` says how an
    image of any size is resampled before it is cut:

    - ``fit``: the whole image is resized to ``tile_size`` (one crop; lesion
      photographs, chest X-rays: the finding is the whole picture);
    - ``shorter_side``: resized, keeping its aspect ratio, so its shorter side is
      ``shorter_side`` pixels (the longer one rounds to the nearest pixel, ties to even: see docs/integration.md), then cut;
    - ``scale``: resampled by the fixed factor ``scale`` (microscopy: cells keep
      the size they had in training), then cut.

    Crops of ``tile_size`` (height, width) start every ``stride`` pixels, the last crop of each row and
    column aligned to the edge so every pixel is seen, padding (``constant``
    with ``pad_value``, ``reflect`` or ``replicate``) where the image is smaller
    than a crop, and the crops' class probabilities merged by ``aggregation``:

    - ``mean``: mean of probabilities (diffuse findings);
    - ``mean_logits``: softmax/sigmoid of the mean logit;
    - ``max`` / ``top_k_mean``: the most suspicious crop(s), per class (sparse
      findings: a few parasites on a field, one lesion on a scan);
    - ``noisy_or``: 1 - prod(1 - p), "at least one crop is positive".

    ``min_foreground`` skips crops whose fraction of foreground pixels (not
    empty glass, not black border) is below it; ``min_content`` refuses an
    image whose crops are mostly padding (a 1×1 PNG, a field shrunk by a
    mistyped scale), which would otherwise get a confident answer from nothing; ``centre_weighting`` shapes how
    overlapping crops are blended into the per-pixel heat map. ``neighbour_context`` (binary models; 0: off)
    blends each crop's positive-class probability with the highest of its eight grid neighbours' before
    anything reads the crops (the merge, detections, the heat map): an object cut at a crop's edge is seen
    whole by a neighbour, and a lone bright crop is more often clutter (see ``edgedx.runtime.neighbours``).
    """

    tile_size: tuple[int, int]
    stride: tuple[int, int]
    scale: float = 1.0
    padding: Padding = "constant"
    pad_value: int = 0
    aggregation: Aggregation = "mean"
    top_k: int = 3
    centre_weighting: CentreWeighting = "none"
    min_foreground: float = 0.0
    mode: CropMode = "scale"
    shorter_side: int | None = None
    min_content: float = 0.05
    tta: tuple[str, ...] = ()  # test-time views (TTA_VIEWS) whose logits are averaged with the crop's own: see runtime/tta.py
    neighbour_context: float = 0.0  # weight of the brightest grid neighbour in a crop's positive probability; 0: off

    def __post_init__(self) -> None:
        for name in ("tile_size", "stride"):
            value = getattr(self, name)
            if len(value) != 2 or any(int(v) != v or v < 1 for v in value):
                raise CardError(
                    f"model card field 'crop.{name}' must be two positive integers (height, width), got {list(value)}"
                )
        if any(s > t for s, t in zip(self.stride, self.tile_size)):
            raise CardError(
                f"model card field 'crop.stride' {list(self.stride)} exceeds crop.tile_size {list(self.tile_size)}: "
                "pixels between crops would never be seen; use a stride no larger than the tile"
            )
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise CardError(f"model card field 'crop.scale' must be a positive number, got {self.scale}")
        if not 0 <= self.pad_value <= 255:
            raise CardError(f"model card field 'crop.pad_value' must be within 0..255, got {self.pad_value}")
        if int(self.top_k) != self.top_k or self.top_k < 1:
            raise CardError(f"model card field 'crop.top_k' must be a positive integer, got {self.top_k}")
        if not 0.0 <= self.min_foreground <= 1.0:
            raise CardError(f"model card field 'crop.min_foreground' must be within [0, 1], got {self.min_foreground}")
        if not 0.0 <= self.min_content <= 1.0:
            raise CardError(f"model card field 'crop.min_content' must be within [0, 1], got {self.min_content}")
        if self.mode not in CROP_MODES:
            raise CardError(f"model card field 'crop.mode' must be one of {list(CROP_MODES)}, got {self.mode!r}")
        if self.mode == "shorter_side":
            if self.shorter_side is None or int(self.shorter_side) != self.shorter_side or self.shorter_side < 1:
                raise CardError(
                    f"model card field 'crop.shorter_side' must be a positive integer with crop.mode 'shorter_side', got {self.shorter_side!r}"
                )
        elif self.shorter_side is not None:
            raise CardError(f"model card field 'crop.shorter_side' is only used with crop.mode 'shorter_side' (mode is {self.mode!r}); set it to null")
        if self.mode != "scale" and self.scale != 1.0:
            raise CardError(f"model card field 'crop.scale' is only used with crop.mode 'scale' (mode is {self.mode!r}); set it to 1")
        if not (0.0 <= self.neighbour_context < MAX_NEIGHBOUR_CONTEXT):
            raise CardError(
                f"model card field 'crop.neighbour_context' must be within [0, {MAX_NEIGHBOUR_CONTEXT:g}) (0: off), got {self.neighbour_context}: "
                "from 0.5 on, a crop beside an object's best crop outranks it and detections move off the object"
            )
        self._check_tta()

    def _check_tta(self) -> None:
        unknown = [v for v in self.tta if v not in TTA_VIEWS]
        if unknown:
            raise CardError(f"model card field 'crop.tta' has unknown view {unknown[0]!r}; use any of {list(TTA_VIEWS)}")
        if len(set(self.tta)) != len(self.tta):
            raise CardError(f"model card field 'crop.tta' lists a view twice: {list(self.tta)}")
        quarter = [v for v in self.tta if v in ("rot90", "rot270")]
        if quarter and self.tile_size[0] != self.tile_size[1]:
            raise CardError(
                f"model card field 'crop.tta' view {quarter[0]!r} turns a {self.tile_size[0]}×{self.tile_size[1]} crop on its side; "
                "quarter turns need square crops: drop it or use hflip, vflip, rot180"
            )

    def describe(self) -> str:
        """The resampling rule in words, for summaries and errors."""
        views = f"; test-time views: {', '.join(self.tta)}" if self.tta else ""
        if self.neighbour_context:
            views += f"; each crop blended {self.neighbour_context:g} with its brightest neighbour"
        if self.mode == "fit":
            return f"fit: whole image resized to {self.tile_size[0]}×{self.tile_size[1]}{views}"
        stride = f"{self.tile_size[0]}×{self.tile_size[1]} crops every {self.stride[0]}×{self.stride[1]} px"
        if self.mode == "shorter_side":
            return f"shorter_side: shorter side resized to {self.shorter_side} px, {stride}{views}"
        return f"scale: resampled by {self.scale:g}, {stride}{views}"


@dataclass(frozen=True)
class Provenance:
    """Where the model came from, so a deployed artefact can be traced back."""

    edgedx_version: str
    created_at: str
    data_summary: dict[str, Any] = field(default_factory=dict)
    split_seed: int | None = None
    weights: str = "none"
    training: dict[str, Any] = field(default_factory=dict)
    # what was done to the model after training, oldest first: e.g. a site recalibration
    # {"step": "recalibrate", "parent_sha256": ..., "site_data": {...}, "date": ...}
    lineage: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling fitted on validation outputs through the deployed path.

    The runtime divides each crop's logits by the temperature before the
    activation (so the ONNX graph and its parity stay on raw logits): one
    temperature for binary/multiclass models, one per label for multilabel.
    ``method`` "none" (and an empty tuple) leaves probabilities as the network gives them.
    """

    method: Literal["none", "temperature"] = "none"
    temperature: tuple[float, ...] = ()
    fitted_on: dict[str, Any] = field(default_factory=dict)  # n images, split, ECE and Brier before/after

    def __post_init__(self) -> None:
        if self.method == "temperature" and (not self.temperature or any(not (t > 0 and math.isfinite(t)) for t in self.temperature)):
            raise CardError(f"model card field 'calibration.temperature' must be positive numbers, got {list(self.temperature)}")


@dataclass(frozen=True)
class Abstention:
    """When a record says "refer" instead of a diagnosis, from split-conformal prediction sets and crop disagreement.

    ``qhat``: a class is in an image's prediction set when 1 - p(class) ≤ qhat
    (calibrated on validation for ``coverage``); a set of more or fewer than one
    class is a refer. ``dispersion_limit``: refer when the standard deviation of
    the crops' positive-class (or top-class) probabilities exceeds it.
    None disables either rule.
    """

    coverage: float | None = None
    qhat: float | None = None
    dispersion_limit: float | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.coverage is not None and not 0.0 < self.coverage < 1.0:
            raise CardError(f"model card field 'abstention.coverage' must be within (0, 1), got {self.coverage}")


@dataclass(frozen=True)
class QualityLimits:
    """The image-quality gate before diagnosis, from percentiles of the training images (overridable).

    None disables a check. ``reference`` holds the training images' statistics
    (percentiles of each measure) for drift monitoring.
    """

    # the measures are edgedx.runtime.quality.measure_quality's (its docstring says where each is taken, and why)
    focus_min: float | None = None  # fine detail: Laplacian variance ratio of the image to itself blurred by 1 px
    clipped_max: float | None = None  # fraction of pixels at 0 or 255 in any channel
    brightness_range: tuple[float, float] | None = None  # 95th-percentile grey level, 0-255
    colour_range: tuple[float, float] | None = None  # mean saturation (HSV S), 0-255: stain/colour cast
    min_short_side: int | None = None  # pixels at the model's scale below which the image is too small to read
    reference: dict[str, Any] = field(default_factory=dict)  # training percentiles; also "blockiness_max" (JPEG)


@dataclass(frozen=True)
class Ensemble:
    """A model that is the average of several trained networks (the K fold models of a cross-validation).

    ``members`` 1 is a single network. With more, the artefact's output is built
    so that the card's activation gives the members' averaged calibrated
    probabilities (``combine`` "mean_probability"); ``fitted_on`` names the
    member runs, their folds and temperatures.
    """

    members: int = 1
    combine: Literal["none", "mean_probability"] = "none"
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if int(self.members) != self.members or self.members < 1:
            raise CardError(f"model card field 'ensemble.members' must be a positive integer, got {self.members}")
        if (self.members > 1) != (self.combine != "none"):
            raise CardError(
                f"model card field 'ensemble.combine' is {self.combine!r} with {self.members} member(s); "
                "one network combines 'none', several 'mean_probability'"
            )


@dataclass(frozen=True)
class ThresholdChoice:
    """Where the operating threshold came from and how sure it is.

    ``source``: ``validation`` (one run's validation split), ``out_of_fold``
    (every training image, each predicted by the fold model that did not train
    on it), ``site`` (``edgedx recalibrate``), ``manual``, or ``unknown`` (cards
    older than schema 5). ``interval``: a bootstrap 95% interval of the
    threshold itself. ``fitted_on``: counts of positives and negatives,
    sensitivity and specificity with their intervals, the alternatives (0.5, the
    Youden point) and any warning in words.
    """

    source: ThresholdSource = "unknown"
    interval: tuple[float, float] | None = None
    fitted_on: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Detection:
    """Counting and localising the positive class on a whole field, and the field's decision from the count.

    A cell classifier run over a field in sliding crops says, per crop, how
    likely that crop holds the positive class; a microscopist needs how many
    parasites, where (to confirm by eye) and, with ``count_cells``, the red
    cells they sit among (parasitaemia). Off by default: records of a card
    without it are as they were.

    ``tile_threshold`` (None: the card's ``threshold``) makes a crop a
    candidate; overlapping candidates whose boxes overlap by more than
    ``nms_iou`` (intersection over union) are one finding
    (:mod:`edgedx.runtime.detections`). ``field_rule`` says when a field is
    positive: ``any`` candidate, at least ``field_k`` (``count_at_least``), or
    the mean of the ``field_k`` highest crop probabilities reaching
    ``field_threshold`` (None: the card's threshold; ``top_k_mean``).
    ``slide_rule`` does the same for the fields of one slide: ``any_field``
    positive, or at least ``slide_k`` positive fields. ``fitted_on`` says where
    the numbers came from (fields, operating points).
    """

    enabled: bool = False
    tile_threshold: float | None = None
    nms_iou: float = 0.3
    count_cells: bool = False
    field_rule: FieldRule = "any"
    field_k: int = 1
    field_threshold: float | None = None
    slide_rule: SlideRule = "any_field"
    slide_k: int = 1
    fitted_on: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("tile_threshold", "field_threshold"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise CardError(f"model card field 'detection.{name}' must be within [0, 1] or null (the card's threshold), got {value}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise CardError(f"model card field 'detection.nms_iou' must be within (0, 1], got {self.nms_iou}; 0.3 merges crops of one object")
        for name in ("field_k", "slide_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or int(value) != value or value < 1:
                raise CardError(f"model card field 'detection.{name}' must be a positive integer, got {value!r}")
        if self.field_rule not in FIELD_RULES:
            raise CardError(f"model card field 'detection.field_rule' must be one of {list(FIELD_RULES)}, got {self.field_rule!r}")
        if self.slide_rule not in SLIDE_RULES:
            raise CardError(f"model card field 'detection.slide_rule' must be one of {list(SLIDE_RULES)}, got {self.slide_rule!r}")
        if self.count_cells and not self.enabled:
            raise CardError("model card field 'detection.count_cells' is true but 'detection.enabled' is false: cells are counted "
                            "only beside detections; set enabled true, or count_cells false")


@dataclass(frozen=True)
class ModelCard:
    """Everything a stage needs to use a model correctly; see the module docstring."""

    arch: str
    task: Task
    class_names: tuple[str, ...]
    input_size: tuple[int, int]
    crop: CropPolicy
    provenance: Provenance
    positive_class: str | None = None
    threshold: float | None = None
    colour_order: ColourOrder = "RGB"
    normalization: Normalization = field(default_factory=Normalization)
    interpolation: Interpolation = "area"
    output_activation: OutputActivation = "softmax"
    input_format: InputFormat = "float32_nchw"
    metrics: dict[str, Any] = field(default_factory=dict)
    intended_use: str = DEFAULT_INTENDED_USE
    calibration: Calibration = field(default_factory=Calibration)
    abstention: Abstention = field(default_factory=Abstention)
    quality: QualityLimits = field(default_factory=QualityLimits)
    um_per_px: float | None = None  # the training images' physical scale (micrometres per pixel); None: not known
    ensemble: Ensemble = field(default_factory=Ensemble)
    threshold_choice: ThresholdChoice = field(default_factory=ThresholdChoice)
    detection: Detection = field(default_factory=Detection)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        names = self.class_names
        if len(names) < 1 or len(set(names)) != len(names) or any(not n for n in names):
            raise CardError(f"model card field 'class_names' must be distinct non-empty names, got {list(names)}")
        if self.task in ("binary", "multiclass") and len(names) < 2:
            raise CardError(f"model card: a {self.task} task needs at least two class_names, got {list(names)}")
        if self.task == "binary" and len(names) != 2:
            raise CardError(f"model card: a binary task has exactly two class_names, got {list(names)}")
        if self.task == "binary":
            if self.positive_class not in names:
                raise CardError(
                    f"model card field 'positive_class' must be one of {list(names)} for a binary task, "
                    f"got {self.positive_class!r}"
                )
        elif self.positive_class is not None and self.positive_class not in names:
            raise CardError(f"model card field 'positive_class' {self.positive_class!r} is not in {list(names)}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise CardError(f"model card field 'threshold' must be within [0, 1], got {self.threshold}")
        if self.task == "multilabel" and self.output_activation != "sigmoid":
            raise CardError("model card: a multilabel task needs output_activation 'sigmoid'")
        if len(self.input_size) != 2 or any(int(v) != v or v < 1 for v in self.input_size):
            raise CardError(
                f"model card field 'input_size' must be two positive integers (height, width), got {list(self.input_size)}"
            )
        if len(self.normalization.mean) not in (1, 3):
            raise CardError(
                f"model card field 'normalization.mean' needs 1 or 3 values, got {len(self.normalization.mean)}"
            )
        if self.um_per_px is not None and not (self.um_per_px > 0 and math.isfinite(self.um_per_px)):
            raise CardError(f"model card field 'um_per_px' must be a positive number, got {self.um_per_px}")
        n_temperatures = len(self.calibration.temperature)
        if self.calibration.method == "temperature" and n_temperatures not in (1, len(names) if self.task == "multilabel" else 1):
            raise CardError(f"model card field 'calibration.temperature' has {n_temperatures} values for a {self.task} model with {len(names)} classes")
        if self.crop.neighbour_context and (self.task != "binary" or self.positive_index is None):
            raise CardError(
                f"model card field 'crop.neighbour_context' ({self.crop.neighbour_context:g}) blends a binary model's positive-class "
                f"crop probabilities; this is a {self.task} model: set it to 0"
            )
        if self.detection.enabled and self.positive_index is None:
            raise CardError("model card field 'detection.enabled' needs a positive_class: detections count one class; name it")
        if self.schema_version != SCHEMA_VERSION:
            raise CardError(f"model card: cannot build schema_version {self.schema_version} cards with this edgedx")

    # -- convenience ------------------------------------------------------------------
    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def positive_index(self) -> int | None:
        """Index of the positive class, or None when the card names none."""
        return None if self.positive_class is None else self.class_names.index(self.positive_class)

    def replace(self, **changes: Any) -> ModelCard:
        """A copy with some fields changed (cards are frozen)."""
        return dataclasses.replace(self, **changes)

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False, allow_nan=False)

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        if not isinstance(data, dict):
            raise CardError(f"model card must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version is None:
            raise CardError("model card is missing field 'schema_version'")
        if not isinstance(version, int) or isinstance(version, bool):
            raise CardError(f"model card field 'schema_version' must be an integer, got {version!r}")
        if version > SCHEMA_VERSION:
            raise CardError(
                f"model card schema_version {version} is newer than this edgedx supports ({SCHEMA_VERSION}); "
                "upgrade edgedx: pip install --upgrade edgedx"
            )
        if version < 1:
            raise CardError(f"model card schema_version {version} is not valid")
        if version < SCHEMA_VERSION:
            data = _migrate(data, version)
        return _from_plain(cls, data, "")

    @classmethod
    def from_json(cls, text: str | bytes) -> ModelCard:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CardError(f"model card is not valid JSON: {exc}") from None
        except RecursionError:
            raise CardError("model card is nested too deeply to be a model card (a damaged or hostile file); export the model again") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the card as JSON (e.g. the sidecar beside an engine)."""
        path = Path(path)
        path.write_text(self.to_json() + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CardError(f"model card file not found: {path}") from None
        except OSError as exc:
            raise CardError(f"cannot read model card {path}: {exc.strerror}") from None
        try:
            return cls.from_json(text)
        except CardError as exc:
            raise CardError(f"{path}: {exc}") from None


# no detections, no cell count, no field rule: a card's records as before detection existed
_DETECTION_OFF: dict[str, Any] = {
    "enabled": False, "tile_threshold": None, "nms_iou": 0.3, "count_cells": False, "field_rule": "any", "field_k": 1,
    "field_threshold": None, "slide_rule": "any_field", "slide_k": 1, "fitted_on": {},
}

# Fields each schema version added, with the value that reproduces the older behaviour.
_ADDED_IN = {
    2: {"crop": {"top_k": 3, "centre_weighting": "none", "min_foreground": 0.0}},
    # before 3 every card resampled by its fixed scale; the content check (no answer from crops that are
    # nearly all padding) applies to older cards too
    3: {"crop": {"mode": "scale", "shorter_side": None, "min_content": 0.05}},
    # before 4 no card calibrated, abstained, gated on quality or knew its scale: the defaults do none of it
    4: {
        "": {
            "calibration": {"method": "none", "temperature": [], "fitted_on": {}},
            "abstention": {"coverage": None, "qhat": None, "dispersion_limit": None, "fitted_on": {}},
            "quality": {
                "focus_min": None, "clipped_max": None, "brightness_range": None, "colour_range": None,
                "min_short_side": None, "reference": {},
            },
            "um_per_px": None,
        },
        "provenance": {"lineage": []},
    },
    # before 5 no card averaged test-time views or several networks, and none said where its threshold came from
    5: {
        "": {
            "ensemble": {"members": 1, "combine": "none", "fitted_on": {}},
            "threshold_choice": {"source": "unknown", "interval": None, "fitted_on": {}},
        },
        "crop": {"tta": []},
    },
    # before 6 no card detected, counted or decided per field
    6: {"": {"detection": _DETECTION_OFF}},
    # before 7 no crop was blended with its neighbours
    7: {"crop": {"neighbour_context": 0.0}},
}


def _migrate(data: dict[str, Any], version: int) -> dict[str, Any]:
    """An older card as the current schema: added fields get the defaults that mean "as before"."""
    data = {**data, "schema_version": SCHEMA_VERSION}
    for added in range(version + 1, SCHEMA_VERSION + 1):
        for section, fields in _ADDED_IN.get(added, {}).items():
            if section == "":
                data = {**fields, **data}
            elif isinstance(data.get(section), dict):
                data[section] = {**fields, **data[section]}
    return data


def now_iso() -> str:
    """UTC timestamp for provenance, second resolution."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def sidecar_path(artefact: str | Path) -> Path:
    """Where the card of a non-ONNX artefact (a TensorRT engine) lives: beside it."""
    artefact = Path(artefact)
    return artefact.with_name(artefact.name + SIDECAR_SUFFIX)


# -- strict (de)serialisation of nested frozen dataclasses ---------------------------


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        value = value.item()  # numpy scalars from metrics code; the card stays stdlib-only
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; an undefined metric is null
    return value


def _from_plain(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "card"
    if not isinstance(data, dict):
        raise CardError(f"model card field '{where}' must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise CardError(f"model card has unknown field '{prefix}{unknown[0]}'")
    kwargs = {}
    for name in names:
        if name not in data:
            raise CardError(f"model card is missing field '{prefix}{name}'")
        kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _from_plain(tp, value, where + ".")
    if origin is Literal:
        if value not in args:
            raise CardError(f"model card field '{where}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if origin is tuple:
        if not isinstance(value, list):
            raise CardError(f"model card field '{where}' must be a list, got {value!r}")
        item = args[0]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise CardError(f"model card field '{where}' must have {len(args)} values, got {len(value)}")
        return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise CardError(f"model card field '{where}' must be an object, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise CardError(f"model card field '{where}' must be true or false, got {value!r}")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise CardError(f"model card field '{where}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise CardError(f"model card field '{where}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise CardError(f"model card field '{where}' must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported card annotation {tp!r} at {where}")  # a programming error, not user input
