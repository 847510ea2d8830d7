"""The Hugging Face integration on tiny random models (no download):
generation through KVCompCache matches DynamicCache where it must."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import kvcomp  # noqa: E402
from kvcomp import policies  # noqa: E402
from kvcomp.integrations.hf import KVCompCache  # noqa: E402

PROMPT, NEW, PAD = 300, 48, 37


def _llama():
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096)
    return LlamaForCausalLM(cfg)


def _qwen2():
    cfg = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=4096)  # MQA
    return Qwen2ForCausalLM(cfg)


MODELS = {"llama-gqa": _llama, "qwen2": _qwen2}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]().eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :PAD] = 0  # left padding of row 1
    return ids, mask


def _generate(model, batch, attn, cache, new=NEW):
    ids, mask = batch
    model.set_attn_implementation(attn)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, past_key_values=cache, pad_token_id=0)


@pytest.fixture(scope="module")
def reference(model, batch):
    return _generate(model, batch, "eager", DynamicCache())


@pytest.mark.parametrize("attn", ["eager", "kvcomp"])
def test_full_policy_generates_the_same_tokens(model, batch, reference, attn):
    cache = KVCompCache(policy=policies.full())
    out = _generate(model, batch, attn, cache)
    assert out.shape[1] == PROMPT + NEW
    assert torch.equal(out, reference)
    held = cache.stats()["tokens"]
    # "kvcomp" erases the padding after the prompt; eager keeps it, as DynamicCache does.
    assert held == 2 * (PROMPT + NEW - 1) - (PAD if attn == "kvcomp" else 0)


def _logits_along(model, batch, tokens, cache, attn):
    """Teacher-forced logits of every generated step through ``cache``."""
    ids, mask = batch
    model.set_attn_implementation(attn)
    out = []
    with torch.no_grad():
        r = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        out.append(r.logits[:, -1])
        for t in range(tokens.shape[1] - 1):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
            pos = (mask.cumsum(1) - 1)[:, -1:]
            r = model(input_ids=tokens[:, t:t + 1], attention_mask=mask, past_key_values=cache,
                      position_ids=pos, use_cache=True)
            out.append(r.logits[:, -1])
    return torch.stack(out, 1)


def test_int8_logits_match_dynamic_cache(model, batch, reference):
    """int8 per-token K/V (error <= absmax/254 per element) moves the logits of
    a random model by well under 1% of their spread."""
    gen = reference[:, PROMPT:]
    ref = _logits_along(model, batch, gen, DynamicCache(), "eager")
    got = _logits_along(model, batch, gen, KVCompCache(policy=policies.int8()), "kvcomp")
    err = (got - ref).abs().max() / ref.std()
    assert err < 1e-2, float(err)
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


def test_kvcomp_decode_attends_on_pages(model, batch):
    """After the prompt, "kvcomp" decode steps get only the new token from the
    cache (no dequantized copy): the pages are all that is attended."""
    cache = KVCompCache(policy=policies.int4())
    _generate(model, batch, "kvcomp", cache, new=4)
    assert all(layer.native for layer in cache.layers)
    s = cache.stats()
    assert s["hot_tokens"] + s["cold_tokens"] == s["tokens"] > 0
    assert s["cold_tokens"] > 0


def test_streaming_holds_constant_memory(batch):
    torch.manual_seed(0)
    model = _llama().eval()
    model.set_attn_implementation("kvcomp")
    pol = policies.streaming_llm(sinks=4, window=60)
    cache = KVCompCache(policy=pol)
    ids, mask = batch
    sizes = []
    with torch.no_grad():
        r = model(input_ids=ids[:, :16], attention_mask=mask[:, :16] * 0 + 1, past_key_values=cache, use_cache=True)
        tok = r.logits[:, -1:].argmax(-1)
        for step in range(2000):
            r = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = r.logits[:, -1:].argmax(-1)
            sizes.append((cache.stats()["tokens"], cache.stats()["bytes"]))
    assert cache.get_seq_length() == 16 + 2000
    steady = sizes[100:]
    assert set(steady) == {sizes[-1]}
    assert sizes[-1][0] == 2 * (4 + 60)


def test_kvcomp_registered():
    from transformers import AttentionInterface
    assert "kvcomp" in AttentionInterface._global_mapping
    assert isinstance(KVCompCache(policy=policies.kivi2()), transformers.Cache)


def test_h2o_scores_prompt_chunks_like_eager_attention():
    """H2O's scores after a chunked prompt equal each token's attention weight
    summed over every prompt query and the query heads of its KV head, read
    from eager attention of the whole prompt (an independent computation)."""
    torch.manual_seed(0)
    model = _llama().eval()
    ids = torch.randint(3, 512, (1, 240), generator=torch.Generator().manual_seed(2))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(ids, output_attentions=True).attentions  # per layer [1, heads, q, kv]
    model.set_attn_implementation("kvcomp")
    cache = KVCompCache(policy=policies.h2o(budget=1.0))
    with torch.no_grad():
        for s in range(0, ids.shape[1], 80):
            model(ids[:, s:s + 80], past_key_values=cache, use_cache=True)
    for layer, weights in zip(cache.layers, attn):
        c = layer.cache
        want = weights[0].sum(1).view(c.num_kv_heads, -1, ids.shape[1]).sum(1).double()  # [kv, positions]
        st = c._seqs[0][0]
        for tier in (st.hot, st.cold):
            got = tier.scores.double()
            assert torch.allclose(got, torch.gather(want, 1, tier.pos), rtol=1e-4, atol=1e-5)


def test_observe_scores_are_the_prompt_end_attention_pooled():
    """Policy.observe (SnapKV): after a chunked prompt, every token's score is
    the attention the prompt's last `observe` queries give it (summed over
    the query heads of its KV head), max-pooled over Policy.scoring.pool neighbours; read
    from eager attention of the whole prompt. Nothing is evicted yet."""
    from kvcomp.integrations import hf
    torch.manual_seed(0)
    model = _llama().eval()
    ids = torch.randint(3, 512, (1, 240), generator=torch.Generator().manual_seed(4))
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(ids, output_attentions=True).attentions
    model.set_attn_implementation("kvcomp")
    p = policies.h2o(budget=0.25, hot_window=16, observe=24)
    cache = KVCompCache(policy=p)
    with torch.no_grad():
        for s in range(0, ids.shape[1], 80):
            model(ids[:, s:s + 80], past_key_values=cache, use_cache=True)
    for layer, weights in zip(cache.layers, attn):
        c = layer.cache
        st = c._seqs[0][0]
        assert st.cold.len + st.hot.len == ids.shape[1]  # the whole prompt is held until decode
        last = weights[0, :, -24:].sum(1).view(c.num_kv_heads, -1, ids.shape[1]).sum(1).double()
        want = torch.stack([torch.tensor([float(row[max(0, j - p.scoring.pool // 2):j + p.scoring.pool // 2 + 1].max())
                                          for j in range(len(row))]) for row in last]).double()
        for tier in (st.hot, st.cold):
            assert torch.allclose(tier.scores.double(), torch.gather(want, 1, tier.pos), rtol=1e-4, atol=1e-5)


def test_observe_evicts_the_lowest_scores_at_the_first_decode_step():
    torch.manual_seed(0)
    model = _llama().eval()
    model.set_attn_implementation("kvcomp")
    ids = torch.randint(3, 512, (1, 400), generator=torch.Generator().manual_seed(5))
    p = policies.h2o(budget=0.25, hot_window=16, observe=32)
    cache = KVCompCache(policy=p)
    with torch.no_grad():
        for s in range(0, ids.shape[1], 100):
            model(ids[:, s:s + 100], past_key_values=cache, use_cache=True)
        before = [(layer.cache._seqs[0][0].cold.pos.clone(), layer.cache._seqs[0][0].cold.scores.clone())
                  for layer in cache.layers]
        model(ids[:, :1], past_key_values=cache, use_cache=True)
    for layer, (pos, scores) in zip(cache.layers, before):
        cold = layer.cache._seqs[0][0].cold
        k = p.cold_budget(ids.shape[1] + 1)
        assert cold.len == k < pos.shape[1]
        scores = scores.masked_fill(pos < p.sinks, float("inf"))
        for h in range(pos.shape[0]):  # kept: k of the prompt's top scores (pooling makes ties)
            kept = torch.isin(pos[h], cold.pos[h, :k])
            assert int(kept.sum()) == k and scores[h][kept].min() >= scores[h][~kept].max()


def test_h2o_prompt_chunks_end_within_budget():
    torch.manual_seed(0)
    model = _llama().eval()
    model.set_attn_implementation("kvcomp")
    ids = torch.randint(3, 512, (1, 400), generator=torch.Generator().manual_seed(3))
    p = policies.h2o(budget=0.25)
    cache = KVCompCache(policy=p)
    with torch.no_grad():
        for s in range(0, ids.shape[1], 100):
            model(ids[:, s:s + 100], past_key_values=cache, use_cache=True)
            for layer in cache.layers:
                assert layer.cache._seqs[0][0].cold.len <= p.cold_budget(s + 100)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_streaming_needs_no_scores(batch, attn):
    torch.manual_seed(0)
    model = _llama().eval()
    out = _generate(model, batch, attn, KVCompCache(policy=policies.streaming_llm(sinks=4, window=60)), new=4)
    assert out.shape[1] == batch[0].shape[1] + 4


@pytest.mark.parametrize("attn", ["eager", "kvcomp"])
def test_beam_search_matches_dynamic_cache(batch, attn):
    """reorder_cache copies rows (PagedKVCache.fork): beam search under full()
    gives DynamicCache's beams, and a compressed policy runs it too."""
    torch.manual_seed(0)
    model = _llama().eval()
    ids, mask = batch[0][:, :60], batch[1][:, :60]

    def beams(cache, implementation):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                                  num_beams=3, num_return_sequences=3, do_sample=False, pad_token_id=0,
                                  past_key_values=cache)
    want = beams(DynamicCache(), "eager")
    assert torch.equal(beams(KVCompCache(policy=policies.full()), attn), want)
    cache = KVCompCache(policy=policies.int8())
    assert beams(cache, attn).shape == want.shape and cache.layers[0].cache.sequences == list(range(6))


