"""seal_blocks: hot fp16/bf16 blocks into every cold format, per-token and
per-channel; exact bytes, error bounds, untouched blocks."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import kvcomp
from kvcomp import ops
from helpers import (examples, ACT_DTYPES, ALL_FORMATS, CHANNEL_FORMATS, HOT_FORMATS, assert_bounded,
                     assert_gather_matches, gen_from, head_dims_for, heavy_tailed)
from reference import (BLOCK_SIZES, channel_error_bound, parse_format, ref_decode_pool,
                       ref_gather, ref_seal_blocks, token_error_bound)


@st.composite
def seal_case(draw, formats=ALL_FORMATS):
    cold = draw(st.sampled_from(formats))
    hot = draw(st.sampled_from(HOT_FORMATS))
    hd = draw(st.sampled_from(head_dims_for(cold, (32, 64, 128, 256))))
    bs = draw(st.sampled_from(BLOCK_SIZES))
    hkv = draw(st.sampled_from([1, 2, 4]))
    hot_blocks = draw(st.integers(1, 4))
    cold_blocks = draw(st.integers(1, 5))
    n_seal = draw(st.integers(0, min(hot_blocks, cold_blocks)))
    dtype = draw(st.sampled_from(ACT_DTYPES))
    mag = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(cold=cold, hot=hot, hd=hd, bs=bs, hkv=hkv, hot_blocks=hot_blocks,
                cold_blocks=cold_blocks, n=n_seal, dtype=dtype, mag=mag, seed=seed)


def _hot_pool(c, g):
    hot = kvcomp.allocate_pool(c["hot_blocks"], c["bs"], c["hkv"], c["hd"], c["hot"])
    n = c["hot_blocks"] * c["bs"]
    k = heavy_tailed((n, c["hkv"], c["hd"]), g, c["dtype"], c["mag"])
    v = heavy_tailed((n, c["hkv"], c["hd"]), g, c["dtype"], c["mag"])
    ops.quantize_write(k, v, hot, torch.arange(n), c["hot"])
    src = torch.randperm(c["hot_blocks"], generator=g)[: c["n"]].to(torch.int32)
    dst = torch.randperm(c["cold_blocks"], generator=g)[: c["n"]].to(torch.int32)
    return hot, src, dst


@settings(max_examples=examples(200))
@given(seal_case())
def test_seal_bytes_exact(c):
    """The cold tiles hold exactly the docs' bytes for the hot blocks' values;
    blocks not sealed into (random bytes) and the hot pool are unchanged."""
    g = gen_from(c["seed"])
    hot, src, dst = _hot_pool(c, g)
    cold = kvcomp.allocate_pool(c["cold_blocks"], c["bs"], c["hkv"], c["hd"], c["cold"])
    cold.copy_(torch.randint(0, 256, cold.shape, generator=g, dtype=torch.uint8))
    hot_before = hot.clone()
    expect = ref_seal_blocks(hot, src, cold, dst, c["hot"], c["cold"])
    ops.seal_blocks(hot, src, cold, dst, c["hot"], c["cold"])
    assert torch.equal(hot, hot_before)
    if not torch.equal(cold, expect):
        diff = (cold != expect).nonzero()
        raise AssertionError(f"{len(diff)} bytes differ from the reference; first at {diff[0].tolist()}")


@settings(max_examples=examples(200))
@given(seal_case())
def test_seal_roundtrip_bounds(c):
    """Per-channel sides: |x_hat - x| <= (max-min)/(2^b-1)/2 over the block's
    tokens, per channel; per-token sides: their per-token bound; raw sides:
    exact rounding. gather_dequant equals the reference decoder."""
    g = gen_from(c["seed"])
    hot, src, dst = _hot_pool(c, g)
    cold = kvcomp.allocate_pool(c["cold_blocks"], c["bs"], c["hkv"], c["hd"], c["cold"])
    ops.seal_blocks(hot, src, cold, dst, c["hot"], c["cold"])
    Kh, Vh = ref_decode_pool(hot, c["hot"])   # [nb, hkv, bs, hd] float64, exact
    Kc, Vc = ref_decode_pool(cold, c["cold"])
    rf = parse_format(c["cold"])
    for side, H, C, name in ((rf.k, Kh, Kc, "K"), (rf.v, Vh, Vc, "V")):
        x = H[src.long()]  # [n, hkv, bs, hd]
        xh = C[dst.long()]
        if side.raw:
            dt = side.torch_dtype
            assert torch.equal(xh, x.to(dt).double()), f"{name}: not exact rounding"
        elif side.per_channel:
            assert_bounded(xh, x, channel_error_bound(side, x), f"{c['cold']} {name}")
        else:
            assert_bounded(xh, x, token_error_bound(side, x), f"{c['cold']} {name}")
    if c["n"]:
        bt = dst[None]
        sl = torch.tensor([c["n"] * c["bs"]], dtype=torch.int32)
        K, V = ops.gather_dequant(cold, bt, sl, c["cold"], torch.float32)
        RK, RV = ref_gather(cold, bt, sl, c["cold"])
        assert_gather_matches(K, V, RK, RV, c["cold"], c["cold"])


@given(fmt=st.sampled_from(CHANNEL_FORMATS), hot=st.sampled_from(HOT_FORMATS),
       seed=st.integers(0, 2**31 - 1), bs=st.sampled_from(BLOCK_SIZES))
def test_seal_per_channel_outliers(fmt, hot, seed, bs):
    """Outlier channels get their own range: a quiet channel next to one x1000
    keeps its own (small) error bound."""
    g = gen_from(seed)
    hd = head_dims_for(fmt, (64, 128))[0]
    k = heavy_tailed((bs, 1, hd), g, magnitude=0.01)
    k[:, :, 3] *= 1000
    v = k.flip(-1).contiguous()
    hp = kvcomp.allocate_pool(1, bs, 1, hd, hot)
    ops.quantize_write(k, v, hp, torch.arange(bs), hot)
    cp = kvcomp.allocate_pool(1, bs, 1, hd, fmt)
    z = torch.zeros(1, dtype=torch.int32)
    ops.seal_blocks(hp, z, cp, z, hot, fmt)
    Kh, Vh = ref_decode_pool(hp, hot)
    Kc, Vc = ref_decode_pool(cp, fmt)
    rf = parse_format(fmt)
    for side, x, xh in ((rf.k, Kh, Kc), (rf.v, Vh, Vc)):
        if side.raw:  # exact rounding of the hot values (fp32 hot into fp16 cold rounds)
            assert torch.equal(xh, x.to(side.torch_dtype).double()), fmt
            continue
        b = channel_error_bound(side, x) if side.per_channel else token_error_bound(side, x)
        assert_bounded(xh, x, b, fmt)


def test_seal_empty_and_repeat():
    g = gen_from(9)
    hot = kvcomp.allocate_pool(2, 16, 2, 64, "fp16")
    k = heavy_tailed((32, 2, 64), g)
    ops.quantize_write(k, k, hot, torch.arange(32), "fp16")
    for fmt in ("int4c", "kivi2", "int8", "fp8_e5m2"):
        cold = kvcomp.allocate_pool(3, 16, 2, 64, fmt)
        before = cold.clone()
        e = torch.empty(0, dtype=torch.int32)
        ops.seal_blocks(hot, e, cold, e, "fp16", fmt)
        assert torch.equal(cold, before)
        src, dst = torch.tensor([1, 0], dtype=torch.int32), torch.tensor([2, 0], dtype=torch.int32)
        ops.seal_blocks(hot, src, cold, dst, "fp16", fmt)
        once = cold.clone()
        ops.seal_blocks(hot, src, cold, dst, "fp16", fmt)
        assert torch.equal(cold, once)
        assert torch.equal(cold[1], before[1])


@pytest.mark.parametrize("fmt", ["int8c", "int4c", "int2c", "int4", "int8", "fp8_e4m3", "nf2"])
@pytest.mark.parametrize("mag", [1e-20, 1.0, 6.0e4, 1e30, 3e38])  # 6e4: 65504 is no bf16
def test_seal_extreme_bf16_magnitudes(fmt, mag):
    """A bf16 hot tier holds any fp32 magnitude: sealing keeps the bounds for
    every one the cold tier's fp16 scales hold (|x| <= 65504), and a block
    holding more is rejected, naming it and the limit, before anything is written."""
    g = gen_from(10)
    k = (torch.rand(16, 2, 64, generator=g) * 2 - 1) * mag
    k[:, :, 0], k[3, :, 1], k[5, :, 1] = mag, mag, -mag
    k[0, :, :], k[1, :, :] = mag, -mag  # every channel and group spans about [-mag, mag]
    hot = kvcomp.allocate_pool(1, 16, 2, 64, "bf16")
    ops.quantize_write(k, k, hot, torch.arange(16), "bf16")
    cold = kvcomp.allocate_pool(1, 16, 2, 64, fmt)
    z = torch.zeros(1, dtype=torch.int32)
    if mag > 65504:
        with pytest.raises(ValueError, match=r"src_blocks\[0\] = 0 .*beyond \+-65504"):
            ops.seal_blocks(hot, z, cold, z, "bf16", fmt)
        assert not cold.any()
        return
    ops.seal_blocks(hot, z, cold, z, "bf16", fmt)
    Kh, _ = ref_decode_pool(hot, "bf16")
    Kc, _ = ref_decode_pool(cold, fmt)
    side = parse_format(fmt).k
    b = channel_error_bound(side, Kh) if side.per_channel else token_error_bound(side, Kh)
    assert bool(torch.isfinite(Kc).all()), f"{fmt}: non-finite values stored"
    assert_bounded(Kc, Kh, b, f"{fmt} at magnitude {mag:g}")
