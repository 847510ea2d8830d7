"""quantize_write: exact bytes (docs/format.md), error bounds of the round
trip, gather_dequant against the reference decoder, skips, determinism."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import kvcomp
from kvcomp import ops
from helpers import (examples, ACT_DTYPES, TOKEN_FORMATS, assert_bounded, assert_gather_matches,
                     gen_from, head_dims_for, heavy_tailed)
from reference import (BLOCK_SIZES, parse_format, ref_decode_pool, ref_gather,
                       ref_quantize_write, token_error_bound)


@st.composite
def write_case(draw, formats=TOKEN_FORMATS):
    fmt = draw(st.sampled_from(formats))
    hd = draw(st.sampled_from(head_dims_for(fmt, (16, 32, 48, 64, 96, 128, 256, 512))))
    bs = draw(st.sampled_from(BLOCK_SIZES))
    hkv = draw(st.sampled_from([1, 2, 3]))
    num_blocks = draw(st.integers(1, 4))
    n_tokens = draw(st.integers(0, min(40, num_blocks * bs)))
    dtype = draw(st.sampled_from(ACT_DTYPES))
    mag = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(fmt=fmt, hd=hd, bs=bs, hkv=hkv, num_blocks=num_blocks, n=n_tokens,
                dtype=dtype, mag=mag, seed=seed)


def _tokens(c, g, skip_frac=0.2):
    n, nslots = c["n"], c["num_blocks"] * c["bs"]
    slots = torch.randperm(nslots, generator=g)[:n].to(torch.int64)
    skip = torch.rand(n, generator=g) < skip_frac
    slots = torch.where(skip, torch.full_like(slots, -1), slots)
    if n:  # other negative values skip too
        slots[skip.nonzero().flatten()[::2]] = -7
    shape = (n, c["hkv"], c["hd"])
    k = heavy_tailed(shape, g, c["dtype"], c["mag"])
    v = heavy_tailed(shape, g, c["dtype"], c["mag"])
    return k, v, slots


@settings(max_examples=examples(200))
@given(write_case())
def test_quantize_write_bytes_exact(c):
    """Every byte the op writes is the one docs/format.md specifies; bytes of
    skipped tokens, other tokens and the tile padding are left alone (the
    pool starts as random bytes)."""
    g = gen_from(c["seed"])
    pool = kvcomp.allocate_pool(c["num_blocks"], c["bs"], c["hkv"], c["hd"], c["fmt"])
    pool.copy_(torch.randint(0, 256, pool.shape, generator=g, dtype=torch.uint8))
    k, v, slots = _tokens(c, g)
    expect = ref_quantize_write(pool, k, v, slots, c["fmt"])
    ops.quantize_write(k, v, pool, slots, c["fmt"])
    if not torch.equal(pool, expect):
        diff = (pool != expect).nonzero()
        raise AssertionError(f"{len(diff)} bytes differ from the reference; first at {diff[0].tolist()}")


@settings(max_examples=examples(200))
@given(write_case())
def test_quantize_write_roundtrip(c):
    """Decoding the pool bytes (reference decoder) returns the input within the
    contract's bound; gather_dequant equals the reference decoder."""
    g = gen_from(c["seed"])
    fmt, hd, bs = c["fmt"], c["hd"], c["bs"]
    rf = parse_format(fmt)
    pool = kvcomp.allocate_pool(c["num_blocks"], bs, c["hkv"], hd, fmt)
    k, v, slots = _tokens(c, g)
    ops.quantize_write(k, v, pool, slots, fmt)
    Kt, Vt = ref_decode_pool(pool, fmt)
    w = (slots >= 0).nonzero().flatten()
    s = slots[w]
    for side, X, T, name in ((rf.k, k, Kt, "key"), (rf.v, v, Vt, "value")):
        x = X[w].to(torch.float32).double()  # [n, hkv, hd] as the kernel sees it
        xh = T[s // bs, :, s % bs]  # [n, hkv, hd]
        if side.raw:
            dt = side.torch_dtype
            assert torch.equal(xh, x.to(dt).double()), f"{name}: {side.kind} is not exact rounding"
        else:
            assert_bounded(xh, x, token_error_bound(side, x), f"{fmt} {name}")
    # gather_dequant over all blocks in a shuffled order
    bt = torch.randperm(c["num_blocks"], generator=g).to(torch.int32)[None]
    sl = torch.tensor([c["num_blocks"] * bs], dtype=torch.int32)
    K, V = ops.gather_dequant(pool, bt, sl, fmt, torch.float32)
    RK, RV = ref_gather(pool, bt, sl, fmt)
    assert K.dtype == V.dtype == torch.float32
    assert K.shape == RK.shape == (1, c["hkv"], c["num_blocks"] * bs, hd)
    assert_gather_matches(K, V, RK, RV, fmt, fmt)
    for dt in (torch.float16, torch.bfloat16):
        K2, V2 = ops.gather_dequant(pool, bt, sl, fmt, dt)
        assert K2.dtype == dt
        assert torch.equal(K2, K.to(dt)) and torch.equal(V2, V.to(dt))


@given(fmt=st.sampled_from(TOKEN_FORMATS), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(ACT_DTYPES))
def test_quantize_write_deterministic(fmt, seed, dtype):
    g = gen_from(seed)
    hd = head_dims_for(fmt, (64, 128))[-1]
    k = heavy_tailed((50, 2, hd), g, dtype)
    v = heavy_tailed((50, 2, hd), g, dtype)
    slots = torch.randperm(64, generator=g)[:50]
    a = kvcomp.allocate_pool(4, 16, 2, hd, fmt)
    b = kvcomp.allocate_pool(4, 16, 2, hd, fmt)
    ops.quantize_write(k, v, a, slots, fmt)
    ops.quantize_write(k, v, b, slots, fmt)
    assert torch.equal(a, b)
    ops.quantize_write(k, v, a, slots, fmt)  # writing again changes nothing
    assert torch.equal(a, b)
    # one token at a time gives the same bytes as the batch
    c = kvcomp.allocate_pool(4, 16, 2, hd, fmt)
    for i in torch.randperm(50, generator=g).tolist():
        ops.quantize_write(k[i: i + 1], v[i: i + 1], c, slots[i: i + 1], fmt)
    assert torch.equal(a, c)


def test_quantize_write_all_skipped_and_empty():
    for fmt in ("fp16", "int8", "int4", "fp8_e5m2/int2"):
        pool = kvcomp.allocate_pool(2, 16, 2, 64, fmt)
        pool.copy_(torch.randint(0, 256, pool.shape, generator=gen_from(3), dtype=torch.uint8))
        before = pool.clone()
        k = torch.randn(5, 2, 64)
        ops.quantize_write(k, k, pool, torch.full((5,), -1, dtype=torch.int64), fmt)
        assert torch.equal(pool, before)
        e = torch.empty(0, 2, 64)
        ops.quantize_write(e, e, pool, torch.empty(0, dtype=torch.int64), fmt)
        assert torch.equal(pool, before)


def test_quantize_write_non_contiguous_inputs():
    """Strided key/value/slot_mapping are read correctly."""
    g = gen_from(5)
    k = heavy_tailed((2, 10, 64), g).transpose(0, 1)  # [10, 2, 64] non-contiguous
    v = heavy_tailed((64, 2, 10), g).permute(2, 1, 0)
    slots = torch.arange(20, dtype=torch.int64)[::2]
    for fmt in ("fp16", "int8", "int4", "fp8_e4m3/int2"):
        a = kvcomp.allocate_pool(2, 16, 2, 64, fmt)
        b = kvcomp.allocate_pool(2, 16, 2, 64, fmt)
        ops.quantize_write(k, v, a, slots, fmt)
        ops.quantize_write(k.contiguous(), v.contiguous(), b, slots.contiguous(), fmt)
        assert torch.equal(a, b)
        assert torch.equal(a, ref_quantize_write(torch.zeros_like(a), k, v, slots, fmt))


def test_quantize_write_constant_and_tiny_rows():
    """A constant group stores scale 0 (exact); a row of one value repeated."""
    for fmt in ("int4", "int2:g64", "int8", "fp8_e4m3", "fp8_e5m2", "int3", "int4:s", "nf3", "nf2:h"):
        pool = kvcomp.allocate_pool(1, 16, 1, 64, fmt)
        k = torch.full((3, 1, 64), 1.25)
        k[1] = -3.5
        k[2, 0, :32] = 7.0  # constant first group, different second
        k[2, 0, 32:] = torch.linspace(-1, 1, 32)
        v = k.flip(-1).contiguous()
        slots = torch.tensor([0, 5, 15])
        ops.quantize_write(k, v, pool, slots, fmt)
        assert torch.equal(pool, ref_quantize_write(torch.zeros_like(pool), k, v, slots, fmt))
        Kt, Vt = ref_decode_pool(pool, fmt)
        side = parse_format(fmt).k
        assert_bounded(Kt[0, 0, [0, 5, 15]], k[:, 0].double(),
                       token_error_bound(side, k[:, 0].double()), fmt)
        if side.asym:  # constant groups: scale 0, zero = the value (a half here), exact
            assert torch.equal(Kt[0, 0, 0], k[0, 0].double())
            assert torch.equal(Kt[0, 0, 5], k[1, 0].double())
            if side.group == 32:
                assert torch.equal(Kt[0, 0, 15, :32], k[2, 0, :32].double())


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "int4:g64", "fp8_e4m3", "fp8_e5m2", "int3:s", "nf3"])
@pytest.mark.parametrize("mag", [1e-30, 1.0, 65504.0])
def test_quantize_write_extreme_magnitudes(fmt, mag):
    """Every magnitude the 16-bit scales hold (|x| <= 65504, subnormal halves
    included) is accepted, and the bounds hold for it too (docs: scales round
    up, zeros down, so no group's range overflows its codes)."""
    g = gen_from(8)
    k = (torch.rand(6, 2, 64, generator=g) * 2 - 1) * mag
    k[:, :, 0], k[:, :, 1] = mag, -mag  # every group spans about [-mag, mag]
    k[:, :, 32], k[:, :, 33] = mag, -mag
    v = k.flip(0).contiguous()
    pool = kvcomp.allocate_pool(1, 16, 2, 64, fmt)
    slots = torch.arange(6)
    ops.quantize_write(k, v, pool, slots, fmt)
    Kt, Vt = ref_decode_pool(pool, fmt)
    side = parse_format(fmt).k
    for X, T, name in ((k, Kt, "key"), (v, Vt, "value")):
        x = X.double()
        xh = T[0, :, :6].permute(1, 0, 2)
        assert bool(torch.isfinite(xh).all()), f"{fmt} {name}: non-finite values decoded"
        assert_bounded(xh, x, token_error_bound(side, x), f"{fmt} {name} at magnitude {mag:g}")


