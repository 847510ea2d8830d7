"""paged_decode_attention against float64 attention over gather_dequant's K/V
(and over the reference decoder of the pool bytes)."""
import math
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kvcomp import ops
from helpers import (examples, ACT_DTYPES, ALL_FORMATS, attention_shapes, build_cache, dtype_eps,
                     gen_from)
from reference import U32, parse_format, ref_attention, ref_gather

REL_TOL_FP32 = 1e-4  # contract: fp32-accumulation tolerance


def logit_error_bound(q, K, seq_lens, scale):
    """Worst-case error of an fp32 dot product of length D, accumulated in any
    order: D*u*scale*sum|q_i||k_i| (plus the rounding of the result)."""
    G = q.shape[1] // K.shape[1]
    Kq = K.double().abs().repeat_interleave(G, dim=1)
    absdot = scale * torch.einsum("bhd,bhld->bhl", q.double().abs(), Kq)
    return (q.shape[-1] + 2) * U32 * absdot


def check_attention(c, q, scale, with_logits=True, rel_tol=None, softcap=0.0):
    """Runs the op on cache c and checks out, lse and logits_out. Soft-capping
    (softcap > 0) is 1-Lipschitz, so the logit bound holds through it, plus
    a few ulps of tanh times softcap."""
    fmt = c.fmt
    B, Hq, D = q.shape
    max_len = int(c.seq_lens.max())
    L = max_len + 3
    logits = torch.full((B, Hq, L), 1234.5, dtype=torch.float32) if with_logits else None
    inputs = [t.clone() for t in (q, c.pool, c.block_tables, c.seq_lens)]
    out, lse = ops.paged_decode_attention(q, c.pool, c.block_tables, c.seq_lens, fmt, scale, logits, softcap)
    for t, before in zip((q, c.pool, c.block_tables, c.seq_lens), inputs):
        assert torch.equal(t, before), "paged_decode_attention modified an input"
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (B, Hq) and lse.dtype == torch.float32

    K, V = ops.gather_dequant(c.pool, c.block_tables, c.seq_lens, fmt, torch.float32)
    ref_out, ref_lse, ref_logits = ref_attention(q.double(), K.double(), V.double(), c.seq_lens, scale, softcap)
    RK, RV = ref_gather(c.pool, c.block_tables, c.seq_lens, fmt)
    ref2_out, ref2_lse, _ = ref_attention(q.double(), RK, RV, c.seq_lens, scale, softcap)

    empty = c.seq_lens == 0
    if empty.any():
        assert bool((out[empty] == 0).all()), "seq_len 0 must give out 0"
        assert bool((lse[empty] == -math.inf).all()), "seq_len 0 must give lse -inf"
    full = ~empty
    if not full.any():
        return out, lse
    eps = dtype_eps(q.dtype)
    tol = rel_tol if rel_tol is not None else REL_TOL_FP32 + (eps if q.dtype != torch.float32 else 0)
    for name, ro in (("gather_dequant", ref_out), ("reference decoder", ref2_out)):
        err = (out.double() - ro).norm(dim=-1) / ro.norm(dim=-1).clamp(min=1e-300)
        worst = err[full].max().item()
        assert worst <= tol, f"{fmt}: out rel err {worst:.3g} > {tol:.3g} vs attention over {name}"
    bound = logit_error_bound(q, K, c.seq_lens, scale) + 4 * U32 * softcap  # [B, Hq, max_len]
    mask = torch.arange(max_len)[None, :] < c.seq_lens.long()[:, None]
    lse_tol = torch.where(mask[:, None, :], bound, torch.zeros_like(bound)).amax(-1) \
        + 4 * U32 * ref_lse.abs().nan_to_num(posinf=0, neginf=0) + 1e-6
    lse_err = (lse.double() - ref_lse).abs()
    assert bool((lse_err[full] <= lse_tol[full]).all()), \
        f"{fmt}: lse err {lse_err[full].max().item():.3g}"
    if with_logits:
        m = mask[:, None, :].expand(B, Hq, max_len)
        got = logits[..., :max_len].double()
        lerr = (got - ref_logits.nan_to_num(neginf=0)).abs()
        ltol = bound + 2 * U32 * ref_logits.abs().nan_to_num(posinf=0, neginf=0)
        bad = (lerr > ltol) & m
        assert not bad.any(), f"{fmt}: logits_out differs from scale*q.k at {bad.nonzero()[0].tolist()}"
    return out, lse


