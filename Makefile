# `make run` and `make test` do all set-up: a virtual environment in .venv with pinned dependencies.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSTRAINTS := packaging/constraints-dev.txt

.PHONY: run test demo bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m app.launch

test: $(STAMP)
	QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m merging.cli demo

bench: $(STAMP)
	$(PY) bench/merge_throughput.py

clean:
	rm -rf $(VENV) build dist *.egg-info
