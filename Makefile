# Two-command quick start: `make demo` and `make test` (each sets up .venv idempotently first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is pinned: here it is the local CPU wheel; an unpinned torch pulls a multi-GB CUDA build (docs/design.md §5).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: setup
	$(PY) train.py fit --config configs/quickstart.yaml

test: setup
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/monitor_overhead.py
	$(PY) benchmarks/audit_after_effect.py
	$(PY) benchmarks/features.py --quick
	$(PY) benchmarks/attacks.py --quick

clean:
	rm -rf runs lightning_logs .pytest_cache
