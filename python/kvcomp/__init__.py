"""kvcomp: KV-cache compression for LLM inference.

Ops live in ``torch.ops.kvcomp`` (typed wrappers in :mod:`kvcomp.ops`);
storage formats in :class:`KVFormat`; policies in :class:`Policy` and
:mod:`kvcomp.policies`; the cache users drive in :class:`PagedKVCache`.
"""
import torch  # noqa: F401  (loads libtorch before the extension)

from . import _native  # checks torch, loads the extension (torch.ops.kvcomp.*)
from . import ops
from .formats import KVFormat, allocate_pool
from .policy import Policy
from . import policies
from .cache import CacheFullError, PagedKVCache
from .kvc_file import KVCFileError

__version__ = "0.1.0"
LAYOUT_VERSION = _native.LAYOUT_VERSION
build_info = _native.build_info

__all__ = ["KVFormat", "allocate_pool", "ops", "Policy", "policies", "PagedKVCache", "CacheFullError",
           "KVCFileError", "LAYOUT_VERSION", "build_info", "__version__"]
