"""Validation of a ``.kvc`` file's cache before any of it is built
(docs/format.md, "Validation on load").

A file may come from another machine, process or tool, and whoever edits one
can recompute its SHA-256, so nothing it says is taken on trust: sizes,
indices, positions, scores and every stored value are checked against the
format and the policy, so that a loaded cache is one PagedKVCache itself
could have built. :func:`check_cache` returns the :class:`Plan` that
``kvc_file`` builds the cache from; a failure raises :class:`Invalid` naming
the field (kvc_file turns it into a KVCFileError with the path).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from typing import Optional

import torch

from . import ops
from .storage import pool_blocks, storable_max, tier_capacity
from .formats import KVFormat
from .policy import Policy

# Beyond any model; they bound what a header alone (no blocks) makes us build.
MAX_LAYERS = 1024
MAX_KV_HEADS = 1024
MAX_SEEN = 2**53  # positions stay exact as floats and far from int64 overflow
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
RAW_KINDS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP16_MAX = 65504.0
FP16_ROUNDS_FINITE = 65520.0  # a value below this rounds to a finite fp16
# 8-bit codes a writer never stores, found by the extremes of the code bytes
# read as int8 and as uint8: (lowest int8, highest int8, highest uint8) allowed.
CODE_BOUNDS = {
    "int8": (-127, 127, 255),      # -128 is never written
    "fp8_e4m3": (-128, 126, 254),  # 0x7f and 0xff are NaN
    "fp8_e5m2": (-128, 123, 251),  # 0x7c..0x7f and 0xfc..0xff are Inf and NaN
}


class Invalid(ValueError):
    """A field of the file that fails validation."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"{field}: {msg}")


@dataclasses.dataclass
class Tier:
    len: int
    blocks: list  # rows of the file's block tensor
    col: int      # first column of the tier in the pos/scores tensors


@dataclasses.dataclass
class Layer:
    seen: int
    hot: Tier
    cold: Tier


