"""One error base class for everything a user can get wrong.

The CLI catches :class:`EdgeDxError` in exactly one place and prints its message
on one line (exit code 1, no traceback). Every message names the bad value and
says what to do next.
"""

from __future__ import annotations


class EdgeDxError(Exception):
    """Base class: a problem the user can fix, reported without a traceback."""


class CardError(EdgeDxError):
    """A model card is missing, malformed, or from a newer schema."""


class InputError(EdgeDxError):
    """A path, option or data set given by the user cannot be used."""


class StreamLostError(InputError):
    """A camera or stream stopped delivering frames and did not come back within its reconnect attempts."""


class ImageReadError(EdgeDxError):
    """One image could not be read; batch commands record it and go on.

    ``sha256`` holds the hash of the bytes that were read when the file could be
    read but not decoded (the audit log records which bytes failed).
    """

    sha256: str | None = None


class InsufficientContentError(ImageReadError):
    """An image was read, but its crops would be nearly all padding or enlarged far beyond the crop's detail:
    a result from it would be a confident guess from no content, so none is given."""


class ModelError(EdgeDxError):
    """A model file cannot be loaded or does not match its card."""


class ParityError(EdgeDxError):
    """An exported model does not reproduce the PyTorch model within tolerance."""


class PartialExportError(ParityError):
    """Some artefacts passed verification and stay; others were refused (the message names both and the next step)."""


class MissingDependencyError(EdgeDxError):
    """An optional package is not installed; the message gives the pip command."""

    def __init__(self, package: str, extra: str, purpose: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"{purpose} needs the '{package}' package, which is not installed; "
            f"install it with: pip install 'edgedx[{extra}]'"
        )


class AuditError(EdgeDxError):
    """An audit log's hash chain is broken: a line was edited, deleted, inserted, moved or torn (the message says where)."""
