"""PagedKVCache (CONTRACT.md §1, §4) against an independent float64 model.

Every check reads the cache's pools with the reference decoder
(tests/reference.py, written from docs/format.md) through the cache's own
tier state (blocks, length, positions), and compares:
- attend with float64 softmax attention over the concatenation of the tiers'
  dequantized contents (the per-tier merge is exact up to fp32 accumulation);
- the tiers' contents with the appended K/V: hot tier exact, cold tier within
  the format's error bound (CONTRACT.md §2);
- held positions with the set the policy must hold;
- pool bytes: blocks not in use are all zero, rows past a tier's length are
  zero, forgotten tokens leave no bytes behind.
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from kvcomp import CacheFullError, PagedKVCache, Policy, ops, policies as P
from helpers import assert_bounded, assert_gather_matches, dtype_eps, examples, gen_from, heavy_tailed
import reference
from reference import (U32, channel_error_bound, parse_format, ref_attention, ref_decode_pool,
                       token_error_bound)

H, D = 2, 64           # KV heads, head_dim
REL_TOL = 1e-4         # contract: fp32-accumulation tolerance of attention
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: threads only add contention (conftest restores the count)."""
    torch.set_num_threads(1)


def pid(p: Policy) -> str:
    extra = "".join(f"-{k}{getattr(p, k)}" for k in ("sinks", "budget", "window", "evict_every", "hot_format")
                    if getattr(p, k) not in (None, 0))
    return f"{p.name}-{p.cold_format}-hw{p.hot_window}-bs{p.block_size}{extra}"


# =================================================================== model
def tier_of(c: PagedKVCache, seq, layer: int, name: str):
    return getattr(c._seqs[seq][layer], name)


def pool_of(c: PagedKVCache, layer: int, name: str):
    return ((c.hot_pools if name == "hot" else c.cold_pools)[layer],
            c.hot_format if name == "hot" else c.cold_format,
            (c._hot_alloc if name == "hot" else c._cold_alloc)[layer])


