"""merge_attention_states: exactness against float64, -inf sides, and the
two-tier identity (attention over two disjoint parts merged == attention
over the whole)."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kvcomp import ops
from helpers import (examples, ACT_DTYPES, ALL_FORMATS, HOT_FORMATS, TOKEN_FORMATS, build_cache, dtype_eps,
                     gen_from)
from reference import BLOCK_SIZES, U32, parse_format, ref_attention, ref_merge
from test_attention import REL_TOL_FP32, logit_error_bound


def _states(shape, dtype, g, lse_spread):
    oa = (torch.randn(shape, generator=g) * 3).to(dtype)
    ob = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    rows = shape[:-1]
    la = torch.randn(rows, generator=g) * lse_spread
    lb = torch.randn(rows, generator=g) * lse_spread + 5 * torch.rand(rows, generator=g)
    return oa, la, ob, lb


def _check_merge(oa, la, ob, lb):
    out, lse = ops.merge_attention_states(oa, la, ob, lb)
    assert out.dtype == oa.dtype and out.shape == oa.shape
    assert lse.dtype == torch.float32 and lse.shape == la.shape
    ro, rl = ref_merge(oa, la, ob, lb)
    # weights in float64, for the error bound
    m = torch.maximum(la.double(), lb.double())
    ms = torch.where(m == -math.inf, torch.zeros_like(m), m)
    wa, wb = torch.exp(la.double() - ms), torch.exp(lb.double() - ms)
    s = (wa + wb).clamp(min=1e-300)
    mag = ((wa / s)[..., None] * oa.double().abs() + (wb / s)[..., None] * ob.double().abs())
    # fp32 merge: a few roundings (exp, sum, division, product, sum) of each term
    tol = 8 * U32 * mag + 2.0 ** -140
    if oa.dtype != torch.float32:  # result rounded to the activation dtype
        tol = tol + dtype_eps(oa.dtype) * ro.abs() + 2.0 ** -24
    err = (out.double() - ro).abs()
    assert bool((err <= tol).all()), f"merge out err/tol {(err / tol).max().item():.3g}"
    finite = torch.isfinite(rl)
    assert torch.equal(torch.isinf(lse), ~finite)
    assert bool((lse[~finite] == -math.inf).all())
    lerr = (lse.double() - rl).abs()[finite]
    assert bool((lerr <= 4 * U32 * (rl.abs()[finite] + 1)).all()), f"lse err {lerr.max().item():.3g}"
    return out, lse


@given(seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from(ACT_DTYPES),
       shape=st.sampled_from([(3, 4, 64), (1, 1, 128), (2, 8, 256), (5, 16), (2, 3, 2, 32)]),
       spread=st.sampled_from([0.0, 1.0, 10.0, 100.0]), inf_frac=st.sampled_from([0.0, 0.3]))
def test_merge_vs_float64(seed, dtype, shape, spread, inf_frac):
    g = gen_from(seed)
    oa, la, ob, lb = _states(shape, dtype, g, spread)
    if inf_frac:
        la[torch.rand(la.shape, generator=g) < inf_frac] = -math.inf
        lb[torch.rand(lb.shape, generator=g) < inf_frac] = -math.inf
    _check_merge(oa, la, ob, lb)


@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_merge_infinite_sides(dtype):
    g = gen_from(2)
    oa, la, ob, lb = _states((4, 2, 64), dtype, g, 3.0)
    # a side that attended nothing: the other side passes through
    la[0] = -math.inf
    lb[1] = -math.inf
    la[2] = lb[2] = -math.inf
    out, lse = _check_merge(oa, la, ob, lb)
    assert torch.equal(out[0], ob[0]) and torch.equal(lse[0], lb[0])
    assert torch.equal(out[1], oa[1]) and torch.equal(lse[1], la[1])
    assert bool((out[2] == 0).all()) and bool((lse[2] == -math.inf).all())
    # equal lse: the mean, lse + log 2
    out, lse = ops.merge_attention_states(oa[3], la[3], ob[3], la[3])
    assert torch.allclose(lse.double(), la[3].double() + math.log(2), atol=1e-5)


def test_merge_extreme_lse():
    """Weights that underflow in fp32 (lse far apart) and large lse."""
    oa = torch.randn(2, 3, 64)
    ob = torch.randn(2, 3, 64)
    la = torch.tensor([[0.0, 1e4, -200.0], [50.0, 3e4, 88.0]])
    lb = torch.tensor([[200.0, 1e4 + 1, 0.0], [-50.0, 3e4, 89.0]])
    _check_merge(oa, la, ob, lb)


def _tier_split(c, n_first_blocks):
    """Block tables / lengths of the first n blocks of each sequence (tier A)
    and of the rest (tier B)."""
    bs = c.block_size
    la = torch.clamp(c.seq_lens, max=n_first_blocks * bs)
    lb = c.seq_lens - la
    bta = c.block_tables[:, :max(n_first_blocks, 1)].contiguous()
    btb = c.block_tables[:, n_first_blocks:].contiguous()
    if btb.shape[1] == 0:
        btb = torch.full((c.block_tables.shape[0], 1), -1, dtype=torch.int32)
    return (bta, la.to(torch.int32)), (btb, lb.to(torch.int32))


@settings(max_examples=examples(150))
@given(seed=st.integers(0, 2**31 - 1), fmt=st.sampled_from(ALL_FORMATS),
       bs=st.sampled_from(BLOCK_SIZES), hd=st.sampled_from([64, 128, 256]),
       hkv=st.sampled_from([1, 2]), G=st.sampled_from([1, 4, 8]),
       lens=st.lists(st.integers(0, 300), min_size=1, max_size=3), split=st.integers(0, 3))
def test_two_halves_merged_equal_whole(seed, fmt, bs, hd, hkv, G, lens, split):
    """One pool, each sequence's blocks split into two disjoint parts: the
    merge of the two attentions equals attention over the whole."""
    if not parse_format(fmt).head_dim_ok(hd):
        hd = 128
    g = gen_from(seed)
    c = build_cache(fmt, lens, hkv, hd, bs, g)
    q = torch.randn(len(lens), hkv * G, hd, generator=g)
    scale = hd ** -0.5
    (bta, la), (btb, lb) = _tier_split(c, split)
    oa, sa = ops.paged_decode_attention(q, c.pool, bta, la, fmt, scale)
    ob, sb = ops.paged_decode_attention(q, c.pool, btb, lb, fmt, scale)
    out, lse = ops.merge_attention_states(oa, sa, ob, sb)
    whole, lse_w = ops.paged_decode_attention(q, c.pool, c.block_tables, c.seq_lens, fmt, scale)
    K, V = ops.gather_dequant(c.pool, c.block_tables, c.seq_lens, fmt)
    ro, rl, _ = ref_attention(q.double(), K.double(), V.double(), c.seq_lens, scale)
    full = c.seq_lens > 0
    assert bool((out[~full] == 0).all()) and bool((lse[~full] == -math.inf).all())
    if full.any():
        for o in (out, whole):
            err = ((o.double() - ro).norm(dim=-1) / ro.norm(dim=-1).clamp(min=1e-300))[full]
            assert err.max().item() <= REL_TOL_FP32
        bound = logit_error_bound(q, K, c.seq_lens, scale).amax(-1) + 8 * U32 * (rl.abs() + 1)
        lerr = (lse.double() - rl).abs()
        assert bool((lerr[full] <= bound[full]).all())


@settings(max_examples=examples(150))
@given(seed=st.integers(0, 2**31 - 1), cold=st.sampled_from(ALL_FORMATS),
       hot=st.sampled_from(HOT_FORMATS), bs=st.sampled_from(BLOCK_SIZES),
       dtype=st.sampled_from(ACT_DTYPES),
       lens=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 150)), min_size=1, max_size=3))
def test_hot_cold_tiers(seed, cold, hot, bs, dtype, lens):
    """Cold tier (compressed pool) + hot tier (fp16/bf16 pool): merged equals
    float64 attention over the concatenation cold ++ hot of each sequence."""
    g = gen_from(seed)
    hd = 128
    hkv, G = 2, 4
    cold_lens = [a for a, _ in lens]
    hot_lens = [b for _, b in lens]
    cc = build_cache(cold, cold_lens, hkv, hd, bs, g)
    hc = build_cache(hot, hot_lens, hkv, hd, bs, g, dtype=dtype)
    q = torch.randn(len(lens), hkv * G, hd, generator=g).to(dtype)
    scale = hd ** -0.5
    oc, lc = ops.paged_decode_attention(q, cc.pool, cc.block_tables, cc.seq_lens, cold, scale)
    oh, lh = ops.paged_decode_attention(q, hc.pool, hc.block_tables, hc.seq_lens, hot, scale)
    out, lse = ops.merge_attention_states(oc, lc, oh, lh)
    assert out.dtype == dtype
    Kc, Vc = ops.gather_dequant(cc.pool, cc.block_tables, cc.seq_lens, cold)
    Kh, Vh = ops.gather_dequant(hc.pool, hc.block_tables, hc.seq_lens, hot)
    total = [a + b for a, b in lens]
    L = max(total)
    K = torch.zeros(len(lens), hkv, L, hd, dtype=torch.float64)
    V = torch.zeros_like(K)
    for b, (a, h) in enumerate(lens):
        K[b, :, :a], K[b, :, a:a + h] = Kc[b, :, :a], Kh[b, :, :h]
        V[b, :, :a], V[b, :, a:a + h] = Vc[b, :, :a], Vh[b, :, :h]
    sl = torch.tensor(total, dtype=torch.int32)
    ro, rl, _ = ref_attention(q.double(), K, V, sl, scale)
    full = sl > 0
    assert bool((out[~full] == 0).all()) and bool((lse[~full] == -math.inf).all())
    if full.any():
        # each tier's output is rounded to the query dtype before the merge,
        # and the merge rounds once more
        tol = REL_TOL_FP32 + (3 * dtype_eps(dtype) if dtype != torch.float32 else 0)
        err = ((out.double() - ro).norm(dim=-1) / ro.norm(dim=-1).clamp(min=1e-300))[full]
        assert err.max().item() <= tol, f"rel err {err.max().item():.3g} > {tol:.3g}"
        bound = logit_error_bound(q, K, sl, scale).amax(-1) + 8 * U32 * (rl.abs() + 1)
        assert bool(((lse.double() - rl).abs()[full] <= bound[full]).all())
