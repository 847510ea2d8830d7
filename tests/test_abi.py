"""The extension is one binary for every torch >= its target and every
Python >= 3.10: it links libtorch through the stable C shim only (no at::,
c10:: or torch:: C++ symbol) and Python through the limited API."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import kvcomp
from kvcomp import _C, _native

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or shutil.which("nm") is None,
                                reason="reads the ELF symbol table with nm (Linux binutils)")

# The limited-API functions the module's init uses; anything else would tie
# the binary to one Python.
LIMITED_PYTHON = {"PyModule_Create2"}


def _symbols(*flags):
    out = subprocess.run(["nm", "-D", "-C", *flags, _C.__file__], check=True, capture_output=True,
                         text=True).stdout
    # "<address> <type> <name>", or "<type> <name>" for an undefined or weak symbol
    rows = [line.split(None, 2) if line[0] != " " else [""] + line.split(None, 1)
            for line in out.splitlines() if line.strip()]
    return [row[2] for row in rows]


def test_the_binary_is_abi3():
    assert _C.__file__.endswith(".abi3.so"), _C.__file__


def test_no_unstable_libtorch_symbol():
    undefined = _symbols("--undefined-only")
    cxx_torch = [s for s in undefined if any(ns in s for ns in ("at::", "c10::", "torch::", "caffe2::"))]
    assert not cxx_torch, cxx_torch[:10]
    # libtorch is reached through the C shim: aoti_torch_* / torch_* functions
    assert any(s.startswith("aoti_torch_") for s in undefined)
    python = {s for s in undefined if s.startswith(("Py", "_Py"))}
    assert python <= LIMITED_PYTHON, sorted(python - LIMITED_PYTHON)
    assert not [s for s in undefined if "pybind11" in s]


def test_exports_only_the_module_init():
    defined = _symbols("--defined-only")
    ours = [s for s in defined if "kvcomp" in s or "torch" in s or s.startswith("Py")]
    assert ours == ["PyInit__C"], ours


def test_build_record_matches_the_running_torch():
    with open(os.path.join(os.path.dirname(kvcomp.__file__), "_build.json")) as f:
        record = json.load(f)
    assert record == _native.BUILD
    assert _native._version(torch.__version__) >= _native._version(record["torch_min"])
    assert _native._version(record["torch_built"]) >= _native._version(record["torch_min"])


def test_build_info():
    info = kvcomp.build_info()
    assert info["torch_min"] == _native.BUILD["torch_min"] and info["layout_version"] == kvcomp.LAYOUT_VERSION
    assert info["cpu_isa"] in ("avx2", "portable") and isinstance(info["with_cuda"], bool)


def test_an_older_torch_is_refused():
    """The check in _native runs before the binary loads: a torch older than
    the record's torch_min gets an ImportError that says what to install."""
    code = ("import sys, torch; torch.__version__ = '2.10.0'; "
            "import kvcomp")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(kvcomp.__file__))]
                                                      + sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "ImportError" in r.stderr and f"torch>={_native.BUILD['torch_min']}" in r.stderr, r.stderr[-600:]
    assert "this is torch 2.10.0" in r.stderr
