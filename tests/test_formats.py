"""KVFormat parsing, exact sizes, the tile table, allocate_pool, and checks of
the reference itself."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import kvcomp
from kvcomp import KVFormat
from helpers import ALL_FORMATS, CHANNEL_FORMATS, TOKEN_FORMATS, gen_from, heavy_tailed
from reference import (BLOCK_SIZES, FP8_TABLE, parse_format, quantize_block_per_channel,
                       quantize_rows, dequantize_block_per_channel, dequantize_rows,
                       pack_codes, unpack_codes, token_error_bound, channel_error_bound,
                       hadamard_signs, rotate32, rotation_matrix, unrotate64)

CANONICAL = {
    "fp16": "fp16", "bf16": "bf16", "fp8": "fp8_e4m3", "fp8_e4m3": "fp8_e4m3",
    "fp8_e5m2": "fp8_e5m2", "int8": "int8", "int4": "int4", "int4:g32": "int4",
    "int4:g64": "int4:g64", "int4:g128": "int4:g128", "int2": "int2", "int2:g32": "int2",
    "int2:g64": "int2:g64", "int8c": "int8c", "int4c": "int4c", "int2c": "int2c",
    "kivi2": "int2c/int2", "kivi4": "int4c/int4", "int8/int8": "int8",
    "int4:g32/int4": "int4", "int4:g64/int4:g64": "int4:g64", "fp8/int4": "fp8_e4m3/int4",
    "int4c/int4": "int4c/int4", "int8/int2:g64": "int8/int2:g64", "fp16/int8": "fp16/int8",
    "int2c/int2": "int2c/int2",
    "int3": "int3", "int3:g32": "int3", "int4:h": "int4:h", "int4:h:g64": "int4:g64:h",
    "int4:s:g32": "int4:s", "int2:h:s:g128": "int2:g128:s:h", "nf4": "nf4", "nf3:g64:h": "nf3:g64:h",
    "int8:g32": "int8:g32", "fp8:h": "fp8_e4m3:h", "int8:g512": "int8:g512",
    "nf2:h/int4:s": "nf2:h/int4:s", "int4c/int3:h": "int4c/int3:h",
}


@pytest.mark.parametrize("spec,name", sorted(CANONICAL.items()))
def test_parse_canonical(spec, name):
    f = KVFormat.parse(spec)
    assert f.name == name
    assert str(f) == name
    assert KVFormat.parse(name) == f
    assert KVFormat.parse(f) is f
    rf = parse_format(spec)
    assert rf.name == name
    for side, rside in ((f.k, rf.k), (f.v, rf.v)):
        assert side.bits == rside.bits
        assert side.group == rside.group
        assert side.per_channel == rside.per_channel
        assert side.rotated == rside.rotated
        assert side.spec == rside.name
    assert f.per_channel == rf.per_channel


def test_parse_aliases_sides():
    f = KVFormat.parse("kivi2")
    assert (f.k.bits, f.k.per_channel, f.v.bits, f.v.per_channel, f.v.group) == (2, True, 2, False, 32)
    f = KVFormat.parse("kivi4")
    assert (f.k.bits, f.k.per_channel, f.v.bits, f.v.per_channel) == (4, True, 4, False)
    assert KVFormat.parse("int4:g128").k.group == 128
    assert KVFormat.parse("fp8_e4m3").k.group == 0
    f = KVFormat.parse("int3:g64:h/nf2")
    assert (f.k.bits, f.k.group, f.k.rotated, f.v.bits, f.v.group, f.v.rotated) == (3, 64, True, 2, 32, False)
    assert (f.k.spec, f.v.spec) == ("int3:g64:h", "nf2")


@pytest.mark.parametrize("spec", [
    "int3c", "fp64", "", "int8c:g64", "int4:g16", "int4:g48", "int8/int4/int2", "/int8",
    "int8/", "kivi3", "INT9", "fp8_e3m4", "int4:", "int4:64", "nf5", "fp16:h", "int4c:h",
    "int8:s", "nf4:s", "int4:s:s", "int4:h:h", "int4:g32:g64", "int4:x", "fp16:g32",
])
def test_parse_unknown_raises(spec):
    with pytest.raises(ValueError):
        KVFormat.parse(spec)


def test_parse_type_error():
    with pytest.raises(TypeError):
        KVFormat.parse(8)


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_fp16_bytes_per_token_llama(bs):
    f = KVFormat.parse("fp16")
    assert f.bytes_per_token(128, bs) == 512
    assert f.tile_bytes(128, bs) == 512 * bs
    # Llama-3-8B: 32 layers x 8 KV heads
    assert 32 * 8 * f.bytes_per_token(128, bs) == 131072
    assert KVFormat.parse("bf16").bytes_per_token(128, bs) == 512


def test_fp16_padding_example():
    assert KVFormat.parse("fp16").tile_bytes(64, 32) == 8224


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_tile_table(fmt):
    f, rf = KVFormat.parse(fmt), parse_format(fmt)
    seen = {}
    for (hd, bs), ref_bytes in rf.all_geometries():
        tb = f.tile_bytes(hd, bs)
        assert tb == ref_bytes, (hd, bs)
        assert tb % bs == 0 and tb % 16 == 0
        assert tb >= rf.natural_bytes(hd, bs)
        assert f.bytes_per_token(hd, bs) * bs == tb
        assert tb not in seen, f"tile_bytes {tb} of {(hd, bs)} repeats {seen.get(tb)}"
        seen[tb] = (hd, bs)
        assert tuple(f.geometry(tb)) == (hd, bs)
        assert tuple(f.geometry(tb, hd)) == (hd, bs)
    # head_dims the format cannot hold
    for hd in (0, 8, 24, 520, 1024):
        with pytest.raises(ValueError):
            f.tile_bytes(hd, 16)
    for bs in (8, 48, 256):
        with pytest.raises(ValueError):
            f.tile_bytes(128, bs)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_layout_matches_docs(fmt):
    """KVFormat.layout (the extension's offsets) agrees with the sections the
    reference derives from docs/format.md."""
    f, rf = KVFormat.parse(fmt), parse_format(fmt)
    for (hd, bs), tb in rf.all_geometries():
        lay = f.layout(hd, bs)
        for name, sec in zip(("k", "v"), rf.sections(hd, bs)):
            got = lay[name]
            assert (got["offset"], got["row_bytes"], got["data_bytes"], got["meta_offset"],
                    got["meta_bytes"]) == (sec.offset, sec.row_bytes, sec.data_bytes,
                                           sec.meta_offset, sec.meta_bytes), (name, hd, bs)
            assert sec.offset % 16 == 0 and sec.meta_offset % 16 == 0
        assert lay["natural_bytes"] == rf.natural_bytes(hd, bs)
        assert lay["tile_bytes"] == tb


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_bytes_per_token_exact(fmt):
    """Compressed formats cost what their layout says, per the docs' formula."""
    f, rf = KVFormat.parse(fmt), parse_format(fmt)
    for hd in (64, 128, 256):
        if not rf.head_dim_ok(hd):
            continue
        for bs in BLOCK_SIZES:
            ks, vs = rf.sections(hd, bs)
            assert f.tile_bytes(hd, bs) >= vs.end
            # only the padding for uniqueness (whole tokens) comes on top
            assert (f.tile_bytes(hd, bs) - vs.end) % bs == 0


def test_compression_ratios():
    """Sanity on the sizes (layout v2, 16-bit metadata): int4 per group of 32
    at head_dim 128 is 64 B codes + 4 groups * (scale, zero) * 2 B = 80 B per side."""
    f = KVFormat.parse("int4")
    assert f.tile_bytes(128, 16) == parse_format("int4").natural_bytes(128, 16) == 2 * 16 * 80
    assert KVFormat.parse("int8").bytes_per_token(128, 16) == 2 * (128 + 2)
    assert KVFormat.parse("fp8_e4m3").bytes_per_token(128, 16) == 2 * (128 + 2)
    # int4c: 64 B a token + 4 B a channel per block
    assert KVFormat.parse("int4c").tile_bytes(128, 128) == 2 * (128 * 64 + 128 * 4)
    # the 3.25- and 2.25-bit formats at head_dim 64: 3 (2) bits + one fp16 scale per 64 channels
    assert KVFormat.parse("nf3:g64:h").bytes_per_token(64, 16) == 2 * (24 + 2)
    assert KVFormat.parse("nf2:g64:h").bytes_per_token(64, 16) == 2 * (16 + 2)
    assert KVFormat.parse("int3:g64").bytes_per_token(64, 16) == 2 * (24 + 4)
    # llama.cpp's q8_0 and q4_0: 32 values, one fp16 scale
    assert KVFormat.parse("int8:g32").bytes_per_token(128, 16) == 2 * (128 + 8)
    assert KVFormat.parse("int4:s").bytes_per_token(128, 16) == 2 * (64 + 8)


@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4:g64", "kivi2", "fp8_e5m2/int4c"])
@pytest.mark.parametrize("hd,bs", [(128, 16), (64, 32), (256, 128), (96, 64)])
def test_allocate_pool(fmt, hd, bs):
    rf = parse_format(fmt)
    if not rf.head_dim_ok(hd):
        with pytest.raises(ValueError):
            kvcomp.allocate_pool(3, bs, 2, hd, fmt)
        return
    p = kvcomp.allocate_pool(3, bs, 2, hd, fmt)
    assert p.shape == (3, 2, KVFormat.parse(fmt).tile_bytes(hd, bs))
    assert p.shape[2] == rf.tile_bytes(hd, bs)
    assert p.dtype == torch.uint8
    assert p.is_contiguous()
    assert not p.any()
    assert p.device.type == "cpu"


def test_allocate_pool_bad():
    with pytest.raises(ValueError):
        kvcomp.allocate_pool(4, 24, 2, 128, "fp16")
    with pytest.raises(ValueError):
        kvcomp.allocate_pool(4, 16, 2, 48, "int4")
    with pytest.raises(ValueError):
        kvcomp.allocate_pool(4, 16, 2, 128, "int5")
    with pytest.raises(ValueError):
        kvcomp.allocate_pool(-1, 16, 2, 128, "fp16")
    with pytest.raises(ValueError):
        kvcomp.allocate_pool(4, 16, 0, 128, "fp16")


def test_layout_version():
    assert kvcomp.LAYOUT_VERSION == 2


# ------------------------------------------------------- reference self-checks
def test_fp8_tables_match_torch_dtypes():
    """The reference's fp8 value tables agree with torch's float8 dtypes."""
    for kind, dt in (("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)):
        table = FP8_TABLE[kind]
        codes = torch.arange(len(table), dtype=torch.uint8)
        assert torch.equal(codes.view(dt).to(torch.float64), table)
        assert bool((table[1:] > table[:-1]).all())


@pytest.mark.parametrize("kind", ["fp16", "bf16", "fp8_e4m3", "fp8_e5m2", "int8", "int4", "int3", "int2",
                                  "nf4", "nf3", "nf2", "int8c", "int4c", "int2c"])
def test_reference_pack_roundtrip(kind):
    side = parse_format(kind).k
    g = gen_from(1)
    top = 1 << min(side.bits, 16)
    codes = torch.randint(0, top, (3, 5, 64), generator=g)
    packed = pack_codes(side, codes)
    assert packed.shape == (3, 5, 64 * side.bits // 8)
    assert torch.equal(unpack_codes(side, packed, 64), codes)


def test_reference_int3_packing_docs_example():
    """docs: 12 bytes a chunk: the low two bits as int2's 8 bytes, then bit 2
    of channels 8j..8j+7 in byte 8 + j (channel 8j + e at bit e)."""
    c = (torch.arange(64) * 5 + 3) % 8
    b = pack_codes(parse_format("int3").k, c)
    assert b.shape == (24,)
    for chunk in range(2):
        cc, bb = c[32 * chunk:32 * chunk + 32], b[12 * chunk:12 * chunk + 12]
        for i in range(8):
            assert int(bb[i]) == (cc[i] & 3 | (cc[i + 8] & 3) << 2 | (cc[i + 16] & 3) << 4 | (cc[i + 24] & 3) << 6)
        for j in range(4):
            assert int(bb[8 + j]) == sum(int(cc[8 * j + e] >> 2 & 1) << e for e in range(8))


@pytest.mark.parametrize("n", [16, 32, 64, 128, 256, 512])
def test_rotation_orthogonal(n):
    """R = H D / sqrt(n) is orthogonal, and the kernels' fp32 rotation (the
    reference emulates it bit for bit; quantize_write's bytes match it in
    test_quantize_write) is R to fp32 rounding."""
    R = rotation_matrix(n)
    assert torch.allclose(R @ R.T, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    x = heavy_tailed((20, n), gen_from(n))
    y32 = rotate32(x).double()
    y64 = x.double() @ R.T
    assert ((y32 - y64).norm(dim=-1) / x.double().norm(dim=-1)).max() < 1e-6
    assert torch.allclose(unrotate64(y64), x.double(), atol=1e-9, rtol=1e-9)


HADAMARD_SIGNS_16 = [-1.0, 1.0, -1.0, -1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0, 1.0, 1.0, 1.0, -1.0, 1.0, 1.0]


def test_hadamard_signs_documented():
    """docs/format.md: the first signs of the seeded murmur3 rule (a changed
    seed or hash changes every rotated pool's bytes)."""
    assert hadamard_signs(16).tolist() == HADAMARD_SIGNS_16


def test_reference_packing_docs_example():
    """docs: int4 byte i = channel i | channel i+16 << 4; int2 byte i =
    ch i | ch i+8 << 2 | ch i+16 << 4 | ch i+24 << 6."""
    c = torch.arange(64) % 16
    b = pack_codes(parse_format("int4").k, c)
    assert b.shape == (32,)
    for i in range(16):
        assert int(b[i]) == (c[i] | c[i + 16] << 4)
        assert int(b[16 + i]) == (c[32 + i] | c[48 + i] << 4)
    c = torch.arange(32) % 4
    b = pack_codes(parse_format("int2").k, (c + torch.arange(32) // 8) % 4)
    cc = (c + torch.arange(32) // 8) % 4
    for i in range(8):
        assert int(b[i]) == (cc[i] | cc[i + 8] << 2 | cc[i + 16] << 4 | cc[i + 24] << 6)


@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(
    ["fp8_e4m3", "fp8_e5m2", "int8", "int4", "int4:g64", "int2", "int2:g128", "int3", "int3:g128:s",
     "int4:s", "nf4", "nf3:g64", "nf2:g128", "int8:g32", "int4:h", "nf3:g64:h", "int8:h", "fp8_e5m2:g64:h"]),
    mag=st.sampled_from([1e-3, 1.0, 100.0]))
def test_reference_quantizer_within_bounds(seed, kind, mag):
    """The reference quantizer itself satisfies the contract bounds."""
    side = parse_format(kind).k
    x = heavy_tailed((6, 128), gen_from(seed), magnitude=mag)
    codes, meta = quantize_rows(side, x)
    xh = dequantize_rows(side, codes, meta)
    err = (xh - x.double()).abs()
    assert bool((err <= token_error_bound(side, x.double())).all())


@given(seed=st.integers(0, 2**31 - 1), kind=st.sampled_from(["int8c", "int4c", "int2c"]))
def test_reference_channel_quantizer_within_bounds(seed, kind):
    side = parse_format(kind).k
    x = heavy_tailed((2, 16, 64), gen_from(seed))
    codes, meta = quantize_block_per_channel(side, x)
    xh = dequantize_block_per_channel(side, codes, meta)
    assert bool(((xh - x.double()).abs() <= channel_error_bound(side, x.double())).all())
