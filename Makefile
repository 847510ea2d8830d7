# make test   — set up .venv, build kvcomp._C in place, run the test suite
# make bench  — same set-up, then the benchmark CLI on its default workload
# Each target creates what it needs from nothing (python3 with venv + a C++ compiler).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
JOBS   ?= 2
RUN    := PYTHONPATH=$(CURDIR)/python $(PY)

.PHONY: all build test test-fast bench wheel cuda-check clean

all: test

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" numpy pytest hypothesis ninja pybind11 setuptools wheel rich
	touch $@

# Incremental (ninja) in-place build of python/kvcomp/_C*.so.
build: $(VENV)/.deps
	MAX_JOBS=$(JOBS) $(PY) setup.py -q build_ext --inplace

test: build
	$(RUN) -m pytest -q tests

bench: build
	$(RUN) -m kvcomp.bench.cli memory --model llama-3-8b
	$(RUN) -m kvcomp.bench.cli ops --device cpu --json bench/out/ops-cpu.json

# A wheel against the venv's torch (the way users install kvcomp).
wheel: $(VENV)/.deps
	MAX_JOBS=$(JOBS) $(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist python/kvcomp/_C*.so python/*.egg-info
