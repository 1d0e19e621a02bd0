"""Every setting of a diagnosis run, in one validated object.

Why: the crop overrides, refer band, batch size and device used to travel
unchanged through four layers as keyword arguments (19 of them at the widest),
and the rules about which go together lived in the CLI. :class:`DiagnoseOptions`
is built once, validated once (:meth:`DiagnoseOptions.validate`), and read by
the local engine, the hot folder and the Ray engine alike, as ``TrainConfig``
is for training and ``ExportOptions`` for export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgedx.card import CropPolicy
from edgedx.errors import InputError

ENGINES = ("local", "ray")
AUDIT_NAMES = ("path", "hash")


@dataclass(frozen=True)
class DiagnoseOptions:
    """How to diagnose: the model, where results go, the engine and every setting that shapes a record.

    ``model`` None is the bundled default model; ``out`` None shows still
    images' results instead of writing a file (:func:`edgedx.runtime.diagnose.diagnose`
    returns them); ``watch`` makes a hot-folder run; ``engine="ray"`` runs still
    images on Ray Data. ``crop`` overrides the card's crop policy field by field.
    ``quality`` "card" holds every image to the card's image-quality limits
    (``quality_limits`` overrides them by name: ``{"focus_min": 3.0,
    "brightness_range": (40, 220)}``), "off" diagnoses every image;
    ``um_per_px`` is the images' physical scale (default: their TIFF tags).
    ``slides`` is a ``path,slide_id`` CSV that groups fields into slides for
    the slide summary (a detection card); without other inputs its paths are
    the inputs.
    """

    model: Any = None  # str | Path | Model | None
    out: Path | None = None
    device: str = "cpu"
    batch_size: int = 32
    crop: CropPolicy | Mapping[str, Any] | None = None
    refer_band: tuple[float, float] | None = None
    overlays: Path | None = None
    maps: Path | None = None
    audit: Path | None = None
    audit_names: str = "path"
    resume: bool = False
    overwrite: bool = False
    every: int = 1  # videos and cameras: every N-th frame
    window: int = 5  # videos and cameras: rolling decision over N frames
    max_frames: int | None = None
    reconnect: int = 5
    max_pixels: int | None = None
    watch: Path | None = None
    idle_timeout_s: float | None = None
    poll_s: float = 1.0  # hot folder: how often the folder is listed
    settle_s: float = 2.0  # hot folder: how long a file's size must stay unchanged
    engine: str = "local"
    address: str | None = None  # --engine ray: the cluster
    verify: bool = False  # replay the artefact's self-test vectors here first; refuse it when they fail
    quality: str = "card"  # card: the card's quality gate before diagnosis; off: none
    quality_limits: Mapping[str, Any] | None = None  # overrides of the card's limits, by name (see quality.LIMIT_NAMES)
    um_per_px: float | None = None  # the images' micrometres per pixel (else their TIFF tags; see runtime/scale.py)
    slides: Path | None = None  # path,slide_id CSV: which slide each field is on (else its folder)

    def __post_init__(self) -> None:
        for name in ("out", "overlays", "maps", "audit", "watch", "slides"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))

    def replace(self, **changes: Any) -> DiagnoseOptions:
        return dataclasses.replace(self, **changes)

    @property
    def mode(self) -> str:
        """How an existing results file is treated: continued (resume, auto) or replaced (overwrite)."""
        return "overwrite" if self.overwrite else "resume" if self.resume else "auto"

    def validate(self, inputs: Sequence[Any] = ()) -> DiagnoseOptions:
        """Every rule about which settings go together, checked before any file is read; returns self."""
        _check(self.engine in ENGINES, f"--engine must be local or ray, got {self.engine!r}")
        _check(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}")
        _check(self.every >= 1 and self.window >= 1, f"--every and --window must be at least 1, got {self.every} and {self.window}")
        _check(self.reconnect >= 0, f"--reconnect must be 0 or more, got {self.reconnect}")
        _check(self.audit_names in AUDIT_NAMES, f"--audit-names must be path or hash, got {self.audit_names!r}")
        _check(not (self.resume and self.overwrite), "--resume continues the results file and --overwrite replaces it: give one of them")
        self.check_gate()
        if self.engine == "local":
            _check(self.address is None, "--address names a Ray cluster: add --engine ray, or leave out --address")
        else:
            given = self.local_only_options()
            _check(not given, f"{', '.join(given)} work only with the local engine: leave out --engine ray, or leave out {given[0] if given else ''}")
        if self.out is None:
            _check(self.engine == "local" and self.watch is None, "--watch and --engine ray write their records to a file: give --out FILE")
            _check(self.slides is None, "--slides writes its slide summary beside the results file (OUT.slides.jsonl): give --out FILE")
        if self.watch is not None:
            _check(not inputs, "give either inputs or --watch FOLDER, not both")
        else:
            hint = "globs" if self.engine == "ray" else "globs, videos or camera:N (or use --watch FOLDER)"
            _check(bool(inputs) or self.slides is not None, f"no inputs given; name image files, folders, {hint}")
        return self

    def check_gate(self) -> None:
        """--quality, --quality-limit and --um-per-px, before any model is read (the card's own limits come later)."""
        from edgedx.runtime.quality import parse_limit
        from edgedx.runtime.scale import check_um_per_px

        _check(self.quality in ("card", "off"), f"--quality must be card or off, got {self.quality!r}")
        for name, value in (self.quality_limits or {}).items():
            parse_limit(name, value)
        _check(not (self.quality == "off" and self.quality_limits), "--quality off turns the gate off: leave out --quality-limit, or --quality off")
        check_um_per_px(self.um_per_px)

    def local_only_options(self) -> list[str]:
        """The options given that only the local engine has (Ray runs still images into shards)."""
        used = {
            "--watch": self.watch is not None, "--resume": self.resume, "--overlays": self.overlays is not None,
            "--maps": self.maps is not None, "--audit": self.audit is not None,
            "--every/--window/--max-frames": (self.every, self.window, self.max_frames) != (1, 5, None),
            "--max-pixels": self.max_pixels is not None, "--verify": self.verify, "--slides": self.slides is not None,
        }
        return [option for option, on in used.items() if on]


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InputError(message)
