"""Scores for eviction under every attention implementation (kvcomp.scorers
through the Hugging Face integration), checked against eager attention of
the whole sequence computed here: cumulative (H2O), observation window
(SnapKV) and reconstruction (KVzip-style, KVCompCache.compress)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from kvcomp import policies  # noqa: E402
from kvcomp.integrations.hf import BlindEvictionError, KVCompCache  # noqa: E402

N, CHUNK = 160, 64
IMPLEMENTATIONS = ["eager", "sdpa", "kvcomp"]
# The cold tier in fp32: the reference attends exact K/V, so only summation order differs.
EXACT = dict(cold_format="fp32", hot_window=16, sinks=4)

AttentionInterface.register("unscored_sdpa", sdpa_attention_forward)  # a custom implementation kvcomp cannot see


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 512, (2, N), generator=torch.Generator().manual_seed(7))


def _weights(model, ids) -> list[torch.Tensor]:
    """Eager attention probabilities [batch, kv_heads, group, q, kv] per layer, float64."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(ids, output_attentions=True).attentions
    kv = model.config.num_key_value_heads
    return [a.double().view(a.shape[0], kv, -1, a.shape[2], a.shape[3]) for a in attn]


def _run(model, ids, policy, implementation, decode: int = 0, compress_prompt=None) -> KVCompCache:
    model.set_attn_implementation(implementation)
    cache = KVCompCache(policy=policy)
    with torch.no_grad():
        for s in range(0, N, CHUNK):
            model(ids[:, s:min(s + CHUNK, N)], past_key_values=cache, use_cache=True)
        if compress_prompt is not None:
            cache.compress(model, ids[:, :N], prompt_ids=compress_prompt)
        for t in range(decode):
            model(ids[:, N + t:N + t + 1], past_key_values=cache, use_cache=True)
    return cache


def _scores_by_position(layer, row: int, length: int) -> torch.Tensor:
    """[kv_heads, length] scores of the held tokens, NaN where not held."""
    c = layer.cache
    out = torch.full((c.num_kv_heads, length), float("nan"), dtype=torch.float64)
    st = c._seqs[row][0]
    for tier in (st.hot, st.cold):
        out.scatter_(1, tier.pos, tier.scores.double().cpu())
    return out


