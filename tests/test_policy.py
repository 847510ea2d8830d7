"""kvcomp.Policy and the presets: fields, validation, capacity planning, and
the planner (Policy.plan / bytes_per_token) agreeing with what a
PagedKVCache actually holds (CONTRACT.md §4)."""
from __future__ import annotations

import math
import zlib

import pytest
import torch

from kvcomp import KVFormat, PagedKVCache, Policy, policies as P
from helpers import gen_from, heavy_tailed

H, D = 2, 64  # KV heads, head_dim of the cache checks


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: threads only add contention (conftest restores the count)."""
    torch.set_num_threads(1)


# ------------------------------------------------------------------ presets
PRESET_FIELDS = {
    "full": dict(hot_window=None, eviction=None, sinks=0, budget=None, window=None),
    "fp8": dict(cold_format="fp8_e4m3", hot_window=0, eviction=None, budget=None),
    "int8": dict(cold_format="int8", hot_window=0, eviction=None, budget=None),
    "int4": dict(cold_format="nf4:h", hot_window=64, eviction=None, budget=None),
    "int3": dict(cold_format="nf3:g64:h", hot_window=64, eviction=None, budget=None),
    "int2": dict(cold_format="nf2:g64:h", hot_window=128, eviction=None, budget=None),
    "kivi2": dict(cold_format="int2c/int2", hot_window=128, block_size=32, eviction=None),
    "streaming_llm": dict(eviction="streaming", sinks=4, window=1020, budget=None),
    "h2o": dict(eviction="h2o", budget=0.2, window=None),
    "combined": dict(eviction="h2o", cold_format="int8", observe=32, budget=0.22),
}


@pytest.mark.parametrize("name", sorted(PRESET_FIELDS))
def test_preset_fields(name):
    assert set(P.PRESETS) == set(PRESET_FIELDS)
    p = P.PRESETS[name]()
    assert isinstance(p, Policy)
    assert p.name == name
    for field, value in PRESET_FIELDS[name].items():
        assert getattr(p, field) == value, f"{name}.{field} = {getattr(p, field)!r}, expected {value!r}"
    assert p.block_size in (16, 32, 64, 128)
    # the cold format parses, and the policy is immutable plain data
    KVFormat.parse(p.cold_format)
    with pytest.raises(Exception):
        p.hot_window = 3
    assert p == P.PRESETS[name]()
    assert hash(p) == hash(P.PRESETS[name]())


def test_preset_arguments_and_overrides():
    s = P.streaming_llm(sinks=4, window=1020)
    assert (s.sinks, s.window, s.eviction) == (4, 1020, "streaming")
    s = P.streaming_llm(sinks=2, window=60, hot_window=16)
    assert (s.sinks, s.window, s.hot_window) == (2, 60, 16)
    assert P.h2o(budget=0.2).budget == 0.2
    assert P.h2o(budget=48).budget == 48
    assert P.h2o().sinks > 0  # sinks are kept by the h2o preset
    p = P.int4(hot_window=128, block_size=32)
    assert (p.cold_format, p.hot_window, p.block_size, p.name) == ("nf4:h", 128, 32, "int4")
    assert P.int8(name="mine").name == "mine"
    # aliases are canonicalized; replace() validates again
    assert Policy(cold_format="kivi4").cold_format == "int4c/int4"
    assert P.int4().replace(hot_window=16).hot_window == 16
    with pytest.raises(ValueError, match="block_size"):
        P.int4().replace(block_size=24)
    # combined has both a compressed cold tier and eviction
    c = P.combined()
    assert KVFormat.parse(c.cold_format).k.bits < 16 and c.eviction == "h2o" and c.sinks > 0
    assert c.hot_window is not None and c.hot_window > 0
    # ... and reaches the accuracy goal's 1/8 of fp16 (SmolLM2's geometry) from 1k tokens on
    for n in (1024, 2048, 4096, 8192):
        assert c.bytes_per_token(30, 3, 64, n) <= P.full().bytes_per_token(30, 3, 64, n) / 8


def test_full_policy_is_default_of_cache():
    c = PagedKVCache(1, H, D, max_tokens=64)
    assert c.policy == P.full()


# --------------------------------------------------------------- validation
BAD_POLICIES = [
    (dict(cold_format="int5"), "int5"),
    (dict(cold_format="bogus/int4"), "bogus"),
    (dict(block_size=8), "block_size"),
    (dict(block_size=48), "block_size"),
    (dict(block_size=256), "block_size"),
    (dict(hot_window=-1), "hot_window"),
    (dict(hot_window=-16), "hot_window"),
    (dict(hot_window=2.5), "hot_window"),
    (dict(sinks=-1), "sinks"),
    (dict(eviction="lru"), "eviction"),
    (dict(eviction="H2O"), "eviction"),
    (dict(eviction="h2o"), "budget"),
    (dict(eviction="h2o", budget=0), "budget"),
    (dict(eviction="h2o", budget=-5), "budget"),
    (dict(eviction="h2o", budget=0.0), "budget"),
    (dict(eviction="h2o", budget=-0.5), "budget"),
    (dict(eviction="h2o", budget=1.5), "budget"),
    (dict(eviction="h2o", budget=1.0001), "budget"),
    (dict(eviction="h2o", budget="10"), "budget"),
    (dict(eviction="h2o", budget=2, sinks=4), "budget"),
    (dict(budget=10), "budget"),
    (dict(budget=0.5), "budget"),
    (dict(eviction="streaming", window=60, hot_window=0, budget=16), "budget"),
    (dict(evict_every=0, eviction="h2o", budget=16), "evict_every"),
    (dict(evict_every=4), "evict_every"),
    (dict(observe=32), "observe"),
    (dict(observe=0, eviction="h2o", budget=16), "observe"),
    (dict(observe=1.5, eviction="h2o", budget=16), "observe"),
    (dict(eviction="streaming", hot_window=0), "window"),
    (dict(eviction="streaming", hot_window=0, window=0), "window"),
    (dict(eviction="streaming", hot_window=0, window=-4), "window"),
    (dict(eviction="streaming", window=60, hot_window=8), "hot_window"),
    (dict(eviction="streaming", window=60, hot_window=20), "hot_window"),
    (dict(eviction="streaming", window=64, hot_window=64), "hot_window"),
    (dict(eviction="streaming", window=60, hot_window=64), "hot_window"),
    (dict(eviction="streaming", window=60, hot_window=32, block_size=32, cold_format="fp8"),
     None),  # valid: a multiple of the block size, smaller than the window
    (dict(eviction="h2o", budget=16, window=8), "window"),
    (dict(window=8), "window"),
    (dict(hot_format="int8"), "hot_format"),
    (dict(eviction="h2o", budget=16, hot_window=None), "hot_window"),
    (dict(eviction="streaming", window=60, hot_window=None), "hot_window"),
]


@pytest.mark.parametrize("kwargs,field", BAD_POLICIES, ids=[str(i) for i in range(len(BAD_POLICIES))])
def test_policy_validation(kwargs, field):
    if field is None:
        Policy(**kwargs)
        return
    with pytest.raises(ValueError) as e:
        Policy(**kwargs)
    assert field in str(e.value), f"{kwargs}: message {str(e.value)!r} does not name {field!r}"


@pytest.mark.parametrize("fmt", ["kivi2", "kivi4", "int4c", "int2c", "int8c", "int8c/int8", "fp8_e5m2/int4c",
                                 "fp32/int4c"])
def test_streaming_rejects_per_channel(fmt):
    with pytest.raises(ValueError, match="per-channel"):
        P.streaming_llm(sinks=4, window=60, cold_format=fmt)
    with pytest.raises(ValueError, match="per-channel"):
        Policy(cold_format=fmt, eviction="streaming", window=64, hot_window=0,
               block_size=32 if "kivi" in fmt else 16)


def test_unknown_cold_format_message_names_field():
    with pytest.raises(ValueError, match="cold_format"):
        Policy(cold_format="int5")


def test_valid_edge_policies():
    """Values at the edge of each rule are accepted."""
    Policy(eviction="h2o", budget=1.0)
    Policy(eviction="h2o", budget=1e-6)
    Policy(eviction="h2o", budget=4, sinks=4)
    Policy(eviction="h2o", budget=16, evict_every=1)
    Policy(hot_window=0, cold_format="kivi2", block_size=32)  # per-channel: sealed when a block is full
    Policy(hot_window=None)
    Policy(eviction="streaming", window=1, hot_window=0)
    Policy(eviction="streaming", window=17, hot_window=16)
    for bs in (16, 32, 64, 128):
        Policy(block_size=bs, cold_format="int4:g64", hot_window=bs * 2)
    for hf in ("fp16", "bf16", "fp32"):
        assert Policy(hot_format=hf).resolved_hot_format(torch.float32) == hf
    assert Policy().resolved_hot_format(torch.float32) == "fp32"
    assert Policy().resolved_hot_format(torch.bfloat16) == "bf16"
    assert Policy().resolved_hot_format(torch.float16) == "fp16"


# --------------------------------------------------------- bytes per token
@pytest.mark.parametrize("n", [16, 32, 1024, 8192, 131072])
def test_full_bytes_per_token_llama3_8b(n):
    """fp16 Llama-3-8B (32 layers, 8 KV heads, head_dim 128): 2*2*128*8*32."""
    assert P.full().bytes_per_token(32, 8, 128, n) == 131072
    assert P.full().bytes_per_token(32, 8, 128, n, dtype=torch.float16) == 131072
    assert P.full().bytes_per_token(32, 8, 128, n, dtype=torch.bfloat16) == 131072
    assert P.full().bytes_per_token(32, 8, 128, n, dtype=torch.float32) == 2 * 131072


def test_full_bytes_per_token_partial_block():
    """A partial last block is paid for whole."""
    assert P.full().bytes_per_token(32, 8, 128, 1) == 16 * 131072
    assert P.full().bytes_per_token(32, 8, 128, 17) == 131072 * 32 / 17


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "fp8_e5m2", "int4", "fp8_e4m3/int4", "int2:g64"])
@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("blocks", [1, 3, 64])
def test_direct_bytes_per_token(fmt, bs, blocks):
    """hot_window 0, per-token: every token lives in the cold format."""
    n = bs * blocks
    p = Policy(cold_format=fmt, hot_window=0, block_size=bs)
    expect = KVFormat.parse(fmt).bytes_per_token(128, bs) * 32 * 8
    assert p.bytes_per_token(32, 8, 128, n) == expect
    if fmt in ("int8", "fp8_e4m3"):
        q = (P.int8 if fmt == "int8" else P.fp8)(block_size=bs)
        assert q.bytes_per_token(32, 8, 128, n) == expect
    # cheaper than fp16
    assert expect < 131072


def test_tiered_bytes_per_token_long_context():
    """With a hot window, the per-token cost tends to the cold format's."""
    cold = KVFormat.parse(P.int4().cold_format).bytes_per_token(128, 16) * 32 * 8
    p = P.int4()
    short, long = p.bytes_per_token(32, 8, 128, 64), p.bytes_per_token(32, 8, 128, 1 << 17)
    assert short == 131072  # all hot
    assert cold < long < cold * 1.01
    # exact: hot tier holds 49..64 tokens after sealing, all else is cold
    n = 1000
    hot, cold_tokens = p.plan(n)
    assert hot + cold_tokens == n and 49 <= hot <= 64 and cold_tokens % 16 == 0
    hot_tile = KVFormat.parse("fp16").tile_bytes(128, 16)
    cold_tile = KVFormat.parse(P.int4().cold_format).tile_bytes(128, 16)
    want = 32 * 8 * (math.ceil(hot / 16) * hot_tile + cold_tokens // 16 * cold_tile) / n
    assert p.bytes_per_token(32, 8, 128, n) == want


def test_streaming_bytes_per_token_falls():
    """Constant memory: total bytes stop growing once the window is full, so
    bytes per token falls as 1/seq_len."""
    p = P.streaming_llm(sinks=4, window=1020)
    totals = []
    for n in (2048, 4096, 8192, 65536, 1 << 20):
        totals.append(p.bytes_per_token(32, 8, 128, n) * n)
    assert all(math.isclose(t, totals[0], rel_tol=1e-12) for t in totals)
    bpts = [p.bytes_per_token(32, 8, 128, n) for n in (1024, 2048, 4096, 65536)]
    assert all(a > b for a, b in zip(bpts, bpts[1:]))
    # up to the window, streaming costs what fp16 costs
    assert p.bytes_per_token(32, 8, 128, 1024) == 131072
    assert p.plan(1 << 20) == (0, 1024)


def test_h2o_plan_budget():
    p = P.h2o(budget=0.2)
    for n in (100, 1000, 10000):
        hot, cold = p.plan(n)
        assert hot <= p.hot_window and cold <= max(math.floor(0.2 * n), 16)
        assert cold % p.block_size == 0
    p = P.h2o(budget=48)
    assert p.plan(5000)[1] == 48
    assert p.bytes_per_token(32, 8, 128, 5000) < P.full().bytes_per_token(32, 8, 128, 5000) / 10


def test_plan_direct_and_full():
    assert P.full().plan(777) == (777, 0)
    assert P.int8().plan(777) == (0, 777)
    assert P.kivi2(hot_window=0).plan(100) == (4, 96)  # per-channel: sealed at whole blocks
    assert P.int4(hot_window=16).plan(16) == (16, 0)
    assert P.int4(hot_window=16).plan(17) == (1, 16)
    assert P.int4(hot_window=20).plan(37) == (21 - 16, 32)
    for n in range(0, 200):
        hot, cold = P.int4(hot_window=20).plan(n)
        assert hot + cold == n and cold % 16 == 0
        assert hot <= 20, (n, hot)
        # sealing keeps as many tokens hot as possible: one more block would take it under
        assert cold == 0 or hot + 16 > 20, (n, hot)


# ------------------------------------------- planner vs the cache it plans for
PLAN_POLICIES = [
    P.full(), P.fp8(), P.int8(), P.int4(), P.int4(hot_window=16), P.int4(hot_window=5),
    P.kivi2(), P.kivi2(hot_window=0), P.kivi2(hot_window=40),
    P.streaming_llm(sinks=4, window=60), P.streaming_llm(sinks=4, window=60, hot_window=16),
    P.streaming_llm(sinks=3, window=28, cold_format="int8"),
    P.h2o(budget=48), P.h2o(budget=0.25), P.h2o(budget=0.25, evict_every=7),
    P.h2o(budget=48, hot_window=16, cold_format="int8"),
    P.combined(budget=0.25), P.combined(budget=64, hot_window=32),
    Policy(cold_format="fp8_e4m3/int4", hot_window=16, block_size=32),
]


def _expected_bytes(p: Policy, lens, num_layers, dtype):
    return sum(round(p.bytes_per_token(num_layers, H, D, n, dtype) * n) for n in lens)


@pytest.mark.parametrize("policy", PLAN_POLICIES, ids=lambda p: f"{p.name}-{p.cold_format}-{p.hot_window}")
def test_plan_matches_cache_decode(policy):
    """After n single-token appends, the cache holds plan(n) tokens per tier and
    exactly bytes_per_token * n pool bytes, every step, for two sequences with
    different lengths and two layers."""
    g = gen_from(zlib.crc32(repr(policy).encode()))
    dtype = torch.float16
    L = 2
    steps = 300 if policy.hot_window and policy.hot_window >= 64 else 180
    c = PagedKVCache(L, H, D, policy, max_tokens=2048, dtype=dtype)
    c.add_sequence("a")
    c.add_sequence("b")
    lens = {"a": 0, "b": 0}
    lead = 37
    for t in range(steps + lead):
        ids = ["a"] if t < lead else ["a", "b"]
        for layer in range(L):
            k = heavy_tailed((len(ids), 1, H, D), g, dtype)
            v = heavy_tailed((len(ids), 1, H, D), g, dtype)
            c.append(layer, ids, k, v)
        for s in ids:
            lens[s] += 1
        s = c.stats()
        hot = sum(policy.plan(n)[0] for n in lens.values())
        cold = sum(policy.plan(n)[1] for n in lens.values())
        assert (s["hot_tokens"], s["cold_tokens"]) == (hot, cold), (lens, s)
        assert s["tokens"] == hot + cold
        assert s["seen_tokens"] == sum(lens.values())
        for sid, n in lens.items():
            for layer in range(L):
                hp, cp = c.positions(sid, layer)
                assert (hp.shape[1], cp.shape[1]) == policy.plan(n)
                assert c.seq_len(sid, layer) == n and c.held(sid, layer) == sum(policy.plan(n))
        assert s["bytes"] == _expected_bytes(policy, lens.values(), L, dtype), (lens, s)
        if s["tokens"]:
            assert s["bytes_per_token"] == s["bytes"] / s["tokens"]


@pytest.mark.parametrize("policy", [p for p in PLAN_POLICIES if p.eviction != "h2o"],
                         ids=lambda p: f"{p.name}-{p.cold_format}-{p.hot_window}")
@pytest.mark.parametrize("n", [1, 16, 17, 65, 100, 257])
def test_plan_matches_cache_prefill(policy, n):
    """Without h2o the tiers depend on the count only: one bulk append of n
    tokens ends where n single-token appends do."""
    g = gen_from(n)
    c = PagedKVCache(1, H, D, policy, max_tokens=1024, dtype=torch.float32)
    c.add_sequence(0)
    c.append(0, [0], heavy_tailed((1, n, H, D), g), heavy_tailed((1, n, H, D), g))
    s = c.stats()
    assert (s["hot_tokens"], s["cold_tokens"]) == policy.plan(n)
    assert s["bytes"] == round(policy.bytes_per_token(1, H, D, n, torch.float32) * n)


def test_plan_fp32_hot_tier_bytes():
    """The hot tier of a float32 cache is fp32 (twice fp16's bytes)."""
    p = P.int4(hot_window=32)
    c = PagedKVCache(1, H, D, p, max_tokens=256, dtype=torch.float32)
    c.add_sequence(0)
    g = gen_from(5)
    c.append(0, [0], heavy_tailed((1, 40, H, D), g), heavy_tailed((1, 40, H, D), g))
    assert c.hot_format == "fp32"
    assert c.stats()["bytes"] == round(p.bytes_per_token(1, H, D, 40, torch.float32) * 40)
    assert p.bytes_per_token(1, H, D, 40, torch.float32) > p.bytes_per_token(1, H, D, 40, torch.float16)
