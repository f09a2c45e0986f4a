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

# The readers' fuzz tests with a bigger budget than `make test`: FUZZ_SEEDS runs, each with its own
# hypothesis seed, each of FUZZ_EXAMPLES examples per test where the test reads ALLOY_FUZZ_EXAMPLES.
FUZZ_SEEDS ?= 25
FUZZ_EXAMPLES ?= 2000
.PHONY: fuzz
fuzz: $(STAMP)
	for seed in $$(seq 1 $(FUZZ_SEEDS)); do \
		ALLOY_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q tests/test_formats_corpus.py \
			-k fuzz --hypothesis-seed=$$seed --hypothesis-show-statistics || exit 1; \
	done

clean:
	rm -rf $(VENV) .venv-package build dist *.egg-info

# The double-click desktop app (packaging/alloy.spec): a one-folder PyInstaller build in dist/alloy/, made from
# a separate venv that holds only the app's runtime dependencies (same pins) plus PyInstaller.
PKG_VENV := .venv-package
PKG_PY := $(PKG_VENV)/bin/python
PKG_STAMP := $(PKG_VENV)/.installed
PKG_CONSTRAINTS := packaging/constraints-package.txt

$(PKG_STAMP): pyproject.toml $(CONSTRAINTS) $(PKG_CONSTRAINTS) packaging/runtime_requirements.py
	rm -rf $(PKG_VENV)
	$(PYTHON) -m venv $(PKG_VENV)
	$(PKG_PY) -m pip install --quiet --upgrade "pip>=23.2"
	$(PKG_PY) packaging/runtime_requirements.py > $(PKG_VENV)/requirements.txt
	$(PKG_PY) -m pip install --quiet -c $(CONSTRAINTS) -c $(PKG_CONSTRAINTS) -r $(PKG_VENV)/requirements.txt \
		pyinstaller pyinstaller-hooks-contrib
	touch $(PKG_STAMP)

.PHONY: package test-package install-desktop
package: $(PKG_STAMP)
	$(PKG_PY) -m PyInstaller --noconfirm --clean --log-level WARN \
		--distpath dist --workpath build/pyinstaller packaging/alloy.spec
	@du -sh dist/alloy

# Builds the app when dist/alloy/alloy is missing, then launches it with no Python on the PATH (slow test).
test-package: $(STAMP)
	test -x dist/alloy/alloy || $(MAKE) package
	ALLOY_TEST_PACKAGE=1 QT_QPA_PLATFORM=offscreen $(PY) -m pytest -q -m slow tests/test_package.py

install-desktop:
	test -x dist/alloy/alloy || $(MAKE) package
	sh packaging/install-linux.sh install dist/alloy