@dataclasses.dataclass
class Plan:
    """A validated cache: what to allocate and where each stored thing goes."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    policy: Policy
    max_tokens: Optional[int]
    max_seqs: int
    blocks: dict      # "hot"/"cold" -> the file's uint8 block tensor per layer
    pos: torch.Tensor
    scores: Optional[torch.Tensor]
    sequences: list   # (id, [Layer per model layer])
    names: set        # the tensor names it uses


# ------------------------------------------------------------------ fields
def field(d, key: str, where: str):
    if not isinstance(d, dict):
        raise Invalid(where, f"must be a JSON object, got {type(d).__name__}")
    if key not in d:
        raise Invalid(f"{where}.{key}" if where else key, "missing")
    return d[key]


def integer(v, where: str, lo: int, hi: Optional[int] = None) -> int:
    """v, if an int (not a bool or float) in [lo, hi]."""
    if type(v) is not int or v < lo or (hi is not None and v > hi):
        raise Invalid(where, f"{v!r} is not an int in [{lo}, {'...' if hi is None else hi}]")
    return v


# Policy fields newer than format version 2, with their defaults
_ADDED_POLICY_FIELDS = {f.name: f.default for f in dataclasses.fields(Policy) if f.name in ("scorer", "pool")}


def check_policy(d, where: str = "policy") -> Policy:
    """The Policy a header names; every field as Policy writes it (an int
    stays an int, a spec is canonical), so the file says exactly one policy."""
    if not isinstance(d, dict):
        raise Invalid(where, f"must be a JSON object, got {type(d).__name__}")
    try:
        policy = Policy(**d)
    except (TypeError, ValueError) as e:
        raise Invalid(where, str(e)) from None
    canonical = lambda x: json.dumps(x, sort_keys=True)
    d = {**_ADDED_POLICY_FIELDS, **d}  # files written before these fields existed
    if canonical(dataclasses.asdict(policy)) != canonical(d):
        raise Invalid(where, f"{d} is not as Policy writes it: {dataclasses.asdict(policy)}")
    return policy


# ------------------------------------------------------------------- cache
@contextlib.contextmanager
def one_thread():
    """Validation is many small reductions over strided views, which run 3-4x
    faster on one thread than split over two (measured on 2 cores: 24 ms vs
    80-115 ms for a 32k-token 4-layer int4 cache; 470 ms when the other core
    is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_cache(entry, tensors: dict, prefix: str, expect: Optional[dict]) -> Plan:
    """Validates a cache entry and its tensors (names starting with ``prefix``).
    ``expect``: geometry the caller requires (None values: any)."""
    with one_thread():
        return _check_cache(entry, tensors, prefix, expect)


def _check_cache(entry, tensors: dict, prefix: str, expect: Optional[dict]) -> Plan:
    L, H, D, dtype = _geometry(field(entry, "geometry", "cache"), expect)
    policy = check_policy(field(entry, "policy", "cache"))
    formats = _formats(entry, policy, dtype, D)
    blocks = _block_tensors(tensors, prefix, L, H, D, policy.block_size, formats)
    max_tokens, max_seqs = _pool_sizes(entry, policy, blocks)
    pos, scores = _position_tensors(tensors, prefix, H, policy)
    seqs = _sequences(field(entry, "sequences", "cache"), L, policy, blocks, pos.shape[1])
    for i, (_, layers) in enumerate(seqs):
        for l, layer in enumerate(layers):
            _check_positions(pos, layer, policy, f"sequences[{i}].layers[{l}]")
    _check_scores(scores, prefix)
    limits = storable_max(formats.values(), D)
    for name, fmt in formats.items():
        for l, t in enumerate(blocks[name]):
            check_blocks(t, fmt, D, policy.block_size, limits, dtype, f"tensor {prefix}{name}.{l}")
    names = {f"{prefix}{n}.{l}" for n in ("hot", "cold") for l in range(L)} | {f"{prefix}pos"}
    if scores is not None:
        names.add(f"{prefix}scores")
    return Plan(L, H, D, dtype, policy, max_tokens, max_seqs, blocks, pos, scores, seqs, names)


def _geometry(g, expect: Optional[dict]) -> tuple:
    L = integer(field(g, "num_layers", "geometry"), "geometry.num_layers", 1, MAX_LAYERS)
    H = integer(field(g, "num_kv_heads", "geometry"), "geometry.num_kv_heads", 1, MAX_KV_HEADS)
    D = integer(field(g, "head_dim", "geometry"), "geometry.head_dim", 1, 512)
    name = field(g, "dtype", "geometry")
    if not isinstance(name, str) or name not in DTYPES:
        raise Invalid("geometry.dtype", f"{name!r} is not one of {sorted(DTYPES)}")
    got = {"num_layers": L, "num_kv_heads": H, "head_dim": D, "dtype": DTYPES[name]}
    for k, want in (expect or {}).items():
        if want is not None and got[k] != want:
            raise Invalid(f"geometry.{k}", f"the cache was saved with {k}={got[k]}, expected {k}={want}")
    return L, H, D, DTYPES[name]


def _formats(entry, policy: Policy, dtype, head_dim: int) -> dict:
    """The tiers' formats: the policy's, and ones that suit head_dim."""
    want = {"hot": policy.resolved_hot_format(dtype), "cold": policy.cold_format}
    for name, fmt in want.items():
        got = field(entry, f"{name}_format", "cache")
        if got != fmt:
            raise Invalid(f"{name}_format", f"the blocks are {got!r}, the policy and dtype give {fmt!r}")
        try:
            KVFormat.parse(fmt).tile_bytes(head_dim, policy.block_size)
        except ValueError as e:
            raise Invalid("geometry.head_dim", str(e)) from None
    return want


def _block_tensors(tensors, prefix, L, H, D, bs, formats) -> dict:
    out = {}
    for name, fmt in formats.items():
        shape = (H, KVFormat.parse(fmt).tile_bytes(D, bs))
        out[name] = []
        for l in range(L):
            key = f"{prefix}{name}.{l}"
            t = tensors.get(key)
            if t is None:
                raise Invalid(f"tensor {key}", "missing")
            if t.dtype != torch.uint8 or t.dim() != 3 or tuple(t.shape[1:]) != shape:
                raise Invalid(f"tensor {key}", f"is {t.dtype} {tuple(t.shape)}, the {name} pool's blocks are "
                                               f"uint8 [n, {shape[0]}, {shape[1]}]")
            out[name].append(t)
    return out


def _pool_sizes(entry, policy: Policy, blocks: dict) -> tuple[Optional[int], int]:
    """max_tokens (None: no cap) and max_seqs, if the pools they cap hold the
    stored blocks. Pools grow on demand, so neither allocates anything: a
    load allocates the stored blocks and nothing more."""
    max_tokens = field(entry, "max_tokens", "cache")
    if max_tokens is not None:
        integer(max_tokens, "max_tokens", 1)
    max_seqs = integer(field(entry, "max_seqs", "cache"), "max_seqs", 1)
    sized_by = {"hot": "max_tokens" if policy.hot_window is None else "max_seqs", "cold": "max_tokens"}
    for name, n in pool_blocks(policy, max_tokens, max_seqs).items():
        stored = max(t.shape[0] for t in blocks[name])
        if n is not None and stored > n:
            raise Invalid(sized_by[name], f"the {name} pool holds at most {n} blocks, the file stores {stored} "
                                          f"in one layer")
    return max_tokens, max_seqs


def _position_tensors(tensors, prefix, H, policy: Policy):
    pos, scores = tensors.get(f"{prefix}pos"), tensors.get(f"{prefix}scores")
    if pos is None or pos.dtype != torch.int64 or pos.dim() != 2 or pos.shape[0] != H:
        got = "missing" if pos is None else f"{pos.dtype} {tuple(pos.shape)}"
        raise Invalid(f"tensor {prefix}pos", f"is {got}, not int64 [{H}, tokens]")
    h2o = policy.eviction == "h2o"
    if (scores is not None) != h2o or (h2o and (scores.dtype != torch.float32 or scores.shape != pos.shape)):
        got = "missing" if scores is None else f"{scores.dtype} {tuple(scores.shape)}"
        raise Invalid(f"tensor {prefix}scores", f"is {got}; it must be float32 {tuple(pos.shape)} "
                                                f"exactly when eviction='h2o'")
    return pos, scores


# --------------------------------------------------------------- sequences
def _sequences(seqs, L: int, policy: Policy, blocks: dict, columns: int) -> list:
    """(id, [Layer]) per sequence; the tiers' lengths fit the policy, their
    block lists the stored blocks (each used once), their columns pos."""
    if not isinstance(seqs, list):
        raise Invalid("sequences", f"must be a list, got {type(seqs).__name__}")
    out, seen_ids, col = [], set(), 0
    used = {(name, l): [] for name in ("hot", "cold") for l in range(L)}
    for i, seq in enumerate(seqs):
        seq_id = field(seq, "id", f"sequences[{i}]")
        if type(seq_id) not in (str, int) or seq_id in seen_ids:
            raise Invalid(f"sequences[{i}].id", f"{seq_id!r} is not a str or int, or is listed twice")
        seen_ids.add(seq_id)
        layers = field(seq, "layers", f"sequences[{i}]")
        if not isinstance(layers, list) or len(layers) != L:
            raise Invalid(f"sequences[{i}].layers", f"must be a list of {L} layers")
        out.append((seq_id, []))
        for l, e in enumerate(layers):
            where = f"sequences[{i}].layers[{l}]"
            seen = integer(field(e, "seen", where), f"{where}.seen", 0, MAX_SEEN)
            tiers = {}
            for name in ("hot", "cold"):
                tiers[name] = _tier(field(e, name, where), f"{where}.{name}", col, blocks[name][l].shape[0],
                                    policy.block_size)
                used[(name, l)] += tiers[name].blocks
                col += tiers[name].len
            _check_tier_lengths(tiers, policy, where)
            out[-1][1].append(Layer(seen, tiers["hot"], tiers["cold"]))
    if col != columns:
        raise Invalid("tensor pos", f"has {columns} columns, the tiers hold {col} tokens")
    for (name, l), ids in used.items():
        if sorted(ids) != list(range(blocks[name][l].shape[0])):
            raise Invalid(f"tensor {name}.{l}", f"the {name} tiers of layer {l} do not use each stored block "
                                                f"exactly once")
    return out


def _tier(d, where: str, col: int, stored: int, bs: int) -> Tier:
    n = integer(field(d, "len", where), f"{where}.len", 0, MAX_SEEN)
    blocks = field(d, "blocks", where)
    if not isinstance(blocks, list) or len(blocks) != -(-n // bs) or \
            any(type(b) is not int or not 0 <= b < stored for b in blocks):
        raise Invalid(f"{where}.blocks", f"must list {-(-n // bs)} rows of the {stored} stored blocks "
                                         f"({n} tokens, {bs} a block)")
    return Tier(n, blocks, col)


def _check_tier_lengths(tiers: dict, policy: Policy, where: str) -> None:
    """What PagedKVCache's appends rely on: a hot tier within its share of the
    hot pool, a streaming ring within its capacity, no tier the policy lacks."""
    for name, top in tier_capacity(policy).items():
        n = tiers[name].len
        if top is not None and n > top:
            raise Invalid(f"{where}.{name}.len", f"{n} tokens, more than the {top} this policy holds")


def _check_positions(pos: torch.Tensor, layer: Layer, policy: Policy, where: str) -> None:
    """Positions in [0, seen), none twice in a KV head (over both tiers), and
    the same in every head unless H2O evicted per head."""
    p = torch.cat([pos[:, t.col:t.col + t.len] for t in (layer.cold, layer.hot)], 1)
    if p.shape[1] == 0:
        return
    ordered = p if bool((p[:, 1:] > p[:, :-1]).all()) else p.sort(1).values  # usually ordered already
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise Invalid(f"{where}: positions", "a position is held twice in one KV head")
    if int(ordered[:, 0].min()) < 0 or int(ordered[:, -1].max()) >= layer.seen:
        raise Invalid(f"{where}: positions", f"outside [0, seen={layer.seen})")
    if policy.eviction != "h2o" and not bool((p == p[:1]).all()):
        raise Invalid(f"{where}: positions", "KV heads hold different positions, which only H2O does")


def _check_scores(scores: Optional[torch.Tensor], prefix: str) -> None:
    if scores is not None and scores.numel():
        lo, hi = torch.aminmax(scores)
        if not (float(lo) >= 0 and math.isfinite(float(hi))):  # NaN fails both
            raise Invalid(f"tensor {prefix}scores", "holds a negative, NaN or infinite score")


# ------------------------------------------------------------------ values
def check_blocks(t: torch.Tensor, fmt: str, head_dim: int, block_size: int, limits, dtype,
                 where: str) -> None:
    """Every stored value of blocks t (uint8 [n, heads, tile_bytes]) is one a
    writer stores: raw elements finite and within what the cache accepts;
    fp16 scales and zeros finite; 8-bit codes not NaN/Inf (fp8) or -128
    (int8); other codes are in range by their bit width. For fp16 caches,
    also every decoded value rounds to a finite fp16 (so attention's output
    does). One reduction per region, on strided views (no copies)."""
    if t.shape[0] == 0:
        return
    f = KVFormat.parse(fmt)
    lay = f.layout(head_dim, block_size)
    suspects = torch.zeros(t.shape[0], dtype=torch.bool)
    for side, sf, limit in (("k", f.k, limits[0]), ("v", f.v, limits[1])):
        s, kind = lay[side], sf.spec.split(":")[0]
        codes = t[:, :, s["offset"]:s["offset"] + block_size * s["row_bytes"]]
        name = f"{where}: {side.upper()}"
        if kind in RAW_KINDS:
            _within(codes.view(RAW_KINDS[kind]), limit, f"{name} values")
            continue
        meta = t[:, :, s["meta_offset"]:s["meta_offset"] + s["meta_bytes"]].view(torch.float16)
        largest = _within(meta, FP16_MAX, f"{name} scales/zeros")
        if kind in CODE_BOUNDS:  # amin/amax, not aminmax: 6x faster on int8 (measured)
            lo, hi, top = CODE_BOUNDS[kind]
            signed = codes.view(torch.int8)
            if (lo > -128 and int(signed.amin()) < lo) or (hi < 127 and int(signed.amax()) > hi) or \
                    (top < 255 and int(codes.amax()) > top):
                raise Invalid(f"{name} codes", f"hold a code {kind} never writes (NaN, Inf or -128)")
        # The largest scale or zero bounds every value (usually far below fp16's
        # limit); only past that is each block's own bound computed.
        overall = largest * (1 + max(map(abs, sf.code_range))) * (math.sqrt(head_dim) if sf.rotated else 1)
        if dtype == torch.float16 and overall >= FP16_ROUNDS_FINITE:
            suspects |= _bound(meta, sf, head_dim, block_size) >= FP16_ROUNDS_FINITE
    if bool(suspects.any()):  # rare in real caches: decode those blocks and look
        _check_decoded(t[suspects], fmt, block_size, where)


def _within(x: torch.Tensor, limit: float, where: str) -> float:
    """max |x|, if every x is within +-limit (so not NaN or Inf)."""
    lo, hi = (float(v) for v in torch.aminmax(x))
    if not (-limit <= lo and hi <= limit):  # NaN fails both
        raise Invalid(where, f"hold NaN, Inf or values beyond +-{limit:g}")
    return max(-lo, hi)


def _bound(meta: torch.Tensor, sf, head_dim: int, block_size: int) -> torch.Tensor:
    """Per block, an upper bound of |decoded value| from the scales and zeros
    alone ([n] fp32): codes decode to ``code_range`` times the scale, plus
    the zero; a rotated row is turned back by an orthogonal matrix, so its
    values are bounded by the row's L2 norm."""
    n, heads = meta.shape[:2]
    lo, hi = sf.code_range
    if sf.per_channel:  # block-wide scale[head_dim], then zero[head_dim]
        m = meta[..., :2 * head_dim].float().reshape(n, heads, 2, head_dim)
        scale, zero = m[:, :, 0], m[:, :, 1]
    else:
        group = sf.group or head_dim
        m = meta[..., :block_size * (head_dim // group) * sf.meta_halves].float()
        m = m.reshape(n, heads, block_size, head_dim // group, sf.meta_halves)
        scale, zero = m[..., 0], (m[..., 1] if sf.meta_halves == 2 else torch.zeros_like(m[..., 0]))
    per_group = torch.maximum((zero + lo * scale).abs(), (zero + hi * scale).abs())
    if sf.rotated:
        row = (per_group.square().sum(-1) * (sf.group or head_dim)).sqrt()
    else:
        row = per_group.amax(-1)
    return row.reshape(n, -1).amax(1)


def _check_decoded(blocks: torch.Tensor, fmt: str, block_size: int, where: str) -> None:
    """Decodes ``blocks`` (every slot) and checks each value rounds to a finite fp16."""
    n = blocks.shape[0]
    table = torch.arange(n, dtype=torch.int32)[None]
    k, v = ops.gather_dequant(blocks.contiguous(), table, torch.tensor([n * block_size], dtype=torch.int32), fmt)
    for side, x in (("K", k), ("V", v)):
        if not bool(torch.isfinite(x.half()).all()):
            raise Invalid(f"{where}: {side} codes", "decode to values beyond fp16's range, which a writer "
                                                    "never stores in a float16 cache")
