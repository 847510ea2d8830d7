"""compact: kept tokens move to the front, bit-exact for per-token formats,
within the re-quantization bound for per-channel ones."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from kvcomp import ops
from helpers import examples, ALL_FORMATS, build_cache, gen_from, head_dims_for
from reference import (BLOCK_SIZES, channel_error_bound, parse_format, ref_compact,
                       ref_compact_positions, ref_gather)


def random_keep(seq_lens, hkv, g, width_extra=3, keep_frac=None, minus_ones=True):
    """keep [B, hkv, k]: per (b, h) an ascending random subset of 0..seq_len-1
    with -1 entries scattered in between."""
    rows = []
    for n in seq_lens:
        per_head = []
        for _ in range(hkv):
            frac = keep_frac if keep_frac is not None else float(torch.rand(1, generator=g))
            sel = (torch.rand(n, generator=g) < frac).nonzero().flatten().tolist()
            per_head.append(sel)
        rows.append(per_head)
    width = max([len(s) for r in rows for s in r] + [0]) + width_extra
    keep = torch.full((len(seq_lens), hkv, max(width, 1)), -1, dtype=torch.int32)
    for b, r in enumerate(rows):
        for h, sel in enumerate(r):
            if not sel:
                continue
            # put the kept positions at random slots of the row, in order
            slots = sorted(torch.randperm(keep.shape[2], generator=g)[: len(sel)].tolist()) \
                if minus_ones else list(range(len(sel)))
            keep[b, h, slots] = torch.tensor(sel, dtype=torch.int32)
    return keep


def check_compact(c, keep):
    fmt, bs = c.fmt, c.block_size
    rf = parse_format(fmt)
    K0, V0 = ops.gather_dequant(c.pool, c.block_tables, c.seq_lens, fmt)
    R0 = ref_gather(c.pool, c.block_tables, c.seq_lens, fmt)
    before = c.pool.clone()
    ops.compact(c.pool, c.block_tables, keep, fmt)
    pos = ref_compact_positions(keep)
    B, H = keep.shape[:2]
    n_after = torch.tensor([max(len(p) for p in pos[b]) for b in range(B)], dtype=torch.int32)
    K1, V1 = ops.gather_dequant(c.pool, c.block_tables, n_after, fmt)
    R1 = ref_gather(c.pool, c.block_tables, n_after, fmt)
    Kc, Vc = ref_compact(R0[0], R0[1], keep)
    for side, A0, A1, C, RC1, name in ((rf.k, K0, K1, Kc, R1[0], "K"), (rf.v, V0, V1, Vc, R1[1], "V")):
        for b in range(B):
            for h in range(H):
                p = pos[b][h]
                n = len(p)
                if not side.per_channel:
                    assert torch.equal(A1[b, h, :n], A0[b, h, p]), f"{fmt} {name}[{b},{h}] not moved bit-exactly"
                    continue
                # re-quantized per destination block, over the kept tokens it holds
                for first in range(0, n, bs):
                    x = C[b][h][first: first + bs]
                    xh = RC1[b, h, first: first + len(x)]
                    err = (xh - x).abs()
                    bound = channel_error_bound(side, x)
                    assert bool((err <= bound).all()), \
                        f"{fmt} {name}[{b},{h}] block at {first}: err/bound {(err / bound).max():.3g}"
    # blocks no sequence names are untouched
    named = set(c.block_tables[c.block_tables >= 0].tolist())
    for blk in range(c.pool.shape[0]):
        if blk not in named:
            assert torch.equal(c.pool[blk], before[blk]), f"spare block {blk} was written"


@settings(max_examples=examples(200))
@given(seed=st.integers(0, 2**31 - 1), fmt=st.sampled_from(ALL_FORMATS),
       bs=st.sampled_from(BLOCK_SIZES), hkv=st.sampled_from([1, 2, 3]),
       lens=st.lists(st.integers(0, 300), min_size=1, max_size=3),
       frac=st.sampled_from([None, 0.1, 0.5, 0.95]), minus_ones=st.booleans(),
       hd_i=st.integers(0, 1))
def test_compact(seed, fmt, bs, hkv, lens, frac, minus_ones, hd_i):
    g = gen_from(seed)
    hd = head_dims_for(fmt, (64, 128))[min(hd_i, len(head_dims_for(fmt, (64, 128))) - 1)]
    c = build_cache(fmt, lens, hkv, hd, bs, g)
    keep = random_keep(lens, hkv, g, keep_frac=frac, minus_ones=minus_ones)
    check_compact(c, keep)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_compact_every_format(fmt):
    g = gen_from(5)
    hd = head_dims_for(fmt, (64, 128))[0]
    c = build_cache(fmt, [100, 33, 0, 64], 2, hd, 16, g)
    keep = random_keep([100, 33, 0, 64], 2, g, keep_frac=0.4)
    check_compact(c, keep)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_compact_identity_keep(fmt):
    """Keeping every token in place leaves the pool byte for byte unchanged."""
    g = gen_from(6)
    hd = head_dims_for(fmt, (64, 128))[0]
    lens = [70, 32, 5]
    c = build_cache(fmt, lens, 2, hd, 32, g)
    keep = torch.full((3, 2, 70), -1, dtype=torch.int32)
    for b, n in enumerate(lens):
        keep[b, :, :n] = torch.arange(n, dtype=torch.int32)
    before = c.pool.clone()
    ops.compact(c.pool, c.block_tables, keep, fmt)
    assert torch.equal(c.pool, before)
    # an all -1 keep moves nothing either
    ops.compact(c.pool, c.block_tables, torch.full((3, 2, 4), -1, dtype=torch.int32), fmt)
    assert torch.equal(c.pool, before)


@pytest.mark.parametrize("fmt", ["fp16", "int4", "kivi2", "int8c"])
def test_compact_keeps_prefix_then_drops(fmt):
    """A keep list that keeps a prefix in place and then moves a far tail
    (the sink + recent window pattern of StreamingLLM)."""
    g = gen_from(7)
    hd = 64
    c = build_cache(fmt, [300], 2, hd, 32, g)
    kept = list(range(4)) + list(range(200, 300))
    keep = torch.tensor(kept, dtype=torch.int32).expand(1, 2, -1).contiguous()
    check_compact(c, keep)