def read_tier(c: PagedKVCache, seq, layer: int, name: str):
    """The tier's tokens decoded from the pool bytes by the reference decoder:
    float64 K, V [H, n, D] in slot order, and positions [H, n]."""
    t = tier_of(c, seq, layer, name)
    pool, fmt, _ = pool_of(c, layer, name)
    n, bs = t.len, c.policy.block_size
    pos = t.pos.clone()
    assert tuple(pos.shape) == (H, n)
    assert len(t.blocks) == -(-n // bs), f"{name} tier: {len(t.blocks)} blocks for {n} tokens"
    if n == 0:
        z = torch.zeros(H, 0, D, dtype=torch.float64)
        return z, z.clone(), pos
    K, V = ref_decode_pool(pool[torch.tensor(t.blocks, dtype=torch.long)], fmt)  # [nb, H, bs, D]
    K = K.permute(1, 0, 2, 3).reshape(H, -1, D)[:, :n]
    V = V.permute(1, 0, 2, 3).reshape(H, -1, D)[:, :n]
    return K, V, pos


def ref_attend(c: PagedKVCache, seq, layer: int, q: torch.Tensor, scale: float):
    """float64 attention of q [Hq, D] over hot + cold. Returns out [Hq, D],
    attention weights per KV head [H, n] (summed over its query heads) and
    their positions [H, n]."""
    Kh, Vh, ph = read_tier(c, seq, layer, "hot")
    Kc, Vc, pc = read_tier(c, seq, layer, "cold")
    K, V, pos = torch.cat([Kh, Kc], 1), torch.cat([Vh, Vc], 1), torch.cat([ph, pc], 1)
    n = K.shape[1]
    out, lse, logits = ref_attention(q[None].double(), K[None], V[None], torch.tensor([n]), scale)
    if n == 0:
        return out[0], torch.zeros(H, 0, dtype=torch.float64), pos
    p = torch.exp(logits[0] - lse[0][:, None])  # [Hq, n]
    return out[0], p.reshape(H, q.shape[0] // H, n).sum(1), pos


def assert_out_close(out: torch.Tensor, ref: torch.Tensor, dtype, what=""):
    """Row-wise relative error of attend's output within fp32 accumulation
    (plus the rounding of the output to the query's dtype)."""
    if ref.abs().max() == 0:
        assert bool((out == 0).all()), f"{what}: empty cache must give 0"
        return
    tol = REL_TOL + (2 * dtype_eps(dtype) if dtype != F32 else 0.0)
    err = (out.double() - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-300)
    assert err.max().item() <= tol, f"{what}: attend rel err {err.max().item():.3g} > {tol:.3g}"


RAW_EPS = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8, "fp32": 0.0}
DTYPE_FMT = {F32: "fp32", F16: "fp16", BF16: "bf16"}
FMT_DTYPE = {v: k for k, v in DTYPE_FMT.items()}


def raw_bound(kind: str, x: torch.Tensor, dtype) -> torch.Tensor:
    """|x_hat - x| of storing x (given in dtype) in a raw kind: 0 when the kind
    holds dtype exactly, else the kind's rounding (plus fp16's subnormal step)."""
    exact = kind == DTYPE_FMT[dtype] or kind == "fp32"
    if exact:
        return torch.zeros_like(x, dtype=torch.float64)
    return RAW_EPS[kind] * x.double().abs() + (2.0 ** -25 if kind == "fp16" else 2.0 ** -133)


def rounding(kind: str, mag: torch.Tensor) -> torch.Tensor:
    """Rounding of any value of magnitude <= mag to a raw kind."""
    return RAW_EPS[kind] * mag + (2.0 ** -25 if kind == "fp16" else 0.0)


def cold_bound(side, X: torch.Tensor, dtype, bs: int, events: int, everything: torch.Tensor,
               hot_fmt: str) -> torch.Tensor:
    """Bound on |x_hat - x| for a cold side holding X [H, n, D] (slot order).

    With no re-quantization (events == 0): the contract's bound (per token, or
    per channel over each sealed block). Each later event (a forget moving
    tokens back to the hot tier, rounded to hot_fmt, and sealing them again;
    or a per-channel block re-quantized by compact) quantizes values that
    already carry an error e: e' <= e (1 + 1/L) + base + r (asymmetric kinds;
    fp8 and int8 alike with their constants; r the hot tier's rounding), so
    e_R <= (R+1) 2^R (base + r). base for per-channel after re-quantization
    uses the channel's range over every token the sequence ever had
    (`everything` [n_all, H, D])."""
    R = events
    if side.raw:
        base = raw_bound(side.kind, X, dtype)
    elif not side.per_channel:
        base = token_error_bound(side, X.to(F32).double())
    elif R == 0:
        return torch.cat([channel_error_bound(side, X[:, i:i + bs]) for i in range(0, X.shape[1], bs)], 1)
    else:
        e = everything.double().transpose(0, 1)  # [H, n_all, D]
        lo, hi = e.amin(1, keepdim=True), e.amax(1, keepdim=True)
        base = ((hi - lo) / side.levels / 2 + 16 * U32 * torch.maximum(lo.abs(), hi.abs())).expand_as(X)
    if R == 0:
        return base
    grow = (R + 1) * 2.0 ** R
    return grow * (base + rounding(hot_fmt, X.double().abs() + grow * base))


class Run:
    """A PagedKVCache and the float K/V of every token appended to it."""

    def __init__(self, policy: Policy, dtype=F32, layers: int = 2, hq: int = 8, max_tokens: int = 2048,
                 seed: int = 0, magnitude: float = 1.0, max_seqs: int = 16, track_scores: bool = False):
        self.c = PagedKVCache(layers, H, D, policy, max_tokens=max_tokens, dtype=dtype, max_seqs=max_seqs)
        self.p, self.dtype, self.layers, self.hq, self.mag = policy, dtype, layers, hq, magnitude
        self.g = gen_from(seed)
        self.K, self.V = {}, {}
        self.gone: dict = {}      # seq -> forgotten positions
        self.events: dict = {}    # (seq, layer) -> forgets and evictions (re-quantizations) so far
        self.was_cold: dict = {}  # (seq, layer) -> positions seen in the cold tier before a forget
        self.track = track_scores
        self.scores: dict = {}         # (seq, layer) -> [dict pos -> float64 score] per KV head
        self.attends = 0

    # ------------------------------------------------------------ driving
    def add(self, *seqs):
        for s in seqs:
            self.c.add_sequence(s)
            self.gone[s] = set()
            for l in range(self.layers):
                self.events[(s, l)] = 0
                self.was_cold[(s, l)] = set()
                self.K[(s, l)] = torch.empty(0, H, D, dtype=self.dtype)
                self.V[(s, l)] = torch.empty(0, H, D, dtype=self.dtype)
                self.scores[(s, l)] = [dict() for _ in range(H)]

    def data(self, b: int, n: int):
        return heavy_tailed((b, n, H, D), self.g, self.dtype, self.mag)

    def append(self, seqs, n: int, layers=None, k=None, v=None):
        for l in (range(self.layers) if layers is None else layers):
            kk = self.data(len(seqs), n) if k is None else k
            vv = self.data(len(seqs), n) if v is None else v
            h2o = self.p.eviction == "h2o"
            cold_before = {s: tier_of(self.c, s, l, "cold").pos.clone() for s in seqs} if h2o else {}
            self.c.append(l, list(seqs), kk, vv)
            for i, s in enumerate(seqs):
                self.K[(s, l)] = torch.cat([self.K[(s, l)], kk[i]])
                self.V[(s, l)] = torch.cat([self.V[(s, l)], vv[i]])
                if h2o:
                    after = tier_of(self.c, s, l, "cold").pos
                    if any(set(cold_before[s][h].tolist()) - set(after[h].tolist()) for h in range(H)):
                        self.events[(s, l)] += 1  # an eviction compacted the cold tier

    def query(self, b: int):
        return (torch.randn(b, self.hq, D, generator=self.g) * 0.5).to(self.dtype)

    def attend(self, seqs, layer: int, scale=None, q=None):
        """attend, checked against the float64 reference; updates the model's scores."""
        seqs = list(seqs)
        q = self.query(len(seqs)) if q is None else q
        s_ = D ** -0.5 if scale is None else scale
        refs = [ref_attend(self.c, s, layer, q[i], s_) for i, s in enumerate(seqs)]
        out = self.c.attend(layer, seqs, q, scale)
        assert out.shape == q.shape and out.dtype == q.dtype
        for i, s in enumerate(seqs):
            assert_out_close(out[i], refs[i][0], q.dtype, f"{pid(self.p)} seq {s} layer {layer}")
        self.attends += 1
        if self.track:
            for i, s in enumerate(seqs):
                _, w, pos = refs[i]
                for h in range(H):
                    d = self.scores[(s, layer)][h]
                    for p_, x in zip(pos[h].tolist(), w[h].tolist()):
                        d[p_] = d.get(p_, 0.0) + x
        return out

    def forget(self, seq, start: int, end: int):
        for l in range(self.layers):
            self.was_cold[(seq, l)] |= set(tier_of(self.c, seq, l, "cold").pos.flatten().tolist())
            self.events[(seq, l)] += 1
        self.c.forget(seq, start, end)
        self.gone[seq] |= set(range(start, min(end, self.seen(seq))))  # later tokens are new ones

    # ----------------------------------------------------------- expectations
    def seen(self, s, layer: int = 0) -> int:
        return self.K[(s, layer)].shape[0]

    def expected_positions(self, s, layer: int):
        """The held set the policy prescribes, or None where it depends on scores."""
        n, p = self.seen(s, layer), self.p
        if p.eviction is None:
            return set(range(n)) - self.gone[s]
        if p.eviction == "streaming" and not self.gone[s]:
            held = self.c.held(s, layer)
            sinks = min(p.sinks, n)
            return set(range(sinks)) | set(range(n - (held - sinks), n))
        return None

    def check_state(self, s, layer: int):
        """Tier contents against the appended data; positions; zero tails."""
        c, p, bs = self.c, self.p, self.p.block_size
        n = self.seen(s, layer)
        assert c.seq_len(s, layer) == n
        origK, origV = self.K[(s, layer)], self.V[(s, layer)]
        hidx = torch.arange(H)[:, None]
        held = []
        for name in ("hot", "cold"):
            Kt, Vt, pos = read_tier(c, s, layer, name)
            if pos.shape[1] == 0:
                continue
            held.append(pos)
            assert bool((pos >= 0).all() and (pos < n).all()), f"{name}: positions out of range"
            Xk, Xv = origK[pos, hidx], origV[pos, hidx]  # [H, n, D]
            rf = parse_format(c.cold_format)
            R = self.events[(s, layer)]
            for side, X, T, every, what in ((rf.k, Xk, Kt, origK, "K"), (rf.v, Xv, Vt, origV, "V")):
                if name == "hot":
                    bound = raw_bound(c.hot_format, X, self.dtype)
                    # tokens a forget moved back from the cold tier carry its error
                    back = torch.tensor([[p_ in self.was_cold[(s, layer)] for p_ in row] for row in pos.tolist()],
                                        dtype=torch.bool).reshape(pos.shape)
                    if bool(back.any()):
                        cb = cold_bound(side, X, self.dtype, bs, R, every, c.hot_format)
                        cb = cb + rounding(c.hot_format, X.double().abs() + cb)
                        bound = torch.where(back[..., None], cb, bound)
                    assert_bounded(T, X.double(), bound, f"{pid(p)} hot tier {what}")
                    continue
                # the cold quantizer sees the hot tier's copy (unless tokens go straight to the cold tier)
                Xs = X if c._direct else X.to(FMT_DTYPE[c.hot_format])
                bound = cold_bound(side, Xs, Xs.dtype, bs, R, every, c.hot_format) \
                    + (Xs.double() - X.double()).abs()
                assert_bounded(T, X.double(), bound, f"{pid(p)} cold tier {what} ({side.name})")
        allpos = torch.cat(held, 1) if held else torch.empty(H, 0, dtype=torch.long)
        for h in range(H):
            row = allpos[h].tolist()
            assert len(row) == len(set(row)), f"head {h}: a position is held twice"
            assert not (set(row) & self.gone[s]), f"head {h}: forgotten positions still held"
        assert c.held(s, layer) == allpos.shape[1]
        want = self.expected_positions(s, layer)
        if want is not None:
            for h in range(H):
                got = set(allpos[h].tolist())
                assert got == want, (f"{pid(p)} seq {s} layer {layer} head {h}: held "
                                     f"{sorted(got ^ want)[:20]} differ from the expected set")

    def check_scores(self, s, layer: int):
        """The cache's heavy-hitter scores equal the float64 accumulated weights."""
        G = self.hq // H
        tol_abs = 1e-6 * G * max(self.attends, 1)
        for name in ("hot", "cold"):
            t = tier_of(self.c, s, layer, name)
            assert t.scores is not None and tuple(t.scores.shape) == tuple(t.pos.shape)
            for h in range(H):
                d = self.scores[(s, layer)][h]
                want = torch.tensor([d.get(p_, 0.0) for p_ in t.pos[h].tolist()], dtype=torch.float64)
                got = t.scores[h].double().cpu()
                err = (got - want).abs()
                assert bool((err <= 1e-4 * want + tol_abs).all()), \
                    f"{name} scores off by {err.max().item():.3g} (head {h})"

    def check_all(self, layers=None):
        for s in self.c.sequences:
            for l in (range(self.layers) if layers is None else layers):
                self.check_state(s, l)
        check_pools(self.c)


def check_pools(c: PagedKVCache):
    """Allocator and byte invariants: blocks are owned once, free blocks are all
    zero, rows past each tier's length are zero, stats() count exactly."""
    bs = c.policy.block_size
    total_bytes = hot_tokens = cold_tokens = 0
    for layer in range(c.num_layers):
        for name in ("hot", "cold"):
            pool, fmt, alloc = pool_of(c, layer, name)
            rf = parse_format(fmt)
            owned = []
            for s in c.sequences:
                t = tier_of(c, s, layer, name)
                owned += t.blocks
                if layer == 0:
                    if name == "hot":
                        hot_tokens += t.len
                    else:
                        cold_tokens += t.len
                if t.len % bs:
                    blk, r0 = t.blocks[-1], t.len % bs
                    for side, sec in zip(rf.sides(), rf.sections(D, bs)):
                        rb = sec.row_bytes
                        assert bool((pool[blk, :, sec.offset + r0 * rb: sec.offset + bs * rb] == 0).all()), \
                            f"{name} pool block {blk}: bytes past the tier's last token"
                        if not side.per_channel and sec.meta_bytes:
                            m = sec.meta_bytes // bs
                            assert bool((pool[blk, :, sec.meta_offset + r0 * m: sec.meta_offset + bs * m] == 0)
                                        .all()), f"{name} pool block {blk}: scales past the tier's last token"
            free = list(alloc.free_ids)
            assert len(set(owned)) == len(owned), f"{name} pool: a block is owned twice"
            assert len(set(free)) == len(free) and not (set(free) & set(owned))
            assert len(free) + len(owned) == pool.shape[0], f"{name} pool: blocks leaked"
            if free:
                assert bool((pool[torch.tensor(free, dtype=torch.long)] == 0).all()), \
                    f"{name} pool: a free block is not all zero"
            total_bytes += len(owned) * pool.shape[1] * pool.shape[2]
    st_ = c.stats()
    assert st_["bytes"] == total_bytes
    assert (st_["hot_tokens"], st_["cold_tokens"], st_["tokens"]) == (hot_tokens, cold_tokens,
                                                                      hot_tokens + cold_tokens)
    assert st_["bytes_per_token"] == (total_bytes / st_["tokens"] if st_["tokens"] else 0.0)


# ============================================== attend: the per-tier merge
ATTEND_CASES = [
    (P.full(), F32), (P.full(), F16), (P.full(), BF16),
    (P.fp8(), F16), (P.int8(), F32), (P.int8(block_size=32), BF16),
    (P.int4(), F16), (P.int4(hot_window=16), F32), (P.int4(hot_window=40, block_size=32), BF16),
    (P.kivi2(), F32), (P.kivi2(hot_window=40), F16), (P.kivi2(hot_window=0, block_size=16), F32),
    (Policy(cold_format="int4c", hot_window=16), F32),
    (Policy(cold_format="int8c/int8", hot_window=40, block_size=32), BF16),
    (Policy(cold_format="fp8_e4m3/int4", hot_window=16, block_size=32), F16),
    (Policy(cold_format="int8/int2:g64", hot_window=0), F32),
    (Policy(cold_format="int4", hot_window=0), F16),
    (Policy(cold_format="fp8_e5m2", hot_window=40), BF16),
    (Policy(cold_format="bf16", hot_window=16), F32),
    (Policy(cold_format="int8", hot_window=16, hot_format="fp16"), F32),
    (P.streaming_llm(sinks=4, window=60), F16),
    (P.streaming_llm(sinks=4, window=60, hot_window=16, cold_format="int8"), F32),
    (P.streaming_llm(sinks=2, window=28, cold_format="fp8_e4m3"), BF16),
    (P.h2o(budget=48, hot_window=16), F32), (P.h2o(budget=0.25), F16),
    (P.h2o(budget=32, hot_window=16, cold_format="int4", evict_every=5), BF16),
    (P.combined(budget=0.25, hot_window=32), F32),
]


@pytest.mark.parametrize("policy,dtype", ATTEND_CASES, ids=[f"{pid(p)}-{str(d)[6:]}" for p, d in ATTEND_CASES])
def test_attend_matches_reference(policy, dtype):
    """Three sequences of different lengths (prompts in one call and in chunks),
    a batched multi-token append, then batched decode steps: attend equals
    float64 attention over the concatenated dequantized tiers, every step and
    layer; the tiers hold what was appended (within the format's bound) at
    the positions the policy prescribes."""
    r = Run(policy, dtype, layers=2, hq=8, seed=zlib.crc32(pid(policy).encode()) + len(str(dtype)),
            track_scores=policy.eviction == "h2o")
    r.add("a", "b", "c")
    r.append(["a"], 150)                 # one call
    for n in (10, 1, 26):                # chunks
        r.append(["b"], n)
    for n in (100, 3, 157):
        r.append(["c"], n)
    r.check_all()
    for l in range(2):
        r.attend(["a", "b", "c"], l)
        r.attend(["c", "a"], l, scale=0.3)
    r.append(["a", "b", "c"], 7)         # batched, different hot lengths
    r.check_all()
    for step in range(8):
        r.append(["a", "b", "c"], 1)
        for l in range(2):
            r.attend(["a", "b", "c"], l)
        if step % 3 == 0:
            r.check_all()
    r.check_all()
    if r.track:
        for s in ("a", "b", "c"):
            for l in range(2):
                r.check_scores(s, l)


def test_attend_gather_dequant_agrees_with_reference_decoder():
    """Reading a tier with kvcomp.ops.gather_dequant (block table from the
    tier state) gives the reference decoder's values, and attention over the
    hot+cold concatenation of those matches attend."""
    r = Run(P.int4(hot_window=16), F32, layers=1)
    r.add(0, 1)
    r.append([0], 90)
    r.append([1], 41)
    c = r.c
    q = r.query(2)
    refs = []
    for b in (0, 1):
        parts = []
        for name in ("hot", "cold"):
            t = tier_of(c, b, 0, name)
            pool, fmt, _ = pool_of(c, 0, name)
            bt = torch.tensor([t.blocks], dtype=torch.int32)
            K, V = ops.gather_dequant(pool, bt, torch.tensor([t.len], dtype=torch.int32), fmt, F32)
            RK, RV, _ = read_tier(c, b, 0, name)
            assert_gather_matches(K[0], V[0], RK, RV, fmt, f"row {b} {name}")
            parts.append((K[0].double(), V[0].double()))
        K = torch.cat([parts[0][0], parts[1][0]], 1)[None]
        V = torch.cat([parts[0][1], parts[1][1]], 1)[None]
        refs.append(ref_attention(q[b:b + 1].double(), K, V, torch.tensor([K.shape[2]]), D ** -0.5)[0][0])
    out = c.attend(0, [0, 1], q)
    for b in (0, 1):
        assert_out_close(out[b], refs[b], F32)


def test_attend_empty_and_new_sequences():
    """A sequence with no tokens attends to nothing (output 0); others in the
    same batch are unaffected."""
    for policy in (P.full(), P.int8(), P.int4(hot_window=16), P.h2o(budget=32, hot_window=16),
                   P.streaming_llm(sinks=4, window=60)):
        r = Run(policy, F32, layers=1, track_scores=policy.eviction == "h2o")
        r.add("x", "y")
        out = r.attend(["x"], 0)
        assert bool((out == 0).all())
        r.append(["y"], 40)
        out = r.attend(["x", "y"], 0)
        assert bool((out[0] == 0).all()) and bool((out[1] != 0).any())
        r.check_all()


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_attend_default_scale_and_gqa_groups(dtype):
    """scale=None means head_dim**-0.5; MHA (2 heads), GQA (4, 8)."""
    for hq in (2, 4, 8):
        r = Run(P.int8(hot_window=16), dtype, layers=1, hq=hq, seed=hq)
        r.add(0)
        r.append([0], 70)
        q = r.query(1)
        a = r.c.attend(0, [0], q)
        b = r.c.attend(0, [0], q, D ** -0.5)
        assert torch.equal(a, b)
        r.attend([0], 0, q=q)


# ========================================================= full() exactness
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_full_policy_exact(dtype):
    """full(): every token stays hot, in the activations' own dtype: the pool
    holds the appended K/V bit for bit, and attend is float64 attention over
    the original K/V up to fp32 accumulation."""
    r = Run(P.full(), dtype, layers=2)
    r.add(0, 1)
    r.append([0], 133)
    r.append([1], 16)
    r.append([0, 1], 5)
    fmt = DTYPE_FMT[dtype]
    assert r.c.hot_format == fmt and not r.c._has_cold
    sec_k, sec_v = parse_format(fmt).sections(D, 16)
    for s in (0, 1):
        for l in range(2):
            t = tier_of(r.c, s, l, "hot")
            assert torch.equal(t.pos, torch.arange(r.seen(s, l)).expand(H, -1))
            pool = r.c.hot_pools[l]
            for sec, X in ((sec_k, r.K[(s, l)]), (sec_v, r.V[(s, l)])):
                rows = torch.stack([pool[t.blocks[i // 16], :, sec.offset + (i % 16) * sec.row_bytes:
                                         sec.offset + (i % 16 + 1) * sec.row_bytes] for i in range(t.len)])
                want = X.contiguous().view(torch.uint8).reshape(t.len, H, -1)
                assert torch.equal(rows, want), "full(): pool bytes differ from the appended K/V"
            q = r.query(1)
            out = r.c.attend(l, [s], q)
            ref = ref_attention(q.double(), r.K[(s, l)].double().transpose(0, 1)[None],
                                r.V[(s, l)].double().transpose(0, 1)[None],
                                torch.tensor([r.seen(s, l)]), D ** -0.5)[0]
            assert_out_close(out[0], ref[0], dtype)
    r.check_all()
    elt = 4 if dtype == F32 else 2
    assert r.c.stats()["bytes"] == 2 * (9 + 2) * H * 2 * D * 16 * elt  # layers * blocks * tile


# ================================================================ streaming
@pytest.mark.parametrize("policy,steps", [
    (P.streaming_llm(sinks=4, window=60), 2000),
    (P.streaming_llm(sinks=4, window=28), 600),
    (P.streaming_llm(sinks=4, window=60, hot_window=16, cold_format="int8"), 600),
], ids=["window60", "window28", "window60-hot16-int8"])
def test_streaming_constant_memory(policy, steps):
    """Single-token steps far past the window: bytes and tokens are constant
    once the window is full, the held positions are the sinks and the newest
    tokens, and attend matches the reference over them."""
    r = Run(policy, F16, layers=1, hq=4, seed=steps)
    r.add("a", "b")
    c, sinks, window = r.c, policy.sinks, policy.window
    r.append(["b"], 9)
    plateau = None
    for t in range(steps):
        r.append(["a", "b"], 1)
        s = c.stats()
        n = r.seen("a")
        for seq in ("a", "b"):
            hot, cold = c.positions(seq)
            held = set(torch.cat([hot, cold], 1)[0].tolist())
            m = r.seen(seq)
            if policy.hot_window == 0:
                recent = min(window, max(m - sinks, 0))
            else:  # hot tier: 1..hot_window tokens after sealing, cold ring full
                recent = c.held(seq) - min(sinks, m)
                assert window - policy.hot_window < recent <= window or m <= sinks + window
            assert held == set(range(min(sinks, m))) | set(range(m - recent, m)), (seq, m)
            assert bool((hot == hot[:1]).all() and (cold == cold[:1]).all())
        if n >= sinks + window + 2 * policy.block_size:
            key = (s["bytes"], s["cold_blocks"], s["hot_blocks"])
            if plateau is None:
                plateau = key
            assert key == plateau, f"step {t}: memory grew {plateau} -> {key}"
            if policy.hot_window == 0:
                assert s["tokens"] == 2 * (sinks + window)
        assert s["tokens"] <= 2 * (sinks + window)
        if t % 97 == 0 or t == steps - 1:
            r.attend(["a", "b"], 0)
            r.check_all()
    # the plan says the same
    assert s["bytes"] == sum(round(policy.bytes_per_token(1, H, D, r.seen(q), F16) * r.seen(q)) for q in "ab")


def test_streaming_bulk_prompt_longer_than_window():
    """A prompt longer than the window in one append keeps the sinks and the
    newest window tokens (the rest are never written)."""
    p = P.streaming_llm(sinks=4, window=60)
    r = Run(p, F32, layers=1)
    r.add(0, 1)
    r.append([0], 500)
    r.append([1], 61)
    r.append([0, 1], 70)
    r.check_all()
    r.attend([0, 1], 0)
    assert r.c.held(0) == 64 and r.c.held(1) == 64
    assert r.c.stats()["cold_blocks"] == 2 * 4


# ====================================================================== h2o
def _held_sets(c, s, layer):
    hot, cold = c.positions(s, layer)
    return [set(hot[h].tolist()) for h in range(H)], [set(cold[h].tolist()) for h in range(H)]


@pytest.mark.parametrize("policy,steps", [
    (P.h2o(budget=32, hot_window=16, sinks=4), 150),
    (P.h2o(budget=0.25, hot_window=16, sinks=3), 150),
    (P.h2o(budget=0.25, hot_window=16, sinks=4, evict_every=8), 120),
    (P.h2o(budget=48, hot_window=32, sinks=4, block_size=16, cold_format="int8"), 130),
    (P.combined(budget=64, hot_window=32), 130),
], ids=["int32", "frac", "evict_every8", "int8-cold", "combined"])
def test_h2o_eviction(policy, steps):
    """Every step: held <= budget + hot_window, sinks held; the cache's scores
    equal the float64 accumulated attention weights; each eviction keeps, per
    KV head, cold tokens scoring at least as high as every evicted one."""
    r = Run(policy, F32, layers=1, hq=8, seed=steps, track_scores=True)
    r.add("a", "b")
    c, bs = r.c, policy.block_size
    evictions = 0
    for t in range(steps):
        seqs = ["a"] if t < 23 else ["a", "b"]
        before = {s: _held_sets(c, s, 0) for s in seqs}
        r.append(seqs, 1)
        for s in seqs:
            n = r.seen(s)
            hot_b, cold_b = before[s]
            hot_a, cold_a = _held_sets(c, s, 0)
            budget = policy.cold_budget(n)
            sizes = {len(x) for x in cold_a}
            assert len(sizes) == 1, "KV heads hold different numbers of cold tokens"
            cold_n = sizes.pop()
            assert cold_n % bs == 0, "the cold tier holds whole blocks"
            if policy.evicts_at(n):
                assert cold_n <= budget, (n, cold_n, budget)
                assert c.held(s) <= budget + policy.hot_window
            for h in range(H):
                assert set(range(min(policy.sinks, n))) <= hot_a[h] | cold_a[h], "a sink was evicted"
                evicted = (hot_b[h] | cold_b[h] | {n - 1}) - hot_a[h] - cold_a[h]
                if not evicted:
                    continue
                assert policy.evicts_at(n), f"eviction at step {n}, evict_every={policy.evict_every}"
                evictions += 1
                assert not (evicted & hot_b[h]) or all(p_ < min(hot_a[h], default=n) for p_ in evicted)
                sc = r.scores[(s, 0)][h]
                kept = [p_ for p_ in cold_a[h] if p_ >= policy.sinks]
                low_kept = min(sc.get(p_, 0.0) for p_ in kept) if kept else math.inf
                high_gone = max(sc.get(p_, 0.0) for p_ in evicted)
                assert low_kept >= high_gone - 1e-4 * (1 + high_gone), \
                    f"step {n} head {h}: kept score {low_kept:.6g} < evicted {high_gone:.6g}"
                for p_ in evicted:
                    sc.pop(p_, None)
        r.attend(seqs, 0)
        for s in seqs:
            r.check_scores(s, 0)
        if t % 25 == 0:
            r.check_all()
    assert evictions > 0
    r.check_all()
    hp, cp = c.positions("a")
    assert not torch.equal(cp[0], cp[1]), "heads should keep different heavy hitters"


def test_h2o_evict_every_single_steps_and_aligned_chunks():
    """evict_every=E: evictions happen exactly when the length reaches a
    multiple of E (single steps, and chunks that land on the multiples)."""
    p = P.h2o(budget=32, hot_window=16, sinks=4, evict_every=10)
    r = Run(p, F32, layers=1, track_scores=True)
    r.add(0)
    for step in range(12):
        r.append([0], 10)
        r.attend([0], 0)
        assert r.c.held(0) <= p.cold_budget(r.seen(0)) + p.hot_window
    r.check_all()


def test_h2o_evict_every_chunked_appends():
    p = P.h2o(budget=32, hot_window=16, sinks=4, evict_every=50)
    r = Run(p, F32, layers=1, track_scores=True)
    r.add(0)
    last = 0  # the length at the last multiple of evict_every crossed
    for step in range(8):
        r.append([0], 40)
        r.attend([0], 0)
        n = r.seen(0)
        if n // 50 > last // 50:
            last = n // 50 * 50
        # at most the budget, plus the tokens appended since the last eviction point, plus the window
        since = n - last
        assert tier_of(r.c, 0, 0, "cold").len <= p.cold_budget(n) + -(-since // 16) * 16, (n, r.c.stats())


def test_h2o_scores_follow_tokens_into_cold_tier():
    """Scores gathered while a token is hot move with it when it is sealed."""
    p = P.h2o(budget=64, hot_window=16, sinks=2)
    r = Run(p, F32, layers=1, magnitude=0.05, track_scores=True)
    r.add(0)
    for _ in range(40):
        r.append([0], 1)
        r.attend([0], 0)
    r.check_scores(0, 0)
    cold = tier_of(r.c, 0, 0, "cold")
    assert cold.len == 32 and bool((cold.scores > 0).all())


def test_h2o_prefill_then_evict():
    """A bulk prompt over budget is evicted at once (to the budget)."""
    p = P.h2o(budget=32, hot_window=16, sinks=4)
    r = Run(p, F32, layers=2, track_scores=True)
    r.add(0)
    r.append([0], 200)
    assert r.c.held(0) <= 32 + 16
    hot, cold = r.c.positions(0)
    assert set(range(4)) <= set(cold[0].tolist())
    r.attend([0], 0)
    r.attend([0], 1)
    r.check_all()


# ================================================================== forget
FORGET_POLICIES = [
    P.full(), P.int8(), P.fp8(), P.int4(hot_window=40), P.int8(hot_window=16),
    P.kivi2(hot_window=40), Policy(cold_format="int4c", hot_window=16),
    Policy(cold_format="fp8_e4m3/int4", hot_window=16, block_size=32),
    P.streaming_llm(sinks=4, window=60), P.streaming_llm(sinks=4, window=60, hot_window=16, cold_format="int8"),
    P.h2o(budget=256, hot_window=16),  # no eviction yet at 150 tokens
]
SPANS = ["hot", "cold_aligned", "cold_unaligned", "both", "all"]
EDGE_SPANS = ["sinks", "one", "empty", "past_end"]
FORGET_CASES = [(p, k) for p in FORGET_POLICIES for k in SPANS] + \
    [(p, k) for p in (P.int8(), P.int4(hot_window=40), P.kivi2(hot_window=40), P.streaming_llm(sinks=4, window=60))
     for k in EDGE_SPANS]


def _span(r: Run, s, kind: str):
    n, bs = r.seen(s), r.p.block_size
    hot, cold = r.c.positions(s)
    hs = int(hot.min()) if hot.numel() else n - 20
    cold_sorted = sorted(cold[0].tolist())
    c0 = cold_sorted[len(cold_sorted) // 2] if cold_sorted else 0
    a, b = {"hot": (hs + 2, min(hs + 9, n)), "cold_aligned": (c0 - c0 % bs, c0 - c0 % bs + 2 * bs),
            "cold_unaligned": (c0 + 3, c0 + bs + 8), "both": (hs - 5, hs + 3), "sinks": (0, 2),
            "all": (0, n), "one": (n - 30, n - 29), "empty": (30, 30), "past_end": (n - 3, n + 100)}[kind]
    return max(a, 0), max(b, 0)


def _signatures(c: PagedKVCache, seq, start: int, end: int):
    """Byte strings (code rows and per-token scales) of the tokens in [start, end)."""
    sigs = []
    bs = c.policy.block_size
    for layer in range(c.num_layers):
        for name in ("hot", "cold"):
            t = tier_of(c, seq, layer, name)
            pool, fmt, _ = pool_of(c, layer, name)
            rf = parse_format(fmt)
            for h in range(H):
                for i, p_ in enumerate(t.pos[h].tolist()):
                    if not start <= p_ < end:
                        continue
                    blk, row = t.blocks[i // bs], i % bs
                    for side, sec in zip(rf.sides(), rf.sections(D, bs)):
                        if side.per_channel:
                            continue  # codes relative to the block's scales: not a token's own bytes
                        rb = sec.row_bytes
                        sigs.append(pool[blk, h, sec.offset + row * rb: sec.offset + (row + 1) * rb].numpy()
                                    .tobytes())
                        if sec.meta_bytes:
                            m = sec.meta_bytes // bs
                            sigs.append(pool[blk, h, sec.meta_offset + row * m: sec.meta_offset + (row + 1) * m]
                                        .numpy().tobytes())
    return sigs


def _all_bytes(c: PagedKVCache) -> bytes:
    return b"".join(p.numpy().tobytes() for p in c.hot_pools + c.cold_pools)


@pytest.mark.parametrize("policy,kind", FORGET_CASES, ids=[f"{k}-{pid(p)}" for p, k in FORGET_CASES])
def test_forget(policy, kind):
    """forget erases a span for good: positions gone, attend equals the
    reference over the rest, no byte of the span's codes or scales survives
    anywhere in any pool, free blocks are zero; appends and attends go on."""
    dtype = F32 if kind != "hot" else F16
    r = Run(policy, dtype, layers=2, max_tokens=320, max_seqs=2,
            seed=zlib.crc32((pid(policy) + kind).encode()), track_scores=policy.eviction == "h2o")
    r.add("a", "b")
    r.append(["a"], 150)
    r.append(["b"], 40)
    for _ in range(3):
        r.append(["a", "b"], 1)
    start, end = _span(r, "a", kind)
    held_before = set(torch.cat(r.c.positions("a", 0), 1).flatten().tolist())
    sigs = _signatures(r.c, "a", start, end)
    sigs = sigs[::max(1, len(sigs) // 300)]  # a sample keeps the scan fast
    before = _all_bytes(r.c)
    # a 2-byte string (int8's one fp16 scale) recurs in other tokens' bytes by chance
    usable = [x for x in sigs if len(x) >= 4 and len(set(x)) > 1 and before.count(x) == 1]
    b_state = [r.c.positions("b", l) for l in range(2)]
    r.forget("a", start, end)
    after = _all_bytes(r.c)
    left = [x for x in usable if after.count(x)]
    assert not left, f"{len(left)} of {len(usable)} byte signatures of forgotten tokens remain in the pools"
    assert len(usable) >= len(sigs) // 2, "too few distinctive byte strings to scan for"
    if held_before & set(range(start, end)) and not parse_format(r.c.cold_format).per_channel:
        assert usable
    for l in range(2):
        hot, cold = r.c.positions("a", l)
        held = set(torch.cat([hot, cold], 1).flatten().tolist())
        assert not held & set(range(start, end))
        assert all(torch.equal(x, y) for x, y in zip(r.c.positions("b", l), b_state[l])), "forget touched seq b"
    r.check_all()
    for l in range(2):
        r.attend(["a", "b"], l)
    # the cache goes on: decode steps and a chunk
    for _ in range(3):
        r.append(["a", "b"], 1)
        r.attend(["a", "b"], 0)
    r.append(["a"], 9)
    r.append(["a", "b"], 20)
    r.check_all()
    for l in range(2):
        r.attend(["b", "a"], l)


@pytest.mark.parametrize("policy", [P.int4(hot_window=16), P.kivi2(hot_window=40), P.int8(), P.full()], ids=pid)
def test_forget_repeated_and_overlapping(policy):
    """Several forgets, overlapping ones, and forgetting what was already gone."""
    r = Run(policy, F32, layers=1, max_tokens=512, seed=3)
    r.add(0)
    r.append([0], 120)
    for a, b in ((10, 20), (15, 40), (0, 5), (100, 118), (10, 20), (60, 61)):
        r.forget(0, a, b)
        r.check_all()
        r.attend([0], 0)
        r.append([0], 3)
        r.attend([0], 0)
    r.forget(0, 0, r.seen(0))
    assert r.c.held(0) == 0
    r.check_all()
    assert bool((r.attend([0], 0) == 0).all())
    r.append([0], 33)
    r.check_all()
    r.attend([0], 0)


def test_forget_distinctive_constant_leaves_no_trace():
    """The brief's scan: tokens carrying a unique fp32 constant; after forget
    the constant's bytes appear nowhere (fp32 hot tier and int8 cold tier)."""
    for policy in (P.full(), P.int8(hot_window=32)):
        r = Run(policy, F32, layers=1, max_tokens=512, seed=9)
        r.add(0)
        r.append([0], 60)
        k, v = r.data(1, 20), r.data(1, 20)
        marks = [31337.125 + j for j in range(20)]
        for j, m in enumerate(marks):
            k[0, j, :, 5] = m
            v[0, j, :, 7] = -m
        r.append([0], 20, k=k, v=v)   # positions 60..79
        r.append([0], 40)             # pushes them cold under int8(hot_window=32)
        pats = [torch.tensor([m], dtype=F32).numpy().tobytes() for m in marks]
        pats += [torch.tensor([-m], dtype=F32).numpy().tobytes() for m in marks]
        if policy.hot_window is None:
            assert all(_all_bytes(r.c).count(p_) for p_ in pats)
        else:   # int8: the constant is each token's absmax, its scale m/127 rounded up to
            # a half; neighbouring tokens' scales are adjacent (4 bytes: distinctive)
            half = [int(reference.half_up(torch.tensor([m], dtype=F32) / 127)) for m in marks]
            scales = [bytes([a & 255, a >> 8, b & 255, b >> 8]) for j, (a, b) in enumerate(zip(half, half[1:]))
                      if (60 + j) // 16 == (61 + j) // 16]
            assert all(_all_bytes(r.c).count(p_) for p_ in scales)
            pats += scales
        r.forget(0, 60, 80)
        after = _all_bytes(r.c)
        assert not [p_ for p_ in pats if after.count(p_)]
        r.check_all()
        r.attend([0], 0)


def test_forget_h2o_before_eviction():
    r = Run(P.h2o(budget=64, hot_window=16, sinks=4), F32, layers=1, track_scores=True)
    r.add(0)
    for _ in range(50):
        r.append([0], 1)
        r.attend([0], 0)
    r.forget(0, 10, 13)
    for p_ in (10, 11, 12):
        for d in r.scores[(0, 0)]:
            d.pop(p_, None)
    r.check_all()
    r.attend([0], 0)
    r.check_scores(0, 0)


def test_forget_h2o_after_eviction():
    r = Run(P.h2o(budget=48, hot_window=16, sinks=4), F32, layers=1, track_scores=True)
    r.add(0)
    for _ in range(150):
        r.append([0], 1)
        r.attend([0], 0)
    hot, cold = r.c.positions(0)
    assert not torch.equal(cold[0], cold[1])
    r.forget(0, 10, 13)
    held = set(torch.cat(r.c.positions(0), 1).flatten().tolist())
    assert not held & {10, 11, 12}
    r.attend([0], 0)
    r.append([0], 5)
    r.attend([0], 0)


def test_forget_then_bulk_append_per_channel_hot_window_0():
    r = Run(P.kivi2(hot_window=0), F32, layers=1, seed=1)
    r.add(0)
    r.append([0], 40)
    r.forget(0, 1, 2)
    r.append([0], 40)
    assert r.c.seq_len(0) == 80
    r.check_all()
    r.attend([0], 0)


# ============================================= free, CacheFullError, errors
def test_free_returns_every_block():
    for policy in (P.full(), P.int8(), P.int4(hot_window=16), P.kivi2(hot_window=40),
                   P.streaming_llm(sinks=4, window=60), P.h2o(budget=32, hot_window=16)):
        r = Run(policy, F16, layers=2, max_tokens=1024, track_scores=policy.eviction == "h2o")
        r.add("a", "b")
        r.append(["a"], 130)
        r.append(["a", "b"], 50)
        q = r.query(1)
        out_b = r.c.attend(0, ["b"], q)
        r.c.free("a")
        assert not r.c.has_sequence("a") and r.c.sequences == ["b"]
        check_pools(r.c)
        assert torch.equal(r.c.attend(0, ["b"], q), out_b), "free touched another sequence"
        r.c.free("b")
        s = r.c.stats()
        assert (s["bytes"], s["tokens"], s["hot_blocks"], s["cold_blocks"]) == (0, 0, 0, 0)
        assert all(bool((p_ == 0).all()) for p_ in r.c.hot_pools + r.c.cold_pools)
        with pytest.raises(KeyError):
            r.c.free("a")
        # ids can be reused; the cache works as new
        r.K.clear()
        r.V.clear()
        r.add("a")
        r.append(["a"], 20)
        r.attend(["a"], 0)
        r.check_all()


def _snapshot(c: PagedKVCache):
    pools = [p_.clone() for p_ in c.hot_pools + c.cold_pools]
    pos = {s: [c.positions(s, l) for l in range(c.num_layers)] for s in c.sequences}
    return pools, pos, c.stats()


def _same(c: PagedKVCache, snap):
    pools, pos, stats = snap
    assert all(torch.equal(a, b) for a, b in zip(pools, c.hot_pools + c.cold_pools)), "pool bytes changed"
    for s, lst in pos.items():
        for l, (h, k) in enumerate(lst):
            h2, k2 = c.positions(s, l)
            assert torch.equal(h, h2) and torch.equal(k, k2)
    assert c.stats() == stats


@pytest.mark.parametrize("policy", [P.int8(), P.full(), P.int4(hot_window=16), P.kivi2(hot_window=40),
                                    P.streaming_llm(sinks=4, window=60)], ids=pid)
def test_cache_full_error(policy):
    """Exhaustion raises CacheFullError (tokens_needed, tokens_free), changes
    nothing, and a smaller append still works."""
    bs = policy.block_size
    max_tokens = 5 * bs if policy.eviction == "streaming" else 4 * bs
    r = Run(policy, F32, layers=1, max_tokens=max_tokens, seed=4)
    r.add("a", "b")
    if policy.eviction == "streaming":
        # the ring needs (sinks + window) / bs blocks per sequence: the second cannot have them
        r.append(["a"], 100)
        r.append(["b"], 10)
        q = r.query(1)
        out = r.c.attend(0, ["b"], q)
        snap = _snapshot(r.c)
        with pytest.raises(CacheFullError) as e:
            r.c.append(0, ["b"], r.data(1, 60), r.data(1, 60))
        _same(r.c, snap)
        assert torch.equal(r.c.attend(0, ["b"], q), out)
        assert e.value.tokens_needed > e.value.tokens_free >= 0
        r.append(["b"], 5)
        r.check_all()
        r.attend(["a", "b"], 0)
        return
    # fill the pool up to a last partial block of "b"
    first = 3 * bs if policy.hot_window is None or policy.hot_window == 0 else 2 * bs + (policy.hot_window or 0)
    r.append(["a"], first)
    r.append(["b"], 5)
    r.check_all()
    q = r.query(2)
    out = r.c.attend(0, ["a", "b"], q)
    snap = _snapshot(r.c)
    k, v = r.data(1, 4 * bs), r.data(1, 4 * bs)
    with pytest.raises(CacheFullError) as e:
        r.c.append(0, ["b"], k, v)
    err = e.value
    assert isinstance(err, RuntimeError)
    assert isinstance(err.tokens_needed, int) and isinstance(err.tokens_free, int)
    assert err.tokens_needed > err.tokens_free >= 0
    assert str(err.tokens_needed) in str(err) and str(err.tokens_free) in str(err)
    _same(r.c, snap)
    assert torch.equal(r.c.attend(0, ["a", "b"], q), out)
    # a batched append where only one sequence overflows changes nothing either
    with pytest.raises(CacheFullError):
        r.c.append(0, ["a", "b"], r.data(2, 3 * bs), r.data(2, 3 * bs))
    _same(r.c, snap)
    # a smaller append still works, and freeing makes room
    r.append(["b"], 2)
    r.check_all()
    r.attend(["a", "b"], 0)
    r.c.free("a")
    r.append(["b"], 2 * bs)
    r.check_all()
    r.attend(["b"], 0)


def test_cache_full_error_hot_pool():
    """The hot pools are sized by max_seqs: the next sequence's hot tier does not fit."""
    r = Run(P.int4(hot_window=16), F32, layers=1, max_seqs=1)
    r.add("a", "b")
    r.append(["a"], 30)
    snap = _snapshot(r.c)
    with pytest.raises(CacheFullError) as e:
        r.c.append(0, ["b"], r.data(1, 30), r.data(1, 30))
    assert e.value.tokens_needed > e.value.tokens_free
    _same(r.c, snap)
    r.append(["a"], 40)
    r.check_all()
    r.attend(["a"], 0)


def test_nan_input_rejected():
    for policy in (P.int8(), P.int4(hot_window=16), P.full()):
        r = Run(policy, F32, layers=1)
        r.add(0)
        r.append([0], 20)
        k = r.data(1, 3)
        k[0, 1, 0, 5] = float("nan")
        with pytest.raises((ValueError, RuntimeError), match="NaN|nan"):
            r.c.append(0, [0], k, r.data(1, 3))
        v = r.data(1, 3)
        v[0, 2, 1, 0] = float("inf")
        with pytest.raises((ValueError, RuntimeError)):
            r.c.append(0, [0], r.data(1, 3), v)


@pytest.mark.parametrize("policy", [P.int8(), P.int4(hot_window=16), P.full()], ids=pid)
@pytest.mark.parametrize("bad", ["nan", "float64"])
def test_rejected_append_leaves_cache_unchanged(policy, bad):
    r = Run(policy, F32, layers=1)
    r.add(0)
    r.append([0], 20)
    snap = _snapshot(r.c)
    k, v = r.data(1, 3), r.data(1, 3)
    if bad == "nan":
        k[0, 1, 0, 5] = float("nan")
    else:
        k, v = k.double(), v.double()
    with pytest.raises((ValueError, RuntimeError)):
        r.c.append(0, [0], k, v)
    _same(r.c, snap)
    assert r.c.seq_len(0) == 20
    r.attend([0], 0)


def test_bad_inputs():
    c = PagedKVCache(2, H, D, P.int4(hot_window=16), max_tokens=256, dtype=F32)
    c.add_sequence("a")
    g = gen_from(0)
    kv = lambda *s: heavy_tailed(s, g)
    with pytest.raises(ValueError, match="already exists"):
        c.add_sequence("a")
    for bad in (kv(1, 4, H + 1, D), kv(1, 4, H, D // 2), kv(4, H, D), kv(2, 4, H, D), "x", None):
        with pytest.raises(ValueError, match="key"):
            c.append(0, ["a"], bad, kv(1, 4, H, D))
    with pytest.raises(ValueError, match="value"):
        c.append(0, ["a"], kv(1, 4, H, D), kv(1, 5, H, D))
    for layer in (-1, 2, "0", 1.0):
        with pytest.raises(ValueError, match="layer"):
            c.append(layer, ["a"], kv(1, 4, H, D), kv(1, 4, H, D))
        with pytest.raises(ValueError, match="layer"):
            c.attend(layer, ["a"], torch.randn(1, 4, D))
    for call in (lambda: c.append(0, ["zz"], kv(1, 4, H, D), kv(1, 4, H, D)),
                 lambda: c.attend(0, ["zz"], torch.randn(1, 4, D)),
                 lambda: c.forget("zz", 0, 1), lambda: c.free("zz"), lambda: c.positions("zz"),
                 lambda: c.seq_len("zz")):
        with pytest.raises(KeyError, match="zz"):
            call()
    c.add_sequence("b")
    with pytest.raises(ValueError, match="duplicate"):
        c.append(0, ["a", "a"], kv(2, 1, H, D), kv(2, 1, H, D))
    for q in (torch.randn(1, 3, D), torch.randn(1, 4, D + 1), torch.randn(2, 4, D), torch.randn(4, D)):
        with pytest.raises(ValueError, match="query"):
            c.attend(0, ["a"], q)
    for a, b in ((5, 2), (-1, 3), (0.0, 2)):
        with pytest.raises(ValueError, match="start"):
            c.forget("a", a, b)
    # nothing above changed the cache
    assert c.stats()["tokens"] == 0 and c.stats()["bytes"] == 0
    assert all(bool((p_ == 0).all()) for p_ in c.hot_pools + c.cold_pools)
    # an empty append is a no-op
    c.append(0, ["a"], kv(1, 0, H, D), kv(1, 0, H, D))
    assert c.seq_len("a") == 0


def test_constructor_validation():
    with pytest.raises(TypeError):
        PagedKVCache(1, H, D, "int4")
    for kw in (dict(num_layers=0), dict(num_kv_heads=0), dict(max_tokens=0), dict(max_tokens=-5),
               dict(dtype=torch.int8), dict(dtype=torch.float64), dict(max_seqs=0)):
        args = dict(num_layers=1, num_kv_heads=H, head_dim=D, policy=P.int4(), max_tokens=64, dtype=F16)
        args.update(kw)
        with pytest.raises(ValueError):
            PagedKVCache(**args)
    with pytest.raises(ValueError):  # int4 needs head_dim a multiple of 32
        PagedKVCache(1, H, 48, P.int4(), max_tokens=64)
    c = PagedKVCache(1, H, 48, P.int8(), max_tokens=64)
    assert c.stats()["bytes"] == 0


# ================================================================ hypothesis
HYPO_POLICIES = [
    P.full(), P.int8(), P.fp8(block_size=32), P.int4(hot_window=16), P.int4(hot_window=40, block_size=32),
    P.kivi2(hot_window=40), Policy(cold_format="int4c/int8", hot_window=16),
    Policy(cold_format="fp8_e5m2/int2:g64", hot_window=0),
    P.streaming_llm(sinks=4, window=60), P.streaming_llm(sinks=2, window=44, hot_window=16, cold_format="int4"),
    P.h2o(budget=32, hot_window=16), P.combined(budget=0.5, hot_window=32),
    Policy(cold_format="int8", hot_window=16, hot_format="bf16"), Policy(cold_format="fp16", hot_window=5),
]
# h2o: no forget (see test_forget_h2o_after_eviction); per-channel with hot_window 0: not
# drawn (see test_forget_then_bulk_append_per_channel_hot_window_0).

action = st.one_of(
    st.tuples(st.just("append"), st.sampled_from([("a",), ("b",), ("a", "b")]),
              st.one_of(st.integers(1, 3), st.integers(1, 70))),
    st.tuples(st.just("attend"), st.sampled_from([("a",), ("b",), ("a", "b"), ("b", "a")]), st.just(0)),
    st.tuples(st.just("forget"), st.sampled_from(["a", "b"]), st.tuples(st.integers(0, 200), st.integers(0, 40))),
)


@settings(max_examples=examples(10))
@given(policy=st.sampled_from(HYPO_POLICIES), dtype=st.sampled_from([F32, F16, BF16]),
       actions=st.lists(action, min_size=1, max_size=10), seed=st.integers(0, 2**31 - 1))
def test_cache_random_operations(policy, dtype, actions, seed):
    r = Run(policy, dtype, layers=1, hq=4, max_tokens=1024, seed=seed, track_scores=policy.eviction == "h2o")
    r.add("a", "b")
    for kind, arg, extra in actions:
        if kind == "append":
            r.append(list(arg), extra)
        elif kind == "attend":
            r.attend(list(arg), 0)
        elif policy.eviction != "h2o":
            start, length = extra
            r.forget(arg, start, start + length)
        r.check_all()
        r.attend(["a", "b"], 0)


# ============================================== long appends straight to the cold tier
DIRECT_SEAL = [(P.int4(), F16), (P.int8(hot_window=32), BF16), (P.int3(), F32), (P.fp8(hot_window=16), F16),
               (P.h2o(budget=64, hot_window=32), F32), (P.combined(), F16), (P.kivi2(), F16),
               (P.int4(hot_format="fp16"), F32), (P.kivi2(), F32),
               (P.kivi2(cold_format="int4c/int4", hot_window=64), BF16)]


@pytest.mark.parametrize("policy,dtype", DIRECT_SEAL, ids=lambda x: getattr(x, "name", str(x)))
def test_long_appends_straight_to_cold_match_the_hot_tier_path(policy, dtype, monkeypatch):
    """_write_sealed_directly (a long append's tokens quantized straight into
    the cold tier) leaves the cache byte for byte as the hot write + seal
    path does: same tiers, positions, scores, cold-tier bytes, attention."""
    from helpers import held_stats, used_bytes

    direct = []

    def run(shortcut: bool):
        c = PagedKVCache(2, 2, 64, policy, max_tokens=4096, dtype=dtype)
        if shortcut:
            real = c._write_sealed_directly
            monkeypatch.setattr(c, "_write_sealed_directly", lambda *a: direct.append(real(*a)) or direct[-1])
        else:
            monkeypatch.setattr(c, "_write_sealed_directly", lambda *a: 0)
        g = gen_from(7)
        for s in ("a", "b"):
            c.add_sequence(s)
        for n in (5, 300, 1, 40, 200):  # uneven hot tiers, then long chunks
            for l in range(2):
                k, v = (heavy_tailed((2, n, 2, 64), g, torch.float32 if n == 40 else dtype) for _ in range(2))
                c.append(l, ["a", "b"], k, v)
                c.attend(l, ["a", "b"], torch.randn(2, 4, 64, generator=g).to(dtype))
        return c
    a, b = run(True), run(False)
    eligible = policy.hot_format in (None, {F32: "fp32", F16: "fp16"}.get(dtype))  # per-channel: staged
    assert any(direct) == eligible  # the shortcut was taken wherever it may be
    assert held_stats(a) == held_stats(b)
    for s in ("a", "b"):
        for l in range(2):
            for name in ("hot", "cold"):
                ta, tb = getattr(a._seqs[s][l], name), getattr(b._seqs[s][l], name)
                assert torch.equal(ta.pos, tb.pos) and (ta.scores is None or torch.equal(ta.scores, tb.scores))
                assert torch.equal(used_bytes(a, s, l, name), used_bytes(b, s, l, name)), (s, l, name)
    q = torch.randn(2, 4, 64).to(dtype)
    assert torch.equal(a.attend(1, ["a", "b"], q), b.attend(1, ["a", "b"], q))


def test_h2o_budget_of_zero_blocks_empties_the_cold_tier():
    """A fractional budget rounds down to whole blocks: 0 for a short
    sequence without sinks (found by the .kvc fuzzer), and eviction then
    frees the whole cold tier instead of asking heavy_hitter_topk for k=0."""
    policy = P.h2o(budget=0.1, hot_window=16, sinks=0)
    c = PagedKVCache(1, 2, 64, policy, max_tokens=512, dtype=F32)
    c.add_sequence("a")
    g = gen_from(5)
    c.append(0, ["a"], heavy_tailed((1, 60, 2, 64), g, F32), heavy_tailed((1, 60, 2, 64), g, F32))
    hot, cold = c.positions("a")
    assert policy.cold_budget(60) == 0 and cold.shape[1] == 0 and hot.shape[1] > 0
    assert c.stats()["cold_blocks"] == 0
    assert torch.isfinite(c.attend(0, ["a"], torch.randn(1, 4, 64, generator=g))).all()
