"""Rejected inputs: each raises ValueError/RuntimeError naming the bad
argument, and ops that mutate a pool (or scores / logits_out) leave it
unchanged. Device mismatches need a GPU and are not tested here."""
import math
import subprocess
import sys

import pytest
import torch

import kvcomp
from kvcomp import ops
from helpers import build_cache, gen_from, heavy_tailed
from reference import parse_format

ERR = (ValueError, RuntimeError)


def _noncontig(t):
    """Same shape and values, not contiguous."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


def _expect_reject(call, match, *mutable):
    before = [m.clone() for m in mutable]
    with pytest.raises(ERR, match=match):
        call()
    for m, b in zip(mutable, before):
        assert torch.equal(m, b), "a rejected call modified its in-place argument"


# ------------------------------------------------------------ quantize_write
def _qw_base(fmt="int8", hd=64):
    g = gen_from(1)
    pool = kvcomp.allocate_pool(4, 16, 2, hd, fmt)
    n = 64
    ops.quantize_write(heavy_tailed((n, 2, hd), g), heavy_tailed((n, 2, hd), g), pool,
                       torch.arange(n), fmt)
    k = heavy_tailed((3, 2, hd), g)
    v = heavy_tailed((3, 2, hd), g)
    slots = torch.tensor([0, 5, 17])
    return pool, k, v, slots


def _qw_cases():
    def c(**kw):
        return kw
    return {
        "key_int32": c(key=lambda k: k.to(torch.int32), match="key"),
        "key_float64": c(key=lambda k: k.double(), match="key"),
        "key_2d": c(key=lambda k: k[:, 0], value=lambda v: v[:, 0], match="key"),
        "value_dtype": c(value=lambda v: v.half(), match="value"),
        "value_shape": c(value=lambda v: v[:2], match="value"),
        "value_head_dim": c(value=lambda v: torch.cat([v, v], -1), match="value"),
        "key_heads": c(key=lambda k: torch.cat([k, k[:, :1]], 1),
                       value=lambda v: torch.cat([v, v[:, :1]], 1), match="key"),
        "head_dim_mismatch": c(key=lambda k: torch.cat([k, k], -1), value=lambda v: torch.cat([v, v], -1),
                               match="pool"),
        "slot_int32": c(slots=lambda s: s.int(), match="slot_mapping"),
        "slot_2d": c(slots=lambda s: s[None], match="slot_mapping"),
        "slot_length": c(slots=lambda s: s[:2], match="slot_mapping"),
        "slot_end": c(slots=lambda s: torch.tensor([0, 64, 3]), match="slot_mapping"),
        "slot_huge": c(slots=lambda s: torch.tensor([2**40, 1, 3]), match="slot_mapping"),
        "slot_last_bad": c(slots=lambda s: torch.tensor([1, 2, 100]), match="slot_mapping"),
        "format_unknown": c(fmt="int5", match="format"),
        "format_per_channel": c(fmt="int4c", match="format"),
        "format_kivi2": c(fmt="kivi2", match="format"),
        "format_pool_mismatch": c(fmt="int4", match="pool"),
        "format_pool_mismatch_fp8": c(fmt="fp16", match="pool"),
        "key_nan": c(key=lambda k: k.index_put_((torch.tensor(1), torch.tensor(0), torch.tensor(5)),
                                                 torch.tensor(math.nan)), match="key"),
        "value_inf": c(value=lambda v: v.index_put_((torch.tensor(2), torch.tensor(1), torch.tensor(63)),
                                                     torch.tensor(math.inf)), match="value"),
        "key_neg_inf": c(key=lambda k: k.index_put_((torch.tensor(0), torch.tensor(1), torch.tensor(0)),
                                                     torch.tensor(-math.inf)), match="key"),
    }


@pytest.mark.parametrize("case", sorted(_qw_cases()))
def test_quantize_write_rejects(case):
    spec = _qw_cases()[case]
    pool, k, v, slots = _qw_base()
    k = spec.get("key", lambda x: x)(k)
    v = spec.get("value", lambda x: x)(v)
    slots = spec.get("slots", lambda x: x)(slots)
    fmt = spec.get("fmt", "int8")
    _expect_reject(lambda: ops.quantize_write(k, v, pool, slots, fmt), spec["match"], pool)


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8_e4m3", "fp16", "bf16", "int2:g64"])
@pytest.mark.parametrize("where", ["key", "value"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_write_rejects_non_finite(fmt, where, bad, dtype):
    pool, k, v, slots = _qw_base(fmt)
    k, v = k.to(dtype), v.to(dtype)
    (k if where == "key" else v)[1, 1, 7] = bad
    _expect_reject(lambda: ops.quantize_write(k, v, pool, slots, fmt), where, pool)


def test_quantize_write_rejects_fp16_overflow():
    pool, k, v, slots = _qw_base("fp16")
    v[2, 0, 3] = 1e6  # fp32, beyond fp16
    _expect_reject(lambda: ops.quantize_write(k, v, pool, slots, "fp16"), "value", pool)
    k[0, 0, 0] = 65520.0  # rounds to inf in fp16
    _expect_reject(lambda: ops.quantize_write(k, v, pool, slots, "fp16"), "key|value", pool)
    pool, k, v, slots = _qw_base("fp16/int8")
    k[0, 1, 1] = -7e4
    _expect_reject(lambda: ops.quantize_write(k, v, pool, slots, "fp16/int8"), "key", pool)
    # the largest values that round to a finite half are accepted
    pool, k, v, slots = _qw_base("fp16")
    k[0, 0, 0], v[0, 0, 0] = 65519.0, -65504.0
    ops.quantize_write(k, v, pool, slots, "fp16")


def test_quantize_write_rejects_bf16_overflow():
    pool, k, v, slots = _qw_base("bf16")
    k[1, 0, 2] = torch.finfo(torch.float32).max  # rounds to inf in bf16
    _expect_reject(lambda: ops.quantize_write(k, v, pool, slots, "bf16"), "key", pool)


def test_quantize_write_rejects_bad_pool():
    pool, k, v, slots = _qw_base()
    fpool = pool.float()
    _expect_reject(lambda: ops.quantize_write(k, v, fpool, slots, "int8"), "pool", fpool)
    p2 = pool[:, 0]
    _expect_reject(lambda: ops.quantize_write(k, v, p2, slots, "int8"), "pool", p2)
    nc = _noncontig(pool)
    assert not nc.is_contiguous() and nc.shape == pool.shape
    _expect_reject(lambda: ops.quantize_write(k, v, nc, slots, "int8"), "pool", nc)
    # pool for another geometry (block size 32) of the same format, same head_dim is fine;
    # a pool sized for head_dim 128 is not
    p128 = kvcomp.allocate_pool(4, 16, 2, 128, "int8")
    _expect_reject(lambda: ops.quantize_write(k, v, p128, slots, "int8"), "pool", p128)
    # a pool allocated for int8 used with int4
    _expect_reject(lambda: ops.quantize_write(k, v, pool, slots, "int4"), "pool", pool)


def test_quantize_write_negative_slots_skip():
    pool, k, v, slots = _qw_base()
    before = pool.clone()
    ops.quantize_write(k, v, pool, torch.tensor([-1, -5, -(2**40)]), "int8")
    assert torch.equal(pool, before)


# -------------------------------------------------------------- seal_blocks
def _seal_base(cold_fmt="int4c"):
    g = gen_from(2)
    hot = kvcomp.allocate_pool(3, 16, 2, 64, "fp16")
    ops.quantize_write(heavy_tailed((48, 2, 64), g), heavy_tailed((48, 2, 64), g), hot,
                       torch.arange(48), "fp16")
    cold = kvcomp.allocate_pool(3, 16, 2, 64, cold_fmt)
    cold.copy_(torch.randint(0, 256, cold.shape, generator=g, dtype=torch.uint8))
    src = torch.tensor([0, 2], dtype=torch.int32)
    dst = torch.tensor([1, 0], dtype=torch.int32)
    return hot, src, cold, dst


SEAL_CASES = {
    "src_int64": (dict(src=lambda s: s.long()), "src_blocks"),
    "dst_int64": (dict(dst=lambda d: d.long()), "dst_blocks"),
    "src_2d": (dict(src=lambda s: s[None], dst=lambda d: d[None]), "src_blocks"),
    "dst_length": (dict(dst=lambda d: d[:1]), "dst_blocks"),
    "src_out_of_range": (dict(src=lambda s: torch.tensor([0, 3], dtype=torch.int32)), "src_blocks"),
    "src_huge": (dict(src=lambda s: torch.tensor([2**30, 0], dtype=torch.int32)), "src_blocks"),
    "src_negative": (dict(src=lambda s: torch.tensor([0, -1], dtype=torch.int32)), "src_blocks"),
    "dst_out_of_range": (dict(dst=lambda d: torch.tensor([1, 3], dtype=torch.int32)), "dst_blocks"),
    "dst_negative": (dict(dst=lambda d: torch.tensor([-1, 0], dtype=torch.int32)), "dst_blocks"),
    "hot_format_per_channel": (dict(hot_fmt="int4c"), "hot_format"),
    "hot_format_unknown": (dict(hot_fmt="fp17"), "hot_format"),
    "hot_format_mismatch": (dict(hot_fmt="int8"), "hot_pool"),
    "cold_format_unknown": (dict(cold_fmt="int3c"), "cold_format"),
    "cold_format_mismatch": (dict(cold_fmt="int8"), "cold_pool"),
}


@pytest.mark.parametrize("case", sorted(SEAL_CASES))
@pytest.mark.parametrize("cold_fmt", ["int4c", "kivi4"])
def test_seal_blocks_rejects(case, cold_fmt):
    mods, match = SEAL_CASES[case]
    hot, src, cold, dst = _seal_base(cold_fmt)
    src = mods.get("src", lambda x: x)(src)
    dst = mods.get("dst", lambda x: x)(dst)
    hf, cf = mods.get("hot_fmt", "fp16"), mods.get("cold_fmt", cold_fmt)
    _expect_reject(lambda: ops.seal_blocks(hot, src, cold, dst, hf, cf), match, cold, hot)


def test_seal_blocks_rejects_bad_pools():
    hot, src, cold, dst = _seal_base()
    for bad_cold in (kvcomp.allocate_pool(3, 16, 2, 128, "int4c"),   # head_dim
                     kvcomp.allocate_pool(3, 32, 2, 64, "int4c"),    # block size
                     kvcomp.allocate_pool(3, 16, 1, 64, "int4c"),    # KV heads
                     kvcomp.allocate_pool(3, 16, 2, 64, "int8"),     # format
                     cold.float(), cold[:, 0], _noncontig(cold)):
        _expect_reject(lambda: ops.seal_blocks(hot, src, bad_cold, dst, "fp16", "int4c"), "cold_pool",
                       bad_cold, hot)
    for bad_hot in (hot.float(), hot[0], _noncontig(hot), kvcomp.allocate_pool(3, 16, 2, 64, "int8")):
        _expect_reject(lambda: ops.seal_blocks(bad_hot, src, cold, dst, "fp16", "int4c"), "hot_pool",
                       cold)


@pytest.mark.parametrize("bits,cold_fmt", [(0x7C00, "int8"), (0xFC00, "int4c"), (0x7E00, "kivi2"),
                                            (0x7E00, "fp8_e4m3")])  # +inf, -inf, NaN as fp16
def test_seal_blocks_rejects_non_finite_hot(cold_fmt, bits):
    """NaN/Inf in the data to be stored is rejected, never silently stored
    (here it comes from a hot pool written by other means)."""
    hot, src, cold, dst = _seal_base(cold_fmt)
    h16 = hot.view(torch.int16)  # fp16 codes: K section is [16 tokens][64 ch]
    h16[2, 1, 5 * 64 + 9] = bits - 0x10000 if bits >= 0x8000 else bits
    _expect_reject(lambda: ops.seal_blocks(hot, src, cold, dst, "fp16", cold_fmt), "hot_pool|src_blocks",
                   cold)


@pytest.mark.parametrize("cold_fmt", ["fp16", "int2c/fp16", "int8/fp16"])
def test_seal_blocks_rejects_fp16_overflow(cold_fmt):
    """A bf16 hot value beyond the fp16 range cannot be sealed into fp16
    (docs: fp16 overflow is rejected)."""
    g = gen_from(12)
    hot = kvcomp.allocate_pool(2, 16, 2, 64, "bf16")
    k = heavy_tailed((32, 2, 64), g)
    v = heavy_tailed((32, 2, 64), g)
    v[20, 1, 3] = 1e5
    ops.quantize_write(k, v, hot, torch.arange(32), "bf16")
    cold = kvcomp.allocate_pool(2, 16, 2, 64, cold_fmt)
    ids = torch.tensor([0, 1], dtype=torch.int32)
    _expect_reject(lambda: ops.seal_blocks(hot, ids, cold, ids, "bf16", cold_fmt), "hot_pool|src_blocks",
                   cold)


# ------------------------------------------------------ paged_decode_attention
def _attn_base():
    g = gen_from(3)
    c = build_cache("int4", [20, 7], 2, 64, 16, g)
    q = torch.randn(2, 8, 64, generator=g)
    return c, q


def _bt_with(c, b, j, value):
    bt = c.block_tables.clone()
    bt[b, j] = value
    return bt


ATTN_CASES = {
    "query_int32": (dict(q=lambda q, c: q.int()), "query"),
    "query_float64": (dict(q=lambda q, c: q.double()), "query"),
    "query_2d": (dict(q=lambda q, c: q[0]), "query"),
    "query_heads_not_multiple": (dict(q=lambda q, c: q[:, :3]), "query"),
    "query_head_dim": (dict(q=lambda q, c: torch.cat([q, q], -1)), "pool|head_dim"),
    "query_batch": (dict(q=lambda q, c: torch.cat([q, q[:1]])), "block_tables|query"),
    "block_tables_int64": (dict(bt=lambda c: c.block_tables.long()), "block_tables"),
    "block_tables_1d": (dict(bt=lambda c: c.block_tables[0]), "block_tables"),
    "block_id_huge": (dict(bt=lambda c: _bt_with(c, 0, 1, 2**30)), "block_tables"),
    "block_id_num_blocks": (dict(bt=lambda c: _bt_with(c, 1, 0, c.pool.shape[0])), "block_tables"),
    "block_id_negative": (dict(bt=lambda c: _bt_with(c, 0, 0, -1)), "block_tables"),
    "seq_lens_int64": (dict(sl=lambda c: c.seq_lens.long()), "seq_lens"),
    "seq_lens_2d": (dict(sl=lambda c: c.seq_lens[None]), "seq_lens"),
    "seq_lens_length": (dict(sl=lambda c: c.seq_lens[:1]), "seq_lens"),
    "seq_len_beyond_blocks": (dict(sl=lambda c: torch.tensor([20, c.block_tables.shape[1] * 16 + 1],
                                                              dtype=torch.int32)), "seq_lens"),
    "seq_len_into_unnamed_block": (dict(sl=lambda c: torch.tensor([20, 17], dtype=torch.int32)),
                                   "block_tables"),
    "seq_len_negative": (dict(sl=lambda c: torch.tensor([20, -1], dtype=torch.int32)), "seq_lens"),
    "format_unknown": (dict(fmt="int4:g48"), "format"),
    "format_mismatch": (dict(fmt="int8"), "pool"),
    "format_group_mismatch": (dict(fmt="int4:g64"), "pool"),
    "pool_float": (dict(pool=lambda c: c.pool.float()), "pool"),
    "pool_noncontiguous": (dict(pool=lambda c: _noncontig(c.pool)), "pool"),
    "pool_2d": (dict(pool=lambda c: c.pool[:, 0]), "pool"),
    "scale_nan": (dict(scale=math.nan), "scale"),
    "scale_inf": (dict(scale=math.inf), "scale"),
}


@pytest.mark.parametrize("case", sorted(ATTN_CASES))
@pytest.mark.parametrize("with_logits", [False, True])
def test_paged_decode_attention_rejects(case, with_logits):
    mods, match = ATTN_CASES[case]
    c, q = _attn_base()
    q = mods.get("q", lambda q, c: q)(q, c)
    bt = mods.get("bt", lambda c: c.block_tables)(c)
    sl = mods.get("sl", lambda c: c.seq_lens)(c)
    pool = mods.get("pool", lambda c: c.pool)(c)
    fmt, scale = mods.get("fmt", "int4"), mods.get("scale", 0.125)
    shape = (q.shape[0], q.shape[1], 64) if q.dim() == 3 else (2, 8, 64)
    logits = torch.full(shape, 3.0) if with_logits else None
    mutable = [logits] if with_logits else []
    _expect_reject(lambda: ops.paged_decode_attention(q, pool, bt, sl, fmt, scale, logits), match,
                   *mutable)


def test_paged_decode_attention_rejects_logits_out():
    c, q = _attn_base()
    for bad in (torch.zeros(2, 8, 19),            # too short for seq_len 20
                torch.zeros(2, 8, 0),             # empty: its data pointer may be null
                torch.zeros(2, 8, 30, dtype=torch.float16),
                torch.zeros(2, 8, 30, dtype=torch.float64),
                torch.zeros(2, 4, 30),            # heads
                torch.zeros(3, 8, 30),            # batch
                torch.zeros(2, 240),              # ndim
                _noncontig(torch.zeros(2, 8, 30))):
        bad.fill_(5.0)
        _expect_reject(lambda: ops.paged_decode_attention(q, c.pool, c.block_tables, c.seq_lens,
                                                          "int4", 0.125, bad), "logits_out", bad)


def test_paged_decode_attention_empty_batch():
    """batch 0: empty results or a clean error, never a crash of the process
    (run in a subprocess: a crash would take the test runner down)."""
    code = (
        "import torch, kvcomp\n"
        "from kvcomp import ops\n"
        "pool = kvcomp.allocate_pool(2, 16, 2, 64, 'int8')\n"
        "try:\n"
        "    out, lse = ops.paged_decode_attention(torch.randn(0, 4, 64), pool,\n"
        "        torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), 'int8', 0.1)\n"
        "    assert out.shape == (0, 4, 64) and lse.shape == (0, 4), (out.shape, lse.shape)\n"
        "except ValueError:\n"
        "    pass\n"
        "print('OK')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "OK" in r.stdout, \
        f"process died with exit code {r.returncode}: {r.stderr[-2000:]}"


def test_empty_batches_other_ops():
    pool = kvcomp.allocate_pool(2, 16, 2, 64, "int8")
    bt0, sl0 = torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    K, V = ops.gather_dequant(pool, bt0, sl0, "int8")
    assert K.shape == (0, 2, 0, 64)
    ops.compact(pool, bt0, torch.zeros(0, 2, 3, dtype=torch.int32), "int8")
    assert ops.heavy_hitter_topk(torch.zeros(0, 2, 5), sl0, 3).shape == (0, 2, 3)
    ops.accumulate_scores(torch.zeros(0, 4, 5), torch.zeros(0, 4), sl0, torch.zeros(0, 2, 5))
    out, lse = ops.merge_attention_states(torch.zeros(0, 4, 8), torch.zeros(0, 4),
                                          torch.zeros(0, 4, 8), torch.zeros(0, 4))
    assert out.shape == (0, 4, 8) and lse.shape == (0, 4)
    e = torch.empty(0, 2, 64)
    ops.quantize_write(e, e, pool, torch.empty(0, dtype=torch.int64), "int8")


# ------------------------------------------------------ merge_attention_states
def test_merge_rejects():
    g = gen_from(4)
    oa, ob = torch.randn(2, 4, 64, generator=g), torch.randn(2, 4, 64, generator=g)
    la, lb = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    cases = [
        ((oa.int(), la, ob.int(), lb), "out_a"),
        ((oa.double(), la, ob.double(), lb), "out_a"),
        ((oa, la, ob.half(), lb), "out_b"),
        ((oa, la, ob[:, :3], lb), "out_b"),
        ((oa, la, ob[..., :32], lb), "out_b"),
        ((oa, la.double(), ob, lb), "lse_a"),
        ((oa, la.half(), ob, lb), "lse_a"),
        ((oa, la[:, :3], ob, lb), "lse_a"),
        ((oa, la, ob, lb[None]), "lse_b"),
        ((oa, la, ob, lb.double()), "lse_b"),
    ]
    for args, match in cases:
        with pytest.raises(ERR, match=match):
            ops.merge_attention_states(*args)


# ------------------------------------------------------ accumulate_scores
def test_accumulate_scores_rejects():
    g = gen_from(5)
    logits = torch.randn(2, 8, 20, generator=g)
    lse = torch.randn(2, 8, generator=g) + 4
    sl = torch.tensor([20, 7], dtype=torch.int32)

    def scores():
        return torch.rand(2, 2, 20, generator=g)

    cases = [
        (lambda s: (logits.half(), lse, sl, s), "logits"),
        (lambda s: (logits.double(), lse, sl, s), "logits"),
        (lambda s: (logits[0], lse, sl, s), "logits"),
        (lambda s: (logits, lse.double(), sl, s), "lse"),
        (lambda s: (logits, lse[:, :4], sl, s), "lse"),
        (lambda s: (logits, lse[:1], sl, s), "lse"),
        (lambda s: (logits, lse, sl.long(), s), "seq_lens"),
        (lambda s: (logits, lse, sl[:1], s), "seq_lens"),
        (lambda s: (logits, lse, torch.tensor([21, 7], dtype=torch.int32), s), "seq_lens"),
        (lambda s: (logits, lse, torch.tensor([20, -2], dtype=torch.int32), s), "seq_lens"),
        (lambda s: (logits[..., :10], lse, sl, s), "seq_lens"),
    ]
    for make, match in cases:
        s = scores()
        _expect_reject(lambda: ops.accumulate_scores(*make(s)), match, s)
    # bad scores themselves
    for s, match in ((scores().double(), "scores"), (scores()[:1], "scores"),
                     (torch.rand(2, 3, 20), "scores"),           # 8 heads not a multiple of 3
                     (torch.rand(2, 2, 10), "seq_lens"),         # shorter than seq_len
                     (_noncontig(scores()), "scores"), (scores()[0], "scores")):
        _expect_reject(lambda: ops.accumulate_scores(logits, lse, sl, s), match, s)


# ------------------------------------------------------ heavy_hitter_topk
def test_topk_rejects():
    s = torch.randn(2, 2, 20)
    sl = torch.tensor([20, 7], dtype=torch.int32)
    for args, match in (((s, sl, 0), "k"), ((s, sl, -3), "k"),
                        ((s.double(), sl, 4), "scores"), ((s.int(), sl, 4), "scores"),
                        ((s[0], sl, 4), "scores"),
                        ((s, sl.long(), 4), "seq_lens"), ((s, sl[:1], 4), "seq_lens"),
                        ((s, torch.tensor([21, 7], dtype=torch.int32), 4), "seq_lens"),
                        ((s, torch.tensor([20, -1], dtype=torch.int32), 4), "seq_lens")):
        with pytest.raises(ERR, match=match):
            ops.heavy_hitter_topk(*args)


# ------------------------------------------------------------------ compact
def _compact_base(fmt):
    g = gen_from(6)
    c = build_cache(fmt, [40, 20], 2, 64, 16, g)  # 3 and 2 blocks; tables have 4 columns
    keep = torch.tensor([[[0, 3, 17, -1], [5, -1, 6, 39]], [[2, 4, -1, -1], [-1, -1, -1, 19]]],
                        dtype=torch.int32)
    return c, keep


def _keep_with(keep, b, h, j, v):
    k = keep.clone()
    k[b, h, j] = v
    return k


COMPACT_CASES = {
    "keep_descending": (dict(keep=lambda k, c: _keep_with(k, 0, 0, 2, 1)), "keep"),
    "keep_duplicate": (dict(keep=lambda k, c: _keep_with(k, 0, 1, 2, 5)), "keep"),
    "keep_descending_across_minus_one": (dict(keep=lambda k, c: _keep_with(k, 0, 1, 3, 4)), "keep"),
    "keep_int64": (dict(keep=lambda k, c: k.long()), "keep"),
    "keep_2d": (dict(keep=lambda k, c: k[0]), "keep"),
    "keep_batch": (dict(keep=lambda k, c: k[:1]), "keep"),
    "keep_heads": (dict(keep=lambda k, c: k[:, :1]), "keep"),
    "keep_beyond_capacity": (dict(keep=lambda k, c: _keep_with(k, 1, 0, 2, 4 * 16)), "keep"),
    "keep_huge": (dict(keep=lambda k, c: _keep_with(k, 1, 0, 2, 2**30)), "keep"),
    "keep_in_unnamed_block": (dict(keep=lambda k, c: _keep_with(k, 1, 0, 2, 40)), "block_tables|keep"),
    "block_tables_int64": (dict(bt=lambda c: c.block_tables.long()), "block_tables"),
    "block_tables_1d": (dict(bt=lambda c: c.block_tables[0]), "block_tables"),
    "block_tables_batch": (dict(bt=lambda c: c.block_tables[:1]), "keep|block_tables"),
    "block_id_out_of_range": (dict(bt=lambda c: _bt_with(c, 0, 1, c.pool.shape[0])), "block_tables"),
    "block_id_negative_used": (dict(bt=lambda c: _bt_with(c, 0, 0, -1)), "block_tables"),
    "format_unknown": (dict(fmt="int4:g33"), "format"),
    "format_mismatch": (dict(fmt="int8"), "pool"),
}


@pytest.mark.parametrize("case", sorted(COMPACT_CASES))
@pytest.mark.parametrize("fmt", ["int4", "kivi2"])
def test_compact_rejects(case, fmt):
    mods, match = COMPACT_CASES[case]
    c, keep = _compact_base(fmt)
    if "fmt" in mods and mods["fmt"] == "int8" and fmt == "kivi2":
        mods = dict(fmt="int4")
    keep = mods.get("keep", lambda k, c: k)(keep, c)
    bt = mods.get("bt", lambda c: c.block_tables)(c)
    f = mods.get("fmt", fmt)
    _expect_reject(lambda: ops.compact(c.pool, bt, keep, f), match, c.pool)


def test_compact_rejects_bad_pool():
    c, keep = _compact_base("int4")
    for p in (c.pool.float(), _noncontig(c.pool), c.pool[:, 0]):
        _expect_reject(lambda: ops.compact(p, c.block_tables, keep, "int4"), "pool", p)


def test_compact_valid_base():
    """The base inputs of the rejection tests are valid."""
    for fmt in ("int4", "kivi2"):
        c, keep = _compact_base(fmt)
        ops.compact(c.pool, c.block_tables, keep, fmt)


# ------------------------------------------------------------ gather_dequant
def test_gather_dequant_rejects():
    c, _ = _attn_base()
    bt, sl = c.block_tables, c.seq_lens
    cases = [
        ((c.pool, bt, sl, "int4", torch.int32), "dtype"),
        ((c.pool, bt, sl, "int4", torch.float64), "dtype"),
        ((c.pool, bt.long(), sl, "int4", torch.float32), "block_tables"),
        ((c.pool, bt, sl.long(), "int4", torch.float32), "seq_lens"),
        ((c.pool, bt, sl[:1], "int4", torch.float32), "seq_lens"),
        ((c.pool, bt, torch.tensor([20, 9999], dtype=torch.int32), "int4", torch.float32), "seq_lens"),
        ((c.pool, bt, torch.tensor([-4, 7], dtype=torch.int32), "int4", torch.float32), "seq_lens"),
        ((c.pool, _bt_with(c, 0, 1, 2**30), sl, "int4", torch.float32), "block_tables"),
        ((c.pool, _bt_with(c, 0, 0, -1), sl, "int4", torch.float32), "block_tables"),
        ((c.pool, bt, sl, "nope", torch.float32), "format"),
        ((c.pool.float(), bt, sl, "int4", torch.float32), "pool"),
        ((_noncontig(c.pool), bt, sl, "int4", torch.float32), "pool"),
    ]
    for args, match in cases:
        with pytest.raises(ERR, match=match):
            ops.gather_dequant(*args)
    # a pool read as another format whose table has no tile of its size (a
    # size that another geometry of that format has is legitimately accepted)
    tried = 0
    for alloc in ("int8", "int4", "kivi2", "fp16", "fp8_e5m2", "int2:g64"):
        for other in ("int8", "int4", "kivi2", "fp16", "int2", "int4c"):
            p = kvcomp.allocate_pool(4, 16, 2, 64, alloc)
            if p.shape[2] in dict((v, k) for k, v in parse_format(other).all_geometries()):
                continue
            tried += 1
            with pytest.raises(ERR, match="pool"):
                ops.gather_dequant(p, bt, sl, other, torch.float32)
    assert tried >= 10
