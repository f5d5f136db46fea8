# sn_plugin developer entry points.  Everything runs inside .venv/ (made by `make setup`).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup test test-core demo check-env constraints clean-venv help

help:
	@echo "make setup        create/refresh .venv (scripts/setup_env.sh; fast when up to date)"
	@echo "make test         setup, then pytest -q tests (extra args: PYTEST_ARGS='-k sn -x')"
	@echo "make test-core    torch-only set-up (no mmcv build, no toolkits), then the tests that need only torch"
	@echo "make demo         setup, then tools/demo.py"
	@echo "make check-env    setup, then scripts/check_env.py (imports, mmcv ops, detectron2 train step)"
	@echo "make constraints  regenerate requirements/constraints.txt from the working .venv"
	@echo "make clean-venv   delete .venv"

setup:
	SN_VENV="$(abspath $(VENV))" bash scripts/setup_env.sh

test: setup
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

# Minutes instead of the full set-up's mmcv build on a fresh machine; on a full .venv, no set-up at all.
test-core:
	SN_VENV="$(abspath $(VENV))" SN_PROFILE=core bash scripts/setup_env.sh
	$(PY) scripts/run_core_tests.py -q tests $(PYTEST_ARGS)

demo: setup
	$(PY) tools/demo.py

check-env: setup
	$(PY) scripts/check_env.py

constraints:
	$(PY) scripts/freeze_constraints.py > requirements/constraints.txt.new
	mv requirements/constraints.txt.new requirements/constraints.txt

clean-venv:
	rm -rf $(VENV)
