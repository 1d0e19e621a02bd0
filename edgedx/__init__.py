"""EdgeDx: medical image classifiers from labelled folders to verified edge deployments.

Stages live in ``edgedx.training``, ``edgedx.export`` and ``edgedx.runtime``; the
model card (:mod:`edgedx.card`) is the one contract between them.
"""

__version__ = "0.1.0"
