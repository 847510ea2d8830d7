"""Erasure: Policy.wipe and what freed, evicted, overwritten and forgotten
tokens leave in the pools.

Every token carries a unique mark: V channels 6 and 7 hold +a and -a (a
unique per position and KV head), so its fp32 bytes are an 8-byte pattern
found only where that token's data lies (fp32 hot and cold tiers store it as
is; an int8 cold tier stores a/127 as the token's scale). The raw pools are
scanned for the patterns:
- ``wipe="on_free"``: nothing of a freed, evicted or overwritten token
  survives anywhere;
- ``wipe="on_reuse"``: freed blocks may hold it until handed out again, never
  a block in use; a block handed to another sequence holds exactly what a
  fresh cache would (and attend agrees bit for bit);
- ``forget`` leaves no trace under either setting.
"""
from __future__ import annotations

import math
import struct

import pytest
import torch

from kvcomp import PagedKVCache, Policy, policies as P
from kvcomp.storage import Allocator
from helpers import gen_from

H, D, HQ = 2, 64, 4
F32 = torch.float32
WIPES = ["on_free", "on_reuse"]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def mark(pos: int, head: int) -> float:
    return 10000.5 + 4 * pos + 2 * head  # exact in fp32, unique per (position, head)


def int8_codes(pos: int, head: int) -> tuple[int, int]:
    """Two int8 codes unique per (position, head) for positions below 12700."""
    return pos % 100, pos // 100 + 4 * head + 1


def marked(g, start: int, n: int):
    """K, V [1, n, H, D] fp32 for positions start..start+n-1, V marked: the
    mark and its negative (the row's absmax: int8 codes 127, -127), then two
    values whose int8 codes are int8_codes (a 4-byte string per token even in
    an int8 tier, whose one fp16 scale is too short to be distinctive)."""
    k, v = torch.randn(1, n, H, D, generator=g), torch.randn(1, n, H, D, generator=g)
    for i in range(n):
        for h in range(H):
            m = mark(start + i, h)
            a, b = int8_codes(start + i, h)
            v[0, i, h, 6], v[0, i, h, 7], v[0, i, h, 8], v[0, i, h, 9] = m, -m, m * a / 127, m * b / 127
    return k, v


def patterns(c: PagedKVCache, positions) -> list[bytes]:
    out = []
    for p in positions:
        for h in range(H):
            out.append(struct.pack("<ff", mark(p, h), -mark(p, h)))
            if "int8" in c.cold_format:
                out.append(bytes([0x7F, 0x81, *int8_codes(p, h)]))
    return out


def blocks_bytes(c: PagedKVCache, which: str) -> bytes:
    """Bytes of the blocks in use ("used") or on the free lists ("free"), all pools."""
    out = []
    for pools, allocs in ((c.hot_pools, c._hot_alloc), (c.cold_pools, c._cold_alloc)):
        for pool, alloc in zip(pools, allocs):
            free = set(alloc.free_ids)
            ids = [b for b in range(pool.shape[0]) if (b in free) == (which == "free")]
            out.append(pool[ids].numpy().tobytes())
    return b"".join(out)


def found(c: PagedKVCache, pats: list[bytes], which: str) -> list[bytes]:
    data = blocks_bytes(c, which)
    return [p for p in pats if p in data]


def dirty(c: PagedKVCache) -> int:
    return sum(len(a.dirty) for a in c._hot_alloc + c._cold_alloc)


def held(c: PagedKVCache, s) -> set:
    out = set()
    for l in range(c.num_layers):
        hot, cold = c.positions(s, l)
        out |= set(torch.cat([hot, cold], 1).flatten().tolist())
    return out


def append(c: PagedKVCache, s, g, start: int, n: int, step: int = 0):
    """Marked tokens start.. in every layer, in chunks of ``step`` (0: one call);
    under H2O each step attends, so tokens gain scores."""
    for t in range(start, start + n, step or n):
        m = min(step or n, start + n - t)
        for l in range(c.num_layers):
            c.append(l, [s], *marked(g, t, m))
            if c.policy.eviction == "h2o":
                c.attend(l, [s], torch.randn(1, HQ, D, generator=g))