@settings(max_examples=examples(400))
@given(shape=attention_shapes(), dtype=st.sampled_from(ACT_DTYPES),
       seed=st.integers(0, 2**31 - 1), with_logits=st.booleans())
def test_decode_attention(shape, dtype, seed, with_logits):
    g = gen_from(seed)
    c = build_cache(shape["fmt"], shape["seq_lens"], shape["num_kv_heads"], shape["head_dim"],
                    shape["block_size"], g)
    B, hkv, hd = len(shape["seq_lens"]), shape["num_kv_heads"], shape["head_dim"]
    q = torch.randn(B, hkv * shape["group"], hd, generator=g).to(dtype)
    check_attention(c, q, hd ** -0.5, with_logits)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_decode_attention_every_format(fmt):
    """Each format once with MQA, GQA and MHA, ragged lengths and boundaries."""
    hd = 128 if parse_format(fmt).head_dim_ok(128) else 64
    for i, (hkv, G, bs) in enumerate([(1, 8, 16), (2, 4, 32), (4, 1, 64), (2, 2, 128)]):
        g = gen_from(zlib.crc32(fmt.encode()) + i)
        lens = [0, 1, bs - 1, bs, bs + 1, 3 * bs + 5]
        c = build_cache(fmt, lens, hkv, hd, bs, g)
        q = torch.randn(len(lens), hkv * G, hd, generator=g)
        check_attention(c, q, hd ** -0.5)


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4", "kivi2", "fp8_e5m2/int4c"])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_decode_attention_long(fmt, threads):
    """A long sequence (batch 1): the kernel splits it and merges the splits by
    log-sum-exp; the result does not depend on the thread count."""
    torch.set_num_threads(threads)
    g = gen_from(threads)
    c = build_cache(fmt, [3333], 1, 128, 64, g)
    q = torch.randn(1, 8, 128, generator=g)
    out, lse = check_attention(c, q, 128 ** -0.5)
    torch.set_num_threads(1)
    out1, lse1 = ops.paged_decode_attention(q, c.pool, c.block_tables, c.seq_lens, fmt, 128 ** -0.5)
    assert (out - out1).abs().max().item() <= 1e-5 * out1.abs().max().item()


def test_decode_attention_long_batch():
    g = gen_from(77)
    c = build_cache("int4", [4100, 17, 0, 2500], 2, 64, 128, g)
    q = torch.randn(4, 8, 64, generator=g)
    check_attention(c, q, 0.125)


def test_decode_attention_all_empty():
    g = gen_from(4)
    c = build_cache("int8", [0, 0], 2, 64, 16, g)
    q = torch.randn(2, 4, 64, generator=g)
    logits = torch.full((2, 4, 5), 7.0)
    out, lse = ops.paged_decode_attention(q, c.pool, c.block_tables, c.seq_lens, "int8", 0.1, logits)
    assert bool((out == 0).all()) and bool((lse == -math.inf).all())
    # an all-(-1) block table is fine when nothing is read
    bt = torch.full((2, 3), -1, dtype=torch.int32)
    out, lse = ops.paged_decode_attention(q, c.pool, bt, c.seq_lens, "int8", 0.1)
    assert bool((out == 0).all()) and bool((lse == -math.inf).all())


@pytest.mark.parametrize("dtype", ACT_DTYPES)
def test_decode_attention_one_token(dtype):
    """With one token, out = v and lse = scale*q.k exactly up to rounding."""
    g = gen_from(11)
    c = build_cache("fp16", [1], 2, 64, 16, g)
    q = torch.randn(1, 4, 64, generator=g).to(dtype)
    out, lse = ops.paged_decode_attention(q, c.pool, c.block_tables, c.seq_lens, "fp16", 0.125)
    K, V = ops.gather_dequant(c.pool, c.block_tables, c.seq_lens, "fp16")
    v = V[0, :, 0].repeat_interleave(2, dim=0)  # [4, 64]
    assert torch.equal(out[0], v.to(dtype))