def test_fork_copies_a_sequence():
    c = kvcomp.PagedKVCache(2, 2, 64, policies.int4(hot_window=16), max_tokens=512, dtype=torch.float32)
    c.add_sequence("a")
    for l in range(2):
        c.append(l, ["a"], torch.randn(1, 70, 2, 64), torch.randn(1, 70, 2, 64))
    c.fork("a", "b")
    q = torch.randn(1, 4, 64)
    assert torch.equal(c.attend(0, ["a"], q), c.attend(0, ["b"], q))
    c.append(0, ["b"], torch.randn(1, 5, 2, 64), torch.randn(1, 5, 2, 64))  # b diverges, a stays
    assert (c.seq_len("a"), c.seq_len("b")) == (70, 75)
    c.free("a")
    c.rename("b", "a")
    assert c.sequences == ["a"] and c.seq_len("a") == 75
    with pytest.raises(ValueError, match="already exists"):
        c.fork("a", "a")


@pytest.mark.parametrize("attn", ["eager", "kvcomp"])
def test_assisted_decoding_matches_dynamic_cache(attn):
    """crop (PagedKVCache.truncate) rolls rejected draft tokens back."""
    torch.manual_seed(0)
    model = _llama().eval()
    torch.manual_seed(1)
    draft = _llama().eval()  # another random model: it proposes tokens the target often rejects
    ids = torch.randint(3, 512, (1, 50), generator=torch.Generator().manual_seed(2))

    def assisted(cache, implementation):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            return model.generate(input_ids=ids, max_new_tokens=20, min_new_tokens=20, do_sample=False,
                                  assistant_model=draft, pad_token_id=0, past_key_values=cache)
    want = assisted(DynamicCache(), "eager")
    assert torch.equal(assisted(KVCompCache(policy=policies.full()), attn), want)
    assert assisted(KVCompCache(policy=policies.int8()), attn).shape == want.shape


def test_truncate_rolls_a_sequence_back():
    """Exact tiers (fp32 cold) make the rolled-back cache equal to one that
    never saw the rest; a quantized cold tier keeps its codes (not re-exact)."""
    policy = kvcomp.Policy(cold_format="fp32", hot_window=16)
    c = kvcomp.PagedKVCache(1, 2, 64, policy, max_tokens=512, dtype=torch.float32)
    c.add_sequence("a")
    k, v = torch.randn(1, 90, 2, 64), torch.randn(1, 90, 2, 64)
    c.append(0, ["a"], k, v)
    c.truncate("a", 60)
    hot, cold = c.positions("a")
    assert sorted(torch.cat([hot, cold], 1)[0].tolist()) == list(range(60))
    d = kvcomp.PagedKVCache(1, 2, 64, policy, max_tokens=512, dtype=torch.float32)
    d.add_sequence("a")
    d.append(0, ["a"], k[:, :60], v[:, :60])
    assert (c.seq_len("a"), c.held("a")) == (60, 60)
    q = torch.randn(1, 4, 64)
    torch.testing.assert_close(c.attend(0, ["a"], q), d.attend(0, ["a"], q), rtol=1e-5, atol=1e-6)