def check_new_owner(c: PagedKVCache):
    """A sequence given freed blocks: its blocks hold exactly what a fresh
    cache's do for the same data, and attend agrees bit for bit."""
    fresh = PagedKVCache(c.num_layers, H, D, c.policy.replace(wipe="on_free"), max_tokens=c.max_tokens,
                         dtype=F32, max_seqs=c.max_seqs)
    for x in (c, fresh):
        x.add_sequence("new")
        append(x, "new", gen_from(99), 5000, 40)
    for l in range(c.num_layers):
        for name, pools in (("hot", "hot_pools"), ("cold", "cold_pools")):
            got = [getattr(x._seqs["new"][l], name).blocks for x in (c, fresh)]
            a, b = (getattr(x, pools)[l][torch.tensor(ids, dtype=torch.long)] for x, ids in zip((c, fresh), got))
            assert torch.equal(a, b), f"layer {l} {name}: a reused block exposes old bytes"
        q = torch.randn(1, HQ, D, generator=gen_from(l))
        assert torch.equal(c.attend(l, ["new"], q), fresh.attend(l, ["new"], q))


def check_gone(c: PagedKVCache, pats: list[bytes], wipe: str, what: str):
    """Per the wipe setting: nowhere (on_free), or only in free blocks (on_reuse)."""
    assert not found(c, pats, "used"), f"{what}: a block in use holds erased tokens' bytes"
    if wipe == "on_free":
        assert dirty(c) == 0
        assert not found(c, pats, "free"), f"{what}: a freed block was not zeroed"
    else:
        assert dirty(c) > 0, f"{what}: on_reuse zeroed the freed blocks at once"


# ================================================================= policy
def test_wipe_field():
    assert Policy().wipe == "on_free" and P.int4(wipe="on_reuse").wipe == "on_reuse"
    for bad in ("never", None, "ON_FREE", 1):
        with pytest.raises(ValueError, match="wipe"):
            Policy(wipe=bad)


def fresh_pool(n: int) -> torch.Tensor:
    return torch.zeros(n, H, 32, dtype=torch.uint8)


@pytest.mark.parametrize("wipe", WIPES)
def test_allocator(wipe):
    a = Allocator(fresh_pool, 4, wipe)
    ids = a.take(3)
    a.pool[ids] = 0xAB
    a.give_back(ids[:2])
    assert a.used == 1 and bool((a.pool[ids[2]] == 0xAB).all())
    assert bool((a.pool[ids[:2]] == 0).all()) == (wipe == "on_free")
    again = a.take(3)  # the freed ones first, then a fresh one: all zero when handed out
    assert set(ids[:2]) <= set(again) and bool((a.pool[again] == 0).all()) and not a.dirty
    a.pool[again] = 0xCD
    a.give_back(again)
    a.scrub()
    assert bool((a.pool[again] == 0).all()) and not a.dirty


def test_allocator_grows_on_demand_up_to_its_cap():
    """A pool starts empty, grows by at least a quarter (amortized), keeps
    every block's bytes and id, hands out zeroed blocks, and stops at its cap."""
    a = Allocator(fresh_pool, 100, "on_free")
    assert a.pool.shape[0] == 0 and a.available == 100
    first = a.take(8)
    assert first == list(range(8)) and a.pool.shape[0] == 8
    a.pool[first] = torch.arange(8, dtype=torch.uint8)[:, None, None] + 1
    sizes = [a.pool.shape[0]]
    for _ in range(40):
        a.take(1)
        sizes.append(a.pool.shape[0])
    grown = [b for a_, b in zip(sizes, sizes[1:]) if b != a_]
    assert all(b >= math.ceil(a_ * 1.25) for a_, b in zip(sizes, grown)) and len(grown) <= 8
    assert bool((a.pool[first] == (torch.arange(8, dtype=torch.uint8)[:, None, None] + 1)).all())
    assert bool((a.pool[48:] == 0).all())
    a.take(a.available)
    assert a.pool.shape[0] == 100 and a.available == 0
    assert Allocator(fresh_pool, None, "on_free").available == math.inf


# ============================================================== the paths
FREE_POLICIES = [P.full(), Policy(cold_format="fp32", hot_window=16), Policy(cold_format="int8", hot_window=16)]


