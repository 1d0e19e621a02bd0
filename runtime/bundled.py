"""Models that ship inside the package, for users who have none of their own yet.

Each is a verified export with its card embedded (metrics, intended use); see
``benchmarks/bundle_default_model.py`` for how the default one is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgedx.card import ModelCard
from edgedx.errors import InputError
from edgedx.runtime.backends.onnx_backend import OnnxSession

MODELS_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL = "isic_mel_nv"


@dataclass(frozen=True)
class BundledModel:
    name: str
    path: Path
    card: ModelCard


def bundled_models() -> list[BundledModel]:
    """Every model in the package, with its card (read from the file, as the runtime does)."""
    found = []
    for path in sorted(MODELS_DIR.glob("*.onnx")):
        name = path.name.split(".")[0]
        found.append(BundledModel(name, path, OnnxSession(path, device="cpu").card))
    return found


def bundled_model_path(name: str = DEFAULT_MODEL) -> Path:
    """The file of bundled model ``name``."""
    matches = sorted(MODELS_DIR.glob(f"{name}.*onnx"))
    if not matches:
        known = sorted({p.name.split(".")[0] for p in MODELS_DIR.glob("*.onnx")})
        raise InputError(f"no bundled model named {name!r}; bundled: {', '.join(known) or 'none'} (see edgedx models)")
    return matches[0]
