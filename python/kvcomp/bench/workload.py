"""Benchmark inputs: decode geometry, random K/V, and paged caches filled
through the real write path (quantize_write, or seal_blocks for per-channel
formats) behind a shuffled block table."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

import kvcomp
from kvcomp import ops

ALL_FORMATS = ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "int4:s", "int4:h", "nf4:h", "int3:g64:h",
               "nf3:g64:h", "int2", "nf2:g64:h", "kivi2", "int4c/int4"]
QUICK_FORMATS = ["int8", "int4", "nf4:h", "kivi2"]


@dataclass(frozen=True)
class Geometry:
    batch: int
    context: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    @property
    def blocks_per_seq(self) -> int:
        return -(-self.context // self.block_size)

    @property
    def num_blocks(self) -> int:
        return self.batch * self.blocks_per_seq

    def flops(self) -> int:
        """q.K and p.V: 2 multiply-adds per head, token and channel."""
        return 4 * self.batch * self.num_heads * self.context * self.head_dim

    def as_dict(self) -> dict:
        return asdict(self)


def make_kv(geom: Geometry, device, dtype: torch.dtype, generator: torch.Generator):
    """K and V ``[batch * context, num_kv_heads, head_dim]``: standard normal
    with a few large-magnitude channels, as real K caches have. Outliers make
    the per-token formats' scales (and so their error) realistic; zeros would
    make quantizers trivially exact and some kernels take shortcuts."""
    shape = (geom.batch * geom.context, geom.num_kv_heads, geom.head_dim)
    key = torch.randn(shape, generator=generator, dtype=torch.float32)
    value = torch.randn(shape, generator=generator, dtype=torch.float32)
    outliers = torch.randperm(geom.head_dim, generator=generator)[:4]
    key[..., outliers] *= 10.0
    value[..., outliers[:2]] *= 3.0
    return key.to(device=device, dtype=dtype), value.to(device=device, dtype=dtype)


def dense(x: torch.Tensor, geom: Geometry, dtype: torch.dtype) -> torch.Tensor:
    """``[batch * context, kvh, hd]`` -> contiguous ``[batch, kvh, context, hd]``."""
    x = x.view(geom.batch, geom.context, geom.num_kv_heads, geom.head_dim)
    return x.permute(0, 2, 1, 3).to(dtype).contiguous()


def shuffled_tables(geom: Geometry, device, generator: torch.Generator):
    """A random block table (so the kernels see scattered blocks, as after
    many allocations and frees), the matching slot mapping and seq_lens."""
    perm = torch.randperm(geom.num_blocks, generator=generator)
    tables = perm.view(geom.batch, geom.blocks_per_seq).to(torch.int32)
    pos = torch.arange(geom.context)
    slots = tables[:, pos // geom.block_size].long() * geom.block_size + pos % geom.block_size
    seq_lens = torch.full((geom.batch,), geom.context, dtype=torch.int32)
    return tables.to(device), slots.reshape(-1).to(device), seq_lens.to(device)


def write_cache(fmt: kvcomp.KVFormat, key, value, pool, slots, geom: Geometry, device) -> None:
    """Store key/value at ``slots`` in ``pool`` the way the library does."""
    if not fmt.per_channel:
        ops.quantize_write(key, value, pool, slots, fmt.name)
        return
    # Per-channel scales span a block's tokens: write fp16 hot blocks, then seal.
    hot = kvcomp.allocate_pool(pool.shape[0], geom.block_size, geom.num_kv_heads,
                               geom.head_dim, "fp16", device)
    ops.quantize_write(key, value, hot, slots, "fp16")
    blocks = torch.arange(pool.shape[0], dtype=torch.int32, device=device)
    ops.seal_blocks(hot, blocks, pool, blocks, "fp16", fmt.name)


def fill_cache(fmt: kvcomp.KVFormat, key, value, geom: Geometry, device, generator):
    """A pool holding every sequence's ``context`` tokens, and its tables."""
    tables, slots, seq_lens = shuffled_tables(geom, device, generator)
    pool = kvcomp.allocate_pool(geom.num_blocks, geom.block_size, geom.num_kv_heads,
                                geom.head_dim, fmt, device)
    write_cache(fmt, key, value, pool, slots, geom, device)
    return pool, tables, seq_lens


# ------------------------------------------------------------ sweep inputs
# The grid (32 query heads, 8 KV heads, head_dim 128).
SWEEP_FORMATS = ["fp16", "fp8_e4m3", "int8", "int4", "int2"]
SWEEP_BATCHES = [1, 16, 64]
SWEEP_CONTEXTS = [1024, 8192, 32768, 131072]


def dense_bytes(geom: Geometry, dtype: torch.dtype = torch.float16) -> int:
    """K plus V held dense: ``2 * [batch, kvh, context, hd]``."""
    return 2 * geom.batch * geom.num_kv_heads * geom.context * geom.head_dim * dtype.itemsize


def pool_bytes(fmt: kvcomp.KVFormat, geom: Geometry) -> int:
    """The pool holding every sequence's blocks."""
    return geom.num_blocks * geom.num_kv_heads * fmt.tile_bytes(geom.head_dim, geom.block_size)


def make_dense_kv(geom: Geometry, device, dtype: torch.dtype, seed: int):
    """K and V ``[batch, kvh, context, hd]`` drawn on ``device`` (no host copy
    of tens of GB): standard normal with the same outlier channels as
    :func:`make_kv`."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (geom.batch, geom.num_kv_heads, geom.context, geom.head_dim)
    key = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    value = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    outliers = torch.randperm(geom.head_dim, generator=torch.Generator().manual_seed(seed))[:4].tolist()
    for c in outliers:
        key[..., c] *= 10.0
    for c in outliers[:2]:
        value[..., c] *= 3.0
    return key, value


def write_dense(fmt: kvcomp.KVFormat, key, value, pool, tables, geom: Geometry,
                chunk_tokens: int = 1 << 18) -> None:
    """Store dense ``[batch, kvh, context, hd]`` K/V into ``pool`` behind
    ``tables``, a few whole blocks of every sequence at a time (so the token-
    major copy the op takes stays small). Per-channel formats go through a
    chunk-sized fp16 hot pool and seal_blocks."""
    B, H, L, D = key.shape
    bs = geom.block_size
    step = max(1, chunk_tokens // (B * bs))  # blocks per sequence per chunk
    for j0 in range(0, geom.blocks_per_seq, step):
        j1 = min(j0 + step, geom.blocks_per_seq)
        t0, t1 = j0 * bs, min(j1 * bs, L)
        pos = torch.arange(t0, t1, device=key.device)
        k = key[:, :, t0:t1].transpose(1, 2).reshape(-1, H, D)
        v = value[:, :, t0:t1].transpose(1, 2).reshape(-1, H, D)
        if not fmt.per_channel:
            slots = tables[:, pos // bs].long() * bs + pos % bs
            ops.quantize_write(k, v, pool, slots.reshape(-1), fmt.name)
            continue
        hot = kvcomp.allocate_pool(B * (j1 - j0), bs, H, D, "fp16", key.device)
        local = torch.arange(B * (j1 - j0), dtype=torch.int32, device=key.device).view(B, j1 - j0)
        slots = local[:, pos // bs - j0].long() * bs + pos % bs
        ops.quantize_write(k, v, hot, slots.reshape(-1), "fp16")
        ops.seal_blocks(hot, local.reshape(-1), pool, tables[:, j0:j1].reshape(-1).contiguous(),
                        "fp16", fmt.name)
