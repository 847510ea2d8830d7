"""accumulate_scores and heavy_hitter_topk against the reference."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

from kvcomp import ops
from helpers import build_cache, gen_from
from reference import U32, ref_accumulate_scores, ref_attention, ref_topk


@st.composite
def score_case(draw):
    batch = draw(st.integers(1, 4))
    hkv = draw(st.sampled_from([1, 2, 4]))
    G = draw(st.sampled_from([1, 2, 4, 8]))
    L = draw(st.integers(1, 300))
    extra = draw(st.integers(0, 20))  # logits may be longer than scores
    lens = draw(st.lists(st.one_of(st.just(0), st.just(L), st.integers(0, L)),
                         min_size=batch, max_size=batch))
    seed = draw(st.integers(0, 2**31 - 1))
    spread = draw(st.sampled_from([1.0, 10.0, 50.0]))
    return dict(batch=batch, hkv=hkv, G=G, L=L, extra=extra, lens=lens, seed=seed, spread=spread)


@given(score_case())
def test_accumulate_scores(c):
    g = gen_from(c["seed"])
    B, Hq, L = c["batch"], c["hkv"] * c["G"], c["L"]
    logits = torch.randn(B, Hq, L + c["extra"], generator=g) * c["spread"]
    sl = torch.tensor(c["lens"], dtype=torch.int32)
    # true lse over the first seq_len logits (-inf for empty rows)
    mask = torch.arange(L + c["extra"])[None, :] < sl.long()[:, None]
    lse = torch.logsumexp(logits.double().masked_fill(~mask[:, None], -math.inf), -1).float()
    scores = torch.rand(B, c["hkv"], L, generator=g) * 3
    before = scores.clone()
    ops.accumulate_scores(logits, lse, sl, scores)
    ref = ref_accumulate_scores(logits, lse, sl, before)
    for b in range(B):
        n = int(sl[b])
        # positions >= seq_len untouched, bit for bit
        assert torch.equal(scores[b, :, n:], before[b, :, n:])
    # each term exp(l - lse): the fp32 difference and exp cost ~(|l - lse| + 2) u
    G = c["G"]
    lse_d = lse.double()
    terms = torch.exp(logits.double()[..., :L] - lse_d[..., None].masked_fill(
        torch.isinf(lse_d)[..., None], 0))
    dist = (logits.double()[..., :L] - lse_d[..., None]).abs().nan_to_num(posinf=0)
    term_err = (terms * (dist + 4) * U32).reshape(B, c["hkv"], G, L).sum(2)
    tol = term_err + (G + 2) * U32 * ref.abs() + 1e-30
    err = (scores.double() - ref).abs()
    assert bool((err <= tol).all()), f"accumulate err/tol {(err / tol).max().item():.3g}"


def test_accumulate_scores_true_weights():
    """With lse from paged_decode_attention (and logits_out), each query head's
    weights sum to 1, so a KV head's scores sum to its group size."""
    g = gen_from(3)
    c = build_cache("int4", [77, 200, 5], 2, 64, 16, g)
    q = torch.randn(3, 8, 64, generator=g)
    logits = torch.zeros(3, 8, 200)
    out, lse = ops.paged_decode_attention(q, c.pool, c.block_tables, c.seq_lens, "int4", 0.125, logits)
    scores = torch.zeros(3, 2, 200)
    ops.accumulate_scores(logits, lse, c.seq_lens, scores)
    assert torch.allclose(scores.sum(-1), torch.full((3, 2), 4.0), rtol=1e-5)
    K, V = ops.gather_dequant(c.pool, c.block_tables, c.seq_lens, "int4")
    _, _, ref_logits = ref_attention(q.double(), K.double(), V.double(), c.seq_lens, 0.125)
    p = torch.softmax(ref_logits, -1).nan_to_num(0).reshape(3, 2, 4, -1).sum(2)
    for b in range(3):
        n = int(c.seq_lens[b])
        assert torch.allclose(scores[b, :, :n].double(), p[b, :, :n], rtol=1e-4, atol=1e-7)
        assert bool((scores[b, :, n:] == 0).all())
    # += semantics: a second call doubles
    ops.accumulate_scores(logits, lse, c.seq_lens, scores)
    assert torch.allclose(scores.sum(-1), torch.full((3, 2), 8.0), rtol=1e-5)


