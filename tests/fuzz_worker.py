"""Fuzz worker: builds one kvcomp op call from a case (a small dict drawn by
tests/test_fuzz.py), runs it and checks it. It runs in its own process, so a
segfault, abort or hang fails one example instead of killing the test run.

A case is a valid base call (op, geometry, seed) plus a few mutations. Each
mutation says what the op must then do: "valid" (succeed and match the float64
reference), "reject" (raise a clean exception) or "any" (either; no reference
check). Whether ids, lengths and data are in range is decided after all
mutations by a small Python model of the op's checks (``MODELS``), so
boundary values (-1, n, n+1, int32 max, ...) and NaN/Inf can combine freely.

Every tensor argument lives in a larger uint8 buffer with random guard bytes
on both sides. After the call, the buffers of read-only arguments must be
unchanged byte for byte, and those of written arguments (pool, cold_pool,
scores, logits_out) unchanged outside the tensor. After a raise every buffer
must be unchanged: the ops validate before they write (CONTRACT.md,
tests/test_bad_inputs.py).

Protocol: length-prefixed pickles, a case on stdin, a result dict on stdout.
``python tests/fuzz_worker.py "<case dict>"`` runs one case in-process.
"""
from __future__ import annotations

import ast
import math
import os
import re
import sys
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fuzz_pipe  # noqa: E402
import kvcomp  # noqa: E402
from helpers import build_cache, dtype_eps, gen_from, heavy_tailed  # noqa: E402
from reference import (U32, channel_error_bound, parse_format, ref_attention, ref_compact_positions,  # noqa: E402
                       ref_decode_pool, ref_gather, ref_merge, ref_quantize_write, ref_seal_blocks)

OPS = torch.ops.kvcomp
# What a rejected call may raise: torch's argument errors. Anything else
# (SystemError, KeyError, a crash) is a bug.
CLEAN_ERRORS = (ValueError, RuntimeError, TypeError, IndexError, NotImplementedError, OverflowError)
GUARD = 256  # guard bytes on each side of every tensor argument (a multiple of 64: alignment)
MEM_LIMIT = 3 << 30  # address space past torch's own: a huge allocation fails cleanly instead of swapping
I32_MIN, I32_MAX = -2**31, 2**31 - 1
I64_MIN, I64_MAX = -2**63, 2**63 - 1
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BAD_DTYPES = [torch.float64, torch.int32, torch.int64, torch.uint8, torch.int8, torch.bool,
              torch.complex64]
# Format strings: malformed, unknown, aliases and other valid formats.
FORMAT_STRINGS = [
    "int5", "", " ", "int4:", "int4:g48", "int4:g0", "int4:g-32", "int4:g32:g32", "INT8",
    "fp16/", "/fp16", "fp16//fp16", "int8/int8/int8", "kivi3", "int8:g32", "fp8_e4m3:g32",
    "int4\x00junk", "x" * 5000, "int8\n", "\u00e9", "fp16 / int8", " int8 ", "int8/int8",
    "int4:g32", "fp8", "kivi2", "kivi4", "int4c", "int8c", "fp16", "bf16", "fp32", "int8", "int4",
    "int2:g64", "fp8_e5m2", "fp8_e4m3/int4", "int4:g128/int8",
    "int3", "int3:g64:h", "nf3:h", "nf2:g64:h", "int4:s", "int4:h", "fp16:h", "int4c:h", "int8:s",
    "nf4:s", "int4:h:h", "nf5", "int8:g32:h",
]


def pick(options, p):
    return options[p % len(options)]


def boundary(p, n, wide=False):
    """An index value at or beyond the bound n (int32 range unless wide)."""
    vals = [-1, -2, 0, n - 1, n, n + 1, 2 * n + 7, I32_MAX, I32_MIN]
    if wide:
        vals += [2**31, 2**40, 2**62, I64_MAX, I64_MIN]
    return pick(vals, p)


def grow(t, dim=0):
    """t with one more (zero) slice along dim."""
    shape = list(t.shape)
    shape[dim] = 1
    return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim)


def random_bytes(shape, g):
    return torch.randint(0, 256, tuple(shape), generator=g, dtype=torch.uint8)


def noncontig(t):
    """Same shape and values, not contiguous (where the shape allows)."""
    if t.dim() >= 2 and t.shape[0] > 1 and t.shape[1] > 1:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if t.dim() >= 1 and t.shape[-1] > 1:
        wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


# ------------------------------------------------------------ guarded buffers
class Buffers:
    """Tensor arguments placed inside random guard bytes, with snapshots."""

    def __init__(self, g):
        self.g = g
        self.items = []  # (name, buffer, snapshot, lo, hi, written)

    def place(self, name, t, written):
        """A copy of t (same shape, strides and values) inside a guarded buffer."""
        if t.device.type != "cpu" or 0 in t.stride():
            return t  # meta tensors and expanded views: nothing to guard
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
        nbytes = span * t.element_size()
        buf = random_bytes((GUARD + nbytes + GUARD,), self.g)
        inner = buf[GUARD: GUARD + nbytes].view(t.dtype)
        inner.copy_(t.as_strided((span,), (1,), t.storage_offset()))
        placed = inner.as_strided(t.shape, t.stride(), inner.storage_offset())
        self.items.append((name, buf, buf.clone(), GUARD, GUARD + nbytes, written))
        return placed

    def check(self, raised):
        """Read-only buffers unchanged; written ones unchanged outside the
        tensor, or entirely when the call raised."""
        for name, buf, snap, lo, hi, written in self.items:
            if written and not raised:
                for a, b, where in ((0, lo, "before"), (hi, len(buf), "after")):
                    if not torch.equal(buf[a:b], snap[a:b]):
                        bad = (buf[a:b] != snap[a:b]).nonzero()[0].item() + a - lo
                        raise AssertionError(f"{name}: wrote {where} the tensor (byte offset {bad})")
            elif not torch.equal(buf, snap):
                bad = (buf != snap).nonzero()[0].item() - lo
                what = "a rejected call modified" if raised else "the op modified its input"
                raise AssertionError(f"{what} {name} (byte offset {bad})")