def _check(cache, want: list[torch.Tensor], length: int):
    for layer, w in zip(cache.layers, want):
        for row in range(w.shape[0]):
            got = _scores_by_position(layer, row, length)
            assert not got.isnan().any()  # budget 1.0: nothing evicted
            torch.testing.assert_close(got, w[row], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_cumulative_scores_match_eager_attention(model, ids, implementation):
    """H2O: every prompt and decode query's weight, summed over the query heads
    of a KV head (budget 1.0 keeps everything, so every score is visible)."""
    decode = 5
    full = torch.cat([ids, torch.randint(3, 512, (2, decode), generator=torch.Generator().manual_seed(8))], 1)
    cache = _run(model, full, policies.h2o(budget=1.0, **EXACT), implementation, decode=decode)
    want = [w.sum((2, 3)) for w in _weights(model, full)]
    _check(cache, want, N + decode)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_window_scores_match_eager_attention(model, ids, implementation):
    """SnapKV: the prompt's last `observe` queries, max-pooled over `pool`."""
    p = policies.h2o(budget=1.0, observe=24, pool=5, **EXACT)
    cache = _run(model, ids, p, implementation)
    pool = lambda x: torch.nn.functional.max_pool1d(x, 5, 1, 2)
    want = [pool(w[:, :, :, -24:].sum((2, 3))) for w in _weights(model, ids)]
    _check(cache, want, N)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_reconstruction_scores_match_eager_attention(model, ids, implementation):
    """KVzip-style: the largest weight any query of the repeat pass (prompt +
    context again, after the context) and any query head of the KV head gives
    each context token; the pass itself is not stored."""
    prompt = torch.randint(3, 512, (2, 6), generator=torch.Generator().manual_seed(9))
    cache = _run(model, ids, policies.h2o(budget=1.0, scorer="reconstruct", **EXACT), implementation,
                 compress_prompt=prompt)
    for layer in cache.layers:
        assert layer.get_seq_length() == N and layer.held_counts().tolist() == [N, N]
    full = torch.cat([ids, prompt, ids], 1)
    want = [w[:, :, :, N:, :N].amax((2, 3)) for w in _weights(model, full)]
    _check(cache, want, N)


@pytest.mark.parametrize("scorer", [None, "window", "reconstruct"])
def test_eviction_agrees_across_implementations(model, ids, scorer):
    """With eviction acting (budget 0.25, a quantized cold tier, decode steps),
    eager and sdpa keep the same tokens with the same scores."""
    decode = 40
    full = torch.cat([ids, torch.randint(3, 512, (2, decode), generator=torch.Generator().manual_seed(8))], 1)
    p = policies.combined(budget=0.25, scorer=scorer, observe=None if scorer != "window" else 32)
    prompt = full[:, :4] if scorer == "reconstruct" else None
    caches = [_run(model, full, p, i, decode=decode, compress_prompt=prompt) for i in ("eager", "sdpa")]
    for a, b in zip(*(c.layers for c in caches)):
        for row in range(2):
            sa, sb = a.cache._seqs[row][0], b.cache._seqs[row][0]
            assert sa.cold.len == p.cold_budget(N + decode) or sa.cold.len < 16
            for ta, tb in ((sa.hot, sb.hot), (sa.cold, sb.cold)):
                assert torch.equal(ta.pos, tb.pos)
                torch.testing.assert_close(ta.scores, tb.scores, rtol=1e-4, atol=1e-6)


def test_eviction_keeps_the_highest_scores(model, ids):
    """After compress, each KV head's cold tier holds its budget of the
    highest-scoring cold tokens (sinks always), as scored before eviction."""
    p = policies.h2o(budget=0.3, scorer="reconstruct", **EXACT)
    before = _run(model, ids, p.replace(budget=1.0), "sdpa", compress_prompt=ids[:, :3])
    after = _run(model, ids, p, "sdpa", compress_prompt=ids[:, :3])
    k = p.cold_budget(N)
    for lb, la in zip(before.layers, after.layers):
        for row in range(2):
            cold_b, cold_a = lb.cache._seqs[row][0].cold, la.cache._seqs[row][0].cold
            assert cold_a.len == k < cold_b.len
            rank = cold_b.scores.masked_fill(cold_b.pos < p.sinks, float("inf"))
            for h in range(rank.shape[0]):
                kept = torch.isin(cold_b.pos[h], cold_a.pos[h])
                assert int(kept.sum()) == k and rank[h][kept].min() >= rank[h][~kept].max()


def test_an_attention_without_scores_is_refused(model, ids):
    """A custom implementation computes no scores: the next step raises
    naming attn_implementation, and nothing was evicted."""
    p = policies.combined(budget=0.25)
    with pytest.raises(BlindEvictionError, match="attn_implementation"):
        _run(model, ids, p, "unscored_sdpa", decode=0)
    cache = KVCompCache(policy=policies.h2o(budget=0.25))
    model.set_attn_implementation("unscored_sdpa")
    with torch.no_grad():
        model(ids[:, :CHUNK], past_key_values=cache, use_cache=True)
        with pytest.raises(BlindEvictionError, match="attn_implementation"):
            model(ids[:, CHUNK:CHUNK + 1], past_key_values=cache, use_cache=True)
    assert all(l.held_counts().tolist() == [CHUNK, CHUNK] for l in cache.layers)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_reconstruct_needs_its_pass(model, ids, implementation):
    """Decoding a reconstruct-scored prompt before compress raises and holds it all."""
    cache = _run(model, ids, policies.h2o(budget=0.25, scorer="reconstruct"), implementation)
    with torch.no_grad(), pytest.raises(BlindEvictionError, match="compress"):
        model(ids[:, :1], past_key_values=cache, use_cache=True)
    assert all(l.held_counts().tolist() == [N, N] for l in cache.layers)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_padded_batch_with_eviction_is_refused_outside_kvcomp(model, ids, implementation):
    """Under eager/sdpa the model's mask addresses the held tokens by position;
    after eviction it no longer would: refused, not wrong."""
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    model.set_attn_implementation(implementation)
    with torch.no_grad(), pytest.raises(ValueError, match="padded"):
        model(ids, attention_mask=mask, past_key_values=KVCompCache(policy=policies.h2o()), use_cache=True)


def test_a_compressed_document_saved_answers_later(model, ids, tmp_path):
    """A document compressed once (reconstruct), saved and loaded, continues
    exactly as the cache it was saved from: a question chunk, then decode."""
    p = policies.combined(budget=0.25, scorer="reconstruct", observe=None)
    cache = _run(model, ids, p, "kvcomp", compress_prompt=ids[:, :3])
    assert all(l.compressed and not l.pending_evict for l in cache.layers)
    assert all(max(l.held_counts().tolist()) < N // 2 for l in cache.layers)
    cache.save(tmp_path / "doc.kvc")
    back = KVCompCache.load(tmp_path / "doc.kvc")
    question = torch.randint(3, 512, (2, 20), generator=torch.Generator().manual_seed(11))
    outs = []
    with torch.no_grad():
        for c in (cache, back):
            logits = [model(question, past_key_values=c, use_cache=True).logits[:, -1]]
            for _ in range(4):
                logits.append(model(logits[-1].argmax(-1, keepdim=True), past_key_values=c, use_cache=True).logits[:, -1])
            outs.append(torch.stack(logits))
    assert torch.equal(outs[0], outs[1])


def test_compress_leaves_recurrent_layers_as_they_were():
    """A hybrid model's linear-attention layers see the repeat pass too; compress
    restores them, so the model continues from the document, not from its repeat."""
    from test_hf_sliding import hybrid
    cfg, cls = hybrid("qwen3-next")
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    ids = torch.randint(0, 128, (1, 96), generator=torch.Generator().manual_seed(3))
    caches = [KVCompCache(policy=policies.h2o(budget=1.0, scorer=s, **EXACT), config=cfg)
              for s in ("reconstruct", "cumulative")]
    nxt = torch.randint(0, 128, (1, 1), generator=torch.Generator().manual_seed(4))
    logits = []
    with torch.no_grad():
        for c in caches:
            model(ids, past_key_values=c, use_cache=True)
            c.compress(model, ids, prompt_ids=ids[:, :2])
            logits.append(model(nxt, past_key_values=c, use_cache=True).logits)
    assert [type(l).__name__ for l in caches[0].layers] == ["LinearAttentionLayer", "KVCompLayer"] * 2
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)  # budget 1.0: scores differ, tokens not
