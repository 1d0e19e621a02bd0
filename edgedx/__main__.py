"""``python -m edgedx`` runs the CLI."""

from edgedx.cli import main

main()
