"""Shared test helpers: format lists, random data, paged-cache builders,
hypothesis strategies, tolerance checks, equality of two PagedKVCaches (.kvc
round trips). Fixtures wrapping these live in conftest.py."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import settings, strategies as st

import kvcomp
from kvcomp import ops
from reference import BLOCK_SIZES, U32, parse_format

# Per-token formats (quantize_write and seal_blocks both write them).
TOKEN_FORMATS = [
    "fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8",
    "int4", "int4:g64", "int4:g128", "int2", "int2:g64", "int2:g128",
    "fp8_e4m3/int4", "int8/int2:g64", "fp16/int8", "int4:g64/fp8_e5m2", "bf16/int2",
    # layout v2: int3, symmetric (:s), NF levels, int8 groups, rotated (:h)
    "int3", "int3:g64:h", "int4:s", "int2:g64:s:h", "int4:h", "nf4:h", "nf3:g64:h", "nf2:h",
    "int8:g32", "fp8_e5m2:h", "nf3:h/int4:s", "fp16/nf2:g64:h",
]
# Formats with a per-channel side (written by seal_blocks only).
CHANNEL_FORMATS = [
    "int8c", "int4c", "int2c", "int4c/int4", "kivi2", "kivi4", "int8c/int8",
    "int2c/fp16", "fp8_e5m2/int4c", "fp32/int4c",
]
ALL_FORMATS = TOKEN_FORMATS + CHANNEL_FORMATS
HOT_FORMATS = ["fp32", "fp16", "bf16"]
ATTN_HEAD_DIMS = (64, 128, 256)
ACT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def head_dims_for(fmt: str, dims=(32, 64, 128, 256)) -> list[int]:
    rf = parse_format(fmt)
    return [d for d in dims if rf.head_dim_ok(d)]


def examples(n: int) -> int:
    """n examples under the default profile (60 a test), scaled with the
    loaded profile's max_examples."""
    return max(1, round(n * settings().max_examples / 60))


# ------------------------------------------------------------------- data
def heavy_tailed(shape, gen: torch.Generator, dtype=torch.float32, magnitude: float = 1.0,
                 limit: float | None = None, outliers: int = 2) -> torch.Tensor:
    """Student-t (3 dof) values times per-channel scales (a few outlier
    channels x20), plus a per-channel offset; never exactly zero; |x| <= limit,
    by default what every format stores at this head_dim (shape[-1]): a
    rotated one holds 65504 / sqrt(head_dim) (fp16 scales), fp16 65519."""
    shape = tuple(shape)
    hd = shape[-1]
    if limit is None:
        limit = min(3.0e4, 0.98 * 65504 / math.sqrt(hd))  # bf16 rounding stays inside
    z = torch.randn(shape, generator=gen, dtype=torch.float64)
    chi2 = torch.randn((3,) + shape, generator=gen, dtype=torch.float64).pow(2).sum(0)
    t = z / torch.sqrt(chi2 / 3).clamp(min=0.05)
    ch_scale = torch.exp(0.5 * torch.randn(hd, generator=gen, dtype=torch.float64))
    idx = torch.randperm(hd, generator=gen)[:outliers]
    ch_scale[idx] *= 20.0
    offset = 2.0 * torch.randn(hd, generator=gen, dtype=torch.float64)
    x = (t * ch_scale + offset) * magnitude
    tiny = 1e-3 * magnitude
    x = torch.where(x.abs() < tiny, torch.where(x < 0, -tiny, tiny), x)
    x = x.clamp(-limit, limit).to(dtype)
    # rounding to a low-precision dtype must not produce zeros either
    x = torch.where(x == 0, torch.full_like(x, 2 * tiny), x)
    return x


