"""Builds kvcomp._C on the LibTorch stable ABI.

One binary serves every torch from TORCH_TARGET (below) on and, built with
the limited Python API, every Python >= 3.10 (a cp310-abi3 wheel). CPU
kernels are always built (AVX2+FMA+F16C on x86-64 unless
KVCOMP_CPU_ISA=portable). CUDA kernels are added when torch has CUDA and nvcc
is found; TORCH_CUDA_ARCH_LIST selects the architectures.
"""
import glob
import json
import os
import platform

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# The oldest torch whose stable ABI the binary may use (the headers of a newer
# torch hide what came later).
TORCH_TARGET = (2, 11)


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def common_flags():
    # Py_LIMITED_API (3.10) is added by torch for py_limited_api=True.
    return [f"-DTORCH_TARGET_VERSION=0x{TORCH_TARGET[0]:02x}{TORCH_TARGET[1]:02x}000000000000"]


def cpu_flags():
    # C++17 code; torch picks the -std it needs. No OpenMP: parallel_for is
    # torch's own thread pool, called through the stable ABI.
    flags = ["-O3", "-fvisibility=hidden"] + common_flags()
    isa = os.environ.get("KVCOMP_CPU_ISA", "avx2")
    if isa == "avx2" and platform.machine().lower() in ("x86_64", "amd64"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    elif isa not in ("avx2", "portable"):
        raise SystemExit(f"KVCOMP_CPU_ISA must be avx2 or portable, got {isa!r}")
    return flags


def with_cuda():
    return bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None


def write_build_record():
    # Read by kvcomp/_native.py before it loads the binary: an older torch is
    # refused with a message instead of an undefined-symbol error.
    record = {"torch_built": torch.__version__.split("+")[0],
              "torch_min": ".".join(map(str, TORCH_TARGET))}
    with open(os.path.join(ROOT, "python", "kvcomp", "_build.json"), "w") as f:
        json.dump(record, f)


def extension():
    srcs = sources("csrc/*.cpp") + sources("csrc/kvcomp/*.cpp") + sources("csrc/cpu/*.cpp") + sources("csrc/ops/*.cpp")
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], py_limited_api=True)
    if not with_cuda():
        return cpp_extension.CppExtension("kvcomp._C", srcs, extra_compile_args={"cxx": cpu_flags()}, **kwargs)
    # No --use_fast_math: the kernels must round exactly like the CPU ones.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    srcs += sources("csrc/cuda/*.cu") + sources("csrc/cuda_bind/*.cpp")
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DKVCOMP_WITH_CUDA"]
    return cpp_extension.CUDAExtension("kvcomp._C", srcs, extra_compile_args={
        "cxx": cpu_flags() + ["-DKVCOMP_WITH_CUDA", "-DUSE_CUDA"], "nvcc": nvcc + common_flags()}, **kwargs)


write_build_record()
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    package_data={"kvcomp": ["_build.json"]},
)
