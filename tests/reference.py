"""Pure-PyTorch reference of kvcomp's storage format and ops.

Written from docs/format.md (layout version 1) and CONTRACT.md alone: it does
not call any kvcomp op, nor ``KVFormat.layout``/``KVFormat.tile_bytes``. The
test-suite compares the extension against it.

* Format parsing, section layout and the tile-size table (``RefFormat``).
* Quantizers: the formulas of docs/format.md evaluated in fp32 (scales are
  stored as fp32, so the quantizer emulates that arithmetic step by step);
  they produce exactly the bytes the docs specify (``ref_quantize_write``,
  ``ref_seal_blocks``).
* Decoder of raw pool bytes to float64 (``ref_decode_pool``, ``ref_gather``).
* float64 attention, merge, score accumulation, top-k and compaction.
* The contract's error bounds (``token_error_bound``, ``channel_error_bound``).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

BLOCK_SIZES = (16, 32, 64, 128)
MAX_HEAD_DIM = 512
U32 = 2.0 ** -24  # unit roundoff of fp32 (half an ulp at 1.0)

_KIND_BITS = {
    "fp32": 32, "fp16": 16, "bf16": 16, "fp8_e4m3": 8, "fp8_e5m2": 8, "int8": 8,
    "int4": 4, "int2": 2, "int8c": 8, "int4c": 4, "int2c": 2,
}
_ALIASES = {"kivi2": "int2c/int2", "kivi4": "int4c/int4"}
_GROUPED = ("int4", "int2")
_PER_CHANNEL = ("int8c", "int4c", "int2c")
_SYMMETRIC = ("fp8_e4m3", "fp8_e5m2", "int8")
_DEFAULT_GROUP = 32


# ----------------------------------------------------------------- parsing
@dataclass(frozen=True)
class RefSide:
    kind: str
    group: int = 0  # channels per (scale, zero) pair of int4/int2, else 0

    @property
    def bits(self) -> int:
        return _KIND_BITS[self.kind]

    @property
    def raw(self) -> bool:
        return self.kind in ("fp32", "fp16", "bf16")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype holding a raw kind's values exactly."""
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.kind]

    @property
    def fp8(self) -> bool:
        return self.kind in ("fp8_e4m3", "fp8_e5m2")

    @property
    def symmetric(self) -> bool:
        return self.kind in _SYMMETRIC

    @property
    def grouped(self) -> bool:
        return self.kind in _GROUPED

    @property
    def per_channel(self) -> bool:
        return self.kind in _PER_CHANNEL

    @property
    def asymmetric(self) -> bool:
        return self.grouped or self.per_channel

    @property
    def levels(self) -> int:
        """L = 2^bits - 1 of the asymmetric kinds."""
        return (1 << self.bits) - 1

    @property
    def name(self) -> str:
        if self.grouped and self.group != _DEFAULT_GROUP:
            return f"{self.kind}:g{self.group}"
        return self.kind

    def head_dim_ok(self, head_dim: int) -> bool:
        if self.bits < 8 and head_dim % 32:
            return False
        if self.grouped and head_dim % self.group:
            return False
        return True


def _parse_side(text: str) -> RefSide:
    text = text.strip()
    if text == "fp8":
        text = "fp8_e4m3"
    base, _, group = text.partition(":")
    if base not in _KIND_BITS:
        raise ValueError(f"unknown format side {text!r}")
    if base not in _GROUPED:
        if group:
            raise ValueError(f"{base} takes no group size")
        return RefSide(base, 0)
    if not group:
        return RefSide(base, _DEFAULT_GROUP)
    sizes = {"g32": 32, "g64": 64, "g128": 128}
    if group not in sizes:
        raise ValueError(f"bad group {group!r}")
    return RefSide(base, sizes[group])


@dataclass(frozen=True)
class Section:
    offset: int
    row_bytes: int
    data_bytes: int
    meta_offset: int
    meta_bytes: int
    end: int


def _align16(x: int) -> int:
    return (x + 15) // 16 * 16


