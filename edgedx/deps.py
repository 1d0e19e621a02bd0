"""Optional dependencies: fail with the exact extra to install, never a bare ImportError."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from edgedx.errors import MissingDependencyError


def require(modules: Iterable[str], *, extra: str, purpose: str) -> None:
    """Import each module (they are needed right after anyway) or raise MissingDependencyError."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise MissingDependencyError(name, extra, purpose) from None
