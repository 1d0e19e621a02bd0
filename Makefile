# Quickstart targets; each installs what it needs first (idempotent, quick when already installed).
PYTHON ?= python3
EXTRAS ?= full-cpu

.PHONY: install demo test
install:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'

demo: install
	$(PYTHON) -m edgedx demo --out edgedx-demo

test: install
	$(PYTHON) -m pytest -q