def make_section(side: RefSide, head_dim: int, block_size: int, offset: int) -> Section:
    row = head_dim * side.bits // 8
    data = _align16(block_size * row)
    if side.symmetric:
        meta = block_size * 4
    elif side.grouped:
        meta = block_size * (head_dim // side.group) * 8
    elif side.per_channel:
        meta = head_dim * 8
    else:
        meta = 0
    return Section(offset, row, data, offset + data, meta, offset + _align16(data + meta))


@dataclass(frozen=True)
class RefFormat:
    name: str
    k: RefSide
    v: RefSide

    @property
    def per_channel(self) -> bool:
        return self.k.per_channel or self.v.per_channel

    def sides(self):
        return (self.k, self.v)

    def head_dim_ok(self, head_dim: int) -> bool:
        return (0 < head_dim <= MAX_HEAD_DIM and head_dim % 16 == 0
                and self.k.head_dim_ok(head_dim) and self.v.head_dim_ok(head_dim))

    def sections(self, head_dim: int, block_size: int) -> tuple[Section, Section]:
        ks = make_section(self.k, head_dim, block_size, 0)
        vs = make_section(self.v, head_dim, block_size, ks.end)
        return ks, vs

    def natural_bytes(self, head_dim: int, block_size: int) -> int:
        return self.sections(head_dim, block_size)[1].end

    def tile_bytes(self, head_dim: int, block_size: int) -> int:
        table = _tile_table(self.name)
        if (head_dim, block_size) not in table[0]:
            raise ValueError(f"{self.name}: no tile for head_dim {head_dim}, block_size {block_size}")
        return table[0][(head_dim, block_size)]

    def geometry(self, tile_bytes: int) -> tuple[int, int]:
        geo = _tile_table(self.name)[1]
        if tile_bytes not in geo:
            raise ValueError(f"{self.name}: no geometry has tile_bytes {tile_bytes}")
        return geo[tile_bytes]

    def all_geometries(self):
        return sorted(_tile_table(self.name)[0].items())


@functools.lru_cache(maxsize=None)
def parse_format(spec: str) -> RefFormat:
    s = spec.strip()
    s = _ALIASES.get(s, s)
    if s.count("/") > 1:
        raise ValueError(f"bad spec {spec!r}")
    if "/" in s:
        a, b = s.split("/")
        k, v = _parse_side(a), _parse_side(b)
    else:
        k = v = _parse_side(s)
    name = k.name if k == v else f"{k.name}/{v.name}"
    return RefFormat(name, k, v)


@functools.lru_cache(maxsize=None)
def _tile_table(name: str):
    """The docs' table: head_dim 128, 64, 256, then the other multiples of 16
    up to 512; block sizes ascending; a taken size grows by block_size."""
    fmt = parse_format(name)
    dims = [128, 64, 256] + [d for d in range(16, MAX_HEAD_DIM + 1, 16) if d not in (128, 64, 256)]
    size, geo = {}, {}
    for d in dims:
        if not fmt.head_dim_ok(d):
            continue
        for bs in BLOCK_SIZES:
            b = fmt.natural_bytes(d, bs)
            while b in geo:
                b += bs
            size[(d, bs)] = b
            geo[b] = (d, bs)
    return size, geo


# -------------------------------------------------------------- fp8 tables
def _e4m3_positive() -> torch.Tensor:
    vals = []
    for c in range(0x7F):  # 0x7f is NaN
        e, m = c >> 3, c & 7
        vals.append(m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return torch.tensor(vals, dtype=torch.float64)


def _e5m2_positive() -> torch.Tensor:
    vals = []
    for c in range(0x7C):  # 0x7c is inf
        e, m = c >> 2, c & 3
        vals.append(m * 2.0 ** -16 if e == 0 else (1 + m / 4) * 2.0 ** (e - 15))
    return torch.tensor(vals, dtype=torch.float64)


FP8_TABLE = {"fp8_e4m3": _e4m3_positive(), "fp8_e5m2": _e5m2_positive()}
FP8_MAX = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}
# smallest normal magnitude, and half the subnormal step (absolute error there)
FP8_MIN_NORMAL = {"fp8_e4m3": 2.0 ** -6, "fp8_e5m2": 2.0 ** -14}
FP8_HALF_SUB_STEP = {"fp8_e4m3": 2.0 ** -10, "fp8_e5m2": 2.0 ** -17}
FP8_REL = {"fp8_e4m3": 2.0 ** -4, "fp8_e5m2": 2.0 ** -3}


def _fp8_encode(kind: str, y: torch.Tensor) -> torch.Tensor:
    """fp32 y -> fp8 code (sign bit 0x80), round to nearest even, saturating."""
    table = FP8_TABLE[kind]
    a = y.abs().to(torch.float64).clamp(max=FP8_MAX[kind])
    hi = torch.searchsorted(table, a).clamp(max=len(table) - 1)  # table[hi] >= a
    lo = (hi - 1).clamp(min=0)
    dlo, dhi = a - table[lo], table[hi] - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    code = torch.where(pick_hi, hi, lo)
    return code | (torch.signbit(y).to(torch.int64) << 7)


def _fp8_decode(kind: str, code: torch.Tensor) -> torch.Tensor:
    table = FP8_TABLE[kind]
    mag = code & 0x7F
    nan = mag >= len(table)
    val = table[mag.clamp(max=len(table) - 1)]
    val = torch.where(nan, torch.full_like(val, math.nan if kind == "fp8_e4m3" else math.inf), val)
    if kind == "fp8_e5m2":  # 0x7d..0x7f are NaN, 0x7c inf
        val = torch.where(mag > 0x7C, torch.full_like(val, math.nan), val)
    return torch.where((code & 0x80) != 0, -val, val)


# --------------------------------------------------------------- quantizers
def _f32(x) -> torch.Tensor:
    return x.to(torch.float32)


def quantize_rows(side: RefSide, x: torch.Tensor):
    """Per-token quantization of rows x [..., head_dim] (any float dtype,
    converted to fp32 as the kernels see it). Returns (codes int64 [..., hd],
    meta float32 [..., m]): m = 0 (raw), 1 (scale: fp8/int8) or
    2*head_dim/G interleaved (scale, zero) pairs (int4/int2)."""
    assert not side.per_channel
    x = _f32(x)
    hd = x.shape[-1]
    if side.kind == "fp32":
        return x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF, x.new_zeros(x.shape[:-1] + (0,))
    if side.raw:
        dt = torch.float16 if side.kind == "fp16" else torch.bfloat16
        codes = x.to(dt).view(torch.int16).to(torch.int64) & 0xFFFF
        return codes, x.new_zeros(x.shape[:-1] + (0,))
    if side.symmetric:
        top = FP8_MAX.get(side.kind, 127.0)
        absmax = x.abs().amax(dim=-1, keepdim=True)
        scale = absmax / top  # fp32 division
        y = torch.where(scale > 0, x / scale, torch.zeros_like(x))
        if side.fp8:
            codes = _fp8_encode(side.kind, y)
        else:
            codes = torch.round(y).clamp(-127, 127).to(torch.int64) & 0xFF
        return codes, scale
    # grouped asymmetric
    G, L = side.group, float(side.levels)
    xg = x.reshape(x.shape[:-1] + (hd // G, G))
    lo = xg.amin(dim=-1, keepdim=True)
    hi = xg.amax(dim=-1, keepdim=True)
    scale = hi / L - lo / L  # each step in fp32, as the docs write it
    y = torch.where(scale > 0, (xg - lo) / scale, torch.zeros_like(xg))
    codes = torch.round(y).clamp(0, L).to(torch.int64).reshape(x.shape)
    meta = torch.cat([scale, lo], dim=-1).reshape(x.shape[:-1] + (2 * (hd // G),))
    return codes, meta


def quantize_block_per_channel(side: RefSide, x: torch.Tensor):
    """Per-channel quantization of one block x [..., n, head_dim] (n >= 1).
    Returns (codes int64 [..., n, hd], meta float32 [..., 2*hd] = scale[hd], zero[hd])."""
    assert side.per_channel
    x = _f32(x)
    L = float(side.levels)
    lo = x.amin(dim=-2, keepdim=True)
    hi = x.amax(dim=-2, keepdim=True)
    scale = hi / L - lo / L
    y = torch.where(scale > 0, (x - lo) / scale, torch.zeros_like(x))
    codes = torch.round(y).clamp(0, L).to(torch.int64)
    meta = torch.cat([scale.squeeze(-2), lo.squeeze(-2)], dim=-1)
    return codes, meta


def code_values(side: RefSide, codes: torch.Tensor) -> torch.Tensor:
    """A code as a float64 number before scaling."""
    if side.kind == "fp32":
        c = codes & 0xFFFFFFFF
        c = torch.where(c >= 2**31, c - 2**32, c)
        return c.to(torch.int32).view(torch.float32).to(torch.float64)
    if side.kind == "fp16":
        return _u16_to(codes, torch.float16)
    if side.kind == "bf16":
        return _u16_to(codes, torch.bfloat16)
    if side.fp8:
        return _fp8_decode(side.kind, codes)
    if side.kind == "int8":
        return (((codes & 0xFF) ^ 0x80) - 0x80).to(torch.float64)
    return codes.to(torch.float64)


def _u16_to(codes: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    c = codes & 0xFFFF
    c = torch.where(c >= 0x8000, c - 0x10000, c)  # as signed 16-bit
    return c.to(torch.int16).view(dt).to(torch.float64)


def dequantize_rows(side: RefSide, codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """float64 values of per-token codes [..., hd] with their meta [..., m]."""
    v = code_values(side, codes)
    if side.raw:
        return v
    meta = meta.to(torch.float64)
    if side.symmetric:
        return v * meta
    hd, G = codes.shape[-1], side.group
    pairs = meta.reshape(meta.shape[:-1] + (hd // G, 2))
    scale = pairs[..., 0].repeat_interleave(G, dim=-1)
    zero = pairs[..., 1].repeat_interleave(G, dim=-1)
    return v * scale + zero


def dequantize_block_per_channel(side: RefSide, codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """codes [..., n, hd], meta [..., 2*hd] -> float64 [..., n, hd]."""
    hd = codes.shape[-1]
    meta = meta.to(torch.float64)
    scale, zero = meta[..., :hd].unsqueeze(-2), meta[..., hd:].unsqueeze(-2)
    return code_values(side, codes) * scale + zero


# ------------------------------------------------------------------ packing
def pack_codes(side: RefSide, codes: torch.Tensor) -> torch.Tensor:
    """codes [..., hd] -> uint8 [..., row_bytes] (docs: 'Packing of sub-byte codes')."""
    b, hd = side.bits, codes.shape[-1]
    if b >= 16:  # little-endian bytes
        parts = [(codes >> (8 * i)) & 0xFF for i in range(b // 8)]
        return torch.stack(parts, dim=-1).reshape(codes.shape[:-1] + (b // 8 * hd,)).to(torch.uint8)
    if b == 8:
        return (codes & 0xFF).to(torch.uint8)
    cb = 4 * b  # bytes a chunk of 32 channels
    c = codes.reshape(codes.shape[:-1] + (hd // 32, 8 // b, cb))  # channel i = s*cb + byte
    out = torch.zeros(c.shape[:-2] + (cb,), dtype=torch.int64)
    for s in range(8 // b):
        out |= (c[..., s, :] & ((1 << b) - 1)) << (b * s)
    return out.reshape(codes.shape[:-1] + (hd * b // 8,)).to(torch.uint8)


def unpack_codes(side: RefSide, rows: torch.Tensor, head_dim: int) -> torch.Tensor:
    """uint8 [..., row_bytes] -> codes int64 [..., hd]."""
    b = side.bits
    r = rows.to(torch.int64)
    if b >= 16:
        r = r.reshape(r.shape[:-1] + (head_dim, b // 8))
        return sum(r[..., i] << (8 * i) for i in range(b // 8))
    if b == 8:
        return r
    cb = 4 * b
    r = r.reshape(r.shape[:-1] + (head_dim // 32, cb))
    parts = [(r >> (b * s)) & ((1 << b) - 1) for s in range(8 // b)]
    return torch.stack(parts, dim=-2).reshape(rows.shape[:-1] + (head_dim,))


def _f32_bytes(meta: torch.Tensor) -> torch.Tensor:
    m = meta.to(torch.float32).contiguous()
    return m.view(torch.uint8).reshape(m.shape[:-1] + (m.shape[-1] * 4,))


def _bytes_f32(raw: torch.Tensor) -> torch.Tensor:
    r = raw.contiguous()
    return r.view(torch.float32).reshape(r.shape[:-1] + (r.shape[-1] // 4,))


# ------------------------------------------------------------ pool decoding
def geometry_of(pool: torch.Tensor, spec) -> tuple[RefFormat, int, int]:
    fmt = parse_format(str(spec))
    hd, bs = fmt.geometry(int(pool.shape[2]))
    return fmt, hd, bs


def ref_decode_pool(pool: torch.Tensor, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Every token of every tile: float64 K, V [num_blocks, num_kv_heads, block_size, hd]."""
    fmt, hd, bs = geometry_of(pool, spec)
    pool = pool.cpu()
    out = []
    for side, sec in zip(fmt.sides(), fmt.sections(hd, bs)):
        rows = pool[:, :, sec.offset: sec.offset + bs * sec.row_bytes]
        rows = rows.reshape(pool.shape[0], pool.shape[1], bs, sec.row_bytes)
        codes = unpack_codes(side, rows, hd)
        meta = _bytes_f32(pool[:, :, sec.meta_offset: sec.meta_offset + sec.meta_bytes])
        if side.per_channel:
            out.append(dequantize_block_per_channel(side, codes, meta))
        else:
            meta = meta.reshape(pool.shape[0], pool.shape[1], bs, -1)
            out.append(dequantize_rows(side, codes, meta))
    return out[0], out[1]


def ref_gather(pool: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
               spec) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense float64 K, V [batch, num_kv_heads, max_len, hd], zero past seq_len,
    read straight from the pool bytes."""
    fmt, hd, bs = geometry_of(pool, spec)
    Kt, Vt = ref_decode_pool(pool, spec)
    bt, sl = block_tables.cpu().long(), seq_lens.cpu().long()
    B, H = bt.shape[0], pool.shape[1]
    max_len = int(sl.max()) if B else 0
    max_len = max(max_len, 0)
    K = torch.zeros(B, H, max_len, hd, dtype=torch.float64)
    V = torch.zeros_like(K)
    for b in range(B):
        n = int(sl[b])
        if n <= 0:
            continue
        pos = torch.arange(n)
        blk = bt[b, pos // bs]
        assert bool((blk >= 0).all() and (blk < pool.shape[0]).all()), "bad block id in reference"
        K[b, :, :n] = Kt[blk, :, pos % bs].permute(1, 0, 2)
        V[b, :, :n] = Vt[blk, :, pos % bs].permute(1, 0, 2)
    return K, V


# ------------------------------------------------------------ pool encoding
def _write_rows(pool, side, sec, blocks, offsets, codes, meta):
    """Writes per-token codes/meta of tokens (blocks[i], offsets[i]) for all heads.
    codes [n, H, hd], meta [n, H, m]."""
    rb = sec.row_bytes
    packed = pack_codes(side, codes)  # [n, H, rb]
    mb = _f32_bytes(meta) if meta.shape[-1] else None
    m = meta.shape[-1]
    for i in range(len(blocks)):
        blk, t = int(blocks[i]), int(offsets[i])
        pool[blk, :, sec.offset + t * rb: sec.offset + (t + 1) * rb] = packed[i]
        if mb is not None:
            pool[blk, :, sec.meta_offset + t * m * 4: sec.meta_offset + (t + 1) * m * 4] = mb[i]


def ref_quantize_write(pool: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       slot_mapping: torch.Tensor, spec) -> torch.Tensor:
    """What quantize_write must leave in the pool: a new pool tensor."""
    fmt, hd, bs = geometry_of(pool, spec)
    assert not fmt.per_channel
    pool = pool.clone()
    slots = slot_mapping.long()
    keep = slots >= 0
    idx = torch.nonzero(keep).flatten()
    if len(idx) == 0:
        return pool
    s = slots[idx]
    for side, sec, x in zip(fmt.sides(), fmt.sections(hd, bs), (key, value)):
        codes, meta = quantize_rows(side, x[idx])
        _write_rows(pool, side, sec, s // bs, s % bs, codes, meta)
    return pool


def encode_block(side: RefSide, x: torch.Tensor):
    """Bytes of one section for a whole block x [H, n, hd] (n <= bs tokens):
    returns (codes [H, n, hd], meta [H, n, m] or [H, 2*hd])."""
    if side.per_channel:
        return quantize_block_per_channel(side, x)
    return quantize_rows(side, x)


def ref_seal_blocks(hot_pool, src_blocks, cold_pool, dst_blocks, hot_spec, cold_spec) -> torch.Tensor:
    """What seal_blocks must leave in the cold pool: a new pool tensor."""
    hfmt, hd, bs = geometry_of(hot_pool, hot_spec)
    cfmt = parse_format(str(cold_spec))
    assert cfmt.tile_bytes(hd, bs) == cold_pool.shape[2]
    Kh, Vh = ref_decode_pool(hot_pool, hot_spec)
    cold = cold_pool.clone()
    for i in range(len(src_blocks)):
        sb, db = int(src_blocks[i]), int(dst_blocks[i])
        for side, sec, X in zip(cfmt.sides(), cfmt.sections(hd, bs), (Kh, Vh)):
            x = X[sb].to(torch.float32)  # [H, bs, hd], exact (fp16/bf16 values)
            codes, meta = encode_block(side, x)
            cold[db, :, sec.offset: sec.offset + sec.data_bytes] = 0
            cold[db, :, sec.offset: sec.offset + bs * sec.row_bytes] = \
                pack_codes(side, codes).reshape(x.shape[0], -1)
            if sec.meta_bytes:
                mbytes = _f32_bytes(meta.reshape(x.shape[0], -1))
                cold[db, :, sec.meta_offset: sec.meta_offset + mbytes.shape[-1]] = mbytes
    return cold


# ------------------------------------------------------------- error bounds
def token_error_bound(side: RefSide, x: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |x_hat - x| for per-token kinds, x [..., hd] float64
    (the values as the kernel sees them: fp32). Contract bound plus the slack
    of fp32 arithmetic (stored fp32 scale, code computation, final fma):
      int8:      absmax/127/2          + 8u*absmax
      int4/int2: (max-min)/(2^b-1)/2   + 16u*max(|max|, |min|)  (per group)
      fp8:       rel*|x| (normal), half subnormal step*scale   + 8u*(|x| + scale)
    with u = 2^-24 (each rounding contributes at most ~u times the
    magnitude involved: ~3 for int8, ~9 for the asymmetric kinds)."""
    x = x.to(torch.float64)
    hd = x.shape[-1]
    if side.raw:
        return torch.zeros_like(x)
    if side.kind == "int8":
        absmax = x.abs().amax(dim=-1, keepdim=True)
        return (absmax / 127 / 2 + 8 * U32 * absmax).expand_as(x)
    if side.fp8:
        absmax = x.abs().amax(dim=-1, keepdim=True)
        scale = absmax / FP8_MAX[side.kind]
        b = torch.maximum(FP8_REL[side.kind] * x.abs(), FP8_HALF_SUB_STEP[side.kind] * scale)
        return b + 8 * U32 * (x.abs() + scale)
    G = side.group
    xg = x.reshape(x.shape[:-1] + (hd // G, G))
    lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    mag = torch.maximum(lo.abs(), hi.abs())
    b = (hi - lo) / side.levels / 2 + 16 * U32 * mag
    return b.expand_as(xg).reshape(x.shape)


def channel_error_bound(side: RefSide, x: torch.Tensor) -> torch.Tensor:
    """Per-element bound for per-channel kinds over a block x [..., n, hd]."""
    x = x.to(torch.float64)
    lo, hi = x.amin(-2, keepdim=True), x.amax(-2, keepdim=True)
    mag = torch.maximum(lo.abs(), hi.abs())
    return ((hi - lo) / side.levels / 2 + 16 * U32 * mag).expand_as(x)


# ------------------------------------------------------------------- ops
def ref_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, seq_lens: torch.Tensor,
                  scale: float):
    """float64 decode attention. q [B, Hq, D]; K, V [B, Hkv, L, D]. Query head h
    uses KV head h // (Hq / Hkv). Returns out [B, Hq, D], lse [B, Hq] (-inf,
    out 0 for seq_len 0) and logits [B, Hq, L] (scale*q.k; -inf past seq_len)."""
    q, K, V = q.double(), K.double(), V.double()
    B, Hq, D = q.shape
    Hkv, L = K.shape[1], K.shape[2]
    assert Hq % Hkv == 0
    G = Hq // Hkv
    Kq = K.repeat_interleave(G, dim=1)
    Vq = V.repeat_interleave(G, dim=1)
    logits = scale * torch.einsum("bhd,bhld->bhl", q, Kq)
    mask = torch.arange(L)[None, :] < seq_lens.cpu().long()[:, None]  # [B, L]
    logits = logits.masked_fill(~mask[:, None, :], -math.inf)
    lse = torch.logsumexp(logits, dim=-1) if L else torch.full((B, Hq), -math.inf, dtype=torch.float64)
    p = torch.exp(logits - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    p = p.masked_fill(~mask[:, None, :], 0.0)
    out = torch.einsum("bhl,bhld->bhd", p, Vq)
    return out, lse, logits


def ref_merge(out_a, lse_a, out_b, lse_b):
    """float64 exact softmax merge; both sides -inf -> out 0, lse -inf."""
    oa, ob = out_a.double(), out_b.double()
    la, lb = lse_a.double(), lse_b.double()
    m = torch.maximum(la, lb)
    empty = m == -math.inf
    ms = torch.where(empty, torch.zeros_like(m), m)
    wa, wb = torch.exp(la - ms), torch.exp(lb - ms)
    s = wa + wb
    lse = torch.where(empty, m, ms + torch.log(torch.where(empty, torch.ones_like(s), s)))
    s = torch.where(empty, torch.ones_like(s), s)
    out = (wa / s)[..., None] * oa + (wb / s)[..., None] * ob
    out = torch.where(empty[..., None], torch.zeros_like(out), out)
    return out, lse


def ref_accumulate_scores(logits, lse, seq_lens, scores):
    """New scores (float64): scores[b, kvh, t] + sum over the group's query
    heads of exp(logits - lse), for t < seq_len; untouched elsewhere."""
    lg, ls, sc = logits.double(), lse.double(), scores.double().clone()
    B, Hq, _ = lg.shape
    Hkv = sc.shape[1]
    G = Hq // Hkv
    for b in range(B):
        n = int(seq_lens[b])
        for h in range(Hq):
            if ls[b, h] == -math.inf or n == 0:
                continue
            sc[b, h // G, :n] += torch.exp(lg[b, h, :n] - ls[b, h])
    return sc


def ref_topk(scores: torch.Tensor, seq_lens: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [B, H, k]: positions of the k largest among the first seq_len,
    ascending; ties to the lower position; -1 tail."""
    B, H, _ = scores.shape
    out = torch.full((B, H, k), -1, dtype=torch.int32)
    for b in range(B):
        n = int(seq_lens[b])
        for h in range(H):
            row = scores[b, h, :n].tolist()
            order = sorted(range(n), key=lambda i: (-row[i], i))[:k]
            order.sort()
            out[b, h, :len(order)] = torch.tensor(order, dtype=torch.int32)
    return out


def ref_compact_positions(keep: torch.Tensor) -> list[list[list[int]]]:
    """keep [B, H, k] -> for each (b, h) the source positions (ascending, -1
    dropped) that land at positions 0..n-1."""
    return [[[int(p) for p in keep[b, h] if int(p) >= 0] for h in range(keep.shape[1])]
            for b in range(keep.shape[0])]


def ref_compact(K: torch.Tensor, V: torch.Tensor, keep: torch.Tensor):
    """Dense semantics of compact: per (b, h) the kept rows of K/V [B, H, L, D],
    moved to the front. Returns lists Kc[b][h], Vc[b][h] of [n, D] tensors."""
    pos = ref_compact_positions(keep)
    Kc = [[K[b, h, pos[b][h]] for h in range(K.shape[1])] for b in range(K.shape[0])]
    Vc = [[V[b, h, pos[b][h]] for h in range(V.shape[1])] for b in range(V.shape[0])]
    return Kc, Vc