def test_accumulate_scores_minus_inf_lse():
    """Heads that attended nothing (lse -inf, seq_len 0) add nothing."""
    logits = torch.randn(2, 4, 10)
    lse = torch.tensor([[-math.inf] * 4, [1.0, 2.0, 3.0, 4.0]])
    sl = torch.tensor([0, 10], dtype=torch.int32)
    scores = torch.ones(2, 1, 10)
    ops.accumulate_scores(logits, lse, sl, scores)
    assert bool((scores[0] == 1).all())
    assert torch.allclose(scores[1].double(), ref_accumulate_scores(logits, lse, sl, torch.ones(2, 1, 10))[1])


# ------------------------------------------------------------------- top-k
@st.composite
def topk_case(draw):
    batch = draw(st.integers(1, 3))
    H = draw(st.integers(1, 4))
    L = draw(st.integers(1, 200))
    k = draw(st.one_of(st.integers(1, L + 10), st.just(1), st.just(L), st.just(L + 1)))
    lens = draw(st.lists(st.one_of(st.just(0), st.just(L), st.integers(0, L), st.integers(0, min(k, L))),
                         min_size=batch, max_size=batch))
    distinct = draw(st.sampled_from([2, 5, 1000, None]))  # few values -> many ties
    seed = draw(st.integers(0, 2**31 - 1))
    return dict(batch=batch, H=H, L=L, k=k, lens=lens, distinct=distinct, seed=seed)


def _scores(c, g):
    shape = (c["batch"], c["H"], c["L"])
    if c["distinct"] is None:
        return torch.randn(shape, generator=g)
    return torch.randint(0, c["distinct"], shape, generator=g).float() / 3


@given(topk_case())
def test_topk_vs_reference(c):
    g = gen_from(c["seed"])
    scores = _scores(c, g)
    sl = torch.tensor(c["lens"], dtype=torch.int32)
    got = ops.heavy_hitter_topk(scores, sl, c["k"])
    assert got.dtype == torch.int32 and got.shape == (c["batch"], c["H"], c["k"])
    assert torch.equal(got, ref_topk(scores, sl, c["k"]))


def test_topk_ties_lower_position():
    s = torch.tensor([[[1.0, 3.0, 3.0, 2.0, 3.0, 3.0, 0.5]]])
    sl = torch.tensor([7], dtype=torch.int32)
    assert ops.heavy_hitter_topk(s, sl, 3).tolist() == [[[1, 2, 4]]]
    assert ops.heavy_hitter_topk(s, sl, 5).tolist() == [[[1, 2, 3, 4, 5]]]
    s = torch.zeros(1, 1, 50)
    assert ops.heavy_hitter_topk(s, torch.tensor([50], dtype=torch.int32), 4).tolist() == [[[0, 1, 2, 3]]]
    # the best beyond seq_len is never picked
    s = torch.tensor([[[1.0, 2.0, 9.0, 9.0]]])
    assert ops.heavy_hitter_topk(s, torch.tensor([2], dtype=torch.int32), 1).tolist() == [[[1]]]


def test_topk_short_rows():
    s = torch.randn(3, 2, 10)
    sl = torch.tensor([0, 3, 10], dtype=torch.int32)
    got = ops.heavy_hitter_topk(s, sl, 5)
    assert bool((got[0] == -1).all())
    assert bool((got[1, :, 3:] == -1).all())
    assert got[1, :, :3].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert bool((got[2] >= 0).all())
    # k > L
    got = ops.heavy_hitter_topk(s, sl, 15)
    assert got.shape == (3, 2, 15)
    assert got[2, 0, :10].tolist() == list(range(10)) and bool((got[2, :, 10:] == -1).all())
    assert torch.equal(got, ref_topk(s, sl, 15))


@pytest.mark.parametrize("distinct", [3, None])
def test_topk_large(distinct):
    g = gen_from(21)
    c = dict(batch=2, H=4, L=6000, distinct=distinct)
    s = _scores(c, g)
    sl = torch.tensor([6000, 4321], dtype=torch.int32)
    for k in (1, 1000, 5000):
        assert torch.equal(ops.heavy_hitter_topk(s, sl, k), ref_topk(s, sl, k))


def test_topk_non_contiguous():
    s = torch.randn(50, 3, 2).permute(2, 1, 0)  # [2, 3, 50]
    sl = torch.tensor([50, 20], dtype=torch.int32)
    assert torch.equal(ops.heavy_hitter_topk(s, sl, 7), ref_topk(s, sl, 7))
