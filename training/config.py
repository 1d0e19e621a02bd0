"""Every training choice in one frozen object, checked before any work and recorded in the card and ``summary.json``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from edgedx.card import TTA_VIEWS
from edgedx.errors import InputError
from edgedx.runtime.io.manifest import ManifestLayout
from edgedx.training.augment import PRESETS, tta_views
from edgedx.training.crops import CropChoice
from edgedx.training.losses import IMBALANCE_MODES
from edgedx.training.models import DEFAULT_ARCH
from edgedx.training.strategy import parse_strategy

MONITORS = ("balanced_accuracy", "auc", "accuracy", "loss")
OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "plateau")
NORMALIZATIONS = ("imagenet", "per_image")
CALIBRATIONS = ("temperature", "none")


EPOCH_SELECTIONS = ("auto", "per_run", "out_of_fold")
MINE_POSITIVE_MARGIN = 1 / 8  # --mine-positive-margin's default: chosen on the malaria validation fields (benchmarks/README.md)


@dataclass(frozen=True)
class TrainConfig:
    """Every training choice; recorded in the card's provenance and in ``summary.json``."""

    arch: str = DEFAULT_ARCH
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    input_size: int | None = None
    weights: str = "imagenet"
    strategy: str = "full"
    backbone_lr_factor: float | None = None  # None: 0.1 with pretrained weights, 1.0 from scratch
    imbalance: str = "weighted"
    augmentation: str = "none"
    tta: str = "off"  # test-time views averaged with each crop: off, modality (the preset's) or a list like hflip,vflip
    normalization: str = "imagenet"
    monitor: str = "balanced_accuracy"
    patience: int | None = None
    target_sensitivity: float = 0.95
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 0
    device: str = "auto"
    positive_class: str | None = None
    task: str | None = None
    label_column: str = "label"
    label_columns: tuple[str, ...] | None = None
    path_column: str | None = None  # CSV manifests: the image column (None: path, image, file or filename)
    image_dir: str | None = None  # CSV manifests: where relative paths start (None: the manifest's folder)
    suffix: str = ""  # CSV manifests: appended to ids that lack it (ISIC's labels.csv: .jpg)
    class_names: tuple[str, ...] | None = None
    stride_fraction: float = 0.5
    crop: str = "auto"  # auto | fit | shorter_side[:N] | scale[:F]: how images become crops, in training and in diagnose
    strict: bool = False
    resume: bool = False
    overwrite: bool = False  # start again in a run folder that already holds a run
    gradcam_samples: int = 8
    plots: bool = True
    calibrate: str = "temperature"  # temperature scaling fitted on validation through the deployed merge, or none
    coverage: float = 0.95  # split-conformal prediction sets hold the true class for this share of images (binary/multiclass)
    quality_gate: bool = True  # image-quality limits from the training images go into the card
    um_per_px: float | None = None  # the training images' physical scale, recorded in the card
    # how the epoch is chosen: "auto" (out_of_fold with --folds, else the run's best on its validation split), "per_run",
    # or "out_of_fold" (one epoch count for every fold, the best of the folds' mean validation curve: see cross_validate)
    epoch_selection: str = "auto"
    # hard-negative mining (binary tasks): whole images searched for false-positive tiles, added to the training split
    # as negatives, then more epochs (see edgedx.training.hard_negatives); None: no mining
    hard_negatives: str | None = None
    hard_negative_annotations: str | None = None  # IML-layout JSON: tiles holding a positive box centre or touching a difficult box are never mined
    hard_negative_rounds: int = 1
    hard_negative_epochs: int = 2  # epochs of further training after each round
    hard_negative_max: int | None = None  # crops added per round (None: as many as the training split has positive-class items)
    # with annotations: also the tiles centred on an annotated positive, added as the positive class (the target as the
    # deployed sliding crops cut it, which crops of single objects never show)
    mine_positives: bool = False
    # how far inside a tile (a fraction of its side, from every edge) an annotated positive centre must lie for the tile
    # to be mined as a positive: 1/8 keeps tiles that show most of the object; 0 takes every tile holding the centre
    # (the tile-level truth field localisation scores). On malaria 0 and 1/16 taught the model that any cut cell is a
    # parasite: 14 and 57 of 71 parasites at one false detection per field, against 67 at 1/8 (benchmarks/README.md)
    mine_positive_margin: float = MINE_POSITIVE_MARGIN

    def __post_init__(self) -> None:
        if self.image_dir is not None:  # recorded in the card: export reloads the images from any directory
            object.__setattr__(self, "image_dir", str(Path(self.image_dir).absolute()))

    def validate(self) -> None:
        """Fail before any work on a setting that makes no sense, naming it."""
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"learning rate must be positive, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose {', '.join(SCHEDULES)}"),
            (self.imbalance in IMBALANCE_MODES, f"unknown imbalance mode {self.imbalance!r}; choose {', '.join(IMBALANCE_MODES)}"),
            (self.augmentation in PRESETS, f"unknown augmentation {self.augmentation!r}; choose one of {', '.join(PRESETS)}"),
            (self.normalization in NORMALIZATIONS, f"unknown normalization {self.normalization!r}; choose {', '.join(NORMALIZATIONS)}"),
            (self.monitor in MONITORS, f"unknown monitor {self.monitor!r}; choose one of {', '.join(MONITORS)}"),
            (self.patience is None or self.patience >= 1, f"patience must be at least 1 epoch, got {self.patience}"),
            (self.epoch_selection in EPOCH_SELECTIONS, f"unknown epoch selection {self.epoch_selection!r}; choose one of {', '.join(EPOCH_SELECTIONS)}"),
            (0 < self.target_sensitivity <= 1, f"target sensitivity must be in (0, 1], got {self.target_sensitivity}"),
            (0 < self.stride_fraction <= 1, f"stride fraction must be in (0, 1], got {self.stride_fraction}"),
            (self.device in ("auto", "cpu", "cuda"), f"unknown device {self.device!r}; choose auto, cpu or cuda"),
            (self.input_size is None or self.input_size >= 8, f"input size must be at least 8 pixels, got {self.input_size}"),
            (self.calibrate in CALIBRATIONS, f"unknown calibration {self.calibrate!r}; choose {' or '.join(CALIBRATIONS)}"),
            (0 < self.coverage < 1, f"coverage must be in (0, 1), got {self.coverage}"),
            (self.um_per_px is None or (self.um_per_px > 0 and math.isfinite(self.um_per_px)),
             f"micrometres per pixel (--um-per-px) must be a positive number, got {self.um_per_px}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)
        parse_strategy(self.strategy)
        CropChoice.parse(self.crop)
        self.test_views(square=True)  # the views' names and the preset's rules; a quarter turn's tile is checked once planned
        if self.resume and self.overwrite:
            raise InputError("--resume continues the run in --out and --overwrite starts it again: give one of them")
        self.layout()
        self.check_hard_negatives()

    def check_hard_negatives(self) -> None:
        """Mining settings that cannot work, refused before any training.

        Why binary only: a mined tile is a false positive, which needs one class
        to screen for and one to add the tile to; for other tasks the task is
        checked again once the data says what it is.
        """
        if self.hard_negatives is None:
            for name in ("hard_negative_annotations", "hard_negative_max"):
                if getattr(self, name) is not None:
                    raise InputError(f"--{name.replace('_', '-')} is given without --hard-negatives; add --hard-negatives FOLDER of whole images")
            if self.mine_positives:
                raise InputError("--mine-positives is given without --hard-negatives; add --hard-negatives FOLDER and --hard-negative-annotations A.json")
            if self.mine_positive_margin != MINE_POSITIVE_MARGIN:
                raise InputError("--mine-positive-margin is given without --hard-negatives and --mine-positives, so it would change nothing; "
                                 "add them or leave the margin out")
            return
        checks = [
            (self.task in (None, "binary"),
             f"--hard-negatives needs a binary task with a positive class (a mined tile is a false positive of that class), got task {self.task!r}; "
             "train without --hard-negatives or as a binary task"),
            (Path(self.hard_negatives).is_dir(), f"--hard-negatives folder not found: {self.hard_negatives}; give a folder of whole images"),
            (self.hard_negative_annotations is None or Path(self.hard_negative_annotations).is_file(),
             f"--hard-negative-annotations file not found: {self.hard_negative_annotations}; give the annotations JSON or leave it out "
             "(every image is then taken to hold no positive)"),
            (self.hard_negative_rounds >= 1, f"--hard-negative-rounds must be at least 1, got {self.hard_negative_rounds}"),
            (self.hard_negative_epochs >= 1, f"--hard-negative-epochs must be at least 1, got {self.hard_negative_epochs}"),
            (self.hard_negative_max is None or self.hard_negative_max >= 1,
             f"hard_negative_max must be at least 1 crop per round, got {self.hard_negative_max}; leave it unset for as many as the positives"),
            (0.0 <= self.mine_positive_margin < 0.5,
             f"--mine-positive-margin must be at least 0 and below 0.5 of the tile (a centre cannot lie further inside), got {self.mine_positive_margin}"),
            (self.mine_positives or self.mine_positive_margin == MINE_POSITIVE_MARGIN,
             "--mine-positive-margin chooses which tiles --mine-positives takes, so without it the margin would change nothing; "
             "add --mine-positives or leave the margin out"),
            (not self.mine_positives or self.hard_negative_annotations is not None,
             "--mine-positives takes the tiles centred on annotated positives, so it needs --hard-negative-annotations A.json naming them"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    def test_views(self, *, square: bool) -> tuple[str, ...]:
        """The test-time views the card's crop policy declares (``crop.tta``), for a square tile or not.

        ``off``: none. ``modality``: the augmentation preset's
        (:func:`edgedx.training.augment.tta_views`). A list names them; with the
        ``xray`` preset a view that mirrors or turns the film is refused
        (laterality), and quarter turns need a square tile.
        """
        choice = self.tta.strip()
        if choice == "off":
            return ()
        if choice == "modality":
            return tta_views(self.augmentation, square)
        views = tuple(v.strip() for v in choice.split(",") if v.strip())
        unknown = [v for v in views if v not in TTA_VIEWS]
        if unknown or not views:
            raise InputError(f"unknown test-time view {(unknown or [choice])[0]!r} in --tta; use off, modality or a list of {', '.join(TTA_VIEWS)}")
        if len(set(views)) != len(views):
            raise InputError(f"--tta lists a view twice: {choice}")
        mirrored = [v for v in views if v == "hflip" or v.startswith("rot")]
        if self.augmentation == "xray" and mirrored:
            raise InputError(
                f"--tta {mirrored[0]} with --augmentation xray: it swaps left and right, and laterality matters on a chest film "
                "(the heart is on the left); use --tta off (or modality, which takes none for X-rays)"
            )
        quarter = [v for v in views if v in ("rot90", "rot270")]
        if quarter and not square:
            raise InputError(f"--tta {quarter[0]} turns the non-square crop on its side; use hflip, vflip, rot180, or a square --input-size")
        return views

    def layout(self) -> ManifestLayout:
        """How a CSV manifest names images and classes (evaluate and export read the same layout)."""
        return ManifestLayout(self.path_column, self.label_column, self.image_dir, self.suffix)