@pytest.mark.parametrize("fmt,limit", [("int4", 65504.0), ("int8", 65504.0), ("fp8_e5m2", 65504.0),
                                       ("nf3:h", 65504.0 / 8), ("int4:g64:h", 65504.0 / 8)])
@pytest.mark.parametrize("side", ["key", "value"])
def test_quantize_write_beyond_half_range_rejected(fmt, limit, side):
    """docs: a value its fp16 scales cannot hold (beyond 65504, or for a
    rotated side 65504 / sqrt(head_dim), which a rotated coordinate can reach)
    raises a ValueError naming the argument and the limit, and writes nothing;
    the limit itself is stored."""
    pool = kvcomp.allocate_pool(1, 16, 2, 64, fmt)
    kv = {"key": torch.ones(3, 2, 64), "value": torch.ones(3, 2, 64)}
    kv[side][1, 0, 5] = limit
    ops.quantize_write(kv["key"], kv["value"], pool, torch.arange(3), fmt)
    before = pool.clone()
    for bad in (float(torch.nextafter(torch.tensor(limit), torch.tensor(math.inf))), 1e30, -3e38):
        kv[side][1, 0, 5] = bad
        with pytest.raises(ValueError, match=rf"{side}\[1\].*beyond"):
            ops.quantize_write(kv["key"], kv["value"], pool, torch.arange(3), fmt)
        assert torch.equal(pool, before)