@pytest.mark.parametrize("wipe", WIPES)
@pytest.mark.parametrize("policy", FREE_POLICIES, ids=lambda p: f"{p.cold_format}-hw{p.hot_window}")
def test_free(policy, wipe):
    c = PagedKVCache(2, H, D, policy.replace(wipe=wipe), max_tokens=512, dtype=F32, max_seqs=3)
    g = gen_from(1)
    c.add_sequence("a")
    c.add_sequence("b")
    append(c, "a", g, 0, 100, step=30)
    append(c, "b", g, 1000, 20)
    pats = patterns(c, range(100))
    assert found(c, pats, "used")
    c.free("a")
    check_gone(c, pats, wipe, "free")
    if wipe == "on_reuse":
        assert found(c, pats, "free"), "freed blocks were zeroed at once"
    check_new_owner(c)
    assert not found(c, pats, "used")


@pytest.mark.parametrize("wipe", WIPES)
@pytest.mark.parametrize("cold", ["fp32", "int8"])
def test_h2o_eviction(cold, wipe):
    c = PagedKVCache(1, H, D, P.h2o(budget=32, hot_window=16, sinks=4, cold_format=cold, wipe=wipe),
                     max_tokens=512, dtype=F32, max_seqs=3)
    g = gen_from(2)
    c.add_sequence("a")
    append(c, "a", g, 0, 20)
    append(c, "a", g, 20, 100, step=1)
    evicted = set(range(120)) - held(c, "a")
    assert len(evicted) > 50
    pats = patterns(c, evicted)
    check_gone(c, pats, wipe, "h2o eviction")
    assert found(c, patterns(c, held(c, "a")), "used")
    check_new_owner(c)
    assert not found(c, pats, "used")


@pytest.mark.parametrize("wipe", WIPES)
@pytest.mark.parametrize("hot_window", [0, 16])
def test_streaming_overwrite(hot_window, wipe):
    c = PagedKVCache(1, H, D, P.streaming_llm(sinks=4, window=44, hot_window=hot_window, cold_format="fp32",
                                              wipe=wipe), max_tokens=512, dtype=F32, max_seqs=3)
    g = gen_from(3)
    c.add_sequence("a")
    append(c, "a", g, 0, 40)
    append(c, "a", g, 40, 160, step=1)
    dropped = set(range(200)) - held(c, "a")
    if hot_window == 0:
        assert len(dropped) == 200 - 4 - 44
    pats = patterns(c, dropped)
    assert not found(c, pats, "used"), "the ring kept a dropped token's bytes"
    if hot_window == 0:  # the ring overwrites in place: no block is ever given back
        assert dirty(c) == 0 and not found(c, pats, "free")
    else:
        check_gone(c, pats, wipe, "streaming")
    check_new_owner(c)


FORGET_POLICIES = [Policy(cold_format="fp32", hot_window=16), Policy(cold_format="int8", hot_window=16),
                   P.h2o(budget=48, hot_window=16, sinks=4, cold_format="fp32"), P.full()]


@pytest.mark.parametrize("wipe", WIPES)
@pytest.mark.parametrize("policy", FORGET_POLICIES, ids=lambda p: f"{p.cold_format}-{p.eviction}-hw{p.hot_window}")
def test_forget_leaves_no_trace(policy, wipe):
    """Forget erases at once whatever the setting, stale copies in freed
    blocks (a hot block after its seal) included; another sequence is untouched."""
    c = PagedKVCache(2, H, D, policy.replace(wipe=wipe), max_tokens=512, dtype=F32, max_seqs=3)
    g = gen_from(4)
    c.add_sequence("a")
    c.add_sequence("b")
    append(c, "b", g, 1000, 50)
    append(c, "a", g, 0, 120, step=7)  # last, so that its freed hot blocks are not reused by "b"
    span = range(60, 110)
    pats = patterns(c, set(span) & held(c, "a"))
    assert found(c, pats, "used")
    if wipe == "on_reuse" and policy.hot_window:
        assert found(c, patterns(c, span), "free"), "expected stale hot copies in freed blocks"
    q = torch.randn(1, HQ, D, generator=g)
    before = [c.attend(l, ["b"], q) for l in range(2)]
    b_pos = [c.positions("b", l) for l in range(2)]
    c.forget("a", span.start, span.stop)
    assert not found(c, patterns(c, span), "used") and not found(c, patterns(c, span), "free")
    assert dirty(c) == 0
    assert not held(c, "a") & set(span)
    for l in range(2):
        assert all(torch.equal(x, y) for x, y in zip(c.positions("b", l), b_pos[l]))
        assert torch.equal(c.attend(l, ["b"], q), before[l])
    check_new_owner(c)
