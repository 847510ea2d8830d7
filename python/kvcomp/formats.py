"""Storage formats: parsing specs, exact sizes, pool allocation.

The format math and the tile layout live once, in csrc/kvcomp/format.h and
spec.cpp; this module asks the extension rather than repeating them.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from dataclasses import dataclass

import torch

from . import _native


@dataclass(frozen=True)
class SideFormat:
    """One side (K or V) of a format: its canonical spec, bits per code, group
    size (0: one scale per token row), scale scope, whether each token is
    rotated (``:h``) before quantization, fp16 words of metadata per group
    (scale, and zero where there is one; 0 for raw kinds) and the range
    ``(lo, hi)`` codes decode to per unit of scale before the zero (empty for
    raw kinds)."""

    spec: str
    bits: int
    group: int
    per_channel: bool
    rotated: bool
    meta_halves: int
    code_range: tuple


@dataclass(frozen=True)
class KVFormat:
    """A KV format spec: ``"<fmt>"`` for K and V alike or ``"<kfmt>/<vfmt>"``.

    ``name`` is the canonical spelling (``kivi2`` parses to ``int2c/int2``).
    """

    name: str
    k: SideFormat
    v: SideFormat

    @classmethod
    def parse(cls, spec: "str | KVFormat") -> "KVFormat":
        if isinstance(spec, KVFormat):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"format spec must be a str, got {type(spec).__name__}")
        return _parse(spec)

    @property
    def per_channel(self) -> bool:
        """True if K or V is quantized per channel (written by seal_blocks only)."""
        return self.k.per_channel or self.v.per_channel

    def tile_bytes(self, head_dim: int, block_size: int = 16) -> int:
        """Bytes of one tile: block_size tokens of one KV head, K then V."""
        return _native.tile_bytes(self.name, int(head_dim), int(block_size))

    def bytes_per_token(self, head_dim: int, block_size: int = 16) -> int:
        """Exact pool bytes per token, one layer and KV head, K plus V,
        scales and padding included: ``tile_bytes / block_size``."""
        tile = self.tile_bytes(head_dim, block_size)
        assert tile % block_size == 0  # the layout pads tiles to whole tokens
        return tile // block_size

    def layout(self, head_dim: int, block_size: int = 16) -> dict:
        """Byte offsets of a tile's regions (see docs/format.md)."""
        return _native.tile_layout(self.name, int(head_dim), int(block_size))

    def storable_max(self, head_dim: int) -> tuple[float, float]:
        """The largest |x| the K and V sides store (fp16: below 65520; 16-bit
        scales: 65504; rotated: 65504 / sqrt(head_dim)). The ops reject more."""
        return _native.storable_max(self.name, int(head_dim))

    def geometry(self, tile_bytes: int, head_dim: int = 0) -> tuple[int, int]:
        """(head_dim, block_size) of a pool whose last dimension is tile_bytes."""
        return _native.infer_geometry(self.name, int(tile_bytes), int(head_dim))

    def __str__(self) -> str:
        return self.name


@functools.lru_cache(maxsize=1024)
def _parse(spec: str) -> KVFormat:
    # Specs are immutable and the answer is a frozen KVFormat: one extension
    # call (an op returning JSON, ~20 us) per distinct spec. Errors are not cached.
    d = _native.describe_format(spec)
    return KVFormat(d["name"], SideFormat(**d["k"]), SideFormat(**d["v"]))


def allocate_pool(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                  format: "str | KVFormat", device: "torch.device | str | None" = None) -> torch.Tensor:
    """A zeroed pool ``uint8 [num_blocks, num_kv_heads, tile_bytes]`` for ``format``."""
    fmt = KVFormat.parse(format)
    if int(num_blocks) < 0:
        raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
    if int(num_kv_heads) <= 0:
        raise ValueError(f"num_kv_heads must be positive, got {num_kv_heads}")
    tile = fmt.tile_bytes(head_dim, block_size)
    shape = (int(num_blocks), int(num_kv_heads), tile)
    if torch.device(device if device is not None else "cpu").type == "cpu":
        return _huge_page_buffer(shape[0] * shape[1] * tile).view(shape).zero_()
    return torch.zeros(shape, dtype=torch.uint8, device=device)


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _huge_page_buffer(nbytes: int) -> torch.Tensor:
    """An untouched uint8 CPU buffer on 2 MiB boundaries, advised to use huge
    pages (Linux): decode reads blocks all over the pool, and with 4 KiB pages
    every block costs a TLB miss (measured: ~9% of decode time at 32k tokens)."""
    if nbytes < _HUGE_PAGE or not sys.platform.startswith("linux"):
        return torch.empty(nbytes, dtype=torch.uint8)
    raw = torch.empty(nbytes + _HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % _HUGE_PAGE
    buf = raw[start:start + nbytes]
    # Whole huge pages only: a partial one would make the kernel back up to
    # 2 MiB the pool never uses (measured: +60 MiB over 30 small pools).
    length = nbytes - nbytes % _HUGE_PAGE
    _libc().madvise(ctypes.c_void_p(buf.data_ptr()), ctypes.c_size_t(length), _MADV_HUGEPAGE)
    return buf


@functools.lru_cache(maxsize=None)
def _libc():
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
