# Two commands do everything on a fresh machine: `make reproduce` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: reproduce fig2 test bench setup clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,reproduce]"
	touch $(STAMP)

setup: $(STAMP)

reproduce: $(STAMP)
	$(PY) -m batchnorm reproduce fig1

fig2: $(STAMP)
	$(PY) -m batchnorm reproduce fig2

test: $(STAMP)
	$(PY) -m ruff check batchnorm tests benchmarks scripts
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/bench_bn.py
	$(PY) benchmarks/bench_fold.py
	$(PY) benchmarks/bench_fig1_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
