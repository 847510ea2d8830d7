"""Ops on two CUDA streams at once give, bit for bit, what they give one
after the other on one stream (``pytest -m cuda``; skipped without a GPU).

Two groups of sequences own disjoint blocks of one pool. Each group runs a
few decode steps (quantize_write of one new token per sequence, then
paged_decode_attention), then gather_dequant, on its own torch.cuda.Stream,
with launches of the two streams interleaved so their kernels overlap. The
serial run issues the very same calls (same per-group batches: a kernel's
split of the work depends on its batch) on the current stream. Outputs and
the final pools must be identical: a kernel that used the default stream
instead of the current one, or shared scratch memory between launches, would
race and differ.

With validation on (the default) every op reads its ids on the host, which
synchronizes its stream; with it off nothing waits, so the streams overlap
the most. Both are tested.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import kvcomp  # noqa: E402
from kvcomp import ops  # noqa: E402
from helpers import gen_from, heavy_tailed  # noqa: E402

DEV = torch.device("cuda")
HKV, GROUP, HD, BS = 2, 4, 128, 16
STEPS = 3
# Ragged lengths (0, 1, a block, long) so both streams mix short and long work.
GROUPS = ([1500, 37, 0, 2047], [800, 16, 1, 3000, 255])


def _problem(fmt: str, seed: int):
    """The pool after a prefill, and per group (device tensors, made on the
    current stream): block tables, and per step the new tokens, their slots,
    the queries and the lengths after the write."""
    g = gen_from(seed)
    lens = [n for grp in GROUPS for n in grp]
    blocks = [(n + STEPS + BS - 1) // BS for n in lens]
    max_blocks = max(blocks) + 1
    num_blocks = sum(blocks) + 3
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    bt = torch.full((len(lens), max_blocks), -1, dtype=torch.int32)
    i = 0
    for b, u in enumerate(blocks):  # disjoint blocks per sequence, shuffled
        bt[b, :u] = perm[i: i + u]
        i += u

    pool = kvcomp.allocate_pool(num_blocks, BS, HKV, HD, fmt, DEV)
    pos = [torch.arange(n) for n in lens]
    slots = torch.cat([bt[b, p // BS].long() * BS + p % BS for b, p in enumerate(pos)])
    n = len(slots)
    ops.quantize_write(heavy_tailed((n, HKV, HD), g).to(DEV), heavy_tailed((n, HKV, HD), g).to(DEV), pool,
                       slots.to(DEV), fmt)

    groups, first = [], 0
    for grp in GROUPS:
        idx = list(range(first, first + len(grp)))
        first += len(grp)
        steps = []
        for s in range(STEPS):
            p = torch.tensor([lens[b] + s for b in idx])
            step_slots = bt[idx, p // BS].long() * BS + p % BS
            k = heavy_tailed((len(idx), HKV, HD), g, torch.float16)
            v = heavy_tailed((len(idx), HKV, HD), g, torch.float16)
            q = torch.randn(len(idx), HKV * GROUP, HD, generator=g).half()
            sl = (p + 1).to(torch.int32)
            steps.append(dict(k=k.to(DEV), v=v.to(DEV), slots=step_slots.to(DEV), q=q.to(DEV), sl=sl.to(DEV)))
        groups.append(dict(bt=bt[idx].to(DEV), steps=steps))
    torch.cuda.synchronize()
    return pool, groups


def _step(fmt, pool, grp, s, outs):
    st = grp["steps"][s]
    ops.quantize_write(st["k"], st["v"], pool, st["slots"], fmt)
    outs += ops.paged_decode_attention(st["q"], pool, grp["bt"], st["sl"], fmt, HD ** -0.5)


def _gather(fmt, pool, grp, outs):
    outs += ops.gather_dequant(pool, grp["bt"], grp["steps"][-1]["sl"], fmt, torch.float16)


def _serial(fmt, pool, groups):
    outs = [[] for _ in groups]
    for i, grp in enumerate(groups):
        for s in range(STEPS):
            _step(fmt, pool, grp, s, outs[i])
        _gather(fmt, pool, grp, outs[i])
    torch.cuda.synchronize()
    return outs


def _two_streams(fmt, pool, groups):
    main = torch.cuda.current_stream()
    streams = [torch.cuda.Stream() for _ in groups]
    for s, grp in zip(streams, groups):
        s.wait_stream(main)  # the pool and the inputs were made on the current stream
        for t in [pool, grp["bt"]] + [x for st in grp["steps"] for x in st.values()]:
            t.record_stream(s)  # used on s: not to be reused before s is done with them
    outs = [[] for _ in groups]
    for step in range(STEPS):  # interleaved launches: the streams run side by side
        for i, (s, grp) in enumerate(zip(streams, groups)):
            with torch.cuda.stream(s):
                _step(fmt, pool, grp, step, outs[i])
    for i, (s, grp) in enumerate(zip(streams, groups)):
        with torch.cuda.stream(s):
            _gather(fmt, pool, grp, outs[i])
    for s, o in zip(streams, outs):
        main.wait_stream(s)
        for t in o:
            t.record_stream(main)  # made on s, read on the current stream below
    torch.cuda.synchronize()
    return outs


def _assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str):
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    ab, bb = a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)  # -0 != +0, NaN == NaN
    if not torch.equal(ab, bb):
        n = int((ab != bb).sum())
        raise AssertionError(f"{what}: {n} bytes differ between two streams and one")


@pytest.mark.parametrize("validation", [True, False])
@pytest.mark.parametrize("fmt", ["fp16", "int8", "int4", "fp8_e4m3/int2"])
def test_two_streams_match_serial(fmt, validation):
    prev = ops.set_cuda_validation(validation)
    try:
        pool, groups = _problem(fmt, seed=len(fmt) + 7 * validation)
        serial_pool = pool.clone()
        serial = _serial(fmt, serial_pool, groups)
        parallel = _two_streams(fmt, pool, groups)
    finally:
        ops.set_cuda_validation(prev)
    names = [f"step {s} {n}" for s in range(STEPS) for n in ("out", "lse")] + ["gather K", "gather V"]
    for i in range(len(groups)):
        assert len(serial[i]) == len(parallel[i]) == len(names)
        for name, a, b in zip(names, parallel[i], serial[i]):
            _assert_bits_equal(a, b, f"{fmt} group {i} {name}")
    _assert_bits_equal(pool, serial_pool, f"{fmt} pool")


def test_two_streams_are_not_a_no_op():
    """The comparison above has teeth: the groups' outputs are not empty, and
    a step's write changes what the next decode sees."""
    pool, groups = _problem("int8", seed=3)
    outs = _serial("int8", pool, groups)
    for o in outs:
        out0, out1 = o[0], o[2]
        assert out0.abs().sum() > 0 and not torch.equal(out0, out1)
