# The two commands of the quick start:
#   make demo   set up .venv (CPU torch + every extra) and run the main job
#   make test   set up .venv if needed and run the test suite (what .ci/run calls)
#   make docs   build the documentation site into site/ (strict: any warning fails)
#   make test-oldest-torch   tests/core and tests/lightning on the oldest torch pyproject.toml
#               accepts, in its own .venv-oldest-torch (not part of `make test`)
PY := .venv/bin/python
export PYTHONHASHSEED := 0

.PHONY: setup demo test lint docs test-oldest-torch

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m integrations.moe_ranking demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

# NO_MKDOCS_2_WARNING: Material's banner about MkDocs 2.0 says nothing about these docs.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

test-oldest-torch:
	@bash scripts/test_oldest_torch.sh