def test_decode_attention_scale_and_peaked():
    """Very peaked softmax (large scale) and scale 0 (uniform weights)."""
    g = gen_from(12)
    c = build_cache("int4", [100, 37], 2, 128, 32, g)
    q = torch.randn(2, 4, 128, generator=g)
    check_attention(c, q, 1.0)
    out, lse = check_attention(c, q, 0.0)
    K, V = ops.gather_dequant(c.pool, c.block_tables, c.seq_lens, "int4")
    mean = V[0, :, :100].double().mean(1).repeat_interleave(2, 0)
    assert torch.allclose(out[0].double(), mean, rtol=1e-5, atol=1e-5 * mean.abs().max().item())
    assert torch.allclose(lse.double(), torch.log(c.seq_lens.double())[:, None].expand(2, 4),
                          atol=1e-5)


@pytest.mark.parametrize("fmt", ["fp16", "int8", "nf4:h", "kivi2"])
@pytest.mark.parametrize("softcap", [50.0, 2.0])
def test_decode_attention_softcap(fmt, softcap):
    """Gemma 2's soft-capping, softcap * tanh(logit / softcap), before the
    softmax: logits up to ~±40 here, so a cap of 50 bends them and 2 flattens them."""
    g = gen_from(21)
    c = build_cache(fmt, [150, 9, 0], 2, 64, 16, g)
    q = 6 * torch.randn(3, 4, 64, generator=g)
    out, _ = check_attention(c, q, 0.125, softcap=softcap)
    plain, _ = ops.paged_decode_attention(q, c.pool, c.block_tables, c.seq_lens, fmt, 0.125)
    assert (out - plain).norm() > 1e-3 * plain.norm()  # the cap acted


@pytest.mark.parametrize("softcap", [-1.0, float("nan"), float("inf")])
def test_decode_attention_bad_softcap(softcap):
    g = gen_from(22)
    c = build_cache("int8", [20], 1, 64, 16, g)
    with pytest.raises(ValueError, match="softcap"):
        ops.paged_decode_attention(torch.randn(1, 2, 64), c.pool, c.block_tables, c.seq_lens, "int8", 0.125,
                                   softcap=softcap)


def test_decode_attention_shared_blocks():
    """Two sequences may name the same blocks (prefix sharing)."""
    g = gen_from(13)
    c = build_cache("fp8_e4m3", [70], 2, 64, 32, g)
    bt = torch.cat([c.block_tables, c.block_tables])
    sl = torch.tensor([70, 40], dtype=torch.int32)
    q = torch.randn(1, 4, 64, generator=g).expand(2, 4, 64).contiguous()
    out, lse = ops.paged_decode_attention(q, c.pool, bt, sl, "fp8_e4m3", 0.125)
    out0, lse0 = ops.paged_decode_attention(q[:1], c.pool, c.block_tables, c.seq_lens, "fp8_e4m3", 0.125)
    assert torch.allclose(out[0], out0[0], rtol=1e-6, atol=1e-6)
    K, V = ops.gather_dequant(c.pool, bt, sl, "fp8_e4m3")
    ro, rl, _ = ref_attention(q.double(), K.double(), V.double(), sl, 0.125)
    assert ((out.double() - ro).norm() / ro.norm()).item() <= REL_TOL_FP32


def test_decode_attention_non_contiguous_query():
    g = gen_from(14)
    c = build_cache("int8", [50, 20], 2, 64, 16, g)
    q = torch.randn(64, 4, 2, generator=g).permute(2, 1, 0)  # [2, 4, 64] strided
    a, la = ops.paged_decode_attention(q, c.pool, c.block_tables, c.seq_lens, "int8", 0.125)
    b, lb = ops.paged_decode_attention(q.contiguous(), c.pool, c.block_tables, c.seq_lens, "int8", 0.125)
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_decode_attention_strided_tables():
    """Non-contiguous block_tables and seq_lens are read correctly."""
    g = gen_from(15)
    c = build_cache("kivi4", [90, 3, 33], 2, 128, 16, g)
    q = torch.randn(3, 8, 128, generator=g)
    bt = c.block_tables.t().contiguous().t()
    sl = torch.stack([c.seq_lens, c.seq_lens], 1)[:, 0]
    assert not bt.is_contiguous() and not sl.is_contiguous()
    a = ops.paged_decode_attention(q, c.pool, bt, sl, "kivi4", 0.1)
    b = ops.paged_decode_attention(q, c.pool, c.block_tables, c.seq_lens, "kivi4", 0.1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ka = ops.gather_dequant(c.pool, bt, sl, "kivi4")
    kb = ops.gather_dequant(c.pool, c.block_tables, c.seq_lens, "kivi4")
    assert torch.equal(ka[0], kb[0]) and torch.equal(ka[1], kb[1])