# ------------------------------------------------------------------ models
def paged_ok(pool_blocks, bs, bt, sl):
    """check_paged: 0 <= seq_len <= max_blocks*bs and every used block id valid."""
    cap = bt.shape[1] * bs
    for b in range(bt.shape[0]):
        n = int(sl[b])
        if n < 0 or n > cap:
            return False
        ids = bt[b, : (n + bs - 1) // bs]
        if bool(((ids < 0) | (ids >= pool_blocks)).any()):
            return False
    return True


def keep_ok(pool_blocks, bs, bt, keep):
    """check_keep: each row ascending (-1 ignored), below the table's capacity,
    source and destination in named blocks."""
    cap = bt.shape[1] * bs

    def named(b, pos):
        i = int(bt[b, pos // bs])
        return 0 <= i < pool_blocks

    for b in range(keep.shape[0]):
        for h in range(keep.shape[1]):
            n, prev = 0, -1
            for p in keep[b, h].tolist():
                if p < 0:
                    continue
                if p <= prev or p >= cap or not named(b, p) or not named(b, n):
                    return False
                prev, n = p, n + 1
    return True


def storable(side, x):
    """What quantize_write/seal_blocks accept for one side (a RefSide): finite,
    and in range (format.h storable): fp16 storage below 65520, bf16 finite
    after rounding, quantized kinds +-65504 (16-bit scales), rotated ones
    65504 / sqrt(head_dim)."""
    x = x.float()
    if not bool(torch.isfinite(x).all()):
        return False
    if side.kind == "fp16":
        return not bool((x.abs() >= 65520).any())
    if side.kind == "bf16":
        return bool(torch.isfinite(x.to(torch.bfloat16)).all())
    if side.kind == "fp32" or x.numel() == 0:
        return True
    top = torch.tensor(65504.0, dtype=torch.float32)
    if side.rotated:
        top = top / torch.sqrt(torch.tensor(float(x.shape[-1]), dtype=torch.float32))
    return not bool((x.abs() > top).any())


def format_kind(spec, base, tile, head_dim=None, token_only=False):
    """What an op must do when handed format `spec` for a pool of format `base`
    with `tile` bytes per tile."""
    try:
        f = kvcomp.KVFormat.parse(spec)
    except (ValueError, RuntimeError):
        return "reject"
    if token_only and f.per_channel:
        return "reject"
    if f.name == kvcomp.KVFormat.parse(base).name:
        return "valid"
    fits = [geo for geo, t in parse_format(f.name).all_geometries()
            if t == tile and (head_dim is None or geo[0] == head_dim)]
    return "any" if fits else "reject"  # another geometry of that format may share the size


# ------------------------------------------------------------ quantize_write
def qw_base(c, g):
    shape = kvcomp.allocate_pool(c.num_blocks, c.bs, c.hkv, c.hd, c.fmt).shape
    c.pool = random_bytes(shape, g)
    nslots = c.num_blocks * c.bs
    c.slots = torch.randperm(nslots, generator=g)[: c.n].to(torch.int64)
    c.slots[torch.rand(c.n, generator=g) < 0.2] = -1
    dt = DTYPES[c.dtype]
    c.key = heavy_tailed((c.n, c.hkv, c.hd), g, dt, c.mag)
    c.value = heavy_tailed((c.n, c.hkv, c.hd), g, dt, c.mag)
    c.format = c.fmt
    c.written = {"pool"}


def qw_call(a, c):
    return OPS.quantize_write(a["key"], a["value"], a["pool"], a["slots"], c.format)


def qw_model(c):
    slots = c.slots.long()
    if bool((slots >= c.pool.shape[0] * c.bs).any()):
        return False
    w = slots >= 0
    rf = parse_format(c.fmt)
    return storable(rf.k, c.key[w]) and storable(rf.v, c.value[w])


def qw_check(a, c, result):
    s = c.slots[c.slots >= 0]
    if len(set(s.tolist())) < len(s):
        return  # two tokens for one slot: either may win
    expect = ref_quantize_write(c.pool, c.key, c.value, c.slots, c.fmt)
    if not torch.equal(a["pool"], expect):
        diff = (a["pool"] != expect).nonzero()
        raise AssertionError(f"{len(diff)} pool bytes differ from the reference; first at {diff[0].tolist()}")


def _qw_values(c, g, p, values):
    """Puts values[p] into a random token row of key or value (several elements)."""
    if c.n == 0:
        return "valid"
    t = c.key if p % 2 else c.value
    i, h = int(torch.randint(c.n, (1,), generator=g)), int(torch.randint(c.hkv, (1,), generator=g))
    v = pick(values, p // 2)
    idx = torch.randperm(c.hd, generator=g)[: 1 + p % 5]
    t[i, h, idx] = torch.tensor(v, dtype=torch.float64).to(t.dtype)
    return "valid"


def _qw_slot(c, g, p):
    if c.n:
        c.slots[int(torch.randint(c.n, (1,), generator=g))] = boundary(p, c.num_blocks * c.bs, wide=True)
    return "valid"


def _qw_dup(c, g, p):
    if c.n >= 2:
        c.slots[1] = c.slots[0]
    return "valid"


def _qw_empty(c, g, p):
    c.n = 0
    c.key, c.value, c.slots = c.key[:0], c.value[:0], c.slots[:0]
    return "valid"


def _qw_skip_all(c, g, p):
    c.slots.fill_(pick([-1, -7, I64_MIN], p))
    return "valid"


def _qw_key_dtype(c, g, p):
    dt = pick(BAD_DTYPES, p)
    c.key, c.value = c.key.to(dt), c.value.to(dt)
    return "reject", "key"


def _qw_value_dtype(c, g, p):
    dt = pick([d for d in DTYPES.values() if d != c.key.dtype], p)
    c.value = c.value.to(dt)
    return "reject", "value"


def _qw_key_shape(c, g, p):
    op = pick([lambda t: t[:, 0], lambda t: t[None], lambda t: t.reshape(-1)], p)
    c.key, c.value = op(c.key), op(c.value)
    return "reject", "key"


def _qw_value_shape(c, g, p):
    c.value = torch.cat([c.value, torch.ones(1, c.hkv, c.hd, dtype=c.value.dtype)])
    return "reject", "value"


def _qw_heads(c, g, p):
    extra = torch.ones(c.n, 1, c.hd, dtype=c.key.dtype)
    c.key, c.value = torch.cat([c.key, extra], 1), torch.cat([c.value, extra], 1)
    return "reject", "key|pool"


def _qw_head_dim(c, g, p):
    hd = pick([0, c.hd - 16, c.hd + 16, 2 * c.hd, c.hd + 1], p)
    c.key, c.value = (torch.randn(c.n, c.hkv, hd, generator=g).to(c.key.dtype) for _ in range(2))
    return "reject", "pool|head_dim"


def _qw_huge_head_dim(c, g, p):
    """A head_dim that truncates to the pool's as a C int (zero tokens: no memory)."""
    c.key = c.value = torch.zeros(1, dtype=c.key.dtype).expand(0, c.hkv, 2**32 + c.hd)
    c.slots = c.slots[:0]
    return "reject", "pool|head_dim|key"


def _qw_slots_dtype(c, g, p):
    c.slots = c.slots.to(pick([torch.int32, torch.float32, torch.uint8, torch.int16], p))
    return "reject", "slot_mapping"


def _qw_slots_shape(c, g, p):
    c.slots = pick([lambda s: s[None], lambda s: torch.cat([s, torch.tensor([-1])]),
                    lambda s: s.reshape(-1, 1)], p)(c.slots)
    return "reject", "slot_mapping"


def _noncontig_some(names):
    def mut(c, g, p):
        name = pick(names, p)
        setattr(c, name, noncontig(getattr(c, name)))
        return "valid"
    return mut


def _reject_noncontig(name, match):
    def mut(c, g, p):
        t = getattr(c, name)
        nc = noncontig(t)
        if nc.is_contiguous():
            return "valid"
        setattr(c, name, nc)
        return "reject", match
    return mut


def _pool_shape(name="pool"):
    def mut(c, g, p):
        t = getattr(c, name)
        setattr(c, name, pick([lambda t: t[:, 0], lambda t: t[None], lambda t: t.view(torch.int8),
                               lambda t: t.view(torch.float32) if t.shape[-1] % 4 == 0 else t.float(),
                               lambda t: t[..., :-16],
                               lambda t: t[:, :0]], p)(t))
        return "reject", name
    return mut


def _qw_pool_empty(c, g, p):
    c.pool = c.pool[:0]
    return "valid"  # the model rejects any slot that is not skipped


def _format(token_only=False, head_dim_known=True):
    def mut(c, g, p):
        c.format = pick(FORMAT_STRINGS + [c.fmt.upper(), c.fmt + " ", c.fmt], p)
        return format_kind(c.format, c.fmt, c.pool.shape[2], c.hd if head_dim_known else None, token_only), \
            "format|pool"
    return mut


def _format_type(c, g, p):
    c.format = pick([None, 8, ["int8"], 1.5], p)
    return "reject", ""


def _meta(names):
    def mut(c, g, p):
        chosen = names if p % 2 else [pick(names, p // 2)]
        for n in chosen:
            t = getattr(c, n)
            if isinstance(t, torch.Tensor):
                setattr(c, n, t.to("meta"))
        c.meta = True
        return "any"
    return mut


def _alias_kv(c, g, p):
    c.value = c.key
    return "valid"


QW_MUTATIONS = {
    "slot_value": _qw_slot, "dup_slot": _qw_dup, "no_tokens": _qw_empty, "all_skipped": _qw_skip_all,
    "nonfinite": lambda c, g, p: _qw_values(c, g, p, [math.nan, math.inf, -math.inf]),
    "extreme": lambda c, g, p: _qw_values(c, g, p, [3.0e38, -3.4e38, 65504.0, 65520.0, 1e5, -1e30]),
    "tiny": lambda c, g, p: _qw_values(c, g, p, [0.0, -0.0, 1e-45, -1e-40, 1e-38, 6e-8]),
    "key_dtype": _qw_key_dtype, "value_dtype": _qw_value_dtype, "key_shape": _qw_key_shape,
    "value_shape": _qw_value_shape, "heads": _qw_heads, "head_dim": _qw_head_dim,
    "huge_head_dim": _qw_huge_head_dim, "slots_dtype": _qw_slots_dtype, "slots_shape": _qw_slots_shape,
    "noncontig": _noncontig_some(["key", "value", "slots"]),
    "pool_noncontig": _reject_noncontig("pool", "pool"), "pool_shape": _pool_shape(),
    "pool_empty": _qw_pool_empty, "format": _format(token_only=True), "format_type": _format_type,
    "meta": _meta(["key", "value", "pool", "slots"]), "alias_kv": _alias_kv,
}


# ------------------------------------------------------------ seal_blocks
def seal_base(c, g):
    hot = kvcomp.allocate_pool(c.hot_blocks, c.bs, c.hkv, c.hd, c.hot_fmt)
    n = c.hot_blocks * c.bs
    k = heavy_tailed((n, c.hkv, c.hd), g, torch.float32, c.mag)
    v = heavy_tailed((n, c.hkv, c.hd), g, torch.float32, c.mag)
    kvcomp.ops.quantize_write(k, v, hot, torch.arange(n), c.hot_fmt)
    c.hot = hot.clone()
    c.cold = random_bytes(kvcomp.allocate_pool(c.cold_blocks, c.bs, c.hkv, c.hd, c.fmt).shape, g)
    c.src = torch.randperm(c.hot_blocks, generator=g)[: c.n].to(torch.int32)
    c.dst = torch.randperm(c.cold_blocks, generator=g)[: c.n].to(torch.int32)
    c.hot_format, c.format = c.hot_fmt, c.fmt
    c.written = {"cold"}


def seal_call(a, c):
    return OPS.seal_blocks(a["hot"], a["src"], a["cold"], a["dst"], c.hot_format, c.format)


def seal_model(c):
    src, dst = c.src.long(), c.dst.long()
    if bool(((src < 0) | (src >= c.hot.shape[0]) | (dst < 0) | (dst >= c.cold.shape[0])).any()):
        return False
    K, V = ref_decode_pool(c.hot, c.hot_fmt)
    rf = parse_format(c.fmt)
    return storable(rf.k, K[src].float()) and storable(rf.v, V[src].float())


def seal_check(a, c, result):
    if len(set(c.dst.tolist())) < len(c.dst):
        return  # two blocks sealed into one: either may win
    expect = ref_seal_blocks(c.hot, c.src, c.cold, c.dst, c.hot_fmt, c.fmt)
    if not torch.equal(a["cold"], expect):
        diff = (a["cold"] != expect).nonzero()
        raise AssertionError(f"{len(diff)} cold pool bytes differ from the reference; first at {diff[0].tolist()}")


def _ids_value(name, pool):
    def mut(c, g, p):
        ids = getattr(c, name)
        if len(ids):
            ids[int(torch.randint(len(ids), (1,), generator=g))] = boundary(p, getattr(c, pool).shape[0])
        return "valid"
    return mut


def _seal_dup(c, g, p):
    if c.n >= 2:
        (c.dst if p % 2 else c.src)[1] = (c.dst if p % 2 else c.src)[0]
    return "valid"


def _seal_hot_values(c, g, p):
    """Writes a special value into one element of a hot token (its K or V row)."""
    b, h = int(torch.randint(c.hot_blocks, (1,), generator=g)), int(torch.randint(c.hkv, (1,), generator=g))
    t = int(torch.randint(c.bs, (1,), generator=g))
    v = pick([math.nan, math.inf, -math.inf, 65504.0, 3.0e38, -1e30, 1e-45], p)
    dt = parse_format(c.hot_fmt).k.torch_dtype
    x = torch.randn(1, c.hkv, c.hd, generator=g).to(dt)
    x[0, h, int(torch.randint(c.hd, (1,), generator=g))] = torch.tensor(v).to(dt)
    # hot formats are raw: write the bytes directly (quantize_write rejects NaN)
    lay = kvcomp.KVFormat.parse(c.hot_fmt).layout(c.hd, c.bs)
    sec = lay["k" if p % 2 else "v"]
    row = x[0, h].view(torch.uint8)
    c.hot[b, h, sec["offset"] + t * sec["row_bytes"]: sec["offset"] + (t + 1) * sec["row_bytes"]] = row
    return "valid"


def _ids_dtype(names):
    def mut(c, g, p):
        n = pick(names, p)
        setattr(c, n, getattr(c, n).to(pick([torch.int64, torch.int16, torch.float32], p // 2)))
        return "reject", n
    return mut


def _ids_shape(names):
    def mut(c, g, p):
        n = pick(names, p)
        setattr(c, n, pick([lambda t: t[None], lambda t: t.reshape(-1, 1)], p // 2)(getattr(c, n)))
        return "reject", n
    return mut


def _seal_len(c, g, p):
    c.dst = torch.cat([c.dst, torch.zeros(1, dtype=torch.int32)])
    return "reject", "dst_blocks"


def _seal_hot_format(c, g, p):
    c.hot_format = pick(FORMAT_STRINGS + [c.hot_fmt], p)
    kind = format_kind(c.hot_format, c.hot_fmt, c.hot.shape[2], None, token_only=True)
    if kind != "reject" and any(s.rotated for s in parse_format(kvcomp.KVFormat.parse(c.hot_format).name).sides()):
        kind = "reject"  # the hot tier holds its tokens as they are
    return kind, "hot_format|hot_pool"


def _seal_cold_format(c, g, p):
    c.format = pick(FORMAT_STRINGS + [c.fmt], p)
    try:  # the cold pool must have the tile size of this format at the hot pool's geometry
        ok = kvcomp.KVFormat.parse(c.format).tile_bytes(c.hd, c.bs) == c.cold.shape[2]
        same = kvcomp.KVFormat.parse(c.format).name == kvcomp.KVFormat.parse(c.fmt).name
    except (ValueError, RuntimeError):
        return "reject", "cold_format"
    return ("valid" if same else "any") if ok else "reject", "cold_format|cold_pool"


def _seal_cold_geometry(c, g, p):
    hd = pick([d for d in (16, 32, 64, 128, 256) if d != c.hd and parse_format(c.fmt).head_dim_ok(d)], p)
    c.cold = random_bytes(kvcomp.allocate_pool(c.cold_blocks, c.bs, c.hkv, hd, c.fmt).shape, g)
    return "reject", "cold_pool"


def _seal_cold_heads(c, g, p):
    c.cold = torch.cat([c.cold, c.cold[:, :1]], 1) if p % 2 or c.hkv == 1 else c.cold[:, :1]
    return "reject", "cold_pool"


def _seal_alias(c, g, p):
    """hot_pool and cold_pool the same tensor (hot format as cold format)."""
    c.fmt = c.format = c.hot_fmt
    c.cold = c.hot
    c.alias = ("cold", "hot")
    return "any"


def _seal_empty(c, g, p):
    c.n = 0
    c.src, c.dst = c.src[:0], c.dst[:0]
    return "valid"


SEAL_MUTATIONS = {
    "src_value": _ids_value("src", "hot"), "dst_value": _ids_value("dst", "cold"), "dup": _seal_dup,
    "hot_values": _seal_hot_values, "ids_dtype": _ids_dtype(["src", "dst"]),
    "ids_shape": _ids_shape(["src", "dst"]), "length": _seal_len, "hot_format": _seal_hot_format,
    "cold_format": _seal_cold_format, "cold_geometry": _seal_cold_geometry, "cold_heads": _seal_cold_heads,
    "cold_noncontig": _reject_noncontig("cold", "cold_pool"),
    "hot_noncontig": _reject_noncontig("hot", "hot_pool"), "cold_shape": _pool_shape("cold"),
    "noncontig": _noncontig_some(["src", "dst"]), "alias": _seal_alias, "empty": _seal_empty,
    "meta": _meta(["hot", "cold", "src", "dst"]), "format_type": _format_type,
}


# ------------------------------------------------------------ paged caches
def cache_base(c, g):
    cache = build_cache(c.fmt, c.seq_lens, c.hkv, c.hd, c.bs, g)
    c.pool, c.bt, c.sl = cache.pool.clone(), cache.block_tables, cache.seq_lens
    c.format = c.fmt
    c.written = set()


def cache_model(c):
    return paged_ok(c.pool.shape[0], c.bs, c.bt, c.sl)


def _bt_value(c, g, p):
    if c.bt.numel():
        b = int(torch.randint(c.bt.shape[0], (1,), generator=g))
        j = int(torch.randint(c.bt.shape[1], (1,), generator=g))
        c.bt[b, j] = boundary(p, c.pool.shape[0])
    return "valid"


def _sl_value(c, g, p):
    if len(c.sl):
        b = int(torch.randint(len(c.sl), (1,), generator=g))
        c.sl[b] = boundary(p, c.bt.shape[1] * c.bs)
    return "valid"


def _shared_blocks(kind):
    def mut(c, g, p):
        if c.bt.shape[0] >= 2:
            c.bt[1] = c.bt[0]
            c.sl[1] = min(int(c.sl[1]), int(c.sl[0]))
        return kind
    return mut


def _batch0(names):
    def mut(c, g, p):
        for n in names:
            if getattr(c, n) is not None:
                setattr(c, n, getattr(c, n)[:0])
        c.seq_lens = []
        return "valid"
    return mut


# ------------------------------------------------------ paged_decode_attention
def attn_base(c, g):
    cache_base(c, g)
    B = len(c.seq_lens)
    c.q = torch.randn(B, c.hkv * c.group, c.hd, generator=g).to(DTYPES[c.dtype])
    c.scale = c.hd ** -0.5
    L = max(c.seq_lens + [0]) + c.extra
    c.logits = torch.full((B, c.hkv * c.group, L), 1234.5) if c.with_logits else None
    c.written = {"logits"}


def attn_call(a, c):
    return OPS.paged_decode_attention(a["q"], a["pool"], a["bt"], a["sl"], c.format, c.scale, a["logits"])


def attn_model(c):
    if not cache_model(c):
        return False
    if c.logits is not None and len(c.sl) and c.logits.shape[2] < int(c.sl.max()):
        return False
    return True


def attn_check(a, c, result):
    out, lse = result
    B, Hq, D = c.q.shape
    assert out.shape == c.q.shape and out.dtype == c.q.dtype, (out.shape, out.dtype)
    assert lse.shape == (B, Hq) and lse.dtype == torch.float32, (lse.shape, lse.dtype)
    K, V = ref_gather(c.pool, c.bt, c.sl, c.fmt)
    ref_out, ref_lse, ref_logits = ref_attention(c.q.double(), K, V, c.sl, c.scale)
    empty = c.sl == 0
    assert bool((out[empty] == 0).all()) and bool((lse[empty] == -math.inf).all()), "seq_len 0: out 0, lse -inf"
    full = ~empty
    if not full.any():
        return
    tol = 1e-4 + (dtype_eps(c.q.dtype) if c.q.dtype != torch.float32 else 0)
    err = (out.double() - ref_out).norm(dim=-1) / ref_out.norm(dim=-1).clamp(min=1e-300)
    assert err[full].max().item() <= tol, f"out rel err {err[full].max().item():.3g} > {tol:.3g}"
    # fp32 dot products: D u scale sum|q||k| per logit
    G = Hq // K.shape[1]
    absdot = abs(c.scale) * torch.einsum("bhd,bhld->bhl", c.q.double().abs(), K.abs().repeat_interleave(G, 1))
    bound = (D + 2) * U32 * absdot + 1e-30
    mask = torch.arange(K.shape[2])[None, :] < c.sl.long()[:, None]
    lse_tol = torch.where(mask[:, None], bound, torch.zeros_like(bound)).amax(-1) \
        + 4 * U32 * ref_lse.abs().nan_to_num(posinf=0, neginf=0) + 1e-6
    lse_err = (lse.double() - ref_lse).abs()
    assert bool((lse_err[full] <= lse_tol[full]).all()), f"lse err {lse_err[full].max().item():.3g}"
    if a["logits"] is not None:
        m = mask[:, None, :].expand(B, Hq, K.shape[2])
        got = a["logits"][..., : K.shape[2]].double()
        lerr = (got - ref_logits.nan_to_num(neginf=0)).abs()
        bad = (lerr > bound + 2 * U32 * ref_logits.abs().nan_to_num(posinf=0, neginf=0)) & m
        assert not bad.any(), f"logits_out differs from scale*q.k at {bad.nonzero()[0].tolist()}"


def _attn_q_dtype(c, g, p):
    c.q = c.q.to(pick(BAD_DTYPES, p))
    return "reject", "query"


def _attn_q_shape(c, g, p):
    which = p % 4
    if which == 0:
        hd = pick([0, c.hd - 16, c.hd + 16, 2 * c.hd, c.hd + 1], p // 4)
        c.q = torch.randn(c.q.shape[0], c.q.shape[1], hd, generator=g).to(c.q.dtype)
        return "reject", "query|pool|head_dim"
    if which == 1:
        c.q = c.q[0]
        return "reject", "query"
    if which == 2:
        c.q = torch.cat([c.q, c.q[:, :1]], 1)
        if c.logits is not None:
            c.logits = torch.cat([c.logits, c.logits[:, :1]], 1)
        return ("reject", "heads") if c.hkv > 1 else "valid"
    c.q = grow(c.q)
    return "reject", "block_tables|batch"


def _attn_huge_head_dim(c, g, p):
    c.q = torch.zeros(1, dtype=c.q.dtype).expand(0, c.q.shape[1], 2**32 + c.hd)
    c.bt, c.sl = c.bt[:0], c.sl[:0]
    c.logits = None
    return "reject", "query|pool|head_dim"


def _attn_heads0(c, g, p):
    c.q = c.q[:, :0]
    if c.logits is not None:
        c.logits = c.logits[:, :0]
    return "any"


def _attn_scale(c, g, p):
    c.scale = pick([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e-30, 1e30, 2.0**-149], p)
    if not math.isfinite(c.scale):
        return "reject", "scale"
    return "any" if c.scale == 1e30 else "valid"


def _attn_logits(c, g, p):
    if c.logits is None:
        return "valid"
    which = p % 5
    if which == 0:  # shorter than the longest sequence, perhaps
        c.logits = c.logits[..., : max(0, max(c.seq_lens + [0]) - 1 - p % 3)].contiguous()
        return "valid"
    c.logits = [lambda t: t.half(), lambda t: t[:, :, None], lambda t: torch.cat([t, t[:, :1]], 1),
                noncontig][which - 1](c.logits)
    if c.logits.is_contiguous() and which == 4:
        return "valid"
    return "reject", "logits_out"


def _attn_q_values(c, g, p):
    if c.q.numel():
        c.q.view(-1)[int(torch.randint(c.q.numel(), (1,), generator=g))] = pick([math.nan, math.inf, 1e30], p)
    return "any"


def _tables_dtype(c, g, p):
    n = pick(["bt", "sl"], p)
    setattr(c, n, getattr(c, n).to(pick([torch.int64, torch.int16, torch.float32], p // 2)))
    return "reject", {"bt": "block_tables", "sl": "seq_lens"}[n]


def _tables_shape(c, g, p):
    which = p % 4
    if which == 0:
        c.bt = c.bt[0]
        return "reject", "block_tables"
    if which == 1:
        c.sl = c.sl[None]
        return "reject", "seq_lens"
    if which == 2:
        c.sl = grow(c.sl)
        return "reject", "seq_lens"
    c.bt = c.bt[:, :0]  # no columns: only empty sequences fit
    return "valid"


ATTN_MUTATIONS = {
    "bt_value": _bt_value, "sl_value": _sl_value, "shared_blocks": _shared_blocks("valid"),
    "batch0": _batch0(["q", "bt", "sl", "logits"]), "q_dtype": _attn_q_dtype, "q_shape": _attn_q_shape,
    "huge_head_dim": _attn_huge_head_dim, "heads0": _attn_heads0, "scale": _attn_scale,
    "logits_out": _attn_logits, "q_values": _attn_q_values, "tables_dtype": _tables_dtype,
    "tables_shape": _tables_shape, "noncontig": _noncontig_some(["q", "bt", "sl"]),
    "pool_noncontig": _reject_noncontig("pool", "pool"), "pool_shape": _pool_shape(),
    "format": _format(), "format_type": _format_type, "meta": _meta(["q", "pool", "bt", "sl", "logits"]),
}


# ------------------------------------------------------------ gather_dequant
def gather_base(c, g):
    cache_base(c, g)
    c.out_dtype = DTYPES[c.dtype]


def gather_call(a, c):
    return OPS.gather_dequant(a["pool"], a["bt"], a["sl"], c.format, c.out_dtype)


def gather_check(a, c, result):
    K, V = result
    RK, RV = ref_gather(c.pool, c.bt, c.sl, c.fmt)
    rf = parse_format(c.fmt)
    for got, ref, name, side in ((K, RK, "key", rf.k), (V, RV, "value", rf.v)):
        assert got.shape == ref.shape and got.dtype == c.out_dtype, (name, got.shape, ref.shape, got.dtype)
        # one rounding to the output dtype, after at most one fp32 ulp, or for a
        # rotated side the fp32 rounding of the inverse rotation (as helpers.assert_gather_matches)
        eps = U32 if c.out_dtype == torch.float32 else dtype_eps(c.out_dtype)
        fi = torch.finfo(c.out_dtype)
        tol = 2 * eps * ref.abs() + 2 * U32 * ref.abs() + fi.tiny * fi.eps  # + a subnormal step
        if side.rotated:
            n = ref.shape[-1]
            tol = tol + 4 * (math.log2(n) + 1) * U32 * ref.abs().sum(-1, keepdim=True) / math.sqrt(n)
        err = (got.double() - ref).abs()
        assert bool((err <= tol).all()), f"gather {name}: err/tol {(err / tol).max().item():.3g}"


def _gather_dtype(c, g, p):
    c.out_dtype = pick(BAD_DTYPES, p)
    return "reject", "dtype"


GATHER_MUTATIONS = {
    "bt_value": _bt_value, "sl_value": _sl_value, "shared_blocks": _shared_blocks("valid"),
    "batch0": _batch0(["bt", "sl"]), "dtype": _gather_dtype, "tables_dtype": _tables_dtype,
    "tables_shape": _tables_shape, "noncontig": _noncontig_some(["bt", "sl"]),
    "pool_noncontig": _reject_noncontig("pool", "pool"), "pool_shape": _pool_shape(),
    "format": _format(head_dim_known=False), "format_type": _format_type, "meta": _meta(["pool", "bt", "sl"]),
}


# ------------------------------------------------------------------ compact
def compact_base(c, g):
    cache_base(c, g)
    keep = []
    for n in c.seq_lens:
        rows = []
        for _ in range(c.hkv):
            sel = (torch.rand(n, generator=g) < c.frac).nonzero().flatten().tolist()
            rows.append(sel)
        keep.append(rows)
    width = max([len(s) for r in keep for s in r] + [0]) + 2
    c.keep = torch.full((len(c.seq_lens), c.hkv, width), -1, dtype=torch.int32)
    for b, rows in enumerate(keep):
        for h, sel in enumerate(rows):
            cols = sorted(torch.randperm(width, generator=g)[: len(sel)].tolist())
            c.keep[b, h, cols] = torch.tensor(sel, dtype=torch.int32)
    c.written = {"pool"}


def compact_call(a, c):
    return OPS.compact(a["pool"], a["bt"], a["keep"], c.format)


def compact_model(c):
    ids = c.bt[(c.bt >= 0) & (c.bt < c.pool.shape[0])]
    if len(set(ids.tolist())) < len(ids):
        return "any"  # a block named twice: moves race (no bounds at stake)
    return keep_ok(c.pool.shape[0], c.bs, c.bt, c.keep)


def compact_check(a, c, result):
    rf = parse_format(c.fmt)
    bs = c.bs
    before, after = ref_decode_pool(c.pool, c.fmt), ref_decode_pool(a["pool"], c.fmt)
    pos = ref_compact_positions(c.keep)

    def tokens(T, b, h, positions):
        positions = torch.tensor(positions, dtype=torch.long)
        return T[c.bt[b, positions // bs].long(), h, positions % bs]

    for i, (side, name) in enumerate(((rf.k, "K"), (rf.v, "V"))):
        for b, rows in enumerate(pos):
            for h, p in enumerate(rows):
                for first in range(0, len(p), bs):  # one destination block at a time
                    src = p[first: first + bs]
                    dst = list(range(first, first + len(src)))
                    x, xh = tokens(before[i], b, h, src), tokens(after[i], b, h, dst)
                    if not side.per_channel or src == dst:  # moved bytes, or a block left alone
                        assert torch.equal(xh, x), f"{name}[{b},{h}] block at {first}: not moved bit-exactly"
                        continue
                    bound = channel_error_bound(side, x) + 2.0 ** -126
                    err = (xh - x).abs()
                    assert bool((err <= bound).all()), \
                        f"{name}[{b},{h}] block at {first}: err/bound {(err / bound).max():.3g}"
    named = set(c.bt[c.bt >= 0].tolist())
    for blk in range(c.pool.shape[0]):
        if blk not in named:
            assert torch.equal(a["pool"][blk], c.pool[blk]), f"block {blk}, named by no sequence, was written"


def _keep_value(c, g, p):
    if c.keep.numel():
        b = int(torch.randint(c.keep.shape[0], (1,), generator=g))
        h = int(torch.randint(c.keep.shape[1], (1,), generator=g))
        j = int(torch.randint(c.keep.shape[2], (1,), generator=g))
        c.keep[b, h, j] = boundary(p, c.bt.shape[1] * c.bs) if p % 3 else \
            int(torch.randint(c.bt.shape[1] * c.bs, (1,), generator=g))
    return "valid"


def _keep_order(c, g, p):
    """A descending pair or a duplicate in a row (in place: the model decides,
    as a later mutation may change the row again)."""
    for row in c.keep.view(-1, c.keep.shape[-1]):
        idx = (row >= 0).nonzero().flatten()
        if len(idx) >= 2:
            i, j = int(idx[0]), int(idx[1])
            if p % 2:
                row[i], row[j] = int(row[j]), int(row[i])
            else:
                row[j] = row[i]
            break
    return "valid"


def _keep_none(c, g, p):
    c.keep = c.keep[..., :0] if p % 2 else torch.full_like(c.keep, -1)
    return "valid"


def _keep_dtype(c, g, p):
    c.keep = c.keep.to(pick([torch.int64, torch.int16, torch.float32], p))
    return "reject", "keep"


def _keep_shape(c, g, p):
    c.keep = pick([lambda k: k[0], lambda k: k[:, :, None], grow,
                   lambda k: torch.cat([k, k[:, :1]], 1)], p)(c.keep)
    return "reject", "keep"


def _compact_bt_dtype(c, g, p):
    c.bt = pick([lambda t: t.long(), lambda t: t[0], lambda t: t[None]], p)(c.bt)
    return "reject", "block_tables"


COMPACT_MUTATIONS = {
    "keep_value": _keep_value, "keep_order": _keep_order, "keep_none": _keep_none,
    "keep_dtype": _keep_dtype, "keep_shape": _keep_shape, "bt_value": _bt_value,
    "bt_dtype": _compact_bt_dtype, "shared_blocks": _shared_blocks("any"),
    "batch0": _batch0(["bt", "keep"]), "noncontig": _noncontig_some(["bt", "keep"]),
    "pool_noncontig": _reject_noncontig("pool", "pool"), "pool_shape": _pool_shape(),
    "format": _format(head_dim_known=False), "format_type": _format_type,
    "meta": _meta(["pool", "bt", "keep"]),
}


# ------------------------------------------------------ merge_attention_states
def merge_base(c, g):
    dt = DTYPES[c.dtype]
    shape = tuple(c.shape)
    c.oa = (torch.randn(shape, generator=g) * 3).to(dt)
    c.ob = (torch.randn(shape, generator=g) * 3 + 1).to(dt)
    rows = shape[:-1]
    c.la = torch.randn(rows, generator=g) * c.spread
    c.lb = torch.randn(rows, generator=g) * c.spread + 5 * torch.rand(rows, generator=g)
    if c.inf_frac:
        c.la[torch.rand(rows, generator=g) < c.inf_frac] = -math.inf
        c.lb[torch.rand(rows, generator=g) < c.inf_frac] = -math.inf
    c.written = set()


def merge_call(a, c):
    return OPS.merge_attention_states(a["oa"], a["la"], a["ob"], a["lb"])


def merge_check(a, c, result):
    out, lse = result
    oa, la, ob, lb = c.oa, c.la, c.ob, c.lb
    assert out.dtype == oa.dtype and out.shape == oa.shape and lse.dtype == torch.float32 and lse.shape == la.shape
    ro, rl = ref_merge(oa, la, ob, lb)
    m = torch.maximum(la.double(), lb.double())
    ms = torch.where(m == -math.inf, torch.zeros_like(m), m)
    wa, wb = torch.exp(la.double() - ms), torch.exp(lb.double() - ms)
    s = (wa + wb).clamp(min=1e-300)
    mag = (wa / s)[..., None] * oa.double().abs() + (wb / s)[..., None] * ob.double().abs()
    tol = 8 * U32 * mag + 2.0 ** -140
    if oa.dtype != torch.float32:
        tol = tol + dtype_eps(oa.dtype) * ro.abs() + 2.0 ** -24
    err = (out.double() - ro).abs()
    assert bool((err <= tol).all()), f"merge out err/tol {(err / tol).max().item():.3g}"
    finite = torch.isfinite(rl)
    assert torch.equal(torch.isinf(lse), ~finite) and bool((lse[~finite] == -math.inf).all())
    lerr = (lse.double() - rl).abs()[finite]
    assert bool((lerr <= 4 * U32 * (rl.abs()[finite] + 1)).all()), f"lse err {lerr.max().item():.3g}"


def _merge_dtype(c, g, p):
    if p % 2:
        c.oa, c.ob = c.oa.to(pick(BAD_DTYPES, p // 2)), c.ob.to(pick(BAD_DTYPES, p // 2))
        return "reject", "out_a"
    c.ob = c.ob.to(pick([d for d in DTYPES.values() if d != c.oa.dtype], p // 2))
    return "reject", "out_b"


def _merge_shape(c, g, p):
    which = p % 4
    if which == 0:
        c.ob = torch.cat([c.ob, c.ob[..., :1]], -1)
        return "reject", "out_b"
    if which == 1:
        n = pick(["la", "lb"], p // 4)
        setattr(c, n, getattr(c, n)[None])
        return "reject", {"la": "lse_a", "lb": "lse_b"}[n]
    if which == 2:
        c.la = c.la.to(pick([torch.float64, torch.float16, torch.int32], p // 4))
        return "reject", "lse_a"
    c.oa, c.ob = c.oa.reshape(-1)[0], c.ob.reshape(-1)[0]
    c.la, c.lb = c.la.reshape(-1)[:0].reshape(0), c.lb.reshape(-1)[:0].reshape(0)
    return "reject", "out_a|lse_a"


def _merge_values(c, g, p):
    n = pick(["la", "lb", "oa", "ob"], p)
    t = getattr(c, n)
    if t.numel():
        t.view(-1)[int(torch.randint(t.numel(), (1,), generator=g))] = pick([math.nan, math.inf, -math.inf, 1e38], p // 4)
    return "any"


def _merge_empty(c, g, p):
    if p % 2:  # no rows
        c.oa, c.ob, c.la, c.lb = c.oa[:0], c.ob[:0], c.la[:0], c.lb[:0]
        return "valid"
    c.oa, c.ob = c.oa[..., :0], c.ob[..., :0]  # head_dim 0
    return "any"


def _merge_alias(c, g, p):
    c.ob, c.lb = c.oa, c.la
    return "valid"


MERGE_MUTATIONS = {
    "dtype": _merge_dtype, "shape": _merge_shape, "values": _merge_values, "empty": _merge_empty,
    "alias": _merge_alias, "noncontig": _noncontig_some(["oa", "ob", "la", "lb"]),
    "meta": _meta(["oa", "ob", "la", "lb"]),
}


# ------------------------------------------------------------ accumulate_scores
def scores_base(c, g):
    B, Hq = len(c.lens), c.hkv * c.group
    c.logits = torch.randn(B, Hq, c.Ll, generator=g) * c.spread
    c.sl = torch.tensor(c.lens, dtype=torch.int32)
    mask = torch.arange(c.Ll)[None, :] < c.sl.long()[:, None]
    c.lse = torch.logsumexp(c.logits.double().masked_fill(~mask[:, None], -math.inf), -1).float()
    c.scores = torch.rand(B, c.hkv, c.Ls, generator=g) * 3
    c.written = {"scores"}


def scores_call(a, c):
    return OPS.accumulate_scores(a["logits"], a["lse"], a["sl"], a["scores"])


def scores_model(c):
    lim = min(c.logits.shape[2], c.scores.shape[2])
    return bool(((c.sl >= 0) & (c.sl <= lim)).all())


def scores_check(a, c, result):
    got, before = a["scores"].double(), c.scores.double()
    B, Hq, _ = c.logits.shape
    G = Hq // c.scores.shape[1]
    for b in range(B):
        n = int(c.sl[b])
        assert torch.equal(got[b, :, n:], before[b, :, n:]), "scores past seq_len were written"
        for h in range(c.scores.shape[1]):
            ls = c.lse[b, h * G:(h + 1) * G].double()
            lg = c.logits[b, h * G:(h + 1) * G, :n].double()
            live = ls != -math.inf
            terms = torch.exp(lg[live] - ls[live, None])
            ref = before[b, h, :n] + terms.sum(0)
            dist = (lg[live] - ls[live, None]).abs()
            tol = (terms * (dist + 4) * U32).sum(0) + (G + 2) * U32 * ref.abs() + 1e-30
            err = (got[b, h, :n] - ref).abs()
            # lse below the true one (a longer seq_len than it was made for): fp32 may overflow
            overflow = torch.isinf(ref.float()) & (got[b, h, :n] == ref.float())
            assert bool(((err <= tol) | overflow).all()), f"scores[{b},{h}] err/tol {(err / tol).max().item():.3g}"


def _scores_len(c, g, p):
    if len(c.sl):
        c.sl[int(torch.randint(len(c.sl), (1,), generator=g))] = boundary(p, min(c.Ll, c.Ls))
    return "valid"


def _scores_args(c, g, p):
    """One argument of the wrong dtype or shape."""
    cases = [
        ("logits", lambda t: t.half(), "logits"), ("logits", lambda t: t.double(), "logits"),
        ("logits", lambda t: t[0], "logits"), ("lse", lambda t: t.double(), "lse"),
        ("lse", lambda t: t[:, :1] if t.shape[1] > 1 else t[:, :0], "lse"), ("lse", grow, "lse"),
        ("sl", lambda t: t.long(), "seq_lens"), ("sl", grow, "seq_lens"),
        ("scores", lambda t: t.double(), "scores"), ("scores", lambda t: t[0], "scores"),
        ("scores", grow, "scores"),
        ("scores", lambda t: t[:, :0], "scores|heads"),
    ]
    name, f, match = pick(cases, p)
    setattr(c, name, f(getattr(c, name)))
    return "reject", match


def _scores_heads(c, g, p):
    """scores with a number of KV heads that divides the query heads, or not."""
    Hq = c.logits.shape[1]
    h = pick([1, 2, 3, 4, 5, 8, Hq, Hq + 1], p)
    c.scores = torch.rand(c.scores.shape[0], h, c.Ls, generator=g)
    return ("valid" if Hq % h == 0 else ("reject", "heads"))


def _scores_values(c, g, p):
    which = p % 3
    if which == 0 and c.lse.numel():  # heads that attended nothing
        c.lse.view(-1)[int(torch.randint(c.lse.numel(), (1,), generator=g))] = -math.inf
        return "valid"
    t = c.lse if which == 1 else c.logits
    if t.numel():
        t.view(-1)[int(torch.randint(t.numel(), (1,), generator=g))] = pick([math.nan, math.inf, 1e38], p // 3)
    return "any"


SCORES_MUTATIONS = {
    "seq_len": _scores_len, "args": _scores_args, "heads": _scores_heads, "values": _scores_values,
    "scores_noncontig": _reject_noncontig("scores", "scores"),
    "noncontig": _noncontig_some(["logits", "lse", "sl"]), "batch0": _batch0(["logits", "lse", "sl", "scores"]),
    "meta": _meta(["logits", "lse", "sl", "scores"]),
}


# ------------------------------------------------------------ heavy_hitter_topk
def topk_base(c, g):
    B = len(c.lens)
    s = torch.randn(B, c.heads, c.L, generator=g)
    if c.ties:
        s = s.round()
    c.scores, c.sl = s, torch.tensor(c.lens, dtype=torch.int32)
    c.written = set()


def topk_call(a, c):
    return OPS.heavy_hitter_topk(a["scores"], a["sl"], c.k)


def topk_model(c):
    if not isinstance(c.k, int) or c.k <= 0:
        return False
    if c.scores.shape[1] == 0:
        return True  # no rows: seq_lens are not read (on CUDA too)
    return bool(((c.sl >= 0) & (c.sl <= c.scores.shape[2])).all())


def ref_topk_nan(scores, sl, k):
    """ref_topk with the op's order of special values: NaN lowest, -0 == +0."""
    B, H, _ = scores.shape
    out = torch.full((B, H, k), -1, dtype=torch.int32)
    for b in range(B):
        n = int(sl[b])
        for h in range(H):
            row = scores[b, h, :n].tolist()
            key = [(math.isnan(x), -x if not math.isnan(x) else 0.0, i) for i, x in enumerate(row)]
            top = sorted(i for *_, i in sorted(key)[:k])
            out[b, h, :len(top)] = torch.tensor(top, dtype=torch.int32)
    return out


def topk_check(a, c, result):
    assert result.dtype == torch.int32 and result.shape == (c.scores.shape[0], c.scores.shape[1], c.k), \
        (result.dtype, result.shape)
    expect = ref_topk_nan(c.scores, c.sl, c.k)
    if not torch.equal(result, expect):
        bad = (result != expect).nonzero()[0].tolist()
        raise AssertionError(f"top-k differs from the reference at {bad}")


def _topk_k(c, g, p):
    c.k = pick([0, -1, c.L, c.L + 1, 2 * c.L + 5, 2**20, I32_MAX, 2**31, 2**40, I64_MAX, I64_MIN], p)
    if c.k <= 0:
        return "reject", "k"
    return "valid" if c.k <= 2**20 else "any"


def _topk_len(c, g, p):
    if len(c.sl):
        c.sl[int(torch.randint(len(c.sl), (1,), generator=g))] = boundary(p, c.L)
    return "valid"


def _topk_args(c, g, p):
    cases = [("scores", lambda t: t.double(), "scores"), ("scores", lambda t: t.half(), "scores"),
             ("scores", lambda t: t[0], "scores"), ("sl", lambda t: t.long(), "seq_lens"),
             ("sl", grow, "seq_lens"), ("sl", lambda t: t[None], "seq_lens")]
    name, f, match = pick(cases, p)
    setattr(c, name, f(getattr(c, name)))
    return "reject", match


def _topk_special(c, g, p):
    s = c.scores.view(-1)
    if s.numel():
        idx = torch.randperm(s.numel(), generator=g)[: 1 + p % 7]
        s[idx] = pick([math.nan, math.inf, -math.inf, -0.0, 0.0, 3.4e38], p // 7)
    return "valid"


def _topk_k_type(c, g, p):
    c.k = pick([2.0, "3", None, [1]], p)
    return "reject", ""


def _topk_heads0(c, g, p):
    c.scores = c.scores[:, :0]
    return "valid"


TOPK_MUTATIONS = {
    "k": _topk_k, "seq_len": _topk_len, "args": _topk_args, "special": _topk_special, "k_type": _topk_k_type,
    "heads0": _topk_heads0, "noncontig": _noncontig_some(["scores", "sl"]), "batch0": _batch0(["scores", "sl"]),
    "meta": _meta(["scores", "sl"]),
}


# ------------------------------------------------------------------ tables
# op -> (base, call, model of the data checks, reference check, mutations,
#        tensor arguments in call order)
OPS_TABLE = {
    "quantize_write": (qw_base, qw_call, qw_model, qw_check, QW_MUTATIONS, ["key", "value", "pool", "slots"]),
    "seal_blocks": (seal_base, seal_call, seal_model, seal_check, SEAL_MUTATIONS, ["hot", "src", "cold", "dst"]),
    "paged_decode_attention": (attn_base, attn_call, attn_model, attn_check, ATTN_MUTATIONS,
                               ["q", "pool", "bt", "sl", "logits"]),
    "merge_attention_states": (merge_base, merge_call, lambda c: True, merge_check, MERGE_MUTATIONS,
                               ["oa", "la", "ob", "lb"]),
    "accumulate_scores": (scores_base, scores_call, scores_model, scores_check, SCORES_MUTATIONS,
                          ["logits", "lse", "sl", "scores"]),
    "heavy_hitter_topk": (topk_base, topk_call, topk_model, topk_check, TOPK_MUTATIONS, ["scores", "sl"]),
    "compact": (compact_base, compact_call, compact_model, compact_check, COMPACT_MUTATIONS, ["pool", "bt", "keep"]),
    "gather_dequant": (gather_base, gather_call, cache_model, gather_check, GATHER_MUTATIONS, ["pool", "bt", "sl"]),
}
MUTATIONS = {op: sorted(t[4]) for op, t in OPS_TABLE.items()}
EMPTYING = {"batch0", "no_tokens", "empty", "keep_none", "heads0", "pool_empty", "all_skipped"}


# ------------------------------------------------------------------ running
def run_case(case: dict) -> dict:
    """Builds, runs and checks one case. Returns {"outcome": "ok" | "raised",
    "expect": ..., "error": ...}; a failed check raises AssertionError."""
    base, call, model, check, mutations, names = OPS_TABLE[case["op"]]
    c = SimpleNamespace(**case)
    c.meta, c.alias = False, None
    g = gen_from(case["seed"])
    base(c, g)
    kinds, replaced, seen = [], set(), set()
    # Mutations that empty a dimension go first, each mutation applies once,
    # and an argument is replaced by one mutation at most (values may change
    # in place), so none undoes another's reason to reject.
    for name, p in sorted(case["muts"], key=lambda m: m[0] not in EMPTYING):
        if name in seen:  # twice could undo itself (a swap swapped back)
            continue
        seen.add(name)
        refs = dict(vars(c))
        values = {k: v.clone() for k, v in refs.items() if isinstance(v, torch.Tensor)}
        try:
            r = mutations[name](c, g, p)
        except (IndexError, RuntimeError, ValueError):
            r = None  # does not apply to what earlier mutations made
        new = {k for k, v in vars(c).items() if k not in refs or refs[k] is not v}
        if r is None or new & replaced:  # skipped: it would undo an earlier one
            vars(c).clear()
            vars(c).update(refs)  # the same objects (strides kept), their values restored
            for k, v in values.items():
                refs[k].copy_(v)
            continue
        if name not in EMPTYING:  # those run first: nothing before them to undo
            replaced |= new
        kinds.append(r if isinstance(r, tuple) else (r, ""))
    if any(k == "any" for k, _ in kinds):
        expect = "any"
    elif any(k == "reject" for k, _ in kinds):
        expect = "reject"
    else:  # the model of the op's data checks: True, False or "any"
        m = model(c)
        expect = "any" if m == "any" else "valid" if m else "reject"

    bufs = Buffers(g)
    a = {}
    for n in names:
        t = getattr(c, n)
        if c.alias and n == c.alias[0]:
            continue
        written = n in c.written or (c.alias and n == c.alias[1])
        a[n] = bufs.place(n, t, written) if isinstance(t, torch.Tensor) else t
    if c.alias:  # the same tensor twice: one buffer, written through both
        a[c.alias[0]] = a[c.alias[1]]
    try:
        result = call(a, c)
        outcome, err = "ok", None
    except CLEAN_ERRORS as e:
        outcome, err = "raised", e
    bufs.check(raised=outcome == "raised")
    if outcome == "raised":
        msg = f"{type(err).__name__}: {str(err)[:300]}"
        assert expect != "valid", f"a valid call raised {msg}"
        rejects = [m for k, m in kinds if k == "reject"]
        if expect == "reject" and len(rejects) == 1 and rejects[0]:
            assert re.search(rejects[0], str(err)), f"the error does not name {rejects[0]!r}: {msg}"
        return {"outcome": "raised", "expect": expect, "error": type(err).__name__}
    assert expect != "reject", "an invalid call did not raise"
    if expect == "valid" and not c.meta:
        check(a, c, result)
    return {"outcome": "ok", "expect": expect, "error": None}


def serve():
    """Loop: read a case, answer with run_case's dict or {"fail": traceback}."""
    fuzz_pipe.serve(run_case, MEM_LIMIT, threads=2)  # several threads: parallel_for paths, exceptions from workers


if __name__ == "__main__":
    if len(sys.argv) > 1:  # reproduce one case: python tests/fuzz_worker.py "{'op': ...}"
        torch.set_num_threads(2)
        print(run_case(ast.literal_eval(sys.argv[1])))
    else:
        serve()
