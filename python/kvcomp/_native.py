"""The compiled extension, loaded after a check of the running torch.

``kvcomp._C`` is built on the LibTorch stable ABI and the limited Python API:
one binary serves every torch from the ``torch_min`` of its build record
(``_build.json``, written by setup.py) and every Python >= 3.10. An older
torch is refused here with a message, not with an undefined symbol. The
binary's non-tensor helpers are ops of ``torch.ops.kvcomp_host`` (no
pybind11); this module gives them their Python types.
"""
from __future__ import annotations

import json
import os
import re

import torch

_RECORD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build.json")


def _version(text: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", text)
    if not m:
        raise ImportError(f"kvcomp: cannot read the version of torch {text!r}")
    return int(m.group(1)), int(m.group(2))


def _build_record() -> dict:
    try:
        with open(_RECORD) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ImportError("kvcomp's extension is not built: run `make build` (or install the wheel)") from None


BUILD = _build_record()
if _version(torch.__version__) < _version(BUILD["torch_min"]):
    raise ImportError(
        f"kvcomp was built against torch {BUILD['torch_built']} for the stable ABI of torch >= "
        f"{BUILD['torch_min']}; this is torch {torch.__version__}. Install torch>={BUILD['torch_min']}.")

from . import _C  # noqa: E402,F401  (registers torch.ops.kvcomp.* and torch.ops.kvcomp_host.*)

_host = torch.ops.kvcomp_host
_INFO = json.loads(_host.build_info())
LAYOUT_VERSION: int = _INFO["layout_version"]


def build_info() -> dict:
    """How this kvcomp was built: the torch it was compiled against
    (``torch_built``), the oldest torch it runs with (``torch_min``), the tile
    layout version, whether it has CUDA kernels, the CPU kernels' ISA."""
    return {**BUILD, **_INFO}


def describe_format(spec: str) -> dict:
    d = json.loads(_host.describe_format(spec))
    for side in ("k", "v"):
        d[side]["code_range"] = tuple(d[side]["code_range"])
    return d


def tile_bytes(spec: str, head_dim: int, block_size: int) -> int:
    return _host.tile_bytes(spec, head_dim, block_size)


def tile_layout(spec: str, head_dim: int, block_size: int) -> dict:
    return json.loads(_host.tile_layout(spec, head_dim, block_size))


def infer_geometry(spec: str, tile_bytes: int, head_dim: int = 0) -> tuple[int, int]:
    return tuple(_host.infer_geometry(spec, tile_bytes, head_dim))


def storable_max(spec: str, head_dim: int) -> tuple[float, float]:
    return tuple(_host.storable_max(spec, head_dim))


def set_cuda_validation(enabled: bool) -> bool:
    """Sets the CUDA ops' host-side data checks; returns the previous setting."""
    return _host.set_cuda_validation(enabled)


def cuda_validation() -> bool:
    return _host.cuda_validation()
