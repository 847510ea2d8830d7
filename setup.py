"""Builds kvcomp._C against the installed torch.

CPU kernels are always built (AVX2+FMA+F16C on x86-64 unless
KVCOMP_CPU_ISA=portable). CUDA kernels are added when torch has CUDA and nvcc
is found; TORCH_CUDA_ARCH_LIST selects the architectures.
"""
import glob
import os
import platform

from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def cpu_flags():
    # C++17 code; torch picks the -std it needs. -fopenmp: at::parallel_for
    # is an OpenMP pragma in ATen's headers, serial without it.
    flags = ["-O3", "-fvisibility=hidden", "-fopenmp"]
    isa = os.environ.get("KVCOMP_CPU_ISA", "avx2")
    if isa == "avx2" and platform.machine().lower() in ("x86_64", "amd64"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    elif isa not in ("avx2", "portable"):
        raise SystemExit(f"KVCOMP_CPU_ISA must be avx2 or portable, got {isa!r}")
    return flags


def with_cuda():
    import torch
    return bool(torch.version.cuda) and cpp_extension.CUDA_HOME is not None


def extension():
    srcs = sources("csrc/*.cpp") + sources("csrc/kvcomp/*.cpp") + sources("csrc/cpu/*.cpp") + sources("csrc/ops/*.cpp")
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")], extra_link_args=["-fopenmp"])
    if not with_cuda():
        return cpp_extension.CppExtension("kvcomp._C", srcs, extra_compile_args={"cxx": cpu_flags()}, **kwargs)
    # No --use_fast_math: the kernels must round exactly like the CPU ones.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    srcs += sources("csrc/cuda/*.cu") + sources("csrc/cuda_bind/*.cpp")
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo", "-DKVCOMP_WITH_CUDA"]
    return cpp_extension.CUDAExtension("kvcomp._C", srcs, extra_compile_args={
        "cxx": cpu_flags() + ["-DKVCOMP_WITH_CUDA"], "nvcc": nvcc}, **kwargs)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