def gen_from(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g


# ------------------------------------------------------------ paged caches
@dataclass
class Cache:
    fmt: str
    pool: torch.Tensor          # [num_blocks, hkv, tile_bytes]
    block_tables: torch.Tensor  # int32 [batch, max_blocks], -1 padded
    seq_lens: torch.Tensor      # int32 [batch]
    head_dim: int
    block_size: int
    key_slots: torch.Tensor     # what was written, per slot: [num_blocks*bs, hkv, hd]
    value_slots: torch.Tensor
    hot_pool: torch.Tensor | None = None
    hot_format: str | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.pool.shape[1]

    def slots(self, b: int) -> torch.Tensor:
        n = int(self.seq_lens[b])
        pos = torch.arange(n)
        return self.block_tables[b, pos // self.block_size].long() * self.block_size + pos % self.block_size

    def dense_inputs(self):
        """What was written, as dense [B, hkv, max_len, hd] float64 K, V."""
        B = self.block_tables.shape[0]
        L = int(self.seq_lens.max()) if B else 0
        K = torch.zeros(B, self.num_kv_heads, L, self.head_dim, dtype=torch.float64)
        V = torch.zeros_like(K)
        for b in range(B):
            s = self.slots(b)
            K[b, :, : len(s)] = self.key_slots[s].double().permute(1, 0, 2)
            V[b, :, : len(s)] = self.value_slots[s].double().permute(1, 0, 2)
        return K, V


def random_block_tables(seq_lens, block_size, gen, spare_blocks=2, extra_cols=1):
    """Shuffled block ids (a random permutation of the pool's blocks), -1 beyond
    the blocks each sequence uses. Returns (block_tables int32, num_blocks)."""
    used = [math.ceil(n / block_size) for n in seq_lens]
    max_blocks = max(used + [1]) + extra_cols
    num_blocks = sum(used) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    bt = torch.full((len(seq_lens), max_blocks), -1, dtype=torch.int32)
    i = 0
    for b, u in enumerate(used):
        bt[b, :u] = perm[i: i + u]
        i += u
    return bt, num_blocks


def build_cache(fmt: str, seq_lens, num_kv_heads: int, head_dim: int, block_size: int,
                gen: torch.Generator, dtype=torch.float32, hot_format: str = "fp16",
                magnitude: float = 1.0, spare_blocks: int = 2) -> Cache:
    """A random paged cache: every slot of the pool (unused blocks and the tail
    of partial blocks too, so stray reads show) holds heavy-tailed data,
    written with quantize_write, or into a hot pool then seal_blocks for
    per-channel formats."""
    bt, num_blocks = random_block_tables(seq_lens, block_size, gen, spare_blocks)
    n_slots = num_blocks * block_size
    shape = (n_slots, num_kv_heads, head_dim)
    k = heavy_tailed(shape, gen, dtype, magnitude)
    v = heavy_tailed(shape, gen, dtype, magnitude)
    pool = kvcomp.allocate_pool(num_blocks, block_size, num_kv_heads, head_dim, fmt)
    slots = torch.arange(n_slots, dtype=torch.int64)
    hot = None
    if parse_format(fmt).per_channel:
        hot = kvcomp.allocate_pool(num_blocks, block_size, num_kv_heads, head_dim, hot_format)
        ops.quantize_write(k, v, hot, slots, hot_format)
        ids = torch.arange(num_blocks, dtype=torch.int32)
        ops.seal_blocks(hot, ids, pool, ids, hot_format, fmt)
    else:
        ops.quantize_write(k, v, pool, slots, fmt)
    return Cache(fmt, pool, bt, torch.tensor(list(seq_lens), dtype=torch.int32), head_dim,
                 block_size, k, v, hot, hot_format if hot is not None else None)


# ------------------------------------------------------------ strategies
def seq_len_strategy(block_size: int, longest: int | None = None):
    bs = block_size
    special = [0, 1, bs - 1, bs, bs + 1, 2 * bs, 2 * bs + 1]
    longest = longest or 4 * bs
    return st.one_of(st.sampled_from(special), st.integers(0, longest))


@st.composite
def attention_shapes(draw, formats=ALL_FORMATS, max_batch=4):
    fmt = draw(st.sampled_from(formats))
    hd = draw(st.sampled_from([d for d in ATTN_HEAD_DIMS if parse_format(fmt).head_dim_ok(d)]))
    bs = draw(st.sampled_from(BLOCK_SIZES))
    hkv = draw(st.sampled_from([1, 2, 4]))
    group = draw(st.sampled_from([1, 4, 8]))
    batch = draw(st.integers(1, max_batch))
    longest = draw(st.sampled_from([4 * bs, 600]))
    seq_lens = draw(st.lists(seq_len_strategy(bs, longest), min_size=batch, max_size=batch))
    return dict(fmt=fmt, head_dim=hd, block_size=bs, num_kv_heads=hkv, group=group, seq_lens=seq_lens)


# ------------------------------------------------------------ comparisons
def assert_within_fp32_ulps(actual: torch.Tensor, expect64: torch.Tensor, ulps: int = 1, what=""):
    """actual (fp32) is within `ulps` fp32 ulps of the float64 reference."""
    a = actual.to(torch.float64)
    e = expect64.to(torch.float64)
    # one ulp of |e| in fp32 (spacing above the fp32 value below |e|)
    e32 = e.abs().to(torch.float32)
    ulp = (torch.nextafter(e32, torch.full_like(e32, math.inf)) - e32).to(torch.float64)
    ulp = torch.maximum(ulp, torch.full_like(ulp, 2.0 ** -149))
    err = (a - e).abs()
    bad = err > ulps * ulp
    if bad.any():
        i = tuple(torch.nonzero(bad)[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements differ by more than {ulps} fp32 ulp; "
            f"first at {i}: actual {a[i].item()!r} vs reference {e[i].item()!r}")


def assert_gather_matches(K, V, RK, RV, fmt: str, what=""):
    """gather_dequant's fp32 K/V against the reference decoder's float64:
    within one fp32 ulp, and for a rotated side (":h") within the fp32
    rounding of the inverse rotation: log2(head_dim) butterfly stages over
    values of at most |row|_1 / sqrt(head_dim), plus the scaling."""
    rf = parse_format(fmt)
    for side, A, E, name in ((rf.k, K, RK, "K"), (rf.v, V, RV, "V")):
        if not side.rotated:
            assert_within_fp32_ulps(A, E, 1, f"{what} gather {name}")
            continue
        n = E.shape[-1]
        tol = 4 * (math.log2(n) + 1) * U32 * E.abs().sum(-1, keepdim=True) / math.sqrt(n) + 2.0 ** -149
        assert_bounded(A, E, tol.expand_as(E), f"{what} gather {name} (rotated)")


def assert_bounded(x_hat: torch.Tensor, x: torch.Tensor, bound: torch.Tensor, what=""):
    err = (x_hat.double() - x.double()).abs()
    bad = err > bound
    if bad.any():
        i = tuple(torch.nonzero(bad)[0].tolist())
        ratio = (err / bound.clamp(min=1e-300)).max().item()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements exceed the error bound "
            f"(worst err/bound {ratio:.6g}); first at {i}: x={x[i].item()!r} "
            f"x_hat={x_hat[i].item()!r} err={err[i].item()!r} bound={bound[i].item()!r}")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb > 0 else (a - b).norm().item()


def dtype_eps(dtype: torch.dtype) -> float:
    """Unit roundoff (half an ulp at 1) of an activation dtype."""
    return {torch.float32: U32, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]


# ------------------------------------------------------------ .kvc files
def used_bytes(c: kvcomp.PagedKVCache, s, layer: int, name: str) -> torch.Tensor:
    t = getattr(c._seqs[s][layer], name)
    pool = (c.hot_pools if name == "hot" else c.cold_pools)[layer]
    return pool[torch.tensor(t.blocks, dtype=torch.long, device=pool.device)].cpu()


def held_stats(c: kvcomp.PagedKVCache) -> dict:
    """stats() without capacity_bytes: pools grow, so a loaded copy holds the
    same blocks in smaller pools."""
    return {k: v for k, v in c.stats().items() if k != "capacity_bytes"}


def assert_same(a: kvcomp.PagedKVCache, b: kvcomp.PagedKVCache):
    """Same sequences, tier states, stats and bytes of the blocks in use."""
    assert (a.policy, a.max_tokens, a.max_seqs, a.dtype, a.hot_format, a.cold_format) == \
        (b.policy, b.max_tokens, b.max_seqs, b.dtype, b.hot_format, b.cold_format)
    assert a.sequences == b.sequences
    assert held_stats(a) == held_stats(b)
    for s in a.sequences:
        for l in range(a.num_layers):
            sa, sb = a._seqs[s][l], b._seqs[s][l]
            assert sa.seen == sb.seen
            for name in ("hot", "cold"):
                ta, tb = getattr(sa, name), getattr(sb, name)
                assert torch.equal(ta.pos, tb.pos), f"seq {s!r} layer {l} {name}: positions differ"
                assert (ta.scores is None) == (tb.scores is None)
                if ta.scores is not None:
                    assert torch.equal(ta.scores.cpu(), tb.scores.cpu()), f"seq {s!r} {name}: scores differ"
                assert torch.equal(used_bytes(a, s, l, name), used_bytes(b, s, l, name)), \
                    f"seq {s!r} layer {l} {name}: pool bytes differ"
