# The two commands of the quick start:
#   make demo   set up .venv (CPU torch + every extra) and run the main job
#   make test   set up .venv if needed and run the test suite (what .ci/run calls)
PY := .venv/bin/python
export PYTHONHASHSEED := 0

.PHONY: setup demo test lint

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m integrations.moe_ranking demo

test: setup
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy
