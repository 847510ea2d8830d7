"""Pure-PyTorch reference of kvcomp's storage format and ops.

Written from docs/format.md (layout version 2) and CONTRACT.md alone: it does
not call any kvcomp op, nor ``KVFormat.layout``/``KVFormat.tile_bytes``. The
test-suite compares the extension against it.

* Format parsing (flags ``:gG``, ``:s``, ``:h``), section layout and the
  tile-size table (``RefFormat``).
* Quantizers: the formulas of docs/format.md evaluated in fp32 step by step,
  with the 16-bit metadata rounded as the docs say (scales up, zeros down),
  the Hadamard rotation of ``:h`` sides and NF's scale search; they produce
  exactly the bytes the docs specify (``ref_quantize_write``, ``ref_seal_blocks``).
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
HALF_MAX = 65504.0
H16 = 2.0 ** -10  # relative spacing of fp16 (one ulp at 1.0); subnormal step 2^-24

_KIND_BITS = {
    "fp32": 32, "fp16": 16, "bf16": 16, "fp8_e4m3": 8, "fp8_e5m2": 8, "int8": 8,
    "int4": 4, "int3": 3, "int2": 2, "nf4": 4, "nf3": 3, "nf2": 2, "int8c": 8, "int4c": 4, "int2c": 2,
}
_ALIASES = {"kivi2": "int2c/int2", "kivi4": "int4c/int4"}
_INTS = ("int4", "int3", "int2")        # asymmetric, or symmetric with ":s"
_NF = ("nf4", "nf3", "nf2")
_PER_CHANNEL = ("int8c", "int4c", "int2c")
_ABSMAX = ("fp8_e4m3", "fp8_e5m2", "int8")
_RAW = ("fp32", "fp16", "bf16")
_GROUPS = (32, 64, 128, 256, 512)
# docs/format.md: Lloyd-Max levels of N(0, 1), positive half, as fp32 constants
NF_MAGNITUDES = {
    2: [0.452780, 1.510418],
    3: [0.245094, 0.756005, 1.343909, 2.151946],
    4: [0.128395, 0.388048, 0.656759, 0.942340, 1.256231, 1.618046, 2.069017, 2.732590],
}
NF_SCALES = [0.8, 0.9, 1.0, 1.1]  # candidate multiples of a group's rms, as fp32
HADAMARD_SEED = 0x6B76636F


def nf_levels(bits: int) -> torch.Tensor:
    """fp32 levels by code: code c >= 2^(b-1) is +m[c - 2^(b-1)], else -m[2^(b-1) - 1 - c]."""
    m = torch.tensor(NF_MAGNITUDES[bits], dtype=torch.float32)
    return torch.cat([-m.flip(0), m])


# ----------------------------------------------------------------- parsing
@dataclass(frozen=True)
class RefSide:
    kind: str
    group: int = 0        # channels per scale of per-token quantized kinds; 0: the whole row
    sym: bool = False     # int4/int3/int2 ":s"
    rotated: bool = False  # ":h"

    @property
    def bits(self) -> int:
        return _KIND_BITS[self.kind]

    @property
    def raw(self) -> bool:
        return self.kind in _RAW

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype holding a raw kind's values exactly."""
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.kind]

    @property
    def fp8(self) -> bool:
        return self.kind in ("fp8_e4m3", "fp8_e5m2")

    @property
    def absmax(self) -> bool:
        return self.kind in _ABSMAX

    @property
    def symmetric(self) -> bool:
        """Scale only, no zero: fp8, int8, NF and int*:s."""
        return self.absmax or self.nf or self.sym

    @property
    def nf(self) -> bool:
        return self.kind in _NF

    @property
    def asym(self) -> bool:
        """Per-token asymmetric int4/int3/int2: a scale and a zero per group."""
        return self.kind in _INTS and not self.sym

    @property
    def per_channel(self) -> bool:
        return self.kind in _PER_CHANNEL

    @property
    def token_quant(self) -> bool:
        return not self.raw and not self.per_channel

    @property
    def halves(self) -> int:
        """16-bit metadata words per group: scale (and zero)."""
        return 2 if self.asym else 1

    @property
    def levels(self) -> int:
        """L = 2^bits - 1 of the integer kinds."""
        return (1 << self.bits) - 1

    def group_size(self, head_dim: int) -> int:
        return self.group or head_dim

    @property
    def name(self) -> str:
        s = self.kind
        if self.group != default_group(self.kind):
            s += f":g{self.group}"
        if self.sym:
            s += ":s"
        if self.rotated:
            s += ":h"
        return s

    def head_dim_ok(self, head_dim: int) -> bool:
        if self.bits < 8 and head_dim % 32:
            return False
        if self.group and head_dim % self.group:
            return False
        if self.rotated and head_dim & (head_dim - 1):
            return False
        return True


def default_group(kind: str) -> int:
    return 32 if kind in _INTS + _NF else 0


def _parse_side(text: str) -> RefSide:
    parts = text.strip().split(":")
    base = "fp8_e4m3" if parts[0] == "fp8" else parts[0]
    if base not in _KIND_BITS:
        raise ValueError(f"unknown format side {text!r}")
    group, sym, rotated = default_group(base), False, False
    seen = set()
    for flag in parts[1:]:
        key = "g" if flag.startswith("g") and len(flag) > 1 else flag
        if key in seen:
            raise ValueError(f"flag {flag!r} repeated")
        seen.add(key)
        if flag == "h":
            if base in _RAW + _PER_CHANNEL:
                raise ValueError(f"{base} takes no :h")
            rotated = True
        elif flag == "s":
            if base not in _INTS:
                raise ValueError(f"{base} takes no :s")
            sym = True
        elif key == "g":
            if base in _RAW + _PER_CHANNEL:
                raise ValueError(f"{base} takes no group size")
            if flag[1:] not in tuple(str(g) for g in _GROUPS):
                raise ValueError(f"bad group {flag!r}")
            group = int(flag[1:])
        else:
            raise ValueError(f"unknown flag {flag!r}")
    return RefSide(base, group, sym, rotated)


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
    if side.token_quant:
        meta = block_size * (head_dim // side.group_size(head_dim)) * side.halves * 2
    elif side.per_channel:
        meta = head_dim * 4
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
        """Both sections, padded to whole tokens' worth of bytes (a multiple of block_size)."""
        end = self.sections(head_dim, block_size)[1].end
        return -(-end // block_size) * block_size

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


# ------------------------------------------------------ 16-bit metadata
def _f32(x) -> torch.Tensor:
    return x.to(torch.float32)


def half_bits(h: torch.Tensor) -> torch.Tensor:
    """fp16 values -> their bits as int64."""
    return h.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF


def half_value(bits: torch.Tensor) -> torch.Tensor:
    """int64 half bits -> float32 values."""
    b = bits & 0xFFFF
    b = torch.where(b >= 0x8000, b - 0x10000, b)
    return b.to(torch.int16).view(torch.float16).to(torch.float32)


def half_up(x: torch.Tensor) -> torch.Tensor:
    """Bits of the smallest half >= x (fp32 x, |x| <= 65504)."""
    h = x.to(torch.float16)
    inf = torch.full_like(h, math.inf)
    h = torch.where(h.to(torch.float32) < x, torch.nextafter(h, inf), h)
    return half_bits(h)


def half_down(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    h = torch.where(h.to(torch.float32) > x, torch.nextafter(h, torch.full_like(h, -math.inf)), h)
    return half_bits(h)


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fma(a, b, c), through float64 (a * b is exact there)."""
    return (a.double() * b.double() + c.double()).to(torch.float32)


def _octet_tree(s: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim (octet sums) pairwise, neighbours first, in fp32."""
    s = s.clone()
    n, w = s.shape[-1], 1
    while w < n:
        idx = torch.arange(0, n - w, 2 * w)
        s[..., idx] = s[..., idx] + s[..., idx + w]
        w *= 2
    return s[..., 0]


# ------------------------------------------------------------ rotation
def hadamard_signs(n: int) -> torch.Tensor:
    """docs: sign(i) = -1 iff the murmur3 finalizer of i * 0x9e3779b1 + seed is odd."""
    out = []
    M = 0xFFFFFFFF
    for i in range(n):
        h = (i * 0x9E3779B1 + HADAMARD_SEED) & M
        h ^= h >> 16
        h = (h * 0x85EBCA6B) & M
        h ^= h >> 13
        h = (h * 0xC2B2AE35) & M
        h ^= h >> 16
        out.append(-1.0 if h & 1 else 1.0)
    return torch.tensor(out)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard along the last dim, stage w = 1, 2, 4, ...:
    (x[j], x[j + w]) -> (a + b, a - b), in x's dtype."""
    n, w = x.shape[-1], 1
    y = x.clone()
    while w < n:
        v = y.reshape(y.shape[:-1] + (n // (2 * w), 2, w))
        a, b = v[..., 0, :], v[..., 1, :]
        y = torch.stack([a + b, a - b], dim=-2).reshape(x.shape)
        w *= 2
    return y


def _norm32(n: int) -> torch.Tensor:
    return torch.tensor(1.0, dtype=torch.float32) / torch.sqrt(torch.tensor(float(n), dtype=torch.float32))


def rotate32(x: torch.Tensor) -> torch.Tensor:
    """The kernels' fp32 rotation R x = H D x / sqrt(n) of rows x [..., n]."""
    n = x.shape[-1]
    return _fwht(_f32(x) * hadamard_signs(n).to(torch.float32)) * _norm32(n)


def rotation_matrix(n: int) -> torch.Tensor:
    """float64 R = H D / sqrt(n): rotate64(x) = x @ R.T."""
    return _fwht(torch.eye(n, dtype=torch.float64)).T * hadamard_signs(n).double() / math.sqrt(n)


def unrotate64(y: torch.Tensor) -> torch.Tensor:
    """R^T y in float64."""
    n = y.shape[-1]
    return _fwht(y.double()) / math.sqrt(n) * hadamard_signs(n).double()


# --------------------------------------------------------------- quantizers
def _group_meta(side: RefSide, xg: torch.Tensor) -> torch.Tensor:
    """Half bits [..., groups, halves] of groups xg [..., groups, G] (fp32)."""
    if side.absmax:
        top = FP8_MAX.get(side.kind, 127.0)
        return half_up(xg.abs().amax(-1, keepdim=True) / top)
    if side.asym:
        lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
        z = half_down(lo)
        return torch.cat([half_up((hi - half_value(z)) / float(side.levels)), z], -1)
    if side.sym:
        i = xg.abs().argmax(-1, keepdim=True)  # the first of equal magnitudes
        d = xg.gather(-1, i) / -float(1 << (side.bits - 1))
        return half_up(d.abs()) | (torch.signbit(d).to(torch.int64) << 15)
    return _nf_meta(side, xg)


def _nf_codes(side: RefSide, y: torch.Tensor) -> torch.Tensor:
    lev = nf_levels(side.bits)
    mids = (lev[1:] + lev[:-1]) * 0.5  # fp32, as the kernels
    return (y[..., None] >= mids).sum(-1)


def _nf_meta(side: RefSide, xg: torch.Tensor) -> torch.Tensor:
    """docs: rms of the group, then the candidate f * rms (rounded up to a
    half) whose codes leave the smallest squared error, the first on ties."""
    G = xg.shape[-1]
    oct_ = xg.reshape(xg.shape[:-1] + (G // 8, 8))
    acc = torch.zeros(oct_.shape[:-1], dtype=torch.float32)
    for e in range(8):
        acc = _fma32(oct_[..., e], oct_[..., e], acc)
    rms = torch.sqrt(_octet_tree(acc) / float(G))[..., None]
    lev = nf_levels(side.bits)
    best_err = torch.full(rms.shape, math.inf, dtype=torch.float32)
    best = torch.zeros(rms.shape, dtype=torch.int64)
    for f in NF_SCALES:
        h = half_up(torch.clamp(rms * torch.tensor(f, dtype=torch.float32), max=HALF_MAX))
        sc = half_value(h)
        safe = torch.where(sc == 0, torch.ones_like(sc), sc)
        codes = _nf_codes(side, (oct_ / safe[..., None]))
        acc = torch.zeros(oct_.shape[:-1], dtype=torch.float32)
        for e in range(8):
            d = _fma32(-sc.expand_as(acc), lev[codes[..., e]], oct_[..., e])
            acc = _fma32(d, d, acc)
        err = _octet_tree(acc)[..., None]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, h, best)
        best = torch.where(sc == 0, torch.zeros_like(best), best)  # an all-zero group
        best_err = torch.where(sc == 0, torch.full_like(best_err, -1.0), best_err)
    return best


def _params(side: RefSide, meta: torch.Tensor):
    """fp32 (scale, zero) of half meta [..., halves]."""
    s = half_value(meta[..., 0:1])
    if side.asym or side.per_channel:
        return s, half_value(meta[..., 1:2])
    if side.sym:
        return s, -float(1 << (side.bits - 1)) * s
    return s, torch.zeros_like(s)


def _codes(side: RefSide, xg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    if side.kind == "int8":
        y = torch.where(scale > 0, xg / scale, torch.zeros_like(xg))
        return torch.round(y).clamp(-127, 127).to(torch.int64) & 0xFF
    if side.fp8:
        return _fp8_encode(side.kind, torch.where(scale > 0, xg / scale, torch.zeros_like(xg)))
    if side.nf:
        return _nf_codes(side, torch.where(scale > 0, xg / torch.where(scale > 0, scale, 1.0),
                                           torch.zeros_like(xg)))
    y = torch.where(scale != 0, (xg - zero) / scale, torch.zeros_like(xg))
    return torch.round(y).clamp(0, side.levels).to(torch.int64)


def stored_values(side: RefSide, x: torch.Tensor) -> torch.Tensor:
    """What a side quantizes: x in fp32, rotated for ':h'."""
    return rotate32(x) if side.rotated else _f32(x)


def quantize_rows(side: RefSide, x: torch.Tensor):
    """Per-token quantization of rows x [..., head_dim] (any float dtype,
    converted to fp32 as the kernels see it). Returns (codes int64 [..., hd],
    meta int64 half bits [..., groups * halves])."""
    assert not side.per_channel
    x = _f32(x)
    hd = x.shape[-1]
    if side.kind == "fp32":
        return x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF, torch.zeros(x.shape[:-1] + (0,), dtype=torch.int64)
    if side.raw:
        dt = torch.float16 if side.kind == "fp16" else torch.bfloat16
        codes = x.to(dt).view(torch.int16).to(torch.int64) & 0xFFFF
        return codes, torch.zeros(x.shape[:-1] + (0,), dtype=torch.int64)
    y = stored_values(side, x)
    G = side.group_size(hd)
    yg = y.reshape(y.shape[:-1] + (hd // G, G))
    meta = _group_meta(side, yg)
    scale, zero = _params(side, meta)
    codes = _codes(side, yg, scale, zero).reshape(x.shape)
    return codes, meta.reshape(x.shape[:-1] + (-1,))


def quantize_block_per_channel(side: RefSide, x: torch.Tensor):
    """Per-channel quantization of one block x [..., n, head_dim] (n >= 1).
    Returns (codes int64 [..., n, hd], meta half bits [..., 2*hd] = scale[hd], zero[hd])."""
    assert side.per_channel
    x = _f32(x)
    lo = x.amin(dim=-2, keepdim=True)
    hi = x.amax(dim=-2, keepdim=True)
    z = half_down(lo)
    sc = half_up((hi - half_value(z)) / float(side.levels))
    scale, zero = half_value(sc), half_value(z)
    y = torch.where(scale != 0, (x - zero) / scale, torch.zeros_like(x))
    codes = torch.round(y).clamp(0, side.levels).to(torch.int64)
    meta = torch.cat([sc.squeeze(-2), z.squeeze(-2)], dim=-1)
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
    if side.nf:
        return nf_levels(side.bits).double()[codes]
    return codes.to(torch.float64)


def _u16_to(codes: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    c = codes & 0xFFFF
    c = torch.where(c >= 0x8000, c - 0x10000, c)  # as signed 16-bit
    return c.to(torch.int16).view(dt).to(torch.float64)


def dequantize_rows(side: RefSide, codes: torch.Tensor, meta: torch.Tensor, rotated_space: bool = False
                    ) -> torch.Tensor:
    """float64 values of per-token codes [..., hd] with their meta [..., m]:
    true values (turned back for ':h'), or the stored ones (rotated_space)."""
    v = code_values(side, codes)
    if side.raw:
        return v
    hd = codes.shape[-1]
    G = side.group_size(hd)
    m = meta.reshape(meta.shape[:-1] + (hd // G, side.halves))
    scale, zero = (t.double().repeat_interleave(G, dim=-1).reshape(codes.shape) for t in _params(side, m))
    y = v * scale + zero
    return unrotate64(y) if side.rotated and not rotated_space else y


def dequantize_block_per_channel(side: RefSide, codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """codes [..., n, hd], meta half bits [..., 2*hd] -> float64 [..., n, hd]."""
    hd = codes.shape[-1]
    scale = half_value(meta[..., :hd]).double().unsqueeze(-2)
    zero = half_value(meta[..., hd:]).double().unsqueeze(-2)
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
    if b == 3:  # low two bits as int2, then bit 2 of channels 8j..8j+7 in byte 8 + j
        low = pack_codes(RefSide("int2"), codes & 3).reshape(codes.shape[:-1] + (hd // 32, 8))
        bit = ((codes >> 2) & 1).reshape(codes.shape[:-1] + (hd // 32, 4, 8))
        high = (bit << torch.arange(8)).sum(-1)
        return torch.cat([low.to(torch.int64), high], -1).reshape(codes.shape[:-1] + (hd * 3 // 8,)).to(torch.uint8)
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
    if b == 3:
        r = r.reshape(r.shape[:-1] + (head_dim // 32, 12))
        low = unpack_codes(RefSide("int2"), r[..., :8].reshape(r.shape[:-2] + (head_dim // 4,)), head_dim)
        high = (r[..., 8:, None] >> torch.arange(8)) & 1  # [.., chunks, 4, 8]
        return low | (high.reshape(low.shape) << 2)
    cb = 4 * b
    r = r.reshape(r.shape[:-1] + (head_dim // 32, cb))
    parts = [(r >> (b * s)) & ((1 << b) - 1) for s in range(8 // b)]
    return torch.stack(parts, dim=-2).reshape(rows.shape[:-1] + (head_dim,))


def _half_bytes(meta: torch.Tensor) -> torch.Tensor:
    """int64 half bits [..., m] -> little-endian uint8 [..., 2m]."""
    m = meta & 0xFFFF
    return torch.stack([m & 0xFF, m >> 8], -1).reshape(m.shape[:-1] + (2 * m.shape[-1],)).to(torch.uint8)


def _bytes_half(raw: torch.Tensor) -> torch.Tensor:
    r = raw.to(torch.int64)
    r = r.reshape(r.shape[:-1] + (r.shape[-1] // 2, 2))
    return r[..., 0] | (r[..., 1] << 8)


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
        meta = _bytes_half(pool[:, :, sec.meta_offset: sec.meta_offset + sec.meta_bytes])
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
    mb = _half_bytes(meta) if meta.shape[-1] else None
    m = meta.shape[-1]
    for i in range(len(blocks)):
        blk, t = int(blocks[i]), int(offsets[i])
        pool[blk, :, sec.offset + t * rb: sec.offset + (t + 1) * rb] = packed[i]
        if mb is not None:
            pool[blk, :, sec.meta_offset + t * m * 2: sec.meta_offset + (t + 1) * m * 2] = mb[i]


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
                mbytes = _half_bytes(meta.reshape(x.shape[0], -1))
                cold[db, :, sec.meta_offset: sec.meta_offset + mbytes.shape[-1]] = mbytes
    return cold


# ------------------------------------------------------------- error bounds
def _half_scale(x: torch.Tensor) -> torch.Tensor:
    """An upper bound of x (>= 0) rounded up to a half."""
    return x * (1 + H16) + 2.0 ** -24


def _stored_bound(side: RefSide, x: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |y_hat - y| of the values a side quantizes, y
    [..., hd] float64: the contract bound with the stored scale rounded up
    to a half (and zeros down), plus the slack of fp32 arithmetic (u = 2^-24):
      int8:      scale/2, scale <= absmax/127 rounded up       + 8u*absmax
      fp8:       rel*|x| (normal), half subnormal step*scale   + 8u*(|x| + scale)
      int*:      scale/2, scale <= (max - zero)/(2^b-1) rounded up, zero <= min
      int*:s     one step (the side opposite the largest magnitude clips), scale
                 <= absmax/2^(b-1) rounded up
      nf*:       half the widest gap between levels times the largest candidate
                 scale, or |x| beyond the outer level at the smallest one."""
    hd = x.shape[-1]
    G = side.group_size(hd)
    xg = x.reshape(x.shape[:-1] + (hd // G, G))
    amax = xg.abs().amax(-1, keepdim=True)
    if side.kind == "int8":
        b = _half_scale(amax / 127) / 2 + 8 * U32 * amax
    elif side.fp8:
        scale = _half_scale(amax / FP8_MAX[side.kind])
        b = torch.maximum(FP8_REL[side.kind] * xg.abs(), FP8_HALF_SUB_STEP[side.kind] * scale)
        b = b + 8 * U32 * (xg.abs() + scale)
    elif side.asym:
        lo, hi = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
        zero = lo - torch.maximum(lo.abs() * H16, torch.full_like(lo, 2.0 ** -24))
        scale = _half_scale((hi - zero) / side.levels)
        b = scale / 2 + 16 * U32 * (amax + hi - zero)
    elif side.sym:
        scale = _half_scale(amax / (1 << (side.bits - 1)))
        b = scale + 16 * U32 * (amax + scale * (1 << side.bits))
    else:
        mag = torch.tensor(NF_MAGNITUDES[side.bits], dtype=torch.float64)
        half_gap = max((mag[1:] - mag[:-1]).max().item(), 2 * mag[0].item()) / 2
        rms = xg.pow(2).mean(-1, keepdim=True).sqrt()
        s_lo, s_hi = min(NF_SCALES) * rms, _half_scale(max(NF_SCALES) * rms)
        b = torch.maximum(s_hi * half_gap, xg.abs() - s_lo * mag[-1].item())
        b = b + 16 * U32 * (xg.abs() + s_hi * mag[-1].item())
    return b.expand_as(xg).reshape(x.shape)


def token_error_bound(side: RefSide, x: torch.Tensor) -> torch.Tensor:
    """Per-element bound on |x_hat - x| for per-token kinds, x [..., hd] float64
    (the values as the kernel sees them: fp32). For a rotated side the bounds
    hold in rotated space, so the true values' error is bounded by the L2 norm
    of the rotated bounds (the rotation is orthogonal), plus the fp32 rounding
    of the rotation and its inverse (log2(hd) butterfly stages each)."""
    x = x.to(torch.float64)
    hd = x.shape[-1]
    if side.raw:
        return torch.zeros_like(x)
    if not side.rotated:
        return _stored_bound(side, x)
    b = _stored_bound(side, x @ rotation_matrix(hd).T)
    slack = 4 * (math.log2(hd) + 1) * U32 * x.abs().sum(-1, keepdim=True) / math.sqrt(hd)
    return (b.pow(2).sum(-1, keepdim=True).sqrt() + slack).expand_as(x)


def channel_error_bound(side: RefSide, x: torch.Tensor) -> torch.Tensor:
    """Per-element bound for per-channel kinds over a block x [..., n, hd]."""
    x = x.to(torch.float64)
    lo, hi = x.amin(-2, keepdim=True), x.amax(-2, keepdim=True)
    mag = torch.maximum(lo.abs(), hi.abs())
    zero = lo - torch.maximum(lo.abs() * H16, torch.full_like(lo, 2.0 ** -24))
    scale = _half_scale((hi - zero) / side.levels)
    return (scale / 2 + 16 * U32 * (mag + hi - zero)).expand_as(x)


# ------------------------------------------------------------------- ops
def ref_attention(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, seq_lens: torch.Tensor,
                  scale: float, softcap: float = 0.0):
    """float64 decode attention. q [B, Hq, D]; K, V [B, Hkv, L, D]. Query head h
    uses KV head h // (Hq / Hkv). Returns out [B, Hq, D], lse [B, Hq] (-inf,
    out 0 for seq_len 0) and logits [B, Hq, L] (scale*q.k, soft-capped to
    softcap*tanh(x/softcap) when softcap > 0; -inf past seq_len)."""
    q, K, V = q.double(), K.double(), V.double()
    B, Hq, D = q.shape
    Hkv, L = K.shape[1], K.shape[2]
    assert Hq % Hkv == 0
    G = Hq // Hkv
    Kq = K.repeat_interleave(G, dim=1)
    Vq = V.repeat_interleave(G, dim=1)
    logits = scale * torch.einsum("bhd,bhld->bhl", q, Kq)
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
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
